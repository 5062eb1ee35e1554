//! The live dashboard: one static page fed by server-sent events.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::auth::Caller;
use super::openapi::KeyRefused;
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
        include_str!("../dashboard.html"),
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
    )
)]
pub(super) async fn live(
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
        let (ds, master) = s.dataset_and_master();
        let ev = match blocking(move || Ok(crate::reports::snapshot(&ds, &master)?)).await {
            Ok(v) => Event::default().event("snapshot").data(v.to_string()),
            Err(e) => Event::default().event("error").data(e.to_string()),
        };
        Some((Ok(ev), (s, rx, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
