//! Cloud configuration: defaults, then a TOML file, then `MILLRACE_CLOUD_*` environment
//! variables (`__` separates levels: `MILLRACE_CLOUD_HTTP__LISTEN=0.0.0.0:8090`), then validation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use millrace_shared::service::{ConfigLoadError, load_config};
use millrace_shared::{MachineSpec, ShiftCalendar};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// An edge allowed to sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeAuth {
    /// SHA-256 (hex) of the edge's token, from `millrace-cloud edge-token`. Tokens are 256-bit
    /// random values, so a fast hash is enough; the token itself is never stored.
    pub token_sha256: String,
}

/// The SHA-256 hex digest of a token.
pub fn token_digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the API, the sync endpoint, the dashboard, health and metrics.
    pub listen: SocketAddr,
    /// Keys that may read reports (`Authorization: Bearer <key>` or `?api_key=` for the
    /// dashboard's event stream). Without any key the API only listens on loopback.
    pub read_keys: Vec<String>,
    /// Keys that may also change master data.
    pub admin_keys: Vec<String>,
    /// Largest sync request body, bytes (compressed).
    pub max_batch_bytes: usize,
    /// Largest decoded batch, bytes.
    pub max_batch_raw_bytes: usize,
    /// Longest time range one report may cover.
    #[serde(with = "humantime_serde")]
    pub max_query_range: Duration,
    /// Most rows a raw-data query returns.
    pub max_rows: usize,
    /// Limits on what one client may hold: connections, header and body time and size.
    pub limits: millrace_shared::service::http::HttpLimits,
    /// Most dashboards (server-sent event streams) open at once.
    pub max_live_subscribers: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8090".parse().expect("valid"),
            read_keys: vec![],
            admin_keys: vec![],
            max_batch_bytes: 32 << 20,
            max_batch_raw_bytes: 256 << 20,
            max_query_range: Duration::from_secs(400 * 86_400),
            max_rows: 1_000_000,
            limits: Default::default(),
            max_live_subscribers: 64,
        }
    }
}

/// The dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// fsync files and table log entries before acknowledging. Off loses acknowledged batches on
    /// power loss; only for tests of throughput.
    pub fsync: bool,
    /// How often small files are compacted.
    #[serde(with = "humantime_serde")]
    pub compaction_interval: Duration,
    /// A partition with at least this many files is compacted.
    pub compaction_min_files: usize,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            fsync: true,
            compaction_interval: Duration::from_secs(300),
            compaction_min_files: 16,
        }
    }
}

/// Where the dataset's tables live: the local disk (`data_dir`) by default, or an S3 bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `s3://bucket/prefix` (S3 or an S3-compatible store); unset: the tables are directories
    /// in `data_dir`. Credentials come from the environment as the AWS SDKs read them
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, web identity,
    /// container and instance credentials), never from this file.
    pub url: Option<String>,
    /// The endpoint of an S3-compatible store (`http://127.0.0.1:9000`); unset: AWS's for the
    /// region (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// The region; unset: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Allow an `http://` endpoint (a store on the same machine or in a test).
    pub allow_http: bool,
    /// Exactly one cloud node ever writes this dataset: start even if the store's conditional
    /// writes are not atomic (checked at start otherwise; several nodes on such a store would
    /// overwrite each other's commits).
    pub single_writer: bool,
}

impl StorageConfig {
    /// The bucket and the prefix of `url` (`s3://bucket/a/b` → `bucket`, `a/b`), if set.
    pub fn bucket(&self) -> Result<Option<(String, String)>, String> {
        let Some(u) = &self.url else { return Ok(None) };
        let parsed = url::Url::parse(u).map_err(|e| format!("`{u}` is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "s3" | "s3a") {
            return Err(format!(
                "`{u}`: only s3:// (S3 and S3-compatible stores) is supported; leave it unset for the local disk"
            ));
        }
        let bucket = parsed.host_str().unwrap_or_default();
        if bucket.is_empty() {
            return Err(format!("`{u}` names no bucket (s3://bucket/prefix)"));
        }
        let prefix = parsed.path().trim_matches('/').to_owned();
        Ok(Some((bucket.to_owned(), prefix)))
    }
}

/// Master data: machines and the shift calendar.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MasterConfig {
    /// Machines with their ideal cycle time, by `site/line/machine`.
    pub machines: Vec<MachineSpec>,
    /// Ideal cycle time for machines not listed, milliseconds (0: performance unknown).
    pub default_ideal_cycle_ms: u32,
    /// The shift calendar (UTC).
    pub calendar: ShiftCalendar,
}

/// The whole cloud configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// Where the dataset lives.
    pub data_dir: PathBuf,
    /// The HTTP API.
    pub http: HttpConfig,
    /// The dataset.
    pub dataset: DatasetConfig,
    /// Where the dataset's tables are stored.
    pub storage: StorageConfig,
    /// Edges allowed to sync, by edge id.
    pub edges: BTreeMap<String, EdgeAuth>,
    /// Master data.
    pub master: MasterConfig,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data/cloud"),
            http: HttpConfig::default(),
            dataset: DatasetConfig::default(),
            storage: StorageConfig::default(),
            edges: BTreeMap::new(),
            master: MasterConfig::default(),
        }
    }
}

impl CloudConfig {
    /// Loads defaults, then `file` if given, then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg: CloudConfig = load_config(file, "MILLRACE_CLOUD_").map_err(|e| match e {
            ConfigLoadError::Missing(_) => ConfigError::Invalid {
                field: "--config".into(),
                reason: e.to_string(),
            },
            ConfigLoadError::Read(e) => ConfigError::Load(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| {
            Err(ConfigError::Invalid {
                field: field.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if let Err((field, reason)) = self.http.limits.validate() {
            return invalid(field, reason);
        }
        if self.http.max_live_subscribers == 0 {
            return invalid("http.max_live_subscribers", "at least 1");
        }
        let keys = self.http.read_keys.iter().chain(&self.http.admin_keys);
        if keys.clone().any(|k| k.len() < 16) {
            return invalid("http.read_keys", "keys must be at least 16 characters");
        }
        if keys.count() == 0 && !self.http.listen.ip().is_loopback() {
            return invalid(
                "http.read_keys",
                "the API listens beyond loopback, so it needs at least one read or admin key",
            );
        }
        for (id, e) in &self.edges {
            if millrace_shared::topic::validate_id("edge", id).is_err() {
                return invalid(
                    &format!("edges.{id}"),
                    "edge ids are 1 to 64 characters of A-Z a-z 0-9 _ -",
                );
            }
            if e.token_sha256.len() != 64 || !e.token_sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return invalid(
                    &format!("edges.{id}.token_sha256"),
                    "64 hex digits: create it with `millrace-cloud edge-token <edge-id>`",
                );
            }
        }
        if self.http.max_batch_bytes < 1024 || self.http.max_batch_raw_bytes < 1024 {
            return invalid("http.max_batch_bytes", "at least 1024");
        }
        if let Err(reason) = self.storage.bucket() {
            return invalid("storage.url", &reason);
        }
        if let Some(e) = &self.storage.endpoint {
            match url::Url::parse(e) {
                Ok(u)
                    if u.scheme() == "https"
                        || (u.scheme() == "http" && self.storage.allow_http) => {}
                Ok(u) if u.scheme() == "http" => {
                    return invalid(
                        "storage.endpoint",
                        "an http:// endpoint needs storage.allow_http = true",
                    );
                }
                _ => return invalid("storage.endpoint", "an http(s):// URL"),
            }
        }
        if self.dataset.compaction_min_files < 2 {
            return invalid("dataset.compaction_min_files", "at least 2");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_with_no_config_and_checks_what_is_given() {
        CloudConfig::default().validate().unwrap();
        let err = |f: &dyn Fn(&mut CloudConfig)| {
            let mut c = CloudConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(
            err(&|c| c.http.listen = "0.0.0.0:8090".parse().unwrap())
                .contains("needs at least one")
        );
        assert!(err(&|c| c.http.read_keys = vec!["short".into()]).contains("16 characters"));
        assert!(
            err(&|c| {
                c.edges.insert(
                    "e1".into(),
                    EdgeAuth {
                        token_sha256: "abc".into(),
                    },
                );
            })
            .contains("edges.e1.token_sha256")
        );
        assert!(
            err(&|c| {
                c.edges.insert(
                    "bad id".into(),
                    EdgeAuth {
                        token_sha256: token_digest("x"),
                    },
                );
            })
            .contains("edge ids")
        );
        assert_eq!(token_digest("abc").len(), 64);
        assert!(err(&|c| c.storage.url = Some("gs://b/p".into())).contains("only s3://"));
        assert!(err(&|c| c.storage.url = Some("s3:///p".into())).contains("names no bucket"));
        assert!(
            err(&|c| c.storage.endpoint = Some("http://127.0.0.1:9000".into()))
                .contains("allow_http")
        );
        let s = StorageConfig {
            url: Some("s3://plant-data/millrace/prod/".into()),
            ..Default::default()
        };
        assert_eq!(
            s.bucket().unwrap(),
            Some(("plant-data".into(), "millrace/prod".into()))
        );
    }
}
