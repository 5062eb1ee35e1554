//! Test harness shared by Millrace's integration and end-to-end tests: real peers on loopback.
//!
//! # Layout
//! - [`Mosquitto`]: a real Mosquitto broker (Debian package) on a free loopback port, stopped on drop.
//! - [`Recorder`]: an MQTT subscriber (rumqttc) that keeps every message it receives.
//! - [`free_port`]: a port the OS just handed out on 127.0.0.1.
//! - [`PowerCutFs`]: a FUSE filesystem that loses every unsynced write when the power is cut.
#![warn(missing_docs)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// A port the OS just handed out on 127.0.0.1 (bound to port 0, then released), for peers such
/// as Mosquitto that cannot report the port they bound.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The Python with the outside peers and readers (`./millrace test` makes it from
/// tests/python/requirements.txt; `MILLRACE_PYTHON` names another).
pub fn python() -> PathBuf {
    installed_tool(
        "MILLRACE_PYTHON",
        ".cache/millrace-py/bin/python",
        "it installs tests/python/requirements.txt",
    )
}

/// A tool `./millrace test` installs under `$HOME/<home_path>` (`what` it does), or the one the
/// environment variable `var` names.
fn installed_tool(var: &str, home_path: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var).map_or_else(
        || PathBuf::from(std::env::var("HOME").expect("HOME")).join(home_path),
        Into::into,
    );
    assert!(
        p.exists(),
        "{} does not exist: run ./millrace test ({what}), or set {var}",
        p.display()
    );
    p
}

/// Reads a server's output until it names the address it listens on (`http://127.0.0.1:PORT`),
/// and the rest of it in the background (so the server never blocks on a full pipe).
fn announced_endpoint(out: impl std::io::Read + Send + 'static, server: &str) -> String {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(out).lines();
    let endpoint = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{server} exited before it started"))
            .expect("read");
        if let Some(i) = line.find("http://127.0.0.1:") {
            let port: String = line[i + "http://127.0.0.1:".len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            break format!("http://127.0.0.1:{port}");
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    endpoint
}

/// Polls `check` until it is true or `timeout` passes. Used to wait for *conditions* (a message
/// arrived, a process is listening), never to assert on how long something took.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

/// A Mosquitto broker on 127.0.0.1, killed when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto with anonymous access and unbounded queues (so that a slow test
    /// subscriber loses nothing).
    pub fn start() -> Self {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("mosquitto is not installed: run `apt-get install -y mosquitto mosquitto-clients` (.ci/run does)");
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let conf = dir.path().join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 100\npersistence false\n"
                ),
            )
            .expect("write mosquitto.conf");
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start mosquitto");
            let mut m = Self {
                child,
                port,
                _dir: dir,
            };
            if wait_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }) {
                return m;
            }
            let _ = m.child.kill();
        }
        panic!("mosquitto did not start listening");
    }

    /// `mqtt://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One received message.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// An MQTT subscriber that records every message on a filter.
#[derive(Debug)]
pub struct Recorder {
    messages: Arc<Mutex<Vec<Received>>>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Connects to `127.0.0.1:port`, subscribes to `filter` at QoS 1 and waits for the SUBACK.
    pub async fn start(port: u16, filter: &str, credentials: Option<(&str, &str)>) -> Self {
        let mut opts = MqttOptions::new(format!("recorder-{}", free_port()), "127.0.0.1", port);
        opts.set_max_packet_size(1 << 20, 1 << 20)
            .set_keep_alive(Duration::from_secs(30));
        if let Some((u, p)) = credentials {
            opts.set_credentials(u, p);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        loop {
            match eventloop.poll().await.expect("recorder connects") {
                Event::Incoming(Packet::SubAck(_)) => break,
                _ => continue,
            }
        }
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        sink.lock().expect("lock").push(Received {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                        })
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Self {
            messages,
            client,
            task,
        }
    }

    /// How many messages arrived so far.
    pub fn count(&self) -> usize {
        self.messages.lock().expect("lock").len()
    }

    /// A copy of every message so far.
    pub fn messages(&self) -> Vec<Received> {
        self.messages.lock().expect("lock").clone()
    }

    /// Waits until at least `n` messages arrived (or `timeout`), then returns the count.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let start = Instant::now();
        while self.count() < n && start.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.count()
    }

    /// Disconnects.
    pub async fn stop(self) {
        let _ = self.client.disconnect().await;
        self.task.abort();
    }
}

/// Runs a command to its end and returns its output; a failure fails the test with the
/// command's stderr.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// What a [`FaultProxy`] does to the traffic through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Close every connection and refuse new ones (a cut link).
    Cut,
    /// Accept and hold connections but forward nothing (a stalled link).
    Stall,
    /// Forward requests, but throw the answers away and close the connection: the server did
    /// the work, the client never learns it (a lost acknowledgement).
    LoseReplies,
}

/// A TCP proxy on 127.0.0.1 that injects network faults between a client and a server.
#[derive(Debug)]
pub struct FaultProxy {
    /// The address clients connect to.
    pub addr: std::net::SocketAddr,
    mode: Arc<tokio::sync::watch::Sender<Fault>>,
    /// Where connections go (a load balancer moves it: [`FaultProxy::switch_to`]).
    upstream: Arc<Mutex<std::net::SocketAddr>>,
    /// Replies thrown away in [`Fault::LoseReplies`] mode.
    pub lost_replies: Arc<std::sync::atomic::AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl FaultProxy {
    /// Starts forwarding to `upstream`.
    pub fn start(upstream: std::net::SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::watch::channel(Fault::Pass);
        let lost = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let lost2 = lost.clone();
        let target = Arc::new(Mutex::new(upstream));
        let target2 = target.clone();
        runtime.spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut rx = rx.clone();
                let lost = lost2.clone();
                let upstream = *target2.lock().unwrap();
                tokio::spawn(async move {
                    let mode = *rx.borrow_and_update();
                    match mode {
                        Fault::Cut => return,
                        Fault::Stall => {
                            // Hold until the mode changes, then drop the connection.
                            let _ = rx.changed().await;
                            return;
                        }
                        Fault::Pass | Fault::LoseReplies => {}
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let up = async {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = cr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let down = async {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = sr.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            if mode == Fault::LoseReplies {
                                lost.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                break;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    // Any change of mode ends the connection (a cut drops links in use).
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = rx.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            mode: Arc::new(tx),
            upstream: target,
            lost_replies: lost,
            _runtime: runtime,
        }
    }

    /// Changes what the proxy does; connections open now are closed.
    pub fn set(&self, fault: Fault) {
        self.mode.send_replace(fault);
    }

    /// Sends new connections to `upstream` and closes those open now (a load balancer taking
    /// a node out).
    pub fn switch_to(&self, upstream: std::net::SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
        self.mode.send_modify(|_| {});
    }

    /// The proxy as an `http://` base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The power-cut filesystem (`tests/powercut-fs`, a crate of its own so that its FUSE
/// dependencies stay out of the platform's build), built on first use, mounted over a backing
/// directory. [`cut`](Self::cut) loses power: every write not synced is undone. Dropped without
/// a cut, it unmounts cleanly.
#[derive(Debug)]
pub struct PowerCutFs {
    child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

/// What a [`PowerCutFs::cut`] took away.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files that lost data, with the bytes each lost, by path under the backing directory.
    pub files: Vec<(String, u64)>,
    /// All bytes lost.
    pub bytes: u64,
    /// Syncs (`fsync`, `fdatasync`) the layer saw while mounted.
    pub syncs: u64,
}

/// Builds `millrace-powercut-fs` once per test run (its own target directory, next to the
/// workspace's) and returns the binary.
fn powercut_binary() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("powercut-fs/Cargo.toml");
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
            PathBuf::from,
        );
        let target = target.join("powercut-fs");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run_ok(
            Command::new(cargo)
                .args(["build", "--quiet", "--locked", "--manifest-path"])
                .arg(&manifest)
                .arg("--target-dir")
                .arg(&target)
                .env_remove("RUSTFLAGS"),
        );
        target.join("debug/millrace-powercut-fs")
    })
    .clone()
}

impl PowerCutFs {
    /// Mounts the layer over `backing` at `mountpoint`. Needs root and `/dev/fuse`.
    pub fn mount(backing: &Path, mountpoint: &Path) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(powercut_binary())
            .arg(backing)
            .arg(mountpoint)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start millrace-powercut-fs");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "mounted",
            "the power-cut layer did not mount (it needs root and /dev/fuse): {:?}",
            child.wait()
        );
        Self { child, stdout }
    }

    /// Cuts the power: everything not synced is gone from the backing directory, and the layer
    /// is unmounted. Kill the program using it first.
    pub fn cut(mut self) -> CutReport {
        use std::io::{BufRead, Write};
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(b"cut\n").unwrap();
        drop(stdin);
        let mut report = CutReport::default();
        for line in (&mut self.stdout).lines() {
            let line = line.unwrap();
            let fields: Vec<&str> = line.splitn(3, '\t').collect();
            match fields.as_slice() {
                ["lost", bytes, path] => report
                    .files
                    .push(((*path).to_owned(), bytes.parse().unwrap())),
                ["cut", bytes, syncs] => {
                    report.bytes = bytes.parse().unwrap();
                    report.syncs = syncs.parse().unwrap();
                }
                _ => panic!("millrace-powercut-fs said {line:?}"),
            }
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the cut failed: {status}");
        report
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // end of input: a clean unmount
        let _ = self.child.wait();
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1 made by `openssl` in `dir`:
/// `(cert.pem, key.pem)`, for TLS and WSS listeners in tests.
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    run_ok(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]));
    (cert, key)
}

/// An S3 server on 127.0.0.1 (moto's, from `tests/python/requirements.txt`, with atomic
/// conditional writes: `tests/python/s3_server.py`), empty, on a port of
/// its own; stopped when dropped.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl S3Server {
    /// Starts the server (it accepts any credentials).
    pub fn start() -> Self {
        Self::start_with_env(&[])
    }

    /// Starts a server that checks credentials: it knows none, so every request is refused
    /// (`InvalidAccessKeyId`).
    pub fn start_checking_credentials() -> Self {
        Self::start_with_env(&[("INITIAL_NO_AUTH_ACTION_COUNT", "0")])
    }

    fn start_with_env(env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python/s3_server.py"))
            .args(["-H", "127.0.0.1", "-p", "0"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start moto's S3 server");
        let endpoint = announced_endpoint(child.stderr.take().expect("stderr"), "moto");
        Self { child, endpoint }
    }

    /// Creates bucket `name`.
    pub fn create_bucket(&self, name: &str) {
        let out = run_ok(Command::new("curl").args([
            "-fsS",
            "-X",
            "PUT",
            &format!("{}/{name}", self.endpoint),
        ]));
        assert!(out.status.success());
    }

    /// The environment a client of this server needs (credentials the server accepts).
    pub fn env(&self) -> [(&'static str, &'static str); 3] {
        [
            ("AWS_ACCESS_KEY_ID", "millrace-test"),
            ("AWS_SECRET_ACCESS_KEY", "millrace-test-secret"),
            ("AWS_REGION", "us-east-1"),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// s3s-fs (crates.io, disk-backed; `./millrace test` installs it in
/// `~/.cache/millrace-tools`, `MILLRACE_S3S_FS` names another) on 127.0.0.1, port of its own,
/// with the buckets `buckets` (directories under `root`); stopped when dropped.
#[derive(Debug)]
pub struct S3sFs {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl S3sFs {
    /// The access and secret key it accepts.
    const KEYS: (&'static str, &'static str) = ("millrace-s3s", "millrace-s3s-secret");

    /// Starts the server on `root`.
    pub fn start(root: &Path, buckets: &[&str]) -> Self {
        for b in buckets {
            std::fs::create_dir_all(root.join(b)).expect("bucket directory");
        }
        let bin = installed_tool(
            "MILLRACE_S3S_FS",
            ".cache/millrace-tools/bin/s3s-fs",
            "it installs s3s-fs",
        );
        let mut child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", Self::KEYS.0, "--secret-key", Self::KEYS.1])
            .arg(root)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let endpoint = announced_endpoint(child.stdout.take().expect("stdout"), "s3s-fs");
        Self { child, endpoint }
    }

    /// The environment a client of this server needs.
    pub fn env(&self) -> [(&'static str, &'static str); 3] {
        [
            ("AWS_ACCESS_KEY_ID", Self::KEYS.0),
            ("AWS_SECRET_ACCESS_KEY", Self::KEYS.1),
            ("AWS_REGION", "us-east-1"),
        ]
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
