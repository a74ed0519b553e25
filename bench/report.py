"""Turns bench/compare.sh's JSON lines into the markdown table of BENCHMARKS.md."""

import json
import sys


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]

    def find(scenario, target, **match):
        for row in rows:
            if row["scenario"] == scenario and row["target"] == target and all(row.get(k) == v for k, v in match.items()):
                return row
        return None

    def us(row, key="p50_us"):
        return "–" if row is None else f"{row[key]:,}"

    def rate(row):
        return "–" if row is None else f"{row['per_second']:,.0f}"

    targets = ["floor", "dynogate", "dynogate-1t", "supergateway", "mcp-proxy"]
    headers = {"dynogate-1t": "dynogate, 1 thread"}
    print("| figure | " + " | ".join(headers.get(t, t) for t in targets) + " |")
    print("|---|" + "---:|" * len(targets))
    lines = [
        ("call, concurrency 1: p50 µs", lambda t: us(find("calls", t, concurrency=1))),
        ("call, concurrency 1: p99 µs", lambda t: us(find("calls", t, concurrency=1), "p99_us")),
        ("calls/s, concurrency 16 over 8 sessions", lambda t: rate(find("calls", t, concurrency=16))),
        ("call p50 µs at concurrency 16", lambda t: us(find("calls", t, concurrency=16))),
        ("1 MiB echo: p50 µs", lambda t: us(find("payload", t))),
        ("session setup: p50 µs", lambda t: us(find("sessions", t))),
        ("session setup: p99 µs", lambda t: us(find("sessions", t), "p99_us")),
    ]
    for name, cell in lines:
        print(f"| {name} | " + " | ".join(cell(t) for t in targets) + " |")
    errors = sum(row.get("errors", 0) for row in rows)
    print(f"\nErrors across all runs: {errors}.")

    floor1, ours1 = find("calls", "floor", concurrency=1), find("calls", "dynogate", concurrency=1)
    http = find("http", "get")
    ours16, sg16 = find("calls", "dynogate", concurrency=16), find("calls", "supergateway", concurrency=16)
    mp16 = find("calls", "mcp-proxy", concurrency=16)
    floor_big, ours_big = find("payload", "floor"), find("payload", "dynogate")
    idle = find("idle", "dynogate")
    print()
    if floor1 and ours1:
        print(f"- Relay added at concurrency 1 (p50): {ours1['p50_us'] - floor1['p50_us']} µs over the floor's {floor1['p50_us']} µs.")
    if http:
        print(f"- A bare HTTP round trip (GET /healthz, same client and server stack): p50 {http['p50_us']} µs.")
    if ours16 and sg16:
        print(f"- Throughput at concurrency 16: {ours16['per_second'] / sg16['per_second']:.1f}× supergateway's.")
    ours1t1, ours1t16 = find("calls", "dynogate-1t", concurrency=1), find("calls", "dynogate-1t", concurrency=16)
    if floor1 and ours1t1:
        print(f"- With WORKER_THREADS=1: {ours1t1['p50_us'] - floor1['p50_us']} µs over the floor at concurrency 1 (p50).")
    if ours1t16 and sg16:
        print(f"- With WORKER_THREADS=1: throughput at concurrency 16 {ours1t16['per_second'] / sg16['per_second']:.1f}× supergateway's.")
    if ours16 and mp16:
        print(f"- Throughput at concurrency 16: {ours16['per_second'] / mp16['per_second']:.1f}× mcp-proxy's.")
    if floor_big and ours_big:
        print(f"- 1 MiB echo: {ours_big['p50_us'] / floor_big['p50_us']:.2f}× the floor.")
    if idle:
        print(
            f"- {idle['sessions']} idle sessions held, {idle['errors']} errors; gateway memory per idle session "
            f"{idle.get('gateway_bytes_per_session', 0) / 1024:.1f} KiB; runner RSS {idle.get('runner_rss_avg', 0) / 2**20:.1f} MiB "
            f"average, {idle.get('runner_rss_max', 0) / 2**20:.1f} MiB max (its MCP server excluded)."
        )


if __name__ == "__main__":
    main(sys.argv[1])
