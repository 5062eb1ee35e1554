//! Factory events and their device payloads.
//!
//! A device publishes one JSON object per event to its machine's topic (see [`crate::topic`]).
//! Every payload carries the schema version `v` (absent means 1), the device timestamp `ts`
//! (Unix milliseconds, UTC) and a per-device sequence number `seq` that increases by one per
//! event, so that gaps and duplicates can be found downstream. The rest depends on the kind:
//!
//! | kind | topic level | fields |
//! |---|---|---|
//! | machine state change | `state` | `state` (`running`, `idle`, `planned_stop`, `changeover`, `down`), optional `reason` |
//! | part produced | `part` | `outcome` (`good`, `scrap`, `rework`), `cycle_time_ms`, optional `part_id` |
//! | telemetry | `telemetry` | `readings`: list of `{name, value, unit}` |
//! | operator | `operator` | `action` (`login`, `logout`), `operator` |
//!
//! Decoding never panics: every refusal is a [`DecodeError`] that names the field, the value and
//! what was expected.

use std::fmt;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};

use crate::topic::{MachineId, TopicError};

/// The payload schema version this build writes, and the newest it reads.
pub const SCHEMA_VERSION: u16 = 1;

/// Largest device payload accepted, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// Most readings one telemetry payload may carry.
pub const MAX_READINGS: usize = 256;

/// Earliest device timestamp accepted: 2000-01-01T00:00:00Z.
pub const MIN_TS_MS: i64 = 946_684_800_000;
/// Latest device timestamp accepted: 2100-01-01T00:00:00Z.
pub const MAX_TS_MS: i64 = 4_102_444_800_000;

/// Longest cycle time accepted: one day.
pub const MAX_CYCLE_TIME_MS: u32 = 86_400_000;

/// The four kinds of device event, as named in the last topic level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A machine state change.
    State,
    /// A part came off the machine.
    Part,
    /// Sensor readings.
    Telemetry,
    /// An operator logged in or out.
    Operator,
}

impl EventKind {
    /// Every kind, in a fixed order.
    pub const ALL: [EventKind; 4] = [Self::State, Self::Part, Self::Telemetry, Self::Operator];

    /// The topic level and JSON name of this kind.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Part => "part",
            Self::Telemetry => "telemetry",
            Self::Operator => "operator",
        }
    }

    /// Parses a topic level.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a machine is doing, in the categories ISO 22400 time accounting needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    /// Producing: counts as run time (ISO 22400 actual production time).
    Running,
    /// Ready but not producing (starved, blocked, waiting for an order): an availability loss.
    Idle,
    /// Not planned to produce (break, no shift, planned maintenance): outside planned time.
    PlannedStop,
    /// Setting up for another product: an availability loss.
    Changeover,
    /// Stopped unplanned (breakdown, shortage, no operator): an availability loss.
    Down,
}

impl MachineState {
    /// Every state, in a fixed order.
    pub const ALL: [MachineState; 5] = [
        Self::Running,
        Self::Idle,
        Self::PlannedStop,
        Self::Changeover,
        Self::Down,
    ];

    /// The JSON name of this state.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Idle => "idle",
            Self::PlannedStop => "planned_stop",
            Self::Changeover => "changeover",
            Self::Down => "down",
        }
    }
}

/// Why a machine is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A breakdown: counts as a failure for MTBF and MTTR.
    TechnicalFailure,
    /// No material at the machine.
    MaterialShortage,
    /// No operator at the machine.
    OperatorAbsence,
    /// Stopped to check quality.
    QualityCheck,
    /// Tool change or tool breakage.
    Tooling,
    /// Maintenance that was planned.
    PlannedMaintenance,
    /// A break in the shift calendar.
    Break,
    /// Outside every shift.
    NoShift,
    /// Nothing to produce.
    NoOrder,
    /// Anything else.
    Other,
}

impl StopReason {
    /// The JSON name of this reason.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TechnicalFailure => "technical_failure",
            Self::MaterialShortage => "material_shortage",
            Self::OperatorAbsence => "operator_absence",
            Self::QualityCheck => "quality_check",
            Self::Tooling => "tooling",
            Self::PlannedMaintenance => "planned_maintenance",
            Self::Break => "break",
            Self::NoShift => "no_shift",
            Self::NoOrder => "no_order",
            Self::Other => "other",
        }
    }
}

/// A machine changed state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateChange {
    /// The state the machine entered.
    pub state: MachineState,
    /// Why, for every state but `running`; absent means not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<StopReason>,
}

/// Quality outcome of one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartOutcome {
    /// Good the first time.
    Good,
    /// Thrown away.
    Scrap,
    /// Needs rework: not good the first time, so not counted as good for quality.
    Rework,
}

impl PartOutcome {
    /// The JSON name of this outcome.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Scrap => "scrap",
            Self::Rework => "rework",
        }
    }
}

/// One part came off the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartProduced {
    /// Good, scrap or rework.
    pub outcome: PartOutcome,
    /// How long this part's cycle actually took, in milliseconds.
    pub cycle_time_ms: u32,
    /// The part's serial number, where the machine knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_id: Option<String>,
}

/// One named sensor value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Metric name, e.g. `temperature` or `spindle_load`.
    pub name: CompactString,
    /// The value (finite).
    pub value: f64,
    /// Unit, e.g. `degC`, `mm/s`, `%`, `kW`; may be empty.
    #[serde(default)]
    pub unit: CompactString,
}

/// Sensor readings taken at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// At least one reading.
    pub readings: Vec<Reading>,
}

/// Operator login or logout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorAction {
    /// The operator started working at the machine.
    Login,
    /// The operator left the machine.
    Logout,
}

/// An operator logged in or out at a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorEvent {
    /// Login or logout.
    pub action: OperatorAction,
    /// The operator's badge or id.
    pub operator: String,
}

/// The kind-specific part of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// A machine state change.
    State(StateChange),
    /// A part came off the machine.
    Part(PartProduced),
    /// Sensor readings.
    Telemetry(Telemetry),
    /// An operator logged in or out.
    Operator(OperatorEvent),
}

impl EventBody {
    /// Which kind of event this is.
    pub const fn kind(&self) -> EventKind {
        match self {
            Self::State(_) => EventKind::State,
            Self::Part(_) => EventKind::Part,
            Self::Telemetry(_) => EventKind::Telemetry,
            Self::Operator(_) => EventKind::Operator,
        }
    }
}

/// One factory event: who, when, which in the device's sequence, and what.
///
/// This is also the stored and synced form (serialized with serde as JSON or any other format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The machine the event comes from.
    pub machine: MachineId,
    /// Device timestamp, Unix milliseconds UTC.
    pub ts_ms: i64,
    /// Per-device sequence number.
    pub seq: u64,
    /// What happened.
    pub body: EventBody,
}

/// Why a device payload was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The topic is not a device topic.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The payload is larger than [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {size} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// Payload size in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Not JSON, or JSON of the wrong shape (missing field, wrong type, unknown variant).
    #[error("{kind} payload is not valid: {message}")]
    Json {
        /// The event kind the topic named.
        kind: EventKind,
        /// What serde found, with the path of the field.
        message: String,
    },
    /// A field's value is outside what Millrace accepts.
    #[error("{kind} payload field `{field}` has value {value}, expected {expected}")]
    Field {
        /// The event kind the topic named.
        kind: EventKind,
        /// The field's name (with its path for nested fields).
        field: String,
        /// The value as received (shortened).
        value: String,
        /// What would have been accepted.
        expected: &'static str,
    },
    /// The payload's schema version is newer than this build reads.
    #[error(
        "payload schema version {found} is not supported: this build reads versions 1 to {supported}"
    )]
    Version {
        /// The version found in `v`.
        found: u64,
        /// The newest this build reads.
        supported: u16,
    },
}

impl DecodeError {
    /// A short, stable name for metrics labels and dead-letter records.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::Topic(TopicError::UnknownKind { .. }) => "unknown_kind",
            Self::Topic(_) => "bad_topic",
            Self::TooLarge { .. } => "too_large",
            Self::Json { .. } => "bad_json",
            Self::Field { .. } => "bad_field",
            Self::Version { .. } => "unsupported_version",
        }
    }
}

// Wire shapes: one flat JSON object per kind. `v` is optional on the way in (absent = 1) and
// always written on the way out.

const fn v1() -> u64 {
    1
}

#[derive(Deserialize)]
struct StateIn {
    #[serde(default = "v1")]
    v: u64,
    ts: i64,
    seq: u64,
    state: MachineState,
    #[serde(default)]
    reason: Option<StopReason>,
}

#[derive(Deserialize)]
struct PartIn {
    #[serde(default = "v1")]
    v: u64,
    ts: i64,
    seq: u64,
    outcome: PartOutcome,
    cycle_time_ms: u32,
    #[serde(default)]
    part_id: Option<String>,
}

#[derive(Deserialize)]
struct TelemetryIn {
    #[serde(default = "v1")]
    v: u64,
    ts: i64,
    seq: u64,
    readings: Vec<Reading>,
}

#[derive(Deserialize)]
struct OperatorIn {
    #[serde(default = "v1")]
    v: u64,
    ts: i64,
    seq: u64,
    action: OperatorAction,
    operator: String,
}

#[derive(Serialize)]
struct Out<'a, B: Serialize> {
    v: u16,
    ts: i64,
    seq: u64,
    #[serde(flatten)]
    body: &'a B,
}

fn parse<'de, T: Deserialize<'de>>(kind: EventKind, payload: &'de [u8]) -> Result<T, DecodeError> {
    // The fast path (UTF-8 checked once for the whole payload instead of string by string);
    // on failure, parse again with path tracking for a message naming the field.
    let fast = match std::str::from_utf8(payload) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(payload),
    };
    fast.or_else(|_| {
        let de = &mut serde_json::Deserializer::from_slice(payload);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = if path == "." || path.is_empty() {
                inner.to_string()
            } else {
                format!("field `{path}`: {inner}")
            };
            DecodeError::Json { kind, message }
        })
    })
}

fn short(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        format!("{s:?}")
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{:?}…", &s[..end])
    }
}

fn check_common(kind: EventKind, v: u64, ts: i64) -> Result<(), DecodeError> {
    if v == 0 || v > u64::from(SCHEMA_VERSION) {
        return Err(DecodeError::Version {
            found: v,
            supported: SCHEMA_VERSION,
        });
    }
    if !(MIN_TS_MS..MAX_TS_MS).contains(&ts) {
        return Err(DecodeError::Field {
            kind,
            field: "ts".into(),
            value: ts.to_string(),
            expected: "Unix time in milliseconds (UTC) between 2000-01-01 and 2100-01-01",
        });
    }
    Ok(())
}

fn check_name(
    kind: EventKind,
    field: impl FnOnce() -> String,
    value: &str,
    max: usize,
    expected: &'static str,
) -> Result<(), DecodeError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(DecodeError::Field {
            kind,
            field: field(),
            value: short(value),
            expected,
        })
    }
}

impl Event {
    /// Decodes a device message: the topic gives machine and kind, the payload the rest.
    pub fn decode(topic: &str, payload: &[u8]) -> Result<Event, DecodeError> {
        let (machine, kind) = MachineId::parse_topic(topic)?;
        Self::decode_payload(machine, kind, payload)
    }

    /// Decodes a payload whose topic was already parsed.
    pub fn decode_payload(
        machine: MachineId,
        kind: EventKind,
        payload: &[u8],
    ) -> Result<Event, DecodeError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(DecodeError::TooLarge {
                size: payload.len(),
                max: MAX_PAYLOAD_BYTES,
            });
        }
        let (ts_ms, seq, body) = match kind {
            EventKind::State => {
                let p: StateIn = parse(kind, payload)?;
                check_common(kind, p.v, p.ts)?;
                if p.state == MachineState::Running && p.reason.is_some() {
                    return Err(DecodeError::Field {
                        kind,
                        field: "reason".into(),
                        value: format!("{:?}", p.reason.map(StopReason::as_str).unwrap_or("")),
                        expected: "no reason when the state is `running`",
                    });
                }
                (
                    p.ts,
                    p.seq,
                    EventBody::State(StateChange {
                        state: p.state,
                        reason: p.reason,
                    }),
                )
            }
            EventKind::Part => {
                let p: PartIn = parse(kind, payload)?;
                check_common(kind, p.v, p.ts)?;
                if p.cycle_time_ms == 0 || p.cycle_time_ms > MAX_CYCLE_TIME_MS {
                    return Err(DecodeError::Field {
                        kind,
                        field: "cycle_time_ms".into(),
                        value: p.cycle_time_ms.to_string(),
                        expected: "a cycle time from 1 ms to 86400000 ms (one day)",
                    });
                }
                if let Some(id) = &p.part_id {
                    check_name(
                        kind,
                        || "part_id".into(),
                        id,
                        128,
                        "1 to 128 characters of A-Z a-z 0-9 _ - .",
                    )?;
                }
                (
                    p.ts,
                    p.seq,
                    EventBody::Part(PartProduced {
                        outcome: p.outcome,
                        cycle_time_ms: p.cycle_time_ms,
                        part_id: p.part_id,
                    }),
                )
            }
            EventKind::Telemetry => {
                let p: TelemetryIn = parse(kind, payload)?;
                check_common(kind, p.v, p.ts)?;
                if p.readings.is_empty() || p.readings.len() > MAX_READINGS {
                    return Err(DecodeError::Field {
                        kind,
                        field: "readings".into(),
                        value: format!("a list of {}", p.readings.len()),
                        expected: "1 to 256 readings",
                    });
                }
                for (i, r) in p.readings.iter().enumerate() {
                    check_name(
                        kind,
                        || format!("readings[{i}].name"),
                        &r.name,
                        64,
                        "a metric name of 1 to 64 characters of A-Z a-z 0-9 _ - .",
                    )?;
                    if r.unit.len() > 16 || r.unit.chars().any(char::is_control) {
                        return Err(DecodeError::Field {
                            kind,
                            field: format!("readings[{i}].unit"),
                            value: short(&r.unit),
                            expected: "a unit of at most 16 bytes without control characters",
                        });
                    }
                }
                (
                    p.ts,
                    p.seq,
                    EventBody::Telemetry(Telemetry {
                        readings: p.readings,
                    }),
                )
            }
            EventKind::Operator => {
                let p: OperatorIn = parse(kind, payload)?;
                check_common(kind, p.v, p.ts)?;
                check_name(
                    kind,
                    || "operator".into(),
                    &p.operator,
                    64,
                    "an operator id of 1 to 64 characters of A-Z a-z 0-9 _ - .",
                )?;
                (
                    p.ts,
                    p.seq,
                    EventBody::Operator(OperatorEvent {
                        action: p.action,
                        operator: p.operator,
                    }),
                )
            }
        };
        Ok(Event {
            machine,
            ts_ms,
            seq,
            body,
        })
    }

    /// The event's kind.
    pub const fn kind(&self) -> EventKind {
        self.body.kind()
    }

    /// The topic a device publishes this event to.
    pub fn topic(&self) -> String {
        self.machine.topic(self.kind())
    }

    /// The device payload for this event, as the current schema version.
    pub fn to_payload(&self) -> Vec<u8> {
        fn enc<B: Serialize>(ts: i64, seq: u64, body: &B) -> Vec<u8> {
            serde_json::to_vec(&Out {
                v: SCHEMA_VERSION,
                ts,
                seq,
                body,
            })
            .expect("event payloads always serialize")
        }
        match &self.body {
            EventBody::State(b) => enc(self.ts_ms, self.seq, b),
            EventBody::Part(b) => enc(self.ts_ms, self.seq, b),
            EventBody::Telemetry(b) => enc(self.ts_ms, self.seq, b),
            EventBody::Operator(b) => enc(self.ts_ms, self.seq, b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> MachineId {
        MachineId::new("plant-1", "line-a", "press-01").unwrap()
    }

    fn samples() -> Vec<Event> {
        let base = |seq, body| Event {
            machine: m(),
            ts_ms: 1_767_600_000_000 + seq as i64,
            seq,
            body,
        };
        vec![
            base(
                1,
                EventBody::State(StateChange {
                    state: MachineState::Running,
                    reason: None,
                }),
            ),
            base(
                2,
                EventBody::State(StateChange {
                    state: MachineState::Down,
                    reason: Some(StopReason::TechnicalFailure),
                }),
            ),
            base(
                3,
                EventBody::Part(PartProduced {
                    outcome: PartOutcome::Good,
                    cycle_time_ms: 31_250,
                    part_id: Some("SN-0001".into()),
                }),
            ),
            base(
                4,
                EventBody::Part(PartProduced {
                    outcome: PartOutcome::Scrap,
                    cycle_time_ms: 29_000,
                    part_id: None,
                }),
            ),
            base(
                5,
                EventBody::Telemetry(Telemetry {
                    readings: vec![
                        Reading {
                            name: "temperature".into(),
                            value: 71.25,
                            unit: "degC".into(),
                        },
                        Reading {
                            name: "vibration".into(),
                            value: 2.5,
                            unit: "mm/s".into(),
                        },
                    ],
                }),
            ),
            base(
                6,
                EventBody::Operator(OperatorEvent {
                    action: OperatorAction::Login,
                    operator: "op-17".into(),
                }),
            ),
        ]
    }

    #[test]
    fn every_kind_round_trips_through_its_payload() {
        for e in samples() {
            let decoded = Event::decode(&e.topic(), &e.to_payload()).unwrap();
            assert_eq!(decoded, e);
            // The stored/synced form round-trips too.
            let stored = serde_json::to_vec(&e).unwrap();
            assert_eq!(serde_json::from_slice::<Event>(&stored).unwrap(), e);
        }
    }

    #[test]
    fn names_longer_than_inline_and_escaped_names_round_trip() {
        // CompactString keeps up to 24 bytes inline; longer ones live on the heap.
        let site = "plant-with-a-rather-long-name-01";
        let topic = format!("factory/{site}/l/m/telemetry");
        let name = "spindle_bearing_temperature_front_left";
        let payload = format!(
            r#"{{"v":1,"ts":1767600000000,"seq":1,"readings":[{{"name":"{name}","value":2.5,"unit":"\u00b0C"}},{{"name":"t.q-2","value":1,"unit":"a\"b"}}]}}"#
        );
        let e = Event::decode(&topic, payload.as_bytes()).unwrap();
        assert_eq!(e.machine.site, site);
        let EventBody::Telemetry(t) = &e.body else {
            panic!("telemetry expected");
        };
        assert_eq!(
            t.readings
                .iter()
                .map(|r| (r.name.as_str(), r.unit.as_str()))
                .collect::<Vec<_>>(),
            [(name, "°C"), ("t.q-2", "a\"b")]
        );
        assert_eq!(Event::decode(&e.topic(), &e.to_payload()).unwrap(), e);
    }

    #[test]
    fn payloads_are_flat_and_versioned() {
        let e = &samples()[2];
        let v: serde_json::Value = serde_json::from_slice(&e.to_payload()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v":1,"ts":1_767_600_000_003_i64,"seq":3,"outcome":"good","cycle_time_ms":31250,"part_id":"SN-0001"})
        );
    }

    /// Payloads as version 1 devices send them. These files must stay readable by every later
    /// build: when the schema changes, add new fixtures, never edit these.
    #[test]
    fn version_1_fixtures_stay_readable() {
        let fixtures: [(&str, &str); 5] = [
            (
                "factory/plant-1/line-a/press-01/state",
                include_str!("../fixtures/v1/state.json"),
            ),
            (
                "factory/plant-1/line-a/press-01/part",
                include_str!("../fixtures/v1/part.json"),
            ),
            (
                "factory/plant-1/line-a/press-01/telemetry",
                include_str!("../fixtures/v1/telemetry.json"),
            ),
            (
                "factory/plant-1/line-a/press-01/operator",
                include_str!("../fixtures/v1/operator.json"),
            ),
            (
                "factory/plant-1/line-a/press-01/state",
                include_str!("../fixtures/v1/state-without-version.json"),
            ),
        ];
        let decoded: Vec<Event> = fixtures
            .iter()
            .map(|(t, p)| Event::decode(t, p.as_bytes()).unwrap_or_else(|e| panic!("{t}: {e}")))
            .collect();
        assert_eq!(
            decoded[0].body,
            EventBody::State(StateChange {
                state: MachineState::Down,
                reason: Some(StopReason::MaterialShortage)
            })
        );
        assert_eq!(
            decoded[1].body,
            EventBody::Part(PartProduced {
                outcome: PartOutcome::Rework,
                cycle_time_ms: 42_000,
                part_id: Some("A-17.3".into())
            })
        );
        let EventBody::Telemetry(t) = &decoded[2].body else {
            panic!()
        };
        assert_eq!(t.readings.len(), 4);
        assert_eq!(
            t.readings[3],
            Reading {
                name: "power".into(),
                value: 11.5,
                unit: "kW".into()
            }
        );
        assert_eq!(
            decoded[3].body,
            EventBody::Operator(OperatorEvent {
                action: OperatorAction::Logout,
                operator: "op-17".into()
            })
        );
        assert_eq!(decoded[4].seq, 41);
        assert!(decoded.iter().all(|e| e.ts_ms == 1_767_600_000_000));
    }

    fn err(topic_kind: &str, payload: &str) -> DecodeError {
        Event::decode(&format!("factory/p/l/m/{topic_kind}"), payload.as_bytes()).unwrap_err()
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "state",
                "not json",
                "bad_json",
                "state payload is not valid: expected ident at line 1 column 2",
            ),
            (
                "state",
                r#"{"ts":1767600000000,"state":"running"}"#,
                "bad_json",
                "missing field `seq`",
            ),
            (
                "state",
                r#"{"ts":1767600000000,"seq":"7","state":"running"}"#,
                "bad_json",
                "field `seq`: invalid type: string \"7\", expected u64",
            ),
            (
                "state",
                r#"{"ts":1767600000000,"seq":7,"state":"runnin"}"#,
                "bad_json",
                "field `state`: unknown variant `runnin`, expected one of `running`, `idle`, `planned_stop`, `changeover`, `down`",
            ),
            (
                "state",
                r#"{"ts":1767600000000,"seq":7,"state":"running","reason":"break"}"#,
                "bad_field",
                "field `reason` has value \"break\", expected no reason when the state is `running`",
            ),
            (
                "state",
                r#"{"ts":12,"seq":7,"state":"idle"}"#,
                "bad_field",
                "field `ts` has value 12, expected Unix time in milliseconds",
            ),
            (
                "state",
                r#"{"v":2,"ts":1767600000000,"seq":7,"state":"idle"}"#,
                "unsupported_version",
                "payload schema version 2 is not supported: this build reads versions 1 to 1",
            ),
            (
                "state",
                r#"{"v":0,"ts":1767600000000,"seq":7,"state":"idle"}"#,
                "unsupported_version",
                "version 0",
            ),
            (
                "part",
                r#"{"ts":1767600000000,"seq":1,"outcome":"good","cycle_time_ms":0}"#,
                "bad_field",
                "part payload field `cycle_time_ms` has value 0, expected a cycle time from 1 ms",
            ),
            (
                "part",
                r#"{"ts":1767600000000,"seq":1,"outcome":"great","cycle_time_ms":5}"#,
                "bad_json",
                "unknown variant `great`",
            ),
            (
                "part",
                r#"{"ts":1767600000000,"seq":1,"outcome":"good","cycle_time_ms":-5}"#,
                "bad_json",
                "field `cycle_time_ms`: invalid value: integer `-5`, expected u32",
            ),
            (
                "part",
                r#"{"ts":1767600000000,"seq":1,"outcome":"good","cycle_time_ms":5,"part_id":"a b"}"#,
                "bad_field",
                "field `part_id` has value \"a b\"",
            ),
            (
                "telemetry",
                r#"{"ts":1767600000000,"seq":1,"readings":[]}"#,
                "bad_field",
                "field `readings` has value a list of 0, expected 1 to 256 readings",
            ),
            (
                "telemetry",
                r#"{"ts":1767600000000,"seq":1,"readings":[{"name":"t","value":"hot"}]}"#,
                "bad_json",
                "field `readings[0].value`: invalid type: string \"hot\", expected f64",
            ),
            (
                "telemetry",
                r#"{"ts":1767600000000,"seq":1,"readings":[{"name":"t","value":1},{"name":"","value":2}]}"#,
                "bad_field",
                "field `readings[1].name` has value \"\"",
            ),
            (
                "telemetry",
                r#"{"ts":1767600000000,"seq":1,"readings":[{"name":"t","value":1,"unit":"a-very-long-unit-name"}]}"#,
                "bad_field",
                "field `readings[0].unit`",
            ),
            (
                "operator",
                r#"{"ts":1767600000000,"seq":1,"action":"login"}"#,
                "bad_json",
                "missing field `operator`",
            ),
            (
                "operator",
                r#"{"ts":1767600000000,"seq":1,"action":"dance","operator":"x"}"#,
                "bad_json",
                "unknown variant `dance`",
            ),
            (
                "alarm",
                r#"{}"#,
                "unknown_kind",
                "unknown event kind `alarm`",
            ),
        ];
        for (kind, payload, reason, msg) in cases {
            let e = err(kind, payload);
            assert_eq!(e.reason(), *reason, "{payload}: {e}");
            assert!(
                e.to_string().contains(msg),
                "{payload}\n got: {e}\nwant: {msg}"
            );
        }
    }

    #[test]
    fn oversized_payloads_are_refused_before_parsing() {
        let big = vec![b' '; MAX_PAYLOAD_BYTES + 1];
        let e = err("telemetry", std::str::from_utf8(&big).unwrap());
        assert_eq!(e.reason(), "too_large");
        assert_eq!(
            e.to_string(),
            format!(
                "payload of {} bytes is larger than the limit of {} bytes",
                MAX_PAYLOAD_BYTES + 1,
                MAX_PAYLOAD_BYTES
            )
        );
    }

    #[test]
    fn payloads_that_are_not_utf8_are_refused_and_utf8_units_are_kept() {
        let topic = "factory/p/l/m/telemetry";
        let mut bad =
            br#"{"v":1,"ts":1767600000000,"seq":1,"readings":[{"name":"t","value":1,"unit":"X"}]}"#
                .to_vec();
        let at = bad.iter().position(|b| *b == b'X').unwrap();
        bad[at] = 0xff;
        let e = Event::decode(topic, &bad).unwrap_err();
        assert_eq!(e.reason(), "bad_json");
        assert!(e.to_string().contains("readings[0].unit"), "{e}");
        let good =
            r#"{"v":1,"ts":1767600000000,"seq":1,"readings":[{"name":"t","value":1,"unit":"°C"}]}"#;
        let Event {
            body: EventBody::Telemetry(t),
            ..
        } = Event::decode(topic, good.as_bytes()).unwrap()
        else {
            panic!("telemetry");
        };
        assert_eq!(t.readings[0].unit, "°C");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix and a set of byte flips of valid payloads.
        for e in samples() {
            let p = e.to_payload();
            for end in 0..p.len() {
                let _ = Event::decode(&e.topic(), &p[..end]);
            }
            for i in 0..p.len() {
                for b in [0u8, b'"', b'{', b'9', 0xff] {
                    let mut q = p.clone();
                    q[i] = b;
                    let _ = Event::decode(&e.topic(), &q);
                }
            }
        }
    }
}
