//! The embedded MQTT broker (rumqttd) and the device listeners in front of it.
//!
//! rumqttd serves one protocol version per listener, while devices expect one port (1883) for
//! MQTT 3.1.1 and 5, as Mosquitto offers. Every device listener (the device port, the optional
//! per-version ports and TLS) is Millrace's own: it reads each connection's CONNECT protocol
//! level and hands the connection to rumqttd's MQTT 3.1.1 or 5 server through an in-memory pipe
//! (`Server::connection`, a one-function patch of rumqttd in `vendor/rumqttd`: rumqttd 0.20 only
//! serves connections its own TCP listener accepted, and the hop over loopback TCP cost two
//! more socket reads and writes per device read). rumqttd opens no port of its own.
//!
//! **Ingest at the door.** On the way in, the splice finds PUBLISH packets in the byte stream
//! ([`frames`]), hands them to ingest, and forwards those bytes to rumqttd only once ingest has
//! written them to RocksDB. So a device's QoS 1 and 2 acknowledgements come after its events are
//! durable, and when ingest is slower than the devices, the devices are slowed (TCP
//! backpressure) instead of rumqttd's in-memory log overflowing. rumqttd hands an in-process
//! subscriber at most 200 messages per router round (about 90,000 a second here) and silently
//! skips what its log no longer holds, so subscribing inside the broker lost data under load.
//!
//! Two steps, so that the edge can wire its components in one direction: [`Broker::start`]
//! starts rumqttd's router, its MQTT 3.1.1 and 5 servers (no ports) and the in-process
//! [`Publisher`] that functions publish through; [`Broker::listen`], once ingest runs, opens the
//! device ports ([`DeviceListeners`]).
//!
//! rumqttd's router runs on its own thread and has no stop API; its listeners run as tasks on
//! our runtime and stop with it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{ConnectionSettings, Router, RouterConfig, Server, ServerSettings};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::MqttConfig;
use crate::ingest::{IngestChunk, IngestTx};
use crate::mqtt::{self, ReadError};

/// Errors of the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
}

/// Publishes into the broker from inside the edge (QoS 0, no TCP hop): `false` when its queue
/// is full (the message is dropped, never blocks).
pub type Publisher = Arc<dyn Fn(&str, Vec<u8>) -> bool + Send + Sync>;

/// The broker's router and servers, before any device port is open ([`Broker::listen`]).
pub struct Broker {
    v4: Server<V4>,
    v5: Server<V5>,
    publisher: Publisher,
    retained: Publisher,
}

/// The open device ports.
#[derive(Debug)]
pub struct DeviceListeners {
    /// The device port (3.1.1 and 5).
    pub addr: SocketAddr,
    connections: Arc<AtomicI64>,
}

impl DeviceListeners {
    /// A reader of the number of devices connected now, for other components.
    pub fn connection_count(&self) -> Arc<dyn Fn() -> i64 + Send + Sync> {
        let c = self.connections.clone();
        Arc::new(move || c.load(Ordering::Relaxed))
    }
}

/// Messages waiting for the in-process publisher at most.
const LOCAL_PUBLISH_QUEUE: usize = 65_536;

/// Starts a thread holding a rumqttd local link (no TCP hop) that publishes what the returned
/// closure is given, at QoS 0 (the second closure with the retain flag). The closures never
/// block: `false` when the queue is full.
fn local_publisher<S>(router_tx: S) -> Result<(Publisher, Publisher), BrokerError>
where
    S: FnOnce() -> Result<(rumqttd::local::LinkTx, rumqttd::local::LinkRx), String>
        + Send
        + 'static,
{
    let (tx, rx) = flume::bounded::<(String, Vec<u8>, bool)>(LOCAL_PUBLISH_QUEUE);
    std::thread::Builder::new()
        .name("millrace-publish".into())
        .spawn(move || {
            let (mut link, _rx) = match router_tx() {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "could not open the in-process MQTT link; functions cannot publish");
                    return;
                }
            };
            while let Ok((topic, payload, retain)) = rx.recv() {
                let sent = if retain {
                    link.publish_retained(topic, payload)
                } else {
                    link.publish(topic, payload)
                };
                if let Err(e) = sent {
                    tracing::error!(error = %e, "in-process MQTT publish failed");
                }
            }
        })
        .map_err(|source| BrokerError::Bind {
            addr: "127.0.0.1:0".parse().expect("valid"),
            source,
        })?;
    let retained = tx.clone();
    Ok((
        Arc::new(move |topic: &str, payload: Vec<u8>| {
            tx.try_send((topic.to_owned(), payload, false)).is_ok()
        }),
        Arc::new(move |topic: &str, payload: Vec<u8>| {
            retained.try_send((topic.to_owned(), payload, true)).is_ok()
        }),
    ))
}

/// Checks device credentials against Argon2 hashes.
#[derive(Debug, Default)]
pub struct DeviceAuth {
    users: HashMap<String, String>,
}

impl DeviceAuth {
    /// From the configured users.
    pub fn new(users: &[crate::config::DeviceUser]) -> Self {
        Self {
            users: users
                .iter()
                .map(|u| (u.username.clone(), u.password_hash.clone()))
                .collect(),
        }
    }

    /// Whether `password` is right for `username`. CPU-heavy (Argon2): call off the runtime.
    pub fn verify(&self, username: &str, password: &str) -> bool {
        let Some(hash) = self.users.get(username) else {
            return false;
        };
        PasswordHash::new(hash).is_ok_and(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
    }
}

/// Hashes a password for the configuration file.
pub fn hash_password(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 hashing")
        .to_string()
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// Starts the router, the in-process publisher and rumqttd's MQTT 3.1.1 and 5 servers (fed
    /// through in-memory pipes once [`Broker::listen`] opens the device ports). Blocks briefly
    /// (threads start): call it off the async runtime or at start.
    pub(crate) fn start(cfg: &MqttConfig) -> Result<Self, BrokerError> {
        let router_cfg = RouterConfig {
            max_connections: cfg.max_connections + 16,
            max_outgoing_packet_count: 200,
            max_segment_size: cfg.segment_bytes,
            max_segment_count: cfg.segment_count,
            ..Default::default()
        };
        let router_tx = Router::new(0, router_cfg).spawn();
        // rumqttd does not export its router event type: hand the sender over in a closure.
        let (publisher, retained) = local_publisher({
            let router_tx = router_tx.clone();
            move || {
                rumqttd::local::LinkBuilder::new("millrace-edge-functions", router_tx)
                    .build()
                    .map(|(tx, rx, _)| (tx, rx))
                    .map_err(|e| e.to_string())
            }
        })?;

        let auth = Arc::new(DeviceAuth::new(&cfg.users));
        let mut connections = ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: cfg.max_payload_bytes,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        if !cfg.allow_anonymous {
            let auth = auth.clone();
            connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
                let auth = auth.clone();
                async move {
                    let ok = tokio::task::spawn_blocking({
                        let user = user.clone();
                        move || auth.verify(&user, &pass)
                    })
                    .await
                    .unwrap_or(false);
                    if ok {
                        metrics::counter!("millrace_edge_mqtt_auth_total", "outcome" => "accepted").increment(1);
                    } else {
                        metrics::counter!("millrace_edge_mqtt_auth_total", "outcome" => "refused").increment(1);
                        // The password is never logged.
                        tracing::warn!(%client_id, username = %user, "device refused: wrong username or password");
                    }
                    ok
                }
            });
            if cfg.users.is_empty() {
                tracing::warn!(
                    "no device users are configured and anonymous access is off: no device can connect (add [[mqtt.users]] or set mqtt.allow_anonymous)"
                );
            }
        }
        let settings = |name: &str| ServerSettings {
            name: name.to_owned(),
            // Unused: rumqttd's own listener is never started (connections come through
            // `Server::connection`).
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            next_connection_delay_ms: 0,
            connections: connections.clone(),
        };
        Ok(Self {
            v4: Server::new(settings("v4"), router_tx.clone(), V4),
            v5: Server::new(settings("v5"), router_tx, V5),
            publisher,
            retained,
        })
    }

    /// Publishes into the broker from inside the edge (QoS 0, no TCP hop).
    pub(crate) fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Publishes retained messages into the broker from inside the edge (QoS 0).
    pub(crate) fn retained_publisher(&self) -> Publisher {
        self.retained.clone()
    }

    /// Opens the device port (and the per-version and TLS ports configured). With `ingest`,
    /// every PUBLISH is written to the store before rumqttd sees it. Tasks are tracked by
    /// `tasks` and stop when `stop` is cancelled.
    pub(crate) async fn listen(
        self,
        cfg: &MqttConfig,
        ingest: Option<IngestTx>,
        sparkplug: Option<Arc<crate::sparkplug::Host>>,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<DeviceListeners, BrokerError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BrokerError::Bind { addr, source })
        };
        let connections = Arc::new(AtomicI64::new(0));
        let door = Arc::new(Door {
            v4: self.v4,
            v5: self.v5,
            ingest,
            connections: connections.clone(),
            max: cfg.max_connections as i64,
            max_packet: cfg.max_payload_bytes + 5,
            sparkplug,
        });
        let front = bind(cfg.listen).await?;
        let addr = front.local_addr().map_err(|source| BrokerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let plain = Transport {
            tls: None,
            websocket: false,
        };
        door.clone()
            .serve(front, None, plain.clone(), tasks, stop.clone());
        for (listen, level) in [(cfg.v4_listen, 4u8), (cfg.v5_listen, 5u8)] {
            if let Some(listen) = listen {
                door.clone().serve(
                    bind(listen).await?,
                    Some(level),
                    plain.clone(),
                    tasks,
                    stop.clone(),
                );
            }
        }
        if let Some(listen) = cfg.ws_listen {
            let websocket = Transport {
                tls: None,
                websocket: true,
            };
            door.clone()
                .serve(bind(listen).await?, None, websocket, tasks, stop.clone());
            tracing::info!(addr = %listen, "MQTT over WebSocket listening (3.1.1 and 5)");
        }
        if let Some(tls) = &cfg.tls {
            let acceptor = tls_acceptor(&tls.cert, &tls.key)?;
            let only = if tls.protocol == "v5" { 5 } else { 4 };
            let secure = Transport {
                tls: Some(acceptor),
                websocket: false,
            };
            door.clone().serve(
                bind(tls.listen).await?,
                Some(only),
                secure.clone(),
                tasks,
                stop.clone(),
            );
            if let Some(listen) = tls.ws_listen {
                let wss = Transport {
                    websocket: true,
                    ..secure
                };
                door.clone()
                    .serve(bind(listen).await?, None, wss, tasks, stop.clone());
                tracing::info!(addr = %listen, "MQTT over secure WebSocket listening (3.1.1 and 5)");
            }
        }
        tracing::info!(%addr, "MQTT broker listening (3.1.1 and 5 on the device port)");
        Ok(DeviceListeners { addr, connections })
    }
}

/// A device connection's first read buffer, and the one it gets once it fills that.
const SMALL_READ: usize = 4 * 1024;
const LARGE_READ: usize = 64 * 1024;

/// Bytes buffered each way in the in-memory pipe between a device's connection and rumqttd.
const PIPE_BYTES: usize = 64 * 1024;

/// Reads of one device connection handed to ingest and not yet forwarded to rumqttd, at most.
const READS_IN_FLIGHT: usize = 4;

/// Why a connection could not be routed.
#[derive(Debug, thiserror::Error)]
enum SpliceError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("unsupported protocol level {0}")]
    Level(u8),
    #[error("no CONNECT within 10 s")]
    Timeout,
    #[error("ingest stopped")]
    Stopped,
    #[error("login refused")]
    Refused,
    #[error("WebSocket handshake: {0}")]
    WebSocket(String),
}

/// What a listener speaks under MQTT: TLS or not, WebSocket or not.
#[derive(Clone)]
struct Transport {
    tls: Option<tokio_rustls::TlsAcceptor>,
    websocket: bool,
}

/// Largest WebSocket message a device may send: a WebSocket message carries a piece of the
/// MQTT byte stream, so this only bounds memory per connection; MQTT's own limit still holds.
const MAX_WS_MESSAGE: usize = 2 << 20;

/// The WebSocket subprotocols MQTT clients ask for (`mqtt`; `mqttv3.1` from old clients).
const MQTT_SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Answers a WebSocket upgrade: the MQTT subprotocol the client asked for is echoed (browsers
/// close a connection whose answer names none of theirs); a client asking only for others is
/// refused.
#[allow(clippy::result_large_err)] // the signature tungstenite's handshake callback has
fn mqtt_subprotocol(
    req: &async_tungstenite::tungstenite::handshake::server::Request,
    mut resp: async_tungstenite::tungstenite::handshake::server::Response,
) -> Result<
    async_tungstenite::tungstenite::handshake::server::Response,
    async_tungstenite::tungstenite::handshake::server::ErrorResponse,
> {
    let asked: Vec<&str> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    if asked.is_empty() {
        return Ok(resp);
    }
    match asked
        .iter()
        .find(|p| MQTT_SUBPROTOCOLS.iter().any(|m| m.eq_ignore_ascii_case(p)))
    {
        Some(p) => {
            let value = p.parse().expect("a header value read from a header");
            resp.headers_mut().insert("sec-websocket-protocol", value);
            Ok(resp)
        }
        None => {
            let mut refusal =
                async_tungstenite::tungstenite::handshake::server::ErrorResponse::new(Some(
                    format!("no MQTT subprotocol among {asked:?}: ask for `mqtt`"),
                ));
            *refusal.status_mut() = async_tungstenite::tungstenite::http::StatusCode::BAD_REQUEST;
            Err(refusal)
        }
    }
}

/// The device listeners' shared state.
struct Door {
    v4: Server<V4>,
    v5: Server<V5>,
    ingest: Option<IngestTx>,
    connections: Arc<AtomicI64>,
    max: i64,
    /// Largest packet a device may send (rumqttd's limit, plus the fixed header).
    max_packet: usize,
    /// The Sparkplug B host that decodes `spBv1.0/…` (none: not ingested).
    sparkplug: Option<Arc<crate::sparkplug::Host>>,
}

impl Door {
    /// Accepts devices on `listener`; `only` restricts the protocol level (4 or 5).
    fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        only: Option<u8>,
        transport: Transport,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) {
        let inner = tasks.clone();
        tasks.spawn(async move {
            loop {
                let (sock, peer) = tokio::select! {
                    a = listener.accept() => match a {
                        Ok(a) => a,
                        Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
                    },
                    _ = stop.cancelled() => return,
                };
                if self.connections.load(Ordering::Relaxed) >= self.max {
                    metrics::counter!("millrace_edge_mqtt_refused_total", "reason" => "max_connections").increment(1);
                    tracing::warn!(%peer, max = self.max, "device refused: too many connections");
                    continue;
                }
                let (door, stop, transport) = (self.clone(), stop.clone(), transport.clone());
                let tasks = inner.clone();
                inner.spawn(async move {
                    door.connections.fetch_add(1, Ordering::Relaxed);
                    metrics::gauge!("millrace_edge_mqtt_connections").increment(1.0);
                    let run = async {
                        let _ = sock.set_nodelay(true);
                        let ws = transport.websocket;
                        match transport.tls {
                            Some(acceptor) => {
                                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await {
                                    Ok(Ok(s)) => door.open(s, ws, only, &tasks, &stop).await,
                                    Ok(Err(e)) => Err(SpliceError::Io(e)),
                                    Err(_) => Err(SpliceError::Timeout),
                                }
                            }
                            None => door.open(sock, ws, only, &tasks, &stop).await,
                        }
                    };
                    tokio::select! {
                        r = run => if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "device connection ended");
                        },
                        _ = stop.cancelled() => {}
                    }
                    door.connections.fetch_sub(1, Ordering::Relaxed);
                    metrics::gauge!("millrace_edge_mqtt_connections").decrement(1.0);
                });
            }
        });
    }

    /// Completes the WebSocket handshake if the listener speaks WebSocket, then splices the
    /// MQTT byte stream (WebSocket frames unwrapped) like any other connection's.
    async fn open<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &self,
        sock: S,
        websocket: bool,
        only: Option<u8>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<(), SpliceError> {
        if !websocket {
            return self.splice(sock, only, tasks, stop).await;
        }
        let ws_cfg = async_tungstenite::tungstenite::protocol::WebSocketConfig {
            max_message_size: Some(MAX_WS_MESSAGE),
            max_frame_size: Some(MAX_WS_MESSAGE),
            ..Default::default()
        };
        let handshake = async_tungstenite::tokio::accept_hdr_async_with_config(
            sock,
            mqtt_subprotocol,
            Some(ws_cfg),
        );
        let ws = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                metrics::counter!("millrace_edge_mqtt_refused_total", "reason" => "websocket")
                    .increment(1);
                tracing::warn!(error = %e, "WebSocket handshake failed");
                return Err(SpliceError::WebSocket(e.to_string()));
            }
            Err(_) => return Err(SpliceError::Timeout),
        };
        self.splice(ws_stream_tungstenite::WsStream::new(ws), only, tasks, stop)
            .await
    }

    /// Reads enough of the CONNECT to know the protocol level, then splices to rumqttd, handing
    /// every PUBLISH to ingest and forwarding it once it is stored.
    async fn splice<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut sock: S,
        only: Option<u8>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<(), SpliceError> {
        let mut head = Vec::with_capacity(64);
        let level = tokio::time::timeout(
            Duration::from_secs(10),
            mqtt::read_level(&mut sock, &mut head),
        )
        .await
        .map_err(|_| SpliceError::Timeout)??;
        let (mut upstream, rumqttd_side) = tokio::io::duplex(PIPE_BYTES);
        let connection: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match (level, only) {
            (5, None | Some(5)) => Box::pin(self.v5.connection(rumqttd_side)),
            (3 | 4, None | Some(4)) => Box::pin(self.v4.connection(rumqttd_side)),
            (other, _) => {
                metrics::counter!("millrace_edge_mqtt_refused_total", "reason" => "protocol")
                    .increment(1);
                return Err(SpliceError::Level(other));
            }
        };
        // rumqttd's side of the connection outlives this one by the will delay: its own task.
        let stop = stop.clone();
        tasks.spawn(async move {
            tokio::select! { _ = connection => {}, _ = stop.cancelled() => {} }
        });
        let Some(ingest) = &self.ingest else {
            upstream.write_all(&head).await?;
            tokio::io::copy_bidirectional_with_sizes(
                &mut sock,
                &mut upstream,
                64 * 1024,
                64 * 1024,
            )
            .await?;
            return Ok(());
        };
        let (mut dev_r, mut dev_w) = tokio::io::split(sock);
        let (mut up_r, mut up_w) = tokio::io::split(upstream);
        // Nothing a connection publishes is ingested before rumqttd has accepted its login:
        // the way back reports whether the CONNACK said yes.
        let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel::<bool>();
        let down = async {
            let mut connack = Vec::with_capacity(8);
            let accepted = mqtt::read_connack(&mut up_r, &mut connack).await;
            let _ = accepted_tx.send(accepted.as_ref().is_ok_and(|ok| *ok));
            let ok = accepted?;
            dev_w.write_all(&connack).await?;
            if !ok {
                dev_w.shutdown().await?;
                return Err(SpliceError::Refused);
            }
            tokio::io::copy(&mut up_r, &mut dev_w).await?;
            dev_w.shutdown().await?;
            Ok::<(), SpliceError>(())
        };
        // The way in is two halves joined by a short queue, so that a connection keeps reading
        // while its previous reads are being stored: what arrives meanwhile is ready for the
        // ingest thread's next batch instead of waiting for this connection's turn to read.
        // `read` scans and hands PUBLISHes to ingest; `forward` writes each read's bytes to
        // rumqttd in order, once they are stored.
        let (queue_tx, mut queue_rx) = tokio::sync::mpsc::channel::<(
            bytes::Bytes,
            Option<oneshot::Receiver<()>>,
        )>(READS_IN_FLIGHT);
        let forward = async {
            while let Some((bytes, stored)) = queue_rx.recv().await {
                if let Some(stored) = stored {
                    // Forward (and so let rumqttd acknowledge) only what is durable.
                    stored.await.map_err(|_| SpliceError::Stopped)?;
                }
                up_w.write_all(&bytes).await?;
            }
            up_w.shutdown().await?;
            Ok::<(), SpliceError>(())
        };
        let read = async {
            let queue = queue_tx;
            let send = |bytes: bytes::Bytes, stored| {
                let queue = &queue;
                async move {
                    queue
                        .send((bytes, stored))
                        .await
                        .map_err(|_| SpliceError::Stopped)
                }
            };
            let mut scanner = mqtt::Scanner::new(level == 5, self.max_packet);
            let mut decoder = crate::ingest::Decoder::new(self.sparkplug.clone());
            let mut publishes = vec![];
            let mut framed = scanner.push(&head, &mut publishes).is_ok();
            let (mut fed, mut accepted) = (head.len() as u64, None);
            send(bytes::Bytes::from(head), None).await?;
            let mut accepted_rx = Some(accepted_rx);
            // Most devices send a few small messages a second: a small buffer each keeps 1,000
            // connections cheap. One that fills it gets the large one, and gives it back on the
            // first read the small one would have held (a device that caught up after a stall).
            let mut buf = vec![0u8; SMALL_READ];
            loop {
                let n = dev_r.read(&mut buf).await?;
                let read_at = std::time::Instant::now();
                if n == buf.len() && n < LARGE_READ {
                    buf.resize(LARGE_READ, 0);
                } else if n < SMALL_READ && buf.len() > SMALL_READ {
                    buf.truncate(SMALL_READ);
                    buf.shrink_to_fit();
                }
                if n == 0 {
                    // Dropping the queue lets `forward` finish what is queued and close.
                    return Ok::<(), SpliceError>(());
                }
                let start = fed;
                fed += n as u64;
                if framed && let Err(e) = scanner.push(&buf[..n], &mut publishes) {
                    // rumqttd receives the same bytes and closes the connection.
                    tracing::warn!(error = %e, "device sent a malformed MQTT stream");
                    framed = false;
                }
                let mut rest = &buf[..n];
                if accepted.is_none() {
                    match scanner.connect_end() {
                        Some(end) if framed => {
                            // Forward the rest of the CONNECT, then wait for rumqttd's verdict.
                            let cut = (end.saturating_sub(start) as usize).min(n);
                            send(bytes::Bytes::copy_from_slice(&rest[..cut]), None).await?;
                            rest = &rest[cut..];
                            let rx = accepted_rx.take().expect("awaited once");
                            let ok = tokio::time::timeout(Duration::from_secs(30), rx)
                                .await
                                .is_ok_and(|r| r.unwrap_or(false));
                            if !ok {
                                return Err(SpliceError::Refused);
                            }
                            accepted = Some(true);
                        }
                        _ => {
                            // Still inside the CONNECT (or not MQTT): nothing to ingest yet.
                            publishes.clear();
                            send(bytes::Bytes::copy_from_slice(rest), None).await?;
                            continue;
                        }
                    }
                }
                let mut stored_rx = None;
                if !publishes.is_empty() {
                    let (done, stored) = oneshot::channel();
                    let now = chrono::Utc::now().timestamp_millis();
                    let bytes = publishes.iter().map(|p| p.payload.len() as u64).sum();
                    let mut items = Vec::with_capacity(publishes.len());
                    for p in publishes.drain(..) {
                        decoder.decode_into(&p, now, &mut items);
                    }
                    let chunk = IngestChunk {
                        items,
                        bytes,
                        done,
                        read_at,
                    };
                    ingest
                        .send_async(chunk)
                        .await
                        .map_err(|_| SpliceError::Stopped)?;
                    stored_rx = Some(stored);
                }
                if !rest.is_empty() || stored_rx.is_some() {
                    send(bytes::Bytes::copy_from_slice(rest), stored_rx).await?;
                }
            }
        };
        let up = async {
            let (r, f) = tokio::join!(read, forward);
            r.and(f)
        };
        tokio::select! { r = down => r, r = up => r }
    }
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, BrokerError> {
    use tokio_rustls::rustls;
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| BrokerError::Tls(format!("{}: {e}", p.display())))
    };
    let certs = rustls_pemfile::certs(&mut &read(cert)?[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(BrokerError::Tls(format!(
            "{} holds no PEM certificate",
            cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut &read(key)?[..])
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| BrokerError::Tls(format!("{} holds no PEM private key", key.display())))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| BrokerError::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
