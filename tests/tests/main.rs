//! End to end: the built binaries as real processes on loopback with temp dirs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use millrace_tests::{read_json, wait_until};
use serde_json::Value;

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
        let mut child = Command::new(bin("millrace-edge"))
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "warn")
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
    for m in truth["machines"].as_array().unwrap() {
        let id = format!(
            "{}/{}/{}",
            m["site"].as_str().unwrap(),
            m["line"].as_str().unwrap(),
            m["machine"].as_str().unwrap()
        );
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
        temperature_points += pts["points"].as_array().unwrap().len() as u64;
    }
    assert_eq!(
        temperature_points,
        truth["events"]["telemetry"].as_u64().unwrap()
    );
}

#[test]
fn acknowledged_events_survive_kill_9_of_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed port, so that the simulator can reconnect to the restarted edge.
    let config = edge_config(dir.path(), millrace_tests::free_port());
    let edge = EdgeProcess::start(&config);
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
    edge.stop();
}

#[test]
fn a_simulated_shift_flows_through_the_edge_and_matches_the_ground_truth() {
    let dir = tempfile::tempdir().unwrap();
    let config = edge_config(dir.path(), 0);
    let edge = EdgeProcess::start(&config);

    let (truth, report) = (
        dir.path().join("truth.json"),
        dir.path().join("report.json"),
    );
    let out = sim_run(&edge)
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
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
