//! The Millrace cloud aggregator: stores what the edges send and turns it into factory reports.
//!
//! # Layout
//! Layers, each using only the ones below it:
//!
//! - [`api`]: the HTTP API (axum): the sync endpoint for edges (per-edge tokens), per-edge
//!   completeness, raw rows and reports (API keys), master data, the live dashboard, health
//!   and Prometheus metrics. One `ApiError` maps the errors of the layers below.
//! - [`sync`]: the receiving end of sync: a batch decoded, deduplicated against what the
//!   dataset holds, laid out per table and partition, committed once.
//! - [`reports`]: factory reports with Polars: OEE (ISO 22400), production, downtime,
//!   telemetry aggregates, the dashboard's snapshot; master data.
//! - [`query`]: what to read ([`query::Selection`]) and a pruned, filtered scan of one table.
//! - [`dataset`]: the Parquet dataset partitioned by table, date and site, with an append-only
//!   manifest that makes each edge batch one atomic, idempotent commit; compaction.
//! - `schema`: every stored table's columns, named once.
//! - [`config`]: configuration (defaults → TOML → `MILLRACE_CLOUD_*` environment), validated.
//!
//! [`Cloud`] wires them together with an explicit shutdown.
#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod config;
pub mod dataset;
pub mod query;
pub mod reports;
mod schema;
pub mod sync;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use millrace_shared::service;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::CloudConfig;
use crate::dataset::{Dataset, DatasetError};

/// Errors starting the cloud.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The dataset failed to open.
    #[error("dataset: {0}")]
    Dataset(#[from] DatasetError),
    /// The HTTP listener could not bind.
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A blocking task panicked.
    #[error("startup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The process-wide Prometheus recorder.
pub fn metrics_handle() -> PrometheusHandle {
    service::prometheus_recorder(&[
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// A running cloud aggregator.
#[derive(Debug)]
pub struct Cloud {
    /// The HTTP address.
    pub addr: SocketAddr,
    dataset: Arc<Dataset>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Cloud {
    /// Opens the dataset and serves the API.
    pub async fn start(cfg: CloudConfig) -> Result<Self, CloudError> {
        let started = Instant::now();
        let metrics = metrics_handle();
        let (dir, fsync, storage) = (cfg.data_dir.clone(), cfg.dataset.fsync, cfg.storage.clone());
        let dataset = Arc::new(
            tokio::task::spawn_blocking(move || Dataset::open_with(&storage, &dir, fsync))
                .await??,
        );
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        if cfg.edges.is_empty() {
            tracing::warn!("no edges configured ([edges]): every sync request will be refused");
        }

        tasks.spawn(service::metrics_upkeep(metrics.clone(), stop.clone()));

        // Commits (this node's and, read every second, other nodes'): live dashboards follow.
        let commits = Arc::new(tokio::sync::watch::channel(0u64).0);

        let master = {
            let (cfg, ds) = (cfg.clone(), dataset.clone());
            let loaded = tokio::task::spawn_blocking(move || reports::Master::load(&cfg, &ds))
                .await
                .expect("loading master data");
            Arc::new(std::sync::RwLock::new(loaded))
        };

        // What other cloud nodes committed to the same tables (and saved as master data), read
        // every second.
        tasks.spawn({
            let (ds, stop, commits) = (dataset.clone(), stop.clone(), commits.clone());
            let (master, cfg) = (master.clone(), cfg.clone());
            // The saved master data last read: read again each pass, used when it changed.
            let seen: Arc<std::sync::Mutex<Option<Vec<u8>>>> = Default::default();
            async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! { _ = tick.tick() => {}, _ = stop.cancelled() => return }
                    let (ds, master, cfg) = (ds.clone(), master.clone(), cfg.clone());
                    let seen = seen.clone();
                    let pass = move || {
                        follow_saved_master(&ds, &cfg, &master, &seen);
                        ds.refresh(std::time::Duration::from_millis(900))
                    };
                    match tokio::task::spawn_blocking(pass).await {
                        Ok(Ok(false)) => {}
                        Ok(Ok(true)) => commits.send_modify(|v| *v += 1),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "reading the tables' new commits failed")
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reading the tables' new commits panicked")
                        }
                    }
                }
            }
        });

        // Compaction of small files.
        tasks.spawn({
            let (ds, stop) = (dataset.clone(), stop.clone());
            let (every, min) = (
                cfg.dataset.compaction_interval,
                cfg.dataset.compaction_min_files,
            );
            async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tokio::select! { _ = tick.tick() => {}, _ = stop.cancelled() => return }
                    let ds = ds.clone();
                    let pass = move || {
                        ds.remove_retired(dataset::RETIRE_AFTER);
                        ds.compact(min)
                    };
                    match tokio::task::spawn_blocking(pass).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!(files = n, "compacted small files"),
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "compaction failed"),
                        Err(e) => tracing::error!(error = %e, "compaction panicked"),
                    }
                }
            }
        });

        let listener = tokio::net::TcpListener::bind(cfg.http.listen)
            .await
            .map_err(|source| CloudError::Http {
                addr: cfg.http.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| CloudError::Http {
            addr: cfg.http.listen,
            source,
        })?;
        let state = api::ApiState {
            dataset: dataset.clone(),
            cfg: Arc::new(cfg.clone()),
            metrics,
            started,
            commits,
            master,
            edge_reports: Default::default(),
            live_slots: Arc::new(tokio::sync::Semaphore::new(cfg.http.max_live_subscribers)),
        };
        tasks.spawn({
            let stop = stop.clone();
            let limits = cfg.http.limits.clone();
            async move {
                millrace_shared::service::http::serve(
                    listener,
                    api::app(state),
                    limits,
                    "millrace_cloud",
                    stop,
                )
                .await;
            }
        });
        tracing::info!(http = %addr, data_dir = %cfg.data_dir.display(), tables = %dataset.location(), edges = cfg.edges.len(), "cloud started");
        Ok(Self {
            addr,
            dataset,
            tasks,
            stop,
        })
    }

    /// The dataset (for tests and tools in the same process).
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// Stops serving; commits in progress finish first.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 10 s");
        }
        tracing::info!("cloud stopped");
    }
}

/// Reads the master data saved beside the tables when other nodes may have changed it (the
/// tables are on a bucket), and uses it if it changed since `seen`.
fn follow_saved_master(
    ds: &Dataset,
    cfg: &CloudConfig,
    master: &std::sync::RwLock<reports::Master>,
    seen: &std::sync::Mutex<Option<Vec<u8>>>,
) {
    if !ds.is_shared() {
        return;
    }
    match ds.document(reports::SAVED_MASTER) {
        Ok(doc) => {
            let bytes = doc.map(|d| d.bytes);
            let mut seen = seen.lock().expect("seen lock");
            if *seen != bytes {
                *master.write().expect("master lock") =
                    reports::Master::with_saved(cfg, bytes.as_deref());
                *seen = bytes;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading saved master data failed; keeping what was read before")
        }
    }
}
