//! Running a simulated factory against a broker: pacing, fault injection, progress and the
//! publish report.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use millrace_shared::{Event, EventBody};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::factory::FactorySim;
use crate::publish::{PublishError, Publisher};

/// Kinds of bad traffic the fault mode sends, besides the factory's valid events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// A payload that is not JSON.
    Malformed,
    /// Valid JSON with a bad field.
    BadField,
    /// A topic outside the scheme or with an unknown kind.
    UnknownTopic,
    /// A payload over the 64 KiB limit.
    Oversized,
    /// The previous valid event sent again (same machine and sequence number).
    Duplicate,
    /// The connection dropped and made again.
    Disconnect,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Self::Malformed,
        Self::BadField,
        Self::UnknownTopic,
        Self::Oversized,
        Self::Duplicate,
        Self::Disconnect,
    ];
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Simulated seconds per wall-clock second; 0 means as fast as the broker takes it.
    pub speed: f64,
    /// Follow the wall clock: events stamped in the past go out at once, later ones when the
    /// wall clock reaches their timestamp (overrides `speed`).
    pub live: bool,
    /// Probability per valid event of also injecting one fault.
    pub fault_rate: f64,
    /// Seed of the fault stream (independent of the factory's).
    pub seed: u64,
    /// Show a progress bar (on a terminal) or log progress lines (otherwise).
    pub progress: bool,
    /// How long to wait for the last acknowledgements.
    pub flush_timeout: Duration,
}

/// What was sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PublishReport {
    /// Valid events published, per kind.
    pub events: BTreeMap<String, u64>,
    /// Faults injected, per kind (disconnects send no message).
    pub faults: BTreeMap<Fault, u64>,
    /// Messages published in all: events plus fault messages. A subscriber to `#` receives this many.
    pub messages: u64,
    /// Acknowledgements received (QoS 1 and 2).
    pub acked: u64,
    /// Reconnections.
    pub reconnects: u64,
    /// Wall-clock seconds.
    pub elapsed_s: f64,
    /// Messages per wall-clock second.
    pub rate_per_s: f64,
}

/// Publishes the whole simulation, paced by `opts.speed`. Stops early when `stop` resolves.
pub async fn run_factory(
    sim: &mut FactorySim,
    publisher: &mut Publisher,
    opts: &RunOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(PublishReport, bool), PublishError> {
    let (start_ms, end_ms) = sim.period();
    let mut faults_rng = ChaCha8Rng::seed_from_u64(opts.seed);
    faults_rng.set_stream(u64::MAX - 1);
    let mut report = PublishReport::default();
    let bar = progress_bar(opts.progress, start_ms, end_ms);
    let t0 = Instant::now();
    let mut last_log = t0;
    let mut last_valid: Option<Event> = None;
    tokio::pin!(stop);
    let mut interrupted = false;
    for event in sim.by_ref() {
        if opts.live {
            let ahead = event.ts_ms - chrono::Utc::now().timestamp_millis();
            if ahead > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ahead as u64)) => {}
                    _ = &mut stop => { interrupted = true; break; }
                }
            } else if report.messages % 1024 == 0 && futures_poll_ready(&mut stop).await {
                interrupted = true;
                break;
            }
        } else if opts.speed > 0.0 {
            let due =
                t0 + Duration::from_secs_f64((event.ts_ms - start_ms) as f64 / 1000.0 / opts.speed);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = &mut stop => { interrupted = true; break; }
            }
        } else if report.messages % 1024 == 0 && futures_poll_ready(&mut stop).await {
            interrupted = true;
            break;
        }
        publisher.publish(event.topic(), event.to_payload()).await?;
        *report
            .events
            .entry(event.kind().as_str().to_owned())
            .or_default() += 1;
        report.messages += 1;
        if opts.fault_rate > 0.0 && faults_rng.random::<f64>() < opts.fault_rate {
            let fault = Fault::ALL[faults_rng.random_range(0..Fault::ALL.len())];
            inject(
                fault,
                &event,
                last_valid.as_ref(),
                &mut *publisher,
                &mut faults_rng,
            )
            .await?;
            *report.faults.entry(fault).or_default() += 1;
            if fault != Fault::Disconnect {
                report.messages += 1;
            }
        }
        if report.messages % 256 == 0 {
            let sim_done = (event.ts_ms - start_ms).max(0) as u64 / 1000;
            bar.set_position(sim_done);
            if bar.is_hidden() && opts.progress && last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                tracing::info!(
                    simulated = %chrono::DateTime::from_timestamp_millis(event.ts_ms).map(|d| d.to_rfc3339()).unwrap_or_default(),
                    percent = (100 * (event.ts_ms - start_ms) / (end_ms - start_ms).max(1)),
                    messages = report.messages,
                    "progress"
                );
            }
        }
        last_valid = Some(event);
    }
    bar.finish_and_clear();
    publisher.flush(opts.flush_timeout).await?;
    let c = publisher.counters();
    report.acked = c.acked.load(Ordering::Relaxed);
    report.reconnects = c.reconnects.load(Ordering::Relaxed);
    report.elapsed_s = t0.elapsed().as_secs_f64();
    report.rate_per_s = report.messages as f64 / report.elapsed_s.max(1e-9);
    Ok((report, interrupted))
}

/// Checks a future once without waiting.
async fn futures_poll_ready(
    f: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    tokio::select! {
        biased;
        _ = f.as_mut() => true,
        _ = std::future::ready(()) => false,
    }
}

async fn inject(
    fault: Fault,
    event: &Event,
    previous: Option<&Event>,
    publisher: &mut Publisher,
    rng: &mut ChaCha8Rng,
) -> Result<(), PublishError> {
    let topic = event.topic();
    match fault {
        Fault::Malformed => {
            let mut p = event.to_payload();
            let cut = rng.random_range(1..p.len());
            p.truncate(cut);
            publisher.publish(topic, p).await
        }
        Fault::BadField => {
            let mut v: serde_json::Value =
                serde_json::from_slice(&event.to_payload()).expect("own payload");
            let field = match &event.body {
                EventBody::State(_) => "state",
                EventBody::Part(_) => "cycle_time_ms",
                EventBody::Telemetry(_) => "readings",
                EventBody::Operator(_) => "action",
            };
            v[field] = serde_json::json!(-1);
            publisher
                .publish(topic, serde_json::to_vec(&v).expect("json"))
                .await
        }
        Fault::UnknownTopic => {
            let t = if rng.random::<bool>() {
                format!(
                    "factory/{}/{}/{}/alarm",
                    event.machine.site, event.machine.line, event.machine.machine
                )
            } else {
                format!("plant/{}/misc", event.machine.machine)
            };
            publisher.publish(t, event.to_payload()).await
        }
        Fault::Oversized => {
            let mut v: serde_json::Value =
                serde_json::from_slice(&event.to_payload()).expect("own payload");
            v["padding"] = serde_json::json!("x".repeat(70 * 1024));
            publisher
                .publish(topic, serde_json::to_vec(&v).expect("json"))
                .await
        }
        Fault::Duplicate => {
            let dup = previous.unwrap_or(event);
            publisher.publish(dup.topic(), dup.to_payload()).await
        }
        Fault::Disconnect => publisher.disconnect_and_reconnect().await,
    }
}

fn progress_bar(enabled: bool, start_ms: i64, end_ms: i64) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(((end_ms - start_ms).max(0) / 1000) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} simulated {pos}/{len} s [{bar:40}] {percent}% · {elapsed_precise} elapsed, ~{eta} left")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}
