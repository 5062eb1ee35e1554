//! The query layer: what to read (a checked time range and row filter, [`Selection`]) and how
//! (a partition-pruned, filtered Polars scan of one table, [`scan`]). Below the reports and the
//! HTTP API; knows nothing of either.

use millrace_shared::{MachineId, TopicError};
use polars::prelude::*;

use crate::dataset::{Dataset, DatasetError, Table};
use crate::schema::{alerts, events, part_counts, telemetry};

const DAY_MS: i64 = 86_400_000;

/// Why a query cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The question is malformed (a bad range, identifier or parameter): the asker's to fix.
    #[error("{0}")]
    Invalid(String),
    /// It names something the cloud does not know.
    #[error("{0}")]
    NotFound(String),
    /// Polars failed.
    #[error("polars: {0}")]
    Polars(#[from] PolarsError),
    /// The dataset failed.
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

impl QueryError {
    /// Whether asking again later may work (storage trouble).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Dataset(e) if e.is_retryable())
    }
}

/// Which rows a query is about, besides time: each filter as given (unchecked).
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only this site.
    pub site: Option<String>,
    /// Only this line.
    pub line: Option<String>,
    /// Only this machine: `machine` or `site/line/machine`.
    pub machine: Option<String>,
    /// Only this metric (telemetry).
    pub metric: Option<String>,
    /// Only this event kind (`state`, `part`, `operator`).
    pub kind: Option<String>,
    /// Alerts: only this function's.
    pub function: Option<String>,
    /// Alerts: only this severity.
    pub severity: Option<String>,
}

/// A checked time range and row filter.
#[derive(Debug, Clone)]
pub struct Selection {
    /// From (inclusive), Unix ms.
    pub from_ms: i64,
    /// To (exclusive), Unix ms.
    pub to_ms: i64,
    /// Filters on site, line, machine, metric, kind (the time range is applied by [`scan`]).
    pub entity: Option<Expr>,
    /// Only files of these sites (partition pruning).
    pub sites: Option<Vec<String>>,
}

fn and(a: Option<Expr>, b: Expr) -> Option<Expr> {
    Some(match a {
        Some(a) => a.and(b),
        None => b,
    })
}

impl Selection {
    /// Every row of `[from_ms, to_ms)`.
    pub fn range(from_ms: i64, to_ms: i64) -> Self {
        Self {
            from_ms,
            to_ms,
            entity: None,
            sites: None,
        }
    }

    /// Checks a range (at most `max_range_ms` long) and the filters of `scope`.
    pub fn new(
        from_ms: i64,
        to_ms: i64,
        max_range_ms: i64,
        scope: &Scope,
    ) -> Result<Self, QueryError> {
        if from_ms >= to_ms {
            return Err(QueryError::Invalid(format!(
                "`from` ({from_ms}) must be before `to` ({to_ms})"
            )));
        }
        if to_ms - from_ms > max_range_ms {
            return Err(QueryError::Invalid(format!(
                "the range covers {} days; at most {} days per query",
                (to_ms - from_ms) / DAY_MS,
                max_range_ms / DAY_MS
            )));
        }
        let mut p = None;
        let mut site = scope.site.clone();
        let mut line = scope.line.clone();
        let mut machine = scope.machine.clone();
        if let Some(m) = &scope.machine
            && m.contains('/')
        {
            let id: MachineId = m.parse().map_err(|e| match e {
                TopicError::BadId { what, value } => QueryError::Invalid(format!(
                    "`{what}` = `{value}` is not a valid id (1 to 64 of A-Z a-z 0-9 _ -)"
                )),
                _ => QueryError::Invalid(format!(
                    "`machine` = `{m}`: expected `machine` or `site/line/machine`"
                )),
            })?;
            site = Some(id.site.into());
            line = Some(id.line.into());
            machine = Some(id.machine.into());
        }
        for (name, v) in [
            (events::SITE, &site),
            (events::LINE, &line),
            (events::MACHINE, &machine),
        ] {
            if let Some(v) = v {
                if millrace_shared::topic::validate_id(name, v).is_err() {
                    return Err(QueryError::Invalid(format!(
                        "`{name}` = `{v}` is not a valid id (1 to 64 of A-Z a-z 0-9 _ -)"
                    )));
                }
                p = and(p, col(name).eq(lit(v.clone())));
            }
        }
        if let Some(m) = &scope.metric {
            p = and(p, col(telemetry::METRIC).eq(lit(m.clone())));
        }
        if let Some(k) = &scope.kind {
            if !events::KINDS.contains(&k.as_str()) {
                return Err(QueryError::Invalid(format!(
                    "`kind` = `{k}`: expected state, part or operator"
                )));
            }
            p = and(p, col(events::KIND).eq(lit(k.clone())));
        }
        if let Some(f) = &scope.function {
            if millrace_shared::topic::validate_id("function", f).is_err() {
                return Err(QueryError::Invalid(format!(
                    "`function` = `{f}` is not a valid function name (1 to 64 of A-Z a-z 0-9 _ -)"
                )));
            }
            p = and(p, col(alerts::FUNCTION).eq(lit(f.clone())));
        }
        if let Some(v) = &scope.severity {
            if !millrace_shared::alert::SEVERITIES.contains(&v.as_str()) {
                return Err(QueryError::Invalid(format!(
                    "`severity` = `{v}`: expected info, warning or critical"
                )));
            }
            p = and(p, col(alerts::SEVERITY).eq(lit(v.clone())));
        }
        Ok(Selection {
            from_ms,
            to_ms,
            entity: p,
            sites: site.map(|s| vec![s]),
        })
    }

    /// The same filter over another range.
    pub fn with_range(&self, from_ms: i64, to_ms: i64) -> Self {
        Self {
            from_ms,
            to_ms,
            ..self.clone()
        }
    }
}

/// The dates (UTC, `YYYY-MM-DD`) a range touches, for partition pruning.
pub(crate) fn date_range(from_ms: i64, to_ms: i64) -> (String, String) {
    let d = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map_or_else(|| "0000-00-00".into(), |d| d.format("%Y-%m-%d").to_string())
    };
    (d(from_ms), d(to_ms - 1))
}

/// Scans `table` for `sel` (partition-pruned, filtered); `None` when no file is in range.
pub fn scan(ds: &Dataset, table: Table, sel: &Selection) -> PolarsResult<Option<LazyFrame>> {
    let (a, b) = date_range(sel.from_ms, sel.to_ms);
    // Storage trouble (a bucket that does not answer) is an I/O error: the API answers 503.
    let files = ds
        .files(table, Some((&a, &b)), sel.sites.as_deref())
        .map_err(|e| PolarsError::IO {
            error: std::sync::Arc::new(std::io::Error::other(e.to_string())),
            msg: None,
        })?;
    if files.is_empty() {
        return Ok(None);
    }
    let time = if table == Table::PartCounts {
        part_counts::MINUTE
    } else {
        events::TS
    };
    let ts = || col(time).cast(DataType::Int64);
    let mut lf = crate::dataset::scan_files(&files)?
        .filter(ts().gt_eq(lit(sel.from_ms)).and(ts().lt(lit(sel.to_ms))));
    if let Some(p) = sel.entity.clone() {
        lf = lf.filter(p);
    }
    Ok(Some(lf))
}
