//! The live dashboard's snapshot: OEE per line, parts per hour, the downtime Pareto and the
//! newest alerts of the last 24 hours.

use polars::prelude::*;
use serde_json::json;

use super::{Level, Master, Period, oee, production};
use crate::dataset::{Dataset, Table};
use crate::query::{QueryError, Selection, scan};
use crate::schema::alerts;

/// Alerts the dashboard lists.
const DASHBOARD_ALERTS: u32 = 20;

/// A KPI snapshot of the last 24 hours: OEE per line, production per hour, downtime Pareto,
/// alerts per severity and the newest alerts.
pub fn snapshot(ds: &Dataset, master: &Master) -> Result<serde_json::Value, QueryError> {
    let now = chrono::Utc::now().timestamp_millis();
    let sel = Selection::range(now - 86_400_000, now + 1);
    let lines = oee(ds, master, &sel, Level::Line, Period::Total)?;
    let mut all = millrace_shared::Tally::default();
    for r in &lines {
        all.merge(&r.kpis.tally);
    }
    let total: u64 = all.stop_time_by_reason.values().sum();
    let mut pareto: Vec<(String, u64)> = all.stop_time_by_reason.clone().into_iter().collect();
    pareto.sort_by_key(|r| std::cmp::Reverse(r.1));
    let prod = production::production(ds, &sel, Level::Site, "1h")?;
    let mut per_hour: std::collections::BTreeMap<i64, i64> = Default::default();
    if prod.height() > 0 {
        let w = prod
            .column(production::WINDOW_START)?
            .as_materialized_series()
            .cast(&polars::prelude::DataType::Int64)?;
        let t = prod
            .column(production::TOTAL)?
            .as_materialized_series()
            .cast(&polars::prelude::DataType::Int64)?;
        for (w, t) in w.i64()?.iter().zip(t.i64()?.iter()) {
            *per_hour.entry(w.unwrap_or(0)).or_default() += t.unwrap_or(0);
        }
    }
    let (alert_counts, newest) = recent_alerts(ds, &sel)?;
    Ok(json!({
        "at_ms": now,
        "alert_counts": alert_counts,
        "alerts": newest,
        "parts": all.total(),
        "lines": lines.iter().map(|r| json!({
            "entity": r.entity,
            "oee": r.kpis.oee,
            "availability": r.kpis.availability,
            "performance": r.kpis.performance,
            "quality": r.kpis.quality,
            "total": r.kpis.total,
            "scrap": r.kpis.tally.scrap,
        })).collect::<Vec<_>>(),
        "production": per_hour.into_iter().map(|(w, t)| json!({ "window_start": w, "total": t })).collect::<Vec<_>>(),
        "pareto": pareto.into_iter().map(|(reason, ms)| json!({
            "reason": reason,
            "ms": ms,
            "share": if total > 0 { ms as f64 / total as f64 } else { 0.0 },
        })).collect::<Vec<_>>(),
    }))
}

/// Alerts of `sel` per severity, and the newest [`DASHBOARD_ALERTS`] of them.
fn recent_alerts(
    ds: &Dataset,
    sel: &Selection,
) -> Result<(serde_json::Value, Vec<serde_json::Value>), QueryError> {
    let Some(lf) = scan(ds, Table::Alerts, sel)? else {
        return Ok((json!({}), vec![]));
    };
    let counts = lf
        .clone()
        .group_by([col(alerts::SEVERITY)])
        .agg([len().alias("n")])
        .collect()?;
    let mut by_severity = serde_json::Map::new();
    let sev = counts.column(alerts::SEVERITY)?.str()?.clone();
    let n = counts.column("n")?.cast(&DataType::UInt64)?;
    for (s, n) in sev.iter().zip(n.u64()?.iter()) {
        by_severity.insert(s.unwrap_or_default().to_owned(), json!(n.unwrap_or(0)));
    }
    let df = lf
        .sort(
            [alerts::TS],
            SortMultipleOptions::default().with_order_descending(true),
        )
        .limit(DASHBOARD_ALERTS)
        .collect()?;
    let text = |name: &str| -> Result<Vec<Option<String>>, QueryError> {
        Ok(df
            .column(name)?
            .str()?
            .iter()
            .map(|v| v.map(str::to_owned))
            .collect())
    };
    let ts = df
        .column(alerts::TS)?
        .as_materialized_series()
        .to_physical_repr()
        .i64()?
        .clone();
    let (site, line, machine) = (
        text(alerts::SITE)?,
        text(alerts::LINE)?,
        text(alerts::MACHINE)?,
    );
    let (severity, function, message, edge) = (
        text(alerts::SEVERITY)?,
        text(alerts::FUNCTION)?,
        text(alerts::MESSAGE)?,
        text(alerts::EDGE)?,
    );
    let newest = (0..df.height())
        .map(|i| {
            let machine = match (&site[i], &line[i], &machine[i]) {
                (Some(s), Some(l), Some(m)) => Some(format!("{s}/{l}/{m}")),
                _ => None,
            };
            json!({
                "ts_ms": ts.get(i),
                "severity": severity[i],
                "function": function[i],
                "machine": machine,
                "edge": edge[i],
                "message": message[i],
            })
        })
        .collect();
    Ok((serde_json::Value::Object(by_severity), newest))
}
