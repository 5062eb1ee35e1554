//! Telemetry aggregates per machine, metric and window.

use polars::prelude::*;

use crate::dataset::{Dataset, Table};
use crate::query::{QueryError, Selection, scan};
use crate::schema::telemetry;

/// Telemetry aggregates per machine, metric and window: count, min, max, mean, p95.
pub fn telemetry(ds: &Dataset, sel: &Selection, every_ms: i64) -> Result<DataFrame, QueryError> {
    let Some(lf) = scan(ds, Table::Telemetry, sel)? else {
        return Ok(DataFrame::empty());
    };
    let window = ((col(telemetry::TS).cast(DataType::Int64) / lit(every_ms)) * lit(every_ms))
        .alias("window_start");
    Ok(lf
        .with_column(window)
        .group_by([
            col(telemetry::SITE),
            col(telemetry::LINE),
            col(telemetry::MACHINE),
            col(telemetry::METRIC),
            col("window_start"),
        ])
        .agg([
            col(telemetry::UNIT).first().alias(telemetry::UNIT),
            len().alias("count"),
            col(telemetry::VALUE).min().alias("min"),
            col(telemetry::VALUE).max().alias("max"),
            col(telemetry::VALUE).mean().alias("mean"),
            col(telemetry::VALUE)
                .quantile(lit(0.95), QuantileMethod::Linear)
                .alias("p95"),
        ])
        .sort(
            [
                telemetry::SITE,
                telemetry::LINE,
                telemetry::MACHINE,
                telemetry::METRIC,
                "window_start",
            ],
            SortMultipleOptions::default(),
        )
        .collect()?)
}
