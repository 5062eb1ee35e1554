//! Plumbing that every Millrace server process (edge and cloud) needs the same way: layered
//! configuration, the Prometheus recorder and its upkeep, and the shutdown signal.
//!
//! Behind the `service` feature, so that the wire vocabulary stays free of tokio, figment and
//! the metrics exporter for crates that only speak the protocol (the simulators).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

pub mod http;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigLoadError {
    /// The named file does not exist.
    #[error("file {} does not exist", .0.display())]
    Missing(PathBuf),
    /// The file or environment could not be read or has wrong fields.
    #[error("{0}")]
    Read(#[from] Box<figment::Error>),
}

/// Loads a configuration: `T::default()`, then the TOML `file` if given, then environment
/// variables named `{env_prefix}{SECTION}__{KEY}`. Validation is the caller's.
pub fn load_config<T>(file: Option<&Path>, env_prefix: &str) -> Result<T, ConfigLoadError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(f) = file {
        if !f.exists() {
            return Err(ConfigLoadError::Missing(f.to_owned()));
        }
        fig = fig.merge(Toml::file(f));
    }
    Ok(fig
        .merge(Env::prefixed(env_prefix).split("__"))
        .extract()
        .map_err(Box::new)?)
}

/// The process-wide Prometheus recorder, installed by the first call (with `buckets` for every
/// histogram whose name ends in `seconds`); later calls get the same one.
pub fn prometheus_recorder(buckets: &[f64]) -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), buckets)
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            // A second recorder in the same process (tests) keeps the first one.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Drains the recorder's histogram samples every 5 s until `stop`: they wait in the recorder
/// until drained, so without upkeep an instance nobody scrapes would keep every sample it ever
/// recorded.
pub async fn metrics_upkeep(handle: PrometheusHandle, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! { _ = tick.tick() => {}, _ = stop.cancelled() => return }
        let handle = handle.clone();
        let _ = tokio::task::spawn_blocking(move || handle.run_upkeep()).await;
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    #[serde(default)]
    struct Example {
        http: Http,
    }

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    #[serde(default)]
    struct Http {
        listen: String,
        max_rows: u32,
    }

    impl Default for Http {
        fn default() -> Self {
            Self {
                listen: "127.0.0.1:1".into(),
                max_rows: 10,
            }
        }
    }

    #[test]
    #[allow(
        clippy::result_large_err,
        reason = "figment's Jail returns its own error type"
    )]
    fn defaults_then_file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[http]\nlisten = \"127.0.0.1:2\"\nmax_rows = 20\n",
            )?;
            jail.set_env("MILLRACE_TEST_HTTP__MAX_ROWS", "30");
            let c: Example = load_config(Some(Path::new("c.toml")), "MILLRACE_TEST_").unwrap();
            assert_eq!(c.http.listen, "127.0.0.1:2");
            assert_eq!(c.http.max_rows, 30);
            let c: Example = load_config(None, "MILLRACE_NONE_").unwrap();
            assert_eq!(c, Example::default());
            let e = load_config::<Example>(Some(Path::new("absent.toml")), "X_").unwrap_err();
            assert_eq!(e.to_string(), "file absent.toml does not exist");
            Ok(())
        });
    }
}
