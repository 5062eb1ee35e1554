//! The edge's time-series store on RocksDB.
//!
//! Column families and key layouts (all integers big-endian; timestamps with the sign bit
//! flipped so that byte order is time order):
//!
//! | CF | key | value |
//! |---|---|---|
//! | `series` | `t/{site}/{line}/{machine}/{metric}` or `m/{site}/{line}/{machine}` | id `u32` + unit |
//! | `head` | series id `u32` · earliest ts · write order `u64` | the (ts, value) pairs one write batch brought for the series and block window (raw points not yet sealed; see `HeadEntry`) |
//! | `blocks` | series id `u32` · window start | compressed block ([`block`]) |
//! | `events` | machine id `u32` · ts · seq `u64` | JSON of the event body |
//! | `dead_letters` | received ts · counter `u64` | JSON [`DeadLetter`] |
//! | `outbox` | lane `u8` · outbox seq `u64` | the event for the cloud ([`outbox`]) |
//! | `meta` | name | outbox counters, dropped ranges |
//! | `recent` | write counter `u64` | (id, device seq, ts) of each event written, for dedup after a restart |
//! | `functions`, `kv`, `invocations`, `alerts` | see [`functions`] | deployed functions, their state, log and alerts |
//! | `triggers` | log seq `u64` | each stored device event, in store order, while a function reads them ([`triggers`]) |
//!
//! Telemetry lands in `head` in the same write batch as everything else; a maintenance pass
//! seals each full time window of a series into one Gorilla-style block and deletes the raw
//! points in one atomic batch. Queries merge blocks and head by timestamp (the later write
//! wins). Because event keys are (machine, ts, seq) and points merge by (series, ts), a
//! duplicate is stored once.
//! Retention deletes by key range per series and machine.

//!
//! # Layout
//! The [`Store`] is one RocksDB with a small façade; each group of families has its module:
//! - `series`: the index of series and machine names, raw points (`head`), sealing into
//!   blocks, the points query; [`block`]: the block codec.
//! - `events`: state, part and operator events.
//! - `dead_letters`: what ingest refused.
//! - [`outbox`]: the outbox for sync and the dedup memory across restarts (`recent`).
//! - `functions`: deployed functions, their key-value state, invocation log and alerts.
//! - `history`: stored history as device events again (what a function replay reads).
//! - [`triggers`]: the trigger log functions read from their durable cursors, and the one
//!   batch that applies a function's effects with its cursor move.
//! - `write`: the write path: one write batch that each of the above adds its part to.
//! - `retention`: deleting what is older than each kind's retention.

pub mod block;
mod dead_letters;
mod events;
mod functions;
mod history;
pub mod outbox;
mod retained;
mod retention;
mod series;
pub mod triggers;
mod write;

pub use dead_letters::DeadLetter;
pub use functions::{KvEntry, KvWrite};
pub use series::{Bucket, SeriesInfo};
pub use triggers::{FunctionCommit, TriggerRecord};
pub use write::{Origin, WriteStats};

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode, Options,
    ReadOptions,
};

use series::{HeadEntry, Index, Unsealed};

const CF_SERIES: &str = "series";
const CF_HEAD: &str = "head";
const CF_BLOCKS: &str = "blocks";
const CF_EVENTS: &str = "events";
const CF_DEAD: &str = "dead_letters";
const CF_OUTBOX: &str = "outbox";
const CF_META: &str = "meta";
const CF_RECENT: &str = "recent";
const CF_FUNCTIONS: &str = "functions";
const CF_KV: &str = "kv";
const CF_INVOCATIONS: &str = "invocations";
const CF_ALERTS: &str = "alerts";
const CF_TRIGGERS: &str = "triggers";
const CF_RETAINED: &str = "retained";
const CFS: [&str; 14] = [
    CF_SERIES,
    CF_HEAD,
    CF_BLOCKS,
    CF_EVENTS,
    CF_DEAD,
    CF_OUTBOX,
    CF_META,
    CF_RECENT,
    CF_FUNCTIONS,
    CF_KV,
    CF_INVOCATIONS,
    CF_ALERTS,
    CF_TRIGGERS,
    CF_RETAINED,
];

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed.
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value could not be read back.
    #[error("corrupt record in {cf}: {reason}")]
    Corrupt {
        /// Column family.
        cf: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// More series than ids.
    #[error("series id space exhausted")]
    SeriesExhausted,
    /// The store was opened without an outbox (sync is off).
    #[error("this store has no outbox (sync is not enabled)")]
    NoOutbox,
}

impl StoreError {
    /// Whether trying the same operation again may succeed (I/O trouble, a busy database).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Rocks(e) => matches!(
                e.kind(),
                rocksdb::ErrorKind::Busy
                    | rocksdb::ErrorKind::TimedOut
                    | rocksdb::ErrorKind::TryAgain
                    | rocksdb::ErrorKind::IOError
            ),
            _ => false,
        }
    }

    /// Why a write failed, as a metric label: `no_space` when the disk is full (RocksDB then
    /// refuses writes until it has recovered by itself, once space is freed), else `io` or
    /// `other`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Rocks(e) if e.kind() == rocksdb::ErrorKind::IOError => {
                let m = e.as_ref();
                if m.contains("No space left") || m.contains("NoSpace") {
                    "no_space"
                } else {
                    "io"
                }
            }
            _ => "other",
        }
    }
}

/// How the store keeps data.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// fsync the WAL on every batch (group commit): survives power loss, not only process crashes.
    pub sync_writes: bool,
    /// Time window of one compressed block.
    pub block_window: Duration,
    /// How long after a window's end it stays open for late points.
    pub seal_grace: Duration,
    /// How long telemetry is kept; zero keeps it forever.
    pub telemetry_retention: Duration,
    /// How long state, part and operator events are kept; zero keeps them forever.
    pub event_retention: Duration,
    /// How long dead letters are kept; zero keeps them forever.
    pub dead_letter_retention: Duration,
    /// Block cache size in bytes.
    pub cache_bytes: usize,
    /// Memtable size per column family in bytes.
    pub write_buffer_bytes: usize,
    /// Memtables of all column families together at most, in bytes (the largest is flushed
    /// when they reach it); zero for no limit beyond `write_buffer_bytes` per family.
    pub memtable_bytes: usize,
    /// Keep an outbox for the cloud, and its disk quota in bytes (`None`: no sync, no outbox).
    pub outbox_quota_bytes: Option<u64>,
    /// Events remembered across a restart to recognise devices re-sending what was stored just
    /// before it.
    pub recent_events: usize,
    /// How long function invocation records are kept; zero keeps them forever.
    pub invocation_retention: Duration,
    /// How long alerts raised by functions are kept; zero keeps them forever.
    pub alert_retention: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            sync_writes: true,
            block_window: Duration::from_secs(3600),
            seal_grace: Duration::from_secs(300),
            telemetry_retention: Duration::from_secs(30 * 86_400),
            event_retention: Duration::from_secs(90 * 86_400),
            dead_letter_retention: Duration::from_secs(7 * 86_400),
            cache_bytes: 32 << 20,
            write_buffer_bytes: 16 << 20,
            memtable_bytes: 16 << 20,
            outbox_quota_bytes: None,
            recent_events: 100_000,
            invocation_retention: Duration::from_secs(7 * 86_400),
            alert_retention: Duration::from_secs(90 * 86_400),
        }
    }
}

/// RocksDB's memory by use, bytes (see [`Store::memory`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreMemory {
    /// Memtables, active and immutable.
    pub memtables: u64,
    /// Index and filter blocks of open SST files (outside the block cache).
    pub table_readers: u64,
    /// Blocks cached for reads.
    pub block_cache: u64,
}

/// Whether RocksDB takes writes (see [`Store::write_health`]).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StoreWriteHealth {
    /// Background errors since the store was opened (a flush or compaction that failed, e.g.
    /// for lack of space); while one is unresolved, RocksDB refuses or holds back writes.
    pub background_errors: u64,
    /// RocksDB holds every write back (a write stall: memtables that cannot be flushed).
    pub writes_stopped: bool,
}

fn ts_key(ts: i64) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

fn key_ts(b: &[u8]) -> i64 {
    (u64::from_be_bytes(b.try_into().expect("8 bytes")) ^ (1 << 63)) as i64
}

fn series_ts_key(id: u32, ts: i64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k[4..].copy_from_slice(&ts_key(ts));
    k
}

/// The time-series store. Every method blocks: call it off the async runtime.
pub struct Store {
    db: DB,
    cache: Cache,
    opts: StoreOptions,
    index: RwLock<Index>,
    unsealed: Mutex<Unsealed>,
    /// Serialises writes with sealing, so that a seal never deletes a point written meanwhile.
    write_lock: Mutex<()>,
    dead_counter: AtomicU64,
    /// Per kind: the cutoff and the number of ids when retention last ran.
    retention_done: Mutex<HashMap<&'static str, (i64, u32)>>,
    outbox: Option<outbox::OutboxState>,
    /// Next key of `recent`.
    recent_counter: AtomicU64,
    recent_log: outbox::RecentLog,
    /// Next counter for invocation and alert keys.
    log_counter: AtomicU64,
    triggers: triggers::TriggerLog,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db.path())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store in `path`.
    pub fn open(path: &Path, opts: StoreOptions) -> Result<Self, StoreError> {
        let cache = Cache::new_lru_cache(opts.cache_bytes);
        let cf_opts = |name: &str| {
            let mut o = Options::default();
            let mut t = BlockBasedOptions::default();
            t.set_block_cache(&cache);
            // Bloom filters serve point lookups only. The families read by range scans (raw
            // points, events, outbox, ...) go without: building a filter keeps a hash of every
            // key of the output file in memory until the file is finished, which made RSS
            // climb by up to ~20 MiB during each compaction of raw points (a key per series and
            // batch: with 1,000 devices close to one per reading; docs/benchmarks.md).
            if matches!(name, CF_BLOCKS | CF_FUNCTIONS | CF_KV | CF_META) {
                t.set_bloom_filter(10.0, false);
            }
            o.set_block_based_table_factory(&t);
            o.set_write_buffer_size(opts.write_buffer_bytes);
            o.set_max_write_buffer_number(3);
            match name {
                // Already compressed: RocksDB's compression would only cost CPU.
                CF_BLOCKS | CF_TRIGGERS => o.set_compression_type(DBCompressionType::None),
                // Raw points live here for about one block window before they are sealed:
                // cheap LZ4 only, Zstd would spend CPU on data that is deleted soon.
                CF_HEAD => o.set_compression_type(DBCompressionType::Lz4),
                _ => {
                    o.set_compression_type(DBCompressionType::Lz4);
                    o.set_bottommost_compression_type(DBCompressionType::Zstd);
                }
            }
            o
        };
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(5);
        db_opts.set_max_total_wal_size(64 << 20);
        // Twelve column families with a 16 MiB memtable each (up to three while one flushes)
        // would let memory grow with time under steady load: cap them together (16 MiB by
        // default: with 32 MiB the edge's RSS at 1,000 devices was ~10 MiB higher and the
        // ingest rate the same).
        db_opts.set_db_write_buffer_size(opts.memtable_bytes);
        // Write SST and WAL files out a MiB at a time instead of in one burst when a file is
        // closed: a burst of writeback delays the next WAL fsync, so the ingest latency tail.
        db_opts.set_bytes_per_sync(1 << 20);
        db_opts.set_wal_bytes_per_sync(1 << 20);
        // Reuse old WAL files instead of growing new ones: an fdatasync of an append that does
        // not change the file's size needs no journal commit for the inode (measured here:
        // 0.30 ms median instead of 0.47 ms). Compatible with the default point-in-time recovery.
        db_opts.set_recycle_log_file_num(4);
        // A full disk stops writes with a background error (a hard one when a WAL append or a
        // flush fails). RocksDB's own SST file manager (every DB has one) then polls the free
        // space every 5 s and resumes the DB once at least the largest memtable budget is free
        // (64 MiB, the default column family's); until then writes fail, ingest retries them
        // and devices wait for their acknowledgements.
        let cfs = CFS
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, cf_opts(n)));
        let db = DB::open_cf_descriptors(&db_opts, path, cfs)?;
        let store = Self {
            db,
            cache,
            opts,
            index: RwLock::new(Index::default()),
            unsealed: Mutex::new(Unsealed::default()),
            write_lock: Mutex::new(()),
            dead_counter: AtomicU64::new(0),
            retention_done: Mutex::new(HashMap::new()),
            outbox: None,
            recent_counter: AtomicU64::new(0),
            recent_log: Default::default(),
            log_counter: AtomicU64::new(0),
            triggers: Default::default(),
        };
        store.load()?;
        store.load_triggers()?;
        store
            .log_counter
            .store(store.load_log_counter()?, Ordering::Relaxed);
        let mut store = store;
        if let Some(quota) = store.opts.outbox_quota_bytes {
            store.outbox = Some(store.load_outbox(quota)?);
        }
        Ok(store)
    }

    fn cf(&self, name: &'static str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn load(&self) -> Result<(), StoreError> {
        let mut index = self.index.write().expect("index lock");
        for item in self.db.iterator_cf(self.cf(CF_SERIES), IteratorMode::Start) {
            let (k, v) = item?;
            let name = String::from_utf8(k.to_vec()).map_err(|e| StoreError::Corrupt {
                cf: CF_SERIES,
                reason: e.to_string(),
            })?;
            if v.len() < 4 {
                return Err(StoreError::Corrupt {
                    cf: CF_SERIES,
                    reason: format!("short value for {name}"),
                });
            }
            let id = u32::from_be_bytes(v[..4].try_into().expect("4 bytes"));
            let unit = String::from_utf8_lossy(&v[4..]).into_owned();
            index.next_id = index.next_id.max(id + 1);
            index.by_id.insert(id, name.clone());
            index.by_name.insert(name, (id, unit));
        }
        drop(index);
        // Rebuild the set of unsealed windows from the raw points still in `head`.
        let window = self.window_ms();
        let mut unsealed = self.unsealed.lock().expect("unsealed lock");
        for item in self.db.iterator_cf(self.cf(CF_HEAD), IteratorMode::Start) {
            let (k, v) = item?;
            let entry = HeadEntry::decode(&k, &v)?;
            let id = u32::from_be_bytes(k[..4].try_into().expect("4 bytes"));
            let Some(newest_here) = entry.points.iter().map(|p| p.0).max() else {
                continue;
            };
            // A chunk lies within one window: its key's timestamp (its earliest point) tells which.
            let ts = key_ts(&k[4..12]);
            unsealed
                .windows
                .entry(id)
                .or_default()
                .insert(ts.div_euclid(window) * window);
            let newest = unsealed.newest.entry(id).or_insert(newest_here);
            *newest = (*newest).max(newest_here);
        }
        if let Some(item) = self
            .db
            .iterator_cf(self.cf(CF_RECENT), IteratorMode::End)
            .next()
        {
            let (k, _) = item?;
            if let Ok(k) = <[u8; 8]>::try_from(k.as_ref()) {
                self.recent_counter
                    .store(u64::from_be_bytes(k) + 1, Ordering::Relaxed);
            }
        }
        if let Some(item) = self
            .db
            .iterator_cf(self.cf(CF_DEAD), IteratorMode::End)
            .next()
        {
            let (k, _) = item?;
            self.dead_counter.store(
                u64::from_be_bytes(k[8..16].try_into().expect("8 bytes")) + 1,
                Ordering::Relaxed,
            );
        }
        Ok(())
    }

    /// Iterates `cf` over keys in `[from, to)`.
    fn scan(
        &self,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> rocksdb::DBIteratorWithThreadMode<'_, DB> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(from.to_vec()..to.to_vec());
        self.db
            .iterator_cf_opt(self.cf(cf), ro, IteratorMode::Start)
    }

    /// [`Store::scan`] as of a snapshot, for reads that must see several keys at one moment.
    fn scan_at<'a>(
        &'a self,
        snapshot: &'a rocksdb::Snapshot<'a>,
        cf: &'static str,
        from: &[u8],
        to: &[u8],
    ) -> rocksdb::DBIteratorWithThreadMode<'a, DB> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(from.to_vec()..to.to_vec());
        snapshot.iterator_cf_opt(self.cf(cf), ro, IteratorMode::Start)
    }

    /// Bytes of live SST files plus memtables, per column family.
    pub fn size_by_cf(&self) -> Result<BTreeMap<&'static str, u64>, StoreError> {
        let mut out = BTreeMap::new();
        for name in CFS {
            let sst = self.cf_property(name, "rocksdb.total-sst-files-size")?;
            let mem = self.cf_property(name, "rocksdb.size-all-mem-tables")?;
            out.insert(name, sst + mem);
        }
        Ok(out)
    }

    /// An integer property of one column family (0 when RocksDB does not report it).
    fn cf_property(&self, name: &'static str, property: &str) -> Result<u64, StoreError> {
        Ok(self
            .db
            .property_int_value_cf(self.cf(name), property)?
            .unwrap_or(0))
    }

    /// RocksDB's memory by use, bytes: memtables (all column families, also those being
    /// flushed), table readers (index and filter blocks of open SST files) and the block cache.
    pub fn memory(&self) -> Result<StoreMemory, StoreError> {
        let mut m = StoreMemory {
            block_cache: self.cache.get_usage() as u64,
            ..Default::default()
        };
        for name in CFS {
            m.memtables += self.cf_property(name, "rocksdb.size-all-mem-tables")?;
            m.table_readers += self.cf_property(name, "rocksdb.estimate-table-readers-mem")?;
        }
        Ok(m)
    }

    /// Whether RocksDB takes writes now: its background error count and write stop flag. A full
    /// disk shows here even when no write has failed yet (a write held back by a stall waits
    /// instead of failing).
    pub fn write_health(&self) -> Result<StoreWriteHealth, StoreError> {
        let property = |name: &str| -> Result<u64, StoreError> {
            Ok(self.db.property_int_value(name)?.unwrap_or(0))
        };
        Ok(StoreWriteHealth {
            background_errors: property("rocksdb.background-errors")?,
            writes_stopped: property("rocksdb.is-write-stopped")? != 0,
        })
    }

    /// Flushes memtables to SST files and syncs the WAL.
    pub fn flush(&self) -> Result<(), StoreError> {
        for name in CFS {
            self.db.flush_cf(self.cf(name))?;
        }
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Compacts every column family fully (drops deleted ranges and overwritten values).
    pub fn compact(&self) -> Result<(), StoreError> {
        self.flush()?;
        for name in CFS {
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millrace_shared::{
        Event, EventBody, MachineId, MachineState, Reading, StateChange, Telemetry,
    };
    use std::sync::Arc;

    fn machine() -> MachineId {
        MachineId::new("s", "l", "m").unwrap()
    }

    fn telemetry(ts: i64, seq: u64, v: f64) -> Event {
        Event {
            machine: machine(),
            ts_ms: ts,
            seq,
            body: EventBody::Telemetry(Telemetry {
                readings: vec![Reading {
                    name: "temp".into(),
                    value: v,
                    unit: "degC".into(),
                }],
            }),
        }
    }

    const T0: i64 = 1_767_600_000_000;

    #[test]
    fn history_from_devices_goes_to_the_cloud_as_backfill_and_retained_messages_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(
            dir.path(),
            StoreOptions {
                outbox_quota_bytes: Some(1 << 30),
                ..opts()
            },
        )
        .unwrap();
        let events = [
            telemetry(1_000, 1, 1.0),
            telemetry(2_000, 2, 2.0),
            telemetry(3_000, 3, 3.0),
        ];
        let retained = [
            (bytes::Bytes::from("hmi/a"), bytes::Bytes::from("1")),
            (bytes::Bytes::from("hmi/b"), bytes::Bytes::from("2")),
            (bytes::Bytes::from("hmi/a"), bytes::Bytes::new()),
        ];
        s.write_from_devices(&events, &[1], &[], &retained).unwrap();
        let read = s
            .outbox_read(outbox::Lane::Telemetry, 0, 100, 1 << 20, None)
            .unwrap();
        let marks: Vec<(i64, bool)> = read
            .items
            .iter()
            .map(|i| (i.event.ts_ms, i.backfill))
            .collect();
        assert_eq!(marks, vec![(1_000, false), (2_000, true), (3_000, false)]);
        // The empty retained message cleared its topic, in the same batch.
        assert_eq!(
            s.retained().unwrap(),
            vec![("hmi/b".to_owned(), b"2".to_vec())]
        );
    }

    fn opts() -> StoreOptions {
        StoreOptions {
            sync_writes: false,
            telemetry_retention: Duration::ZERO,
            event_retention: Duration::ZERO,
            dead_letter_retention: Duration::ZERO,
            ..Default::default()
        }
    }

    #[test]
    fn points_survive_sealing_and_reopen_and_duplicates_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let events: Vec<Event> = (0..7200)
            .map(|i| telemetry(T0 + i * 1000, i as u64 + 1, 20.0 + (i % 50) as f64 / 10.0))
            .collect();
        {
            let s = Store::open(dir.path(), opts()).unwrap();
            s.write(&events, &[]).unwrap();
            // The same events again, as a device retransmitting would send them.
            s.write(&events[100..200], &[]).unwrap();
            let state = Event {
                machine: machine(),
                ts_ms: T0,
                seq: 9999,
                body: EventBody::State(StateChange {
                    state: MachineState::Down,
                    reason: None,
                }),
            };
            s.write(&[state.clone(), state], &[]).unwrap();
            assert_eq!(
                s.points("s/l/m/temp", T0, T0 + 7_200_000)
                    .unwrap()
                    .unwrap()
                    .len(),
                7200
            );
            // Two hours of data: the first window is sealed once the second has passed the grace.
            let sealed = s.seal(T0 + 7_200_000).unwrap();
            assert!(sealed >= 3600, "{sealed}");
            let pts = s.points("s/l/m/temp", T0, T0 + 7_200_000).unwrap().unwrap();
            assert_eq!(pts.len(), 7200);
            assert_eq!(
                pts,
                events
                    .iter()
                    .map(|e| match &e.body {
                        EventBody::Telemetry(t) => (e.ts_ms, t.readings[0].value),
                        _ => unreachable!(),
                    })
                    .collect::<Vec<_>>()
            );
        }
        let s = Store::open(dir.path(), opts()).unwrap();
        assert_eq!(
            s.points("s/l/m/temp", T0, T0 + 7_200_000)
                .unwrap()
                .unwrap()
                .len(),
            7200
        );
        assert_eq!(
            s.series()
                .iter()
                .map(|x| x.name.as_str())
                .collect::<Vec<_>>(),
            ["s/l/m/temp"]
        );
        assert_eq!(
            s.events(&machine(), T0, T0 + 1, None, 100)
                .unwrap()
                .unwrap()
                .len(),
            1
        );
        // A late point for a sealed window merges into its block.
        s.write(&[telemetry(T0 + 500, 1, 99.5)], &[]).unwrap();
        s.seal_all().unwrap();
        let pts = s.points("s/l/m/temp", T0, T0 + 1000).unwrap().unwrap();
        assert_eq!(pts, vec![(T0, 20.0), (T0 + 500, 99.5)]);
        assert!(s.points("nope", 0, 1).unwrap().is_none());
    }

    #[test]
    fn head_points_of_the_first_layout_are_read_merged_and_sealed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), opts()).unwrap();
            // Registers the series (id 0) and writes a chunk at T0 + 2000.
            s.write(&[telemetry(T0 + 2000, 3, 3.0)], &[]).unwrap();
            // Points as the first layout wrote them: one key (series · ts) per point, value
            // big-endian; the one at T0 + 2000 was written before the chunk and is older.
            for (ts, v) in [(T0, 1.0f64), (T0 + 1000, 2.0), (T0 + 2000, -1.0)] {
                s.db.put_cf(s.cf(CF_HEAD), series_ts_key(0, ts), v.to_be_bytes())
                    .unwrap();
            }
        }
        let s = Store::open(dir.path(), opts()).unwrap();
        let want = vec![(T0, 1.0), (T0 + 1000, 2.0), (T0 + 2000, 3.0)];
        assert_eq!(
            s.points("s/l/m/temp", T0, T0 + 3000).unwrap().unwrap(),
            want
        );
        assert_eq!(
            s.points("s/l/m/temp", T0 + 1, T0 + 2000).unwrap().unwrap(),
            vec![(T0 + 1000, 2.0)]
        );
        // Reopening found the window from both encodings; sealing merges them into one block.
        assert_eq!(s.seal_all().unwrap(), 4);
        assert_eq!(
            s.points("s/l/m/temp", T0, T0 + 3000).unwrap().unwrap(),
            want
        );
        let head_keys = s.db.iterator_cf(s.cf(CF_HEAD), IteratorMode::Start).count();
        assert_eq!(head_keys, 0);
    }

    #[test]
    fn memory_reports_memtables_until_they_are_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), opts()).unwrap();
        let empty = s.memory().unwrap().memtables;
        let events: Vec<Event> = (0..500)
            .map(|i| telemetry(T0 + i, i as u64 + 1, 1.0))
            .collect();
        s.write(&events, &[]).unwrap();
        let written = s.memory().unwrap();
        assert!(
            written.memtables > empty,
            "{written:?} after a write, {empty} before"
        );
        s.flush().unwrap();
        let flushed = s.memory().unwrap();
        assert!(
            flushed.memtables < written.memtables,
            "{flushed:?} after a flush"
        );
        assert!(
            flushed.table_readers > 0,
            "the flushed SST files are open: {flushed:?}"
        );
    }

    #[test]
    fn one_batch_writes_one_head_chunk_per_series_and_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), opts()).unwrap();
        let window = s.window_ms();
        // 10 points in the first window, 5 in the next, one batch.
        let events: Vec<Event> = (0..15)
            .map(|i| {
                let ts = if i < 10 {
                    T0 + i * 1000
                } else {
                    T0 + window + i * 1000
                };
                telemetry(ts, i as u64 + 1, i as f64)
            })
            .collect();
        s.write(&events, &[]).unwrap();
        let keys: Vec<Box<[u8]>> =
            s.db.iterator_cf(s.cf(CF_HEAD), IteratorMode::Start)
                .map(|kv| kv.unwrap().0)
                .collect();
        assert_eq!(keys.len(), 2, "one chunk per window");
        // A one-point chunk stores only its value.
        s.write(&[telemetry(T0 + 2 * window, 99, 5.5)], &[])
            .unwrap();
        type Entry = (Box<[u8]>, Box<[u8]>);
        let single: Vec<Entry> =
            s.db.iterator_cf(s.cf(CF_HEAD), IteratorMode::Start)
                .map(|kv| kv.unwrap())
                .filter(|(k, _)| key_ts(&k[4..12]) == T0 + 2 * window)
                .collect();
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].1.len(), 8);
        assert_eq!(
            s.points("s/l/m/temp", T0 + 2 * window, T0 + 3 * window)
                .unwrap()
                .unwrap(),
            vec![(T0 + 2 * window, 5.5)]
        );
        assert!(keys.iter().all(|k| k.len() == 20));
        let pts = s
            .points("s/l/m/temp", T0, T0 + 2 * window)
            .unwrap()
            .unwrap();
        assert_eq!(pts.len(), 15);
        // A query starting after a chunk's first point still sees the chunk's later points.
        let pts = s
            .points("s/l/m/temp", T0 + 5500, T0 + 8000)
            .unwrap()
            .unwrap();
        assert_eq!(pts, vec![(T0 + 6000, 6.0), (T0 + 7000, 7.0)]);
        // A rewrite of the same timestamp in a later batch wins.
        s.write(&[telemetry(T0 + 6000, 7, 60.0)], &[]).unwrap();
        let pts = s
            .points("s/l/m/temp", T0 + 5500, T0 + 8000)
            .unwrap()
            .unwrap();
        assert_eq!(pts, vec![(T0 + 6000, 60.0), (T0 + 7000, 7.0)]);
        s.seal_all().unwrap();
        let pts = s
            .points("s/l/m/temp", T0 + 5500, T0 + 8000)
            .unwrap()
            .unwrap();
        assert_eq!(pts, vec![(T0 + 6000, 60.0), (T0 + 7000, 7.0)]);
        let corrupt = HeadEntry::decode(&[0u8; 20], &[9, 0, 0]).unwrap_err();
        assert!(
            corrupt.to_string().contains("unknown chunk version 9"),
            "{corrupt}"
        );
        for (k, v, want) in [
            (&[0u8; 20][..], &[1u8, 0, 0][..], "chunk of 2 bytes"),
            (&[0u8; 20][..], &[][..], "empty chunk"),
            (
                &[0u8; 12][..],
                &[0u8; 5][..],
                "point value of 5 bytes, not 8",
            ),
            (&[0u8; 7][..], &[0u8; 8][..], "key of 7 bytes"),
        ] {
            let err = HeadEntry::decode(k, v).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("head"), "{err}");
        }
    }

    #[test]
    fn queries_see_every_point_while_windows_are_being_sealed() {
        // A query reads blocks, then the head; a seal moves points from the head into a block.
        // Both reads come from one snapshot, so a seal in between cannot hide points.
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(dir.path(), opts()).unwrap());
        let window = s.window_ms();
        let per_window = 10;
        let windows = 300;
        let sealer = {
            let s = s.clone();
            std::thread::spawn(move || {
                for w in 0..windows {
                    let events: Vec<Event> = (0..per_window)
                        .map(|i| {
                            let ts = T0 + w * window + i * (window / per_window);
                            telemetry(ts, (w * per_window + i + 1) as u64, i as f64)
                        })
                        .collect();
                    s.write(&events, &[]).unwrap();
                    s.seal_all().unwrap();
                }
            })
        };
        let (mut checked, mut seen) = (0, 0);
        while !sealer.is_finished() || checked == 0 {
            let n = s
                .points("s/l/m/temp", T0, T0 + windows * window)
                .unwrap()
                .unwrap_or_default()
                .len();
            // Points are only ever added, whole windows at a time.
            assert!(n >= seen, "a query saw {n} points after one saw {seen}");
            assert_eq!(n % per_window as usize, 0, "{n} points");
            (checked, seen) = (checked + 1, n);
        }
        sealer.join().unwrap();
        assert_eq!(
            s.points("s/l/m/temp", T0, T0 + windows * window)
                .unwrap()
                .unwrap()
                .len(),
            (windows * per_window) as usize
        );
    }
    #[test]
    fn retention_removes_old_data_of_each_kind() {
        let dir = tempfile::tempdir().unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        let day = 86_400_000;
        let s = Store::open(
            dir.path(),
            StoreOptions {
                sync_writes: false,
                telemetry_retention: Duration::from_secs(86_400),
                event_retention: Duration::from_secs(2 * 86_400),
                dead_letter_retention: Duration::from_secs(86_400),
                ..Default::default()
            },
        )
        .unwrap();
        let old = now - 3 * day;
        let state = |ts| Event {
            machine: machine(),
            ts_ms: ts,
            seq: ts as u64,
            body: EventBody::State(StateChange {
                state: MachineState::Idle,
                reason: None,
            }),
        };
        s.write(
            &[
                telemetry(old, 1, 1.0),
                telemetry(now - 1000, 2, 2.0),
                state(old),
                state(now - 1000),
            ],
            &[
                DeadLetter::new(old, "x", b"y", "bad_json", "e".into()),
                DeadLetter::new(now, "x", b"z", "bad_json", "e".into()),
            ],
        )
        .unwrap();
        s.seal_all().unwrap();
        s.enforce_retention(now).unwrap();
        s.compact().unwrap();
        assert_eq!(
            s.points("s/l/m/temp", 0, now + 1).unwrap().unwrap(),
            vec![(now - 1000, 2.0)]
        );
        assert_eq!(
            s.events(&machine(), 0, now + 1, None, 10)
                .unwrap()
                .unwrap()
                .len(),
            1
        );
        let dl = s.dead_letters(0, 10).unwrap();
        assert_eq!(dl.len(), 1);
        assert_eq!(dl[0].payload, "z");
    }
}
