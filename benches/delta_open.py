#!/usr/bin/env python3
"""Opening the cloud's Delta tables after many commits (release build).

1. A cloud on the local disk gets --batches small sync batches (`millrace-sim push --batch`),
   each committed to its tables and to `sync_batches`: that many commits per table, plus the
   compactions' (every 10 s, as a long-running cloud keeps its tables: the files of a table stay
   few while its commits grow).
2. The cloud is started again --runs times; timed: from the process start to the API answering
   (`millrace-cloud: API on …` on stderr), which is after every table was opened (its last
   checkpoint and the commits after it read) and the ledger rebuilt. Baseline: the same start on
   an empty data directory, in the same run.

Usage: python3 benches/delta_open.py [--batches 10000] [--runs 5] [--keep DIR]
Writes a JSON summary to stdout and progress to stderr.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import SIM, free_port, get, log  # noqa: E402
from sync import CLOUD, token, wait_http  # noqa: E402


def cloud_toml(data, port, digest):
    return (f'data_dir = "{data}"\n[http]\nlisten = "127.0.0.1:{port}"\n[dataset]\n'
            f'compaction_interval = "10s"\n[edges.sim]\ntoken_sha256 = "{digest}"\n')


def timed_start(cfg):
    """Seconds from spawning the cloud to its `API on` line; then stops it."""
    t0 = time.monotonic()
    p = subprocess.Popen([CLOUD, "--config", cfg], env={**os.environ, "RUST_LOG": "warn"},
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("millrace-cloud: API on"):
            break
    else:
        raise RuntimeError("the cloud exited before it answered")
    s = time.monotonic() - t0
    p.terminate()
    p.wait(timeout=60)
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", help="keep the dataset here (reused when it exists)")
    a = ap.parse_args()
    work = a.keep or tempfile.mkdtemp(prefix="millrace-open-bench-")
    os.makedirs(work, exist_ok=True)
    tok, digest = token("sim")
    port = free_port()
    cfg = os.path.join(work, "cloud.toml")
    with open(cfg, "w") as f:
        f.write(cloud_toml(os.path.join(work, "cloud"), port, digest))
    empty = os.path.join(work, "empty.toml")
    with open(empty, "w") as f:
        f.write(cloud_toml(os.path.join(work, "empty"), free_port(), digest))

    log_dir = os.path.join(work, "cloud", "sync_batches", "_delta_log")
    if not os.path.isdir(log_dir):
        # One machine, telemetry every 10 s: --batches batches of 20 events.
        factory = os.path.join(work, "factory.toml")
        with open(factory, "w") as f:
            f.write('telemetry_interval_ms = 10000\n[[machines]]\nsite = "s1"\nline = "l1"\n'
                    'machine = "m1"\nideal_cycle_time_ms = 30000\n')
        hours = a.batches * 20 // 450 + 1  # ~480 events an hour (telemetry, parts, states)
        cloud = subprocess.Popen([CLOUD, "--config", cfg], env={**os.environ, "RUST_LOG": "warn"},
                                 stderr=open(os.path.join(work, "cloud.log"), "w"))
        wait_http(f"http://127.0.0.1:{port}/health")
        log(f"pushing ~{a.batches} batches ({hours} h of one machine) …")
        t0 = time.monotonic()
        subprocess.run([SIM, "push", "--cloud", f"http://127.0.0.1:{port}", "--edge", "sim",
                        "--config", factory, "--seed", "1", "--start", "2026-01-05T00:00:00Z",
                        "--duration", f"{hours}h", "--batch-items", "20", "--in-flight", "1"],
                       check=True, env={**os.environ, "MILLRACE_EDGE_TOKEN": tok, "RUST_LOG": "warn"})
        log(f"pushed in {time.monotonic() - t0:.0f} s")
        cloud.terminate()
        cloud.wait(timeout=60)
    commits = {}
    checkpoints = {}
    for table in sorted(os.listdir(os.path.join(work, "cloud"))):
        d = os.path.join(work, "cloud", table, "_delta_log")
        if os.path.isdir(d):
            names = os.listdir(d)
            commits[table] = sum(n.endswith(".json") for n in names)
            checkpoints[table] = sum(".checkpoint" in n for n in names)
    log(f"commits per table {commits}, checkpoints {checkpoints}")

    timed_start(empty)  # warm the binary's pages
    base = [timed_start(empty) for _ in range(a.runs)]
    opened = [timed_start(cfg) for _ in range(a.runs)]
    out = {
        "machine": f"{os.cpu_count()} cores",
        "commits_per_table": commits,
        "checkpoints_per_table": checkpoints,
        "start_empty_s": {"median": statistics.median(base), "runs": base},
        "start_after_commits_s": {"median": statistics.median(opened), "runs": opened},
        "open_s": statistics.median(opened) - statistics.median(base),
    }
    print(json.dumps(out, indent=2))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
