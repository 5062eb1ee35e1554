//! The Millrace cloud aggregator: stores what the edges send and turns it into factory reports.
//!
//! # Layout
//! - [`config`]: configuration (defaults → TOML → `MILLRACE_CLOUD_*` environment), validated.
//! - [`dataset`]: the Parquet dataset partitioned by table, date and site, with an append-only
//!   manifest that makes each edge batch one atomic, idempotent commit.
//! - [`api`]: the HTTP API: the sync endpoint for edges (per-edge tokens), per-edge
//!   completeness, data queries, health and Prometheus metrics (API keys).
//! - [`reports`]: the query and report endpoints (filters, formats).
//! - [`factory`]: factory reports with Polars: OEE (ISO 22400), production, downtime, telemetry.
//!
//! [`Cloud`] wires them together with an explicit shutdown.
#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod dataset;
pub mod factory;
pub mod reports;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &buckets)
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Master data: the configuration, then the edits saved through the API.
fn load_master(cfg: &CloudConfig) -> factory::Master {
    let mut m = factory::Master {
        ideal_cycle_ms: cfg
            .master
            .machines
            .iter()
            .map(|s| (s.id.to_string(), s.ideal_cycle_time_ms))
            .collect(),
        default_ideal_cycle_ms: cfg.master.default_ideal_cycle_ms,
        calendar: cfg.master.calendar.clone(),
    };
    let saved = cfg.data_dir.join("master.json");
    match std::fs::read(&saved).map(|b| serde_json::from_slice::<factory::Master>(&b)) {
        Ok(Ok(s)) => m.ideal_cycle_ms.extend(s.ideal_cycle_ms),
        Ok(Err(e)) => {
            tracing::error!(path = %saved.display(), error = %e, "saved master data unreadable; using the configuration")
        }
        Err(_) => {}
    }
    m
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
        let (dir, fsync) = (cfg.data_dir.clone(), cfg.dataset.fsync);
        let dataset =
            Arc::new(tokio::task::spawn_blocking(move || Dataset::open(&dir, fsync)).await??);
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        if cfg.edges.is_empty() {
            tracing::warn!("no edges configured ([edges]): every sync request will be refused");
        }

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
                        ds.remove_retired(crate::dataset::RETIRE_AFTER);
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
        let (commits, _) = tokio::sync::watch::channel(0u64);
        let state = api::ApiState {
            dataset: dataset.clone(),
            cfg: Arc::new(cfg.clone()),
            metrics,
            started,
            commits: Arc::new(commits),
            master: Arc::new(std::sync::RwLock::new(load_master(&cfg))),
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
        tracing::info!(http = %addr, data_dir = %cfg.data_dir.display(), edges = cfg.edges.len(), "cloud started");
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
