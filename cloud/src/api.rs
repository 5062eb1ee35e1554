//! The cloud's HTTP API: the sync endpoint for edges, data and report queries for users,
//! health and Prometheus metrics.
//!
//! Authentication: edges send `Authorization: Bearer <edge token>` to the sync endpoint; users
//! send a read or admin API key to `/api/v1/...`. Without configured keys the API serves
//! loopback only (checked at start) and needs no key.

use std::sync::Arc;
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
    /// Master data (config, then edits through the API, persisted in the data directory).
    pub master: Arc<std::sync::RwLock<crate::factory::Master>>,
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
        .route("/api/v1/reports/oee", get(crate::reports::oee_report))
        .route(
            "/api/v1/reports/production",
            get(crate::reports::production_report),
        )
        .route(
            "/api/v1/reports/downtime",
            get(crate::reports::downtime_report),
        )
        .route(
            "/api/v1/reports/telemetry",
            get(crate::reports::telemetry_report),
        )
        .route("/api/v1/machines", get(machines))
        .route("/api/v1/live", get(live))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/", get(dashboard))
        .route("/api/v1/master", get(master))
        .route("/api/v1/master/machines", axum::routing::put(put_machines))
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

fn refuse(reason: &'static str, e: ApiError) -> ApiError {
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
        return Err(refuse("unauthorized",
            ApiError::Unauthorized(
                "missing or unknown edge token: send `Authorization: Bearer <token>` as configured in [edges]".into(),
            ),
        ));
    };
    if let Some(ct) = headers.get(header::CONTENT_TYPE)
        && ct.as_bytes() != CONTENT_TYPE.as_bytes()
    {
        return Err(refuse(
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
                "items": l.items(),
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

/// `GET /api/v1/machines`: every machine that sent data, with its ideal cycle time.
async fn machines(_c: Caller, State(s): State<ApiState>) -> Json<serde_json::Value> {
    let master = s.master.read().expect("master lock");
    let list: Vec<serde_json::Value> = s
        .dataset
        .machines()
        .into_iter()
        .map(|m| json!({ "machine": m, "ideal_cycle_time_ms": master.ideal_cycle_ms.get(&m) }))
        .collect();
    Json(json!({ "machines": list }))
}

/// `GET /api/v1/master`: ideal cycle times and the shift calendar.
async fn master(_c: Caller, State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!(*s.master.read().expect("master lock")))
}

/// `PUT /api/v1/master/machines` (admin): sets ideal cycle times,
/// `[{"site","line","machine","ideal_cycle_time_ms"}]`.
async fn put_machines(
    Caller(role): Caller,
    State(s): State<ApiState>,
    body: Result<Json<Vec<millrace_shared::MachineSpec>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if role != Role::Admin {
        return Err(ApiError::Forbidden(
            "changing master data needs an admin key".into(),
        ));
    }
    let Json(specs) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    for m in &specs {
        m.id.validate()
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if m.ideal_cycle_time_ms == 0 {
            return Err(ApiError::BadRequest(format!(
                "{}: ideal_cycle_time_ms must be above 0",
                m.id
            )));
        }
    }
    let snapshot = {
        let mut master = s.master.write().expect("master lock");
        for m in &specs {
            master
                .ideal_cycle_ms
                .insert(m.id.to_string(), m.ideal_cycle_time_ms);
        }
        master.clone()
    };
    let path = s.cfg.data_dir.join("master.json");
    blocking(move || {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&snapshot).expect("serializes"),
        )
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| ApiError::Unavailable(format!("saving master data: {e}")))
    })
    .await?;
    Ok(Json(json!({ "updated": specs.len() })))
}

/// `GET /`: the live dashboard (one static page; data comes from `/api/v1/live`).
async fn dashboard() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("dashboard.html"),
    )
}

/// A KPI snapshot of the last 24 hours: OEE per line, production per hour, downtime Pareto.
fn snapshot(ds: &Dataset, master: &crate::factory::Master) -> Result<serde_json::Value, ApiError> {
    use crate::factory::{Level, Period};
    let now = chrono::Utc::now().timestamp_millis();
    let sel = crate::reports::Selection {
        from_ms: now - 86_400_000,
        to_ms: now + 1,
        entity: None,
        sites: None,
    };
    let lines = crate::factory::oee(ds, master, &sel, Level::Line, Period::Total)?;
    let mut all = millrace_shared::Tally::default();
    for r in &lines {
        all.merge(&r.kpis.tally);
    }
    let total: u64 = all.stop_time_by_reason.values().sum();
    let mut pareto: Vec<(String, u64)> = all.stop_time_by_reason.clone().into_iter().collect();
    pareto.sort_by_key(|r| std::cmp::Reverse(r.1));
    let prod = crate::factory::production(ds, &sel, Level::Site, "1h")?;
    let mut per_hour: std::collections::BTreeMap<i64, i64> = Default::default();
    if prod.height() > 0 {
        let w = prod
            .column("window_start")?
            .as_materialized_series()
            .cast(&polars::prelude::DataType::Int64)?;
        let t = prod
            .column("total")?
            .as_materialized_series()
            .cast(&polars::prelude::DataType::Int64)?;
        for (w, t) in w.i64()?.iter().zip(t.i64()?.iter()) {
            *per_hour.entry(w.unwrap_or(0)).or_default() += t.unwrap_or(0);
        }
    }
    Ok(json!({
        "at_ms": now,
        "parts": all.total(),
        "lines": lines.iter().map(|r| json!({
            "entity": r.entity,
            "oee": r.kpis.oee,
            "availability": r.kpis.availability,
            "performance": r.kpis.performance,
            "quality": r.kpis.quality,
            "total": r.kpis.total,
            "scrap": r.kpis.tally.scrap,
        })).collect::<Vec<_>>(),
        "production": per_hour.into_iter().map(|(w, t)| json!({ "window_start": w, "total": t })).collect::<Vec<_>>(),
        "pareto": pareto.into_iter().map(|(reason, ms)| json!({
            "reason": reason,
            "ms": ms,
            "share": if total > 0 { ms as f64 / total as f64 } else { 0.0 },
        })).collect::<Vec<_>>(),
    }))
}

/// `GET /api/v1/live`: server-sent events, one `snapshot` at once and one after data arrives
/// (at most one a second).
async fn live(
    _c: Caller,
    State(s): State<ApiState>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let rx = s.commits.subscribe();
    let stream = futures_util::stream::unfold((s, rx, true), |(s, mut rx, first)| async move {
        if !first {
            rx.changed().await.ok()?;
            // Let a burst of commits settle into one snapshot.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            rx.borrow_and_update();
        }
        let (ds, master) = (
            s.dataset.clone(),
            s.master.read().expect("master lock").clone(),
        );
        let ev = match blocking(move || snapshot(&ds, &master)).await {
            Ok(v) => Event::default().event("snapshot").data(v.to_string()),
            Err(e) => Event::default().event("error").data(e.to_string()),
        };
        Some((Ok(ev), (s, rx, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `GET /api/v1/openapi.json`: the API described as OpenAPI 3.
async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}
