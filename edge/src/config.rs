//! Edge configuration: defaults, then a TOML file, then `MILLRACE_EDGE_*` environment
//! variables (`__` separates levels: `MILLRACE_EDGE_MQTT__LISTEN=0.0.0.0:1884`), then validation.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use millrace_shared::service::{ConfigLoadError, load_config};
use serde::{Deserialize, Serialize};

use crate::store::StoreOptions;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or has wrong fields.
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value is not acceptable.
    #[error("configuration: `{field}`: {reason}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// A device allowed to connect to the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceUser {
    /// MQTT username.
    pub username: String,
    /// Argon2 PHC string from `millrace-edge hash-password`; the password itself is never stored.
    pub password_hash: String,
}

/// An extra TLS listener (served by rumqttd, one protocol version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    /// Address to listen on, e.g. `0.0.0.0:8883`.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// `v4` (MQTT 3.1.1) or `v5`.
    #[serde(default = "default_tls_protocol")]
    pub protocol: String,
    /// Also serve MQTT over secure WebSocket (`wss://`) with this certificate on this address
    /// (3.1.1 and 5).
    #[serde(default)]
    pub ws_listen: Option<SocketAddr>,
}

fn default_tls_protocol() -> String {
    "v4".into()
}

/// The embedded MQTT broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// The device port: MQTT 3.1.1 and 5 on one address.
    pub listen: SocketAddr,
    /// Also serve MQTT 3.1.1 directly on this address (no protocol detection).
    pub v4_listen: Option<SocketAddr>,
    /// Also serve MQTT 5 directly on this address.
    pub v5_listen: Option<SocketAddr>,
    /// Also serve MQTT (3.1.1 and 5) over WebSocket on this address, for browser HMIs and
    /// clients behind HTTP proxies: the same credentials and the same durable ingest as TCP.
    pub ws_listen: Option<SocketAddr>,
    /// A TLS listener.
    pub tls: Option<TlsListener>,
    /// Let devices connect without a username and password. Off unless set.
    pub allow_anonymous: bool,
    /// Devices and their password hashes.
    pub users: Vec<DeviceUser>,
    /// Most devices connected at once.
    pub max_connections: usize,
    /// Largest MQTT payload the broker accepts (larger ones end the connection). Payloads over
    /// 64 KiB are accepted by the broker but refused by ingest, and land in dead letters.
    pub max_payload_bytes: usize,
    /// rumqttd keeps messages in memory per subscription filter in segments: memory per filter
    /// is at most `segment_bytes × segment_count`.
    pub segment_bytes: usize,
    /// See `segment_bytes`.
    pub segment_count: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1883".parse().expect("valid"),
            v4_listen: None,
            v5_listen: None,
            ws_listen: None,
            tls: None,
            allow_anonymous: false,
            users: vec![],
            max_connections: 10_000,
            max_payload_bytes: 1 << 20,
            segment_bytes: 8 << 20,
            segment_count: 4,
        }
    }
}

/// The HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the API, health and metrics.
    pub listen: SocketAddr,
    /// Keys accepted as `Authorization: Bearer <key>` on `/api/`. Without keys the API only
    /// listens on loopback.
    pub api_keys: Vec<String>,
    /// Most points one query may return (use downsampling for more).
    pub max_points: usize,
    /// Limits on what one client may hold: connections, header and body time and size.
    pub limits: millrace_shared::service::http::HttpLimits,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8081".parse().expect("valid"),
            api_keys: vec![],
            max_points: 100_000,
            limits: Default::default(),
        }
    }
}

/// The ingest pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Store what devices send. Off only to measure the bare broker in benchmarks.
    pub enabled: bool,
    /// Most events in one RocksDB batch.
    pub max_batch: usize,
    /// Sequence numbers remembered per device to recognise duplicates cheaply (older duplicates
    /// are still stored once, by key).
    pub dedup_window: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch: 4096,
            dedup_window: 4096,
        }
    }
}

/// How long each kind of data is kept; `0s` keeps it forever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Telemetry points.
    #[serde(with = "humantime_serde")]
    pub telemetry: Duration,
    /// State, part and operator events.
    #[serde(with = "humantime_serde")]
    pub events: Duration,
    /// Dead letters.
    #[serde(with = "humantime_serde")]
    pub dead_letters: Duration,
    /// Function invocation records.
    #[serde(with = "humantime_serde")]
    pub invocations: Duration,
    /// Alerts raised by functions.
    #[serde(with = "humantime_serde")]
    pub alerts: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        let d = StoreOptions::default();
        Self {
            telemetry: d.telemetry_retention,
            events: d.event_retention,
            dead_letters: d.dead_letter_retention,
            invocations: d.invocation_retention,
            alerts: d.alert_retention,
        }
    }
}

/// The RocksDB store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// fsync every write batch (group commit). Off trades power-loss safety for speed; a
    /// process crash loses nothing written either way.
    pub sync_writes: bool,
    /// Time window of one compressed telemetry block.
    #[serde(with = "humantime_serde")]
    pub block_window: Duration,
    /// How long a window stays open for late points after it ends.
    #[serde(with = "humantime_serde")]
    pub seal_grace: Duration,
    /// How often sealing and retention run.
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    /// Retention per kind of data.
    pub retention: RetentionConfig,
    /// RocksDB block cache, bytes.
    pub cache_bytes: usize,
    /// RocksDB memtable size per column family, bytes.
    pub write_buffer_bytes: usize,
    /// RocksDB memtables of all column families together at most, bytes (0: no total limit).
    pub memtable_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let d = StoreOptions::default();
        Self {
            sync_writes: d.sync_writes,
            block_window: d.block_window,
            seal_grace: d.seal_grace,
            maintenance_interval: Duration::from_secs(30),
            retention: RetentionConfig::default(),
            cache_bytes: d.cache_bytes,
            write_buffer_bytes: d.write_buffer_bytes,
            memtable_bytes: d.memtable_bytes,
        }
    }
}

impl StoreConfig {
    /// The store's options (`outbox_quota`: keep an outbox of that many bytes for sync).
    pub fn options(&self, outbox_quota: Option<u64>) -> StoreOptions {
        StoreOptions {
            outbox_quota_bytes: outbox_quota,
            recent_events: StoreOptions::default().recent_events,
            sync_writes: self.sync_writes,
            block_window: self.block_window,
            seal_grace: self.seal_grace,
            telemetry_retention: self.retention.telemetry,
            event_retention: self.retention.events,
            dead_letter_retention: self.retention.dead_letters,
            invocation_retention: self.retention.invocations,
            alert_retention: self.retention.alerts,
            cache_bytes: self.cache_bytes,
            write_buffer_bytes: self.write_buffer_bytes,
            memtable_bytes: self.memtable_bytes,
        }
    }
}

/// Sync to the cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Forward everything stored to the cloud. Off: no outbox is kept.
    pub enabled: bool,
    /// The cloud's base URL, e.g. `http://cloud.example:8090`.
    pub cloud_url: String,
    /// This edge's token (from `millrace-cloud edge-token`). Prefer the environment variable
    /// `MILLRACE_EDGE_SYNC__TOKEN` to keep it out of files.
    pub token: String,
    /// Most items per batch.
    pub batch_max_items: usize,
    /// About the most record bytes per batch.
    pub batch_max_bytes: u64,
    /// How long to wait for more data before sending a small batch.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Timeout of one request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First delay after a failure (doubles up to `retry_max`, with jitter).
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest delay between retries.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Disk quota of the outbox in bytes (records' key + value sizes).
    pub outbox_quota_bytes: u64,
    /// Data sent later than this after it was stored is marked as backfill.
    #[serde(with = "humantime_serde")]
    pub live_window: Duration,
    /// Upper bound of bytes per second on the wire; 0 means no limit.
    pub max_bytes_per_sec: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            cloud_url: "http://127.0.0.1:8090".into(),
            token: String::new(),
            batch_max_items: 20_000,
            batch_max_bytes: 4 << 20,
            linger: Duration::from_millis(200),
            request_timeout: Duration::from_secs(30),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            outbox_quota_bytes: 2 << 30,
            live_window: Duration::from_secs(30),
            max_bytes_per_sec: 0,
        }
    }
}

/// The whole edge configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeConfig {
    /// This edge's name (used by sync and in logs).
    pub edge_id: String,
    /// Where RocksDB keeps its files.
    pub data_dir: PathBuf,
    /// The MQTT broker.
    pub mqtt: MqttConfig,
    /// The HTTP API.
    pub http: HttpConfig,
    /// The ingest pipeline.
    pub ingest: IngestConfig,
    /// The store.
    pub store: StoreConfig,
    /// Sync to the cloud.
    pub sync: SyncConfig,
    /// On-device functions.
    pub functions: FunctionsConfig,
    /// The Sparkplug B host.
    pub sparkplug: crate::sparkplug::SparkplugConfig,
}

/// On-device functions: defaults for deployed functions and the runtime's bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunctionsConfig {
    /// Run functions. Off: deployed functions are kept but nothing triggers them.
    pub enabled: bool,
    /// Default time limit of one invocation (a function may set its own).
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// Default memory cap of one invocation, MiB.
    pub default_memory_mib: u32,
    /// Default scheduled and manual invocations of one function running at once.
    pub default_concurrency: u32,
    /// Default queue bound per function for scheduled and manual triggers (beyond it a manual
    /// call is refused and a scheduled run dropped, counted; topic triggers wait in the log).
    pub default_queue: u32,
    /// Largest module accepted, bytes.
    pub max_module_bytes: usize,
    /// Largest memory cap a function may ask for, MiB.
    pub max_memory_mib: u32,
    /// Module versions kept per function (older ones are deleted on deploy).
    pub keep_versions: u32,
    /// Record successful invocations in the log too (failures are always recorded).
    pub log_successes: bool,
    /// Nice value of function threads (trigger-log readers, replays, workers; 0..=19): above
    /// 0, ingest gets the CPU first when both want it. 19 by default: a function that falls
    /// behind loses nothing (its triggers wait in the log), so ingest comes first.
    pub nice: u8,
}

impl Default for FunctionsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            default_timeout: Duration::from_millis(100),
            default_memory_mib: 16,
            default_concurrency: 1,
            default_queue: 1024,
            max_module_bytes: 8 << 20,
            max_memory_mib: 256,
            keep_versions: 5,
            log_successes: true,
            nice: 19,
        }
    }
}

impl Default for EdgeConfig {
    fn default() -> Self {
        Self {
            edge_id: "edge-1".into(),
            data_dir: PathBuf::from("data/edge"),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            ingest: IngestConfig::default(),
            store: StoreConfig::default(),
            sync: SyncConfig::default(),
            functions: FunctionsConfig::default(),
            sparkplug: crate::sparkplug::SparkplugConfig::default(),
        }
    }
}

impl EdgeConfig {
    /// Loads defaults, then `file` if given, then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg: EdgeConfig = load_config(file, "MILLRACE_EDGE_").map_err(|e| match e {
            ConfigLoadError::Missing(_) => ConfigError::Invalid {
                field: "--config",
                reason: e.to_string(),
            },
            ConfigLoadError::Read(e) => ConfigError::Load(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if millrace_shared::topic::validate_id("edge_id", &self.edge_id).is_err() {
            return invalid("edge_id", "1 to 64 characters of A-Z a-z 0-9 _ -");
        }
        if let Err((field, reason)) = self.http.limits.validate() {
            return invalid(field, reason);
        }
        let f = &self.functions;
        if f.default_timeout.is_zero() || f.default_timeout > Duration::from_secs(60) {
            return invalid("functions.default_timeout", "between 1ms and 60s");
        }
        if f.max_memory_mib == 0 || f.max_memory_mib > 4096 {
            return invalid("functions.max_memory_mib", "between 1 and 4096");
        }
        if f.default_memory_mib == 0 || f.default_memory_mib > f.max_memory_mib {
            return invalid(
                "functions.default_memory_mib",
                "between 1 and functions.max_memory_mib",
            );
        }
        if f.default_concurrency == 0 || f.default_concurrency > 64 {
            return invalid("functions.default_concurrency", "between 1 and 64");
        }
        if f.default_queue == 0 || f.default_queue > 1_000_000 {
            return invalid("functions.default_queue", "between 1 and 1000000");
        }
        if f.nice > 19 {
            return invalid("functions.nice", "between 0 and 19");
        }
        if f.keep_versions == 0 {
            return invalid("functions.keep_versions", "at least 1");
        }
        if self.sync.enabled {
            if !(self.sync.cloud_url.starts_with("http://")
                || self.sync.cloud_url.starts_with("https://"))
            {
                return invalid("sync.cloud_url", "an http:// or https:// URL");
            }
            if self.sync.token.len() < 16 {
                return invalid(
                    "sync.token",
                    "missing or shorter than 16 characters: create one with `millrace-cloud edge-token <edge_id>` and set MILLRACE_EDGE_SYNC__TOKEN",
                );
            }
            if self.sync.batch_max_items == 0 || self.sync.batch_max_bytes < 1024 {
                return invalid(
                    "sync.batch_max_items",
                    "at least 1 item and batch_max_bytes at least 1024",
                );
            }
            if self.sync.outbox_quota_bytes < 1 << 20 {
                return invalid("sync.outbox_quota_bytes", "at least 1 MiB (1048576)");
            }
        }
        if self.mqtt.max_connections == 0 {
            return invalid(
                "mqtt.max_connections",
                "must be at least 1 (rumqttd drops every connection at 0)",
            );
        }
        if self.mqtt.segment_bytes < 1024 || self.mqtt.segment_count == 0 {
            return invalid(
                "mqtt.segment_bytes",
                "segments must be at least 1024 bytes and segment_count at least 1",
            );
        }
        if self.mqtt.max_payload_bytes < 1024 {
            return invalid("mqtt.max_payload_bytes", "must be at least 1024");
        }
        for u in &self.mqtt.users {
            if u.username.is_empty() {
                return invalid("mqtt.users", "a user has an empty username");
            }
            if argon2::PasswordHash::new(&u.password_hash).is_err() {
                return Err(ConfigError::Invalid {
                    field: "mqtt.users",
                    reason: format!(
                        "password_hash of `{}` is not a PHC string: create one with `millrace-edge hash-password`",
                        u.username
                    ),
                });
            }
        }
        if let Some(tls) = &self.mqtt.tls {
            if tls.protocol != "v4" && tls.protocol != "v5" {
                return invalid("mqtt.tls.protocol", "`v4` (MQTT 3.1.1) or `v5`");
            }
            for p in [&tls.cert, &tls.key] {
                if !p.exists() {
                    return Err(ConfigError::Invalid {
                        field: "mqtt.tls",
                        reason: format!("{} does not exist", p.display()),
                    });
                }
            }
        }
        if self.http.api_keys.is_empty() && !self.http.listen.ip().is_loopback() {
            return invalid(
                "http.api_keys",
                "the API listens beyond loopback, so it needs at least one key",
            );
        }
        if self.http.api_keys.iter().any(|k| k.len() < 16) {
            return invalid("http.api_keys", "keys must be at least 16 characters");
        }
        self.sparkplug
            .validate()
            .map_err(|e| ConfigError::Invalid {
                field: "sparkplug",
                reason: e.to_string(),
            })?;
        if self.ingest.max_batch == 0 {
            return invalid("ingest.max_batch", "must be at least 1");
        }
        if self.store.block_window < Duration::from_secs(1) {
            return invalid("store.block_window", "must be at least 1s");
        }
        if self.store.maintenance_interval < Duration::from_millis(10) {
            return invalid("store.maintenance_interval", "must be at least 10ms");
        }
        Ok(())
    }
}

#[cfg(test)]
// figment's test jail returns its own large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn starts_with_no_config_at_all() {
        let c = EdgeConfig::default();
        c.validate().unwrap();
        assert!(
            !c.mqtt.allow_anonymous,
            "anonymous access is off unless configured"
        );
    }

    #[test]
    fn sync_settings_are_checked() {
        let err = |f: &dyn Fn(&mut EdgeConfig)| {
            let mut c = EdgeConfig::default();
            c.sync.enabled = true;
            c.sync.token = "t".repeat(32);
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(err(&|c| c.sync.token.clear()).contains("millrace-cloud edge-token"));
        assert!(err(&|c| c.sync.cloud_url = "cloud:8090".into()).contains("sync.cloud_url"));
        assert!(err(&|c| c.sync.batch_max_items = 0).contains("sync.batch_max_items"));
        assert!(err(&|c| c.sync.outbox_quota_bytes = 1000).contains("sync.outbox_quota_bytes"));
        let mut ok = EdgeConfig::default();
        ok.sync.enabled = true;
        ok.sync.token = "t".repeat(32);
        ok.validate().unwrap();
    }

    #[test]
    fn function_settings_are_checked() {
        let err = |f: &dyn Fn(&mut FunctionsConfig)| {
            let mut c = EdgeConfig::default();
            f(&mut c.functions);
            c.validate().unwrap_err().to_string()
        };
        assert!(err(&|f| f.default_timeout = Duration::ZERO).contains("functions.default_timeout"));
        assert!(
            err(&|f| f.default_timeout = Duration::from_secs(61))
                .contains("functions.default_timeout")
        );
        assert!(err(&|f| f.max_memory_mib = 0).contains("functions.max_memory_mib"));
        assert!(err(&|f| f.default_memory_mib = 512).contains("functions.default_memory_mib"));
        assert!(err(&|f| f.default_concurrency = 0).contains("functions.default_concurrency"));
        assert!(err(&|f| f.default_queue = 0).contains("functions.default_queue"));
        assert!(err(&|f| f.nice = 20).contains("functions.nice"));
        assert!(err(&|f| f.keep_versions = 0).contains("functions.keep_versions"));
    }

    #[test]
    fn file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("edge.toml", "edge_id = \"hall-3\"\n[mqtt]\nallow_anonymous = true\n[store.retention]\ntelemetry = \"2days\"\n")?;
            jail.set_env("MILLRACE_EDGE_MQTT__LISTEN", "127.0.0.1:1999");
            let c = EdgeConfig::load(Some(Path::new("edge.toml"))).unwrap();
            assert_eq!(c.edge_id, "hall-3");
            assert!(c.mqtt.allow_anonymous);
            assert_eq!(c.mqtt.listen.port(), 1999);
            assert_eq!(c.store.retention.telemetry, Duration::from_secs(2 * 86_400));
            assert_eq!(c.store.retention.events, Duration::from_secs(90 * 86_400));
            Ok(())
        });
    }

    #[test]
    fn mistakes_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("a.toml", "[mqtt]\nlisen = \"x\"\n")?;
            let e = EdgeConfig::load(Some(Path::new("a.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("unknown field") && e.contains("lisen"), "{e}");
            jail.create_file("b.toml", "[mqtt]\nmax_connections = 0\n")?;
            let e = EdgeConfig::load(Some(Path::new("b.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("mqtt.max_connections"), "{e}");
            jail.create_file("c.toml", "[http]\nlisten = \"0.0.0.0:8081\"\n")?;
            let e = EdgeConfig::load(Some(Path::new("c.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("needs at least one key"), "{e}");
            jail.create_file(
                "d.toml",
                "[[mqtt.users]]\nusername = \"a\"\npassword_hash = \"secret\"\n",
            )?;
            let e = EdgeConfig::load(Some(Path::new("d.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("not a PHC string"), "{e}");
            assert!(
                !e.contains("secret"),
                "the configured value is not echoed: {e}"
            );
            jail.create_file("e.toml", "[mqtt]\nws_listen = \"127.0.0.1:8083\"\n")?;
            let c = EdgeConfig::load(Some(Path::new("e.toml"))).unwrap();
            assert_eq!(c.mqtt.ws_listen, Some("127.0.0.1:8083".parse().unwrap()));
            jail.create_file("f.toml", "[mqtt.tls]\nlisten = \"127.0.0.1:8883\"\ncert = \"nope.pem\"\nkey = \"nope.key\"\n")?;
            let e = EdgeConfig::load(Some(Path::new("f.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("nope.pem does not exist"), "{e}");
            let e = EdgeConfig::load(Some(Path::new("missing.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("does not exist"), "{e}");
            Ok(())
        });
    }
}
