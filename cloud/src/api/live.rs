//! The live dashboard: one static page fed by server-sent events.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::auth::Caller;
use super::error::ApiError;
use super::openapi::{ErrorBody, KeyRefused};
use super::{ApiState, blocking};

/// The live dashboard (one static page; its data comes from `/api/v1/live`).
#[utoipa::path(
    get,
    path = "/",
    tag = "dashboard",
    security(()),
    responses((status = 200, description = "The page", content_type = "text/html"))
)]
pub(super) async fn dashboard() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        PAGE.as_str(),
    )
}

/// The page, naming the bundled ECharts version (so browsers fetch a new one after an upgrade).
static PAGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    include_str!("../dashboard.html").replace("{{ECHARTS_VERSION}}", ECHARTS_VERSION)
});

/// The version of Apache ECharts bundled in `cloud/assets/` (`scripts/update-echarts.sh`).
pub(super) const ECHARTS_VERSION: &str = "6.1.0";

/// The dashboard's charting library (Apache ECharts, Apache-2.0), bundled into the binary so
/// that the dashboard works without internet access. The path names the version: cached for
/// good.
#[utoipa::path(
    get,
    path = "/assets/echarts.min.js",
    tag = "dashboard",
    security(()),
    params(("v" = Option<String>, Query, description = "The version (cache busting)")),
    responses((status = 200, description = "Apache ECharts, minified", content_type = "text/javascript"))
)]
pub(super) async fn echarts() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        include_str!("../../assets/echarts.min.js"),
    )
}

/// Server-sent events: a KPI snapshot (`snapshot`) at once and after data arrives (at most one
/// a second). `?api_key=` for clients that cannot set headers (EventSource).
#[utoipa::path(
    get,
    path = "/api/v1/live",
    tag = "dashboard",
    params(("api_key" = Option<String>, Query, description = "An API key, for clients that cannot send `Authorization`")),
    responses(
        (status = 200, description = "`text/event-stream` of `snapshot` events", content_type = "text/event-stream"),
        KeyRefused,
        (status = 503, description = "`http.max_live_subscribers` streams are open already", body = ErrorBody),
    )
)]
pub(super) async fn live(
    _c: Caller,
    State(s): State<ApiState>,
) -> Result<
    axum::response::sse::Sse<
        impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    // Held by the stream: the slot frees when the client goes.
    let Ok(slot) = s.live_slots.clone().try_acquire_owned() else {
        metrics::counter!("millrace_cloud_http_refused_total", "reason" => "live_subscribers")
            .increment(1);
        return Err(ApiError::Unavailable(format!(
            "{} live streams are open already (http.max_live_subscribers); close one or raise the limit",
            s.cfg.http.max_live_subscribers
        )));
    };
    let rx = s.commits.subscribe();
    let stream =
        futures_util::stream::unfold((s, rx, true, slot), |(s, mut rx, first, slot)| async move {
            if !first {
                rx.changed().await.ok()?;
                // Let a burst of commits settle into one snapshot.
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                rx.borrow_and_update();
            }
            let (ds, master) = s.dataset_and_master();
            let ev = match blocking(move || Ok(crate::reports::snapshot(&ds, &master)?)).await {
                Ok(v) => Event::default().event("snapshot").data(v.to_string()),
                Err(e) => Event::default().event("error").data(e.to_string()),
            };
            Some((Ok(ev), (s, rx, false, slot)))
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
