#!/usr/bin/env bash
# Several gateway instances sharing one Redis (REDIS_URL), in one run:
#
# 1. Latency at concurrency 1, alternating rounds: calls sent to the
#    session's own instance, and the same sessions' calls sent to another
#    instance, which relays them through Redis (`calls --via`); and calls
#    to one instance without REDIS_URL (no journal).
# 2. Throughput at concurrency 16 over 8 sessions through a router that
#    sends each connection to a random one of 3 instances (`spread`), against
#    one instance without REDIS_URL, alternating rounds.
# 3. Redis memory per idle session: `--idle N` sessions (default 1000) held
#    open over the 3 instances; used_memory before and after, per session.
#
# usage: bench/scale-out.sh [--rounds N] [--idle N]
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3; idle=1000
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    *) echo "usage: $0 [--rounds N] [--idle N]" >&2; exit 2 ;;
  esac
done

cargo build --release --quiet --bin gateway --bin runner --bin mcp-echo --bin dynogate-bench
bin=target/release
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no > /dev/null &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$redis_port" ping > /dev/null 2>&1 && break; sleep 0.1; done
redis() { redis-cli -p "$redis_port" --raw "$@"; }

secret=bench-secret-bench-secret-bench-secret-01
# Starts a gateway bridging mcp-echo (extra env as arguments); sets $started
# to its base URL.
start_gateway() {
  local out; out=$(mktemp)
  env "$@" PORT=0 RUNNER_COMMAND="$PWD/$bin/mcp-echo" RENDEZVOUS_SECRET=$secret WARM_RUNNERS=0 \
    MAX_SESSIONS=$((idle + 100)) SANDBOX=off RUST_LOG=warn "$bin/gateway" > "$out" &
  pids+=($!)
  for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
  started=$(awk '{print $NF}' "$out" | head -1)
}

router_out=$(mktemp)
router_port=$(free_port)
router="http://127.0.0.1:$router_port"
shared=(REDIS_URL="redis://127.0.0.1:$redis_port" GATEWAY_URL="$router")
start_gateway "${shared[@]}"; a=$started
start_gateway "${shared[@]}"; b=$started
start_gateway "${shared[@]}"; c=$started
"$bin/dynogate-bench" spread --listen "127.0.0.1:$router_port" --to "${a#http://},${b#http://},${c#http://}" > "$router_out" &
pids+=($!)
for _ in $(seq 100); do grep -q spreading "$router_out" && break; sleep 0.1; done
start_gateway; single=$started

for round in $(seq "$rounds"); do
  # Sessions start at a (their runners dial through the router, so some are
  # carried); calls go to a itself, then to b.
  "$bin/dynogate-bench" calls --url "$a/mcp" --name same-instance --calls 5000
  "$bin/dynogate-bench" calls --url "$a/mcp" --via "$b/mcp" --name relayed --calls 5000
  # The same calls on one instance without Redis: what the journal costs.
  "$bin/dynogate-bench" calls --url "$single/mcp" --name one-instance-c1 --calls 5000
  "$bin/dynogate-bench" calls --url "$router/mcp" --name three-instances --sessions 8 --concurrency 16 --calls 20000
  "$bin/dynogate-bench" calls --url "$single/mcp" --name one-instance --sessions 8 --concurrency 16 --calls 20000
done

before=$(redis INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
idle_out=$(mktemp)
"$bin/dynogate-bench" idle --url "$router/mcp" --name idle-over-three --count "$idle" --hold-secs 60 > "$idle_out" &
idle_pid=$!
for _ in $(seq 1200); do grep -q '"idle"' "$idle_out" && break; sleep 0.5; done
cat "$idle_out"
sleep 6 # one renewal of every session, snapshots included
after=$(redis INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
one="dg:session:$(redis ZRANGE dg:live 0 0)"
python3 - "$before" "$after" "$idle" "$(redis ZCARD dg:live)" "$(redis MEMORY USAGE "$one")" <<'PY'
import json, sys
before, after, wanted, live, one = (int(x) for x in sys.argv[1:])
print(json.dumps({"scenario": "redis-memory", "sessions": live, "used_memory_before": before,
                  "used_memory_after": after, "bytes_per_session": round((after - before) / max(live, 1)),
                  "one_session_hash_bytes": one}))
PY
kill "$idle_pid" 2>/dev/null || true
wait "$idle_pid" 2>/dev/null || true
