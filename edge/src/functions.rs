//! On-device functions: short-lived, stateless WebAssembly handlers triggered by device
//! events (MQTT topic filters), schedules (cron) and by hand (CLI, REST). See
//! `docs/functions.md` for the ABI and the guarantees.
//!
//! # Layout
//! - this module: [`Functions`], the service's façade and shared state.
//! - `registry`: deployment (names, versions, specs persisted in RocksDB, install).
//! - `replay`: a function run over stored history, resumable, exactly once.
//! - `scheduler`: cron schedules and the thread that fires them.
//! - `reader`: topic triggers: a thread per function reading the trigger log from its durable
//!   cursor, committing a batch's effects with the cursor's move.
//! - `workers`: one bounded queue and `concurrency` worker threads per function for manual and
//!   scheduled triggers, one invocation and its effects, the breaker.
//! - `log`: the invocation log.
//! - `invocation`: what an invocation is given and returns.
//! - [`wasm`]: the runtime behind the [`FunctionEngine`] trait (wasmtime) and the host ABI.
//! - `topic`: MQTT topic filters.
//!
//! Isolation: each function runs on its own threads with a fresh instance per invocation, a
//! time limit (epoch interruption) and a memory cap. Ingest never waits for a function: the
//! events it stores go to the trigger log in the same write batch, and each function reads the
//! log at its own pace from a cursor kept in RocksDB (behind, never dropping).

mod invocation;
mod log;
mod reader;
mod registry;
mod replay;
mod scheduler;
mod topic;
pub mod wasm;
mod workers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

pub use crate::broker::Publisher;
use crate::config::FunctionsConfig;
use crate::store::{KvWrite, Store, StoreError};
pub use invocation::{
    Clock, Effects, EventRef, Input, InvokeError, KvRead, LogLine, ManualClock, Outcome, Point,
    SystemClock, TriggerKind,
};
pub use log::{ActionCounts, InvocationRecord, LogFilter};
pub use reader::Lag;
pub use registry::{DeployRequest, FunctionSpec, VersionInfo};
pub use replay::{ReplayState, ReplayStatus};
pub use topic::TopicFilter;
pub use wasm::{Compiled, FunctionEngine, WasmEngine};
pub use workers::FunctionStats;

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
    /// The request conflicts with what the function is doing (a replay running, or none to
    /// cancel).
    #[error("{0}")]
    Conflict(String),
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

struct Job {
    input: Input,
    enqueued: Instant,
    reply: Option<tokio::sync::oneshot::Sender<InvocationRecord>>,
}

struct Deployed {
    spec: Mutex<FunctionSpec>,
    enabled: AtomicBool,
    /// Replaced by a newer version or deleted: its reader stops.
    retired: AtomicBool,
    compiled: Arc<dyn Compiled>,
    filters: Vec<TopicFilter>,
    schedule: Option<croner::Cron>,
    next_fire: Mutex<Option<i64>>,
    queue: flume::Sender<Job>,
    stats: Arc<FunctionStats>,
}

impl Deployed {
    /// Whether a device event of `machine` and `kind` matches the function's topic filters.
    fn matches(
        &self,
        machine: &millrace_shared::MachineId,
        kind: millrace_shared::EventKind,
    ) -> bool {
        let levels = [
            millrace_shared::topic::TOPIC_ROOT,
            machine.site.as_str(),
            machine.line.as_str(),
            machine.machine.as_str(),
            kind.as_str(),
        ];
        self.filters.iter().any(|f| f.matches_levels(&levels))
    }
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
    /// Per function name: held by its trigger-log reader while it runs a batch, so that two
    /// versions never read one cursor at once and a delete waits for the batch.
    leases: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Each function's current or last replay.
    replays: Mutex<HashMap<String, Arc<replay::ReplayJob>>>,
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
            leases: Mutex::new(HashMap::new()),
            replays: Mutex::new(HashMap::new()),
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
                Ok(compiled) => this.install(spec, compiled, true)?,
                Err(e) => {
                    tracing::error!(function = %name, error = %e, "stored module no longer compiles; skipped")
                }
            }
        }
        this.resume_replays()?;
        let log = std::thread::Builder::new()
            .name("millrace-fn-log".into())
            .spawn({
                let (store, stop) = (this.inner.store.clone(), this.inner.stop.clone());
                let nice = this.inner.cfg.nice;
                move || {
                    workers::lower_priority(nice);
                    log::log_writer(store, log_rx, &stop)
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

    /// Stops the scheduler, the readers and the workers and waits for them (an invocation
    /// running now finishes, at most after its time limit; readers commit what they ran;
    /// queued manual and scheduled triggers are abandoned), then writes the rest of the
    /// invocation log. Blocking.
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        let _ = self.inner.wake.try_send(());
        for d in self.inner.registry.write().expect("registry").drain() {
            d.1.retired.store(true, Ordering::Relaxed);
        }
        let threads = std::mem::take(&mut *self.inner.threads.lock().expect("threads"));
        for t in threads {
            let _ = t.join();
        }
    }

    /// The lease of a function's name (held while a batch of its triggers or replay runs).
    fn lease(&self, name: &str) -> Arc<Mutex<()>> {
        self.inner
            .leases
            .lock()
            .expect("leases")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Keeps a started thread, to join on shutdown (forgetting those that ended).
    fn own_thread(&self, thread: std::thread::JoinHandle<()>) {
        let mut threads = self.inner.threads.lock().expect("threads");
        threads.retain(|t| !t.is_finished());
        threads.push(thread);
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

    /// Every deployed function, by name.
    fn all_deployed(&self) -> Vec<Arc<Deployed>> {
        let mut all: Vec<Arc<Deployed>> = self
            .inner
            .registry
            .read()
            .expect("registry")
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|d| d.spec.lock().expect("spec lock").name.clone());
        all
    }

    /// Every deployed function with its counters, lag and queue depth, by name.
    pub fn list(&self) -> Result<Vec<serde_json::Value>, FunctionError> {
        self.all_deployed()
            .iter()
            .map(|d| self.describe(d))
            .collect()
    }

    /// Every deployed function's figures as the sync client reports them to the cloud, by
    /// name. Blocking (reads cursors).
    pub fn reports(&self) -> Vec<millrace_shared::FunctionReport> {
        self.all_deployed()
            .iter()
            .map(|d| {
                let (name, version) = {
                    let spec = d.spec.lock().expect("spec lock");
                    (spec.name.clone(), spec.version)
                };
                let lag = reader::lag(&self.inner.store, &name).ok().flatten();
                let s = &d.stats;
                millrace_shared::FunctionReport {
                    invocations: s.invocations.load(Ordering::Acquire),
                    failures: s.failures.load(Ordering::Relaxed),
                    skipped: s.skipped.load(Ordering::Relaxed),
                    lag_events: lag.as_ref().map_or(0, |l| l.events),
                    lag_ms: lag.map_or(0, |l| (l.seconds * 1000.0) as u64),
                    name,
                    version,
                }
            })
            .collect()
    }

    /// One deployed function with its counters, lag and queue depth.
    pub fn info(&self, name: &str) -> Result<serde_json::Value, FunctionError> {
        self.describe(&*self.deployed(name)?)
    }

    /// Up to `limit` entries of a function's key-value state whose keys start with `prefix`.
    /// Blocking.
    pub fn kv(
        &self,
        name: &str,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<crate::store::KvEntry>, FunctionError> {
        self.deployed(name)?;
        Ok(self.inner.store.kv_scan(name, prefix, limit)?)
    }

    fn describe(&self, d: &Deployed) -> Result<serde_json::Value, FunctionError> {
        let s = &d.stats;
        let name = d.spec.lock().expect("spec lock").name.clone();
        let lag = reader::lag(&self.inner.store, &name)?;
        let mut v =
            serde_json::to_value(&*d.spec.lock().expect("spec lock")).expect("specs serialize");
        v["stats"] = serde_json::json!({
            // Acquire, and read first: the failures and pauses it counts are visible.
            "invocations": s.invocations.load(Ordering::Acquire),
            "events": s.events.load(Ordering::Relaxed),
            "failures": s.failures.load(Ordering::Relaxed),
            "dropped": s.dropped.load(Ordering::Relaxed),
            "skipped": s.skipped.load(Ordering::Relaxed),
            "pauses": s.pauses.load(Ordering::Relaxed),
            "paused_until_ms": s.paused_until_ms(),
            "queued": d.queue.len(),
        });
        v["lag"] = serde_json::json!(lag);
        v["replay"] = serde_json::json!(self.replay_status(&name));
        v["next_run_ms"] = serde_json::json!(*d.next_fire.lock().expect("fire lock"));
        Ok(v)
    }
}
