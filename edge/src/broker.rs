//! The embedded MQTT broker (rumqttd) and the single device port.
//!
//! rumqttd serves one protocol version per listener, while devices expect one port (1883) for
//! MQTT 3.1.1 and 5, as Mosquitto offers. The front listener reads each connection's CONNECT
//! fixed header and protocol level, then splices the connection to rumqttd's v4 or v5 listener
//! on loopback. rumqttd's own listeners bind their addresses themselves (its API takes no bound
//! socket), so the internal ones get a port the OS just handed out on 127.0.0.1.
//!
//! rumqttd's router runs on its own thread and has no stop API; its listeners run as tasks on
//! our runtime and stop with it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings, TlsConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::MqttConfig;

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
    /// The in-process link to the router failed.
    #[error("broker link: {0}")]
    Link(#[from] LinkError),
}

/// Makes in-process links to rumqttd's router (whose sender type rumqttd does not export).
type LinkFactory = Arc<dyn Fn(&str) -> Result<(LinkTx, LinkRx), LinkError> + Send + Sync>;

/// The running broker.
pub struct Broker {
    links: LinkFactory,
    /// The device port (3.1.1 and 5).
    pub addr: SocketAddr,
    /// rumqttd's MQTT 3.1.1 listener.
    pub v4_addr: SocketAddr,
    /// rumqttd's MQTT 5 listener.
    pub v5_addr: SocketAddr,
    connections: Arc<AtomicI64>,
}

fn loopback_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
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
        f.debug_struct("Broker")
            .field("addr", &self.addr)
            .field("v4_addr", &self.v4_addr)
            .field("v5_addr", &self.v5_addr)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Starts the router, rumqttd's listeners and the device port. Tasks are tracked by
    /// `tasks` and stop when `stop` is cancelled.
    pub async fn start(
        cfg: &MqttConfig,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let router_cfg = RouterConfig {
            max_connections: cfg.max_connections + 16,
            max_outgoing_packet_count: 200,
            max_segment_size: cfg.segment_bytes,
            max_segment_count: cfg.segment_count,
            ..Default::default()
        };
        let router_tx = Router::new(0, router_cfg).spawn();

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
        let settings = |name: &str, listen: SocketAddr, tls: Option<TlsConfig>| ServerSettings {
            name: name.to_owned(),
            listen,
            tls,
            next_connection_delay_ms: 0,
            connections: connections.clone(),
        };
        let v4_addr = cfg.v4_listen.unwrap_or_else(loopback_port);
        let v5_addr = cfg.v5_listen.unwrap_or_else(loopback_port);
        let mut servers: Vec<(ServerSettings, bool, LinkType)> = vec![
            (settings("v4", v4_addr, None), false, LinkType::Remote),
            (settings("v5", v5_addr, None), true, LinkType::Remote),
        ];
        if let Some(ws) = cfg.ws_listen {
            servers.push((settings("ws", ws, None), false, LinkType::Websocket));
        }
        if let Some(tls) = &cfg.tls {
            let t = TlsConfig::Rustls {
                capath: None,
                certpath: tls.cert.display().to_string(),
                keypath: tls.key.display().to_string(),
            };
            servers.push((
                settings("tls", tls.listen, Some(t)),
                tls.protocol == "v5",
                LinkType::Remote,
            ));
        }
        for (s, v5, link) in servers {
            let (name, stop) = (s.name.clone(), stop.clone());
            let router_tx = router_tx.clone();
            tasks.spawn(async move {
                let run = async move {
                    let r = if v5 {
                        Server::new(s, router_tx, V5).start(link).await
                    } else {
                        Server::new(s, router_tx, V4).start(link).await
                    };
                    if let Err(e) = r {
                        tracing::error!(listener = %name, error = %e, "MQTT listener stopped");
                    }
                };
                tokio::select! { _ = run => {}, _ = stop.cancelled() => {} }
            });
        }
        // rumqttd binds asynchronously: wait until its listeners listen before taking devices.
        for addr in [v4_addr, v5_addr] {
            let mut waited = Duration::ZERO;
            while !is_listening(addr).await {
                if waited > Duration::from_secs(10) {
                    return Err(BrokerError::Bind {
                        addr,
                        source: std::io::Error::other("rumqttd listener did not start"),
                    });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                waited += Duration::from_millis(5);
            }
        }

        let front = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| BrokerError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = front.local_addr().map_err(|source| BrokerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let connections = Arc::new(AtomicI64::new(0));
        let count = connections.clone();
        let max = cfg.max_connections as i64;
        let inner = tasks.clone();
        tasks.spawn(async move {
            loop {
                let (sock, peer) = tokio::select! {
                    a = front.accept() => match a {
                        Ok(a) => a,
                        Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
                    },
                    _ = stop.cancelled() => return,
                };
                if count.load(Ordering::Relaxed) >= max {
                    metrics::counter!("millrace_edge_mqtt_refused_total", "reason" => "max_connections").increment(1);
                    tracing::warn!(%peer, max, "device refused: too many connections");
                    continue;
                }
                let (count, stop) = (count.clone(), stop.clone());
                inner.spawn(async move {
                    count.fetch_add(1, Ordering::Relaxed);
                    metrics::gauge!("millrace_edge_mqtt_connections").increment(1.0);
                    tokio::select! {
                        r = splice(sock, v4_addr, v5_addr) => if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "device connection ended");
                        },
                        _ = stop.cancelled() => {}
                    }
                    count.fetch_sub(1, Ordering::Relaxed);
                    metrics::gauge!("millrace_edge_mqtt_connections").decrement(1.0);
                });
            }
        });
        tracing::info!(%addr, %v4_addr, %v5_addr, "MQTT broker listening (3.1.1 and 5 on the device port)");
        let links: LinkFactory = Arc::new(move |client_id: &str| {
            let (tx, rx, _) = LinkBuilder::new(client_id, router_tx.clone())
                .dynamic_filters(true)
                .build()?;
            Ok((tx, rx))
        });
        Ok(Self {
            links,
            addr,
            v4_addr,
            v5_addr,
            connections,
        })
    }

    /// Devices connected through the device port now.
    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Connects an in-process client (no TCP hop). Blocks until the router answers: call it
    /// off the async runtime.
    pub fn local_link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        Ok((self.links)(client_id)?)
    }
}

/// Whether something listens on `addr`. On Linux this reads the kernel's socket table, so that
/// no probe connection makes rumqttd log an aborted CONNECT; elsewhere it connects.
async fn is_listening(addr: SocketAddr) -> bool {
    if let Ok(table) = tokio::fs::read_to_string("/proc/net/tcp").await {
        let port = format!(":{:04X}", addr.port());
        return table.lines().skip(1).any(|l| {
            let mut f = l.split_whitespace();
            let (local, state) = (f.nth(1).unwrap_or(""), f.nth(1).unwrap_or(""));
            local.ends_with(&port) && state == "0A"
        });
    }
    TcpStream::connect(addr).await.is_ok()
}

/// Why a connection could not be routed.
#[derive(Debug, thiserror::Error)]
enum SpliceError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("first packet is not CONNECT")]
    NotConnect,
    #[error("unsupported protocol level {0}")]
    Level(u8),
    #[error("no CONNECT within 10 s")]
    Timeout,
}

/// Reads enough of the CONNECT to know the protocol level, then splices to rumqttd.
async fn splice(mut sock: TcpStream, v4: SocketAddr, v5: SocketAddr) -> Result<(), SpliceError> {
    sock.set_nodelay(true)?;
    let mut head = Vec::with_capacity(64);
    let level = tokio::time::timeout(Duration::from_secs(10), read_level(&mut sock, &mut head))
        .await
        .map_err(|_| SpliceError::Timeout)??;
    let target = match level {
        5 => v5,
        3 | 4 => v4,
        other => {
            metrics::counter!("millrace_edge_mqtt_refused_total", "reason" => "protocol")
                .increment(1);
            return Err(SpliceError::Level(other));
        }
    };
    let mut upstream = TcpStream::connect(target).await?;
    upstream.set_nodelay(true)?;
    upstream.write_all(&head).await?;
    tokio::io::copy_bidirectional_with_sizes(&mut sock, &mut upstream, 64 * 1024, 64 * 1024)
        .await?;
    Ok(())
}

/// CONNECT: fixed header 0x10, remaining length (1–4 bytes), protocol name (2-byte length +
/// "MQTT" or "MQIsdp"), protocol level.
async fn read_level(sock: &mut TcpStream, head: &mut Vec<u8>) -> Result<u8, SpliceError> {
    async fn byte(sock: &mut TcpStream, head: &mut Vec<u8>) -> Result<u8, SpliceError> {
        let b = sock.read_u8().await?;
        head.push(b);
        Ok(b)
    }
    if byte(sock, head).await? != 0x10 {
        return Err(SpliceError::NotConnect);
    }
    for _ in 0..4 {
        if byte(sock, head).await? & 0x80 == 0 {
            break;
        }
    }
    let len = (u16::from(byte(sock, head).await?) << 8) | u16::from(byte(sock, head).await?);
    if len > 6 {
        return Err(SpliceError::NotConnect);
    }
    for _ in 0..len {
        byte(sock, head).await?;
    }
    byte(sock, head).await
}
