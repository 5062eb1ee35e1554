#!/usr/bin/env python3
"""Dashboard benchmark (release build): how long the dashboard takes to show a 7-day view of a
100-machine factory in headless Chromium, from navigation to the last panel drawn.

Uses the report benchmark's dataset (benches/reports.py builds it in --dir: 100 machines, 2 sites
x 5 lines x 10, 30 days, ~50 million events) and a release `millrace-cloud` on it, then drives
the page with tests/browser/dashboard.mjs (the browser test's driver). The figure is the page's
own: from the start of navigation until every chart has finished drawing (ECharts' `finished`,
progressive rendering included), with when the last API answer arrived and each panel's drawing
time (`performance.measure`) to show where the time goes:

- all sites, the last 7 days of the dataset (the state timeline then has 100 rows);
- one line (10 machines) and one machine over the same 7 days;
- each --runs times, a fresh page each time (the charting library from the browser's cache
  after the first, as a user who keeps the page open has it). The median is reported, and the
  sizes of the API answers the page loads.

Usage: python3 benches/dashboard.py [--runs 5] [--dir ~/.cache/millrace-bench/reports]
Writes a JSON summary to stdout and progress to stderr.
"""
import argparse, json, os, re, statistics, subprocess, sys, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ingest import free_port, log  # noqa: E402
from reports import DAY_MS, START_MS, build_dataset, start_cloud, stop  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--days", type=int, default=30, help="days in the dataset (reports.py's)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/millrace-bench/reports"))
    a = ap.parse_args()
    a.threads = os.cpu_count()
    port = free_port()
    build_dataset(a, a.dir, port)
    with open(os.path.join(a.dir, "cloud.toml")) as f:
        text = f.read()
    text = re.sub(r'listen = "127.0.0.1:\d+"', f'listen = "127.0.0.1:{port}"', text)
    with open(os.path.join(a.dir, "cloud.toml"), "w") as f:
        f.write(text)
    to_ms = START_MS + a.days * DAY_MS
    from_ms = to_ms - 7 * DAY_MS
    iso = lambda ms: __import__("datetime").datetime.utcfromtimestamp(ms / 1000).strftime("%Y-%m-%dT%H:%MZ")
    rng = f"range=custom&from={iso(from_ms)}&to={iso(to_ms)}"
    base = f"http://127.0.0.1:{port}"
    views = {"all sites": f"/?{rng}", "one line": f"/?{rng}&at=plant1/line1", "one machine": f"/?{rng}&at=plant1/line1/m01"}
    cloud = start_cloud(a.dir, port)
    out = {"days": 7, "machines": 100, "views": {}}
    try:
        # The sizes of what the page loads for the widest view.
        q = f"from={from_ms}&to={to_ms}"
        for name, path in [("states", f"/api/v1/reports/states?{q}"), ("states at 1 px", f"/api/v1/reports/states?{q}&resolution={(to_ms - from_ms) // 1800}"), ("oee per machine", f"/api/v1/reports/oee?{q}&level=machine&period=total"),
                           ("oee per shift", f"/api/v1/reports/oee?{q}&level=site&period=shift")]:
            body = urllib.request.urlopen(base + path, timeout=600).read()
            out.setdefault("answers_bytes", {})[name] = len(body)
            gz = urllib.request.urlopen(urllib.request.Request(base + path, headers={"Accept-Encoding": "gzip"}), timeout=600)
            out.setdefault("answers_gzip_bytes", {})[name] = len(gz.read()) if gz.headers.get("Content-Encoding") == "gzip" else None
            if name.startswith("states"):
                out.setdefault("state_intervals", {})[name] = len(json.loads(body)["intervals"])
        node = subprocess.Popen(["node", "dashboard.mjs"], cwd=os.path.join(ROOT, "tests/browser"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for name, path in views.items():
            runs = []
            for width in [1920] * (a.runs + 1):
                node.stdin.write(json.dumps({"open": base + path, "width": width}) + "\n")
                node.stdin.flush()
                r = json.loads(node.stdout.readline())
                if "error" in r or r.get("state") != "ok":
                    raise SystemExit(f"{name}: {r}")
                runs.append(r)
            med = lambda f: statistics.median(f(r) for r in runs[1:])
            v = out["views"][name] = {
                # navigation start → every chart drawn (the page's data-drawnMs)
                "first_ms": runs[0]["drawn_ms"], "median_ms": med(lambda r: r["drawn_ms"]),
                "runs_ms": [r["drawn_ms"] for r in runs[1:]],
                # of which: navigation start → last API answer, and each panel's drawing
                "answers_median_ms": med(lambda r: r["answers_ms"]),
                "panels_median_ms": {p: med(lambda r: r["panels_ms"][p]) for p in runs[1]["panels_ms"]},
                "timeline_intervals": len(runs[1]["intervals"]), "resolution_ms": runs[1]["resolution"],
            }
            log(f"{name}: median {v['median_ms']} ms (answers at {v['answers_median_ms']} ms; first {v['first_ms']} ms)")
        node.stdin.close()
        node.wait()
    finally:
        stop(cloud)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
