//! The trigger log: every device event the edge stores, in store order, for the functions that
//! read it from their own durable cursors.
//!
//! | CF | key | value |
//! |---|---|---|
//! | `triggers` | first log seq `u64` | the events of one write batch (zstd): each a sync item (seq, stored ms, event) with its length first |
//! | `meta` | `triggers_next` | the next log seq (so a trimmed, empty log does not reuse seqs) |
//! | `functions` | `c/{name}` | a function's cursor: the next log seq it has not applied |
//!
//! Each event has a log seq; the events of one store write are one RocksDB value keyed by the
//! first seq (one key per batch, not per event: the log adds a few percent to ingest, not a
//! key per reading). A record is written **in the same write batch** as the events it carries,
//! so a function sees exactly what devices were acknowledged for. The log is written only while at least one
//! function has a cursor (it costs nothing otherwise). A function's effects and its cursor move
//! are written in one batch ([`Store::commit_function`]): a crash before it leaves both undone,
//! after it both done. Records are deleted once every cursor is past them, and in any case after
//! the telemetry retention (a cursor left behind then skips to the oldest record, counted).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use millrace_shared::Event;
use millrace_shared::sync::{ItemDecoder, SyncItem};
use rocksdb::{IteratorMode, ReadOptions, WriteBatch};

use super::functions::KvWrite;
use super::{CF_FUNCTIONS, CF_META, CF_TRIGGERS, Store, StoreError};

const META_NEXT: &[u8] = b"triggers_next";

fn cursor_key(name: &str) -> Vec<u8> {
    format!("c/{name}").into_bytes()
}

/// The log's counters, kept in memory and rebuilt at open.
#[derive(Debug, Default)]
pub(crate) struct TriggerLog {
    /// Functions with a cursor: the log is written while there is one.
    readers: AtomicUsize,
    /// Cleared when the functions service is off: nobody reads the log.
    stopped: std::sync::atomic::AtomicBool,
    /// The next log seq (under the store's write lock).
    next: AtomicU64,
    /// The next seq readers may read up to, with a condvar woken by each write that has
    /// readers waiting.
    durable: Mutex<u64>,
    written: Condvar,
    /// Readers waiting in [`Store::wait_triggers`].
    waiting: AtomicUsize,
    /// The writer's zstd context and record buffer, reused from write to write (under the
    /// store's write lock; creating a context per write cost more than compressing).
    writer: Mutex<LogWriter>,
}

/// What each write of the log reuses.
#[derive(Default)]
struct LogWriter {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    value: Vec<u8>,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter").finish_non_exhaustive()
    }
}

/// A write batch's log record being built: each event's sync item, length first.
pub(crate) struct PendingLog {
    value: Vec<u8>,
    events: u64,
}

impl PendingLog {
    /// Adds an event as its sync item (encoded with [`millrace_shared::sync::encode_item`]; its
    /// seq is ignored: an event's log seq is its place in the log).
    pub(crate) fn push(&mut self, item: &[u8]) {
        put_len(&mut self.value, item.len());
        self.value.extend_from_slice(item);
        self.events += 1;
    }
}

impl TriggerLog {
    /// Whether writes add records.
    pub(crate) fn active(&self) -> bool {
        self.readers.load(Ordering::Relaxed) > 0 && !self.stopped.load(Ordering::Relaxed)
    }

    pub(crate) fn begin(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// A batch holding records up to `next` is durable: wake the readers.
    pub(crate) fn commit(&self, next: u64) {
        if next == self.next.swap(next, Ordering::Relaxed) {
            return;
        }
        *self.durable.lock().expect("trigger log") = next;
        // A reader counts itself waiting before it checks `durable`: it sees this write or is
        // woken. A reader that is behind never waits, and then a write wakes nobody.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.written.notify_all();
        }
    }

    /// Starts a write batch's record (the buffer of the last one, emptied).
    pub(crate) fn start(&self) -> PendingLog {
        let mut value = std::mem::take(&mut self.writer.lock().expect("log writer").value);
        value.clear();
        PendingLog { value, events: 0 }
    }
}

/// One record of the log.
#[derive(Debug, Clone)]
pub struct TriggerRecord {
    /// Its log seq.
    pub seq: u64,
    /// When the edge stored the event, Unix ms.
    pub stored_ms: i64,
    /// The event.
    pub event: Event,
}

/// What one batch of invocations of a function changes, written atomically with its cursor.
#[derive(Debug, Default)]
pub struct FunctionCommit {
    /// Key-value writes, in order (a later write of a key wins).
    pub kv: Vec<KvWrite>,
    /// Alerts: (raised at ms, JSON).
    pub alerts: Vec<(i64, Vec<u8>)>,
    /// Derived points (and other events) to store; they do not enter the trigger log.
    pub points: Vec<Event>,
    /// A scheduled run ended: when it was fired, Unix ms (so a restart knows what it missed).
    pub schedule_done: Option<i64>,
    /// The points and alerts come from a replay over history: marked as backfill for the cloud.
    pub backfill: bool,
    /// A replay's progress to keep with its effects (JSON, owned by the functions module).
    pub replay: Option<Vec<u8>>,
}

impl FunctionCommit {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
            && self.alerts.is_empty()
            && self.points.is_empty()
            && self.schedule_done.is_none()
            && self.replay.is_none()
    }
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn get_len(b: &[u8], at: &mut usize) -> Option<usize> {
    let mut n = 0usize;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        n |= usize::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(n);
        }
    }
    None
}

fn batch_key(k: &[u8]) -> Result<u64, StoreError> {
    k.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            cf: CF_TRIGGERS,
            reason: "key is not 8 bytes".into(),
        })
}

/// A stored batch's items (zstd-compressed on disk), with a zstd context kept per thread.
fn unpack(first: u64, v: &[u8]) -> Result<Vec<u8>, StoreError> {
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let err = |e: &dyn std::fmt::Display| corrupt(first, &format!("decompressing: {e}"));
    let size = zstd::zstd_safe::get_frame_content_size(v).map_err(|e| err(&format!("{e:?}")))?;
    let Some(size) = size else {
        return zstd::stream::decode_all(v).map_err(|e| err(&e));
    };
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new().map_err(|e| err(&e))?);
        }
        d.as_mut()
            .expect("set above")
            .decompress(v, size as usize)
            .map_err(|e| err(&e))
    })
}

fn corrupt(seq: u64, reason: &str) -> StoreError {
    StoreError::Corrupt {
        cf: CF_TRIGGERS,
        reason: format!("record {seq}: {reason}"),
    }
}

impl Store {
    pub(super) fn load_triggers(&self) -> Result<(), StoreError> {
        let next = match self.db.get_cf(self.cf(CF_META), META_NEXT)? {
            Some(v) => {
                u64::from_be_bytes(v.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    cf: CF_META,
                    reason: "triggers_next is not 8 bytes".into(),
                })?)
            }
            None => 0,
        };
        let readers = self.function_cursors()?.len();
        let log = &self.triggers;
        log.next.store(next, Ordering::Relaxed);
        *log.durable.lock().expect("trigger log") = next;
        log.readers.store(readers, Ordering::Relaxed);
        Ok(())
    }

    /// Adds a write batch's log record (events from [`TriggerLog::start`]); returns the next
    /// seq after it.
    pub(super) fn put_triggers(&self, batch: &mut WriteBatch, log: PendingLog) -> u64 {
        let first = self.triggers.begin();
        let next = first + log.events;
        let mut w = self.triggers.writer.lock().expect("log writer");
        // zstd at its fastest: the items repeat machine and metric names, and every byte here
        // also goes through the fsync'd WAL and a memtable flush.
        let zstd = match &mut w.zstd {
            Some(z) => z,
            none => none.insert(zstd::bulk::Compressor::new(1).expect("a zstd context")),
        };
        let packed = zstd.compress(&log.value).expect("compressing to memory");
        w.value = log.value;
        batch.put_cf(self.cf(CF_TRIGGERS), first.to_be_bytes(), &packed);
        batch.put_cf(self.cf(CF_META), META_NEXT, next.to_be_bytes());
        next
    }

    /// Stops writing the trigger log (the functions service is off: nobody reads it).
    pub fn stop_trigger_log(&self) {
        self.triggers.stopped.store(true, Ordering::Relaxed);
    }

    /// The next log seq: records below it are written.
    pub fn trigger_next(&self) -> u64 {
        *self.triggers.durable.lock().expect("trigger log")
    }

    /// Waits until the log holds a record at `seq` or later, at most `timeout`; returns whether
    /// it does.
    pub fn wait_triggers(&self, seq: u64, timeout: Duration) -> bool {
        let log = &self.triggers;
        log.waiting.fetch_add(1, Ordering::SeqCst);
        let durable = log.durable.lock().expect("trigger log");
        let (durable, _) = log
            .written
            .wait_timeout_while(durable, timeout, |next| *next <= seq)
            .expect("trigger log");
        let got = *durable > seq;
        log.waiting.fetch_sub(1, Ordering::SeqCst);
        got
    }

    /// The first seq of the stored batch holding `seq`, or of the first one after it.
    fn batch_start(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        let key = seq.to_be_bytes();
        let cf = self.cf(CF_TRIGGERS);
        let before = self
            .db
            .iterator_cf(cf, IteratorMode::From(&key, rocksdb::Direction::Reverse))
            .next();
        let after = || {
            self.db
                .iterator_cf(cf, IteratorMode::From(&key, rocksdb::Direction::Forward))
                .next()
        };
        match before.or_else(after) {
            Some(item) => Ok(Some(batch_key(&item?.0)?)),
            None => Ok(None),
        }
    }

    /// About `max` events from seq `from` on, in order (whole stored batches: may be more).
    /// The first may be past `from` when records were trimmed.
    pub fn trigger_records(&self, from: u64, max: usize) -> Result<Vec<TriggerRecord>, StoreError> {
        let Some(start) = self.batch_start(from)? else {
            return Ok(vec![]);
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_be_bytes().to_vec());
        let mut out = Vec::with_capacity(max.min(4096));
        let mut decoder = ItemDecoder::default();
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_TRIGGERS), ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            let first = batch_key(&k)?;
            let v = unpack(first, &v)?;
            let mut at = 0;
            let mut seq = first;
            while at < v.len() {
                let len = get_len(&v, &mut at).ok_or_else(|| corrupt(first, "bad length"))?;
                let bytes = v.get(at..at + len).ok_or_else(|| corrupt(first, "short"))?;
                at += len;
                if seq >= from {
                    let SyncItem {
                        stored_ms, event, ..
                    } = decoder
                        .decode(bytes)
                        .map_err(|e| corrupt(seq, &e.to_string()))?;
                    out.push(TriggerRecord {
                        seq,
                        stored_ms,
                        event,
                    });
                }
                seq += 1;
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// When the record at `seq` (or the first after it) was stored. Reads only the header of
    /// the first item of its stored batch (one write: one time), not the events.
    pub fn trigger_stored_ms(&self, seq: u64) -> Result<Option<i64>, StoreError> {
        let Some(start) = self.batch_start(seq)? else {
            return Ok(None);
        };
        let Some(v) = self.db.get_cf(self.cf(CF_TRIGGERS), start.to_be_bytes())? else {
            return Ok(None);
        };
        let v = unpack(start, &v)?;
        let mut at = 0;
        // The item's length, then its header: zigzag varints seq and stored ms.
        let header = get_len(&v, &mut at)
            .and_then(|_| get_len(&v, &mut at))
            .and_then(|_| get_len(&v, &mut at));
        let zigzag = |n: usize| ((n >> 1) as i64) ^ -((n & 1) as i64);
        Ok(header.map(zigzag))
    }

    /// A function's cursor: the next log seq it has not applied.
    pub fn function_cursor(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let v = self.db.get_cf(self.cf(CF_FUNCTIONS), cursor_key(name))?;
        v.map(|v| {
            v.as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    cf: CF_FUNCTIONS,
                    reason: format!("cursor of {name} is not 8 bytes"),
                })
        })
        .transpose()
    }

    /// Every function's cursor, by name.
    pub fn function_cursors(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.per_function(b'c')?
            .into_iter()
            .map(|(name, v)| {
                let seq = <[u8; 8]>::try_from(v.as_slice()).map_err(|_| StoreError::Corrupt {
                    cf: CF_FUNCTIONS,
                    reason: format!("cursor of {name} is not 8 bytes"),
                })?;
                Ok((name, u64::from_be_bytes(seq)))
            })
            .collect()
    }

    /// Gives a function a cursor at the log's end (it sees events stored from now on) unless it
    /// has one; returns the cursor. From then on the log is written.
    pub fn open_function_cursor(&self, name: &str) -> Result<u64, StoreError> {
        // Under the write lock: no batch can be between taking its seqs and committing them.
        let _guard = self.write_lock.lock().expect("write lock");
        if let Some(c) = self.function_cursor(name)? {
            return Ok(c);
        }
        let next = self.triggers.begin();
        self.db
            .put_cf(self.cf(CF_FUNCTIONS), cursor_key(name), next.to_be_bytes())?;
        self.triggers.readers.fetch_add(1, Ordering::Relaxed);
        Ok(next)
    }

    /// Removes a function's cursor (it no longer reads the log).
    pub fn close_function_cursor(&self, name: &str) -> Result<(), StoreError> {
        let _guard = self.write_lock.lock().expect("write lock");
        if self.function_cursor(name)?.is_some() {
            self.db.delete_cf(self.cf(CF_FUNCTIONS), cursor_key(name))?;
            self.triggers.readers.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Applies what a function's invocations changed and, with `cursor`, moves its cursor
    /// there, all in one atomic batch. Not fsync'd: a crash of the process loses nothing; a
    /// power cut may lose the batch, and then it is redone as a whole (cursor and effects go
    /// together, so nothing is doubled either way).
    pub fn commit_function(
        &self,
        name: &str,
        commit: &FunctionCommit,
        cursor: Option<u64>,
    ) -> Result<(), StoreError> {
        let extra = |store: &Store,
                     batch: &mut WriteBatch,
                     outbox: Option<&mut super::outbox::PendingRecords>| {
            store.put_function_state(
                batch,
                name,
                &commit.kv,
                &commit.alerts,
                commit.backfill,
                outbox,
            );
            if let Some(due) = commit.schedule_done {
                store.put_schedule_mark(batch, name, due);
            }
            if let Some(r) = &commit.replay {
                store.put_replay(batch, name, r);
            }
            if let Some(c) = cursor {
                batch.put_cf(store.cf(CF_FUNCTIONS), cursor_key(name), c.to_be_bytes());
            }
        };
        if commit.points.is_empty() && (commit.alerts.is_empty() || self.outbox.is_none()) {
            // Nothing for the outbox: no need to take the write path's lock.
            let mut batch = WriteBatch::default();
            extra(self, &mut batch, None);
            if !batch.is_empty() {
                self.db.write(batch)?;
            }
            Ok(())
        } else {
            let origin = if commit.backfill {
                super::write::Origin::Backfill
            } else {
                super::write::Origin::Derived
            };
            self.write_with(&commit.points, &[], &[], false, origin, extra)
                .map(|_| ())
        }
    }

    /// Deletes the records every cursor has passed, and those older than the telemetry
    /// retention. Returns the records deleted.
    pub fn trim_triggers(&self, now_ms: i64) -> Result<u64, StoreError> {
        let retention = self.opts.telemetry_retention;
        let cutoff_ms = (!retention.is_zero()).then(|| now_ms - retention.as_millis() as i64);
        let cursors = self.function_cursors()?;
        let mut keep_from = cursors
            .iter()
            .map(|(_, c)| *c)
            .min()
            .unwrap_or_else(|| self.trigger_next());
        let first = match self.trigger_records(0, 1)?.first() {
            Some(r) => r.seq,
            None => return Ok(0),
        };
        if let Some(cut) = cutoff_ms {
            // Records are stored in time order: the first one at or after the cutoff, by a
            // binary search over seqs (the log has no gaps past its first record).
            let mut lo = first;
            let mut hi = self.trigger_next().max(first);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                match self.trigger_records(mid, 1)?.first() {
                    Some(r) if r.stored_ms < cut => lo = r.seq + 1,
                    _ => hi = mid,
                }
            }
            keep_from = keep_from.max(lo);
        }
        // Whole stored batches only: the one holding `keep_from` stays.
        let keep_key = if keep_from >= self.trigger_next() {
            keep_from
        } else {
            match self.batch_start(keep_from)? {
                Some(k) => k.min(keep_from),
                None => return Ok(0),
            }
        };
        if keep_key <= first {
            return Ok(0);
        }
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_TRIGGERS),
            0u64.to_be_bytes(),
            keep_key.to_be_bytes(),
        );
        self.db.write(batch)?;
        Ok(keep_key - first)
    }
}

#[cfg(test)]
mod tests {
    use millrace_shared::{EventBody, MachineId, Reading, Telemetry};

    use super::*;
    use crate::store::StoreOptions;

    fn temp(seq: u64) -> Event {
        Event {
            machine: MachineId::new("s", "l", "m").unwrap(),
            ts_ms: 1_767_600_000_000 + seq as i64,
            seq,
            body: EventBody::Telemetry(Telemetry {
                readings: vec![Reading {
                    name: "t".into(),
                    value: seq as f64,
                    unit: Default::default(),
                }],
            }),
        }
    }

    #[test]
    fn the_log_is_written_while_a_cursor_exists_and_a_commit_moves_state_and_cursor_together() {
        let dir = tempfile::tempdir().unwrap();
        let opts = || StoreOptions {
            sync_writes: false,
            ..Default::default()
        };
        let store = Store::open(dir.path(), opts()).unwrap();
        store.write(&[temp(1)], &[]).unwrap();
        assert_eq!(store.trigger_next(), 0, "no reader: no log");
        assert_eq!(store.open_function_cursor("f").unwrap(), 0);
        store.write(&[temp(2), temp(3)], &[]).unwrap();
        let records = store.trigger_records(0, 10).unwrap();
        assert_eq!(
            records.iter().map(|r| r.event.seq).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1]);
        assert!(store.wait_triggers(1, Duration::ZERO));
        let stored = store.trigger_stored_ms(1).unwrap().unwrap();
        assert_eq!(Some(stored), records.first().map(|r| r.stored_ms));
        assert!((chrono::Utc::now().timestamp_millis() - stored).abs() < 60_000);
        assert!(!store.wait_triggers(2, Duration::ZERO));
        // Effects and cursor in one batch; derived points are stored, not logged.
        let commit = FunctionCommit {
            kv: vec![(b"k".to_vec(), Some(b"v".to_vec()))],
            alerts: vec![],
            points: vec![temp(9)],
            ..Default::default()
        };
        store.commit_function("f", &commit, Some(2)).unwrap();
        assert_eq!(store.function_cursor("f").unwrap(), Some(2));
        assert_eq!(store.kv_get("f", b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(store.trigger_next(), 2);
        // Reopened: the seq goes on, the cursor and its reader are back.
        drop(store);
        let store = Store::open(dir.path(), opts()).unwrap();
        assert_eq!(store.trim_triggers(0).unwrap(), 2, "the cursor passed both");
        store.write(&[temp(4)], &[]).unwrap();
        assert_eq!(store.trigger_records(0, 10).unwrap()[0].seq, 2);
        // The functions service off: nobody reads, nothing is logged.
        store.stop_trigger_log();
        store.write(&[temp(5)], &[]).unwrap();
        assert_eq!(store.trigger_next(), 3, "log stopped");
        drop(store);
        let store = Store::open(dir.path(), opts()).unwrap();
        store.delete_function("f").unwrap();
        store.write(&[temp(6)], &[]).unwrap();
        assert_eq!(store.trigger_next(), 3, "no reader left: no log");
    }

    fn alert(id: &str) -> Vec<u8> {
        serde_json::to_vec(&millrace_shared::Alert {
            id: id.into(),
            ts_ms: 1,
            trigger: "topic".into(),
            function: "f".into(),
            version: 1,
            severity: "critical".into(),
            message: "hot".into(),
            device: "s/l/m".into(),
            topic: "factory/s/l/m/telemetry".into(),
            event_ts_ms: 1,
        })
        .unwrap()
    }

    #[test]
    fn alerts_are_queued_for_the_cloud_in_the_commit_with_seqs_of_the_events_counter() {
        use crate::store::outbox::Lane;
        let dir = tempfile::tempdir().unwrap();
        let opts = || StoreOptions {
            sync_writes: false,
            outbox_quota_bytes: Some(1 << 30),
            ..Default::default()
        };
        let store = Store::open(dir.path(), opts()).unwrap();
        store.write(&[temp(1), temp(2)], &[]).unwrap();
        let now = chrono::Utc::now().timestamp_millis();
        let live = FunctionCommit {
            kv: vec![(b"n".to_vec(), Some(b"2".to_vec()))],
            alerts: vec![(now, alert("f:a:0")), (now, alert("f:a:1"))],
            ..Default::default()
        };
        store.commit_function("f", &live, Some(7)).unwrap();
        let replayed = FunctionCommit {
            alerts: vec![(now, alert("f:r:0"))],
            backfill: true,
            ..Default::default()
        };
        store.commit_function("f", &replayed, None).unwrap();
        store.write(&[temp(3)], &[]).unwrap();
        assert_eq!(store.function_cursor("f").unwrap(), Some(7));
        assert_eq!(store.kv_get("f", b"n").unwrap(), Some(b"2".to_vec()));
        let check = |store: &Store| {
            let o = store.outbox_status().unwrap().unwrap();
            assert_eq!(
                (o.items.telemetry, o.items.alerts, o.items.events),
                (3, 3, 0)
            );
            assert_eq!(o.next_seq, 7);
            let read = store
                .outbox_read(Lane::Alerts, 0, 100, u64::MAX, None)
                .unwrap();
            assert!(read.items.is_empty());
            let got: Vec<(u64, bool, String)> = read
                .alerts
                .iter()
                .map(|a| (a.seq, a.backfill, a.alert.id.clone()))
                .collect();
            assert_eq!(
                got,
                [
                    (3, false, "f:a:0".to_owned()),
                    (4, false, "f:a:1".to_owned()),
                    (5, true, "f:r:0".to_owned())
                ]
            );
            assert_eq!(read.span().map(|s| (s.0, s.1)), Some((3, 5)));
        };
        check(&store);
        // The edge's own alert list has them too.
        assert_eq!(store.alerts(0, i64::MAX, 10).unwrap().len(), 3);
        // Reopened: the counts are rebuilt from the records.
        drop(store);
        let store = Store::open(dir.path(), opts()).unwrap();
        check(&store);
        let read = store
            .outbox_read(Lane::Alerts, 0, 100, u64::MAX, None)
            .unwrap();
        store
            .outbox_ack(Lane::Alerts, 3, 5, 0, (3, read.bytes), read.generation)
            .unwrap();
        let o = store.outbox_status().unwrap().unwrap();
        assert_eq!((o.items.telemetry, o.items.alerts), (3, 0));
        assert_eq!(o.bytes.alerts, 0);
    }
}
