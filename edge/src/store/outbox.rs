//! The outbox: everything the edge stored that the cloud has not acknowledged yet.
//!
//! Each event written to the store also gets an *outbox sequence number* (one counter per edge,
//! never reused, persisted in `meta`) and an outbox record, **in the same RocksDB write batch**
//! as the data itself: an event is either stored and queued for the cloud, or neither.
//!
//! Records live in three lanes so the sync client can send state, part and operator events, then
//! the alerts functions raised, before telemetry: key = lane byte · seq. Alerts take their seqs
//! from the same counter (see [`Store::commit_function`](super::Store::commit_function)). An acknowledged range is deleted with one range delete; what
//! is left is exactly what still has to be sent, so resuming after a restart needs no separate
//! cursor.
//!
//! Disk quota: when the records exceed `quota` bytes (key + value sizes), the oldest telemetry is
//! dropped first, down to 90 % of the quota; then alerts, and events only when nothing else is
//! left. Every
//! dropped range is counted, logged, persisted and reported to the cloud with the next batch, so
//! the cloud knows those sequence numbers will never arrive.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use millrace_shared::sync::{AlertItem, ItemDecoder, SeqRange, SyncItem, decode_alert_record};
use millrace_shared::{EventKind, MachineId};
use rocksdb::{ColumnFamily, IteratorMode, ReadOptions, WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};

use super::series::IndexName;
use super::{CF_META, CF_OUTBOX, CF_RECENT, Store, StoreError};

const META_NEXT: &[u8] = b"outbox_next";
const META_DROPPED: &[u8] = b"outbox_dropped";

/// An outbox lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// State, part and operator events: sent first, dropped last.
    Events = 0,
    /// Telemetry: sent after events and alerts, dropped first.
    Telemetry = 1,
    /// Alerts raised by functions: sent after events, dropped after telemetry.
    Alerts = 2,
}

impl Lane {
    /// Every lane, in sending order (and dropped in the reverse order).
    pub const ALL: [Lane; 3] = [Lane::Events, Lane::Alerts, Lane::Telemetry];

    fn of(kind: EventKind) -> Self {
        if kind == EventKind::Telemetry {
            Self::Telemetry
        } else {
            Self::Events
        }
    }

    /// Name in metrics and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Telemetry => "telemetry",
            Self::Alerts => "alerts",
        }
    }
}

fn key(lane: Lane, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = lane as u8;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn key_seq(k: &[u8]) -> u64 {
    u64::from_be_bytes(k[1..9].try_into().expect("outbox keys are 9 bytes"))
}

/// What was dropped under the quota: totals, and ranges not yet reported to the cloud.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Dropped {
    /// Per lane (by its number; stores written before the alerts lane hold two).
    items: Vec<u64>,
    unreported: Vec<SeqRange>,
}

impl Dropped {
    fn add(&mut self, lane: Lane, n: u64) {
        let i = lane as usize;
        if self.items.len() <= i {
            self.items.resize(i + 1, 0);
        }
        self.items[i] += n;
    }

    fn of(&self, lane: Lane) -> u64 {
        self.items.get(lane as usize).copied().unwrap_or(0)
    }
}

#[derive(Debug, Default)]
struct LaneCounters {
    items: AtomicU64,
    bytes: AtomicU64,
}

/// The outbox's counters, kept in memory and rebuilt at open.
#[derive(Debug)]
pub(crate) struct OutboxState {
    next: AtomicU64,
    lanes: [LaneCounters; 3],
    quota: u64,
    dropped: Mutex<Dropped>,
    /// Bumped by every quota drop.
    drops: AtomicU64,
    /// Woken after each write that added records.
    notify: Arc<tokio::sync::Notify>,
}

/// Records added by one write batch, committed to the counters once the batch is durable.
#[derive(Debug)]
pub(crate) struct PendingRecords {
    next: u64,
    added: [(u64, u64); 3],
}

impl PendingRecords {
    pub(crate) fn next_seq(&mut self) -> u64 {
        let s = self.next;
        self.next += 1;
        s
    }

    pub(crate) fn put(
        &mut self,
        batch: &mut WriteBatch,
        cf: &ColumnFamily,
        kind: EventKind,
        seq: u64,
        record: &[u8],
    ) {
        self.put_in(batch, cf, Lane::of(kind), seq, record);
    }

    /// Queues an alert's record ([`millrace_shared::sync::encode_alert_record`]) under `seq`.
    pub(crate) fn put_alert(
        &mut self,
        batch: &mut WriteBatch,
        cf: &ColumnFamily,
        seq: u64,
        record: &[u8],
    ) {
        self.put_in(batch, cf, Lane::Alerts, seq, record);
    }

    fn put_in(
        &mut self,
        batch: &mut WriteBatch,
        cf: &ColumnFamily,
        lane: Lane,
        seq: u64,
        record: &[u8],
    ) {
        batch.put_cf(cf, key(lane, seq), record);
        let a = &mut self.added[lane as usize];
        a.0 += 1;
        a.1 += 9 + record.len() as u64;
    }

    pub(crate) fn finish(&self, batch: &mut WriteBatch, meta: &ColumnFamily) {
        batch.put_cf(meta, META_NEXT, self.next.to_be_bytes());
    }
}

impl OutboxState {
    /// Starts a write batch's records (call under the store's write lock).
    pub(crate) fn begin(&self) -> PendingRecords {
        PendingRecords {
            next: self.next.load(Ordering::Relaxed),
            added: [(0, 0); 3],
        }
    }

    /// The batch is durable: count its records.
    pub(crate) fn commit(&self, p: PendingRecords) {
        self.next.store(p.next, Ordering::Relaxed);
        for (lane, (items, bytes)) in self.lanes.iter().zip(p.added) {
            lane.items.fetch_add(items, Ordering::Relaxed);
            lane.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if p.added.iter().any(|(n, _)| *n > 0) {
            self.notify.notify_one();
        }
    }

    fn total_bytes(&self) -> u64 {
        self.lanes
            .iter()
            .map(|l| l.bytes.load(Ordering::Relaxed))
            .sum()
    }
}

/// Appends one (id, device seq, ts) entry to a `recent` record.
pub(crate) fn put_recent(out: &mut Vec<u8>, id: u32, seq: u64, ts: i64) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&ts.to_le_bytes());
}

/// The outbox at a glance.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxStatus {
    /// Records waiting, per lane.
    pub items: LaneFigures,
    /// Bytes of records waiting, per lane.
    pub bytes: LaneFigures,
    /// The disk quota.
    pub quota_bytes: u64,
    /// The next outbox sequence number.
    pub next_seq: u64,
    /// When the oldest waiting record was stored, Unix ms.
    pub oldest_stored_ms: Option<i64>,
    /// Records dropped under the quota since the store was created, per lane.
    pub dropped: LaneFigures,
}

/// A figure per lane.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LaneFigures {
    /// State, part and operator events.
    pub events: u64,
    /// Telemetry.
    pub telemetry: u64,
    /// Alerts raised by functions.
    pub alerts: u64,
}

impl LaneFigures {
    fn from(f: impl Fn(Lane) -> u64) -> Self {
        Self {
            events: f(Lane::Events),
            telemetry: f(Lane::Telemetry),
            alerts: f(Lane::Alerts),
        }
    }

    /// The figure of `lane`.
    pub fn of(&self, lane: Lane) -> u64 {
        match lane {
            Lane::Events => self.events,
            Lane::Telemetry => self.telemetry,
            Lane::Alerts => self.alerts,
        }
    }

    /// Every lane.
    pub fn total(&self) -> u64 {
        self.events + self.telemetry + self.alerts
    }
}

/// Outbox records read for sending.
#[derive(Debug, Default)]
pub struct OutboxRead {
    /// Decoded items (events and telemetry lanes), in seq order.
    pub items: Vec<SyncItem>,
    /// Decoded alerts (alerts lane), in seq order.
    pub alerts: Vec<AlertItem>,
    /// Bytes of their records.
    pub bytes: u64,
    /// The quota-drop generation when they were read (see [`Store::outbox_ack`]).
    pub generation: u64,
}

impl OutboxRead {
    /// Records read.
    pub fn len(&self) -> usize {
        self.items.len() + self.alerts.len()
    }

    /// Whether nothing was read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first and last seq read, with when the first was stored.
    pub fn span(&self) -> Option<(u64, u64, i64)> {
        let first = self.items.first().map(|i| (i.seq, i.stored_ms));
        let first = first.or_else(|| self.alerts.first().map(|a| (a.seq, a.stored_ms)))?;
        let last = self.items.last().map(|i| i.seq);
        let last = last.or_else(|| self.alerts.last().map(|a| a.seq))?;
        Some((first.0, last, first.1))
    }
}

impl Store {
    pub(crate) fn load_outbox(&self, quota: u64) -> Result<OutboxState, StoreError> {
        let meta = self.cf(CF_META);
        let mut next = match self.db.get_cf(meta, META_NEXT)? {
            Some(v) => {
                u64::from_be_bytes(v.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                    cf: CF_META,
                    reason: "outbox_next is not 8 bytes".into(),
                })?)
            }
            None => 1,
        };
        let dropped: Dropped = match self.db.get_cf(meta, META_DROPPED)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                cf: CF_META,
                reason: e.to_string(),
            })?,
            None => Dropped::default(),
        };
        let lanes: [LaneCounters; 3] = Default::default();
        for item in self.db.iterator_cf(self.cf(CF_OUTBOX), IteratorMode::Start) {
            let (k, v) = item?;
            if k.len() != 9 || k[0] > Lane::Alerts as u8 {
                return Err(StoreError::Corrupt {
                    cf: CF_OUTBOX,
                    reason: "bad key".into(),
                });
            }
            let lane = &lanes[k[0] as usize];
            lane.items.fetch_add(1, Ordering::Relaxed);
            lane.bytes
                .fetch_add((k.len() + v.len()) as u64, Ordering::Relaxed);
            next = next.max(key_seq(&k) + 1);
        }
        Ok(OutboxState {
            next: AtomicU64::new(next),
            lanes,
            quota,
            dropped: Mutex::new(dropped),
            drops: AtomicU64::new(0),
            notify: Arc::new(tokio::sync::Notify::new()),
        })
    }

    fn outbox_state(&self) -> Result<&OutboxState, StoreError> {
        self.outbox.as_ref().ok_or(StoreError::NoOutbox)
    }

    /// Woken whenever records are added (`None` without an outbox).
    pub fn outbox_notify(&self) -> Option<Arc<tokio::sync::Notify>> {
        self.outbox.as_ref().map(|o| o.notify.clone())
    }

    /// Reads up to `max_items` records (and about `max_bytes`) of `lane`, from seq `from` on,
    /// contiguous in the lane. `in_flight` is a range of the lane being sent already: the read
    /// starts after it if it comes first, and otherwise stops before it, so that every batch
    /// stays one contiguous range that can be deleted on its own acknowledgement.
    pub fn outbox_read(
        &self,
        lane: Lane,
        from: u64,
        max_items: usize,
        max_bytes: u64,
        in_flight: Option<(u64, u64)>,
    ) -> Result<OutboxRead, StoreError> {
        let state = self.outbox_state()?;
        let mut out = OutboxRead {
            generation: state.drops.load(Ordering::Acquire),
            ..Default::default()
        };
        let mut start = from;
        let mut stop_at = u64::MAX;
        if let Some((a, b)) = in_flight
            && from <= b
        {
            let first = {
                let mut ro = ReadOptions::default();
                ro.set_iterate_range(key(lane, from).to_vec()..key(lane, u64::MAX).to_vec());
                self.db
                    .iterator_cf_opt(self.cf(CF_OUTBOX), ro, IteratorMode::Start)
                    .next()
                    .transpose()?
                    .map(|(k, _)| key_seq(&k))
            };
            match first {
                Some(f) if f >= a => start = b.saturating_add(1),
                _ => stop_at = a,
            }
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_range(key(lane, start).to_vec()..key(lane, stop_at).to_vec());
        let mut decoder = ItemDecoder::default();
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_OUTBOX), ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            let corrupt = |e: millrace_shared::WireError| StoreError::Corrupt {
                cf: CF_OUTBOX,
                reason: e.to_string(),
            };
            if lane == Lane::Alerts {
                let a = decode_alert_record(&v).map_err(corrupt)?;
                debug_assert_eq!(a.seq, key_seq(&k));
                out.alerts.push(a);
            } else {
                let it = decoder.decode(&v).map_err(corrupt)?;
                debug_assert_eq!(it.seq, key_seq(&k));
                out.items.push(it);
            }
            out.bytes += (k.len() + v.len()) as u64;
            if out.len() >= max_items || out.bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The oldest waiting record of `lane` (its seq and when it was stored).
    pub fn outbox_oldest(&self, lane: Lane) -> Result<Option<(u64, i64)>, StoreError> {
        Ok(self
            .outbox_read(lane, 0, 1, u64::MAX, None)?
            .span()
            .map(|(seq, _, stored)| (seq, stored)))
    }

    /// The cloud holds `[first, last]` of `lane`: delete those records. Also forgets the first
    /// `dropped_reported` dropped ranges, which that batch reported. `read` is the items and
    /// bytes read for the batch at quota-drop `generation`.
    pub fn outbox_ack(
        &self,
        lane: Lane,
        first: u64,
        last: u64,
        dropped_reported: usize,
        read: (u64, u64),
        generation: u64,
    ) -> Result<(), StoreError> {
        let state = self.outbox_state()?;
        let _guard = self.write_lock.lock().expect("write lock");
        let (lo, hi) = (key(lane, first), key(lane, last.saturating_add(1)));
        let (mut items, mut bytes) = read;
        if state.drops.load(Ordering::Acquire) != generation {
            // The quota dropped records since they were read: count what is really left.
            (items, bytes) = (0, 0);
            let mut ro = ReadOptions::default();
            ro.set_iterate_range(lo.to_vec()..hi.to_vec());
            for item in self
                .db
                .iterator_cf_opt(self.cf(CF_OUTBOX), ro, IteratorMode::Start)
            {
                let (k, v) = item?;
                items += 1;
                bytes += (k.len() + v.len()) as u64;
            }
        }
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_OUTBOX), lo, hi);
        let mut dropped = state.dropped.lock().expect("dropped lock");
        if dropped_reported > 0 {
            let mut d = dropped.clone();
            d.unreported
                .drain(..dropped_reported.min(d.unreported.len()));
            batch.put_cf(
                self.cf(CF_META),
                META_DROPPED,
                serde_json::to_vec(&d).expect("serializes"),
            );
            self.write_durable(batch)?;
            *dropped = d;
        } else {
            self.write_durable(batch)?;
        }
        let l = &state.lanes[lane as usize];
        l.items.fetch_sub(
            items.min(l.items.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        l.bytes.fetch_sub(
            bytes.min(l.bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        Ok(())
    }

    fn write_durable(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.opts.sync_writes);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Dropped ranges not yet reported to the cloud.
    pub fn outbox_dropped_unreported(&self) -> Vec<SeqRange> {
        self.outbox.as_ref().map_or_else(Vec::new, |o| {
            o.dropped.lock().expect("dropped lock").unreported.clone()
        })
    }

    /// What waits besides `sending` (a lane, the last seq and the record count of the batch on its
    /// way): records and the oldest one's stored time, for the cloud's view of how far behind
    /// this edge is.
    pub fn outbox_report(
        &self,
        sending: Option<(Lane, u64, u64)>,
    ) -> Result<millrace_shared::OutboxReport, StoreError> {
        let state = self.outbox_state()?;
        let mut waiting: u64 = Lane::ALL
            .iter()
            .map(|l| state.lanes[*l as usize].items.load(Ordering::Relaxed))
            .sum();
        let mut oldest = None::<i64>;
        for lane in Lane::ALL {
            let from = match sending {
                Some((l, last, count)) if l == lane => {
                    waiting = waiting.saturating_sub(count);
                    last.saturating_add(1)
                }
                _ => 0,
            };
            if let Some((_, _, ms)) = self.outbox_read(lane, from, 1, u64::MAX, None)?.span() {
                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
            }
        }
        Ok(millrace_shared::OutboxReport {
            waiting_items: waiting,
            oldest_waiting_ms: oldest,
        })
    }

    /// The outbox's counters (`None` without an outbox).
    pub fn outbox_status(&self) -> Result<Option<OutboxStatus>, StoreError> {
        let Some(state) = self.outbox.as_ref() else {
            return Ok(None);
        };
        let oldest = self.outbox_report(None)?.oldest_waiting_ms;
        let load = |f: fn(&LaneCounters) -> &AtomicU64| {
            LaneFigures::from(|lane| f(&state.lanes[lane as usize]).load(Ordering::Relaxed))
        };
        let dropped = state.dropped.lock().expect("dropped lock").clone();
        Ok(Some(OutboxStatus {
            items: load(|l| &l.items),
            bytes: load(|l| &l.bytes),
            quota_bytes: state.quota,
            next_seq: state.next.load(Ordering::Relaxed),
            oldest_stored_ms: oldest,
            dropped: LaneFigures::from(|lane| dropped.of(lane)),
        }))
    }

    /// Drops the oldest records while the outbox is over its quota: telemetry first, then
    /// alerts, then events, down to 90 % of the quota. Returns the records dropped.
    pub fn enforce_outbox_quota(&self) -> Result<u64, StoreError> {
        let Some(state) = self.outbox.as_ref() else {
            return Ok(0);
        };
        if state.total_bytes() <= state.quota {
            return Ok(0);
        }
        let _guard = self.write_lock.lock().expect("write lock");
        let target = state.quota / 10 * 9;
        let mut total = 0;
        for lane in Lane::ALL.into_iter().rev() {
            let over = state.total_bytes().saturating_sub(target);
            if over == 0 {
                break;
            }
            let (mut items, mut bytes, mut range) = (0u64, 0u64, None::<SeqRange>);
            let mut ro = ReadOptions::default();
            ro.set_iterate_range(key(lane, 0).to_vec()..key(lane, u64::MAX).to_vec());
            for item in self
                .db
                .iterator_cf_opt(self.cf(CF_OUTBOX), ro, IteratorMode::Start)
            {
                let (k, v) = item?;
                let seq = key_seq(&k);
                range = Some(range.map_or((seq, seq), |(a, _)| (a, seq)));
                items += 1;
                bytes += (k.len() + v.len()) as u64;
                if bytes >= over {
                    break;
                }
            }
            let Some((a, b)) = range else { continue };
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(self.cf(CF_OUTBOX), key(lane, a), key(lane, b + 1));
            let mut dropped = state.dropped.lock().expect("dropped lock");
            let mut d = dropped.clone();
            d.add(lane, items);
            // Seqs of the lanes interleave: report the lane's dropped seqs as one range
            // per drop; the other lane's seqs inside it were stored and are not in this range
            // for the cloud (it only marks seqs it never received).
            d.unreported.push((a, b));
            batch.put_cf(
                self.cf(CF_META),
                META_DROPPED,
                serde_json::to_vec(&d).expect("serializes"),
            );
            self.write_durable(batch)?;
            *dropped = d;
            state.drops.fetch_add(1, Ordering::Release);
            let l = &state.lanes[lane as usize];
            l.items.fetch_sub(
                items.min(l.items.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            l.bytes.fetch_sub(
                bytes.min(l.bytes.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
            metrics::counter!("millrace_edge_outbox_dropped_total", "lane" => lane.as_str())
                .increment(items);
            tracing::warn!(
                lane = lane.as_str(),
                items,
                bytes,
                first_seq = a,
                last_seq = b,
                quota_bytes = state.quota,
                "outbox over its disk quota: dropped the oldest records; they will not reach the cloud"
            );
            total += items;
        }
        Ok(total)
    }

    /// Reads the `recent` records written before this run, newest first, up to `limit` events
    /// (as machine, device seq, ts), and deletes older records.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<(MachineId, u64, i64)>, StoreError> {
        let mut out = vec![];
        let mut cut = None;
        let names: std::collections::HashMap<u32, MachineId> = self
            .index
            .read()
            .expect("index lock")
            .by_id
            .iter()
            .filter_map(|(id, n)| {
                let m = IndexName::parse(n)?.machine().parse().ok()?;
                Some((*id, m))
            })
            .collect();
        for item in self.db.iterator_cf(self.cf(CF_RECENT), IteratorMode::End) {
            let (k, v) = item?;
            let n = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                cf: CF_RECENT,
                reason: "bad key".into(),
            })?);
            if self.recent_counter.load(Ordering::Relaxed) <= n {
                self.recent_counter.store(n + 1, Ordering::Relaxed);
            }
            if out.len() >= limit {
                cut = Some(n + 1);
                break;
            }
            for e in v.chunks_exact(20) {
                let id = u32::from_le_bytes(e[..4].try_into().expect("4"));
                let seq = u64::from_le_bytes(e[4..12].try_into().expect("8"));
                let ts = i64::from_le_bytes(e[12..20].try_into().expect("8"));
                if let Some(m) = names.get(&id) {
                    out.push((m.clone(), seq, ts));
                }
            }
        }
        if let Some(c) = cut {
            self.db
                .delete_range_cf(self.cf(CF_RECENT), 0u64.to_be_bytes(), c.to_be_bytes())?;
        }
        Ok(out)
    }

    /// Keeps `recent` between `recent_events` and twice that (called with each write).
    pub(crate) fn trim_recent(&self, batch: &mut WriteBatch, key_written: u64, events: usize) {
        let mut log = self.recent_log.lock().expect("recent lock");
        log.0.push_back((key_written, events));
        log.1 += events;
        // One range delete per `recent_events` events, not per write: every range delete leaves
        // a tombstone that RocksDB must carry until compaction, and one per batch made writes
        // stall under load.
        if log.1 <= 2 * self.opts.recent_events {
            return;
        }
        let mut cut = None;
        while log.1 > self.opts.recent_events {
            match log.0.pop_front() {
                Some((k, n)) => {
                    log.1 -= n;
                    cut = Some(k + 1);
                }
                None => break,
            }
        }
        if let Some(c) = cut {
            batch.delete_range_cf(self.cf(CF_RECENT), 0u64.to_be_bytes(), c.to_be_bytes());
        }
    }
}

/// Keys of `recent` written in this run and their event counts, oldest first, with the sum.
pub(crate) type RecentLog = Mutex<(VecDeque<(u64, usize)>, usize)>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_counts_written_before_the_alerts_lane_still_read() {
        // What a store written before the alerts lane holds in `meta/outbox_dropped`.
        let old: Dropped = serde_json::from_str(r#"{"items":[3,5],"unreported":[[1,2]]}"#).unwrap();
        assert_eq!(
            (
                old.of(Lane::Events),
                old.of(Lane::Telemetry),
                old.of(Lane::Alerts)
            ),
            (3, 5, 0)
        );
        let mut d = old;
        d.add(Lane::Alerts, 4);
        assert_eq!(d.items, [3, 5, 4]);
        assert_eq!(d.unreported, [(1, 2)]);
    }
}
