//! Topic triggers from the trigger log: one reader thread per function with topic filters
//! reads the stored events from the function's durable cursor, in store order, runs the
//! function on those that match, and writes the effects of a batch of invocations together
//! with the cursor's move in one RocksDB batch (`Store::commit_function`).
//!
//! Guarantees: every event stored while the function has a cursor is seen once, in store order
//! (so in order per device). Key-value writes, alerts and derived points are exactly once:
//! after a crash the batch that was not committed is run again from the cursor. MQTT publishes
//! (alerts included) happen before the commit, so they are at least once; each carries a stable
//! id (the log seq) for receivers to drop repeats. A slow function falls behind (its lag is
//! reported), it never drops; the breaker's pause stops reading for a while, it drops nothing.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use millrace_shared::Event;

use super::invocation::StoreKv;
use super::log::ActionCounts;
use super::workers::{WorkerMetrics, lower_priority, point_events};
use super::{
    ALERT_TOPIC_PREFIX, Compiled, Deployed, EventRef, FunctionError, Functions, Inner, Input,
    KvRead,
};

use crate::store::{FunctionCommit, KvWrite, Store, StoreError};

/// Records read per batch at most; a batch is also committed after [`BATCH_TIME`].
pub(super) const BATCH_RECORDS: usize = 4096;
/// A batch of invocations is committed at the latest after this long.
const BATCH_TIME: Duration = Duration::from_millis(200);
/// A reader that found fewer records than this (it keeps up) waits [`LINGER`] before it reads
/// again: a few ingest batches in one wake-up and one commit, not one each. It adds at most
/// that to the time from storing an event to running the function.
const LINGER_BELOW: usize = 512;
const LINGER: Duration = Duration::from_millis(5);
/// A reader that is behind while devices are still sending pauses this many times as long as
/// its last batch took before the next one: it takes at most half the CPU it could, leaving
/// the rest to ingest, and catches up at full speed once the load stops.
const BEHIND_PAUSE_FACTOR: u32 = 1;
/// How long an idle reader waits for new records before it looks at its flags again.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// A function's lag behind the trigger log.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Lag {
    /// Log records not yet read (of every topic: not all may match).
    pub events: u64,
    /// Age of the oldest unread record, seconds.
    pub seconds: f64,
}

/// Computes a function's lag from its stored cursor.
pub(super) fn lag(store: &Store, name: &str) -> Result<Option<Lag>, StoreError> {
    let Some(cursor) = store.function_cursor(name)? else {
        return Ok(None);
    };
    let next = store.trigger_next();
    if cursor >= next {
        return Ok(Some(Lag::default()));
    }
    let now = chrono::Utc::now().timestamp_millis();
    let seconds = store
        .trigger_stored_ms(cursor)?
        .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
    Ok(Some(Lag {
        events: next - cursor,
        seconds,
    }))
}

/// Key-value reads of a batch: what earlier invocations of the batch wrote, then the store.
pub(super) struct BatchKv {
    store: StoreKv,
    written: Mutex<HashMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl KvRead for BatchKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if let Some(v) = self.written.lock().expect("batch kv").get(key) {
            return Ok(v.clone());
        }
        self.store.get(key)
    }
}

impl BatchKv {
    pub(super) fn new(store: Arc<Store>, function: &str) -> Self {
        Self {
            store: StoreKv {
                store,
                function: function.to_owned(),
            },
            written: Mutex::new(HashMap::new()),
        }
    }

    fn write(&self, writes: &[KvWrite]) {
        let mut w = self.written.lock().expect("batch kv");
        for (k, v) in writes {
            w.insert(k.clone(), v.clone());
        }
    }
}

impl Functions {
    /// Starts the reader of one deployed version of a function with topic filters.
    pub(super) fn spawn_reader(
        &self,
        d: &Arc<Deployed>,
        compiled: &Arc<dyn Compiled>,
    ) -> Result<(), FunctionError> {
        let name = d.spec.lock().expect("spec").name.clone();
        let lease = self.lease(&name);
        let (inner, d, compiled) = (self.inner.clone(), d.clone(), compiled.clone());
        let thread = std::thread::Builder::new()
            .name(format!("fn-{name}-log"))
            .spawn(move || {
                lower_priority(inner.cfg.nice);
                let mut reader = Reader {
                    m: WorkerMetrics::new(&name),
                    lag_events: metrics::gauge!("millrace_edge_function_lag_events", "function" => name.clone()),
                    lag_seconds: metrics::gauge!("millrace_edge_function_lag_seconds", "function" => name.clone()),
                    skipped: metrics::counter!("millrace_edge_function_skipped_total", "function" => name.clone()),
                    inner,
                    d,
                    compiled,
                    name,
                    lag_reported: Instant::now() - Duration::from_secs(1),
                };
                reader.run(&lease);
            })
            .map_err(|e| FunctionError::Runtime(e.to_string()))?;
        self.own_thread(thread);
        Ok(())
    }
}

struct Reader {
    inner: Arc<Inner>,
    d: Arc<Deployed>,
    compiled: Arc<dyn Compiled>,
    name: String,
    m: WorkerMetrics,
    lag_events: metrics::Gauge,
    lag_seconds: metrics::Gauge,
    skipped: metrics::Counter,
    lag_reported: Instant,
}

enum Step {
    /// Read and ran a batch of this many log records.
    Worked(usize),
    /// Nothing to read (or not allowed to now): wait.
    Idle(u64),
    /// Retired, stopped, or the cursor is gone.
    Exit,
}

impl Reader {
    fn done(&self) -> bool {
        self.inner.stop.load(Ordering::Relaxed) || self.d.retired.load(Ordering::Relaxed)
    }

    fn run(&mut self, lease: &Mutex<()>) {
        let mut failures = 0u32;
        while !self.done() {
            // Disabled, paused by the breaker, or replaying history: live triggers wait.
            if !self.d.enabled.load(Ordering::Relaxed)
                || self.d.stats.paused(Instant::now())
                || super::replay::replaying(&self.inner.replays, &self.name)
            {
                self.report_lag();
                std::thread::sleep(IDLE_WAIT / 2);
                continue;
            }
            // The lease: one version of a function reads its cursor at a time.
            let (log_before, started) = (self.inner.store.trigger_next(), Instant::now());
            let step = {
                let _lease = lease.lock().expect("lease");
                self.step()
            };
            match step {
                Ok(Step::Worked(read)) => {
                    failures = 0;
                    if read < LINGER_BELOW {
                        // Keeping up: let a few ingest batches gather rather than waking (and
                        // committing) for each one.
                        std::thread::sleep(LINGER);
                    } else if self.inner.store.trigger_next() > log_before {
                        // Behind, and devices sent meanwhile: ingest first.
                        std::thread::sleep(started.elapsed() * BEHIND_PAUSE_FACTOR);
                    }
                }
                Ok(Step::Idle(cursor)) => {
                    failures = 0;
                    self.report_lag();
                    self.inner.store.wait_triggers(cursor, IDLE_WAIT);
                }
                Ok(Step::Exit) => return,
                Err(e) => {
                    // The batch was not committed: it runs again (its publishes may repeat).
                    failures += 1;
                    let wait = Duration::from_millis(100 << failures.min(6));
                    tracing::error!(function = %self.name, error = %e, retry_in_ms = wait.as_millis() as u64, "function could not commit a batch of triggers; it runs again");
                    metrics::counter!("millrace_edge_function_commit_errors_total", "function" => self.name.clone()).increment(1);
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// Sets the lag gauges (at most twice a second: it reads the store).
    fn report_lag(&mut self) {
        if self.lag_reported.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.lag_reported = Instant::now();
        if let Ok(Some(l)) = lag(&self.inner.store, &self.name) {
            self.lag_events.set(l.events as f64);
            self.lag_seconds.set(l.seconds);
        }
    }

    /// Reads one batch from the cursor, runs the function on what matches, commits.
    fn step(&mut self) -> Result<Step, StoreError> {
        if self.done() {
            return Ok(Step::Exit);
        }
        let store = self.inner.store.clone();
        let Some(cursor) = store.function_cursor(&self.name)? else {
            return Ok(Step::Exit);
        };
        let records = store.trigger_records(cursor, BATCH_RECORDS)?;
        let Some(first) = records.first() else {
            return Ok(Step::Idle(cursor));
        };
        if first.seq > cursor {
            let skipped = first.seq - cursor;
            self.d.stats.skipped.fetch_add(skipped, Ordering::Relaxed);
            self.skipped.increment(skipped);
            tracing::warn!(function = %self.name, skipped, from_seq = cursor, to_seq = first.seq, "function fell behind past the trigger log's retention: it skips to the oldest stored event");
        }
        let spec = self.d.spec.lock().expect("spec").clone();
        let kv = Arc::new(BatchKv::new(store.clone(), &self.name));
        let (seqs, stored): (Vec<u64>, Vec<i64>) =
            records.iter().map(|r| (r.seq, r.stored_ms)).unzip();
        let events: Arc<Vec<Event>> = Arc::new(records.into_iter().map(|r| r.event).collect());
        let mut commit = FunctionCommit::default();
        // Past any skipped records at least (moved even if nothing runs before a stop).
        let mut next = seqs[0];
        let started = Instant::now();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let batch_max = if self.compiled.takes_batches() {
            spec.batch_max.max(1) as usize
        } else {
            1
        };
        let mut pending: Vec<Input> = Vec::new();
        let mut queued_ms = 0;
        let mut records = vec![];
        let mut names = super::invocation::Names::default();
        for (index, e) in events.iter().enumerate() {
            if self.done() || started.elapsed() >= BATCH_TIME || self.d.stats.paused(Instant::now())
            {
                break;
            }
            let seq = seqs[index];
            next = seq + 1;
            if !self.d.matches(&e.machine, e.kind()) {
                continue;
            }
            let mut input = Input::from_event(
                EventRef {
                    batch: events.clone(),
                    index,
                },
                names.of(e),
            );
            input.log_seq = Some(seq);
            if pending.is_empty() {
                // Time in the log of the invocation's first event.
                queued_ms = (now_ms - stored[index]).max(0) as u64;
            }
            pending.push(input);
            if pending.len() >= batch_max {
                records.push(self.invoke(
                    &spec,
                    &kv,
                    &mut commit,
                    std::mem::take(&mut pending),
                    queued_ms,
                ));
            }
        }
        if !pending.is_empty() {
            records.push(self.invoke(&spec, &kv, &mut commit, pending, queued_ms));
        }
        if next == cursor {
            return Ok(Step::Worked(seqs.len()));
        }
        store.commit_function(&self.name, &commit, Some(next))?;
        // Logged once their effects are written: a record seen means its effects are there.
        for r in &records {
            self.inner.log(r);
        }
        self.report_lag();
        Ok(Step::Worked(seqs.len()))
    }

    fn invoke(
        &mut self,
        spec: &super::FunctionSpec,
        kv: &Arc<BatchKv>,
        commit: &mut FunctionCommit,
        inputs: Vec<Input>,
        queued_ms: u64,
    ) -> super::InvocationRecord {
        invoke_into(
            &self.inner,
            spec,
            self.compiled.as_ref(),
            &self.d.stats,
            &mut self.m,
            kv,
            commit,
            inputs,
            queued_ms,
            true,
        )
    }
}

/// Runs one invocation over `inputs` (one event, or a batch for `handle_batch`); a successful
/// one's effects join `commit` (and `kv`, for the invocations after it), and with `publish`
/// its MQTT messages go out now (before the commit: at least once). Returns its record, to
/// log once the commit is written.
#[allow(clippy::too_many_arguments)]
pub(super) fn invoke_into(
    inner: &Inner,
    spec: &super::FunctionSpec,
    compiled: &dyn Compiled,
    stats: &super::FunctionStats,
    m: &mut WorkerMetrics,
    kv: &Arc<BatchKv>,
    commit: &mut FunctionCommit,
    inputs: Vec<Input>,
    queued_ms: u64,
    publish: bool,
) -> super::InvocationRecord {
    let publisher = inner.publish.clone();
    let alert_topic = format!("{ALERT_TOPIC_PREFIX}{}", spec.name);
    inner.execute(
        spec,
        compiled,
        stats,
        m,
        Arc::new(inputs),
        Duration::from_millis(queued_ms),
        kv.clone(),
        |effects, inputs| {
            let now = chrono::Utc::now().timestamp_millis();
            let mut published = 0;
            // An alert's id: its trigger's id and its ordinal among the alerts raised for that
            // event, the same when the batch runs again after a crash.
            let mut ordinal: HashMap<usize, usize> = HashMap::new();
            for (severity, message, event) in &effects.alerts {
                let input = &inputs[(*event).min(inputs.len() - 1)];
                let n = ordinal.entry(*event).or_default();
                let id = format!("{}:{}:{n}", spec.name, input.trigger_id());
                *n += 1;
                let alert = super::workers::alert_json(spec, input, severity, message, now, &id);
                if publish {
                    published += usize::from(publisher(&alert_topic, alert.clone()));
                }
                commit.alerts.push((now, alert));
            }
            if publish {
                published += super::workers::publish_all(&publisher, &spec.name, effects);
            }
            kv.write(&effects.kv);
            commit.kv.extend(effects.kv.iter().cloned());
            commit.points.extend(point_events(&effects.points));
            Ok(ActionCounts {
                published,
                points: effects.points.len(),
                alerts: effects.alerts.len(),
                kv_writes: effects.kv.len(),
            })
        },
    )
}
