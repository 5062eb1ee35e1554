//! The ingest pipeline: takes the PUBLISH packets the device listeners find in each
//! connection's byte stream (see `crate::broker`), decoded with the shared model on the
//! connection's task, and writes them in batches to the store on a dedicated thread, then tells
//! each connection its packets are durable so the broker may acknowledge them.
//!
//! - Batching: the thread takes every chunk waiting (up to `max_batch` events) and writes them
//!   in one RocksDB batch (one fsync with `store.sync_writes`): under load batches grow, at low
//!   rates each chunk is written at once.
//! - Bad messages (not JSON, wrong fields, unknown topic, oversized, newer schema) become dead
//!   letters with the reason, are counted, logged (rate-limited) and never stop ingest.
//! - Duplicates (same machine, sequence number and timestamp) seen within a window of recent
//!   sequence numbers are counted and dropped; older ones are stored once anyway because store
//!   keys contain the event's identity. A lower sequence number with a newer timestamp is a
//!   device that restarted its numbering, not a duplicate. After a restart of the edge, the
//!   events written just before it (`store.recent_events`) are remembered too, so a device
//!   re-sending what was stored but not yet acknowledged when the edge stopped is recognised:
//!   the outbox, and so the cloud, gets each event once.
//! - Topics under `millrace/` are the edge's own outputs and are not ingested.
//! - The channel from the listeners is bounded, and each connection has at most a few reads
//!   waiting to be stored before it stops reading: a slow disk slows devices down instead of
//!   losing their data.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use millrace_shared::{Event, MachineId};
use serde::Serialize;

use crate::config::IngestConfig;
use crate::mqtt::Publish;
use crate::store::{DeadLetter, Store};

/// Topics the edge publishes itself; ingest ignores them.
pub(crate) const OWN_TOPIC_PREFIX: &str = "millrace/";

/// Errors starting ingest.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The ingest thread could not start.
    #[error("ingest thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The events stored before the restart could not be read.
    #[error("reading recent events: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// One PUBLISH, decoded where it was read (on the connection's task, so that decoding runs in
/// parallel with the ingest thread's writes).
#[derive(Debug)]
pub(crate) enum Decoded {
    /// A valid event.
    Event(Event),
    /// A valid event that is history, not live (a Sparkplug metric marked `is_historical`):
    /// stored as any other, sent to the cloud as backfill.
    History(Event),
    /// A refused message.
    Dead(DeadLetter),
    /// The edge's own output (`millrace/…`) or a `$` topic: not ingested.
    Skip,
    /// A retained message (topic, payload; empty clears it), kept so that a restart of the
    /// broker does not forget it. Comes after the message's own decoding.
    Retained(bytes::Bytes, bytes::Bytes),
}

/// The last few topics a connection published to and the machine and kind each names: a
/// device publishes to a few topics over and over, so each is parsed and validated once, not
/// per event.
#[derive(Debug, Default)]
pub(crate) struct TopicCache {
    topics: Vec<(Box<str>, MachineId, millrace_shared::EventKind)>,
    next: usize,
}

impl TopicCache {
    /// One per event kind a device may publish.
    const SIZE: usize = 4;

    fn get(&self, topic: &str) -> Option<(&MachineId, millrace_shared::EventKind)> {
        self.topics
            .iter()
            .find(|(t, _, _)| **t == *topic)
            .map(|(_, m, k)| (m, *k))
    }

    fn remember(&mut self, topic: &str, e: &Event) {
        let entry = (topic.into(), e.machine.clone(), e.kind());
        if self.topics.len() < Self::SIZE {
            self.topics.push(entry);
        } else {
            self.topics[self.next] = entry;
            self.next = (self.next + 1) % Self::SIZE;
        }
    }
}

/// Decodes one PUBLISH found in a device's stream.
pub(crate) fn decode(p: &Publish, now_ms: i64, topics: &mut TopicCache) -> Decoded {
    let topic = match std::str::from_utf8(&p.topic) {
        Ok(t) => t,
        Err(_) => {
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            return Decoded::Dead(DeadLetter::new(
                now_ms,
                &topic,
                &p.payload,
                "bad_topic",
                "topic is not UTF-8".into(),
            ));
        }
    };
    if topic.starts_with(OWN_TOPIC_PREFIX) || topic.starts_with('$') {
        return Decoded::Skip;
    }
    let decoded = match topics.get(topic) {
        Some((machine, kind)) => Event::decode_payload(machine.clone(), kind, &p.payload),
        None => Event::decode(topic, &p.payload).inspect(|e| topics.remember(topic, e)),
    };
    match decoded {
        Ok(e) => Decoded::Event(e),
        Err(err) => Decoded::Dead(DeadLetter::new(
            now_ms,
            topic,
            &p.payload,
            err.reason(),
            err.to_string(),
        )),
    }
}

/// Decodes the PUBLISHes of one device connection: factory topics as JSON (each topic parsed
/// once, [`TopicCache`]), Sparkplug B topics through the Sparkplug host, which may make
/// several events (or none) of one message.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    topics: TopicCache,
    sparkplug: Option<Arc<crate::sparkplug::Host>>,
    /// What the Sparkplug host made of the last message.
    made: Vec<Result<(Event, bool), DeadLetter>>,
}

impl Decoder {
    /// A decoder handing Sparkplug B messages to `sparkplug` (none: they are not ingested).
    pub(crate) fn new(sparkplug: Option<Arc<crate::sparkplug::Host>>) -> Self {
        Self {
            topics: TopicCache::default(),
            sparkplug,
            made: vec![],
        }
    }

    /// Decodes `p` into `out`.
    pub(crate) fn decode_into(&mut self, p: &Publish, now_ms: i64, out: &mut Vec<Decoded>) {
        self.decode_message(p, now_ms, out);
        if p.retain && !p.topic.starts_with(OWN_TOPIC_PREFIX.as_bytes()) {
            out.push(Decoded::Retained(p.topic.clone(), p.payload.clone()));
        }
    }

    fn decode_message(&mut self, p: &Publish, now_ms: i64, out: &mut Vec<Decoded>) {
        let sparkplug = p.topic.len() > crate::sparkplug::NAMESPACE.len()
            && p.topic.starts_with(crate::sparkplug::NAMESPACE.as_bytes())
            && p.topic[crate::sparkplug::NAMESPACE.len()] == b'/';
        if sparkplug && let Ok(topic) = std::str::from_utf8(&p.topic) {
            match &self.sparkplug {
                Some(host) => {
                    host.receive(topic, &p.payload, now_ms, &mut self.made);
                    out.extend(self.made.drain(..).map(|m| match m {
                        Ok((e, false)) => Decoded::Event(e),
                        Ok((e, true)) => Decoded::History(e),
                        Err(d) => Decoded::Dead(d),
                    }));
                }
                None => out.push(Decoded::Skip),
            }
            return;
        }
        out.push(decode(p, now_ms, &mut self.topics));
    }
}

/// What one read of one device connection held; `done` fires once it is stored.
#[derive(Debug)]
pub(crate) struct IngestChunk {
    /// The decoded packets, in the order the device sent them.
    pub(crate) items: Vec<Decoded>,
    /// Payload bytes they carried.
    pub(crate) bytes: u64,
    /// Fired after the batch holding them was written.
    pub(crate) done: tokio::sync::oneshot::Sender<()>,
    /// When the bytes holding them were read off the device's connection.
    pub(crate) read_at: Instant,
}

/// Where the device listeners send what they find.
pub(crate) type IngestTx = flume::Sender<IngestChunk>;

/// A batch taking this long to write is counted and logged.
const SLOW_BATCH: Duration = Duration::from_millis(100);

/// Chunks waiting for the ingest thread at most (each is at most one 64 KiB read).
const CHANNEL_CHUNKS: usize = 256;

/// Counters of the pipeline since start.
#[derive(Debug, Default, Serialize)]
pub(crate) struct IngestStats {
    /// Events stored.
    pub(crate) events: AtomicU64,
    /// Telemetry points stored.
    pub(crate) points: AtomicU64,
    /// Messages refused into dead letters.
    pub(crate) dead_letters: AtomicU64,
    /// Duplicates dropped.
    pub(crate) duplicates: AtomicU64,
    /// Write batches.
    pub(crate) batches: AtomicU64,
    /// Payload bytes received.
    pub(crate) bytes: AtomicU64,
}

/// Remembers which of the last `window` sequence numbers of a device were seen.
#[derive(Debug)]
struct DedupWindow {
    max: u64,
    max_ts: i64,
    bits: Vec<u64>,
    window: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Fresh,
    Duplicate,
    /// Older than the window: cannot tell here (stored idempotently).
    Unknown,
}

impl DedupWindow {
    fn new(window: u64) -> Self {
        let window = window.max(64).next_multiple_of(64);
        Self {
            max: 0,
            max_ts: i64::MIN,
            bits: vec![0; (window / 64) as usize],
            window,
        }
    }

    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let i = seq % self.window;
        (&mut self.bits[(i / 64) as usize], 1u64 << (i % 64))
    }

    fn check(&mut self, seq: u64, ts: i64) -> Seen {
        if seq <= self.max && ts > self.max_ts {
            // Newer than anything seen, yet an old number: the device restarted its sequence.
            self.bits.iter_mut().for_each(|w| *w = 0);
            self.max = 0;
        }
        self.max_ts = self.max_ts.max(ts);
        if seq > self.max {
            if seq - self.max >= self.window {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for s in self.max + 1..seq {
                    let (w, m) = self.bit(s);
                    *w &= !m;
                }
            }
            self.max = seq;
            let (w, m) = self.bit(seq);
            *w |= m;
            return Seen::Fresh;
        }
        if self.max - seq >= self.window {
            return Seen::Unknown;
        }
        let (w, m) = self.bit(seq);
        if *w & m != 0 {
            Seen::Duplicate
        } else {
            *w |= m;
            Seen::Fresh
        }
    }
}

/// The running pipeline.
#[derive(Debug)]
pub(crate) struct Ingest {
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    tx: IngestTx,
    /// Counters since start.
    pub(crate) stats: Arc<IngestStats>,
}

impl Ingest {
    /// Starts the ingest thread.
    pub(crate) fn start(store: Arc<Store>, cfg: IngestConfig) -> Result<Self, IngestError> {
        let (tx, rx) = flume::bounded(CHANNEL_CHUNKS);
        let recent_budget = store.recent_limit();
        let mut recent: HashMap<MachineId, HashSet<(u64, i64)>> = HashMap::new();
        for (machine, seq, ts) in store.recent_events(recent_budget)? {
            recent.entry(machine).or_default().insert((seq, ts));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(IngestStats::default());
        let thread = std::thread::Builder::new()
            .name("millrace-ingest".into())
            .spawn({
                let (stop, stats) = (stop.clone(), stats.clone());
                move || {
                    Pipeline {
                        store,
                        cfg,
                        stats,
                        dedup: HashMap::new(),
                        windows: vec![],
                        last_device: None,
                        recent,
                        recent_budget,
                        events: vec![],
                        dead: vec![],
                        retained: vec![],
                        history: vec![],
                        taken: vec![],
                        warned: WarnLimiter::default(),
                    }
                    .run(rx, &stop);
                }
            })?;
        Ok(Self {
            thread: Some(thread),
            stop,
            tx,
            stats,
        })
    }

    /// The sender the device listeners use.
    pub(crate) fn sender(&self) -> IngestTx {
        self.tx.clone()
    }

    /// Stops after writing every chunk already taken. Chunks not taken are not acknowledged,
    /// so their devices send them again. Blocks: call off the async runtime.
    pub(crate) fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    fn warn(&mut self, d: &DeadLetter) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(topic = %d.topic, reason = %d.reason, error = %d.error, suppressed = self.suppressed, "message refused into dead letters");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

struct Pipeline {
    store: Arc<Store>,
    cfg: IngestConfig,
    stats: Arc<IngestStats>,
    /// Index into `windows` of each device.
    dedup: HashMap<MachineId, usize>,
    windows: Vec<(MachineId, DedupWindow)>,
    /// The slot in `windows` of the last event's device.
    last_device: Option<usize>,
    /// Events stored just before this run started (emptied once as many were stored since).
    recent: HashMap<MachineId, HashSet<(u64, i64)>>,
    recent_budget: usize,
    events: Vec<Event>,
    dead: Vec<DeadLetter>,
    /// Retained messages to keep (topic, payload), written with the events.
    retained: Vec<(bytes::Bytes, bytes::Bytes)>,
    /// Which of `events` are history (ascending indices).
    history: Vec<usize>,
    /// The batch's chunks: whom to tell once stored, when each was read, how many packets.
    taken: Vec<(tokio::sync::oneshot::Sender<()>, Instant, usize)>,
    warned: WarnLimiter,
}

impl Pipeline {
    fn run(mut self, rx: flume::Receiver<IngestChunk>, stop: &AtomicBool) {
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(chunk) => self.take(chunk),
                Err(flume::RecvTimeoutError::Timeout) => {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    continue;
                }
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
            while self.events.len() + self.dead.len() < self.cfg.max_batch {
                match rx.try_recv() {
                    Ok(chunk) => self.take(chunk),
                    Err(_) => break,
                }
            }
            self.write(stop);
        }
        self.write(stop);
        tracing::info!("ingest stopped");
    }

    fn take(&mut self, chunk: IngestChunk) {
        self.stats.bytes.fetch_add(chunk.bytes, Ordering::Relaxed);
        let packets = chunk.items.len();
        for item in chunk.items {
            match item {
                Decoded::Event(e) => self.accept(e, false),
                Decoded::History(e) => self.accept(e, true),
                Decoded::Dead(d) => self.refuse(d),
                Decoded::Skip => {}
                Decoded::Retained(topic, payload) => self.retained.push((topic, payload)),
            }
        }
        self.taken.push((chunk.done, chunk.read_at, packets));
    }

    fn accept(&mut self, e: Event, history: bool) {
        // Consecutive events mostly come from one device (one connection's read): compare with
        // the last one's id before hashing three strings.
        let slot = match self.last_device {
            Some(slot) if self.windows[slot].0 == e.machine => slot,
            _ => {
                let slot = match self.dedup.get(&e.machine) {
                    Some(slot) => *slot,
                    None => {
                        let w = DedupWindow::new(self.cfg.dedup_window);
                        self.windows.push((e.machine.clone(), w));
                        self.dedup.insert(e.machine.clone(), self.windows.len() - 1);
                        self.windows.len() - 1
                    }
                };
                self.last_device = Some(slot);
                slot
            }
        };
        let seen = self.windows[slot].1.check(e.seq, e.ts_ms);
        let seen = if seen != Seen::Duplicate
            && !self.recent.is_empty()
            && self
                .recent
                .get(&e.machine)
                .is_some_and(|r| r.contains(&(e.seq, e.ts_ms)))
        {
            Seen::Duplicate
        } else {
            seen
        };
        if seen == Seen::Duplicate {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("millrace_edge_duplicates_total").increment(1);
            return;
        }
        if history {
            self.history.push(self.events.len());
        }
        self.events.push(e);
    }

    fn refuse(&mut self, d: DeadLetter) {
        metrics::counter!("millrace_edge_dead_letters_total", "reason" => d.reason.clone())
            .increment(1);
        self.warned.warn(&d);
        self.dead.push(d);
    }

    fn write(&mut self, stop: &AtomicBool) {
        if self.events.is_empty() && self.dead.is_empty() && self.retained.is_empty() {
            // Chunks with nothing to store (the edge's own topics, duplicates) are done too.
            self.taken.drain(..).for_each(|(d, _, _)| {
                let _ = d.send(());
            });
            return;
        }
        let started = Instant::now();
        let mut backoff = Duration::from_millis(10);
        loop {
            match self.store.write_from_devices(
                &self.events,
                &self.history,
                &self.dead,
                &self.retained,
            ) {
                Ok(s) => {
                    let now = chrono::Utc::now().timestamp_millis();
                    let latency = metrics::histogram!("millrace_edge_ingest_latency_seconds");
                    // One labelled counter update per kind and batch, not per event.
                    let mut by_kind = [0u64; 4];
                    for e in &self.events {
                        latency.record((now - e.ts_ms).max(0) as f64 / 1000.0);
                        by_kind[e.kind() as usize] += 1;
                    }
                    for (kind, n) in millrace_shared::EventKind::ALL.into_iter().zip(by_kind) {
                        if n > 0 {
                            metrics::counter!("millrace_edge_ingest_events_total", "kind" => kind.as_str()).increment(n);
                        }
                    }
                    metrics::counter!("millrace_edge_ingest_points_total").increment(s.points);
                    metrics::counter!("millrace_edge_ingest_write_bytes_total").increment(s.bytes);
                    let took = started.elapsed();
                    metrics::histogram!("millrace_edge_ingest_batch_seconds")
                        .record(took.as_secs_f64());
                    if took >= SLOW_BATCH {
                        // Devices wait this long for their acknowledgements: say so.
                        metrics::counter!("millrace_edge_ingest_slow_batches_total").increment(1);
                        tracing::warn!(
                            took_ms = took.as_millis() as u64,
                            events = s.events,
                            bytes = s.bytes,
                            "slow store write"
                        );
                    }
                    self.stats.events.fetch_add(s.events, Ordering::Relaxed);
                    self.stats.points.fetch_add(s.points, Ordering::Relaxed);
                    self.stats
                        .dead_letters
                        .fetch_add(s.dead_letters, Ordering::Relaxed);
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    if !self.recent.is_empty() {
                        self.recent_budget = self.recent_budget.saturating_sub(self.events.len());
                        if self.recent_budget == 0 {
                            self.recent = HashMap::new();
                        }
                    }
                    // The edge's own part of the latency: read off the socket -> durable.
                    let waited = metrics::histogram!("millrace_edge_ingest_read_to_stored_seconds");
                    let stored_at = Instant::now();
                    for (d, at, n) in self.taken.drain(..) {
                        let _ = d.send(());
                        waited.record_many(stored_at.duration_since(at).as_secs_f64(), n);
                    }
                    break;
                }
                Err(e) => {
                    metrics::counter!("millrace_edge_ingest_write_errors_total").increment(1);
                    metrics::counter!("millrace_edge_store_write_errors_total", "reason" => e.reason())
                        .increment(1);
                    if stop.load(Ordering::Relaxed) && backoff > Duration::from_secs(1) {
                        // Not acknowledged to the devices, so they will send these again.
                        tracing::error!(error = %e, events = self.events.len(), "store write failed during shutdown; devices were not acknowledged");
                        self.taken.clear();
                        break;
                    }
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, events = self.events.len(), "store write failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.events.clear();
        self.dead.clear();
        self.retained.clear();
        self.history.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seq: u64) -> i64 {
        seq as i64 * 10
    }

    fn publish(topic: &str, payload: &str) -> Publish {
        Publish {
            topic: bytes::Bytes::copy_from_slice(topic.as_bytes()),
            payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
            retain: false,
        }
    }

    #[test]
    fn a_bad_payload_on_a_remembered_topic_is_a_dead_letter_and_the_next_event_decodes() {
        let topic = "factory/s/l/m/telemetry";
        let good = |seq: u64| {
            format!(
                r#"{{"v":1,"ts":1767600000000,"seq":{seq},"readings":[{{"name":"t","value":1.5,"unit":"degC"}}]}}"#
            )
        };
        let mut topics = TopicCache::default();
        assert!(matches!(
            decode(&publish(topic, &good(1)), 0, &mut topics),
            Decoded::Event(_)
        ));
        let Decoded::Dead(d) = decode(&publish(topic, "{not json"), 7, &mut topics) else {
            panic!("a bad payload must be refused");
        };
        assert_eq!(
            (d.topic.as_str(), d.reason.as_str(), d.received_ms),
            (topic, "bad_json", 7)
        );
        let Decoded::Event(e) = decode(&publish(topic, &good(2)), 0, &mut topics) else {
            panic!("ingest goes on after a refused message");
        };
        assert_eq!((e.machine.to_string().as_str(), e.seq), ("s/l/m", 2));
        // Other topics of the same connection are decoded with their own machine and kind.
        let Decoded::Event(e) = decode(
            &publish(
                "factory/s/l/other/state",
                r#"{"v":1,"ts":1767600000000,"seq":3,"state":"idle"}"#,
            ),
            0,
            &mut topics,
        ) else {
            panic!("a second topic decodes");
        };
        assert_eq!(e.machine.to_string(), "s/l/other");
        assert!(matches!(
            decode(&publish("factory/s/l/m/bogus", &good(4)), 0, &mut topics),
            Decoded::Dead(d) if d.reason == "unknown_kind"
        ));
    }

    #[test]
    fn dedup_window() {
        let mut w = DedupWindow::new(64);
        assert_eq!(w.check(1, ts(1)), Seen::Fresh);
        assert_eq!(w.check(1, ts(1)), Seen::Duplicate);
        assert_eq!(w.check(5, ts(5)), Seen::Fresh);
        assert_eq!(w.check(3, ts(3)), Seen::Fresh, "out of order but new");
        assert_eq!(w.check(3, ts(3)), Seen::Duplicate);
        assert_eq!(w.check(4, ts(4)), Seen::Fresh);
        assert_eq!(w.check(200, ts(200)), Seen::Fresh);
        assert_eq!(w.check(5, ts(5)), Seen::Unknown, "older than the window");
        assert_eq!(w.check(199, ts(199)), Seen::Fresh);
        assert_eq!(w.check(200, ts(200)), Seen::Duplicate);
        // Bits of seqs skipped over are cleared, not left from a previous lap.
        assert_eq!(w.check(200 + 64 - 1, ts(200 + 64 - 1)), Seen::Fresh);
        assert_eq!(w.check(201, ts(201)), Seen::Fresh);
    }

    #[test]
    fn a_sequence_restarted_by_the_device_is_not_a_duplicate() {
        let mut w = DedupWindow::new(64);
        for s in 1..=50 {
            assert_eq!(w.check(s, ts(s)), Seen::Fresh);
        }
        // The device restarted: seq 1 again, but later than anything seen.
        assert_eq!(w.check(1, ts(100)), Seen::Fresh);
        assert_eq!(w.check(2, ts(101)), Seen::Fresh);
        assert_eq!(w.check(2, ts(101)), Seen::Duplicate);
        // A re-send of the first run's seq 3 (old timestamp) is not new.
        assert_eq!(
            w.check(3, ts(3)),
            Seen::Fresh,
            "a late re-send from before the device restarted is not recognised here"
        );
    }
}
