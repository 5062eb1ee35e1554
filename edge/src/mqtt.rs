//! Reading MQTT packets from a stream at the device port: the CONNECT's protocol level on the
//! way in, the CONNACK's verdict on the way back. The framing itself (remaining length,
//! CONNECT header, the PUBLISH scanner) is `millrace_shared::mqtt`, where it is fuzzed.
//!
//! Only what the device port needs to route and ingest is read here; everything else about
//! the protocol is rumqttd's.

use tokio::io::{AsyncRead, AsyncReadExt};

pub(crate) use millrace_shared::mqtt::{
    FrameError, Publish, Scanner, connect_level, remaining_length,
};

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
/// (see [`connect_level`]), and returns the level. The rest of the packet stays unread.
pub(crate) async fn read_level<S: AsyncRead + Unpin>(
    sock: &mut S,
    head: &mut Vec<u8>,
) -> Result<u8, ReadError> {
    // Byte by byte: not one byte past the level may be taken from the device's stream.
    let start = head.len();
    loop {
        if let Some((level, _)) = connect_level(&head[start..])? {
            return Ok(level);
        }
        head.push(sock.read_u8().await?);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use millrace_shared::mqtt::frame;

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
