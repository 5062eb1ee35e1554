//! The edge with real components: the embedded broker on port 0, rumqttc and mosquitto_pub as
//! devices, RocksDB in a temp dir, the HTTP API over real HTTP.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use millrace_edge::Edge;
use millrace_edge::config::{DeviceUser, EdgeConfig};
use millrace_shared::{Event, EventBody, MachineId, MachineState, Reading, StateChange, Telemetry};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;

const USER: &str = "line-1";
const PASS: &str = "correct horse battery";
const T0: i64 = 1_767_600_000_000;

fn password_hash() -> String {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| millrace_edge::broker::hash_password(PASS))
        .clone()
}

fn config(dir: &Path) -> EdgeConfig {
    let mut c = EdgeConfig {
        data_dir: dir.to_path_buf(),
        ..Default::default()
    };
    c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    c.http.listen = "127.0.0.1:0".parse().unwrap();
    c.mqtt.users = vec![DeviceUser {
        username: USER.into(),
        password_hash: password_hash(),
    }];
    c.store.sync_writes = false;
    c.store.retention.telemetry = Duration::ZERO;
    c.store.retention.events = Duration::ZERO;
    c.store.retention.dead_letters = Duration::ZERO;
    c
}

async fn device(
    edge: &Edge,
    id: &str,
    creds: Option<(&str, &str)>,
) -> Result<(AsyncClient, tokio::task::JoinHandle<()>), rumqttc::ConnectionError> {
    let mut o = MqttOptions::new(id, "127.0.0.1", edge.mqtt_addr.port());
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    let (client, mut el) = AsyncClient::new(o, 1000);
    loop {
        match el.poll().await? {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    let task = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    Ok((client, task))
}

fn http(edge: &Edge) -> String {
    format!("http://{}", edge.http_addr)
}

/// The temperature points of the test machine in `[from, to)`.
fn temperature_url(edge: &Edge, from: i64, to: i64) -> String {
    format!(
        "{}/api/v1/points?series=plant-1/line-1/press-01/temperature&from={from}&to={to}",
        http(edge)
    )
}

/// The state, part and operator events of the test machine in `[from, to)`.
fn events_url(edge: &Edge, from: i64, to: i64) -> String {
    format!(
        "{}/api/v1/events?machine=plant-1/line-1/press-01&from={from}&to={to}",
        http(edge)
    )
}

async fn get(url: &str) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The edge's Prometheus text.
async fn metrics(edge: &Edge) -> String {
    reqwest::get(format!("{}/metrics", http(edge)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn status(edge: &Edge) -> Value {
    get(&format!("{}/api/v1/status", http(edge))).await.1
}

/// Waits until the edge has stored `events` events and `dead` dead letters.
async fn wait_stored(edge: &Edge, events: u64, dead: u64) -> Value {
    for _ in 0..1500 {
        let s = status(edge).await;
        if s["ingest"]["events"].as_u64() >= Some(events)
            && s["ingest"]["dead_letters"].as_u64() >= Some(dead)
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not stored in time: {}", status(edge).await);
}

fn machine() -> MachineId {
    MachineId::new("plant-1", "line-1", "press-01").unwrap()
}

fn temp(seq: u64, value: f64) -> Event {
    Event {
        machine: machine(),
        ts_ms: T0 + seq as i64 * 1000,
        seq,
        body: EventBody::Telemetry(Telemetry {
            readings: vec![Reading {
                name: "temperature".into(),
                value,
                unit: "degC".into(),
            }],
        }),
    }
}

fn state(seq: u64) -> Event {
    Event {
        machine: machine(),
        ts_ms: T0 + seq as i64 * 1000,
        seq,
        body: EventBody::State(StateChange {
            state: MachineState::Running,
            reason: None,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_at_every_qos_are_stored_and_queryable_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let (client, _t) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];
    for seq in 1..=300u64 {
        let e = temp(seq, 20.0 + seq as f64 / 100.0);
        client
            .publish(e.topic(), qos[(seq % 3) as usize], false, e.to_payload())
            .await
            .unwrap();
    }
    let s = state(301);
    client
        .publish(s.topic(), QoS::AtLeastOnce, false, s.to_payload())
        .await
        .unwrap();
    wait_stored(&edge, 301, 0).await;

    let (code, series) = get(&format!("{}/api/v1/series", http(&edge))).await;
    assert_eq!(code, 200);
    assert_eq!(
        series["series"][0]["name"],
        "plant-1/line-1/press-01/temperature"
    );
    assert_eq!(series["series"][0]["unit"], "degC");
    let url = temperature_url(&edge, T0, T0 + 1_000_000);
    let (code, pts) = get(&url).await;
    assert_eq!(code, 200, "{pts}");
    let pts = pts["points"].as_array().unwrap().clone();
    assert_eq!(pts.len(), 300);
    assert_eq!(pts[0], serde_json::json!([T0 + 1000, 20.01]));
    let (_, ds) = get(&format!("{url}&step=1m")).await;
    let buckets = ds["buckets"].as_array().unwrap();
    assert_eq!(
        buckets
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>(),
        300
    );
    let (_, evs) = get(&events_url(&edge, T0, T0 + 1_000_000)).await;
    assert_eq!(evs["events"].as_array().unwrap().len(), 1);
    assert_eq!(evs["events"][0]["seq"], 301);

    edge.shutdown().await;
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let (_, again) = get(&temperature_url(&edge, T0, T0 + 1_000_000)).await;
    assert_eq!(
        again["points"].as_array().unwrap(),
        &pts,
        "restart keeps every point"
    );
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    assert!(
        device(&edge, "intruder", Some((USER, "wrong password")))
            .await
            .is_err()
    );
    assert!(device(&edge, "anonymous", None).await.is_err());
    assert!(
        device(&edge, "nobody", Some(("nobody", PASS)))
            .await
            .is_err()
    );
    assert!(device(&edge, "ok", Some((USER, PASS))).await.is_ok());
    edge.shutdown().await;
}

fn mosquitto_pub(edge: &Edge, version: &str, topic: &str, payload: &str, pass: &str) -> bool {
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &edge.mqtt_addr.port().to_string(),
            "-V",
            version,
            "-q",
            "1",
            "-u",
            USER,
            "-P",
            pass,
            "-t",
            topic,
            "-m",
            payload,
        ])
        .output()
        .expect("mosquitto_pub is installed (apt-get install mosquitto-clients; .ci/run does)");
    out.status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_speak_3_1_1_and_5_on_one_port() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let (e1, e2) = (state(1), state(2));
    let (t, p1, p2) = (
        e1.topic(),
        String::from_utf8(e1.to_payload()).unwrap(),
        String::from_utf8(e2.to_payload()).unwrap(),
    );
    let edge_ref = &edge;
    let ok = tokio::task::block_in_place(|| {
        (
            mosquitto_pub(edge_ref, "mqttv311", &t, &p1, PASS),
            mosquitto_pub(edge_ref, "mqttv5", &t, &p2, PASS),
            mosquitto_pub(edge_ref, "mqttv5", &t, &p2, "bad password"),
        )
    });
    assert_eq!(
        ok,
        (true, true, false),
        "3.1.1 ok, 5 ok, wrong password refused"
    );
    wait_stored(&edge, 2, 0).await;
    let (_, evs) = get(&events_url(&edge, T0, T0 + 10_000)).await;
    assert_eq!(evs["events"].as_array().unwrap().len(), 2);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_become_dead_letters_and_ingest_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let (client, _t) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    let topic = machine().topic(millrace_shared::EventKind::State);
    let bad: Vec<(String, Vec<u8>)> = vec![
        (topic.clone(), b"{not json".to_vec()),
        (
            topic.clone(),
            br#"{"ts":1767600000000,"seq":1,"state":"exploded"}"#.to_vec(),
        ),
        (
            "factory/plant-1/line-1/press-01/alarm".into(),
            b"{}".to_vec(),
        ),
        ("sensors/legacy/temp".into(), b"42".to_vec()),
        (topic.clone(), vec![b' '; 70 * 1024]),
        (
            topic.clone(),
            br#"{"v":9,"ts":1767600000000,"seq":1,"state":"idle"}"#.to_vec(),
        ),
    ];
    for (i, (t, p)) in bad.into_iter().enumerate() {
        client.publish(t, QoS::AtLeastOnce, false, p).await.unwrap();
        let good = state(i as u64 + 1);
        client
            .publish(good.topic(), QoS::AtLeastOnce, false, good.to_payload())
            .await
            .unwrap();
    }
    // The edge's own outputs are not ingested.
    client
        .publish(
            "millrace/alerts/x",
            QoS::AtLeastOnce,
            false,
            b"ignored".to_vec(),
        )
        .await
        .unwrap();
    let s = wait_stored(&edge, 6, 6).await;
    let (code, dl) = get(&format!("{}/api/v1/dead-letters", http(&edge))).await;
    assert_eq!(code, 200);
    let reasons: Vec<&str> = dl["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "bad_json",
            "bad_json",
            "unknown_kind",
            "bad_topic",
            "too_large",
            "unsupported_version"
        ]
    );
    assert!(
        dl["dead_letters"][1]["error"]
            .as_str()
            .unwrap()
            .contains("unknown variant `exploded`")
    );
    assert_eq!(dl["dead_letters"][4]["payload_bytes"], 70 * 1024);
    assert_eq!(s["ingest"]["events"], 6);
    let metrics = metrics(&edge).await;
    assert!(
        metrics.contains("millrace_edge_dead_letters_total{reason=\"too_large\"}"),
        "{metrics}"
    );
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_stored_once_and_bursts_past_the_router_stall_arrive_whole() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let (client, _t) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    // 5,000 messages at once: many full reads, each stored before rumqttd may acknowledge it.
    for seq in 1..=5000u64 {
        let e = temp(seq, seq as f64);
        client
            .publish(e.topic(), QoS::AtLeastOnce, false, e.to_payload())
            .await
            .unwrap();
    }
    // Recent duplicates are recognised and dropped; one older than the dedup window (seq 10)
    // passes to the store, where its key makes it overwrite itself.
    for seq in [4990u64, 4999, 10] {
        let e = temp(seq, seq as f64);
        client
            .publish(e.topic(), QoS::AtLeastOnce, false, e.to_payload())
            .await
            .unwrap();
    }
    let s = state(5001);
    for _ in 0..2 {
        client
            .publish(s.topic(), QoS::AtLeastOnce, false, s.to_payload())
            .await
            .unwrap();
    }
    wait_stored(&edge, 5002, 0).await;
    for _ in 0..500 {
        if status(&edge).await["ingest"]["duplicates"].as_u64() >= Some(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = status(&edge).await;
    assert_eq!(st["ingest"]["duplicates"], 3, "{st}");
    assert_eq!(st["ingest"]["events"], 5002, "{st}");
    let (_, evs) = get(&events_url(&edge, T0, T0 + 10_000_000)).await;
    assert_eq!(
        evs["events"].as_array().unwrap().len(),
        1,
        "the state event is stored once"
    );
    let (_, pts) = get(&temperature_url(&edge, T0, T0 + 10_000_000)).await;
    assert_eq!(pts["points"].as_array().unwrap().len(), 5000);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_bad_requests_and_missing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.http.api_keys = vec!["k3y-for-the-edge-api".into()];
    let edge = Edge::start(c).await.unwrap();
    let base = http(&edge);
    let client = reqwest::Client::new();
    let call = |path: &str, key: Option<&str>| {
        let mut r = client.get(format!("{base}{path}"));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move {
            let r = r.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let key = Some("k3y-for-the-edge-api");
    assert_eq!(call("/health", None).await.0, 200);
    assert_eq!(call("/api/v1/series", None).await.0, 401);
    assert_eq!(
        call("/api/v1/series", Some("wrong-key-wrong-key")).await.0,
        401
    );
    assert_eq!(call("/api/v1/series", key).await.0, 200);
    let cases = [
        ("/api/v1/points", 400, "`series` is required"),
        (
            "/api/v1/points?series=a/b/c/d&from=yesterday",
            400,
            "`from` = `yesterday` is not a time",
        ),
        (
            "/api/v1/points?series=a/b/c/d&from=10&to=5",
            400,
            "must be before",
        ),
        (
            "/api/v1/points?series=a/b/c/d&step=-1",
            400,
            "`step` = `-1` is not a positive duration",
        ),
        (
            "/api/v1/points?series=a/b/c/d&colour=red",
            400,
            "unknown field `colour`",
        ),
        ("/api/v1/points?series=a/b/c/d", 404, "no series `a/b/c/d`"),
        (
            "/api/v1/events?machine=a/b",
            400,
            "is not site/line/machine",
        ),
        (
            "/api/v1/events?machine=a/b/c&kind=telemetry",
            400,
            "`kind` = `telemetry`",
        ),
        (
            "/api/v1/events?machine=a/b/c",
            404,
            "no events from machine `a/b/c`",
        ),
        ("/api/v1/dead-letters?limit=0", 400, "`limit` = `0`"),
        ("/api/v1/nope", 404, "no such endpoint"),
    ];
    for (path, code, msg) in cases {
        let (got, body) = call(path, key).await;
        assert_eq!(got, code, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap_or("").contains(msg),
            "{path}: {body}"
        );
    }
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.store.retention.telemetry = Duration::from_secs(86_400);
    c.store.maintenance_interval = Duration::from_millis(20);
    let edge = Edge::start(c).await.unwrap();
    let (client, _t) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let mut old = temp(1, 1.0);
    old.ts_ms = now - 3 * 86_400_000;
    let mut fresh = temp(2, 2.0);
    fresh.ts_ms = now - 1000;
    for e in [&old, &fresh] {
        client
            .publish(e.topic(), QoS::AtLeastOnce, false, e.to_payload())
            .await
            .unwrap();
    }
    wait_stored(&edge, 2, 0).await;
    let url = format!(
        "{}/api/v1/points?series=plant-1/line-1/press-01/temperature&from=0&to={}",
        http(&edge),
        now + 1
    );
    // Maintenance seals and applies retention in the background; wait for it to have run.
    let store = edge.store().clone();
    for _ in 0..500 {
        let s = store.clone();
        let sizes = tokio::task::spawn_blocking(move || s.size_by_cf().unwrap())
            .await
            .unwrap();
        if sizes["blocks"] > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = store.clone();
    tokio::task::spawn_blocking(move || {
        s.enforce_retention(chrono::Utc::now().timestamp_millis())
            .unwrap();
        s.compact().unwrap();
    })
    .await
    .unwrap();
    let (_, pts) = get(&url).await;
    assert_eq!(pts["points"], serde_json::json!([[fresh.ts_ms, 2.0]]));
    edge.shutdown().await;
    drop(store);
    // The old point is gone from disk, not only hidden: read the files without any retention.
    let opts = millrace_edge::store::StoreOptions {
        telemetry_retention: Duration::ZERO,
        ..Default::default()
    };
    let raw = millrace_edge::store::Store::open(&dir.path().join("rocksdb"), opts).unwrap();
    let all = raw
        .points("plant-1/line-1/press-01/temperature", i64::MIN, i64::MAX)
        .unwrap()
        .unwrap();
    assert_eq!(all, vec![(fresh.ts_ms, 2.0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_takes_devices_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = millrace_tests::self_signed_cert(dir.path());
    let mut c = config(&dir.path().join("data"));
    // rumqttd binds its TLS listener itself, so it gets a port the OS just handed out.
    let port = millrace_tests::free_port();
    c.mqtt.tls = Some(millrace_edge::config::TlsListener {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        cert: cert.clone(),
        key,
        protocol: "v4".into(),
        ws_listen: None,
    });
    let edge = Edge::start(c).await.unwrap();
    let e = state(1);
    let (topic, payload) = (e.topic(), String::from_utf8(e.to_payload()).unwrap());
    let publish = |pass: &str| {
        Command::new("mosquitto_pub")
            // By name: rumqttd's rustls refuses an IP address as TLS server name (SNI).
            .args([
                "-h",
                "localhost",
                "-p",
                &port.to_string(),
                "--cafile",
                cert.to_str().unwrap(),
                "-q",
                "1",
                "-u",
                USER,
                "-P",
                pass,
                "-t",
                &topic,
                "-m",
                &payload,
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(millrace_tests::wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    let (good, bad) = tokio::task::block_in_place(|| (publish(PASS), publish("wrong")));
    assert!(
        good,
        "a device with the CA and credentials publishes over TLS"
    );
    assert!(!bad, "wrong credentials are refused over TLS too");
    wait_stored(&edge, 1, 0).await;
    edge.shutdown().await;
}

/// CONNECT (MQTT 3.1.1, username and password) followed by a QoS 1 PUBLISH, as one buffer,
/// encoded by rumqttc's codec.
fn connect_and_publish(user: &str, pass: &str, topic: &str, payload: &[u8]) -> Vec<u8> {
    use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
    let mut connect = Connect::new("raw-client");
    connect.keep_alive = 60;
    connect.set_login(user, pass);
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    publish.pkid = 1;
    let mut buf = bytes::BytesMut::new();
    Packet::Connect(connect).write(&mut buf, 1 << 20).unwrap();
    Packet::Publish(publish).write(&mut buf, 1 << 20).unwrap();
    buf.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_ingested_from_a_connection_whose_login_was_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let e = state(1);
    let send = |pass: &'static str| {
        let bytes = connect_and_publish(USER, pass, &e.topic(), &e.to_payload());
        let addr = edge.mqtt_addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            // CONNECT and PUBLISH in one write, before any CONNACK.
            s.write_all(&bytes).await.unwrap();
            let mut reply = vec![0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut reply))
                .await
                .unwrap()
                .unwrap_or(0);
            reply.truncate(n);
            reply
        }
    };
    let refused = send("wrong password").await;
    assert!(
        refused.is_empty(),
        "no CONNACK for a wrong password: {refused:?}"
    );
    let st = status(&edge).await;
    assert_eq!(
        (
            st["ingest"]["events"].as_u64(),
            st["ingest"]["dead_letters"].as_u64()
        ),
        (Some(0), Some(0)),
        "{st}"
    );
    // The same bytes with the right password: CONNACK 0 and PUBACK, after the event was stored.
    let accepted = send(PASS).await;
    assert_eq!(
        &accepted[..4],
        &[0x20, 2, 0, 0],
        "CONNACK accepted: {accepted:?}"
    );
    wait_stored(&edge, 1, 0).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_unknown_protocol_levels_are_refused_and_ingest_goes_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(config(dir.path())).await.unwrap();
    let closed = |bytes: &'static [u8]| {
        let addr = edge.mqtt_addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(bytes).await.unwrap();
            let mut buf = [0u8; 16];
            // The edge closes the connection without answering.
            tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap_or(0)
        }
    };
    assert_eq!(closed(b"GET / HTTP/1.1\r\n\r\n").await, 0, "not MQTT");
    assert_eq!(
        closed(b"\x10\x0a\x00\x04MQTT\x07\x02\x00\x3c\x00\x00").await,
        0,
        "protocol level 7"
    );
    let metrics = metrics(&edge).await;
    assert!(
        metrics.contains("millrace_edge_mqtt_refused_total{reason=\"protocol\"}"),
        "{metrics}"
    );
    // Devices that speak MQTT are not disturbed.
    let (client, _t) = device(&edge, "press-01", Some((USER, PASS))).await.unwrap();
    let e = state(1);
    client
        .publish(e.topic(), QoS::AtLeastOnce, false, e.to_payload())
        .await
        .unwrap();
    wait_stored(&edge, 1, 0).await;
    edge.shutdown().await;
}

#[test]
fn hash_password_refuses_short_passwords_and_makes_verifiable_hashes() {
    use std::io::Write;
    let run = |input: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_millrace-edge"))
            .arg("hash-password")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let short = run("short\n");
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("at least 8 characters"));
    let ok = run("a long enough password\n");
    assert!(ok.status.success());
    let hash = String::from_utf8(ok.stdout).unwrap();
    let auth = millrace_edge::broker::DeviceAuth::new(&[DeviceUser {
        username: "u".into(),
        password_hash: hash.trim().into(),
    }]);
    assert!(auth.verify("u", "a long enough password"));
    assert!(!auth.verify("u", "a long enough passwore"));
}

mod functions;

/// `mosquitto_pub`/`mosquitto_sub` (Eclipse Mosquitto's clients) against `edge` as `USER`.
fn mosquitto(tool: &str, edge: &Edge, args: &[&str]) -> std::process::Output {
    let port = edge.mqtt_addr.port().to_string();
    Command::new(tool)
        .args(["-h", "127.0.0.1", "-p", &port, "-u", USER, "-P", PASS])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_an_edge_restart_and_an_empty_one_clears_its_topic() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.store.sync_writes = true;
    let edge = Edge::start(c.clone()).await.unwrap();
    let e = state(1);
    let (topic, payload) = (e.topic(), String::from_utf8(e.to_payload()).unwrap());
    tokio::task::block_in_place(|| {
        for (t, m) in [
            ("hmi/press-1/setpoint", "42"),
            ("hmi/press-1/mode", "auto"),
            (topic.as_str(), payload.as_str()),
        ] {
            let out = mosquitto("mosquitto_pub", &edge, &["-q", "1", "-r", "-t", t, "-m", m]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // An empty retained message clears the topic's.
        let out = mosquitto(
            "mosquitto_pub",
            &edge,
            &["-q", "1", "-r", "-t", "hmi/press-1/mode", "-n"],
        );
        assert!(out.status.success());
    });
    // The factory event is stored as any other; the HMI topics are not factory topics (dead
    // letters), but their retained values are kept all the same.
    wait_stored(&edge, 1, 3).await;
    edge.shutdown().await;

    let edge = Edge::start(c).await.unwrap();
    let got = tokio::task::block_in_place(|| {
        // Three retained messages are expected: wait for a fourth (the cleared one, wrongly
        // kept) until -W gives up.
        mosquitto(
            "mosquitto_sub",
            &edge,
            &[
                "-t",
                "hmi/#",
                "-t",
                "factory/#",
                "-t",
                "spBv1.0/STATE/+",
                "-v",
                "-C",
                "4",
                "-W",
                "4",
            ],
        )
    });
    let mut lines: Vec<String> = String::from_utf8_lossy(&got.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    assert_eq!(
        lines.len(),
        3,
        "{lines:?}: {}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(lines[0], format!("{topic} {payload}"));
    assert_eq!(lines[1], "hmi/press-1/setpoint 42");
    // The edge's own Sparkplug host STATE, published retained at start.
    assert!(
        lines[2].starts_with("spBv1.0/STATE/millrace {\"online\":true"),
        "{}",
        lines[2]
    );
    edge.shutdown().await;
}
