//! The stored tables' columns: one module per table, each naming its columns once, used by the
//! writer (sync, compaction) and the readers (queries, reports) alike.
//!
//! Every table starts with the machine's identity and the time, and the rows written from
//! edge batches end with where they came from (edge, outbox sequence number, backfill flag,
//! when the cloud received them).

/// The site (plant). Also a partition key.
pub(crate) const SITE: &str = "site";
/// The line within the site.
pub(crate) const LINE: &str = "line";
/// The machine within the line.
pub(crate) const MACHINE: &str = "machine";
/// Device time (Unix ms as a millisecond timestamp).
pub(crate) const TS: &str = "ts";
/// The device's sequence number of the event.
pub(crate) const DEVICE_SEQ: &str = "device_seq";
/// The edge that sent the row.
pub(crate) const EDGE: &str = "edge";
/// The edge's outbox sequence number of the row's event.
pub(crate) const OUTBOX_SEQ: &str = "outbox_seq";
/// Whether the row was written by a backfill (replayed history), not live.
pub(crate) const BACKFILL: &str = "backfill";
/// When the cloud received the row.
pub(crate) const RECEIVED_AT: &str = "received_at";

/// `telemetry`: one row per reading.
pub(crate) mod telemetry {
    pub(crate) use super::{
        BACKFILL, DEVICE_SEQ, EDGE, LINE, MACHINE, OUTBOX_SEQ, RECEIVED_AT, SITE, TS,
    };
    /// The metric's name.
    pub(crate) const METRIC: &str = "metric";
    /// The metric's unit.
    pub(crate) const UNIT: &str = "unit";
    /// The reading.
    pub(crate) const VALUE: &str = "value";
    /// Every column, in file order.
    pub(crate) const COLUMNS: &[&str] = &[
        SITE,
        LINE,
        MACHINE,
        TS,
        DEVICE_SEQ,
        METRIC,
        UNIT,
        VALUE,
        EDGE,
        OUTBOX_SEQ,
        BACKFILL,
        RECEIVED_AT,
    ];
    /// The columns the data API returns.
    pub(crate) const API_COLUMNS: &[&str] = &[
        SITE, LINE, MACHINE, METRIC, UNIT, TS, VALUE, DEVICE_SEQ, EDGE, OUTBOX_SEQ, BACKFILL,
    ];
}

/// `events`: one row per state change, part or operator event.
pub(crate) mod events {
    pub(crate) use super::{
        BACKFILL, DEVICE_SEQ, EDGE, LINE, MACHINE, OUTBOX_SEQ, RECEIVED_AT, SITE, TS,
    };
    /// `state`, `part` or `operator`.
    pub(crate) const KIND: &str = "kind";
    /// State changes: the new state.
    pub(crate) const STATE: &str = "state";
    /// State changes: why the machine stopped.
    pub(crate) const REASON: &str = "reason";
    /// Parts: good, scrap or rework.
    pub(crate) const OUTCOME: &str = "outcome";
    /// Parts: the cycle time.
    pub(crate) const CYCLE_TIME_MS: &str = "cycle_time_ms";
    /// Parts: the part's id, if the device sent one.
    pub(crate) const PART_ID: &str = "part_id";
    /// Operator events: what the operator did.
    pub(crate) const ACTION: &str = "action";
    /// Operator events: who.
    pub(crate) const OPERATOR: &str = "operator";
    /// The `kind` of state changes.
    pub(crate) const KIND_STATE: &str = "state";
    /// The `kind` of parts.
    pub(crate) const KIND_PART: &str = "part";
    /// Every `kind`.
    pub(crate) const KINDS: &[&str] = &[KIND_STATE, KIND_PART, "operator"];
    /// Every column, in file order.
    pub(crate) const COLUMNS: &[&str] = &[
        SITE,
        LINE,
        MACHINE,
        TS,
        DEVICE_SEQ,
        KIND,
        STATE,
        REASON,
        OUTCOME,
        CYCLE_TIME_MS,
        PART_ID,
        ACTION,
        OPERATOR,
        EDGE,
        OUTBOX_SEQ,
        BACKFILL,
        RECEIVED_AT,
    ];
    /// The columns the data API returns: all but when the cloud received the row.
    pub(crate) const API_COLUMNS: &[&str] = match COLUMNS.split_last() {
        Some((_, served)) => served,
        None => &[],
    };
}

/// `part_counts`: good, scrap and rework parts per machine and minute (a rollup of the part
/// events, written in the same commit as they are).
pub(crate) mod part_counts {
    pub(crate) use super::{LINE, MACHINE, SITE};
    /// The minute's start (a millisecond timestamp).
    pub(crate) const MINUTE: &str = "minute";
    /// Good parts.
    pub(crate) const GOOD: &str = "good";
    /// Scrapped parts.
    pub(crate) const SCRAP: &str = "scrap";
    /// Parts to rework.
    pub(crate) const REWORK: &str = "rework";
    /// The three counts, in the order of [`millrace_shared::PartOutcome`]'s variants.
    pub(crate) const COUNTS: [&str; 3] = [GOOD, SCRAP, REWORK];
    /// The machine and minute columns, the sort order of every file.
    pub(crate) const KEY: [&str; 4] = [SITE, LINE, MACHINE, MINUTE];
    /// Every column, in file order.
    pub(crate) const COLUMNS: &[&str] = &[SITE, LINE, MACHINE, MINUTE, GOOD, SCRAP, REWORK];
}

/// `alerts`: one row per alert an edge function raised (site, line and machine are null when
/// the trigger did not come from a machine: scheduled and manual runs).
pub(crate) mod alerts {
    pub(crate) use super::{BACKFILL, EDGE, LINE, MACHINE, OUTBOX_SEQ, RECEIVED_AT, SITE, TS};
    /// The alert's stable id (`{function}:{trigger id}:{n}`).
    pub(crate) const ID: &str = "id";
    /// The function that raised it.
    pub(crate) const FUNCTION: &str = "function";
    /// The function's version.
    pub(crate) const VERSION: &str = "version";
    /// `info`, `warning` or `critical`.
    pub(crate) const SEVERITY: &str = "severity";
    /// The function's message.
    pub(crate) const MESSAGE: &str = "message";
    /// What triggered the invocation: `topic`, `schedule`, `manual` or `replay`.
    pub(crate) const TRIGGER: &str = "trigger";
    /// The triggering event's MQTT topic (null when not from a device).
    pub(crate) const TOPIC: &str = "topic";
    /// The triggering event's time (or the scheduled time).
    pub(crate) const EVENT_TS: &str = "event_ts";
    /// The partition directory of alerts without a site.
    pub(crate) const NO_SITE: &str = "__HIVE_DEFAULT_PARTITION__";
    /// Every column, in file order.
    pub(crate) const COLUMNS: &[&str] = &[
        SITE,
        LINE,
        MACHINE,
        TS,
        ID,
        FUNCTION,
        VERSION,
        SEVERITY,
        MESSAGE,
        TRIGGER,
        TOPIC,
        EVENT_TS,
        EDGE,
        OUTBOX_SEQ,
        BACKFILL,
        RECEIVED_AT,
    ];
    /// The columns the API returns: all but when the cloud received the row.
    pub(crate) const API_COLUMNS: &[&str] = match COLUMNS.split_last() {
        Some((_, served)) => served,
        None => &[],
    };
}
