//! Deployment: names, specs and versions, persisted in the store; a deploy compiles the module
//! before it takes the deploy lock, then installs it (workers, schedule) in place of the
//! previous version.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::scheduler::{next_occurrence, parse_schedule};
use super::workers::FunctionStats;
use super::{Compiled, Deployed, FunctionError, Functions, Job, TopicFilter};

/// A deploy or update request (`PUT /api/v1/functions/{name}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeployRequest {
    /// The module, binary Wasm or WAT, base64-encoded.
    pub module_base64: Option<String>,
    /// The module as WAT text (instead of `module_base64`).
    pub module_wat: Option<String>,
    /// Topic filters that trigger it.
    pub topics: Vec<String>,
    /// A cron schedule (5 fields, or 6 with seconds first), UTC.
    pub schedule: Option<String>,
    /// Time limit per invocation, ms.
    pub timeout_ms: Option<u64>,
    /// Memory cap, MiB.
    pub memory_mib: Option<u32>,
    /// Invocations running at once.
    pub concurrency: Option<u32>,
    /// Queue bound.
    pub queue: Option<u32>,
    /// Most events per `handle_batch` invocation.
    pub batch_max: Option<u32>,
    /// Deploy enabled (default) or disabled.
    pub enabled: Option<bool>,
    /// Run it over stored history from this time (Unix ms, RFC 3339, or `-7d`) up to the
    /// deploy before it goes live.
    pub replay_from: Option<String>,
    /// Free text.
    pub description: Option<String>,
}

/// One deployed version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version number.
    pub version: u32,
    /// SHA-256 of the module, hex.
    pub sha256: String,
    /// When it was deployed, Unix ms.
    pub deployed_ms: i64,
}

/// A deployed function as stored (schema version 1; new fields get defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionSpec {
    /// Its name.
    pub name: String,
    /// Current version (1 on first deploy).
    pub version: u32,
    /// Whether triggers run it.
    pub enabled: bool,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Topic filters.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Cron schedule.
    #[serde(default)]
    pub schedule: Option<String>,
    /// Time limit, ms.
    pub timeout_ms: u64,
    /// Memory cap, MiB.
    pub memory_mib: u32,
    /// Invocations at once.
    pub concurrency: u32,
    /// Queue bound.
    pub queue: u32,
    /// Most events per `handle_batch` invocation (the runtime gives what is waiting, up to it).
    #[serde(default = "default_batch_max")]
    pub batch_max: u32,
    /// Module size, bytes.
    pub module_bytes: u64,
    /// SHA-256 of the module, hex.
    pub sha256: String,
    /// First deployed, Unix ms.
    pub created_ms: i64,
    /// Last changed, Unix ms.
    pub updated_ms: i64,
    /// Versions, newest last (at most `functions.keep_versions` modules are kept).
    #[serde(default)]
    pub history: Vec<VersionInfo>,
}

const fn default_batch_max() -> u32 {
    1000
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn validate_name(name: &str) -> Result<(), FunctionError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(FunctionError::Invalid(format!(
            "function name `{name}`: 1 to 64 characters of a-z 0-9 - _, starting with a letter or digit"
        )))
    }
}

impl Functions {
    /// Installs a compiled version: its workers, reader and schedule. `at_start`: loaded when
    /// the edge starts (a schedule missed while it was off then runs once).
    pub(super) fn install(
        &self,
        spec: FunctionSpec,
        compiled: Arc<dyn Compiled>,
        at_start: bool,
    ) -> Result<(), FunctionError> {
        let filters = spec
            .topics
            .iter()
            .map(|t| TopicFilter::parse(t).map_err(FunctionError::Invalid))
            .collect::<Result<Vec<_>, _>>()?;
        let schedule = spec.schedule.as_deref().map(parse_schedule).transpose()?;
        let now = self.inner.clock.now_ms();
        // Catch-up (like systemd's `Persistent=`): when a run came due while the edge was off
        // (after the last run that ended), it runs once now, as that first missed time.
        let missed = match &schedule {
            Some(c) if at_start => self
                .inner
                .store
                .schedule_mark(&spec.name)?
                .and_then(|last| next_occurrence(c, last))
                .filter(|due| *due <= now),
            _ => None,
        };
        if let Some(due) = missed {
            tracing::info!(function = %spec.name, due_ms = due, "a scheduled run was missed while the edge was off: it runs once now");
        }
        let next = missed.or_else(|| schedule.as_ref().and_then(|c| next_occurrence(c, now)));
        let (tx, rx) = flume::bounded::<Job>(spec.queue as usize);
        let stats = Arc::new(FunctionStats::new(&spec.name));
        self.spawn_workers(&spec, &compiled, &rx, &stats)?;
        // A function with topic filters reads the trigger log from its cursor (kept across
        // versions: a new version goes on where the previous one stopped).
        if filters.is_empty() {
            self.inner.store.close_function_cursor(&spec.name)?;
        } else {
            self.inner.store.open_function_cursor(&spec.name)?;
        }
        let d = Arc::new(Deployed {
            enabled: AtomicBool::new(spec.enabled),
            retired: AtomicBool::new(false),
            compiled: compiled.clone(),
            spec: Mutex::new(spec.clone()),
            filters,
            schedule,
            next_fire: Mutex::new(next),
            queue: tx,
            stats,
        });
        if !d.filters.is_empty() {
            self.spawn_reader(&d, &compiled)?;
        }
        // Replacing drops the old version's queue sender: its workers finish what is queued
        // and exit; its reader stops after the invocation it is running, commits, and hands
        // the cursor over (the lease).
        let old = self
            .inner
            .registry
            .write()
            .expect("registry")
            .insert(spec.name.clone(), d);
        if let Some(old) = old {
            old.retired.store(true, Ordering::Relaxed);
        }
        let _ = self.inner.wake.try_send(());
        Ok(())
    }

    /// Deploys a new function or a new version of one. Compiles first: a bad module changes
    /// nothing. Returns the spec and whether the function is new. Blocking (compiles).
    pub fn deploy(
        &self,
        name: &str,
        req: DeployRequest,
    ) -> Result<(FunctionSpec, bool), FunctionError> {
        validate_name(name)?;
        let cfg = &self.inner.cfg;
        let module = match (&req.module_base64, &req.module_wat) {
            (Some(b), None) => base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .map_err(|e| FunctionError::Invalid(format!("module_base64: {e}")))?,
            (None, Some(w)) => w.clone().into_bytes(),
            _ => {
                return Err(FunctionError::Invalid(
                    "give the module as exactly one of `module_base64` (Wasm or WAT) and `module_wat`"
                        .into(),
                ));
            }
        };
        if module.is_empty() || module.len() > cfg.max_module_bytes {
            return Err(FunctionError::Invalid(format!(
                "the module has {} bytes; accepted: 1 to {}",
                module.len(),
                cfg.max_module_bytes
            )));
        }
        for t in &req.topics {
            TopicFilter::parse(t).map_err(FunctionError::Invalid)?;
        }
        if let Some(s) = &req.schedule {
            parse_schedule(s)?;
        }
        let timeout_ms = req
            .timeout_ms
            .unwrap_or(cfg.default_timeout.as_millis() as u64);
        if !(1..=60_000).contains(&timeout_ms) {
            return Err(FunctionError::Invalid(format!(
                "timeout_ms {timeout_ms}: between 1 and 60000"
            )));
        }
        let memory_mib = req.memory_mib.unwrap_or(cfg.default_memory_mib);
        if memory_mib == 0 || memory_mib > cfg.max_memory_mib {
            return Err(FunctionError::Invalid(format!(
                "memory_mib {memory_mib}: between 1 and {} (functions.max_memory_mib)",
                cfg.max_memory_mib
            )));
        }
        let concurrency = req.concurrency.unwrap_or(cfg.default_concurrency);
        if !(1..=64).contains(&concurrency) {
            return Err(FunctionError::Invalid(format!(
                "concurrency {concurrency}: between 1 and 64"
            )));
        }
        let queue = req.queue.unwrap_or(cfg.default_queue);
        if !(1..=1_000_000).contains(&queue) {
            return Err(FunctionError::Invalid(format!(
                "queue {queue}: between 1 and 1000000"
            )));
        }
        let replay_from = req
            .replay_from
            .as_deref()
            .map(|t| millrace_shared::time::parse_time("replay_from", t))
            .transpose()
            .map_err(|e| FunctionError::Invalid(e.to_string()))?;
        if let Some(from) = replay_from {
            if req.topics.is_empty() {
                return Err(FunctionError::Invalid(
                    "replay_from needs topic filters: a replay runs the function over stored device events".into(),
                ));
            }
            if from >= chrono::Utc::now().timestamp_millis() {
                return Err(FunctionError::Invalid(format!(
                    "replay_from ({from}) is not in the past"
                )));
            }
        }
        let batch_max = req.batch_max.unwrap_or(default_batch_max());
        if !(1..=100_000).contains(&batch_max) {
            return Err(FunctionError::Invalid(format!(
                "batch_max {batch_max}: between 1 and 100000"
            )));
        }
        let compiled = self
            .inner
            .engine
            .compile(&module, u64::from(memory_mib) << 20)
            .map_err(|e| FunctionError::Invalid(format!("module refused: {e}")))?;

        let _g = self.inner.deploying.lock().expect("deploy lock");
        let now = chrono::Utc::now().timestamp_millis();
        let previous = self.spec(name);
        let sha256 = sha256_hex(&module);
        let version = previous.as_ref().map_or(1, |p| p.version + 1);
        let mut history = previous
            .as_ref()
            .map(|p| p.history.clone())
            .unwrap_or_default();
        history.push(VersionInfo {
            version,
            sha256: sha256.clone(),
            deployed_ms: now,
        });
        let spec = FunctionSpec {
            name: name.to_owned(),
            version,
            enabled: req.enabled.unwrap_or(true),
            description: req.description.unwrap_or_default(),
            topics: req.topics,
            schedule: req.schedule,
            timeout_ms,
            memory_mib,
            concurrency,
            queue,
            batch_max,
            module_bytes: module.len() as u64,
            sha256,
            created_ms: previous.as_ref().map_or(now, |p| p.created_ms),
            updated_ms: now,
            history,
        };
        self.inner.store.put_function(
            name,
            &serde_json::to_vec(&spec).expect("specs serialize"),
            Some((version, &module)),
            cfg.keep_versions,
        )?;
        self.install(spec.clone(), compiled, false)?;
        if let Some(from) = replay_from {
            // Up to now: what is stored from here on reaches it through the trigger log, whose
            // cursor `install` opened; the live reader waits until the replay is done.
            self.replay(name, from, Some(now))?;
        }
        tracing::info!(function = %name, version, sha256 = %spec.sha256, topics = ?spec.topics, schedule = ?spec.schedule, "function deployed");
        Ok((spec, previous.is_none()))
    }

    /// Enables or disables a function (persisted).
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<FunctionSpec, FunctionError> {
        let _g = self.inner.deploying.lock().expect("deploy lock");
        let d = self.deployed(name)?;
        let mut spec = d.spec.lock().expect("spec lock");
        spec.enabled = enabled;
        spec.updated_ms = chrono::Utc::now().timestamp_millis();
        self.inner.store.put_function(
            name,
            &serde_json::to_vec(&*spec).expect("specs serialize"),
            None,
            self.inner.cfg.keep_versions,
        )?;
        d.enabled.store(enabled, Ordering::Relaxed);
        if enabled && let Some(c) = &d.schedule {
            *d.next_fire.lock().expect("fire lock") = next_occurrence(c, self.inner.clock.now_ms());
        }
        tracing::info!(function = %name, enabled, "function {}", if enabled { "enabled" } else { "disabled" });
        Ok(spec.clone())
    }

    /// Deletes a function, its modules and its key-value state.
    pub fn delete(&self, name: &str) -> Result<(), FunctionError> {
        let _g = self.inner.deploying.lock().expect("deploy lock");
        let d = self.deployed(name)?;
        d.retired.store(true, Ordering::Relaxed);
        if let Some(job) = self.inner.replays.lock().expect("replays").remove(name) {
            job.cancel();
        }
        // Wait for its reader's (and replay's) batch: nothing it commits may outlive the delete.
        let lease = self.lease(name);
        let _lease = lease.lock().expect("lease");
        self.inner.store.delete_function(name)?;
        self.inner.registry.write().expect("registry").remove(name);
        tracing::info!(function = %name, "function deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_lowercase_identifiers() {
        for ok in ["threshold", "oee-1", "a_b", "9lives"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Threshold", "-x", "_x", "a b", "a/b", &"x".repeat(65)] {
            let e = validate_name(bad).unwrap_err();
            assert!(e.to_string().contains("1 to 64 characters"), "{bad}: {e}");
        }
        assert_eq!(sha256_hex(b"").len(), 64);
        assert!(sha256_hex(b"").starts_with("e3b0c442"));
    }
}
