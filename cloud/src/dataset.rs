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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use millrace_shared::sync::{RangeSet, SeqRange, SyncAck, SyncItem};
use millrace_shared::{EventBody, PartOutcome};
use polars::prelude::*;
use serde::{Deserialize, Serialize};

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
}

impl Table {
    /// Both tables.
    pub const ALL: [Table; 3] = [Table::Telemetry, Table::Events, Table::PartCounts];

    /// Directory name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Telemetry => "telemetry",
            Self::Events => "events",
            Self::PartCounts => "part_counts",
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
const DAY_MS: i64 = 86_400_000;

/// What the cloud holds of one edge.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EdgeLedger {
    /// Outbox sequence numbers held.
    pub received: RangeSet,
    /// Sequence numbers the edge reported dropped under its quota.
    pub dropped: RangeSet,
    /// Batches committed.
    pub batches: u64,
    /// Unix ms of the last commit.
    pub last_commit_ms: Option<i64>,
}

impl EdgeLedger {
    /// Items held.
    pub fn items(&self) -> u64 {
        self.received.len()
    }

    /// Items the edge dropped under its quota (reported ranges minus what arrived anyway: the
    /// edge reports a lane's dropped seqs as ranges that may span the other lane's items).
    pub fn dropped_items(&self) -> u64 {
        self.dropped.len() - self.dropped.intersection_len(&self.received)
    }

    /// Holes in the received sequence that the edge did not report as dropped.
    pub fn gaps(&self) -> Vec<SeqRange> {
        let mut out = vec![];
        for (a, b) in self.received.gaps() {
            // Subtract dropped ranges from [a, b].
            let mut lo = a;
            for &(da, db) in self.dropped.ranges() {
                if db < lo || da > b {
                    continue;
                }
                if da > lo {
                    out.push((lo, da - 1));
                }
                lo = db.saturating_add(1);
                if lo > b {
                    break;
                }
            }
            if lo <= b {
                out.push((lo, b));
            }
        }
        out
    }
}

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

/// Rows of one batch for one partition, borrowing the batch's strings (no copy per row).
#[derive(Default)]
struct Rows<'a> {
    edge: &'a str,
    oseq: Vec<u64>,
    line: Vec<&'a str>,
    machine: Vec<&'a str>,
    ts: Vec<i64>,
    dseq: Vec<u64>,
    backfill: Vec<bool>,
    // telemetry
    metric: Vec<&'a str>,
    unit: Vec<&'a str>,
    value: Vec<f64>,
    // events
    kind: Vec<&'static str>,
    state: Vec<Option<String>>,
    reason: Vec<Option<String>>,
    outcome: Vec<Option<String>>,
    cycle_time_ms: Vec<Option<u32>>,
    part_id: Vec<Option<&'a str>>,
    action: Vec<Option<String>>,
    operator: Vec<Option<&'a str>>,
}

fn enum_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

impl<'a> Rows<'a> {
    fn common(&mut self, edge: &'a str, it: &'a SyncItem) {
        self.edge = edge;
        self.oseq.push(it.seq);
        self.line.push(&it.event.machine.line);
        self.machine.push(&it.event.machine.machine);
        self.ts.push(it.event.ts_ms);
        self.dseq.push(it.event.seq);
        self.backfill.push(it.backfill);
    }

    fn len(&self) -> usize {
        self.oseq.len()
    }

    fn frame(self, table: Table, site: &str, received_ms: i64) -> PolarsResult<DataFrame> {
        let n = self.len();
        let ts = Column::new("ts".into(), self.ts)
            .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?;
        let received = Column::new("received_at".into(), vec![received_ms; n])
            .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?;
        let mut cols = vec![
            Column::new("site".into(), vec![site; n]),
            Column::new("line".into(), self.line),
            Column::new("machine".into(), self.machine),
            ts,
            Column::new("device_seq".into(), self.dseq),
        ];
        match table {
            Table::Telemetry => cols.extend([
                Column::new("metric".into(), self.metric),
                Column::new("unit".into(), self.unit),
                Column::new("value".into(), self.value),
            ]),
            Table::PartCounts => unreachable!("part counts are not built from rows"),
            Table::Events => cols.extend([
                Column::new("kind".into(), self.kind),
                Column::new("state".into(), self.state),
                Column::new("reason".into(), self.reason),
                Column::new("outcome".into(), self.outcome),
                Column::new("cycle_time_ms".into(), self.cycle_time_ms),
                Column::new("part_id".into(), self.part_id),
                Column::new("action".into(), self.action),
                Column::new("operator".into(), self.operator),
            ]),
        }
        cols.extend([
            Column::new("edge".into(), vec![self.edge; n]),
            Column::new("outbox_seq".into(), self.oseq),
            Column::new("backfill".into(), self.backfill),
            received,
        ]);
        DataFrame::new(n, cols)
    }
}

fn date_of(ts_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ts_ms)
        .map_or_else(|| "invalid".into(), |d| d.format("%Y-%m-%d").to_string())
}

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

    /// Brings a dataset of an older layout to [`FORMAT`]: builds the part counts of every
    /// partition from its event files (once; progress is logged per partition).
    fn upgrade(&self) -> Result<(), DatasetError> {
        let (format, partitions) = {
            let s = self.state.lock().expect("state lock");
            let mut g: BTreeMap<(String, String), Vec<PathBuf>> = BTreeMap::new();
            for f in s.files.values().filter(|f| f.table == Table::Events) {
                g.entry((f.date.clone(), f.site.clone()))
                    .or_default()
                    .push(self.dir.join(&f.path));
            }
            (s.format, g)
        };
        if format >= FORMAT {
            return Ok(());
        }
        let mut manifest = self.manifest.lock().expect("manifest lock");
        if !partitions.is_empty() {
            tracing::info!(
                partitions = partitions.len(),
                "dataset of layout {format}: building the part counts from the event files"
            );
        }
        let n = partitions.len();
        for (i, ((date, site), paths)) in partitions.into_iter().enumerate() {
            let mut df = count_parts(scan_files(&paths)?, true).collect()?;
            let df = part_counts_schema(&mut df)?;
            let id = self.next_id();
            let rel = format!(
                "{}/date={date}/site={site}/{id:012}-upgrade.parquet",
                Table::PartCounts.as_str()
            );
            let rows = df.height() as u64;
            self.write_file(&rel, df)?;
            let record = Record::Compact {
                id,
                add: vec![DataFile {
                    path: rel,
                    table: Table::PartCounts,
                    date,
                    site,
                    rows,
                }],
                remove: vec![],
            };
            self.append(&mut manifest, &record)?;
            Self::apply(&mut self.state.lock().expect("state lock"), record);
            tracing::info!(partition = i + 1, of = n, "part counts built");
        }
        let record = Record::Format { version: FORMAT };
        self.append(&mut manifest, &record)?;
        Self::apply(&mut self.state.lock().expect("state lock"), record);
        Ok(())
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

    /// Stores a batch from `edge` durably; items already held are skipped and counted.
    pub fn commit(
        &self,
        edge: &str,
        items: &[SyncItem],
        dropped: &[SeqRange],
        received_ms: i64,
    ) -> Result<SyncAck, DatasetError> {
        // One commit at a time: the duplicate check and the manifest append must not interleave.
        let mut manifest = self.manifest.lock().expect("manifest lock");
        let (id, fresh, duplicates) = {
            let state = self.state.lock().expect("state lock");
            let held = state.edges.get(edge).map(|l| &l.received);
            let mut seen = std::collections::HashSet::new();
            let (mut fresh, mut dup) = (vec![], 0u64);
            for it in items {
                if held.is_some_and(|h| h.contains(it.seq)) || !seen.insert(it.seq) {
                    dup += 1;
                } else {
                    fresh.push(it);
                }
            }
            (state.next_id, fresh, dup)
        };
        let mut parts: HashMap<(Table, String, &str), Rows<'_>> = HashMap::new();
        type CountKey<'b> = (&'b str, &'b str, &'b str, i64);
        // By day (days since 1970), then machine and minute.
        let mut counts: BTreeMap<i64, BTreeMap<CountKey<'_>, [u64; 3]>> = BTreeMap::new();
        let mut points = 0u64;
        for it in &fresh {
            let e = &it.event;
            let date = date_of(e.ts_ms);
            match &e.body {
                EventBody::Telemetry(t) => {
                    let rows = parts
                        .entry((Table::Telemetry, date, e.machine.site.as_str()))
                        .or_default();
                    for r in &t.readings {
                        rows.common(edge, it);
                        rows.metric.push(&r.name);
                        rows.unit.push(&r.unit);
                        rows.value.push(r.value);
                        points += 1;
                    }
                }
                body => {
                    let rows = parts
                        .entry((Table::Events, date, e.machine.site.as_str()))
                        .or_default();
                    rows.common(edge, it);
                    rows.kind.push(body.kind().as_str());
                    let (mut st, mut rs, mut oc, mut ct, mut pi, mut ac, mut op) =
                        (None, None, None, None, None, None, None);
                    match body {
                        EventBody::State(s) => {
                            st = Some(enum_name(&s.state));
                            rs = s.reason.as_ref().map(enum_name);
                        }
                        EventBody::Part(p) => {
                            let minute = e.ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
                            let c = counts
                                .entry(minute.div_euclid(DAY_MS))
                                .or_default()
                                .entry((
                                    &e.machine.site,
                                    &e.machine.line,
                                    &e.machine.machine,
                                    minute,
                                ))
                                .or_default();
                            c[match p.outcome {
                                PartOutcome::Good => 0,
                                PartOutcome::Scrap => 1,
                                PartOutcome::Rework => 2,
                            }] += 1;
                            oc = Some(enum_name(&p.outcome));
                            ct = Some(p.cycle_time_ms);
                            pi = p.part_id.as_deref();
                        }
                        EventBody::Operator(o) => {
                            ac = Some(enum_name(&o.action));
                            op = Some(o.operator.as_str());
                        }
                        EventBody::Telemetry(_) => unreachable!("handled above"),
                    }
                    rows.state.push(st);
                    rows.reason.push(rs);
                    rows.outcome.push(oc);
                    rows.cycle_time_ms.push(ct);
                    rows.part_id.push(pi);
                    rows.action.push(ac);
                    rows.operator.push(op);
                }
            }
        }
        let mut files = vec![];
        for ((table, date, site), rows) in parts {
            let rel = format!(
                "{}/date={date}/site={site}/{id:012}-{edge}.parquet",
                table.as_str()
            );
            let n = rows.len() as u64;
            let mut df = rows.frame(table, site, received_ms)?;
            self.write_file(&rel, &mut df)?;
            files.push(DataFile {
                path: rel,
                table,
                date,
                site: site.to_owned(),
                rows: n,
            });
        }
        for (day, by_key) in counts {
            let date = date_of(day * DAY_MS);
            let mut by_site: BTreeMap<&str, Vec<(&CountKey<'_>, &[u64; 3])>> = BTreeMap::new();
            for (k, c) in &by_key {
                by_site.entry(k.0).or_default().push((k, c));
            }
            for (site, rows) in by_site {
                let rel = format!(
                    "{}/date={date}/site={site}/{id:012}-{edge}.parquet",
                    Table::PartCounts.as_str()
                );
                let col_u = |name: &str, i: usize| {
                    Column::new(
                        name.into(),
                        rows.iter().map(|r| r.1[i]).collect::<Vec<u64>>(),
                    )
                };
                let mut df = DataFrame::new(
                    rows.len(),
                    vec![
                        Column::new("site".into(), vec![site; rows.len()]),
                        Column::new(
                            "line".into(),
                            rows.iter().map(|r| r.0.1).collect::<Vec<_>>(),
                        ),
                        Column::new(
                            "machine".into(),
                            rows.iter().map(|r| r.0.2).collect::<Vec<_>>(),
                        ),
                        Column::new(
                            "minute".into(),
                            rows.iter().map(|r| r.0.3).collect::<Vec<_>>(),
                        ),
                        col_u("good", 0),
                        col_u("scrap", 1),
                        col_u("rework", 2),
                    ],
                )?;
                let df = part_counts_schema(&mut df)?;
                self.write_file(&rel, df)?;
                files.push(DataFile {
                    path: rel,
                    table: Table::PartCounts,
                    date: date.clone(),
                    site: site.to_owned(),
                    rows: rows.len() as u64,
                });
            }
        }
        let mut seqs = RangeSet::default();
        seqs.extend(fresh.iter().map(|it| it.seq));
        let machines: BTreeSet<String> = fresh
            .iter()
            .map(|it| it.event.machine.to_string())
            .collect();
        let record = Record::Commit {
            id,
            edge: edge.to_owned(),
            seqs: seqs.ranges().to_vec(),
            dropped: dropped.to_vec(),
            files,
            received_ms,
            machines: machines.into_iter().collect(),
        };
        self.append(&mut manifest, &record)?;
        Self::apply(&mut self.state.lock().expect("state lock"), record);
        Ok(SyncAck {
            stored: fresh.len() as u64,
            duplicates,
            points,
        })
    }

    fn append(&self, manifest: &mut File, record: &Record) -> Result<(), DatasetError> {
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        let path = self.dir.join("manifest.log");
        manifest.write_all(&line).map_err(io(&path))?;
        if self.fsync {
            manifest.sync_data().map_err(io(&path))?;
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
        let f = File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        ParquetWriter::new(&mut w)
            .with_compression(ParquetCompression::Zstd(None))
            .with_row_group_size(rel.starts_with("events/").then_some(EVENTS_ROW_GROUP))
            .finish(df)?;
        let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        if self.fsync {
            f.sync_all().map_err(io(&tmp))?;
        }
        drop(f);
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

    /// Rewrites partitions with more than `min_files` files into one file each. Returns the
    /// files removed.
    pub fn compact(&self, min_files: usize) -> Result<usize, DatasetError> {
        let groups: Vec<((Table, String, String), Vec<DataFile>)> = {
            let state = self.state.lock().expect("state lock");
            let mut g: BTreeMap<(Table, String, String), Vec<DataFile>> = BTreeMap::new();
            for f in state.files.values() {
                g.entry((f.table, f.date.clone(), f.site.clone()))
                    .or_default()
                    .push(f.clone());
            }
            g.into_iter()
                .filter(|(_, v)| v.len() >= min_files.max(2))
                .collect()
        };
        let mut removed = 0;
        for ((table, date, site), old) in groups {
            let paths: Vec<PathBuf> = old.iter().map(|f| self.dir.join(&f.path)).collect();
            let mut df = match table {
                Table::Telemetry => {
                    read_files(&paths)?.sort(["ts"], SortMultipleOptions::default())?
                }
                Table::Events => read_files(&paths)?.sort(
                    ["kind", "ts"],
                    SortMultipleOptions::default().with_maintain_order(true),
                )?,
                // Commits may count the same minute (a batch ends mid-minute): sum them.
                Table::PartCounts => scan_files(&paths)?
                    .group_by([col("site"), col("line"), col("machine"), col("minute")])
                    .agg([col("good").sum(), col("scrap").sum(), col("rework").sum()])
                    .sort(
                        ["site", "line", "machine", "minute"],
                        SortMultipleOptions::default(),
                    )
                    .collect()?,
            };
            if table == Table::PartCounts {
                part_counts_schema(&mut df)?;
            }
            let mut manifest = self.manifest.lock().expect("manifest lock");
            let id = self.next_id();
            let rel = format!(
                "{}/date={date}/site={site}/{id:012}-compacted.parquet",
                table.as_str()
            );
            let rows = df.height() as u64;
            self.write_file(&rel, &mut df)?;
            let record = Record::Compact {
                id,
                add: vec![DataFile {
                    path: rel,
                    table,
                    date,
                    site,
                    rows,
                }],
                remove: old.iter().map(|f| f.path.clone()).collect(),
            };
            self.append(&mut manifest, &record)?;
            Self::apply(&mut self.state.lock().expect("state lock"), record);
            drop(manifest);
            let now = std::time::Instant::now();
            self.retired
                .lock()
                .expect("retired lock")
                .extend(paths.into_iter().map(|p| (now, p)));
            removed += old.len();
        }
        Ok(removed)
    }

    /// Deletes files that compactions replaced at least `after` ago. Returns how many.
    pub fn remove_retired(&self, after: std::time::Duration) -> usize {
        let due: Vec<PathBuf> = {
            let mut r = self.retired.lock().expect("retired lock");
            let (due, keep) = r.drain(..).partition(|(t, _)| t.elapsed() >= after);
            *r = keep;
            due.into_iter().map(|(_, p)| p).collect()
        };
        for p in &due {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "could not remove a compacted file; it will be removed at the next start");
            }
        }
        due.len()
    }
}

/// Good, scrap and rework parts per machine and minute from event rows (columns `site`, `line`,
/// `machine`, `minute` as Unix ms, counts as `i64`), sorted by machine, then minute: the
/// part-counts rollup of those rows. With `per_minute` false, `minute` is each part's own time.
pub fn count_parts(events: LazyFrame, per_minute: bool) -> LazyFrame {
    let ts = col("ts").cast(DataType::Int64);
    let minute = if per_minute {
        (ts / lit(MINUTE_MS)) * lit(MINUTE_MS)
    } else {
        ts
    };
    let count = |outcome: &str| {
        col("outcome")
            .eq(lit(outcome))
            .sum()
            .cast(DataType::Int64)
            .alias(outcome)
    };
    events
        .filter(col("kind").eq(lit("part")))
        .with_column(minute.alias("minute"))
        .group_by([col("site"), col("line"), col("machine"), col("minute")])
        .agg([count("good"), count("scrap"), count("rework")])
        .sort(
            ["site", "line", "machine", "minute"],
            SortMultipleOptions::default(),
        )
}

/// The column types of a part-counts file: `minute` a timestamp, counts `u32`.
fn part_counts_schema(df: &mut DataFrame) -> PolarsResult<&mut DataFrame> {
    let minute = df
        .column("minute")?
        .cast(&DataType::Int64)?
        .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?;
    df.with_column(minute)?;
    for c in ["good", "scrap", "rework"] {
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
