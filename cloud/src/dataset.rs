//! The cloud's dataset: one Delta Lake table per kind of row, Parquet files partitioned
//! Hive-style by date and site, which any engine that reads Delta (Spark, Trino, DuckDB,
//! Polars, delta-rs) reads as it is.
//!
//! ```text
//! data/
//!   telemetry/_delta_log/00000000000000000000.json …      the table's commits
//!   telemetry/date=2026-11-23/site=plant-1/1764000000000-edge-1-5f2a9c1e.parquet
//!   events/…   part_counts/…   alerts/…
//!   sync_batches/                                          one row per stored edge batch
//! ```
//!
//! `part_counts` is a rollup kept with the data: good, scrap and rework parts per machine and
//! minute, written with the part events it counts, summed again by compaction. Production and
//! OEE reports read it instead of one row per part.
//!
//! **Commit protocol.** A batch from an edge becomes one Delta commit per table it has rows
//! for (its new files, written and made durable first), then one commit of a row to
//! `sync_batches`, and only then is it acknowledged. Commits are Delta's optimistic
//! concurrency (a conditional put of the next log entry), so several cloud nodes write the
//! same tables; each commit names the edge as a Delta application transaction
//! (`txn`, app id `millrace-sync/<edge>`), so two nodes committing batches of the *same* edge
//! at once conflict and the loser checks again what is already stored (see below) instead of
//! storing it twice.
//!
//! **Exactly once.** Which outbox sequence numbers a file holds is recorded in the file's own
//! `add` action (its `tags`, kept by checkpoints and compaction), so the per-edge ledger is part
//! of the table's snapshot, not of one process's memory: a table holds an item when one of its
//! files' tags covers the item's sequence number, and a batch is complete once its
//! `sync_batches` row is committed. Items already held are counted as duplicates and not
//! written again, so a batch re-sent after a lost acknowledgement, or to another node, is
//! stored once; a crash between two tables' commits leaves the rest to the retry.
//!
//! **Compaction** rewrites the small files of a partition into one (a `remove` and an `add` in
//! one commit, `dataChange = false`); files no snapshot needs any more are deleted by vacuum
//! after [`RETIRE_AFTER`]. Compacted event files are sorted by kind, then time, in row groups
//! of [`EVENTS_ROW_GROUP`] rows, so that a scan for state changes skips the row groups of parts.
//!
//! A dataset of the layout before Delta (`manifest.log`) is converted once when opened.

mod compaction;
mod delta;
mod ledger;
mod legacy;
mod storage;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::{Deserialize, Serialize};

pub use delta::Dataset;
pub use ledger::EdgeLedger;
pub use storage::Document;

use crate::schema::{events, part_counts};

/// Errors of the dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Polars failed.
    #[error("polars: {0}")]
    Polars(#[from] PolarsError),
    /// The Delta log could not be read or written (storage trouble, a damaged log).
    #[error("delta table {table}: {message}")]
    Delta {
        /// The table.
        table: &'static str,
        /// What went wrong.
        message: String,
        /// Whether trying again may work.
        retryable: bool,
    },
    /// The object store refused or did not answer.
    #[error("storage: {message}")]
    Storage {
        /// What went wrong, with a hint.
        message: String,
        /// Whether trying again may work.
        retryable: bool,
    },
    /// Another node committed a batch of the same edge at the same time: what is stored must
    /// be checked again before this batch is.
    #[error("a concurrent commit of the same edge's data on table {0}")]
    Conflict(&'static str),
    /// The old layout's manifest has a line that is not the last and cannot be read.
    #[error("manifest line {line} is damaged: {reason}")]
    Manifest {
        /// 1-based line number.
        line: usize,
        /// Why.
        reason: String,
    },
}

impl DatasetError {
    /// Whether trying again may work (disk full, I/O trouble, a busy store).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Io { .. } | Self::Conflict(_) => true,
            Self::Delta { retryable, .. } | Self::Storage { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A table of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// One row per telemetry reading.
    Telemetry,
    /// One row per state, part or operator event.
    Events,
    /// Good, scrap and rework parts per machine and minute (a rollup of the part events).
    PartCounts,
    /// One row per alert an edge function raised.
    Alerts,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 4] = [
        Table::Telemetry,
        Table::Events,
        Table::PartCounts,
        Table::Alerts,
    ];

    /// Directory name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Telemetry => "telemetry",
            Self::Events => "events",
            Self::PartCounts => "part_counts",
            Self::Alerts => "alerts",
        }
    }
}

/// A file of the dataset.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DataFile {
    /// Path relative to the data directory.
    pub path: String,
    /// Its table.
    pub table: Table,
    /// `YYYY-MM-DD` of its rows' timestamps (UTC).
    pub date: String,
    /// The site of its rows.
    pub site: String,
    /// Rows.
    pub rows: u64,
}

/// Rows per row group of compacted event files.
pub const EVENTS_ROW_GROUP: usize = 65_536;

/// How long files that a compaction replaced stay in storage (a query that listed them before
/// the compaction may still be reading them), and files that no commit names (a commit that
/// failed or was interrupted, perhaps still running on another node).
pub const RETIRE_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

const MINUTE_MS: i64 = 60_000;

fn sync_dir(dir: &Path) -> Result<(), DatasetError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

/// Writes `df` to `path` atomically: temp file, fsync, rename, fsync of the directories made.
fn write_file(path: &Path, df: &mut DataFrame, fsync: bool) -> Result<(), DatasetError> {
    let dir = path.parent().expect("files live in partitions");
    let new_dir = !dir.exists();
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension("parquet.tmp");
    let written = write_tmp(path, &tmp, df, fsync);
    if written.is_err() {
        // A full disk must not stay full of half-written files.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if fsync {
        sync_dir(dir)?;
        if new_dir {
            // The partition directories themselves must survive a crash too (up to the
            // table's).
            let mut d = dir.parent();
            for _ in 0..2 {
                let Some(p) = d else { break };
                sync_dir(p)?;
                d = p.parent();
            }
        }
    }
    Ok(())
}

/// The Parquet writer of data files (zstd; event files in row groups of
/// [`EVENTS_ROW_GROUP`] rows).
fn parquet_writer<W: std::io::Write>(w: W, events: bool) -> ParquetWriter<W> {
    ParquetWriter::new(w)
        .with_compression(ParquetCompression::Zstd(None))
        .with_row_group_size(events.then_some(EVENTS_ROW_GROUP))
}

/// Writes `df` as Parquet to `tmp` and makes it durable.
fn write_tmp(path: &Path, tmp: &Path, df: &mut DataFrame, fsync: bool) -> Result<(), DatasetError> {
    let f = File::create(tmp).map_err(io(tmp))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let events = path
        .components()
        .any(|c| c.as_os_str() == Table::Events.as_str());
    parquet_writer(&mut w, events).finish(df)?;
    let mut f = w.into_inner().map_err(|e| io(tmp)(e.into_error()))?;
    f.flush().map_err(io(tmp))?;
    if fsync {
        f.sync_all().map_err(io(tmp))?;
    }
    Ok(())
}

/// Good, scrap and rework parts per machine and minute from event rows (columns `site`, `line`,
/// `machine`, `minute` as Unix ms, counts as `i64`), sorted by machine, then minute: the
/// part-counts rollup of those rows. With `per_minute` false, `minute` is each part's own time.
pub(crate) fn count_parts(rows: LazyFrame, per_minute: bool) -> LazyFrame {
    let ts = col(events::TS).cast(DataType::Int64);
    let minute = if per_minute {
        (ts / lit(MINUTE_MS)) * lit(MINUTE_MS)
    } else {
        ts
    };
    // The count columns are named as the outcomes are.
    let count = |outcome: &str| {
        col(events::OUTCOME)
            .eq(lit(outcome))
            .sum()
            .cast(DataType::Int64)
            .alias(outcome)
    };
    rows.filter(col(events::KIND).eq(lit(events::KIND_PART)))
        .with_column(minute.alias(part_counts::MINUTE))
        .group_by(part_counts::KEY.map(col))
        .agg(part_counts::COUNTS.map(count))
        .sort(part_counts::KEY, SortMultipleOptions::default())
}

/// The column types of a part-counts file: `minute` a timestamp, counts `u32`.
fn part_counts_schema(df: &mut DataFrame) -> PolarsResult<&mut DataFrame> {
    let minute = df
        .column(part_counts::MINUTE)?
        .cast(&DataType::Int64)?
        .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?;
    df.with_column(minute)?;
    for c in part_counts::COUNTS {
        let v = df.column(c)?.cast(&DataType::UInt32)?;
        df.with_column(v)?;
    }
    Ok(df)
}

/// Reads files into one frame (eagerly).
pub fn read_files(paths: &[PathBuf]) -> PolarsResult<DataFrame> {
    scan_files(paths)?.collect()
}

/// A lazy scan over files (an empty frame of no columns when there are none).
pub fn scan_files(paths: &[PathBuf]) -> PolarsResult<LazyFrame> {
    if paths.is_empty() {
        return Ok(DataFrame::empty().lazy());
    }
    let paths: Vec<PlRefPath> = paths
        .iter()
        .map(|p| PlRefPath::new(p.to_string_lossy().as_ref()))
        .collect();
    LazyFrame::scan_parquet_files(
        paths.into_iter().collect(),
        ScanArgsParquet {
            glob: false,
            // The partition values are columns of the files too.
            hive_options: HiveOptions::new_disabled(),
            ..Default::default()
        },
    )
}
