//! Parts per machine and minute over a selection (the rollup for whole minutes, the raw part
//! events for the partial minutes at the ends), and the production report.

use polars::prelude::*;

use super::{Level, MINUTE_MS};
use crate::dataset::{Dataset, Table, count_parts};
use crate::query::{QueryError, Selection, scan};
use crate::schema::part_counts;

/// The output column of each window's start (Unix ms).
pub(crate) const WINDOW_START: &str = "window_start";
/// The output column of all parts of a window.
pub(crate) const TOTAL: &str = "total";

/// Good, scrap and rework parts per machine and minute over `sel`: columns `site`, `line`,
/// `machine`, `minute` (Unix ms) and the three counts. With `rollup`, the whole minutes of the
/// range come from the part-counts rollup and only the partial minutes at its ends from the raw
/// part events. Without, everything comes from the raw events and `minute` is each part's own
/// time (for shift calendars whose boundaries are not on whole minutes).
pub fn part_minutes(
    ds: &Dataset,
    sel: &Selection,
    rollup: bool,
) -> Result<Option<LazyFrame>, QueryError> {
    let raw = |from_ms: i64, to_ms: i64| -> Result<Option<LazyFrame>, QueryError> {
        let s = sel.with_range(from_ms, to_ms);
        Ok(scan(ds, Table::Events, &s)?.map(|lf| count_parts(lf, rollup)))
    };
    // The whole minutes of the range: [first, last).
    let first = (sel.from_ms + MINUTE_MS - 1).div_euclid(MINUTE_MS) * MINUTE_MS;
    let last = sel.to_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    let mut frames = vec![];
    if rollup && first < last {
        if sel.from_ms < first {
            frames.extend(raw(sel.from_ms, first)?);
        }
        let whole = sel.with_range(first, last);
        if let Some(lf) = scan(ds, Table::PartCounts, &whole)? {
            frames.push(lf.select([
                col(part_counts::SITE),
                col(part_counts::LINE),
                col(part_counts::MACHINE),
                col(part_counts::MINUTE).cast(DataType::Int64),
                col(part_counts::GOOD).cast(DataType::Int64),
                col(part_counts::SCRAP).cast(DataType::Int64),
                col(part_counts::REWORK).cast(DataType::Int64),
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
    Ok(Some(concat(frames, UnionArgs::default())?))
}

/// Parts per entity and time window (`every`: Polars duration such as `1h`, `1d`), with
/// throughput per hour.
pub fn production(
    ds: &Dataset,
    sel: &Selection,
    level: Level,
    every: &str,
) -> Result<DataFrame, QueryError> {
    let every_ms = humantime::parse_duration(every)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(3_600_000)
        .max(1);
    // Windows of whole minutes come from the parts per minute.
    let Some(lf) = part_minutes(ds, sel, every_ms % MINUTE_MS == 0)? else {
        return Ok(DataFrame::empty());
    };
    let mut keys = vec![col(part_counts::SITE)];
    if level != Level::Site {
        keys.push(col(part_counts::LINE));
    }
    if level == Level::Machine {
        keys.push(col(part_counts::MACHINE));
    }
    let window = ((col(part_counts::MINUTE) / lit(every_ms)) * lit(every_ms)).alias(WINDOW_START);
    let mut by = keys.clone();
    by.push(col(WINDOW_START));
    let mut sort_by: Vec<String> = keys
        .iter()
        .map(|k| match k {
            Expr::Column(c) => c.to_string(),
            _ => String::new(),
        })
        .collect();
    sort_by.push(WINDOW_START.into());
    Ok(lf
        .with_column(window)
        .group_by(by)
        .agg([
            col(part_counts::GOOD).sum(),
            col(part_counts::SCRAP).sum(),
            col(part_counts::REWORK).sum(),
        ])
        .with_column(
            (col(part_counts::GOOD) + col(part_counts::SCRAP) + col(part_counts::REWORK))
                .alias(TOTAL),
        )
        .with_column(
            (col(TOTAL).cast(DataType::Float64) / lit(every_ms as f64 / 3_600_000.0))
                .alias("throughput_per_hour"),
        )
        .sort(sort_by, SortMultipleOptions::default())
        .collect()?)
}
