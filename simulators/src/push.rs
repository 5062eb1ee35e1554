//! Pushing a simulated factory straight to a Millrace cloud, as an edge's sync would: batches of
//! outbox items (seq 1, 2, …) on the sync wire format, each acknowledged before it counts.
//!
//! This loads a cloud with weeks of history in minutes (reports and benchmarks need it) and
//! measures the cloud's storage ingest through its real endpoint. It is not a replacement for an
//! edge: there is no outbox on disk, so an interrupted push is simply run again (the cloud
//! recognises the items it already holds by their seq and stores them once).

use std::time::{Duration, Instant};

use millrace_shared::sync::{CONTENT_TYPE, SYNC_PATH, SyncAck, SyncBatch, SyncItem};
use millrace_shared::{Event, EventBody};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::factory::FactorySim;

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The cloud's base URL, e.g. `http://127.0.0.1:8080`.
    pub cloud_url: String,
    /// The edge id the cloud knows the token by.
    pub edge: String,
    /// The edge's token.
    pub token: String,
    /// Items per batch.
    pub batch_items: usize,
    /// Batches in flight at once (the cloud commits one at a time, so 2 keeps it busy).
    pub in_flight: usize,
    /// Log a progress line every this many items (0: none).
    pub progress_every: u64,
}

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PushReport {
    /// Outbox items (events) sent and acknowledged.
    pub items: u64,
    /// Telemetry points among them.
    pub points: u64,
    /// Items the cloud stored now.
    pub stored: u64,
    /// Items the cloud already held (a push run again).
    pub duplicates: u64,
    /// Batches acknowledged.
    pub batches: u64,
    /// Request bodies sent, bytes (compressed wire format).
    pub wire_bytes: u64,
    /// Requests retried after a failure.
    pub retries: u64,
    /// Wall time, seconds.
    pub elapsed_s: f64,
    /// Items acknowledged per second.
    pub items_per_s: f64,
}

/// Why a push stopped.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The cloud refused a batch for a reason that retrying cannot fix.
    #[error("the cloud refused a batch with {status}: {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The cloud's message.
        body: String,
    },
    /// The cloud could not be reached (or kept failing) for too long.
    #[error("the cloud at {url} failed {attempts} times in a row; last error: {last}")]
    Unreachable {
        /// The batch URL.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: String,
    },
    /// The simulator thread failed.
    #[error("simulator thread: {0}")]
    Simulator(String),
}

struct Encoded {
    body: Vec<u8>,
    items: u64,
    points: u64,
}

/// A batch acknowledged: the cloud's answer, retries, items, points and wire bytes.
type Sent = (SyncAck, u32, u64, u64, u64);

const MAX_ATTEMPTS: u32 = 20;

async fn send(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: Vec<u8>,
) -> Result<(SyncAck, u32), PushError> {
    let mut delay = Duration::from_millis(100);
    let mut last = String::new();
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        let res = client
            .post(url)
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body.clone())
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => match r.json::<SyncAck>().await {
                Ok(ack) => return Ok((ack, attempt)),
                Err(e) => last = format!("unreadable acknowledgement: {e}"),
            },
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default());
            }
            Ok(r) => {
                return Err(PushError::Refused {
                    status: r.status().as_u16(),
                    body: r.text().await.unwrap_or_default(),
                });
            }
            Err(e) => last = e.to_string(),
        }
        tracing::warn!(attempt = attempt + 1, error = %last, "batch not acknowledged; retrying");
    }
    Err(PushError::Unreachable {
        url: url.to_owned(),
        attempts: MAX_ATTEMPTS,
        last,
    })
}

/// Runs `sim` to its end and pushes every event to the cloud. Returns the simulator (for its
/// ground truth) and the report.
pub async fn push(
    sim: FactorySim,
    opts: &PushOptions,
) -> Result<(FactorySim, PushReport), PushError> {
    let started = Instant::now();
    let batch_items = opts.batch_items.max(1);
    // Simulating and encoding run on their own thread, a few batches ahead of the sends.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Encoded>(opts.in_flight.max(1) + 1);
    let edge = opts.edge.clone();
    let producer = tokio::task::spawn_blocking(move || {
        let mut sim = sim;
        let mut batch = SyncBatch {
            edge,
            ..SyncBatch::default()
        };
        let mut points = 0u64;
        let flush = |batch: &mut SyncBatch, points: &mut u64| {
            let body = batch.encode();
            let e = Encoded {
                body,
                items: batch.items.len() as u64,
                points: *points,
            };
            batch.items.clear();
            *points = 0;
            tx.blocking_send(e).is_ok()
        };
        for (i, event) in sim.by_ref().enumerate() {
            points += readings(&event);
            batch.items.push(SyncItem {
                seq: i as u64 + 1,
                stored_ms: event.ts_ms,
                backfill: false,
                event,
            });
            if batch.items.len() >= batch_items && !flush(&mut batch, &mut points) {
                return sim;
            }
        }
        if !batch.items.is_empty() {
            flush(&mut batch, &mut points);
        }
        sim
    });

    let url = format!("{}{SYNC_PATH}", opts.cloud_url.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let mut report = PushReport::default();
    let mut inflight: JoinSet<Result<Sent, PushError>> = JoinSet::new();
    let mut next_progress = opts.progress_every;
    let mut done = false;
    loop {
        while !done && inflight.len() < opts.in_flight.max(1) {
            match rx.recv().await {
                Some(e) => {
                    let (client, url, token) = (client.clone(), url.clone(), opts.token.clone());
                    let wire = e.body.len() as u64;
                    inflight.spawn(async move {
                        let (ack, retries) = send(&client, &url, &token, e.body).await?;
                        Ok((ack, retries, e.items, e.points, wire))
                    });
                }
                None => done = true,
            }
        }
        let Some(joined) = inflight.join_next().await else {
            break;
        };
        let (ack, retries, items, points, wire) =
            joined.map_err(|e| PushError::Simulator(e.to_string()))??;
        report.items += items;
        report.points += points;
        report.stored += ack.stored;
        report.duplicates += ack.duplicates;
        report.batches += 1;
        report.wire_bytes += wire;
        report.retries += u64::from(retries);
        if opts.progress_every > 0 && report.items >= next_progress {
            next_progress += opts.progress_every;
            let s = started.elapsed().as_secs_f64();
            tracing::info!(
                items = report.items,
                points = report.points,
                rate = format!("{:.0} items/s", report.items as f64 / s),
                "pushed"
            );
        }
    }
    drop(rx);
    let sim = producer
        .await
        .map_err(|e| PushError::Simulator(e.to_string()))?;
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.items_per_s = report.items as f64 / report.elapsed_s.max(1e-9);
    Ok((sim, report))
}

fn readings(e: &Event) -> u64 {
    match &e.body {
        EventBody::Telemetry(t) => t.readings.len() as u64,
        _ => 0,
    }
}
