//! Finds PUBLISH packets in the byte stream a device sends, without decoding anything else.
//!
//! The scanner keeps the bytes of an incomplete packet between reads and yields the topic and
//! payload of every complete PUBLISH (MQTT 3.1.1 and 5, including v5 topic aliases). Other
//! packets are only skipped over. A stream it cannot frame is reported once; rumqttd, which
//! receives the same bytes, closes such a connection.

use std::collections::HashMap;

use bytes::{Buf, Bytes, BytesMut};

use super::{FrameError, remaining_length};

/// One PUBLISH taken from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The topic (resolved through a topic alias where one is used).
    pub topic: Bytes,
    /// The payload.
    pub payload: Bytes,
    /// The RETAIN flag: the broker keeps it as the topic's last value (an empty payload clears
    /// it).
    pub retain: bool,
}

/// Scans one connection's device-to-broker bytes.
#[derive(Debug)]
pub struct Scanner {
    v5: bool,
    /// Largest packet accepted (fixed header included).
    max_packet: usize,
    pending: BytesMut,
    aliases: HashMap<u16, Bytes>,
    /// Stream bytes in complete packets so far.
    consumed: u64,
    /// Where the first packet (the CONNECT) ends in the stream, once complete.
    connect_end: Option<u64>,
}

impl Scanner {
    /// A scanner for a connection of the given protocol version that takes packets of up to
    /// `max_packet` bytes (a longer one is an error before any of it is buffered).
    pub fn new(v5: bool, max_packet: usize) -> Self {
        Self {
            v5,
            max_packet,
            pending: BytesMut::with_capacity(16 * 1024),
            aliases: HashMap::new(),
            consumed: 0,
            connect_end: None,
        }
    }

    /// Where the connection's first packet (its CONNECT) ends in the stream, once it is complete.
    pub fn connect_end(&self) -> Option<u64> {
        self.connect_end
    }

    /// Adds bytes read from the device and returns the PUBLISH packets they complete.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Publish>) -> Result<(), FrameError> {
        self.pending.extend_from_slice(data);
        loop {
            let Some(&first) = self.pending.first() else {
                return Ok(());
            };
            let Some((len, len_bytes)) = remaining_length(&self.pending[1..])? else {
                return Ok(());
            };
            let total = 1 + len_bytes + len;
            if total > self.max_packet {
                return Err(FrameError::TooLarge(total));
            }
            if self.pending.len() < total {
                self.pending.reserve(total - self.pending.len());
                return Ok(());
            }
            let mut packet = self.pending.split_to(total).freeze();
            self.consumed += total as u64;
            if self.connect_end.is_none() {
                self.connect_end = Some(self.consumed);
            }
            if first >> 4 == 3 {
                packet.advance(1 + len_bytes);
                let qos = (first >> 1) & 3;
                let mut publish = self.publish(packet, qos)?;
                publish.retain = first & 1 == 1;
                out.push(publish);
            }
        }
    }

    fn publish(&mut self, mut p: Bytes, qos: u8) -> Result<Publish, FrameError> {
        if p.len() < 2 {
            return Err(FrameError::Publish);
        }
        let tlen = usize::from(p.get_u16());
        if p.len() < tlen {
            return Err(FrameError::Publish);
        }
        let mut topic = p.split_to(tlen);
        if qos > 0 {
            if p.len() < 2 {
                return Err(FrameError::Publish);
            }
            p.advance(2);
        }
        if self.v5 {
            let (plen, n) = remaining_length(&p)?.ok_or(FrameError::Publish)?;
            if p.len() < n + plen {
                return Err(FrameError::Publish);
            }
            p.advance(n);
            let props = p.split_to(plen);
            if let Some(alias) = topic_alias(&props)? {
                if topic.is_empty() {
                    topic = self
                        .aliases
                        .get(&alias)
                        .cloned()
                        .ok_or(FrameError::Alias(alias))?;
                } else {
                    self.aliases.insert(alias, topic.clone());
                }
            }
        }
        Ok(Publish {
            topic,
            payload: p,
            retain: false,
        })
    }
}

/// The Topic Alias property (0x23) among a PUBLISH's properties, if present.
fn topic_alias(mut p: &[u8]) -> Result<Option<u16>, FrameError> {
    let mut alias = None;
    while !p.is_empty() {
        let id = p[0];
        p = &p[1..];
        let skip = match id {
            0x01 => 1, // payload format indicator
            0x02 => 4, // message expiry interval
            0x23 => {
                if p.len() < 2 {
                    return Err(FrameError::Publish);
                }
                alias = Some(u16::from_be_bytes([p[0], p[1]]));
                2
            }
            0x03 | 0x08 | 0x09 => {
                // content type, response topic, correlation data: 2-byte length + bytes
                if p.len() < 2 {
                    return Err(FrameError::Publish);
                }
                2 + usize::from(u16::from_be_bytes([p[0], p[1]]))
            }
            0x26 => {
                // user property: two strings
                if p.len() < 2 {
                    return Err(FrameError::Publish);
                }
                let k = 2 + usize::from(u16::from_be_bytes([p[0], p[1]]));
                if p.len() < k + 2 {
                    return Err(FrameError::Publish);
                }
                k + 2 + usize::from(u16::from_be_bytes([p[k], p[k + 1]]))
            }
            0x0B => remaining_length(p)?.ok_or(FrameError::Publish)?.1, // subscription identifier
            _ => return Err(FrameError::Publish),
        };
        if p.len() < skip {
            return Err(FrameError::Publish);
        }
        p = &p[skip..];
    }
    Ok(alias)
}

#[cfg(test)]
mod tests {
    use super::super::frame;
    use super::*;

    fn publish_v4(topic: &str, payload: &[u8], qos: u8) -> Vec<u8> {
        let mut body = vec![];
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&7u16.to_be_bytes());
        }
        body.extend_from_slice(payload);
        frame(0x30 | (qos << 1), &body)
    }

    #[test]
    fn finds_publishes_split_anywhere_and_skips_other_packets() {
        let mut stream = frame(0xC0, &[]); // PINGREQ
        stream.extend(publish_v4("factory/a/b/c/state", b"{}", 1));
        stream.extend(frame(0x40, &[0, 7])); // PUBACK
        let big = vec![b'x'; 70_000];
        stream.extend(publish_v4("t", &big, 0));
        for cut in [1, 2, 3, 5, 17, 1000, stream.len()] {
            let mut s = Scanner::new(false, 1 << 20);
            let mut out = vec![];
            for chunk in stream.chunks(cut) {
                s.push(chunk, &mut out).unwrap();
            }
            assert_eq!(out.len(), 2, "chunks of {cut}");
            assert_eq!(&out[0].topic[..], b"factory/a/b/c/state");
            assert_eq!(&out[0].payload[..], b"{}");
            assert_eq!(out[1].payload.len(), 70_000);
        }
    }

    #[test]
    fn v5_properties_and_topic_aliases() {
        let with_props = |topic: &str, props: &[u8], payload: &[u8]| {
            let mut body = vec![];
            body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
            body.extend_from_slice(topic.as_bytes());
            body.extend_from_slice(&1u16.to_be_bytes());
            body.push(props.len() as u8);
            body.extend_from_slice(props);
            body.extend_from_slice(payload);
            frame(0x32, &body)
        };
        let mut s = Scanner::new(true, 1 << 20);
        let mut out = vec![];
        // Alias 5 set with a user property and a content type, then used with an empty topic.
        let props = [
            &[0x26, 0, 1, b'k', 0, 1, b'v', 0x03, 0, 2, b'j', b's'][..],
            &[0x23, 0, 5],
        ]
        .concat();
        s.push(&with_props("factory/a/b/c/part", &props, b"one"), &mut out)
            .unwrap();
        s.push(&with_props("", &[0x23, 0, 5], b"two"), &mut out)
            .unwrap();
        assert_eq!(
            out.iter()
                .map(|p| (&p.topic[..], &p.payload[..]))
                .collect::<Vec<_>>(),
            [
                (&b"factory/a/b/c/part"[..], &b"one"[..]),
                (&b"factory/a/b/c/part"[..], &b"two"[..])
            ]
        );
        assert_eq!(
            s.push(&with_props("", &[0x23, 0, 9], b"x"), &mut out),
            Err(FrameError::Alias(9))
        );
    }

    #[test]
    fn a_packet_over_the_limit_is_refused_before_it_is_buffered() {
        let mut s = Scanner::new(false, 1000);
        let mut head = vec![0x30];
        crate::mqtt::put_remaining_length(&mut head, 268_435_455);
        assert_eq!(
            s.push(&head, &mut vec![]),
            Err(FrameError::TooLarge(268_435_455 + 5))
        );
        assert!(s.pending.capacity() < 1 << 20);
        let mut s = Scanner::new(false, 1000);
        let mut out = vec![];
        s.push(&publish_v4("t", &[b'x'; 990], 0), &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut s = Scanner::new(false, 1 << 20);
        assert_eq!(
            s.push(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], &mut vec![]),
            Err(FrameError::Length)
        );
        let mut s = Scanner::new(true, 1 << 20);
        assert!(s.push(&[0x30, 1, 0], &mut vec![]).is_err());
    }
}
