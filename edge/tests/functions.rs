//! On-device functions with real components: modules deployed over real HTTP, devices and
//! subscribers over MQTT, RocksDB in a temp dir, the CLI as a process, AssemblyScript built
//! from source with node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use millrace_edge::config::FunctionsConfig;
use millrace_edge::functions::{Clock, DeployRequest, Functions, ManualClock, WasmEngine};
use millrace_edge::store::{Store, StoreOptions};
use millrace_shared::{PartOutcome, PartProduced};
use millrace_tests::{Recorder, run_ok, wait_until};

use super::*;

/// The time limit of functions whose outcome a test checks: far above what they need, so that
/// a loaded machine (tests run in parallel) cannot make them time out.
const SLACK: u64 = 30_000;

fn example(name: &str) -> PathBuf {
    manifest_dir().join("functions").join(name)
}

fn wat(name: &str) -> String {
    std::fs::read_to_string(example(name)).unwrap()
}

async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn deploy(edge: &Edge, name: &str, body: Value) -> (u16, Value) {
    send(
        reqwest::Client::new()
            .put(format!("{}/api/v1/functions/{name}", http(edge)))
            .json(&body),
    )
    .await
}

async fn invoke(edge: &Edge, name: &str, topic: Option<&str>, payload: &[u8]) -> (u16, Value) {
    let mut r = reqwest::Client::new()
        .post(format!("{}/api/v1/functions/{name}/invoke", http(edge)))
        .body(payload.to_vec());
    if let Some(t) = topic {
        r = r.query(&[("topic", t)]);
    }
    send(r).await
}

async fn invocations(edge: &Edge, query: &str) -> Vec<Value> {
    get(&format!("{}/api/v1/invocations?{query}", http(edge)))
        .await
        .1["invocations"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until the invocation log holds at least `n` records matching `query`.
async fn wait_invocations(edge: &Edge, query: &str, n: usize) -> Vec<Value> {
    for _ in 0..1500 {
        let v = invocations(edge, query).await;
        if v.len() >= n {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "fewer than {n} invocations for {query}: {:?}",
        invocations(edge, query).await
    );
}

/// The points of the test machine's series `metric` over the test's ten seconds.
async fn derived_points(edge: &Edge, metric: &str) -> Value {
    get(&format!(
        "{}/api/v1/points?series=plant-1/line-1/press-01/{metric}&from={T0}&to={}",
        http(edge),
        T0 + 10_000
    ))
    .await
    .1
}

fn part(seq: u64, outcome: PartOutcome) -> Event {
    Event {
        machine: machine(),
        ts_ms: T0 + seq as i64 * 1000,
        seq,
        body: EventBody::Part(PartProduced {
            outcome,
            cycle_time_ms: 30_000,
            part_id: Some(format!("p-{seq}")),
        }),
    }
}

async fn publish(client: &AsyncClient, e: &Event) {
    client
        .publish(e.topic(), QoS::AtLeastOnce, false, e.to_payload())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_triggers_run_functions_whose_alerts_points_and_state_take_effect() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    for (name, file, topic) in [
        (
            "threshold-alert",
            "threshold_alert.wat",
            "factory/+/+/+/telemetry",
        ),
        (
            "unit-conversion",
            "unit_conversion.wat",
            "factory/+/+/+/telemetry",
        ),
        ("scrap-rate", "scrap_rate.wat", "factory/+/+/+/part"),
    ] {
        let (status, spec) = deploy(
            &edge,
            name,
            serde_json::json!({ "module_wat": wat(file), "topics": [topic], "timeout_ms": SLACK }),
        )
        .await;
        assert_eq!(status, 201, "{spec}");
        assert_eq!(spec["version"], 1);
    }
    let alerts = Recorder::start(
        edge.mqtt_addr.port(),
        "millrace/alerts/#",
        Some((USER, PASS)),
    )
    .await;
    let (client, _task) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    // 80 degC is above the limit, 60 is not; two parts, one scrapped.
    publish(&client, &temp(1, 80.0)).await;
    publish(&client, &temp(2, 60.0)).await;
    publish(&client, &part(3, PartOutcome::Good)).await;
    publish(&client, &part(4, PartOutcome::Scrap)).await;
    wait_stored(&edge, 4, 0).await;

    // The alert reaches an MQTT subscriber and the alert log.
    assert_eq!(alerts.wait_for(1, Duration::from_secs(30)).await, 1);
    let m = &alerts.messages()[0];
    assert_eq!(m.topic, "millrace/alerts/threshold-alert");
    let a: Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(a["severity"], "critical");
    assert_eq!(a["device"], "plant-1/line-1/press-01");
    assert_eq!(a["event_ts_ms"], T0 + 1000);
    // Published before its batch commits (at least once), stored with the commit.
    let mut stored = Value::Null;
    for _ in 0..1500 {
        stored = get(&format!("{}/api/v1/alerts", http(&edge))).await.1;
        if !stored["alerts"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored["alerts"].as_array().unwrap().len(), 1, "{stored}");

    // Derived points are queryable like device points.
    wait_invocations(&edge, "function=unit-conversion", 2).await;
    let pts = derived_points(&edge, "temperature_f").await;
    assert_eq!(
        pts["points"],
        serde_json::json!([[T0 + 1000, 176.0], [T0 + 2000, 140.0]]),
        "{pts}"
    );
    // The scrap rate after a good part and a scrapped one, from state in the key-value store.
    wait_invocations(&edge, "function=scrap-rate", 2).await;
    let pts = derived_points(&edge, "scrap_rate").await;
    assert_eq!(
        pts["points"],
        serde_json::json!([[T0 + 3000, 0.0], [T0 + 4000, 0.5]]),
        "{pts}"
    );
    // Each event ran each matching function once: 2 + 2 + 2, all successful, with triggers
    // (the threshold example takes batches: its two events may come in one invocation).
    let mut log = vec![];
    for _ in 0..1500 {
        log = invocations(&edge, "trigger=topic&limit=100").await;
        if log
            .iter()
            .map(|r| r["events"].as_u64().unwrap())
            .sum::<u64>()
            >= 6
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events: u64 = log.iter().map(|r| r["events"].as_u64().unwrap()).sum();
    assert_eq!(events, 6, "{log:?}");
    assert!(log.iter().all(|r| {
        r["outcome"] == "ok"
            && r["topic"]
                .as_str()
                .unwrap()
                .starts_with("factory/plant-1/line-1/press-01/")
    }));
    let alert_run = invocations(&edge, "function=threshold-alert").await;
    assert_eq!(
        alert_run
            .iter()
            .map(|r| r["actions"]["alerts"].as_u64().unwrap())
            .sum::<u64>(),
        1
    );
    // Prometheus counts them per function and outcome.
    let metrics = metrics(&edge).await;
    assert!(
        metrics.contains(r#"millrace_edge_function_invocations_total{function="scrap-rate",trigger="topic",outcome="ok"} 2"#),
        "{metrics}"
    );
    alerts.stop().await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_invocations_from_rest_and_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let (status, _) = deploy(
        &edge,
        "hourly-summary",
        serde_json::json!({ "module_wat": wat("hourly_summary.wat"), "topics": ["factory/+/+/+/part"], "schedule": "0 * * * *", "timeout_ms": SLACK }),
    )
    .await;
    assert_eq!(status, 201);
    let summaries = Recorder::start(
        edge.mqtt_addr.port(),
        "factory/summary/#",
        Some((USER, PASS)),
    )
    .await;
    // A part event given by hand counts like one from a device.
    let p = part(1, PartOutcome::Scrap);
    let (status, rec) = invoke(&edge, "hourly-summary", Some(&p.topic()), &p.to_payload()).await;
    assert_eq!(status, 200, "{rec}");
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["trigger"], "manual");
    assert_eq!(rec["device"], "plant-1/line-1/press-01");
    assert_eq!(rec["actions"]["kv_writes"], 2);

    // The CLI, as a user runs it: publishes the summary and resets the counters.
    let out = run_ok(Command::new(env!("CARGO_BIN_EXE_millrace-edge")).args([
        "fn",
        "--url",
        &http(&edge),
        "invoke",
        "hourly-summary",
        "--json",
    ]));
    let rec: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["actions"]["published"], 1);
    assert_eq!(summaries.wait_for(1, Duration::from_secs(30)).await, 1);
    let s: Value = serde_json::from_slice(&summaries.messages()[0].payload).unwrap();
    assert_eq!(
        (s["parts"].as_u64(), s["scrap"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(
        rec["logs"][0]["message"],
        String::from_utf8_lossy(&summaries.messages()[0].payload).as_ref()
    );

    // The CLI lists functions as a table for people, as JSON for scripts, and reports
    // errors clearly.
    let out = run_ok(Command::new(env!("CARGO_BIN_EXE_millrace-edge")).args([
        "fn",
        "--url",
        &http(&edge),
        "list",
    ]));
    let table = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "NAME",
        "INVOCATIONS",
        "LAG (EVENTS)",
        "hourly-summary",
        "factory/+/+/+/part",
        "cron 0 * * * *",
    ] {
        assert!(table.contains(needle), "{needle} in\n{table}");
    }
    let out = run_ok(Command::new(env!("CARGO_BIN_EXE_millrace-edge")).args([
        "fn",
        "--url",
        &http(&edge),
        "list",
        "--json",
    ]));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["functions"][0]["name"], "hourly-summary");
    assert_eq!(list["functions"][0]["stats"]["invocations"], 2);
    assert_eq!(list["functions"][0]["lag"]["events"], 0);
    let out = run_ok(Command::new(env!("CARGO_BIN_EXE_millrace-edge")).args([
        "fn",
        "--url",
        &http(&edge),
        "logs",
        "--function",
        "hourly-summary",
    ]));
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(
        logs.contains("STARTED (UTC)") && logs.matches("hourly-summary").count() == 2,
        "{logs}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_millrace-edge"))
        .args(["fn", "--url", &http(&edge), "invoke", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404") && err.contains("no function named `nope`"),
        "{err}"
    );
    summaries.stop().await;
    edge.shutdown().await;
}

#[test]
fn schedules_fire_on_a_clock_the_test_controls() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::open(
            dir.path(),
            StoreOptions {
                sync_writes: false,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    type Sent = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let published: Sent = Default::default();
    let sink = published.clone();
    let hour = 3_600_000;
    let h10 = T0 - T0 % hour + 10 * hour; // some day, 10:00 UTC
    let clock = Arc::new(ManualClock::new(h10 + 59 * 60_000 + 59_000)); // 10:59:59
    let f = Functions::start(
        store.clone(),
        Arc::new(WasmEngine::new().unwrap()),
        Arc::new(move |t: &str, p: Vec<u8>| {
            sink.lock().unwrap().push((t.to_owned(), p));
            true
        }),
        FunctionsConfig::default(),
        clock.clone(),
    )
    .unwrap();
    f.deploy(
        "hourly-summary",
        DeployRequest {
            module_wat: Some(wat("hourly_summary.wat")),
            schedule: Some("0 * * * *".into()),
            timeout_ms: Some(SLACK),
            ..Default::default()
        },
    )
    .unwrap();
    let log = |store: &Store| -> Vec<Value> {
        store
            .invocations(i64::MIN, 100, |_| true)
            .unwrap()
            .iter()
            .map(|r| serde_json::from_slice(r).unwrap())
            .collect()
    };
    assert_eq!(f.fire_due(h10 + 59 * 60_000 + 59_000), 0, "not yet 11:00");
    clock.set(h10 + hour);
    assert_eq!(f.fire_due(h10 + hour), 1, "11:00");
    assert!(wait_until(Duration::from_secs(30), || log(&store).len() == 1));
    let r = &log(&store)[0];
    assert_eq!(r["trigger"], "schedule");
    assert_eq!(r["event_ts_ms"], h10 + hour);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert!(wait_until(Duration::from_secs(30), || published
        .lock()
        .unwrap()
        .len()
        == 1));
    let (topic, payload) = published.lock().unwrap()[0].clone();
    assert_eq!(topic, "factory/summary/hourly");
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap(),
        serde_json::json!({ "at_ms": h10 + hour, "parts": 0, "scrap": 0 })
    );
    // Half an hour later nothing is due; hours missed while the edge was busy fire once.
    clock.set(h10 + hour + 30 * 60_000);
    assert_eq!(f.fire_due(h10 + hour + 30 * 60_000), 0);
    clock.set(h10 + 5 * hour + 60_000);
    assert_eq!(f.fire_due(h10 + 5 * hour + 60_000), 1);
    assert!(wait_until(Duration::from_secs(30), || log(&store).len() == 2));
    assert_eq!(log(&store)[0]["event_ts_ms"], h10 + 2 * hour);
    assert_eq!(f.list().unwrap()[0]["next_run_ms"], h10 + 6 * hour);
    // Disabled functions are not run by their schedule.
    f.set_enabled("hourly-summary", false).unwrap();
    assert_eq!(f.fire_due(h10 + 7 * hour), 0);
    f.shutdown();
}

#[test]
fn a_schedule_missed_while_the_edge_was_off_runs_once_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let hour = 3_600_000;
    let h10 = T0 - T0 % hour + 10 * hour;
    let start = |clock: &Arc<ManualClock>| {
        let store = Arc::new(
            Store::open(
                dir.path(),
                StoreOptions {
                    sync_writes: false,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let f = Functions::start(
            store.clone(),
            Arc::new(WasmEngine::new().unwrap()),
            Arc::new(|_: &str, _: Vec<u8>| true),
            FunctionsConfig::default(),
            clock.clone(),
        )
        .unwrap();
        (store, f)
    };
    let runs = |store: &Store| -> Vec<i64> {
        store
            .invocations(i64::MIN, 100, |_| true)
            .unwrap()
            .iter()
            .map(|r| {
                serde_json::from_slice::<Value>(r).unwrap()["event_ts_ms"]
                    .as_i64()
                    .unwrap()
            })
            .collect()
    };
    let clock = Arc::new(ManualClock::new(h10 + 30 * 60_000)); // 10:30
    let (store, f) = start(&clock);
    f.deploy(
        "hourly-summary",
        DeployRequest {
            module_wat: Some(wat("hourly_summary.wat")),
            schedule: Some("0 * * * *".into()),
            timeout_ms: Some(SLACK),
            ..Default::default()
        },
    )
    .unwrap();
    clock.set(h10 + hour);
    assert_eq!(f.fire_due(h10 + hour), 1, "11:00");
    assert!(wait_until(Duration::from_secs(30), || runs(&store).len() == 1));
    f.shutdown();
    drop((f, store));
    // Off from 11:00 to 14:30: the runs of 12:00, 13:00 and 14:00 were missed. At start, one
    // run catches up (as 12:00), then the schedule goes on at 15:00.
    clock.set(h10 + 4 * hour + 30 * 60_000);
    let (store, f) = start(&clock);
    assert_eq!(f.fire_due(clock.now_ms()), 1);
    assert!(wait_until(Duration::from_secs(30), || runs(&store).len() == 2));
    assert_eq!(runs(&store), [h10 + 2 * hour, h10 + hour]);
    assert_eq!(f.list().unwrap()[0]["next_run_ms"], h10 + 5 * hour);
    assert_eq!(f.fire_due(clock.now_ms()), 0);
    // A restart with nothing missed runs nothing.
    f.shutdown();
    drop((f, store));
    let (store, f) = start(&clock);
    assert_eq!(f.fire_due(clock.now_ms()), 0);
    assert_eq!(runs(&store).len(), 2);
    f.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_updates_and_deletes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let edge = Edge::start(cfg.clone()).await.unwrap();
    let body = |file: &str| serde_json::json!({ "module_wat": wat(file), "topics": ["factory/+/+/+/telemetry"], "timeout_ms": 50 });
    assert_eq!(
        deploy(&edge, "alert", body("threshold_alert.wat")).await.0,
        201
    );
    let (status, spec) = deploy(&edge, "alert", body("unit_conversion.wat")).await;
    assert_eq!(status, 200, "an update");
    assert_eq!(spec["version"], 2);
    assert_eq!(spec["history"].as_array().unwrap().len(), 2);
    assert_ne!(spec["history"][0]["sha256"], spec["history"][1]["sha256"]);
    assert_eq!(
        deploy(&edge, "other", body("threshold_alert.wat")).await.0,
        201
    );
    let (status, _) = send(
        reqwest::Client::new().post(format!("{}/api/v1/functions/other/disable", http(&edge))),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) =
        send(reqwest::Client::new().delete(format!("{}/api/v1/functions/alert", http(&edge))))
            .await;
    assert_eq!(status, 204);
    assert_eq!(
        deploy(&edge, "kept", body("unit_conversion.wat")).await.0,
        201
    );
    edge.shutdown().await;

    let edge = Edge::start(cfg).await.unwrap();
    let list = get(&format!("{}/api/v1/functions", http(&edge))).await.1;
    let names: Vec<(&str, bool, u64)> = list["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap(),
                f["enabled"].as_bool().unwrap(),
                f["version"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(names, [("kept", true, 1), ("other", false, 1)]);
    let (status, err) = get(&format!("{}/api/v1/functions/alert", http(&edge))).await;
    assert_eq!(status, 404, "{err}");
    // The disabled function is not triggered; the enabled one is, after the restart.
    let (client, _task) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    publish(&client, &temp(1, 90.0)).await;
    wait_invocations(&edge, "function=kept", 1).await;
    assert!(invocations(&edge, "function=other").await.is_empty());
    let (status, err) = invoke(&edge, "other", None, b"").await;
    assert_eq!(status, 409, "{err}");
    assert!(err["error"].as_str().unwrap().contains("disabled"));
    edge.shutdown().await;
}

const LOOP: &str =
    r#"(module (func (export "handle") (result i32) (loop $l (br $l)) (i32.const 0)))"#;
const TRAP: &str = r#"(module (func (export "handle") (result i32) unreachable))"#;
const HUNGRY: &str = r#"(module (memory (export "memory") 1)
  (func (export "handle") (result i32)
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    (i32.const 0)))"#;
const FAILS: &str = r#"(module (func (export "handle") (result i32) (i32.const 7)))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_trapping_and_memory_hungry_functions_are_contained() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let tel = "factory/+/+/+/telemetry";
    for (name, module, extra) in [
        ("runaway", LOOP, serde_json::json!({ "timeout_ms": 50 })),
        ("trap", TRAP, serde_json::json!({ "timeout_ms": SLACK })),
        (
            "hungry",
            HUNGRY,
            serde_json::json!({ "memory_mib": 2, "timeout_ms": SLACK }),
        ),
        ("fails", FAILS, serde_json::json!({ "timeout_ms": SLACK })),
    ] {
        let mut body = serde_json::json!({ "module_wat": module, "topics": [tel] });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, spec) = deploy(&edge, name, body).await;
        assert_eq!(status, 201, "{name}: {spec}");
    }
    assert_eq!(
        deploy(
            &edge,
            "healthy",
            serde_json::json!({ "module_wat": wat("unit_conversion.wat"), "topics": [tel], "timeout_ms": SLACK })
        )
        .await
        .0,
        201
    );
    // Devices keep sending while the bad functions fail on every event.
    let (client, _task) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    let n = 20;
    for i in 1..=n {
        publish(&client, &temp(i, 50.0)).await;
    }
    wait_stored(&edge, n, 0).await;
    // Ingest stored everything and the healthy function ran on every event.
    wait_invocations(&edge, "function=healthy&outcome=ok", n as usize).await;
    let pts = get(&temperature_url(&edge, T0, T0 + 100_000)).await.1;
    assert_eq!(pts["points"].as_array().unwrap().len(), n as usize);
    for (name, outcome, needle) in [
        ("runaway", "timeout", "time limit of 50 ms"),
        ("trap", "trap", "unreachable"),
        ("hungry", "memory", "memory limit of 2048 KiB exceeded"),
        ("fails", "error", "handle returned 7"),
    ] {
        let recs = wait_invocations(&edge, &format!("function={name}"), 1).await;
        assert!(
            recs.iter()
                .all(|r| r["outcome"] == outcome && r["error"].as_str().unwrap().contains(needle)),
            "{name}: {recs:?}"
        );
    }
    // The runaway timed out three times in a row and was paused: its triggers wait in the log
    // (lag), none is dropped.
    let runaway = || async {
        get(&format!("{}/api/v1/functions/runaway", http(&edge)))
            .await
            .1
    };
    let mut f = runaway().await;
    for _ in 0..1500 {
        if f["stats"]["pauses"].as_u64().unwrap() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        f = runaway().await;
    }
    let s = &f["stats"];
    assert!(s["pauses"].as_u64().unwrap() >= 1, "{f}");
    assert!(s["invocations"].as_u64().unwrap() >= 3, "{f}");
    assert_eq!(s["failures"], s["invocations"], "{f}");
    assert_eq!(s["dropped"], 0, "{f}");
    assert!(
        f["lag"]["events"].as_u64().unwrap() + s["invocations"].as_u64().unwrap() >= n,
        "what it has not run yet waits in the log: {f}"
    );
    // A manual invocation reports the failure in its record.
    let (status, rec) = invoke(&edge, "trap", None, b"{}").await;
    assert_eq!(status, 200);
    assert_eq!(rec["outcome"], "trap");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_modules_and_requests_are_refused_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "not-wasm",
            serde_json::json!({ "module_base64": "aGVsbG8gd29ybGQ=" }),
            "not a valid WAT/WebAssembly module",
        ),
        (
            "bad-binary",
            serde_json::json!({ "module_base64": "AGFzbQEAAAAB/w==" }),
            "invalid WebAssembly module",
        ),
        (
            "no-handle",
            serde_json::json!({ "module_wat": "(module)" }),
            "exports no function `handle`",
        ),
        (
            "bad-sig",
            serde_json::json!({ "module_wat": r#"(module (func (export "handle") (param i32)))"# }),
            "expected () -> (i32)",
        ),
        (
            "bad-batch-sig",
            serde_json::json!({ "module_wat": r#"(module (func (export "handle_batch") (result i32) (i32.const 0)))"# }),
            "exports `handle_batch` with signature () -> (i32), expected (i32) -> (i32)",
        ),
        (
            "bad-batch-max",
            serde_json::json!({ "module_wat": r#"(module (func (export "handle") (result i32) (i32.const 0)))"#, "batch_max": 0 }),
            "batch_max 0: between 1 and 100000",
        ),
        (
            "bad-import",
            serde_json::json!({ "module_wat": r#"(module (import "wasi" "fd_write" (func)) (func (export "handle") (result i32) (i32.const 0)))"# }),
            "imports `wasi.fd_write`, which the host does not provide",
        ),
        (
            "bad-import-sig",
            serde_json::json!({ "module_wat": r#"(module (import "millrace" "alert" (func (param i32))) (memory (export "memory") 1) (func (export "handle") (result i32) (i32.const 0)))"# }),
            "imports `millrace.alert` with signature (i32) -> ()",
        ),
        (
            "no-memory",
            serde_json::json!({ "module_wat": r#"(module (import "millrace" "log" (func (param i32 i32 i32))) (func (export "handle") (result i32) (i32.const 0)))"# }),
            "exports no `memory`",
        ),
        (
            "too-big",
            serde_json::json!({ "module_wat": r#"(module (memory (export "memory") 100) (func (export "handle") (result i32) (i32.const 0)))"#, "memory_mib": 1 }),
            "above the function's memory limit",
        ),
        (
            "both",
            serde_json::json!({ "module_wat": "(module)", "module_base64": "AA==" }),
            "exactly one of",
        ),
        (
            "bad-topic",
            serde_json::json!({ "module_wat": TRAP, "topics": ["factory/#/x"] }),
            "`#` must be a whole level and the last one",
        ),
        (
            "bad-cron",
            serde_json::json!({ "module_wat": TRAP, "schedule": "every hour" }),
            "schedule `every hour`",
        ),
        (
            "bad-timeout",
            serde_json::json!({ "module_wat": TRAP, "timeout_ms": 0 }),
            "timeout_ms 0",
        ),
        (
            "Bad Name",
            serde_json::json!({ "module_wat": TRAP }),
            "function name `Bad Name`",
        ),
        (
            "unknown-field",
            serde_json::json!({ "module_wat": TRAP, "triggers": [] }),
            "unknown field `triggers`",
        ),
        (
            "bad-replay-from",
            serde_json::json!({ "module_wat": TRAP, "topics": ["factory/#"], "replay_from": "last tuesday" }),
            "`replay_from` = `last tuesday`",
        ),
        (
            "future-replay-from",
            serde_json::json!({ "module_wat": TRAP, "topics": ["factory/#"], "replay_from": "2999-01-01T00:00:00Z" }),
            "is not in the past",
        ),
        (
            "replay-without-topics",
            serde_json::json!({ "module_wat": TRAP, "replay_from": "-1d" }),
            "replay_from needs topic filters",
        ),
    ];
    for (name, body, needle) in cases {
        let (status, err) = deploy(&edge, &name.replace(' ', "%20"), body).await;
        assert_eq!(status, 400, "{name}: {err}");
        let msg = err["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{name}: {msg}");
    }
    let (status, err) = send(
        reqwest::Client::new()
            .put(format!("{}/api/v1/functions/x", http(&edge)))
            .body("{not json"),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .starts_with("deploy request:")
    );
    // Nothing was deployed by any of these.
    let list = get(&format!("{}/api/v1/functions", http(&edge))).await.1;
    assert_eq!(list["functions"], serde_json::json!([]));
    for (query, needle) in [
        ("invocations?outcome=maybe", "`outcome` = `maybe`"),
        ("invocations?trigger=mqtt", "`trigger` = `mqtt`"),
        ("invocations?limit=0", "`limit` = `0`"),
        ("alerts?from=yesterday", "`from` = `yesterday`"),
        ("invocations?trigger=bogus", "`trigger` = `bogus`"),
        ("functions/nope/kv?limit=many", "`limit` = `many`"),
        ("functions/nope/kv?limit=0", "`limit` = `0`"),
        (
            "invocations?function=x&colour=red",
            "unknown field `colour`",
        ),
    ] {
        let (status, err) = get(&format!("{}/api/v1/{query}", http(&edge))).await;
        assert_eq!(status, 400, "{query}: {err}");
        assert!(
            err["error"].as_str().unwrap().contains(needle),
            "{query}: {err}"
        );
    }
    // A function that does not exist: its state, and invoking it.
    let (status, err) = get(&format!("{}/api/v1/functions/nope/kv", http(&edge))).await;
    assert_eq!(status, 404, "{err}");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("no function named `nope`")
    );
    // Invoking a function that does not exist.
    let (status, err) = invoke(&edge, "nope", None, b"{}").await;
    assert_eq!(status, 404, "{err}");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assemblyscript_function_builds_from_source_and_runs() {
    let src = example("assemblyscript");
    assert!(
        src.join("node_modules/assemblyscript").exists(),
        "the AssemblyScript example needs `npm ci` in edge/functions/assemblyscript (./millrace test does it)"
    );
    let out_dir = tempfile::tempdir().unwrap();
    let wasm = out_dir.path().join("threshold_alert.wasm");
    let out = Command::new("node")
        .current_dir(&src)
        .args([
            "node_modules/assemblyscript/bin/asc.js",
            "threshold_alert.ts",
            "--outFile",
            wasm.to_str().unwrap(),
            "--runtime",
            "stub",
            "--optimize",
            "--noAssert",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "asc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    // Deployed with the CLI, as a user would.
    run_ok(Command::new(env!("CARGO_BIN_EXE_millrace-edge")).args([
        "fn",
        "--url",
        &http(&edge),
        "deploy",
        "threshold-alert-as",
        wasm.to_str().unwrap(),
        "--topic",
        "factory/+/+/+/telemetry",
        "--timeout",
        "30s",
    ]));
    let (client, _task) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    publish(&client, &temp(1, 80.5)).await;
    publish(&client, &temp(2, 20.0)).await;
    wait_invocations(&edge, "function=threshold-alert-as", 2).await;
    let alerts = get(&format!("{}/api/v1/alerts", http(&edge))).await.1;
    let alerts = alerts["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(
        alerts[0]["message"],
        "temperature 80.5 degC above 72.0 degC"
    );
    edge.shutdown().await;
}

/// This crate's directory, read when the test runs (cargo sets it): a test binary that cargo
/// reuses from a build in another checkout must not look for files there.
/// Slow (spins for up to a millisecond per event) and checks its own input: counts events in
/// `n`, keeps each device's last seq in `last/{device}` and counts in `gaps` every event whose
/// seq is not the device's previous one plus one (a repeat, a loss or a reordering).
const SLOW_ORDERED: &str = r#"(module
  (import "millrace" "input_read" (func $input_read (param i32 i32 i32) (result i32)))
  (import "millrace" "event_number" (func $number (param i32 i32) (result f64)))
  (import "millrace" "now_ms" (func $now (result i64)))
  (import "millrace" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "seq")
  (data (i32.const 8) "n")
  (data (i32.const 12) "gaps")
  (data (i32.const 64) "last/")
  (func $incr (param $k i32) (param $len i32)
    (i64.store (i32.const 32) (i64.const 0))
    (drop (call $kv_get (local.get $k) (local.get $len) (i32.const 32) (i32.const 8)))
    (i64.store (i32.const 32) (i64.add (i64.load (i32.const 32)) (i64.const 1)))
    (drop (call $kv_set (local.get $k) (local.get $len) (i32.const 32) (i32.const 8))))
  (func (export "handle") (result i32)
    (local $key i32) (local $seq i64) (local $until i64)
    (local.set $until (i64.add (call $now) (i64.const 1)))
    (loop $spin (br_if $spin (i64.lt_s (call $now) (local.get $until))))
    (local.set $key (i32.add (i32.const 5)
      (call $input_read (i32.const 2) (i32.const 69) (i32.const 128))))
    (local.set $seq (i64.trunc_f64_u (call $number (i32.const 0) (i32.const 3))))
    (i64.store (i32.const 32) (i64.const 0))
    (drop (call $kv_get (i32.const 64) (local.get $key) (i32.const 32) (i32.const 8)))
    (if (i64.ne (local.get $seq) (i64.add (i64.load (i32.const 32)) (i64.const 1)))
      (then (call $incr (i32.const 12) (i32.const 4))))
    (i64.store (i32.const 32) (local.get $seq))
    (drop (call $kv_set (i32.const 64) (local.get $key) (i32.const 32) (i32.const 8)))
    (call $incr (i32.const 8) (i32.const 1))
    (i32.const 0)))"#;

/// A function's key-value state as key -> little-endian i64.
async fn kv_counters(edge: &Edge, name: &str) -> BTreeMap<String, i64> {
    use base64::Engine as _;
    let (status, v) = get(&format!(
        "{}/api/v1/functions/{name}/kv?limit=1000",
        http(edge)
    ))
    .await;
    assert_eq!(status, 200, "{v}");
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(e["value_base64"].as_str().unwrap())
                .unwrap();
            (
                e["key"].as_str().unwrap().to_owned(),
                i64::from_le_bytes(bytes.try_into().unwrap()),
            )
        })
        .collect()
}

fn temp_of(machine: &str, seq: u64) -> Event {
    Event {
        machine: MachineId::new("plant-1", "line-1", machine).unwrap(),
        ..temp(seq, 20.0 + seq as f64 / 100.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_function_sees_every_event_once_in_order_per_device() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let (status, spec) = deploy(
        &edge,
        "slow",
        serde_json::json!({ "module_wat": SLOW_ORDERED, "topics": ["factory/+/+/+/telemetry"], "timeout_ms": SLACK }),
    )
    .await;
    assert_eq!(status, 201, "{spec}");
    // Three devices at once, far faster than the function: it falls behind.
    let (per_device, devices) = (700u64, ["press-01", "press-02", "press-03"]);
    let mut tasks = vec![];
    for d in devices {
        let (client, task) = device(&edge, d, Some((USER, PASS))).await.unwrap();
        tasks.push(task);
        for seq in 1..=per_device {
            publish(&client, &temp_of(d, seq)).await;
        }
    }
    let total = per_device * devices.len() as u64;
    wait_stored(&edge, total, 0).await;
    let info = get(&format!("{}/api/v1/functions/slow", http(&edge)))
        .await
        .1;
    assert!(
        info["lag"]["events"].as_u64().is_some(),
        "lag is reported: {info}"
    );
    // It catches up: every event exactly once (a repeat or a loss would count a gap), in order
    // per device.
    let mut kv = kv_counters(&edge, "slow").await;
    for _ in 0..3000 {
        if kv.get("n") == Some(&(total as i64)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        kv = kv_counters(&edge, "slow").await;
    }
    assert_eq!(kv.get("n"), Some(&(total as i64)), "{kv:?}");
    assert_eq!(kv.get("gaps"), None, "{kv:?}");
    for d in devices {
        assert_eq!(
            kv[&format!("last/plant-1/line-1/{d}")],
            per_device as i64,
            "{kv:?}"
        );
    }
    let info = get(&format!("{}/api/v1/functions/slow", http(&edge)))
        .await
        .1;
    assert_eq!(info["stats"]["dropped"], 0, "{info}");
    assert_eq!(info["stats"]["skipped"], 0, "{info}");
    assert_eq!(info["lag"]["events"], 0, "{info}");
    // A restart goes on from the cursor: nothing is run twice.
    edge.shutdown().await;
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let info = get(&format!("{}/api/v1/functions/slow", http(&edge)))
        .await
        .1;
    assert_eq!(info["lag"]["events"], 0, "{info}");
    assert_eq!(
        kv_counters(&edge, "slow").await.get("n"),
        Some(&(total as i64))
    );
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_function_gets_what_is_waiting_in_few_invocations() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    // Deployed disabled: the events wait in the trigger log until it is enabled.
    let (status, spec) = deploy(
        &edge,
        "threshold",
        serde_json::json!({ "module_wat": wat("threshold_alert.wat"), "topics": ["factory/+/+/+/telemetry"],
            "timeout_ms": SLACK, "batch_max": 50, "enabled": false }),
    )
    .await;
    assert_eq!(status, 201, "{spec}");
    let (client, _task) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    let n = 120;
    for seq in 1..=n {
        // Every tenth reading is above the threshold.
        let t = if seq % 10 == 0 { 80.0 } else { 50.0 };
        publish(&client, &temp(seq, t)).await;
    }
    wait_stored(&edge, n, 0).await;
    let url = format!("{}/api/v1/functions/threshold", http(&edge));
    assert_eq!(get(&url).await.1["lag"]["events"], n, "all wait");
    let (status, _) = send(reqwest::Client::new().post(format!("{url}/enable"))).await;
    assert_eq!(status, 200);
    let mut info = get(&url).await.1;
    for _ in 0..1500 {
        if info["stats"]["events"] == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        info = get(&url).await.1;
    }
    assert_eq!(info["stats"]["events"], n, "{info}");
    assert_eq!(info["lag"]["events"], 0, "{info}");
    // The invocation log is written by its own thread: wait for all of it.
    let mut sizes: Vec<u64> = vec![];
    for _ in 0..1500 {
        let recs = invocations(&edge, "function=threshold").await;
        sizes = recs.iter().map(|r| r["events"].as_u64().unwrap()).collect();
        if sizes.iter().sum::<u64>() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sizes.iter().sum::<u64>(), n, "{sizes:?}");
    assert!(
        sizes.iter().all(|s| *s <= 50),
        "at most batch_max: {sizes:?}"
    );
    assert!(sizes.len() < n as usize, "events were batched: {sizes:?}");
    assert_eq!(info["stats"]["invocations"], sizes.len(), "{info}");
    // One alert per reading above the threshold, each with its own stable id.
    let alerts = get(&format!("{}/api/v1/alerts", http(&edge))).await.1;
    let alerts = alerts["alerts"].as_array().unwrap().clone();
    assert_eq!(alerts.len(), 12, "{alerts:?}");
    let ids: std::collections::BTreeSet<&str> =
        alerts.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 12, "{ids:?}");
    assert!(
        ids.iter()
            .all(|i| i.starts_with("threshold:") && i.ends_with(":0")),
        "{ids:?}"
    );
    assert!(
        alerts
            .iter()
            .all(|a| a["device"] == "plant-1/line-1/press-01")
    );
    let mut stamps: Vec<i64> = alerts
        .iter()
        .map(|a| a["event_ts_ms"].as_i64().unwrap())
        .collect();
    stamps.sort();
    assert_eq!(
        stamps,
        (1..=12).map(|k| T0 + 10_000 * k).collect::<Vec<_>>()
    );
    edge.shutdown().await;
}

/// Spins for up to a millisecond per event and counts them in `n`.
const SLOW_COUNTER: &str = r#"(module
  (import "millrace" "now_ms" (func $now (result i64)))
  (import "millrace" "kv_get" (func $kv_get (param i32 i32 i32 i32) (result i32)))
  (import "millrace" "kv_set" (func $kv_set (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "n")
  (func (export "handle") (result i32)
    (local $until i64)
    (local.set $until (i64.add (call $now) (i64.const 1)))
    (loop $spin (br_if $spin (i64.lt_s (call $now) (local.get $until))))
    (i64.store (i32.const 8) (i64.const 0))
    (drop (call $kv_get (i32.const 0) (i32.const 1) (i32.const 8) (i32.const 8)))
    (i64.store (i32.const 8) (i64.add (i64.load (i32.const 8)) (i64.const 1)))
    (drop (call $kv_set (i32.const 0) (i32.const 1) (i32.const 8) (i32.const 8)))
    (i32.const 0)))"#;

/// A function's replay status, once it ended (`state` no longer counting or running).
async fn replay_end(edge: &Edge, name: &str) -> Value {
    let url = format!("{}/api/v1/functions/{name}", http(edge));
    for _ in 0..3000 {
        let r = get(&url).await.1["replay"].clone();
        if matches!(r["state"].as_str(), Some("done" | "cancelled" | "failed")) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("replay of {name} did not end: {}", get(&url).await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_over_stored_history_builds_the_state_the_live_run_built() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let body = serde_json::json!({ "module_wat": wat("scrap_rate.wat"), "topics": ["factory/+/+/+/part"], "timeout_ms": SLACK });
    assert_eq!(deploy(&edge, "live", body.clone()).await.0, 201);
    // Two machines make parts (every third one scrapped) while telemetry flows too.
    let mut tasks = vec![];
    let mut n = 0;
    for m in ["press-01", "press-02"] {
        let (client, task) = device(&edge, m, Some((USER, PASS))).await.unwrap();
        tasks.push(task);
        for seq in 1..=60u64 {
            let outcome = if seq % 3 == 0 {
                PartOutcome::Scrap
            } else {
                PartOutcome::Good
            };
            let p = Event {
                machine: MachineId::new("plant-1", "line-1", m).unwrap(),
                ..part(seq * 2, outcome)
            };
            publish(&client, &p).await;
            publish(&client, &temp_of(m, seq * 2 + 1)).await;
            n += 2;
        }
    }
    wait_stored(&edge, n, 0).await;
    let live_url = format!("{}/api/v1/functions/live", http(&edge));
    let mut info = get(&live_url).await.1;
    for _ in 0..1500 {
        if info["stats"]["events"] == 120 && info["lag"]["events"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        info = get(&live_url).await.1;
    }
    assert_eq!(info["stats"]["events"], 120, "{info}");
    let live = kv_counters(&edge, "live").await;
    assert_eq!(live["plant-1/line-1/press-01/scrap"], 20, "{live:?}");
    // The same module deployed later with a replay from before the first event: the same
    // state from history, then it goes live.
    let mut replayed = body.clone();
    replayed["replay_from"] = serde_json::json!((T0 - 1000).to_string());
    let (status, spec) = deploy(&edge, "replayed", replayed).await;
    assert_eq!(status, 201, "{spec}");
    let r = replay_end(&edge, "replayed").await;
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(
        (r["events_done"].as_u64(), r["events_total"].as_u64()),
        (Some(120), Some(120)),
        "{r}"
    );
    assert_eq!(kv_counters(&edge, "replayed").await, live);
    let recs = wait_invocations(&edge, "function=replayed&trigger=replay&limit=1000", 120).await;
    assert_eq!(
        recs.len(),
        120,
        "one invocation per part (the module takes no batches)"
    );
    // Live from then on: a new part reaches both.
    let (client, task) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    tasks.push(task);
    publish(&client, &part(1000, PartOutcome::Scrap)).await;
    let mut both = (live.clone(), live.clone());
    for _ in 0..1500 {
        both = (
            kv_counters(&edge, "live").await,
            kv_counters(&edge, "replayed").await,
        );
        if both.0["plant-1/line-1/press-01/scrap"] == 21
            && both.1["plant-1/line-1/press-01/scrap"] == 21
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(both.0, both.1);
    assert_eq!(both.1["plant-1/line-1/press-01/scrap"], 21);
    // The CLI replays with a progress bar (hidden with --json) and reports the outcome.
    let out = run_ok(Command::new(env!("CARGO_BIN_EXE_millrace-edge")).args([
        "fn",
        "--url",
        &http(&edge),
        "replay",
        "live",
        "--from",
        &(T0 - 1000).to_string(),
        "--to",
        &(T0 + 1_000_000).to_string(),
        "--json",
    ]));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["state"].as_str(), r["events_done"].as_u64()),
        (Some("done"), Some(120)),
        "{r}"
    );
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_can_be_cancelled_and_bad_replays_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let base = format!("{}/api/v1/functions", http(&edge));
    let body = serde_json::json!({ "module_wat": SLOW_COUNTER, "topics": ["factory/+/+/+/telemetry"], "timeout_ms": SLACK, "enabled": false });
    assert_eq!(deploy(&edge, "slow", body).await.0, 201);
    let (client, _task) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    for seq in 1..=3000 {
        publish(&client, &temp(seq, 20.0)).await;
    }
    wait_stored(&edge, 3000, 0).await;
    let http_client = reqwest::Client::new();
    let replay = |q: &str| http_client.post(format!("{base}/slow/replay?{q}"));
    // Bad requests change nothing.
    let now = chrono::Utc::now().timestamp_millis();
    for (q, status, needle) in [
        (format!("from={}&to={}", T0 + 10, T0), 400, "must be before"),
        (
            format!("from={}&to={}", now + 3_600_000, now + 7_200_000),
            400,
            "in the future",
        ),
        (
            format!("from={T0}&to={}", now + 3_600_000),
            400,
            "in the future",
        ),
        ("to=-1h".to_owned(), 400, "give `from`"),
        ("from=yesterday".to_owned(), 400, "from"),
        ("from=-1h&speed=2".to_owned(), 400, "speed"),
    ] {
        let (s, v) = send(replay(&q)).await;
        assert_eq!(s, status, "{q}: {v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{q}: {v}");
    }
    let (s, v) = send(http_client.post(format!("{base}/nope/replay?from=-1h"))).await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(get(&format!("{base}/slow")).await.1["replay"], Value::Null);
    let (s, v) = send(http_client.delete(format!("{base}/slow/replay"))).await;
    assert_eq!(s, 409, "nothing to cancel: {v}");
    // A long replay (a millisecond per event), cancelled: it stops, keeping what it did.
    let (s, v) = send(replay(&format!("from={}&to={}", T0, T0 + 10_000_000))).await;
    assert_eq!(s, 202, "{v}");
    let (s, v) = send(replay(&format!("from={}&to={}", T0, T0 + 10_000_000))).await;
    assert_eq!(s, 409, "one at a time: {v}");
    let (s, v) = send(http_client.delete(format!("{base}/slow/replay"))).await;
    assert_eq!(s, 200, "{v}");
    let r = replay_end(&edge, "slow").await;
    assert_eq!(r["state"], "cancelled", "{r}");
    let done = r["events_done"].as_u64().unwrap();
    assert!(done < 3000, "{r}");
    let n = kv_counters(&edge, "slow")
        .await
        .get("n")
        .copied()
        .unwrap_or(0);
    assert_eq!(n as u64, done, "the state holds exactly what it did");
    // A function without topic filters has nothing to replay.
    let (s, _) = deploy(
        &edge,
        "manual-only",
        serde_json::json!({ "module_wat": SLOW_COUNTER }),
    )
    .await;
    assert_eq!(s, 201);
    let (s, v) = send(http_client.post(format!("{base}/manual-only/replay?from=-1h"))).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("no topic filters"),
        "{v}"
    );
    // The CLI says what is wrong.
    let out = Command::new(env!("CARGO_BIN_EXE_millrace-edge"))
        .args([
            "fn",
            "--url",
            &http(&edge),
            "replay",
            "nope",
            "--from",
            "-1h",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404") && err.contains("no function named `nope`"),
        "{err}"
    );
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_cut_by_a_restart_resumes_and_counts_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let body = serde_json::json!({ "module_wat": SLOW_COUNTER, "topics": ["factory/+/+/+/telemetry"], "timeout_ms": SLACK, "enabled": false });
    assert_eq!(deploy(&edge, "slow", body).await.0, 201);
    let (client, task) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    let n = 1500;
    for seq in 1..=n {
        publish(&client, &temp(seq, 20.0)).await;
    }
    wait_stored(&edge, n, 0).await;
    task.abort();
    let url = format!("{}/api/v1/functions/slow", http(&edge));
    let (s, v) =
        send(reqwest::Client::new().post(format!("{url}/replay?from={T0}&to={}", T0 + 10_000_000)))
            .await;
    assert_eq!(s, 202, "{v}");
    // Stopped once it has done part of it (a millisecond per event).
    let mut r = get(&url).await.1["replay"].clone();
    for _ in 0..3000 {
        if r["events_done"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        r = get(&url).await.1["replay"].clone();
    }
    assert!(
        r["events_done"].as_u64().unwrap() < n,
        "stopped in the middle: {r}"
    );
    edge.shutdown().await;
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let r = replay_end(&edge, "slow").await;
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(
        (r["events_done"].as_u64(), r["events_total"].as_u64()),
        (Some(n), Some(n)),
        "{r}"
    );
    assert_eq!(
        kv_counters(&edge, "slow").await.get("n"),
        Some(&(n as i64)),
        "each event counted once"
    );
    edge.shutdown().await;
}

#[test]
fn a_function_left_behind_past_the_logs_retention_skips_counted() {
    let dir = tempfile::tempdir().unwrap();
    let day = Duration::from_secs(86_400);
    let store = Arc::new(
        Store::open(
            dir.path(),
            StoreOptions {
                sync_writes: false,
                telemetry_retention: day,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let f = Functions::start(
        store.clone(),
        Arc::new(WasmEngine::new().unwrap()),
        Arc::new(|_: &str, _: Vec<u8>| true),
        FunctionsConfig::default(),
        Arc::new(millrace_edge::functions::SystemClock),
    )
    .unwrap();
    let deploy = |name: &str| {
        f.deploy(
            name,
            DeployRequest {
                module_wat: Some(SLOW_ORDERED.into()),
                topics: vec!["factory/#".into()],
                timeout_ms: Some(SLACK),
                ..Default::default()
            },
        )
        .unwrap()
    };
    deploy("behind");
    deploy("current");
    f.set_enabled("behind", false).unwrap();
    let events: Vec<Event> = (1..=50).map(|s| temp_of("press-01", s)).collect();
    store.write(&events, &[]).unwrap();
    let n = |name: &str| {
        f.kv(name, b"n", 1)
            .unwrap()
            .first()
            .map(|(_, v)| i64::from_le_bytes(v.as_slice().try_into().unwrap()))
    };
    assert!(wait_until(Duration::from_secs(60), || n("current") == Some(50)));
    // The records are older than the retention a day from now: trimmed although `behind` has
    // not read them.
    let now = chrono::Utc::now().timestamp_millis();
    assert_eq!(
        store
            .trim_triggers(now + 2 * day.as_millis() as i64)
            .unwrap(),
        50
    );
    store.write(&[temp_of("press-01", 51)], &[]).unwrap();
    f.set_enabled("behind", true).unwrap();
    assert!(wait_until(Duration::from_secs(60), || n("behind") == Some(1)));
    let info = f.info("behind").unwrap();
    assert_eq!(info["stats"]["skipped"], 50, "{info}");
    assert_eq!(info["stats"]["invocations"], 1, "{info}");
    assert_eq!(info["lag"]["events"], 0, "{info}");
    // Once every cursor is past them, records are trimmed whatever their age.
    assert!(wait_until(Duration::from_secs(60), || n("current") == Some(51)));
    assert_eq!(store.trim_triggers(now).unwrap(), 1);
    f.shutdown();
}

fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from)
}
