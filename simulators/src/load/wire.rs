//! A load device that writes MQTT 3.1.1 packets encoded by rumqttc's codec
//! (`rumqttc::mqttbytes::v4`) straight to its socket, every publish that is due in one write.
//!
//! rumqttc's `EventLoop` writes and flushes each publish on its own (one system call per event)
//! and passes every publish and acknowledgement through its request channel and event queue;
//! on this 2-core benchmark machine that made the load generator use more CPU per event than
//! the edge it was measuring. This device keeps what a device needs of a client (CONNECT with
//! credentials, QoS 0 and 1, a window of unacknowledged publishes, keep-alive pings, a clean
//! DISCONNECT, and reconnecting with backoff when the broker goes away, sending again every
//! QoS 1 publish not yet acknowledged) and nothing else: no QoS 2, for which load mode uses the
//! full rumqttc client.
//!
//! The unacknowledged publishes are kept as slices of the batch they were written in, in the
//! order sent; the broker acknowledges QoS 1 publishes in the order it received them (MQTT
//! 3.1.1 § 4.6), so an acknowledgement pops the front.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::Publish;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Disconnect, Packet, PingReq};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::publish::{
    Backoff, BrokerOptions, FIRST_CONNECT_CLOSES, MAX_PACKET, MAX_UNACKED, PublishError,
};

/// Seconds of silence after which the device pings; the broker's limit is 1.5 × this.
const KEEP_ALIVE_S: u16 = 30;

/// QoS 1 publishes sent and not yet acknowledged: packet id and the encoded packet.
type Unacked = Arc<Mutex<VecDeque<(u16, Bytes)>>>;

/// One device connection of the load.
#[derive(Debug)]
pub(crate) struct WireDevice {
    opts: BrokerOptions,
    writer: OwnedWriteHalf,
    reader: JoinHandle<()>,
    buf: BytesMut,
    next_pkid: u16,
    window: Arc<Semaphore>,
    unacked: Unacked,
    published: u64,
    acked: Arc<AtomicU64>,
    reconnects: u64,
    last_write: Instant,
    /// No reconnect attempt starts after this.
    give_up_at: Instant,
    addr: String,
}

fn connect_error(addr: &str, reason: impl std::fmt::Display) -> PublishError {
    PublishError::Connect {
        addr: addr.to_owned(),
        reason: reason.to_string(),
    }
}

/// Why one connection attempt failed.
struct Failed {
    reason: String,
    /// A CONNACK that refused: trying again will not help.
    for_good: bool,
    /// The broker closed the connection before its CONNACK.
    closed: bool,
}

impl Failed {
    fn io(e: impl std::fmt::Display) -> Self {
        Self {
            reason: e.to_string(),
            for_good: false,
            closed: false,
        }
    }
}

/// One attempt: TCP connect, CONNECT, CONNACK.
async fn connect_once(
    opts: &BrokerOptions,
    addr: &str,
) -> Result<(OwnedReadHalf, OwnedWriteHalf, BytesMut), Failed> {
    let sock = TcpStream::connect(addr).await.map_err(Failed::io)?;
    // Each write is a whole batch of publishes: send it now, not when Nagle allows.
    sock.set_nodelay(true).map_err(Failed::io)?;
    let (mut reader, mut writer) = sock.into_split();
    let mut connect = Connect::new(opts.client_id.clone());
    connect.keep_alive = KEEP_ALIVE_S;
    if let Some((user, pass)) = &opts.credentials {
        connect.set_login(user.clone(), pass.clone());
    }
    let mut buf = BytesMut::with_capacity(256);
    Packet::Connect(connect)
        .write(&mut buf, MAX_PACKET)
        .map_err(Failed::io)?;
    writer.write_all(&buf).await.map_err(Failed::io)?;
    let mut incoming = BytesMut::with_capacity(64 * 1024);
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        next_packet(&mut reader, &mut incoming),
    )
    .await
    .map_err(|_| Failed::io("no CONNACK within 10 s"))?;
    match first {
        Ok(Some(Packet::ConnAck(ConnAck {
            code: ConnectReturnCode::Success,
            ..
        }))) => Ok((reader, writer, incoming)),
        Ok(Some(Packet::ConnAck(ConnAck { code, .. }))) => Err(Failed {
            reason: format!("refused: {code:?}"),
            for_good: code != ConnectReturnCode::ServiceUnavailable,
            closed: false,
        }),
        Ok(Some(other)) => Err(Failed::io(format!("expected CONNACK, got {other:?}"))),
        Ok(None) | Err(_) => Err(Failed {
            reason: "the broker closed the connection before CONNACK: wrong username or password, or is it restarting?".into(),
            for_good: false,
            closed: true,
        }),
    }
}

impl WireDevice {
    /// Connects, logs in and waits for the CONNACK, trying again with backoff while the broker
    /// is away (see `Publisher::connect` for when it gives up) until `first_by`. Reconnects
    /// later stop trying at `give_up_at`.
    pub async fn connect(
        opts: &BrokerOptions,
        first_by: Instant,
        give_up_at: Instant,
    ) -> Result<Self, PublishError> {
        if opts.qos == QoS::ExactlyOnce {
            return Err(connect_error(
                "-",
                "the wire load device does not speak QoS 2",
            ));
        }
        let addr = format!("{}:{}", opts.host, opts.port);
        let window = Arc::new(Semaphore::new(MAX_UNACKED as usize));
        let (unacked, acked) = (Unacked::default(), Arc::new(AtomicU64::new(0)));
        let (reader, writer, incoming) =
            connect_patiently(opts, &addr, false, Some(first_by)).await?;
        let reader = spawn_reader(reader, incoming, &window, &unacked, &acked, &addr);
        Ok(Self {
            opts: opts.clone(),
            writer,
            reader,
            buf: BytesMut::with_capacity(64 * 1024),
            next_pkid: 0,
            window,
            unacked,
            published: 0,
            acked,
            reconnects: 0,
            last_write: Instant::now(),
            give_up_at,
            addr,
        })
    }

    /// Connects anew after the connection broke and sends every unacknowledged publish again.
    async fn reconnect(&mut self) -> Result<(), PublishError> {
        loop {
            self.reader.abort();
            let (reader, writer, incoming) =
                connect_patiently(&self.opts, &self.addr, true, Some(self.give_up_at)).await?;
            self.reconnects += 1;
            self.reader = spawn_reader(
                reader,
                incoming,
                &self.window,
                &self.unacked,
                &self.acked,
                &self.addr,
            );
            self.writer = writer;
            let again: Vec<u8> = self
                .unacked
                .lock()
                .expect("unacked lock")
                .iter()
                .flat_map(|(_, b)| b.iter().copied())
                .collect();
            if !again.is_empty() {
                tracing::info!(broker = %self.addr, bytes = again.len(), "resending unacknowledged publishes after reconnect");
            }
            if again.is_empty() || self.writer.write_all(&again).await.is_ok() {
                self.last_write = Instant::now();
                return Ok(());
            }
        }
    }

    /// Sends these publishes in one write; waits while the window of unacknowledged ones is
    /// full.
    pub async fn publish_all(
        &mut self,
        topic: &str,
        payloads: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<(), PublishError> {
        // (packet id, start, end in `buf`) of each QoS 1 publish not yet written.
        let mut spans: Vec<(u16, usize, usize)> = Vec::new();
        for payload in payloads {
            let mut p = Publish::new(topic, self.opts.qos, payload);
            if self.opts.qos == QoS::AtLeastOnce {
                if self.window.available_permits() == 0 {
                    // Send what is encoded before waiting for acknowledgements of it.
                    self.send(&mut spans).await?;
                }
                self.wait_for_window().await?;
                self.next_pkid = self.next_pkid % u16::MAX + 1;
                p.pkid = self.next_pkid;
            }
            let start = self.buf.len();
            p.write(&mut self.buf).map_err(|_| PublishError::Closed)?;
            if self.opts.qos == QoS::AtLeastOnce {
                spans.push((p.pkid, start, self.buf.len()));
            }
            self.published += 1;
        }
        self.send(&mut spans).await
    }

    /// One permit of the window; reconnects when the connection broke while waiting.
    async fn wait_for_window(&mut self) -> Result<(), PublishError> {
        loop {
            let window = self.window.clone();
            tokio::select! {
                permit = window.acquire() => {
                    permit.map_err(|_| PublishError::Closed)?.forget();
                    return Ok(());
                }
                _ = &mut self.reader => self.reconnect().await?,
            }
        }
    }

    /// Writes `buf` in one write, after recording its QoS 1 publishes (`spans`) as
    /// unacknowledged. When the connection is broken it reconnects instead, which sends every
    /// unacknowledged publish again, these among them (QoS 0 is at most once).
    async fn send(&mut self, spans: &mut Vec<(u16, usize, usize)>) -> Result<(), PublishError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let sent = if spans.is_empty() {
            self.writer.write_all(&self.buf).await
        } else {
            let batch = self.buf.split().freeze();
            self.unacked.lock().expect("unacked lock").extend(
                spans
                    .drain(..)
                    .map(|(pkid, start, end)| (pkid, batch.slice(start..end))),
            );
            if self.reader.is_finished() {
                return self.reconnect().await;
            }
            self.writer.write_all(&batch).await
        };
        self.buf.clear();
        match sent {
            Ok(()) => {
                self.last_write = Instant::now();
                Ok(())
            }
            Err(e) => {
                tracing::warn!(broker = %self.addr, error = %e, "load connection lost; reconnecting");
                self.reconnect().await
            }
        }
    }

    /// Pings when nothing was written for half the keep-alive time.
    pub async fn keep_alive(&mut self) -> Result<(), PublishError> {
        if self.last_write.elapsed() >= Duration::from_secs(u64::from(KEEP_ALIVE_S) / 2) {
            PingReq
                .write(&mut self.buf)
                .map_err(|_| PublishError::Closed)?;
            self.send(&mut Vec::new()).await?;
        }
        Ok(())
    }

    /// PUBACKs received.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Connections made after the first.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Waits until every QoS 1 publish is acknowledged (reconnecting as often as needed), then
    /// disconnects. Returns the acknowledgements received.
    pub async fn close(mut self, timeout: Duration) -> Result<u64, PublishError> {
        let started = Instant::now();
        if self.opts.qos == QoS::AtLeastOnce {
            while self.acked() < self.published {
                if started.elapsed() >= timeout {
                    return Err(PublishError::Unacknowledged {
                        published: self.published,
                        missing: self.published - self.acked(),
                        waited: started.elapsed(),
                    });
                }
                if self.reader.is_finished() {
                    self.reconnect().await?;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let _ = Disconnect.write(&mut self.buf);
        let _ = self.writer.write_all(&self.buf).await;
        let _ = self.writer.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.reader).await;
        self.reader.abort();
        Ok(self.acked())
    }
}

/// Connects, trying again with backoff (see `Publisher::connect`), until `give_up_at`.
async fn connect_patiently(
    opts: &BrokerOptions,
    addr: &str,
    connected_before: bool,
    give_up_at: Option<Instant>,
) -> Result<(OwnedReadHalf, OwnedWriteHalf, BytesMut), PublishError> {
    let mut backoff = Backoff::default();
    let mut closed_in_a_row = 0;
    loop {
        let failed = match connect_once(opts, addr).await {
            Ok(c) => return Ok(c),
            Err(f) => f,
        };
        closed_in_a_row = if failed.closed {
            closed_in_a_row + 1
        } else {
            0
        };
        let late = give_up_at.is_some_and(|t| Instant::now() >= t);
        if failed.for_good || late || (!connected_before && closed_in_a_row >= FIRST_CONNECT_CLOSES)
        {
            return Err(connect_error(addr, failed.reason));
        }
        let wait = backoff.next();
        tracing::warn!(broker = %addr, error = %failed.reason, retry_in_ms = wait.as_millis() as u64, "cannot connect to the broker; trying again");
        tokio::time::sleep(wait).await;
    }
}

fn spawn_reader(
    reader: OwnedReadHalf,
    incoming: BytesMut,
    window: &Arc<Semaphore>,
    unacked: &Unacked,
    acked: &Arc<AtomicU64>,
    addr: &str,
) -> JoinHandle<()> {
    let (window, unacked, acked, addr) = (
        window.clone(),
        unacked.clone(),
        acked.clone(),
        addr.to_owned(),
    );
    tokio::spawn(async move { read_acks(reader, incoming, &window, &unacked, &acked, &addr).await })
}

/// Counts PUBACKs, forgets the acknowledged publish and reopens the window by one for each;
/// returns when the connection ends.
async fn read_acks(
    mut reader: OwnedReadHalf,
    mut incoming: BytesMut,
    window: &Semaphore,
    unacked: &Mutex<VecDeque<(u16, Bytes)>>,
    acked: &AtomicU64,
    addr: &str,
) {
    loop {
        match next_packet(&mut reader, &mut incoming).await {
            Ok(Some(Packet::PubAck(ack))) => {
                let mut q = unacked.lock().expect("unacked lock");
                // In order (MQTT 3.1.1 § 4.6); a broker that reorders still finds its publish.
                let at = if q.front().is_some_and(|(id, _)| *id == ack.pkid) {
                    Some(0)
                } else {
                    q.iter().position(|(id, _)| *id == ack.pkid)
                };
                // An acknowledgement of a publish acknowledged already (a resend) is not counted.
                if let Some(i) = at {
                    q.remove(i);
                    drop(q);
                    acked.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
            }
            Ok(Some(Packet::PingResp)) => {}
            Ok(Some(other)) => {
                tracing::debug!(broker = %addr, packet = ?other, "unexpected packet ignored");
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(broker = %addr, error = %e, "load connection failed");
                return;
            }
        }
    }
}

/// The next packet from the broker; `None` when it closed the connection.
async fn next_packet(
    reader: &mut OwnedReadHalf,
    incoming: &mut BytesMut,
) -> Result<Option<Packet>, String> {
    loop {
        match Packet::read(incoming, MAX_PACKET) {
            Ok(p) => return Ok(Some(p)),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("malformed packet from the broker: {e}")),
        }
        match reader.read_buf(incoming).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}
