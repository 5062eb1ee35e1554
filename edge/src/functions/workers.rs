//! Workers: each deployed version's bounded queue and worker threads for manual and scheduled
//! triggers, one invocation and the effects it asks for (shared with the trigger-log reader),
//! and the breaker that pauses a function that times out again and again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use millrace_shared::{Event, EventBody, Reading, Telemetry};

use super::invocation::StoreKv;
use super::log::{ActionCounts, InvocationRecord};
use super::{
    ALERT_TOPIC_PREFIX, Compiled, Deployed, Effects, EventRef, FunctionError, FunctionSpec,
    Functions, Inner, Input, InvokeError, Job, KvRead, Outcome, Point, Publisher, TriggerKind,
};
use crate::store::{FunctionCommit, StoreError};

/// Counters and the pause state of one deployed version, shared by its workers, the ingest
/// thread and the API.
#[derive(Debug)]
pub struct FunctionStats {
    /// Invocations that ran.
    pub invocations: AtomicU64,
    /// Events they handled (more than invocations with `handle_batch`).
    pub events: AtomicU64,
    /// Of which failed.
    pub failures: AtomicU64,
    /// Manual and scheduled triggers dropped because the queue was full or the function was
    /// paused (topic triggers wait in the log instead).
    pub dropped: AtomicU64,
    /// Trigger-log records skipped because the function fell behind past the log's retention.
    pub skipped: AtomicU64,
    /// Times the function was paused for timing out again and again.
    pub pauses: AtomicU64,
    dropped_metric: metrics::Counter,
    breaker: Mutex<Breaker>,
}

impl FunctionStats {
    pub(super) fn new(function: &str) -> Self {
        Self {
            invocations: AtomicU64::new(0),
            events: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            dropped_metric: metrics::counter!("millrace_edge_function_dropped_total", "function" => function.to_owned()),
            breaker: Mutex::new(Breaker::new()),
        }
    }

    /// Counts a trigger dropped (full queue or paused function).
    fn drop_trigger(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.dropped_metric.increment(1);
    }

    /// Whether the breaker has paused the function.
    pub(super) fn paused(&self, now: Instant) -> bool {
        self.breaker.lock().expect("breaker").paused(now)
    }

    /// Until when it is paused, as Unix ms.
    pub(super) fn paused_until_ms(&self) -> Option<i64> {
        let now = Instant::now();
        let until = self.breaker.lock().expect("breaker").until?;
        (until > now)
            .then(|| chrono::Utc::now().timestamp_millis() + (until - now).as_millis() as i64)
    }

    /// Records an outcome in the breaker; returns the pause it started, if any.
    fn record(&self, outcome: Outcome) -> Option<Duration> {
        let pause = self
            .breaker
            .lock()
            .expect("breaker")
            .record(outcome, Instant::now());
        if pause.is_some() {
            self.pauses.fetch_add(1, Ordering::Relaxed);
        }
        pause
    }
}

/// Stops running a function that keeps hitting its time limit: after [`Breaker::TRIPS`]
/// timeouts in a row its topic and schedule triggers are dropped for a pause that doubles each
/// time (1 s up to 5 min) and resets after an invocation that does not time out. Manual
/// invocations still run. A runaway then costs a core for its time limit every few seconds or
/// minutes, not all the time.
#[derive(Debug)]
struct Breaker {
    consecutive: u32,
    pause: Duration,
    until: Option<Instant>,
}

impl Breaker {
    const TRIPS: u32 = 3;
    const FIRST: Duration = Duration::from_secs(1);
    const LONGEST: Duration = Duration::from_secs(300);

    fn new() -> Self {
        Self {
            consecutive: 0,
            pause: Self::FIRST,
            until: None,
        }
    }

    fn paused(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Records an outcome; returns the pause it started, if any.
    fn record(&mut self, outcome: Outcome, now: Instant) -> Option<Duration> {
        if outcome != Outcome::Timeout {
            *self = Self::new();
            return None;
        }
        self.consecutive += 1;
        if self.consecutive < Self::TRIPS {
            return None;
        }
        let pause = self.pause;
        self.until = Some(now + pause);
        self.consecutive = 0;
        self.pause = (pause * 2).min(Self::LONGEST);
        Some(pause)
    }
}

impl Functions {
    /// Starts the `concurrency` worker threads of one deployed version, reading `rx` until
    /// its sender (the version's queue in the registry) is dropped or the service stops.
    pub(super) fn spawn_workers(
        &self,
        spec: &FunctionSpec,
        compiled: &Arc<dyn Compiled>,
        rx: &flume::Receiver<Job>,
        stats: &Arc<FunctionStats>,
    ) -> Result<(), FunctionError> {
        let mut threads = self.inner.threads.lock().expect("threads");
        threads.retain(|t| !t.is_finished());
        for i in 0..spec.concurrency {
            let (rx, inner, compiled, stats) = (
                rx.clone(),
                self.inner.clone(),
                compiled.clone(),
                stats.clone(),
            );
            let spec = spec.clone();
            let worker = std::thread::Builder::new()
                .name(format!("fn-{}-{i}", spec.name))
                .spawn(move || {
                    lower_priority(inner.cfg.nice);
                    let mut m = WorkerMetrics::new(&spec.name);
                    while let Ok(job) = rx.recv() {
                        if inner.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        // Jobs queued before a pause began.
                        if job.reply.is_none() && stats.paused(Instant::now()) {
                            stats.drop_trigger();
                            continue;
                        }
                        inner.run(&spec, compiled.as_ref(), &stats, &mut m, job);
                        m.queue_depth.set(rx.len() as f64);
                    }
                })
                .map_err(|e| FunctionError::Runtime(e.to_string()))?;
            threads.push(worker);
        }
        Ok(())
    }

    pub(super) fn offer(d: &Deployed, job: Job) -> bool {
        match d.queue.try_send(job) {
            Ok(()) => true,
            Err(_) => {
                d.stats.drop_trigger();
                false
            }
        }
    }

    /// Invokes a function by hand and waits for the result. With a topic and a payload that
    /// decodes as a device event, the function sees it as that event.
    pub async fn invoke(
        &self,
        name: &str,
        topic: Option<String>,
        payload: Vec<u8>,
    ) -> Result<InvocationRecord, FunctionError> {
        let d = self.deployed(name)?;
        if !d.enabled.load(Ordering::Relaxed) {
            return Err(FunctionError::Disabled(name.to_owned()));
        }
        let topic = topic.unwrap_or_default();
        let event = Event::decode(&topic, &payload).ok().map(EventRef::new);
        let input = Input {
            trigger: TriggerKind::Manual,
            device: event
                .as_ref()
                .map_or_else(|| "".into(), |e| e.machine.to_string().into()),
            ts_ms: event
                .as_ref()
                .map_or_else(|| self.inner.clock.now_ms(), |e| e.ts_ms),
            topic: topic.into(),
            event,
            payload: Some(Arc::new(payload)),
            log_seq: None,
            fired_ms: None,
            replay_at: None,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            input,
            enqueued: Instant::now(),
            reply: Some(tx),
        };
        if !Self::offer(&d, job) {
            return Err(FunctionError::Busy(name.to_owned()));
        }
        rx.await
            .map_err(|_| FunctionError::Runtime("the function's worker stopped".into()))
    }
}

impl Inner {
    /// Runs a queued job (manual or scheduled) and applies its effects at once.
    pub(super) fn run(
        &self,
        spec: &FunctionSpec,
        compiled: &dyn Compiled,
        stats: &FunctionStats,
        m: &mut WorkerMetrics,
        job: Job,
    ) -> Outcome {
        let kv = Arc::new(StoreKv {
            store: self.store.clone(),
            function: spec.name.clone(),
        });
        let queued = job.enqueued.elapsed();
        let inputs = Arc::new(vec![job.input]);
        let record = self.execute(
            spec,
            compiled,
            stats,
            m,
            inputs.clone(),
            queued,
            kv,
            |effects, inputs| self.apply(spec, &inputs[0], effects),
        );
        let input = &inputs[0];
        self.log(&record);
        let outcome = record.outcome;
        // A scheduled run that failed is done too (a successful one wrote its mark with its
        // effects): a restart does not run it again.
        if let (Some(fired), false) = (input.fired_ms, outcome == Outcome::Ok) {
            let done = FunctionCommit {
                schedule_done: Some(fired),
                ..Default::default()
            };
            if let Err(e) = self.store.commit_function(&spec.name, &done, None) {
                tracing::error!(function = %spec.name, error = %e, "could not record a scheduled run");
            }
        }
        if let Some(reply) = job.reply {
            let _ = reply.send(record);
        }
        outcome
    }

    /// Runs one invocation over `inputs` (one event, or a batch for `handle_batch`) and
    /// accounts for it (breaker, counters, metrics); `apply` makes a successful invocation's
    /// effects take effect (its failure fails the invocation). The caller logs the record
    /// ([`Inner::log`]) once the effects are written.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn execute(
        &self,
        spec: &FunctionSpec,
        compiled: &dyn Compiled,
        stats: &FunctionStats,
        m: &mut WorkerMetrics,
        inputs: Arc<Vec<Input>>,
        queued: Duration,
        kv: Arc<dyn KvRead>,
        apply: impl FnOnce(&Effects, &[Input]) -> Result<ActionCounts, InvokeError>,
    ) -> InvocationRecord {
        let started_ms = chrono::Utc::now().timestamp_millis();
        let t0 = Instant::now();
        let (result, effects) = compiled.invoke_batch(
            inputs.clone(),
            kv,
            Duration::from_millis(spec.timeout_ms),
            u64::from(spec.memory_mib) << 20,
        );
        let mut actions = ActionCounts::default();
        let result = result.and_then(|()| apply(&effects, &inputs).map(|a| actions = a));
        let input = &inputs[0];
        let duration = t0.elapsed();
        let (outcome, error) = match &result {
            Ok(()) => (Outcome::Ok, None),
            Err(e) => (Outcome::from(e), Some(e.to_string())),
        };
        // The breaker and the failure count first: whoever sees this invocation counted sees
        // the failure and the pause it started.
        if let Some(pause) = stats.record(outcome) {
            tracing::warn!(function = %spec.name, pause_s = pause.as_secs(), "function timed out {} times in a row: its triggers wait for a while", Breaker::TRIPS);
        }
        if let Some(e) = &error {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(function = %spec.name, version = spec.version, trigger = input.trigger.as_str(), outcome = outcome.as_str(), error = %e, "function invocation failed");
        }
        stats
            .events
            .fetch_add(inputs.len() as u64, Ordering::Relaxed);
        stats.invocations.fetch_add(1, Ordering::Release);
        m.invocation(&spec.name, input.trigger, outcome)
            .increment(1);
        m.duration.record(duration.as_secs_f64());
        InvocationRecord {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            function: spec.name.clone(),
            version: spec.version,
            trigger: input.trigger,
            topic: input.topic.to_string(),
            device: input.device.to_string(),
            event_ts_ms: input.ts_ms,
            started_ms,
            queued_us: queued.as_micros() as u64,
            duration_us: duration.as_micros() as u64,
            outcome,
            error,
            logs: effects.logs,
            logs_dropped: effects.logs_dropped,
            actions,
            events: inputs.len(),
        }
    }

    /// Sends a record to the invocation log (failures always, successes unless
    /// `functions.log_successes` is off). Call once its effects are written.
    pub(super) fn log(&self, record: &InvocationRecord) {
        if (record.outcome != Outcome::Ok || self.cfg.log_successes)
            && self.log_tx.try_send(record.clone()).is_err()
        {
            metrics::counter!("millrace_edge_function_log_dropped_total").increment(1);
        }
    }

    /// Applies a successful queued invocation's actions: state and alerts in one write, then
    /// points, then MQTT messages.
    fn apply(
        &self,
        spec: &FunctionSpec,
        input: &Input,
        effects: &Effects,
    ) -> Result<ActionCounts, InvokeError> {
        let failed =
            |e: StoreError| InvokeError::Failed(format!("could not apply its actions: {e}"));
        let now = chrono::Utc::now().timestamp_millis();
        let alerts: Vec<(i64, Vec<u8>)> = effects
            .alerts
            .iter()
            .enumerate()
            .map(|(i, (severity, message, _))| {
                let id = format!(
                    "{}:{}:{}:{i}",
                    spec.name,
                    input.trigger.as_str(),
                    self.next_id.fetch_add(1, Ordering::Relaxed)
                );
                (now, alert_json(spec, input, severity, message, now, &id))
            })
            .collect();
        let commit = FunctionCommit {
            kv: effects.kv.clone(),
            alerts,
            points: point_events(&effects.points),
            schedule_done: input.fired_ms,
            ..Default::default()
        };
        self.store
            .commit_function(&spec.name, &commit, None)
            .map_err(failed)?;
        let topic = format!("{ALERT_TOPIC_PREFIX}{}", spec.name);
        let mut published = 0;
        for (_, a) in &commit.alerts {
            published += usize::from((self.publish)(&topic, a.clone()));
        }
        published += publish_all(&self.publish, &spec.name, effects);
        Ok(ActionCounts {
            published,
            points: effects.points.len(),
            alerts: commit.alerts.len(),
            kv_writes: effects.kv.len(),
        })
    }
}

/// An alert as stored, published and synced ([`millrace_shared::Alert`] as JSON); `id` is
/// stable across a re-run of the same trigger.
pub(super) fn alert_json(
    spec: &FunctionSpec,
    input: &Input,
    severity: &str,
    message: &str,
    now_ms: i64,
    id: &str,
) -> Vec<u8> {
    serde_json::to_vec(&millrace_shared::Alert {
        id: id.to_owned(),
        ts_ms: now_ms,
        trigger: input.trigger.as_str().to_owned(),
        function: spec.name.clone(),
        version: spec.version,
        severity: severity.to_owned(),
        message: message.to_owned(),
        device: input.device.to_string(),
        topic: input.topic.to_string(),
        event_ts_ms: input.ts_ms,
    })
    .expect("alerts serialize")
}

/// Publishes an invocation's MQTT messages; returns how many the broker took.
pub(super) fn publish_all(publish: &Publisher, function: &str, effects: &Effects) -> usize {
    let mut published = 0;
    for (t, p) in &effects.publishes {
        if publish(t, p.clone()) {
            published += 1;
        } else {
            metrics::counter!("millrace_edge_function_publish_failed_total", "function" => function.to_owned()).increment(1);
        }
    }
    published
}

/// Derived points as telemetry events.
pub(super) fn point_events(points: &[Point]) -> Vec<Event> {
    points
        .iter()
        .map(|p| Event {
            machine: p.machine.clone(),
            ts_ms: p.ts_ms,
            seq: 0,
            body: EventBody::Telemetry(Telemetry {
                readings: vec![Reading {
                    name: p.metric.as_str().into(),
                    value: p.value,
                    unit: Default::default(),
                }],
            }),
        })
        .collect()
}

/// A worker's metric handles (looked up once, not per invocation).
pub(super) struct WorkerMetrics {
    pub(super) duration: metrics::Histogram,
    queue_depth: metrics::Gauge,
    invocations: HashMap<(TriggerKind, Outcome), metrics::Counter>,
}

impl WorkerMetrics {
    pub(super) fn new(function: &str) -> Self {
        Self {
            duration: metrics::histogram!("millrace_edge_function_duration_seconds", "function" => function.to_owned()),
            queue_depth: metrics::gauge!("millrace_edge_function_queue_depth", "function" => function.to_owned()),
            invocations: HashMap::new(),
        }
    }

    fn invocation(&mut self, function: &str, t: TriggerKind, o: Outcome) -> &metrics::Counter {
        self.invocations.entry((t, o)).or_insert_with(|| {
            metrics::counter!("millrace_edge_function_invocations_total",
                "function" => function.to_owned(), "trigger" => t.as_str(), "outcome" => o.as_str())
        })
    }
}

/// Lowers the calling thread's CPU priority to `nice` (0..=19) so that functions yield the CPU
/// to ingest when both want it. Best effort: a failure is logged once.
pub(super) fn lower_priority(nice: u8) {
    if nice == 0 {
        return;
    }
    // thread-priority maps 0..=99 onto niceness 19..=-20 (Linux); pick the value giving `nice`.
    let niceness = |p: u8| (39.0 * (1.0 - f32::from(p) / 99.0)) as i32 - 20;
    let p = (0..=99u8)
        .min_by_key(|p| (niceness(*p) - i32::from(nice)).abs())
        .expect("non-empty");
    let r = p.try_into().map_err(|e| format!("{e:?}")).and_then(|v| {
        thread_priority::set_current_thread_priority(
            thread_priority::ThreadPriority::Crossplatform(v),
        )
        .map_err(|e| format!("{e:?}"))
    });
    if let Err(e) = r {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(
            || tracing::warn!(error = %e, "could not lower the priority of function workers"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_timing_out_again_and_again_is_paused_with_backoff() {
        let t0 = Instant::now();
        let mut b = Breaker::new();
        assert_eq!(b.record(Outcome::Timeout, t0), None);
        assert_eq!(b.record(Outcome::Timeout, t0), None);
        assert_eq!(b.record(Outcome::Timeout, t0), Some(Duration::from_secs(1)));
        assert!(b.paused(t0));
        assert!(!b.paused(t0 + Duration::from_secs(1)));
        // Three more in a row: a longer pause.
        let t1 = t0 + Duration::from_secs(2);
        for _ in 0..2 {
            assert_eq!(b.record(Outcome::Timeout, t1), None);
        }
        assert_eq!(b.record(Outcome::Timeout, t1), Some(Duration::from_secs(2)));
        // Any other outcome resets it; a trap is not a timeout.
        assert_eq!(b.record(Outcome::Trap, t1), None);
        assert!(!b.paused(t1));
        for _ in 0..2 {
            assert_eq!(b.record(Outcome::Timeout, t1), None);
        }
        assert_eq!(b.record(Outcome::Timeout, t1), Some(Duration::from_secs(1)));
        // The pause never grows past five minutes.
        let mut b = Breaker::new();
        let mut longest = Duration::ZERO;
        for _ in 0..60 {
            if let Some(p) = b.record(Outcome::Timeout, t0) {
                longest = p;
            }
        }
        assert_eq!(longest, Breaker::LONGEST);
    }
}
