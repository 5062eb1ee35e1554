//! The edge → cloud sync protocol: outbox items, batches and their compact wire encoding.
//!
//! Every event an edge stores gets an *outbox sequence number*, increasing per edge and never
//! reused. A [`SyncBatch`] carries items (each with its outbox seq), plus ranges the edge had to
//! drop under its disk quota, so the cloud can tell "not yet received" from "dropped at the
//! edge". The cloud is idempotent on `(edge, outbox seq)`.
//!
//! Alerts raised by the edge's functions ([`AlertItem`]) take outbox seqs from the same counter
//! and are acknowledged the same way; each batch also reports the edge's functions' figures
//! ([`FunctionReport`], newest wins, not acknowledged).
//!
//! # Wire format (version 3)
//! `MRS3` magic, then a zstd frame holding: edge id, dropped ranges, item count, the items, then
//! alert count and alerts (seq, stored ms, flags, JSON), then function count and reports, then
//! the outbox report ([`OutboxReport`]: a presence byte, records waiting, the oldest one's
//! stored time as presence byte and zigzag varint). Versions 2 (`MRS2`, without the outbox
//! report) and 1 (`MRS1`, also without alerts and function reports) are still read: upgrade the
//! cloud before its edges.
//! Items are encoded row by row against running state, which is what makes them small:
//! - strings (machine ids, metric names and units, part ids) go into a dictionary the first
//!   time they appear and are referred to by index afterwards;
//! - outbox seq, device seq and timestamp are deltas to the previous item (of the same machine);
//! - telemetry values are stored as decimal-scaled integers when that round-trips exactly (a
//!   sensor's `21.37` is `2137` at scale 2), as a delta to the series' previous value, and as raw
//!   IEEE-754 bits otherwise;
//! - non-telemetry bodies (rare compared to telemetry) are their JSON form.
//!
//! The same item encoding with fresh state per item ([`encode_item`]) is the edge's outbox
//! record format, so the outbox and the wire share one codec.

use rustc_hash::FxHashMap as HashMap;

use crate::alert::{Alert, FunctionReport};
use crate::event::{Event, EventBody, Reading, Telemetry};
use crate::topic::MachineId;
use compact_str::CompactString;

/// Magic bytes and version of the wire format.
pub const WIRE_MAGIC: &[u8; 4] = b"MRS3";
/// Magic bytes of version 2 (no outbox report), still read.
pub const WIRE_MAGIC_V2: &[u8; 4] = b"MRS2";
/// Magic bytes of version 1 (no alerts, no function reports), still read.
pub const WIRE_MAGIC_V1: &[u8; 4] = b"MRS1";
/// The HTTP content type of an encoded batch.
pub const CONTENT_TYPE: &str = "application/x-millrace-batch";
/// Path of the cloud's sync endpoint.
pub const SYNC_PATH: &str = "/api/v1/sync/batches";

/// Why bytes could not be decoded as a batch or an outbox item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not a Millrace batch, or an unknown version.
    #[error("not a Millrace sync batch (magic {0:?}, expected \"MRS3\", \"MRS2\" or \"MRS1\")")]
    BadMagic(Vec<u8>),
    /// The zstd frame is damaged.
    #[error("damaged compression: {0}")]
    Compression(String),
    /// The bytes end early.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// A field has an impossible value.
    #[error("invalid {field} at byte {at}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Where.
        at: usize,
        /// What is wrong.
        reason: String,
    },
    /// The batch decodes to more than the receiver accepts.
    #[error("batch too large: {0}")]
    TooLarge(String),
}

/// One item of the outbox: an event the edge stored, with its outbox sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncItem {
    /// Outbox sequence number, unique per edge.
    pub seq: u64,
    /// When the edge stored it, Unix ms.
    pub stored_ms: i64,
    /// Sent long after it was stored (after an outage): backfill, not live data.
    pub backfill: bool,
    /// The event.
    pub event: Event,
}

/// An alert in the outbox, with its outbox sequence number (from the events' counter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertItem {
    /// Outbox sequence number, unique per edge.
    pub seq: u64,
    /// When the edge stored it, Unix ms.
    pub stored_ms: i64,
    /// Raised while a function replayed history: backfill, not live.
    pub backfill: bool,
    /// The alert.
    pub alert: Alert,
}

/// An inclusive range of outbox sequence numbers.
pub type SeqRange = (u64, u64);

/// A batch sent from an edge to the cloud.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SyncBatch {
    /// The sending edge's id (the cloud checks it against the token).
    pub edge: String,
    /// Items, in any order.
    pub items: Vec<SyncItem>,
    /// Alerts, in any order.
    pub alerts: Vec<AlertItem>,
    /// Outbox ranges the edge dropped under its disk quota and will never send.
    pub dropped: Vec<SeqRange>,
    /// The edge's functions' figures now (empty when it runs none).
    pub functions: Vec<FunctionReport>,
    /// How far the edge's outbox is behind, as the batch left (`None` from older edges).
    pub outbox: Option<OutboxReport>,
}

/// The edge's outbox as a batch leaves it: what is still to be sent after this batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct OutboxReport {
    /// Records waiting to be sent, this batch's not counted.
    pub waiting_items: u64,
    /// When the oldest waiting record was stored (Unix ms; `None` when none waits).
    pub oldest_waiting_ms: Option<i64>,
}

/// The cloud's answer to a batch it stored durably.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SyncAck {
    /// Items stored now.
    pub stored: u64,
    /// Items that the cloud already held (a re-sent batch): not stored again.
    pub duplicates: u64,
    /// Telemetry points stored now.
    pub points: u64,
}

impl SyncBatch {
    /// Encodes the batch for the wire (compressed).
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(self.items.len() * 24 + 64);
        put_str(&mut raw, &self.edge);
        put_var(&mut raw, self.dropped.len() as u64);
        for (a, b) in &self.dropped {
            put_var(&mut raw, *a);
            put_var(&mut raw, b - a);
        }
        put_var(&mut raw, self.items.len() as u64);
        let mut enc = ItemCodec::default();
        for item in &self.items {
            enc.encode(&mut raw, item);
        }
        put_var(&mut raw, self.alerts.len() as u64);
        for a in &self.alerts {
            put_alert(&mut raw, a);
        }
        put_var(&mut raw, self.functions.len() as u64);
        for f in &self.functions {
            put_str(&mut raw, &f.name);
            for v in [
                u64::from(f.version),
                f.invocations,
                f.failures,
                f.skipped,
                f.lag_events,
                f.lag_ms,
            ] {
                put_var(&mut raw, v);
            }
        }
        match self.outbox {
            None => raw.push(0),
            Some(o) => {
                raw.push(1);
                put_var(&mut raw, o.waiting_items);
                match o.oldest_waiting_ms {
                    None => raw.push(0),
                    Some(ms) => {
                        raw.push(1);
                        put_var(&mut raw, zigzag(ms));
                    }
                }
            }
        }
        let mut out = WIRE_MAGIC.to_vec();
        out.extend(zstd::bulk::compress(&raw, 3).expect("zstd compresses into a Vec"));
        out
    }

    /// Decodes a batch, refusing anything that would expand beyond `max_raw_bytes`.
    pub fn decode(bytes: &[u8], max_raw_bytes: usize) -> Result<Self, WireError> {
        let version = match bytes.get(..4) {
            Some(m) if m == WIRE_MAGIC => 3,
            Some(m) if m == WIRE_MAGIC_V2 => 2,
            Some(m) if m == WIRE_MAGIC_V1 => 1,
            _ => return Err(WireError::BadMagic(bytes[..bytes.len().min(4)].to_vec())),
        };
        let v2 = version >= 2;
        let size = zstd::zstd_safe::get_frame_content_size(&bytes[4..])
            .map_err(|e| WireError::Compression(format!("{e:?}")))?
            .ok_or_else(|| WireError::Compression("frame without content size".into()))?;
        if size > max_raw_bytes as u64 {
            return Err(WireError::TooLarge(format!(
                "{size} bytes uncompressed, limit {max_raw_bytes}"
            )));
        }
        let raw = zstd::bulk::decompress(&bytes[4..], size as usize)
            .map_err(|e| WireError::Compression(e.to_string()))?;
        let mut r = Reader { buf: &raw, at: 0 };
        let edge = r.string("edge")?;
        let n = r.count("dropped count")?;
        let mut dropped = Vec::with_capacity(n);
        for _ in 0..n {
            let a = r.var("dropped range")?;
            let len = r.var("dropped range")?;
            let b = a
                .checked_add(len)
                .ok_or_else(|| r.invalid("dropped range", "overflow"))?;
            dropped.push((a, b));
        }
        let n = r.count("item count")?;
        let mut items = Vec::with_capacity(n);
        let mut dec = ItemCodec::default();
        for _ in 0..n {
            items.push(dec.decode(&mut r)?);
        }
        let (mut alerts, mut functions) = (vec![], vec![]);
        if v2 {
            let n = r.count("alert count")?;
            alerts.reserve(n);
            for _ in 0..n {
                alerts.push(get_alert(&mut r)?);
            }
            let n = r.count("function count")?;
            for _ in 0..n {
                let name = r.string("function name")?;
                let version = u32::try_from(r.var("function version")?)
                    .map_err(|_| r.invalid("function version", "above u32"))?;
                functions.push(FunctionReport {
                    name,
                    version,
                    invocations: r.var("invocations")?,
                    failures: r.var("failures")?,
                    skipped: r.var("skipped")?,
                    lag_events: r.var("lag events")?,
                    lag_ms: r.var("lag ms")?,
                });
            }
        }
        let mut outbox = None;
        if version >= 3 && r.byte("outbox report")? == 1 {
            let waiting_items = r.var("outbox waiting items")?;
            let oldest_waiting_ms = match r.byte("outbox oldest")? {
                0 => None,
                _ => Some(unzigzag(r.var("outbox oldest")?)),
            };
            outbox = Some(OutboxReport {
                waiting_items,
                oldest_waiting_ms,
            });
        }
        if r.at != raw.len() {
            return Err(r.invalid("batch", "trailing bytes"));
        }
        Ok(Self {
            edge,
            items,
            alerts,
            dropped,
            functions,
            outbox,
        })
    }
}

/// Encodes one item on its own (the edge's outbox record), appending to `out`.
///
/// The format of a batch's first item, written without the batch codec's dictionaries (the
/// edge writes one record per event; the maps and owned strings cost more than the encoding):
/// every string is new, so every value is a delta from 0. A metric repeated within the event
/// is written twice instead of referenced; [`decode_item`] reads both forms.
pub fn encode_item(out: &mut Vec<u8>, seq: u64, stored_ms: i64, e: &Event) {
    encode_item_marked(out, seq, stored_ms, false, e)
}

/// [`encode_item`] with the backfill mark set as given (an event that is history, not live
/// data, whenever it is sent: what a function replayed over history derived).
pub fn encode_item_marked(out: &mut Vec<u8>, seq: u64, stored_ms: i64, backfill: bool, e: &Event) {
    put_var(out, zigzag(seq as i64));
    put_var(out, zigzag(stored_ms));
    out.push(kind_byte(&e.body) | if backfill { FLAG_BACKFILL } else { 0 });
    // String 0: the machine, as site/line/machine.
    let m = &e.machine;
    put_var(out, 0);
    put_joined(out, &[&m.site, &m.line, &m.machine], b'/');
    put_var(out, zigzag(e.ts_ms));
    put_var(out, zigzag(e.seq as i64));
    match &e.body {
        EventBody::Telemetry(t) => {
            put_var(out, t.readings.len() as u64);
            for (i, rd) in t.readings.iter().enumerate() {
                // Strings 1..: each reading's name NUL unit.
                put_var(out, i as u64 + 1);
                put_joined(out, &[&rd.name, &rd.unit], 0);
                put_value(out, rd.value, |_| 0);
            }
        }
        body => put_body(out, body),
    }
}

/// Encodes an alert as the edge's outbox record, appending to `out`: seq, stored ms, flags
/// (kind 4, backfill), then the alert's JSON (as [`crate::Alert`] serializes).
pub fn encode_alert_record(
    out: &mut Vec<u8>,
    seq: u64,
    stored_ms: i64,
    backfill: bool,
    json: &[u8],
) {
    put_var(out, zigzag(seq as i64));
    put_var(out, zigzag(stored_ms));
    out.push(KIND_ALERT | if backfill { FLAG_BACKFILL } else { 0 });
    put_var(out, json.len() as u64);
    out.extend_from_slice(json);
}

/// Decodes an outbox record written by [`encode_alert_record`].
pub fn decode_alert_record(bytes: &[u8]) -> Result<AlertItem, WireError> {
    let mut r = Reader { buf: bytes, at: 0 };
    let a = get_alert(&mut r)?;
    if r.at != bytes.len() {
        return Err(r.invalid("alert", "trailing bytes"));
    }
    Ok(a)
}

fn put_alert(out: &mut Vec<u8>, a: &AlertItem) {
    let json = serde_json::to_vec(&a.alert).expect("alerts serialize");
    encode_alert_record(out, a.seq, a.stored_ms, a.backfill, &json);
}

fn get_alert(r: &mut Reader<'_>) -> Result<AlertItem, WireError> {
    let seq = unzigzag(r.var("alert seq")?) as u64;
    let stored_ms = unzigzag(r.var("alert stored ms")?);
    let flags = r.byte("alert kind")?;
    if flags & 0x0f != KIND_ALERT {
        return Err(r.invalid(
            "alert kind",
            &format!("kind {} is not an alert", flags & 0x0f),
        ));
    }
    let n = r.count("alert")?;
    let json = r.take(n, "alert")?;
    let alert: Alert =
        serde_json::from_slice(json).map_err(|e| r.invalid("alert", &e.to_string()))?;
    Ok(AlertItem {
        seq,
        stored_ms,
        backfill: flags & FLAG_BACKFILL != 0,
        alert,
    })
}

/// What [`put_str`] writes for `parts` joined by `sep`, without building the joined string.
fn put_joined(out: &mut Vec<u8>, parts: &[&str], sep: u8) {
    let len: usize = parts.iter().map(|p| p.len()).sum::<usize>() + parts.len().saturating_sub(1);
    put_var(out, len as u64);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(sep);
        }
        out.extend_from_slice(p.as_bytes());
    }
}

fn kind_byte(body: &EventBody) -> u8 {
    match body {
        EventBody::State(_) => KIND_STATE,
        EventBody::Part(_) => KIND_PART,
        EventBody::Telemetry(_) => KIND_TELEMETRY,
        EventBody::Operator(_) => KIND_OPERATOR,
    }
}

/// A reading's value: its decimal scale and the scaled value as a delta from `prev(scale)`
/// (the series' previous scaled value at that scale, else 0), or raw bits. Returns the scale
/// and scaled value to remember, if any.
fn put_value(out: &mut Vec<u8>, v: f64, prev: impl FnOnce(u8) -> i64) -> Option<(u8, i64)> {
    match decimal(v) {
        Some((d, scaled)) => {
            out.push(d);
            put_var(out, zigzag(scaled.wrapping_sub(prev(d))));
            Some((d, scaled))
        }
        None => {
            out.push(RAW_F64);
            out.extend_from_slice(&v.to_bits().to_le_bytes());
            None
        }
    }
}

/// A state, part or operator body: its JSON, length first.
fn put_body(out: &mut Vec<u8>, body: &EventBody) {
    let json = serde_json::to_vec(body).expect("event bodies serialize");
    put_var(out, json.len() as u64);
    out.extend_from_slice(&json);
}

/// Decodes one item encoded by [`encode_item`].
pub fn decode_item(bytes: &[u8]) -> Result<SyncItem, WireError> {
    ItemDecoder::default().decode(bytes)
}

/// Decodes items encoded by [`encode_item`] one after another, reusing its tables (what
/// [`decode_item`] allocates per item).
#[derive(Default)]
pub struct ItemDecoder(ItemCodec);

impl std::fmt::Debug for ItemDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemDecoder").finish_non_exhaustive()
    }
}

impl ItemDecoder {
    /// Decodes one item.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<SyncItem, WireError> {
        let c = &mut self.0;
        c.strings.clear();
        c.index.clear();
        c.machines.clear();
        c.series.clear();
        (c.prev_seq, c.prev_stored) = (0, 0);
        let mut r = Reader { buf: bytes, at: 0 };
        let item = c.decode(&mut r)?;
        if r.at != bytes.len() {
            return Err(r.invalid("item", "trailing bytes"));
        }
        Ok(item)
    }
}

const KIND_STATE: u8 = 0;
const KIND_PART: u8 = 1;
const KIND_TELEMETRY: u8 = 2;
const KIND_OPERATOR: u8 = 3;
const KIND_ALERT: u8 = 4;
const FLAG_BACKFILL: u8 = 0x10;
/// Scale byte meaning "raw f64 bits follow".
const RAW_F64: u8 = 0xff;
const MAX_SCALE: u8 = 9;
const POW10: [f64; 10] = [1.0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Running state shared by encoder and decoder.
#[derive(Default)]
struct ItemCodec {
    strings: Vec<String>,
    index: HashMap<String, u64>,
    prev_seq: u64,
    prev_stored: i64,
    /// Per machine dictionary index: (ts, device seq).
    machines: HashMap<u64, (i64, u64)>,
    /// Per (machine, metric) dictionary indexes: (scale, scaled value).
    series: HashMap<(u64, u64), (u8, i64)>,
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_var(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_var(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// The smallest decimal scale at which `v` is an exact integer that decodes back to `v` bitwise.
fn decimal(v: f64) -> Option<(u8, i64)> {
    // -0.0 would come back as +0.0 (integers have no negative zero).
    if !v.is_finite() || (v == 0.0 && v.is_sign_negative()) {
        return None;
    }
    for (d, p) in POW10.iter().enumerate() {
        let s = (v * p).round();
        if s.abs() < 9.0e15 && (s / p).to_bits() == v.to_bits() {
            return Some((d as u8, s as i64));
        }
    }
    None
}

impl ItemCodec {
    fn put_string(&mut self, out: &mut Vec<u8>, s: &str) -> u64 {
        if let Some(i) = self.index.get(s) {
            put_var(out, *i);
            return *i;
        }
        let i = self.strings.len() as u64;
        put_var(out, i);
        put_str(out, s);
        self.strings.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }

    fn get_string(&mut self, r: &mut Reader<'_>, field: &'static str) -> Result<u64, WireError> {
        let i = r.var(field)?;
        match i.cmp(&(self.strings.len() as u64)) {
            std::cmp::Ordering::Less => Ok(i),
            std::cmp::Ordering::Equal => {
                let s = r.string(field)?;
                self.strings.push(s);
                Ok(i)
            }
            std::cmp::Ordering::Greater => Err(r.invalid(field, "unknown string reference")),
        }
    }

    fn encode(&mut self, out: &mut Vec<u8>, item: &SyncItem) {
        self.encode_parts(out, item.seq, item.stored_ms, item.backfill, &item.event);
    }

    fn encode_parts(
        &mut self,
        out: &mut Vec<u8>,
        seq: u64,
        stored_ms: i64,
        backfill: bool,
        e: &Event,
    ) {
        put_var(out, zigzag(seq.wrapping_sub(self.prev_seq) as i64));
        self.prev_seq = seq;
        put_var(out, zigzag(stored_ms.wrapping_sub(self.prev_stored)));
        self.prev_stored = stored_ms;
        let kind = kind_byte(&e.body);
        out.push(kind | if backfill { FLAG_BACKFILL } else { 0 });
        // One string for the machine: the three levels cannot contain '/'.
        let mut name = String::with_capacity(48);
        name.push_str(&e.machine.site);
        name.push('/');
        name.push_str(&e.machine.line);
        name.push('/');
        name.push_str(&e.machine.machine);
        let m = self.put_string(out, &name);
        let (pts, pseq) = self.machines.get(&m).copied().unwrap_or((0, 0));
        put_var(out, zigzag(e.ts_ms.wrapping_sub(pts)));
        put_var(out, zigzag(e.seq.wrapping_sub(pseq) as i64));
        self.machines.insert(m, (e.ts_ms, e.seq));
        match &e.body {
            EventBody::Telemetry(t) => {
                put_var(out, t.readings.len() as u64);
                for rd in &t.readings {
                    name.clear();
                    name.push_str(&rd.name);
                    name.push('\0');
                    name.push_str(&rd.unit);
                    let s = self.put_string(out, &name);
                    let series = &self.series;
                    let prev = |d| match series.get(&(m, s)) {
                        Some((pd, pv)) if *pd == d => *pv,
                        _ => 0,
                    };
                    if let Some(kept) = put_value(out, rd.value, prev) {
                        self.series.insert((m, s), kept);
                    }
                }
            }
            body => put_body(out, body),
        }
    }

    fn decode(&mut self, r: &mut Reader<'_>) -> Result<SyncItem, WireError> {
        let seq = self.prev_seq.wrapping_add(unzigzag(r.var("seq")?) as u64);
        self.prev_seq = seq;
        let stored_ms = self.prev_stored.wrapping_add(unzigzag(r.var("stored")?));
        self.prev_stored = stored_ms;
        let flags = r.byte("kind")?;
        let kind = flags & 0x0f;
        let m = self.get_string(r, "machine")?;
        let machine: MachineId = self.strings[m as usize]
            .parse()
            .map_err(|e: crate::TopicError| r.invalid("machine", &e.to_string()))?;
        let (pts, pseq) = self.machines.get(&m).copied().unwrap_or((0, 0));
        let ts_ms = pts.wrapping_add(unzigzag(r.var("ts")?));
        let dseq = pseq.wrapping_add(unzigzag(r.var("device seq")?) as u64);
        self.machines.insert(m, (ts_ms, dseq));
        let body = match kind {
            KIND_TELEMETRY => {
                let n = r.count("readings")?;
                let mut readings = Vec::with_capacity(n);
                for _ in 0..n {
                    let s = self.get_string(r, "metric")?;
                    let (name, unit) = self.strings[s as usize]
                        .split_once('\0')
                        .ok_or_else(|| r.invalid("metric", "no unit"))?;
                    let (name, unit) = (CompactString::from(name), CompactString::from(unit));
                    let d = r.byte("scale")?;
                    let value = if d == RAW_F64 {
                        f64::from_bits(u64::from_le_bytes(
                            r.take(8, "value")?.try_into().expect("8"),
                        ))
                    } else if d <= MAX_SCALE {
                        let prev = match self.series.get(&(m, s)) {
                            Some((pd, pv)) if *pd == d => *pv,
                            _ => 0,
                        };
                        let v = prev.wrapping_add(unzigzag(r.var("value")?));
                        self.series.insert((m, s), (d, v));
                        v as f64 / POW10[d as usize]
                    } else {
                        return Err(r.invalid("scale", "above 9"));
                    };
                    readings.push(Reading { name, value, unit });
                }
                EventBody::Telemetry(Telemetry { readings })
            }
            KIND_STATE | KIND_PART | KIND_OPERATOR => {
                let n = r.count("body")?;
                let json = r.take(n, "body")?;
                let body: EventBody =
                    serde_json::from_slice(json).map_err(|e| r.invalid("body", &e.to_string()))?;
                let expect = match body {
                    EventBody::State(_) => KIND_STATE,
                    EventBody::Part(_) => KIND_PART,
                    EventBody::Telemetry(_) => KIND_TELEMETRY,
                    EventBody::Operator(_) => KIND_OPERATOR,
                };
                if expect != kind {
                    return Err(r.invalid("body", "kind does not match"));
                }
                body
            }
            _ => return Err(r.invalid("kind", &format!("unknown kind {kind}"))),
        };
        Ok(SyncItem {
            seq,
            stored_ms,
            backfill: flags & FLAG_BACKFILL != 0,
            event: Event {
                machine,
                ts_ms,
                seq: dseq,
                body,
            },
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn invalid(&self, field: &'static str, reason: &str) -> WireError {
        WireError::Invalid {
            field,
            at: self.at,
            reason: reason.to_owned(),
        }
    }

    fn byte(&mut self, _field: &'static str) -> Result<u8, WireError> {
        let b = *self.buf.get(self.at).ok_or(WireError::Truncated(self.at))?;
        self.at += 1;
        Ok(b)
    }

    fn var(&mut self, field: &'static str) -> Result<u64, WireError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte(field)?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(self.invalid(field, "varint longer than 10 bytes"))
    }

    /// A length or count, which cannot exceed the bytes left.
    fn count(&mut self, field: &'static str) -> Result<usize, WireError> {
        let n = self.var(field)?;
        if n > (self.buf.len() - self.at) as u64 {
            return Err(self.invalid(field, "larger than the bytes left"));
        }
        Ok(n as usize)
    }

    fn take(&mut self, n: usize, _field: &'static str) -> Result<&[u8], WireError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(WireError::Truncated(self.at))?;
        let s = self
            .buf
            .get(self.at..end)
            .ok_or(WireError::Truncated(self.at))?;
        self.at = end;
        Ok(s)
    }

    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let n = self.count(field)?;
        let b = self.take(n, field)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.invalid(field, "not UTF-8"))
    }
}

/// A set of `u64` as sorted, disjoint, non-adjacent inclusive ranges: what an edge's outbox
/// sequence numbers the cloud holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RangeSet(Vec<SeqRange>);

impl RangeSet {
    /// The ranges, sorted.
    pub fn ranges(&self) -> &[SeqRange] {
        &self.0
    }

    /// Whether `v` is in the set.
    pub fn contains(&self, v: u64) -> bool {
        let i = self.0.partition_point(|(_, b)| *b < v);
        self.0.get(i).is_some_and(|(a, _)| *a <= v)
    }

    /// Adds `[a, b]`.
    pub fn insert(&mut self, a: u64, b: u64) {
        debug_assert!(a <= b);
        // First range that ends at or after a-1 (could merge).
        let start = self.0.partition_point(|(_, e)| e.saturating_add(1) < a);
        let mut end = start;
        let (mut lo, mut hi) = (a, b);
        while end < self.0.len() && self.0[end].0 <= hi.saturating_add(1) {
            lo = lo.min(self.0[end].0);
            hi = hi.max(self.0[end].1);
            end += 1;
        }
        self.0.splice(start..end, [(lo, hi)]);
    }

    /// Adds many ranges (any order, overlapping or not) in one pass: `O((n + m) log(n + m))`
    /// where inserting them one by one into the middle of the set costs `O(n)` each.
    pub fn insert_all(&mut self, ranges: impl IntoIterator<Item = SeqRange>) {
        let mut all = std::mem::take(&mut self.0);
        let had = all.len();
        all.extend(ranges);
        if all.len() == had {
            self.0 = all;
            return;
        }
        all.sort_unstable();
        let mut out: Vec<SeqRange> = Vec::with_capacity(all.len());
        for (a, b) in all {
            debug_assert!(a <= b);
            match out.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        self.0 = out;
    }

    /// Adds every value of an unsorted list (merging runs).
    pub fn extend(&mut self, values: impl IntoIterator<Item = u64>) {
        let mut v: Vec<u64> = values.into_iter().collect();
        v.sort_unstable();
        let mut it = v.into_iter();
        let Some(mut a) = it.next() else { return };
        let mut b = a;
        for x in it {
            if x <= b.saturating_add(1) {
                b = b.max(x);
            } else {
                self.insert(a, b);
                a = x;
                b = x;
            }
        }
        self.insert(a, b);
    }

    /// The holes between the lowest and highest value held.
    pub fn gaps(&self) -> Vec<SeqRange> {
        self.0
            .windows(2)
            .map(|w| (w[0].1 + 1, w[1].0 - 1))
            .collect()
    }

    /// How many values both sets hold.
    pub fn intersection_len(&self, other: &RangeSet) -> u64 {
        let (mut i, mut j, mut n) = (0, 0, 0);
        while i < self.0.len() && j < other.0.len() {
            let (a, b) = self.0[i];
            let (c, d) = other.0[j];
            let (lo, hi) = (a.max(c), b.min(d));
            if lo <= hi {
                n += hi - lo + 1;
            }
            if b < d {
                i += 1;
            } else {
                j += 1;
            }
        }
        n
    }

    /// How many values the set holds.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(a, b)| b - a + 1).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{MachineState, PartOutcome, PartProduced, StateChange, StopReason};

    fn m(i: u32) -> MachineId {
        MachineId::new("plant-1", "line-a", format!("press-{i:02}")).unwrap()
    }

    fn sample() -> Vec<SyncItem> {
        let mut items = vec![];
        let mut seq = 100;
        for i in 0..500u32 {
            let machine = m(i % 7);
            let body = match i % 50 {
                0 => EventBody::State(StateChange {
                    state: MachineState::Down,
                    reason: Some(StopReason::TechnicalFailure),
                }),
                1 => EventBody::Part(PartProduced {
                    outcome: PartOutcome::Good,
                    cycle_time_ms: 41_250,
                    part_id: Some(format!("P-{i}")),
                }),
                _ => EventBody::Telemetry(Telemetry {
                    readings: vec![
                        Reading {
                            name: "temperature".into(),
                            value: 60.0 + f64::from(i % 13) * 0.25,
                            unit: "C".into(),
                        },
                        Reading {
                            name: "vibration".into(),
                            value: f64::from(i).sqrt(),
                            unit: "mm/s".into(),
                        },
                        Reading {
                            name: "spindle".into(),
                            value: -1.5e-7,
                            unit: "".into(),
                        },
                    ],
                }),
            };
            seq += 1 + u64::from(i % 3 == 0);
            items.push(SyncItem {
                seq,
                stored_ms: 1_700_000_000_000 + i64::from(i) * 10,
                backfill: i % 5 == 0,
                event: Event {
                    machine,
                    ts_ms: 1_700_000_000_000 + i64::from(i) * 1000 - 7,
                    seq: u64::from(i) + 1,
                    body,
                },
            });
        }
        items
    }

    #[test]
    fn batch_round_trips_exactly() {
        let alert = |seq: u64, device: &str| AlertItem {
            seq,
            stored_ms: 1_700_000_000_123,
            backfill: seq.is_multiple_of(2),
            alert: Alert {
                id: format!("hot:{seq}:0"),
                ts_ms: 1_700_000_000_100,
                trigger: "topic".into(),
                function: "hot".into(),
                version: 3,
                severity: "critical".into(),
                message: "temperature 93.1 degC above 90 \"limit\"".into(),
                device: device.into(),
                topic: if device.is_empty() {
                    String::new()
                } else {
                    format!("factory/{device}/telemetry")
                },
                event_ts_ms: 1_700_000_000_000,
            },
        };
        let batch = SyncBatch {
            edge: "edge-1".into(),
            items: sample(),
            alerts: vec![alert(2, "s1/l1/m1"), alert(77, "")],
            dropped: vec![(1, 5), (9, 9)],
            functions: vec![FunctionReport {
                name: "hot".into(),
                version: 3,
                invocations: 1 << 40,
                failures: 2,
                skipped: 0,
                lag_events: 12,
                lag_ms: 850,
            }],
            outbox: Some(OutboxReport {
                waiting_items: 123_456,
                oldest_waiting_ms: Some(1_699_999_000_000),
            }),
        };
        let bytes = batch.encode();
        let back = SyncBatch::decode(&bytes, 1 << 20).unwrap();
        assert_eq!(back, batch);
        for outbox in [
            None,
            Some(OutboxReport {
                waiting_items: 0,
                oldest_waiting_ms: None,
            }),
        ] {
            let b = SyncBatch {
                outbox,
                ..batch.clone()
            };
            assert_eq!(SyncBatch::decode(&b.encode(), 1 << 20).unwrap(), b);
        }
        // Version 2 (an edge before the outbox report): the same bytes without it.
        let v2 = SyncBatch {
            outbox: None,
            ..batch.clone()
        };
        let raw = zstd::bulk::decompress(&v2.encode()[4..], 1 << 20).unwrap();
        let mut old = WIRE_MAGIC_V2.to_vec();
        old.extend(zstd::bulk::compress(&raw[..raw.len() - 1], 3).unwrap());
        assert_eq!(SyncBatch::decode(&old, 1 << 20).unwrap(), v2);
        // An alert's outbox record is what a batch carries for it.
        for a in &batch.alerts {
            let mut rec = vec![];
            let json = serde_json::to_vec(&a.alert).unwrap();
            encode_alert_record(&mut rec, a.seq, a.stored_ms, a.backfill, &json);
            assert_eq!(&decode_alert_record(&rec).unwrap(), a);
            assert!(
                decode_item(&rec).is_err(),
                "an alert record is not an event"
            );
        }
        // Version 1 (an older edge): the same bytes without the alert and function sections.
        let v1 = SyncBatch {
            alerts: vec![],
            functions: vec![],
            outbox: None,
            ..batch.clone()
        };
        let raw = zstd::bulk::decompress(&v1.encode()[4..], 1 << 20).unwrap();
        let mut old = WIRE_MAGIC_V1.to_vec();
        old.extend(zstd::bulk::compress(&raw[..raw.len() - 3], 3).unwrap());
        assert_eq!(SyncBatch::decode(&old, 1 << 20).unwrap(), v1);
        // Values that are not short decimals survive bit for bit.
        for mut item in sample() {
            item.backfill = false;
            let mut buf = vec![];
            encode_item(&mut buf, item.seq, item.stored_ms, &item.event);
            assert_eq!(decode_item(&buf).unwrap(), item);
        }
    }

    #[test]
    fn a_single_item_is_written_as_a_batch_writes_its_first_item() {
        for item in sample() {
            let mut alone = vec![];
            encode_item(&mut alone, item.seq, item.stored_ms, &item.event);
            let mut first = vec![];
            ItemCodec::default().encode_parts(
                &mut first,
                item.seq,
                item.stored_ms,
                false,
                &item.event,
            );
            assert_eq!(alone, first, "{item:?}");
        }
        // A metric twice in one event is written twice (the batch codec references it) and
        // still decodes to the same event; so do raw and negative values after it.
        let machine = MachineId::new("s", "l", "m").unwrap();
        let reading = |value: f64| Reading {
            name: "t".into(),
            value,
            unit: "degC".into(),
        };
        let event = Event {
            machine,
            ts_ms: -5,
            seq: 0,
            body: EventBody::Telemetry(Telemetry {
                readings: vec![
                    reading(21.5),
                    reading(0.1 + 0.2),
                    reading(21.5),
                    reading(-3.0),
                ],
            }),
        };
        let mut buf = vec![];
        encode_item(&mut buf, 7, 9, &event);
        let back = decode_item(&buf).unwrap();
        assert_eq!((back.seq, back.stored_ms, back.event), (7, 9, event));
    }

    #[test]
    fn decimal_scaling_is_exact() {
        for v in [
            0.0,
            -0.0,
            1.0,
            21.37,
            -3.5,
            1e-9,
            123456.789,
            0.1 + 0.2,
            f64::NAN,
            1e300,
        ] {
            if let Some((d, s)) = decimal(v) {
                assert_eq!((s as f64 / POW10[d as usize]).to_bits(), v.to_bits(), "{v}");
            }
        }
        assert_eq!(decimal(21.37), Some((2, 2137)));
        assert_eq!(decimal(0.1 + 0.2), None);
    }

    #[test]
    fn damaged_batches_are_refused_not_panicking() {
        let bytes = SyncBatch {
            edge: "e".into(),
            items: sample(),
            ..SyncBatch::default()
        }
        .encode();
        assert!(matches!(
            SyncBatch::decode(b"GET / HTTP/1.1", 1 << 20),
            Err(WireError::BadMagic(_))
        ));
        assert!(matches!(
            SyncBatch::decode(&bytes, 100),
            Err(WireError::TooLarge(_))
        ));
        for cut in [5, bytes.len() / 2, bytes.len() - 1] {
            assert!(SyncBatch::decode(&bytes[..cut], 1 << 20).is_err());
        }
        // Raw (decompressed) damage: flip bytes of the item stream and re-compress.
        let raw = zstd::bulk::decompress(&bytes[4..], 1 << 20).unwrap();
        for i in (0..raw.len()).step_by(7) {
            let mut bad = raw.clone();
            bad[i] ^= 0x5a;
            let mut framed = WIRE_MAGIC.to_vec();
            framed.extend(zstd::bulk::compress(&bad, 1).unwrap());
            let _ = SyncBatch::decode(&framed, 1 << 20);
        }
    }

    #[test]
    fn range_set_merges_and_reports_gaps() {
        let mut s = RangeSet::default();
        s.insert(10, 20);
        s.insert(30, 40);
        s.insert(21, 22);
        assert_eq!(s.ranges(), &[(10, 22), (30, 40)]);
        assert_eq!(s.gaps(), vec![(23, 29)]);
        s.insert(5, 35);
        assert_eq!(s.ranges(), &[(5, 40)]);
        s.extend([1, 2, 3, 42, 50, 43]);
        assert_eq!(s.ranges(), &[(1, 3), (5, 40), (42, 43), (50, 50)]);
        assert!(s.contains(3) && !s.contains(4) && s.contains(40) && !s.contains(41));
        assert_eq!(s.len(), 3 + 36 + 2 + 1);
        let mut o = RangeSet::default();
        o.insert(2, 6);
        o.insert(39, 42);
        o.insert(100, 200);
        assert_eq!(s.intersection_len(&o), 2 + 2 + 2 + 1);
        assert_eq!(o.intersection_len(&s), 7);
    }
}
