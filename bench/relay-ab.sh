#!/usr/bin/env bash
# Compares builds of the relay with each other and with supergateway, in one
# run, alternating rounds so machine noise falls on every build alike.
#
# usage: bench/relay-ab.sh [--rounds N] NAME=BINDIR [NAME=BINDIR ...]
# Each BINDIR holds release builds of gateway, runner, mcp-echo and
# dynogate-bench (e.g. from `git worktree add /tmp/x <commit> && cd /tmp/x &&
# cargo build --release`). Every build is driven by the first build's
# dynogate-bench, so only the relay differs. Prints one JSON line per run.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
if [ "${1:-}" = "--rounds" ]; then rounds=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: $0 [--rounds N] NAME=BINDIR..." >&2; exit 2; }
first_dir=${1#*=}
bench="$first_dir/dynogate-bench"
echo_server="$first_dir/mcp-echo"

if [ ! -x bench/node_modules/.bin/supergateway ]; then
  (cd bench && npm install --no-audit --no-fund --loglevel=error)
fi

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

declare -A urls
for spec in "$@"; do
  name=${spec%%=*}; dir=${spec#*=}
  out=$(mktemp)
  PORT=0 RUNNER_COMMAND="$echo_server" RUST_LOG=warn "$dir/gateway" > "$out" &
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
  urls[$name]="$(awk '{print $NF}' "$out" | head -1)/mcp"
done
port=$(free_port)
(cd bench && exec node_modules/.bin/supergateway --stdio "$echo_server" --outputTransport streamableHttp \
  --stateful --port "$port" --logLevel none) > /dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/mcp" && break; sleep 0.1; done

for round in $(seq "$rounds"); do
  for spec in "$@"; do
    name=${spec%%=*}
    "$bench" calls --url "${urls[$name]}" --name "$name" --calls 10000
    "$bench" calls --url "${urls[$name]}" --name "$name" --sessions 8 --concurrency 16 --calls 40000
  done
  "$bench" calls --url "http://127.0.0.1:$port/mcp" --name supergateway --sessions 8 --concurrency 16 --calls 10000
done
