//! On-device functions: short-lived, stateless WebAssembly handlers triggered by device
//! events (MQTT topic filters), schedules (cron) and by hand (CLI, REST). See
//! `docs/functions.md` for the ABI and the guarantees.
//!
//! # Layout
//! - [`wasm`]: the runtime behind the [`FunctionEngine`] trait (wasmtime) and the host ABI.
//! - [`topic`]: MQTT topic filters.
//! - this module: [`Functions`], the service: deployment (versioned, persisted in RocksDB),
//!   one bounded queue and `concurrency` worker threads per function, the scheduler, the
//!   invocation log and the metrics.
//!
//! Isolation: each function runs on its own worker threads with a fresh instance per
//! invocation, a time limit (epoch interruption) and a memory cap. Ingest never waits for a
//! function: it offers each stored event to the matching functions' queues and, when a queue
//! is full, the trigger is dropped and counted (`millrace_edge_function_dropped_total`).

mod topic;
pub mod wasm;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use millrace_shared::{Event, EventBody, MachineId, Reading, Telemetry};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::config::FunctionsConfig;
use crate::store::{KvWrite, Store, StoreError};
pub use topic::TopicFilter;
pub use wasm::{Compiled, FunctionEngine, WasmEngine};

/// Topic prefix of alerts functions raise (`millrace/alerts/{function}`).
pub const ALERT_TOPIC_PREFIX: &str = "millrace/alerts/";

/// Errors of the functions service.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// The request is wrong (bad name, module, trigger or limit).
    #[error("{0}")]
    Invalid(String),
    /// No function of that name.
    #[error("no function named `{0}`")]
    NotFound(String),
    /// The function is disabled.
    #[error("function `{0}` is disabled")]
    Disabled(String),
    /// The function's queue is full; retry later.
    #[error("function `{0}` is busy: its queue is full")]
    Busy(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The runtime could not start.
    #[error("function runtime: {0}")]
    Runtime(String),
}

impl FunctionError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Busy(_) | Self::Store(_))
    }
}

/// What started an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// A device event matched a topic filter.
    Topic,
    /// A cron schedule came due.
    Schedule,
    /// The CLI or the REST API.
    Manual,
}

impl TriggerKind {
    /// The name used in records, metrics and the ABI.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Schedule => "schedule",
            Self::Manual => "manual",
        }
    }
}

/// What a function receives.
#[derive(Debug, Clone)]
pub struct Input {
    /// What triggered it.
    pub trigger: TriggerKind,
    /// The MQTT topic (empty for schedules).
    pub topic: String,
    /// The device's machine, `site/line/machine` (empty when not from a device).
    pub device: String,
    /// The event's timestamp, or the scheduled time, Unix ms.
    pub ts_ms: i64,
    /// The decoded event, when the trigger is one.
    pub event: Option<EventRef>,
    /// The raw payload (manual and scheduled invocations); made from `event` otherwise.
    pub payload: Option<Arc<Vec<u8>>>,
}

impl Input {
    /// The payload bytes the function sees.
    pub fn payload_bytes(&self) -> Arc<Vec<u8>> {
        match (&self.payload, &self.event) {
            (Some(p), _) => p.clone(),
            (None, Some(e)) => Arc::new(e.to_payload()),
            (None, None) => Arc::new(vec![]),
        }
    }

    fn from_event(e: EventRef, topic: String) -> Self {
        Self {
            trigger: TriggerKind::Topic,
            topic,
            device: e.machine.to_string(),
            ts_ms: e.ts_ms,
            event: Some(e),
            payload: None,
        }
    }
}

/// One event of a stored batch, shared by every job the batch triggers (no copy per job).
#[derive(Debug, Clone)]
pub struct EventRef {
    batch: Arc<Vec<Event>>,
    index: usize,
}

impl EventRef {
    /// A single event.
    pub fn new(e: Event) -> Self {
        Self {
            batch: Arc::new(vec![e]),
            index: 0,
        }
    }
}

impl std::ops::Deref for EventRef {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.batch[self.index]
    }
}

/// A log line a function wrote.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// debug, info, warn or error.
    pub level: &'static str,
    /// The text.
    pub message: String,
}

/// A time-series point a function writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Its machine.
    pub machine: MachineId,
    /// Its metric.
    pub metric: String,
    /// Unix ms.
    pub ts_ms: i64,
    /// The value.
    pub value: f64,
}

impl Point {
    /// A point of series `site/line/machine/metric`.
    pub fn parse(series: &str, ts_ms: i64, value: f64) -> Result<Self, String> {
        let mut p = series.split('/');
        let (Some(s), Some(l), Some(m), Some(metric), None) =
            (p.next(), p.next(), p.next(), p.next(), p.next())
        else {
            return Err(format!("series `{series}` is not site/line/machine/metric"));
        };
        let machine = MachineId::new(s, l, m).map_err(|e| format!("series `{series}`: {e}"))?;
        millrace_shared::topic::validate_id("metric", metric)
            .map_err(|e| format!("series `{series}`: {e}"))?;
        if !value.is_finite() {
            return Err(format!(
                "series `{series}`: the value {value} is not finite"
            ));
        }
        if !(millrace_shared::event::MIN_TS_MS..=millrace_shared::event::MAX_TS_MS).contains(&ts_ms)
        {
            return Err(format!(
                "series `{series}`: timestamp {ts_ms} is outside 2000..2100"
            ));
        }
        Ok(Self {
            machine,
            metric: metric.to_owned(),
            ts_ms,
            value,
        })
    }
}

/// What an invocation asked for; applied only if it succeeded (logs are kept either way).
#[derive(Debug, Default)]
pub struct Effects {
    /// MQTT messages (topic, payload).
    pub publishes: Vec<(String, Vec<u8>)>,
    /// Time-series points.
    pub points: Vec<Point>,
    /// Alerts (severity, message).
    pub alerts: Vec<(&'static str, String)>,
    /// Key-value writes.
    pub kv: Vec<KvWrite>,
    /// Log lines.
    pub logs: Vec<LogLine>,
    /// Log lines beyond the per-invocation bound.
    pub logs_dropped: u32,
}

/// Why an invocation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    /// `handle` returned non-zero, or an action could not be applied.
    #[error("{0}")]
    Failed(String),
    /// The module trapped (or misused the ABI).
    #[error("trap: {0}")]
    Trap(String),
    /// It ran past its time limit.
    #[error("timeout: {0}")]
    Timeout(String),
    /// It asked for more memory than its cap.
    #[error("memory: {0}")]
    Memory(String),
}

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Succeeded; its actions took effect.
    Ok,
    /// Returned an error code or its actions failed.
    Error,
    /// Trapped.
    Trap,
    /// Stopped at its time limit.
    Timeout,
    /// Stopped at its memory cap.
    Memory,
}

impl Outcome {
    /// Its name in records and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Trap => "trap",
            Self::Timeout => "timeout",
            Self::Memory => "memory",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Ok,
            Self::Error,
            Self::Trap,
            Self::Timeout,
            Self::Memory,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

impl From<&InvokeError> for Outcome {
    fn from(e: &InvokeError) -> Self {
        match e {
            InvokeError::Failed(_) => Self::Error,
            InvokeError::Trap(_) => Self::Trap,
            InvokeError::Timeout(_) => Self::Timeout,
            InvokeError::Memory(_) => Self::Memory,
        }
    }
}

/// Read access to a function's key-value state.
pub trait KvRead: Send + Sync {
    /// The value of `key`, if set.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String>;
}

struct StoreKv {
    store: Arc<Store>,
    function: String,
}

impl KvRead for StoreKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        self.store
            .kv_get(&self.function, key)
            .map_err(|e| e.to_string())
    }
}

/// Sends an MQTT message into the broker (no TCP hop); `false` when it could not.
pub type Publisher = Arc<dyn Fn(&str, Vec<u8>) -> bool + Send + Sync>;

/// Where the scheduler reads the time (tests drive it by hand).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, Unix ms.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock set by hand.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock showing `ms`.
    pub fn new(ms: i64) -> Self {
        Self(AtomicI64::new(ms))
    }

    /// Sets the time.
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A deploy or update request (`PUT /api/v1/functions/{name}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeployRequest {
    /// The module, binary Wasm or WAT, base64-encoded.
    pub module_base64: Option<String>,
    /// The module as WAT text (instead of `module_base64`).
    pub module_wat: Option<String>,
    /// Topic filters that trigger it.
    pub topics: Vec<String>,
    /// A cron schedule (5 fields, or 6 with seconds first), UTC.
    pub schedule: Option<String>,
    /// Time limit per invocation, ms.
    pub timeout_ms: Option<u64>,
    /// Memory cap, MiB.
    pub memory_mib: Option<u32>,
    /// Invocations running at once.
    pub concurrency: Option<u32>,
    /// Queue bound.
    pub queue: Option<u32>,
    /// Deploy enabled (default) or disabled.
    pub enabled: Option<bool>,
    /// Free text.
    pub description: Option<String>,
}

/// One deployed version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version number.
    pub version: u32,
    /// SHA-256 of the module, hex.
    pub sha256: String,
    /// When it was deployed, Unix ms.
    pub deployed_ms: i64,
}

/// A deployed function as stored (schema version 1; new fields get defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// Its name.
    pub name: String,
    /// Current version (1 on first deploy).
    pub version: u32,
    /// Whether triggers run it.
    pub enabled: bool,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Topic filters.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Cron schedule.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Time limit, ms.
    pub timeout_ms: u64,
    /// Memory cap, MiB.
    pub memory_mib: u32,
    /// Invocations at once.
    pub concurrency: u32,
    /// Queue bound.
    pub queue: u32,
    /// Module size, bytes.
    pub module_bytes: u64,
    /// SHA-256 of the module, hex.
    pub sha256: String,
    /// First deployed, Unix ms.
    pub created_ms: i64,
    /// Last changed, Unix ms.
    pub updated_ms: i64,
    /// Versions, newest last (at most `functions.keep_versions` modules are kept).
    #[serde(default)]
    pub history: Vec<VersionInfo>,
}

/// Counters and the pause state of one deployed version, shared by its workers, the ingest
/// thread and the API.
#[derive(Debug)]
pub struct FunctionStats {
    /// Invocations that ran.
    pub invocations: AtomicU64,
    /// Of which failed.
    pub failures: AtomicU64,
    /// Triggers dropped because the queue was full or the function was paused.
    pub dropped: AtomicU64,
    /// Times the function was paused for timing out again and again.
    pub pauses: AtomicU64,
    dropped_metric: metrics::Counter,
    breaker: Mutex<Breaker>,
}

impl FunctionStats {
    fn new(function: &str) -> Self {
        Self {
            invocations: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
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
    fn paused(&self, now: Instant) -> bool {
        self.breaker.lock().expect("breaker").paused(now)
    }

    /// Until when it is paused, as Unix ms.
    fn paused_until_ms(&self) -> Option<i64> {
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

/// Actions an invocation took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ActionCounts {
    /// MQTT messages published (alerts included).
    pub published: usize,
    /// Points written.
    pub points: usize,
    /// Alerts raised.
    pub alerts: usize,
    /// Key-value writes.
    pub kv_writes: usize,
}

/// One invocation, as the invocation log keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct InvocationRecord {
    /// Unique per edge.
    pub id: u64,
    /// The function.
    pub function: String,
    /// Its version.
    pub version: u32,
    /// What triggered it.
    pub trigger: TriggerKind,
    /// The topic (topic and manual triggers).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub topic: String,
    /// The device's machine.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub device: String,
    /// The event's timestamp or the scheduled time, Unix ms.
    pub event_ts_ms: i64,
    /// When it started, Unix ms.
    pub started_ms: i64,
    /// Time waiting in the queue, µs.
    pub queued_us: u64,
    /// Run time, µs.
    pub duration_us: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What it logged.
    pub logs: Vec<LogLine>,
    /// Log lines beyond the bound.
    #[serde(skip_serializing_if = "is_zero")]
    pub logs_dropped: u32,
    /// What it did (zero when it failed: actions of failed invocations are discarded).
    pub actions: ActionCounts,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

struct Job {
    input: Input,
    enqueued: Instant,
    reply: Option<tokio::sync::oneshot::Sender<InvocationRecord>>,
}

struct Deployed {
    spec: Mutex<FunctionSpec>,
    enabled: AtomicBool,
    filters: Vec<TopicFilter>,
    schedule: Option<croner::Cron>,
    next_fire: Mutex<Option<i64>>,
    queue: flume::Sender<Job>,
    stats: Arc<FunctionStats>,
}

struct Inner {
    engine: Arc<dyn FunctionEngine>,
    store: Arc<Store>,
    publish: Publisher,
    cfg: FunctionsConfig,
    clock: Arc<dyn Clock>,
    registry: RwLock<HashMap<String, Arc<Deployed>>>,
    log_tx: flume::Sender<InvocationRecord>,
    wake: flume::Sender<()>,
    stop: Arc<AtomicBool>,
    next_id: AtomicU64,
    /// Worker, scheduler and log threads, joined on shutdown.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Serialises deploy/update/delete (compilation happens before taking it).
    deploying: Mutex<()>,
}

/// The functions service.
#[derive(Clone)]
pub struct Functions {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Functions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Functions").finish_non_exhaustive()
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn validate_name(name: &str) -> Result<(), FunctionError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(FunctionError::Invalid(format!(
            "function name `{name}`: 1 to 64 characters of a-z 0-9 - _, starting with a letter or digit"
        )))
    }
}

fn parse_schedule(s: &str) -> Result<croner::Cron, FunctionError> {
    s.parse::<croner::Cron>()
        .map_err(|e| FunctionError::Invalid(format!("schedule `{s}`: {e}")))
}

/// The first time `cron` fires strictly after `after_ms`.
fn next_occurrence(cron: &croner::Cron, after_ms: i64) -> Option<i64> {
    let t = chrono::DateTime::from_timestamp_millis(after_ms)?;
    cron.find_next_occurrence(&t, false)
        .ok()
        .map(|d| d.timestamp_millis())
}

impl Functions {
    /// Starts the service: loads deployed functions from the store, starts their workers, the
    /// scheduler and the invocation log writer.
    pub fn start(
        store: Arc<Store>,
        engine: Arc<dyn FunctionEngine>,
        publish: Publisher,
        cfg: FunctionsConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, FunctionError> {
        let (log_tx, log_rx) = flume::bounded(65_536);
        let (wake, wake_rx) = flume::bounded(1);
        let inner = Arc::new(Inner {
            engine,
            store,
            publish,
            cfg,
            clock,
            registry: RwLock::new(HashMap::new()),
            log_tx,
            wake,
            stop: Arc::new(AtomicBool::new(false)),
            next_id: AtomicU64::new(0),
            threads: Mutex::new(vec![]),
            deploying: Mutex::new(()),
        });
        inner.next_id.store(
            (chrono::Utc::now().timestamp_micros() as u64) << 4,
            Ordering::Relaxed,
        );
        let this = Self { inner };
        for (name, bytes) in this.inner.store.function_specs()? {
            let spec: FunctionSpec = match serde_json::from_slice(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(function = %name, error = %e, "unreadable function spec; skipped");
                    continue;
                }
            };
            let Some(module) = this.inner.store.function_module(&name, spec.version)? else {
                tracing::error!(function = %name, version = spec.version, "module missing; skipped");
                continue;
            };
            match this
                .inner
                .engine
                .compile(&module, u64::from(spec.memory_mib) << 20)
            {
                Ok(compiled) => this.install(spec, compiled)?,
                Err(e) => {
                    tracing::error!(function = %name, error = %e, "stored module no longer compiles; skipped")
                }
            }
        }
        let log = std::thread::Builder::new()
            .name("millrace-fn-log".into())
            .spawn({
                let (store, stop) = (this.inner.store.clone(), this.inner.stop.clone());
                let nice = this.inner.cfg.nice;
                move || {
                    lower_priority(nice);
                    log_writer(store, log_rx, &stop)
                }
            })
            .map_err(|e| FunctionError::Runtime(e.to_string()))?;
        let cron = std::thread::Builder::new()
            .name("millrace-fn-cron".into())
            .spawn({
                let this = this.clone();
                move || this.scheduler(wake_rx)
            })
            .map_err(|e| FunctionError::Runtime(e.to_string()))?;
        this.inner
            .threads
            .lock()
            .expect("threads")
            .extend([log, cron]);
        tracing::info!(
            functions = this.inner.registry.read().expect("registry").len(),
            "functions started"
        );
        Ok(this)
    }

    /// Stops the scheduler and the workers and waits for them (an invocation running now
    /// finishes, at most after its time limit; queued ones are abandoned), then writes the
    /// rest of the invocation log. Blocking.
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        let _ = self.inner.wake.try_send(());
        self.inner.registry.write().expect("registry").clear();
        let threads = std::mem::take(&mut *self.inner.threads.lock().expect("threads"));
        for t in threads {
            let _ = t.join();
        }
    }

    fn install(
        &self,
        spec: FunctionSpec,
        compiled: Arc<dyn Compiled>,
    ) -> Result<(), FunctionError> {
        let filters = spec
            .topics
            .iter()
            .map(|t| TopicFilter::parse(t).map_err(FunctionError::Invalid))
            .collect::<Result<Vec<_>, _>>()?;
        let schedule = spec.schedule.as_deref().map(parse_schedule).transpose()?;
        let next = schedule
            .as_ref()
            .and_then(|c| next_occurrence(c, self.inner.clock.now_ms()));
        let (tx, rx) = flume::bounded::<Job>(spec.queue as usize);
        let stats = Arc::new(FunctionStats::new(&spec.name));
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
        drop(threads);
        let d = Arc::new(Deployed {
            enabled: AtomicBool::new(spec.enabled),
            spec: Mutex::new(spec.clone()),
            filters,
            schedule,
            next_fire: Mutex::new(next),
            queue: tx,
            stats,
        });
        // Replacing drops the old version's queue sender: its workers finish what is queued
        // and exit.
        self.inner
            .registry
            .write()
            .expect("registry")
            .insert(spec.name.clone(), d);
        let _ = self.inner.wake.try_send(());
        Ok(())
    }

    /// Deploys a new function or a new version of one. Compiles first: a bad module changes
    /// nothing. Returns the spec and whether the function is new. Blocking (compiles).
    pub fn deploy(
        &self,
        name: &str,
        req: DeployRequest,
    ) -> Result<(FunctionSpec, bool), FunctionError> {
        validate_name(name)?;
        let cfg = &self.inner.cfg;
        let module = match (&req.module_base64, &req.module_wat) {
            (Some(b), None) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| FunctionError::Invalid(format!("module_base64: {e}")))?,
            (None, Some(w)) => w.clone().into_bytes(),
            _ => {
                return Err(FunctionError::Invalid(
                    "give the module as exactly one of `module_base64` (Wasm or WAT) and `module_wat`"
                        .into(),
                ));
            }
        };
        if module.is_empty() || module.len() > cfg.max_module_bytes {
            return Err(FunctionError::Invalid(format!(
                "the module has {} bytes; accepted: 1 to {}",
                module.len(),
                cfg.max_module_bytes
            )));
        }
        for t in &req.topics {
            TopicFilter::parse(t).map_err(FunctionError::Invalid)?;
        }
        if let Some(s) = &req.schedule {
            parse_schedule(s)?;
        }
        let timeout_ms = req
            .timeout_ms
            .unwrap_or(cfg.default_timeout.as_millis() as u64);
        if !(1..=60_000).contains(&timeout_ms) {
            return Err(FunctionError::Invalid(format!(
                "timeout_ms {timeout_ms}: between 1 and 60000"
            )));
        }
        let memory_mib = req.memory_mib.unwrap_or(cfg.default_memory_mib);
        if memory_mib == 0 || memory_mib > cfg.max_memory_mib {
            return Err(FunctionError::Invalid(format!(
                "memory_mib {memory_mib}: between 1 and {} (functions.max_memory_mib)",
                cfg.max_memory_mib
            )));
        }
        let concurrency = req.concurrency.unwrap_or(cfg.default_concurrency);
        if !(1..=64).contains(&concurrency) {
            return Err(FunctionError::Invalid(format!(
                "concurrency {concurrency}: between 1 and 64"
            )));
        }
        let queue = req.queue.unwrap_or(cfg.default_queue);
        if !(1..=1_000_000).contains(&queue) {
            return Err(FunctionError::Invalid(format!(
                "queue {queue}: between 1 and 1000000"
            )));
        }
        let compiled = self
            .inner
            .engine
            .compile(&module, u64::from(memory_mib) << 20)
            .map_err(|e| FunctionError::Invalid(format!("module refused: {e}")))?;

        let _g = self.inner.deploying.lock().expect("deploy lock");
        let now = chrono::Utc::now().timestamp_millis();
        let previous = self.spec(name);
        let sha256 = sha256_hex(&module);
        let version = previous.as_ref().map_or(1, |p| p.version + 1);
        let mut history = previous
            .as_ref()
            .map(|p| p.history.clone())
            .unwrap_or_default();
        history.push(VersionInfo {
            version,
            sha256: sha256.clone(),
            deployed_ms: now,
        });
        let spec = FunctionSpec {
            name: name.to_owned(),
            version,
            enabled: req.enabled.unwrap_or(true),
            description: req.description.unwrap_or_default(),
            topics: req.topics,
            schedule: req.schedule,
            timeout_ms,
            memory_mib,
            concurrency,
            queue,
            module_bytes: module.len() as u64,
            sha256,
            created_ms: previous.as_ref().map_or(now, |p| p.created_ms),
            updated_ms: now,
            history,
        };
        self.inner.store.put_function(
            name,
            &serde_json::to_vec(&spec).expect("specs serialize"),
            Some((version, &module)),
            cfg.keep_versions,
        )?;
        self.install(spec.clone(), compiled)?;
        tracing::info!(function = %name, version, sha256 = %spec.sha256, topics = ?spec.topics, schedule = ?spec.schedule, "function deployed");
        Ok((spec, previous.is_none()))
    }

    /// Enables or disables a function (persisted).
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<FunctionSpec, FunctionError> {
        let _g = self.inner.deploying.lock().expect("deploy lock");
        let d = self.deployed(name)?;
        let mut spec = d.spec.lock().expect("spec lock");
        spec.enabled = enabled;
        spec.updated_ms = chrono::Utc::now().timestamp_millis();
        self.inner.store.put_function(
            name,
            &serde_json::to_vec(&*spec).expect("specs serialize"),
            None,
            self.inner.cfg.keep_versions,
        )?;
        d.enabled.store(enabled, Ordering::Relaxed);
        if enabled && let Some(c) = &d.schedule {
            *d.next_fire.lock().expect("fire lock") = next_occurrence(c, self.inner.clock.now_ms());
        }
        tracing::info!(function = %name, enabled, "function {}", if enabled { "enabled" } else { "disabled" });
        Ok(spec.clone())
    }

    /// Deletes a function, its modules and its key-value state.
    pub fn delete(&self, name: &str) -> Result<(), FunctionError> {
        let _g = self.inner.deploying.lock().expect("deploy lock");
        self.deployed(name)?;
        self.inner.store.delete_function(name)?;
        self.inner.registry.write().expect("registry").remove(name);
        tracing::info!(function = %name, "function deleted");
        Ok(())
    }

    fn deployed(&self, name: &str) -> Result<Arc<Deployed>, FunctionError> {
        self.inner
            .registry
            .read()
            .expect("registry")
            .get(name)
            .cloned()
            .ok_or_else(|| FunctionError::NotFound(name.to_owned()))
    }

    /// A deployed function's spec.
    pub fn spec(&self, name: &str) -> Option<FunctionSpec> {
        self.deployed(name)
            .ok()
            .map(|d| d.spec.lock().expect("spec lock").clone())
    }

    /// Every deployed function with its counters and queue depth, by name.
    pub fn list(&self) -> Vec<serde_json::Value> {
        let reg = self.inner.registry.read().expect("registry");
        let mut names: Vec<&String> = reg.keys().collect();
        names.sort();
        names.into_iter().map(|n| Self::describe(&reg[n])).collect()
    }

    /// One deployed function with its counters and queue depth.
    pub fn info(&self, name: &str) -> Result<serde_json::Value, FunctionError> {
        self.deployed(name).map(|d| Self::describe(&d))
    }

    fn describe(d: &Deployed) -> serde_json::Value {
        let s = &d.stats;
        let mut v =
            serde_json::to_value(&*d.spec.lock().expect("spec lock")).expect("specs serialize");
        v["stats"] = serde_json::json!({
            // Acquire, and read first: the failures and pauses it counts are visible.
            "invocations": s.invocations.load(Ordering::Acquire),
            "failures": s.failures.load(Ordering::Relaxed),
            "dropped": s.dropped.load(Ordering::Relaxed),
            "pauses": s.pauses.load(Ordering::Relaxed),
            "paused_until_ms": s.paused_until_ms(),
            "queued": d.queue.len(),
        });
        v["next_run_ms"] = serde_json::json!(*d.next_fire.lock().expect("fire lock"));
        v
    }

    fn offer(d: &Deployed, job: Job) -> bool {
        match d.queue.try_send(job) {
            Ok(()) => true,
            Err(_) => {
                d.stats.drop_trigger();
                false
            }
        }
    }

    /// Offers stored device events to the functions whose topic filters match. Never blocks:
    /// a full queue drops the trigger (counted).
    /// The batch is taken (left empty) when a function subscribes, and shared by its jobs.
    pub fn on_stored(&self, events: &mut Vec<Event>) {
        let reg = self.inner.registry.read().expect("registry");
        let subscribed: Vec<&Arc<Deployed>> = reg
            .values()
            .filter(|d| !d.filters.is_empty() && d.enabled.load(Ordering::Relaxed))
            .collect();
        if subscribed.is_empty() {
            return;
        }
        let now = Instant::now();
        // A function paused by its breaker drops its triggers here, before any work is spent
        // on them (asked once per batch).
        let paused: Vec<bool> = subscribed.iter().map(|d| d.stats.paused(now)).collect();
        let batch = Arc::new(std::mem::take(events));
        for (index, e) in batch.iter().enumerate() {
            let m = &e.machine;
            let levels = [
                millrace_shared::topic::TOPIC_ROOT,
                m.site.as_str(),
                m.line.as_str(),
                m.machine.as_str(),
                e.kind().as_str(),
            ];
            let mut topic: Option<String> = None;
            for (d, paused) in subscribed.iter().zip(&paused) {
                if d.filters.iter().any(|f| f.matches_levels(&levels)) {
                    // A full queue drops the trigger before any work is spent on it.
                    if *paused || d.queue.is_full() {
                        d.stats.drop_trigger();
                        continue;
                    }
                    let ev = EventRef {
                        batch: batch.clone(),
                        index,
                    };
                    let topic = topic.get_or_insert_with(|| e.topic()).clone();
                    let input = Input::from_event(ev, topic);
                    Self::offer(
                        d,
                        Job {
                            input,
                            enqueued: now,
                            reply: None,
                        },
                    );
                }
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
                .map(|e| e.machine.to_string())
                .unwrap_or_default(),
            ts_ms: event
                .as_ref()
                .map_or_else(|| self.inner.clock.now_ms(), |e| e.ts_ms),
            topic,
            event,
            payload: Some(Arc::new(payload)),
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

    /// Fires every schedule due at `now_ms` (at most once per function: runs missed while
    /// the edge was busy or down are skipped). Returns how many fired.
    pub fn fire_due(&self, now_ms: i64) -> usize {
        let reg = self.inner.registry.read().expect("registry");
        let mut fired = 0;
        for d in reg.values() {
            let Some(cron) = &d.schedule else { continue };
            if !d.enabled.load(Ordering::Relaxed) {
                continue;
            }
            let mut next = d.next_fire.lock().expect("fire lock");
            let Some(due) = *next else { continue };
            if due > now_ms {
                continue;
            }
            *next = next_occurrence(cron, now_ms);
            let input = Input {
                trigger: TriggerKind::Schedule,
                topic: String::new(),
                device: String::new(),
                ts_ms: due,
                event: None,
                payload: Some(Arc::new(
                    serde_json::to_vec(&serde_json::json!({ "scheduled_ms": due })).expect("json"),
                )),
            };
            if Self::offer(
                d,
                Job {
                    input,
                    enqueued: Instant::now(),
                    reply: None,
                },
            ) {
                fired += 1;
            }
        }
        fired
    }

    fn next_due(&self) -> Option<i64> {
        let reg = self.inner.registry.read().expect("registry");
        reg.values()
            .filter(|d| d.enabled.load(Ordering::Relaxed))
            .filter_map(|d| *d.next_fire.lock().expect("fire lock"))
            .min()
    }

    fn scheduler(&self, wake: flume::Receiver<()>) {
        while !self.inner.stop.load(Ordering::Relaxed) {
            let now = self.inner.clock.now_ms();
            self.fire_due(now);
            let wait = self.next_due().map_or(1000, |t| (t - now).clamp(1, 1000)) as u64;
            let _ = wake.recv_timeout(Duration::from_millis(wait));
        }
    }
}

impl Inner {
    fn run(
        &self,
        spec: &FunctionSpec,
        compiled: &dyn Compiled,
        stats: &FunctionStats,
        m: &mut WorkerMetrics,
        job: Job,
    ) -> Outcome {
        let queued = job.enqueued.elapsed();
        let started_ms = chrono::Utc::now().timestamp_millis();
        let kv = Arc::new(StoreKv {
            store: self.store.clone(),
            function: spec.name.clone(),
        });
        let t0 = Instant::now();
        let (result, effects) = compiled.invoke(
            &job.input,
            kv,
            Duration::from_millis(spec.timeout_ms),
            u64::from(spec.memory_mib) << 20,
        );
        let mut actions = ActionCounts::default();
        let result = result.and_then(|()| self.apply(spec, &job.input, &effects, &mut actions));
        let duration = t0.elapsed();
        let (outcome, error) = match &result {
            Ok(()) => (Outcome::Ok, None),
            Err(e) => (Outcome::from(e), Some(e.to_string())),
        };
        // The breaker and the failure count first: whoever sees this invocation counted sees
        // the failure and the pause it started.
        if let Some(pause) = stats.record(outcome) {
            tracing::warn!(function = %spec.name, pause_s = pause.as_secs(), "function timed out {} times in a row: its triggers are dropped for a while", Breaker::TRIPS);
        }
        if let Some(e) = &error {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(function = %spec.name, version = spec.version, trigger = job.input.trigger.as_str(), outcome = outcome.as_str(), error = %e, "function invocation failed");
        }
        stats.invocations.fetch_add(1, Ordering::Release);
        m.invocation(&spec.name, job.input.trigger, outcome)
            .increment(1);
        m.duration.record(duration.as_secs_f64());
        let record = InvocationRecord {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            function: spec.name.clone(),
            version: spec.version,
            trigger: job.input.trigger,
            topic: job.input.topic.clone(),
            device: job.input.device.clone(),
            event_ts_ms: job.input.ts_ms,
            started_ms,
            queued_us: queued.as_micros() as u64,
            duration_us: duration.as_micros() as u64,
            outcome,
            error,
            logs: effects.logs,
            logs_dropped: effects.logs_dropped,
            actions,
        };
        if (outcome != Outcome::Ok || self.cfg.log_successes)
            && self.log_tx.try_send(record.clone()).is_err()
        {
            metrics::counter!("millrace_edge_function_log_dropped_total").increment(1);
        }
        if let Some(reply) = job.reply {
            let _ = reply.send(record);
        }
        outcome
    }

    /// Applies a successful invocation's actions: state and alerts in one write, then points,
    /// then MQTT messages.
    fn apply(
        &self,
        spec: &FunctionSpec,
        input: &Input,
        effects: &Effects,
        actions: &mut ActionCounts,
    ) -> Result<(), InvokeError> {
        let failed =
            |e: StoreError| InvokeError::Failed(format!("could not apply its actions: {e}"));
        let now = chrono::Utc::now().timestamp_millis();
        let alerts: Vec<(i64, Vec<u8>)> = effects
            .alerts
            .iter()
            .map(|(severity, message)| {
                let a = serde_json::json!({
                    "ts_ms": now,
                    "function": spec.name,
                    "version": spec.version,
                    "severity": severity,
                    "message": message,
                    "device": input.device,
                    "topic": input.topic,
                    "event_ts_ms": input.ts_ms,
                });
                (now, serde_json::to_vec(&a).expect("json"))
            })
            .collect();
        self.store
            .apply_function_state(&spec.name, &effects.kv, &alerts)
            .map_err(failed)?;
        if !effects.points.is_empty() {
            let events: Vec<Event> = effects
                .points
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
                .collect();
            self.store
                .write_synced(&events, &[], false)
                .map_err(failed)?;
        }
        let topic = format!("{ALERT_TOPIC_PREFIX}{}", spec.name);
        let mut published = 0;
        for (_, a) in &alerts {
            published += usize::from((self.publish)(&topic, a.clone()));
        }
        for (t, p) in &effects.publishes {
            if (self.publish)(t, p.clone()) {
                published += 1;
            } else {
                metrics::counter!("millrace_edge_function_publish_failed_total", "function" => spec.name.clone()).increment(1);
            }
        }
        *actions = ActionCounts {
            published,
            points: effects.points.len(),
            alerts: alerts.len(),
            kv_writes: effects.kv.len(),
        };
        Ok(())
    }
}

/// A worker's metric handles (looked up once, not per invocation).
struct WorkerMetrics {
    duration: metrics::Histogram,
    queue_depth: metrics::Gauge,
    invocations: HashMap<(TriggerKind, Outcome), metrics::Counter>,
}

impl WorkerMetrics {
    fn new(function: &str) -> Self {
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
fn lower_priority(nice: u8) {
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

/// Writes invocation records in batches until stopped (then writes what is left).
fn log_writer(store: Arc<Store>, rx: flume::Receiver<InvocationRecord>, stop: &AtomicBool) {
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => r,
            Err(flume::RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => continue,
            Err(_) => match rx.try_recv() {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(4095));
        let newest = batch.iter().map(|r| r.started_ms).max().unwrap_or(0);
        let rows: Vec<Vec<u8>> = batch
            .iter()
            .map(|r| serde_json::to_vec(r).expect("records serialize"))
            .collect();
        if let Err(e) = store.log_invocations(newest, &rows) {
            tracing::error!(error = %e, records = rows.len(), "could not write the invocation log");
        }
    }
}

/// A filter over the invocation log.
#[derive(Debug, Default, Deserialize)]
pub struct LogFilter {
    /// Started at or after, Unix ms.
    #[serde(default)]
    pub from_ms: Option<i64>,
    /// Started before, Unix ms.
    #[serde(default)]
    pub to_ms: Option<i64>,
    /// Only this function.
    pub function: Option<String>,
    /// Only this outcome.
    pub outcome: Option<Outcome>,
    /// Only this trigger kind.
    pub trigger: Option<TriggerKind>,
}

impl LogFilter {
    /// Whether a stored record passes.
    pub fn keep(&self, record: &[u8]) -> bool {
        #[derive(Deserialize)]
        struct Probe<'a> {
            function: &'a str,
            outcome: Outcome,
            trigger: TriggerKind,
            started_ms: i64,
        }
        let Ok(p) = serde_json::from_slice::<Probe<'_>>(record) else {
            return false;
        };
        self.from_ms.is_none_or(|f| p.started_ms >= f)
            && self.to_ms.is_none_or(|t| p.started_ms < t)
            && self.function.as_deref().is_none_or(|f| f == p.function)
            && self.outcome.is_none_or(|o| o == p.outcome)
            && self.trigger.is_none_or(|t| t == p.trigger)
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
