//! The whole factory: every machine's events merged in time order, and the ground truth.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

use millrace_shared::{Event, EventKind, Kpis, MachineSpec, Tally};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, FactoryConfig};
use crate::machine::{MachineSim, RunPlan};

/// Version of the ground-truth JSON layout.
pub const TRUTH_SCHEMA: u32 = 1;

/// A simulated factory over `[start_ms, end_ms)`.
#[derive(Debug)]
pub struct FactorySim {
    machines: Vec<MachineSim>,
    heap: BinaryHeap<Reverse<(i64, usize)>>,
    seed: u64,
    start_ms: i64,
    end_ms: i64,
    telemetry_interval_ms: u64,
    emitted: BTreeMap<EventKind, u64>,
}

impl FactorySim {
    /// Lays out the factory; nothing is simulated until events are pulled.
    pub fn new(
        config: &FactoryConfig,
        seed: u64,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Self, ConfigError> {
        let specs = config.machines(seed)?;
        let plan = RunPlan {
            profile: config.profile.clone(),
            calendar: Arc::new(config.calendar.clone()),
            telemetry_interval_ms: config.telemetry_interval_ms,
            seed,
            start_ms,
            end_ms,
        };
        let mut machines: Vec<MachineSim> = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| MachineSim::new(spec, &plan, i as u64))
            .collect();
        let heap = machines
            .iter_mut()
            .enumerate()
            .filter_map(|(i, m)| m.peek_ts().map(|ts| Reverse((ts, i))))
            .collect();
        Ok(Self {
            machines,
            heap,
            seed,
            start_ms,
            end_ms,
            telemetry_interval_ms: config.telemetry_interval_ms,
            emitted: BTreeMap::new(),
        })
    }

    /// The machines' master data.
    pub fn specs(&self) -> Vec<MachineSpec> {
        self.machines.iter().map(|m| m.spec().clone()).collect()
    }

    /// Start and end of the simulated period.
    pub const fn period(&self) -> (i64, i64) {
        (self.start_ms, self.end_ms)
    }

    /// Events emitted so far, per kind.
    pub fn emitted(&self) -> &BTreeMap<EventKind, u64> {
        &self.emitted
    }

    /// The ground truth. Complete once the iterator is exhausted.
    pub fn truth(&self) -> GroundTruth {
        let mut machines = vec![];
        let mut lines: BTreeMap<(String, String), Rollup> = BTreeMap::new();
        let mut sites: BTreeMap<String, Rollup> = BTreeMap::new();
        for m in &self.machines {
            let spec = m.spec();
            let mut own = Rollup::default();
            for st in m.shift_tallies() {
                own.add(&st.shift, &st.tally);
                lines
                    .entry((spec.id.site.to_string(), spec.id.line.to_string()))
                    .or_default()
                    .add(&st.shift, &st.tally);
                sites
                    .entry(spec.id.site.to_string())
                    .or_default()
                    .add(&st.shift, &st.tally);
            }
            let (totals, shifts, days) = own.finish();
            machines.push(MachineTruth {
                site: spec.id.site.to_string(),
                line: spec.id.line.to_string(),
                machine: spec.id.machine.to_string(),
                ideal_cycle_time_ms: spec.ideal_cycle_time_ms,
                last_seq: m.last_seq(),
                off_shift_ms: m.off_shift_ms(),
                totals,
                shifts,
                days,
            });
        }
        let lines = lines
            .into_iter()
            .map(|((site, line), r)| {
                let (totals, shifts, days) = r.finish();
                GroupTruth {
                    site,
                    line: Some(line),
                    totals,
                    shifts,
                    days,
                }
            })
            .collect();
        let sites = sites
            .into_iter()
            .map(|(site, r)| {
                let (totals, shifts, days) = r.finish();
                GroupTruth {
                    site,
                    line: None,
                    totals,
                    shifts,
                    days,
                }
            })
            .collect();
        let events = self
            .emitted
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), *v))
            .collect();
        GroundTruth {
            schema: TRUTH_SCHEMA,
            seed: self.seed,
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            telemetry_interval_ms: self.telemetry_interval_ms,
            events,
            total_events: self.emitted.values().sum(),
            machines,
            lines,
            sites,
        }
    }
}

impl Iterator for FactorySim {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        let Reverse((_, i)) = self.heap.pop()?;
        let m = &mut self.machines[i];
        let event = m.next_event().expect("peeked");
        if let Some(ts) = m.peek_ts() {
            self.heap.push(Reverse((ts, i)));
        }
        *self.emitted.entry(event.kind()).or_default() += 1;
        Some(event)
    }
}

#[derive(Default)]
struct Rollup {
    total: Tally,
    shifts: BTreeMap<(i64, String), (String, i64, i64, Tally)>,
    days: BTreeMap<String, Tally>,
}

impl Rollup {
    fn add(&mut self, shift: &millrace_shared::ShiftInstance, t: &Tally) {
        self.total.merge(t);
        self.shifts
            .entry((shift.start_ms, shift.id()))
            .or_insert_with(|| {
                (
                    shift.name.clone(),
                    shift.start_ms,
                    shift.end_ms,
                    Tally::default(),
                )
            })
            .3
            .merge(t);
        self.days
            .entry(shift.date.to_string())
            .or_default()
            .merge(t);
    }

    fn finish(self) -> (Kpis, Vec<ShiftTruth>, Vec<DayTruth>) {
        let shifts = self
            .shifts
            .into_iter()
            .map(|((_, id), (name, start_ms, end_ms, t))| ShiftTruth {
                shift: id,
                name,
                start_ms,
                end_ms,
                kpis: Kpis::from_tally(t),
            })
            .collect();
        let days = self
            .days
            .into_iter()
            .map(|(date, t)| DayTruth {
                date,
                kpis: Kpis::from_tally(t),
            })
            .collect();
        (Kpis::from_tally(self.total), shifts, days)
    }
}

/// What the simulator knows it simulated, to check reports against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    /// Layout version of this document.
    pub schema: u32,
    /// The seed of the run.
    pub seed: u64,
    /// Start of the simulated period, Unix ms.
    pub start_ms: i64,
    /// End of the simulated period (exclusive), Unix ms.
    pub end_ms: i64,
    /// Telemetry interval used.
    pub telemetry_interval_ms: u64,
    /// Valid events generated, per kind (injected faults are not events).
    pub events: BTreeMap<String, u64>,
    /// Valid events generated in all.
    pub total_events: u64,
    /// Per machine.
    pub machines: Vec<MachineTruth>,
    /// Per line: sums over the line's machines.
    pub lines: Vec<GroupTruth>,
    /// Per site: sums over the site's machines.
    pub sites: Vec<GroupTruth>,
}

/// One machine's truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineTruth {
    /// Site id.
    pub site: String,
    /// Line id.
    pub line: String,
    /// Machine id.
    pub machine: String,
    /// Ideal cycle time used for performance.
    pub ideal_cycle_time_ms: u32,
    /// Last sequence number the machine used (events are numbered from 1).
    pub last_seq: u64,
    /// Time outside every shift.
    pub off_shift_ms: u64,
    /// Sums over all shifts.
    pub totals: Kpis,
    /// Per shift instance.
    pub shifts: Vec<ShiftTruth>,
    /// Per UTC day (of the shift's start).
    pub days: Vec<DayTruth>,
}

/// A line's or site's truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupTruth {
    /// Site id.
    pub site: String,
    /// Line id, for a line.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub line: Option<String>,
    /// Sums over all shifts.
    pub totals: Kpis,
    /// Per shift instance.
    pub shifts: Vec<ShiftTruth>,
    /// Per UTC day.
    pub days: Vec<DayTruth>,
}

/// KPIs of one shift instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShiftTruth {
    /// `{date}/{name}`.
    pub shift: String,
    /// The shift's name.
    pub name: String,
    /// Start, Unix ms.
    pub start_ms: i64,
    /// End, Unix ms.
    pub end_ms: i64,
    /// What happened.
    #[serde(flatten)]
    pub kpis: Kpis,
}

/// KPIs of one day.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DayTruth {
    /// UTC date, `YYYY-MM-DD`.
    pub date: String,
    /// What happened.
    #[serde(flatten)]
    pub kpis: Kpis,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use millrace_shared::{EventBody, MachineState};

    fn ts(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    fn run(seed: u64, hours: i64) -> (Vec<Event>, GroundTruth) {
        let cfg = FactoryConfig {
            telemetry_interval_ms: 60_000,
            ..Default::default()
        };
        let start = ts("2026-01-05T00:00:00Z");
        let mut sim = FactorySim::new(&cfg, seed, start, start + hours * 3_600_000).unwrap();
        let events: Vec<Event> = sim.by_ref().collect();
        (events, sim.truth())
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_factory() {
        let (ea, ta) = run(42, 24);
        let (eb, tb) = run(42, 24);
        assert_eq!(ea, eb);
        assert_eq!(
            serde_json::to_vec(&ta).unwrap(),
            serde_json::to_vec(&tb).unwrap()
        );
        let (_, tc) = run(43, 24);
        assert_ne!(ta, tc);
    }

    #[test]
    fn events_are_ordered_and_numbered_without_gaps() {
        let (events, truth) = run(1, 24);
        assert!(events.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for e in &events {
            let prev = last.insert(e.machine.to_string(), e.seq).unwrap_or(0);
            assert_eq!(e.seq, prev + 1, "{}", e.machine);
        }
        for m in &truth.machines {
            assert_eq!(
                last[&format!("{}/{}/{}", m.site, m.line, m.machine)],
                m.last_seq
            );
        }
        assert_eq!(truth.total_events, events.len() as u64);
    }

    #[test]
    fn truth_is_internally_consistent() {
        let (events, truth) = run(7, 48);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
        let day_ms = 86_400_000;
        // Per machine and shift: counts add up, times fill the shift, OEE = A × P × Q.
        for m in &truth.machines {
            assert_eq!(m.shifts.len(), 4, "2 days × 2 shifts");
            let mut shift_time = 0;
            for s in &m.shifts {
                let k = &s.kpis;
                assert_eq!(k.tally.good + k.tally.scrap + k.tally.rework, k.total);
                assert_eq!(
                    k.tally.times.total_ms() as i64,
                    s.end_ms - s.start_ms,
                    "{}",
                    s.shift
                );
                assert_eq!(
                    k.tally.times.planned_stop_ms,
                    30 * 60_000,
                    "one 30-minute break"
                );
                assert_eq!(k.planned_production_ms, 7 * 3_600_000 + 30 * 60_000);
                let (a, p, q) = (
                    k.availability.unwrap(),
                    k.performance.unwrap(),
                    k.quality.unwrap(),
                );
                assert!(close(a * p * q, k.oee.unwrap()));
                assert!((0.3..1.0).contains(&a), "availability {a}");
                assert!((0.8..1.0).contains(&p), "performance {p}");
                assert!((0.9..=1.0).contains(&q), "quality {q}");
                shift_time += s.end_ms - s.start_ms;
            }
            assert_eq!(shift_time as u64 + m.off_shift_ms, 2 * day_ms);
            let day_total: u64 = m.days.iter().map(|d| d.kpis.total).sum();
            assert_eq!(day_total, m.totals.total);
        }
        // Lines and sites are sums of machines, with ratios from the sums.
        for l in &truth.lines {
            let ms: Vec<_> = truth
                .machines
                .iter()
                .filter(|m| m.site == l.site && Some(&m.line) == l.line.as_ref())
                .collect();
            assert_eq!(ms.len(), 4);
            assert_eq!(
                l.totals.total,
                ms.iter().map(|m| m.totals.total).sum::<u64>()
            );
            assert_eq!(
                l.totals.tally.times.running_ms,
                ms.iter()
                    .map(|m| m.totals.tally.times.running_ms)
                    .sum::<u64>()
            );
            let run: u64 = ms.iter().map(|m| m.totals.tally.times.running_ms).sum();
            let planned: u64 = ms.iter().map(|m| m.totals.planned_production_ms).sum();
            assert!(close(
                l.totals.availability.unwrap(),
                run as f64 / planned as f64
            ));
        }
        let site = &truth.sites[0];
        assert_eq!(
            site.totals.total,
            truth.machines.iter().map(|m| m.totals.total).sum::<u64>()
        );
        // The event stream says the same as the truth: parts and failures.
        let parts = events
            .iter()
            .filter(|e| matches!(e.body, EventBody::Part(_)))
            .count() as u64;
        assert_eq!(parts, site.totals.total);
        let failures = events
            .iter()
            .filter(|e| matches!(&e.body, EventBody::State(s) if s.state == MachineState::Down && s.reason == Some(millrace_shared::StopReason::TechnicalFailure)))
            .count() as u64;
        assert_eq!(failures, site.totals.tally.failures);
        assert!(failures > 0, "two days of twelve machines see breakdowns");
        assert!(site.totals.tally.scrap > 0 && site.totals.tally.rework > 0);
    }
}
