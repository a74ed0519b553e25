#!/usr/bin/env bash
# Time to a new session's first code result, with the warm pool and without,
# in one run: alternating rounds of a gateway with WARM_RUNNERS=2 and one
# with WARM_RUNNERS=0 (each its own process, the same release build), each
# driven by `dynogate-bench first-result`, which also times later calls of
# the same sessions and `python3 -c 'print(1)'` run bare, each after a 1 s
# pause (as calls come after a model's turn). Then the same
# through the fake Platform API with a 3 s dyno boot (`--heroku`, an ignored
# test of the suite, since the fake lives there).
#
# usage: bench/warm.sh [--rounds N] [--count N] [--heroku]
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3; count=15; heroku=false
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --count) count=$2; shift 2 ;;
    --heroku) heroku=true; shift ;;
    *) echo "usage: $0 [--rounds N] [--count N] [--heroku]" >&2; exit 2 ;;
  esac
done

cargo build --release --quiet --bin gateway --bin runner --bin dynogate-bench
scripts/ensure-uv
export PATH="$PWD/.venv/bin:$PATH"

gateway_pid=
cleanup() { [ -n "$gateway_pid" ] && kill "$gateway_pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

for round in $(seq "$rounds"); do
  for warm in 2 0; do
    out=$(mktemp)
    PORT=0 WARM_RUNNERS=$warm RUST_LOG=warn target/release/gateway > "$out" &
    gateway_pid=$!
    for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.1; done
    url="$(awk '{print $NF}' "$out" | head -1)/mcp"
    # Let the pool fill (and the executor's first start warm the page cache) before timing.
    sleep 3
    target/release/dynogate-bench first-result --url "$url" --name "round$round-warm$warm" --count "$count" \
      --later 2 --gap-ms 1000
    kill "$gateway_pid"; wait "$gateway_pid" 2>/dev/null || true; gateway_pid=
    rm -f "$out"
  done
done

if $heroku; then
  cargo nextest run --test it --run-ignored only --no-capture \
    -E 'test(/pool::bench_first_result_through_the_fake_platform_api/)' 2>&1 | grep -E '^(fake-heroku|error)'
fi
