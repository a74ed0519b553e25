#!/usr/bin/env bash
# CPU per call of each process on the path: the gateway, its runners (their
# MCP servers excluded) and the load generator, read from /proc/<pid>/stat
# over a window in the middle of a `dynogate-bench calls` run (so session
# set-up and teardown are left out). Calls in the window are estimated from
# the run's rate.
#
# usage: bench/cpu.sh [--calls N] [--window SECONDS] [-- extra dynogate-bench calls args]
# Environment passes through to the gateway, e.g. WORKER_THREADS=1 bench/cpu.sh
# or bench/cpu.sh -- --sessions 8 --concurrency 16; BIN_DIR=<dir> measures the
# release binaries in that directory instead of building this tree's.
# Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

calls=30000 window=4
while [ $# -gt 0 ]; do
  case "$1" in
    --calls) calls="$2"; shift 2 ;;
    --window) window="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ -n "${BIN_DIR:-}" ]; then
  bin="$BIN_DIR"
else
  cargo build --release --quiet --bin gateway --bin runner --bin mcp-echo --bin dynogate-bench
  bin="$PWD/target/release"
fi
ticks=$(getconf CLK_TCK)
out=$(mktemp)
RUN=$(mktemp)
PORT=0 RUNNER_COMMAND="$bin/mcp-echo" RUST_LOG=warn "$bin/gateway" > "$out" &
gateway=$!
trap 'kill "$gateway" 2>/dev/null || true; wait "$gateway" 2>/dev/null || true; rm -f "$out" "$RUN"' EXIT
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
url="$(awk '{print $NF}' "$out" | head -1)"

"$bin/dynogate-bench" calls --url "$url/mcp" --calls "$calls" "$@" > "$RUN" &
bench=$!
# utime + stime of a process, in clock ticks.
cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
runners() { pgrep -P "$gateway" || true; }
sum() { local total=0; for pid in "$@"; do total=$((total + $(cpu "$pid"))); done; echo "$total"; }

sleep 1.5
mapfile -t rs < <(runners)
g0=$(cpu "$gateway") r0=$(sum "${rs[@]}") b0=$(cpu "$bench")
sleep "$window"
g1=$(cpu "$gateway") r1=$(sum "${rs[@]}") b1=$(cpu "$bench")
wait "$bench"
rate=$(grep -o '"per_second":[0-9.]*' "$RUN" | cut -d: -f2)
p50=$(grep -o '"p50_us":[0-9]*' "$RUN" | cut -d: -f2)
python3 - "$ticks" "$window" "$rate" "$p50" "$((g1 - g0))" "$((r1 - r0))" "$((b1 - b0))" "${#rs[@]}" <<'EOF'
import sys
ticks, window, rate, p50 = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
gateway, runners, bench, n = (int(v) for v in sys.argv[5:9])
calls = rate * window
per_call = lambda t: t / ticks / calls * 1e6
print(f"{rate:,.0f} calls/s, p50 {p50} µs; CPU per call over {window:g} s (~{calls:,.0f} calls): "
      f"gateway {per_call(gateway):.0f} µs, {n} runner(s) {per_call(runners):.0f} µs, load generator {per_call(bench):.0f} µs")
EOF
