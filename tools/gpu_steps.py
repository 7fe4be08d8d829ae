"""The steps of tools/gpu_check.py, one per call: python tools/gpu_steps.py STEP --work DIR --result FILE [--dry-run].

Each step writes its findings as JSON to --result and exits non-zero when it did not pass. pllm is imported inside
the steps, from the folder the install step filled (gpu_check.py puts it first on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

# Not the package's build outputs or caches, nor the carried wheels: only what `pip install <tree>` reads.
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".whl", ".gl", ".venv", "build", "builds", "out", "__pycache__",
                                       "*.egg-info", ".hypothesis", ".pytest_cache", ".ruff_cache", "gpu_check_out")


class StepFailed(Exception):
    """The step ran but did not pass; the message says why (recorded beside its findings)."""


def read_wheel_list(path: Path) -> list[tuple[str, str, str]]:
    """(distribution, version, module) per line 'NAME==VERSION MODULE' of tools/gpu_wheels.txt."""
    pins = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        pin, module = line.split()
        name, version = pin.split("==")
        pins.append((name, version, module))
    return pins


def wheel_matches(wheel: Path, name: str, version: str) -> bool:
    normal = re.sub(r"[-_.]+", "_", name).lower()
    return wheel.name.lower().startswith(f"{normal}-{version}-")


def step_install(args, found: dict) -> None:
    site = Path(args.work) / "site"
    shutil.rmtree(site, ignore_errors=True)
    pins = read_wheel_list(Path(args.wheel_list))
    wheels = sorted(Path(args.wheels).glob("*.whl")) if Path(args.wheels).is_dir() else []
    found["wheels_installed"] = [w.name for w in wheels]
    found["wheels_missing"] = [f"{n}=={v}" for n, v, _ in pins if not any(wheel_matches(w, n, v) for w in wheels)]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir", "--target",
           str(site)]
    if wheels and args.dry_run:
        found["wheels_installed"] = []  # built for the device image's Python 3.12: this one has the packages itself
    elif wheels:
        subprocess.run(pip + ["--no-compile", "--upgrade", *map(str, wheels)], check=True)
    source = Path(args.work) / "source"  # a clean copy: pip's in-tree build leaves nothing in the working tree
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(args.repo, source, ignore=SOURCE_IGNORE)
    subprocess.run(pip + ["--no-build-isolation", str(source)], check=True)
    modules = ["pllm"] + [module for _, _, module in pins]
    probe = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n    try:\n"
             "        out[m] = getattr(importlib.import_module(m), '__file__', None) or 'namespace'\n"
             "    except Exception as e:\n        out[m] = f'ERROR {type(e).__name__}: {e}'\nprint(json.dumps(out))")
    env = dict(os.environ, PYTHONPATH=str(site))
    imported = json.loads(subprocess.run([sys.executable, "-c", probe, *modules], env=env, check=True,
                                         capture_output=True, text=True).stdout)
    found["imports"] = imported
    found["pllm_file"] = imported["pllm"]
    broken = {m: v for m, v in imported.items() if v.startswith("ERROR")}
    if broken:
        raise StepFailed(f"cannot import {', '.join(broken)}: {broken}")
    if not imported["pllm"].startswith(str(site)):
        raise StepFailed(f"pllm imports from {imported['pllm']}, not the installed copy in {site}")


def cpu_ceilings() -> dict[str, float]:
    """The dry run's stand-in for measure_ceilings: a 64 MiB copy and a 512^3 float32 matmul on the CPU."""
    import torch

    def best(fn, repeats=5):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    src = torch.empty(1 << 26, dtype=torch.uint8)
    dst = torch.empty_like(src)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    return {"copy_gb_per_s": 2 * src.numel() / best(lambda: dst.copy_(src)) / 1e9,
            "matmul_tflop_per_s": 2 * 512**3 / best(lambda: a @ b) / 1e12}


def step_machine(args, found: dict) -> None:
    import torch
    import transformers
    import triton

    import pllm

    found["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "triton": triton.__version__,
                         "transformers": transformers.__version__, "pllm": pllm.__version__}
    found["pllm_file"] = pllm.__file__
    if args.dry_run:
        found.update(device=f"CPU ({platform.machine()}, {os.cpu_count()} cores)", sm_count=None)
        found["ceilings"] = cpu_ceilings()
        return
    if not torch.cuda.is_available():
        raise StepFailed("torch.cuda.is_available() is False: no GPU visible to this Python")
    props = torch.cuda.get_device_properties(0)
    found.update(device=props.name, sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                 memory_gib=round(props.total_memory / 2**30, 1),
                 l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        found["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        found["versions"]["driver"] = found["nvidia_smi"].split(",")[0]
    except (OSError, subprocess.TimeoutExpired) as e:
        found["nvidia_smi"] = f"not run: {e}"
    from bench_kernels import measure_ceilings  # tools/ is this script's folder

    found["ceilings"] = measure_ceilings(torch.bfloat16)


def step_tests(args, found: dict) -> None:
    junit = Path(args.work) / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs",
               f"--junitxml={junit}", *args.files]
    rc = subprocess.run(command, cwd=args.repo).returncode
    found["files"] = args.files
    found["returncode"] = rc
    if not junit.is_file():
        raise StepFailed(f"pytest wrote no report (exit {rc})")
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    outcome = {}
    for case in cases:
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcome[f"{case.get('classname')}::{case.get('name')}"] = next(iter(kinds), "passed")
    found["passed"] = sum(v == "passed" for v in outcome.values())
    found["failed"] = sum(v in ("failure", "error") for v in outcome.values())
    found["skipped"] = sum(v == "skipped" for v in outcome.values())
    found["tests"] = outcome
    if rc != 0 or found["failed"]:
        raise StepFailed(f"pytest exit {rc}, {found['failed']} failed")
    if not cases:
        raise StepFailed("no gpu-marked tests were collected")
    if not args.dry_run and not found["passed"]:
        raise StepFailed("every gpu test was skipped: the GPU is not visible to the tests")


def model_paths(work: str) -> tuple[Path, Path]:
    return Path(work) / "model" / "hf", Path(work) / "model" / "build"


def step_model_build(args, found: dict) -> None:
    import torch
    from gpu_model import LLAMA_3_2_1B, TINY_LLAMA, make_random_llama

    from pllm.compiler.build import BuildOptions, build

    hf_dir, build_dir = model_paths(args.work)
    shutil.rmtree(hf_dir.parent, ignore_errors=True)
    config, dtype = (TINY_LLAMA, "float32") if args.dry_run else (LLAMA_3_2_1B, "bfloat16")
    t = time.perf_counter()
    make_random_llama(hf_dir, config, getattr(torch, dtype), "cpu" if args.dry_run else "cuda")
    found["random_weights_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    build(str(hf_dir), build_dir, BuildOptions(dtype=dtype, progress=False))
    found["build_s"] = round(time.perf_counter() - t, 1)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    found.update(shape="tiny llama" if args.dry_run else "Llama-3.2-1B", dtype=dtype,
                 weight_bytes=sum((build_dir / f).stat().st_size for f in manifest["weights"]),
                 kernels=sorted(manifest["kernels"]["kernels"]))


def step_throughput(args, found: dict) -> None:
    import gc

    import torch
    import transformers
    from bench_throughput import bench_hf
    from gpu_model import random_prompts

    from pllm import LLM, SamplingParams

    hf_dir, build_dir = model_paths(args.work)
    if not (build_dir / "manifest.json").is_file():
        raise StepFailed(f"no build in {build_dir}: the model_build step did not finish")
    if args.dry_run:
        n, prompt_len, out_len, n_hf, backend, device, dtype = 6, 16, 4, 4, "interpret", "cpu", torch.float32
        settings = dict(max_model_len=64, kv_cache_memory=1 << 22, max_num_seqs=8)
    else:
        n, prompt_len, out_len, n_hf, backend, device, dtype = 256, 512, 256, 64, "cuda", "cuda", torch.bfloat16
        settings = dict(max_model_len=1024, kv_cache_memory=16 << 30, max_num_seqs=256)
    vocab = json.loads((build_dir / "manifest.json").read_text())["spec"]["vocab_size"]
    prompts = random_prompts(n, prompt_len, vocab)
    found.update(requests=n, prompt_len=prompt_len, output_len=out_len, hf_requests=n_hf, backend=backend)
    llm = LLM(str(build_dir), backend=backend, **settings)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    warm_up = random_prompts(2, prompt_len, vocab, seed=1)  # not the measured ones: no prefix-cache hits
    llm.generate([{"prompt_token_ids": p} for p in warm_up], params, use_tqdm=False)  # JIT, graphs
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    pllm_s = time.perf_counter() - t
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    if num_out != n * out_len:
        raise StepFailed(f"pllm returned {num_out} tokens, {n * out_len} asked for")
    found.update(pllm_s=round(pllm_s, 2), pllm_tok_s=num_out / pllm_s)
    del llm, outs
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    reqs = [(p, out_len) for p in prompts[:n_hf]]
    bench_hf(hf, [(p, 2) for p, _ in reqs[:2]], n_hf, 0, device)  # warm-up
    res = bench_hf(hf, reqs, n_hf, 0, device)
    found.update(hf_s=round(res["seconds"], 2), hf_tok_s=res["output_tokens"] / res["seconds"])
    found["ratio"] = found["pllm_tok_s"] / found["hf_tok_s"]


SERVE_PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12]]


def step_target(args, found: dict) -> None:
    import torch
    from gpu_model import LLAMA_3_2_1B, TINY_LLAMA, make_random_llama

    from pllm.compiler.build import BuildOptions, build
    from pllm.compiler.gpu_compile import PURPOSE

    root = Path(args.work) / "target"
    shutil.rmtree(root, ignore_errors=True)
    # the 1B shape's kernels (the same head_dim, GQA and hidden sizes) with 2 layers and a small vocabulary
    config = TINY_LLAMA if args.dry_run else dict(LLAMA_3_2_1B, num_hidden_layers=2, vocab_size=1024, bos_token_id=1,
                                                   eos_token_id=2)
    dtype = "float32" if args.dry_run else "bfloat16"
    make_random_llama(root / "hf", config, getattr(torch, dtype), "cpu")
    build(str(root / "hf"), root / "build", BuildOptions(dtype=dtype, target="sm_90", progress=False))
    compiled = json.loads((root / "build" / "manifest.json").read_text())["compiled_kernels"]
    found["compiled_target"] = compiled.get("target")
    found["compiled_variants"] = len(compiled.get("variants", compiled.get("kernels", {})))
    cache = root / "triton-cache"  # empty: whatever serving compiles lands here
    cache.mkdir()
    serve = [sys.executable, __file__, "target_serve", "--work", args.work, "--result", str(root / "serve.json"),
             *(["--dry-run"] if args.dry_run else [])]
    proc = subprocess.run(serve, env=dict(os.environ, TRITON_CACHE_DIR=str(cache)))
    served = json.loads((root / "serve.json").read_text()) if (root / "serve.json").is_file() else {}
    found["serve"] = served
    if proc.returncode != 0:
        raise StepFailed(f"serving the sm_90 build failed (exit {proc.returncode}): {served.get('error')}")
    cubins = sorted(p.name for p in cache.rglob("*.cubin"))
    found["jit_compiled_files"] = len(cubins)
    found["serves_without_jit"] = not cubins
    if args.dry_run:
        found["why"] = "the interpret backend compiles nothing; only a GPU run answers the question"
    elif cubins:
        found["why"] = (f"serving JIT-compiled {len(cubins)} kernels into an empty TRITON_CACHE_DIR although the build "
                        f"holds sm_90 binaries; the runtime said: {served.get('compiled_status')}; "
                        f"compiler/gpu_compile.py: {PURPOSE}")


def step_target_serve(args, found: dict) -> None:
    from pllm import LLM, SamplingParams

    llm = LLM(str(Path(args.work) / "target" / "build"), backend="interpret" if args.dry_run else "cuda",
              max_model_len=128, kv_cache_memory=1 << 26, max_num_seqs=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in SERVE_PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    found["tokens"] = [o.outputs[0].token_ids for o in outs]
    status = getattr(llm.engine.runner.ops, "compiled_status", None)
    found["compiled_status"] = list(status) if status else None


STEPS = {"install": step_install, "machine": step_machine, "tests": step_tests, "model_build": step_model_build,
         "throughput": step_throughput, "target": step_target, "target_serve": step_target_serve}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=sorted(STEPS))
    p.add_argument("--work", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent))
    p.add_argument("--wheels", default=None)
    p.add_argument("--wheel-list", default=None)
    p.add_argument("--files", nargs="+", default=[], help="tests: the test files to run")
    args = p.parse_args()
    found: dict = {}
    try:
        STEPS[args.step](args, found)
        return 0
    except Exception as e:
        found["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        Path(args.result).write_text(json.dumps(found, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
