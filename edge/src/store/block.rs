//! Compressed blocks of `(timestamp, value)` points, after Facebook's Gorilla (VLDB 2015).
//!
//! Timestamps are delta-of-delta encoded in variable-width buckets: a regular series costs one
//! bit per point. Values take one of two encodings, chosen per block:
//! - **decimal**: when every value is a decimal with at most 6 fractional digits (what sensors
//!   and gateways send, e.g. `62.37`), values are scaled to integers and their deltas are
//!   zig-zag encoded in variable-width buckets. Noisy sensor data at two decimals costs about
//!   8–15 bits a point; an unchanged value costs one bit.
//! - **xor**: Gorilla's XOR of consecutive IEEE-754 values with leading/trailing-zero windows,
//!   for anything else (exact for every `f64`, NaN included).
//!
//! Written by hand rather than taken from a crate: the crates that implement Gorilla are
//! unmaintained and work in seconds and `u64`s, and none has the decimal encoding.
//!
//! Layout: `version u8 | count varint | first_ts zigzag-varint | encoding u8 | [scale u8] |
//! first value (zigzag-varint scaled, or 8 bytes) | bitstream (timestamps, then values)`.

/// Why a block could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The block ended early or has an unknown layout.
    #[error("corrupt block: {0}")]
    Corrupt(&'static str),
}

const VERSION: u8 = 1;
const ENC_XOR: u8 = 0;
const ENC_DECIMAL: u8 = 1;
const MAX_SCALE: u32 = 6;

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    bits: u32,
}

impl BitWriter {
    fn new(out: Vec<u8>) -> Self {
        Self {
            out,
            acc: 0,
            bits: 0,
        }
    }

    /// Writes the low `n` bits of `v` (n ≤ 64), most significant first.
    fn write(&mut self, v: u64, n: u32) {
        if n == 0 {
            return;
        }
        if n > 32 {
            self.write(v >> 32, n - 32);
            self.write(v & 0xffff_ffff, 32);
            return;
        }
        let v = if n == 64 { v } else { v & ((1u64 << n) - 1) };
        self.acc = (self.acc << n) | v;
        self.bits += n;
        while self.bits >= 8 {
            self.bits -= 8;
            self.out.push((self.acc >> self.bits) as u8);
        }
        self.acc &= (1u64 << self.bits) - 1;
    }

    fn finish(mut self) -> Vec<u8> {
        if self.bits > 0 {
            self.out.push((self.acc << (8 - self.bits)) as u8);
        }
        self.out
    }
}

struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    fn read(&mut self, n: u32) -> Result<u64, BlockError> {
        let mut v = 0u64;
        for _ in 0..n {
            let byte = *self
                .data
                .get(self.pos / 8)
                .ok_or(BlockError::Corrupt("bitstream ended early"))?;
            let bit = (byte >> (7 - (self.pos % 8))) & 1;
            v = (v << 1) | u64::from(bit);
            self.pos += 1;
        }
        Ok(v)
    }

    fn bit(&mut self) -> Result<bool, BlockError> {
        Ok(self.read(1)? == 1)
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &[u8], pos: &mut usize) -> Result<u64, BlockError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data
            .get(*pos)
            .ok_or(BlockError::Corrupt("varint ended early"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(BlockError::Corrupt("varint too long"))
}

/// Timestamp delta-of-delta buckets: (prefix bits, prefix length, payload bits).
const TS_BUCKETS: [(u64, u32, u32); 4] = [
    (0b10, 2, 7),
    (0b110, 3, 9),
    (0b1110, 4, 12),
    (0b1111, 4, 64),
];
/// Decimal delta buckets over zig-zag values.
const DEC_BUCKETS: [(u64, u32, u32); 5] = [
    (0b10, 2, 7),
    (0b110, 3, 10),
    (0b1110, 4, 14),
    (0b11110, 5, 20),
    (0b11111, 5, 64),
];

fn put_bucketed(w: &mut BitWriter, z: u64, buckets: &[(u64, u32, u32)]) {
    if z == 0 {
        w.write(0, 1);
        return;
    }
    for &(prefix, plen, bits) in buckets {
        if bits == 64 || z < (1u64 << bits) {
            w.write(prefix, plen);
            w.write(z, bits);
            return;
        }
    }
}

fn get_bucketed(r: &mut BitReader<'_>, buckets: &[(u64, u32, u32)]) -> Result<u64, BlockError> {
    if !r.bit()? {
        return Ok(0);
    }
    for (i, &(_, _, bits)) in buckets.iter().enumerate() {
        let last = i == buckets.len() - 1;
        if last || !r.bit()? {
            return r.read(bits);
        }
    }
    unreachable!("the last bucket always matches")
}

/// The smallest number of fractional digits (≤ 6) that represents `v` exactly, if any.
fn decimal_scale(v: f64) -> Option<u32> {
    (0..=MAX_SCALE).find(|&k| {
        let p = 10f64.powi(k as i32);
        let s = (v * p).round();
        s.abs() < 9.0e15 && (s / p).to_bits() == v.to_bits()
    })
}

fn scaled(points: &[(i64, f64)]) -> Option<(u32, Vec<i64>)> {
    let mut scale = 0;
    for &(_, v) in points {
        scale = scale.max(decimal_scale(v)?);
    }
    let p = 10f64.powi(scale as i32);
    let ints: Vec<i64> = points
        .iter()
        .map(|&(_, v)| (v * p).round() as i64)
        .collect();
    // Every value must come back bit for bit at the common scale.
    let exact = ints
        .iter()
        .zip(points)
        .all(|(&i, &(_, v))| ((i as f64) / p).to_bits() == v.to_bits());
    exact.then_some((scale, ints))
}

/// Encodes points sorted by strictly increasing timestamp.
pub fn encode(points: &[(i64, f64)]) -> Vec<u8> {
    debug_assert!(
        points.windows(2).all(|w| w[0].0 < w[1].0),
        "points sorted and unique"
    );
    let mut out = Vec::with_capacity(16 + points.len() * 2);
    out.push(VERSION);
    put_varint(&mut out, points.len() as u64);
    let Some(&(t0, v0)) = points.first() else {
        return out;
    };
    put_varint(&mut out, zigzag(t0));
    let decimal = scaled(points);
    match &decimal {
        Some((scale, ints)) => {
            out.push(ENC_DECIMAL);
            out.push(*scale as u8);
            put_varint(&mut out, zigzag(ints[0]));
        }
        None => {
            out.push(ENC_XOR);
            out.extend_from_slice(&v0.to_bits().to_be_bytes());
        }
    }
    let mut w = BitWriter::new(out);
    let mut prev_delta = 0i64;
    for pair in points.windows(2) {
        let delta = pair[1].0 - pair[0].0;
        put_bucketed(&mut w, zigzag(delta - prev_delta), &TS_BUCKETS);
        prev_delta = delta;
    }
    match decimal {
        Some((_, ints)) => {
            for pair in ints.windows(2) {
                put_bucketed(&mut w, zigzag(pair[1].wrapping_sub(pair[0])), &DEC_BUCKETS);
            }
        }
        None => {
            let (mut prev, mut lead, mut trail) = (v0.to_bits(), u32::MAX, 0u32);
            for &(_, v) in &points[1..] {
                let x = v.to_bits() ^ prev;
                prev = v.to_bits();
                if x == 0 {
                    w.write(0, 1);
                    continue;
                }
                w.write(1, 1);
                let (l, t) = (x.leading_zeros().min(31), x.trailing_zeros());
                if lead != u32::MAX && l >= lead && t >= trail {
                    w.write(0, 1);
                    w.write(x >> trail, 64 - lead - trail);
                } else {
                    lead = l;
                    trail = t;
                    let len = 64 - l - t;
                    w.write(1, 1);
                    w.write(u64::from(l), 5);
                    // len is 1..=64; store len - 1 in 6 bits.
                    w.write(u64::from(len - 1), 6);
                    w.write(x >> t, len);
                }
            }
        }
    }
    w.finish()
}

/// Decodes a block.
pub fn decode(data: &[u8]) -> Result<Vec<(i64, f64)>, BlockError> {
    let mut pos = 0;
    if data.first() != Some(&VERSION) {
        return Err(BlockError::Corrupt("unknown block version"));
    }
    pos += 1;
    let n = get_varint(data, &mut pos)? as usize;
    if n == 0 {
        return Ok(vec![]);
    }
    if n > 10_000_000 {
        return Err(BlockError::Corrupt("implausible point count"));
    }
    let t0 = unzigzag(get_varint(data, &mut pos)?);
    let enc = *data
        .get(pos)
        .ok_or(BlockError::Corrupt("missing encoding"))?;
    pos += 1;
    let (scale, first) = match enc {
        ENC_DECIMAL => {
            let s = u32::from(*data.get(pos).ok_or(BlockError::Corrupt("missing scale"))?);
            pos += 1;
            if s > MAX_SCALE {
                return Err(BlockError::Corrupt("bad scale"));
            }
            (Some(s), unzigzag(get_varint(data, &mut pos)?) as u64)
        }
        ENC_XOR => {
            let b: [u8; 8] = data
                .get(pos..pos + 8)
                .ok_or(BlockError::Corrupt("missing first value"))?
                .try_into()
                .expect("8 bytes");
            pos += 8;
            (None, u64::from_be_bytes(b))
        }
        _ => return Err(BlockError::Corrupt("unknown value encoding")),
    };
    let mut r = BitReader {
        data: &data[pos..],
        pos: 0,
    };
    let mut ts = Vec::with_capacity(n);
    ts.push(t0);
    let mut delta = 0i64;
    for i in 1..n {
        delta = delta.wrapping_add(unzigzag(get_bucketed(&mut r, &TS_BUCKETS)?));
        ts.push(ts[i - 1].wrapping_add(delta));
    }
    let mut out = Vec::with_capacity(n);
    match scale {
        Some(s) => {
            let p = 10f64.powi(s as i32);
            let mut cur = first as i64;
            out.push((ts[0], cur as f64 / p));
            for &t in &ts[1..] {
                cur = cur.wrapping_add(unzigzag(get_bucketed(&mut r, &DEC_BUCKETS)?));
                out.push((t, cur as f64 / p));
            }
        }
        None => {
            let (mut prev, mut lead, mut trail) = (first, 0u32, 0u32);
            out.push((ts[0], f64::from_bits(prev)));
            for &t in &ts[1..] {
                if r.bit()? {
                    if r.bit()? {
                        lead = r.read(5)? as u32;
                        let len = r.read(6)? as u32 + 1;
                        if lead + len > 64 {
                            return Err(BlockError::Corrupt("bad xor window"));
                        }
                        trail = 64 - lead - len;
                    }
                    let len = 64 - lead - trail;
                    prev ^= r.read(len)? << trail;
                }
                out.push((t, f64::from_bits(prev)));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn round_trip(points: &[(i64, f64)]) -> usize {
        let enc = encode(points);
        let dec = decode(&enc).unwrap();
        assert_eq!(dec.len(), points.len());
        for (a, b) in dec.iter().zip(points) {
            assert_eq!(a.0, b.0);
            assert_eq!(a.1.to_bits(), b.1.to_bits(), "{} vs {}", a.1, b.1);
        }
        enc.len()
    }

    #[test]
    fn regular_sensor_series_compress_below_two_bytes_a_point() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let t0 = 1_767_600_000_000;
        let mut temp = 60.0f64;
        let points: Vec<(i64, f64)> = (0..3600)
            .map(|i| {
                temp += rng.random_range(-0.3..0.3);
                (t0 + i * 1000, (temp * 100.0).round() / 100.0)
            })
            .collect();
        let size = round_trip(&points);
        let per_point = size as f64 / points.len() as f64;
        assert!(per_point < 1.5, "{per_point} bytes/point");
        // A constant series costs about two bits a point.
        let flat: Vec<(i64, f64)> = (0..3600).map(|i| (t0 + i * 1000, 0.0)).collect();
        assert!(round_trip(&flat) < 3600 / 4 + 32);
    }

    #[test]
    fn any_floats_and_irregular_timestamps_round_trip() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let mut t = -5_000i64;
        let specials = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            f64::MIN_POSITIVE,
            f64::MAX,
            1e-300,
            0.1 + 0.2,
        ];
        let points: Vec<(i64, f64)> = (0..2000)
            .map(|i| {
                t += rng.random_range(1..100_000_000);
                let v = if i % 7 == 0 {
                    specials[i % specials.len()]
                } else {
                    rng.random::<f64>() * 1e6 - 5e5
                };
                (t, v)
            })
            .collect();
        round_trip(&points);
        round_trip(&points[..1]);
        round_trip(&[]);
        round_trip(&[(i64::MIN / 4, 1.5), (i64::MAX / 4, -2.25)]);
        // Decimal blocks with large and negative values and the widest deltas.
        round_trip(&[
            (1, 123456.123456),
            (2, -987654.654321),
            (3, 0.000001),
            (4, 9.0e9),
            (5, -9.0e9),
        ]);
    }

    #[test]
    fn corrupt_blocks_are_errors_not_panics() {
        let points: Vec<(i64, f64)> = (0..100).map(|i| (i * 10, i as f64 * 0.5)).collect();
        let enc = encode(&points);
        for end in 0..enc.len() {
            let _ = decode(&enc[..end]);
        }
        assert!(decode(&[]).is_err());
        assert!(decode(&[9, 1]).is_err());
        let mut bad = enc.clone();
        bad[3] = 7;
        assert!(decode(&bad).is_err());
    }
}
