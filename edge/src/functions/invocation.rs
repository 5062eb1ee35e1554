//! What one invocation is given and what it may ask for: its trigger and input, the effects
//! it returns, how it ended; the key-value reads and the clock the runtime gives it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use millrace_shared::{Event, MachineId, SeriesKey, TopicError};
use serde::{Deserialize, Serialize};

use super::KvWrite;
use crate::store::Store;

/// What started an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// A device event matched a topic filter.
    Topic,
    /// A cron schedule came due.
    Schedule,
    /// The CLI or the REST API.
    Manual,
    /// A stored event, replayed over history.
    Replay,
}

impl TriggerKind {
    /// The name used in records, metrics and the ABI.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Schedule => "schedule",
            Self::Manual => "manual",
            Self::Replay => "replay",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Topic, Self::Schedule, Self::Manual, Self::Replay]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// What a function receives.
#[derive(Debug, Clone)]
pub struct Input {
    /// What triggered it.
    pub trigger: TriggerKind,
    /// The MQTT topic (empty for schedules). Shared: the events of one machine and kind in a
    /// batch hold the same string.
    pub topic: Arc<str>,
    /// The device's machine, `site/line/machine` (empty when not from a device).
    pub device: Arc<str>,
    /// The event's timestamp, or the scheduled time, Unix ms.
    pub ts_ms: i64,
    /// The decoded event, when the trigger is one.
    pub event: Option<EventRef>,
    /// The raw payload (manual and scheduled invocations); made from `event` otherwise.
    pub payload: Option<Arc<Vec<u8>>>,
    /// The trigger log's seq of the event (topic triggers): the same when a trigger is run
    /// again after a crash, so it identifies what the function publishes.
    pub log_seq: Option<u64>,
    /// Scheduled runs: when it was fired; it stands for every due time up to then (a restart
    /// catches up only on times after it).
    pub fired_ms: Option<i64>,
    /// Replays: the store window and the event's index in it (stable across a resume).
    pub replay_at: Option<(i64, u64)>,
}

impl Input {
    /// The payload bytes the function sees.
    pub fn payload_bytes(&self) -> Arc<Vec<u8>> {
        match (&self.payload, &self.event) {
            (Some(p), _) => p.clone(),
            (None, Some(e)) => Arc::new(e.to_payload()),
            (None, None) => Arc::new(vec![]),
        }
    }

    pub(super) fn from_event(e: EventRef, (topic, device): (Arc<str>, Arc<str>)) -> Self {
        Self {
            trigger: TriggerKind::Topic,
            topic,
            device,
            ts_ms: e.ts_ms,
            event: Some(e),
            payload: None,
            log_seq: None,
            fired_ms: None,
            replay_at: None,
        }
    }

    /// The trigger's stable id: `log-{seq}` for topic triggers, `replay-{window}-{index}` for
    /// replays, `schedule-{ms}` for schedules, empty for manual calls.
    pub fn trigger_id(&self) -> String {
        match (self.trigger, self.log_seq, self.replay_at) {
            (_, Some(seq), _) => format!("log-{seq}"),
            (_, None, Some((w, i))) => format!("replay-{w}-{i}"),
            (TriggerKind::Schedule, None, None) => format!("schedule-{}", self.ts_ms),
            _ => String::new(),
        }
    }
}

/// The topic and device strings of events, made once per machine and kind (a batch of
/// thousands of events from a few machines allocates a few strings, not two per event).
#[derive(Debug, Default)]
pub(super) struct Names(
    std::collections::HashMap<(MachineId, millrace_shared::EventKind), (Arc<str>, Arc<str>)>,
);

impl Names {
    pub(super) fn of(&mut self, e: &Event) -> (Arc<str>, Arc<str>) {
        let key = (e.machine.clone(), e.kind());
        self.0
            .entry(key)
            .or_insert_with(|| (e.topic().into(), e.machine.to_string().into()))
            .clone()
    }
}

/// One event of a stored batch, shared by every job the batch triggers (no copy per job).
#[derive(Debug, Clone)]
pub struct EventRef {
    pub(super) batch: Arc<Vec<Event>>,
    pub(super) index: usize,
}

impl EventRef {
    /// A single event.
    pub fn new(e: Event) -> Self {
        Self {
            batch: Arc::new(vec![e]),
            index: 0,
        }
    }
}

impl std::ops::Deref for EventRef {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.batch[self.index]
    }
}

/// A log line a function wrote.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// debug, info, warn or error.
    pub level: &'static str,
    /// The text.
    pub message: String,
}

/// A time-series point a function writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Its machine.
    pub machine: MachineId,
    /// Its metric.
    pub metric: String,
    /// Unix ms.
    pub ts_ms: i64,
    /// The value.
    pub value: f64,
}

impl Point {
    /// A point of series `site/line/machine/metric`.
    pub fn parse(series: &str, ts_ms: i64, value: f64) -> Result<Self, String> {
        let key: SeriesKey = series.parse().map_err(|e| match e {
            TopicError::BadId { .. } => format!("series `{series}`: {e}"),
            _ => format!("series `{series}` is not site/line/machine/metric"),
        })?;
        if !value.is_finite() {
            return Err(format!(
                "series `{series}`: the value {value} is not finite"
            ));
        }
        if !(millrace_shared::event::MIN_TS_MS..=millrace_shared::event::MAX_TS_MS).contains(&ts_ms)
        {
            return Err(format!(
                "series `{series}`: timestamp {ts_ms} is outside 2000..2100"
            ));
        }
        Ok(Self {
            machine: key.machine,
            metric: key.metric.into(),
            ts_ms,
            value,
        })
    }
}

/// What an invocation asked for; applied only if it succeeded (logs are kept either way).
#[derive(Debug, Default)]
pub struct Effects {
    /// MQTT messages (topic, payload).
    pub publishes: Vec<(String, Vec<u8>)>,
    /// Time-series points.
    pub points: Vec<Point>,
    /// Alerts (severity, message, index of the event in the batch it was raised for).
    pub alerts: Vec<(&'static str, String, usize)>,
    /// Key-value writes.
    pub kv: Vec<KvWrite>,
    /// Log lines.
    pub logs: Vec<LogLine>,
    /// Log lines beyond the per-invocation bound.
    pub logs_dropped: u32,
}

/// Why an invocation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    /// `handle` returned non-zero, or an action could not be applied.
    #[error("{0}")]
    Failed(String),
    /// The module trapped (or misused the ABI).
    #[error("trap: {0}")]
    Trap(String),
    /// It ran past its time limit.
    #[error("timeout: {0}")]
    Timeout(String),
    /// It asked for more memory than its cap.
    #[error("memory: {0}")]
    Memory(String),
}

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Succeeded; its actions took effect.
    Ok,
    /// Returned an error code or its actions failed.
    Error,
    /// Trapped.
    Trap,
    /// Stopped at its time limit.
    Timeout,
    /// Stopped at its memory cap.
    Memory,
}

impl Outcome {
    /// Its name in records and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Trap => "trap",
            Self::Timeout => "timeout",
            Self::Memory => "memory",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Ok,
            Self::Error,
            Self::Trap,
            Self::Timeout,
            Self::Memory,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

impl From<&InvokeError> for Outcome {
    fn from(e: &InvokeError) -> Self {
        match e {
            InvokeError::Failed(_) => Self::Error,
            InvokeError::Trap(_) => Self::Trap,
            InvokeError::Timeout(_) => Self::Timeout,
            InvokeError::Memory(_) => Self::Memory,
        }
    }
}

/// Read access to a function's key-value state.
pub trait KvRead: Send + Sync {
    /// The value of `key`, if set.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String>;
}

pub(super) struct StoreKv {
    pub(super) store: Arc<Store>,
    pub(super) function: String,
}

impl KvRead for StoreKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        self.store
            .kv_get(&self.function, key)
            .map_err(|e| e.to_string())
    }
}

/// Where the scheduler reads the time (tests drive it by hand).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, Unix ms.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock set by hand.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock showing `ms`.
    pub fn new(ms: i64) -> Self {
        Self(AtomicI64::new(ms))
    }

    /// Sets the time.
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_name_a_series_and_hold_a_finite_value_in_range() {
        let t = 1_767_600_000_000;
        let p = Point::parse("plant-1/line-a/press-3/temp_avg", t, 21.5).unwrap();
        assert_eq!(p.machine.to_string(), "plant-1/line-a/press-3");
        assert_eq!((p.metric.as_str(), p.ts_ms, p.value), ("temp_avg", t, 21.5));
        let e = Point::parse("plant-1/press-3/temp", t, 1.0).unwrap_err();
        assert_eq!(
            e,
            "series `plant-1/press-3/temp` is not site/line/machine/metric"
        );
        let e = Point::parse("plant-1/line a/press-3/temp", t, 1.0).unwrap_err();
        assert!(e.contains("not a valid identifier"), "{e}");
        assert!(
            Point::parse("a/b/c/d", t, f64::NAN)
                .unwrap_err()
                .contains("not finite")
        );
        assert!(
            Point::parse("a/b/c/d", 0, 1.0)
                .unwrap_err()
                .contains("outside 2000..2100")
        );
    }
}
