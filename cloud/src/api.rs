//! The cloud's HTTP API: the sync endpoint for edges, data and report queries for users,
//! health and Prometheus metrics.
//!
//! Authentication: edges send `Authorization: Bearer <edge token>` to the sync endpoint; users
//! send a read or admin API key to `/api/v1/...`. Without configured keys the API serves
//! loopback only (checked at start) and needs no key.
//!
//! # Layout
//! - `error`: [`ApiError`], and how the errors of the layers below map onto it.
//! - `auth`: API keys ([`Caller`], [`Role`]) and edge tokens.
//! - `sync`: the sync endpoint and the per-edge completeness report.
//! - `data`: raw rows and the factory reports (query parameters, JSON and CSV rendering).
//! - `master`: master data.
//! - `live`: the dashboard page and its server-sent events.
//! - `openapi`: the OpenAPI document, generated from the handlers; the router is built from it.

mod auth;
mod data;
mod error;
mod live;
mod master;
mod openapi;
mod sync;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

pub use auth::{Caller, Role};
pub use error::ApiError;

use crate::config::CloudConfig;
use crate::dataset::Dataset;
use crate::reports::Master;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct ApiState {
    /// The dataset.
    pub dataset: Arc<Dataset>,
    /// The configuration.
    pub cfg: Arc<CloudConfig>,
    /// Prometheus renderer.
    pub metrics: PrometheusHandle,
    /// When the cloud started.
    pub started: Instant,
    /// Woken after each commit (live updates).
    pub commits: Arc<tokio::sync::watch::Sender<u64>>,
    /// Master data (config, then edits through the API, persisted in the data directory).
    pub master: Arc<std::sync::RwLock<Master>>,
    /// What each edge last reported with its batches: functions, outbox, when it was last seen.
    pub edge_reports: EdgeReports,
    /// One permit per open live event stream (`http.max_live_subscribers`).
    pub live_slots: Arc<tokio::sync::Semaphore>,
}

/// Per edge: what its last batch reported besides data (see [`EdgeReport`]).
pub type EdgeReports = Arc<std::sync::Mutex<std::collections::BTreeMap<String, EdgeReport>>>;

/// What an edge's batches report besides data, as of its last batch.
#[derive(Debug, Clone, Default)]
pub struct EdgeReport {
    /// When its last batch (data or heartbeat) arrived, Unix ms.
    pub seen_ms: i64,
    /// When its function figures last arrived, Unix ms, and the figures.
    pub functions: Option<(i64, Vec<millrace_shared::FunctionReport>)>,
    /// Its outbox as that batch left (`None` from edges before wire version 3).
    pub outbox: Option<millrace_shared::OutboxReport>,
}

impl ApiState {
    /// What a report runs on, to move onto a blocking thread: the dataset and a copy of the
    /// master data (the lock is not held while the report runs).
    pub(crate) fn dataset_and_master(&self) -> (Arc<Dataset>, Master) {
        (
            self.dataset.clone(),
            self.master.read().expect("master lock").clone(),
        )
    }
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

/// Runs blocking work (file I/O, Polars) off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// The router: every route of [`openapi::routes`], with `state`. Answers are gzipped for
/// clients that accept it (a week's state timeline is ~3 MB of JSON, the charting library 1 MB:
/// a tablet on the plant's Wi-Fi gets a fifth of that); server-sent events and small answers are
/// sent as they are.
pub fn app(state: ApiState) -> Router {
    use tower_http::compression::{CompressionLayer, CompressionLevel};
    let (router, _) = openapi::routes(state.cfg.http.max_batch_bytes).split_for_parts();
    router
        .with_state(state)
        .layer(CompressionLayer::new().quality(CompressionLevel::Fastest))
}

/// The API described as OpenAPI 3 (JSON), as `GET /api/v1/openapi.json` serves it.
pub fn openapi_document() -> &'static str {
    openapi::document()
}

/// Liveness: `ok` and the seconds since start.
#[utoipa::path(
    get,
    path = "/health",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The cloud is up", content_type = "application/json"))
)]
async fn health(State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "uptime_seconds": s.started.elapsed().as_secs() }))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    security(()),
    responses((status = 200, description = "Metrics", content_type = "text/plain"))
)]
async fn prometheus(State(s): State<ApiState>) -> impl IntoResponse {
    let sizes = s.dataset.sizes();
    for (table, (files, rows)) in sizes {
        metrics::gauge!("millrace_cloud_dataset_files", "table" => table.as_str())
            .set(files as f64);
        metrics::gauge!("millrace_cloud_dataset_rows", "table" => table.as_str()).set(rows as f64);
    }
    for (edge, l) in s.dataset.edges() {
        let gaps: u64 = l.gaps().iter().map(|(a, b)| b - a + 1).sum();
        metrics::gauge!("millrace_cloud_edge_items", "edge" => edge.clone()).set(l.items() as f64);
        metrics::gauge!("millrace_cloud_edge_gap_items", "edge" => edge.clone()).set(gaps as f64);
        metrics::gauge!("millrace_cloud_edge_dropped_items", "edge" => edge)
            .set(l.dropped_items() as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}
