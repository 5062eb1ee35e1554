//! The cloud's dataset: Parquet files partitioned by table, date and site, and a manifest.
//!
//! ```text
//! data/
//!   manifest.log                                   what the dataset holds (append-only)
//!   telemetry/date=2026-11-23/site=plant-1/000000000042-edge-1.parquet
//!   events/date=2026-11-23/site=plant-1/000000000042-edge-1.parquet
//!   part_counts/date=2026-11-23/site=plant-1/000000000042-edge-1.parquet
//! ```
//!
//! `part_counts` is a rollup kept with the data: good, scrap and rework parts per machine and
//! minute, written in the same commit as the part events it counts (so it is exactly as durable
//! and as idempotent), summed again by compaction. Production and OEE reports read it instead of
//! one row per part; the raw events stay for everything else and for the partial minutes at the
//! edges of a range.
//!
//! The layout is Hive-style so that any Parquet engine (DuckDB, Spark, Trino, Polars) reads it,
//! and the same keys work on S3-compatible object storage.
//!
//! **Commit protocol.** A batch from an edge becomes one *commit*: its rows are written to new
//! files (temp file, fsync, rename, fsync of the directory), then one JSON line naming the files
//! and the outbox sequence numbers they hold is appended to `manifest.log` and fsynced. That
//! append is the commit point: the batch is acknowledged only after it. On open, the manifest is
//! replayed (a torn last line is cut off) and every Parquet or temp file it does not name is
//! deleted, so a crash at any point leaves either the whole batch or none of it, and the edge,
//! not having an acknowledgement, sends it again.
//!
//! **Idempotence.** The manifest also gives, per edge, the set of outbox sequence numbers held.
//! Items of a batch already held are counted as duplicates and not written again, so a batch
//! re-sent after a lost acknowledgement, or rebuilt differently after an edge restart, never
//! doubles a row.
//!
//! **Compaction** rewrites the small files of a partition into one and records the swap as one
//! manifest line, then deletes the old files. Compacted event files are sorted by kind, then
//! time, in row groups of [`EVENTS_ROW_GROUP`] rows, so that a scan for state changes skips the
//! row groups of parts by their statistics.

mod compaction;
mod ledger;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use millrace_shared::sync::{RangeSet, SeqRange};
use polars::prelude::*;
use serde::{Deserialize, Serialize};

pub use ledger::EdgeLedger;

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
    /// The manifest has a line that is not the last and cannot be read.
    #[error("manifest line {line} is damaged: {reason}")]
    Manifest {
        /// 1-based line number.
        line: usize,
        /// Why.
        reason: String,
    },
}

impl DatasetError {
    /// Whether trying again may work (disk full, I/O trouble).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Io { .. })
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

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    /// Rows of one edge batch.
    Commit {
        id: u64,
        edge: String,
        seqs: Vec<SeqRange>,
        #[serde(default)]
        dropped: Vec<SeqRange>,
        files: Vec<DataFile>,
        received_ms: i64,
        /// `site/line/machine` of the machines in the batch.
        #[serde(default)]
        machines: Vec<String>,
    },
    /// Small files replaced by one (or, with nothing removed, files derived from others).
    Compact {
        id: u64,
        add: Vec<DataFile>,
        remove: Vec<String>,
    },
    /// The dataset's layout version from here on ([`FORMAT`]).
    Format { version: u32 },
}

/// Layout version: 2 added `part_counts`. A dataset of version 1 gets its rollup built from the
/// event files when it is opened.
pub const FORMAT: u32 = 2;

/// Rows per row group of compacted event files.
pub const EVENTS_ROW_GROUP: usize = 65_536;

const MINUTE_MS: i64 = 60_000;

#[derive(Debug, Default)]
struct State {
    format: u32,
    next_id: u64,
    files: BTreeMap<String, DataFile>,
    edges: BTreeMap<String, EdgeLedger>,
    machines: BTreeSet<String>,
}

/// The dataset. Methods block (file I/O, Polars): call them off the async runtime.
#[derive(Debug)]
pub struct Dataset {
    dir: PathBuf,
    state: Mutex<State>,
    manifest: Mutex<File>,
    /// fsync files and the manifest (off only for benchmarks of the code path).
    fsync: bool,
    /// Files a compaction replaced, kept on disk for [`RETIRE_AFTER`] so that queries that
    /// listed them before the compaction can still read them.
    retired: Mutex<Vec<(std::time::Instant, PathBuf)>>,
}

/// How long files replaced by a compaction stay on disk (a restart removes them at once:
/// they are not in the manifest).
pub const RETIRE_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

fn sync_dir(dir: &Path) -> Result<(), DatasetError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

impl Dataset {
    /// Opens (creating if needed) the dataset in `dir`, replays the manifest and removes files
    /// left by an interrupted commit or compaction.
    pub fn open(dir: &Path, fsync: bool) -> Result<Self, DatasetError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("manifest.log");
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut state = State::default();
        let mut good_len = 0u64;
        let mut lines = BufReader::new(&file).lines().enumerate().peekable();
        while let Some((i, line)) = lines.next() {
            let line = line.map_err(io(&path))?;
            match serde_json::from_str::<Record>(&line) {
                Ok(r) => {
                    Self::apply(&mut state, r);
                    good_len += line.len() as u64 + 1;
                }
                Err(e) if lines.peek().is_none() => {
                    tracing::warn!(line = i + 1, error = %e, "manifest ends with a torn line (interrupted commit); cutting it off");
                }
                Err(e) => {
                    return Err(DatasetError::Manifest {
                        line: i + 1,
                        reason: e.to_string(),
                    });
                }
            }
        }
        if file.metadata().map_err(io(&path))?.len() != good_len {
            file.set_len(good_len).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        file.seek(std::io::SeekFrom::End(0)).map_err(io(&path))?;
        let ds = Self {
            dir: dir.to_owned(),
            state: Mutex::new(state),
            manifest: Mutex::new(file),
            fsync,
            retired: Mutex::new(vec![]),
        };
        ds.remove_orphans()?;
        ds.upgrade()?;
        Ok(ds)
    }

    fn next_id(&self) -> u64 {
        let mut s = self.state.lock().expect("state lock");
        let id = s.next_id;
        s.next_id += 1;
        id
    }

    fn apply(state: &mut State, r: Record) {
        match r {
            Record::Commit {
                id,
                edge,
                seqs,
                dropped,
                files,
                received_ms,
                machines,
            } => {
                state.next_id = state.next_id.max(id + 1);
                state.machines.extend(machines);
                let ledger = state.edges.entry(edge).or_default();
                for (a, b) in seqs {
                    ledger.received.insert(a, b);
                }
                for (a, b) in dropped {
                    ledger.dropped.insert(a, b);
                }
                ledger.batches += 1;
                ledger.last_commit_ms = Some(received_ms);
                for f in files {
                    state.files.insert(f.path.clone(), f);
                }
            }
            Record::Compact { id, add, remove } => {
                state.next_id = state.next_id.max(id + 1);
                for p in remove {
                    state.files.remove(&p);
                }
                for f in add {
                    state.files.insert(f.path.clone(), f);
                }
            }
            Record::Format { version } => state.format = version,
        }
    }

    fn remove_orphans(&self) -> Result<(), DatasetError> {
        let known: BTreeSet<String> = self
            .state
            .lock()
            .expect("state lock")
            .files
            .keys()
            .cloned()
            .collect();
        let mut removed = 0;
        for table in Table::ALL {
            let root = self.dir.join(table.as_str());
            if !root.exists() {
                continue;
            }
            let mut stack = vec![root];
            while let Some(d) = stack.pop() {
                for entry in std::fs::read_dir(&d).map_err(io(&d))? {
                    let p = entry.map_err(io(&d))?.path();
                    if p.is_dir() {
                        stack.push(p);
                        continue;
                    }
                    let rel = p
                        .strip_prefix(&self.dir)
                        .expect("under the data dir")
                        .to_string_lossy()
                        .into_owned();
                    if !known.contains(&rel) {
                        std::fs::remove_file(&p).map_err(io(&p))?;
                        removed += 1;
                    }
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed files of interrupted commits or compactions"
            );
        }
        Ok(())
    }

    /// The ledger of every edge.
    pub fn edges(&self) -> BTreeMap<String, EdgeLedger> {
        self.state.lock().expect("state lock").edges.clone()
    }

    /// Every machine (`site/line/machine`) that sent data.
    pub fn machines(&self) -> BTreeSet<String> {
        self.state.lock().expect("state lock").machines.clone()
    }

    /// Absolute paths of a table's files, optionally only of some dates (inclusive range) and sites.
    pub fn files(
        &self,
        table: Table,
        dates: Option<(&str, &str)>,
        sites: Option<&[String]>,
    ) -> Vec<PathBuf> {
        self.state
            .lock()
            .expect("state lock")
            .files
            .values()
            .filter(|f| f.table == table)
            .filter(|f| dates.is_none_or(|(a, b)| f.date.as_str() >= a && f.date.as_str() <= b))
            .filter(|f| sites.is_none_or(|s| s.contains(&f.site)))
            .map(|f| self.dir.join(&f.path))
            .collect()
    }

    /// Number of files and rows per table.
    pub fn sizes(&self) -> BTreeMap<Table, (u64, u64)> {
        let mut out = BTreeMap::new();
        for f in self.state.lock().expect("state lock").files.values() {
            let e = out.entry(f.table).or_insert((0, 0));
            e.0 += 1;
            e.1 += f.rows;
        }
        out
    }

    /// Starts the commit of one batch from `edge`. The commit holds the dataset's commit lock
    /// until it is finished or dropped: the duplicate check and the manifest append of two
    /// batches must not interleave.
    pub(crate) fn begin_commit<'a>(&'a self, edge: &'a str) -> Commit<'a> {
        let manifest = self.manifest.lock().expect("manifest lock");
        let id = self.state.lock().expect("state lock").next_id;
        Commit {
            ds: self,
            manifest,
            id,
            edge,
            files: vec![],
        }
    }

    /// Appends one line to the manifest. When the append fails (a full disk, an I/O error) the
    /// manifest is cut back to where it was: a torn or unsynced line must not stay in front of
    /// the next commit's, nor count as committed after a restart when the edge was told it was
    /// not (it sends the batch again).
    fn append(&self, manifest: &mut File, record: &Record) -> Result<(), DatasetError> {
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        let path = self.dir.join("manifest.log");
        let before = manifest.metadata().map_err(io(&path))?.len();
        let appended = manifest.write_all(&line).and_then(|()| {
            if self.fsync {
                manifest.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = appended {
            if let Err(cut) = manifest.set_len(before).and_then(|()| manifest.sync_data()) {
                tracing::error!(error = %cut, manifest = %path.display(), "cannot cut a failed append off the manifest; the next start cuts a torn last line");
            }
            return Err(io(&path)(e));
        }
        Ok(())
    }

    /// Writes `df` to `rel` atomically: temp file, fsync, rename, fsync of the directory.
    fn write_file(&self, rel: &str, df: &mut DataFrame) -> Result<(), DatasetError> {
        let path = self.dir.join(rel);
        let dir = path.parent().expect("files live in partitions");
        let new_dir = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tmp = path.with_extension("parquet.tmp");
        let written = self.write_tmp(rel, &tmp, df);
        if written.is_err() {
            // A full disk must not stay full of half-written files.
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        if self.fsync {
            sync_dir(dir)?;
            if new_dir {
                // The partition directories themselves must survive a crash too.
                let mut d = dir.parent();
                while let Some(p) = d {
                    sync_dir(p)?;
                    if p == self.dir {
                        break;
                    }
                    d = p.parent();
                }
            }
        }
        Ok(())
    }

    /// Writes `df` as Parquet to `tmp` and makes it durable.
    fn write_tmp(&self, rel: &str, tmp: &Path, df: &mut DataFrame) -> Result<(), DatasetError> {
        let f = File::create(tmp).map_err(io(tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        ParquetWriter::new(&mut w)
            .with_compression(ParquetCompression::Zstd(None))
            .with_row_group_size(
                rel.starts_with(Table::Events.as_str())
                    .then_some(EVENTS_ROW_GROUP),
            )
            .finish(df)?;
        let f = w.into_inner().map_err(|e| io(tmp)(e.into_error()))?;
        if self.fsync {
            f.sync_all().map_err(io(tmp))?;
        }
        Ok(())
    }
}

/// One edge batch being committed ([`Dataset::begin_commit`]): its files are written one by one
/// ([`Commit::write`]), then one manifest line names them all ([`Commit::finish`]), the commit
/// point. A commit dropped before it finishes (a failed write, a full disk) removes the files it
/// wrote; any that a crash leaves behind no manifest line names, and the next start removes
/// them.
#[derive(Debug)]
pub(crate) struct Commit<'a> {
    ds: &'a Dataset,
    manifest: MutexGuard<'a, File>,
    id: u64,
    edge: &'a str,
    files: Vec<DataFile>,
}

impl Commit<'_> {
    /// Runs `f` on the outbox sequence numbers of this edge the dataset holds already.
    pub(crate) fn with_held<R>(&self, f: impl FnOnce(Option<&RangeSet>) -> R) -> R {
        let state = self.ds.state.lock().expect("state lock");
        f(state.edges.get(self.edge).map(|l| &l.received))
    }

    /// Writes the batch's rows of one partition (`date` as `YYYY-MM-DD`) as a new file.
    pub(crate) fn write(
        &mut self,
        table: Table,
        date: String,
        site: &str,
        df: &mut DataFrame,
    ) -> Result<(), DatasetError> {
        let rel = format!(
            "{}/date={date}/site={site}/{:012}-{}.parquet",
            table.as_str(),
            self.id,
            self.edge
        );
        if table == Table::PartCounts {
            part_counts_schema(df)?;
        }
        let rows = df.height() as u64;
        self.ds.write_file(&rel, df)?;
        self.files.push(DataFile {
            path: rel,
            table,
            date,
            site: site.to_owned(),
            rows,
        });
        Ok(())
    }

    /// Commits: appends (and fsyncs) the manifest line naming the files written, the outbox
    /// sequence numbers they hold (`seqs`), the ranges the edge reported dropped and the
    /// machines (`site/line/machine`) the batch had rows of.
    pub(crate) fn finish(
        mut self,
        seqs: &RangeSet,
        dropped: &[SeqRange],
        machines: Vec<String>,
        received_ms: i64,
    ) -> Result<(), DatasetError> {
        let record = Record::Commit {
            id: self.id,
            edge: self.edge.to_owned(),
            seqs: seqs.ranges().to_vec(),
            dropped: dropped.to_vec(),
            files: std::mem::take(&mut self.files),
            received_ms,
            machines,
        };
        if let Err(e) = self.ds.append(&mut self.manifest, &record) {
            // Named by no line: `drop` removes them.
            let Record::Commit { files, .. } = record else {
                unreachable!("built above")
            };
            self.files = files;
            return Err(e);
        }
        Dataset::apply(&mut self.ds.state.lock().expect("state lock"), record);
        Ok(())
    }
}

impl Drop for Commit<'_> {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(self.ds.dir.join(&f.path));
        }
    }
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
