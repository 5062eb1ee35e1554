//! The live dashboard's snapshot: OEE per line, parts per hour and the downtime Pareto of the
//! last 24 hours.

use serde_json::json;

use super::{Level, Master, Period, oee, production};
use crate::dataset::Dataset;
use crate::query::{QueryError, Selection};

/// A KPI snapshot of the last 24 hours: OEE per line, production per hour, downtime Pareto.
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
    Ok(json!({
        "at_ms": now,
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
