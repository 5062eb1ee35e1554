//! `millrace-sim`: a simulated factory that publishes Millrace events to any MQTT broker.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use millrace_simulators::config::FactoryConfig;
use millrace_simulators::factory::{FactorySim, GroundTruth};
use millrace_simulators::load::{LoadFormat, LoadOptions, run_load};
use millrace_simulators::publish::{BrokerOptions, Publisher};
use millrace_simulators::push::{PushOptions, push};
use millrace_simulators::run::{RunOptions, run_factory};
use rumqttc::QoS;

/// A simulated factory for Millrace.
///
/// Machines run shifts, make parts (good, scrap, rework), break down and get repaired, change
/// over between batches and send telemetry; every event is published over MQTT to
/// `factory/{site}/{line}/{machine}/{kind}`. The same seed and start always give the same
/// factory, and the simulator writes the true KPIs (OEE, availability, performance, quality,
/// MTBF, MTTR, counts) of what it simulated, so that reports can be checked against them.
#[derive(Debug, Parser)]
#[command(name = "millrace-sim", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulate a factory and publish its events to a broker.
    Run(RunArgs),
    /// Simulate a factory without a broker and write only its ground truth.
    Truth(TruthArgs),
    /// Benchmark load: N devices publishing telemetry at a fixed rate.
    Load(LoadArgs),
    /// Simulate a factory as fast as possible and push its events straight to a Millrace cloud
    /// over the sync protocol, as an edge would (loads weeks of history for reports and
    /// benchmarks; run again, it stores nothing twice).
    Push(PushArgs),
}

#[derive(Debug, Args)]
struct BrokerArgs {
    /// Broker address: mqtt://host:port or host:port.
    #[arg(long, env = "MILLRACE_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// MQTT username (devices must authenticate on a Millrace edge).
    #[arg(long, env = "MILLRACE_MQTT_USERNAME")]
    username: Option<String>,
    /// MQTT password; prefer the environment variable over the flag, which other users can see.
    #[arg(long, env = "MILLRACE_MQTT_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// MQTT client id (load mode appends the device number).
    #[arg(long, default_value = "millrace-sim")]
    client_id: String,
    /// QoS of every publish: 0, 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
}

impl BrokerArgs {
    fn options(&self) -> anyhow::Result<BrokerOptions> {
        let (host, port) = BrokerOptions::parse_address(&self.broker)?;
        let credentials = match (&self.username, &self.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (Some(u), None) => Some((u.clone(), String::new())),
            (None, Some(_)) => bail!("--password needs --username"),
            (None, None) => None,
        };
        let qos = match self.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        Ok(BrokerOptions {
            host,
            port,
            client_id: self.client_id.clone(),
            credentials,
            qos,
        })
    }
}

#[derive(Debug, Args)]
struct FactoryArgs {
    /// Seed of every random draw: the same seed and start give the same factory.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Factory description (TOML); flags below override its counts.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of sites.
    #[arg(long)]
    sites: Option<u32>,
    /// Lines per site.
    #[arg(long)]
    lines: Option<u32>,
    /// Machines per line.
    #[arg(long)]
    machines: Option<u32>,
    /// Time between two telemetry readings of a machine, e.g. 1s, 10s, 1m.
    #[arg(long, value_parser = humantime::parse_duration)]
    telemetry_interval: Option<Duration>,
    /// Start of the simulated period: RFC 3339 (2026-01-05T00:00:00Z), `now`, or a time before
    /// now such as `-1day` or `-8h`.
    #[arg(long, default_value = "now", allow_hyphen_values = true)]
    start: String,
    /// Length of the simulated period, e.g. 8h, 1day, 7days.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1day")]
    duration: Duration,
}

impl FactoryArgs {
    fn build(&self) -> anyhow::Result<FactorySim> {
        let mut cfg = match &self.config {
            Some(p) => FactoryConfig::from_file(p)?,
            None => FactoryConfig::default(),
        };
        if let Some(n) = self.sites {
            cfg.sites = n;
        }
        if let Some(n) = self.lines {
            cfg.lines_per_site = n;
        }
        if let Some(n) = self.machines {
            cfg.machines_per_line = n;
        }
        if let Some(d) = self.telemetry_interval {
            cfg.telemetry_interval_ms = d.as_millis() as u64;
        }
        // Whole seconds, so that two runs started in the same second agree.
        let now_ms = chrono::Utc::now().timestamp() * 1000;
        let start_ms = if self.start == "now" {
            now_ms
        } else if let Some(ago) = self.start.strip_prefix('-') {
            let d = humantime::parse_duration(ago).with_context(|| {
                format!(
                    "--start `{}`: `{ago}` is not a duration (e.g. 1day, 8h)",
                    self.start
                )
            })?;
            now_ms - d.as_millis() as i64
        } else {
            chrono::DateTime::parse_from_rfc3339(&self.start)
                .with_context(|| {
                    format!(
                        "--start `{}` is not RFC 3339 (e.g. 2026-01-05T00:00:00Z) or `now`",
                        self.start
                    )
                })?
                .timestamp_millis()
        };
        let end_ms = start_ms + self.duration.as_millis() as i64;
        Ok(FactorySim::new(&cfg, self.seed, start_ms, end_ms)?)
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    factory: FactoryArgs,
    /// Simulated seconds per real second: 1 is real time, 3600 an hour a second; 0 is as fast
    /// as the broker takes it.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    speed: f64,
    /// Follow the wall clock instead of --speed: events stamped before now are sent at once
    /// (a backfill), later ones when their time comes. With --start -1day: a day of history,
    /// then live.
    #[arg(long)]
    live: bool,
    /// Fault mode: probability per event of also sending a malformed payload, a bad field, an
    /// unknown topic, an oversized payload, a duplicate or a disconnect.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    faults: f64,
    /// Write the ground truth (JSON) here when the run completes.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Write the publish report (JSON: messages by kind, faults, acknowledgements, rate) here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// No progress bar or progress lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct TruthArgs {
    #[command(flatten)]
    factory: FactoryArgs,
    /// Where to write the ground truth (JSON); `-` for standard output.
    #[arg(long, default_value = "-")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct LoadArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Devices, each with its own connection.
    #[arg(long, default_value_t = 10)]
    devices: u32,
    /// Events per second over all devices; 0 for as fast as possible.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to send.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    /// Readings per telemetry event.
    #[arg(long, default_value_t = 4)]
    readings: usize,
    /// Site id of the load devices.
    #[arg(long, default_value = "load")]
    site: String,
    /// Write the load report (JSON) here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Payloads: Millrace JSON telemetry, or Sparkplug B NDATA by alias after an NBIRTH.
    #[arg(long, value_enum, default_value_t = LoadFormat::Json)]
    format: LoadFormat,
}

#[derive(Debug, Args)]
struct PushArgs {
    #[command(flatten)]
    factory: FactoryArgs,
    /// The cloud's base URL.
    #[arg(
        long,
        env = "MILLRACE_CLOUD_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    cloud: String,
    /// The edge id the cloud has a token for (`[edges.<id>]` in its configuration).
    #[arg(long, default_value = "sim")]
    edge: String,
    /// That edge's token; prefer the environment variable over the flag.
    #[arg(long, env = "MILLRACE_EDGE_TOKEN", hide_env_values = true)]
    token: String,
    /// Events per batch.
    #[arg(long, default_value_t = 100_000)]
    batch_items: usize,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 2)]
    in_flight: usize,
    /// Write the ground truth (JSON) here when the push completes.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Write the push report (JSON: items, points, batches, bytes, rate) here.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn write_json(path: &PathBuf, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    if path.as_os_str() == "-" {
        use std::io::Write;
        std::io::stdout().write_all(&bytes)?;
    } else {
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn summary(truth: &GroundTruth) {
    eprintln!(
        "simulated {} events from {} machines",
        truth.total_events,
        truth.machines.len()
    );
    let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.1}%", v * 100.0));
    for l in &truth.lines {
        let k = &l.totals;
        eprintln!(
            "  {}/{}: OEE {} (A {} · P {} · Q {}), {} parts, {} scrap, {} breakdowns",
            l.site,
            l.line.as_deref().unwrap_or(""),
            pct(k.oee),
            pct(k.availability),
            pct(k.performance),
            pct(k.quality),
            k.total,
            k.tally.scrap,
            k.tally.failures
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Truth(args) => {
            let mut sim = args.factory.build()?;
            sim.by_ref().for_each(drop);
            let truth = sim.truth();
            write_json(&args.out, &truth)?;
            summary(&truth);
        }
        Command::Run(args) => {
            if !(args.speed >= 0.0 && args.speed.is_finite()) {
                bail!("--speed must be 0 (as fast as possible) or a positive number");
            }
            if !(0.0..=1.0).contains(&args.faults) {
                bail!("--faults is a probability from 0 to 1");
            }
            let mut sim = args.factory.build()?;
            let opts = args.broker.options()?;
            let mut publisher = Publisher::connect(&opts).await?;
            tracing::info!(broker = %args.broker.broker, machines = sim.specs().len(), speed = args.speed, "publishing simulated factory");
            let run = RunOptions {
                speed: args.speed,
                live: args.live,
                fault_rate: args.faults,
                seed: args.factory.seed,
                progress: !args.quiet,
                flush_timeout: Duration::from_secs(120),
            };
            let ctrl_c = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            let (report, interrupted) = run_factory(&mut sim, &mut publisher, &run, ctrl_c).await?;
            publisher.close(Duration::from_secs(10)).await?;
            if let Some(p) = &args.report {
                write_json(p, &report)?;
            }
            eprintln!(
                "published {} messages ({} acknowledged, {} reconnects) in {:.1} s: {:.0} messages/s",
                report.messages,
                report.acked,
                report.reconnects,
                report.elapsed_s,
                report.rate_per_s
            );
            if interrupted {
                eprintln!("interrupted: the run did not complete, so no ground truth was written");
            } else {
                let truth = sim.truth();
                if let Some(p) = &args.truth {
                    write_json(p, &truth)?;
                }
                summary(&truth);
            }
        }
        Command::Push(args) => {
            let sim = args.factory.build()?;
            let opts = PushOptions {
                cloud_url: args.cloud.clone(),
                edge: args.edge.clone(),
                token: args.token.clone(),
                batch_items: args.batch_items,
                in_flight: args.in_flight,
                progress_every: 5_000_000,
            };
            tracing::info!(cloud = %args.cloud, machines = sim.specs().len(), "pushing simulated factory");
            let (sim, report) = push(sim, &opts).await?;
            if let Some(p) = &args.report {
                write_json(p, &report)?;
            }
            eprintln!(
                "pushed {} events ({} points) in {} batches, {} stored, {} already held, in {:.1} s: {:.0} events/s",
                report.items,
                report.points,
                report.batches,
                report.stored,
                report.duplicates,
                report.elapsed_s,
                report.items_per_s
            );
            let truth = sim.truth();
            if let Some(p) = &args.truth {
                write_json(p, &truth)?;
            }
            summary(&truth);
        }
        Command::Load(args) => {
            let opts = LoadOptions {
                broker: args.broker.options()?,
                devices: args.devices,
                rate: args.rate,
                duration: args.duration,
                readings: args.readings,
                site: args.site.clone(),
                format: args.format,
            };
            let report = run_load(&opts).await?;
            if let Some(p) = &args.report {
                write_json(p, &report)?;
            }
            eprintln!(
                "{} devices published {} events in {:.2} s: {:.0} events/s ({} acknowledged)",
                report.devices, report.published, report.elapsed_s, report.rate_per_s, report.acked
            );
        }
    }
    Ok(())
}
