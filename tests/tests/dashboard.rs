//! The dashboard in a real browser (headless Chromium driven by `tests/browser/dashboard.mjs`):
//! what it shows is checked against the REST API it is built on.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use millrace_tests::run_ok;
use serde_json::{Value, json};

use super::{
    CloudProcess, EdgeProcess, SCRAP_ALERT, bin, cloud_config, edge_config, edge_token,
    manifest_dir, publish_and_sync, with_sync,
};

/// Headless Chromium on the dashboard, one command at a time.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Browser {
    fn start() -> Self {
        let dir = manifest_dir().join("browser");
        assert!(
            dir.join("node_modules/playwright-core").exists()
                && Path::new("/usr/bin/chromium").exists(),
            "the browser test needs Debian's chromium and `npm ci` in tests/browser (./millrace test does both)"
        );
        let mut child = Command::new("node")
            .current_dir(&dir)
            .arg("dashboard.mjs")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Runs one command; what the page shows afterwards.
    fn run(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        let line = self
            .lines
            .next()
            .expect("the browser driver answers")
            .unwrap();
        let out: Value = serde_json::from_str(&line).unwrap();
        assert!(out.get("error").is_none(), "{cmd}: {out}");
        assert_eq!(out["console_errors"], json!([]), "{cmd}: page errors");
        eprintln!("browser: {cmd} took {} ms", out["ms"]);
        out
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A percentage as the page shows it (`84.2%`).
fn shown_pct(v: &Value) -> f64 {
    v.as_str()
        .unwrap()
        .trim_end_matches('%')
        .parse()
        .unwrap_or_else(|_| panic!("{v} is a percentage"))
}

/// The rows a children table shows equal the API's OEE report for the same range: entities,
/// parts and scrap exactly; ratios as rounded to 0.1 %.
fn assert_children_match(page: &Value, api: &Value) {
    let shown = page["children"].as_array().expect("a children table");
    let rows = api["rows"].as_array().unwrap();
    assert_eq!(
        shown.iter().map(|r| &r["entity"]).collect::<Vec<_>>(),
        rows.iter().map(|r| &r["entity"]).collect::<Vec<_>>(),
        "{page}"
    );
    for (s, r) in shown.iter().zip(rows) {
        assert_eq!(s["parts"], r["total"], "{}", r["entity"]);
        assert_eq!(s["scrap"], r["scrap"], "{}", r["entity"]);
        for k in ["oee", "availability", "performance", "quality"] {
            let api = r[k].as_f64().unwrap() * 100.0;
            assert!(
                (shown_pct(&s[k]) - api).abs() <= 0.051,
                "{} {k}: shown {} vs API {api}",
                r["entity"],
                s[k]
            );
        }
    }
}

fn range(page: &Value) -> String {
    format!("from={}&to={}", page["from"], page["to"])
}

/// The dashboard against the API: drill-down from all sites to a machine (numbers equal the OEE
/// report's), the machine's state timeline (intervals equal `/reports/states`, whose times per
/// state equal the OEE report's), back, a range change, an alert arriving live, bad input in the
/// URL (a malformed range, an unknown site and machine), the API going down and coming back, and
/// screenshots at tablet and wall-display widths.
#[test]
fn the_dashboard_drills_down_shows_states_and_updates_live_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let (token, digest) = edge_token("dash");
    let cloud_config = cloud_config(dir.path(), millrace_tests::free_port(), "dash", &digest);
    // Production around the clock in both the simulator and the cloud's calendar, so that what
    // the last hours hold does not depend on the time of day the test runs.
    let around_the_clock = "shifts = [{ name = \"day\", start = \"00:00:00\", end = \"00:00:00\", breaks = [{ start = \"12:00:00\", minutes = 30 }] }]\n";
    let mut text = std::fs::read_to_string(&cloud_config).unwrap();
    text.push_str(&format!("[master.calendar]\n{around_the_clock}"));
    std::fs::write(&cloud_config, text).unwrap();
    let sim_config = dir.path().join("factory.toml");
    std::fs::write(&sim_config, format!("[calendar]\n{around_the_clock}")).unwrap();
    let sim_config = sim_config.to_str().unwrap();
    let mut cloud = CloudProcess::start(&cloud_config);
    let config = edge_config(dir.path(), 0);
    with_sync(&config, &cloud.http, "");
    let env = [
        ("MILLRACE_EDGE_EDGE_ID", "dash"),
        ("MILLRACE_EDGE_SYNC__TOKEN", token.as_str()),
    ];
    let edge = EdgeProcess::start_with_env(&config, &env);
    // Ideal cycle times through the API, as the demo does.
    let truth = Command::new(bin("millrace-sim"))
        .args(["truth", "--config", sim_config, "--seed", "4"])
        .args(["--duration", "1h", "--start", "2026-01-05T00:00:00Z"])
        .output()
        .unwrap();
    let truth: Value = serde_json::from_slice(&truth.stdout).unwrap();
    let specs: Vec<Value> = truth["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| json!({"site": m["site"], "line": m["line"], "machine": m["machine"], "ideal_cycle_time_ms": m["ideal_cycle_time_ms"]}))
        .collect();
    cloud.put_machines(&Value::Array(specs));
    let sim = |seed: &str, start: &str, duration: &str| {
        publish_and_sync(
            &edge,
            &[
                "--config",
                sim_config,
                "--seed",
                seed,
                "--start",
                start,
                "--duration",
                duration,
                "--telemetry-interval",
                "1m",
            ],
        );
    };
    sim("4", "-6h", "5h");

    let mut b = Browser::start();
    let root = format!("{}/", cloud.http);
    // All sites: one row per site.
    let page = b.run(json!({ "open": root }));
    assert_eq!(page["state"], "ok", "{page}");
    assert_eq!(page["banner"], Value::Null, "{page}");
    assert_eq!(page["range"], "24h");
    assert!(page["to"].as_i64().unwrap() - page["from"].as_i64().unwrap() == 86_400_000);
    let api = cloud.get(&format!(
        "/api/v1/reports/oee?level=site&period=total&{}",
        range(&page)
    ));
    assert_children_match(&page, &api);
    let site = page["children"][0]["entity"].as_str().unwrap().to_owned();

    // Drill down: a site's lines, a line's machines.
    let page = b.run(json!({ "click": format!("#children a[data-at='{site}']") }));
    assert!(
        page["url"]
            .as_str()
            .unwrap()
            .contains(&format!("at={site}"))
    );
    let api = cloud.get(&format!(
        "/api/v1/reports/oee?level=line&period=total&site={site}&{}",
        range(&page)
    ));
    assert_children_match(&page, &api);
    assert_eq!(page["children"].as_array().unwrap().len(), 3, "three lines");
    let line = page["children"][0]["entity"].as_str().unwrap().to_owned();
    let page = b.run(json!({ "click": format!("#children a[data-at='{line}']") }));
    let (s, l) = line.split_once('/').unwrap();
    let api = cloud.get(&format!(
        "/api/v1/reports/oee?level=machine&period=total&site={s}&line={l}&{}",
        range(&page)
    ));
    assert_children_match(&page, &api);
    assert_eq!(page["crumbs"], json!(["All sites", s, l]));
    // Tiles: the line's own row.
    let api_line = cloud.get(&format!(
        "/api/v1/reports/oee?level=line&period=total&site={s}&line={l}&{}",
        range(&page)
    ));
    assert_eq!(
        page["kpis"]["parts"].as_str().unwrap().replace(',', ""),
        api_line["rows"][0]["total"].to_string()
    );
    // The line's timeline: exactly the intervals of the API for the range, at the resolution
    // the page asked for (one pixel of its chart).
    let resolution = page["resolution"].as_i64().unwrap();
    assert!(resolution >= 1, "{page}");
    let states = cloud.get(&format!(
        "/api/v1/reports/states?site={s}&line={l}&resolution={resolution}&{}",
        range(&page)
    ));
    assert_eq!(page["intervals"], states["intervals"]);
    assert!(page["timeline_items"].as_u64().unwrap() > 0, "{page}");
    let machine = page["children"][0]["entity"].as_str().unwrap().to_owned();

    // A machine: its timeline, whose time per state is what the OEE report counted (merged
    // intervals tell their time per state).
    let page = b.run(json!({ "click": format!("#children a[data-at='{machine}']") }));
    assert_eq!(page["children"], Value::Null, "no level below a machine");
    let states = cloud.get(&format!(
        "/api/v1/reports/states?machine={machine}&resolution={}&{}",
        page["resolution"],
        range(&page)
    ));
    let intervals = states["intervals"].as_array().unwrap();
    assert!(intervals.len() > 3, "{states}");
    assert_eq!(page["intervals"], states["intervals"]);
    let oee = cloud.get(&format!(
        "/api/v1/reports/oee?machine={machine}&period=total&{}",
        range(&page)
    ));
    let times = &oee["rows"][0]["times"];
    for state in ["running", "idle", "planned_stop", "changeover", "down"] {
        let sum: i64 = intervals
            .iter()
            .map(|i| {
                if i["merged"].is_u64() {
                    i["state_ms"][state].as_i64().unwrap_or(0)
                } else if i["state"] == state {
                    i["end_ms"].as_i64().unwrap() - i["start_ms"].as_i64().unwrap()
                } else {
                    0
                }
            })
            .sum();
        assert_eq!(
            Some(sum),
            times[format!("{state}_ms")].as_i64(),
            "{state}: intervals vs OEE report"
        );
    }
    for w in intervals.windows(2) {
        assert!(w[0]["end_ms"].as_i64() <= w[1]["start_ms"].as_i64());
        assert!(
            w[0]["end_ms"] != w[1]["start_ms"]
                || w[0]["state"] != w[1]["state"]
                || w[0]["reason"] != w[1]["reason"]
                || w[0]["merged"].is_u64()
                || w[1]["merged"].is_u64(),
            "merged where nothing changed: {w:?}"
        );
    }
    assert!(!states["shifts"].as_array().unwrap().is_empty());

    // Back: the line again; then a range change, kept in the URL.
    let page = b.run(json!({ "back": true }));
    assert!(page["children"].as_array().is_some(), "{page}");
    assert!(
        page["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("at={}", line.replace('/', "%2F")))
    );
    let page = b.run(json!({ "select": ["#range", "8h"] }));
    assert!(page["url"].as_str().unwrap().contains("range=8h"), "{page}");
    assert_eq!(
        page["to"].as_i64().unwrap() - page["from"].as_i64().unwrap(),
        8 * 3_600_000
    );
    let api = cloud.get(&format!(
        "/api/v1/reports/oee?level=machine&period=total&site={s}&line={l}&{}",
        range(&page)
    ));
    assert_children_match(&page, &api);

    // Both widths, at the top level: the pictures for the README.
    let artifacts = manifest_dir().join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    for width in [1024, 1920] {
        let shot = artifacts.join(format!("dashboard-{width}.png"));
        let _ = std::fs::remove_file(&shot);
        b.run(json!({ "open": root, "width": width }));
        b.run(json!({ "shot": shot }));
        assert!(std::fs::metadata(&shot).unwrap().len() > 20_000);
    }

    // An alert arrives: a function on the edge raises one per scrapped part; the open page shows
    // them without a reload.
    let page = b.run(json!({ "open": root }));
    assert_eq!(page["alert_rows"], json!([]));
    let wat = dir.path().join("scrap_alert.wat");
    std::fs::write(&wat, SCRAP_ALERT).unwrap();
    run_ok(
        Command::new(bin("millrace-edge"))
            .args(["fn", "--url", &edge.http, "deploy", "scrap-alert"])
            .arg(&wat)
            .args(["--topic", "factory/+/+/+/part"]),
    );
    sim("5", "-50min", "40min");
    // Every alert raised and synced: then the page must come to show as many.
    assert!(millrace_tests::wait_until(
        std::time::Duration::from_secs(120),
        || edge.get("/api/v1/functions/scrap-alert")["lag"]["events"] == 0
            && super::outbox_drained(&edge)
    ));
    let raised = cloud.get("/api/v1/alerts?from=-1d&limit=50")["alerts"]
        .as_array()
        .unwrap()
        .len();
    assert!(raised > 0, "scrapped parts raised alerts");
    let page = b.run(json!({
        "wait": format!("document.querySelectorAll('#alerts td.sev').length === {raised}")
    }));
    let shown = page["alert_rows"].as_array().unwrap();
    let api = cloud.get(&format!("/api/v1/alerts?limit=50&{}", range(&page)));
    let api = api["alerts"].as_array().unwrap();
    assert_eq!(shown.len(), api.len());
    assert_eq!(shown[0][1], "critical");
    assert_eq!(shown[0][4], api[0]["message"]);
    assert_eq!(page["edges"][0]["edge"], "dash");
    assert!(
        page["edges"][0]["status"]
            .as_str()
            .unwrap()
            .contains("online")
    );
    // The edge reports its outbox with each batch: caught up after the sync above, and seen.
    let edges = cloud.get("/api/v1/edges");
    assert_eq!(edges["edges"][0]["outbox"]["waiting_items"], 0, "{edges}");
    assert_eq!(edges["edges"][0]["sync_lag_ms"], 0, "{edges}");
    assert!(edges["edges"][0]["last_seen_ms"].as_i64().unwrap() > 0);
    assert_eq!(edges["edges"][0]["online"], true, "{edges}");
    assert_eq!(page["edges"][0]["sync"], "caught up", "{page}");

    // Bad input in the address: said plainly, and the page recovers.
    let page = b.run(json!({ "open": format!("{root}?range=banana") }));
    assert!(
        page["banner"]["text"]
            .as_str()
            .unwrap()
            .contains("range=banana is not a range"),
        "{page}"
    );
    let page = b.run(json!({ "wait_updates": 0 }));
    assert_eq!(page["state"], "ok");
    assert_eq!(page["range"], "24h");
    let page = b.run(json!({
        "open": format!("{root}?at={s}/{l}/no-such-machine"),
        "expect_failures": ["no-such-machine"]
    }));
    assert_eq!(page["banner"]["kind"], "error", "{page}");
    assert!(
        page["banner"]["text"]
            .as_str()
            .unwrap()
            .contains("no machine `")
    );
    let page = b.run(json!({ "open": format!("{root}?at=no-such-site") }));
    assert!(
        page["banner"]["text"]
            .as_str()
            .unwrap()
            .contains("There is no site no-such-site"),
        "{page}"
    );
    let page = b.run(json!({ "click": "#banner a[data-at='']" }));
    assert_eq!(page["banner"], Value::Null);
    assert!(!page["children"].as_array().unwrap().is_empty());

    // The API goes down: the page says so; it comes back: the page shows the data again.
    cloud.stop();
    let page = b.run(json!({ "select": ["#range", "7d"] }));
    assert_eq!(page["state"], "down", "{page}");
    assert!(
        page["banner"]["text"]
            .as_str()
            .unwrap()
            .contains("cannot be reached"),
        "{page}"
    );
    cloud = CloudProcess::start(&cloud_config);
    let page = b.run(json!({ "wait": "document.body.dataset.state === 'ok'" }));
    assert_eq!(page["banner"], Value::Null);
    assert_eq!(page["range"], "7d");
    drop(b);
    edge.stop();
    cloud.stop();
}
