//! Tallies per machine and shift instance (parts from the rollup, time per state from the state
//! changes), and the OEE and downtime reports built from them.

use std::collections::{BTreeMap, HashMap};

use chrono::Timelike;
use millrace_shared::{Kpis, MachineState, ShiftCalendar, ShiftInstance, StopReason, Tally};
use polars::prelude::*;
use serde::Serialize;

use super::production::part_minutes;
use super::states::StateChanges;
use super::{DAY_MS, Level, Master, Period, entity_of};
use crate::dataset::Dataset;
use crate::query::{QueryError, Selection};
use crate::schema::part_counts;

/// One row of the OEE report: the additive tally and the KPIs derived from it.
#[derive(Debug, Clone, Serialize)]
pub struct OeeRow {
    /// `site`, `site/line` or `site/line/machine`.
    pub entity: String,
    /// `2026-01-05/early`, `2026-01-05` or `total`.
    pub period: String,
    /// Period start, Unix ms.
    pub start_ms: i64,
    /// KPIs (with the tally they come from).
    #[serde(flatten)]
    pub kpis: Kpis,
}

/// Ms since midnight of each shift's start and end.
fn shift_bounds(cal: &ShiftCalendar) -> Vec<(i64, i64)> {
    cal.shifts
        .iter()
        .map(|s| {
            let ms = |t: chrono::NaiveTime| i64::from(t.num_seconds_from_midnight()) * 1000;
            (ms(s.start), ms(s.end))
        })
        .collect()
}

type Key = (String, String, String, i64);

/// Whether every shift starts and ends on a whole minute (then parts per minute can be assigned
/// to shifts exactly).
fn minute_aligned(cal: &ShiftCalendar) -> bool {
    cal.shifts.iter().all(|s| {
        s.start.second() == 0
            && s.end.second() == 0
            && s.start.nanosecond() == 0
            && s.end.nanosecond() == 0
    })
}

/// The start (Unix ms) of the shift instance of the calendar's shift definitions that `ts`
/// falls in, if any. `bounds`: each shift's start and end in ms since midnight.
fn shift_start_of(bounds: &[(i64, i64)], ts: i64) -> Option<i64> {
    let day = ts.div_euclid(DAY_MS);
    let tod = ts.rem_euclid(DAY_MS);
    bounds.iter().find_map(|&(s, e)| {
        if s < e {
            (tod >= s && tod < e).then_some(day * DAY_MS + s)
        } else if tod >= s {
            Some(day * DAY_MS + s)
        } else {
            // Across midnight (or 24 h when start == end): before `e` belongs to yesterday's.
            (tod < e).then_some((day - 1) * DAY_MS + s)
        }
    })
}

/// Per machine and shift instance (start ms): tallies over `sel`.
///
/// Polars scans (projection, predicate and partition pushdown, parallel decoding); the two folds
/// run here in one pass each: parts per minute come machine by machine (commits and compaction
/// write them sorted by machine, then minute), so consecutive rows add to the same tally; state
/// changes are grouped per machine and walked in time order.
fn machine_shift_tallies(
    ds: &Dataset,
    master: &Master,
    sel: &Selection,
) -> Result<(BTreeMap<Key, Tally>, Vec<ShiftInstance>), QueryError> {
    let shifts = master.calendar.instances_between(sel.from_ms, sel.to_ms);
    let known: std::collections::HashSet<i64> = shifts.iter().map(|s| s.start_ms).collect();
    let bounds = shift_bounds(&master.calendar);
    let mut out: BTreeMap<Key, Tally> = BTreeMap::new();
    let add = |out: &mut BTreeMap<Key, Tally>, m: (&str, &str, &str), start: i64, t: &Tally| {
        out.entry((m.0.to_owned(), m.1.to_owned(), m.2.to_owned(), start))
            .or_default()
            .merge(t);
    };

    // Parts.
    if let Some(lf) = part_minutes(ds, sel, minute_aligned(&master.calendar))? {
        let df = lf.collect()?;
        let c = |n: &str| df.column(n).map(Column::as_materialized_series);
        let (site, line, machine) = (
            c(part_counts::SITE)?.str()?,
            c(part_counts::LINE)?.str()?,
            c(part_counts::MACHINE)?.str()?,
        );
        let (minute, good, scrap, rework) = (
            c(part_counts::MINUTE)?.i64()?,
            c(part_counts::GOOD)?.i64()?,
            c(part_counts::SCRAP)?.i64()?,
            c(part_counts::REWORK)?.i64()?,
        );
        // Borrowed keys while folding; owned ones once per machine and shift at the end.
        let mut parts: HashMap<((&str, &str, &str), i64), Tally> = HashMap::new();
        let mut current: Option<((&str, &str, &str), i64)> = None;
        let mut last_machine = None;
        let mut acc = Tally::default();
        let mut ideal = 0u64;
        let rows = site
            .iter()
            .zip(line.iter())
            .zip(machine.iter())
            .zip(minute.iter())
            .zip(good.iter().zip(scrap.iter()).zip(rework.iter()));
        for ((((s, l), m), t), ((g, sc), r)) in rows {
            let Some(start) = t.and_then(|t| shift_start_of(&bounds, t)) else {
                continue;
            };
            let m = (
                s.unwrap_or_default(),
                l.unwrap_or_default(),
                m.unwrap_or_default(),
            );
            if current != Some((m, start)) {
                if let Some(k) = current.take() {
                    parts.entry(k).or_default().merge(&acc);
                }
                acc = Tally::default();
                if !known.contains(&start) {
                    continue;
                }
                if last_machine != Some(m) {
                    ideal = master.ideal(&format!("{}/{}/{}", m.0, m.1, m.2));
                    last_machine = Some(m);
                }
                current = Some((m, start));
            }
            let (g, sc, r) = (
                g.unwrap_or(0) as u64,
                sc.unwrap_or(0) as u64,
                r.unwrap_or(0) as u64,
            );
            acc.good += g;
            acc.scrap += sc;
            acc.rework += r;
            acc.ideal_output_ms += ideal * (g + sc + r);
        }
        if let Some(k) = current {
            parts.entry(k).or_default().merge(&acc);
        }
        for ((m, start), t) in parts {
            add(&mut out, m, start, &t);
        }
    }

    // States: each change lasts until the next one of the same machine, cut at shift
    // boundaries.
    let changes = StateChanges::load(ds, sel)?;
    for ((site, line, machine), list) in &changes.machines {
        let m = (site.as_str(), line.as_str(), machine.as_str());
        let mut tallies: BTreeMap<i64, Tally> = BTreeMap::new();
        for (k, c) in list.iter().enumerate() {
            let (a, b) = (c.ts, list.get(k + 1).map_or(changes.end_ms, |n| n.ts));
            let Some(st) = c.state else {
                continue;
            };
            let rs = changes.reason_of(c);
            let prev = k.checked_sub(1).map(|p| &list[p]);
            let entered_failure = st == MachineState::Down
                && rs == Some(StopReason::TechnicalFailure)
                && !prev.is_some_and(|p| p.state == c.state && p.reason == c.reason);
            // Shifts overlapping [a, b).
            let first = shifts.partition_point(|s| s.end_ms <= a);
            for s in &shifts[first..] {
                if s.start_ms >= b {
                    break;
                }
                let (lo, hi) = (
                    a.max(s.start_ms).max(sel.from_ms),
                    b.min(s.end_ms).min(sel.to_ms),
                );
                if entered_failure && a >= s.start_ms && a < s.end_ms && a >= sel.from_ms {
                    tallies.entry(s.start_ms).or_default().add_failure();
                }
                if hi > lo {
                    tallies
                        .entry(s.start_ms)
                        .or_default()
                        .add_time(st, rs, (hi - lo) as u64);
                }
            }
        }
        for (start, t) in tallies {
            add(&mut out, m, start, &t);
        }
    }
    Ok((out, shifts))
}

/// The OEE report over `sel`, per `level` and `period`.
pub fn oee(
    ds: &Dataset,
    master: &Master,
    sel: &Selection,
    level: Level,
    period: Period,
) -> Result<Vec<OeeRow>, QueryError> {
    let (tallies, shifts) = machine_shift_tallies(ds, master, sel)?;
    let by_start: HashMap<i64, &ShiftInstance> = shifts.iter().map(|s| (s.start_ms, s)).collect();
    let mut rows: BTreeMap<(String, i64, String), Tally> = BTreeMap::new();
    for ((site, line, machine, start), t) in tallies {
        let Some(s) = by_start.get(&start) else {
            continue;
        };
        let (p, p_start) = match period {
            Period::Shift => (s.id(), s.start_ms),
            Period::Day => (
                s.date.to_string(),
                s.date
                    .and_hms_opt(0, 0, 0)
                    .map_or(0, |d| d.and_utc().timestamp_millis()),
            ),
            Period::Total => ("total".to_owned(), sel.from_ms),
        };
        rows.entry((entity_of(level, &site, &line, &machine), p_start, p))
            .or_default()
            .merge(&t);
    }
    Ok(rows
        .into_iter()
        .map(|((entity, start_ms, period), t)| OeeRow {
            entity,
            period,
            start_ms,
            kpis: Kpis::from_tally(t),
        })
        .collect())
}

/// Downtime per entity over the range: time by reason, largest first (Pareto), with MTBF and
/// MTTR.
pub fn downtime(
    ds: &Dataset,
    master: &Master,
    sel: &Selection,
    level: Level,
) -> Result<Vec<serde_json::Value>, QueryError> {
    let rows = oee(ds, master, sel, level, Period::Total)?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let t = &r.kpis.tally;
            let mut reasons: Vec<(&String, &u64)> = t.stop_time_by_reason.iter().collect();
            reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let total: u64 = reasons.iter().map(|(_, v)| **v).sum();
            let mut cumulative = 0u64;
            let pareto: Vec<serde_json::Value> = reasons
                .iter()
                .map(|(reason, ms)| {
                    cumulative += **ms;
                    serde_json::json!({
                        "reason": reason,
                        "ms": ms,
                        "share": if total > 0 { **ms as f64 / total as f64 } else { 0.0 },
                        "cumulative_share": if total > 0 { cumulative as f64 / total as f64 } else { 0.0 },
                    })
                })
                .collect();
            serde_json::json!({
                "entity": r.entity,
                "unplanned_stop_ms": total,
                "down_ms": t.times.down_ms,
                "failures": t.failures,
                "failure_down_ms": t.failure_down_ms,
                "mtbf_ms": r.kpis.mtbf_ms,
                "mttr_ms": r.kpis.mttr_ms,
                "by_reason": pareto,
            })
        })
        .collect())
}
