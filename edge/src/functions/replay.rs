//! Replay: a function run over stored history (`fn replay NAME --from --to`, or a deploy with
//! `--from`), window by window (one hour of the store at a time), in time order, with the
//! trigger `replay`. Its effects are exactly once like live ones: each chunk's key-value
//! writes, alerts and derived points (marked as backfill for the cloud) are written in one
//! batch with the replay's progress, from which a restarted edge resumes. It publishes no MQTT
//! message (history is not news). While it runs, the function's live triggers wait in the log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use millrace_shared::Event;
use serde::{Deserialize, Serialize};

use super::reader::BatchKv;
use super::workers::WorkerMetrics;
use super::{EventRef, FunctionError, Functions, Input, TriggerKind};
use crate::store::FunctionCommit;

/// Store window read at once.
const WINDOW_MS: i64 = 3_600_000;
/// A chunk of a replay is committed after this many events or [`CHUNK_TIME`].
const CHUNK_EVENTS: usize = 4096;
const CHUNK_TIME: Duration = Duration::from_millis(200);

/// Where a replay is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayState {
    /// Counting the events of the range.
    Counting,
    /// Running the function over them.
    Running,
    /// Finished.
    Done,
    /// Stopped by hand.
    Cancelled,
    /// Stopped by an error (see `error`).
    Failed,
}

impl ReplayState {
    /// Whether it is still going.
    pub fn active(self) -> bool {
        matches!(self, Self::Counting | Self::Running)
    }
}

/// A replay's progress (stored with its effects; schema version 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayStatus {
    /// Range start, Unix ms.
    pub from_ms: i64,
    /// Range end (exclusive), Unix ms.
    pub to_ms: i64,
    /// Where it is.
    pub state: ReplayState,
    /// Events of the range that match the function's filters (`None` while counting).
    pub events_total: Option<u64>,
    /// Of which done.
    pub events_done: u64,
    /// Started, Unix ms.
    pub started_ms: i64,
    /// Ended, Unix ms.
    #[serde(default)]
    pub finished_ms: Option<i64>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Resume point: the start of the window being replayed …
    pub window_ms: i64,
    /// … and the events of that window done.
    pub window_done: u64,
}

/// A replay in this process.
#[derive(Debug)]
pub(super) struct ReplayJob {
    pub(super) status: Mutex<ReplayStatus>,
    cancel: AtomicBool,
}

impl ReplayJob {
    pub(super) fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub(super) fn status(&self) -> ReplayStatus {
        self.status.lock().expect("replay status").clone()
    }
}

impl Functions {
    /// Starts replaying a function over stored history `[from_ms, to_ms)` (`to_ms` defaults to
    /// now). Refuses a range that is empty, reversed or in the future, a function without
    /// topic filters, and a second replay while one runs.
    pub fn replay(
        &self,
        name: &str,
        from_ms: i64,
        to_ms: Option<i64>,
    ) -> Result<ReplayStatus, FunctionError> {
        let d = self.deployed(name)?;
        if d.filters.is_empty() {
            return Err(FunctionError::Invalid(format!(
                "function `{name}` has no topic filters: a replay runs it over stored device events"
            )));
        }
        let now = chrono::Utc::now().timestamp_millis();
        let to_ms = to_ms.unwrap_or(now);
        if from_ms >= to_ms {
            return Err(FunctionError::Invalid(format!(
                "the replay range is empty: `from` ({from_ms}) must be before `to` ({to_ms})"
            )));
        }
        // A second of slack for clocks read a moment apart.
        if to_ms > now + 1000 {
            return Err(FunctionError::Invalid(format!(
                "the replay range ends in the future (`to` = {to_ms}, now {now}): a replay covers stored history; live events reach the function from the trigger log"
            )));
        }
        let mut jobs = self.inner.replays.lock().expect("replays");
        if let Some(j) = jobs.get(name)
            && j.status().state.active()
        {
            return Err(FunctionError::Conflict(format!(
                "function `{name}` is already replaying; cancel it first (DELETE .../replay or fn replay --cancel)"
            )));
        }
        let status = ReplayStatus {
            from_ms,
            to_ms,
            state: ReplayState::Counting,
            events_total: None,
            events_done: 0,
            started_ms: now,
            finished_ms: None,
            error: None,
            window_ms: from_ms,
            window_done: 0,
        };
        let job = Arc::new(ReplayJob {
            status: Mutex::new(status.clone()),
            cancel: AtomicBool::new(false),
        });
        jobs.insert(name.to_owned(), job.clone());
        drop(jobs);
        // Kept from the start, so that a stop before its first chunk resumes it.
        let commit = FunctionCommit {
            replay: Some(serde_json::to_vec(&status).expect("json")),
            ..Default::default()
        };
        self.inner.store.commit_function(name, &commit, None)?;
        tracing::info!(function = %name, from_ms, to_ms, "replay started");
        self.spawn_replay(name, job)?;
        Ok(status)
    }

    /// Cancels a running replay (it stops after the invocation it runs, keeping what it did).
    pub fn cancel_replay(&self, name: &str) -> Result<ReplayStatus, FunctionError> {
        self.deployed(name)?;
        match self.replay_job(name) {
            Some(j) if j.status().state.active() => {
                j.cancel.store(true, Ordering::Relaxed);
                Ok(j.status())
            }
            _ => Err(FunctionError::Conflict(format!(
                "function `{name}` is not replaying"
            ))),
        }
    }

    /// The function's current or last replay.
    pub fn replay_status(&self, name: &str) -> Option<ReplayStatus> {
        self.replay_job(name).map(|j| j.status())
    }

    fn replay_job(&self, name: &str) -> Option<Arc<ReplayJob>> {
        self.inner
            .replays
            .lock()
            .expect("replays")
            .get(name)
            .cloned()
    }

    /// Resumes the replays a stop interrupted, and remembers the last one of each function.
    pub(super) fn resume_replays(&self) -> Result<(), FunctionError> {
        for (name, bytes) in self.inner.store.replays()? {
            let Ok(status) = serde_json::from_slice::<ReplayStatus>(&bytes) else {
                tracing::error!(function = %name, "unreadable replay progress; ignored");
                continue;
            };
            if self.deployed(&name).is_err() {
                continue;
            }
            let active = status.state.active();
            let job = Arc::new(ReplayJob {
                status: Mutex::new(status),
                cancel: AtomicBool::new(false),
            });
            self.inner
                .replays
                .lock()
                .expect("replays")
                .insert(name.clone(), job.clone());
            if active {
                tracing::info!(function = %name, "resuming a replay the last stop interrupted");
                self.spawn_replay(&name, job)?;
            }
        }
        Ok(())
    }

    fn spawn_replay(&self, name: &str, job: Arc<ReplayJob>) -> Result<(), FunctionError> {
        let (this, name) = (self.clone(), name.to_owned());
        let thread = std::thread::Builder::new()
            .name(format!("fn-{name}-replay"))
            .spawn(move || {
                super::workers::lower_priority(this.inner.cfg.nice);
                let outcome = this.run_replay(&name, &job);
                let mut s = job.status();
                s.finished_ms = Some(chrono::Utc::now().timestamp_millis());
                match outcome {
                    Ok(state) => s.state = state,
                    Err(e) => {
                        tracing::error!(function = %name, error = %e, "replay failed");
                        s.state = ReplayState::Failed;
                        s.error = Some(e.to_string());
                    }
                }
                if this.inner.stop.load(Ordering::Relaxed) && s.state == ReplayState::Cancelled {
                    // Stopped with the edge, not by hand: resumed at the next start.
                    return;
                }
                tracing::info!(function = %name, state = ?s.state, done = s.events_done, "replay ended");
                let commit = FunctionCommit {
                    replay: Some(serde_json::to_vec(&s).expect("json")),
                    ..Default::default()
                };
                if this.deployed(&name).is_ok()
                    && let Err(e) = this.inner.store.commit_function(&name, &commit, None)
                {
                    tracing::error!(function = %name, error = %e, "could not store the replay's end");
                }
                *job.status.lock().expect("replay status") = s;
            })
            .map_err(|e| FunctionError::Runtime(e.to_string()))?;
        self.own_thread(thread);
        Ok(())
    }

    /// Windows of the range from `from`: `[w, next boundary or to)`.
    fn windows(from: i64, to: i64) -> impl Iterator<Item = (i64, i64)> {
        let mut w = from;
        std::iter::from_fn(move || {
            (w < to).then(|| {
                let end = ((w.div_euclid(WINDOW_MS) + 1) * WINDOW_MS).min(to);
                let r = (w, end);
                w = end;
                r
            })
        })
    }

    fn run_replay(&self, name: &str, job: &ReplayJob) -> Result<ReplayState, FunctionError> {
        let stopped =
            || job.cancel.load(Ordering::Relaxed) || self.inner.stop.load(Ordering::Relaxed);
        let store = self.inner.store.clone();
        let mut status = job.status();
        if status.events_total.is_none() {
            let d = self.deployed(name)?;
            let mut total = 0u64;
            for (w, end) in Self::windows(status.from_ms, status.to_ms) {
                if stopped() {
                    return Ok(ReplayState::Cancelled);
                }
                total += store.history_len(w, end, |m, k| d.matches(m, k))?;
            }
            status.events_total = Some(total);
            status.state = ReplayState::Running;
            *job.status.lock().expect("replay status") = status.clone();
        }
        let lease = self.lease(name);
        let mut m = WorkerMetrics::new(name);
        let windows: Vec<(i64, i64)> = Self::windows(status.window_ms, status.to_ms).collect();
        for (w, end) in windows {
            let d = self.deployed(name)?;
            let events: Arc<Vec<Event>> = Arc::new(store.history(w, end, |m, k| d.matches(m, k))?);
            let mut at = status.window_done as usize;
            loop {
                if stopped() {
                    return Ok(ReplayState::Cancelled);
                }
                let _lease = lease.lock().expect("lease");
                // The current version (a deploy may have replaced it meanwhile).
                let d = self.deployed(name)?;
                let spec = d.spec.lock().expect("spec").clone();
                let batch_max = if d.compiled.takes_batches() {
                    spec.batch_max.max(1) as usize
                } else {
                    1
                };
                let kv = Arc::new(BatchKv::new(store.clone(), name));
                let mut commit = FunctionCommit {
                    backfill: true,
                    ..Default::default()
                };
                let mut records = vec![];
                let mut names = super::invocation::Names::default();
                let started = Instant::now();
                let chunk_end = (at + CHUNK_EVENTS).min(events.len());
                while at < chunk_end && !stopped() && started.elapsed() < CHUNK_TIME {
                    let n = batch_max.min(chunk_end - at);
                    let inputs: Vec<Input> = (at..at + n)
                        .map(|index| {
                            let e = &events[index];
                            let mut input = Input::from_event(
                                EventRef {
                                    batch: events.clone(),
                                    index,
                                },
                                names.of(e),
                            );
                            input.trigger = TriggerKind::Replay;
                            input.replay_at = Some((w, index as u64));
                            input
                        })
                        .collect();
                    records.push(super::reader::invoke_into(
                        &self.inner,
                        &spec,
                        d.compiled.as_ref(),
                        &d.stats,
                        &mut m,
                        &kv,
                        &mut commit,
                        inputs,
                        0,
                        false,
                    ));
                    at += n;
                }
                status.events_done += (at - status.window_done as usize) as u64;
                status.window_done = at as u64;
                let window_finished = at >= events.len();
                if window_finished {
                    status.window_ms = end;
                    status.window_done = 0;
                }
                commit.replay = Some(serde_json::to_vec(&status).expect("json"));
                store.commit_function(name, &commit, None)?;
                drop(_lease);
                for r in &records {
                    self.inner.log(r);
                }
                *job.status.lock().expect("replay status") = status.clone();
                if window_finished {
                    break;
                }
            }
        }
        Ok(ReplayState::Done)
    }
}

/// Whether a replay of this function is going (its live reader waits meanwhile).
pub(super) fn replaying(replays: &Mutex<HashMap<String, Arc<ReplayJob>>>, name: &str) -> bool {
    replays
        .lock()
        .expect("replays")
        .get(name)
        .is_some_and(|j| j.status().state.active())
}
