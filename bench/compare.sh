#!/usr/bin/env bash
# Benchmarks the relay side by side: the stdio floor (mcp-echo called over
# pipes), dynogate, supergateway (npm, --stateful streamable HTTP: one child
# per session) and mcp-proxy (PyPI: one child shared by all sessions), all
# wrapping the same Rust echo server, all in one run on this machine.
#
# usage: bench/compare.sh [--quick]
# Writes every result as a JSON line to bench/results/results.jsonl and the
# table to bench/results/table.md (and stdout). --quick uses tiny counts.
# Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
[ "${1:-}" = "--quick" ] && quick=true
if $quick; then
  n_calls=300; n_conc=600; n_payload=5; n_sessions=20; n_idle=50; n_peer_conc=300
else
  n_calls=10000; n_conc=40000; n_payload=50; n_sessions=200; n_idle=1000; n_peer_conc=10000
fi

cargo build --release --quiet --bin gateway --bin runner --bin mcp-echo --bin dynogate-bench
bin="$PWD/target/release"
echo_server="$bin/mcp-echo"
bench="$bin/dynogate-bench"
mkdir -p bench/results
results="bench/results/results.jsonl"
: > "$results"

# Peers, installed here so a clean machine can run this.
if [ ! -x bench/node_modules/.bin/supergateway ]; then
  (cd bench && npm install --no-audit --no-fund --loglevel=error)
fi
if [ ! -x bench/.venv-mcp-proxy/bin/mcp-proxy ]; then
  python3 -m venv bench/.venv-mcp-proxy
  bench/.venv-mcp-proxy/bin/pip install --quiet --disable-pip-version-check mcp-proxy==0.13.0
fi

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }
export RUST_BACKTRACE=0
run() { "$bench" "$@" >> "$results"; }
# Peers may refuse what dynogate accepts (supergateway caps bodies at 100 KB);
# note the refusal and go on.
run_peer() { "$bench" "$@" >> "$results" || echo "(refused: $*)" >&2; }

echo "== floor" >&2
run calls --floor "$echo_server" --calls "$n_calls"
run calls --floor "$echo_server" --concurrency 16 --calls "$n_conc"
run payload --floor "$echo_server" --count "$n_payload"

echo "== dynogate" >&2
gateway_out=$(mktemp)
PORT=0 RUNNER_COMMAND="$echo_server" MAX_SESSIONS=$((n_idle + 100)) RUST_LOG=warn \
  "$bin/gateway" > "$gateway_out" &
pids+=($!)
gateway_pid=$!
for _ in $(seq 100); do grep -q listening "$gateway_out" && break; sleep 0.1; done
url="$(awk '{print $NF}' "$gateway_out" | head -1)"
run http --url "$url/healthz" --count "$n_calls"
run calls --url "$url/mcp" --calls "$n_calls"
run calls --url "$url/mcp" --sessions 8 --concurrency 16 --calls "$n_conc"
run payload --url "$url/mcp" --count "$n_payload"
run sessions --url "$url/mcp" --count "$n_sessions"
run idle --url "$url/mcp" --count "$n_idle" --gateway-pid "$gateway_pid"

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
stop "$gateway_pid"

# The same gateway on one runtime thread (WORKER_THREADS=1): what hand-offs
# between the runtime's threads cost each call on this machine.
echo "== dynogate, one worker thread" >&2
gateway_out=$(mktemp)
PORT=0 RUNNER_COMMAND="$echo_server" WORKER_THREADS=1 RUST_LOG=warn "$bin/gateway" > "$gateway_out" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$gateway_out" && break; sleep 0.1; done
url="$(awk '{print $NF}' "$gateway_out" | head -1)"
run calls --url "$url/mcp" --name dynogate-1t --calls "$n_calls"
run calls --url "$url/mcp" --name dynogate-1t --sessions 8 --concurrency 16 --calls "$n_conc"
stop "${pids[-1]}"

echo "== supergateway" >&2
port=$(free_port)
(cd bench && exec node_modules/.bin/supergateway --stdio "$echo_server" --outputTransport streamableHttp \
  --stateful --port "$port" --logLevel none) > /dev/null 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$port/mcp"
run_peer calls --url "http://127.0.0.1:$port/mcp" --name supergateway --calls "$n_calls"
run_peer calls --url "http://127.0.0.1:$port/mcp" --name supergateway --sessions 8 --concurrency 16 --calls "$n_peer_conc"
run_peer payload --url "http://127.0.0.1:$port/mcp" --name supergateway --count "$n_payload"
run_peer sessions --url "http://127.0.0.1:$port/mcp" --name supergateway --count "$n_sessions"

echo "== mcp-proxy" >&2
port=$(free_port)
bench/.venv-mcp-proxy/bin/mcp-proxy --port "$port" --host 127.0.0.1 --log-level ERROR "$echo_server" > /dev/null 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$port/mcp"
run_peer calls --url "http://127.0.0.1:$port/mcp" --name mcp-proxy --calls "$n_calls"
run_peer calls --url "http://127.0.0.1:$port/mcp" --name mcp-proxy --sessions 8 --concurrency 16 --calls "$n_peer_conc"
run_peer payload --url "http://127.0.0.1:$port/mcp" --name mcp-proxy --count "$n_payload"
run_peer sessions --url "http://127.0.0.1:$port/mcp" --name mcp-proxy --count "$n_sessions"

python3 bench/report.py "$results" | tee bench/results/table.md
