//! The sync endpoint edges send their batches to, and the per-edge completeness report.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use millrace_shared::sync::CONTENT_TYPE;
use serde_json::json;

use super::auth::{Caller, edge_of};
use super::openapi::{ErrorBody, KeyRefused, SyncAckSchema};
use super::{ApiError, ApiState};
use crate::sync::SyncError;

fn refuse(reason: &'static str, e: ApiError) -> ApiError {
    metrics::counter!("millrace_cloud_sync_refused_total", "reason" => reason).increment(1);
    tracing::warn!(reason, error = %e, "sync batch refused");
    e
}

/// An edge's batch (the compact sync encoding, zstd): stored durably and once, then 200.
#[utoipa::path(
    post,
    path = "/api/v1/sync/batches",
    tag = "sync",
    security(("edgeToken" = [])),
    request_body(content = Vec<u8>, content_type = "application/x-millrace-batch", description = "A batch as `millrace_shared::SyncBatch::encode` writes it"),
    responses(
        (status = 200, description = "Stored (or held already)", body = SyncAckSchema),
        (status = 400, description = "Not a readable batch, or a wrong content type", body = ErrorBody),
        (status = 401, description = "No or an unknown edge token", body = ErrorBody),
        (status = 403, description = "The batch names another edge than the token's", body = ErrorBody),
        (status = 413, description = "The batch is too large", body = ErrorBody),
        (status = 503, description = "Storage unavailable: send it again later", body = ErrorBody),
    )
)]
pub(super) async fn sync_batch(
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
    let ds = s.dataset.clone();
    let token_edge = edge.clone();
    let received = tokio::task::spawn_blocking(move || {
        let now = chrono::Utc::now().timestamp_millis();
        crate::sync::receive(&ds, &token_edge, &body, max_raw, now)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let (ack, reports) = match received {
        Ok(r) => r,
        Err(e @ SyncError::Unreadable(_)) => return Err(refuse("bad_batch", e.into())),
        Err(e @ SyncError::WrongEdge { .. }) => return Err(refuse("wrong_edge", e.into())),
        Err(e @ SyncError::Dataset(_)) => {
            let reason = if e.is_retryable() {
                "storage_unavailable"
            } else {
                "storage_error"
            };
            return Err(refuse(reason, e.into()));
        }
    };
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
    record_reports(&s, &edge, reports);
    if ack.stored > 0 {
        s.commits.send_modify(|v| *v += 1);
    }
    Ok(Json(ack))
}

/// Keeps what a batch reported for `/api/v1/edges` (when the edge was seen, its outbox, its
/// function figures) and sets them as gauges (the function figures are the edge's counts since
/// it started: they go back to 0 when it restarts).
fn record_reports(s: &ApiState, edge: &str, batch: millrace_shared::SyncBatch) {
    let now = chrono::Utc::now().timestamp_millis();
    let mut all = s.edge_reports.lock().expect("reports lock");
    let r = all.entry(edge.to_owned()).or_default();
    r.seen_ms = now;
    r.outbox = batch.outbox;
    if let Some(o) = batch.outbox {
        let labels = [("edge", edge.to_owned())];
        metrics::gauge!("millrace_cloud_edge_outbox_waiting_items", &labels)
            .set(o.waiting_items as f64);
        let lag = o.oldest_waiting_ms.map_or(0, |t| (now - t).max(0));
        metrics::gauge!("millrace_cloud_edge_sync_lag_seconds", &labels).set(lag as f64 / 1000.0);
    }
    let functions = batch.functions;
    if functions.is_empty() {
        return;
    }
    for f in &functions {
        let labels = [("edge", edge.to_owned()), ("function", f.name.clone())];
        for (name, v) in [
            (
                "millrace_cloud_edge_function_invocations",
                f.invocations as f64,
            ),
            ("millrace_cloud_edge_function_failures", f.failures as f64),
            ("millrace_cloud_edge_function_skipped", f.skipped as f64),
            (
                "millrace_cloud_edge_function_lag_events",
                f.lag_events as f64,
            ),
            (
                "millrace_cloud_edge_function_lag_seconds",
                f.lag_ms as f64 / 1000.0,
            ),
        ] {
            metrics::gauge!(name, &labels).set(v);
        }
    }
    r.functions = Some((now, functions));
}

/// An edge is online while its last batch is younger than this: two and a half of the heartbeats
/// an idle edge sends each minute.
const EDGE_ONLINE_WITHIN_MS: i64 = 150_000;

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EdgesQuery {
    /// Include the full list of received ranges.
    #[serde(default)]
    ranges: bool,
}

/// Per edge: the items the cloud holds, the ranges the edge dropped under its quota, gaps, and
/// as of its last batch (data or the heartbeat an idle edge sends each minute): when it was seen
/// (`last_seen_ms`; `online` while that is under 150 s ago), its outbox (`outbox`: records waiting and the oldest one's time;
/// `sync_lag_ms`: how long that one had waited) and its functions' figures (invocations,
/// failures, lag).
#[utoipa::path(get, path = "/api/v1/edges", tag = "sync", params(EdgesQuery), responses(
    (status = 200, description = "`{\"edges\": [...]}`", content_type = "application/json"),
    (status = 400, description = "A bad parameter", body = ErrorBody), KeyRefused))]
pub(super) async fn edges(
    _c: Caller,
    State(s): State<ApiState>,
    q: Result<Query<EdgesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q?;
    let reports = s.edge_reports.lock().expect("reports lock").clone();
    let now = chrono::Utc::now().timestamp_millis();
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
            if let Some(r) = reports.get(&id) {
                v["last_seen_ms"] = json!(r.seen_ms);
                v["online"] = json!(now - r.seen_ms < EDGE_ONLINE_WITHIN_MS);
                if let Some((at, f)) = &r.functions {
                    v["functions"] = json!(f);
                    v["functions_reported_ms"] = json!(at);
                }
                if let Some(o) = r.outbox {
                    v["outbox"] = json!(o);
                    // How long the oldest record not yet in the cloud had waited when the
                    // edge's last batch left (0: caught up).
                    v["sync_lag_ms"] =
                        json!(o.oldest_waiting_ms.map_or(0, |t| (r.seen_ms - t).max(0)));
                }
            }
            v
        })
        .collect();
    Ok(Json(json!({ "edges": out })))
}
