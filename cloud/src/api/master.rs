//! Master data: the machines that sent data, ideal cycle times and the shift calendar.

use axum::Json;
use axum::extract::State;
use serde_json::json;

use super::auth::{Caller, Role};
use super::openapi::{ErrorBody, KeyRefused, MachineSpecSchema};
use super::{ApiError, ApiState, blocking};

/// Every machine that sent data, with its ideal cycle time.
#[utoipa::path(get, path = "/api/v1/machines", tag = "master", responses(
    (status = 200, description = "`{\"machines\": [...]}`", content_type = "application/json"), KeyRefused))]
pub(super) async fn machines(_c: Caller, State(s): State<ApiState>) -> Json<serde_json::Value> {
    let master = s.master.read().expect("master lock");
    let list: Vec<serde_json::Value> = s
        .dataset
        .machines()
        .into_iter()
        .map(|m| json!({ "machine": m, "ideal_cycle_time_ms": master.ideal_cycle_ms.get(&m) }))
        .collect();
    Json(json!({ "machines": list }))
}

/// Master data: ideal cycle times and the shift calendar.
#[utoipa::path(get, path = "/api/v1/master", tag = "master", responses(
    (status = 200, description = "Ideal cycle times per machine, the default and the calendar", content_type = "application/json"), KeyRefused))]
pub(super) async fn master(_c: Caller, State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(json!(*s.master.read().expect("master lock")))
}

/// Sets ideal cycle times (admin key).
#[utoipa::path(
    put,
    path = "/api/v1/master/machines",
    tag = "master",
    request_body = Vec<MachineSpecSchema>,
    responses(
        (status = 200, description = "`{\"updated\": n}`", content_type = "application/json"),
        (status = 400, description = "A bad machine or cycle time", body = ErrorBody),
        KeyRefused,
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 503, description = "Could not save: try again later", body = ErrorBody),
    )
)]
pub(super) async fn put_machines(
    Caller(role): Caller,
    State(s): State<ApiState>,
    body: Result<Json<Vec<millrace_shared::MachineSpec>>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if role != Role::Admin {
        return Err(ApiError::Forbidden(
            "changing master data needs an admin key".into(),
        ));
    }
    let Json(specs) = body?;
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
    let edits: Vec<(String, u32)> = specs
        .iter()
        .map(|m| (m.id.to_string(), m.ideal_cycle_time_ms))
        .collect();
    let (cfg, ds) = (s.cfg.clone(), s.dataset.clone());
    let saved = blocking(move || {
        crate::reports::Master::save_edits(&cfg, &ds, &edits)
            .map_err(|e| ApiError::Unavailable(format!("saving master data: {e}")))
    })
    .await?;
    *s.master.write().expect("master lock") = saved;
    Ok(Json(json!({ "updated": specs.len() })))
}
