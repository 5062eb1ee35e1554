#!/usr/bin/env bash
# Starts a local Millrace: the edge (embedded broker, RocksDB, API) and a simulated factory that
# publishes to it. Ctrl-C stops everything cleanly; data stays in ./data and the next run
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

"$BIN/millrace-edge" --config demo/edge.toml 2>data/edge.log &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS http://127.0.0.1:8081/health >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS http://127.0.0.1:8081/health >/dev/null || { echo "the edge did not start: see data/edge.log"; tail -20 data/edge.log; exit 1; }

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
previous day's history on the first run.

  Edge API     http://127.0.0.1:8081/api/v1/status     (health: /health, Prometheus: /metrics)
  MQTT         mqtt://127.0.0.1:1883  (MQTT 3.1.1 and 5; user demo-device, password millrace-demo)
  Logs         data/edge.log, data/sim.log

Try:
  curl -s http://127.0.0.1:8081/api/v1/series
  curl -s "http://127.0.0.1:8081/api/v1/points?series=plant-1/line-1/machine-01/temperature&from=-1day&step=1h"
  curl -s "http://127.0.0.1:8081/api/v1/events?machine=plant-1/line-1/machine-01&from=-1day&kind=state&limit=20"
  mosquitto_pub -p 1883 -u demo-device -P millrace-demo -t factory/plant-1/line-9/my-machine/state \\
    -m '{"ts":'\$(date +%s000)',"seq":1,"state":"running"}'

Press Ctrl-C to stop.
MSG
wait -n "${pids[@]}" || true
