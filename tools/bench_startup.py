"""Start-up time of pllm-serve: from process start to the first successful completion, stage by stage.

    python tools/bench_startup.py build/ [--runs 5] [--pythonpath A --pythonpath B] [--entry-point] [--json f]
        [-- serve args]

Each run starts `python -m pllm.runtime.server BUILD` (with --entry-point: the installed `pllm-serve` script) with
$PLLM_STARTUP_TIMING set (runtime/worker/startup_timing.py: every start-up stage appends the wall time it ended at),
polls GET /health until it answers 200, then sends one greedy completion and waits for its 200. The time from just
before the process is spawned to that answer is split into the server's stages (imports, tokenizer, kernels,
weights, model, kv_pool, engine, warm_up, server_imports, app, bind; an older checkout's manifest), then `health`
(bind to the first 200 from /health, polling every 5 ms) and `first completion` (the first request). Stages that
overlap on two threads count from whichever mark came before. Prints the median of each stage over the runs, in wall
time and in the server process's CPU time (all threads; far less sensitive than wall time to other work on a shared
machine).

With several --pythonpath values (checkouts of pllm, each a folder holding a `pllm` package), the runs take turns
between them, so load on a shared machine hits each alike, and the totals print as ratios against the first: a
before/after measured in the same sitting. A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# in the order pllm-serve marks them; "manifest" is an older checkout's (its hashing, now inside "tokenizer")
SERVER_STAGES = ("imports", "tokenizer", "manifest", "kernels", "weights", "model", "kv_pool", "engine", "warm_up",
                 "server_imports", "app", "bind")
CLIENT_STAGES = ("health", "first completion")
POLL_S = 0.005
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except (urllib.error.URLError, ConnectionError, OSError):
        return 0


def _complete(url: str) -> dict:
    body = json.dumps({"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0.0}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        if r.status != 200:
            raise RuntimeError(f"completion answered {r.status}")
        return json.loads(r.read())


def one_run(build_dir: str, pythonpath: str | None, extra: list[str], launcher: list[str]) -> dict[str, float]:
    """Seconds per stage of one start-up, and the total."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pllm-startup-") as tmp:
        marks = Path(tmp) / "marks.jsonl"
        env = {**os.environ, "PLLM_STARTUP_TIMING": str(marks)}
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        cmd = [*launcher, build_dir, "--port", str(port), "--disable-access-log",
               "--log-level", "warning", *extra]
        log = open(Path(tmp) / "server.log", "w+")
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            while _get(f"{base}/health") != 200:
                if proc.poll() is not None or time.time() - t0 > START_TIMEOUT_S:
                    log.seek(0)
                    raise RuntimeError(f"server did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
                time.sleep(POLL_S)
            t_health = time.time()
            out = _complete(f"{base}/v1/completions")
            t_done = time.time()
            cpu_done = process_cpu_seconds(proc.pid)
            assert out["choices"][0]["text"] is not None
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        points = [json.loads(line) for line in marks.read_text().splitlines()]
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    prev, prev_cpu = t0, 0.0
    for p in sorted(points, key=lambda p: p["t"]):
        wall[p["stage"]] = wall.get(p["stage"], 0.0) + p["t"] - prev
        cpu[p["stage"]] = cpu.get(p["stage"], 0.0) + p["cpu"] - prev_cpu
        prev, prev_cpu = p["t"], p["cpu"]
    wall["health"] = t_health - prev
    wall["first completion"] = t_done - t_health
    cpu["health + first completion"] = cpu_done - prev_cpu
    wall["total"], cpu["total"] = t_done - t0, cpu_done
    return {"wall": wall, "cpu": cpu}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads (Linux /proc; 10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_dir")
    ap.add_argument("--runs", type=int, default=5, help="start-ups per checkout (default: 5)")
    ap.add_argument("--pythonpath", action="append", default=None,
                    help="a folder holding the pllm package to run (repeat to compare checkouts; default: as this "
                         "interpreter imports it)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--entry-point", action="store_true",
                    help="start the installed `pllm-serve` script beside this interpreter (the README's command) "
                         "instead of `python -m pllm.runtime.server`; both import the checkout --pythonpath names")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # after --: more pllm-serve arguments
    args, extra = ap.parse_args(argv[:cut]), argv[cut + 1 :]
    launcher = [sys.executable, "-m", "pllm.runtime.server"]
    if args.entry_point:
        script = shutil.which("pllm-serve", path=str(Path(sys.executable).parent))
        if script is None:
            ap.error(f"--entry-point: no pllm-serve script beside {sys.executable}")
        launcher = [script]
    paths = [str(p) if p else "pllm" for p in (args.pythonpath or [None])]
    runs: dict[str, list[dict[str, dict[str, float]]]] = {p: [] for p in paths}
    for i in range(args.runs):
        for p in paths:
            t = one_run(args.build_dir, None if p == "pllm" else p, extra, launcher)
            runs[p].append(t)
            print(f"run {i + 1} {p}: {t['wall']['total']:.2f} s, {t['cpu']['total']:.2f} CPU s", flush=True)
    medians = {kind: {p: _medians([t[kind] for t in r]) for p, r in runs.items()} for kind in ("wall", "cpu")}
    print(f"\nmedian seconds over {args.runs} runs, {os.cpu_count()} CPUs, build {args.build_dir}")
    print("wall: elapsed time; cpu: the server process's CPU time (all threads), less sensitive to other load")
    width = max(12, *(len(p) for p in paths))
    print(f"{'stage':<27}" + "".join(f"{p:>{width + 2}}" for p in paths))
    for kind, table in medians.items():
        for s in _stages([table[p] for p in paths]):  # every checkout's stages: a newer one may mark more
            print(f"{kind + ' ' + s:<27}" + "".join(f"{table[p].get(s, 0.0):>{width + 2}.3f}" for p in paths))
    for kind, table in medians.items():
        base = table[paths[0]]["total"]
        for p in paths[1:]:
            print(f"{kind} total {p}: {table[p]['total']:.2f} s = {table[p]['total'] / base:.2f}x of {paths[0]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": medians}, indent=2))


def _stages(runs: list[dict[str, float]]) -> list[str]:
    """The stages any of the runs has, in start-up order."""
    return [s for s in (*SERVER_STAGES, *CLIENT_STAGES, "health + first completion", "total")
            if any(s in t for t in runs)]


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {s: statistics.median(t.get(s, 0.0) for t in runs) for s in _stages(runs)}


if __name__ == "__main__":
    main()
