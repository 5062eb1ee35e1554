//! The Millrace edge node: runs on a gateway in the factory.
//!
//! # Layout
//! Components, each using only the ones listed after it:
//!
//! - `api`: the HTTP API (health, Prometheus metrics, series, points, events, dead letters,
//!   sync status, functions).
//! - `sync`: the sync client that sends the store's outbox to the cloud.
//! - [`functions`]: on-device WebAssembly functions (registry, scheduler, workers, log).
//! - [`broker`]: the embedded rumqttd broker, device authentication, the in-process publisher
//!   and the device ports that serve MQTT 3.1.1 and 5 and hand each PUBLISH to ingest.
//! - `ingest`: the writer thread that decodes, deduplicates and batches the events the device
//!   listeners found into the store, with dead letters for what it refuses.
//! - `maintenance`: sealing, retention and store gauges, on a timer.
//! - [`config`]: configuration (defaults → TOML → `MILLRACE_EDGE_*` environment), validated
//!   (it names the store's options).
//! - [`store`]: the RocksDB store (series and compressed blocks, events, dead letters, outbox,
//!   functions' state), written through one write batch per ingest batch.
//! - `mqtt`: MQTT wire framing (remaining length, CONNECT level, CONNACK, PUBLISH scanner).
//!
//! [`Edge::start`] builds them from the bottom of this list up, handing each what it needs; each
//! long-running task is tracked and stops on [`Edge::shutdown`]: stop taking devices, write
//! what was received, flush RocksDB.
#![warn(missing_docs, unreachable_pub)]

pub mod allocator;
mod api;
pub mod broker;
pub mod config;
pub mod functions;
#[doc(hidden)]
pub mod fuzzing;
mod ingest;
mod maintenance;
mod mqtt;
pub mod sparkplug;
pub mod store;
mod sync;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use millrace_shared::service;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::ingest::IngestError;
pub use crate::sync::SyncError;

use crate::broker::{Broker, BrokerError};
use crate::config::EdgeConfig;
use crate::ingest::Ingest;
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
    Sync(SyncError),
    /// A blocking task panicked.
    #[error("startup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The process-wide Prometheus recorder (one per process, shared by every edge in it).
pub fn metrics_handle() -> PrometheusHandle {
    service::prometheus_recorder(&[
        0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5, 5.0, 10.0,
    ])
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
    /// The Sparkplug host (its `STATE` goes offline at shutdown).
    sparkplug: Option<Arc<sparkplug::Host>>,
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

        // Bottom up: each component gets what it needs when it is built.
        let broker = {
            let mqtt = cfg.mqtt.clone();
            tokio::task::spawn_blocking(move || Broker::start(&mqtt)).await??
        };
        let sparkplug = (cfg.sparkplug.enabled && cfg.ingest.enabled).then(|| {
            Arc::new(sparkplug::Host::new(
                cfg.sparkplug.clone(),
                broker.publisher(),
                broker.retained_publisher(),
            ))
        });
        // What functions publish to millrace/sparkplug/write/… becomes a Sparkplug command.
        let function_publisher: broker::Publisher = match &sparkplug {
            Some(host) => {
                let (host, inner) = (host.clone(), broker.publisher());
                Arc::new(move |topic: &str, payload: Vec<u8>| {
                    let Some(target) = topic.strip_prefix(sparkplug::WRITE_PREFIX) else {
                        return inner(topic, payload);
                    };
                    let now = chrono::Utc::now().timestamp_millis();
                    match host.write(target, &payload, now) {
                        Ok(sent) => {
                            tracing::debug!(%sent, "Sparkplug command from a function");
                            true
                        }
                        Err(e) => {
                            metrics::counter!("millrace_edge_sparkplug_writes_refused_total")
                                .increment(1);
                            tracing::warn!(%topic, error = %e, "Sparkplug write refused");
                            false
                        }
                    }
                })
            }
            None => broker.publisher(),
        };
        let functions = if cfg.functions.enabled {
            let (store, publisher, fcfg) =
                (store.clone(), function_publisher, cfg.functions.clone());
            Some(
                tokio::task::spawn_blocking(move || {
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
                .await??,
            )
        } else {
            tracing::info!("functions are disabled (functions.enabled = false)");
            // Nobody reads the trigger log: do not write it (deployed functions go on from
            // their cursors when functions are enabled again, without what came meanwhile).
            store.stop_trigger_log();
            None
        };
        let ingest = if cfg.ingest.enabled {
            let (store, icfg) = (store.clone(), cfg.ingest.clone());
            Some(tokio::task::spawn_blocking(move || Ingest::start(store, icfg)).await??)
        } else {
            tracing::warn!(
                "ingest is disabled (ingest.enabled = false): nothing devices send is stored"
            );
            None
        };
        // Retained messages devices sent before the restart (rumqttd forgets them): back into
        // the broker before any device can subscribe.
        if ingest.is_some() {
            let kept = {
                let store = store.clone();
                tokio::task::spawn_blocking(move || store.retained()).await??
            };
            let publish = broker.retained_publisher();
            let n = kept.len();
            for (topic, payload) in kept {
                if !publish(&topic, payload) {
                    tracing::warn!(%topic, "retained message not restored: the in-process publish queue is full");
                }
            }
            if n > 0 {
                tracing::info!(messages = n, "retained messages restored into the broker");
            }
        }
        let devices = broker
            .listen(
                &cfg.mqtt,
                ingest.as_ref().map(Ingest::sender),
                sparkplug.clone(),
                &tasks,
                stop.clone(),
            )
            .await?;
        // The host is online once devices can reach it: its retained STATE tells nodes so (a
        // node that sees it online publishes its births again).
        if let Some(host) = &sparkplug {
            host.publish_state(true);
        }

        tasks.spawn(service::metrics_upkeep(metrics.clone(), stop.clone()));
        tasks.spawn(maintenance::run(
            store.clone(),
            cfg.store.maintenance_interval,
            stop.clone(),
        ));
        let sync_stats = cfg
            .sync
            .enabled
            .then(|| Arc::new(sync::SyncStats::default()));
        if let Some(stats) = &sync_stats {
            let reports: Option<sync::Reports> = functions
                .clone()
                .map(|f| Arc::new(move || f.reports()) as sync::Reports);
            let client = sync::SyncClient::new(
                store.clone(),
                cfg.sync.clone(),
                cfg.edge_id.clone(),
                stats.clone(),
                reports,
            )
            .map_err(EdgeError::Sync)?;
            tasks.spawn(client.run(stop.clone()));
            tasks.spawn(sync::report_outbox(store.clone(), stop.clone()));
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
            connections: devices.connection_count(),
            metrics,
            api_keys: Arc::new(cfg.http.api_keys.clone()),
            max_points: cfg.http.max_points,
            edge_id: cfg.edge_id.clone(),
            started,
            sync: sync_stats.map(|s| (s, cfg.sync.cloud_url.clone())),
            functions: functions.clone(),
            sparkplug: sparkplug.clone(),
        };
        tasks.spawn({
            let stop = stop.clone();
            let limits = cfg.http.limits.clone();
            async move {
                millrace_shared::service::http::serve(
                    listener,
                    api::app(state),
                    limits,
                    "millrace_edge",
                    stop,
                )
                .await;
            }
        });
        tracing::info!(edge_id = %cfg.edge_id, mqtt = %devices.addr, http = %http_addr, data_dir = %cfg.data_dir.display(), "edge started");
        Ok(Self {
            mqtt_addr: devices.addr,
            http_addr,
            store,
            ingest,
            functions,
            sparkplug,
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
        if let Some(host) = self.sparkplug.take() {
            host.publish_state(false);
            // Let the broker deliver it to subscribers before their connections close.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
