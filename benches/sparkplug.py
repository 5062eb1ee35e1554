#!/usr/bin/env python3
"""Sparkplug B ingest against JSON ingest (release build), in one run on this machine.

The same load generator (`millrace-sim load`, N devices as fast as the edge takes them, QoS 1)
sends telemetry of 10 metrics per message, either as Millrace JSON or as Sparkplug B NDATA
whose metrics are aliases only (after an NBIRTH that declares them), as PLC gateways send it.
Each run starts a fresh edge (`store.sync_writes = true`: durable as JSON is); the rate counts
what the edge stored (its own counter), until the last message was durable. Runs alternate
JSON, Sparkplug, JSON, … and the medians are compared.

Target (issue 20): Sparkplug points/s >= 50 % of JSON points/s.

Usage: python3 benches/sparkplug.py [--duration 20] [--devices 8] [--runs 3]
Writes a JSON summary to stdout and progress to stderr.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import SIM, Edge, log  # noqa: E402

READINGS = 10


def run(work, name, fmt, a):
    e = Edge(work, name)
    report = os.path.join(work, f"{name}.json")
    subprocess.run([SIM, "load", "--broker", f"mqtt://127.0.0.1:{e.mqtt}", "--devices", str(a.devices), "--rate", "0",
                    "--duration", f"{a.duration}s", "--qos", "1", "--readings", str(READINGS), "--format", fmt,
                    "--report", report],
                   check=True, env={**os.environ, "RUST_LOG": "warn"}, stderr=subprocess.DEVNULL)
    r = json.load(open(report))
    t_exit = time.monotonic()
    while e.stored() < r["published"]:
        time.sleep(0.01)
    drain = time.monotonic() - t_exit
    status = e.status()
    e.stop()
    events_per_s = r["published"] / (r["elapsed_s"] + drain)
    dead = status["ingest"]["dead_letters"]
    assert dead == 0, f"{name}: {dead} dead letters"
    log(f"{name}: {r['published']:,} messages stored, {events_per_s:,.0f} messages/s = {events_per_s * READINGS:,.0f} points/s")
    return {"messages": r["published"], "messages_per_s": events_per_s, "points_per_s": events_per_s * READINGS,
            "points_stored": status["ingest"]["points"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="millrace-bench-sparkplug-")
    runs = {"json": [], "sparkplug": []}
    try:
        for i in range(a.runs):
            for fmt in ("json", "sparkplug"):
                runs[fmt].append(run(work, f"{fmt}-{i}", fmt, a))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {f: statistics.median(r["points_per_s"] for r in rs) for f, rs in runs.items()}
    out = {"machine": f"{os.cpu_count()} cores", "devices": a.devices, "duration_s": a.duration, "qos": 1,
           "metrics_per_message": READINGS, "runs": runs,
           "json_points_per_s_median": med["json"], "sparkplug_points_per_s_median": med["sparkplug"],
           "sparkplug_vs_json": med["sparkplug"] / med["json"]}
    log(f"Sparkplug / JSON points/s (medians): {out['sparkplug_vs_json']:.3f}")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
