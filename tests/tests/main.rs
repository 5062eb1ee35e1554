//! End to end: the built binaries as real processes on loopback with temp dirs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use millrace_tests::{read_json, run_ok, wait_until};
use serde_json::Value;

mod dashboard;
mod faults;
mod object_storage;
mod sparkplug;

/// The directory holding the workspace's binaries (`target/debug`), next to this test's `deps/`.
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` (./millrace test does)",
        path.display()
    );
    path
}

const PASSWORD: &str = "e2e-device-password";

struct EdgeProcess {
    child: Child,
    mqtt_port: u16,
    http: String,
}

impl EdgeProcess {
    fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(bin("millrace-edge"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The edge prints the addresses it bound (port 0 in the config).
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let line = loop {
            let l = lines
                .next()
                .expect("edge exited before it started")
                .unwrap();
            if l.starts_with("millrace-edge: devices on") {
                break l;
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        let words: Vec<&str> = line.split_whitespace().collect();
        let mqtt = words[3].trim_end_matches(',').trim_start_matches("mqtt://");
        let http = words[6].to_owned();
        Self {
            child,
            mqtt_port: mqtt.rsplit(':').next().unwrap().parse().unwrap(),
            http,
        }
    }

    fn get(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.http);
        let out = Command::new("curl")
            .args(["-fsS", &url])
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "GET {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "edge exits cleanly on SIGTERM: {status}");
    }
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn password_hash() -> String {
    let mut c = Command::new(bin("millrace-edge"))
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    String::from_utf8(c.wait_with_output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned()
}

/// `millrace-sim run` against `edge` as the device user `sim` (password in the environment).
fn sim_run(edge: &EdgeProcess) -> Command {
    let mut c = Command::new(bin("millrace-sim"));
    c.args([
        "run",
        "--broker",
        &format!("mqtt://127.0.0.1:{}", edge.mqtt_port),
        "--username",
        "sim",
    ])
    .env("MILLRACE_MQTT_PASSWORD", PASSWORD);
    c
}

/// `millrace-sim run` with QoS 1, paced at an hour per second (so that faults happen while
/// devices still send), writing its ground truth to `truth`.
fn paced_sim(
    edge: &EdgeProcess,
    seed: &str,
    start: &str,
    duration: &str,
    telemetry_interval: &str,
    truth: &Path,
) -> Child {
    sim_run(edge)
        .args(["--qos", "1", "--seed", seed, "--start", start])
        .args([
            "--duration",
            duration,
            "--telemetry-interval",
            telemetry_interval,
        ])
        .args([
            "--speed",
            "3600",
            "--quiet",
            "--truth",
            truth.to_str().unwrap(),
        ])
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap()
}

/// Writes an edge config with the device `sim`, the MQTT port given (0 for any) and no retention.
fn edge_config(dir: &Path, mqtt_port: u16) -> PathBuf {
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[mqtt]\nlisten = \"127.0.0.1:{mqtt_port}\"\n[[mqtt.users]]\nusername = \"sim\"\npassword_hash = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[store.retention]\ntelemetry = \"0s\"\nevents = \"0s\"\n",
            dir.join("data").display(),
            password_hash()
        ),
    )
    .unwrap();
    config
}

/// Compares what the edge stored with the ground truth: parts per outcome and breakdowns per
/// machine, and every temperature point.
fn assert_matches_truth(edge: &EdgeProcess, truth: &Value) {
    let (from, to) = (
        truth["start_ms"].as_i64().unwrap(),
        truth["end_ms"].as_i64().unwrap(),
    );
    let mut temperature_points = 0;
    let mut per_machine = vec![];
    for m in truth["machines"].as_array().unwrap() {
        let id = machine_id(m);
        let parts = edge.get(&format!(
            "/api/v1/events?machine={id}&kind=part&from={from}&to={to}&limit=100000"
        ));
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for p in parts["events"].as_array().unwrap() {
            *counts
                .entry(p["body"]["outcome"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        let t = &m["totals"];
        for outcome in ["good", "scrap", "rework"] {
            assert_eq!(
                counts.get(outcome).copied().unwrap_or(0),
                t[outcome].as_u64().unwrap(),
                "{id} {outcome}"
            );
        }
        let states = edge.get(&format!(
            "/api/v1/events?machine={id}&kind=state&from={from}&to={to}&limit=100000"
        ));
        let failures = states["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["body"]["reason"] == "technical_failure")
            .count();
        assert_eq!(
            failures as u64,
            t["failures"].as_u64().unwrap(),
            "{id} breakdowns"
        );
        let pts = edge.get(&format!(
            "/api/v1/points?series={id}/temperature&from={from}&to={to}"
        ));
        let points = pts["points"].as_array().unwrap();
        temperature_points += points.len() as u64;
        // Where points are missing, if any: the count and the first gap between two points.
        let gap = points
            .windows(2)
            .map(|w| (w[0][0].as_i64().unwrap(), w[1][0].as_i64().unwrap()))
            .max_by_key(|(a, b)| b - a);
        per_machine.push(format!(
            "{id}: {} points, largest gap {gap:?}",
            points.len()
        ));
    }
    assert_eq!(
        temperature_points,
        truth["events"]["telemetry"].as_u64().unwrap(),
        "temperature points per machine:\n{}\nedge status: {}",
        per_machine.join("\n"),
        edge.get("/api/v1/status")
    );
}

#[test]
fn acknowledged_events_survive_kill_9_of_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed port, so that the simulator can reconnect to the restarted edge.
    let config = edge_config(dir.path(), millrace_tests::free_port());
    let edge = EdgeProcess::start(&config);
    // A function counting telemetry events in its key-value state: its count must come out
    // exact although the edge is killed while it runs (effects and cursor commit together).
    let counter = dir.path().join("counter.wat");
    std::fs::write(&counter, COUNTER).unwrap();
    run_ok(
        Command::new(bin("millrace-edge"))
            .args(["fn", "--url", &edge.http, "deploy", "counter"])
            .arg(&counter)
            .args(["--topic", "factory/+/+/+/telemetry", "--timeout", "30s"]),
    );
    let truth_path = dir.path().join("truth.json");
    let mut sim = sim_run(&edge)
        .args(["--qos", "1"])
        .args([
            "--seed",
            "9",
            "--start",
            "2026-01-05T00:00:00Z",
            "--duration",
            "2days",
            "--telemetry-interval",
            "10s",
            "--speed",
            "0",
            "--quiet",
        ])
        .args(["--truth", truth_path.to_str().unwrap()])
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    // Mid-stream: once the edge has stored some events, kill it without warning.
    assert!(wait_until(Duration::from_secs(60), || edge
        .get("/api/v1/status")["ingest"]["events"]
        .as_u64()
        > Some(20_000)));
    let mut edge = edge;
    edge.child.kill().unwrap();
    edge.child.wait().unwrap();
    drop(edge);
    // The simulator keeps publishing into a dead connection, reconnects and resends what was
    // not acknowledged.
    let edge = EdgeProcess::start(&config);
    let status = sim.wait().unwrap();
    assert!(status.success(), "simulator finished: {status}");
    // The simulator exits only when every event was acknowledged, and the edge acknowledges
    // only what it stored: compare the full contents with the truth at once.
    let truth = read_json(&truth_path);
    assert_matches_truth(&edge, &truth);
    // The function caught up and counted every telemetry event exactly once.
    let telemetry = truth["events"]["telemetry"].as_i64().unwrap();
    let count = || {
        let kv = edge.get("/api/v1/functions/counter/kv?prefix=n");
        kv["entries"][0]["value_base64"].as_str().map(|b| {
            use base64::Engine as _;
            let v = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
            i64::from_le_bytes(v.try_into().unwrap())
        })
    };
    assert!(
        wait_until(Duration::from_secs(300), || edge
            .get("/api/v1/functions/counter")["lag"]["events"]
            == 0),
        "{}",
        edge.get("/api/v1/functions/counter")
    );
    assert_eq!(count(), Some(telemetry));
    edge.stop();
}

/// Counts its invocations in the key `n` (little-endian i64).
const COUNTER: &str = r#"(module
  (import "millrace" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "n")
  (func (export "handle") (result i32)
    (i64.store (i32.const 8) (i64.const 0))
    (drop (call $kv_get (i32.const 0) (i32.const 1) (i32.const 8) (i32.const 8)))
    (i64.store (i32.const 8) (i64.add (i64.load (i32.const 8)) (i64.const 1)))
    (drop (call $kv_set (i32.const 0) (i32.const 1) (i32.const 8) (i32.const 8)))
    (i32.const 0)))"#;

#[test]
fn a_simulated_shift_flows_through_the_edge_and_matches_the_ground_truth() {
    let dir = tempfile::tempdir().unwrap();
    let config = edge_config(dir.path(), 0);
    let edge = EdgeProcess::start(&config);

    let (truth, report) = (
        dir.path().join("truth.json"),
        dir.path().join("report.json"),
    );
    run_ok(
        sim_run(&edge)
            .args([
                "--seed",
                "5",
                "--start",
                "2026-01-05T06:00:00Z",
                "--duration",
                "8h",
                "--telemetry-interval",
                "1m",
                "--speed",
                "0",
                "--quiet",
            ])
            .args([
                "--truth",
                truth.to_str().unwrap(),
                "--report",
                report.to_str().unwrap(),
            ])
            .env("RUST_LOG", "warn"),
    );
    let truth = read_json(&truth);
    let total = truth["total_events"].as_u64().unwrap();
    // Acknowledged means stored: the count is complete as soon as the simulator is done.
    assert_eq!(
        edge.get("/api/v1/status")["ingest"]["events"].as_u64(),
        Some(total)
    );
    assert_matches_truth(&edge, &truth);
    assert_eq!(
        edge.get("/api/v1/status")["ingest"]["dead_letters"].as_u64(),
        Some(0)
    );

    // A clean stop and a restart keep everything.
    edge.stop();
    let edge = EdgeProcess::start(&config);
    assert_matches_truth(&edge, &truth);
    edge.stop();
}

/// `site/line/machine` of a machine in the ground truth.
fn machine_id(m: &Value) -> String {
    format!(
        "{}/{}/{}",
        m["site"].as_str().unwrap(),
        m["line"].as_str().unwrap(),
        m["machine"].as_str().unwrap()
    )
}

/// Whether the edge's outbox is empty (everything acknowledged by the cloud).
fn outbox_drained(edge: &EdgeProcess) -> bool {
    let o = &edge.get("/api/v1/sync")["outbox"]["items"];
    o["events"] == 0 && o["telemetry"] == 0 && o["alerts"] == 0
}

/// `millrace-cloud` as a process on a fixed loopback port (so that it can be restarted there).
struct CloudProcess {
    child: Child,
    http: String,
}

impl CloudProcess {
    fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(bin("millrace-cloud"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let line = loop {
            let l = lines
                .next()
                .expect("cloud exited before it started")
                .unwrap();
            if l.starts_with("millrace-cloud: API on") {
                break l;
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            child,
            http: line.rsplit(' ').next().unwrap().to_owned(),
        }
    }

    /// `PUT /api/v1/master/machines`: machines with their ideal cycle times, as the demo sets them.
    fn put_machines(&self, specs: &Value) {
        run_ok(
            Command::new("curl")
                .args(["-fsS", "-X", "PUT", "-H", "content-type: application/json"])
                .arg("--data-binary")
                .arg(specs.to_string())
                .arg(format!("{}/api/v1/master/machines", self.http)),
        );
    }

    fn get(&self, path: &str) -> Value {
        get_json(&format!("{}{path}", self.http))
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "cloud exits cleanly on SIGTERM: {status}");
    }
}

impl Drop for CloudProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn get_json(url: &str) -> Value {
    let out = Command::new("curl")
        .args(["-fsS", url])
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "GET {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A token for edge `id` from `millrace-cloud edge-token`: (token, its SHA-256).
fn edge_token(id: &str) -> (String, String) {
    let out = Command::new(bin("millrace-cloud"))
        .args(["edge-token", id])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("MILLRACE_EDGE_SYNC__TOKEN="))
        .unwrap()
        .to_owned();
    let digest = text
        .lines()
        .find_map(|l| l.strip_prefix("token_sha256 = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    (token, digest)
}

/// A cloud config on `port` that accepts edge `edge` with `digest`.
fn cloud_config(dir: &Path, port: u16, edge: &str, digest: &str) -> PathBuf {
    let config = dir.join("cloud.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n[edges.{edge}]\ntoken_sha256 = \"{digest}\"\n",
            dir.join("cloud-data").display()
        ),
    )
    .unwrap();
    config
}

/// Adds a `[sync]` section to an edge config.
fn with_sync(config: &Path, cloud_url: &str, extra: &str) {
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str(&format!(
        "[sync]\nenabled = true\ncloud_url = \"{cloud_url}\"\nbatch_max_items = 2000\nlinger = \"20ms\"\nretry_initial = \"20ms\"\nretry_max = \"300ms\"\nrequest_timeout = \"5s\"\n{extra}"
    ));
    std::fs::write(config, text).unwrap();
}

/// Everything one machine has in a store, in a form both sides can be compared in: events as
/// (ts, device seq, kind, detail) and points per metric as (ts, value bits).
#[derive(Debug, PartialEq, Default)]
struct MachineContents {
    events: Vec<(i64, u64, String, String)>,
    points: BTreeMap<String, Vec<(i64, u64)>>,
}

fn event_detail(kind: &str, fields: [&Value; 6]) -> String {
    let s = |v: &Value| match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!(
        "{kind}|{}",
        fields.iter().map(|v| s(v)).collect::<Vec<_>>().join("|")
    )
}

fn edge_contents(edge: &EdgeProcess, machine: &str, from: i64, to: i64) -> MachineContents {
    let mut c = MachineContents::default();
    let evs = edge.get(&format!(
        "/api/v1/events?machine={machine}&from={from}&to={to}&limit=100000"
    ));
    for e in evs["events"].as_array().unwrap() {
        let b = &e["body"];
        let kind = b["kind"].as_str().unwrap();
        let detail = event_detail(
            kind,
            [
                &b["state"],
                &b["reason"],
                &b["outcome"],
                &b["cycle_time_ms"],
                &b["part_id"],
                &b["operator"],
            ],
        );
        c.events.push((
            e["ts_ms"].as_i64().unwrap(),
            e["seq"].as_u64().unwrap(),
            kind.to_owned(),
            detail,
        ));
    }
    c.events.sort();
    for s in edge.get("/api/v1/series")["series"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let Some(metric) = name.strip_prefix(&format!("{machine}/")) else {
            continue;
        };
        let pts = edge.get(&format!("/api/v1/points?series={name}&from={from}&to={to}"));
        let v: Vec<(i64, u64)> = pts["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap().to_bits()))
            .collect();
        c.points.insert(metric.to_owned(), v);
    }
    c
}

/// What differs between the edge's and the cloud's contents, briefly (the first few rows).
fn contents_diff(edge: &MachineContents, cloud: &MachineContents) -> String {
    fn only<T: Eq + std::hash::Hash + std::fmt::Debug>(a: &[T], b: &[T]) -> String {
        let b: std::collections::HashSet<&T> = b.iter().collect();
        let rows: Vec<&T> = a.iter().filter(|x| !b.contains(x)).collect();
        format!(
            "{} rows, first: {:?}",
            rows.len(),
            &rows[..rows.len().min(5)]
        )
    }
    let mut out = format!(
        "events: edge {} cloud {}; only on the edge: {}; only in the cloud: {}\n",
        edge.events.len(),
        cloud.events.len(),
        only(&edge.events, &cloud.events),
        only(&cloud.events, &edge.events)
    );
    let empty = vec![];
    for m in edge.points.keys().chain(cloud.points.keys()) {
        let (a, b) = (
            edge.points.get(m).unwrap_or(&empty),
            cloud.points.get(m).unwrap_or(&empty),
        );
        if a != b {
            out += &format!(
                "{m}: edge {} points, cloud {}; only on the edge: {}; only in the cloud: {}\n",
                a.len(),
                b.len(),
                only(a, b),
                only(b, a)
            );
        }
    }
    out
}

fn cloud_contents(cloud: &CloudProcess, machine: &str, from: i64, to: i64) -> MachineContents {
    let mut c = MachineContents::default();
    let evs = cloud.get(&format!(
        "/api/v1/events?machine={machine}&from={from}&to={to}"
    ));
    for e in evs["events"].as_array().unwrap() {
        let kind = e["kind"].as_str().unwrap();
        // The edge keeps operator events' action in `action`, too; compare the same fields.
        let detail = event_detail(
            kind,
            [
                &e["state"],
                &e["reason"],
                &e["outcome"],
                &e["cycle_time_ms"],
                &e["part_id"],
                &e["operator"],
            ],
        );
        c.events.push((
            e["ts"].as_i64().unwrap(),
            e["device_seq"].as_u64().unwrap(),
            kind.to_owned(),
            detail,
        ));
    }
    c.events.sort();
    let pts = cloud.get(&format!(
        "/api/v1/telemetry?machine={machine}&from={from}&to={to}"
    ));
    for p in pts["points"].as_array().unwrap() {
        c.points
            .entry(p["metric"].as_str().unwrap().to_owned())
            .or_default()
            .push((
                p["ts"].as_i64().unwrap(),
                p["value"].as_f64().unwrap().to_bits(),
            ));
    }
    for v in c.points.values_mut() {
        v.sort();
    }
    c
}

#[test]
fn sync_delivers_exactly_once_across_lost_acks_cloud_restart_partition_and_edge_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (token, digest) = edge_token("e2e");
    let cloud_config = cloud_config(dir.path(), millrace_tests::free_port(), "e2e", &digest);
    let mut cloud = CloudProcess::start(&cloud_config);
    let upstream = cloud.http.trim_start_matches("http://").parse().unwrap();
    let proxy = millrace_tests::FaultProxy::start(upstream);
    let config = edge_config(dir.path(), millrace_tests::free_port());
    with_sync(&config, &proxy.url(), "");
    let env = [
        ("MILLRACE_EDGE_EDGE_ID", "e2e"),
        ("MILLRACE_EDGE_SYNC__TOKEN", token.as_str()),
    ];
    let mut edge = EdgeProcess::start_with_env(&config, &env);
    let truth_path = dir.path().join("truth.json");
    let mut sim = paced_sim(
        &edge,
        "11",
        "2026-02-02T00:00:00Z",
        "2days",
        "10s",
        &truth_path,
    );
    let cloud_items = |c: &CloudProcess| {
        c.get("/api/v1/edges")["edges"]
            .as_array()
            .and_then(|a| a.first().map(|e| e["items"].as_u64().unwrap()))
            .unwrap_or(0)
    };
    let sync = |e: &EdgeProcess| e.get("/api/v1/sync");
    let failures = |e: &EdgeProcess| sync(e)["sent"]["failures"].as_u64().unwrap();
    let timeout = Duration::from_secs(120);

    // 1. Lost acknowledgements: the cloud stores, the edge never hears it and sends again.
    assert!(wait_until(timeout, || cloud_items(&cloud) > 0));
    proxy.set(millrace_tests::Fault::LoseReplies);
    assert!(wait_until(timeout, || proxy
        .lost_replies
        .load(std::sync::atomic::Ordering::Relaxed)
        >= 3));
    proxy.set(millrace_tests::Fault::Pass);

    // 2. The cloud stops mid-sync and comes back.
    let before = failures(&edge);
    cloud.stop();
    assert!(wait_until(timeout, || failures(&edge) > before));
    cloud = CloudProcess::start(&cloud_config);

    // 3. A partition: the link is cut, then stalls; meanwhile the edge is killed (SIGKILL) with
    //    data waiting in its outbox, and restarted.
    proxy.set(millrace_tests::Fault::Cut);
    let held = cloud_items(&cloud);
    assert!(wait_until(timeout, || {
        let o = &sync(&edge)["outbox"]["items"];
        o["events"].as_u64().unwrap() + o["telemetry"].as_u64().unwrap() > 1000
    }));
    edge.child.kill().unwrap();
    edge.child.wait().unwrap();
    drop(edge);
    let edge = EdgeProcess::start_with_env(&config, &env);
    proxy.set(millrace_tests::Fault::Stall);
    let before = failures(&edge);
    assert!(wait_until(timeout, || failures(&edge) > before));
    proxy.set(millrace_tests::Fault::Pass);
    assert!(wait_until(timeout, || cloud_items(&cloud) > held));

    // The simulator exits once the edge acknowledged (stored) everything; then the outbox drains.
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

    // Every outbox sequence number the edge ever gave out is held once, with no gap.
    let s = sync(&edge);
    let last_seq = s["outbox"]["next_seq"].as_u64().unwrap() - 1;
    assert_eq!(s["outbox"]["dropped"]["telemetry"], 0);
    let ledger = &cloud.get("/api/v1/edges?ranges=true")["edges"][0];
    assert_eq!(
        ledger["received"],
        serde_json::json!([[1, last_seq]]),
        "{ledger}"
    );
    assert_eq!(ledger["items"].as_u64(), Some(last_seq));
    assert_eq!(ledger["gap_items"], 0);
    assert!(
        s["sent"]["duplicates"].as_u64().unwrap() > 0,
        "lost acknowledgements made the edge re-send: {s}"
    );

    // Full contents, machine by machine: the cloud holds exactly what the edge stored.
    let truth = read_json(&truth_path);
    let (from, to) = (
        truth["start_ms"].as_i64().unwrap(),
        truth["end_ms"].as_i64().unwrap() + 1,
    );
    let mut events = 0;
    let mut points = 0;
    for m in truth["machines"].as_array().unwrap() {
        let id = machine_id(m);
        let on_edge = edge_contents(&edge, &id, from, to);
        let in_cloud = cloud_contents(&cloud, &id, from, to);
        assert!(
            !on_edge.events.is_empty() && !on_edge.points.is_empty(),
            "{id}"
        );
        assert!(
            on_edge == in_cloud,
            "{id}: contents differ\n{}",
            contents_diff(&on_edge, &in_cloud)
        );
        events += on_edge.events.len();
        points += on_edge.points.values().map(Vec::len).sum::<usize>();
    }
    // And what the edge stored is what the devices sent (the ground truth).
    assert_eq!(
        events as u64 + truth["events"]["telemetry"].as_u64().unwrap(),
        truth["total_events"].as_u64().unwrap()
    );
    assert!(points > 0);
    edge.stop();
    cloud.stop();
}

/// Raises a critical alert for every scrapped part.
const SCRAP_ALERT: &str = r#"(module
  (import "millrace" "event_string" (func $string (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "alert" (func $alert (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "outcome")
  (data (i32.const 16) "scrap")
  (data (i32.const 32) "part scrapped")
  (func (export "handle") (result i32)
    (local $n i32)
    (local.set $n (call $string (i32.const 0) (i32.const 7) (i32.const 128) (i32.const 16)))
    (if (i32.and (i32.eq (local.get $n) (i32.const 5))
          (i32.and (i32.eq (i32.load (i32.const 128)) (i32.load (i32.const 16)))
                   (i32.eq (i32.load8_u (i32.const 132)) (i32.load8_u (i32.const 20)))))
      (then (drop (call $alert (i32.const 2) (i32.const 32) (i32.const 13)))))
    (i32.const 0)))"#;

/// (machine, event ts) of every row, sorted: what alerts are about, or which scrap parts.
fn by_machine_and_ts(rows: &[&Value], ts: &str) -> Vec<(String, i64)> {
    let mut v: Vec<(String, i64)> = rows
        .iter()
        .map(|r| {
            (
                format!(
                    "{}/{}/{}",
                    r["site"].as_str().unwrap(),
                    r["line"].as_str().unwrap(),
                    r["machine"].as_str().unwrap()
                ),
                r[ts].as_i64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn alerts_reach_the_cloud_once_each_across_kill_9_of_edge_and_cloud_and_replays_come_as_backfill() {
    let dir = tempfile::tempdir().unwrap();
    let (token, digest) = edge_token("e2e");
    let cloud_config = cloud_config(dir.path(), millrace_tests::free_port(), "e2e", &digest);
    let mut cloud = CloudProcess::start(&cloud_config);
    let config = edge_config(dir.path(), millrace_tests::free_port());
    with_sync(&config, &cloud.http, "");
    let env = [
        ("MILLRACE_EDGE_EDGE_ID", "e2e"),
        ("MILLRACE_EDGE_SYNC__TOKEN", token.as_str()),
    ];
    let mut edge = EdgeProcess::start_with_env(&config, &env);
    let wat = dir.path().join("scrap_alert.wat");
    std::fs::write(&wat, SCRAP_ALERT).unwrap();
    run_ok(
        Command::new(bin("millrace-edge"))
            .args(["fn", "--url", &edge.http, "deploy", "scrap-alert"])
            .arg(&wat)
            .args(["--topic", "factory/+/+/+/part"]),
    );
    let truth_path = dir.path().join("truth.json");
    let mut sim = paced_sim(
        &edge,
        "5",
        "2026-03-02T00:00:00Z",
        "1day",
        "30s",
        &truth_path,
    );
    let alerts = |c: &CloudProcess| {
        c.get("/api/v1/alerts?function=scrap-alert&limit=1000000")["alerts"]
            .as_array()
            .unwrap()
            .clone()
    };
    let timeout = Duration::from_secs(120);

    // kill -9 of the edge once alerts flow, then of the cloud.
    assert!(wait_until(timeout, || !alerts(&cloud).is_empty()));
    edge.child.kill().unwrap();
    edge.child.wait().unwrap();
    drop(edge);
    let edge = EdgeProcess::start_with_env(&config, &env);
    let held = alerts(&cloud).len();
    assert!(wait_until(timeout, || alerts(&cloud).len() > held));
    cloud.child.kill().unwrap();
    cloud.child.wait().unwrap();
    drop(cloud);
    cloud = CloudProcess::start(&cloud_config);

    let status = sim.wait().unwrap();
    assert!(status.success(), "simulator finished: {status}");
    let settled = |edge: &EdgeProcess| {
        edge.get("/api/v1/functions/scrap-alert")["lag"]["events"] == 0 && outbox_drained(edge)
    };
    assert!(
        wait_until(Duration::from_secs(300), || settled(&edge)),
        "{} {}",
        edge.get("/api/v1/functions/scrap-alert"),
        edge.get("/api/v1/sync")
    );

    // One alert per scrapped part, per machine and event time: none lost, none doubled.
    let truth = read_json(&truth_path);
    let (from, to) = (
        truth["start_ms"].as_i64().unwrap(),
        truth["end_ms"].as_i64().unwrap() + 1,
    );
    let parts = cloud.get(&format!(
        "/api/v1/events?kind=part&from={from}&to={to}&limit=1000000"
    ));
    let parts = parts["events"].as_array().unwrap();
    let scrap: Vec<&Value> = parts.iter().filter(|p| p["outcome"] == "scrap").collect();
    assert!(scrap.len() >= 10, "{} scrapped parts", scrap.len());
    let live = alerts(&cloud);
    let live: Vec<&Value> = live.iter().collect();
    assert_eq!(
        by_machine_and_ts(&live, "event_ts"),
        by_machine_and_ts(&scrap, "ts"),
        "alerts in the cloud are the scrapped parts"
    );
    let ids: std::collections::BTreeSet<&str> =
        live.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), live.len(), "ids are unique");
    assert!(live.iter().all(|a| a["severity"] == "critical"
        && a["message"] == "part scrapped"
        && a["trigger"] == "topic"
        && a["backfill"] == false
        && a["edge"] == "e2e"));
    // The edge's ledger: every outbox seq once, events and alerts alike.
    let s = edge.get("/api/v1/sync");
    let last_seq = s["outbox"]["next_seq"].as_u64().unwrap() - 1;
    let ledger = &cloud.get("/api/v1/edges?ranges=true")["edges"][0];
    assert_eq!(
        ledger["received"],
        serde_json::json!([[1, last_seq]]),
        "{ledger}"
    );

    // A replay over the day raises them again, as backfill.
    run_ok(
        Command::new(bin("millrace-edge"))
            .args(["fn", "--url", &edge.http, "replay", "scrap-alert"])
            .args(["--from", &from.to_string(), "--to", &to.to_string()]),
    );
    assert!(wait_until(timeout, || outbox_drained(&edge)));
    let all = alerts(&cloud);
    let replayed: Vec<&Value> = all.iter().filter(|a| a["trigger"] == "replay").collect();
    assert!(replayed.iter().all(|a| a["backfill"] == true));
    assert_eq!(
        by_machine_and_ts(&replayed, "event_ts"),
        by_machine_and_ts(&scrap, "ts")
    );
    assert_eq!(all.len(), 2 * scrap.len());

    // The function's figures reach the cloud's edge view and metrics.
    assert!(
        wait_until(timeout, || {
            let f = &cloud.get("/api/v1/edges")["edges"][0]["functions"][0];
            f["name"] == "scrap-alert"
                && f["lag_events"] == 0
                && f["invocations"].as_u64() > Some(0)
        }),
        "{}",
        cloud.get("/api/v1/edges")
    );
    let metrics = Command::new("curl")
        .args(["-fsS", &format!("{}/metrics", cloud.http)])
        .output()
        .unwrap();
    let metrics = String::from_utf8(metrics.stdout).unwrap();
    assert!(
        metrics.contains(
            "millrace_cloud_edge_function_invocations{edge=\"e2e\",function=\"scrap-alert\"}"
        ),
        "{metrics}"
    );
    edge.stop();
    cloud.stop();
}

#[test]
fn history_pushed_by_the_simulator_is_stored_once_and_a_wrong_token_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (token, digest) = edge_token("sim");
    let cloud = CloudProcess::start(&cloud_config(dir.path(), 0, "sim", &digest));
    let (truth, report) = (dir.path().join("truth.json"), dir.path().join("push.json"));
    let push = |token: &str| {
        let mut c = Command::new(bin("millrace-sim"));
        c.args([
            "push",
            "--cloud",
            &cloud.http,
            "--edge",
            "sim",
            "--seed",
            "3",
        ])
        .args(["--start", "2026-01-05T00:00:00Z", "--duration", "8h"])
        .args(["--telemetry-interval", "1m", "--batch-items", "5000"])
        .args(["--truth", truth.to_str().unwrap()])
        .args(["--report", report.to_str().unwrap()])
        .env("MILLRACE_EDGE_TOKEN", token)
        .env("RUST_LOG", "warn");
        c
    };
    let edges = |c: &CloudProcess| c.get("/api/v1/edges")["edges"].clone();

    // A wrong token: refused at once with the cloud's 401, nothing stored.
    let out = push("mrt_not-the-token-of-this-edge-0123456789")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401"), "{err}");
    assert_eq!(edges(&cloud).as_array().map(Vec::len), Some(0));

    // The right token: every event stored, one range, no gaps.
    run_ok(&mut push(&token));
    let total = read_json(&truth)["total_events"].as_u64().unwrap();
    let r = read_json(&report);
    assert_eq!(
        (r["items"].as_u64(), r["stored"].as_u64()),
        (Some(total), Some(total))
    );
    let ledger = &edges(&cloud)[0];
    assert_eq!(ledger["items"].as_u64(), Some(total), "{ledger}");
    assert_eq!(ledger["gap_items"], 0, "{ledger}");

    // Pushed again: the cloud recognises every item and stores nothing twice.
    run_ok(&mut push(&token));
    let r = read_json(&report);
    assert_eq!(
        (r["stored"].as_u64(), r["duplicates"].as_u64()),
        (Some(0), Some(total))
    );
    assert_eq!(edges(&cloud)[0]["items"].as_u64(), Some(total));
    cloud.stop();
}

#[test]
fn offline_the_outbox_keeps_to_its_quota_by_dropping_the_oldest_telemetry_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (token, digest) = edge_token("quota");
    let cloud_config = cloud_config(dir.path(), millrace_tests::free_port(), "quota", &digest);
    let port: u16 = std::fs::read_to_string(&cloud_config)
        .unwrap()
        .split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The uplink is down from the start.
    let proxy = millrace_tests::FaultProxy::start(([127, 0, 0, 1], port).into());
    proxy.set(millrace_tests::Fault::Cut);
    let config = edge_config(dir.path(), 0);
    with_sync(&config, &proxy.url(), "outbox_quota_bytes = 1048576\n");
    let env = [
        ("MILLRACE_EDGE_EDGE_ID", "quota"),
        ("MILLRACE_EDGE_SYNC__TOKEN", token.as_str()),
    ];
    let edge = EdgeProcess::start_with_env(&config, &env);
    let truth_path = dir.path().join("truth.json");
    run_ok(
        sim_run(&edge)
            .args([
                "--seed",
                "3",
                "--start",
                "2026-03-02T06:00:00Z",
                "--duration",
                "4h",
            ])
            .args(["--telemetry-interval", "2s", "--speed", "0", "--quiet"])
            .args(["--truth", truth_path.to_str().unwrap()])
            .env("RUST_LOG", "error"),
    );
    let s = edge.get("/api/v1/sync");
    let o = &s["outbox"];
    let dropped = o["dropped"]["telemetry"].as_u64().unwrap();
    assert!(dropped > 0, "the quota was exceeded: {s}");
    assert_eq!(
        o["dropped"]["events"], 0,
        "state and part events are kept longest: {s}"
    );
    let bytes = o["bytes"]["events"].as_u64().unwrap() + o["bytes"]["telemetry"].as_u64().unwrap();
    assert!(bytes <= 1 << 20, "outbox within its quota: {s}");
    let metrics = Command::new("curl")
        .args(["-fsS", &format!("{}/metrics", edge.http)])
        .output()
        .unwrap();
    let metrics = String::from_utf8(metrics.stdout).unwrap();
    assert!(
        metrics.contains(&format!(
            "millrace_edge_outbox_dropped_total{{lane=\"telemetry\"}} {dropped}"
        )),
        "dropped items are counted in metrics"
    );

    // The uplink returns: everything not dropped arrives, and the cloud knows what was dropped.
    let cloud = CloudProcess::start(&cloud_config);
    proxy.set(millrace_tests::Fault::Pass);
    assert!(wait_until(Duration::from_secs(300), || outbox_drained(
        &edge
    )));
    let last_seq = edge.get("/api/v1/sync")["outbox"]["next_seq"]
        .as_u64()
        .unwrap()
        - 1;
    let ledger = &cloud.get("/api/v1/edges")["edges"][0];
    assert_eq!(
        ledger["items"].as_u64(),
        Some(last_seq - dropped),
        "{ledger}"
    );
    assert_eq!(ledger["dropped_items"].as_u64(), Some(dropped), "{ledger}");
    assert_eq!(ledger["gap_items"], 0, "{ledger}");

    let truth = read_json(&truth_path);
    let (from, to) = (
        truth["start_ms"].as_i64().unwrap(),
        truth["end_ms"].as_i64().unwrap() + 1,
    );
    let mut cloud_points = 0;
    let mut edge_points = 0;
    for m in truth["machines"].as_array().unwrap() {
        let id = machine_id(m);
        let on_edge = edge_contents(&edge, &id, from, to);
        let in_cloud = cloud_contents(&cloud, &id, from, to);
        assert_eq!(on_edge.events, in_cloud.events, "{id}: every event arrives");
        for (metric, pts) in &on_edge.points {
            let got = in_cloud.points.get(metric).cloned().unwrap_or_default();
            // The oldest were dropped: what arrived is the newest part of the series.
            assert_eq!(
                got[..],
                pts[pts.len() - got.len()..],
                "{id}/{metric}: the newest points arrive"
            );
            cloud_points += got.len();
            edge_points += pts.len();
        }
    }
    assert!(cloud_points > 0 && cloud_points < edge_points);
    edge.stop();
    cloud.stop();
}

/// Compares one report row with the ground truth's KPIs: counts exactly, times and ratios
/// within 0.5 %.
fn assert_kpis_match(what: &str, got: &Value, want: &Value) {
    for k in ["good", "scrap", "rework", "total", "failures"] {
        assert_eq!(got[k], want[k], "{what}: {k}");
    }
    let close = |k: &str, g: &Value, w: &Value| {
        let (g, w) = (g.as_f64(), w.as_f64());
        match (g, w) {
            (Some(g), Some(w)) => assert!(
                (g - w).abs() <= 0.005 * w.abs().max(1e-9),
                "{what}: {k} = {g}, truth {w}"
            ),
            (g, w) => assert_eq!(g.is_some(), w.is_some(), "{what}: {k} {g:?} vs {w:?}"),
        }
    };
    for k in [
        "planned_production_ms",
        "availability",
        "performance",
        "quality",
        "oee",
        "mtbf_ms",
        "mttr_ms",
    ] {
        close(k, &got[k], &want[k]);
    }
    for k in [
        "running_ms",
        "idle_ms",
        "down_ms",
        "changeover_ms",
        "planned_stop_ms",
    ] {
        close(k, &got["times"][k], &want["times"][k]);
    }
}

#[test]
fn cloud_reports_of_a_simulated_factory_equal_the_ground_truth() {
    let dir = tempfile::tempdir().unwrap();
    let sim_args = [
        "--seed",
        "21",
        "--start",
        "2026-04-06T00:00:00Z",
        "--duration",
        "2days",
        "--telemetry-interval",
        "1m",
    ];
    // The ground truth first (deterministic), for the machines' ideal cycle times.
    let truth_path = dir.path().join("truth.json");
    run_ok(
        Command::new(bin("millrace-sim"))
            .arg("truth")
            .args(sim_args)
            .args(["--out", truth_path.to_str().unwrap()]),
    );
    let truth = read_json(&truth_path);
    let (token, digest) = edge_token("reports");
    let cloud_config = cloud_config(dir.path(), 0, "reports", &digest);
    let mut text = std::fs::read_to_string(&cloud_config).unwrap();
    for m in truth["machines"].as_array().unwrap() {
        text.push_str(&format!(
            "[[master.machines]]\nsite = {}\nline = {}\nmachine = {}\nideal_cycle_time_ms = {}\n",
            m["site"], m["line"], m["machine"], m["ideal_cycle_time_ms"]
        ));
    }
    std::fs::write(&cloud_config, text).unwrap();
    let cloud = CloudProcess::start(&cloud_config);
    let config = edge_config(dir.path(), 0);
    with_sync(&config, &cloud.http, "");
    let env = [
        ("MILLRACE_EDGE_EDGE_ID", "reports"),
        ("MILLRACE_EDGE_SYNC__TOKEN", token.as_str()),
    ];
    let edge = EdgeProcess::start_with_env(&config, &env);
    // The example threshold alert, deployed with the CLI as a user would. It reads its
    // triggers from the edge's log: it may fall behind the simulator at full speed, never drop.
    let wat = manifest_dir().join("../edge/functions/threshold_alert.wat");
    run_ok(
        Command::new(bin("millrace-edge"))
            .args(["fn", "--url", &edge.http, "deploy", "threshold-alert"])
            .arg(&wat)
            .args(["--topic", "factory/+/+/+/telemetry"])
            // Far above what it needs: tests run in parallel on a loaded machine.
            .args(["--timeout", "30s"]),
    );
    publish_and_sync(&edge, &sim_args);
    let (from, to) = (
        truth["start_ms"].as_i64().unwrap(),
        truth["end_ms"].as_i64().unwrap(),
    );
    let report = |q: &str| {
        cloud.get(&format!("/api/v1/reports/oee?from={from}&to={to}&{q}"))["rows"].clone()
    };

    // The function ran once per telemetry event (in batches: it exports `handle_batch`), and
    // raised an alert for exactly the temperature readings above 72 degC that the cloud holds
    // (the simulator's machines heat up before they break down).
    let telemetry_events = truth["events"]["telemetry"].as_u64().unwrap();
    assert!(
        wait_until(Duration::from_secs(300), || {
            let f = &edge.get("/api/v1/functions")["functions"][0];
            f["stats"]["events"].as_u64() == Some(telemetry_events) && f["lag"]["events"] == 0
        }),
        "{}",
        edge.get("/api/v1/functions")
    );
    let f = &edge.get("/api/v1/functions")["functions"][0]["stats"];
    assert_eq!(
        (f["failures"].as_u64(), f["dropped"].as_u64()),
        (Some(0), Some(0)),
        "{f}"
    );
    let mut hot: Vec<(String, i64)> = cloud.get(&format!(
        "/api/v1/telemetry?from={from}&to={}&metric=temperature",
        to + 1
    ))["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["value"].as_f64().unwrap() > 72.0)
        .map(|p| {
            (
                format!(
                    "{}/{}/{}",
                    p["site"].as_str().unwrap(),
                    p["line"].as_str().unwrap(),
                    p["machine"].as_str().unwrap()
                ),
                p["ts"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut alerted: Vec<(String, i64)> = edge.get("/api/v1/alerts?limit=100000")["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            assert_eq!(a["function"], "threshold-alert");
            assert_eq!(a["severity"], "critical");
            (
                a["device"].as_str().unwrap().to_owned(),
                a["event_ts_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    hot.sort();
    alerted.sort();
    assert!(
        !hot.is_empty(),
        "the simulated days hold temperatures above 72 degC"
    );
    assert_eq!(alerted, hot, "alerts = telemetry points above 72 degC");

    // Per machine and shift.
    let rows = report("level=machine&period=shift");
    let mut compared = 0;
    for m in truth["machines"].as_array().unwrap() {
        let id = machine_id(m);
        for s in m["shifts"].as_array().unwrap() {
            let row = rows
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["entity"] == id.as_str() && r["period"] == s["shift"])
                .unwrap_or_else(|| panic!("{id} {}: no row", s["shift"]));
            assert_kpis_match(&format!("{id} {}", s["shift"]), row, s);
            compared += 1;
        }
    }
    assert!(compared >= 12 * 4, "{compared} machine-shifts compared");
    // Per line and shift, per site and day: roll-ups sum, then divide.
    let rows = report("level=line&period=shift");
    for l in truth["lines"].as_array().unwrap() {
        let id = format!(
            "{}/{}",
            l["site"].as_str().unwrap(),
            l["line"].as_str().unwrap()
        );
        for s in l["shifts"].as_array().unwrap() {
            let row = rows
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["entity"] == id.as_str() && r["period"] == s["shift"])
                .unwrap();
            assert_kpis_match(&format!("{id} {}", s["shift"]), row, s);
        }
    }
    let rows = report("level=site&period=day");
    for site in truth["sites"].as_array().unwrap() {
        for d in site["days"].as_array().unwrap() {
            let row = rows
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["entity"] == site["site"] && r["period"] == d["date"])
                .unwrap();
            assert_kpis_match(&format!("{} {}", site["site"], d["date"]), row, d);
        }
    }
    // Production per day equals the truth's part counts per machine.
    let prod = cloud.get(&format!(
        "/api/v1/reports/production?from={from}&to={to}&level=machine&window=1d"
    ));
    let total: i64 = prod["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["total"].as_i64().unwrap())
        .sum();
    assert_eq!(total as u64, truth["events"]["part"].as_u64().unwrap());
    // Downtime: MTBF and MTTR per machine over the whole range.
    let down = cloud.get(&format!(
        "/api/v1/reports/downtime?from={from}&to={to}&level=machine"
    ));
    for m in truth["machines"].as_array().unwrap() {
        let id = machine_id(m);
        let row = down["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["entity"] == id.as_str())
            .unwrap();
        assert_eq!(row["failures"], m["totals"]["failures"], "{id}");
        let reasons: u64 = row["by_reason"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["ms"].as_u64().unwrap())
            .sum();
        let want: u64 = m["totals"]["stop_time_by_reason"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert!(
            (reasons as f64 - want as f64).abs() <= 0.005 * want as f64,
            "{id}: {reasons} vs {want}"
        );
    }
    // Telemetry aggregates: every point counted.
    let tel = cloud.get(&format!(
        "/api/v1/reports/telemetry?from={from}&to={to}&metric=temperature&window=1d"
    ));
    let n: i64 = tel["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_i64().unwrap())
        .sum();
    assert_eq!(n as u64, truth["events"]["telemetry"].as_u64().unwrap());

    // Readers no one here wrote (delta-rs and DuckDB's delta extension) read the cloud's Delta
    // tables directly, while the cloud runs: the same parts per machine and outcome as the
    // truth (which the reports above equal), every temperature reading, and the same rows.
    let out = run_ok(
        Command::new(millrace_tests::python())
            .arg(manifest_dir().join("python/delta_readers.py"))
            .arg(dir.path().join("cloud-data")),
    );
    let readers: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(readers["deltalake"], readers["duckdb"], "{readers}");
    assert_reader_counts(&readers, "duckdb", &[&truth]);
    edge.stop();
    cloud.stop();
}

/// What an outside reader (`tests/python/delta_readers.py`, reader `name`) counted equals the
/// ground truths: parts per machine and outcome, and every temperature reading.
fn assert_reader_counts(readers: &Value, name: &str, truths: &[&Value]) {
    let read = &readers[name];
    for truth in truths {
        for m in truth["machines"].as_array().unwrap() {
            let id = machine_id(m);
            for outcome in ["good", "scrap", "rework"] {
                assert_eq!(
                    read["parts"][&id][outcome].as_u64().unwrap_or(0),
                    m["totals"][outcome].as_u64().unwrap(),
                    "{id} {outcome}: {readers}"
                );
            }
        }
    }
    let temperature: u64 = read["temperature"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let want: u64 = truths
        .iter()
        .map(|t| t["events"]["telemetry"].as_u64().unwrap())
        .sum();
    assert_eq!(temperature, want, "{readers}");
}

/// Runs `millrace-sim run` with `args` against `edge` and waits until the edge's outbox is empty.
fn publish_and_sync(edge: &EdgeProcess, args: &[&str]) {
    run_ok(
        sim_run(edge)
            .args(args)
            .args(["--speed", "0", "--quiet"])
            .env("RUST_LOG", "error"),
    );
    assert!(wait_until(Duration::from_secs(300), || outbox_drained(
        edge
    )));
}

/// This crate's directory, read when the test runs (cargo sets it): a test binary that cargo
/// reuses from a build in another checkout must not look for files there.
fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from)
}
