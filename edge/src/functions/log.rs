//! The invocation log: one record per invocation, written in batches by its own thread, and the
//! filter the API reads it with.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{LogLine, Outcome, TriggerKind};
use crate::store::Store;

/// Actions an invocation took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ActionCounts {
    /// MQTT messages published (alerts included).
    pub published: usize,
    /// Points written.
    pub points: usize,
    /// Alerts raised.
    pub alerts: usize,
    /// Key-value writes.
    pub kv_writes: usize,
}

/// One invocation, as the invocation log keeps it.
#[derive(Debug, Clone, Serialize)]
pub struct InvocationRecord {
    /// Unique per edge.
    pub id: u64,
    /// The function.
    pub function: String,
    /// Its version.
    pub version: u32,
    /// What triggered it.
    pub trigger: TriggerKind,
    /// The topic (topic and manual triggers).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub topic: String,
    /// The device's machine.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub device: String,
    /// The event's timestamp or the scheduled time, Unix ms.
    pub event_ts_ms: i64,
    /// When it started, Unix ms.
    pub started_ms: i64,
    /// Time waiting in the queue, µs.
    pub queued_us: u64,
    /// Run time, µs.
    pub duration_us: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What it logged.
    pub logs: Vec<LogLine>,
    /// Log lines beyond the bound.
    #[serde(skip_serializing_if = "is_zero")]
    pub logs_dropped: u32,
    /// What it did (zero when it failed: actions of failed invocations are discarded).
    pub actions: ActionCounts,
    /// Events it handled: more than one for `handle_batch` (the fields above describe the
    /// first).
    pub events: usize,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Writes invocation records in batches until stopped (then writes what is left).
pub(super) fn log_writer(
    store: Arc<Store>,
    rx: flume::Receiver<InvocationRecord>,
    stop: &AtomicBool,
) {
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => r,
            Err(flume::RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => continue,
            Err(_) => match rx.try_recv() {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(4095));
        let newest = batch.iter().map(|r| r.started_ms).max().unwrap_or(0);
        let rows: Vec<Vec<u8>> = batch
            .iter()
            .map(|r| serde_json::to_vec(r).expect("records serialize"))
            .collect();
        if let Err(e) = store.log_invocations(newest, &rows) {
            tracing::error!(error = %e, records = rows.len(), "could not write the invocation log");
        }
    }
}

/// A filter over the invocation log.
#[derive(Debug, Default, Deserialize)]
pub struct LogFilter {
    /// Started at or after, Unix ms.
    #[serde(default)]
    pub from_ms: Option<i64>,
    /// Started before, Unix ms.
    #[serde(default)]
    pub to_ms: Option<i64>,
    /// Only this function.
    pub function: Option<String>,
    /// Only this outcome.
    pub outcome: Option<Outcome>,
    /// Only this trigger kind.
    pub trigger: Option<TriggerKind>,
}

impl LogFilter {
    /// Whether a stored record passes.
    pub fn keep(&self, record: &[u8]) -> bool {
        #[derive(Deserialize)]
        struct Probe<'a> {
            function: &'a str,
            outcome: Outcome,
            trigger: TriggerKind,
            started_ms: i64,
        }
        let Ok(p) = serde_json::from_slice::<Probe<'_>>(record) else {
            return false;
        };
        self.from_ms.is_none_or(|f| p.started_ms >= f)
            && self.to_ms.is_none_or(|t| p.started_ms < t)
            && self.function.as_deref().is_none_or(|f| f == p.function)
            && self.outcome.is_none_or(|o| o == p.outcome)
            && self.trigger.is_none_or(|t| t == p.trigger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_keeps_what_matches_every_condition() {
        let record = |function: &str, outcome: &str, trigger: &str, started_ms: i64| {
            serde_json::to_vec(&serde_json::json!({
                "id": 1, "function": function, "outcome": outcome, "trigger": trigger,
                "started_ms": started_ms,
            }))
            .unwrap()
        };
        let r = record("threshold", "ok", "topic", 1_000);
        assert!(LogFilter::default().keep(&r));
        let f = LogFilter {
            from_ms: Some(1_000),
            to_ms: Some(2_000),
            function: Some("threshold".into()),
            outcome: Some(Outcome::Ok),
            trigger: Some(TriggerKind::Topic),
        };
        assert!(f.keep(&r));
        assert!(!f.keep(&record("threshold", "ok", "topic", 2_000)));
        assert!(!f.keep(&record("other", "ok", "topic", 1_500)));
        assert!(!f.keep(&record("threshold", "trap", "topic", 1_500)));
        assert!(!f.keep(&record("threshold", "ok", "schedule", 1_500)));
        assert!(!f.keep(b"not json"));
    }
}
