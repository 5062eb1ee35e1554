//! History as device events: what a replay feeds a function, rebuilt from what the store keeps.

use std::collections::{BTreeMap, HashMap, HashSet};

use millrace_shared::{Event, EventBody, EventKind, MachineId, Reading, SeriesKey, Telemetry};

use super::{Store, StoreError};

impl Store {
    /// The device events of `[from_ms, to_ms)`, in time order (then machine, then kind):
    /// state, part and operator events as stored; telemetry as one event per machine and
    /// timestamp holding that moment's readings (its device seq is not kept: 0), units from
    /// the series. `want(machine, kind)` skips what the caller does not need before it is read.
    /// Blocking; reads everything in the range into memory (call it window by window).
    pub fn history(
        &self,
        from_ms: i64,
        to_ms: i64,
        want: impl Fn(&MachineId, EventKind) -> bool,
    ) -> Result<Vec<Event>, StoreError> {
        let mut out = vec![];
        for (machine, metrics) in &self.series_by_machine() {
            if !want(machine, EventKind::Telemetry) {
                continue;
            }
            let mut at: BTreeMap<i64, Vec<Reading>> = BTreeMap::new();
            for (name, metric, unit) in metrics {
                for (ts, value) in self.points(name, from_ms, to_ms)?.unwrap_or_default() {
                    at.entry(ts).or_default().push(Reading {
                        name: metric.as_str().into(),
                        value,
                        unit: unit.as_str().into(),
                    });
                }
            }
            out.extend(at.into_iter().map(|(ts_ms, readings)| Event {
                machine: machine.clone(),
                ts_ms,
                seq: 0,
                body: EventBody::Telemetry(Telemetry { readings }),
            }));
        }
        out.extend(self.stored_events(from_ms, to_ms, &want)?);
        out.sort_by(|a, b| {
            (
                a.ts_ms,
                &a.machine.site,
                &a.machine.line,
                &a.machine.machine,
            )
                .cmp(&(
                    b.ts_ms,
                    &b.machine.site,
                    &b.machine.line,
                    &b.machine.machine,
                ))
                .then_with(|| kind_order(a.kind()).cmp(&kind_order(b.kind())))
                .then_with(|| a.seq.cmp(&b.seq))
        });
        Ok(out)
    }
}

impl Store {
    /// How many events [`Store::history`] gives for the same arguments, without building
    /// them (a replay's total). Blocking.
    pub fn history_len(
        &self,
        from_ms: i64,
        to_ms: i64,
        want: impl Fn(&MachineId, EventKind) -> bool,
    ) -> Result<u64, StoreError> {
        let mut total = 0u64;
        for (machine, metrics) in &self.series_by_machine() {
            if !want(machine, EventKind::Telemetry) {
                continue;
            }
            // One event per instant with a reading of any of the machine's series.
            let mut instants: HashSet<i64> = HashSet::new();
            for (name, _, _) in metrics {
                let points = self.points(name, from_ms, to_ms)?.unwrap_or_default();
                instants.extend(points.into_iter().map(|(ts, _)| ts));
            }
            total += instants.len() as u64;
        }
        total += self.stored_events(from_ms, to_ms, &want)?.len() as u64;
        Ok(total)
    }

    /// Each machine's telemetry series: (name, metric, unit).
    fn series_by_machine(&self) -> HashMap<MachineId, Vec<(String, String, String)>> {
        let mut series: HashMap<MachineId, Vec<(String, String, String)>> = HashMap::new();
        for s in self.series() {
            if let Ok(key) = s.name.parse::<SeriesKey>() {
                let metric = key.metric.to_string();
                series
                    .entry(key.machine)
                    .or_default()
                    .push((s.name, metric, s.unit));
            }
        }
        series
    }

    /// The state, part and operator events of `[from_ms, to_ms)` that `want` accepts.
    fn stored_events(
        &self,
        from_ms: i64,
        to_ms: i64,
        want: &impl Fn(&MachineId, EventKind) -> bool,
    ) -> Result<Vec<Event>, StoreError> {
        let kinds = [EventKind::State, EventKind::Part, EventKind::Operator];
        let mut out = vec![];
        for name in self.machines() {
            let Ok(machine) = name.parse::<MachineId>() else {
                continue;
            };
            if !kinds.iter().any(|k| want(&machine, *k)) {
                continue;
            }
            let events = self
                .events(&machine, from_ms, to_ms, None, usize::MAX)?
                .unwrap_or_default();
            out.extend(events.into_iter().filter(|e| want(&e.machine, e.kind())));
        }
        Ok(out)
    }
}

/// State before part before operator before telemetry at one instant.
fn kind_order(k: EventKind) -> u8 {
    match k {
        EventKind::State => 0,
        EventKind::Part => 1,
        EventKind::Operator => 2,
        EventKind::Telemetry => 3,
    }
}
