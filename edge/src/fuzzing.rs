//! Entry points for the fuzz targets in `fuzz/` and the property tests: the edge's decoders of
//! outside bytes that need more than `millrace-shared` (the Sparkplug B host, the function
//! module loader). Not part of the edge's API.

use std::sync::{Arc, Mutex, OnceLock};

use millrace_shared::Event;
use millrace_shared::event::{MAX_TS_MS, MIN_TS_MS};

use crate::functions::wasm::{FunctionEngine, WasmEngine};
use crate::sparkplug::{Host, MachineMapping, Publisher, SparkplugConfig, StateMapping};

/// A Sparkplug host with one mapped device (`g/n/d`: telemetry, state, good and scrap
/// counters) and one mapped node (`g/n2`), recording what it publishes.
#[derive(Debug)]
pub struct SparkplugHost {
    host: Host,
    sent: Arc<Mutex<usize>>,
}

impl Default for SparkplugHost {
    fn default() -> Self {
        Self::new()
    }
}

impl SparkplugHost {
    /// The host, as the edge builds it from a validated configuration.
    pub fn new() -> Self {
        let sent = Arc::new(Mutex::new(0usize));
        let publisher: Publisher = {
            let sent = sent.clone();
            Arc::new(move |_: &str, _: Vec<u8>| {
                *sent.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                true
            })
        };
        let state = StateMapping {
            metric: "Run".into(),
            values: [
                ("true".into(), "running".into()),
                ("false".into(), "down:tooling".into()),
                ("1".into(), "idle".into()),
            ]
            .into_iter()
            .collect(),
        };
        let cfg = SparkplugConfig {
            machines: vec![
                MachineMapping {
                    group: "g".into(),
                    node: "n".into(),
                    device: Some("d".into()),
                    machine: "s/l/m".into(),
                    telemetry: Some(vec!["Temp".into(), "Speed".into()]),
                    state: Some(state),
                    good_parts: Some("Good".into()),
                    scrap_parts: Some("Scrap".into()),
                },
                MachineMapping {
                    group: "g".into(),
                    node: "n2".into(),
                    device: None,
                    machine: "s/l/m2".into(),
                    telemetry: None,
                    state: None,
                    good_parts: Some("Good".into()),
                    scrap_parts: None,
                },
            ],
            ..SparkplugConfig::default()
        };
        cfg.validate().expect("the fuzzing configuration is valid");
        Self {
            host: Host::new(cfg, publisher.clone(), publisher),
            sent,
        }
    }

    /// Hands the host one message received at `now_ms` and checks what it made: every event
    /// it accepts lies in the accepted time range and encodes and decodes again, and every
    /// refusal names its reason. Returns (events, dead letters).
    pub fn receive(&self, topic: &str, payload: &[u8], now_ms: i64) -> (usize, usize) {
        let mut out = vec![];
        self.host.receive(topic, payload, now_ms, &mut out);
        let (mut events, mut dead) = (0, 0);
        for d in out {
            match d {
                Ok((e, _historical)) => {
                    assert!(
                        (MIN_TS_MS..=MAX_TS_MS).contains(&e.ts_ms),
                        "event time {} out of range",
                        e.ts_ms
                    );
                    let again = Event::decode(&e.topic(), &e.to_payload())
                        .unwrap_or_else(|err| panic!("accepted event does not re-decode: {err}"));
                    assert_eq!(again.machine, e.machine);
                    events += 1;
                }
                Err(d) => {
                    assert!(!d.reason.is_empty() && !d.error.is_empty());
                    dead += 1;
                }
            }
        }
        (events, dead)
    }

    /// A function's write request (`millrace/sparkplug/write/…`, JSON of metric values).
    pub fn write(&self, target: &str, json: &[u8], now_ms: i64) -> Result<String, String> {
        self.host.write(target, json, now_ms)
    }

    /// Messages the host published (rebirth requests, commands).
    pub fn published(&self) -> usize {
        *self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Loads a function module as `POST /api/v1/functions` does (validation, imports and exports
/// checked against the host's, memory limit 16 MiB), with one engine for the process.
pub fn load_function_module(bytes: &[u8]) -> Result<bool, String> {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| WasmEngine::with_limits(16, 4).expect("engine"));
    engine.compile(bytes, 16 << 20).map(|c| c.takes_batches())
}

/// Topics a generated Sparkplug session publishes to: the mapped node and device, an unmapped
/// device, another host's `STATE`, a command (not data), and malformed ones.
const TOPICS: &[&str] = &[
    "spBv1.0/g/NBIRTH/n",
    "spBv1.0/g/NDATA/n",
    "spBv1.0/g/DBIRTH/n/d",
    "spBv1.0/g/DDATA/n/d",
    "spBv1.0/g/DDEATH/n/d",
    "spBv1.0/g/NDEATH/n",
    "spBv1.0/g/NBIRTH/n2",
    "spBv1.0/g/NDATA/n2",
    "spBv1.0/g/NDEATH/n2",
    "spBv1.0/g/DBIRTH/n/x",
    "spBv1.0/g/DDATA/n/x",
    "spBv1.0/STATE/other",
    "spBv1.0/g/NCMD/n",
    "spBv1.0/g/NDATA",
    "spBv1.0//NDATA/n",
];

/// Metric names a generated payload uses (the mapped ones, the birth sequence, a command).
const NAMES: &[&str] = &[
    "bdSeq",
    "Temp",
    "Speed",
    "Run",
    "Good",
    "Scrap",
    "Node Control/Rebirth",
    "Other/Metric",
    "",
];

/// A session start time: 2026-01-05.
const T0: i64 = 1_767_600_000_000;

/// Reads a generated session's script.
struct Script<'a>(&'a [u8]);

impl Script<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
    fn u64(&mut self) -> u64 {
        let mut v = [0u8; 8];
        let b = self.bytes(8);
        v[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(v)
    }
}

/// Builds a Sparkplug payload from the script: a sequence number, a time near `now_ms`, and up
/// to 7 metrics with names from [`NAMES`], aliases, any data type and a value of the type (or
/// of another, or none), historical or not, with their own times.
fn payload(s: &mut Script<'_>, now_ms: i64) -> Vec<u8> {
    use srad_types::payload::{Message as _, Metric, Payload, metric::Value};
    let flags = s.u8().unwrap_or(0);
    let seq = (flags & 1 != 0).then(|| u64::from(s.u8().unwrap_or(0)));
    let ts = (flags & 2 != 0).then(|| now_ms + i64::from(s.u8().unwrap_or(0) as i8) * 1000);
    let n = s.u8().unwrap_or(0) % 8;
    let metrics = (0..n)
        .map(|_| {
            let shape = s.u8().unwrap_or(0);
            let name = (shape & 1 != 0)
                .then(|| NAMES[usize::from(s.u8().unwrap_or(0)) % NAMES.len()].to_owned());
            let alias = (shape & 2 != 0).then(|| u64::from(s.u8().unwrap_or(0) % 8));
            let datatype = (shape & 4 != 0).then(|| u32::from(s.u8().unwrap_or(0) % 24));
            let raw = s.u64();
            let value = match s.u8().unwrap_or(0) % 8 {
                0 => None,
                1 => Some(Value::IntValue(raw as u32)),
                2 => Some(Value::LongValue(raw)),
                3 => Some(Value::FloatValue(f32::from_bits(raw as u32))),
                4 => Some(Value::DoubleValue(f64::from_bits(raw))),
                5 => Some(Value::BooleanValue(raw & 1 != 0)),
                6 => Some(Value::StringValue(
                    ["true", "false", "1", "x", ""][(raw % 5) as usize].to_owned(),
                )),
                _ => Some(Value::LongValue(raw % 16)),
            };
            Metric {
                name,
                alias,
                datatype,
                value,
                timestamp: (shape & 8 != 0)
                    .then(|| (now_ms + (raw % 7_200_000) as i64 - 3_600_000) as u64),
                is_historical: (shape & 16 != 0).then_some(true),
                is_null: (shape & 32 != 0).then_some(true),
                ..Default::default()
            }
        })
        .collect();
    Payload {
        timestamp: ts.map(|t| t as u64),
        seq,
        metrics,
        ..Default::default()
    }
    .encode_to_vec()
}

/// Runs a Sparkplug session the script describes through a fresh [`SparkplugHost`]: each step
/// picks a topic (or a raw one, or a function's write request), a payload (built from metrics,
/// or raw bytes) and how much time passed. Panics only if the host breaks an invariant (see
/// [`SparkplugHost::receive`]). Returns (events, dead letters).
pub fn sparkplug_session(script: &[u8]) -> (usize, usize) {
    let host = SparkplugHost::new();
    let mut s = Script(script);
    let (mut now, mut events, mut dead) = (T0, 0, 0);
    while let Some(op) = s.u8() {
        now += i64::from(s.u8().unwrap_or(0)) * 100;
        let pick = usize::from(op & 0x3f);
        let raw_payload = op & 0x80 != 0;
        let bytes = if raw_payload {
            let n = usize::from(s.u8().unwrap_or(0));
            s.bytes(n).to_vec()
        } else {
            payload(&mut s, now)
        };
        if pick < TOPICS.len() {
            let (e, d) = host.receive(TOPICS[pick], &bytes, now);
            (events, dead) = (events + e, dead + d);
        } else if op & 0x40 != 0 {
            // A function's write: a target and a JSON object of metric values.
            let targets = ["g/n/d", "g/n", "g/n2", "g/x", "", "g/n/d/e"];
            let target = targets[pick % targets.len()];
            let json: &[u8] = if raw_payload {
                &bytes
            } else {
                br#"{"Temp": 1.5, "Run": true, "Good": 3, "Speed": "fast"}"#
            };
            let _ = host.write(target, json, now);
        } else {
            let n = usize::from(s.u8().unwrap_or(0) % 64);
            let topic = String::from_utf8_lossy(s.bytes(n)).into_owned();
            let (e, d) = host.receive(&topic, &bytes, now);
            (events, dead) = (events + e, dead + d);
        }
    }
    (events, dead)
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any session of births, data, deaths, commands, raw bytes and writes: the host never
        /// panics and what it accepts is valid.
        #[test]
        fn any_sparkplug_session_is_decoded_or_refused(script in proptest::collection::vec(any::<u8>(), 0..600)) {
            sparkplug_session(&script);
        }

        /// Any bytes offered as a function module: loaded or refused with a message, never a
        /// panic; a module header followed by anything likewise.
        #[test]
        fn any_module_bytes_are_loaded_or_refused(tail in proptest::collection::vec(any::<u8>(), 0..300), header in any::<bool>()) {
            let mut bytes = if header { b"\0asm\x01\0\0\0".to_vec() } else { vec![] };
            bytes.extend_from_slice(&tail);
            if let Err(e) = load_function_module(&bytes) {
                prop_assert!(!e.is_empty());
            }
        }
    }

    /// The generator reaches the host's paths: a birth followed by data makes events.
    #[test]
    fn a_generated_birth_and_data_make_events() {
        // NBIRTH of n2 with bdSeq (alias 0, Long 0) and Good (alias 1, Long 5), then NDATA with
        // Good = 7: two good parts.
        let mut script = vec![6, 0, 0b11, 0, 2, 2];
        for (name, alias, value) in [(0u8, 0u8, 0u64), (4, 1, 5)] {
            script.extend([0b111, name, alias, 4]);
            script.extend(value.to_le_bytes());
            script.push(2);
        }
        script.extend([7, 10, 0b11, 1, 1, 1, 0b010, 1]);
        script.extend(7u64.to_le_bytes());
        script.push(2);
        let (events, dead) = sparkplug_session(&script);
        assert_eq!((events, dead), (2, 0));
    }
}
