#!/usr/bin/env python3
"""Steady-state `code_exec_python` `print(1)` calls through `runner exec`
over stdio, for one or more runner builds in alternating rounds, against the
same code run bare (`python3 -c 'print(1)'` of the interpreter the executor
uses), in one run.

Each call is timed back to back and after a pause (a client's calls come
after a model's turn; on an idle machine the first work after a pause is
slower). Prints one line per build and round with the medians.
Usage: calls.py [--rounds N] [--calls N] [--pause S] NAME=RUNNER...
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


class Executor:
    def __init__(self, runner):
        self.proc = subprocess.Popen([runner, "exec"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.next_id = 0
        self.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                    "clientInfo": {"name": "bench", "version": "1"}})
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}) + "\n")
        self.proc.stdin.flush()
        self.request("tools/list", {})

    def request(self, method, params):
        self.next_id += 1
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                                          "params": params}) + "\n")
        self.proc.stdin.flush()
        while True:
            message = json.loads(self.proc.stdout.readline())
            if message.get("id") == self.next_id:
                return message

    def print_one(self):
        started = time.perf_counter()
        reply = self.request("tools/call", {"name": "code_exec_python", "arguments": {"code": "print(1)"}})
        elapsed = time.perf_counter() - started
        if reply["result"]["structuredContent"]["result"]["stdout"] != "1":
            raise SystemExit(f"unexpected answer: {reply}")
        return elapsed

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def ms(samples):
    return statistics.median(samples) * 1000


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--pause", type=float, default=1.0)
    parser.add_argument("builds", nargs="+")
    args = parser.parse_args()
    builds = [b.split("=", 1) for b in args.builds]
    python = subprocess.run(["python3", "-c", "import sys; print(sys.executable)"], capture_output=True,
                            text=True, check=True).stdout.strip()
    print(f"interpreter: {python}")
    for round_ in range(1, args.rounds + 1):
        for name, runner in builds:
            executor = Executor(runner)
            time.sleep(2)  # its start-up work (interpreter probes, the venv) is done
            back = [executor.print_one() for _ in range(args.calls)]
            paused = []
            for _ in range(args.calls // 2):
                time.sleep(args.pause)
                paused.append(executor.print_one())
            executor.close()
            bare_back, bare_paused = [], []
            for i in range(args.calls):
                if i % 2:
                    time.sleep(args.pause)
                started = time.perf_counter()
                subprocess.run([python, "-c", "print(1)"], stdout=subprocess.PIPE, check=True)
                (bare_paused if i % 2 else bare_back).append(time.perf_counter() - started)
            print(f"round {round_} {name}: back to back {ms(back):.1f} ms (bare {ms(bare_back):.1f}), "
                  f"after {args.pause:g} s {ms(paused):.1f} ms (bare {ms(bare_paused):.1f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
