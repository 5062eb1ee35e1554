//! Factory reports: OEE (ISO 22400), production, downtime with MTBF/MTTR, per machine, line or
//! site, per shift or day; telemetry aggregates; the live dashboard's snapshot.
//!
//! Polars does the scanning, filtering and counting (parts per machine and shift are a lazy
//! group-by over the dataset). Time per state needs each state change's successor, cut at shift
//! boundaries: that walk runs in Rust over the (few) state rows Polars selected. Both feed the
//! shared [`Tally`](millrace_shared::Tally), so a report divides exactly as the simulator's
//! ground truth does: roll-ups sum times and counts first, then divide.
//!
//! # Layout
//! - [`master`](Master): ideal cycle times and the shift calendar the reports divide by.
//! - `oee`: tallies per machine and shift instance, the OEE and downtime reports.
//! - `production`: parts per machine and minute (rollup plus raw ends), the production report.
//! - `states`: state changes per machine (walked by the OEE tallies) and the state timeline.
//! - `telemetry`: count, min, max, mean and p95 per machine, metric and window.
//! - `live`: the dashboard's snapshot of the last 24 hours.

mod live;
mod master;
mod oee;
mod production;
mod states;
mod telemetry;

use std::collections::BTreeSet;

use polars::prelude::*;
use serde::Deserialize;

pub use live::snapshot;
pub use master::{Master, SAVED as SAVED_MASTER};
pub use oee::{OeeRow, downtime, oee};
pub use production::{part_minutes, production};
pub use states::{StateInterval, downsample as downsample_states, state_timeline};
pub use telemetry::telemetry;

use crate::query::QueryError;

const DAY_MS: i64 = 86_400_000;
const MINUTE_MS: i64 = 60_000;

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

pub(crate) fn entity_of(level: Level, site: &str, line: &str, machine: &str) -> String {
    match level {
        Level::Machine => format!("{site}/{line}/{machine}"),
        Level::Line => format!("{site}/{line}"),
        Level::Site => site.to_owned(),
    }
}

pub(crate) fn ints(df: &DataFrame, name: &str) -> PolarsResult<Vec<i64>> {
    let s = df
        .column(name)?
        .as_materialized_series()
        .cast(&DataType::Int64)?;
    Ok(s.i64()?.iter().map(|v| v.unwrap_or(0)).collect())
}

pub(crate) fn str_col<'a>(df: &'a DataFrame, name: &str) -> PolarsResult<Vec<Option<&'a str>>> {
    Ok(df
        .column(name)?
        .as_materialized_series()
        .str()?
        .iter()
        .collect())
}

/// Refuses a machine filter (`machine` or `site/line/machine`) naming a machine that never
/// sent data (`known`) and is not in the master data.
pub fn check_machine(
    machine: Option<&str>,
    known: &BTreeSet<String>,
    master: &Master,
) -> Result<(), QueryError> {
    let Some(m) = machine else { return Ok(()) };
    let found = if m.contains('/') {
        known.contains(m) || master.ideal_cycle_ms.contains_key(m)
    } else {
        known
            .iter()
            .chain(master.ideal_cycle_ms.keys())
            .any(|k| k.rsplit('/').next() == Some(m))
    };
    if found {
        Ok(())
    } else {
        Err(QueryError::NotFound(format!(
            "no machine `{m}`: it never sent data and is not in the master data"
        )))
    }
}
