//! The simulator binary against a real Mosquitto broker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use millrace_shared::Event;
use millrace_tests::{Mosquitto, Recorder, read_json};

const SIM: &str = env!("CARGO_BIN_EXE_millrace-sim");

fn sim(args: &[&str]) -> std::process::Output {
    let out = Command::new(SIM)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run millrace-sim");
    assert!(
        out.status.success(),
        "millrace-sim {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Waits until the recorder has `sent` messages, then checks that no more arrive.
async fn expect_exactly(recorder: &Recorder, sent: u64, what: &str) {
    let got = recorder
        .wait_for(sent as usize, Duration::from_secs(60))
        .await;
    // Anything more than `sent` would be a duplicate: give stragglers a moment to show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(got, sent as usize, "{what}");
    assert_eq!(recorder.count(), sent as usize, "{what}");
}

const SHIFT: &[&str] = &[
    "--seed",
    "42",
    "--start",
    "2026-01-05T06:00:00Z",
    "--duration",
    "8h",
    "--telemetry-interval",
    "1m",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shift_published_to_mosquitto_arrives_complete() {
    let broker = Mosquitto::start();
    let recorder = Recorder::start(broker.port, "#", None).await;
    let dir = tempfile::tempdir().unwrap();
    let (truth, report) = (
        dir.path().join("truth.json"),
        dir.path().join("report.json"),
    );
    let mut args: Vec<String> = ["run", "--broker", &broker.url(), "--speed", "0", "--quiet"]
        .map(String::from)
        .to_vec();
    args.extend(SHIFT.iter().map(|s| s.to_string()));
    args.extend(
        [
            "--truth",
            truth.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ]
        .map(String::from),
    );
    tokio::task::spawn_blocking(move || sim(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap();

    let report = read_json(&report);
    let sent = report["messages"].as_u64().unwrap();
    assert_eq!(
        report["acked"].as_u64().unwrap(),
        sent,
        "QoS 1: every publish acknowledged"
    );
    expect_exactly(&recorder, sent, "the shift").await;

    // Every message decodes, per-machine sequences have no gaps, kinds match the truth.
    let truth = read_json(&truth);
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in recorder.messages() {
        let e = Event::decode(&m.topic, &m.payload).unwrap_or_else(|e| panic!("{}: {e}", m.topic));
        *kinds.entry(e.kind().as_str().into()).or_default() += 1;
        seqs.entry(e.machine.to_string()).or_default().push(e.seq);
    }
    assert_eq!(serde_json::to_value(&kinds).unwrap(), truth["events"]);
    assert_eq!(kinds.values().sum::<u64>(), sent);
    assert_eq!(seqs.len(), 12);
    for m in truth["machines"].as_array().unwrap() {
        let key = format!(
            "{}/{}/{}",
            m["site"].as_str().unwrap(),
            m["line"].as_str().unwrap(),
            m["machine"].as_str().unwrap()
        );
        let mut s = seqs.remove(&key).unwrap();
        s.sort_unstable();
        let expected: Vec<u64> = (1..=m["last_seq"].as_u64().unwrap()).collect();
        assert_eq!(s, expected, "{key}");
    }
    recorder.stop().await;

    // The same seed gives byte-identical ground truth, with or without a broker.
    let offline = dir.path().join("offline.json");
    let mut args = vec!["truth", "--out", offline.to_str().unwrap()];
    args.extend_from_slice(SHIFT);
    sim(&args);
    assert_eq!(
        std::fs::read(dir.path().join("truth.json")).unwrap(),
        std::fs::read(&offline).unwrap()
    );
}

#[test]
fn same_seed_gives_byte_identical_truth_and_another_seed_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let run = |seed: &str, name: &str| {
        let out = dir.path().join(name);
        sim(&[
            "truth",
            "--seed",
            seed,
            "--start",
            "2026-01-05T00:00:00Z",
            "--duration",
            "2days",
            "--out",
            out.to_str().unwrap(),
        ]);
        std::fs::read(out).unwrap()
    };
    let (a, b, c) = (run("7", "a.json"), run("7", "b.json"), run("8", "c.json"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    let t: serde_json::Value = serde_json::from_slice(&a).unwrap();
    assert_eq!(t["machines"].as_array().unwrap().len(), 12);
    assert_eq!(t["lines"].as_array().unwrap().len(), 3);
    assert_eq!(t["machines"][0]["shifts"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_mode_sends_each_kind_of_bad_traffic_and_the_valid_events_survive() {
    let broker = Mosquitto::start();
    let recorder = Recorder::start(broker.port, "#", None).await;
    let dir = tempfile::tempdir().unwrap();
    let (truth, report) = (
        dir.path().join("truth.json"),
        dir.path().join("report.json"),
    );
    let url = broker.url();
    let (t, r) = (
        truth.to_str().unwrap().to_owned(),
        report.to_str().unwrap().to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        sim(&[
            "run",
            "--broker",
            &url,
            "--speed",
            "0",
            "--quiet",
            "--faults",
            "0.05",
            "--seed",
            "3",
            "--start",
            "2026-01-05T06:00:00Z",
            "--duration",
            "4h",
            "--telemetry-interval",
            "1m",
            "--lines",
            "1",
            "--truth",
            &t,
            "--report",
            &r,
        ])
    })
    .await
    .unwrap();
    let report = read_json(&report);
    let truth = read_json(&truth);
    let faults = &report["faults"];
    for f in [
        "malformed",
        "bad_field",
        "unknown_topic",
        "oversized",
        "duplicate",
        "disconnect",
    ] {
        assert!(
            faults[f].as_u64().unwrap_or(0) > 0,
            "fault {f} injected: {faults}"
        );
    }
    let sent = report["messages"].as_u64().unwrap() as usize;
    recorder.wait_for(sent, Duration::from_secs(60)).await;
    let mut valid = BTreeSet::new();
    let (mut refused, mut duplicates) = (BTreeMap::<&str, u64>::new(), 0u64);
    for m in recorder.messages() {
        match Event::decode(&m.topic, &m.payload) {
            Ok(e) => {
                if !valid.insert((e.machine.to_string(), e.seq)) {
                    duplicates += 1;
                }
            }
            Err(e) => *refused.entry(e.reason()).or_default() += 1,
        }
    }
    // Every valid event arrived (QoS 1 survives the disconnects), and every bad message was refused.
    assert_eq!(valid.len() as u64, truth["total_events"].as_u64().unwrap());
    let n = |k: &str| faults[k].as_u64().unwrap();
    assert_eq!(
        refused.get("bad_json").copied().unwrap_or(0)
            + refused.get("bad_field").copied().unwrap_or(0),
        n("malformed") + n("bad_field")
    );
    assert_eq!(refused["too_large"], n("oversized"));
    assert_eq!(
        refused.get("unknown_kind").copied().unwrap_or(0)
            + refused.get("bad_topic").copied().unwrap_or(0),
        n("unknown_topic")
    );
    // Retransmissions after a disconnect may add duplicates of their own.
    assert!(duplicates >= n("duplicate"));
    recorder.stop().await;
}

#[test]
fn bad_flags_and_files_get_clear_errors() {
    let fail = |args: &[&str]| {
        let out = Command::new(SIM).args(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(
        fail(&["truth", "--start", "yesterday"]).contains("--start `yesterday` is not RFC 3339")
    );
    assert!(
        fail(&["truth", "--config", "/nonexistent.toml"])
            .contains("cannot read factory file /nonexistent.toml")
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("f.toml");
    std::fs::write(&bad, "[profile]\nscrap_rate = 2.0\n").unwrap();
    assert!(
        fail(&["truth", "--config", bad.to_str().unwrap()])
            .contains("`profile.scrap_rate` = 2 is out of range")
    );
    // Like a device, `run` waits for a broker that is not there (yet), saying so.
    let mut waiting = Command::new(SIM)
        .args(["run", "--broker", "mqtt://127.0.0.1:1", "--duration", "1m"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(waiting.stderr.take().unwrap()));
    let said = lines
        .by_ref()
        .take(20)
        .map(Result::unwrap)
        .find(|l| l.contains("trying again"))
        .expect("a line saying it tries again");
    assert!(
        said.contains("cannot connect to the broker; trying again")
            && said.contains("connection refused: is a broker listening there?"),
        "{said}"
    );
    waiting.kill().unwrap();
    waiting.wait().unwrap();
    // `load` tries for as long as its run would have lasted.
    assert!(
        fail(&["load", "--broker", "mqtt://127.0.0.1:1", "--duration", "1s"])
            .contains("cannot connect to broker 127.0.0.1:1")
    );
    assert!(fail(&["run", "--qos", "3"]).contains("3 is not in 0..=2"));
    assert!(fail(&["run", "--speed", "-1", "--duration", "1m"]).contains("--speed must be 0"));
    assert!(
        fail(&["run", "--faults", "2", "--duration", "1m"]).contains("--faults is a probability")
    );
    assert!(fail(&["run", "--start", "-soon"]).contains("`soon` is not a duration"));
    let help = Command::new(SIM).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--seed",
        "--speed",
        "--faults",
        "--truth",
        "--telemetry-interval",
        "--duration",
    ] {
        assert!(help.contains(flag), "{flag} in --help");
    }
    let _ = Path::new(SIM);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_mode_delivers_every_event_once_at_qos_0_and_1() {
    let broker = Mosquitto::start();
    for qos in ["1", "0"] {
        let recorder = Recorder::start(broker.port, "factory/bench/+/+/telemetry", None).await;
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("load.json");
        let args: Vec<String> = [
            "load",
            "--broker",
            &broker.url(),
            "--devices",
            "3",
            "--rate",
            "1500",
            "--duration",
            "1s",
            "--qos",
            qos,
            "--site",
            "bench",
            "--report",
            report.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        tokio::task::spawn_blocking(move || {
            sim(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap();
        let report = read_json(&report);
        let sent = report["published"].as_u64().unwrap();
        assert!(sent > 0, "{report}");
        let acked = if qos == "1" { sent } else { 0 };
        assert_eq!(
            report["acked"].as_u64().unwrap(),
            acked,
            "QoS {qos}: {report}"
        );
        expect_exactly(&recorder, sent, &format!("load at QoS {qos}")).await;
        // Per device: sequence numbers 1..=n, each once, every payload a valid event.
        let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for m in recorder.messages() {
            let e =
                Event::decode(&m.topic, &m.payload).unwrap_or_else(|e| panic!("{}: {e}", m.topic));
            assert_eq!(e.machine.site.as_str(), "bench");
            seqs.entry(e.machine.to_string()).or_default().push(e.seq);
        }
        assert_eq!(seqs.len(), 3, "{:?}", seqs.keys());
        for (device, mut s) in seqs {
            s.sort_unstable();
            let n = s.len() as u64;
            assert_eq!(s, (1..=n).collect::<Vec<_>>(), "QoS {qos}, {device}");
        }
        recorder.stop().await;
    }
}

#[test]
fn load_mode_names_a_refused_login() {
    // A broker that answers every CONNECT with "not authorized" (rumqttd instead closes the
    // socket without a CONNACK: both are reported).
    for answer in [&[0x20u8, 0x02, 0x00, 0x05][..], &[][..]] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Every attempt gets the same answer (a device tries a few times before it takes a
        // closed connection for a refused login). Left running: it ends with the test.
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for sock in listener.incoming() {
                let mut sock = sock.unwrap();
                // The whole CONNECT (short: a one-byte remaining length), so that closing
                // sends FIN, not a reset for unread bytes.
                let mut head = [0u8; 2];
                sock.read_exact(&mut head).unwrap();
                assert_eq!(head[0], 0x10, "CONNECT first");
                let mut rest = vec![0u8; usize::from(head[1])];
                sock.read_exact(&mut rest).unwrap();
                sock.write_all(answer).unwrap();
                sock.shutdown(std::net::Shutdown::Write).unwrap();
                // Until the client has gone.
                let _ = sock.read_to_end(&mut rest);
            }
        });
        let out = Command::new(SIM)
            .args(["load", "--broker", &format!("mqtt://127.0.0.1:{port}")])
            .args(["--devices", "1", "--duration", "30s", "--qos", "1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let expected = if answer.is_empty() {
            "the broker closed the connection before CONNACK: wrong username or password"
        } else {
            "refused: NotAuthorized"
        };
        assert!(
            err.contains(&format!(
                "cannot connect to broker 127.0.0.1:{port}: {expected}"
            )),
            "{err}"
        );
    }
}
