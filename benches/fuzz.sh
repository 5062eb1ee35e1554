#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo fuzz, libFuzzer, AddressSanitizer) for a bounded time
# and prints what each found. Not part of the test run: see docs/testing.md.
#
#   benches/fuzz.sh [seconds per target, default 300] [target ...]
#
# Needs the nightly toolchain (rustup toolchain install nightly) and installs cargo-fuzz if it
# is missing. Crashes are kept under fuzz/artifacts/<target>/; the corpus under fuzz/corpus/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-300}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(mqtt_stream event_payload sync_batch sparkplug_session function_module)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Its own target dir: nightly with sanitizers shares nothing with the main build.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/millrace-fuzz-target}"
cargo +nightly fuzz build
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="$(mktemp)"
    # -rss_limit_mb / -malloc_limit_mb: an input that makes a decoder hold or ask for more than
    # this is a finding (unbounded allocation), as is a run longer than -timeout seconds.
    if cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" \
        -rss_limit_mb=1024 -malloc_limit_mb=256 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        result="no crash, hang or leak"
    else
        result="FOUND a problem: see fuzz/artifacts/$t/"
        status=1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo "?")
    corpus=$(find "corpus/$t" -type f | wc -l)
    printf '%-14s %6ss %12s runs  coverage %6s  corpus %6s  %s\n' "$t" "$secs" "$runs" "$cov" "$corpus" "$result"
    if [ "$status" -ne 0 ]; then tail -40 "$log"; fi
    rm -f "$log"
done
exit $status
