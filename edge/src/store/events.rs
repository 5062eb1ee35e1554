//! State, part and operator events: keyed by machine id, time and device sequence number, so
//! that a duplicate overwrites itself.

use millrace_shared::{Event, EventBody, EventKind, MachineId};
use rocksdb::WriteBatch;

use super::series::{IndexName, machine_name};
use super::{CF_EVENTS, Store, StoreError, key_ts, series_ts_key, ts_key};

impl Store {
    /// Adds `e` (not telemetry) of the machine with index id `id` to `batch`.
    pub(super) fn put_event(&self, batch: &mut WriteBatch, id: u32, e: &Event, body: &EventBody) {
        let mut k = Vec::with_capacity(20);
        k.extend_from_slice(&id.to_be_bytes());
        k.extend_from_slice(&ts_key(e.ts_ms));
        k.extend_from_slice(&e.seq.to_be_bytes());
        let v = serde_json::to_vec(body).expect("event bodies serialize");
        batch.put_cf(self.cf(CF_EVENTS), k, v);
    }

    /// Events of one machine in `[from_ms, to_ms)`, optionally of one kind, at most `limit`,
    /// or `None` for a machine that never sent state, part or operator events.
    pub fn events(
        &self,
        machine: &MachineId,
        from_ms: i64,
        to_ms: i64,
        kind: Option<EventKind>,
        limit: usize,
    ) -> Result<Option<Vec<Event>>, StoreError> {
        let Some(id) = self.id_of(&machine_name(machine)) else {
            return Ok(None);
        };
        let from_ms = from_ms.max(self.visible_from(self.opts.event_retention));
        let mut out = vec![];
        if from_ms >= to_ms {
            return Ok(Some(out));
        }
        for item in self.scan(
            CF_EVENTS,
            &series_ts_key(id, from_ms),
            &series_ts_key(id, to_ms),
        ) {
            let (k, v) = item?;
            let body: EventBody = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                cf: CF_EVENTS,
                reason: e.to_string(),
            })?;
            if kind.is_some_and(|kd| kd != body.kind()) {
                continue;
            }
            out.push(Event {
                machine: machine.clone(),
                ts_ms: key_ts(&k[4..12]),
                seq: u64::from_be_bytes(k[12..20].try_into().expect("8 bytes")),
                body,
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(Some(out))
    }

    /// Machines that have sent state, part or operator events.
    pub fn machines(&self) -> Vec<String> {
        let index = self.index.read().expect("index lock");
        let mut out: Vec<String> = index
            .by_name
            .keys()
            .filter_map(|n| match IndexName::parse(n) {
                Some(IndexName::Machine(m)) => Some(m.to_owned()),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }
}
