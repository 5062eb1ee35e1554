//! `millrace-edge`: the Millrace edge node.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use millrace_edge::Edge;
use millrace_edge::config::EdgeConfig;

mod fn_cli;
use fn_cli::Shown;

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

// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
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
    /// Manage on-device functions on a running edge (through its HTTP API).
    #[command(name = "fn")]
    Fn {
        /// The edge's HTTP API.
        #[arg(
            long,
            env = "MILLRACE_EDGE_URL",
            default_value = "http://127.0.0.1:8081"
        )]
        url: String,
        /// API key, if the edge requires one.
        #[arg(long, env = "MILLRACE_EDGE_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Print the API's JSON answer instead of a table (for scripts).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: FnCommand,
    },
    /// Sparkplug B nodes on a running edge (through its HTTP API).
    Sparkplug {
        /// The edge's HTTP API.
        #[arg(
            long,
            global = true,
            env = "MILLRACE_EDGE_URL",
            default_value = "http://127.0.0.1:8081"
        )]
        url: String,
        /// API key, if the edge requires one.
        #[arg(
            long,
            global = true,
            env = "MILLRACE_EDGE_API_KEY",
            hide_env_values = true
        )]
        api_key: Option<String>,
        /// Print the API's JSON answer instead of a table (for scripts).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: SparkplugCommand,
    },
}

#[derive(Debug, Subcommand)]
enum SparkplugCommand {
    /// List the nodes seen since the edge started, their devices, births and sequence gaps.
    Nodes,
    /// Ask a node to publish its births again (NCMD Node Control/Rebirth).
    Rebirth {
        /// The node, as GROUP/NODE.
        node: String,
    },
}

#[derive(Debug, Subcommand)]
enum FnCommand {
    /// Deploy a function, or a new version of it (a .wasm or .wat module).
    Deploy {
        /// Function name (a-z 0-9 - _).
        name: String,
        /// The module: binary Wasm or WAT text.
        module: PathBuf,
        /// MQTT topic filter that triggers it (repeat for several; `+` and `#` wildcards).
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// Cron schedule, UTC ("0 * * * *": hourly; 6 fields: seconds first).
        #[arg(long)]
        schedule: Option<String>,
        /// Time limit per invocation, e.g. 100ms.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Memory cap, MiB.
        #[arg(long)]
        memory_mib: Option<u32>,
        /// Scheduled and manual invocations running at once (topic triggers run one at a
        /// time, in order).
        #[arg(long)]
        concurrency: Option<u32>,
        /// Scheduled and manual triggers waiting at most (topic triggers wait in the edge's
        /// trigger log instead, never dropped).
        #[arg(long)]
        queue: Option<u32>,
        /// Most events per invocation of a module exporting `handle_batch` (it gets what is
        /// waiting, up to this).
        #[arg(long)]
        batch_max: Option<u32>,
        /// Run it over stored history from this time (Unix ms, RFC 3339 or -7d) before it goes
        /// live (`fn list` shows the replay's progress).
        #[arg(long = "from", allow_hyphen_values = true)]
        replay_from: Option<String>,
        /// Deploy it disabled.
        #[arg(long)]
        disabled: bool,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
    },
    /// List deployed functions: triggers, events handled, invocations, failures, lag behind
    /// the trigger log, replay progress.
    List,
    /// Show one function.
    Show {
        /// Function name.
        name: String,
    },
    /// Enable a function.
    Enable {
        /// Function name.
        name: String,
    },
    /// Disable a function (kept, not triggered).
    Disable {
        /// Function name.
        name: String,
    },
    /// Delete a function, its versions and its key-value state.
    Delete {
        /// Function name.
        name: String,
    },
    /// Run a function now with a payload and print the invocation record.
    Invoke {
        /// Function name.
        name: String,
        /// The topic the function sees (a device topic makes the payload a device event).
        #[arg(long)]
        topic: Option<String>,
        /// The payload.
        #[arg(long, conflicts_with = "payload_file")]
        payload: Option<String>,
        /// Read the payload from a file.
        #[arg(long)]
        payload_file: Option<PathBuf>,
    },
    /// Show the invocation log, newest first.
    Logs {
        /// Only this function.
        #[arg(long)]
        function: Option<String>,
        /// Only this outcome: ok, error, trap, timeout, memory.
        #[arg(long)]
        outcome: Option<String>,
        /// Only this trigger: topic, schedule, manual.
        #[arg(long)]
        trigger: Option<String>,
        /// At most this many records.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Run a function over stored history (its live triggers wait meanwhile), with a progress
    /// bar; Ctrl-C cancels it.
    Replay {
        /// Function name.
        name: String,
        /// Start: Unix ms, RFC 3339 (2026-12-01T00:00:00Z) or a duration before now (-7d).
        #[arg(long, required_unless_present = "cancel", allow_hyphen_values = true)]
        from: Option<String>,
        /// End (exclusive), as `--from`; default now.
        #[arg(long, allow_hyphen_values = true)]
        to: Option<String>,
        /// Cancel the running replay instead.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        cancel: bool,
        /// Start it and return without waiting.
        #[arg(long)]
        detach: bool,
    },
    /// Show a function's key-value state.
    Kv {
        /// Function name.
        name: String,
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// At most this many keys.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// Calls the edge's function API and prints the answer: for people, or its JSON with `json`.
async fn fn_command(
    url: &str,
    api_key: Option<&str>,
    json_out: bool,
    action: FnCommand,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    let http = reqwest::Client::new();
    let base = format!("{}/api/v1", url.trim_end_matches('/'));
    if let FnCommand::Replay {
        name,
        from,
        to,
        cancel,
        detach,
    } = action
    {
        return fn_cli::replay(
            &http,
            &base,
            (url, api_key),
            &name,
            fn_cli::ReplayArgs {
                from,
                to,
                cancel,
                detach,
                json: json_out,
            },
        )
        .await;
    }
    let (shown, name) = match &action {
        FnCommand::Deploy { name, .. } => (Shown::Deployed, Some(name.clone())),
        FnCommand::List => (Shown::List, None),
        FnCommand::Show { name } => (Shown::Show, Some(name.clone())),
        FnCommand::Enable { name } => (Shown::Changed("enabled"), Some(name.clone())),
        FnCommand::Disable { name } => (Shown::Changed("disabled"), Some(name.clone())),
        FnCommand::Delete { name } => (Shown::Changed("deleted"), Some(name.clone())),
        FnCommand::Invoke { name, .. } => (Shown::Invoked, Some(name.clone())),
        FnCommand::Logs { .. } => (Shown::Logs, None),
        FnCommand::Kv { name, .. } => (Shown::Kv, Some(name.clone())),
        FnCommand::Replay { .. } => unreachable!("handled above"),
    };
    let req = match action {
        FnCommand::Deploy {
            name,
            module,
            topics,
            schedule,
            timeout,
            memory_mib,
            concurrency,
            queue,
            batch_max,
            replay_from,
            disabled,
            description,
        } => {
            let bytes = std::fs::read(&module)
                .with_context(|| format!("read the module {}", module.display()))?;
            let body = millrace_edge::functions::DeployRequest {
                module_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                topics,
                schedule,
                timeout_ms: timeout.map(|t| t.as_millis() as u64),
                memory_mib,
                concurrency,
                queue,
                batch_max,
                replay_from,
                enabled: Some(!disabled),
                description,
                ..Default::default()
            };
            http.put(format!("{base}/functions/{name}")).json(&body)
        }
        FnCommand::List => http.get(format!("{base}/functions")),
        FnCommand::Show { name } => http.get(format!("{base}/functions/{name}")),
        FnCommand::Enable { name } => http.post(format!("{base}/functions/{name}/enable")),
        FnCommand::Disable { name } => http.post(format!("{base}/functions/{name}/disable")),
        FnCommand::Delete { name } => http.delete(format!("{base}/functions/{name}")),
        FnCommand::Invoke {
            name,
            topic,
            payload,
            payload_file,
        } => {
            let body = match (payload, payload_file) {
                (Some(p), _) => p.into_bytes(),
                (None, Some(f)) => std::fs::read(&f)
                    .with_context(|| format!("read the payload {}", f.display()))?,
                (None, None) => vec![],
            };
            let mut r = http.post(format!("{base}/functions/{name}/invoke"));
            if let Some(t) = topic {
                r = r.query(&[("topic", t)]);
            }
            r.body(body)
        }
        FnCommand::Logs {
            function,
            outcome,
            trigger,
            limit,
        } => {
            let mut q = vec![("limit", limit.to_string())];
            q.extend(function.map(|f| ("function", f)));
            q.extend(outcome.map(|o| ("outcome", o)));
            q.extend(trigger.map(|t| ("trigger", t)));
            http.get(format!("{base}/invocations")).query(&q)
        }
        FnCommand::Replay { .. } => unreachable!("handled above"),
        FnCommand::Kv {
            name,
            prefix,
            limit,
        } => {
            let mut q = vec![("limit", limit.to_string())];
            q.extend(prefix.map(|p| ("prefix", p)));
            http.get(format!("{base}/functions/{name}/kv")).query(&q)
        }
    };
    match fn_cli::call(req, api_key, url).await? {
        Some(j) if json_out => println!("{}", serde_json::to_string_pretty(&j)?),
        Some(j) => println!("{}", fn_cli::render(shown, name.as_deref(), &j)),
        None if json_out => {}
        None => println!(
            "{}",
            fn_cli::render(shown, name.as_deref(), &serde_json::Value::Null)
        ),
    }
    Ok(())
}

/// Calls the edge's Sparkplug API and prints the answer.
async fn sparkplug_command(
    url: &str,
    api_key: Option<&str>,
    json_out: bool,
    action: SparkplugCommand,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let base = format!("{}/api/v1/sparkplug", url.trim_end_matches('/'));
    let answer = match &action {
        SparkplugCommand::Nodes => fn_cli::call(http.get(format!("{base}/nodes")), api_key, url),
        SparkplugCommand::Rebirth { node } => {
            let Some((group, node)) = node
                .split_once('/')
                .filter(|(g, n)| !g.is_empty() && !n.is_empty() && !n.contains('/'))
            else {
                anyhow::bail!("`{node}` is not GROUP/NODE (e.g. plant1/gateway-3)");
            };
            fn_cli::call(
                http.post(format!("{base}/nodes/{group}/{node}/rebirth")),
                api_key,
                url,
            )
        }
    }
    .await?
    .unwrap_or_default();
    if json_out {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        match action {
            SparkplugCommand::Nodes => println!("{}", fn_cli::sparkplug_nodes(&answer)),
            SparkplugCommand::Rebirth { node } => {
                println!(
                    "asked {node} to rebirth ({})",
                    answer["sent"].as_str().unwrap_or_default()
                )
            }
        }
    }
    Ok(())
}

fn init_logs(format: LogFormat) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,rumqttd=warn".into());
    // rumqttd opens an ERROR-level span for every packet it routes, with the topic as a `Debug`
    // field: the text formatter rendered each topic byte by byte (~6 % of the edge's CPU under
    // load). Those per-packet spans carry nothing our logs need; connection spans stay.
    let per_packet = tracing_subscriber::filter::filter_fn(|m| {
        !(m.is_span()
            && m.target().starts_with("rumqttd")
            && matches!(
                m.name(),
                "publish" | "puback" | "incoming_payload" | "[>] incoming"
            ))
    });
    let filter = filter.and(per_packet);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter))
            .init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mmap_threshold_fixed = millrace_edge::allocator::fix_mmap_threshold();
    let cli = Cli::parse();
    init_logs(cli.log_format);
    tracing::debug!(
        mmap_threshold_fixed,
        bytes = millrace_edge::allocator::MMAP_THRESHOLD,
        "allocator tuned"
    );
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
        Command::Fn {
            url,
            api_key,
            json,
            action,
        } => fn_command(&url, api_key.as_deref(), json, action).await?,
        Command::Sparkplug {
            url,
            api_key,
            json,
            action,
        } => sparkplug_command(&url, api_key.as_deref(), json, action).await?,
        Command::Run => {
            let cfg = EdgeConfig::load(cli.config.as_deref())?;
            let edge = Edge::start(cfg).await?;
            eprintln!(
                "millrace-edge: devices on mqtt://{}, API on http://{}",
                edge.mqtt_addr, edge.http_addr
            );
            millrace_shared::service::shutdown_signal().await;
            tracing::info!("shutting down");
            edge.shutdown().await;
        }
    }
    Ok(())
}
