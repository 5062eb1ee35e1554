//! The Millrace edge node: runs on a gateway in the factory.
//!
//! # Layout
//! - [`config`]: configuration (defaults → TOML → `MILLRACE_EDGE_*` environment), validated.
//! - [`broker`]: the embedded rumqttd broker, device authentication and the single device port
//!   that serves MQTT 3.1.1 and 5.
//! - [`ingest`]: the writer thread that deduplicates the events the device listeners decoded and
//!   batches them into the store, with dead letters for what it refuses.
//! - [`store`]: the RocksDB time-series store (compressed telemetry blocks, events, dead
//!   letters, retention).
//! - [`functions`]: on-device WebAssembly functions (triggers, runtime, log).
//! - [`sync`]: the sync client that sends the store's outbox to the cloud.
//! - [`api`]: the HTTP API (health, Prometheus metrics, series, points, events, dead letters).
//!
//! [`Edge`] wires them together with an explicit shutdown: stop taking devices, write what was
//! received, flush RocksDB.
#![warn(missing_docs)]

pub mod allocator;
pub mod api;
pub mod broker;
pub mod config;
pub mod functions;
pub mod ingest;
pub mod store;
pub mod sync;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, BrokerError};
use crate::config::EdgeConfig;
use crate::ingest::{Ingest, IngestError};
use crate::store::{Store, StoreError};

/// Errors starting the edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The data directory could not be made.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store failed to open.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The broker failed to start.
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    /// Functions failed to start.
    #[error("functions: {0}")]
    Functions(#[from] functions::FunctionError),
    /// Ingest failed to start.
    #[error("ingest: {0}")]
    Ingest(#[from] IngestError),
    /// The HTTP listener could not bind.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The sync client could not be built.
    #[error("sync: {0}")]
    Sync(sync::SyncError),
    /// A blocking task panicked.
    #[error("startup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The process-wide Prometheus recorder (one per process, shared by every edge in it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &buckets)
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            // A second recorder in the same process (tests) keeps the first one.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// A running edge node.
#[derive(Debug)]
pub struct Edge {
    /// The device port (MQTT 3.1.1 and 5).
    pub mqtt_addr: SocketAddr,
    /// The HTTP API.
    pub http_addr: SocketAddr,
    store: Arc<Store>,
    ingest: Option<Ingest>,
    functions: Option<functions::Functions>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Edge {
    /// Opens the store, starts the broker, ingest, maintenance and the HTTP API.
    pub async fn start(cfg: EdgeConfig) -> Result<Self, EdgeError> {
        let started = Instant::now();
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| EdgeError::DataDir {
            path: cfg.data_dir.display().to_string(),
            source,
        })?;
        let metrics = metrics_handle();
        let path = cfg.data_dir.join("rocksdb");
        let opts = cfg
            .store
            .options(cfg.sync.enabled.then_some(cfg.sync.outbox_quota_bytes));
        let store = Arc::new(tokio::task::spawn_blocking(move || Store::open(&path, opts)).await??);
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        let on_stored: ingest::StoredHook = Default::default();
        let ingest = if cfg.ingest.enabled {
            Some(Ingest::start(
                store.clone(),
                cfg.ingest.clone(),
                on_stored.clone(),
            )?)
        } else {
            tracing::warn!(
                "ingest is disabled (ingest.enabled = false): nothing devices send is stored"
            );
            None
        };
        let broker = Arc::new(
            Broker::start(
                &cfg.mqtt,
                ingest.as_ref().map(Ingest::sender),
                &tasks,
                stop.clone(),
            )
            .await?,
        );

        let functions = if cfg.functions.enabled {
            let (store, publisher, fcfg) =
                (store.clone(), broker.publisher(), cfg.functions.clone());
            let f = tokio::task::spawn_blocking(move || {
                let engine = functions::WasmEngine::with_limits(fcfg.max_memory_mib, 256)
                    .map_err(functions::FunctionError::Runtime)?;
                functions::Functions::start(
                    store,
                    Arc::new(engine),
                    publisher,
                    fcfg,
                    Arc::new(functions::SystemClock),
                )
            })
            .await??;
            let hook = f.clone();
            let _ = on_stored.set(Box::new(move |events| hook.on_stored(events)));
            Some(f)
        } else {
            tracing::info!("functions are disabled (functions.enabled = false)");
            None
        };

        // Histogram samples wait in the recorder until drained: without upkeep an instance
        // nobody scrapes would keep every sample it ever recorded.
        tasks.spawn({
            let (handle, stop) = (metrics.clone(), stop.clone());
            async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! { _ = tick.tick() => {}, _ = stop.cancelled() => return }
                    let handle = handle.clone();
                    let _ = tokio::task::spawn_blocking(move || handle.run_upkeep()).await;
                }
            }
        });

        // Maintenance: seal full windows into compressed blocks, apply retention, report size.
        tasks.spawn({
            let (store, stop, every) =
                (store.clone(), stop.clone(), cfg.store.maintenance_interval);
            async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! { _ = tick.tick() => {}, _ = stop.cancelled() => return }
                    let store = store.clone();
                    let r =
                        tokio::task::spawn_blocking(move || -> Result<(u64, u64), StoreError> {
                            let now = chrono::Utc::now().timestamp_millis();
                            let sealed = store.seal(now)?;
                            store.enforce_retention(now)?;
                            let memory = store.memory()?;
                            for (kind, bytes) in [
                                ("memtables", memory.memtables),
                                ("table_readers", memory.table_readers),
                                ("block_cache", memory.block_cache),
                            ] {
                                metrics::gauge!("millrace_edge_store_memory_bytes", "kind" => kind)
                                    .set(bytes as f64);
                            }
                            let sizes = store.size_by_cf()?;
                            for (cf, bytes) in &sizes {
                                metrics::gauge!("millrace_edge_store_bytes", "cf" => *cf)
                                    .set(*bytes as f64);
                            }
                            Ok((sealed, sizes.values().sum()))
                        })
                        .await;
                    match r {
                        Ok(Ok((sealed, _))) => {
                            if sealed > 0 {
                                tracing::debug!(sealed, "sealed telemetry into blocks");
                            }
                        }
                        Ok(Err(e)) => tracing::error!(error = %e, "store maintenance failed"),
                        Err(e) => tracing::error!(error = %e, "store maintenance panicked"),
                    }
                }
            }
        });

        let sync_stats = cfg
            .sync
            .enabled
            .then(|| Arc::new(sync::SyncStats::default()));
        if let Some(stats) = &sync_stats {
            let client = sync::SyncClient::new(
                store.clone(),
                cfg.sync.clone(),
                cfg.edge_id.clone(),
                stats.clone(),
            )
            .map_err(EdgeError::Sync)?;
            tasks.spawn(client.run(stop.clone()));
            // Outbox gauges for Prometheus.
            tasks.spawn({
                let (store, stop) = (store.clone(), stop.clone());
                async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        tokio::select! { _ = tick.tick() => {}, _ = stop.cancelled() => return }
                        let store = store.clone();
                        if let Ok(Ok(Some(o))) =
                            tokio::task::spawn_blocking(move || store.outbox_status()).await
                        {
                            for (lane, items, bytes) in [
                                ("events", o.items.events, o.bytes.events),
                                ("telemetry", o.items.telemetry, o.bytes.telemetry),
                            ] {
                                metrics::gauge!("millrace_edge_outbox_items", "lane" => lane)
                                    .set(items as f64);
                                metrics::gauge!("millrace_edge_outbox_bytes", "lane" => lane)
                                    .set(bytes as f64);
                            }
                            let lag = o
                                .oldest_stored_ms
                                .map_or(0, |t| (chrono::Utc::now().timestamp_millis() - t).max(0));
                            metrics::gauge!("millrace_edge_sync_lag_seconds")
                                .set(lag as f64 / 1000.0);
                        }
                    }
                }
            });
        }
        let listener = tokio::net::TcpListener::bind(cfg.http.listen)
            .await
            .map_err(|source| EdgeError::Http {
                addr: cfg.http.listen,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| EdgeError::Http {
            addr: cfg.http.listen,
            source,
        })?;
        let state = api::ApiState {
            store: store.clone(),
            ingest: ingest
                .as_ref()
                .map_or_else(Default::default, |i| i.stats.clone()),
            connections: {
                let b = broker.clone();
                Arc::new(move || b.connections())
            },
            metrics,
            api_keys: Arc::new(cfg.http.api_keys.clone()),
            max_points: cfg.http.max_points,
            edge_id: cfg.edge_id.clone(),
            started,
            sync: sync_stats.map(|s| (s, cfg.sync.cloud_url.clone())),
            functions: functions.clone(),
        };
        tasks.spawn({
            let stop = stop.clone();
            async move {
                let r = axum::serve(listener, api::app(state))
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "HTTP server stopped");
                }
            }
        });
        tracing::info!(edge_id = %cfg.edge_id, mqtt = %broker.addr, http = %http_addr, data_dir = %cfg.data_dir.display(), "edge started");
        Ok(Self {
            mqtt_addr: broker.addr,
            http_addr,
            store,
            ingest,
            functions,
            tasks,
            stop,
        })
    }

    /// The store (for tests and tools in the same process).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The functions service (`None` when functions are disabled).
    pub fn functions(&self) -> Option<&functions::Functions> {
        self.functions.as_ref()
    }

    /// Stops taking devices and requests, writes everything received, flushes and closes RocksDB.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(f) = self.functions.clone() {
            let _ = tokio::task::spawn_blocking(move || f.shutdown()).await;
        }
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 10 s");
        }
        if let Some(ingest) = self.ingest.take() {
            let _ = tokio::task::spawn_blocking(move || ingest.shutdown()).await;
        }
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.flush()).await {
            Ok(Ok(())) => tracing::info!("store flushed; edge stopped"),
            Ok(Err(e)) => tracing::error!(error = %e, "store flush failed"),
            Err(e) => tracing::error!(error = %e, "store flush panicked"),
        }
    }
}
