"""GPU bring-up in one command: install pllm, record the machine, run the gpu tests, time kernels, model and graphs.

    python3 tools/gpu_check.py [--out DIR]        on a CUDA machine (the device tool: carry .whl, see the README)
    python3 tools/gpu_check.py --dry-run          the same sequence on the CPU: interpreter, tiny model and shapes
    python3 tools/gpu_check.py --download-wheels  fetch tools/gpu_wheels.txt's wheels into .whl/ (on a networked host)

Steps, in order, each a child process under its own time limit (a failure or a timeout is recorded and the next
step still runs; the steps after model_build read the build it leaves):
  install       pllm from this working tree into a fresh --target folder with --no-deps (torch, triton, transformers
                stay the image's), with the wheels of tools/gpu_wheels.txt found in .whl/; checks every import
  machine       GPU name, SM count, memory, torch/triton/CUDA/driver versions; copy bandwidth and bf16 matmul rate
  tests         the gpu-marked tests (found by grep), hypothesis examples capped by PLLM_MAX_EXAMPLES
  kernels       tools/bench_kernels.py on the llama8b shape in bf16 (decode B=64 L=4096 among its cases)
  quant_kernels tools/bench_kernels.py --set quant: the int8, int4 and int4_sym (group 32) dequantise-in-the-matmul
                kernels on llama8b's MLP weights at decode and prefill sizes, against the bf16 matmul (cuBLAS)
  model_build   a Llama-3.2-1B-shaped model with random bf16 weights, compiled by pllm
  throughput    256 requests of 512 prompt / 256 output tokens through LLM.generate, beside HF generate
  decode_graphs tools/bench_decode.py: decode steps replayed from CUDA graphs against eager, batch 1 to 32
  target        a --target sm_90 build served with an empty Triton cache: does it JIT-compile any kernel, and why
Writes gpu_check.json (the report), gpu_check.log (every step's output), bench_kernels.png and
bench_quant_kernels.png under --out (default $OUT, else ./gpu_check_out), and prints a short table last. Stdlib
only: it must run before pllm is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
WHEEL_LIST = TOOLS / "gpu_wheels.txt"
WHEEL_DIR = REPO / ".whl"
GPU_MARK = "@pytest.mark.gpu"
REPORT = "gpu_check.json"
LOG = "gpu_check.log"
# What `pip download` must ask for: the device image's Python (3.12, x86-64 manylinux), whatever runs it here.
PLATFORM_FLAGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
    for arg in ("--platform", tag)
]


@dataclass(frozen=True)
class Context:
    """Everything a step's command is made from."""

    python: str
    out_dir: Path
    work_dir: Path  # scratch: the install target, the builds, the steps' result files
    wheel_dir: Path
    dry_run: bool
    max_examples: int

    @property
    def site(self) -> Path:
        return self.work_dir / "site"

    def result_file(self, step: str) -> Path:
        return self.work_dir / f"{step}.json"


@dataclass(frozen=True)
class Step:
    name: str
    timeout_s: float  # on a GPU; the dry run allows DRY_RUN_TIMEOUT_S for each
    command: Callable[[Context], list[str]]
    env: Callable[[Context], dict[str, str]] = field(default=lambda ctx: {})


@dataclass(frozen=True)
class StepRecord:
    name: str
    status: str  # passed | failed | timed out
    seconds: float
    returncode: int | None
    result: dict | None  # what the step wrote to its result file, if anything
    error: str | None  # the end of its output where it did not pass


DRY_RUN_TIMEOUT_S = 180.0  # per step on the CPU: far above the ~5-30 s each takes, for loaded CI machines


def steps_script(step: str) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        args = [ctx.python, str(TOOLS / "gpu_steps.py"), step, "--work", str(ctx.work_dir),
                "--result", str(ctx.result_file(step))]
        return args + (["--dry-run"] if ctx.dry_run else [])

    return command


def install_command(ctx: Context) -> list[str]:
    return [ctx.python, str(TOOLS / "gpu_steps.py"), "install", "--work", str(ctx.work_dir), "--result",
            str(ctx.result_file("install")), "--wheels", str(ctx.wheel_dir), "--wheel-list", str(WHEEL_LIST),
            "--repo", str(REPO)] + (["--dry-run"] if ctx.dry_run else [])


def gpu_test_files() -> list[str]:
    """Every test file holding a gpu-marked test, relative to the repository."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if GPU_MARK in p.read_text())


def tests_command(ctx: Context) -> list[str]:
    return [ctx.python, str(TOOLS / "gpu_steps.py"), "tests", "--work", str(ctx.work_dir), "--result",
            str(ctx.result_file("tests")), "--repo", str(REPO), *(["--dry-run"] if ctx.dry_run else []),
            "--files", *gpu_test_files()]


def bench_kernels_command(step: str, case_set: str) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        # writes <step>.json, the step's result, and <step>.png
        out = ["--set", case_set, "--out", str(ctx.work_dir / step)]
        if ctx.dry_run:
            return [ctx.python, str(TOOLS / "bench_kernels.py"), "--smoke", *out]
        return [ctx.python, str(TOOLS / "bench_kernels.py"), "--shape", "llama8b", "--dtype", "bfloat16", *out]

    return command


def decode_command(ctx: Context) -> list[str]:
    build = str(ctx.work_dir / "model" / "build")
    json_out = ["--json", str(ctx.result_file("decode_graphs"))]
    if ctx.dry_run:
        return [ctx.python, str(TOOLS / "bench_decode.py"), build, "--backend", "interpret", "--batch-sizes", "1,2",
                "--prompt-len", "8", "--rounds", "1", "--steps", "2", "--max-model-len", "64", *json_out]
    return [ctx.python, str(TOOLS / "bench_decode.py"), build, "--batch-sizes", "1,2,4,8,16,32", "--prompt-len",
            "512", "--rounds", "3", "--steps", "16", "--max-model-len", "1024", *json_out]


STEPS = (
    Step("install", 60, install_command),
    Step("machine", 40, steps_script("machine")),
    Step("tests", 150, tests_command, lambda ctx: {"PLLM_MAX_EXAMPLES": str(ctx.max_examples)}),
    Step("kernels", 60, bench_kernels_command("kernels", "float")),
    Step("quant_kernels", 30, bench_kernels_command("quant_kernels", "quant")),
    Step("model_build", 90, steps_script("model_build")),
    Step("throughput", 75, steps_script("throughput")),
    Step("decode_graphs", 40, decode_command),
    Step("target", 50, steps_script("target"), lambda ctx: {"TRITON_CACHE_DIR": str(ctx.work_dir / "triton-cache")}),
)


def run_step(step: Step, ctx: Context, log) -> StepRecord:
    """Run one step in its own process group; kill the whole group at its time limit."""
    timeout = DRY_RUN_TIMEOUT_S if ctx.dry_run else step.timeout_s
    env = dict(os.environ, PYTHONPATH=str(ctx.site), PYTHONUNBUFFERED="1", **step.env(ctx))
    if step.name == "install":
        env.pop("PYTHONPATH")  # pip runs on the Python's own packages; the target folder does not exist yet
    command = step.command(ctx)
    log.write(f"\n===== {step.name} (limit {timeout:.0f} s): {' '.join(command)}\n")
    log.flush()
    ctx.result_file(step.name).unlink(missing_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    seconds = time.monotonic() - start
    text = output.decode(errors="replace")
    log.write(text)
    log.write(f"===== {step.name}: exit {proc.returncode}{' (timed out)' if timed_out else ''} after {seconds:.1f} s\n")
    log.flush()
    result = None
    if ctx.result_file(step.name).is_file():
        result = json.loads(ctx.result_file(step.name).read_text())
    status = "timed out" if timed_out else "passed" if proc.returncode == 0 else "failed"
    error = None if status == "passed" else text[-3000:]
    return StepRecord(step.name, status, round(seconds, 1), proc.returncode, result, error)


def summary_line(record: StepRecord) -> str:
    """One cell of the printed table: the step's headline figures."""
    r = record.result or {}
    match record.name:
        case "install":
            return f"pllm at {r.get('pllm_file', '?')}; {len(r.get('wheels_installed', []))} wheels installed"
        case "machine":
            c = r.get("ceilings", {})
            return (f"{r.get('device', '?')}, {r.get('sm_count', '?')} SMs; copy {c.get('copy_gb_per_s', 0):.0f} GB/s, "
                    f"matmul {c.get('matmul_tflop_per_s', 0):.3g} TFLOP/s; {r.get('versions', {})}")
        case "tests":
            return f"{r.get('passed', 0)} passed, {r.get('failed', 0)} failed, {r.get('skipped', 0)} skipped"
        case "kernels" | "quant_kernels":
            if "checked" in r:
                return f"{len(r['checked'])} cases checked (smoke: nothing timed)"
            return f"{len(r.get('results', []))} cases timed (below)"
        case "model_build":
            return f"{r.get('shape', '?')} {r.get('dtype', '')}, {r.get('weight_bytes', 0) / 2**20:.0f} MiB weights"
        case "throughput":
            return (f"{r.get('requests', '?')} x {r.get('prompt_len', '?')}/{r.get('output_len', '?')}: pllm "
                    f"{r.get('pllm_tok_s', 0):.0f} out tok/s, HF {r.get('hf_tok_s', 0):.0f}: {r.get('ratio', 0):.2f}x")
        case "decode_graphs":
            return "graphs vs eager: " + ", ".join(f"B={x['batch']} {x['speedup']:.2f}x" for x in r.get("rows", []))
        case "target":
            return f"serves without JIT: {r.get('serves_without_jit')} ({r.get('jit_compiled_files', '?')} cubins JIT)"
    return ""


def print_table(records: list[StepRecord], total_s: float) -> None:
    """The short table, printed last: each step, then each timed kernel against its baseline and the ceilings."""
    print(f"\n{'step':<14} {'status':<10} {'s':>6}  figures")
    for rec in records:
        print(f"{rec.name:<14} {rec.status:<10} {rec.seconds:6.1f}  {summary_line(rec)}")
    timed = [x for rec in records if rec.name in ("kernels", "quant_kernels") and rec.result
             for x in rec.result.get("results", [])]
    if timed:
        print(f"\n{'kernel':<18} {'case':<13} {'ms':>8} {'torch ms':>9} {'speedup':>8} {'GB/s':>6} {'TFLOP/s':>7} "
              f"{'roofline':>8}")
        for x in timed:
            print(f"{x['kernel']:<18} {x['label']:<13} {x['triton_ms']:8.4f} {x['baseline_ms']:9.4f} "
                  f"{x['speedup']:7.2f}x {x['gb_per_s']:6.0f} {x['tflop_per_s']:7.1f} {x['roofline_fraction']:8.2f}")
    passed = sum(rec.status == "passed" for rec in records)
    print(f"{passed}/{len(records)} steps passed in {total_s:.0f} s")


def download_wheels(dest: Path) -> int:
    """pip download every wheel tools/gpu_wheels.txt lists, for the device image's Python, into dest."""
    pins = [line.split()[0] for line in WHEEL_LIST.read_text().splitlines() if line and not line.startswith("#")]
    dest.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *PLATFORM_FLAGS, "-d", str(dest), *pins]
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU: interpreter, tiny shapes")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="report folder (default $OUT)")
    p.add_argument("--work", default=None, help="scratch folder (default: a fresh temporary one)")
    p.add_argument("--wheels", default=str(WHEEL_DIR), help="folder of the wheels tools/gpu_wheels.txt lists")
    p.add_argument("--max-examples", type=int, default=None, help="hypothesis examples per test (5; dry run 2)")
    p.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run only these steps")
    p.add_argument("--download-wheels", action="store_true", help="fetch the wheels into --wheels, then stop")
    args = p.parse_args(argv)
    if args.download_wheels:
        return download_wheels(Path(args.wheels))
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="pllm-gpu-check-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    max_examples = args.max_examples or (2 if args.dry_run else 5)
    ctx = Context(sys.executable, out_dir, work_dir, Path(args.wheels).resolve(), args.dry_run, max_examples)
    chosen = [s for s in STEPS if not args.only or s.name in args.only]
    start = time.monotonic()
    records = []
    with open(out_dir / LOG, "w") as log:
        for step in chosen:
            print(f"[gpu_check] {step.name} ...", flush=True)
            records.append(run_step(step, ctx, log))
            print(f"[gpu_check] {step.name}: {records[-1].status} in {records[-1].seconds:.1f} s", flush=True)
    total_s = round(time.monotonic() - start, 1)  # the report and the table print this one value
    for step_name, plot_name in (("kernels", "bench_kernels.png"), ("quant_kernels", "bench_quant_kernels.png")):
        if (work_dir / f"{step_name}.png").is_file():
            shutil.copy(work_dir / f"{step_name}.png", out_dir / plot_name)
    report = {"dry_run": args.dry_run, "host": platform.node(), "python": platform.python_version(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - total_s)),
              "seconds": total_s, "max_examples": max_examples,
              "all_passed": all(r.status == "passed" for r in records), "steps": [asdict(r) for r in records]}
    (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    print_table(records, total_s)
    print(f"wrote {out_dir / REPORT} and {out_dir / LOG}")
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
