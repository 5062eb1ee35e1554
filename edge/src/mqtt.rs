//! MQTT wire framing, in one place: the remaining-length field, reading one packet from a
//! stream (the CONNECT's protocol level on the way in, the CONNACK's verdict on the way back),
//! and the scanner that finds PUBLISH packets in a device's byte stream.
//!
//! Only what the device port needs to route and ingest is read here; everything else about
//! the protocol is rumqttd's.

mod scanner;

use tokio::io::{AsyncRead, AsyncReadExt};

pub(crate) use scanner::{Publish, Scanner};

/// Why a stream could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
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
}

/// Why a packet could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The stream failed or ended.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not the packet expected.
    #[error("{0}")]
    Frame(#[from] FrameError),
}

/// Decodes a remaining-length field at the start of `b`: `Some((length, bytes it took))`, or
/// `None` when `b` ends before the field does.
pub(crate) fn remaining_length(b: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
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

/// Reads one packet's fixed header (type byte and remaining length) into `out`; returns the
/// type byte and the remaining length.
async fn read_fixed_header<R: AsyncRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> Result<(u8, usize), ReadError> {
    let first = r.read_u8().await?;
    out.push(first);
    let start = out.len();
    loop {
        out.push(r.read_u8().await?);
        if let Some((len, _)) = remaining_length(&out[start..])? {
            return Ok((first, len));
        }
    }
}

/// Reads one whole packet into `out`; returns its type byte and the offset of its body.
async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> Result<(u8, usize), ReadError> {
    let (first, len) = read_fixed_header(r, out).await?;
    let start = out.len();
    out.resize(start + len, 0);
    r.read_exact(&mut out[start..]).await?;
    Ok((first, start))
}

/// Reads a broker's first packet into `out` and tells whether it is a CONNACK that accepts the
/// login (return code / reason code 0, both in MQTT 3.1.1 and 5).
pub(crate) async fn read_connack<R: AsyncRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> Result<bool, ReadError> {
    let (first, body) = read_packet(r, out).await?;
    Ok(first == 0x20 && out.len() >= body + 2 && out[body + 1] == 0)
}

/// Reads the start of a device's CONNECT into `head`, up to and including the protocol level
/// (fixed header 0x10, remaining length, protocol name "MQTT" or "MQIsdp", level), and returns
/// the level: 3 or 4 for MQTT 3.1(.1), 5 for MQTT 5. The rest of the packet stays unread.
pub(crate) async fn read_level<S: AsyncRead + Unpin>(
    sock: &mut S,
    head: &mut Vec<u8>,
) -> Result<u8, ReadError> {
    async fn byte<S: AsyncRead + Unpin>(sock: &mut S, head: &mut Vec<u8>) -> std::io::Result<u8> {
        let b = sock.read_u8().await?;
        head.push(b);
        Ok(b)
    }
    // The type byte is checked before the length is read: anything else is not MQTT.
    if byte(sock, head).await? != 0x10 {
        return Err(FrameError::NotConnect.into());
    }
    let start = head.len();
    while remaining_length(&head[start..])?.is_none() {
        byte(sock, head).await?;
    }
    let len = (u16::from(byte(sock, head).await?) << 8) | u16::from(byte(sock, head).await?);
    if len > 6 {
        return Err(FrameError::NotConnect.into());
    }
    for _ in 0..len {
        byte(sock, head).await?;
    }
    Ok(byte(sock, head).await?)
}

/// Appends `len` as a remaining-length field (the encoder of the unit tests).
#[cfg(test)]
fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
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

/// A packet: type byte, remaining length, body (the encoder of the unit tests).
#[cfg(test)]
pub(crate) fn frame(first: u8, body: &[u8]) -> Vec<u8> {
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

    #[tokio::test]
    async fn reads_the_level_of_a_connect_and_the_verdict_of_a_connack() {
        // MQTT 5 CONNECT: name "MQTT", level 5, then flags and more (left unread).
        let connect = frame(
            0x10,
            &[0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0, 1, b'x'],
        );
        let mut head = vec![];
        let level = read_level(&mut &connect[..], &mut head).await.unwrap();
        assert_eq!((level, head.len()), (5, 9));
        assert!(matches!(
            read_level(&mut &frame(0x30, &[0, 1, b't'])[..], &mut vec![]).await,
            Err(ReadError::Frame(FrameError::NotConnect))
        ));
        let mut out = vec![];
        let ok = read_connack(&mut &frame(0x20, &[0, 0])[..], &mut out)
            .await
            .unwrap();
        assert!(ok);
        assert_eq!(out, [0x20, 2, 0, 0]);
        let refused = read_connack(&mut &frame(0x20, &[0, 5])[..], &mut vec![]).await;
        assert!(!refused.unwrap());
        let short = read_connack(&mut &[0x20u8, 2, 0][..], &mut vec![]).await;
        assert!(matches!(short, Err(ReadError::Io(_))));
    }
}
