//! Serving an axum `Router` to clients that may be broken or hostile.
//!
//! `axum::serve` has no limits of its own: a client that opens thousands of connections, sends a
//! request header one byte a second, or a body that never ends holds a task and a socket for
//! ever. [`serve`] is the same HTTP/1.1 service with the limits of [`HttpLimits`]:
//!
//! - at most `max_connections` open connections; one over the limit is answered `503` with
//!   `Connection: close` at once, never queued;
//! - a request's header must arrive within `header_timeout` (hyper's header read timeout, which
//!   also closes a keep-alive connection idle that long), at most `max_header_bytes` of it;
//! - its body must arrive whole within `body_timeout` of the header (`408` otherwise) and be at
//!   most `max_body_bytes` (`413`; routes may set their own limit).
//!
//! Every refusal is counted in `{prefix}_http_refused_total{reason}` and open connections in the
//! gauge `{prefix}_http_connections`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Limits on what one HTTP client may hold (`[http.limits]` in the edge's and cloud's
/// configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// Most connections open at once; more are answered `503` and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's header (also how long an idle keep-alive
    /// connection stays open).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a client has, after the header, to send the whole body.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Largest request header, bytes.
    pub max_header_bytes: usize,
    /// Largest request body, bytes, where a route sets no limit of its own.
    pub max_body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_header_bytes: 64 << 10,
            max_body_bytes: 2 << 20,
        }
    }
}

impl HttpLimits {
    /// Checks the limits: on error, the field (under `http.limits.`) and what it must be.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.max_connections == 0 {
            return Err(("http.limits.max_connections", "at least 1"));
        }
        if self.header_timeout.is_zero() {
            return Err(("http.limits.header_timeout", "above 0"));
        }
        if self.body_timeout.is_zero() {
            return Err(("http.limits.body_timeout", "above 0"));
        }
        // hyper's smallest read buffer.
        if self.max_header_bytes < 8192 {
            return Err(("http.limits.max_header_bytes", "at least 8192"));
        }
        Ok(())
    }
}

/// What a client whose request body is over the limit is told.
pub const BODY_TOO_LARGE: &str = "the request body is larger than this endpoint accepts \
    (http.limits.max_body_bytes, or the endpoint's own limit in docs/configuration.md)";

/// What a connection over `max_connections` gets before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\n\
content-type: application/json\r\ncontent-length: 53\r\n\r\n{\"error\":\"too many connections, try again in a second\"}";

/// How long connections may finish their requests after `stop` before they are dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` under `limits` until `stop`, then lets open requests finish for a
/// few seconds. Metrics are named `{prefix}_http_…`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    prefix: &'static str,
    stop: CancellationToken,
) {
    let refused = Refusals::new(prefix);
    let open = metrics::gauge!(format!("{prefix}_http_connections"));
    let app = app
        .layer(axum::middleware::from_fn_with_state(
            (limits.body_timeout, refused.clone()),
            body_deadline,
        ))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let conns = TaskTracker::new();
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused.count("max_connections");
            conns.spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(BUSY)).await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|r: Request<hyper::body::Incoming>| r.map(Body::new)),
        );
        let (stop, refused, open, limits) =
            (stop.clone(), refused.clone(), open.clone(), limits.clone());
        conns.spawn(async move {
            open.increment(1.0);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = r {
                if e.is_timeout() {
                    refused.count("header_timeout");
                } else if e.is_parse_too_large() {
                    refused.count("header_too_large");
                } else {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
            }
            open.decrement(1.0);
            drop(permit);
        });
    }
    conns.close();
    conns.wait().await;
}

/// The refusal counters of one server.
#[derive(Debug, Clone)]
struct Refusals(Arc<str>);

impl Refusals {
    fn new(prefix: &str) -> Self {
        Self(format!("{prefix}_http_refused_total").into())
    }

    fn count(&self, reason: &'static str) {
        metrics::counter!(self.0.to_string(), "reason" => reason).increment(1);
    }
}

/// Gives the request's body a deadline, and turns its expiry into `408` (axum would call it a
/// malformed body); counts `408` and `413` answers.
async fn body_deadline(
    State((timeout, refused)): State<(Duration, Refusals)>,
    req: Request,
    next: Next,
) -> Response {
    let expired = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        Body::new(DeadlineBody {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            expired: expired.clone(),
        })
    });
    let mut response = next.run(req).await;
    if expired.load(Ordering::Relaxed) {
        refused.count("body_timeout");
        let message = format!(
            "the request body did not arrive within {} (http.limits.body_timeout)",
            humantime::format_duration(timeout)
        );
        return (
            StatusCode::REQUEST_TIMEOUT,
            [(header::CONNECTION, "close")],
            axum::Json(serde_json::json!({ "error": message })),
        )
            .into_response();
    }
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        refused.count("body_too_large");
        // The rest of the body was not read: the connection cannot carry another request.
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        // axum's own answer is a line of plain text; clients of this API read JSON errors.
        let plain = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_none_or(|t| !t.as_bytes().starts_with(b"application/json"));
        if plain {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                [(header::CONNECTION, "close")],
                axum::Json(serde_json::json!({ "error": BODY_TOO_LARGE })),
            )
                .into_response();
        }
    }
    response
}

/// A request body that fails once its deadline has passed.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    expired: Arc<AtomicBool>,
}

/// The error a body past its deadline gives.
#[derive(Debug, thiserror::Error)]
#[error("request body not received in time")]
struct BodyTimedOut;

impl http_body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        ready!(self.deadline.as_mut().poll(cx));
        self.expired.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
