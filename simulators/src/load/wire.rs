//! A load device that writes MQTT 3.1.1 packets encoded by rumqttc's codec
//! (`rumqttc::mqttbytes::v4`) straight to its socket, every publish that is due in one write.
//!
//! rumqttc's `EventLoop` writes and flushes each publish on its own (one system call per event)
//! and passes every publish and acknowledgement through its request channel and event queue;
//! on this 2-core benchmark machine that made the load generator use more CPU per event than
//! the edge it was measuring. This device keeps what the benchmark needs of a client (CONNECT
//! with credentials, QoS 0 and 1, a window of unacknowledged publishes, keep-alive pings, a
//! clean DISCONNECT) and nothing else: no reconnects (a broken connection ends the load with an
//! error) and no QoS 2, for which load mode uses the full rumqttc client.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::Publish;
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Disconnect, Packet, PingReq};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::publish::{BrokerOptions, MAX_PACKET, MAX_UNACKED, PublishError};

/// Seconds of silence after which the device pings; the broker's limit is 1.5 × this.
const KEEP_ALIVE_S: u16 = 30;

/// One device connection of the load.
#[derive(Debug)]
pub(crate) struct WireDevice {
    writer: OwnedWriteHalf,
    buf: BytesMut,
    qos: QoS,
    next_pkid: u16,
    window: Arc<Semaphore>,
    published: u64,
    acked: Arc<AtomicU64>,
    last_write: Instant,
    reader: JoinHandle<Result<(), PublishError>>,
    addr: String,
}

fn connect_error(addr: &str, reason: impl std::fmt::Display) -> PublishError {
    PublishError::Connect {
        addr: addr.to_owned(),
        reason: reason.to_string(),
    }
}

impl WireDevice {
    /// Connects, logs in and waits for the CONNACK.
    pub async fn connect(opts: &BrokerOptions) -> Result<Self, PublishError> {
        if opts.qos == QoS::ExactlyOnce {
            return Err(connect_error(
                "-",
                "the wire load device does not speak QoS 2",
            ));
        }
        let addr = format!("{}:{}", opts.host, opts.port);
        let sock = TcpStream::connect(&addr)
            .await
            .map_err(|e| connect_error(&addr, e))?;
        // Each write is a whole batch of publishes: send it now, not when Nagle allows.
        sock.set_nodelay(true)
            .map_err(|e| connect_error(&addr, e))?;
        let (mut reader, mut writer) = sock.into_split();
        let mut connect = Connect::new(opts.client_id.clone());
        connect.keep_alive = KEEP_ALIVE_S;
        if let Some((user, pass)) = &opts.credentials {
            connect.set_login(user.clone(), pass.clone());
        }
        let mut buf = BytesMut::with_capacity(64 * 1024);
        Packet::Connect(connect)
            .write(&mut buf, MAX_PACKET)
            .map_err(|e| connect_error(&addr, e))?;
        writer
            .write_all(&buf)
            .await
            .map_err(|e| connect_error(&addr, e))?;
        buf.clear();
        let mut incoming = BytesMut::with_capacity(64 * 1024);
        let connack = tokio::time::timeout(
            Duration::from_secs(10),
            next_packet(&mut reader, &mut incoming),
        )
        .await
        .map_err(|_| connect_error(&addr, "no CONNACK within 10 s"))?
        .map_err(|e| connect_error(&addr, e))?;
        check_connack(connack).map_err(|e| connect_error(&addr, e))?;
        let window = Arc::new(Semaphore::new(MAX_UNACKED as usize));
        let acked = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn({
            let (window, acked, addr) = (window.clone(), acked.clone(), addr.clone());
            async move {
                let r = read_acks(reader, incoming, &window, &acked, &addr).await;
                // A publish waiting for the window fails instead of waiting forever.
                window.close();
                r
            }
        });
        Ok(Self {
            writer,
            buf,
            qos: opts.qos,
            next_pkid: 0,
            window,
            published: 0,
            acked,
            last_write: Instant::now(),
            reader,
            addr,
        })
    }

    /// Sends these publishes in one write; waits while the window of unacknowledged ones is
    /// full.
    pub async fn publish_all(
        &mut self,
        topic: &str,
        payloads: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<(), PublishError> {
        for payload in payloads {
            let mut p = Publish::new(topic, self.qos, payload);
            if self.qos == QoS::AtLeastOnce {
                if self.window.available_permits() == 0 {
                    // Send what is encoded before waiting for acknowledgements of it.
                    self.write().await?;
                }
                self.window
                    .acquire()
                    .await
                    .map_err(|_| PublishError::Closed)?
                    .forget();
                self.next_pkid = self.next_pkid % u16::MAX + 1;
                p.pkid = self.next_pkid;
            }
            p.write(&mut self.buf).map_err(|_| PublishError::Closed)?;
            self.published += 1;
        }
        self.write().await
    }

    /// Pings when nothing was written for half the keep-alive time.
    pub async fn keep_alive(&mut self) -> Result<(), PublishError> {
        if self.last_write.elapsed() >= Duration::from_secs(u64::from(KEEP_ALIVE_S) / 2) {
            PingReq
                .write(&mut self.buf)
                .map_err(|_| PublishError::Closed)?;
            self.write().await?;
        }
        Ok(())
    }

    async fn write(&mut self) -> Result<(), PublishError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.writer.write_all(&self.buf).await {
            tracing::warn!(broker = %self.addr, error = %e, "load connection failed");
            return Err(PublishError::Closed);
        }
        self.buf.clear();
        self.last_write = Instant::now();
        Ok(())
    }

    /// PUBACKs received.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until every QoS 1 publish is acknowledged, then disconnects. Returns the
    /// acknowledgements received.
    pub async fn close(mut self, timeout: Duration) -> Result<u64, PublishError> {
        let started = Instant::now();
        if self.qos == QoS::AtLeastOnce {
            while self.acked() < self.published {
                if self.reader.is_finished() || started.elapsed() >= timeout {
                    return Err(PublishError::Unacknowledged {
                        published: self.published,
                        missing: self.published - self.acked(),
                        waited: started.elapsed(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let _ = Disconnect.write(&mut self.buf);
        let _ = self.write().await;
        let _ = self.writer.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.reader).await;
        self.reader.abort();
        Ok(self.acked())
    }
}

/// Counts PUBACKs and reopens the window by one for each.
async fn read_acks(
    mut reader: OwnedReadHalf,
    mut incoming: BytesMut,
    window: &Semaphore,
    acked: &AtomicU64,
    addr: &str,
) -> Result<(), PublishError> {
    loop {
        match next_packet(&mut reader, &mut incoming).await {
            Ok(Some(Packet::PubAck(_))) => {
                acked.fetch_add(1, Ordering::Relaxed);
                window.add_permits(1);
            }
            Ok(Some(Packet::PingResp)) => {}
            Ok(Some(other)) => {
                tracing::debug!(broker = %addr, packet = ?other, "unexpected packet ignored");
            }
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(broker = %addr, error = %e, "load connection failed");
                return Err(PublishError::Closed);
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

/// Whether the broker's first packet accepts the login.
fn check_connack(first: Option<Packet>) -> Result<(), String> {
    match first {
        Some(Packet::ConnAck(ConnAck {
            code: ConnectReturnCode::Success,
            ..
        })) => Ok(()),
        Some(Packet::ConnAck(ConnAck { code, .. })) => Err(format!("refused: {code:?}")),
        Some(other) => Err(format!("expected CONNACK, got {other:?}")),
        None => Err("the broker closed the connection (login refused?)".into()),
    }
}
