//! The edge's HTTP API: health, Prometheus metrics, series, points (with downsampling),
//! events and dead letters. See `docs/api.md`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use millrace_shared::{EventKind, MachineId, TopicError};
use serde::Deserialize;
use serde_json::json;

use crate::functions::{DeployRequest, FunctionError, Functions, LogFilter, Outcome, TriggerKind};
use crate::ingest::IngestStats;
use crate::store::{Bucket, Store, StoreError};

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct ApiState {
    /// The store.
    pub(crate) store: Arc<Store>,
    /// Ingest counters.
    pub(crate) ingest: Arc<IngestStats>,
    /// Devices connected.
    pub(crate) connections: Arc<dyn Fn() -> i64 + Send + Sync>,
    /// Prometheus renderer.
    pub(crate) metrics: PrometheusHandle,
    /// Accepted API keys (empty: no key needed; the API then only listens on loopback).
    pub(crate) api_keys: Arc<Vec<String>>,
    /// Most points one query may return.
    pub(crate) max_points: usize,
    /// This edge's id.
    pub(crate) edge_id: String,
    /// When the edge started.
    pub(crate) started: Instant,
    /// Sync counters (`None`: sync is off).
    pub(crate) sync: Option<(Arc<crate::sync::SyncStats>, String)>,
    /// The functions service (`None`: functions are off).
    pub(crate) functions: Option<Functions>,
    /// The Sparkplug B host (`None`: Sparkplug is off).
    pub(crate) sparkplug: Option<Arc<crate::sparkplug::Host>>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("edge_id", &self.edge_id)
            .field("api_keys", &self.api_keys.len())
            .finish_non_exhaustive()
    }
}

/// Errors a handler returns: the client's mistakes as 4xx with a message, ours as a logged 500.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// A parameter is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the thing's state.
    #[error("{0}")]
    Conflict(String),
    /// Busy: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// No or a wrong API key.
    #[error("missing or wrong API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// Our fault.
    #[error("internal error")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<FunctionError> for ApiError {
    fn from(e: FunctionError) -> Self {
        match e {
            FunctionError::Invalid(_) => Self::BadRequest(e.to_string()),
            FunctionError::NotFound(_) => Self::NotFound(format!("{e}: see /api/v1/functions")),
            FunctionError::Disabled(_) | FunctionError::Conflict(_) => {
                Self::Conflict(e.to_string())
            }
            FunctionError::Busy(_) => Self::Unavailable(e.to_string()),
            FunctionError::Store(_) | FunctionError::Runtime(_) => Self::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Internal(detail) => {
                tracing::error!(error = %detail, "API request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        metrics::counter!("millrace_edge_http_errors_total", "status" => status.as_str().to_owned()).increment(1);
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// The router, separate from serving so that tests can call it with `oneshot`.
pub(crate) fn app(state: ApiState) -> Router {
    let api = Router::new()
        .route("/status", get(status))
        .route("/series", get(series))
        .route("/points", get(points))
        .route("/machines", get(machines))
        .route("/events", get(events))
        .route("/dead-letters", get(dead_letters))
        .route("/sync", get(sync_status))
        .route("/functions", get(fn_list))
        .route(
            "/functions/{name}",
            get(fn_get)
                .put(fn_deploy)
                .delete(fn_delete)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_DEPLOY_BODY)),
        )
        .route("/functions/{name}/enable", post(fn_enable))
        .route("/functions/{name}/disable", post(fn_disable))
        .route("/functions/{name}/invoke", post(fn_invoke))
        .route("/functions/{name}/kv", get(fn_kv))
        .route(
            "/functions/{name}/replay",
            post(fn_replay).delete(fn_cancel_replay),
        )
        .route("/sparkplug/nodes", get(sparkplug_nodes))
        .route(
            "/sparkplug/nodes/{group}/{node}/rebirth",
            post(sparkplug_rebirth),
        )
        .route("/invocations", get(invocations))
        .route("/alerts", get(alerts))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .nest("/api/v1", api)
        .fallback(|| async { ApiError::NotFound("no such endpoint: see docs/api.md".into()) })
        .with_state(state)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(
    State(s): State<ApiState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !s.api_keys.is_empty() {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !s
            .api_keys
            .iter()
            .any(|k| constant_time_eq(k.as_bytes(), given.as_bytes()))
        {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(req).await)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}

async fn health(State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "edge_id": s.edge_id, "uptime_s": s.started.elapsed().as_secs() }))
}

async fn prometheus(State(s): State<ApiState>) -> impl IntoResponse {
    // Read at scrape time: a store that stopped taking writes shows even while the
    // maintenance pass (which reports the rest of the store's gauges) cannot write either.
    let store = s.store.clone();
    if let Ok(Ok(h)) = tokio::task::spawn_blocking(move || store.write_health()).await {
        metrics::gauge!("millrace_edge_store_background_errors").set(h.background_errors as f64);
        metrics::gauge!("millrace_edge_store_writes_stopped")
            .set(f64::from(u8::from(h.writes_stopped)));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn status(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let store = s.store.clone();
    let (sizes, health) =
        blocking(move || Ok((store.size_by_cf()?, store.write_health()?))).await?;
    let i = &s.ingest;
    Ok(Json(json!({
        "edge_id": s.edge_id,
        "mqtt_connections": (s.connections)(),
        "ingest": {
            "events": i.events.load(Ordering::Relaxed),
            "points": i.points.load(Ordering::Relaxed),
            "dead_letters": i.dead_letters.load(Ordering::Relaxed),
            "duplicates": i.duplicates.load(Ordering::Relaxed),
            "batches": i.batches.load(Ordering::Relaxed),
            "bytes": i.bytes.load(Ordering::Relaxed),
        },
        "store_bytes": sizes,
        "store": health,
    })))
}

/// The outbox and the sync client: what waits, how old the oldest item is, what was sent.
async fn sync_status(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let Some((stats, cloud_url)) = s.sync.clone() else {
        return Ok(Json(json!({ "enabled": false })));
    };
    let store = s.store.clone();
    let outbox = blocking(move || Ok(store.outbox_status()?)).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let lag = outbox
        .as_ref()
        .and_then(|o| o.oldest_stored_ms)
        .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
    Ok(Json(json!({
        "enabled": true,
        "cloud_url": cloud_url,
        "outbox": outbox,
        "lag_seconds": lag,
        "sent": stats.figures(),
    })))
}

async fn series(State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!({ "series": s.store.series() }))
}

async fn machines(State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!({ "machines": s.store.machines() }))
}

/// Parses a time parameter ([`millrace_shared::time::parse_time`]); a bad one is a 400.
fn parse_time(name: &str, v: &str) -> Result<i64, ApiError> {
    millrace_shared::time::parse_time(name, v).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn range(from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), ApiError> {
    let to = match to {
        Some(t) => parse_time("to", t)?,
        None => chrono::Utc::now().timestamp_millis() + 1,
    };
    let from = match from {
        Some(f) => parse_time("from", f)?,
        None => to - 3_600_000,
    };
    if from >= to {
        return Err(ApiError::BadRequest(format!(
            "`from` ({from}) must be before `to` ({to})"
        )));
    }
    Ok((from, to))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PointsQuery {
    series: Option<String>,
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
}

async fn points(
    State(s): State<ApiState>,
    q: Result<Query<PointsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let name = q.series.ok_or_else(|| {
        ApiError::BadRequest(
            "`series` is required: site/line/machine/metric (see /api/v1/series)".into(),
        )
    })?;
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let step = match q.step.as_deref() {
        None => None,
        Some(v) => {
            let ms = v
                .parse::<i64>()
                .ok()
                .or_else(|| humantime::parse_duration(v).ok().map(|d| d.as_millis() as i64))
                .filter(|ms| *ms > 0)
                .ok_or_else(|| ApiError::BadRequest(format!("`step` = `{v}` is not a positive duration: expected e.g. 10s, 1m, 1h or milliseconds")))?;
            Some(ms)
        }
    };
    if let Some(step) = step {
        let buckets = (to - from) / step;
        if buckets as usize > s.max_points {
            return Err(ApiError::BadRequest(format!(
                "{buckets} steps is more than the limit of {}: use a larger `step`",
                s.max_points
            )));
        }
    }
    let store = s.store.clone();
    let lookup = name.clone();
    let pts = blocking(move || Ok(store.points(&lookup, from, to)?)).await?;
    let pts =
        pts.ok_or_else(|| ApiError::NotFound(format!("no series `{name}`: see /api/v1/series")))?;
    match step {
        None => {
            if pts.len() > s.max_points {
                return Err(ApiError::BadRequest(format!(
                    "the range holds {} points, more than the limit of {}: narrow it or downsample with `step`",
                    pts.len(),
                    s.max_points
                )));
            }
            let points: Vec<[serde_json::Value; 2]> =
                pts.iter().map(|(t, v)| [json!(t), json!(v)]).collect();
            Ok(Json(
                json!({ "series": name, "from": from, "to": to, "points": points }),
            ))
        }
        Some(step) => Ok(Json(
            json!({ "series": name, "from": from, "to": to, "step_ms": step, "buckets": downsample(&pts, from, step) }),
        )),
    }
}

/// min/max/mean/count per step, for steps that hold points.
pub(crate) fn downsample(points: &[(i64, f64)], from: i64, step: i64) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = vec![];
    for &(t, v) in points {
        let start = from + (t - from).div_euclid(step) * step;
        match out.last_mut() {
            Some(b) if b.ts_ms == start => {
                b.count += 1;
                b.min = b.min.min(v);
                b.max = b.max.max(v);
                b.mean += v;
            }
            _ => out.push(Bucket {
                ts_ms: start,
                count: 1,
                min: v,
                max: v,
                mean: v,
            }),
        }
    }
    for b in &mut out {
        b.mean /= b.count as f64;
    }
    out
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    machine: Option<String>,
    from: Option<String>,
    to: Option<String>,
    kind: Option<String>,
    limit: Option<String>,
}

fn parse_limit(v: Option<&str>) -> Result<usize, ApiError> {
    match v {
        None => Ok(1000),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100_000).contains(n))
            .ok_or_else(|| {
                ApiError::BadRequest(format!("`limit` = `{v}` is not a number from 1 to 100000"))
            }),
    }
}

async fn events(
    State(s): State<ApiState>,
    q: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let m = q.machine.ok_or_else(|| {
        ApiError::BadRequest(
            "`machine` is required: site/line/machine (see /api/v1/machines)".into(),
        )
    })?;
    let machine: MachineId = m.parse().map_err(|e| match e {
        TopicError::MachinePath { .. } => {
            ApiError::BadRequest(format!("`machine` = `{m}` is not site/line/machine"))
        }
        e => ApiError::BadRequest(format!("`machine`: {e}")),
    })?;
    let kind = match q.kind.as_deref() {
        None => None,
        Some(k) => Some(EventKind::parse(k).filter(|k| *k != EventKind::Telemetry).ok_or_else(|| {
            ApiError::BadRequest(format!("`kind` = `{k}` is not one of state, part, operator (telemetry is under /api/v1/points)"))
        })?),
    };
    let (from, to) = range(q.from.as_deref(), q.to.as_deref())?;
    let limit = parse_limit(q.limit.as_deref())?;
    let store = s.store.clone();
    let name = machine.to_string();
    let evs = blocking(move || Ok(store.events(&machine, from, to, kind, limit)?))
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no events from machine `{name}`: see /api/v1/machines"
            ))
        })?;
    Ok(Json(json!({ "events": evs })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadQuery {
    from: Option<String>,
    limit: Option<String>,
}

async fn dead_letters(
    State(s): State<ApiState>,
    q: Result<Query<DeadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let from = q
        .from
        .as_deref()
        .map(|f| parse_time("from", f))
        .transpose()?
        .unwrap_or(i64::MIN);
    let limit = parse_limit(q.limit.as_deref())?;
    let store = s.store.clone();
    let dl = blocking(move || Ok(store.dead_letters(from, limit)?)).await?;
    Ok(Json(json!({ "dead_letters": dl })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampling_buckets() {
        let pts = [(0, 1.0), (500, 3.0), (1000, 10.0), (3500, 4.0)];
        let b = downsample(&pts, 0, 1000);
        assert_eq!(b.len(), 3);
        assert_eq!(
            (b[0].count, b[0].min, b[0].max, b[0].mean),
            (2, 1.0, 3.0, 2.0)
        );
        assert_eq!(b[2].ts_ms, 3000);
    }

    #[test]
    fn times_and_keys() {
        assert_eq!(
            parse_time("from", "1767600000000").unwrap(),
            1_767_600_000_000
        );
        assert_eq!(
            parse_time("from", "2026-01-05T08:00:00Z").unwrap(),
            1_767_600_000_000
        );
        assert!(
            parse_time("from", "yesterday")
                .unwrap_err()
                .to_string()
                .contains("`from` = `yesterday` is not a time")
        );
        assert!(range(Some("10"), Some("5")).is_err());
        let two_hours_ago = parse_time("from", "-2h").unwrap();
        assert!((chrono::Utc::now().timestamp_millis() - two_hours_ago - 7_200_000).abs() < 60_000);
        assert!(
            constant_time_eq(b"abc", b"abc")
                && !constant_time_eq(b"abc", b"abd")
                && !constant_time_eq(b"ab", b"abc")
        );
    }
}

/// Largest deploy request body (a module of `functions.max_module_bytes` in base64 fits).
const MAX_DEPLOY_BODY: usize = 12 << 20;

fn functions(s: &ApiState) -> Result<&Functions, ApiError> {
    s.functions.as_ref().ok_or_else(|| {
        ApiError::Conflict("functions are disabled on this edge (functions.enabled = false)".into())
    })
}

async fn fn_list(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let f = functions(&s)?.clone();
    let list = blocking(move || Ok(f.list()?)).await?;
    Ok(Json(json!({ "functions": list })))
}

async fn fn_get(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let f = functions(&s)?.clone();
    Ok(Json(blocking(move || Ok(f.info(&name)?)).await?))
}

async fn fn_deploy(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let f = functions(&s)?.clone();
    let req: DeployRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!(
            "deploy request: {e} (expected JSON: module_base64 or module_wat, topics, schedule, timeout_ms, memory_mib, concurrency, queue, enabled, description)"
        ))
    })?;
    let (spec, created) = blocking(move || Ok(f.deploy(&name, req)?)).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(spec)).into_response())
}

async fn fn_delete(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    let f = functions(&s)?.clone();
    blocking(move || Ok(f.delete(&name)?)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn fn_enable(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<crate::functions::FunctionSpec>, ApiError> {
    let f = functions(&s)?.clone();
    Ok(Json(
        blocking(move || Ok(f.set_enabled(&name, true)?)).await?,
    ))
}

async fn fn_disable(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<crate::functions::FunctionSpec>, ApiError> {
    let f = functions(&s)?.clone();
    Ok(Json(
        blocking(move || Ok(f.set_enabled(&name, false)?)).await?,
    ))
}

fn sparkplug(s: &ApiState) -> Result<&Arc<crate::sparkplug::Host>, ApiError> {
    s.sparkplug.as_ref().ok_or_else(|| {
        ApiError::Conflict("the Sparkplug host is off (sparkplug.enabled = false)".into())
    })
}

/// Every Sparkplug node seen since start: online or not, its birth's `bdSeq`, sequence gaps,
/// rebirth requests, and its devices and metrics (stale once the node or device is offline).
async fn sparkplug_nodes(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let nodes = sparkplug(&s)?.status();
    Ok(Json(json!({ "nodes": nodes })))
}

/// Sends `NCMD Node Control/Rebirth` to a node now.
async fn sparkplug_rebirth(
    State(s): State<ApiState>,
    axum::extract::Path((group, node)): axum::extract::Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let now = chrono::Utc::now().timestamp_millis();
    match sparkplug(&s)?.rebirth(&group, &node, now) {
        None => Err(ApiError::NotFound(format!(
            "no Sparkplug node `{group}/{node}` has been seen: see /api/v1/sparkplug/nodes"
        ))),
        Some(false) => Err(ApiError::Unavailable(
            "the broker's in-process publish queue is full: try again".into(),
        )),
        Some(true) => Ok(Json(json!({
            "group": group,
            "node": node,
            "sent": format!("{}/{group}/NCMD/{node}", crate::sparkplug::NAMESPACE),
        }))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvokeQuery {
    topic: Option<String>,
}

/// Runs a function by hand with the request body as payload; answers with the invocation
/// record (200 whatever the outcome: the record says how it ended).
async fn fn_invoke(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    q: Result<Query<InvokeQuery>, axum::extract::rejection::QueryRejection>,
    body: bytes::Bytes,
) -> Result<Json<crate::functions::InvocationRecord>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let f = functions(&s)?;
    Ok(Json(f.invoke(&name, q.topic, body.to_vec()).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayQuery {
    from: Option<String>,
    to: Option<String>,
}

/// Starts a replay of the function over stored history `[from, to)` (`to` defaults to now);
/// answers 202 with its status.
async fn fn_replay(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    q: Result<Query<ReplayQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(StatusCode, Json<crate::functions::ReplayStatus>), ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let from = q.from.as_deref().ok_or_else(|| {
        ApiError::BadRequest(
            "give `from` (Unix ms, RFC 3339 or a duration before now such as -7d)".into(),
        )
    })?;
    let from = parse_time("from", from)?;
    let to = q.to.as_deref().map(|t| parse_time("to", t)).transpose()?;
    let f = functions(&s)?.clone();
    let status = blocking(move || Ok(f.replay(&name, from, to)?)).await?;
    Ok((StatusCode::ACCEPTED, Json(status)))
}

/// Cancels the function's running replay; answers with its status.
async fn fn_cancel_replay(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<crate::functions::ReplayStatus>, ApiError> {
    let f = functions(&s)?.clone();
    Ok(Json(blocking(move || Ok(f.cancel_replay(&name)?)).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KvQuery {
    prefix: Option<String>,
    limit: Option<String>,
}

/// A function's key-value state: keys (UTF-8, lossy) and values (base64, and as text when
/// they are UTF-8), 100 entries by default.
async fn fn_kv(
    State(s): State<ApiState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    q: Result<Query<KvQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    use base64::Engine as _;
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = log_limit(q.limit.as_deref())?;
    let f = functions(&s)?.clone();
    let prefix = q.prefix.unwrap_or_default();
    let entries = blocking(move || Ok(f.kv(&name, prefix.as_bytes(), limit)?)).await?;
    let entries: Vec<serde_json::Value> = entries
        .into_iter()
        .map(|(k, v)| {
            let mut e = json!({
                "key": String::from_utf8_lossy(&k),
                "value_base64": base64::engine::general_purpose::STANDARD.encode(&v),
            });
            if let Ok(text) = std::str::from_utf8(&v) {
                e["value"] = json!(text);
            }
            e
        })
        .collect();
    Ok(Json(json!({ "entries": entries })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvocationsQuery {
    function: Option<String>,
    outcome: Option<String>,
    trigger: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
}

/// The time range of a log query: everything when neither end is given.
fn log_range(from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), ApiError> {
    match (from, to) {
        (None, None) => Ok((i64::MIN, i64::MAX)),
        (f, t) => range(f, t),
    }
}

/// A log query's `limit`, 100 by default.
fn log_limit(limit: Option<&str>) -> Result<usize, ApiError> {
    limit.map_or(Ok(100), |l| parse_limit(Some(l)))
}

/// Stored JSON records as values (a record that does not parse is skipped).
fn json_rows(rows: &[Vec<u8>]) -> Vec<serde_json::Value> {
    rows.iter()
        .filter_map(|r| serde_json::from_slice(r).ok())
        .collect()
}

async fn invocations(
    State(s): State<ApiState>,
    q: Result<Query<InvocationsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let outcome = q
        .outcome
        .as_deref()
        .map(|o| {
            Outcome::parse(o).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "`outcome` = `{o}` is not one of ok, error, trap, timeout, memory"
                ))
            })
        })
        .transpose()?;
    let trigger = q
        .trigger
        .as_deref()
        .map(|t| {
            TriggerKind::parse(t).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "`trigger` = `{t}` is not one of topic, schedule, manual, replay"
                ))
            })
        })
        .transpose()?;
    let (from, to) = log_range(q.from.as_deref(), q.to.as_deref())?;
    let limit = log_limit(q.limit.as_deref())?;
    let filter = LogFilter {
        from_ms: Some(from),
        to_ms: Some(to),
        function: q.function,
        outcome,
        trigger,
    };
    let store = s.store.clone();
    let rows = blocking(move || Ok(store.invocations(from, limit, |r| filter.keep(r))?)).await?;
    let rows = json_rows(&rows);
    Ok(Json(json!({ "invocations": rows })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsQuery {
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
}

async fn alerts(
    State(s): State<ApiState>,
    q: Result<Query<AlertsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (from, to) = log_range(q.from.as_deref(), q.to.as_deref())?;
    let limit = log_limit(q.limit.as_deref())?;
    let store = s.store.clone();
    let rows = blocking(move || Ok(store.alerts(from, to, limit)?)).await?;
    let rows = json_rows(&rows);
    Ok(Json(json!({ "alerts": rows })))
}
