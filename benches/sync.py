#!/usr/bin/env python3
"""Sync benchmark (release build), measured in one run on this machine.

1. A simulated factory (12 machines, 1 s telemetry, --hours of it) is published to an edge whose
   cloud is not running yet: the outbox fills, as during an outage. Baseline: the rate at which
   the edge took the same data from MQTT, and the bytes per point of the devices' JSON payloads.
2. The cloud starts: catch-up = telemetry points acknowledged by the cloud (durable, fsync'd)
   per second, from the cloud's start until the outbox is empty.
3. Wire size: bytes of request bodies per telemetry point (everything the edge sent, including
   state and part batches, divided by the points).

With --storage local,s3 the whole run is made once per storage: the cloud's tables on the local
disk, then in a bucket of moto's S3 server on this machine (MILLRACE_PYTHON's venv, from
tests/python/requirements.txt), so the two rates come from one invocation.

Usage: python3 benches/sync.py [--hours 24] [--storage local|s3|local,s3]
Writes a JSON summary to stdout and progress to stderr.
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import BIN, SIM, EDGE, free_port, get, log  # noqa: E402

CLOUD = os.path.join(BIN, "millrace-cloud")


def token(edge_id):
    out = subprocess.run([CLOUD, "edge-token", edge_id], check=True, capture_output=True, text=True).stdout
    tok = next(l.split("=", 1)[1] for l in out.splitlines() if l.startswith("MILLRACE_EDGE_SYNC__TOKEN="))
    digest = next(l.split('"')[1] for l in out.splitlines() if l.startswith("token_sha256"))
    return tok, digest


def wait_http(url):
    for _ in range(400):
        try:
            return get(url)
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PYTHON = os.environ.get("MILLRACE_PYTHON", os.path.expanduser("~/.cache/millrace-py/bin/python"))
S3_SERVER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "python", "s3_server.py")


def edge_toml(edge_id, data_dir, mqtt, http, cloud_port):
    """An edge that keeps nothing after sync and whose outbox holds hours of a factory while
    its cloud at cloud_port is down."""
    return (f'edge_id = "{edge_id}"\ndata_dir = "{data_dir}"\n[mqtt]\nlisten = "127.0.0.1:{mqtt}"\n'
            f'allow_anonymous = true\n[http]\nlisten = "127.0.0.1:{http}"\n'
            f'[store.retention]\ntelemetry = "0s"\nevents = "0s"\n'
            f'[sync]\nenabled = true\ncloud_url = "http://127.0.0.1:{cloud_port}"\n'
            f'outbox_quota_bytes = 17179869184\nretry_max = "200ms"\n')


def start_s3(work):
    """moto's S3 server (with atomic conditional writes: tests/python/s3_server.py) on a free
    port with bucket `bench`; returns (process, endpoint)."""
    port = free_port()
    p = subprocess.Popen([PYTHON, S3_SERVER,
                          "-H", "127.0.0.1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "s3.log"), "w"))
    endpoint = f"http://127.0.0.1:{port}"
    import urllib.request
    for _ in range(200):
        try:
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT"))
            return p, endpoint
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("the S3 server did not start")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--storage", default="local", help="local, s3 or local,s3")
    a = ap.parse_args()
    runs = {}
    for storage in a.storage.split(","):
        log(f"== storage: {storage}")
        runs[storage] = run_once(a, storage)
    if len(runs) == 1:
        print(json.dumps(next(iter(runs.values())), indent=2))
    else:
        if "local" in runs and "s3" in runs:
            runs["s3_vs_local_storage_ingest"] = (runs["s3"]["cloud_storage_ingest_points_per_s"]
                                                  / runs["local"]["cloud_storage_ingest_points_per_s"])
        print(json.dumps(runs, indent=2))


def run_once(a, storage):
    work = tempfile.mkdtemp(prefix="millrace-sync-bench-")
    s3 = None
    storage_toml, cloud_env = "", {}
    if storage == "s3":
        s3, endpoint = start_s3(work)
        storage_toml = f'[storage]\nurl = "s3://bench/millrace"\nendpoint = "{endpoint}"\nallow_http = true\n'
        cloud_env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}
    tok, digest = token("bench")
    cloud_port, mqtt, http = free_port(), free_port(), free_port()
    ecfg = os.path.join(work, "edge.toml")
    with open(ecfg, "w") as f:
        f.write(edge_toml("bench", f"{work}/edge", mqtt, http, cloud_port)
                + os.environ.get("SYNC_EXTRA", "").replace(";", "\n") + "\n")
    ccfg = os.path.join(work, "cloud.toml")
    with open(ccfg, "w") as f:
        f.write(f'data_dir = "{work}/cloud"\n[http]\nlisten = "127.0.0.1:{cloud_port}"\n'
                f'[edges.bench]\ntoken_sha256 = "{digest}"\n' + storage_toml)
    env = {**os.environ, "RUST_LOG": "warn", "MILLRACE_EDGE_SYNC__TOKEN": tok}
    edge = subprocess.Popen([EDGE, "--config", ecfg], env=env, stderr=open(os.path.join(work, "edge.log"), "w"))
    wait_http(f"http://127.0.0.1:{http}/health")

    log(f"publishing {a.hours} h of a 12-machine factory with the cloud down …")
    t0 = time.monotonic()
    subprocess.run([SIM, "run", "--broker", f"mqtt://127.0.0.1:{mqtt}", "--speed", "0", "--quiet", "--seed", "1",
                    "--start", "2026-01-05T00:00:00Z", "--duration", f"{a.hours}h", "--telemetry-interval", "1s"],
                   check=True, env={**os.environ, "RUST_LOG": "warn"}, stderr=subprocess.DEVNULL)
    ingest_s = time.monotonic() - t0
    status = json.loads(get(f"http://127.0.0.1:{http}/api/v1/status"))
    points = status["ingest"]["points"]
    sync = json.loads(get(f"http://127.0.0.1:{http}/api/v1/sync"))
    out = {
        "machine": f"{os.cpu_count()} cores",
        "telemetry_points": points,
        "events": status["ingest"]["events"],
        "baseline_mqtt_ingest_points_per_s": points / ingest_s,
        "baseline_mqtt_payload_bytes_per_point": status["ingest"]["bytes"] / points,
        "outbox_items": sync["outbox"]["items"],
        "outbox_bytes": sync["outbox"]["bytes"],
    }

    log("starting the cloud: catch-up …")
    edge_cpu0 = cpu_s(edge.pid)
    t0 = time.monotonic()
    cloud = subprocess.Popen([CLOUD, "--config", ccfg], env={**os.environ, "RUST_LOG": "warn", **cloud_env},
                             stderr=open(os.path.join(work, "cloud.log"), "w"))
    while True:
        s = json.loads(get(f"http://127.0.0.1:{http}/api/v1/sync"))
        if s["outbox"]["items"]["events"] == 0 and s["outbox"]["items"]["telemetry"] == 0:
            break
        time.sleep(0.05)
    catchup_s = time.monotonic() - t0
    out["catchup_cpu_s"] = {"edge": cpu_s(edge.pid) - edge_cpu0, "cloud": cpu_s(cloud.pid)}
    sent = s["sent"]
    out["catchup_s"] = catchup_s
    out["catchup_points_per_s"] = sent["points"] / catchup_s
    out["catchup_vs_mqtt_ingest"] = out["catchup_points_per_s"] / out["baseline_mqtt_ingest_points_per_s"]
    out["wire_bytes"] = sent["wire_bytes"]
    out["wire_bytes_per_point"] = sent["wire_bytes"] / sent["points"]
    out["wire_vs_mqtt_payload"] = out["wire_bytes_per_point"] / out["baseline_mqtt_payload_bytes_per_point"]
    out["batches"] = sent["batches"]
    out["failures_before_cloud_up"] = sent["failures"]
    # The cloud's own time in commits (decode, Parquet files, fsyncs, Delta commits): storage ingest.
    metrics = get(f"http://127.0.0.1:{cloud_port}/metrics")
    commit_s = next(float(l.split()[-1]) for l in metrics.splitlines()
                    if l.startswith("millrace_cloud_sync_commit_seconds_sum"))
    out["cloud_commit_s"] = commit_s
    out["cloud_storage_ingest_points_per_s"] = sent["points"] / commit_s
    ledger = json.loads(get(f"http://127.0.0.1:{cloud_port}/api/v1/edges"))["edges"][0]
    out["cloud_items"], out["cloud_gap_items"] = ledger["items"], ledger["gap_items"]
    out["storage"] = storage
    for p in (edge, cloud):
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    if s3:
        s3.kill()
    shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
