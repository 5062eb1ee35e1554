//! The cloud's HTTP API: the sync endpoint for edges, data and report queries for users,
//! health and Prometheus metrics.
//!
//! Authentication: edges send `Authorization: Bearer <edge token>` to the sync endpoint; users
//! send a read or admin API key to `/api/v1/...`. Without configured keys the API serves
//! loopback only (checked at start) and needs no key.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use millrace_shared::sync::{CONTENT_TYPE, SYNC_PATH, SyncBatch};
use serde_json::json;

use crate::config::{CloudConfig, token_digest};
use crate::dataset::{Dataset, DatasetError};

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
    /// Sync requests refused.
    pub refused: Arc<AtomicU64>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

/// An API error: 4xx with a message for the client's mistakes, a logged 500 for ours.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad parameter or body.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Valid credentials, not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// Too big.
    #[error("{0}")]
    TooLarge(String),
    /// Temporarily unable (disk trouble): retry.
    #[error("{0}")]
    Unavailable(String),
    /// Our fault.
    #[error("internal error")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match &self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            Self::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m.clone()),
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, m.clone()),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m.clone()),
            Self::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m.clone()),
            Self::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m.clone()),
            Self::Internal(m) => {
                tracing::error!(error = %m, "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_owned(),
                )
            }
        };
        let mut r = (status, Json(json!({ "error": msg }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

impl From<DatasetError> for ApiError {
    fn from(e: DatasetError) -> Self {
        if e.is_retryable() {
            tracing::error!(error = %e, "dataset unavailable");
            Self::Unavailable(format!("storage unavailable, retry later: {e}"))
        } else {
            Self::Internal(e.to_string())
        }
    }
}

impl From<polars::prelude::PolarsError> for ApiError {
    fn from(e: polars::prelude::PolarsError) -> Self {
        Self::Internal(e.to_string())
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

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a user's key allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reports and data.
    Read,
    /// Also master data.
    Admin,
}

/// The caller's role, from the API key (extractor).
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Role);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, ApiError> {
        let http = &s.cfg.http;
        if http.read_keys.is_empty() && http.admin_keys.is_empty() {
            // Loopback only (checked at start): no keys needed.
            return Ok(Caller(Role::Admin));
        }
        // `?api_key=` is for EventSource, which cannot set headers.
        let from_query = parts.uri.query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("api_key="))
                .map(str::to_owned)
        });
        let key = bearer(&parts.headers)
            .map(str::to_owned)
            .or(from_query)
            .ok_or_else(|| {
                ApiError::Unauthorized("missing API key: send `Authorization: Bearer <key>`".into())
            })?;
        if http
            .admin_keys
            .iter()
            .any(|k| same(k.as_bytes(), key.as_bytes()))
        {
            return Ok(Caller(Role::Admin));
        }
        if http
            .read_keys
            .iter()
            .any(|k| same(k.as_bytes(), key.as_bytes()))
        {
            return Ok(Caller(Role::Read));
        }
        Err(ApiError::Unauthorized("API key not accepted".into()))
    }
}

/// The router.
pub fn app(state: ApiState) -> Router {
    let max_body = state.cfg.http.max_batch_bytes;
    Router::new()
        .route(SYNC_PATH, post(sync_batch))
        .layer(DefaultBodyLimit::max(max_body))
        .route("/api/v1/edges", get(edges))
        .route("/api/v1/telemetry", get(crate::reports::telemetry_rows))
        .route("/api/v1/events", get(crate::reports::event_rows))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .with_state(state)
}

async fn health(State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "uptime_seconds": s.started.elapsed().as_secs() }))
}

async fn prometheus(State(s): State<ApiState>) -> impl IntoResponse {
    let sizes = s.dataset.sizes();
    for (table, (files, rows)) in sizes {
        metrics::gauge!("millrace_cloud_dataset_files", "table" => table.as_str())
            .set(files as f64);
        metrics::gauge!("millrace_cloud_dataset_rows", "table" => table.as_str()).set(rows as f64);
    }
    for (edge, l) in s.dataset.edges() {
        let gaps: u64 = l.gaps().iter().map(|(a, b)| b - a + 1).sum();
        metrics::gauge!("millrace_cloud_edge_items", "edge" => edge.clone()).set(l.items as f64);
        metrics::gauge!("millrace_cloud_edge_gap_items", "edge" => edge.clone()).set(gaps as f64);
        metrics::gauge!("millrace_cloud_edge_dropped_items", "edge" => edge)
            .set(l.dropped_items() as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

fn refuse(s: &ApiState, reason: &'static str, e: ApiError) -> ApiError {
    s.refused.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("millrace_cloud_sync_refused_total", "reason" => reason).increment(1);
    tracing::warn!(reason, error = %e, "sync batch refused");
    e
}

/// The edge whose token this is.
fn edge_of(s: &ApiState, headers: &HeaderMap) -> Option<String> {
    let token = bearer(headers)?;
    let digest = token_digest(token);
    let mut found = None;
    // Look at every edge so the time taken does not tell which digest matched.
    for (id, e) in &s.cfg.edges {
        if same(
            e.token_sha256.to_ascii_lowercase().as_bytes(),
            digest.as_bytes(),
        ) {
            found = Some(id.clone());
        }
    }
    found
}

/// `POST /api/v1/sync/batches`: an edge's batch; 200 only once it is durable.
async fn sync_batch(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<millrace_shared::SyncAck>, ApiError> {
    let Some(edge) = edge_of(&s, &headers) else {
        return Err(refuse(
            &s,
            "unauthorized",
            ApiError::Unauthorized(
                "missing or unknown edge token: send `Authorization: Bearer <token>` as configured in [edges]".into(),
            ),
        ));
    };
    if let Some(ct) = headers.get(header::CONTENT_TYPE)
        && ct.as_bytes() != CONTENT_TYPE.as_bytes()
    {
        return Err(refuse(
            &s,
            "content_type",
            ApiError::BadRequest(format!(
                "content type {:?} is not {CONTENT_TYPE}",
                String::from_utf8_lossy(ct.as_bytes())
            )),
        ));
    }
    let max_raw = s.cfg.http.max_batch_raw_bytes;
    let started = Instant::now();
    let wire = body.len() as u64;
    let batch = match tokio::task::spawn_blocking(move || SyncBatch::decode(&body, max_raw)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = matches!(e, millrace_shared::WireError::TooLarge(_));
            let msg = format!("batch not readable: {e}");
            return Err(refuse(
                &s,
                "bad_batch",
                if too_large {
                    ApiError::TooLarge(msg)
                } else {
                    ApiError::BadRequest(msg)
                },
            ));
        }
        Err(e) => return Err(ApiError::Internal(e.to_string())),
    };
    if batch.edge != edge {
        return Err(refuse(
            &s,
            "wrong_edge",
            ApiError::Forbidden(format!(
                "this token belongs to edge `{edge}`, the batch says `{}`",
                batch.edge
            )),
        ));
    }
    let ds = s.dataset.clone();
    let ack = blocking(move || {
        let now = chrono::Utc::now().timestamp_millis();
        Ok(ds.commit(&batch.edge, &batch.items, &batch.dropped, now)?)
    })
    .await?;
    metrics::counter!("millrace_cloud_sync_batches_total", "edge" => edge.clone()).increment(1);
    metrics::counter!("millrace_cloud_sync_items_total", "edge" => edge.clone())
        .increment(ack.stored);
    metrics::counter!("millrace_cloud_sync_points_total", "edge" => edge.clone())
        .increment(ack.points);
    metrics::counter!("millrace_cloud_sync_duplicates_total", "edge" => edge.clone())
        .increment(ack.duplicates);
    metrics::counter!("millrace_cloud_sync_wire_bytes_total", "edge" => edge.clone())
        .increment(wire);
    metrics::histogram!("millrace_cloud_sync_commit_seconds")
        .record(started.elapsed().as_secs_f64());
    if ack.duplicates > 0 {
        tracing::info!(edge = %edge, duplicates = ack.duplicates, stored = ack.stored, "batch partly or wholly held already (re-sent); duplicates not stored");
    }
    s.commits.send_modify(|v| *v += 1);
    Ok(Json(ack))
}

#[derive(Debug, serde::Deserialize)]
struct EdgesQuery {
    /// Include the full list of received ranges.
    #[serde(default)]
    ranges: bool,
}

/// `GET /api/v1/edges`: per edge, what the cloud holds, what was dropped at the edge, and gaps.
async fn edges(
    _c: Caller,
    State(s): State<ApiState>,
    q: Result<Query<EdgesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let out: Vec<serde_json::Value> = s
        .dataset
        .edges()
        .into_iter()
        .map(|(id, l)| {
            let gaps = l.gaps();
            let r = l.received.ranges();
            let mut v = json!({
                "edge": id,
                "items": l.items,
                "batches": l.batches,
                "last_commit_ms": l.last_commit_ms,
                "first_seq": r.first().map(|x| x.0),
                "last_seq": r.last().map(|x| x.1),
                "received_range_count": r.len(),
                "dropped_at_edge": l.dropped.ranges(),
                "dropped_items": l.dropped_items(),
                "gaps": gaps,
                "gap_items": gaps.iter().map(|(a, b)| b - a + 1).sum::<u64>(),
            });
            if q.ranges {
                v["received"] = json!(r);
            }
            v
        })
        .collect();
    Ok(Json(json!({ "edges": out })))
}
