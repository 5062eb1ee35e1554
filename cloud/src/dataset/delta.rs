//! The dataset's Delta tables: opening (and converting an old dataset), the snapshot view that
//! readers and the duplicate check use, and the commit of an edge batch.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::Instant;

use deltalake_core::DeltaTable;
use deltalake_core::kernel::transaction::{CommitBuilder, CommitProperties, TransactionError};
use deltalake_core::kernel::{Action, Add, DataType as DeltaType, PrimitiveType, Transaction};
use deltalake_core::operations::create::CreateBuilder;
use deltalake_core::protocol::{DeltaOperation, SaveMode};
use millrace_shared::sync::{RangeSet, SeqRange};
use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::legacy::{MANIFEST, Manifest};
use super::storage::Storage;
use super::{
    DataFile, DatasetError, EdgeLedger, Table, count_parts, io, part_counts_schema, scan_files,
    write_file,
};
use crate::config::StorageConfig;
use crate::schema::alerts;

/// The table of stored batches: one row per batch, the ledger in its files' tags.
pub(super) const BATCHES: &str = "sync_batches";

/// How long a table on the local disk keeps its log entries (Delta's default: 30 days). There is
/// an entry per commit, and delta-rs lists the log directory at every commit, which on a local
/// disk costs O(entries) (an S3 listing starts after a key); entries this old go when a
/// checkpoint is written. Readers of the current snapshot are not affected.
const LOCAL_LOG_RETENTION_HOURS: u64 = 1;

/// [`LOCAL_LOG_RETENTION_HOURS`] as a Delta table property value.
fn local_log_retention() -> String {
    format!("interval {LOCAL_LOG_RETENTION_HOURS} hours")
}

/// The tag of an `add` action that says which outbox sequence numbers its table holds.
const LEDGER_TAG: &str = "millrace.ledger";

/// Delta's application transaction id of an edge's batches.
fn app_id(edge: &str) -> String {
    format!("millrace-sync/{edge}")
}

/// What one file's tag says about one edge.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct EdgeTag {
    /// Outbox sequence numbers the file's table holds (this file's rows among them).
    #[serde(rename = "r", default, skip_serializing_if = "Vec::is_empty")]
    pub(super) received: Vec<SeqRange>,
    /// Ranges the edge reported dropped (`sync_batches` only).
    #[serde(rename = "d", default, skip_serializing_if = "Vec::is_empty")]
    pub(super) dropped: Vec<SeqRange>,
    /// Batches stored (`sync_batches` only).
    #[serde(rename = "b", default)]
    pub(super) batches: u64,
    /// When the last of them was received, Unix ms (`sync_batches` only).
    #[serde(rename = "t", default, skip_serializing_if = "Option::is_none")]
    pub(super) last_ms: Option<i64>,
    /// Machines (`site/line/machine`) the batches had rows of (`sync_batches` only).
    #[serde(rename = "m", default, skip_serializing_if = "Vec::is_empty")]
    pub(super) machines: Vec<String>,
}

/// A file's ledger tag: per edge.
pub(super) type LedgerTag = BTreeMap<String, EdgeTag>;

/// Merges ledger tags (compaction: the new file holds what the old ones held).
pub(super) fn merge_tags<'a>(tags: impl IntoIterator<Item = &'a LedgerTag>) -> LedgerTag {
    /// Received, dropped, batches, last received, machines.
    type Merged = (
        Vec<SeqRange>,
        Vec<SeqRange>,
        u64,
        Option<i64>,
        BTreeSet<String>,
    );
    let mut out: BTreeMap<String, Merged> = BTreeMap::new();
    for tag in tags {
        for (edge, t) in tag {
            let e = out.entry(edge.clone()).or_default();
            e.0.extend_from_slice(&t.received);
            e.1.extend_from_slice(&t.dropped);
            e.2 += t.batches;
            e.3 = e.3.max(t.last_ms);
            e.4.extend(t.machines.iter().cloned());
        }
    }
    let set = |ranges: Vec<SeqRange>| {
        let mut s = RangeSet::default();
        s.insert_all(ranges);
        s.ranges().to_vec()
    };
    out.into_iter()
        .map(|(edge, (r, d, b, t, m))| {
            let tag = EdgeTag {
                received: set(r),
                dropped: set(d),
                batches: b,
                last_ms: t,
                machines: m.into_iter().collect(),
            };
            (edge, tag)
        })
        .collect()
}

/// One file of a table's current snapshot.
#[derive(Debug, Clone)]
pub(super) struct FileView {
    pub(super) file: DataFile,
    /// Path relative to the table's root (as in the Delta log).
    pub(super) rel: String,
    pub(super) size: i64,
    pub(super) tag: Option<LedgerTag>,
}

/// A table's current snapshot, as the dataset uses it.
#[derive(Debug, Clone, Default)]
struct TableView {
    /// The table version it shows (`None`: no table yet).
    version: Option<u64>,
    files: Vec<FileView>,
    /// Per edge: the sequence numbers this table holds.
    held: BTreeMap<String, RangeSet>,
}

/// A file's ledger tag, from its `add` action's tags.
fn tag_of(tags: Option<&HashMap<String, Option<String>>>) -> Option<LedgerTag> {
    tags.and_then(|t| t.get(LEDGER_TAG).cloned().flatten())
        .and_then(|s| serde_json::from_str(&s).ok())
}

impl FileView {
    /// The view of file `rel` of table `name` with its partition values (`value`).
    fn new(
        table: Option<Table>,
        name: &str,
        rel: String,
        value: impl Fn(&str) -> Option<String>,
        rows: u64,
        size: i64,
        tag: Option<LedgerTag>,
    ) -> Self {
        FileView {
            file: DataFile {
                path: format!("{name}/{rel}"),
                table: table.unwrap_or(Table::Telemetry),
                date: value("date").unwrap_or_default(),
                site: value("site").unwrap_or_else(|| alerts::NO_SITE.to_owned()),
                rows,
            },
            rel,
            size,
            tag,
        }
    }

    /// The view of a file that this node's commit adds.
    fn of_add(table: Option<Table>, name: &str, add: &Add) -> Self {
        #[derive(Deserialize)]
        struct Stats {
            #[serde(rename = "numRecords")]
            num_records: u64,
        }
        let rows = add
            .stats
            .as_deref()
            .and_then(|s| serde_json::from_str::<Stats>(s).ok())
            .map_or(0, |s| s.num_records);
        Self::new(
            table,
            name,
            add.path.clone(),
            |k| add.partition_values.get(k).cloned().flatten(),
            rows,
            add.size,
            tag_of(add.tags.as_ref()),
        )
    }
}

impl TableView {
    fn build(
        table: Option<Table>,
        name: &'static str,
        dt: &DeltaTable,
    ) -> Result<Self, DatasetError> {
        let snapshot = dt.snapshot().map_err(delta_err(name))?;
        let mut files = vec![];
        #[allow(deprecated)] // the add action's tags are not exposed otherwise
        for f in snapshot.log_data().iter() {
            let pv = f.partition_values_map();
            files.push(FileView::new(
                table,
                name,
                f.path().into_owned(),
                |k| pv.get(k).cloned().flatten(),
                f.num_records().unwrap_or(0) as u64,
                f.size(),
                tag_of(f.add_action().tags.as_ref()),
            ));
        }
        let mut view = TableView {
            version: dt.version(),
            ..Default::default()
        };
        view.add_files(files);
        Ok(view)
    }

    /// Adds files new in the table, and the sequence numbers their tags say it holds.
    fn add_files(&mut self, files: Vec<FileView>) {
        let mut per_edge: BTreeMap<&str, Vec<SeqRange>> = BTreeMap::new();
        for (edge, t) in files.iter().filter_map(|f| f.tag.as_ref()).flatten() {
            per_edge
                .entry(edge)
                .or_default()
                .extend_from_slice(&t.received);
        }
        for (edge, ranges) in per_edge {
            self.held
                .entry(edge.to_owned())
                .or_default()
                .insert_all(ranges);
        }
        self.files.extend(files);
    }
}

/// What readers see: every table's snapshot and the ledger of complete batches.
#[derive(Debug, Default)]
struct View {
    tables: BTreeMap<Table, TableView>,
    batches: TableView,
    edges: BTreeMap<String, EdgeLedger>,
    machines: BTreeSet<String>,
}

impl View {
    /// The ledger from every `sync_batches` file.
    fn fold_batches(&mut self) {
        self.edges.clear();
        self.machines.clear();
        let tags = merge_tags(self.batches.files.iter().filter_map(|f| f.tag.as_ref()));
        self.fold_in(tags);
    }

    /// Adds batches' tags (new `sync_batches` files) to the ledger.
    fn fold_in(&mut self, tags: LedgerTag) {
        for (edge, t) in tags {
            let l = self.edges.entry(edge).or_default();
            l.received.insert_all(t.received);
            l.dropped.insert_all(t.dropped);
            l.batches += t.batches;
            l.last_commit_ms = l.last_commit_ms.max(t.last_ms);
            self.machines.extend(t.machines);
        }
    }

    fn view_of(&self, name: &str) -> Option<&TableView> {
        if name == BATCHES {
            return Some(&self.batches);
        }
        Table::ALL
            .into_iter()
            .find(|t| t.as_str() == name)
            .and_then(|t| self.tables.get(&t))
    }

    fn view_of_mut(&mut self, name: &str) -> &mut TableView {
        match table_of(name) {
            Some(t) => self.tables.entry(t).or_default(),
            None => &mut self.batches,
        }
    }
}

/// Runs `f` on the dataset's runtime and waits for it; from a thread that is inside another
/// runtime (a caller that did not move the work off its async workers, or a test), on a
/// thread of its own, since a runtime cannot be blocked on from within one.
pub(super) fn block_on<F>(rt: &tokio::runtime::Runtime, f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(f))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    } else {
        rt.block_on(f)
    }
}

pub(super) fn delta_err(
    table: &'static str,
) -> impl Fn(deltalake_core::DeltaTableError) -> DatasetError {
    move |e| {
        use deltalake_core::DeltaTableError as E;
        let retryable = matches!(
            e,
            E::ObjectStore { .. } | E::Io { .. } | E::VersionAlreadyExists(_)
        ) || matches!(&e, E::Transaction { source } if matches!(source, TransactionError::MaxCommitAttempts(_) | TransactionError::ObjectStore { .. }));
        DatasetError::Delta {
            table,
            message: e.to_string(),
            retryable,
        }
    }
}

/// Every table's name, the ledger's last.
pub(super) const NAMES: [&str; 5] = [
    Table::Telemetry.as_str(),
    Table::Events.as_str(),
    Table::PartCounts.as_str(),
    Table::Alerts.as_str(),
    BATCHES,
];

fn table_of(name: &str) -> Option<Table> {
    Table::ALL.into_iter().find(|t| t.as_str() == name)
}

fn static_name(name: &str) -> &'static str {
    NAMES
        .into_iter()
        .find(|n| *n == name)
        .expect("a table name")
}

/// The dataset. Methods block (storage, Polars): call them off the async runtime.
pub struct Dataset {
    /// The local data directory: the tables (local storage) or the cache of their files.
    pub(super) dir: PathBuf,
    pub(super) storage: Storage,
    rt: Option<tokio::runtime::Runtime>,
    /// The Delta tables, by name (`None` until the first commit creates it).
    tables: BTreeMap<&'static str, Mutex<Option<DeltaTable>>>,
    view: RwLock<View>,
    /// One batch commit at a time on this node (the duplicate check and the commits of one
    /// batch must not interleave with another's; other nodes are kept apart by Delta).
    commit_lock: Mutex<()>,
    /// fsync files and log entries (off only for benchmarks of the code path).
    pub(super) fsync: bool,
    refreshed: Mutex<Instant>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("storage", &self.storage)
            .finish()
    }
}

impl Drop for Dataset {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Dataset {
    /// Opens (creating if needed) the dataset in `dir`; a dataset of the layout before Delta
    /// (`manifest.log`) is converted first, once.
    pub fn open(dir: &Path, fsync: bool) -> Result<Self, DatasetError> {
        Self::open_in(Storage::local(dir, fsync), fsync)
    }

    /// Opens the dataset where `storage` says: the local disk (`data_dir`, as [`Dataset::open`])
    /// or an S3 bucket, with the cache of read files in `data_dir/cache`. A bucket that cannot be
    /// listed (wrong credentials, no such bucket, no answer) is an error here.
    pub fn open_with(
        storage: &StorageConfig,
        data_dir: &Path,
        fsync: bool,
    ) -> Result<Self, DatasetError> {
        match storage.url {
            None => Self::open(data_dir, fsync),
            Some(_) => Self::open_in(Storage::s3(storage, &data_dir.join("cache"))?, fsync),
        }
    }

    fn open_in(storage: Storage, fsync: bool) -> Result<Self, DatasetError> {
        let dir = storage.dir.clone();
        let dir = dir.as_path();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dataset-io")
            .enable_all()
            .build()
            .map_err(io(dir))?;
        block_on(&rt, storage.check())?;
        let mut tables = BTreeMap::new();
        // The ledger first: every batch it names was committed to the data tables before its
        // row, so the data tables read after it hold at least what it says is complete.
        for name in NAMES.into_iter().rev() {
            let t = block_on(&rt, storage.load(name))?;
            tables.insert(name, Mutex::new(t));
        }
        let ds = Self {
            dir: dir.to_owned(),
            storage,
            rt: Some(rt),
            tables,
            view: RwLock::new(View::default()),
            commit_lock: Mutex::new(()),
            fsync,
            refreshed: Mutex::new(Instant::now()),
        };
        if ds.storage.is_local() {
            for name in NAMES {
                ds.keep_log_short(name)?;
            }
        }
        ds.rebuild_view()?;
        if ds.storage.is_local() && dir.join(MANIFEST).exists() {
            ds.migrate()?;
        }
        Ok(ds)
    }

    pub(super) fn block_on<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        block_on(self.rt.as_ref().expect("runtime until dropped"), f)
    }

    /// Enters the dataset's runtime (delta-rs builds its engine from the current runtime,
    /// also in synchronous calls).
    pub(super) fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.rt.as_ref().expect("runtime until dropped").enter()
    }

    fn table(&self, name: &str) -> MutexGuard<'_, Option<DeltaTable>> {
        self.tables[name].lock().expect("table lock")
    }

    /// Rebuilds the view of every table from its snapshot.
    fn rebuild_view(&self) -> Result<(), DatasetError> {
        let mut v = View::default();
        for name in NAMES {
            let t = self.table(name);
            let tv = match t.as_ref() {
                Some(dt) => TableView::build(table_of(name), static_name(name), dt)?,
                None => TableView::default(),
            };
            match table_of(name) {
                Some(table) => {
                    v.tables.insert(table, tv);
                }
                None => v.batches = tv,
            }
        }
        v.fold_batches();
        *self.view.write().expect("view lock") = v;
        Ok(())
    }

    /// Rebuilds one table's view after it changed.
    fn refresh_view(&self, name: &'static str, dt: &DeltaTable) -> Result<(), DatasetError> {
        let tv = TableView::build(table_of(name), name, dt)?;
        let mut v = self.view.write().expect("view lock");
        match table_of(name) {
            Some(t) => {
                v.tables.insert(t, tv);
            }
            None => {
                v.batches = tv;
                v.fold_batches();
            }
        }
        Ok(())
    }

    /// Sets [`LOCAL_LOG_RETENTION_HOURS`] on table `name` if it exists without it (a table created
    /// before it was set).
    fn keep_log_short(&self, name: &'static str) -> Result<(), DatasetError> {
        use deltalake_core::kernel::MetadataExt;
        use deltalake_core::table::config::TablePropertiesExt;
        let mut t = self.table(name);
        let Some(dt) = t.as_ref() else { return Ok(()) };
        let snapshot = dt.snapshot().map_err(delta_err(name))?;
        let key = deltalake_core::TableProperty::LogRetentionDuration.as_ref();
        let value = local_log_retention();
        if snapshot.table_config().log_retention_duration().as_secs()
            == LOCAL_LOG_RETENTION_HOURS * 3600
        {
            return Ok(());
        }
        let metadata = snapshot
            .metadata()
            .clone()
            .add_config_key(key.to_owned(), value.clone())
            .map_err(|e| delta_err(name)(e.into()))?;
        tracing::info!(
            table = name,
            retention = %value,
            "keeping the table's log short"
        );
        self.commit_actions(
            name,
            &mut t,
            vec![Action::Metadata(metadata)],
            None,
            DeltaOperation::SetTableProperties {
                properties: HashMap::from([(key.to_owned(), value)]),
            },
        )?;
        Ok(())
    }

    /// Adds this node's commit `version` of table `name`, which only added `files`, to the
    /// view if the view shows the version the commit read (`from`); `false` if it does not
    /// (rebuild it instead).
    fn apply_adds(
        &self,
        name: &'static str,
        from: Option<u64>,
        version: u64,
        files: Vec<FileView>,
    ) -> bool {
        let mut v = self.view.write().expect("view lock");
        let tv = v.view_of_mut(name);
        if tv.version != from {
            return false;
        }
        tv.version = Some(version);
        let tags =
            (name == BATCHES).then(|| merge_tags(files.iter().filter_map(|f| f.tag.as_ref())));
        tv.add_files(files);
        if let Some(tags) = tags {
            v.fold_in(tags);
        }
        true
    }

    /// Reads what other nodes committed since the last look (at most once per `max_age`);
    /// `true` if there was something new.
    pub fn refresh(&self, max_age: std::time::Duration) -> Result<bool, DatasetError> {
        {
            let mut at = self.refreshed.lock().expect("refresh lock");
            if at.elapsed() < max_age {
                return Ok(false);
            }
            *at = Instant::now();
        }
        let mut changed = false;
        // The ledger first (see `open_in`): a node never reports a batch complete whose rows
        // it cannot read yet.
        for name in NAMES.into_iter().rev() {
            changed |= self.catch_up(name, &mut self.table(name))?;
        }
        Ok(changed)
    }

    /// The ledger of every edge (batches complete in the dataset).
    pub fn edges(&self) -> BTreeMap<String, EdgeLedger> {
        self.view.read().expect("view lock").edges.clone()
    }

    /// Every machine (`site/line/machine`) that sent data.
    pub fn machines(&self) -> BTreeSet<String> {
        self.view.read().expect("view lock").machines.clone()
    }

    /// The current snapshot's files of a table, optionally only of some dates (inclusive
    /// range) and sites.
    pub(super) fn file_views(
        &self,
        table: Table,
        dates: Option<(&str, &str)>,
        sites: Option<&[String]>,
    ) -> Vec<FileView> {
        let v = self.view.read().expect("view lock");
        v.tables
            .get(&table)
            .map(|tv| {
                tv.files
                    .iter()
                    .filter(|f| {
                        dates.is_none_or(|(a, b)| {
                            f.file.date.as_str() >= a && f.file.date.as_str() <= b
                        })
                    })
                    .filter(|f| sites.is_none_or(|s| s.contains(&f.file.site)))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Paths (relative to the dataset's root) of every file of every table's current snapshot.
    pub(super) fn live_files(&self) -> BTreeSet<String> {
        let v = self.view.read().expect("view lock");
        v.tables
            .values()
            .chain([&v.batches])
            .flat_map(|tv| tv.files.iter().map(|f| f.file.path.clone()))
            .collect()
    }

    /// Reads table `name`'s commits since this node last did (a table another node created
    /// included) and updates the view; the caller holds the table. `true` if there were any.
    pub(super) fn catch_up(
        &self,
        name: &'static str,
        t: &mut MutexGuard<'_, Option<DeltaTable>>,
    ) -> Result<bool, DatasetError> {
        let before = t.as_ref().and_then(DeltaTable::version);
        match t.as_mut() {
            Some(dt) => self.block_on(dt.update_state()).map_err(delta_err(name))?,
            None => **t = self.block_on(self.storage.load(name))?,
        }
        let Some(dt) = t.as_ref().filter(|dt| dt.version() != before) else {
            return Ok(false);
        };
        self.refresh_view(name, dt)?;
        Ok(true)
    }

    /// Whether table `name`'s current snapshot (as this node last read it) names every file of
    /// `rels` (paths relative to the table).
    pub(super) fn holds_files<'a>(
        &self,
        name: &str,
        rels: impl IntoIterator<Item = &'a str>,
    ) -> bool {
        let v = self.view.read().expect("view lock");
        let Some(tv) = v.view_of(name) else {
            return false;
        };
        let live: std::collections::HashSet<&str> =
            tv.files.iter().map(|f| f.rel.as_str()).collect();
        rels.into_iter().all(|r| live.contains(r))
    }

    /// The current snapshot's files of `sync_batches`.
    pub(super) fn batch_file_views(&self) -> Vec<FileView> {
        self.view.read().expect("view lock").batches.files.clone()
    }

    /// Deletes the files of table `name` that its snapshot does not name: once a compaction's
    /// tombstone is older than `after` (readers of an older snapshot are done), or, for files
    /// no commit ever named (a failed or interrupted commit, here or on another node), once
    /// the file is older than `after`. Returns how many.
    pub(super) fn vacuum(
        &self,
        name: &'static str,
        after: std::time::Duration,
    ) -> Result<usize, DatasetError> {
        use futures_util::TryStreamExt;
        use object_store::ObjectStoreExt;
        let _rt = self.enter();
        let t = self.table(name);
        let Some(dt) = t.as_ref() else { return Ok(0) };
        let snapshot = dt.snapshot().map_err(delta_err(name))?;
        let now = chrono::Utc::now().timestamp_millis();
        let cutoff = now - after.as_millis() as i64;
        let live: BTreeSet<String> = snapshot
            .log_data()
            .iter()
            .map(|f| f.path().into_owned())
            .collect();
        let log_store = dt.log_store();
        let young_tombstones: BTreeSet<String> = self
            .block_on(
                snapshot
                    .all_tombstones(log_store.as_ref())
                    .try_collect::<Vec<_>>(),
            )
            .map_err(delta_err(name))?
            .into_iter()
            .filter(|r| r.deletion_timestamp().unwrap_or(now) > cutoff)
            .map(|r| r.path().into_owned())
            .collect();
        let store = log_store.object_store(None);
        let objects: Vec<object_store::ObjectMeta> = self
            .block_on(store.list(None).try_collect())
            .map_err(|e| DatasetError::Delta {
                table: name,
                message: e.to_string(),
                retryable: true,
            })?;
        let mut deleted = 0;
        for o in objects {
            let rel = o.location.to_string();
            if rel.starts_with("_delta_log")
                || !rel.ends_with(".parquet")
                || live.contains(&rel)
                || young_tombstones.contains(&rel)
                || o.last_modified.timestamp_millis() > cutoff
            {
                continue;
            }
            match self.block_on(store.delete(&o.location)) {
                Ok(()) => deleted += 1,
                Err(e) => {
                    tracing::warn!(table = name, file = %rel, error = %e, "could not delete a file no snapshot needs; tried again later")
                }
            }
        }
        Ok(deleted)
    }

    /// Local paths of a table's files in its current snapshot, optionally only of some dates
    /// (inclusive range) and sites (on a bucket: in the cache, fetched first if missing).
    pub fn files(
        &self,
        table: Table,
        dates: Option<(&str, &str)>,
        sites: Option<&[String]>,
    ) -> Result<Vec<PathBuf>, DatasetError> {
        let files: Vec<DataFile> = self
            .file_views(table, dates, sites)
            .into_iter()
            .map(|f| f.file)
            .collect();
        self.read_paths(&files)
    }

    /// Local paths to read `files` from (see [`Dataset::files`]).
    pub(super) fn read_paths(&self, files: &[DataFile]) -> Result<Vec<PathBuf>, DatasetError> {
        self.storage.read_paths(self.runtime(), files)
    }

    pub(super) fn runtime(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime until dropped")
    }

    /// Document `name` kept beside the tables, where every node reads it (master data).
    pub fn document(&self, name: &str) -> Result<Option<super::Document>, DatasetError> {
        self.block_on(self.storage.get_document(name))
    }

    /// Writes document `name` if no node changed it since `from` was read (`None`: if it does
    /// not exist); `false` if one did.
    pub fn put_document(
        &self,
        name: &str,
        bytes: Vec<u8>,
        from: Option<&super::Document>,
    ) -> Result<bool, DatasetError> {
        self.block_on(self.storage.put_document(name, bytes, from))
    }

    /// Whether other nodes may share the tables (they are on a bucket).
    pub fn is_shared(&self) -> bool {
        !self.storage.is_local()
    }

    /// Where the tables are, for people (a directory or `s3://bucket/prefix/`).
    pub fn location(&self) -> String {
        self.storage.describe()
    }

    /// Number of files and rows per table.
    pub fn sizes(&self) -> BTreeMap<Table, (u64, u64)> {
        let v = self.view.read().expect("view lock");
        v.tables
            .iter()
            .filter(|(_, tv)| !tv.files.is_empty())
            .map(|(t, tv)| {
                let rows = tv.files.iter().map(|f| f.file.rows).sum();
                (*t, (tv.files.len() as u64, rows))
            })
            .collect()
    }

    /// Starts the commit of one batch from `edge`, holding this node's commit lock until it
    /// is finished or dropped.
    pub(crate) fn begin_commit<'a>(&'a self, edge: &'a str, received_ms: i64) -> Commit<'a> {
        let lock = self.commit_lock.lock().expect("commit lock");
        let v = self.view.read().expect("view lock");
        let complete = v
            .edges
            .get(edge)
            .map(|l| l.received.clone())
            .unwrap_or_default();
        let held_then = NAMES
            .into_iter()
            .filter_map(|n| Some((n, v.view_of(n)?.held.get(edge)?.clone())))
            .collect();
        drop(v);
        Commit {
            ds: self,
            _lock: lock,
            edge,
            received_ms,
            files: BTreeMap::new(),
            written: vec![],
            complete,
            held_then,
        }
    }

    /// The Delta schema of a table whose files look like `df` (plus the partition columns).
    fn delta_columns(df: &DataFrame, partitions: &[&str]) -> Vec<(String, PrimitiveType)> {
        let mut cols: Vec<(String, PrimitiveType)> = df
            .schema()
            .iter()
            .map(|(name, dtype)| {
                let t = match dtype {
                    DataType::Boolean => PrimitiveType::Boolean,
                    DataType::Int8 | DataType::UInt8 => PrimitiveType::Byte,
                    DataType::Int16 | DataType::UInt16 => PrimitiveType::Short,
                    DataType::Int32 | DataType::UInt32 => PrimitiveType::Integer,
                    DataType::Int64 | DataType::UInt64 => PrimitiveType::Long,
                    DataType::Float32 => PrimitiveType::Float,
                    DataType::Float64 => PrimitiveType::Double,
                    DataType::Datetime(_, None) => PrimitiveType::TimestampNtz,
                    DataType::Datetime(_, Some(_)) => PrimitiveType::Timestamp,
                    DataType::Date => PrimitiveType::Date,
                    _ => PrimitiveType::String,
                };
                (name.to_string(), t)
            })
            .collect();
        for p in partitions {
            if !cols.iter().any(|(n, _)| n == p) {
                cols.push(((*p).to_owned(), PrimitiveType::String));
            }
        }
        cols
    }

    /// The table `name`, created (with the schema of `df`) when it does not exist yet.
    pub(super) fn ensure_table<'a>(
        &'a self,
        name: &'static str,
        df: &DataFrame,
    ) -> Result<MutexGuard<'a, Option<DeltaTable>>, DatasetError> {
        let mut t = self.table(name);
        if t.is_some() {
            return Ok(t);
        }
        let partitions: &[&str] = if name == BATCHES {
            &["date"]
        } else {
            &["date", "site"]
        };
        let mut b = match self.storage.log_store(name)? {
            Some(log_store) => CreateBuilder::new().with_log_store(log_store),
            None => CreateBuilder::new().with_location(self.storage.table_url(name)?.as_str()),
        };
        b = b
            .with_table_name(name)
            .with_save_mode(SaveMode::Ignore)
            .with_partition_columns(partitions.iter().copied())
            // Files replaced by compaction stay this long for snapshot readers.
            .with_configuration_property(
                deltalake_core::TableProperty::DeletedFileRetentionDuration,
                Some(format!(
                    "interval {} seconds",
                    super::RETIRE_AFTER.as_secs()
                )),
            );
        if self.storage.is_local() {
            b = b.with_configuration_property(
                deltalake_core::TableProperty::LogRetentionDuration,
                Some(local_log_retention()),
            );
        }
        for (col, ty) in Self::delta_columns(df, partitions) {
            b = b.with_column(col, DeltaType::Primitive(ty), true, None);
        }
        let created = match self.block_on(b.into_future()) {
            Ok(dt) => dt,
            // Another node created it first.
            Err(_) => {
                self.block_on(self.storage.load(name))?
                    .ok_or_else(|| DatasetError::Delta {
                        table: name,
                        message: "cannot create the table".into(),
                        retryable: true,
                    })?
            }
        };
        self.storage.fsync_log(name, created.version())?;
        // Another node may have created it and committed to it already: the view must show
        // what the commit is checked against.
        self.refresh_view(name, &created)?;
        *t = Some(created);
        Ok(t)
    }

    /// Commits `actions` to table `name` (which exists) as one Delta commit; `edge`: the
    /// batch's edge, whose concurrent commits on other nodes make this one conflict.
    pub(super) fn commit_actions(
        &self,
        name: &'static str,
        t: &mut MutexGuard<'_, Option<DeltaTable>>,
        actions: Vec<Action>,
        check: Option<BatchCheck<'_>>,
        operation: DeltaOperation,
    ) -> Result<u64, DatasetError> {
        self.commit_actions_with(name, t, actions, check, operation, 20)
    }

    /// [`Dataset::commit_actions`], moved to a later version at most `max_retries` times when
    /// other commits came first (0: only on top of the version read, or not at all).
    pub(super) fn commit_actions_with(
        &self,
        name: &'static str,
        t: &mut MutexGuard<'_, Option<DeltaTable>>,
        mut actions: Vec<Action>,
        check: Option<BatchCheck<'_>>,
        operation: DeltaOperation,
        max_retries: usize,
    ) -> Result<u64, DatasetError> {
        let _rt = self.enter();
        let dt = t.as_mut().expect("the table exists");
        if let Some(c) = check {
            // Commits this node has read since the batch's duplicates were sorted out (the
            // table's view is current: the caller holds the table): did one store some of it?
            // Commits after the snapshot are Delta's to check (the edge's `txn` below).
            let now = self
                .view
                .read()
                .expect("view lock")
                .view_of(name)
                .and_then(|tv| tv.held.get(c.edge).cloned());
            if now.is_some_and(|now| newly_held(&now, c.then, c.seqs)) {
                metrics::counter!("millrace_cloud_commit_conflicts_total", "table" => name)
                    .increment(1);
                return Err(DatasetError::Conflict(name));
            }
            let edge = c.edge;
            let now = chrono::Utc::now().timestamp_millis();
            actions.push(Action::Txn(Transaction::new_with_last_update(
                app_id(edge),
                now,
                Some(now),
            )));
        }
        // A commit that only adds files (every batch's) updates the view from its own
        // actions; rebuilding it from the snapshot costs O(files) per commit.
        let added: Option<Vec<FileView>> = actions
            .iter()
            .filter(|a| !matches!(a, Action::Txn(_)))
            .map(|a| match a {
                Action::Add(add) => Some(FileView::of_add(table_of(name), name, add)),
                _ => None,
            })
            .collect();
        let read_version = dt.version();
        let snapshot = dt.snapshot().map_err(delta_err(name))?.clone();
        let done = self.block_on(
            CommitBuilder::from(CommitProperties::default())
                .with_actions(actions)
                .with_max_retries(max_retries)
                .build(Some(&snapshot), dt.log_store(), operation)
                .into_future(),
        );
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                let conflict = matches!(
                    &e,
                    deltalake_core::DeltaTableError::Transaction {
                        source: TransactionError::CommitConflict(_)
                    }
                );
                // Whatever happened, read the table again before the next try.
                let _ = self.block_on(dt.update_state());
                let _ = self.refresh_view(name, dt);
                if conflict {
                    metrics::counter!("millrace_cloud_commit_conflicts_total", "table" => name)
                        .increment(1);
                    return Err(DatasetError::Conflict(name));
                }
                return Err(delta_err(name)(e));
            }
        };
        let version = done.version();
        if done.metrics.num_retries > 0 {
            metrics::counter!("millrace_cloud_commit_retries_total", "table" => name)
                .increment(done.metrics.num_retries);
        }
        dt.state = Some(done.snapshot());
        self.storage.fsync_log(name, Some(version))?;
        let applied = match added {
            Some(files) if read_version.map(|v| v + 1) == Some(version) => {
                self.apply_adds(name, read_version, version, files)
            }
            _ => false,
        };
        if !applied {
            self.refresh_view(name, dt)?;
        }
        metrics::counter!("millrace_cloud_commits_total", "table" => name).increment(1);
        Ok(version)
    }

    /// Converts a dataset of the layout before Delta (`manifest.log`): every file it names is
    /// added to its table as it is (nothing is copied), the part counts are built when the
    /// dataset predates them, and the ledger becomes one `sync_batches` row; then the manifest
    /// is renamed `manifest.log.migrated`. Resumable: a table converted already is skipped.
    fn migrate(&self) -> Result<(), DatasetError> {
        let m = Manifest::read(&self.dir)?;
        tracing::info!(
            files = m.files.len(),
            edges = m.edges.len(),
            "converting the dataset to Delta Lake tables (once)"
        );
        let _lock = self.commit_lock.lock().expect("commit lock");
        for table in Table::ALL {
            let files: Vec<&DataFile> = m.files.values().filter(|f| f.table == table).collect();
            let name = table.as_str();
            if files.is_empty() || self.table(name).is_some() {
                continue;
            }
            let paths: Vec<PathBuf> = files.iter().map(|f| self.dir.join(&f.path)).collect();
            let sample = scan_files(&paths[..1])?.limit(0).collect()?;
            let mut t = self.ensure_table(name, &sample)?;
            let actions = files
                .iter()
                .map(|f| {
                    let rel = f
                        .path
                        .strip_prefix(&format!("{name}/"))
                        .unwrap_or(&f.path)
                        .to_owned();
                    let path = self.dir.join(&f.path);
                    let size = std::fs::metadata(&path).map_err(io(&path))?.len();
                    Ok(Action::Add(add_action(
                        rel, &f.date, &f.site, size, f.rows, None,
                    )))
                })
                .collect::<Result<Vec<_>, DatasetError>>()?;
            self.commit_actions(
                name,
                &mut t,
                actions,
                None,
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: None,
                    predicate: None,
                },
            )?;
            tracing::info!(table = name, files = files.len(), "table converted");
        }
        if m.format < 2 && self.table(Table::PartCounts.as_str()).is_none() {
            self.build_part_counts()?;
        }
        if self
            .view
            .read()
            .expect("view lock")
            .batches
            .files
            .is_empty()
            && !m.edges.is_empty()
        {
            let tag: LedgerTag = m
                .edges
                .iter()
                .map(|(edge, l)| {
                    let t = EdgeTag {
                        received: l.received.ranges().to_vec(),
                        dropped: l.dropped.ranges().to_vec(),
                        batches: l.batches,
                        last_ms: l.last_commit_ms,
                        machines: m
                            .machines
                            .iter()
                            .filter(|_| edge == m.edges.keys().next().expect("one edge"))
                            .cloned()
                            .collect(),
                    };
                    (edge.clone(), t)
                })
                .collect();
            let received_ms = m.edges.values().filter_map(|l| l.last_commit_ms).max();
            let rows: Vec<BatchRow> = m
                .edges
                .iter()
                .map(|(edge, l)| BatchRow {
                    edge: edge.clone(),
                    items: l.items(),
                    seqs: ranges_text(l.received.ranges()),
                    dropped: ranges_text(l.dropped.ranges()),
                    duplicates: 0,
                    points: 0,
                })
                .collect();
            self.commit_batch_rows(
                None,
                received_ms.unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
                &rows,
                tag,
            )?;
        }
        let from = self.dir.join(MANIFEST);
        let to = self.dir.join(format!("{MANIFEST}.migrated"));
        std::fs::rename(&from, &to).map_err(io(&from))?;
        tracing::info!(manifest = %to.display(), "dataset converted; the old manifest is kept beside it");
        Ok(())
    }

    /// Builds the part counts of every partition from its event files (a dataset older than
    /// the rollup).
    fn build_part_counts(&self) -> Result<(), DatasetError> {
        let mut by_partition: BTreeMap<(String, String), Vec<PathBuf>> = BTreeMap::new();
        for f in self.file_views(Table::Events, None, None) {
            by_partition
                .entry((f.file.date.clone(), f.file.site.clone()))
                .or_default()
                .push(self.dir.join(&f.file.path));
        }
        let n = by_partition.len();
        tracing::info!(
            partitions = n,
            "building the part counts from the event files"
        );
        for (i, ((date, site), paths)) in by_partition.into_iter().enumerate() {
            let mut df = count_parts(scan_files(&paths)?, true).collect()?;
            part_counts_schema(&mut df)?;
            let name = Table::PartCounts.as_str();
            let rel = format!("date={date}/site={site}/upgrade-{}.parquet", unique());
            write_file(&self.dir.join(name).join(&rel), &mut df, self.fsync)?;
            let path = self.dir.join(name).join(&rel);
            let size = std::fs::metadata(&path).map_err(io(&path))?.len();
            let mut t = self.ensure_table(name, &df)?;
            let add = add_action(rel, &date, &site, size, df.height() as u64, None);
            self.commit_actions(
                name,
                &mut t,
                vec![Action::Add(add)],
                None,
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: None,
                    predicate: None,
                },
            )?;
            tracing::info!(partition = i + 1, of = n, "part counts built");
        }
        Ok(())
    }

    /// Writes and commits rows of `sync_batches` with the ledger tag `tag`.
    fn commit_batch_rows(
        &self,
        edge: Option<&str>,
        received_ms: i64,
        rows: &[BatchRow],
        tag: LedgerTag,
    ) -> Result<(), DatasetError> {
        let mut df = batch_frame(rows, received_ms)?;
        let date = crate::sync::date_of(received_ms);
        let rel = format!(
            "date={date}/{received_ms:013}-{}-{}.parquet",
            edge.unwrap_or("migrated"),
            unique()
        );
        let size = self.storage.put(self.runtime(), BATCHES, &rel, &mut df)?;
        let mut add = add_action(rel.clone(), &date, "", size, df.height() as u64, Some(&tag));
        add.partition_values.remove("site");
        let mut t = self.ensure_table(BATCHES, &df)?;
        let committed = self.commit_actions(
            BATCHES,
            &mut t,
            vec![Action::Add(add)],
            // A blind append: the batch's data is committed (each table checked), so the row
            // only records this delivery; another node's row of the same batch is another.
            None,
            DeltaOperation::Write {
                mode: SaveMode::Append,
                partition_by: None,
                predicate: None,
            },
        );
        if committed.is_err() {
            self.storage.delete(self.runtime(), BATCHES, &rel);
        }
        committed.map(|_| ())
    }
}

/// One row of `sync_batches`.
#[derive(Debug, Clone)]
pub(super) struct BatchRow {
    pub(super) edge: String,
    pub(super) items: u64,
    pub(super) duplicates: u64,
    pub(super) points: u64,
    pub(super) seqs: String,
    pub(super) dropped: String,
}

fn batch_frame(rows: &[BatchRow], received_ms: i64) -> PolarsResult<DataFrame> {
    let n = rows.len();
    let col = |name: &str, v: Vec<String>| Column::new(name.into(), v);
    let num = |name: &str, v: Vec<u64>| Column::new(name.into(), v);
    DataFrame::new_infer_height(vec![
        col("edge", rows.iter().map(|r| r.edge.clone()).collect()),
        Column::new("received_at".into(), vec![received_ms; n])
            .cast(&DataType::Datetime(TimeUnit::Milliseconds, None))?,
        num("items", rows.iter().map(|r| r.items).collect()),
        num("duplicates", rows.iter().map(|r| r.duplicates).collect()),
        num("points", rows.iter().map(|r| r.points).collect()),
        col("seqs", rows.iter().map(|r| r.seqs.clone()).collect()),
        col("dropped", rows.iter().map(|r| r.dropped.clone()).collect()),
    ])
}

/// `1-100,205-300`.
pub(super) fn ranges_text(r: &[SeqRange]) -> String {
    r.iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A random suffix for file names (nodes write the same partitions).
pub(super) fn unique() -> String {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    // Seeded from the OS's randomness once per process; a counter within it.
    static SEED: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        std::collections::hash_map::RandomState::new().hash_one(std::process::id())
    });
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{:016x}{:06x}", *SEED, N.fetch_add(1, Ordering::Relaxed))
}

/// An `add` action of a new file (`rel` to the table root).
pub(super) fn add_action(
    rel: String,
    date: &str,
    site: &str,
    size: u64,
    rows: u64,
    tag: Option<&LedgerTag>,
) -> Add {
    let site = (site != alerts::NO_SITE).then(|| site.to_owned());
    Add {
        path: rel,
        partition_values: HashMap::from([
            ("date".to_owned(), Some(date.to_owned())),
            ("site".to_owned(), site),
        ]),
        size: size as i64,
        modification_time: chrono::Utc::now().timestamp_millis(),
        data_change: true,
        stats: Some(format!("{{\"numRecords\":{rows}}}")),
        tags: tag.map(|t| {
            HashMap::from([(
                LEDGER_TAG.to_owned(),
                Some(serde_json::to_string(t).expect("tags serialize")),
            )])
        }),
        ..Default::default()
    }
}

/// One edge batch being committed ([`Dataset::begin_commit`]): its files are written one by one
/// ([`Commit::write`]), then each table's are committed and the batch's `sync_batches` row
/// last ([`Commit::finish`]). A commit dropped before it finishes removes the files it wrote
/// and did not commit.
pub(crate) struct Commit<'a> {
    ds: &'a Dataset,
    _lock: MutexGuard<'a, ()>,
    edge: &'a str,
    received_ms: i64,
    /// Per table: the adds written, not committed yet.
    files: BTreeMap<&'static str, Vec<(Add, DataFrame)>>,
    /// Files written and not (yet) committed: table, path relative to it.
    written: Vec<(&'static str, String)>,
    /// The edge's sequence numbers complete batches held when the commit began.
    complete: RangeSet,
    /// Per table: the edge's sequence numbers it held when the commit began (what the batch's
    /// duplicates were sorted out against; a commit checks that no other node added more of
    /// them since).
    held_then: BTreeMap<&'static str, RangeSet>,
}

/// What a batch's commit to one table was checked against.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchCheck<'a> {
    edge: &'a str,
    /// The edge's sequence numbers the table held when the batch's duplicates were sorted out.
    then: Option<&'a RangeSet>,
    /// The batch's sequence numbers.
    seqs: &'a RangeSet,
}

/// Whether `now` holds a sequence number of `seqs` that `then` did not: another node stored
/// some of the batch since its duplicates were sorted out.
fn newly_held(now: &RangeSet, then: Option<&RangeSet>, seqs: &RangeSet) -> bool {
    let covered = |lo: u64, hi: u64| {
        let Some(then) = then else { return false };
        let mut x = lo;
        for &(a, b) in then.ranges() {
            if b < x {
                continue;
            }
            if a > x {
                return false;
            }
            if b >= hi {
                return true;
            }
            x = b + 1;
        }
        false
    };
    now.ranges().iter().any(|&(a, b)| {
        seqs.ranges().iter().any(|&(c, d)| {
            let (lo, hi) = (a.max(c), b.min(d));
            lo <= hi && !covered(lo, hi)
        })
    })
}

impl Commit<'_> {
    /// Whether a table (by name) holds this edge's sequence number already: a complete batch
    /// had it, or one of the table's files says so.
    pub(crate) fn held(&self) -> impl Fn(&str, u64) -> bool + use<> {
        let (complete, per_table) = (self.complete.clone(), self.held_then.clone());
        move |table: &str, seq: u64| {
            complete.contains(seq) || per_table.get(table).is_some_and(|h| h.contains(seq))
        }
    }

    /// Writes the batch's rows of one partition (`date` as `YYYY-MM-DD`) as a new file.
    pub(crate) fn write(
        &mut self,
        table: Table,
        date: String,
        site: &str,
        df: &mut DataFrame,
    ) -> Result<(), DatasetError> {
        if table == Table::PartCounts {
            part_counts_schema(df)?;
        }
        let name = table.as_str();
        let rel = format!(
            "date={date}/site={site}/{:013}-{}-{}.parquet",
            self.received_ms,
            self.edge,
            unique()
        );
        self.written.push((name, rel.clone()));
        let size = self.ds.storage.put(self.ds.runtime(), name, &rel, df)?;
        let add = add_action(rel, &date, site, size, df.height() as u64, None);
        self.files.entry(name).or_default().push((add, df.clear()));
        Ok(())
    }

    /// Commits: each table's files, tagged with the batch's sequence numbers `seqs` (every
    /// item of the batch, so the table is known to hold its share of them), then the batch's
    /// `sync_batches` row with the ranges the edge reported `dropped` and the machines
    /// (`site/line/machine`) it had rows of. A [`DatasetError::Conflict`] means another node
    /// stored some of this edge's data meanwhile: store the batch again (its duplicate check
    /// then sees it). `committed` gets the tables committed, in order.
    pub(crate) fn finish(
        mut self,
        seqs: &RangeSet,
        dropped: &[SeqRange],
        machines: Vec<String>,
        counts: (u64, u64, u64),
        committed: &mut Vec<&'static str>,
    ) -> Result<(), DatasetError> {
        let received: Vec<SeqRange> = seqs.ranges().to_vec();
        let data_tag: LedgerTag = BTreeMap::from([(
            self.edge.to_owned(),
            EdgeTag {
                received: received.clone(),
                ..Default::default()
            },
        )]);
        let tag_text = serde_json::to_string(&data_tag).expect("tags serialize");
        for (name, files) in std::mem::take(&mut self.files) {
            let sample = &files[0].1;
            let mut t = self.ds.ensure_table(name, sample)?;
            let actions = files
                .into_iter()
                .map(|(mut add, _)| {
                    add.tags = Some(HashMap::from([(
                        LEDGER_TAG.to_owned(),
                        Some(tag_text.clone()),
                    )]));
                    Action::Add(add)
                })
                .collect();
            self.ds.commit_actions(
                name,
                &mut t,
                actions,
                Some(BatchCheck {
                    edge: self.edge,
                    then: self.held_then.get(name),
                    seqs,
                }),
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: None,
                    predicate: None,
                },
            )?;
            self.written.retain(|(table, _)| *table != name);
            committed.push(name);
        }
        let (stored, duplicates, points) = counts;
        let tag: LedgerTag = BTreeMap::from([(
            self.edge.to_owned(),
            EdgeTag {
                received: received.clone(),
                dropped: dropped.to_vec(),
                batches: 1,
                last_ms: Some(self.received_ms),
                machines,
            },
        )]);
        let row = BatchRow {
            edge: self.edge.to_owned(),
            items: stored,
            duplicates,
            points,
            seqs: ranges_text(&received),
            dropped: ranges_text(dropped),
        };
        self.ds
            .commit_batch_rows(Some(self.edge), self.received_ms, &[row], tag)
    }
}

impl Drop for Commit<'_> {
    fn drop(&mut self) {
        for (table, rel) in &self.written {
            self.ds.storage.delete(self.ds.runtime(), table, rel);
        }
    }
}
