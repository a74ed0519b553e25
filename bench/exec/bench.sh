#!/usr/bin/env bash
# Benchmark of the code executor against the templates' approach (see
# bench.py). Builds the release runner, makes sure uv is available (as the
# test script does), and prints a Markdown table.
# Usage: bench/exec/bench.sh [--runs N] [--package NAME --module NAME]
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release --quiet --bin runner
scripts/ensure-uv
export PATH="$PATH:$PWD/.venv/bin"
# Version managers (pyenv) put the real interpreter first on the PATH of the
# Python they start; both sides of the benchmark get the PATH a fresh process
# on this machine sees instead.
export BENCH_PATH="$PATH"
exec python3 bench/exec/bench.py target/release/runner "$@"
