//! Property tests of everything that is sent or stored, and of the decoders that read bytes
//! from outside: what is encoded decodes to itself, and no input makes a decoder panic. The
//! coverage-guided fuzz targets in `fuzz/` run the same decoders for longer.

use proptest::collection::vec;
use proptest::prelude::*;

use crate::mqtt::{Scanner, connect_level, frame, put_remaining_length, remaining_length};
use crate::sync::{AlertItem, SyncBatch, SyncItem};
use crate::{
    Alert, Event, EventBody, FunctionReport, MachineId, MachineState, OperatorAction,
    OperatorEvent, PartOutcome, PartProduced, Reading, StateChange, StopReason, Telemetry,
};

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,12}"
}

fn machine() -> impl Strategy<Value = MachineId> {
    (id(), id(), id()).prop_map(|(s, l, m)| MachineId::new(s, l, m).unwrap())
}

fn body() -> impl Strategy<Value = EventBody> {
    let state = (0..MachineState::ALL.len(), any::<bool>(), 0..10usize).prop_map(|(s, r, why)| {
        let state = MachineState::ALL[s];
        let reasons = [
            StopReason::TechnicalFailure,
            StopReason::MaterialShortage,
            StopReason::OperatorAbsence,
            StopReason::QualityCheck,
            StopReason::Tooling,
            StopReason::PlannedMaintenance,
            StopReason::Break,
            StopReason::NoShift,
            StopReason::NoOrder,
            StopReason::Other,
        ];
        let reason = (r && state != MachineState::Running).then_some(reasons[why]);
        EventBody::State(StateChange { state, reason })
    });
    let part = (
        0..3u8,
        1..=86_400_000u32,
        proptest::option::of("[A-Za-z0-9_.-]{1,20}"),
    )
        .prop_map(|(o, cycle_time_ms, part_id)| {
            let outcome = [PartOutcome::Good, PartOutcome::Scrap, PartOutcome::Rework][o as usize];
            EventBody::Part(PartProduced {
                outcome,
                cycle_time_ms,
                part_id,
            })
        });
    let reading = ("[a-z][a-z0-9_]{0,15}", -1e12..1e12f64, "[A-Za-z%/]{0,5}").prop_map(
        |(name, value, unit)| Reading {
            name: name.into(),
            value,
            unit: unit.into(),
        },
    );
    let telemetry =
        vec(reading, 1..8).prop_map(|readings| EventBody::Telemetry(Telemetry { readings }));
    let operator = (any::<bool>(), "[a-z]{1,10}").prop_map(|(login, operator)| {
        EventBody::Operator(OperatorEvent {
            action: if login {
                OperatorAction::Login
            } else {
                OperatorAction::Logout
            },
            operator,
        })
    });
    prop_oneof![state, part, telemetry, operator]
}

fn event() -> impl Strategy<Value = Event> {
    (
        machine(),
        crate::event::MIN_TS_MS..crate::event::MAX_TS_MS,
        any::<u64>(),
        body(),
    )
        .prop_map(|(machine, ts_ms, seq, body)| Event {
            machine,
            ts_ms,
            seq,
            body,
        })
}

fn alert() -> impl Strategy<Value = Alert> {
    (id(), any::<i64>(), id(), 0..3usize, ".{0,40}", machine()).prop_map(
        |(id, ts_ms, function, sev, message, m)| Alert {
            id,
            ts_ms,
            trigger: "event".into(),
            function,
            version: 1,
            severity: crate::alert::SEVERITIES[sev % crate::alert::SEVERITIES.len()].into(),
            message,
            device: m.to_string(),
            topic: m.topic(crate::EventKind::Part),
            event_ts_ms: ts_ms,
        },
    )
}

/// Values through JSON may differ in the last bit (serde_json's fast float parsing).
fn same_events(a: &Event, b: &Event) -> bool {
    match (&a.body, &b.body) {
        (EventBody::Telemetry(x), EventBody::Telemetry(y)) => {
            a.machine == b.machine
                && a.ts_ms == b.ts_ms
                && a.seq == b.seq
                && x.readings.len() == y.readings.len()
                && x.readings.iter().zip(&y.readings).all(|(r, s)| {
                    r.name == s.name
                        && r.unit == s.unit
                        && (r.value - s.value).abs() <= r.value.abs() * 1e-15
                })
        }
        _ => a == b,
    }
}

proptest! {
    #[test]
    fn an_event_decodes_from_its_own_payload(e in event()) {
        let back = Event::decode(&e.topic(), &e.to_payload()).unwrap();
        prop_assert!(same_events(&e, &back), "{e:?} came back as {back:?}");
    }

    #[test]
    fn any_payload_on_any_topic_decodes_or_is_refused(
        topic in prop_oneof![".{0,60}", machine().prop_map(|m| m.topic(crate::EventKind::Telemetry))],
        payload in prop_oneof![vec(any::<u8>(), 0..200), ".{0,200}".prop_map(String::into_bytes)],
    ) {
        let _ = Event::decode(&topic, &payload);
    }

    #[test]
    fn a_sync_batch_decodes_to_itself(
        edge in id(),
        items in vec((any::<u64>(), any::<i64>(), any::<bool>(), event()), 0..20),
        alerts in vec((any::<u64>(), any::<i64>(), any::<bool>(), alert()), 0..5),
        dropped in vec((0..1000u64, 0..1000u64), 0..4),
        functions in vec((id(), any::<u32>(), any::<u64>(), any::<u64>()), 0..3),
        outbox in proptest::option::of((any::<u64>(), proptest::option::of(any::<i64>()))),
    ) {
        let batch = SyncBatch {
            edge,
            items: items
                .into_iter()
                .map(|(seq, stored_ms, backfill, event)| SyncItem { seq, stored_ms, backfill, event })
                .collect(),
            alerts: alerts
                .into_iter()
                .map(|(seq, stored_ms, backfill, alert)| AlertItem { seq, stored_ms, backfill, alert })
                .collect(),
            dropped: dropped.into_iter().map(|(a, n)| (a, a + n)).collect(),
            functions: functions
                .into_iter()
                .map(|(name, version, invocations, lag)| FunctionReport {
                    name,
                    version,
                    invocations,
                    failures: 0,
                    skipped: 0,
                    lag_events: lag,
                    lag_ms: 0,
                })
                .collect(),
            outbox: outbox.map(|(waiting_items, oldest_waiting_ms)| crate::OutboxReport {
                waiting_items,
                oldest_waiting_ms,
            }),
        };
        let back = SyncBatch::decode(&batch.encode(), 64 << 20).unwrap();
        prop_assert_eq!(back, batch);
    }

    #[test]
    fn any_bytes_as_a_sync_batch_decode_or_are_refused(bytes in vec(any::<u8>(), 0..512)) {
        let _ = SyncBatch::decode(&bytes, 1 << 20);
        let _ = crate::sync::decode_item(&bytes);
        let _ = crate::sync::decode_alert_record(&bytes);
    }

    /// Adding many ranges at once holds exactly what adding them one by one holds.
    #[test]
    fn ranges_added_at_once_equal_ranges_added_one_by_one(
        first in vec((0..500u64, 0..20u64), 0..30),
        more in vec((0..500u64, 0..20u64), 0..60),
    ) {
        let mut one_by_one = crate::sync::RangeSet::default();
        for &(a, n) in first.iter().chain(&more) {
            one_by_one.insert(a, a + n);
        }
        let mut at_once = crate::sync::RangeSet::default();
        at_once.insert_all(first.iter().map(|&(a, n)| (a, a + n)));
        at_once.insert_all(more.iter().map(|&(a, n)| (a, a + n)));
        prop_assert_eq!(at_once, one_by_one);
    }

    #[test]
    fn a_remaining_length_decodes_to_itself(len in 0..=268_435_455usize) {
        let mut b = vec![];
        put_remaining_length(&mut b, len);
        prop_assert_eq!(remaining_length(&b), Ok(Some((len, b.len()))));
    }

    /// The publishes found in a stream do not depend on how the stream was cut into reads.
    #[test]
    fn publishes_are_found_wherever_the_stream_is_cut(
        packets in vec((any::<bool>(), "[a-z/]{0,20}", vec(any::<u8>(), 0..300), 0..3u8), 1..12),
        cuts in vec(1..64usize, 1..40),
    ) {
        let mut stream = vec![];
        let mut want = vec![];
        for (publish, topic, payload, qos) in &packets {
            if *publish {
                let mut body = (topic.len() as u16).to_be_bytes().to_vec();
                body.extend_from_slice(topic.as_bytes());
                if *qos > 0 {
                    body.extend_from_slice(&7u16.to_be_bytes());
                }
                body.extend_from_slice(payload);
                stream.extend(frame(0x30 | (qos << 1), &body));
                want.push((topic.as_bytes().to_vec(), payload.clone()));
            } else {
                // Another packet (PUBACK-like), skipped over.
                stream.extend(frame(0x40, &payload[..payload.len().min(2)]));
            }
        }
        let mut s = Scanner::new(false, 1 << 20);
        let mut out = vec![];
        let mut rest = &stream[..];
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (now, later) = rest.split_at((*cut).min(rest.len()));
            s.push(now, &mut out).unwrap();
            rest = later;
        }
        let got: Vec<_> = out.iter().map(|p| (p.topic.to_vec(), p.payload.to_vec())).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn any_device_bytes_frame_or_are_refused(
        v5 in any::<bool>(),
        chunks in vec(vec(any::<u8>(), 0..64), 0..16),
    ) {
        let mut s = Scanner::new(v5, 4096);
        let mut out = vec![];
        let mut head = vec![];
        for c in &chunks {
            head.extend_from_slice(c);
            let _ = connect_level(&head);
            if s.push(c, &mut out).is_err() {
                break;
            }
        }
    }
}
