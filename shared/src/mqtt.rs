//! MQTT wire framing, the parts a server reads before (or instead of) a full MQTT library:
//! the remaining-length field, the start of a CONNECT up to its protocol level, and the
//! [`Scanner`] that finds PUBLISH packets in a device's byte stream (MQTT 3.1.1 and 5).
//!
//! Everything here reads bytes from outside, so it is fuzzed (`fuzz/`, target `mqtt_stream`)
//! and never panics or allocates beyond the packet size it is given.

mod scanner;

pub use scanner::{Publish, Scanner};

/// Why a stream could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The remaining-length field is longer than 4 bytes.
    #[error("malformed remaining length")]
    Length,
    /// A PUBLISH is shorter than its own headers.
    #[error("malformed PUBLISH")]
    Publish,
    /// A PUBLISH uses a topic alias that was never set.
    #[error("unknown topic alias {0}")]
    Alias(u16),
    /// The first packet of a connection is not a CONNECT.
    #[error("first packet is not CONNECT")]
    NotConnect,
    /// A packet is larger than the connection allows.
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
}

/// Decodes a remaining-length field at the start of `b`: `Some((length, bytes it took))`, or
/// `None` when `b` ends before the field does.
pub fn remaining_length(b: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut value = 0usize;
    for (i, byte) in b.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if b.len() >= 4 {
        Err(FrameError::Length)
    } else {
        Ok(None)
    }
}

/// Reads the start of a device's CONNECT from `head` (the bytes received so far): fixed header
/// 0x10, remaining length, protocol name ("MQTT" or "MQIsdp", at most 6 bytes), level. Returns
/// the level (3 or 4 for MQTT 3.1(.1), 5 for MQTT 5) and how many bytes of `head` it took, or
/// `None` while more bytes are needed. The type byte is checked first: anything else is not
/// MQTT.
pub fn connect_level(head: &[u8]) -> Result<Option<(u8, usize)>, FrameError> {
    match head.first() {
        None => return Ok(None),
        Some(0x10) => {}
        Some(_) => return Err(FrameError::NotConnect),
    }
    let Some((_, n)) = remaining_length(&head[1..])? else {
        return Ok(None);
    };
    let name_at = 1 + n;
    let Some(len) = head.get(name_at..name_at + 2) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len > 6 {
        return Err(FrameError::NotConnect);
    }
    let level_at = name_at + 2 + len;
    Ok(head.get(level_at).map(|&level| (level, level_at + 1)))
}

/// Appends `len` as a remaining-length field.
pub fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return;
        }
    }
}

/// A packet: type byte, remaining length, body.
pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_of_every_size_and_malformed_ones() {
        for len in [
            0usize,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            268_435_455,
        ] {
            let mut enc = vec![];
            put_remaining_length(&mut enc, len);
            assert_eq!(remaining_length(&enc), Ok(Some((len, enc.len()))), "{len}");
            assert_eq!(remaining_length(&enc[..enc.len() - 1]), Ok(None), "{len}");
        }
        assert_eq!(
            remaining_length(&[0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(FrameError::Length)
        );
    }

    #[test]
    fn the_level_of_a_connect_byte_by_byte() {
        // MQTT 5 CONNECT: name "MQTT", level 5, then flags and more.
        let connect = frame(
            0x10,
            &[0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 1, b'x'],
        );
        for cut in 0..9 {
            assert_eq!(connect_level(&connect[..cut]), Ok(None), "{cut}");
        }
        assert_eq!(connect_level(&connect), Ok(Some((5, 9))));
        assert_eq!(
            connect_level(&frame(0x30, &[0, 1, b't'])),
            Err(FrameError::NotConnect)
        );
        assert_eq!(
            connect_level(&frame(0x10, &[0, 7, b'M'])),
            Err(FrameError::NotConnect)
        );
    }
}
