#!/usr/bin/env python3
"""Report benchmark (release build): OEE and production over ~50 million events, Millrace
(Polars, through its REST API) side by side with DuckDB running the same reports as SQL over the
same Delta tables' Parquet files, in one run on this machine.

1. Dataset (kept in --dir between runs, rebuilt when its parameters change): a simulated factory
   of 100 machines (2 sites x 5 lines x 10, ideal cycle times 2.0-2.8 s, two 8 h shifts a day) over
   30 days, pushed into a real `millrace-cloud` with `millrace-sim push` (the sync protocol, each
   batch durable before it is acknowledged: this also measures the cloud's storage ingest), then
   compacted to one Parquet file per date and site.
2. Reports, warm (one untimed run first, then the median of --runs), over the whole 30 days:
   - OEE per machine per shift (ISO 22400: availability, performance, quality from the state
     durations cut at shift boundaries and the part counts);
   - production per machine per hour (good, scrap, rework, total).
   Millrace: `GET /api/v1/reports/oee` and `/production` on the running cloud (HTTP + JSON
   included). DuckDB: the same reports as SQL over the files the tables' current snapshots name,
   results fetched to Python.
3. The two engines' results are compared row by row (counts exactly, times exactly), and the
   Millrace totals against the simulator's ground truth.

Usage: python3 benches/reports.py [--runs 5] [--dir ~/.cache/millrace-bench/reports]
Writes a JSON summary to stdout and progress to stderr.
"""
import argparse, hashlib, json, os, shutil, statistics, subprocess, sys, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import BIN, SIM, free_port, get, log  # noqa: E402
from sync import CLOUD, token, wait_http  # noqa: E402

START = "2026-10-01T00:00:00Z"
START_MS = 1790812800000  # 2026-10-01T00:00:00Z
DAY_MS = 86_400_000
SITES, LINES, MACHINES = 2, 5, 10


def ideal_ms(s, l, m):
    return 2000 + ((s * 50 + l * 10 + m) * 37 % 9) * 100


def machines():
    for s in range(SITES):
        for l in range(LINES):
            for m in range(MACHINES):
                yield f"plant{s + 1}", f"line{l + 1}", f"m{m + 1:02d}", ideal_ms(s, l, m)


def factory_toml():
    out = ["telemetry_interval_ms = 3600000", "[profile]", "batch_size = 3000", "changeover_minutes = 20.0"]
    for site, line, machine, ideal in machines():
        out += ["[[machines]]", f'site = "{site}"', f'line = "{line}"', f'machine = "{machine}"',
                f"ideal_cycle_time_ms = {ideal}"]
    return "\n".join(out) + "\n"


def cloud_toml(data, port, digest, compaction="1h"):
    out = [f'data_dir = "{data}"', "[http]", f'listen = "127.0.0.1:{port}"', "[dataset]",
           f'compaction_interval = "{compaction}"', "compaction_min_files = 2", f"[edges.sim]", f'token_sha256 = "{digest}"',
           "[master]", "default_ideal_cycle_ms = 1000"]
    for site, line, machine, ideal in machines():
        out += ["[[master.machines]]", f'site = "{site}"', f'line = "{line}"', f'machine = "{machine}"',
                f"ideal_cycle_time_ms = {ideal}"]
    return "\n".join(out) + "\n"


def start_cloud(work, port):
    env = {**os.environ, "RUST_LOG": "warn"}
    p = subprocess.Popen([CLOUD, "--config", os.path.join(work, "cloud.toml")], env=env,
                         stderr=open(os.path.join(work, "cloud.log"), "a"))
    wait_http(f"http://127.0.0.1:{port}/health")
    return p


def stop(p):
    p.terminate()
    p.wait(timeout=120)


def manifest_files(data):
    """The Parquet files the cloud's Delta tables hold in their current snapshots (read with
    delta-rs: `pip install deltalake pyarrow`), by path relative to `data`."""
    import deltalake
    import pyarrow as pa
    files = {}
    for table in ("events", "part_counts"):
        root = os.path.join(data, table)
        if not os.path.isdir(os.path.join(root, "_delta_log")):
            continue
        adds = pa.table(deltalake.DeltaTable(root).get_add_actions(flatten=True))
        for path, rows in zip(adds.column("path").to_pylist(), adds.column("num_records").to_pylist()):
            files[f"{table}/{path}"] = {"table": table, "rows": rows}
    return files


def build_dataset(a, work, port):
    # The dataset layout version is part of the key: a new layout rebuilds the dataset.
    key = hashlib.sha256((factory_toml() + f"{a.days}|{a.seed}|layout 2, part counts by machine").encode()).hexdigest()[:16]
    marker = os.path.join(work, "complete")
    if os.path.exists(marker) and open(marker).read().strip() == key:
        log(f"dataset in {work} is complete (key {key}); reusing it")
        return json.load(open(os.path.join(work, "push.json"))), json.load(open(os.path.join(work, "truth.json")))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    with open(os.path.join(work, "factory.toml"), "w") as f:
        f.write(factory_toml())
    tok, digest = token("sim")
    with open(os.path.join(work, "cloud.toml"), "w") as f:
        f.write(cloud_toml(os.path.join(work, "cloud"), port, digest))
    cloud = start_cloud(work, port)
    log(f"pushing {a.days} days of a {SITES * LINES * MACHINES}-machine factory into the cloud …")
    subprocess.run([SIM, "push", "--cloud", f"http://127.0.0.1:{port}", "--edge", "sim", "--seed", str(a.seed),
                    "--config", os.path.join(work, "factory.toml"), "--start", START, "--duration", f"{a.days}days",
                    "--truth", os.path.join(work, "truth.json"), "--report", os.path.join(work, "push.json")],
                   check=True, env={**os.environ, "RUST_LOG": "info", "MILLRACE_EDGE_TOKEN": tok})
    push = json.load(open(os.path.join(work, "push.json")))
    log(f"pushed {push['items']:,} events in {push['elapsed_s']:.1f} s ({push['items_per_s']:,.0f} events/s); compacting …")
    stop(cloud)
    # Compaction after the push (during it, it would rewrite the growing partition again and again).
    data = os.path.join(work, "cloud")
    with open(os.path.join(work, "cloud.toml"), "w") as f:
        f.write(cloud_toml(data, port, digest, compaction="1s"))
    cloud = start_cloud(work, port)
    partitions = SITES * a.days
    for _ in range(3600):
        ev = [d for d in manifest_files(data).values() if d["table"] == "events"]
        if len(ev) <= partitions:
            break
        time.sleep(1)
    stop(cloud)
    with open(marker, "w") as f:
        f.write(key + "\n")
    return push, json.load(open(os.path.join(work, "truth.json")))


SHIFTS = [("early", 6 * 3_600_000, 14 * 3_600_000), ("late", 14 * 3_600_000, 22 * 3_600_000)]


def shift_instances(from_ms, to_ms):
    out = []
    day = from_ms // DAY_MS - 1
    while day * DAY_MS < to_ms:
        for name, s, e in SHIFTS:
            a, b = day * DAY_MS + s, day * DAY_MS + e
            if a < to_ms and b > from_ms:
                out.append((name, a, b))
        day += 1
    return out


def duckdb_oee_sql(files, from_ms, to_ms, counts=None):
    """OEE per machine per shift as SQL: the same definitions as the cloud's report. Parts come
    from the part-counts files when given (as the cloud reads them), else from the raw events."""
    shifts = ", ".join(f"({a}, {b})" for _, a, b in shift_instances(from_ms, to_ms))
    ideal = ", ".join(f"('{s}', '{l}', '{m}', {i})" for s, l, m, i in machines())
    case_idx = " ".join(f"WHEN tod >= {s} AND tod < {e} THEN {s}" for _, s, e in SHIFTS)
    flist = ", ".join(f"'{f}'" for f in files)
    if counts:
        clist = ", ".join(f"'{f}'" for f in counts)
        parts = f"""parts AS (
  SELECT site, line, machine, day * {DAY_MS} + shift_start AS start_ms,
         sum(good) AS good, sum(scrap) AS scrap, sum(rework) AS rework
  FROM (SELECT site, line, machine, good, scrap, rework, t // {DAY_MS} AS day,
               CASE {case_idx} END AS shift_start
        FROM (SELECT *, epoch_ms(minute) AS t, epoch_ms(minute) % {DAY_MS} AS tod FROM read_parquet([{clist}])
              WHERE epoch_ms(minute) >= {from_ms} AND epoch_ms(minute) < {to_ms}))
  WHERE shift_start IS NOT NULL
  GROUP BY ALL),"""
    else:
        parts = f"""parts AS (
  SELECT site, line, machine, day * {DAY_MS} + shift_start AS start_ms,
         count(*) FILTER (WHERE outcome = 'good') AS good,
         count(*) FILTER (WHERE outcome = 'scrap') AS scrap,
         count(*) FILTER (WHERE outcome = 'rework') AS rework
  FROM (SELECT site, line, machine, outcome, t // {DAY_MS} AS day,
               CASE {case_idx} END AS shift_start
        FROM (SELECT *, t % {DAY_MS} AS tod FROM ev WHERE kind = 'part' AND t >= {from_ms} AND t < {to_ms}))
  WHERE shift_start IS NOT NULL
  GROUP BY ALL),"""
    return f"""
WITH ev AS (SELECT site, line, machine, epoch_ms(ts) AS t, device_seq, kind, state, reason, outcome
            FROM read_parquet([{flist}])),
shifts(start_ms, end_ms) AS (VALUES {shifts}),
ideal(site, line, machine, ideal_ms) AS (VALUES {ideal}),
{parts}
st AS (
  SELECT site, line, machine, state, reason, t AS a,
         coalesce(lead(t) OVER w, {to_ms}) AS b,
         (state = 'down' AND reason = 'technical_failure'
          AND NOT coalesce(lag(state) OVER w = state AND lag(reason) OVER w IS NOT DISTINCT FROM reason, false)) AS entered_failure
  FROM ev WHERE kind = 'state' AND t >= {from_ms - DAY_MS} AND t < {to_ms}
  WINDOW w AS (PARTITION BY site, line, machine ORDER BY t, device_seq)),
cut AS (
  SELECT st.*, s.start_ms, s.end_ms,
         least(b, s.end_ms, {to_ms}) - greatest(a, s.start_ms, {from_ms}) AS ms
  FROM st JOIN shifts s ON s.start_ms < st.b AND s.end_ms > st.a),
times AS (
  SELECT site, line, machine, start_ms,
         coalesce(sum(ms) FILTER (WHERE ms > 0), 0) AS all_ms,
         coalesce(sum(ms) FILTER (WHERE ms > 0 AND state = 'running'), 0) AS running_ms,
         coalesce(sum(ms) FILTER (WHERE ms > 0 AND state = 'planned_stop'), 0) AS planned_stop_ms,
         coalesce(sum(ms) FILTER (WHERE ms > 0 AND state = 'down' AND reason = 'technical_failure'), 0) AS failure_down_ms,
         count(*) FILTER (WHERE entered_failure AND a >= start_ms AND a < end_ms AND a >= {from_ms}) AS failures
  FROM cut GROUP BY ALL),
j AS (
  SELECT coalesce(p.site, t.site) AS site, coalesce(p.line, t.line) AS line,
         coalesce(p.machine, t.machine) AS machine, coalesce(p.start_ms, t.start_ms) AS start_ms,
         coalesce(good, 0) AS good, coalesce(scrap, 0) AS scrap, coalesce(rework, 0) AS rework,
         coalesce(running_ms, 0) AS running_ms, coalesce(all_ms, 0) - coalesce(planned_stop_ms, 0) AS planned_ms,
         coalesce(failures, 0) AS failures, coalesce(failure_down_ms, 0) AS failure_down_ms
  FROM parts p FULL OUTER JOIN times t USING (site, line, machine, start_ms))
SELECT site || '/' || line || '/' || machine AS entity, start_ms, good, scrap, rework, good + scrap + rework AS total,
       planned_ms AS planned_production_ms, running_ms,
       running_ms / nullif(planned_ms, 0) AS availability,
       ideal_ms * (good + scrap + rework) / nullif(running_ms, 0) AS performance,
       good / nullif(good + scrap + rework, 0) AS quality,
       CASE WHEN running_ms > 0 AND planned_ms > 0 AND good + scrap + rework > 0
            THEN (running_ms / planned_ms) * (ideal_ms * (good + scrap + rework) / running_ms) * (good / (good + scrap + rework))
            WHEN planned_ms > 0 THEN 0.0 END AS oee,
       failures, failure_down_ms
FROM j JOIN ideal USING (site, line, machine)
ORDER BY entity, start_ms
"""


def duckdb_production_sql(files, from_ms, to_ms, counts=None):
    if counts:
        clist = ", ".join(f"'{f}'" for f in counts)
        return f"""
SELECT site, line, machine, (epoch_ms(minute) // 3600000) * 3600000 AS window_start,
       sum(good) AS good, sum(scrap) AS scrap, sum(rework) AS rework,
       sum(good + scrap + rework) AS total, sum(good + scrap + rework) / 1.0 AS throughput_per_hour
FROM read_parquet([{clist}])
WHERE epoch_ms(minute) >= {from_ms} AND epoch_ms(minute) < {to_ms}
GROUP BY ALL ORDER BY site, line, machine, window_start
"""
    flist = ", ".join(f"'{f}'" for f in files)
    return f"""
SELECT site, line, machine, (epoch_ms(ts) // 3600000) * 3600000 AS window_start,
       count(*) FILTER (WHERE outcome = 'good') AS good,
       count(*) FILTER (WHERE outcome = 'scrap') AS scrap,
       count(*) FILTER (WHERE outcome = 'rework') AS rework,
       count(*) AS total, count(*) / 1.0 AS throughput_per_hour
FROM read_parquet([{flist}])
WHERE kind = 'part' AND epoch_ms(ts) >= {from_ms} AND epoch_ms(ts) < {to_ms}
GROUP BY ALL ORDER BY site, line, machine, window_start
"""


def timed(fn, runs):
    fn()  # warm-up (file cache, DuckDB/Polars metadata)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), out


def http_body(url):
    with urllib.request.urlopen(url, timeout=600) as r:
        return r.read()


def compare(what, ours, theirs, keys, fields):
    """Row-by-row comparison; returns the number of rows that differ (and logs the first)."""
    index = {tuple(r[k] for k in keys): r for r in theirs}
    bad = 0
    if len(ours) != len(theirs):
        log(f"{what}: {len(ours)} rows from Millrace, {len(theirs)} from DuckDB")
        bad += abs(len(ours) - len(theirs))
    for r in ours:
        o = index.get(tuple(r[k] for k in keys))
        if o is None or any(
                (r[f] is None) != (o[f] is None) or (r[f] is not None and abs(float(r[f]) - float(o[f])) > 1e-9 * max(1.0, abs(float(o[f]))))
                for f in fields):
            if bad < 3:
                log(f"{what}: differs: millrace {r} duckdb {o}")
            bad += 1
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/millrace-bench/reports"))
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="DuckDB threads (default: all cores, as Polars)")
    a = ap.parse_args()
    import duckdb

    port = free_port()
    push, truth = build_dataset(a, a.dir, port)
    # The config names the port the dataset was built with; point it at a free one.
    with open(os.path.join(a.dir, "cloud.toml")) as f:
        text = f.read()
    import re
    text = re.sub(r'listen = "127.0.0.1:\d+"', f'listen = "127.0.0.1:{port}"', text)
    text = re.sub(r'compaction_interval = "[^"]*"', 'compaction_interval = "1h"', text)
    with open(os.path.join(a.dir, "cloud.toml"), "w") as f:
        f.write(text)
    data = os.path.join(a.dir, "cloud")
    held = manifest_files(data)
    files = sorted(os.path.join(data, p) for p, d in held.items() if d["table"] == "events")
    counts = sorted(os.path.join(data, p) for p, d in held.items() if d["table"] == "part_counts")
    rows = sum(d["rows"] for d in held.values() if d["table"] == "events")
    count_rows = sum(d["rows"] for d in held.values() if d["table"] == "part_counts")
    size = sum(os.path.getsize(f) for f in files)
    count_size = sum(os.path.getsize(f) for f in counts)
    log(f"{rows:,} events in {len(files)} Parquet files ({size / 1e6:.0f} MB); "
        f"{count_rows:,} part counts per machine and minute in {len(counts)} files ({count_size / 1e6:.1f} MB)")
    from_ms, to_ms = START_MS, START_MS + a.days * DAY_MS

    cloud = start_cloud(a.dir, port)
    base = f"http://127.0.0.1:{port}/api/v1/reports"
    q = f"from={from_ms}&to={to_ms}"
    try:
        m_oee_s, m_oee_min, body = timed(lambda: http_body(f"{base}/oee?{q}&level=machine&period=shift"), a.runs)
        m_oee = json.loads(body)["rows"]
        m_prod_s, m_prod_min, body = timed(lambda: http_body(f"{base}/production?{q}&level=machine&window=1h"), a.runs)
        m_prod = json.loads(body)["rows"]
    finally:
        stop(cloud)
    log(f"millrace: oee {m_oee_s * 1000:.0f} ms, production {m_prod_s * 1000:.0f} ms")

    con = duckdb.connect()
    con.execute(f"SET threads = {a.threads}")

    def run(sql):
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    # The same files the cloud reads: part counts for parts, events for state changes.
    oee_sql = duckdb_oee_sql(files, from_ms, to_ms, counts)
    prod_sql = duckdb_production_sql(files, from_ms, to_ms, counts)
    d_oee_s, d_oee_min, d_oee = timed(lambda: run(oee_sql), a.runs)
    d_prod_s, d_prod_min, d_prod = timed(lambda: run(prod_sql), a.runs)
    log(f"duckdb: oee {d_oee_s * 1000:.0f} ms, production {d_prod_s * 1000:.0f} ms")
    # For scale: DuckDB over one row per part (the raw events only), fewer runs.
    raw_runs = max(1, min(a.runs, 3))
    r_oee_s, _, r_oee = timed(lambda: run(duckdb_oee_sql(files, from_ms, to_ms)), raw_runs)
    r_prod_s, _, r_prod = timed(lambda: run(duckdb_production_sql(files, from_ms, to_ms)), raw_runs)
    log(f"duckdb over raw events: oee {r_oee_s * 1000:.0f} ms, production {r_prod_s * 1000:.0f} ms")

    for r in m_oee:
        r["running_ms"] = r["times"]["running_ms"] if "times" in r else r["running_ms"]
    oee_diff = compare("oee", m_oee, d_oee, ["entity", "start_ms"],
                       ["good", "scrap", "rework", "running_ms", "planned_production_ms", "failures",
                        "failure_down_ms", "availability", "performance", "quality", "oee"])
    prod_diff = compare("production", m_prod, d_prod, ["site", "line", "machine", "window_start"],
                        ["good", "scrap", "rework", "total"])
    raw_oee_diff = compare("oee (raw)", m_oee, r_oee, ["entity", "start_ms"],
                           ["good", "scrap", "rework", "running_ms", "planned_production_ms", "oee"])
    raw_prod_diff = compare("production (raw)", m_prod, r_prod, ["site", "line", "machine", "window_start"],
                            ["good", "scrap", "rework", "total"])
    # Against the simulator's ground truth: parts per machine over the whole run, exactly.
    truth_parts = {f"{m['site']}/{m['line']}/{m['machine']}": m["totals"]["total"] for m in truth["machines"]}
    ours_parts = {}
    for r in m_oee:
        ours_parts[r["entity"]] = ours_parts.get(r["entity"], 0) + r["total"]
    truth_diff = sum(1 for k, v in truth_parts.items() if ours_parts.get(k) != v)

    out = {
        "machine": f"{os.cpu_count()} cores",
        "events": rows,
        "files": len(files),
        "parquet_bytes": size,
        "part_count_rows": count_rows,
        "part_count_files": len(counts),
        "part_count_bytes": count_size,
        "machines": SITES * LINES * MACHINES,
        "days": a.days,
        "storage_ingest": {k: push[k] for k in ("items", "points", "batches", "wire_bytes", "elapsed_s", "items_per_s")},
        "oee_per_machine_shift": {"rows": len(m_oee), "millrace_s": m_oee_s, "millrace_min_s": m_oee_min,
                                  "duckdb_s": d_oee_s, "duckdb_min_s": d_oee_min, "ratio": m_oee_s / d_oee_s,
                                  "rows_differing": oee_diff,
                                  "duckdb_raw_events_s": r_oee_s, "rows_differing_from_raw": raw_oee_diff},
        "production_per_machine_hour": {"rows": len(m_prod), "millrace_s": m_prod_s, "millrace_min_s": m_prod_min,
                                        "duckdb_s": d_prod_s, "duckdb_min_s": d_prod_min, "ratio": m_prod_s / d_prod_s,
                                        "rows_differing": prod_diff,
                                        "duckdb_raw_events_s": r_prod_s, "rows_differing_from_raw": raw_prod_diff},
        "machines_whose_part_count_differs_from_truth": truth_diff,
        "duckdb_threads": a.threads,
        "duckdb_version": duckdb.__version__,
    }
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
