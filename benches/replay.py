#!/usr/bin/env python3
"""Function replay over stored history (release build), all measured in one run.

1. Fills an edge with a simulated day (default factory, seed 1, telemetry every second:
   about a million events; `millrace-sim run --speed 0`).
2. Replays the threshold example (`factory/#`: every stored event) over that day with ingest
   idle: events per second, counting pass included (target: >= 300,000/s).
3. Device load (`millrace-sim load`, full speed) for `--duration` s without a replay (baseline),
   then the same load while a second function replays the day: ingest rate against the baseline
   (target: >= 80 %), and the replay's rate meanwhile.

Usage: python3 benches/replay.py [--duration 10] [--devices 8]
"""
import argparse, json, os, subprocess, sys, tempfile, time, shutil, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import Edge, SIM, load, log, get  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DAY_FROM, DAY_TO = "2026-11-01T00:00:00Z", "2026-11-02T00:00:00Z"


def request(method, url, body=None):
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def deploy(edge, name, wat):
    body = json.dumps({"module_wat": wat, "topics": ["factory/#"], "timeout_ms": 10000}).encode()
    request("PUT", f"http://127.0.0.1:{edge.http}/api/v1/functions/{name}", body)


def replay_status(edge, name):
    return json.loads(get(f"http://127.0.0.1:{edge.http}/api/v1/functions/{name}"))["replay"]


def start_replay(edge, name):
    return request("POST", f"http://127.0.0.1:{edge.http}/api/v1/functions/{name}/replay?from={DAY_FROM}&to={DAY_TO}")


def wait_done(edge, name):
    while True:
        r = replay_status(edge, name)
        if r["state"] not in ("counting", "running"):
            return r
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--telemetry-interval", default="1s",
                    help="of the simulated day: 1s gives about a million events with the default factory")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="millrace-replay-bench-")
    wat = open(os.path.join(HERE, "..", "edge", "functions", "threshold_alert.wat")).read()
    out = {"machine": f"{os.cpu_count()} cores"}
    e = Edge(work, "edge")
    log("filling the store with a simulated day …")
    t0 = time.monotonic()
    subprocess.run([SIM, "run", "--broker", f"mqtt://127.0.0.1:{e.mqtt}", "--start", DAY_FROM, "--duration", "1day",
                    "--speed", "0", "--seed", "1", "--telemetry-interval", a.telemetry_interval, "--quiet"], check=True, env={**os.environ, "RUST_LOG": "warn"},
                   stderr=subprocess.DEVNULL)
    out["stored_events"] = e.stored()
    out["fill_s"] = time.monotonic() - t0
    log(f"stored {out['stored_events']} events in {out['fill_s']:.1f} s; replaying with ingest idle …")
    deploy(e, "replay-idle", wat)
    t0 = time.monotonic()
    start_replay(e, "replay-idle")
    r = wait_done(e, "replay-idle")
    took = time.monotonic() - t0
    out["idle"] = {"state": r["state"], "events": r["events_done"], "seconds": took,
                   "events_per_s": r["events_done"] / took}
    log(json.dumps(out["idle"]))
    log("device load without a replay …")
    base = load(e.mqtt, a.devices, 0, a.duration, 1, os.path.join(work, "base.json"))
    out["ingest_baseline_per_s"] = base["published"] / base["elapsed_s"]
    log("device load while a replay runs …")
    deploy(e, "replay-loaded", wat)
    start_replay(e, "replay-loaded")
    t0 = time.monotonic()
    loaded = load(e.mqtt, a.devices, 0, a.duration, 1, os.path.join(work, "loaded.json"))
    during = replay_status(e, "replay-loaded")
    load_s = time.monotonic() - t0
    out["ingest_with_replay_per_s"] = loaded["published"] / loaded["elapsed_s"]
    out["ingest_ratio"] = out["ingest_with_replay_per_s"] / out["ingest_baseline_per_s"]
    out["replay_during_load_events_per_s"] = during["events_done"] / load_s
    r = wait_done(e, "replay-loaded")
    out["replay_loaded_state"] = r["state"]
    e.stop()
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
