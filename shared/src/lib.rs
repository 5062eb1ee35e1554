//! Millrace's shared vocabulary: the factory event model that devices, edge, cloud and
//! simulators all speak.
//!
//! # Layout
//! - [`topic`]: the MQTT topic scheme `factory/{site}/{line}/{machine}/{kind}` and machine identity.
//! - [`alert`]: alerts raised by edge functions, and per-function figures an edge reports.
//! - [`event`]: the events (state changes, parts, telemetry, operator actions), their JSON
//!   payloads with a schema version, and strict decoding with errors that name field, value and
//!   expectation.
//! - [`master`]: machine master data (ideal cycle time) and the shift calendar that defines
//!   planned production time.
//! - [`mqtt`]: MQTT wire framing read from devices' byte streams (remaining length, CONNECT
//!   header, the PUBLISH scanner), fuzzed.
//! - [`sync`]: the edge → cloud sync protocol: outbox items, batches, their compact wire
//!   encoding, and sets of sequence ranges.
//! - [`kpi`]: ISO 22400 time and count accumulators and the OEE arithmetic used by the simulator's
//!   ground truth and by the cloud's reports alike, so that both divide the same way.
//! - [`time`]: times as written in queries and on the command line (`-2h`, RFC 3339, Unix ms).
//! - `service` (feature `service`): plumbing of the edge and cloud servers: layered
//!   configuration, the Prometheus recorder and its upkeep, the shutdown signal. It lives here,
//!   behind a feature, rather than in a crate of its own, because the workspace layout is fixed
//!   and edge and cloud may depend on nothing but `shared`.
//!
//! This crate depends on no other Millrace crate (see `docs/architecture.md`).
#![warn(missing_docs)]

pub mod alert;
pub mod event;
pub mod kpi;
pub mod master;
pub mod mqtt;
#[cfg(test)]
mod properties;
#[cfg(feature = "service")]
pub mod service;
pub mod sync;
pub mod time;
pub mod topic;

pub use alert::{Alert, FunctionReport};
/// The string type of identities and metric names: up to 24 bytes are kept inline, so decoding
/// an event allocates nothing for them.
pub use compact_str::CompactString;
pub use event::{
    DecodeError, Event, EventBody, EventKind, MachineState, OperatorAction, OperatorEvent,
    PartOutcome, PartProduced, Reading, SCHEMA_VERSION, StateChange, StopReason, Telemetry,
};
pub use kpi::{Kpis, StateTimes, Tally};
pub use master::{
    BreakDef, CalendarError, CalendarSlot, MachineSpec, ShiftCalendar, ShiftDef, ShiftInstance,
};
pub use sync::{
    AlertItem, OutboxReport, RangeSet, SeqRange, SyncAck, SyncBatch, SyncItem, WireError,
};
pub use topic::{MachineId, SeriesKey, TopicError};
