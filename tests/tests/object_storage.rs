//! The cloud on object storage: two cloud nodes on one S3 bucket (moto's S3 server), edges
//! failing over between them, a node killed with SIGKILL while it commits, and an outside
//! reader (delta-rs) of the tables in the bucket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use millrace_tests::{
    Fault, FaultProxy, S3Server, S3sFs, free_port, read_json, run_ok, wait_until,
};
use serde_json::Value;

use super::{
    CloudProcess, EdgeProcess, cloud_contents, contents_diff, edge_config, edge_contents,
    edge_token, machine_id, paced_sim, sim_run, with_sync,
};

/// A cloud node's config: its own data directory (the cache) and port, the shared bucket, and
/// the two edges' token digests.
fn node_config(dir: &Path, name: &str, endpoint: &str, digests: &[(&str, &str)]) -> PathBuf {
    let mut text = format!(
        "data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[storage]\nurl = \"s3://plant-data/millrace\"\nendpoint = \"{}\"\nallow_http = true\n",
        dir.join(name).display(),
        free_port(),
        endpoint
    );
    for (edge, digest) in digests {
        text.push_str(&format!("[edges.{edge}]\ntoken_sha256 = \"{digest}\"\n"));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn socket(c: &CloudProcess) -> std::net::SocketAddr {
    c.http.trim_start_matches("http://").parse().unwrap()
}

/// The ledger of `edge` as node `c` reports it (`/api/v1/edges?ranges=true`).
fn ledger(c: &CloudProcess, edge: &str) -> Value {
    c.get("/api/v1/edges?ranges=true")["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["edge"] == edge)
        .cloned()
        .unwrap_or(Value::Null)
}

fn items(c: &CloudProcess, edge: &str) -> u64 {
    ledger(c, edge)["items"].as_u64().unwrap_or(0)
}

/// A Prometheus counter's total over its labels.
fn counter(c: &CloudProcess, name: &str) -> u64 {
    let out = run_ok(Command::new("curl").args(["-fsS", &format!("{}/metrics", c.http)]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits for the simulator and the edge's outbox to be done, and returns the last outbox
/// sequence number the edge gave out.
fn drained(sim: &mut Child, edge: &EdgeProcess) -> u64 {
    let status = sim.wait().unwrap();
    assert!(status.success(), "simulator finished: {status}");
    assert!(
        wait_until(Duration::from_secs(300), || {
            let s = edge.get("/api/v1/sync");
            s["outbox"]["items"]["events"] == 0 && s["outbox"]["items"]["telemetry"] == 0
        }),
        "outbox drained: {}",
        edge.get("/api/v1/sync")
    );
    edge.get("/api/v1/sync")["outbox"]["next_seq"]
        .as_u64()
        .unwrap()
        - 1
}

/// `tests/python/delta_readers.py` on the tables in `s3://plant-data/millrace` at `endpoint`,
/// with `args` after the URL.
fn bucket_reader(endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = Command::new(millrace_tests::python());
    c.arg(super::manifest_dir().join("python/delta_readers.py"))
        .arg("s3://plant-data/millrace")
        .args(args)
        .envs(env.iter().copied())
        .env("AWS_ENDPOINT_URL", endpoint);
    c
}

/// What delta-rs (and DuckDB) count in the tables of the bucket at `endpoint`.
fn read_bucket(endpoint: &str, env: &[(&str, &str)]) -> Value {
    let out = run_ok(&mut bucket_reader(endpoint, env, &[]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Diagnostics: an edge's `sync_batches` rows and first stored sequence numbers, as delta-rs
/// reads the bucket.
fn batches_in_bucket(s3: &S3Server, env: &[(&str, &str)], edge: &str) -> String {
    let out = bucket_reader(&s3.endpoint, env, &["--batches-of", edge])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every machine of `truth`: the cloud node holds exactly what the edge stored.
fn assert_same_contents(edge: &EdgeProcess, node: &CloudProcess, truth: &Value) -> usize {
    let (from, to) = (
        truth["start_ms"].as_i64().unwrap(),
        truth["end_ms"].as_i64().unwrap() + 1,
    );
    let mut events = 0;
    for m in truth["machines"].as_array().unwrap() {
        let id = machine_id(m);
        let on_edge = edge_contents(edge, &id, from, to);
        let in_cloud = cloud_contents(node, &id, from, to);
        assert!(!on_edge.events.is_empty(), "{id}");
        assert!(
            on_edge == in_cloud,
            "{id} ({}): contents differ\n{}",
            node.http,
            contents_diff(&on_edge, &in_cloud)
        );
        events += on_edge.events.len();
    }
    events
}

/// Edge `name` (its directory under `dir`, also returned) syncing to `url` with `token`.
fn syncing_edge(dir: &Path, name: &str, url: &str, token: &str) -> (EdgeProcess, PathBuf) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let config = edge_config(&d, 0);
    with_sync(&config, url, "");
    let env = [
        ("MILLRACE_EDGE_EDGE_ID", name),
        ("MILLRACE_EDGE_SYNC__TOKEN", token),
    ];
    (EdgeProcess::start_with_env(&config, &env), d)
}

#[test]
fn two_cloud_nodes_on_one_bucket_store_every_item_once_across_failover_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start();
    s3.create_bucket("plant-data");
    let env = s3.env();
    let (t1, d1) = edge_token("e1");
    let (t2, d2) = edge_token("e2");
    let digests = [("e1", d1.as_str()), ("e2", d2.as_str())];
    let cfg_a = node_config(dir.path(), "node-a", &s3.endpoint, &digests);
    let cfg_b = node_config(dir.path(), "node-b", &s3.endpoint, &digests);
    let a = CloudProcess::start_with_env(&cfg_a, &env);
    let mut b = CloudProcess::start_with_env(&cfg_b, &env);

    // Edge 1 reaches the cloud through a load balancer (starting on node A); edge 2 talks to
    // node B directly. Both nodes commit to the same tables at the same time.
    let lb = FaultProxy::start(socket(&a));
    let start_edge =
        |name: &str, url: &str, token: &str| syncing_edge(dir.path(), name, url, token);
    let (e1, d1) = start_edge("e1", &lb.url(), &t1);
    let (e2, d2) = start_edge("e2", &b.http, &t2);
    let truth1 = d1.join("truth.json");
    let mut sim1 = paced_sim(&e1, "31", "2026-03-02T00:00:00Z", "1day", "10s", &truth1);
    // Edge 2's factory is another site (its machines are not edge 1's).
    let factory2 = d2.join("factory.toml");
    std::fs::write(
        &factory2,
        "[[machines]]\nsite = \"plant-2\"\nline = \"line-1\"\nmachine = \"press-01\"\nideal_cycle_time_ms = 30000\n[[machines]]\nsite = \"plant-2\"\nline = \"line-1\"\nmachine = \"press-02\"\nideal_cycle_time_ms = 45000\n",
    )
    .unwrap();
    let truth2 = d2.join("truth.json");
    let mut sim2 = sim_run(&e2)
        .args(["--config", factory2.to_str().unwrap()])
        .args([
            "--qos",
            "1",
            "--seed",
            "32",
            "--start",
            "2026-03-02T00:00:00Z",
        ])
        .args(["--duration", "1day", "--telemetry-interval", "10s"])
        .args(["--speed", "3600", "--quiet", "--truth"])
        .arg(&truth2)
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    let timeout = Duration::from_secs(180);

    // 1. Edge 1 on node A; node B sees A's commits (it reads the table, not A).
    assert!(wait_until(timeout, || items(&a, "e1") > 0));
    assert!(wait_until(timeout, || items(&b, "e1") > 0));
    // 2. The load balancer moves edge 1 to node B in the middle of the stream.
    let on_a = items(&a, "e1");
    lb.switch_to(socket(&b));
    assert!(wait_until(timeout, || items(&b, "e1") > on_a));
    // 3. Node B is killed (SIGKILL) while both edges' batches are being committed on it; the
    //    load balancer takes it out, edge 2 waits for it (its outbox keeps the data).
    let before = items(&b, "e2");
    assert!(wait_until(timeout, || items(&b, "e2") > before));
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    lb.switch_to(socket(&a));
    let at_kill = items(&a, "e1");
    assert!(wait_until(timeout, || items(&a, "e1") > at_kill));
    // 4. Node B comes back (same data directory, same port); edge 1 moves back to it.
    drop(b);
    let b = CloudProcess::start_with_env(&cfg_b, &env);
    lb.switch_to(socket(&b));

    let last1 = drained(&mut sim1, &e1);
    let last2 = drained(&mut sim2, &e2);
    // Both nodes report both edges complete: every outbox sequence number once, no gap.
    for node in [&a, &b] {
        for (edge, last) in [("e1", last1), ("e2", last2)] {
            assert!(
                wait_until(timeout, || ledger(node, edge)["received"]
                    == serde_json::json!([[1, last]])),
                "{edge} on {}: {}\nnode A: {}\nnode B: {}\ndelta-rs: {}",
                node.http,
                ledger(node, edge),
                ledger(&a, edge),
                ledger(&b, edge),
                batches_in_bucket(&s3, &env, edge)
            );
            assert_eq!(ledger(node, edge)["gap_items"], 0);
        }
    }
    // Full contents, machine by machine, on each node: exactly what each edge stored.
    let (truth1, truth2) = (read_json(&truth1), read_json(&truth2));
    for node in [&a, &b] {
        let n1 = assert_same_contents(&e1, node, &truth1);
        let n2 = assert_same_contents(&e2, node, &truth2);
        assert!(n1 > 0 && n2 > 0);
    }
    // Conflicts between the nodes' commits happened and were retried, never lost.
    let conflicts = counter(&a, "millrace_cloud_commit_conflicts_total")
        + counter(&b, "millrace_cloud_commit_conflicts_total");
    let retries = counter(&a, "millrace_cloud_commit_retries_total")
        + counter(&b, "millrace_cloud_commit_retries_total");
    eprintln!("two nodes: {conflicts} conflicts, {retries} commit retries");

    // Master data saved through either node is every node's (it is kept in the bucket), and
    // one node's edit does not undo the other's.
    let spec = |machine: &str, ms: u32| serde_json::json!([{"site": "plant-2", "line": "line-1", "machine": machine, "ideal_cycle_time_ms": ms}]);
    a.put_machines(&spec("press-01", 31_000));
    b.put_machines(&spec("press-02", 47_000));
    for node in [&a, &b] {
        assert!(
            wait_until(timeout, || {
                let m = &node.get("/api/v1/master")["ideal_cycle_ms"];
                m["plant-2/line-1/press-01"] == 31_000 && m["plant-2/line-1/press-02"] == 47_000
            }),
            "master data on {}: {}",
            node.http,
            node.get("/api/v1/master")
        );
    }

    // An outside reader of the bucket (delta-rs) counts what the edges sent.
    let readers = read_bucket(&s3.endpoint, &env);
    super::assert_reader_counts(&readers, "deltalake", &[&truth1, &truth2]);
    e1.stop();
    e2.stop();
    a.stop();
    b.stop();
}

/// The store goes away while the cloud runs (its link to the S3 server is cut, then restored):
/// the edge's batches are refused with 503 and counted, the edge keeps them in its outbox, and
/// once the store is back every item is stored once and the contents equal the edge's.
#[test]
fn a_store_that_goes_away_while_the_cloud_runs_keeps_the_data_on_the_edge_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start();
    s3.create_bucket("plant-data");
    let env = s3.env();
    let link = FaultProxy::start(s3.endpoint.trim_start_matches("http://").parse().unwrap());
    let (token, digest) = edge_token("e1");
    let cfg = node_config(dir.path(), "node", &link.url(), &[("e1", digest.as_str())]);
    let cloud = CloudProcess::start_with_env(&cfg, &env);
    let (edge, d) = syncing_edge(dir.path(), "e1", &cloud.http, &token);
    let truth = d.join("truth.json");
    let mut sim = paced_sim(&edge, "41", "2026-03-02T00:00:00Z", "1day", "10s", &truth);
    let timeout = Duration::from_secs(180);
    let failures = || {
        edge.get("/api/v1/sync")["sent"]["failures"]
            .as_u64()
            .unwrap()
    };
    assert!(wait_until(timeout, || items(&cloud, "e1") > 0));

    // The store goes away: batches are refused (503, counted), the edge keeps them.
    let failed_before = failures();
    link.set(Fault::Cut);
    assert!(
        wait_until(timeout, || failures() > failed_before
            && counter(
                &cloud,
                "millrace_cloud_sync_refused_total{reason=\"storage_unavailable\"}"
            ) > 0),
        "refusals while the store is away: edge {}",
        edge.get("/api/v1/sync")
    );
    let waiting = edge.get("/api/v1/sync")["outbox"]["items"].clone();
    assert!(
        waiting["events"].as_u64().unwrap() + waiting["telemetry"].as_u64().unwrap() > 0,
        "the outbox keeps what was refused: {waiting}"
    );

    // The store is back: everything arrives, once.
    link.set(Fault::Pass);
    let last = drained(&mut sim, &edge);
    assert!(
        wait_until(timeout, || ledger(&cloud, "e1")["received"]
            == serde_json::json!([[1, last]])),
        "{}",
        ledger(&cloud, "e1")
    );
    assert_eq!(ledger(&cloud, "e1")["gap_items"], 0);
    assert!(assert_same_contents(&edge, &cloud, &read_json(&truth)) > 0);
    edge.stop();
    cloud.stop();
}

/// A `[storage]` section for bucket `url` at `endpoint` (`allow_http` set or not).
fn storage(url: &str, endpoint: &str, allow_http: bool) -> String {
    let http = if allow_http {
        "allow_http = true\n"
    } else {
        ""
    };
    format!("url = \"{url}\"\nendpoint = \"{endpoint}\"\n{http}")
}

/// `millrace-cloud` with `storage` appended to a config; its exit status and stderr.
fn cloud_fails_to_start(dir: &Path, storage: &str, env: &[(&str, &str)]) -> (bool, String) {
    let path = dir.join("bad-storage.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\n[storage]\n{storage}",
            dir.join("bad").display()
        ),
    )
    .unwrap();
    let out = Command::new(super::bin("millrace-cloud"))
        .args(["--config", path.to_str().unwrap()])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_bucket_or_a_store_that_does_not_answer_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start();
    let env = s3.env();
    let (ok, err) = cloud_fails_to_start(
        dir.path(),
        &storage("s3://no-such-bucket/x", &s3.endpoint, true),
        &env,
    );
    assert!(!ok, "started on a missing bucket");
    assert!(err.contains("the bucket does not exist"), "{err}");
    // A store that refuses the credentials.
    let strict = S3Server::start_checking_credentials();
    let (ok, err) = cloud_fails_to_start(
        dir.path(),
        &storage("s3://plant-data/x", &strict.endpoint, true),
        &env,
    );
    assert!(!ok, "started with refused credentials");
    assert!(err.contains("the credentials were refused"), "{err}");
    assert!(
        !err.contains(env[1].1),
        "the secret key is not in the message: {err}"
    );
    // An endpoint that hangs up on every connection (held by the test: a port merely free now
    // could be taken by another test's server).
    let hangs_up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", hangs_up.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in hangs_up.incoming() {
            drop(conn);
        }
    });
    let (ok, err) =
        cloud_fails_to_start(dir.path(), &storage("s3://plant-data/x", &dead, true), &env);
    assert!(!ok, "started without a store");
    assert!(err.contains("does not answer"), "{err}");
    // An http:// endpoint without allow_http, and a scheme that is not S3.
    let (ok, err) = cloud_fails_to_start(
        dir.path(),
        &storage("s3://plant-data/x", &dead, false),
        &env,
    );
    assert!(!ok && err.contains("storage.allow_http"), "{err}");
    let (ok, err) = cloud_fails_to_start(dir.path(), "url = \"gs://plant-data/x\"\n", &env);
    assert!(!ok && err.contains("only s3://"), "{err}");
}

/// A second S3 server no one here wrote: s3s-fs (disk-backed). It checks a conditional write
/// and then writes in two steps, so writers racing for one object are all told they won: the
/// cloud refuses it at start and names the way out. With `storage.single_writer` one node runs
/// on it: an edge's data arrives once, and delta-rs reads the tables through the server.
#[test]
fn a_store_whose_conditional_writes_are_not_atomic_is_refused_unless_one_node_writes_alone() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3sFs::start(&dir.path().join("s3s-root"), &["plant-data"]);
    let env = s3.env();
    let (ok, err) = cloud_fails_to_start(
        dir.path(),
        &storage("s3://plant-data/millrace", &s3.endpoint, true),
        &env,
    );
    assert!(!ok, "started on a store whose conditional writes race");
    assert!(
        err.contains("does not make conditional writes atomic")
            && err.contains("storage.single_writer = true"),
        "{err}"
    );

    // One node alone.
    let (token, digest) = edge_token("e1");
    let cfg = node_config(dir.path(), "node", &s3.endpoint, &[("e1", digest.as_str())]);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "allow_http = true\n",
        "allow_http = true\nsingle_writer = true\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let cloud = CloudProcess::start_with_env(&cfg, &env);
    let (edge, d) = syncing_edge(dir.path(), "e1", &cloud.http, &token);
    let truth = d.join("truth.json");
    let mut sim = paced_sim(&edge, "43", "2026-03-02T00:00:00Z", "6h", "10s", &truth);
    let last = drained(&mut sim, &edge);
    assert!(
        wait_until(
            Duration::from_secs(180),
            || ledger(&cloud, "e1")["received"] == serde_json::json!([[1, last]])
        ),
        "{}",
        ledger(&cloud, "e1")
    );
    assert_eq!(ledger(&cloud, "e1")["gap_items"], 0);
    let truth = read_json(&truth);
    assert!(assert_same_contents(&edge, &cloud, &truth) > 0);
    let readers = read_bucket(&s3.endpoint, &env);
    super::assert_reader_counts(&readers, "deltalake", &[&truth]);
    edge.stop();
    cloud.stop();
}
