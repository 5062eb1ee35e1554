//! The factory's MQTT, against peers no one here wrote: a Sparkplug B edge node (payloads by
//! pysparkplug, MQTT by paho-mqtt) and paho-mqtt over WebSocket.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use millrace_tests::{free_port, python, run_ok, wait_until};
use serde_json::Value;

use super::{EdgeProcess, PASSWORD, password_hash};

fn script(name: &str) -> std::path::PathBuf {
    super::manifest_dir().join("python").join(name)
}

/// 2026-01-05T06:00:00Z: the scripted node's first timestamp.
const START_MS: i64 = 1_767_592_800_000;
const MIN: i64 = 60_000;

/// Writes `dir/edge.toml`: device `sim`, extra `[mqtt]` lines, then `rest` (the Sparkplug
/// sections and whatever else a test needs).
fn sparkplug_edge_config(dir: &Path, mqtt_extra: &str, rest: &str) -> std::path::PathBuf {
    let config = dir.join("edge.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[mqtt]
listen = "127.0.0.1:0"
{mqtt_extra}
[[mqtt.users]]
username = "sim"
password_hash = "{hash}"
[http]
listen = "127.0.0.1:0"
{rest}"#,
            data = dir.join("data").display(),
            hash = password_hash()
        ),
    )
    .unwrap();
    config
}

/// An edge with device `sim`, the Sparkplug mapping of the scripted node's press, and extra
/// `[mqtt]` lines.
fn sparkplug_edge(dir: &Path, mqtt_extra: &str) -> EdgeProcess {
    let config = sparkplug_edge_config(
        dir,
        mqtt_extra,
        r#"[store.retention]
telemetry = "0s"
events = "0s"
[sparkplug]
host_id = "millrace-test"
[[sparkplug.machines]]
group = "plant1"
node = "gw1"
device = "press1"
machine = "plant-1/line-a/press-1"
good_parts = "Counters/Good"
scrap_parts = "Counters/Scrap"
state = { metric = "Status", values = { "1" = "running", "2" = "idle", "3" = "down:technical_failure" } }
"#,
    );
    EdgeProcess::start(&config)
}

#[test]
fn a_sparkplug_node_is_born_mapped_checked_asked_to_rebirth_and_dies() {
    let dir = tempfile::tempdir().unwrap();
    let edge = sparkplug_edge(dir.path(), "");
    let node = Command::new(python())
        .arg(script("sparkplug_node.py"))
        .args(["--port", &edge.mqtt_port.to_string()])
        .args(["--user", "sim", "--password", PASSWORD])
        .args(["--start-ms", &START_MS.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the node was born again and reset its counter, a function writes a metric of its
    // press: the node must receive a DCMD with the birth's type.
    assert!(
        wait_until(Duration::from_secs(60), || {
            let nodes = edge.get("/api/v1/sparkplug/nodes");
            nodes["nodes"][0]["devices"][0]["metrics"]
                .as_array()
                .is_some_and(|m| {
                    m.iter()
                        .any(|m| m["name"] == "Counters/Good" && m["value"] == 3.0)
                })
        }),
        "the node did not reach its counter reset"
    );
    let wat = r#"(module
  (import "millrace" "input_read" (func $input_read (param i32 i32 i32) (result i32)))
  (import "millrace" "publish" (func $publish (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "millrace/sparkplug/write/plant1/gw1/press1")
  (func (export "handle") (result i32)
    (local $n i32)
    (local.set $n (call $input_read (i32.const 1) (i32.const 1024) (i32.const 4096)))
    (drop (call $publish (i32.const 0) (i32.const 42) (i32.const 1024) (local.get $n)))
    (i32.const 0)))"#;
    run_ok(
        Command::new("curl")
            .args(["-fsS", "-X", "PUT", "-H", "content-type: application/json"])
            .arg("--data-binary")
            .arg(serde_json::json!({ "module_wat": wat }).to_string())
            .arg(format!("{}/api/v1/functions/speed-setpoint", edge.http)),
    );
    let invoked = run_ok(
        Command::new("curl")
            .args([
                "-fsS",
                "-X",
                "POST",
                "--data-binary",
                r#"{"Spindle/Speed": 1500.5}"#,
            ])
            .arg(format!(
                "{}/api/v1/functions/speed-setpoint/invoke",
                edge.http
            )),
    );
    let invoked: Value = serde_json::from_slice(&invoked.stdout).unwrap();
    assert_eq!(invoked["outcome"], "ok", "{invoked}");
    let out = node.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the node ran: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The host's retained STATE was there when the node subscribed.
    assert_eq!(seen["state"]["online"], true, "{seen}");
    // The sequence gap was answered with NCMD Node Control/Rebirth = true.
    assert_eq!(
        seen["rebirths"][0],
        serde_json::json!({ "Node Control/Rebirth": true }),
        "{seen}"
    );
    assert_eq!(
        seen["writes"],
        serde_json::json!([{ "Spindle/Speed": ["DOUBLE", 1500.5] }]),
        "{seen}"
    );

    let (from, to) = (START_MS - 120 * MIN, START_MS + 60 * MIN);
    let press = "plant-1/line-a/press-1";
    let events = |kind: &str| {
        edge.get(&format!(
            "/api/v1/events?machine={press}&kind={kind}&from={from}&to={to}&limit=1000"
        ))["events"]
            .as_array()
            .unwrap()
            .clone()
    };
    // Part counters: 100 → 110 → 115 → 120, a rebirth at 120 (a new baseline), then reset to 3.
    let parts = events("part");
    let count = |outcome: &str| {
        parts
            .iter()
            .filter(|p| p["body"]["outcome"] == outcome)
            .count()
    };
    assert_eq!((count("good"), count("scrap")), (23, 1), "{parts:?}");
    // Parts carry the time of the message that counted them.
    let minutes: Vec<i64> = parts
        .iter()
        .filter(|p| p["body"]["outcome"] == "good")
        .map(|p| (p["ts_ms"].as_i64().unwrap() - START_MS) / MIN)
        .collect();
    assert_eq!(
        minutes,
        [vec![1; 10], vec![3; 5], vec![5; 5], vec![9; 3]].concat()
    );
    // The state metric, through the mapping (the rebirth states it again).
    let states: Vec<(i64, String, Value)> = events("state")
        .iter()
        .map(|e| {
            (
                (e["ts_ms"].as_i64().unwrap() - START_MS) / MIN,
                e["body"]["state"].as_str().unwrap().to_owned(),
                e["body"]["reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            (0, "running".into(), Value::Null),
            (2, "down".into(), "technical_failure".into()),
            (3, "running".into(), Value::Null),
            (8, "running".into(), Value::Null),
        ]
    );
    // Numeric metrics are telemetry: the device's on the mapped machine (folders become
    // dots), the node's own under plant1/gw1/node; text metrics are not telemetry.
    let points = |series: &str| -> Vec<(i64, f64)> {
        edge.get(&format!(
            "/api/v1/points?series={series}&from={from}&to={to}"
        ))["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    (p[0].as_i64().unwrap() - START_MS) / MIN,
                    p[1].as_f64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        points(&format!("{press}/Spindle.Speed")),
        vec![(0, 1200.0), (1, 1250.0), (8, 1200.0)]
    );
    // The historical value is stored at its own time, an hour before the birth.
    assert_eq!(
        points("plant1/gw1/node/Temperature"),
        vec![(-60, 21.5), (0, 20.0), (8, 20.0)]
    );
    let series: Vec<String> = edge.get("/api/v1/series")["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!series.iter().any(|s| s.ends_with("/Mode")), "{series:?}");

    // What the host refused, each with its reason, and ingest went on.
    let dead = edge.get("/api/v1/dead-letters?limit=100");
    let mut reasons: Vec<String> = dead["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap().to_owned())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "sparkplug_before_birth",
            "sparkplug_payload",
            "sparkplug_stale_death",
            "sparkplug_unknown_alias"
        ],
        "{dead}"
    );
    let errors = dead.to_string();
    assert!(errors.contains("alias 99"), "{errors}");
    assert!(errors.contains("NDEATH with bdSeq 7 ignored"), "{errors}");

    // The node's state: dead after its last NDEATH (whose bdSeq matched), the device with it.
    let nodes = edge.get("/api/v1/sparkplug/nodes");
    let node = &nodes["nodes"][0];
    assert_eq!(
        (node["group"].as_str(), node["node"].as_str()),
        (Some("plant1"), Some("gw1")),
        "{nodes}"
    );
    assert_eq!(node["online"], false, "{node}");
    assert_eq!(node["bd_seq"], 0, "{node}");
    assert_eq!(node["seq_gaps"], 1, "{node}");
    assert!(node["rebirths_requested"].as_u64().unwrap() >= 1, "{node}");
    let press1 = &node["devices"][0];
    assert_eq!(press1["device"], "press1");
    assert_eq!(press1["online"], false);
    let good = press1["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "Counters/Good")
        .unwrap();
    assert_eq!(
        (
            good["alias"].as_u64(),
            good["value"].as_f64(),
            good["stale"].as_bool()
        ),
        (Some(11), Some(3.0), Some(true)),
        "{good}"
    );
    // A rebirth by hand, through the CLI: the node is known, so the command is sent.
    let cli = Command::new(super::bin("millrace-edge"))
        .args(["sparkplug", "rebirth", "plant1/gw1", "--url", &edge.http])
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let unknown = Command::new(super::bin("millrace-edge"))
        .args(["sparkplug", "rebirth", "plant1/nobody", "--url", &edge.http])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no Sparkplug node `plant1/nobody`"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    edge.stop();
}

#[test]
fn websocket_clients_publish_and_subscribe_with_the_device_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = millrace_tests::self_signed_cert(dir.path());
    let (ws, tls, wss) = (free_port(), free_port(), free_port());
    let edge = sparkplug_edge(
        dir.path(),
        &format!(
            "ws_listen = \"127.0.0.1:{ws}\"\n[mqtt.tls]\nlisten = \"127.0.0.1:{tls}\"\ncert = \"{}\"\nkey = \"{}\"\nws_listen = \"127.0.0.1:{wss}\"\n",
            cert.display(),
            key.display()
        ),
    );
    for port in [ws, wss] {
        assert!(wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }));
    }
    let client = |url: &str, mqtt: &str, password: &str, seq: u64| -> Value {
        let topic = "factory/plant-1/line-a/hmi-1/state";
        let payload = format!(
            r#"{{"v":1,"ts":{},"seq":{seq},"state":"running"}}"#,
            START_MS + seq as i64 * MIN
        );
        let out = run_ok(
            Command::new(python())
                .arg(script("ws_client.py"))
                .args(["--url", url, "--mqtt", mqtt])
                .args(["--user", "sim", "--password", password])
                .args(["--topic", topic, "--payload", &payload])
                .args(["--cafile", cert.to_str().unwrap()]),
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        if password == PASSWORD {
            assert_eq!(v["connected"], true, "{url} MQTT {mqtt}: {v}");
            assert_eq!(v["published"], true, "{url} MQTT {mqtt}: {v}");
            assert_eq!(
                v["received"],
                serde_json::json!([payload]),
                "{url} MQTT {mqtt}: its own message came back through the broker"
            );
        }
        v
    };
    let urls = [
        format!("ws://127.0.0.1:{ws}/mqtt"),
        // By name: rustls refuses an IP address as TLS server name.
        format!("wss://localhost:{wss}/mqtt"),
    ];
    let mut seq = 0;
    for url in &urls {
        for mqtt in ["3.1.1", "5"] {
            seq += 1;
            client(url, mqtt, PASSWORD, seq);
        }
        let refused = client(url, "3.1.1", "wrong-password", 99);
        assert_eq!(refused["connected"], false, "{url}: {refused}");
    }
    // Each accepted message was stored, through the same durable ingest as TCP; the refused
    // ones were not.
    let events = edge.get(&format!(
        "/api/v1/events?machine=plant-1/line-a/hmi-1&kind=state&from={}&to={}",
        START_MS,
        START_MS + 100 * MIN
    ));
    let seqs: Vec<u64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    // A WebSocket client that asks for another subprotocol is refused with a reason.
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10", "--http1.1"])
        .args(["-H", "Connection: Upgrade", "-H", "Upgrade: websocket"])
        .args(["-H", "Sec-WebSocket-Version: 13"])
        .args(["-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="])
        .args(["-H", "Sec-WebSocket-Protocol: chat"])
        .arg(format!("http://127.0.0.1:{ws}/mqtt"))
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("no MQTT subprotocol"), "{answer}");
    edge.stop();
}

#[test]
fn a_sparkplug_press_reaches_the_cloud_and_its_oee_report_equals_what_it_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (token, digest) = super::edge_token("spb");
    let cloud_config = super::cloud_config(dir.path(), free_port(), "spb", &digest);
    // Planned production around the clock, so that the two hours are all planned time.
    let mut text = std::fs::read_to_string(&cloud_config).unwrap();
    text.push_str("[master.calendar]\nshifts = [{ name = \"day\", start = \"00:00:00\", end = \"00:00:00\" }]\n");
    std::fs::write(&cloud_config, text).unwrap();
    let cloud = super::CloudProcess::start(&cloud_config);
    let ideal_cycle_ms = 20_000;
    cloud.put_machines(&serde_json::json!([{ "site": "plant-1", "line": "line-b", "machine": "press-2", "ideal_cycle_time_ms": ideal_cycle_ms }]));
    let edge_dir = dir.path().join("edge");
    std::fs::create_dir_all(&edge_dir).unwrap();
    let edge = {
        let config = sparkplug_edge_config(
            &edge_dir,
            "",
            r#"[[sparkplug.machines]]
group = "plant1"
node = "gw2"
device = "press2"
machine = "plant-1/line-b/press-2"
good_parts = "Counters/Good"
scrap_parts = "Counters/Scrap"
state = { metric = "Status", values = { "1" = "running", "3" = "down:technical_failure" } }
"#,
        );
        super::with_sync(&config, &cloud.http, "");
        EdgeProcess::start_with_env(
            &config,
            &[
                ("MILLRACE_EDGE_EDGE_ID", "spb"),
                ("MILLRACE_EDGE_SYNC__TOKEN", token.as_str()),
            ],
        )
    };
    let out = run_ok(
        Command::new(python())
            .arg(script("sparkplug_shift.py"))
            .args(["--port", &edge.mqtt_port.to_string()])
            .args(["--user", "sim", "--password", PASSWORD])
            .args(["--start-ms", &START_MS.to_string()])
            .args(["--ideal-cycle-ms", &ideal_cycle_ms.to_string()]),
    );
    let truth: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(wait_until(Duration::from_secs(120), || {
        super::outbox_drained(&edge)
    }));
    let (from, to) = (
        truth["from_ms"].as_i64().unwrap(),
        truth["to_ms"].as_i64().unwrap(),
    );
    let report = cloud.get(&format!(
        "/api/v1/reports/oee?from={from}&to={to}&level=machine&period=total&machine=plant-1/line-b/press-2"
    ));
    let row = &report["rows"][0];
    assert_eq!(row["entity"], "plant-1/line-b/press-2", "{report}");
    assert_eq!(
        (
            row["good"].as_u64(),
            row["scrap"].as_u64(),
            row["failures"].as_u64()
        ),
        (truth["good"].as_u64(), truth["scrap"].as_u64(), Some(1)),
        "{row}"
    );
    assert_eq!(
        row["times"]["running_ms"].as_i64().unwrap(),
        truth["run_minutes"].as_i64().unwrap() * MIN,
        "{row}"
    );
    assert_eq!(
        row["times"]["down_ms"].as_i64().unwrap(),
        truth["down_minutes"].as_i64().unwrap() * MIN,
        "{row}"
    );
    for k in ["availability", "performance", "quality"] {
        let (got, want) = (row[k].as_f64().unwrap(), truth[k].as_f64().unwrap());
        assert!((got - want).abs() < 1e-9, "{k}: report {got}, truth {want}");
    }
    edge.stop();
}
