#!/usr/bin/env python3
"""On-device functions under device load (release build), all measured in one run.

1. Ingest throughput with the threshold-alert function on every telemetry event, against the
   same edge and load without functions (target: >= 80 %). Also counts the invocations that
   ran and the triggers dropped (queue full).
2. A runaway function (loops forever, 100 ms limit) on every telemetry event: ingest throughput
   against the baseline (target: drop <= 10 %), and how long after its start each runaway
   invocation was stopped (target: <= 2x its limit).

The per-invocation overhead is `cargo bench --workspace -p millrace-edge --bench functions`.
Usage: python3 benches/functions.py [--duration 15] [--devices 8] [--concurrency 1]
"""
import argparse, json, os, sys, tempfile, time, shutil, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import Edge, load, log, get  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def deploy(edge, name, wat, **opts):
    body = json.dumps({"module_wat": wat, "topics": ["factory/+/+/+/telemetry"], **opts}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{edge.http}/api/v1/functions/{name}", data=body, method="PUT",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status in (200, 201), r.status


def functions(edge):
    return {f["name"]: f for f in json.loads(get(f"http://127.0.0.1:{edge.http}/api/v1/functions"))["functions"]}


def run(work, name, a, setup=None):
    e = Edge(work, name)
    if setup:
        setup(e)
    r = load(e.mqtt, a.devices, 0, a.duration, a.qos, os.path.join(work, f"{name}.json"))
    t_exit = time.monotonic()
    while e.stored() < r["published"]:
        time.sleep(0.01)
    rate = r["published"] / (r["elapsed_s"] + time.monotonic() - t_exit)
    return e, r, rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=1)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="millrace-fn-bench-")
    out = {"machine": f"{os.cpu_count()} cores", "devices": a.devices, "duration_s": a.duration}

    log("baseline: edge without functions …")
    e, r, base = run(work, "base", a)
    e.stop()
    out["baseline_stored_events_per_s"] = base

    log("threshold alert on every telemetry event …")
    wat = open(os.path.join(HERE, "..", "edge", "functions", "threshold_alert.wat")).read()
    e, r, rate = run(work, "threshold", a, lambda e: deploy(e, "threshold-alert", wat, queue=100000,
                                                            concurrency=a.concurrency))
    time.sleep(1.0)
    s = functions(e)["threshold-alert"]["stats"]
    e.stop()
    out["threshold_stored_events_per_s"] = rate
    out["threshold_vs_baseline"] = rate / base
    out["threshold_invocations"] = s["invocations"]
    out["threshold_dropped"] = s["dropped"]
    out["telemetry_events_published"] = r["published"]

    log("runaway function (100 ms limit) on every telemetry event …")
    loop = '(module (func (export "handle") (result i32) (loop $l (br $l)) (i32.const 0)))'
    e, r, rate = run(work, "runaway", a, lambda e: deploy(e, "runaway", loop, timeout_ms=100, queue=64))
    s = functions(e)["runaway"]["stats"]
    recs = json.loads(get(f"http://127.0.0.1:{e.http}/api/v1/invocations?function=runaway&limit=1000"))["invocations"]
    e.stop()
    stops = sorted(x["duration_us"] / 1000 for x in recs if x["outcome"] == "timeout")
    out["runaway_stored_events_per_s"] = rate
    out["runaway_vs_baseline"] = rate / base
    out["runaway_invocations"] = s["invocations"]
    out["runaway_dropped"] = s["dropped"]
    out["runaway_stop_ms_median"] = stops[len(stops) // 2] if stops else None
    out["runaway_stop_ms_max"] = stops[-1] if stops else None
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
