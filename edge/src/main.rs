//! `millrace-edge`: the Millrace edge node.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use millrace_edge::Edge;
use millrace_edge::config::EdgeConfig;

/// The Millrace edge node.
///
/// Runs in the factory: an MQTT broker for devices (3.1.1 and 5 on one port), an ingest
/// pipeline that stores every event in RocksDB (keeps working offline), and an HTTP API with
/// health, Prometheus metrics and queries. With no configuration it starts on embedded
/// defaults: devices on 0.0.0.0:1883, API on 127.0.0.1:8081, data in ./data/edge.
/// Settings come from defaults, then the TOML file, then MILLRACE_EDGE_* variables
/// (MILLRACE_EDGE_MQTT__LISTEN=0.0.0.0:1884); see docs/configuration.md.
#[derive(Debug, Parser)]
#[command(name = "millrace-edge", version, propagate_version = true)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, global = true, env = "MILLRACE_EDGE_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the edge node (the default).
    Run,
    /// Hash a device password for `[[mqtt.users]]` (reads the password from standard input).
    HashPassword,
    /// Load and check the configuration, print it as TOML (API keys hidden) and exit.
    CheckConfig,
    /// Report the store's size and points per column family (the edge must be stopped).
    StoreStats {
        /// First seal every raw point into blocks and compact fully (what the store does over
        /// time), to measure the size data settles at.
        #[arg(long)]
        compact: bool,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::HashPassword => {
            if std::io::stdin().is_terminal() {
                eprintln!("password (input is shown; pipe it in to avoid that):");
            }
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.len() < 8 {
                bail!("the password must be at least 8 characters");
            }
            println!("{}", millrace_edge::broker::hash_password(password));
        }
        Command::CheckConfig => {
            let mut cfg = EdgeConfig::load(cli.config.as_deref())?;
            cfg.http
                .api_keys
                .iter_mut()
                .for_each(|k| *k = "<hidden>".into());
            if !cfg.sync.token.is_empty() {
                cfg.sync.token = "<hidden>".into();
            }
            print!(
                "{}",
                toml::to_string_pretty(&cfg).context("render configuration")?
            );
        }
        Command::StoreStats { compact } => {
            let cfg = EdgeConfig::load(cli.config.as_deref())?;
            let path = cfg.data_dir.join("rocksdb");
            let store = millrace_edge::store::Store::open(&path, cfg.store.options(None))
                .with_context(|| format!("open {} (is the edge still running?)", path.display()))?;
            if compact {
                store.seal_all()?;
                store.compact()?;
            }
            let sizes = store.size_by_cf()?;
            let mut points = 0u64;
            for s in store.series() {
                points += store
                    .points(&s.name, i64::MIN, i64::MAX)?
                    .map_or(0, |p| p.len() as u64);
            }
            let total: u64 = sizes.values().sum();
            let telemetry = sizes["head"] + sizes["blocks"];
            println!(
                "{}",
                serde_json::json!({
                    "bytes_by_cf": sizes,
                    "bytes_total": total,
                    "series": store.series().len(),
                    "points": points,
                    "telemetry_bytes_per_point": if points > 0 { telemetry as f64 / points as f64 } else { 0.0 },
                    "all_bytes_per_point": if points > 0 { total as f64 / points as f64 } else { 0.0 },
                })
            );
        }
        Command::Run => {
            let cfg = EdgeConfig::load(cli.config.as_deref())?;
            let edge = Edge::start(cfg).await?;
            eprintln!(
                "millrace-edge: devices on mqtt://{}, API on http://{}",
                edge.mqtt_addr, edge.http_addr
            );
            shutdown_signal().await;
            tracing::info!("shutting down");
            edge.shutdown().await;
        }
    }
    Ok(())
}
