//! The write path: one RocksDB write batch per call, to which each family adds its part:
//! series ids and raw points ([`super::series`]), events ([`super::events`]), the outbox
//! records and the dedup memory ([`super::outbox`]), dead letters ([`super::dead_letters`]),
//! the trigger log ([`super::triggers`]).

use std::sync::atomic::Ordering;

use millrace_shared::{Event, EventBody};
use rocksdb::{WriteBatch, WriteOptions};

use super::dead_letters::DeadLetter;
use super::series::{HeadBatch, machine_name};
use super::{CF_META, CF_OUTBOX, CF_RECENT, Store, StoreError, outbox};

/// Where written events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Devices (and manual writes): they enter the trigger log.
    Device,
    /// Derived by a function from live events: not logged (no loops).
    Derived,
    /// Derived by a function replaying history: not logged, and marked as backfill for the
    /// cloud.
    Backfill,
}

/// Counts of one write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Events written.
    pub events: u64,
    /// Telemetry points written.
    pub points: u64,
    /// Dead letters written.
    pub dead_letters: u64,
    /// Bytes handed to RocksDB.
    pub bytes: u64,
}

impl Store {
    /// Writes decoded events and dead letters in one atomic batch.
    pub fn write(&self, events: &[Event], dead: &[DeadLetter]) -> Result<WriteStats, StoreError> {
        self.write_synced(events, dead, self.opts.sync_writes)
    }

    /// What devices sent: [`Store::write`] with the retained messages of the same reads, in
    /// one atomic batch; the events at the indices in `history` (ascending) are history and go
    /// to the cloud as backfill.
    pub fn write_from_devices(
        &self,
        events: &[Event],
        history: &[usize],
        dead: &[DeadLetter],
        retained: &[(bytes::Bytes, bytes::Bytes)],
    ) -> Result<WriteStats, StoreError> {
        self.write_with(
            events,
            history,
            dead,
            self.opts.sync_writes,
            Origin::Device,
            |store, batch, _| store.put_retained(batch, retained),
        )
    }

    /// [`Store::write`], choosing whether this batch is fsync'd (functions' derived points are
    /// not: they survive a crash of the process, not a power cut).
    pub fn write_synced(
        &self,
        events: &[Event],
        dead: &[DeadLetter],
        sync: bool,
    ) -> Result<WriteStats, StoreError> {
        self.write_with(events, &[], dead, sync, Origin::Device, |_, _, _| {})
    }

    /// The write path: events (into the trigger log too when they come from devices and a
    /// function reads it), dead letters and whatever `extra` adds (given the batch's outbox
    /// records, to queue more under the same seq counter), in one atomic batch.
    pub(super) fn write_with(
        &self,
        events: &[Event],
        history: &[usize],
        dead: &[DeadLetter],
        sync: bool,
        origin: Origin,
        extra: impl FnOnce(&Store, &mut WriteBatch, Option<&mut outbox::PendingRecords>),
    ) -> Result<WriteStats, StoreError> {
        let log_triggers = origin == Origin::Device;
        let backfill = origin == Origin::Backfill;
        let guard = self.write_lock.lock().expect("write lock");
        let mut batch = WriteBatch::default();
        let mut new = vec![];
        let mut stats = WriteStats::default();
        let mut head = HeadBatch::new(self.window_ms());
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut outbox = self.outbox.as_ref().map(|o| o.begin());
        // The trigger log's record: the events' sync items, the outbox's own when it has them.
        let mut log = (log_triggers && !events.is_empty() && self.triggers.active())
            .then(|| self.triggers.start());
        let mut recent = Vec::with_capacity(events.len() * 10);
        let mut item = Vec::with_capacity(128);
        for (i, e) in events.iter().enumerate() {
            let first_id = match &e.body {
                EventBody::Telemetry(t) => {
                    stats.points += t.readings.len() as u64;
                    head.add(self, &e.machine, e.ts_ms, &t.readings, &mut batch, &mut new)?
                }
                body => {
                    let id = self.id_for(&machine_name(&e.machine), "", &mut batch, &mut new)?;
                    self.put_event(&mut batch, id, e, body);
                    Some(id)
                }
            };
            if let Some(id) = first_id {
                outbox::put_recent(&mut recent, id, e.seq, e.ts_ms);
            }
            if let Some(ob) = outbox.as_mut() {
                item.clear();
                let seq = ob.next_seq();
                let backfill = backfill || history.binary_search(&i).is_ok();
                millrace_shared::sync::encode_item_marked(&mut item, seq, now_ms, backfill, e);
                ob.put(&mut batch, self.cf(CF_OUTBOX), e.kind(), seq, &item);
            }
            if let Some(log) = log.as_mut() {
                if outbox.is_none() {
                    item.clear();
                    millrace_shared::sync::encode_item(&mut item, 0, now_ms, e);
                }
                log.push(&item);
            }
            stats.events += 1;
        }
        if !recent.is_empty() && self.opts.recent_events > 0 {
            let n = self.recent_counter.fetch_add(1, Ordering::Relaxed);
            batch.put_cf(self.cf(CF_RECENT), n.to_be_bytes(), &recent);
            self.trim_recent(&mut batch, n, recent.len() / 20);
        }
        for d in dead {
            self.put_dead_letter(&mut batch, d);
            stats.dead_letters += 1;
        }
        let triggers_next = log.map(|log| self.put_triggers(&mut batch, log));
        extra(self, &mut batch, outbox.as_mut());
        if let Some(ob) = outbox.as_ref() {
            ob.finish(&mut batch, self.cf(CF_META));
        }
        // Unique and increasing under the write lock: every batch advances the sequence.
        head.finish(self, &mut batch, self.db.latest_sequence_number() + 1);
        stats.bytes = batch.size_in_bytes() as u64;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        if let (Some(ob), Some(state)) = (outbox, self.outbox.as_ref()) {
            state.commit(ob);
        }
        if let Some(next) = triggers_next {
            self.triggers.commit(next);
        }
        self.index_new(new);
        head.mark_unsealed(self);
        drop(guard);
        if self.outbox.is_some() {
            self.enforce_outbox_quota()?;
        }
        Ok(stats)
    }

    /// How many events are remembered across a restart for dedup.
    pub fn recent_limit(&self) -> usize {
        self.opts.recent_events
    }
}
