#!/usr/bin/env python3
"""Two cloud nodes on one bucket against one node, in one run (release build).

Each edge's outbox is filled first with the cloud down (--hours of a 12-machine factory, 1 s
telemetry, as in benches/sync.py; edge i uses seed i). Then, on moto's S3 server on this machine:

1. One node: one cloud node (bucket prefix `one`) catches up one edge.
2. Two nodes: two cloud nodes on one prefix (`two`), each catching up its own edge at the same
   time; both commit to the same tables.

Rate = telemetry points acknowledged per second of wall time, from the nodes' start until every
outbox is empty. Also reported: each node's commits, commit conflicts (a commit whose table
another node changed under it: the batch is checked and committed again) and commit retries
(delta-rs moving a commit to the next version), from the nodes' /metrics, and that each edge's
ledger is complete on both nodes (every item once, no gap).

Usage: python3 benches/two_nodes.py [--hours 6]
Writes a JSON summary to stdout and progress to stderr.
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import SIM, EDGE, free_port, get, log  # noqa: E402
from sync import CLOUD, cpu_s, edge_toml, start_s3, token, wait_http  # noqa: E402

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1"}


def filled_edge(work, name, seed, hours, digest_tok):
    """An edge whose outbox holds --hours of a factory; returns (process, http port, config)."""
    tok, _ = digest_tok
    d = os.path.join(work, name)
    os.makedirs(d)
    mqtt, http, cloud_port = free_port(), free_port(), free_port()
    cfg = os.path.join(d, "edge.toml")
    with open(cfg, "w") as f:
        f.write(edge_toml(name, f"{d}/data", mqtt, http, cloud_port))
    env = {**os.environ, "RUST_LOG": "warn", "MILLRACE_EDGE_SYNC__TOKEN": tok}
    p = subprocess.Popen([EDGE, "--config", cfg], env=env, stderr=open(os.path.join(d, "edge.log"), "w"))
    wait_http(f"http://127.0.0.1:{http}/health")
    subprocess.run([SIM, "run", "--broker", f"mqtt://127.0.0.1:{mqtt}", "--speed", "0", "--quiet",
                    "--seed", str(seed), "--start", "2026-01-05T00:00:00Z", "--duration", f"{hours}h",
                    "--telemetry-interval", "1s"],
                   check=True, env={**os.environ, "RUST_LOG": "warn"}, stderr=subprocess.DEVNULL)
    return p, http, cloud_port


def start_node(work, name, port, prefix, endpoint, digests):
    cfg = os.path.join(work, f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(f'data_dir = "{work}/{name}"\n[http]\nlisten = "127.0.0.1:{port}"\n'
                f'[storage]\nurl = "s3://bench/{prefix}"\nendpoint = "{endpoint}"\nallow_http = true\n')
        for edge, digest in digests:
            f.write(f'[edges.{edge}]\ntoken_sha256 = "{digest}"\n')
    return subprocess.Popen([CLOUD, "--config", cfg], env={**os.environ, "RUST_LOG": "warn", **S3_ENV},
                            stderr=open(os.path.join(work, f"{name}.log"), "w"))


def metric(port, name):
    total = 0.0
    for line in get(f"http://127.0.0.1:{port}/metrics").splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.split()[-1])
    return total


def catch_up(work, phase, edges, nodes):
    """Starts `nodes` (name, port, [edges]) on prefix `phase`; waits for every edge's outbox
    to be empty. edges: name -> (process, http port)."""
    digests = [(e, d) for e, (_, _, d) in edges.items()]
    edges_cpu0 = sum(cpu_s(p.pid) for p, _, _ in edges.values())
    s3_cpu0 = cpu_s(S3.pid)
    t0 = time.monotonic()
    procs = [start_node(work, n, port, phase, ENDPOINT, digests) for n, port in nodes]
    while True:
        done = True
        for _, (_, http, _) in edges.items():
            s = json.loads(get(f"http://127.0.0.1:{http}/api/v1/sync"))
            if s["outbox"]["items"]["events"] or s["outbox"]["items"]["telemetry"]:
                done = False
        if done:
            break
        time.sleep(0.05)
    wall = time.monotonic() - t0
    points = sum(json.loads(get(f"http://127.0.0.1:{h}/api/v1/sync"))["sent"]["points"]
                 for _, (_, h, _) in edges.items())
    out = {"wall_s": wall, "points": points, "points_per_s": points / wall, "nodes": {}}
    for (n, port), p in zip(nodes, procs):
        out["nodes"][n] = {
            "commits": metric(port, "millrace_cloud_commits_total"),
            "conflicts": metric(port, "millrace_cloud_commit_conflicts_total"),
            "retries": metric(port, "millrace_cloud_commit_retries_total"),
            "cpu_s": cpu_s(p.pid),
        }
    out["edges_cpu_s"] = sum(cpu_s(p.pid) for p, _, _ in edges.values()) - edges_cpu0
    out["s3_server_cpu_s"] = cpu_s(S3.pid) - s3_cpu0
    # Every edge complete on every node (each node reads the other's commits): the ledger holds
    # every sequence number the edge gave out, no gap.
    for n, port in nodes:
        for e, (_, http, _) in edges.items():
            last = json.loads(get(f"http://127.0.0.1:{http}/api/v1/sync"))["outbox"]["next_seq"] - 1
            for _ in range(300):
                led = next((x for x in json.loads(get(f"http://127.0.0.1:{port}/api/v1/edges"))["edges"]
                            if x["edge"] == e), None)
                if led and led["gap_items"] == 0 and led["items"] == last:
                    break
                time.sleep(0.1)
            out["nodes"][n][f"{e}_outbox_seqs"] = last
            out["nodes"][n][f"{e}_items"] = led["items"] if led else 0
            out["nodes"][n][f"{e}_gap_items"] = led["gap_items"] if led else None
    for p in procs:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    return out


ENDPOINT = None
S3 = None


def main():
    global ENDPOINT, S3
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=int, default=6)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="millrace-two-nodes-")
    s3, ENDPOINT = start_s3(work)
    S3 = s3
    toks = {e: token(e) for e in ("e1", "e2", "e3")}
    log(f"filling three edges' outboxes ({a.hours} h of a 12-machine factory each) …")
    edges = {}
    for i, e in enumerate(("e1", "e2", "e3"), start=1):
        p, http, cloud_port = filled_edge(work, e, i, a.hours, toks[e])
        edges[e] = (p, http, cloud_port, toks[e][1])
    out = {"machine": f"{os.cpu_count()} cores", "hours": a.hours, "storage": "moto S3 server"}
    log("one node, one edge …")
    e1 = edges["e1"]
    out["one_node"] = catch_up(work, "one", {"e1": (e1[0], e1[1], e1[3])}, [("node-1", e1[2])])
    log("two nodes on one table, an edge each …")
    e2, e3 = edges["e2"], edges["e3"]
    out["two_nodes"] = catch_up(work, "two", {"e2": (e2[0], e2[1], e2[3]), "e3": (e3[0], e3[1], e3[3])},
                                [("node-a", e2[2]), ("node-b", e3[2])])
    out["two_vs_one"] = out["two_nodes"]["points_per_s"] / out["one_node"]["points_per_s"]
    print(json.dumps(out, indent=2))
    for p, *_ in edges.values():
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    s3.kill()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
