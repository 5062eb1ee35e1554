#!/usr/bin/env bash
# Starts a local Millrace: the cloud (dataset, reports, dashboard), the edge (embedded broker,
# RocksDB, API, sync to the cloud) and a simulated factory that publishes to the edge. Ctrl-C stops everything cleanly; data stays in ./data and the next run
# continues with it. Called by `./millrace demo` after the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${CARGO_TARGET_DIR:-$HOME/.cache/millrace-target}/release"
mkdir -p data
pids=()
stop() {
  trap - INT TERM EXIT
  echo; echo "stopping…"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  echo "stopped; data kept in ./data"
}
trap stop INT TERM EXIT

wait_for() { # url log name
  for _ in $(seq 200); do
    curl -fsS "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the $3 did not start: see $2"; tail -20 "$2"; exit 1
}

"$BIN/millrace-cloud" --config demo/cloud.toml 2>data/cloud.log &
pids+=($!)
wait_for http://127.0.0.1:8090/health data/cloud.log cloud
# Master data: the simulated machines' ideal cycle times, through the cloud's API.
"$BIN/millrace-sim" truth --seed "${MILLRACE_DEMO_SEED:-1}" --duration 1h --start 2026-01-05T00:00:00Z 2>/dev/null |
  jq '[.machines[] | {site, line, machine, ideal_cycle_time_ms}]' |
  curl -fsS -X PUT -H 'content-type: application/json' --data-binary @- \
    http://127.0.0.1:8090/api/v1/master/machines >/dev/null

# The demo edge's sync token (the cloud holds only its SHA-256, in demo/cloud.toml).
export MILLRACE_EDGE_SYNC__TOKEN=mrt_62ac38b1c0eeb355e005b6dba651d8435b8de884db99342a902bf744b142c59a
"$BIN/millrace-edge" --config demo/edge.toml 2>data/edge.log &
pids+=($!)
wait_for http://127.0.0.1:8081/health data/edge.log edge

# The example functions, deployed through the edge's API with the CLI (a new version each run,
# going on from the previous one's place in the trigger log: nothing is dropped, even while the
# first run's day of history arrives at once).
fn_deploy() { "$BIN/millrace-edge" fn --url http://127.0.0.1:8081 deploy "$@" >/dev/null; }
fn_deploy threshold-alert edge/functions/threshold_alert.wat --topic 'factory/+/+/+/telemetry'
fn_deploy unit-conversion edge/functions/unit_conversion.wat --topic 'factory/+/+/+/telemetry'
fn_deploy scrap-rate edge/functions/scrap_rate.wat --topic 'factory/+/+/+/part'
fn_deploy hourly-summary edge/functions/hourly_summary.wat --topic 'factory/+/+/+/part' --schedule '0 * * * *'

# The demo device credential (demo/edge.toml holds only its Argon2 hash).
export MILLRACE_MQTT_USERNAME=demo-device MILLRACE_MQTT_PASSWORD=millrace-demo
# First run: a day of history, sent at once, then live. Later runs: live from now (the time in
# between shows as a gap, as when a factory's gateway was off).
start=now
[ -f data/.demo-started ] || start=-1day
touch data/.demo-started
"$BIN/millrace-sim" run --broker mqtt://127.0.0.1:1883 --live --start "$start" --duration 30days \
  --telemetry-interval 10s --seed "${MILLRACE_DEMO_SEED:-1}" --quiet 2>data/sim.log &
pids+=($!)

cat <<MSG

Millrace is running: a simulated factory (1 site, 3 lines, 12 machines) in real time, with the
previous day's history on the first run, flowing through the edge into the cloud.

  Dashboard    http://127.0.0.1:8090/                  (live OEE per line, production, downtime, alerts)
  Cloud API    http://127.0.0.1:8090/api/v1/reports/oee?from=-1day&level=line&period=shift
  Edge API     http://127.0.0.1:8081/api/v1/status     (sync: /api/v1/sync, Prometheus: /metrics)
  MQTT         mqtt://127.0.0.1:1883  (MQTT 3.1.1 and 5; user demo-device, password millrace-demo)
               ws://127.0.0.1:8083/mqtt (the same over WebSocket); Sparkplug B gateways: docs/sparkplug.md
  Functions    threshold-alert, unit-conversion, scrap-rate, hourly-summary (edge/functions/)
  Logs         data/cloud.log, data/edge.log, data/sim.log

Try:
  curl -s "http://127.0.0.1:8090/api/v1/reports/oee?from=-1day&level=line&period=day"
  curl -s "http://127.0.0.1:8090/api/v1/reports/downtime?from=-1day&level=line"
  curl -s "http://127.0.0.1:8090/api/v1/reports/production?from=-8h&level=line&window=1h&format=csv"
  curl -s http://127.0.0.1:8081/api/v1/sync
  $BIN/millrace-edge fn list                      (functions, their counters)
  $BIN/millrace-edge fn logs --limit 5            (the invocation log)
  curl -s "http://127.0.0.1:8081/api/v1/alerts?limit=5"      (temperature alerts before breakdowns)
  curl -s "http://127.0.0.1:8090/api/v1/alerts?severity=critical&limit=5"   (the same, synced to the cloud)
  curl -s http://127.0.0.1:8090/api/v1/edges      (per edge: what the cloud holds, its functions' counters and lag)
  mosquitto_sub -p 1883 -u demo-device -P millrace-demo -t 'millrace/alerts/#' -t 'factory/summary/#' -v
  curl -s http://127.0.0.1:8081/api/v1/series
  $BIN/millrace-edge sparkplug nodes              (Sparkplug B nodes that published to the edge)
  curl -s "http://127.0.0.1:8081/api/v1/points?series=plant-1/line-1/machine-01/temperature&from=-1day&step=1h"
  curl -s "http://127.0.0.1:8081/api/v1/events?machine=plant-1/line-1/machine-01&from=-1day&kind=state&limit=20"
  mosquitto_pub -p 1883 -u demo-device -P millrace-demo -t factory/plant-1/line-9/my-machine/state \\
    -m '{"ts":'\$(date +%s000)',"seq":1,"state":"running"}'

Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}" || true
