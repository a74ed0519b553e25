#!/usr/bin/env python3
"""Benchmark of `runner exec` against the templates' way of running Python.

Measures, in one run on one machine:
  - `print(1)`;
  - a first call with one small real package (cold download cache);
  - a repeated call with that package, in a new session (warm shared cache;
    right after the session starts, and 1 s later) and in the same session;
  - what asking again for a package the session already has costs: the same
    call with and without `packages`, alternated in one session, once with
    uv installing and once with pip (no uv on PATH, EXEC_OBTAIN_UV=false);
for `runner exec` driven over stdio with MCP (JSON-RPC lines, as any stdio
client does), and for the template's approach run directly by this script:
`pip install <pkg>` into a virtualenv, then `python3 -c <code>` (the template
runs both with subprocess; its MCP layer is left out, which favours it).

Prints a Markdown table with medians and the ratios. Standard library only.
Usage: bench.py RUNNER [--runs N] [--package NAME] [--module NAME] [--installed-only]
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def median_ms(samples):
    return statistics.median(samples) * 1000.0


class Executor:
    """One `runner exec` process: one session."""

    def __init__(self, runner, env):
        self.proc = subprocess.Popen(
            [runner, "exec"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1
        )
        self.next_id = 0
        self.request("initialize", {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"},
        })
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        # Wait until every toolchain is found, as a client listing tools does.
        self.request("tools/list", {})

    def send(self, message):
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def request(self, method, params):
        request_id = self.next_id
        self.next_id += 1
        self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("runner exec exited")
            message = json.loads(line)
            if message.get("id") == request_id:
                return message

    def run(self, code, packages=()):
        """Seconds one tools/call takes, checking that the code succeeded."""
        started = time.perf_counter()
        reply = self.request("tools/call", {
            "name": "code_exec_python", "arguments": {"code": code, "packages": list(packages)},
        })
        elapsed = time.perf_counter() - started
        result = reply["result"]["structuredContent"]["result"]
        if result["returncode"] != 0:
            raise SystemExit(f"runner exec failed: {result}")
        return elapsed

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def timed(*commands, env):
    """Seconds to run commands one after the other, as the template does."""
    started = time.perf_counter()
    for command in commands:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"{command} failed: {done.stderr}")
    return time.perf_counter() - started


def version(command):
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "absent"


def machine(path):
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = "unknown"
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
            memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        pass
    return [
        f"CPU: {cpu}, {os.cpu_count()} cores; memory {memory}",
        f"OS: {platform.platform()}",
        f"python3 on PATH: {shutil.which('python3', path=path)} ({version(['python3', '--version'])})",
        f"uv: {version(['uv', '--version'])}; pip: {version(['python3', '-m', 'pip', '--version'])}",
    ]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("runner")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--package", default="six")
    parser.add_argument("--module", default="six")
    parser.add_argument("--installed-only", action="store_true", help="only the already-installed comparison")
    args = parser.parse_args()
    code = f"import {args.module}; print({args.module}.__name__)"
    runs = args.runs
    scratch = tempfile.mkdtemp(prefix="dynogate-bench-")
    base_env = dict(os.environ)
    base_env["PATH"] = os.environ.get("BENCH_PATH", os.environ["PATH"])
    results = {}
    try:
        # --- runner exec -------------------------------------------------
        def ours_env(cache):
            env = dict(base_env)
            env["EXEC_CACHE_DIR"] = cache
            return env

        # Already installed: the call with `packages` against the same call
        # without, alternated in one session after a first install.
        without_uv = os.pathsep.join(
            d for d in base_env["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(d, "uv")))
        for installer, extra in (("uv", {}), ("pip", {"PATH": without_uv, "EXEC_OBTAIN_UV": "false"})):
            env = ours_env(os.path.join(scratch, f"installed-{installer}"))
            env.update(extra)
            session = Executor(args.runner, env)
            session.run(code, [args.package])
            with_packages, without = [], []
            for _ in range(max(runs, 10)):
                with_packages.append(session.run(code, [args.package]))
                without.append(session.run(code))
            session.close()
            results[f"installed_{installer}_with"] = with_packages
            results[f"installed_{installer}_without"] = without
        if args.installed_only:
            return report_installed(results, args, code)

        warm_cache = os.path.join(scratch, "ours-warm")
        session = Executor(args.runner, ours_env(warm_cache))
        results["ours_print"] = [session.run("print(1)") for _ in range(runs)]
        session.close()

        firsts = []
        for i in range(runs):
            session = Executor(args.runner, ours_env(os.path.join(scratch, f"ours-cold-{i}")))
            firsts.append(session.run(code, [args.package]))
            session.close()
        results["ours_first"] = firsts

        session = Executor(args.runner, ours_env(warm_cache))
        session.run(code, [args.package])  # fills the shared cache
        session.close()
        new_sessions, same_session, after_a_pause = [], [], []
        for _ in range(runs):
            session = Executor(args.runner, ours_env(warm_cache))
            new_sessions.append(session.run(code, [args.package]))
            same_session.append(session.run(code, [args.package]))
            session.close()
            # A model usually takes a moment before its first call; the
            # executor readies the session's venv meanwhile.
            session = Executor(args.runner, ours_env(warm_cache))
            time.sleep(1.0)
            after_a_pause.append(session.run(code, [args.package]))
            session.close()
        results["ours_new_session"] = new_sessions
        results["ours_same_session"] = same_session
        results["ours_new_session_paused"] = after_a_pause

        # --- the template's approach ------------------------------------
        def venv(path, cache):
            subprocess.run(["python3", "-m", "venv", path], check=True, env=base_env, capture_output=True)
            env = dict(base_env)
            env["PATH"] = os.path.join(path, "bin") + os.pathsep + env["PATH"]
            env["VIRTUAL_ENV"] = path
            env["PIP_CACHE_DIR"] = cache
            return env

        install = ["pip", "install", args.package]
        run = ["python3", "-c", code]
        results["template_print"] = [timed(["python3", "-c", "print(1)"], env=base_env) for _ in range(runs)]
        firsts = []
        for i in range(runs):
            env = venv(os.path.join(scratch, f"venv-cold-{i}"), os.path.join(scratch, f"pip-cold-{i}"))
            firsts.append(timed(install, run, env=env))
        results["template_first"] = firsts
        pip_cache = os.path.join(scratch, "pip-warm")
        env = venv(os.path.join(scratch, "venv-warm"), pip_cache)
        timed(install, env=env)
        results["template_repeat"] = [timed(install, run, env=env) for _ in range(runs)]
        # USE_TEMP_DIR=true: a new venv per call, warm pip cache.
        isolated = []
        for i in range(runs):
            path = os.path.join(scratch, f"venv-temp-{i}")
            started = time.perf_counter()
            env = venv(path, pip_cache)
            timed(install, run, env=env)
            isolated.append(time.perf_counter() - started)
        results["template_temp_dir"] = isolated
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    report_installed(results, args, code)
    m = {name: median_ms(samples) for name, samples in results.items()}
    print("## Machine\n")
    for line in machine(base_env["PATH"]):
        print(f"- {line}")
    print(f"\nPackage: `{args.package}`; code: `{code}`; medians of {runs} runs.\n")
    print("| case | runner exec (ms) | template approach (ms) | ratio |")
    print("|---|---:|---:|---:|")
    rows = [
        ("`print(1)`", "ours_print", "template_print"),
        ("first call with the package (cold caches)", "ours_first", "template_first"),
        ("repeated call, new session (warm shared cache) vs. same env", "ours_new_session", "template_repeat"),
        ("repeated call, new session, first call 1 s after start vs. same env", "ours_new_session_paused",
         "template_repeat"),
        ("repeated call, same session vs. same env", "ours_same_session", "template_repeat"),
        ("repeated call, new session vs. `USE_TEMP_DIR` (new venv per call)", "ours_new_session", "template_temp_dir"),
    ]
    for label, ours, theirs in rows:
        print(f"| {label} | {m[ours]:.0f} | {m[theirs]:.0f} | {m[ours] / m[theirs]:.1%} |")
    print()
    print("Raw samples (ms): " + json.dumps({k: [round(s * 1000) for s in v] for k, v in results.items()}))


def report_installed(results, args, code):
    m = {name: median_ms(samples) for name, samples in results.items()}
    print(f"## A package the session already has (`{args.package}`; code: `{code}`)\n")
    print("| installer | with `packages` (ms) | without (ms) | difference (ms) |")
    print("|---|---:|---:|---:|")
    for installer in ("uv", "pip"):
        with_packages, without = m[f"installed_{installer}_with"], m[f"installed_{installer}_without"]
        print(f"| {installer} | {with_packages:.1f} | {without:.1f} | {with_packages - without:+.1f} |")
    print()


if __name__ == "__main__":
    sys.exit(main())
