//! Publishing to an MQTT broker with rumqttc: connection, acknowledgement counting, reconnects.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest packet the simulator sends or receives (fault mode sends oversized payloads).
pub(crate) const MAX_PACKET: usize = 1024 * 1024;

/// Most messages unacknowledged at once (QoS 1 and 2): `publish` waits beyond it.
pub(crate) const MAX_UNACKED: u64 = 4096;

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker address is not `mqtt://host:port` or `host:port`.
    #[error("broker address `{0}` is not valid: expected mqtt://host:port or host:port")]
    Address(String),
    /// The first connection failed.
    #[error("cannot connect to broker {addr}: {reason}")]
    Connect {
        /// Where.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// The client's request channel closed.
    #[error("the MQTT connection task stopped")]
    Closed,
    /// Not every message was acknowledged in time.
    #[error("{missing} of {published} messages were not acknowledged within {waited:?}")]
    Unacknowledged {
        /// Messages handed to the client.
        published: u64,
        /// Those not acknowledged.
        missing: u64,
        /// How long we waited.
        waited: Duration,
    },
}

impl PublishError {
    /// Whether trying again later may succeed.
    pub const fn is_retryable(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Unacknowledged { .. })
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// MQTT client id.
    pub client_id: String,
    /// Username and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// QoS of every publish.
    pub qos: QoS,
}

impl BrokerOptions {
    /// Parses `mqtt://host:port`, `tcp://host:port` or `host:port` (port defaults to 1883).
    pub fn parse_address(addr: &str) -> Result<(String, u16), PublishError> {
        let rest = addr
            .strip_prefix("mqtt://")
            .or_else(|| addr.strip_prefix("tcp://"))
            .unwrap_or(addr);
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse().map_err(|_| PublishError::Address(addr.into()))?,
            ),
            None => (rest, 1883),
        };
        if host.is_empty() || host.contains('/') {
            return Err(PublishError::Address(addr.into()));
        }
        Ok((
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        ))
    }
}

/// Counts kept by the connection task.
#[derive(Debug, Default)]
pub struct Counters {
    /// Publishes handed to the client.
    pub published: AtomicU64,
    /// Publishes written to the socket (retransmissions count again).
    pub sent: AtomicU64,
    /// PUBACKs (QoS 1) and PUBCOMPs (QoS 2) received.
    pub acked: AtomicU64,
    /// Connections made after the first.
    pub reconnects: AtomicU64,
}

/// One MQTT connection that publishes.
#[derive(Debug)]
pub struct Publisher {
    client: AsyncClient,
    qos: QoS,
    counters: Arc<Counters>,
    stopping: watch::Sender<bool>,
    task: JoinHandle<()>,
    addr: String,
    opts: BrokerOptions,
}

impl Publisher {
    /// Connects and waits for the broker's CONNACK. Like a real device it does not give up
    /// while the broker is away (nothing listening, or the connection closed while the broker
    /// starts or restarts): it tries again with backoff until it is stopped. It gives up only on
    /// a refusal that will not change (the broker's CONNACK refusing the credentials or client
    /// id) or, on the first connection of a run, after [`FIRST_CONNECT_CLOSES`] attempts in a row
    /// that the broker closed before its CONNACK (rumqttd's answer to a wrong password).
    pub async fn connect(opts: &BrokerOptions) -> Result<Self, PublishError> {
        Self::connect_with(opts, Arc::new(Counters::default()), false).await
    }

    async fn connect_with(
        opts: &BrokerOptions,
        counters: Arc<Counters>,
        connected_before: bool,
    ) -> Result<Self, PublishError> {
        let addr = format!("{}:{}", opts.host, opts.port);
        let mut mqtt = MqttOptions::new(opts.client_id.clone(), opts.host.clone(), opts.port);
        mqtt.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_inflight(1000)
            .set_request_channel_capacity(4096);
        if let Some((u, p)) = &opts.credentials {
            mqtt.set_credentials(u.clone(), p.clone());
        }
        let (client, mut eventloop) = AsyncClient::new(mqtt, 4096);
        let mut backoff = Backoff::default();
        let mut closed_in_a_row = 0;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => {
                    let refused_for_good = matches!(
                        &e,
                        ConnectionError::ConnectionRefused(code)
                            if *code != rumqttc::ConnectReturnCode::ServiceUnavailable
                    );
                    if closed_before_connack(&e) {
                        closed_in_a_row += 1;
                    } else {
                        closed_in_a_row = 0;
                    }
                    if refused_for_good
                        || (!connected_before && closed_in_a_row >= FIRST_CONNECT_CLOSES)
                    {
                        return Err(PublishError::Connect {
                            addr,
                            reason: describe(&e),
                        });
                    }
                    let wait = backoff.next();
                    tracing::warn!(broker = %addr, error = %describe(&e), retry_in_ms = wait.as_millis() as u64, "cannot connect to the broker; trying again");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let (stopping, stop_rx) = watch::channel(false);
        let resend = (opts.qos != QoS::AtMostOnce).then(|| (client.clone(), opts.qos));
        let task = tokio::spawn(drive(
            eventloop,
            counters.clone(),
            stop_rx,
            addr.clone(),
            resend,
        ));
        Ok(Self {
            client,
            qos: opts.qos,
            counters,
            stopping,
            task,
            addr,
            opts: opts.clone(),
        })
    }

    /// The counters of this connection.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Queues one message; waits while the client's queue is full.
    pub async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<(), PublishError> {
        if self.qos != QoS::AtMostOnce {
            let c = &self.counters;
            while c
                .published
                .load(Ordering::Relaxed)
                .saturating_sub(c.acked.load(Ordering::Relaxed))
                >= MAX_UNACKED
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        self.client
            .publish(topic, self.qos, false, payload)
            .await
            .map_err(|_| PublishError::Closed)?;
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Closes the connection once everything sent so far is acknowledged, and connects anew.
    /// (rumqttc replays a queued DISCONNECT after every reconnect, so this makes a new client.)
    pub async fn disconnect_and_reconnect(&mut self) -> Result<(), PublishError> {
        self.flush(Duration::from_secs(60)).await?;
        let _ = self.stopping.send(true);
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.task).await;
        let fresh = Self::connect_with(&self.opts, self.counters.clone(), true).await?;
        *self = fresh;
        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Waits until everything published was acknowledged (QoS 1 and 2) or written (QoS 0).
    pub async fn flush(&self, timeout: Duration) -> Result<(), PublishError> {
        let started = tokio::time::Instant::now();
        loop {
            let published = self.counters.published.load(Ordering::Relaxed);
            let done = match self.qos {
                QoS::AtMostOnce => self.counters.sent.load(Ordering::Relaxed),
                _ => self.counters.acked.load(Ordering::Relaxed),
            };
            if done >= published {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(PublishError::Unacknowledged {
                    published,
                    missing: published - done,
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Flushes, then disconnects cleanly.
    pub async fn close(self, timeout: Duration) -> Result<(), PublishError> {
        let flushed = self.flush(timeout).await;
        let _ = self.stopping.send(true);
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
        tracing::debug!(broker = %self.addr, "disconnected");
        flushed
    }
}

/// First-connection attempts in a row that the broker may close before its CONNACK before the
/// credentials are taken to be wrong.
pub(crate) const FIRST_CONNECT_CLOSES: u32 = 5;

/// Reconnect delays: 100 ms, doubling, at most 5 s.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    /// The delay before the next attempt.
    pub(crate) fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        d
    }
}

/// Whether the broker closed the connection before answering CONNECT.
fn closed_before_connack(e: &ConnectionError) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e {
        ConnectionError::MqttState(rumqttc::StateError::Io(io)) | ConnectionError::Io(io) => {
            matches!(
                io.kind(),
                ConnectionAborted | ConnectionReset | UnexpectedEof
            )
        }
        _ => false,
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection ({code:?})")
        }
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused: is a broker listening there?".into()
        }
        ConnectionError::MqttState(rumqttc::StateError::Io(io))
            if io.kind() == std::io::ErrorKind::ConnectionAborted
                || io.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            "the broker closed the connection before CONNACK: wrong username or password, or is it restarting?".into()
        }
        other => other.to_string(),
    }
}

/// Polls the connection, counts, reconnects with backoff. With `resend`, after reconnecting it
/// publishes again exactly the messages rumqttc took back when the connection failed (the
/// unacknowledged ones in flight and those still queued): rumqttc drops them on a new session,
/// and a device must not lose them. Taking rumqttc's own list (not guessing from counters)
/// sends each message once more at most: a guess that also resent messages still queued sent
/// them twice, their two acknowledgements made `flush` return while the last messages were still
/// unacknowledged, and the run ended without them.
async fn drive(
    mut eventloop: rumqttc::EventLoop,
    counters: Arc<Counters>,
    mut stopping: watch::Receiver<bool>,
    addr: String,
    resend: Option<(AsyncClient, QoS)>,
) {
    let mut backoff = Backoff::default();
    let mut unsent: Vec<(String, Vec<u8>)> = vec![];
    loop {
        let polled = tokio::select! {
            p = eventloop.poll() => p,
            _ = async { let _ = stopping.wait_for(|s| *s).await; } => {
                // Let the DISCONNECT go out.
                let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
                return;
            }
        };
        match polled {
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => {
                counters.acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                counters.reconnects.fetch_add(1, Ordering::Relaxed);
                backoff = Backoff::default();
                if let Some((client, qos)) = &resend {
                    let again = std::mem::take(&mut unsent);
                    if !again.is_empty() {
                        tracing::info!(broker = %addr, messages = again.len(), "resending unacknowledged messages after reconnect");
                        // Counted as published already; their acknowledgements will count.
                        let (client, qos) = (client.clone(), *qos);
                        tokio::spawn(async move {
                            for (t, p) in again {
                                if client.publish(t, qos, false, p).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                let stop_now = *stopping.borrow();
                if stop_now {
                    return;
                }
                if resend.is_some() {
                    for r in eventloop.pending.drain(..) {
                        match r {
                            rumqttc::Request::Publish(p) => {
                                unsent.push((p.topic, p.payload.to_vec()));
                            }
                            // QoS 2 past PUBREC: the broker holds the message; its PUBCOMP
                            // will not come on a new connection.
                            rumqttc::Request::PubRel(_) => {
                                counters.acked.fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                }
                let wait = backoff.next();
                tracing::warn!(broker = %addr, error = %describe(&e), retry_in_ms = wait.as_millis() as u64, "MQTT connection lost; reconnecting");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            BrokerOptions::parse_address("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884)
        );
        assert_eq!(
            BrokerOptions::parse_address("localhost").unwrap(),
            ("localhost".into(), 1883)
        );
        assert_eq!(
            BrokerOptions::parse_address("[::1]:1883").unwrap(),
            ("::1".into(), 1883)
        );
        assert!(BrokerOptions::parse_address("mqtt://host:notaport").is_err());
        assert!(BrokerOptions::parse_address("http://x/y").is_err());
    }
}
