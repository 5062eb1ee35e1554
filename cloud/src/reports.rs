//! Queries over the dataset with Polars (lazy, run on blocking threads): raw rows and the
//! factory reports.

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use polars::prelude::*;
use serde::Deserialize;

use crate::api::{ApiError, ApiState, Caller, blocking};
use crate::dataset::{Table, scan_files};

/// Parses a time: Unix milliseconds, RFC 3339, or a duration before now (`-2h`).
pub(crate) fn parse_time(name: &str, v: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    if let Some(d) = v
        .strip_prefix('-')
        .and_then(|d| humantime::parse_duration(d).ok())
    {
        return Ok(chrono::Utc::now().timestamp_millis() - d.as_millis() as i64);
    }
    chrono::DateTime::parse_from_rfc3339(v).map(|d| d.timestamp_millis()).map_err(|_| {
        ApiError::BadRequest(format!("`{name}` = `{v}` is not a time: expected Unix milliseconds, RFC 3339 (2026-01-05T06:00:00Z) or a duration before now (-2h)"))
    })
}

/// Output format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON (default).
    #[default]
    Json,
    /// CSV with a header row.
    Csv,
}

/// Filters shared by data queries and reports.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    /// Only this site.
    pub site: Option<String>,
    /// Only this line.
    pub line: Option<String>,
    /// Only this machine (`machine` or `site/line/machine`).
    pub machine: Option<String>,
    /// Only this metric (telemetry).
    pub metric: Option<String>,
    /// Only this kind (`state`, `part`, `operator`).
    pub kind: Option<String>,
    /// From (inclusive): Unix ms, RFC 3339 or `-2h`.
    pub from: Option<String>,
    /// To (exclusive).
    pub to: Option<String>,
    /// Most rows.
    pub limit: Option<usize>,
    /// `json` or `csv`.
    #[serde(default)]
    pub format: Format,
    /// API key (for clients that cannot set headers).
    pub api_key: Option<String>,
    /// Reports: `machine`, `line` or `site`.
    pub level: Option<String>,
    /// OEE: `shift`, `day` or `total`.
    pub period: Option<String>,
    /// Production and telemetry windows: `1m`, `1h`, `1d` (production also `shift`).
    pub window: Option<String>,
}

fn choice<T: serde::de::DeserializeOwned + Default>(
    name: &str,
    v: &Option<String>,
    allowed: &str,
) -> Result<T, ApiError> {
    match v {
        None => Ok(T::default()),
        Some(s) => serde_json::from_value(serde_json::Value::String(s.clone())).map_err(|_| {
            ApiError::BadRequest(format!("`{name}` = `{s}`: expected one of {allowed}"))
        }),
    }
}

fn window_ms(v: &Option<String>, default: &str) -> Result<(String, i64), ApiError> {
    let w = v.clone().unwrap_or_else(|| default.to_owned());
    let ms = match w.as_str() {
        "1m" => 60_000,
        "1h" => 3_600_000,
        "1d" => 86_400_000,
        _ => {
            return Err(ApiError::BadRequest(format!(
                "`window` = `{w}`: expected 1m, 1h or 1d"
            )));
        }
    };
    Ok((w, ms))
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

impl Filters {
    pub(crate) fn select(&self, max_range_ms: i64) -> Result<Selection, ApiError> {
        let to_ms = match &self.to {
            Some(t) => parse_time("to", t)?,
            None => chrono::Utc::now().timestamp_millis() + 1,
        };
        let from_ms = match &self.from {
            Some(f) => parse_time("from", f)?,
            None => to_ms - 86_400_000,
        };
        if from_ms >= to_ms {
            return Err(ApiError::BadRequest(format!(
                "`from` ({from_ms}) must be before `to` ({to_ms})"
            )));
        }
        if to_ms - from_ms > max_range_ms {
            return Err(ApiError::BadRequest(format!(
                "the range covers {} days; at most {} days per query",
                (to_ms - from_ms) / 86_400_000,
                max_range_ms / 86_400_000
            )));
        }
        let mut p = None;
        let mut site = self.site.clone();
        let mut line = self.line.clone();
        let mut machine = self.machine.clone();
        if let Some(m) = &self.machine
            && m.contains('/')
        {
            let parts: Vec<&str> = m.split('/').collect();
            let [s, l, mm] = parts[..] else {
                return Err(ApiError::BadRequest(format!(
                    "`machine` = `{m}`: expected `machine` or `site/line/machine`"
                )));
            };
            site = Some(s.to_owned());
            line = Some(l.to_owned());
            machine = Some(mm.to_owned());
        }
        for (name, v) in [("site", &site), ("line", &line), ("machine", &machine)] {
            if let Some(v) = v {
                if millrace_shared::topic::validate_id(name, v).is_err() {
                    return Err(ApiError::BadRequest(format!(
                        "`{name}` = `{v}` is not a valid id (1 to 64 of A-Z a-z 0-9 _ -)"
                    )));
                }
                p = and(p, col(name).eq(lit(v.clone())));
            }
        }
        if let Some(m) = &self.metric {
            p = and(p, col("metric").eq(lit(m.clone())));
        }
        if let Some(k) = &self.kind {
            if !["state", "part", "operator"].contains(&k.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "`kind` = `{k}`: expected state, part or operator"
                )));
            }
            p = and(p, col("kind").eq(lit(k.clone())));
        }
        Ok(Selection {
            from_ms,
            to_ms,
            entity: p,
            sites: site.map(|s| vec![s]),
        })
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

/// Scans `table` for `sel` (partition-pruned, filtered).
pub fn scan(
    ds: &crate::dataset::Dataset,
    table: Table,
    sel: &Selection,
) -> PolarsResult<Option<LazyFrame>> {
    let (a, b) = date_range(sel.from_ms, sel.to_ms);
    let files = ds.files(table, Some((&a, &b)), sel.sites.as_deref());
    if files.is_empty() {
        return Ok(None);
    }
    let time = if table == Table::PartCounts {
        "minute"
    } else {
        "ts"
    };
    let ts = || col(time).cast(DataType::Int64);
    let mut lf =
        scan_files(&files)?.filter(ts().gt_eq(lit(sel.from_ms)).and(ts().lt(lit(sel.to_ms))));
    if let Some(p) = sel.entity.clone() {
        lf = lf.filter(p);
    }
    Ok(Some(lf))
}

/// A frame encoded for the response (done on a blocking thread: large frames take a while).
#[derive(Debug)]
pub(crate) struct Rendered {
    csv: bool,
    body: Vec<u8>,
}

impl IntoResponse for Rendered {
    fn into_response(self) -> Response {
        let ct = if self.csv {
            "text/csv; charset=utf-8"
        } else {
            "application/json"
        };
        ([(header::CONTENT_TYPE, ct)], self.body).into_response()
    }
}

/// Encodes a frame as `{"<key>": [rows as objects]}` or as CSV with a header row.
pub(crate) fn render(mut df: DataFrame, format: Format, key: &str) -> Result<Rendered, ApiError> {
    let mut body = vec![];
    match format {
        Format::Csv => {
            CsvWriter::new(&mut body)
                .include_header(true)
                .finish(&mut df)?;
        }
        Format::Json => {
            body.extend_from_slice(b"{");
            write_json_str(&mut body, key);
            body.extend_from_slice(b":");
            write_json_rows(&mut body, &df)?;
            body.extend_from_slice(b"}");
        }
    }
    Ok(Rendered {
        csv: format == Format::Csv,
        body,
    })
}

fn write_json_str(out: &mut Vec<u8>, v: &str) {
    serde_json::to_writer(&mut *out, v).expect("writing to a Vec cannot fail");
}

/// One column, typed, for writing row by row.
enum JsonColumn<'a> {
    Str(Vec<Option<&'a str>>),
    Bool(Vec<Option<bool>>),
    Int(Vec<Option<i64>>),
    UInt(Vec<Option<u64>>),
    Float(Vec<Option<f64>>),
    /// Anything else, as its display text.
    Text(Vec<Option<String>>),
}

/// Writes a frame as a JSON array of objects (timestamps as Unix ms, NaN and infinities as
/// null), column by column into typed vectors, then row by row.
pub(crate) fn write_json_rows(out: &mut Vec<u8>, df: &DataFrame) -> PolarsResult<()> {
    use std::io::Write as _;
    let mut names = vec![];
    let mut cols = vec![];
    for c in df.columns() {
        let s = c.as_materialized_series();
        let mut name = vec![];
        write_json_str(&mut name, s.name());
        name.push(b':');
        names.push(name);
        cols.push(match s.dtype() {
            DataType::String => JsonColumn::Str(s.str()?.iter().collect()),
            DataType::Boolean => JsonColumn::Bool(s.bool()?.iter().collect()),
            DataType::UInt64 => JsonColumn::UInt(s.u64()?.iter().collect()),
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32 => {
                JsonColumn::Int(s.cast(&DataType::Int64)?.i64()?.iter().collect())
            }
            DataType::Datetime(_, _) | DataType::Duration(_) => {
                JsonColumn::Int(s.to_physical_repr().i64()?.iter().collect())
            }
            DataType::Float32 | DataType::Float64 => JsonColumn::Float(
                s.cast(&DataType::Float64)?
                    .f64()?
                    .iter()
                    .map(|v| v.filter(|v| v.is_finite()))
                    .collect(),
            ),
            _ => JsonColumn::Text(
                (0..s.len())
                    .map(|i| match s.get(i) {
                        Ok(AnyValue::Null) | Err(_) => None,
                        Ok(AnyValue::String(v)) => Some(v.to_owned()),
                        Ok(v) => Some(v.to_string()),
                    })
                    .collect(),
            ),
        });
    }
    out.reserve(df.height() * 16 * cols.len().max(1));
    out.push(b'[');
    for i in 0..df.height() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'{');
        for (j, (name, c)) in names.iter().zip(&cols).enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(name);
            let w = &mut *out;
            let ok = match c {
                JsonColumn::Str(v) => v[i].map(|v| write_json_str(w, v)),
                JsonColumn::Text(v) => v[i].as_deref().map(|v| write_json_str(w, v)),
                JsonColumn::Bool(v) => {
                    v[i].map(|v| w.extend_from_slice(if v { b"true" } else { b"false" }))
                }
                JsonColumn::Int(v) => v[i].map(|v| {
                    let _ = write!(w, "{v}");
                }),
                JsonColumn::UInt(v) => v[i].map(|v| {
                    let _ = write!(w, "{v}");
                }),
                JsonColumn::Float(v) => v[i].map(|v| {
                    serde_json::to_writer(&mut *w, &v).expect("finite floats are written");
                }),
            };
            if ok.is_none() {
                out.extend_from_slice(b"null");
            }
        }
        out.push(b'}');
    }
    out.push(b']');
    Ok(())
}

fn max_range(s: &ApiState) -> i64 {
    s.cfg.http.max_query_range.as_millis() as i64
}

async fn rows(
    s: ApiState,
    f: Filters,
    table: Table,
    cols: &'static [&'static str],
    key: &'static str,
) -> Result<Response, ApiError> {
    let sel = f.select(max_range(&s))?;
    let limit = f.limit.unwrap_or(s.cfg.http.max_rows);
    if limit == 0 || limit > s.cfg.http.max_rows {
        return Err(ApiError::BadRequest(format!(
            "`limit` must be between 1 and {}",
            s.cfg.http.max_rows
        )));
    }
    let ds = s.dataset.clone();
    let format = f.format;
    blocking(move || {
        let Some(lf) = scan(&ds, table, &sel)? else {
            return render(DataFrame::empty(), format, key);
        };
        let exprs: Vec<Expr> = cols.iter().map(|c| col(*c)).collect();
        let df = lf
            .select(exprs)
            .sort(
                ["ts"],
                SortMultipleOptions::default().with_maintain_order(true),
            )
            .limit(limit as IdxSize)
            .collect()?;
        render(df, format, key)
    })
    .await
    .map(IntoResponse::into_response)
}

type Q = Result<Query<Filters>, axum::extract::rejection::QueryRejection>;

fn query(q: Q) -> Result<Filters, ApiError> {
    q.map(|Query(f)| f)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// `GET /api/v1/telemetry`: raw telemetry points.
pub(crate) async fn telemetry_rows(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    const COLS: &[&str] = &[
        "site",
        "line",
        "machine",
        "metric",
        "unit",
        "ts",
        "value",
        "device_seq",
        "edge",
        "outbox_seq",
        "backfill",
    ];
    rows(s, query(q)?, Table::Telemetry, COLS, "points").await
}

/// `GET /api/v1/events`: raw state, part and operator events.
pub(crate) async fn event_rows(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    const COLS: &[&str] = &[
        "site",
        "line",
        "machine",
        "ts",
        "device_seq",
        "kind",
        "state",
        "reason",
        "outcome",
        "cycle_time_ms",
        "part_id",
        "action",
        "operator",
        "edge",
        "outbox_seq",
        "backfill",
    ];
    rows(s, query(q)?, Table::Events, COLS, "events").await
}

/// Refuses a machine filter naming a machine the cloud has never heard of (404).
fn known_machine(s: &ApiState, f: &Filters) -> Result<(), ApiError> {
    let Some(m) = &f.machine else { return Ok(()) };
    let known = s.dataset.machines();
    let master = s.master.read().expect("master lock");
    let found = if m.contains('/') {
        known.contains(m) || master.ideal_cycle_ms.contains_key(m)
    } else {
        known
            .iter()
            .chain(master.ideal_cycle_ms.keys())
            .any(|k| k.rsplit('/').next() == Some(m.as_str()))
    };
    if found {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!(
            "no machine `{m}`: it never sent data and is not in the master data"
        )))
    }
}

/// A report's selection: a known machine (404 otherwise) and a checked range.
fn report_selection(s: &ApiState, f: &Filters, metric: bool) -> Result<Selection, ApiError> {
    known_machine(s, f)?;
    let refuse = |name: &str| {
        Err(ApiError::BadRequest(format!(
            "`{name}` does not apply to this report"
        )))
    };
    if f.kind.is_some() {
        return refuse("kind");
    }
    if !metric && f.metric.is_some() {
        return refuse("metric");
    }
    f.select(max_range(s))
}

/// `GET /api/v1/reports/oee`: OEE with availability, performance, quality, counts and times.
pub(crate) async fn oee_report(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    let f = query(q)?;
    let level: crate::factory::Level = choice("level", &f.level, "machine, line, site")?;
    let period: crate::factory::Period = choice("period", &f.period, "shift, day, total")?;
    let sel = report_selection(&s, &f, false)?;
    let (ds, master) = (
        s.dataset.clone(),
        s.master.read().expect("master lock").clone(),
    );
    let format = f.format;
    // Encoding runs on the blocking thread too: a month of shifts is megabytes of JSON.
    blocking(move || {
        let rows = crate::factory::oee(&ds, &master, &sel, level, period)?;
        Ok(match format {
            Format::Json => Rendered {
                csv: false,
                body: serde_json::to_vec(&serde_json::json!({ "rows": rows }))
                    .expect("rows serialize"),
            },
            Format::Csv => {
                let mut out = String::from(
                    "entity,period,start_ms,good,scrap,rework,total,planned_production_ms,running_ms,availability,performance,quality,oee,mtbf_ms,mttr_ms\n",
                );
                let o = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
                for r in rows {
                    let k = &r.kpis;
                    out.push_str(&format!(
                        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                        r.entity,
                        r.period,
                        r.start_ms,
                        k.tally.good,
                        k.tally.scrap,
                        k.tally.rework,
                        k.total,
                        k.planned_production_ms,
                        k.tally.times.running_ms,
                        o(k.availability),
                        o(k.performance),
                        o(k.quality),
                        o(k.oee),
                        o(k.mtbf_ms),
                        o(k.mttr_ms)
                    ));
                }
                Rendered {
                    csv: true,
                    body: out.into_bytes(),
                }
            }
        })
    })
    .await
    .map(IntoResponse::into_response)
}

/// `GET /api/v1/reports/downtime`: unplanned stop time by reason (Pareto), MTBF, MTTR.
pub(crate) async fn downtime_report(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    let f = query(q)?;
    let level: crate::factory::Level = choice("level", &f.level, "machine, line, site")?;
    let sel = report_selection(&s, &f, false)?;
    let (ds, master) = (
        s.dataset.clone(),
        s.master.read().expect("master lock").clone(),
    );
    let rows = blocking(move || Ok(crate::factory::downtime(&ds, &master, &sel, level)?)).await?;
    Ok(axum::Json(serde_json::json!({ "rows": rows })).into_response())
}

/// `GET /api/v1/reports/production`: good, scrap, rework and throughput per window.
pub(crate) async fn production_report(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    let f = query(q)?;
    let level: crate::factory::Level = choice("level", &f.level, "machine, line, site")?;
    let (w, _) = window_ms(&f.window, "1h")?;
    let sel = report_selection(&s, &f, false)?;
    let ds = s.dataset.clone();
    let format = f.format;
    blocking(move || {
        render(
            crate::factory::production(&ds, &sel, level, &w)?,
            format,
            "rows",
        )
    })
    .await
    .map(IntoResponse::into_response)
}

/// `GET /api/v1/reports/telemetry`: count, min, max, mean, p95 per machine, metric and window.
pub(crate) async fn telemetry_report(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    let f = query(q)?;
    let (_, every) = window_ms(&f.window, "1h")?;
    let sel = report_selection(&s, &f, true)?;
    let ds = s.dataset.clone();
    let format = f.format;
    blocking(move || render(crate::factory::telemetry(&ds, &sel, every)?, format, "rows"))
        .await
        .map(IntoResponse::into_response)
}
