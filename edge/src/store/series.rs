//! Telemetry series: the index of names to ids (series and machines share it), raw points in
//! `head` as one chunk per series, window and write batch, and sealing of full windows into
//! compressed blocks; the points query merges both.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use millrace_shared::{MachineId, Reading, SeriesKey};
use rocksdb::{WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};

use super::{CF_BLOCKS, CF_HEAD, CF_SERIES, Store, StoreError, block, key_ts, series_ts_key};

/// Prefix of a telemetry series' name in `series`: `t/{site}/{line}/{machine}/{metric}`.
const SERIES_PREFIX: &str = "t/";
/// Prefix of a machine's name in `series` (its events' id): `m/{site}/{line}/{machine}`.
const MACHINE_PREFIX: &str = "m/";

/// What a name in the `series` family stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IndexName<'a> {
    /// A telemetry series, `site/line/machine/metric`.
    Series(&'a str),
    /// A machine (its events), `site/line/machine`.
    Machine(&'a str),
}

impl<'a> IndexName<'a> {
    /// Reads a stored name.
    pub(super) fn parse(name: &'a str) -> Option<Self> {
        if let Some(s) = name.strip_prefix(SERIES_PREFIX) {
            Some(Self::Series(s))
        } else {
            name.strip_prefix(MACHINE_PREFIX).map(Self::Machine)
        }
    }

    /// The machine (`site/line/machine`) the name belongs to.
    pub(super) fn machine(self) -> &'a str {
        match self {
            Self::Series(s) => s.rsplit_once('/').map_or(s, |(m, _)| m),
            Self::Machine(m) => m,
        }
    }
}

/// Writes the stored name of `machine`'s series `metric` into `out` (cleared first).
pub(super) fn series_name(machine: &MachineId, metric: &str, out: &mut String) {
    out.clear();
    out.push_str(SERIES_PREFIX);
    SeriesKey::write_path(machine, metric, out);
}

/// The stored name of the series written `site/line/machine/metric`.
pub(super) fn series_name_of(series: &str) -> String {
    format!("{SERIES_PREFIX}{series}")
}

/// The stored name of a machine (the id its events are keyed by).
pub(super) fn machine_name(machine: &MachineId) -> String {
    format!("{MACHINE_PREFIX}{machine}")
}

/// One telemetry series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesInfo {
    /// `site/line/machine/metric`.
    pub name: String,
    /// Unit of its values.
    pub unit: String,
    /// Internal id.
    #[serde(skip)]
    pub id: u32,
}

/// Aggregate of one downsampling step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Step start, Unix ms.
    pub ts_ms: i64,
    /// Points in the step.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Mean value.
    pub mean: f64,
}

/// Version byte of a head entry that holds several points ([`HeadEntry`]).
const HEAD_CHUNK_V1: u8 = 1;

/// One key of `head`. Two encodings are read:
/// - *chunk* (written since 2026-12): key = series id · ts of its earliest point · write order
///   `u64`; value = version byte 1, then (ts `i64`, value `f64`) little-endian pairs, or for a
///   chunk of one point just its `f64` (little-endian; the key holds the ts). One chunk
///   holds the points one write batch brought for one series and block window, so a batch
///   inserts one key per series instead of one per point, and a chunk never spans two windows.
/// - *point* (the first layout): key = series id · ts; value = the `f64`, big-endian.
///
/// Readers apply entries in write order, so that for two points with the same timestamp the
/// later write wins, as when every point had its own key.
#[derive(Debug, PartialEq)]
pub(super) struct HeadEntry {
    /// Write order (0 for the first layout's points, which predate every chunk).
    order: u64,
    pub(super) points: Vec<(i64, f64)>,
}

impl HeadEntry {
    pub(super) fn decode(k: &[u8], v: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            cf: CF_HEAD,
            reason,
        };
        match k.len() {
            12 => {
                let v: [u8; 8] = v
                    .try_into()
                    .map_err(|_| corrupt(format!("point value of {} bytes, not 8", v.len())))?;
                Ok(Self {
                    order: 0,
                    points: vec![(key_ts(&k[4..12]), f64::from_be_bytes(v))],
                })
            }
            20 => {
                let order = u64::from_be_bytes(k[12..20].try_into().expect("8 bytes"));
                // A chunk of one point (sparse devices, small batches) is just the value; the
                // key holds its timestamp.
                if let Ok(v) = <[u8; 8]>::try_from(v) {
                    return Ok(Self {
                        order,
                        points: vec![(key_ts(&k[4..12]), f64::from_le_bytes(v))],
                    });
                }
                let (&version, pairs) = v
                    .split_first()
                    .ok_or_else(|| corrupt("empty chunk".into()))?;
                if version != HEAD_CHUNK_V1 {
                    return Err(corrupt(format!("unknown chunk version {version}")));
                }
                if pairs.len() % 16 != 0 {
                    return Err(corrupt(format!("chunk of {} bytes", pairs.len())));
                }
                let points = pairs
                    .chunks_exact(16)
                    .map(|p| {
                        let ts = i64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
                        (ts, f64::from_le_bytes(p[8..].try_into().expect("8 bytes")))
                    })
                    .collect();
                Ok(Self { order, points })
            }
            n => Err(corrupt(format!("key of {n} bytes"))),
        }
    }
}

/// The points of one write batch for one series and window, becoming one `head` chunk.
#[derive(Debug)]
pub(super) struct PendingChunk {
    pub(super) id: u32,
    pub(super) min_ts: i64,
    pub(super) max_ts: i64,
    value: Vec<u8>,
}

impl PendingChunk {
    pub(super) fn new(id: u32, ts: i64) -> Self {
        let mut value = Vec::with_capacity(1 + 16 * 16);
        value.push(HEAD_CHUNK_V1);
        Self {
            id,
            min_ts: ts,
            max_ts: ts,
            value,
        }
    }

    pub(super) fn push(&mut self, ts: i64, v: f64) {
        self.min_ts = self.min_ts.min(ts);
        self.max_ts = self.max_ts.max(ts);
        self.value.extend_from_slice(&ts.to_le_bytes());
        self.value.extend_from_slice(&v.to_le_bytes());
    }

    /// The value to store: a one-point chunk is only its value (8 bytes instead of 17), so
    /// that many sparse devices do not cost more memtable memory than one key per point did.
    pub(super) fn encoded(&self) -> &[u8] {
        const ONE_POINT: usize = 1 + 16;
        if self.value.len() == ONE_POINT {
            &self.value[ONE_POINT - 8..]
        } else {
            &self.value
        }
    }

    pub(super) fn key(&self, order: u64) -> [u8; 20] {
        let mut k = [0u8; 20];
        k[..12].copy_from_slice(&series_ts_key(self.id, self.min_ts));
        k[12..].copy_from_slice(&order.to_be_bytes());
        k
    }
}

/// Decodes the head entries `scan` yields and applies them in write order into `points`,
/// keeping the points `keep` accepts. Returns how many it applied.
pub(super) fn merge_head(
    points: &mut BTreeMap<i64, f64>,
    scan: impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>>,
    keep: impl Fn(i64) -> bool,
) -> Result<u64, StoreError> {
    let mut entries = scan
        .map(|item| {
            let (k, v) = item?;
            HeadEntry::decode(&k, &v)
        })
        .collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.order);
    let mut n = 0;
    for e in entries {
        for (ts, v) in e.points {
            if keep(ts) {
                points.insert(ts, v);
                n += 1;
            }
        }
    }
    Ok(n)
}

pub(super) fn decode_block(v: &[u8]) -> Result<Vec<(i64, f64)>, StoreError> {
    block::decode(v).map_err(|e| StoreError::Corrupt {
        cf: CF_BLOCKS,
        reason: e.to_string(),
    })
}

#[derive(Default)]
pub(super) struct Index {
    pub(super) by_name: HashMap<String, (u32, String)>,
    pub(super) by_id: BTreeMap<u32, String>,
    pub(super) next_id: u32,
}

/// Windows with unsealed points, per series, and the newest point seen per series.
#[derive(Default)]
pub(super) struct Unsealed {
    pub(super) windows: BTreeMap<u32, BTreeSet<i64>>,
    pub(super) newest: HashMap<u32, i64>,
}

impl Store {
    /// The id of a series (`t/…`) or machine (`m/…`) name, if known.
    pub(super) fn id_of(&self, name: &str) -> Option<u32> {
        self.index
            .read()
            .expect("index lock")
            .by_name
            .get(name)
            .map(|(id, _)| *id)
    }

    pub(super) fn window_ms(&self) -> i64 {
        self.opts.block_window.as_millis().max(1) as i64
    }

    /// Looks up or assigns the id of `name`, adding a new entry to `batch`.
    pub(super) fn id_for(
        &self,
        name: &str,
        unit: &str,
        batch: &mut WriteBatch,
        new: &mut Vec<(String, u32, String)>,
    ) -> Result<u32, StoreError> {
        if let Some(id) = self.id_of(name) {
            return Ok(id);
        }
        if let Some((_, id, _)) = new.iter().find(|(n, _, _)| n == name) {
            return Ok(*id);
        }
        let id = {
            let index = self.index.read().expect("index lock");
            index.next_id + new.len() as u32
        };
        if id == u32::MAX {
            return Err(StoreError::SeriesExhausted);
        }
        let mut v = id.to_be_bytes().to_vec();
        v.extend_from_slice(unit.as_bytes());
        batch.put_cf(self.cf(CF_SERIES), name.as_bytes(), v);
        new.push((name.to_owned(), id, unit.to_owned()));
        Ok(id)
    }

    /// Seals every window that ended more than the grace period before `now_ms` (or before the
    /// series' newest point) into a compressed block. Returns the points sealed.
    pub fn seal(&self, now_ms: i64) -> Result<u64, StoreError> {
        let window = self.window_ms();
        let grace = self.opts.seal_grace.as_millis() as i64;
        let due: Vec<(u32, i64)> = {
            let unsealed = self.unsealed.lock().expect("unsealed lock");
            unsealed
                .windows
                .iter()
                .flat_map(|(id, ws)| {
                    let horizon =
                        now_ms.max(unsealed.newest.get(id).copied().unwrap_or(i64::MIN)) - grace;
                    ws.iter()
                        .filter(move |w| **w + window <= horizon)
                        .map(move |w| (*id, *w))
                })
                .collect()
        };
        let mut sealed = 0;
        for (id, start) in due {
            sealed += self.seal_window(id, start, start + window)?;
        }
        Ok(sealed)
    }

    /// Seals every unsealed point regardless of time (used before measuring size on disk).
    pub fn seal_all(&self) -> Result<u64, StoreError> {
        let window = self.window_ms();
        let due: Vec<(u32, i64)> = {
            let unsealed = self.unsealed.lock().expect("unsealed lock");
            unsealed
                .windows
                .iter()
                .flat_map(|(id, ws)| ws.iter().map(move |w| (*id, *w)))
                .collect()
        };
        let mut sealed = 0;
        for (id, start) in due {
            sealed += self.seal_window(id, start, start + window)?;
        }
        Ok(sealed)
    }

    fn seal_window(&self, id: u32, start: i64, end: i64) -> Result<u64, StoreError> {
        let _guard = self.write_lock.lock().expect("write lock");
        let (head, blocks) = (self.cf(CF_HEAD), self.cf(CF_BLOCKS));
        let (from, to) = (series_ts_key(id, start), series_ts_key(id, end));
        let mut points: BTreeMap<i64, f64> = BTreeMap::new();
        let block_key = series_ts_key(id, start);
        if let Some(existing) = self.db.get_cf(blocks, block_key)? {
            points.extend(decode_block(&existing)?);
        }
        let fresh = merge_head(&mut points, self.scan(CF_HEAD, &from, &to), |_| true)?;
        let mut batch = WriteBatch::default();
        if !points.is_empty() {
            let pts: Vec<(i64, f64)> = points.into_iter().collect();
            batch.put_cf(blocks, block_key, block::encode(&pts));
        }
        batch.delete_range_cf(head, from, to);
        let mut wo = WriteOptions::default();
        wo.set_sync(self.opts.sync_writes);
        self.db.write_opt(batch, &wo)?;
        let mut unsealed = self.unsealed.lock().expect("unsealed lock");
        if let Some(ws) = unsealed.windows.get_mut(&id) {
            ws.remove(&start);
            if ws.is_empty() {
                unsealed.windows.remove(&id);
            }
        }
        Ok(fresh)
    }

    /// Every telemetry series.
    pub fn series(&self) -> Vec<SeriesInfo> {
        let index = self.index.read().expect("index lock");
        let mut out: Vec<SeriesInfo> = index
            .by_name
            .iter()
            .filter_map(|(name, (id, unit))| match IndexName::parse(name) {
                Some(IndexName::Series(n)) => Some(SeriesInfo {
                    name: n.to_owned(),
                    unit: unit.clone(),
                    id: *id,
                }),
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The points of `series` (`site/line/machine/metric`) in `[from_ms, to_ms)`, in time
    /// order, or `None` for an unknown series.
    pub fn points(
        &self,
        series: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Option<Vec<(i64, f64)>>, StoreError> {
        let Some(id) = self.id_of(&series_name_of(series)) else {
            return Ok(None);
        };
        let cutoff = self.visible_from(self.opts.telemetry_retention);
        let from_ms = from_ms.max(cutoff);
        let mut points: BTreeMap<i64, f64> = BTreeMap::new();
        if from_ms < to_ms {
            // Blocks and head from one snapshot: a seal between the two scans would otherwise
            // move points from the head (not yet scanned) into a block (already scanned).
            let snapshot = self.db.snapshot();
            let window = self.window_ms();
            let first_block = from_ms.div_euclid(window).saturating_mul(window);
            for item in self.scan_at(
                &snapshot,
                CF_BLOCKS,
                &series_ts_key(id, first_block),
                &series_ts_key(id, to_ms),
            ) {
                let (_, v) = item?;
                let pts = decode_block(&v)?;
                points.extend(pts.into_iter().filter(|(t, _)| *t >= from_ms && *t < to_ms));
            }
            // A chunk's key holds its earliest point, and chunks do not span windows: every
            // chunk with points in range starts in `[first_block, to_ms)`.
            let head = self.scan_at(
                &snapshot,
                CF_HEAD,
                &series_ts_key(id, first_block),
                &series_ts_key(id, to_ms),
            );
            merge_head(&mut points, head, |t| t >= from_ms && t < to_ms)?;
        }
        Ok(Some(points.into_iter().collect()))
    }
}

/// A device's series by reading position in its last event: (metric, series id, window, chunk).
type SeriesSlots<'a> = Vec<(&'a str, u32, i64, usize)>;

/// The telemetry part of one write: one `head` chunk per series and window (most batches hold
/// one window), the series ids assigned on the way.
pub(super) struct HeadBatch<'e> {
    window: i64,
    chunks: Vec<PendingChunk>,
    chunk_of: HashMap<(u32, i64), usize>,
    /// The last device's series: consecutive events mostly come from one device (one
    /// connection's read), so its series' ids and chunks are looked up once, not per reading.
    last: Option<(&'e MachineId, SeriesSlots<'e>)>,
    name: String,
}

impl<'e> HeadBatch<'e> {
    pub(super) fn new(window: i64) -> Self {
        Self {
            window,
            chunks: vec![],
            chunk_of: HashMap::new(),
            last: None,
            name: String::with_capacity(128),
        }
    }

    /// Adds the readings of one telemetry event of `m` at `ts`; new series get ids (their
    /// names go into `batch`, the ids into `new`). Returns the id of the event's first series.
    pub(super) fn add(
        &mut self,
        store: &Store,
        m: &'e MachineId,
        ts: i64,
        readings: &'e [Reading],
        batch: &mut WriteBatch,
        new: &mut Vec<(String, u32, String)>,
    ) -> Result<Option<u32>, StoreError> {
        let cached = matches!(&self.last, Some((lm, _)) if *lm == m);
        if !cached {
            self.last = Some((m, Vec::with_capacity(readings.len())));
        }
        let series = &mut self.last.as_mut().expect("just set").1;
        let w = ts.div_euclid(self.window) * self.window;
        let mut first_id = None;
        for (n, r) in readings.iter().enumerate() {
            // Same metric at the same position as in the device's previous event?
            let hit = series.get(n).filter(|c| c.0 == r.name.as_str()).copied();
            let id = match hit {
                Some((_, id, _, _)) => id,
                None => {
                    series_name(m, &r.name, &mut self.name);
                    store.id_for(&self.name, &r.unit, batch, new)?
                }
            };
            let chunk = match hit {
                Some((_, _, cw, chunk)) if cw == w => chunk,
                _ => *self.chunk_of.entry((id, w)).or_insert_with(|| {
                    self.chunks.push(PendingChunk::new(id, ts));
                    self.chunks.len() - 1
                }),
            };
            let entry = (r.name.as_str(), id, w, chunk);
            match series.get_mut(n) {
                Some(c) => *c = entry,
                None => series.push(entry),
            }
            first_id.get_or_insert(id);
            self.chunks[chunk].push(ts, r.value);
        }
        Ok(first_id)
    }

    /// Puts the chunks into `batch`; `order` must be unique and increasing per batch.
    pub(super) fn finish(&self, store: &Store, batch: &mut WriteBatch, order: u64) {
        let head = store.cf(CF_HEAD);
        for c in &self.chunks {
            batch.put_cf(head, c.key(order), c.encoded());
        }
    }

    /// After the batch is written: remembers the windows the chunks fell in as unsealed.
    pub(super) fn mark_unsealed(&self, store: &Store) {
        let mut unsealed = store.unsealed.lock().expect("unsealed lock");
        for c in &self.chunks {
            unsealed
                .windows
                .entry(c.id)
                .or_default()
                .insert(c.min_ts.div_euclid(self.window) * self.window);
            let newest = unsealed.newest.entry(c.id).or_insert(c.max_ts);
            *newest = (*newest).max(c.max_ts);
        }
    }
}

impl Store {
    /// After a batch with new series or machines is written: adds them to the index.
    pub(super) fn index_new(&self, new: Vec<(String, u32, String)>) {
        if new.is_empty() {
            return;
        }
        let mut index = self.index.write().expect("index lock");
        for (name, id, unit) in new {
            index.next_id = index.next_id.max(id + 1);
            index.by_id.insert(id, name.clone());
            index.by_name.insert(name, (id, unit));
        }
    }
}
