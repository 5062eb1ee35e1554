//! `millrace-cloud`: the Millrace cloud aggregator.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use millrace_cloud::Cloud;
use millrace_cloud::config::{CloudConfig, token_digest};
use rand::RngCore;

/// The Millrace cloud aggregator.
///
/// Receives what the edges sync (each batch stored durably and exactly once), keeps it as a
/// Parquet dataset partitioned by date and site, and serves factory reports (OEE, production,
/// downtime, telemetry) over a REST API with a live dashboard. With no configuration it starts
/// on embedded defaults: API on 127.0.0.1:8090, data in ./data/cloud. Settings come from
/// defaults, then the TOML file, then MILLRACE_CLOUD_* variables
/// (MILLRACE_CLOUD_HTTP__LISTEN=0.0.0.0:8090); see docs/configuration.md.
#[derive(Debug, Parser)]
#[command(name = "millrace-cloud", version, propagate_version = true)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, global = true, env = "MILLRACE_CLOUD_CONFIG")]
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
    /// Run the cloud aggregator (the default).
    Run,
    /// Create a sync token for an edge: prints the token (for the edge's
    /// MILLRACE_EDGE_SYNC__TOKEN) and the line for the cloud's [edges] table.
    EdgeToken {
        /// The edge's id (its `edge_id`).
        edge_id: String,
    },
    /// Load and check the configuration, print it as TOML (keys hidden) and exit.
    CheckConfig,
    /// Convert a dataset written before Delta Lake (a `manifest.log` in the data directory) to
    /// Delta tables, then print what the tables hold. Safe to run again; `run` also converts
    /// at start when needed. Stop the cloud first.
    Migrate {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn init_logs(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::EdgeToken { edge_id } => {
            millrace_shared::topic::validate_id("edge_id", &edge_id)
                .context("edge ids are 1 to 64 characters of A-Z a-z 0-9 _ -")?;
            let mut raw = [0u8; 32];
            rand::rng().fill_bytes(&mut raw);
            let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let token = format!("mrt_{token}");
            println!("# on the edge (keep it secret):");
            println!("MILLRACE_EDGE_SYNC__TOKEN={token}");
            println!("# in the cloud's configuration:");
            println!("[edges.{edge_id}]");
            println!("token_sha256 = \"{}\"", token_digest(&token));
        }
        Command::CheckConfig => {
            let mut cfg = CloudConfig::load(cli.config.as_deref())?;
            for k in cfg
                .http
                .read_keys
                .iter_mut()
                .chain(cfg.http.admin_keys.iter_mut())
            {
                *k = "<hidden>".into();
            }
            print!(
                "{}",
                toml::to_string_pretty(&cfg).context("render configuration")?
            );
        }
        Command::Migrate { json } => {
            let cfg = CloudConfig::load(cli.config.as_deref())?;
            if cfg.storage.url.is_some() {
                anyhow::bail!(
                    "migrate converts a dataset of an older version in data_dir on the local disk; unset storage.url to run it, then copy the converted tables to the bucket"
                );
            }
            let dir = cfg.data_dir.clone();
            let summary = tokio::task::spawn_blocking(move || {
                let had_manifest = dir.join("manifest.log").exists();
                let ds = millrace_cloud::dataset::Dataset::open(&dir, cfg.dataset.fsync)?;
                anyhow::Ok((had_manifest, ds.sizes(), ds.edges()))
            })
            .await??;
            let (converted, sizes, edges) = summary;
            if json {
                let tables: serde_json::Map<String, serde_json::Value> = sizes
                    .iter()
                    .map(|(t, (files, rows))| {
                        (
                            t.as_str().to_owned(),
                            serde_json::json!({"files": files, "rows": rows}),
                        )
                    })
                    .collect();
                let edges: serde_json::Map<String, serde_json::Value> = edges
                    .iter()
                    .map(|(e, l)| {
                        (
                            e.clone(),
                            serde_json::json!({"items": l.items(), "batches": l.batches}),
                        )
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"converted": converted, "tables": tables, "edges": edges})
                );
            } else {
                println!(
                    "{}",
                    if converted {
                        "converted the dataset to Delta Lake tables"
                    } else {
                        "nothing to convert: the dataset is Delta Lake tables already"
                    }
                );
                println!("{:<12} {:>8} {:>12}", "TABLE", "FILES", "ROWS");
                for (t, (files, rows)) in &sizes {
                    println!("{:<12} {files:>8} {rows:>12}", t.as_str());
                }
                println!("{:<12} {:>8} {:>12}", "EDGE", "BATCHES", "ITEMS");
                for (e, l) in &edges {
                    println!("{e:<12} {:>8} {:>12}", l.batches, l.items());
                }
            }
        }
        Command::Run => {
            let cfg = CloudConfig::load(cli.config.as_deref())?;
            let cloud = Cloud::start(cfg).await?;
            eprintln!("millrace-cloud: API on http://{}", cloud.addr);
            millrace_shared::service::shutdown_signal().await;
            tracing::info!("shutting down");
            cloud.shutdown().await;
        }
    }
    Ok(())
}
