//! The sync client: sends the outbox to the cloud.
//!
//! One batch at a time, each from one outbox lane and contiguous in it:
//! 1. state, part and operator events first (few, and what a plant manager needs first);
//! 2. then the alerts functions raised;
//! 3. then telemetry. When telemetry has a backlog (its oldest record is older than
//!    `live_window`, e.g. after an outage), records stored after the backlog was noticed are
//!    sent first ("live"), and the backlog drains behind them. Items sent more than
//!    `live_window` after they were stored carry the backfill mark.
//!
//! A batch's records are deleted from the outbox only after the cloud answered 200, which it
//! does only once the batch is durable; the cloud recognises a re-sent batch by (edge, outbox
//! seq) and does not store it twice. Failures are retried with exponential backoff and full
//! jitter; nothing is ever skipped. An optional bandwidth cap spaces batches out.
//!
//! Every batch also carries the functions' figures (invocations, failures, lag) and the outbox
//! report (what still waits after it) as they are when it is sent; while the outbox is empty, a
//! batch with only those goes out when the figures changed (at most every [`REPORT_EVERY`]) and,
//! as a heartbeat, at least every [`REPORT_HEARTBEAT`] (with or without functions).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use millrace_shared::sync::{CONTENT_TYPE, SYNC_PATH, SyncAck, SyncBatch};
use millrace_shared::{EventBody, FunctionReport};
use rand::Rng;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::SyncConfig;
use crate::store::outbox::{Lane, OutboxRead};
use crate::store::{Store, StoreError};

/// The functions' figures now (blocking), sent with each batch.
pub(crate) type Reports = Arc<dyn Fn() -> Vec<FunctionReport> + Send + Sync>;

/// While idle, changed function figures are sent at most this often.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(10);
/// While idle, function figures are sent at least this often (a restarted cloud learns them).
pub(crate) const REPORT_HEARTBEAT: Duration = Duration::from_secs(60);

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The cloud could not be reached or the connection broke.
    #[error("cloud unreachable: {0}")]
    Network(#[from] reqwest::Error),
    /// The cloud refused the token.
    #[error("the cloud refused this edge's token (HTTP {0}); check sync.token and edge_id")]
    Unauthorized(u16),
    /// The cloud answered with an error.
    #[error("cloud answered HTTP {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The answer's text.
        body: String,
    },
    /// The outbox could not be read or updated.
    #[error("outbox: {0}")]
    Store(#[from] StoreError),
    /// A blocking task failed.
    #[error("outbox task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl SyncError {
    /// Whether the same batch may succeed later without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Network(_) | Self::Join(_) => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            Self::Store(e) => e.is_retryable(),
            Self::Unauthorized(_) => false,
        }
    }
}

/// What the sync client has done, for the API and metrics.
#[derive(Debug, Default)]
pub(crate) struct SyncStats {
    /// Batches the cloud acknowledged.
    pub(crate) batches: AtomicU64,
    /// Items acknowledged.
    pub(crate) items: AtomicU64,
    /// Telemetry points acknowledged.
    pub(crate) points: AtomicU64,
    /// Of those, items the cloud already had (re-sent after a lost answer).
    pub(crate) duplicates: AtomicU64,
    /// Request body bytes that reached the cloud (answered, whatever the answer).
    pub(crate) wire_bytes: AtomicU64,
    /// Failed attempts.
    pub(crate) failures: AtomicU64,
    /// Failures in a row (0 when the last attempt worked).
    pub(crate) consecutive_failures: AtomicU64,
    /// Unix ms of the last acknowledgement.
    pub(crate) last_ack_ms: AtomicU64,
    /// The last error, if the last attempt failed.
    pub(crate) last_error: Mutex<Option<String>>,
    /// Whether a telemetry backlog is draining behind live data.
    pub(crate) draining_backlog: AtomicBool,
}

/// A snapshot of [`SyncStats`].
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SyncFigures {
    /// Batches acknowledged.
    pub(crate) batches: u64,
    /// Items acknowledged.
    pub(crate) items: u64,
    /// Telemetry points acknowledged.
    pub(crate) points: u64,
    /// Items the cloud already had.
    pub(crate) duplicates: u64,
    /// Bytes sent.
    pub(crate) wire_bytes: u64,
    /// Failed attempts.
    pub(crate) failures: u64,
    /// Failures in a row.
    pub(crate) consecutive_failures: u64,
    /// Unix ms of the last acknowledgement.
    pub(crate) last_ack_ms: Option<u64>,
    /// The last error, if the last attempt failed.
    pub(crate) last_error: Option<String>,
    /// Whether a telemetry backlog is draining behind live data.
    pub(crate) draining_backlog: bool,
}

impl SyncStats {
    /// A snapshot.
    pub(crate) fn figures(&self) -> SyncFigures {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SyncFigures {
            batches: l(&self.batches),
            items: l(&self.items),
            points: l(&self.points),
            duplicates: l(&self.duplicates),
            wire_bytes: l(&self.wire_bytes),
            failures: l(&self.failures),
            consecutive_failures: l(&self.consecutive_failures),
            last_ack_ms: Some(l(&self.last_ack_ms)).filter(|v| *v > 0),
            last_error: self.last_error.lock().expect("error lock").clone(),
            draining_backlog: self.draining_backlog.load(Ordering::Relaxed),
        }
    }
}

/// The sync client.
pub(crate) struct SyncClient {
    store: Arc<Store>,
    cfg: SyncConfig,
    edge_id: String,
    http: reqwest::Client,
    url: String,
    stats: Arc<SyncStats>,
    /// Telemetry from this seq on is live; older is backlog (`None`: no backlog).
    live_from: Option<u64>,
    /// The functions' figures, when functions run.
    reports: Option<Reports>,
    /// The figures the cloud last acknowledged, and when.
    reported: Mutex<(Vec<FunctionReport>, Option<Instant>)>,
}

struct Planned {
    lane: Lane,
    read: OutboxRead,
    dropped: Vec<(u64, u64)>,
}

impl SyncClient {
    /// A client for `store`'s outbox.
    pub(crate) fn new(
        store: Arc<Store>,
        cfg: SyncConfig,
        edge_id: String,
        stats: Arc<SyncStats>,
        reports: Option<Reports>,
    ) -> Result<Self, SyncError> {
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout.min(Duration::from_secs(10)))
            .build()?;
        let url = format!("{}{SYNC_PATH}", cfg.cloud_url.trim_end_matches('/'));
        Ok(Self {
            store,
            cfg,
            edge_id,
            http,
            url,
            stats,
            live_from: None,
            reports,
            reported: Mutex::new((vec![], None)),
        })
    }

    /// A batch of only the functions' figures, when they are due (changed and not sent for
    /// [`REPORT_EVERY`], or not sent for [`REPORT_HEARTBEAT`]).
    async fn report_due(&self) -> Option<Planned> {
        let now = match self.reports.clone() {
            Some(reports) => tokio::task::spawn_blocking(move || reports()).await.ok()?,
            None => vec![],
        };
        let (last, at) = &*self.reported.lock().expect("reported lock");
        let since = at.map_or(Duration::MAX, |t| t.elapsed());
        // The heartbeat goes without functions too: the cloud tells an edge that is online
        // with nothing to send from one that is gone, and sees its outbox.
        let due =
            (since >= REPORT_EVERY && *last != now && !now.is_empty()) || since >= REPORT_HEARTBEAT;
        due.then(|| Planned {
            lane: Lane::Events,
            read: OutboxRead::default(),
            dropped: vec![],
        })
    }

    /// Sends until `stop` is cancelled (a batch in flight is finished or abandoned unacknowledged).
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let Some(notify) = self.store.outbox_notify() else {
            tracing::error!("sync enabled but the store has no outbox");
            return;
        };
        tracing::info!(cloud = %self.url, edge_id = %self.edge_id, "sync started");
        let mut backoff = self.cfg.retry_initial;
        // The next batch, read while the previous one was on its way (a two-stage pipeline:
        // the edge reads and encodes while the cloud commits).
        let mut prefetched: Option<Planned> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            let plan = match prefetched.take() {
                Some(p) => Some(p),
                None => match self.plan(self.live_from, None).await {
                    Ok((p, live_from)) => {
                        self.set_live_from(live_from);
                        p
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "reading the outbox failed");
                        tokio::select! { _ = tokio::time::sleep(self.cfg.retry_max) => {}, _ = stop.cancelled() => break }
                        continue;
                    }
                },
            };
            let plan = match plan {
                Some(p) => p,
                None => match self.report_due().await {
                    Some(p) => p,
                    None => {
                        // Nothing to send: wait for new records, then linger to fill a batch.
                        tokio::select! {
                            _ = notify.notified() => {}
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                            _ = stop.cancelled() => break,
                        }
                        tokio::select! { _ = tokio::time::sleep(self.cfg.linger) => {}, _ = stop.cancelled() => break }
                        continue;
                    }
                },
            };
            let started = Instant::now();
            let in_flight = plan
                .read
                .span()
                .map(|(a, b, _)| (plan.lane, a, b, !plan.dropped.is_empty()));
            let (sent, next) = tokio::join!(self.send(plan), async {
                // Prefetch only a full pipeline: a small batch means the outbox is caught up.
                match in_flight {
                    Some(f) => self.plan(self.live_from, Some(f)).await.ok(),
                    None => None,
                }
            });
            match sent {
                Ok(sent_bytes) => {
                    backoff = self.cfg.retry_initial;
                    if let Some((p, live_from)) = next {
                        self.set_live_from(live_from);
                        prefetched = p;
                    }
                    metrics::histogram!("millrace_edge_sync_batch_seconds")
                        .record(started.elapsed().as_secs_f64());
                    if self.cfg.max_bytes_per_sec > 0 {
                        let pause = Duration::from_secs_f64(
                            sent_bytes as f64 / self.cfg.max_bytes_per_sec as f64,
                        )
                        .saturating_sub(started.elapsed());
                        tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = stop.cancelled() => break }
                    }
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    let n = self
                        .stats
                        .consecutive_failures
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    metrics::counter!("millrace_edge_sync_failures_total").increment(1);
                    *self.stats.last_error.lock().expect("error lock") = Some(e.to_string());
                    let retryable = e.is_retryable();
                    let wait = if retryable {
                        backoff
                    } else {
                        self.cfg.retry_max
                    };
                    // Full jitter: edges that lost the cloud together do not return together.
                    let wait = wait.mul_f64(rand::rng().random_range(0.5..=1.0));
                    if n == 1 || n.is_multiple_of(10) || !retryable {
                        tracing::warn!(error = %e, failures_in_a_row = n, retry_in_ms = wait.as_millis() as u64, "sync batch not acknowledged; will retry");
                    }
                    backoff = (backoff * 2).min(self.cfg.retry_max);
                    // After an outage, what arrives from now on is live and goes first.
                    self.set_live_from(None);
                    tokio::select! { _ = tokio::time::sleep(wait) => {}, _ = stop.cancelled() => break }
                }
            }
        }
        tracing::info!("sync stopped");
    }

    /// Chooses the next batch: events first, then live telemetry, then backlog. `in_flight` is
    /// the batch being sent meanwhile (lane, first, last seq, whether it reports dropped
    /// ranges): the new batch does not overlap it. Returns the batch and the new `live_from`.
    async fn plan(
        &self,
        live_from: Option<u64>,
        in_flight: Option<(Lane, u64, u64, bool)>,
    ) -> Result<(Option<Planned>, Option<u64>), SyncError> {
        let store = self.store.clone();
        let (max_items, max_bytes) = (self.cfg.batch_max_items, self.cfg.batch_max_bytes);
        let live_window = self.cfg.live_window.as_millis() as i64;
        let out = tokio::task::spawn_blocking(
            move || -> Result<(Option<Planned>, Option<u64>), StoreError> {
                let skip =
                    |lane: Lane| in_flight.and_then(|(l, a, b, _)| (l == lane).then_some((a, b)));
                // Dropped ranges go with one batch at a time (the acknowledgement forgets them).
                let dropped = if in_flight.is_some_and(|f| f.3) {
                    vec![]
                } else {
                    store.outbox_dropped_unreported()
                };
                for lane in [Lane::Events, Lane::Alerts] {
                    let read = store.outbox_read(lane, 0, max_items, max_bytes, skip(lane))?;
                    if !read.is_empty() {
                        return Ok((
                            Some(Planned {
                                lane,
                                read,
                                dropped,
                            }),
                            live_from,
                        ));
                    }
                }
                let mut live_from = live_from;
                if live_from.is_none()
                    && let Some((_, stored)) = store.outbox_oldest(Lane::Telemetry)?
                    && chrono::Utc::now().timestamp_millis() - stored > live_window
                {
                    // A backlog: everything stored from now on is live.
                    live_from = store.outbox_status()?.map(|s| s.next_seq);
                }
                let t = skip(Lane::Telemetry);
                let mut read = OutboxRead::default();
                if let Some(l) = live_from {
                    read = store.outbox_read(Lane::Telemetry, l, max_items, max_bytes, t)?;
                }
                if read.is_empty() {
                    read = store.outbox_read(Lane::Telemetry, 0, max_items, max_bytes, t)?;
                    if read.is_empty() && t.is_none() {
                        live_from = None;
                    }
                }
                let plan = (!read.is_empty() || !dropped.is_empty()).then_some(Planned {
                    lane: Lane::Telemetry,
                    read,
                    dropped,
                });
                Ok((plan, live_from))
            },
        )
        .await??;
        Ok(out)
    }

    fn set_live_from(&mut self, live_from: Option<u64>) {
        self.live_from = live_from;
        self.stats
            .draining_backlog
            .store(live_from.is_some(), Ordering::Relaxed);
    }

    /// Sends one batch; on success deletes it from the outbox. Returns the bytes sent.
    async fn send(&self, plan: Planned) -> Result<u64, SyncError> {
        let now = chrono::Utc::now().timestamp_millis();
        let live_window = self.cfg.live_window.as_millis() as i64;
        let span = plan.read.span().map(|(a, b, _)| (a, b));
        let n_items = plan.read.len() as u64;
        let (read_items, read_bytes) = (n_items, plan.read.bytes);
        let (lane, n_dropped) = (plan.lane, plan.dropped.len());
        let (mut items, mut alerts) = (plan.read.items, plan.read.alerts);
        let mut points = 0u64;
        for it in &mut items {
            it.backfill = it.backfill || now - it.stored_ms > live_window;
            if let EventBody::Telemetry(t) = &it.event.body {
                points += t.readings.len() as u64;
            }
        }
        for a in &mut alerts {
            a.backfill = a.backfill || now - a.stored_ms > live_window;
        }
        let mut batch = SyncBatch {
            edge: self.edge_id.clone(),
            items,
            alerts,
            dropped: plan.dropped,
            functions: vec![],
            outbox: None,
        };
        let generation = plan.read.generation;
        let reports = self.reports.clone();
        let store = self.store.clone();
        let sending = span.map(|(_, last)| (lane, last, n_items));
        let (body, functions) = tokio::task::spawn_blocking(move || {
            batch.functions = reports.map(|r| r()).unwrap_or_default();
            // How far behind this edge is (the cloud shows it per edge); a failed read only
            // leaves it out.
            batch.outbox = store.outbox_report(sending).ok();
            (batch.encode(), batch.functions)
        })
        .await?;
        let sent = body.len() as u64;
        let resp = self
            .http
            .post(&self.url)
            .bearer_auth(&self.cfg.token)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body)
            .send()
            .await?;
        // The body went over the wire (an unreachable cloud takes none).
        self.stats.wire_bytes.fetch_add(sent, Ordering::Relaxed);
        metrics::counter!("millrace_edge_sync_wire_bytes_total").increment(sent);
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(SyncError::Unauthorized(status.as_u16()));
        }
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(SyncError::Status {
                status: status.as_u16(),
                body: body.chars().take(500).collect(),
            });
        }
        let ack: SyncAck = resp.json().await?;
        if span.is_some() || n_dropped > 0 {
            let store = self.store.clone();
            let (first, last) = span.unwrap_or((1, 0));
            tokio::task::spawn_blocking(move || {
                store.outbox_ack(
                    lane,
                    first,
                    last,
                    n_dropped,
                    (read_items, read_bytes),
                    generation,
                )
            })
            .await??;
        }
        *self.reported.lock().expect("reported lock") = (functions, Some(Instant::now()));
        let s = &self.stats;
        s.batches.fetch_add(1, Ordering::Relaxed);
        s.items.fetch_add(n_items, Ordering::Relaxed);
        s.points.fetch_add(points, Ordering::Relaxed);
        s.duplicates.fetch_add(ack.duplicates, Ordering::Relaxed);
        s.consecutive_failures.store(0, Ordering::Relaxed);
        s.last_ack_ms.store(now.max(0) as u64, Ordering::Relaxed);
        *s.last_error.lock().expect("error lock") = None;
        metrics::counter!("millrace_edge_sync_batches_total").increment(1);
        metrics::counter!("millrace_edge_sync_items_total", "lane" => lane.as_str())
            .increment(n_items);
        metrics::counter!("millrace_edge_sync_points_total").increment(points);
        metrics::counter!("millrace_edge_sync_duplicates_total").increment(ack.duplicates);
        Ok(sent)
    }
}

/// Reports the outbox's size per lane and the sync lag as gauges every 5 s until `stop`.
pub(crate) async fn report_outbox(store: Arc<Store>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! { _ = tick.tick() => {}, _ = stop.cancelled() => return }
        let store = store.clone();
        if let Ok(Ok(Some(o))) = tokio::task::spawn_blocking(move || store.outbox_status()).await {
            for lane in Lane::ALL {
                let (items, bytes) = (o.items.of(lane), o.bytes.of(lane));
                metrics::gauge!("millrace_edge_outbox_items", "lane" => lane.as_str())
                    .set(items as f64);
                metrics::gauge!("millrace_edge_outbox_bytes", "lane" => lane.as_str())
                    .set(bytes as f64);
            }
            let lag = o
                .oldest_stored_ms
                .map_or(0, |t| (chrono::Utc::now().timestamp_millis() - t).max(0));
            metrics::gauge!("millrace_edge_sync_lag_seconds").set(lag as f64 / 1000.0);
        }
    }
}
