//! Faults beyond kill -9: hostile HTTP clients, …

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use millrace_tests::PowerCutFs as PowerCut;
use millrace_tests::wait_until;

use super::{CloudProcess, EdgeProcess, cloud_config, edge_config, edge_token};

/// A raw connection to `base` (`http://host:port`). The read timeout only keeps a broken server
/// from hanging the test; nothing here depends on how long anything takes.
fn connect(base: &str) -> TcpStream {
    let s = TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Everything the server sends until it closes the connection (a reset counts as closed).
fn read_until_closed(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the server did not close: {e}; got {}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads until `needle` has arrived; returns what was read.
fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = s.read(&mut buf).expect("the server answers");
        assert!(
            n > 0,
            "closed before {needle:?}: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// One request on a kept-alive connection, its response read exactly (header and
/// `content-length` bytes of body), so the connection can carry the next one.
fn health_on(s: &mut TcpStream) {
    let head = try_health_on(s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// [`health_on`] that returns the answer's head instead of asserting a 200 (the body of
/// anything else is not read).
fn try_health_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed mid-answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    if !head.starts_with("HTTP/1.1 200") {
        return head;
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .expect("a sized answer")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head
}

/// A connection that the server took (its health answered 200): a connection the server
/// refused as one too many is tried again, since the connection of the last metrics scrape
/// may still be counted for a moment after it closed.
fn served_connection(base: &str) -> TcpStream {
    let mut last = String::new();
    let mut taken = None;
    wait_until(Duration::from_secs(30), || {
        let mut s = connect(base);
        last = try_health_on(&mut s);
        if last.starts_with("HTTP/1.1 200") {
            taken = Some(s);
            return true;
        }
        false
    });
    taken.unwrap_or_else(|| panic!("the server never took a connection: {last}"))
}

fn healthy(base: &str) -> bool {
    std::process::Command::new("curl")
        .args(["-fsS", "-o", "/dev/null", &format!("{base}/health")])
        .status()
        .is_ok_and(|s| s.success())
}

/// A sample of the server's metrics: `name` with `labels` (`{…}` or empty).
fn metric(base: &str, name: &str, labels: &str) -> u64 {
    let out = std::process::Command::new("curl")
        .args(["-fsS", &format!("{base}/metrics")])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let key = format!("{name}{labels} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The lines of `/metrics` whose name starts with `prefix` (for failure messages).
fn metric_lines(base: &str, prefix: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-fsS", &format!("{base}/metrics")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `{prefix}_http_refused_total{reason="…"}`.
fn refused(base: &str, prefix: &str, reason: &str) -> u64 {
    metric(
        base,
        &format!("{prefix}_http_refused_total"),
        &format!("{{reason=\"{reason}\"}}"),
    )
}

/// Waits until the server holds no connection but the one asking.
fn settled(base: &str, prefix: &str) {
    let name = format!("{prefix}_http_connections");
    assert!(
        wait_until(Duration::from_secs(30), || metric(base, &name, "") == 1),
        "connections closed by clients are let go"
    );
}

/// A request whose body is `body`, answered with a status line starting `status`.
fn post_expecting(base: &str, method_path: &str, body: &[u8], status: &str) -> String {
    let mut s = connect(base);
    let mut request = format!(
        "{method_path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    // One write: the server then has the whole request when it answers, so closing after the
    // answer is a clean close, not a reset that could discard the answer.
    request.extend_from_slice(body);
    s.write_all(&request).unwrap();
    let got = read_until_closed(&mut s);
    assert!(
        got.starts_with(&format!("HTTP/1.1 {status}")),
        "{method_path}: {got}"
    );
    got
}

/// Starts a server with these environment variables: its base URL and how to stop it.
type StartServer<'a> = dyn Fn(&[(&str, &str)]) -> (String, Box<dyn FnOnce()>) + 'a;

/// The limits of one server, tried on both: connections over the cap get a 503 at once and the
/// server serves again when one closes; a body over the limit gets a JSON 413; a header that
/// never ends is cut off; a body that never ends gets a 408; every refusal is counted.
fn limits_hold(start: &StartServer<'_>, env_prefix: &str, metric_prefix: &str, body_route: &str) {
    let var = |k: &str| format!("{env_prefix}HTTP__LIMITS__{k}");
    let (max_conn, max_body, header_t, body_t) = (
        var("MAX_CONNECTIONS"),
        var("MAX_BODY_BYTES"),
        var("HEADER_TIMEOUT"),
        var("BODY_TIMEOUT"),
    );

    // Long timeouts: the connections held open must not time out while the test runs.
    let (base, stop) = start(&[(&max_conn, "3"), (&max_body, "1024"), (&header_t, "10min")]);
    let got = post_expecting(&base, body_route, &[b'x'; 4096], "413");
    assert!(got.contains("larger than this endpoint accepts"), "{got}");

    settled(&base, metric_prefix);
    let mut held: Vec<TcpStream> = (0..3).map(|_| served_connection(&base)).collect();
    let mut extra = connect(&base);
    let got = read_until_closed(&mut extra);
    assert!(
        got.starts_with("HTTP/1.1 503") && got.contains("too many connections"),
        "{got}"
    );
    drop(held.pop());
    assert!(
        wait_until(Duration::from_secs(30), || healthy(&base)),
        "serves again once a connection closed"
    );
    // The held ones are still served.
    health_on(&mut held[0]);
    drop(held);
    assert!(wait_until(Duration::from_secs(30), || refused(
        &base,
        metric_prefix,
        "max_connections"
    ) >= 1));
    assert_eq!(refused(&base, metric_prefix, "body_too_large"), 1);
    stop();

    let (base, stop) = start(&[(&header_t, "300ms"), (&body_t, "300ms")]);
    // A header sent a piece at a time and never finished: the server closes the connection.
    let mut slow = connect(&base);
    slow.write_all(b"GET /health HTTP/1.1\r\nhost: t\r\nx-slow: ")
        .unwrap();
    let got = read_until_closed(&mut slow);
    assert!(!got.contains("200 OK"), "{got}");
    // A body that never ends: 408 with the reason.
    let mut s = connect(&base);
    s.write_all(
        format!(
            "{body_route} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .unwrap();
    let got = read_until_closed(&mut s);
    assert!(
        got.starts_with("HTTP/1.1 408") && got.contains("did not arrive within 300ms"),
        "{got}"
    );
    assert!(healthy(&base), "the server still serves others");
    assert!(refused(&base, metric_prefix, "header_timeout") >= 1);
    assert_eq!(refused(&base, metric_prefix, "body_timeout"), 1);
    stop();
}

#[test]
fn both_http_servers_hold_their_limits_against_hostile_clients() {
    let dir = tempfile::tempdir().unwrap();
    let config = edge_config(dir.path(), 0);
    limits_hold(
        &|env: &[(&str, &str)]| {
            let edge = EdgeProcess::start_with_env(&config, env);
            (edge.http.clone(), Box::new(move || edge.stop()))
        },
        "MILLRACE_EDGE_",
        "millrace_edge",
        "POST /api/v1/functions/none/invoke",
    );

    let (_, digest) = edge_token("e1");
    let config = cloud_config(dir.path(), 0, "e1", &digest);
    limits_hold(
        &|env: &[(&str, &str)]| {
            let cloud = CloudProcess::start_with_env(&config, env);
            (cloud.http.clone(), Box::new(move || cloud.stop()))
        },
        "MILLRACE_CLOUD_",
        "millrace_cloud",
        "PUT /api/v1/master/machines",
    );

    // Live streams (the dashboard's server-sent events) have their own cap: one stream more is
    // refused, and a closed stream frees its slot.
    let cloud = CloudProcess::start_with_env(
        &config,
        &[("MILLRACE_CLOUD_HTTP__MAX_LIVE_SUBSCRIBERS", "1")],
    );
    let open_stream = |expect: &str| {
        let mut s = connect(&cloud.http);
        s.write_all(b"GET /api/v1/live HTTP/1.1\r\nhost: t\r\n\r\n")
            .unwrap();
        let got = read_until(&mut s, expect);
        (s, got)
    };
    let (first, _) = open_stream("event: snapshot");
    let (_, got) = open_stream("}");
    assert!(
        got.starts_with("HTTP/1.1 503") && got.contains("live streams are open already"),
        "{got}"
    );
    drop(first);
    // The server learns of the close when it next writes (the stream's keep-alive, 15 s).
    assert!(
        wait_until(Duration::from_secs(60), || {
            let mut s = connect(&cloud.http);
            s.write_all(b"GET /api/v1/live HTTP/1.1\r\nhost: t\r\n\r\n")
                .unwrap();
            read_until(&mut s, "\r\n").starts_with("HTTP/1.1 200")
        }),
        "a closed stream frees its slot"
    );
    assert!(refused(&cloud.http, "millrace_cloud", "live_subscribers") >= 1);
    cloud.stop();
}

/// A SIGTERM, waited for: the edge must exit cleanly with devices connected.
fn stop_edge(edge: EdgeProcess) {
    edge.stop();
}

/// kill -9, waited for.
fn kill_edge(mut edge: EdgeProcess) {
    edge.child.kill().unwrap();
    edge.child.wait().unwrap();
}

#[test]
fn devices_ride_through_rapid_edge_restarts_and_the_stored_data_equals_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed port, so that the devices find the restarted edge.
    let port = millrace_tests::free_port();
    let config = edge_config(dir.path(), port);
    let mut edge = EdgeProcess::start(&config);
    let truth = dir.path().join("truth.json");
    let sim_report = dir.path().join("sim.json");
    // A simulated day at an hour a second, with its fault mode on: disconnects, duplicates,
    // malformed and oversized payloads, unknown topics.
    let mut sim = super::sim_run(&edge)
        .args([
            "--qos",
            "1",
            "--seed",
            "21",
            "--start",
            "2026-02-02T00:00:00Z",
        ])
        .args(["--duration", "1day", "--telemetry-interval", "60s"])
        .args(["--speed", "3600", "--faults", "0.01", "--quiet"])
        .args(["--truth", truth.to_str().unwrap()])
        .args(["--report", sim_report.to_str().unwrap()])
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    // The load generator's devices (its own wire client) at the same time.
    let load_report = dir.path().join("load.json");
    let mut load = std::process::Command::new(super::bin("millrace-sim"))
        .args(["load", "--broker", &format!("mqtt://127.0.0.1:{port}")])
        .args(["--username", "sim", "--qos", "1", "--devices", "3"])
        .args(["--rate", "300", "--duration", "20s"])
        .args(["--report", load_report.to_str().unwrap()])
        .env("MILLRACE_MQTT_PASSWORD", super::PASSWORD)
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    for round in 0..5 {
        // Round 2 kills the edge as soon as it is up: devices are mid-handshake or about to be.
        if round != 2 {
            assert!(
                wait_until(Duration::from_secs(60), || {
                    edge.get("/api/v1/status")["ingest"]["events"].as_u64() > Some(500)
                }),
                "devices came back to edge {round}"
            );
        }
        if round % 2 == 0 {
            kill_edge(edge);
        } else {
            stop_edge(edge);
        }
        edge = EdgeProcess::start(&config);
    }
    let status = sim.wait().unwrap();
    assert!(status.success(), "the simulator never gives up: {status}");
    let status = load.wait().unwrap();
    assert!(
        status.success(),
        "the load generator never gives up: {status}"
    );

    let report = super::read_json(&sim_report);
    assert!(
        report["reconnects"].as_u64() >= Some(5),
        "the simulator reconnected after each restart: {report}"
    );
    assert_eq!(report["acked"], report["messages"], "{report}");
    let report = super::read_json(&load_report);
    // Its run is shorter than the restarts: each device lived through some of them.
    assert!(report["reconnects"].as_u64() >= Some(3), "{report}");
    assert_eq!(report["acked"], report["published"], "{report}");
    super::assert_matches_truth(&edge, &super::read_json(&truth));
    edge.stop();
}

/// A tmpfs of a few MiB mounted for one test (the test runs as root, as CI does), so that a
/// disk can be filled up without touching the machine's own; unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path, mib: u32) -> Self {
        std::fs::create_dir_all(path).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill it up, which needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            path: path.to_owned(),
        }
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[test]
fn full_disks_on_edge_and_cloud_hold_back_acknowledgements_and_both_resume_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // RocksDB resumes once 64 MiB are free again (its reserved buffer): a disk of 256.
    let edge_disk = SmallDisk::mount(&dir.path().join("edge-disk"), 256);
    let cloud_disk = SmallDisk::mount(&dir.path().join("cloud-disk"), 64);
    let (token, digest) = edge_token("e1");
    let cloud_config = cloud_config(&cloud_disk.path, 0, "e1", &digest);
    let cloud = CloudProcess::start(&cloud_config);
    let config = edge_config(&edge_disk.path, millrace_tests::free_port());
    super::with_sync(&config, &cloud.http, "");
    let env = [
        ("MILLRACE_EDGE_EDGE_ID", "e1"),
        ("MILLRACE_EDGE_SYNC__TOKEN", token.as_str()),
        // Small memtables: they flush, so fill the disk, soon.
        ("MILLRACE_EDGE_STORE__MEMTABLE_BYTES", "1048576"),
    ];
    let edge = EdgeProcess::start_with_env(&config, &env);
    let truth_path = dir.path().join("truth.json");
    let mut sim = super::paced_sim(
        &edge,
        "31",
        "2026-03-02T00:00:00Z",
        "1day",
        "10s",
        &truth_path,
    );
    let sync = |e: &EdgeProcess| e.get("/api/v1/sync");
    let failures = |e: &EdgeProcess| sync(e)["sent"]["failures"].as_u64().unwrap();
    let cloud_items = || cloud.get("/api/v1/edges")["edges"][0]["items"].as_u64();
    let timeout = Duration::from_secs(120);
    assert!(wait_until(timeout, || cloud_items() > Some(0)));

    // The cloud's disk fills: sync is refused (503), nothing is acknowledged, the API serves.
    let cloud_filler = cloud_disk.fill();
    let before = failures(&edge);
    assert!(
        wait_until(timeout, || failures(&edge) >= before + 2),
        "{}",
        sync(&edge)
    );
    let held = cloud_items();
    assert!(healthy(&cloud.http));

    // Then the edge's: its store stops taking writes, devices are not acknowledged (the
    // simulator waits), the API still answers and says why. RocksDB either fails the write
    // (a WAL append or a flush failed: counted by reason) or holds it back in a write stall
    // behind a flush that cannot finish (no write fails, but its background error counts).
    let edge_filler = edge_disk.fill();
    let store_stopped = || {
        refused_writes(&edge.http) >= 1.0
            || metric(&edge.http, "millrace_edge_store_background_errors", "") >= 1
            || metric(&edge.http, "millrace_edge_store_writes_stopped", "") >= 1
    };
    assert!(
        wait_until(timeout, store_stopped),
        "the full disk stopped no store write: {}\n{}",
        edge.get("/api/v1/status"),
        metric_lines(&edge.http, "millrace_edge_store")
    );
    let store = &edge.get("/api/v1/status")["store"];
    assert!(
        store["background_errors"].as_u64() >= Some(1) || store["writes_stopped"] == true,
        "the status says the store is stopped: {store}"
    );
    assert!(edge.get("/api/v1/status")["ingest"].is_object());
    assert!(
        sim.try_wait().unwrap().is_none(),
        "the simulator is held back"
    );
    assert_eq!(cloud_items(), held, "the full cloud took nothing");

    // Space comes back: both resume by themselves, same processes.
    std::fs::remove_file(edge_filler).unwrap();
    std::fs::remove_file(cloud_filler).unwrap();
    let status = sim.wait().unwrap();
    assert!(status.success(), "simulator finished: {status}");
    assert!(
        wait_until(Duration::from_secs(300), || {
            let s = sync(&edge);
            s["outbox"]["items"]["events"] == 0 && s["outbox"]["items"]["telemetry"] == 0
        }),
        "outbox drained: {}",
        sync(&edge)
    );
    let truth = super::read_json(&truth_path);
    super::assert_matches_truth(&edge, &truth);
    let (from, to) = (
        truth["start_ms"].as_i64().unwrap(),
        truth["end_ms"].as_i64().unwrap() + 1,
    );
    for m in truth["machines"].as_array().unwrap() {
        let id = super::machine_id(m);
        let on_edge = super::edge_contents(&edge, &id, from, to);
        let in_cloud = super::cloud_contents(&cloud, &id, from, to);
        assert!(
            on_edge == in_cloud,
            "{id}: contents differ\n{}",
            super::contents_diff(&on_edge, &in_cloud)
        );
    }
    let ledger = &cloud.get("/api/v1/edges")["edges"][0];
    assert_eq!(ledger["gap_items"], 0, "{ledger}");
    edge.stop();
    cloud.stop();
}

/// Store writes the edge could not make for lack of space.
fn refused_writes(base: &str) -> f64 {
    metric(
        base,
        "millrace_edge_store_write_errors_total",
        "{reason=\"no_space\"}",
    ) as f64
}

/// The power-cut layer itself: after a cut, synced data is all there and unsynced data is all
/// gone — appends, overwrites inside synced data, files never synced — while directory
/// operations are kept. (The edge tests below rely on exactly this.)
#[test]
fn the_power_cut_layer_keeps_synced_writes_and_drops_the_rest() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("disk"), dir.path().join("mnt"));
    let disk = PowerCut::mount(&backing, &mnt);
    std::fs::create_dir(mnt.join("d")).unwrap();
    let mut a = std::fs::File::create(mnt.join("d/a")).unwrap();
    a.write_all(b"durable ").unwrap();
    a.sync_data().unwrap();
    a.write_all(b"lost tail").unwrap();
    a.write_all_at(b"DURA", 0).unwrap(); // an overwrite of synced bytes, not synced
    let mut b = std::fs::File::create(mnt.join("b")).unwrap();
    b.write_all(b"never synced").unwrap();
    let mut c = std::fs::File::create(mnt.join("c.tmp")).unwrap();
    c.write_all(b"synced then renamed").unwrap();
    c.sync_all().unwrap();
    std::fs::rename(mnt.join("c.tmp"), mnt.join("c")).unwrap();
    // Seen through the mount before the cut: everything.
    assert_eq!(
        std::fs::read(mnt.join("d/a")).unwrap(),
        b"DURAble lost tail"
    );
    drop((a, b, c));
    let cut = disk.cut();
    assert_eq!(std::fs::read(backing.join("d/a")).unwrap(), b"durable ");
    assert_eq!(std::fs::read(backing.join("b")).unwrap(), b"");
    assert_eq!(
        std::fs::read(backing.join("c")).unwrap(),
        b"synced then renamed"
    );
    assert!(!backing.join("c.tmp").exists());
    assert_eq!(
        cut.files,
        vec![("b".into(), 12), ("d/a".into(), 9 + 4)],
        "{cut:?}"
    );
    assert_eq!(cut.bytes, 25);
    assert_eq!(cut.syncs, 2);
}

/// Starts an edge whose store lives on the power-cut layer at `mnt`.
fn edge_on(config: &std::path::Path, mnt: &std::path::Path, sync_writes: bool) -> EdgeProcess {
    let data = mnt.join("data");
    EdgeProcess::start_with_env(
        config,
        &[
            ("MILLRACE_EDGE_DATA_DIR", data.to_str().unwrap()),
            (
                "MILLRACE_EDGE_STORE__SYNC_WRITES",
                if sync_writes { "true" } else { "false" },
            ),
        ],
    )
}

/// With `store.sync_writes = true` (the default), the power goes three times while a simulated
/// factory publishes (QoS 1): each time the edge is killed and every write it had not synced is
/// dropped from its disk. The devices resend what was not acknowledged, and in the end the store
/// equals the simulator's ground truth: no acknowledged event was lost to a power cut.
#[test]
fn acknowledged_events_survive_power_cuts_with_synced_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("disk"), dir.path().join("mnt"));
    let port = millrace_tests::free_port();
    let config = edge_config(dir.path(), port);
    let mut disk = PowerCut::mount(&backing, &mnt);
    let mut edge = edge_on(&config, &mnt, true);
    let truth = dir.path().join("truth.json");
    let mut sim = super::paced_sim(&edge, "41", "2026-04-06T00:00:00Z", "1day", "60s", &truth);
    let mut cuts = Vec::new();
    for round in 0..3 {
        assert!(
            wait_until(Duration::from_secs(60), || {
                edge.get("/api/v1/status")["ingest"]["events"].as_u64() > Some(300)
            }),
            "devices came back to edge {round}"
        );
        kill_edge(edge);
        let cut = disk.cut();
        eprintln!(
            "power cut {round}: {} bytes lost in {:?}",
            cut.bytes, cut.files
        );
        cuts.push(cut);
        disk = PowerCut::mount(&backing, &mnt);
        edge = edge_on(&config, &mnt, true);
    }
    let status = sim.wait().unwrap();
    assert!(status.success(), "the simulator finished: {status}");
    super::assert_matches_truth(&edge, &super::read_json(&truth));
    for cut in &cuts {
        // Every cut took something (RocksDB's info log at least, which it never syncs), and the
        // edge did sync: the layer was in the path and the loss was real.
        assert!(cut.bytes > 0 && cut.syncs > 0, "{cut:?}");
    }
    edge.stop();
    drop(disk);
}

/// The control: with `store.sync_writes = false` the same power cut loses events the edge had
/// acknowledged — which is what the setting trades away, and shows the layer really drops what
/// was not synced.
#[test]
fn without_synced_writes_a_power_cut_loses_acknowledged_events() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, mnt) = (dir.path().join("disk"), dir.path().join("mnt"));
    let config = edge_config(dir.path(), millrace_tests::free_port());
    let disk = PowerCut::mount(&backing, &mnt);
    let edge = edge_on(&config, &mnt, false);
    let truth = dir.path().join("truth.json");
    let mut sim = super::paced_sim(&edge, "42", "2026-04-06T00:00:00Z", "1day", "60s", &truth);
    // Every event the edge holds, machine by machine.
    let stored = |e: &EdgeProcess| -> usize {
        e.get("/api/v1/machines")["machines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                e.get(&format!(
                    "/api/v1/events?machine={}&from=2026-04-05T00:00:00Z&to=2026-04-08T00:00:00Z&limit=100000",
                    m.as_str().unwrap()
                ))["events"]
                    .as_array()
                    .unwrap()
                    .len()
            })
            .sum()
    };
    assert!(wait_until(Duration::from_secs(60), || stored(&edge) > 300));
    // The devices stop first: what the edge holds now, it has acknowledged.
    sim.kill().unwrap();
    sim.wait().unwrap();
    let before = stored(&edge);
    kill_edge(edge);
    let cut = disk.cut();
    assert!(cut.bytes > 0, "{cut:?}");
    let disk = PowerCut::mount(&backing, &mnt);
    let edge = edge_on(&config, &mnt, false);
    let after = stored(&edge);
    eprintln!(
        "power cut without synced writes: {before} events stored before, {after} after; {} bytes lost in {:?}",
        cut.bytes, cut.files
    );
    assert!(
        after < before,
        "unsynced writes are lost to a power cut: {before} events stored before, {after} after ({cut:?})"
    );
    edge.stop();
    drop(disk);
}
