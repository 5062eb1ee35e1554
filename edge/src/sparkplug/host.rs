//! The host's state machine: per edge node its birth (`bdSeq`, alias map, metric types and
//! units), its sequence numbers and its devices; each message in, the factory events and dead
//! letters out, and a rebirth request when the host cannot trust what it holds.
//!
//! It runs on the device connections' tasks (where ingest decodes), under one lock held only
//! while a message is decoded: a node's messages come in order on its connection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use millrace_shared::event::{MAX_CYCLE_TIME_MS, MAX_READINGS, MAX_TS_MS, MIN_TS_MS};
use millrace_shared::topic::MAX_ID_LEN;
use millrace_shared::{
    Event, EventBody, MachineId, PartOutcome, PartProduced, Reading, StateChange, Telemetry,
};
use serde::Serialize;
use srad_types::payload::{DataType, Message as _, Metric, Payload, metric::Value};

use super::config::{SparkplugConfig, StateMeaning, machine_id, parse_state};
use crate::store::DeadLetter;

/// Publishes into the broker (the broker's in-process publisher): `false` if it could not.
pub type Publisher = std::sync::Arc<dyn Fn(&str, Vec<u8>) -> bool + Send + Sync>;

/// What one message made: factory events (with `true` for history: metrics marked
/// `is_historical`, which go to the cloud as backfill), or dead letters for what was refused.
pub(crate) type Decoded = Result<(Event, bool), DeadLetter>;

/// The Sparkplug B topic namespace.
pub(crate) const NAMESPACE: &str = "spBv1.0";
/// Functions write metrics of a node or device by publishing a JSON object to
/// `millrace/sparkplug/write/{group}/{node}[/{device}]` (see [`Host::write`]).
pub const WRITE_PREFIX: &str = "millrace/sparkplug/write/";
/// The metric a node names its birth-death sequence with.
const BD_SEQ: &str = "bdSeq";
/// The command that asks a node to publish its births again.
const REBIRTH: &str = "Node Control/Rebirth";
/// Part events one counter may produce from one message, at most (a jump beyond is refused).
const MAX_PARTS_PER_MESSAGE: u64 = 1_000;
/// Sequence numbers each message's events may use: two counters' parts, a state, telemetry.
const EVENTS_PER_MESSAGE: u64 = 4_096;

/// One metric as its birth declared it.
#[derive(Debug, Clone)]
struct MetricDef {
    name: String,
    /// The name as a reading name (`Inputs/Temp 1` → `Inputs.Temp_1`).
    reading: String,
    datatype: u32,
    unit: String,
    /// A counter's last value and when it was taken.
    counter: Option<(u64, i64)>,
    /// The last value, for the status API.
    last: Option<f64>,
}

/// The metrics of a node or device, from its birth.
#[derive(Debug, Default)]
struct Metrics {
    defs: Vec<MetricDef>,
    by_alias: HashMap<u64, usize>,
    by_name: HashMap<String, usize>,
}

#[derive(Debug, Default)]
struct Device {
    online: bool,
    birth_ms: Option<i64>,
    death_ms: Option<i64>,
    last_ms: Option<i64>,
    metrics: Metrics,
}

#[derive(Debug, Default)]
struct Node {
    online: bool,
    bd_seq: Option<u64>,
    /// The last sequence number seen (0–255).
    seq: Option<u8>,
    birth_ms: Option<i64>,
    death_ms: Option<i64>,
    last_ms: Option<i64>,
    metrics: Metrics,
    devices: BTreeMap<String, Device>,
    rebirth_sent_ms: Option<i64>,
    rebirths_requested: u64,
    seq_gaps: u64,
    messages: u64,
}

/// How one group/node/device maps into the factory.
#[derive(Debug)]
struct Mapping {
    machine: MachineId,
    telemetry: Option<HashSet<String>>,
    state: Option<(String, HashMap<String, StateMeaning>)>,
    good: Option<String>,
    scrap: Option<String>,
}

/// The Sparkplug host: node states, the mapping, and the way to send commands.
pub struct Host {
    cfg: SparkplugConfig,
    mappings: HashMap<(String, String, Option<String>), Mapping>,
    nodes: Mutex<BTreeMap<(String, String), Node>>,
    /// Messages numbered so far, from the host's start time in ms: event sequence numbers
    /// (message × 4096 + place) are unique, and higher after a restart than before it.
    /// Sparkplug sessions are clean, so a node never gets a message redelivered on a new
    /// connection: numbering by arrival stores each message once.
    messages: AtomicU64,
    publisher: Publisher,
    /// Publishes retained (the host's `STATE`).
    retained: Publisher,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("host_id", &self.cfg.host_id)
            .finish_non_exhaustive()
    }
}

/// A node as the status API shows it.
#[derive(Debug, Serialize)]
pub struct NodeStatus {
    /// The Sparkplug group.
    pub group: String,
    /// The edge node id.
    pub node: String,
    /// Born and not dead.
    pub online: bool,
    /// The current birth's `bdSeq`.
    pub bd_seq: Option<u64>,
    /// The last sequence number received.
    pub seq: Option<u8>,
    /// When the current (or last) NBIRTH came, Unix ms.
    pub birth_ms: Option<i64>,
    /// When the last NDEATH was honoured, Unix ms.
    pub death_ms: Option<i64>,
    /// When the last message came, Unix ms.
    pub last_message_ms: Option<i64>,
    /// Messages received from the node and its devices.
    pub messages: u64,
    /// Sequence gaps seen.
    pub seq_gaps: u64,
    /// Rebirth requests sent to it.
    pub rebirths_requested: u64,
    /// The node's own metrics.
    pub metrics: Vec<MetricStatus>,
    /// Its devices.
    pub devices: Vec<DeviceStatus>,
}

/// A device as the status API shows it.
#[derive(Debug, Serialize)]
pub struct DeviceStatus {
    /// The device id.
    pub device: String,
    /// Born and not dead (nor its node).
    pub online: bool,
    /// When its current (or last) DBIRTH came.
    pub birth_ms: Option<i64>,
    /// When it died (DDEATH, or its node's NDEATH).
    pub death_ms: Option<i64>,
    /// When its last message came.
    pub last_message_ms: Option<i64>,
    /// Its metrics.
    pub metrics: Vec<MetricStatus>,
}

/// A metric as the status API shows it.
#[derive(Debug, Serialize)]
pub struct MetricStatus {
    /// Its Sparkplug name.
    pub name: String,
    /// Its alias, if the birth gave one.
    pub alias: Option<u64>,
    /// The Sparkplug data type's name.
    pub datatype: String,
    /// Its unit (from the birth's `engUnit` property).
    pub unit: String,
    /// Its last numeric value.
    pub value: Option<f64>,
    /// The node or device is offline: the value is no longer current.
    pub stale: bool,
}

/// The kinds of Sparkplug message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NBirth,
    NData,
    NDeath,
    DBirth,
    DData,
    DDeath,
    /// NCMD, DCMD: commands to nodes, not data.
    Command,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "NBIRTH" => Self::NBirth,
            "NDATA" => Self::NData,
            "NDEATH" => Self::NDeath,
            "DBIRTH" => Self::DBirth,
            "DDATA" => Self::DData,
            "DDEATH" => Self::DDeath,
            "NCMD" | "DCMD" => Self::Command,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::NBirth => "NBIRTH",
            Self::NData => "NDATA",
            Self::NDeath => "NDEATH",
            Self::DBirth => "DBIRTH",
            Self::DData => "DDATA",
            Self::DDeath => "DDEATH",
            Self::Command => "CMD",
        }
    }
}

/// Why the host asks a node for its births again.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RebirthReason {
    SeqGap,
    UnknownAlias,
    BeforeBirth,
    Malformed,
    Operator,
}

impl RebirthReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::SeqGap => "seq_gap",
            Self::UnknownAlias => "unknown_alias",
            Self::BeforeBirth => "before_birth",
            Self::Malformed => "malformed",
            Self::Operator => "operator",
        }
    }
}

/// Replaces what a factory id may not hold.
fn id_from(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_ID_LEN)
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// A metric name as a reading name: folders become dots, anything else not allowed `_`.
fn reading_from(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| match c {
            '/' => '.',
            c if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') => c,
            _ => '_',
        })
        .take(64)
        .collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

fn datatype_name(t: u32) -> String {
    DataType::try_from(t as i32)
        .map(|d| d.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("Unknown({t})"))
}

/// A metric's value as a number, by its Sparkplug type (signed types arrive as two's
/// complement in the unsigned fields). `None`: not a number (text, bytes, data sets…).
fn number(datatype: u32, v: &Value) -> Option<f64> {
    let t = DataType::try_from(datatype as i32).unwrap_or(DataType::Unknown);
    Some(match (t, v) {
        (DataType::Int8, Value::IntValue(x)) => f64::from(*x as u8 as i8),
        (DataType::Int16, Value::IntValue(x)) => f64::from(*x as u16 as i16),
        (DataType::Int32, Value::IntValue(x)) => f64::from(*x as i32),
        (DataType::Int64, Value::LongValue(x)) => *x as i64 as f64,
        (DataType::DateTime, Value::LongValue(x)) => *x as f64,
        (_, Value::IntValue(x)) => f64::from(*x),
        (_, Value::LongValue(x)) => *x as f64,
        (_, Value::FloatValue(x)) => f64::from(*x),
        (_, Value::DoubleValue(x)) => *x,
        (_, Value::BooleanValue(b)) => f64::from(u8::from(*b)),
        _ => return None,
    })
    .filter(|x: &f64| x.is_finite())
}

/// A value as the text a state mapping names (`1`, `true`, `RUN`).
fn text(datatype: u32, v: &Value) -> Option<String> {
    match v {
        Value::StringValue(s) => Some(s.clone()),
        Value::BooleanValue(b) => Some(b.to_string()),
        Value::FloatValue(_) | Value::DoubleValue(_) => number(datatype, v).map(|x| x.to_string()),
        Value::IntValue(_) | Value::LongValue(_) => {
            number(datatype, v).map(|x| format!("{}", x as i64))
        }
        _ => None,
    }
}

/// A JSON value as a command's metric value of `datatype` (signed types as two's complement).
fn command_value(datatype: u32, v: &serde_json::Value) -> Option<Value> {
    let t = DataType::try_from(datatype as i32).ok()?;
    Some(match t {
        DataType::Int8 | DataType::Int16 | DataType::Int32 => {
            let x = v.as_i64()?;
            let (lo, hi) = match t {
                DataType::Int8 => (i64::from(i8::MIN), i64::from(i8::MAX)),
                DataType::Int16 => (i64::from(i16::MIN), i64::from(i16::MAX)),
                _ => (i64::from(i32::MIN), i64::from(i32::MAX)),
            };
            if !(lo..=hi).contains(&x) {
                return None;
            }
            Value::IntValue(x as i32 as u32)
        }
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => {
            let max = match t {
                DataType::UInt8 => u64::from(u8::MAX),
                DataType::UInt16 => u64::from(u16::MAX),
                _ => u64::from(u32::MAX),
            };
            Value::IntValue(u32::try_from(v.as_u64().filter(|x| *x <= max)?).ok()?)
        }
        DataType::Int64 => Value::LongValue(v.as_i64()? as u64),
        DataType::UInt64 | DataType::DateTime => Value::LongValue(v.as_u64()?),
        DataType::Float => Value::FloatValue(v.as_f64()? as f32),
        DataType::Double => Value::DoubleValue(v.as_f64()?),
        DataType::Boolean => Value::BooleanValue(v.as_bool()?),
        DataType::String | DataType::Text => Value::StringValue(v.as_str()?.to_owned()),
        _ => return None,
    })
}

fn unit_of(m: &Metric) -> String {
    let Some(props) = &m.properties else {
        return String::new();
    };
    props
        .keys
        .iter()
        .zip(&props.values)
        .find(|(k, _)| matches!(k.as_str(), "engUnit" | "engUnits" | "unit" | "units"))
        .and_then(|(_, v)| match &v.value {
            Some(srad_types::payload::property_value::Value::StringValue(s)) => Some(
                s.chars()
                    .filter(|c| !c.is_control())
                    .take(16)
                    .collect::<String>(),
            ),
            _ => None,
        })
        .map(|mut s| {
            while s.len() > 16 {
                s.pop();
            }
            s
        })
        .unwrap_or_default()
}

impl Metrics {
    /// The metrics a birth declares.
    fn from_birth(p: &Payload) -> Self {
        let mut out = Self::default();
        for m in &p.metrics {
            let Some(name) = m.name.clone() else { continue };
            let def = MetricDef {
                reading: reading_from(&name),
                datatype: m.datatype.unwrap_or(0),
                unit: unit_of(m),
                counter: None,
                last: None,
                name: name.clone(),
            };
            let i = out.defs.len();
            out.defs.push(def);
            if let Some(a) = m.alias {
                out.by_alias.insert(a, i);
            }
            out.by_name.insert(name, i);
        }
        out
    }

    fn find(&self, m: &Metric) -> Option<usize> {
        match (&m.name, m.alias) {
            (Some(n), _) => self.by_name.get(n).copied(),
            (None, Some(a)) => self.by_alias.get(&a).copied(),
            (None, None) => None,
        }
    }

    fn status(&self, stale: bool) -> Vec<MetricStatus> {
        let alias: HashMap<usize, u64> = self.by_alias.iter().map(|(a, i)| (*i, *a)).collect();
        self.defs
            .iter()
            .enumerate()
            .map(|(i, d)| MetricStatus {
                name: d.name.clone(),
                alias: alias.get(&i).copied(),
                datatype: datatype_name(d.datatype),
                unit: d.unit.clone(),
                value: d.last,
                stale,
            })
            .collect()
    }
}

/// What one message produced, gathered per machine and time.
struct Output<'a> {
    out: &'a mut Vec<Decoded>,
    topic: &'a str,
    payload: &'a [u8],
    now_ms: i64,
    /// The message's Sparkplug seq.
    seq: u8,
    /// The first sequence number of this message's events (see [`Host::messages`]).
    first_seq: u64,
    /// Events made from this message so far.
    k: u64,
    /// Telemetry readings per (machine, time, historical).
    readings: BTreeMap<(MachineId, i64, bool), Vec<Reading>>,
}

impl Output<'_> {
    /// Each event of a message gets the message's number times 4096 plus its place in the
    /// message: unique over the host's life, increasing with time.
    fn event(&mut self, machine: MachineId, ts_ms: i64, body: EventBody, historical: bool) {
        let seq = self.first_seq + self.k.min(EVENTS_PER_MESSAGE - 1);
        self.k += 1;
        self.out.push(Ok((
            Event {
                machine,
                ts_ms,
                seq,
                body,
            },
            historical,
        )));
    }

    fn dead(&mut self, reason: &str, error: String) {
        self.out.push(Err(DeadLetter::new(
            self.now_ms,
            self.topic,
            self.payload,
            reason,
            error,
        )));
    }

    fn finish(mut self) {
        for ((machine, ts, historical), readings) in std::mem::take(&mut self.readings) {
            for chunk in readings.chunks(MAX_READINGS) {
                self.event(
                    machine.clone(),
                    ts,
                    EventBody::Telemetry(Telemetry {
                        readings: chunk.to_vec(),
                    }),
                    historical,
                );
            }
        }
    }
}

impl Host {
    /// A host with `cfg` (validated) sending its commands through `publisher` and its `STATE`
    /// through `retained`.
    pub(crate) fn new(cfg: SparkplugConfig, publisher: Publisher, retained: Publisher) -> Self {
        let mappings = cfg
            .machines
            .iter()
            .map(|m| {
                let state = m.state.as_ref().map(|s| {
                    (
                        s.metric.clone(),
                        s.values
                            .iter()
                            .map(|(v, meaning)| {
                                (v.clone(), parse_state(meaning).expect("validated"))
                            })
                            .collect(),
                    )
                });
                (
                    (m.group.clone(), m.node.clone(), m.device.clone()),
                    Mapping {
                        machine: machine_id(&m.machine).expect("validated"),
                        telemetry: m.telemetry.as_ref().map(|t| t.iter().cloned().collect()),
                        state,
                        good: m.good_parts.clone(),
                        scrap: m.scrap_parts.clone(),
                    },
                )
            })
            .collect();
        Self {
            cfg,
            mappings,
            nodes: Mutex::new(BTreeMap::new()),
            messages: AtomicU64::new(chrono::Utc::now().timestamp_millis().max(0) as u64),
            publisher,
            retained,
        }
    }

    /// The host's `STATE` topic.
    pub(crate) fn state_topic(&self) -> String {
        format!("{NAMESPACE}/STATE/{}", self.cfg.host_id)
    }

    /// Publishes the host's `STATE` (Sparkplug 3.0: JSON `{online, timestamp}`, retained).
    pub(crate) fn publish_state(&self, online: bool) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let payload =
            serde_json::to_vec(&serde_json::json!({ "online": online, "timestamp": now_ms }))
                .expect("json");
        if (self.retained)(&self.state_topic(), payload) {
            tracing::info!(topic = %self.state_topic(), online, "Sparkplug host STATE published");
        } else {
            tracing::warn!(topic = %self.state_topic(), online, "Sparkplug host STATE not published: the in-process publish queue is full");
        }
    }

    /// Decodes one message published under `spBv1.0/` into `out`.
    pub(crate) fn receive(&self, topic: &str, payload: &[u8], now_ms: i64, out: &mut Vec<Decoded>) {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut o = Output {
            out,
            topic,
            payload,
            now_ms,
            seq: 0,
            first_seq: 0,
            k: 0,
            readings: BTreeMap::new(),
        };
        // spBv1.0/STATE/{host}: another host's (or our own) state, not data.
        if levels.get(1) == Some(&"STATE") {
            return;
        }
        let (group, kind, node, device) = match levels[..] {
            [_, g, k, n] => (g, Kind::parse(k), n, None),
            [_, g, k, n, d] => (g, Kind::parse(k), n, Some(d)),
            _ => (levels.get(1).copied().unwrap_or(""), None, "", None),
        };
        let Some(kind) = kind.filter(|k| {
            let device_kind = matches!(k, Kind::DBirth | Kind::DData | Kind::DDeath);
            !node.is_empty() && !group.is_empty() && device_kind == device.is_some()
                || *k == Kind::Command
        }) else {
            metrics::counter!("millrace_edge_sparkplug_messages_total", "type" => "invalid")
                .increment(1);
            o.dead(
                "sparkplug_topic",
                "not a Sparkplug B topic: expected spBv1.0/{group}/{NBIRTH|NDATA|NDEATH|DBIRTH|DDATA|DDEATH}/{node}[/{device}]".into(),
            );
            return;
        };
        if kind == Kind::Command {
            return;
        }
        metrics::counter!("millrace_edge_sparkplug_messages_total", "type" => kind.as_str())
            .increment(1);
        // Decoded before the lock: the lock is shared by every connection.
        let decoded = Payload::decode(payload);
        let mut nodes = self.nodes.lock().expect("sparkplug nodes");
        let key = (group.to_owned(), node.to_owned());
        let n = nodes.entry(key).or_default();
        n.messages += 1;
        n.last_ms = Some(now_ms);
        let p = match decoded {
            Ok(p) => p,
            Err(e) => {
                o.dead(
                    "sparkplug_payload",
                    format!("not a Sparkplug B payload: {e}"),
                );
                if matches!(kind, Kind::NData | Kind::DData | Kind::DBirth) && n.online {
                    self.request_rebirth(group, node, n, RebirthReason::Malformed, now_ms);
                }
                return;
            }
        };
        o.seq = p.seq.unwrap_or(0) as u8;
        o.first_seq = self.messages.fetch_add(1, Ordering::Relaxed) * EVENTS_PER_MESSAGE;
        let ts = p.timestamp.map_or(now_ms, |t| t as i64);
        match kind {
            Kind::NBirth => {
                let Some(bd) = p.metrics.iter().find(|m| m.name.as_deref() == Some(BD_SEQ)) else {
                    o.dead(
                        "sparkplug_birth",
                        "NBIRTH without a bdSeq metric: refused (Sparkplug 3.0 requires it)".into(),
                    );
                    return;
                };
                let bd_seq = match bd.value {
                    Some(Value::LongValue(v)) => v,
                    Some(Value::IntValue(v)) => u64::from(v),
                    _ => {
                        o.dead("sparkplug_birth", "NBIRTH's bdSeq is not an integer".into());
                        return;
                    }
                };
                n.online = true;
                n.bd_seq = Some(bd_seq);
                n.seq = Some(o.seq);
                n.birth_ms = Some(now_ms);
                n.rebirth_sent_ms = None;
                n.metrics = Metrics::from_birth(&p);
                // A new birth: the devices are born again after it.
                for d in n.devices.values_mut() {
                    if d.online {
                        d.online = false;
                        d.death_ms = Some(now_ms);
                    }
                }
                tracing::info!(group, node, bd_seq, "Sparkplug node born");
                let target = (group, node, None);
                self.values(&target, &mut n.metrics, &p.metrics, ts, true, &mut o);
            }
            Kind::DBirth => {
                let device = device.expect("device kind");
                if !n.online {
                    o.dead(
                        "sparkplug_before_birth",
                        format!("DBIRTH of `{device}` before its node's NBIRTH"),
                    );
                    self.request_rebirth(group, node, n, RebirthReason::BeforeBirth, now_ms);
                    return;
                }
                self.check_seq(group, node, n, p.seq, now_ms);
                let d = n.devices.entry(device.to_owned()).or_default();
                d.online = true;
                d.birth_ms = Some(now_ms);
                d.last_ms = Some(now_ms);
                d.metrics = Metrics::from_birth(&p);
                let target = (group, node, Some(device));
                self.values(&target, &mut d.metrics, &p.metrics, ts, true, &mut o);
            }
            Kind::NData | Kind::DData => {
                let online =
                    n.online && device.is_none_or(|d| n.devices.get(d).is_some_and(|d| d.online));
                if !online {
                    o.dead(
                        "sparkplug_before_birth",
                        match device {
                            Some(d) => {
                                format!("DDATA of `{d}` before its DBIRTH (or after its death)")
                            }
                            None => "NDATA before the node's NBIRTH (or after its death)".into(),
                        },
                    );
                    self.request_rebirth(group, node, n, RebirthReason::BeforeBirth, now_ms);
                    return;
                }
                self.check_seq(group, node, n, p.seq, now_ms);
                let (metrics, target) = match device {
                    Some(d) => {
                        let d_state = n.devices.get_mut(d).expect("online device");
                        d_state.last_ms = Some(now_ms);
                        (&mut d_state.metrics, (group, node, Some(d)))
                    }
                    None => (&mut n.metrics, (group, node, None)),
                };
                let unknown = self.values(&target, metrics, &p.metrics, ts, false, &mut o);
                if unknown > 0 {
                    self.request_rebirth(group, node, n, RebirthReason::UnknownAlias, now_ms);
                }
            }
            Kind::NDeath => {
                let bd = p
                    .metrics
                    .iter()
                    .find(|m| m.name.as_deref() == Some(BD_SEQ))
                    .and_then(|m| match m.value {
                        Some(Value::LongValue(v)) => Some(v),
                        Some(Value::IntValue(v)) => Some(u64::from(v)),
                        _ => None,
                    });
                if n.online && bd.is_some() && bd == n.bd_seq {
                    n.online = false;
                    n.death_ms = Some(now_ms);
                    for d in n.devices.values_mut().filter(|d| d.online) {
                        d.online = false;
                        d.death_ms = Some(now_ms);
                    }
                    tracing::info!(group, node, bd_seq = bd, "Sparkplug node died");
                } else {
                    metrics::counter!("millrace_edge_sparkplug_stale_deaths_total").increment(1);
                    o.dead(
                        "sparkplug_stale_death",
                        format!(
                            "NDEATH with bdSeq {} ignored: the current birth's is {}",
                            bd.map_or("none".into(), |b| b.to_string()),
                            n.bd_seq
                                .filter(|_| n.online)
                                .map_or("none (offline)".into(), |b| b.to_string())
                        ),
                    );
                }
            }
            Kind::DDeath => {
                let device = device.expect("device kind");
                self.check_seq(group, node, n, p.seq, now_ms);
                match n.devices.get_mut(device) {
                    Some(d) if d.online => {
                        d.online = false;
                        d.death_ms = Some(now_ms);
                    }
                    _ => o.dead(
                        "sparkplug_before_birth",
                        format!("DDEATH of `{device}`, which is not online"),
                    ),
                }
            }
            Kind::Command => unreachable!("returned above"),
        }
        drop(nodes);
        o.finish();
    }

    /// Checks a message's seq against the node's last; a gap is counted and answered with a
    /// rebirth request (what was lost may have changed a value the host holds).
    fn check_seq(&self, group: &str, node: &str, n: &mut Node, seq: Option<u64>, now_ms: i64) {
        let expected = n.seq.map(|s| s.wrapping_add(1));
        let got = seq.filter(|s| *s <= 255).map(|s| s as u8);
        if got.is_none() || (expected.is_some() && got != expected) {
            n.seq_gaps += 1;
            metrics::counter!("millrace_edge_sparkplug_seq_gaps_total").increment(1);
            tracing::warn!(group, node, ?expected, received = ?seq, "Sparkplug sequence gap");
            self.request_rebirth(group, node, n, RebirthReason::SeqGap, now_ms);
        }
        if got.is_some() {
            n.seq = got;
        }
    }

    /// Turns a birth's or data message's metrics into events of the machines they map to.
    /// Returns how many metrics named an alias the birth did not declare.
    fn values(
        &self,
        target: &(&str, &str, Option<&str>),
        metrics: &mut Metrics,
        values: &[Metric],
        msg_ts: i64,
        birth: bool,
        o: &mut Output<'_>,
    ) -> usize {
        let (group, node, device) = *target;
        let key = (group.to_owned(), node.to_owned(), device.map(str::to_owned));
        let mapping = self.mappings.get(&key);
        let default_machine = || {
            MachineId::new(
                id_from(group),
                id_from(node),
                id_from(device.unwrap_or("node")),
            )
            .expect("sanitised ids are valid")
        };
        let mut unknown = vec![];
        let mut refused = vec![];
        for m in values {
            let Some(i) = metrics.find(m) else {
                unknown.push(
                    m.name
                        .clone()
                        .unwrap_or_else(|| format!("alias {}", m.alias.unwrap_or_default())),
                );
                continue;
            };
            let def = &mut metrics.defs[i];
            if def.name == BD_SEQ
                || def.name.starts_with("Node Control/")
                || def.name.starts_with("Device Control/")
                || m.is_null == Some(true)
            {
                continue;
            }
            let Some(v) = &m.value else { continue };
            let datatype = m.datatype.unwrap_or(def.datatype);
            let historical = m.is_historical == Some(true);
            let ts = m.timestamp.map_or(msg_ts, |t| t as i64);
            if !(MIN_TS_MS..MAX_TS_MS).contains(&ts) {
                refused.push(format!("{}: timestamp {ts} out of range", def.name));
                continue;
            }
            let num = number(datatype, v);
            if num.is_some() {
                def.last = num;
            }
            if let Some(map) = mapping {
                if let Some((state_metric, values)) = &map.state
                    && *state_metric == def.name
                {
                    match text(datatype, v).and_then(|t| values.get(&t).map(|s| (t, *s))) {
                        Some((_, (state, reason))) => o.event(
                            map.machine.clone(),
                            ts,
                            EventBody::State(StateChange { state, reason }),
                            historical,
                        ),
                        None => refused.push(format!(
                            "{}: value {:?} is not in the state mapping",
                            def.name,
                            text(datatype, v).unwrap_or_default()
                        )),
                    }
                    continue;
                }
                let outcome = if map.good.as_deref() == Some(def.name.as_str()) {
                    Some(PartOutcome::Good)
                } else if map.scrap.as_deref() == Some(def.name.as_str()) {
                    Some(PartOutcome::Scrap)
                } else {
                    None
                };
                if let Some(outcome) = outcome {
                    let Some(count) = num.filter(|x| *x >= 0.0).map(|x| x as u64) else {
                        refused.push(format!("{}: a part counter needs a number ≥ 0", def.name));
                        continue;
                    };
                    let last = def.counter.replace((count, ts));
                    if birth {
                        continue;
                    }
                    // A lower value than the last is a counter that was reset (to 0, then
                    // counted up to `count`).
                    let (delta, since) = match last {
                        Some((prev, at)) if count >= prev => (count - prev, at),
                        Some((_, at)) => (count, at),
                        None => (0, ts),
                    };
                    if delta > MAX_PARTS_PER_MESSAGE {
                        refused.push(format!(
                            "{}: the counter jumped by {delta} in one message (at most {MAX_PARTS_PER_MESSAGE} parts are taken from one)",
                            def.name
                        ));
                        continue;
                    }
                    if delta > 0 {
                        let cycle = ((ts - since).max(delta as i64) / delta as i64)
                            .clamp(1, i64::from(MAX_CYCLE_TIME_MS))
                            as u32;
                        for _ in 0..delta {
                            o.event(
                                map.machine.clone(),
                                ts,
                                EventBody::Part(PartProduced {
                                    outcome,
                                    cycle_time_ms: cycle,
                                    part_id: None,
                                }),
                                historical,
                            );
                        }
                    }
                    continue;
                }
            }
            let Some(value) = num else {
                metrics::counter!("millrace_edge_sparkplug_metrics_skipped_total", "reason" => "not_numeric").increment(1);
                continue;
            };
            let machine = match mapping {
                Some(map) if map.telemetry.as_ref().is_none_or(|t| t.contains(&def.name)) => {
                    map.machine.clone()
                }
                _ => default_machine(),
            };
            o.readings
                .entry((machine, ts, historical))
                .or_default()
                .push(Reading {
                    name: def.reading.as_str().into(),
                    value,
                    unit: def.unit.as_str().into(),
                });
        }
        if !unknown.is_empty() {
            metrics::counter!("millrace_edge_sparkplug_unknown_metrics_total")
                .increment(unknown.len() as u64);
            o.dead(
                "sparkplug_unknown_alias",
                format!("metrics the birth did not declare: {}", unknown.join(", ")),
            );
        }
        if !refused.is_empty() {
            o.dead("sparkplug_metric", refused.join("; "));
        }
        unknown.len()
    }

    /// Sends `NCMD Node Control/Rebirth` to a node, at most once per `rebirth_interval`.
    fn request_rebirth(
        &self,
        group: &str,
        node: &str,
        n: &mut Node,
        reason: RebirthReason,
        now_ms: i64,
    ) -> bool {
        let interval = self.cfg.rebirth_interval.as_millis() as i64;
        if n.rebirth_sent_ms.is_some_and(|t| now_ms - t < interval) {
            return false;
        }
        let payload = Payload {
            timestamp: Some(now_ms as u64),
            metrics: vec![Metric {
                name: Some(REBIRTH.into()),
                timestamp: Some(now_ms as u64),
                datatype: Some(DataType::Boolean as u32),
                value: Some(Value::BooleanValue(true)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let topic = format!("{NAMESPACE}/{group}/NCMD/{node}");
        let sent = (self.publisher)(&topic, payload.encode_to_vec());
        if sent {
            n.rebirth_sent_ms = Some(now_ms);
            n.rebirths_requested += 1;
            metrics::counter!("millrace_edge_sparkplug_rebirths_requested_total", "reason" => reason.as_str()).increment(1);
            tracing::info!(
                group,
                node,
                reason = reason.as_str(),
                "asked a Sparkplug node to rebirth"
            );
        }
        sent
    }

    /// Sends an NCMD (or, with a device, a DCMD) that sets metrics, from a JSON object
    /// `{"Setpoint": 42.5, "Run": true}` published by a function to [`WRITE_PREFIX`]`{target}`.
    /// Each metric must be in the node's (device's) current birth; its value is sent with the
    /// birth's data type. Returns the command's topic, or why nothing was sent.
    pub fn write(&self, target: &str, json: &[u8], now_ms: i64) -> Result<String, String> {
        let parts: Vec<&str> = target.split('/').collect();
        let (group, node, device) = match parts[..] {
            [g, n] => (g, n, None),
            [g, n, d] => (g, n, Some(d)),
            _ => return Err(format!("`{target}` is not group/node or group/node/device")),
        };
        let values: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json)
            .map_err(|e| format!("the write is not a JSON object of metric values: {e}"))?;
        if values.is_empty() {
            return Err("the write names no metric".into());
        }
        let nodes = self.nodes.lock().expect("sparkplug nodes");
        let n = nodes
            .get(&(group.to_owned(), node.to_owned()))
            .filter(|n| n.online)
            .ok_or_else(|| format!("node `{group}/{node}` is not online"))?;
        let defs = match device {
            Some(d) => {
                &n.devices
                    .get(d)
                    .filter(|d| d.online)
                    .ok_or_else(|| format!("device `{group}/{node}/{d}` is not online"))?
                    .metrics
            }
            None => &n.metrics,
        };
        let mut metrics = Vec::with_capacity(values.len());
        for (name, v) in values {
            let def = defs
                .by_name
                .get(&name)
                .map(|i| &defs.defs[*i])
                .ok_or_else(|| format!("`{name}` is not a metric of the birth"))?;
            let value = command_value(def.datatype, &v)
                .ok_or_else(|| format!("`{name}`: {v} is not a {}", datatype_name(def.datatype)))?;
            metrics.push(Metric {
                name: Some(name),
                timestamp: Some(now_ms as u64),
                datatype: Some(def.datatype),
                value: Some(value),
                ..Default::default()
            });
        }
        drop(nodes);
        let topic = match device {
            Some(d) => format!("{NAMESPACE}/{group}/DCMD/{node}/{d}"),
            None => format!("{NAMESPACE}/{group}/NCMD/{node}"),
        };
        let payload = Payload {
            timestamp: Some(now_ms as u64),
            metrics,
            ..Default::default()
        };
        if !(self.publisher)(&topic, payload.encode_to_vec()) {
            return Err("the broker's in-process publish queue is full".into());
        }
        metrics::counter!("millrace_edge_sparkplug_writes_total").increment(1);
        Ok(topic)
    }

    /// Asks `group`/`node` for a rebirth by hand (CLI, REST): `false` if the node was never
    /// seen. Not rate-limited.
    pub(crate) fn rebirth(&self, group: &str, node: &str, now_ms: i64) -> Option<bool> {
        let mut nodes = self.nodes.lock().expect("sparkplug nodes");
        let n = nodes.get_mut(&(group.to_owned(), node.to_owned()))?;
        n.rebirth_sent_ms = None;
        Some(self.request_rebirth(group, node, n, RebirthReason::Operator, now_ms))
    }

    /// Every node seen, with its devices and metrics.
    pub(crate) fn status(&self) -> Vec<NodeStatus> {
        let nodes = self.nodes.lock().expect("sparkplug nodes");
        nodes
            .iter()
            .map(|((group, node), n)| NodeStatus {
                group: group.clone(),
                node: node.clone(),
                online: n.online,
                bd_seq: n.bd_seq,
                seq: n.seq,
                birth_ms: n.birth_ms,
                death_ms: n.death_ms,
                last_message_ms: n.last_ms,
                messages: n.messages,
                seq_gaps: n.seq_gaps,
                rebirths_requested: n.rebirths_requested,
                metrics: n.metrics.status(!n.online),
                devices: n
                    .devices
                    .iter()
                    .map(|(id, d)| DeviceStatus {
                        device: id.clone(),
                        online: d.online && n.online,
                        birth_ms: d.birth_ms,
                        death_ms: d.death_ms,
                        last_message_ms: d.last_ms,
                        metrics: d.metrics.status(!(d.online && n.online)),
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use srad_types::payload::{PropertySet, PropertyValue, property_value};

    use super::*;
    use crate::sparkplug::config::{MachineMapping, StateMapping};

    type Sent = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

    fn host() -> (Host, Sent) {
        let sent: Sent = Arc::default();
        let publisher: Publisher = {
            let sent = sent.clone();
            Arc::new(move |t: &str, p: Vec<u8>| {
                sent.lock().unwrap().push((t.to_owned(), p));
                true
            })
        };
        let cfg = SparkplugConfig {
            machines: vec![MachineMapping {
                group: "g".into(),
                node: "n".into(),
                device: Some("d".into()),
                machine: "s/l/m".into(),
                telemetry: Some(vec!["Temp".into()]),
                state: Some(StateMapping {
                    metric: "Run".into(),
                    values: [
                        ("true".into(), "running".into()),
                        ("false".into(), "down:tooling".into()),
                    ]
                    .into_iter()
                    .collect(),
                }),
                good_parts: Some("Good".into()),
                scrap_parts: None,
            }],
            ..SparkplugConfig::default()
        };
        cfg.validate().unwrap();
        (Host::new(cfg, publisher.clone(), publisher), sent)
    }

    const T: i64 = 1_767_600_000_000;

    fn metric(name: Option<&str>, alias: u64, datatype: DataType, value: Value) -> Metric {
        Metric {
            name: name.map(str::to_owned),
            alias: Some(alias),
            datatype: Some(datatype as u32),
            value: Some(value),
            ..Default::default()
        }
    }

    fn payload(seq: u64, ts: i64, metrics: Vec<Metric>) -> Vec<u8> {
        Payload {
            timestamp: Some(ts as u64),
            seq: Some(seq),
            metrics,
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn receive(h: &Host, topic: &str, p: &[u8]) -> (Vec<Event>, Vec<DeadLetter>) {
        let mut out = vec![];
        h.receive(topic, p, T, &mut out);
        let (mut events, mut dead) = (vec![], vec![]);
        for d in out {
            match d {
                Ok((e, _)) => events.push(e),
                Err(d) => dead.push(d),
            }
        }
        (events, dead)
    }

    fn birth(h: &Host, bd_seq: u64) {
        let (e, d) = receive(
            h,
            "spBv1.0/g/NBIRTH/n",
            &payload(
                0,
                T,
                vec![metric(
                    Some(BD_SEQ),
                    0,
                    DataType::Int64,
                    Value::LongValue(bd_seq),
                )],
            ),
        );
        assert!(e.is_empty() && d.is_empty(), "{d:?}");
        let mut temp = metric(Some("Temp"), 1, DataType::Int16, Value::IntValue(0xffff));
        temp.properties = Some(PropertySet {
            keys: vec!["engUnit".into()],
            values: vec![PropertyValue {
                r#type: Some(DataType::String as u32),
                is_null: None,
                value: Some(property_value::Value::StringValue("degC".into())),
            }],
        });
        let (e, d) = receive(
            h,
            "spBv1.0/g/DBIRTH/n/d",
            &payload(
                1,
                T,
                vec![
                    temp,
                    metric(Some("Run"), 2, DataType::Boolean, Value::BooleanValue(true)),
                    metric(Some("Good"), 3, DataType::UInt32, Value::IntValue(10)),
                    metric(
                        Some("Other/Load %"),
                        4,
                        DataType::Int8,
                        Value::IntValue(0x80),
                    ),
                ],
            ),
        );
        assert!(d.is_empty(), "{d:?}");
        // The birth's values: the state, and telemetry with units and signed types decoded.
        let bodies: Vec<&EventBody> = e.iter().map(|e| &e.body).collect();
        assert!(bodies.contains(&&EventBody::State(StateChange {
            state: MachineState::Running,
            reason: None
        })));
        let readings: Vec<(String, String, f64, String)> = e
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::Telemetry(t) => Some(t.readings.iter().map(move |r| {
                    (
                        e.machine.to_string(),
                        r.name.to_string(),
                        r.value,
                        r.unit.to_string(),
                    )
                })),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(
            readings,
            vec![
                ("g/n/d".into(), "Other.Load__".into(), -128.0, String::new()),
                ("s/l/m".into(), "Temp".into(), -1.0, "degC".into()),
            ]
        );
    }

    use millrace_shared::MachineState;

    #[test]
    fn counters_count_parts_a_reset_restarts_them_and_a_gap_asks_for_a_rebirth() {
        let (h, sent) = host();
        birth(&h, 4);
        let ddata = |seq: u64, minute: i64, good: u32| {
            payload(
                seq,
                T + minute * 60_000,
                vec![metric(None, 3, DataType::UInt32, Value::IntValue(good))],
            )
        };
        let parts = |events: &[Event]| {
            events
                .iter()
                .filter(|e| matches!(e.body, EventBody::Part(_)))
                .count()
        };
        let (e, _) = receive(&h, "spBv1.0/g/DDATA/n/d", &ddata(2, 1, 14));
        assert_eq!(parts(&e), 4);
        let EventBody::Part(p) = &e[0].body else {
            panic!()
        };
        assert_eq!(p.cycle_time_ms, 15_000, "a minute for 4 parts");
        // Reset: 2 is below 14, so 2 parts.
        let (e, _) = receive(&h, "spBv1.0/g/DDATA/n/d", &ddata(3, 2, 2));
        assert_eq!(parts(&e), 2);
        // Event sequence numbers are distinct within a message.
        let seqs: HashSet<u64> = e.iter().map(|e| e.seq).collect();
        assert_eq!(seqs.len(), 2);
        assert!(sent.lock().unwrap().is_empty());
        // seq 4 is skipped.
        let (e, _) = receive(&h, "spBv1.0/g/DDATA/n/d", &ddata(5, 3, 5));
        assert_eq!(parts(&e), 3, "the data after a gap is kept");
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, "spBv1.0/g/NCMD/n");
        let cmd = Payload::decode(&sent[0].1[..]).unwrap();
        assert_eq!(cmd.metrics[0].name.as_deref(), Some(REBIRTH));
        assert_eq!(cmd.metrics[0].value, Some(Value::BooleanValue(true)));
        let status = h.status();
        assert_eq!(status[0].seq_gaps, 1);
        assert_eq!(status[0].rebirths_requested, 1);
    }

    #[test]
    fn state_values_map_to_states_and_unmapped_ones_are_refused() {
        let (h, _) = host();
        birth(&h, 1);
        let stopped = payload(
            2,
            T,
            vec![metric(
                None,
                2,
                DataType::Boolean,
                Value::BooleanValue(false),
            )],
        );
        let (e, d) = receive(&h, "spBv1.0/g/DDATA/n/d", &stopped);
        assert!(d.is_empty());
        assert_eq!(
            e[0].body,
            EventBody::State(StateChange {
                state: MachineState::Down,
                reason: Some(millrace_shared::StopReason::Tooling)
            })
        );
        let mut h2_cfg = h.cfg.clone();
        h2_cfg.machines[0]
            .state
            .as_mut()
            .unwrap()
            .values
            .remove("false");
        let h2 = Host::new(h2_cfg, h.publisher.clone(), h.publisher.clone());
        birth(&h2, 1);
        let (e, d) = receive(&h2, "spBv1.0/g/DDATA/n/d", &stopped);
        assert!(e.is_empty());
        assert_eq!(d[0].reason, "sparkplug_metric");
        assert!(
            d[0].error.contains("not in the state mapping"),
            "{}",
            d[0].error
        );
    }

    #[test]
    fn historical_metrics_are_marked_as_history() {
        let (h, _) = host();
        birth(&h, 1);
        let mut old = metric(None, 1, DataType::Int16, Value::IntValue(7));
        old.is_historical = Some(true);
        old.timestamp = Some((T - 3_600_000) as u64);
        let live = metric(None, 1, DataType::Int16, Value::IntValue(8));
        let mut out = vec![];
        h.receive(
            "spBv1.0/g/DDATA/n/d",
            &payload(2, T, vec![old, live]),
            T,
            &mut out,
        );
        let got: Vec<(i64, bool)> = out
            .into_iter()
            .map(|r| {
                let (e, history) = r.unwrap();
                (e.ts_ms, history)
            })
            .collect();
        assert_eq!(got, vec![(T - 3_600_000, true), (T, false)]);
    }

    #[test]
    fn writes_become_commands_with_the_births_types_and_bad_ones_are_refused() {
        let (h, sent) = host();
        assert!(
            h.write("g/n/d", br#"{"Temp": 1}"#, T)
                .unwrap_err()
                .contains("not online")
        );
        birth(&h, 1);
        let topic = h
            .write("g/n/d", br#"{"Temp": -2, "Run": false}"#, T)
            .unwrap();
        assert_eq!(topic, "spBv1.0/g/DCMD/n/d");
        let (t, p) = sent.lock().unwrap().pop().unwrap();
        assert_eq!(t, topic);
        let cmd = Payload::decode(&p[..]).unwrap();
        let got: Vec<(Option<String>, Option<u32>, Option<Value>)> = cmd
            .metrics
            .into_iter()
            .map(|m| (m.name, m.datatype, m.value))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    Some("Run".into()),
                    Some(DataType::Boolean as u32),
                    Some(Value::BooleanValue(false))
                ),
                (
                    Some("Temp".into()),
                    Some(DataType::Int16 as u32),
                    Some(Value::IntValue(-2i32 as u32))
                ),
            ]
        );
        for (target, json, why) in [
            ("g/n/d", &br#"{"Nope": 1}"#[..], "not a metric of the birth"),
            ("g/n/d", br#"{"Temp": 70000}"#, "is not a Int16"),
            ("g/n/d", br#"{"Run": "yes"}"#, "is not a Boolean"),
            ("g/n/d", b"[1]", "not a JSON object"),
            ("g/n/x", br#"{"Temp": 1}"#, "not online"),
            ("g", br#"{"Temp": 1}"#, "is not group/node"),
        ] {
            let e = h.write(target, json, T).unwrap_err();
            assert!(e.contains(why), "{target} {json:?}: {e}");
        }
    }

    #[test]
    fn a_counter_jump_and_a_time_out_of_range_are_refused_and_the_rest_is_kept() {
        let (h, _) = host();
        birth(&h, 1);
        let mut far = metric(None, 1, DataType::Int16, Value::IntValue(5));
        far.timestamp = Some(5_000_000_000_000); // 2128
        let (e, d) = receive(
            &h,
            "spBv1.0/g/DDATA/n/d",
            &payload(
                2,
                T,
                vec![
                    metric(None, 3, DataType::UInt32, Value::IntValue(10 + 1_001)),
                    far,
                    metric(None, 1, DataType::Int16, Value::IntValue(6)),
                ],
            ),
        );
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].reason, "sparkplug_metric");
        assert!(d[0].error.contains("jumped by 1001"), "{}", d[0].error);
        assert!(d[0].error.contains("out of range"), "{}", d[0].error);
        assert!(!e.iter().any(|e| matches!(e.body, EventBody::Part(_))));
        assert_eq!(e.len(), 1, "the valid reading is stored");
    }

    #[test]
    fn the_configuration_names_what_is_wrong() {
        let good = host().0.cfg;
        type Change = fn(&mut SparkplugConfig);
        let cases: [(Change, &str); 5] = [
            (|c| c.host_id = "a/b".into(), "sparkplug.host_id"),
            (
                |c| c.machines[0].machine = "s/l".into(),
                "machines[0].machine",
            ),
            (
                |c| {
                    c.machines[0]
                        .state
                        .as_mut()
                        .unwrap()
                        .values
                        .insert("9".into(), "running:break".into());
                },
                "takes no reason",
            ),
            (|c| c.machines.push(c.machines[0].clone()), "mapped twice"),
            (|c| c.machines[0].node = "n+".into(), "machines[0].node"),
        ];
        for (change, needle) in cases {
            let mut c = good.clone();
            change(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn deaths_are_honoured_only_for_the_current_birth() {
        let (h, _) = host();
        birth(&h, 7);
        let death = |bd: u64| {
            payload(
                0,
                T,
                vec![metric(
                    Some(BD_SEQ),
                    0,
                    DataType::Int64,
                    Value::LongValue(bd),
                )],
            )
        };
        let (_, d) = receive(&h, "spBv1.0/g/NDEATH/n", &death(6));
        assert_eq!(d[0].reason, "sparkplug_stale_death");
        assert!(h.status()[0].online);
        let (_, d) = receive(&h, "spBv1.0/g/NDEATH/n", &death(7));
        assert!(d.is_empty());
        let s = &h.status()[0];
        assert!(!s.online && !s.devices[0].online);
        assert!(s.devices[0].metrics.iter().all(|m| m.stale));
        // Data from a dead node is refused until it is born again.
        let (e, d) = receive(
            &h,
            "spBv1.0/g/DDATA/n/d",
            &payload(
                2,
                T,
                vec![metric(None, 3, DataType::UInt32, Value::IntValue(99))],
            ),
        );
        assert!(e.is_empty());
        assert_eq!(d[0].reason, "sparkplug_before_birth");
    }

    #[test]
    fn bad_topics_and_payloads_are_dead_letters_never_panics() {
        let (h, _) = host();
        for (topic, payload, reason) in [
            ("spBv1.0/g/NBIRTH", &b""[..], "sparkplug_topic"),
            ("spBv1.0/g/DDATA/n", b"", "sparkplug_topic"),
            ("spBv1.0/g/BOGUS/n", b"", "sparkplug_topic"),
            ("spBv1.0/g/NDATA/n", b"\xff\xff\xff", "sparkplug_payload"),
            ("spBv1.0/g/NBIRTH/n", b"", "sparkplug_birth"),
        ] {
            let (e, d) = receive(&h, topic, payload);
            assert!(e.is_empty(), "{topic}");
            assert_eq!(d.len(), 1, "{topic}");
            assert_eq!(d[0].reason, reason, "{topic}: {}", d[0].error);
        }
        // Commands and other hosts' STATE are not data.
        for topic in ["spBv1.0/g/NCMD/n", "spBv1.0/STATE/other"] {
            let (e, d) = receive(&h, topic, b"x");
            assert!(e.is_empty() && d.is_empty(), "{topic}");
        }
    }
}
