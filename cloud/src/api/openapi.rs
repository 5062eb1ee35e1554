//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the
//! parameter and body types they use: the router is built from the same list
//! ([`routes`]), so a route cannot be served without being documented.

use std::sync::OnceLock;

use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{ApiState, data, live, master, sync};

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ErrorBody {
    /// What went wrong, for people (4xx: what to change; 500: `internal error`).
    pub(super) error: String,
}

/// The answers of a data or report query that went wrong.
#[derive(utoipa::IntoResponses)]
#[allow(
    dead_code,
    reason = "describes answers for the document; `ApiError` builds them"
)]
pub(super) enum QueryFailed {
    /// A bad parameter.
    #[response(
        status = 400,
        description = "A bad parameter (the message says which and why)"
    )]
    BadRequest(ErrorBody),
    /// No key, or one not accepted.
    #[response(status = 401, description = "No or an unknown API key")]
    Unauthorized(ErrorBody),
    /// An unknown machine.
    #[response(
        status = 404,
        description = "A machine that never sent data and is not in the master data"
    )]
    NotFound(ErrorBody),
}

/// The answer to a request without an accepted API key.
#[derive(utoipa::IntoResponses)]
#[allow(
    dead_code,
    reason = "describes answers for the document; `ApiError` builds them"
)]
pub(super) enum KeyRefused {
    /// No key, or one not accepted.
    #[response(status = 401, description = "No or an unknown API key")]
    Unauthorized(ErrorBody),
}

/// What a sync batch became: items stored, items already held, telemetry points stored.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SyncAck)]
pub(super) struct SyncAckSchema {
    /// Items stored now.
    stored: u64,
    /// Items the cloud held already (a re-sent batch): not stored again.
    duplicates: u64,
    /// Telemetry points among the stored items.
    points: u64,
}

/// One machine's ideal cycle time (master data).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = MachineSpec)]
pub(super) struct MachineSpecSchema {
    site: String,
    line: String,
    machine: String,
    /// At least 1.
    #[schema(minimum = 1)]
    ideal_cycle_time_ms: u32,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Millrace cloud API",
        version = "1",
        description = "Factory reports (ISO 22400 OEE, production, downtime, telemetry), raw data, edge sync and completeness. See docs/api.md."
    ),
    modifiers(&Security),
    security(("apiKey" = [])),
    components(schemas(ErrorBody, SyncAckSchema, MachineSpecSchema))
)]
struct ApiDoc;

/// The two ways to authenticate.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "apiKey",
            bearer("A read or admin key (`http.read_keys`, `http.admin_keys`)."),
        );
        c.add_security_scheme(
            "edgeToken",
            bearer("An edge's sync token (`millrace-cloud edge-token`)."),
        );
    }
}

/// Every route with its documentation. `max_batch_bytes` limits the sync endpoint's body.
pub(super) fn routes(max_batch_bytes: usize) -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(sync::sync_batch))
        .layer(DefaultBodyLimit::max(max_batch_bytes))
        .routes(routes!(sync::edges))
        .routes(routes!(data::telemetry_rows))
        .routes(routes!(data::event_rows))
        .routes(routes!(data::alert_rows))
        .routes(routes!(data::oee_report))
        .routes(routes!(data::production_report))
        .routes(routes!(data::downtime_report))
        .routes(routes!(data::state_report))
        .routes(routes!(data::telemetry_report))
        .routes(routes!(master::machines))
        .routes(routes!(master::master))
        .routes(routes!(master::put_machines))
        .routes(routes!(live::live))
        .routes(routes!(live::dashboard))
        .routes(routes!(live::echarts))
        .routes(routes!(openapi_json))
        .routes(routes!(super::health))
        .routes(routes!(super::prometheus))
}

/// The document, rendered once.
pub(crate) fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        // The body limit is a layer of the router, not part of the document.
        routes(1)
            .split_for_parts()
            .1
            .to_pretty_json()
            .expect("the OpenAPI document serializes")
    })
}

/// This document: the API described as OpenAPI 3.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
pub(super) async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document())
}
