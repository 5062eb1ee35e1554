//! Factory reports: OEE (ISO 22400), production, downtime with MTBF/MTTR, per machine, line or
//! site, per shift or day.
//!
//! Polars does the scanning, filtering and counting (parts per machine and shift are a lazy
//! group-by over the dataset). Time per state needs each state change's successor, cut at shift
//! boundaries: that walk runs in Rust over the (few) state rows Polars selected. Both feed the
//! shared [`Tally`], so a report divides exactly as the simulator's ground truth does: roll-ups
//! sum times and counts first, then divide.

use std::collections::{BTreeMap, HashMap};

use chrono::Timelike;
use millrace_shared::{Kpis, MachineState, ShiftCalendar, ShiftInstance, StopReason, Tally};
use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Table};
use crate::reports::{Selection, scan};

const DAY_MS: i64 = 86_400_000;

/// Master data: ideal cycle times and the shift calendar.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Master {
    /// Ideal cycle time per `site/line/machine`, ms.
    pub ideal_cycle_ms: BTreeMap<String, u32>,
    /// For machines not listed.
    pub default_ideal_cycle_ms: u32,
    /// The shift calendar (UTC).
    pub calendar: ShiftCalendar,
}

impl Master {
    fn ideal(&self, machine: &str) -> u64 {
        u64::from(
            self.ideal_cycle_ms
                .get(machine)
                .copied()
                .unwrap_or(self.default_ideal_cycle_ms),
        )
    }
}

/// What a report row is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// One machine.
    #[default]
    Machine,
    /// A line (sum of its machines).
    Line,
    /// A site (sum of its lines).
    Site,
}

/// Period of a report row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// One shift instance.
    #[default]
    Shift,
    /// One day: the shifts that start on that (UTC) date.
    Day,
    /// The whole range.
    Total,
}

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

fn entity_of(level: Level, site: &str, line: &str, machine: &str) -> String {
    match level {
        Level::Machine => format!("{site}/{line}/{machine}"),
        Level::Line => format!("{site}/{line}"),
        Level::Site => site.to_owned(),
    }
}

fn strs(df: &DataFrame, name: &str) -> PolarsResult<Vec<Option<String>>> {
    Ok(df
        .column(name)?
        .as_materialized_series()
        .str()?
        .iter()
        .map(|v| v.map(str::to_owned))
        .collect())
}

fn ints(df: &DataFrame, name: &str) -> PolarsResult<Vec<i64>> {
    let s = df
        .column(name)?
        .as_materialized_series()
        .cast(&DataType::Int64)?;
    Ok(s.i64()?.iter().map(|v| v.unwrap_or(0)).collect())
}

/// Ms since midnight of a shift's start and end.
fn shift_bounds(cal: &ShiftCalendar) -> Vec<(String, i64, i64)> {
    cal.shifts
        .iter()
        .map(|s| {
            let ms = |t: chrono::NaiveTime| i64::from(t.num_seconds_from_midnight()) * 1000;
            (s.name.clone(), ms(s.start), ms(s.end))
        })
        .collect()
}

/// A Polars expression giving the index of the shift definition `ts` falls in (null outside
/// shifts), and one giving the day number (days since 1970) that shift started on.
fn shift_exprs(cal: &ShiftCalendar, time: &str) -> (Expr, Expr) {
    let ts = col(time).cast(DataType::Int64);
    let tod = ts.clone() - (ts.clone() / lit(DAY_MS)) * lit(DAY_MS);
    let day = ts / lit(DAY_MS);
    let bounds = shift_bounds(cal);
    let mut idx: Option<Expr> = None;
    let mut start_day: Option<Expr> = None;
    for (i, (_, s, e)) in bounds.iter().enumerate().rev() {
        let (s, e) = (*s, *e);
        let (inside, d) = if s < e {
            (
                tod.clone().gt_eq(lit(s)).and(tod.clone().lt(lit(e))),
                day.clone(),
            )
        } else {
            // Across midnight (or 24 h when start == end): before `e` belongs to yesterday's.
            (
                tod.clone().gt_eq(lit(s)).or(tod.clone().lt(lit(e))),
                when(tod.clone().lt(lit(e)))
                    .then(day.clone() - lit(1i64))
                    .otherwise(day.clone()),
            )
        };
        idx = Some(match idx {
            None => when(inside.clone())
                .then(lit(i as i64))
                .otherwise(lit(NULL).cast(DataType::Int64)),
            Some(rest) => when(inside.clone()).then(lit(i as i64)).otherwise(rest),
        });
        start_day = Some(match start_day {
            None => when(inside)
                .then(d)
                .otherwise(lit(NULL).cast(DataType::Int64)),
            Some(rest) => when(inside).then(d).otherwise(rest),
        });
    }
    let null = || lit(NULL).cast(DataType::Int64);
    (
        idx.unwrap_or_else(null).alias("shift_idx"),
        start_day.unwrap_or_else(null).alias("shift_day"),
    )
}

type Key = (String, String, String, i64);

const MINUTE_MS: i64 = 60_000;

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

fn count(outcome: &str) -> Expr {
    col("outcome")
        .eq(lit(outcome))
        .sum()
        .cast(DataType::Int64)
        .alias(outcome)
}

/// Good, scrap and rework parts per machine and minute (`minute`: Unix ms) over `sel`. With
/// `rollup`, the whole minutes of the range come from the part-counts rollup and only the partial
/// minutes at its ends from the raw part events; without, everything from the raw events.
pub fn part_minutes(
    ds: &Dataset,
    sel: &Selection,
    rollup: bool,
) -> PolarsResult<Option<LazyFrame>> {
    let keys = || [col("site"), col("line"), col("machine"), col("minute")];
    let raw = |from_ms: i64, to_ms: i64| -> PolarsResult<Option<LazyFrame>> {
        let s = Selection {
            from_ms,
            to_ms,
            ..sel.clone()
        };
        Ok(scan(ds, Table::Events, &s)?.map(|lf| {
            lf.filter(col("kind").eq(lit("part")))
                .with_column(
                    ((col("ts").cast(DataType::Int64) / lit(MINUTE_MS)) * lit(MINUTE_MS))
                        .alias("minute"),
                )
                .group_by(keys())
                .agg([count("good"), count("scrap"), count("rework")])
        }))
    };
    let first = sel.from_ms.div_euclid(MINUTE_MS) * MINUTE_MS
        + if sel.from_ms.rem_euclid(MINUTE_MS) == 0 {
            0
        } else {
            MINUTE_MS
        };
    let last = sel.to_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    let mut frames = vec![];
    if rollup && first < last {
        if sel.from_ms < first {
            frames.extend(raw(sel.from_ms, first)?);
        }
        let whole = Selection {
            from_ms: first,
            to_ms: last,
            ..sel.clone()
        };
        if let Some(lf) = scan(ds, Table::PartCounts, &whole)? {
            frames.push(lf.select([
                col("site"),
                col("line"),
                col("machine"),
                col("minute").cast(DataType::Int64),
                col("good").cast(DataType::Int64),
                col("scrap").cast(DataType::Int64),
                col("rework").cast(DataType::Int64),
            ]));
        }
        if last < sel.to_ms {
            frames.extend(raw(last, sel.to_ms)?);
        }
    } else {
        frames.extend(raw(sel.from_ms, sel.to_ms)?);
    }
    if frames.is_empty() {
        return Ok(None);
    }
    concat(frames, UnionArgs::default()).map(Some)
}

/// Per machine and shift instance (start ms): tallies over `sel`.
fn machine_shift_tallies(
    ds: &Dataset,
    master: &Master,
    sel: &Selection,
) -> PolarsResult<(BTreeMap<Key, Tally>, Vec<ShiftInstance>)> {
    let shifts = master.calendar.instances_between(sel.from_ms, sel.to_ms);
    let by_def_day: HashMap<(String, i64), usize> = shifts
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.name.clone(), s.start_ms.div_euclid(DAY_MS)), i))
        .collect();
    let names: Vec<String> = master
        .calendar
        .shifts
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let mut out: BTreeMap<Key, Tally> = BTreeMap::new();

    // Parts: a lazy group-by per machine, shift and day over the parts per minute.
    if let Some(lf) = part_minutes(ds, sel, minute_aligned(&master.calendar))? {
        let (idx, day) = shift_exprs(&master.calendar, "minute");
        let df = lf
            .with_columns([idx, day])
            .filter(col("shift_idx").is_not_null())
            .group_by([
                col("site"),
                col("line"),
                col("machine"),
                col("shift_idx"),
                col("shift_day"),
            ])
            .agg([col("good").sum(), col("scrap").sum(), col("rework").sum()])
            .collect()?;
        let (site, line, machine) = (
            strs(&df, "site")?,
            strs(&df, "line")?,
            strs(&df, "machine")?,
        );
        let (si, sd) = (ints(&df, "shift_idx")?, ints(&df, "shift_day")?);
        let (good, scrap, rework) = (
            ints(&df, "good")?,
            ints(&df, "scrap")?,
            ints(&df, "rework")?,
        );
        for i in 0..df.height() {
            let name = &names[si[i] as usize];
            let Some(&inst) = by_def_day.get(&(name.clone(), sd[i])) else {
                continue;
            };
            let (s, l, m) = (
                site[i].clone().unwrap_or_default(),
                line[i].clone().unwrap_or_default(),
                machine[i].clone().unwrap_or_default(),
            );
            let ideal = master.ideal(&format!("{s}/{l}/{m}"));
            let t = out.entry((s, l, m, shifts[inst].start_ms)).or_default();
            t.good += good[i] as u64;
            t.scrap += scrap[i] as u64;
            t.rework += rework[i] as u64;
            t.ideal_output_ms += ideal * (good[i] + scrap[i] + rework[i]) as u64;
        }
    }

    // States: each change lasts until the next one of the same machine (the last until `to`
    // or now); the state at `from` is the last change in the day before it.
    let wide = Selection {
        from_ms: sel.from_ms - DAY_MS,
        to_ms: sel.to_ms,
        entity: sel.entity.clone(),
        sites: sel.sites.clone(),
    };
    if let Some(lf) = scan(ds, Table::Events, &wide)? {
        let df = lf
            .filter(col("kind").eq(lit("state")))
            .select([
                col("site"),
                col("line"),
                col("machine"),
                col("ts").cast(DataType::Int64),
                col("device_seq"),
                col("state"),
                col("reason"),
            ])
            .sort(
                ["site", "line", "machine", "ts", "device_seq"],
                SortMultipleOptions::default(),
            )
            .collect()?;
        let (site, line, machine) = (
            strs(&df, "site")?,
            strs(&df, "line")?,
            strs(&df, "machine")?,
        );
        let ts = ints(&df, "ts")?;
        let (state, reason) = (strs(&df, "state")?, strs(&df, "reason")?);
        let end = sel.to_ms.min(chrono::Utc::now().timestamp_millis());
        for i in 0..df.height() {
            let same_next = i + 1 < df.height()
                && site[i + 1] == site[i]
                && line[i + 1] == line[i]
                && machine[i + 1] == machine[i];
            let (a, b) = (ts[i], if same_next { ts[i + 1] } else { end });
            let Some(st) = state[i]
                .as_deref()
                .and_then(|s| MachineState::ALL.into_iter().find(|x| x.as_str() == s))
            else {
                continue;
            };
            let rs = reason[i].as_deref().and_then(|r| {
                serde_json::from_value::<StopReason>(serde_json::Value::String(r.to_owned())).ok()
            });
            let key = |start: i64| {
                (
                    site[i].clone().unwrap_or_default(),
                    line[i].clone().unwrap_or_default(),
                    machine[i].clone().unwrap_or_default(),
                    start,
                )
            };
            let same_prev = i > 0
                && site[i - 1] == site[i]
                && line[i - 1] == line[i]
                && machine[i - 1] == machine[i];
            let entered_failure = st == MachineState::Down
                && rs == Some(StopReason::TechnicalFailure)
                && !(same_prev && state[i - 1] == state[i] && reason[i - 1] == reason[i]);
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
                    out.entry(key(s.start_ms)).or_default().add_failure();
                }
                if hi > lo {
                    out.entry(key(s.start_ms))
                        .or_default()
                        .add_time(st, rs, (hi - lo) as u64);
                }
            }
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
) -> PolarsResult<Vec<OeeRow>> {
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
) -> PolarsResult<Vec<serde_json::Value>> {
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

/// Parts per entity and time window (`every`: Polars duration such as `1h`, `1d`), with
/// throughput per hour.
pub fn production(
    ds: &Dataset,
    sel: &Selection,
    level: Level,
    every: &str,
) -> PolarsResult<DataFrame> {
    let every_ms = humantime::parse_duration(every)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(3_600_000)
        .max(1);
    // Windows of whole minutes come from the parts per minute.
    let Some(lf) = part_minutes(ds, sel, every_ms % MINUTE_MS == 0)? else {
        return Ok(DataFrame::empty());
    };
    let mut keys = vec![col("site")];
    if level != Level::Site {
        keys.push(col("line"));
    }
    if level == Level::Machine {
        keys.push(col("machine"));
    }
    let window = ((col("minute") / lit(every_ms)) * lit(every_ms)).alias("window_start");
    let mut by = keys.clone();
    by.push(col("window_start"));
    let mut sort_by: Vec<String> = keys
        .iter()
        .map(|k| match k {
            Expr::Column(c) => c.to_string(),
            _ => String::new(),
        })
        .collect();
    sort_by.push("window_start".into());
    lf.with_column(window)
        .group_by(by)
        .agg([col("good").sum(), col("scrap").sum(), col("rework").sum()])
        .with_column((col("good") + col("scrap") + col("rework")).alias("total"))
        .with_column(
            (col("total").cast(DataType::Float64) / lit(every_ms as f64 / 3_600_000.0))
                .alias("throughput_per_hour"),
        )
        .sort(sort_by, SortMultipleOptions::default())
        .collect()
}

/// Telemetry aggregates per machine, metric and window: count, min, max, mean, p95.
pub fn telemetry(ds: &Dataset, sel: &Selection, every_ms: i64) -> PolarsResult<DataFrame> {
    let Some(lf) = scan(ds, Table::Telemetry, sel)? else {
        return Ok(DataFrame::empty());
    };
    let window =
        ((col("ts").cast(DataType::Int64) / lit(every_ms)) * lit(every_ms)).alias("window_start");
    lf.with_column(window)
        .group_by([
            col("site"),
            col("line"),
            col("machine"),
            col("metric"),
            col("window_start"),
        ])
        .agg([
            col("unit").first().alias("unit"),
            len().alias("count"),
            col("value").min().alias("min"),
            col("value").max().alias("max"),
            col("value").mean().alias("mean"),
            col("value")
                .quantile(lit(0.95), QuantileMethod::Linear)
                .alias("p95"),
        ])
        .sort(
            ["site", "line", "machine", "metric", "window_start"],
            SortMultipleOptions::default(),
        )
        .collect()
}
