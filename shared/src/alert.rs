//! Alerts raised by edge functions, and the state of an edge's functions as the cloud sees it.
//!
//! An [`Alert`] is written on the edge in the same RocksDB write batch as the function's cursor
//! advance (exactly once), published on MQTT, and queued in the edge's outbox like an event, so
//! it reaches the cloud once. A [`FunctionReport`] is not queued: each sync batch carries the
//! edge's current figures per function, and the newest one wins.

use serde::{Deserialize, Serialize};

use crate::topic::MachineId;

/// How serious an alert is.
pub const SEVERITIES: [&str; 3] = ["info", "warning", "critical"];

/// An alert a function raised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Stable id: `{function}:{trigger id}:{n}` (the same when the same trigger runs again
    /// after a crash), so receivers can drop repeats of an MQTT publish.
    pub id: String,
    /// When it was raised, Unix ms.
    pub ts_ms: i64,
    /// What triggered the invocation: `topic`, `schedule`, `manual` or `replay`.
    pub trigger: String,
    /// The function.
    pub function: String,
    /// The function's version.
    pub version: u32,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// The function's message.
    pub message: String,
    /// The machine of the triggering event, `site/line/machine` (empty when not from a device).
    #[serde(default)]
    pub device: String,
    /// The triggering event's MQTT topic (empty when not from a device).
    #[serde(default)]
    pub topic: String,
    /// The triggering event's time (or the scheduled time), Unix ms.
    pub event_ts_ms: i64,
}

impl Alert {
    /// The machine it is about, if the trigger came from one.
    pub fn machine(&self) -> Option<MachineId> {
        self.device.parse().ok()
    }
}

/// One function of an edge, as of the batch that carried it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FunctionReport {
    /// The function's name.
    pub name: String,
    /// Its deployed version.
    pub version: u32,
    /// Invocations since the edge started.
    pub invocations: u64,
    /// Failed invocations since the edge started.
    pub failures: u64,
    /// Trigger events it skipped past the retention, since the edge started.
    pub skipped: u64,
    /// Stored events it has not read yet.
    pub lag_events: u64,
    /// How long the oldest of those has waited, ms.
    pub lag_ms: u64,
}
