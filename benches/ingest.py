#!/usr/bin/env python3
"""Edge ingest benchmark (release build), all measured in one run on this machine.

1. Throughput: the same load (millrace-sim load, N devices, as fast as possible) against
   (a) the bare embedded broker (ingest off), (b) Mosquitto, (c) the full edge; for (c) the rate
   counts events durable in RocksDB (the edge's own counter), not only acknowledged.
2. Latency: p99 device timestamp -> stored at half the edge's measured maximum, in several runs
   (`--latency-runs`, each on a fresh edge; the median run is summarised).
3. Bytes on disk per telemetry point: a simulated day (12 machines, 1 s telemetry) through the
   edge, then `store-stats --compact`.
4. Memory: edge RSS with 1,000 devices connected publishing 10,000 events/s.

Usage: python3 benches/ingest.py [--duration 20] [--devices 8] [--qos 1]
Writes a JSON summary to stdout and progress to stderr.
"""
import argparse, json, os, re, shutil, signal, subprocess, sys, threading, tempfile, time, urllib.request

TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/millrace-target"))
BIN = os.path.join(TARGET, "release")
EDGE, SIM = os.path.join(BIN, "millrace-edge"), os.path.join(BIN, "millrace-sim")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


class Edge:
    def __init__(self, work, name, ingest=True, sync=True):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        self.mqtt, self.http = free_port(), free_port()
        cfg = os.path.join(self.dir, "edge.toml")
        with open(cfg, "w") as f:
            f.write(f'data_dir = "{self.dir}/data"\n[mqtt]\nlisten = "127.0.0.1:{self.mqtt}"\nallow_anonymous = true\n'
                    f'[http]\nlisten = "127.0.0.1:{self.http}"\n[ingest]\nenabled = {str(ingest).lower()}\n'
                    f'[store]\nsync_writes = {str(sync).lower()}\n[store.retention]\ntelemetry = "0s"\nevents = "0s"\n')
        self.cfg = cfg
        self.proc = subprocess.Popen([EDGE, "--config", cfg], stderr=open(os.path.join(self.dir, "edge.log"), "w"),
                                     env={**os.environ, "RUST_LOG": "warn"})
        for _ in range(200):
            try:
                get(f"http://127.0.0.1:{self.http}/health")
                return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("edge did not start")

    def status(self):
        return json.loads(get(f"http://127.0.0.1:{self.http}/api/v1/status"))

    def stored(self):
        return self.status()["ingest"]["events"]

    def metrics(self):
        return get(f"http://127.0.0.1:{self.http}/metrics")

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            s = f.read()
        return int(re.search(r"VmRSS:\s+(\d+)", s).group(1)), int(re.search(r"VmHWM:\s+(\d+)", s).group(1))

    def cpu_s(self):
        """CPU time (user + system) the edge process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def load(port, devices, rate, duration, qos, report):
    subprocess.run([SIM, "load", "--broker", f"mqtt://127.0.0.1:{port}", "--devices", str(devices), "--rate", str(rate),
                    "--duration", f"{duration}s", "--qos", str(qos), "--report", report],
                   check=True, env={**os.environ, "RUST_LOG": "warn"}, stderr=subprocess.DEVNULL)
    with open(report) as f:
        return json.load(f)


def histogram(text, name):
    """A Prometheus histogram from /metrics: (count, [(bound as printed, cumulative count)])."""
    count, buckets = 0, []
    for line in text.splitlines():
        m = re.match(rf'{name}_bucket{{le="([^"]+)"}} (\S+)', line)
        if m:
            buckets.append((m.group(1), float(m.group(2))))
        m = re.match(rf"{name}_count (\S+)", line)
        if m:
            count = float(m.group(1))
    return count, buckets


def p99_from_histogram(text, name):
    """(upper bound of the bucket holding the 99th percentile, samples)."""
    count, buckets = histogram(text, name)
    if not count:
        return None, 0
    for le, c in sorted(buckets, key=lambda b: float(b[0])):
        if c >= 0.99 * count:
            return float(le), int(count)
    return None, int(count)


def buckets_from_histogram(text, name):
    """Share of events at or below each bucket bound, e.g. {"0.005": 0.991}."""
    count, buckets = histogram(text, name)
    return {le: round(c / count, 5) for le, c in buckets} if count else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--skip-size", action="store_true")
    ap.add_argument("--only", default="throughput,latency,rss,size",
                    help="comma-separated parts to run: throughput, latency, rss, size "
                         "(latency without throughput needs --latency-rate)")
    ap.add_argument("--latency-rate", type=int, default=0,
                    help="events/s of the latency run (default: half the measured stored rate)")
    ap.add_argument("--latency-runs", type=int, default=3,
                    help="latency runs, each on a fresh edge (the share <= 5 ms varies from run to "
                         "run with the host's load; the summary gives every run and the median)")
    ap.add_argument("--rss-duration", type=int, default=75,
                    help="seconds of the RSS run (1,000 devices at 10,000 events/s)")
    a = ap.parse_args()
    only = set(a.only.split(","))
    if a.skip_size:
        only.discard("size")
    work = tempfile.mkdtemp(prefix="millrace-bench-")
    out = {"machine": f"{os.cpu_count()} cores", "devices": a.devices, "qos": a.qos, "duration_s": a.duration}

    if "throughput" in only:
        throughput(work, a, out)
    if "latency" in only:
        latency(work, a, out)
    if "rss" in only:
        rss(work, a, out)
    if "size" in only:
        size(work, out)
    print(json.dumps(out, indent=2))
    if os.environ.get("BENCH_KEEP"):
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def throughput(work, a, out):
    # 1a. bare embedded broker
    log("bare embedded broker …")
    e = Edge(work, "bare", ingest=False)
    r = load(e.mqtt, a.devices, 0, a.duration, a.qos, os.path.join(work, "bare.json"))
    e.stop()
    out["bare_broker_events_per_s"] = r["rate_per_s"]

    # 1b. Mosquitto
    log("mosquitto …")
    port = free_port()
    conf = os.path.join(work, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    mq = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", conf], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    r = load(port, a.devices, 0, a.duration, a.qos, os.path.join(work, "mosquitto.json"))
    mq.terminate(); mq.wait()
    out["mosquitto_events_per_s"] = r["rate_per_s"]

    # 1c. full edge: acknowledged rate and durable (stored) rate
    log("edge with ingest …")
    e = Edge(work, "edge")
    r = load(e.mqtt, a.devices, 0, a.duration, a.qos, os.path.join(work, "edge.json"))
    t_exit = time.monotonic()
    while e.stored() < r["published"]:
        time.sleep(0.01)
    drain = time.monotonic() - t_exit
    # Stored rate: everything published, over the publishing time plus the time until the last
    # event was durable in RocksDB.
    out["edge_acked_events_per_s"] = r["rate_per_s"]
    out["edge_drain_after_load_s"] = drain
    out["edge_stored_events_per_s"] = r["published"] / (r["elapsed_s"] + drain)
    out["edge_vs_bare_broker"] = out["edge_stored_events_per_s"] / out["bare_broker_events_per_s"]
    e.stop()

    log(f"stored {out['edge_stored_events_per_s']:.0f}/s, bare broker {out['bare_broker_events_per_s']:.0f}/s: "
        f"{out['edge_vs_bare_broker']:.3f}")


def latency(work, a, out):
    # 2. latency at half the edge's maximum, several runs (each on a fresh edge)
    half = a.latency_rate or int(out["edge_stored_events_per_s"] / 2)
    out["latency_rate_events_per_s"] = half
    runs = []
    for i in range(max(a.latency_runs, 1)):
        log(f"latency run {i + 1}/{a.latency_runs} at {half} events/s …")
        runs.append(latency_run(work, a, half, f"latency-{i}"))
        log(f"p99 <= {runs[-1]['p99_le_s']} s, {runs[-1]['share_le_5ms']:.4f} of events <= 5 ms")
    out["latency_runs"] = runs
    mid = sorted(runs, key=lambda r: r["share_le_5ms"])[len(runs) // 2]
    # The median run (by share <= 5 ms) stands for the whole in the flat keys.
    out["latency_p99_le_s"] = mid["p99_le_s"]
    out["latency_share_le_5ms_median"] = mid["share_le_5ms"]
    out["latency_samples"] = mid["samples"]
    out["latency_edge_cpu_us_per_event"] = mid["edge_cpu_us_per_event"]
    out["latency_buckets"] = mid["buckets"]
    out["latency_batch_buckets"] = mid["batch_buckets"]
    out["latency_read_to_stored_buckets"] = mid["read_to_stored_buckets"]


def latency_run(work, a, rate, name):
    e = Edge(work, name)
    cpu0 = e.cpu_s()
    r = load(e.mqtt, a.devices, rate, a.duration, a.qos, os.path.join(work, name + ".json"))
    time.sleep(0.5)
    run = {}
    # The edge's CPU cost per event at this fixed rate (less noisy than the maximum rate).
    run["edge_cpu_us_per_event"] = (e.cpu_s() - cpu0) / max(r["published"], 1) * 1e6
    m = e.metrics()
    run["p99_le_s"], run["samples"] = p99_from_histogram(m, "millrace_edge_ingest_latency_seconds")
    run["buckets"] = buckets_from_histogram(m, "millrace_edge_ingest_latency_seconds")
    run["share_le_5ms"] = run["buckets"].get("0.005", 0.0)
    run["batch_buckets"] = buckets_from_histogram(m, "millrace_edge_ingest_batch_seconds")
    run["read_to_stored_buckets"] = buckets_from_histogram(m, "millrace_edge_ingest_read_to_stored_seconds")
    e.stop()
    return run


def rss(work, a, out):
    # 4. RSS with 1,000 devices at 10,000 events/s, long enough for memtables to fill and flush
    # many times over (memory that grows with time shows only in a run of a minute or more).
    log(f"1,000 devices at 10,000 events/s for {a.rss_duration} s …")
    e = Edge(work, "rss")
    samples, done = [], threading.Event()

    def sample():
        start = time.time()
        while not done.wait(1.0):
            samples.append((time.time() - start, e.rss_kib()[0]))

    t = threading.Thread(target=sample)
    t.start()
    load(e.mqtt, 1000, 10000, a.rss_duration, a.qos, os.path.join(work, "rss.json"))
    done.set()
    t.join()
    # While connected: the samples after the first 10 s (connecting and the first flush).
    steady = sorted(kib for at, kib in samples if at >= 10) or [e.rss_kib()[0]]
    out["rss_duration_s"] = a.rss_duration
    out["rss_1000_devices_kib"] = steady[len(steady) // 2]
    out["rss_max_sample_1000_devices_kib"] = steady[-1]
    out["rss_peak_1000_devices_kib"] = e.rss_kib()[1]
    out["rss_store_memory_bytes"] = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'millrace_edge_store_memory_bytes\{kind="([^"]+)"\} (\S+)', e.metrics())}
    e.stop()


def size(work, out):
    # 3. bytes per point on simulator telemetry
    log("a simulated day at 1 s telemetry …")
    e = Edge(work, "size", sync=False)
    rep = os.path.join(work, "day.json")
    subprocess.run([SIM, "run", "--broker", f"mqtt://127.0.0.1:{e.mqtt}", "--speed", "0", "--quiet", "--seed", "1",
                    "--start", "2026-01-05T00:00:00Z", "--duration", "1day", "--telemetry-interval", "1s",
                    "--report", rep], check=True, env={**os.environ, "RUST_LOG": "warn"}, stderr=subprocess.DEVNULL)
    sent = json.load(open(rep))["messages"]
    while e.stored() < sent:
        time.sleep(0.1)
    e.stop()
    stats = json.loads(subprocess.run([EDGE, "--config", e.cfg, "store-stats", "--compact"], check=True,
                                      capture_output=True, env={**os.environ, "RUST_LOG": "warn"}).stdout)
    out["size"] = stats


if __name__ == "__main__":
    main()
