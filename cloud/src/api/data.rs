//! Raw rows and the factory reports over HTTP: query parameters checked into a
//! [`Selection`], the query run on a blocking thread, the result rendered as JSON or CSV.

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use millrace_shared::time::parse_time;
use polars::prelude::*;
use serde::Deserialize;

use super::auth::Caller;
use super::openapi::QueryFailed;
use super::{ApiError, ApiState, blocking};
use crate::dataset::Table;
use crate::query::{Scope, Selection, scan};
use crate::reports::{Level, Period};
use crate::schema::{alerts, events, telemetry};

/// Output format.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum Format {
    /// JSON (default).
    #[default]
    Json,
    /// CSV with a header row.
    Csv,
}

/// Filters shared by data queries and reports.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct Filters {
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
    /// Alerts: only those of this function.
    pub function: Option<String>,
    /// Alerts: only this severity (`info`, `warning`, `critical`).
    pub severity: Option<String>,
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
    #[allow(
        dead_code,
        reason = "read by the `Caller` extractor from the raw query string"
    )]
    pub api_key: Option<String>,
    /// Reports: `machine`, `line` or `site`.
    pub level: Option<String>,
    /// OEE: `shift`, `day` or `total`.
    pub period: Option<String>,
    /// Production and telemetry windows: `1m`, `1h`, `1d` (production also `shift`).
    pub window: Option<String>,
    /// State timeline: the time one pixel stands for (Unix ms, or a duration such as `5m`);
    /// shorter intervals are merged (see the endpoint).
    pub resolution: Option<String>,
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

/// `resolution` of the state timeline: Unix ms or a duration (`90s`, `5m`), at least 1 ms and
/// at most the range.
fn resolution_ms(v: &str, range_ms: i64) -> Result<i64, ApiError> {
    let ms = match v.parse::<i64>() {
        Ok(ms) => Some(ms),
        Err(_) => humantime::parse_duration(v)
            .ok()
            .and_then(|d| i64::try_from(d.as_millis()).ok()),
    };
    match ms {
        Some(ms) if ms >= 1 && ms <= range_ms.max(1) => Ok(ms),
        Some(ms) => Err(ApiError::BadRequest(format!(
            "`resolution` = `{v}` ({ms} ms): expected between 1 ms and the range ({range_ms} ms)"
        ))),
        None => Err(ApiError::BadRequest(format!(
            "`resolution` = `{v}`: expected milliseconds or a duration such as `5m`"
        ))),
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

impl Filters {
    /// Refuses each given parameter that only some queries take and `what` (the rows or report
    /// asked for) is not among them: a 400 naming it, rather than a filter silently ignored.
    fn only(&self, accepted: &[&str], what: &str) -> Result<(), ApiError> {
        let given = [
            ("metric", self.metric.is_some()),
            ("kind", self.kind.is_some()),
            ("function", self.function.is_some()),
            ("severity", self.severity.is_some()),
            ("level", self.level.is_some()),
            ("period", self.period.is_some()),
            ("window", self.window.is_some()),
            ("resolution", self.resolution.is_some()),
        ];
        match given
            .iter()
            .find(|(name, given)| *given && !accepted.contains(name))
        {
            Some((name, _)) => Err(ApiError::BadRequest(format!(
                "`{name}` does not apply to {what}"
            ))),
            None => Ok(()),
        }
    }

    /// The checked selection these filters ask for (at most `max_range_ms` long; by default the
    /// 24 hours before `to`, and `to` now).
    pub(crate) fn select(&self, max_range_ms: i64) -> Result<Selection, ApiError> {
        let to_ms = match &self.to {
            Some(t) => parse_time("to", t)?,
            None => chrono::Utc::now().timestamp_millis() + 1,
        };
        let from_ms = match &self.from {
            Some(f) => parse_time("from", f)?,
            None => to_ms - 86_400_000,
        };
        let scope = Scope {
            site: self.site.clone(),
            line: self.line.clone(),
            machine: self.machine.clone(),
            metric: self.metric.clone(),
            kind: self.kind.clone(),
            function: self.function.clone(),
            severity: self.severity.clone(),
        };
        Ok(Selection::new(from_ms, to_ms, max_range_ms, &scope)?)
    }
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
    let accepted: &[&str] = match table {
        Table::Telemetry => &["metric"],
        Table::Events => &["kind"],
        Table::Alerts => &["function", "severity"],
        Table::PartCounts => &[],
    };
    f.only(accepted, key)?;
    let sel = f.select(max_range(&s))?;
    let limit = row_limit(&s, &f)?;
    let ds = s.dataset.clone();
    let format = f.format;
    blocking(move || {
        let Some(lf) = scan(&ds, table, &sel)? else {
            return render(DataFrame::empty(), format, key);
        };
        let exprs: Vec<Expr> = cols.iter().map(|c| col(*c)).collect();
        // Alerts: the newest first (what someone on call asks for; alerts raised together in
        // the order the edge queued them, last first); rows: oldest first.
        let newest_first = table == Table::Alerts;
        let order: Vec<&str> = if newest_first {
            vec![alerts::TS, alerts::OUTBOX_SEQ]
        } else {
            vec![events::TS]
        };
        let df = lf
            .select(exprs)
            .sort(
                order,
                SortMultipleOptions::default()
                    .with_maintain_order(true)
                    .with_order_descending(newest_first),
            )
            .limit(limit as IdxSize)
            .collect()?;
        render(df, format, key)
    })
    .await
    .map(IntoResponse::into_response)
}

/// The `limit` asked for: `http.max_rows` by default, and at most that.
fn row_limit(s: &ApiState, f: &Filters) -> Result<usize, ApiError> {
    let limit = f.limit.unwrap_or(s.cfg.http.max_rows);
    if limit == 0 || limit > s.cfg.http.max_rows {
        return Err(ApiError::BadRequest(format!(
            "`limit` must be between 1 and {}",
            s.cfg.http.max_rows
        )));
    }
    Ok(limit)
}

type Q = Result<Query<Filters>, axum::extract::rejection::QueryRejection>;

fn query(q: Q) -> Result<Filters, ApiError> {
    Ok(q.map(|Query(f)| f)?)
}

/// Raw telemetry points, oldest first (at most `limit`).
#[utoipa::path(get, path = "/api/v1/telemetry", tag = "data", params(Filters),
    responses((status = 200, description = "`{\"points\": [...]}` (`?format=csv`: CSV with a header row)", content_type = "application/json"), QueryFailed))]
pub(super) async fn telemetry_rows(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    rows(
        s,
        query(q)?,
        Table::Telemetry,
        telemetry::API_COLUMNS,
        "points",
    )
    .await
}

/// Raw state, part and operator events, oldest first (at most `limit`).
#[utoipa::path(get, path = "/api/v1/events", tag = "data", params(Filters),
    responses((status = 200, description = "`{\"events\": [...]}` (`?format=csv`: CSV with a header row)", content_type = "application/json"), QueryFailed))]
pub(super) async fn event_rows(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    rows(s, query(q)?, Table::Events, events::API_COLUMNS, "events").await
}

/// Alerts the edges' functions raised, newest first (at most `limit`): filter by site, line,
/// machine, function, severity and time.
#[utoipa::path(get, path = "/api/v1/alerts", tag = "data", params(Filters),
    responses((status = 200, description = "`{\"alerts\": [...]}` (`?format=csv`: CSV with a header row)", content_type = "application/json"), QueryFailed))]
pub(super) async fn alert_rows(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    rows(s, query(q)?, Table::Alerts, alerts::API_COLUMNS, "alerts").await
}

/// Refuses a machine filter naming a machine the cloud has never heard of (404).
fn known_machine(s: &ApiState, f: &Filters) -> Result<(), ApiError> {
    let known = s.dataset.machines();
    let master = s.master.read().expect("master lock");
    Ok(crate::reports::check_machine(
        f.machine.as_deref(),
        &known,
        &master,
    )?)
}

/// A report's selection: a known machine (404 otherwise) and a checked range.
fn report_selection(s: &ApiState, f: &Filters, metric: bool) -> Result<Selection, ApiError> {
    known_machine(s, f)?;
    let report = ["level", "period", "window"];
    if metric {
        f.only(&["metric", report[0], report[1], report[2]], "this report")?;
    } else {
        f.only(&report, "this report")?;
    }
    f.select(max_range(s))
}

/// OEE = availability × performance × quality (ISO 22400) per entity and period, with the
/// counts and times they come from.
#[utoipa::path(get, path = "/api/v1/reports/oee", tag = "reports", params(Filters),
    responses((status = 200, description = "`{\"rows\": [...]}` (`?format=csv`: CSV with a header row)", content_type = "application/json"), QueryFailed))]
pub(super) async fn oee_report(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    let f = query(q)?;
    let level: Level = choice("level", &f.level, "machine, line, site")?;
    let period: Period = choice("period", &f.period, "shift, day, total")?;
    let sel = report_selection(&s, &f, false)?;
    let (ds, master) = s.dataset_and_master();
    let format = f.format;
    // Encoding runs on the blocking thread too: a month of shifts is megabytes of JSON.
    blocking(move || {
        let rows = crate::reports::oee(&ds, &master, &sel, level, period)?;
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

/// Unplanned stop time by reason (Pareto), MTBF and MTTR per entity.
#[utoipa::path(get, path = "/api/v1/reports/downtime", tag = "reports", params(Filters),
    responses((status = 200, description = "`{\"rows\": [...]}`", content_type = "application/json"), QueryFailed))]
pub(super) async fn downtime_report(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    let f = query(q)?;
    let level: Level = choice("level", &f.level, "machine, line, site")?;
    let sel = report_selection(&s, &f, false)?;
    let (ds, master) = s.dataset_and_master();
    let rows = blocking(move || Ok(crate::reports::downtime(&ds, &master, &sel, level)?)).await?;
    Ok(axum::Json(serde_json::json!({ "rows": rows })).into_response())
}

/// Good, scrap, rework and throughput per entity and window.
#[utoipa::path(get, path = "/api/v1/reports/production", tag = "reports", params(Filters),
    responses((status = 200, description = "`{\"rows\": [...]}` (`?format=csv`: CSV with a header row)", content_type = "application/json"), QueryFailed))]
pub(super) async fn production_report(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    let f = query(q)?;
    let level: Level = choice("level", &f.level, "machine, line, site")?;
    let (w, _) = window_ms(&f.window, "1h")?;
    let sel = report_selection(&s, &f, false)?;
    let ds = s.dataset.clone();
    let format = f.format;
    blocking(move || {
        render(
            crate::reports::production(&ds, &sel, level, &w)?,
            format,
            "rows",
        )
    })
    .await
    .map(IntoResponse::into_response)
}

/// Count, min, max, mean and p95 per machine, metric and window.
#[utoipa::path(get, path = "/api/v1/reports/telemetry", tag = "reports", params(Filters),
    responses((status = 200, description = "`{\"rows\": [...]}` (`?format=csv`: CSV with a header row)", content_type = "application/json"), QueryFailed))]
pub(super) async fn telemetry_report(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    let f = query(q)?;
    let (_, every) = window_ms(&f.window, "1h")?;
    let sel = report_selection(&s, &f, true)?;
    let ds = s.dataset.clone();
    let format = f.format;
    blocking(move || render(crate::reports::telemetry(&ds, &sel, every)?, format, "rows"))
        .await
        .map(IntoResponse::into_response)
}

/// The state timeline: per machine (by name), the intervals it spent in each state with the
/// reason it gave, cut to the range (and to now), consecutive changes to the same state and
/// reason merged; and the shifts (with their breaks) that overlap the range. At most `limit`
/// intervals: a range that holds more is refused (400), not cut short. With `resolution` (what
/// one pixel of the chart stands for, e.g. the range over its width), runs of intervals shorter
/// than it are merged into one of the state they spent most time in, with `merged` (how many)
/// and `state_ms` (time per state): at most about two intervals per pixel and machine.
#[utoipa::path(get, path = "/api/v1/reports/states", tag = "reports", params(Filters),
    responses((status = 200, description = "`{\"intervals\": [{machine, state, reason, start_ms, end_ms}], \"shifts\": [{name, date, start_ms, end_ms, breaks}]}` (`?format=csv`: the intervals as CSV with a header row)", content_type = "application/json"), QueryFailed))]
pub(super) async fn state_report(
    _c: Caller,
    State(s): State<ApiState>,
    q: Q,
) -> Result<Response, ApiError> {
    let f = query(q)?;
    known_machine(&s, &f)?;
    f.only(&["resolution"], "the state timeline (it is per machine)")?;
    let sel = f.select(max_range(&s))?;
    let limit = row_limit(&s, &f)?;
    let resolution_ms = match &f.resolution {
        None => None,
        Some(r) => Some(resolution_ms(r, sel.to_ms - sel.from_ms)?),
    };
    let (ds, master) = s.dataset_and_master();
    let format = f.format;
    blocking(move || {
        let mut intervals = crate::reports::state_timeline(&ds, &sel)?;
        if let Some(r) = resolution_ms {
            intervals = crate::reports::downsample_states(intervals, r);
        }
        if intervals.len() > limit {
            return Err(ApiError::BadRequest(format!(
                "the range holds {} state intervals, more than `limit` = {limit}: narrow the range or pick a line or machine",
                intervals.len()
            )));
        }
        Ok(match format {
            Format::Json => {
                let shifts = master.calendar.instances_between(sel.from_ms, sel.to_ms);
                Rendered {
                    csv: false,
                    body: serde_json::to_vec(
                        &serde_json::json!({ "intervals": intervals, "shifts": shifts }),
                    )
                    .expect("intervals serialize"),
                }
            }
            Format::Csv => {
                // `merged` only when asked for a resolution (how many intervals a row stands for).
                let mut out = String::from("machine,state,reason,start_ms,end_ms");
                out.push_str(if resolution_ms.is_some() { ",merged\n" } else { "\n" });
                for i in intervals {
                    out.push_str(&format!(
                        "{},{},{},{},{}",
                        i.machine,
                        i.state,
                        i.reason.as_deref().unwrap_or(""),
                        i.start_ms,
                        i.end_ms
                    ));
                    if resolution_ms.is_some() {
                        out.push_str(&format!(",{}", i.merged.unwrap_or(1)));
                    }
                    out.push('\n');
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
