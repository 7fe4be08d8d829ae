"""llama.cpp's side of tools/bench_vs_llamacpp.py: find or build its binaries, convert and quantise GGUF files, run
llama-bench and llama-server.

The sources come from the `llama-cpp-python` sdist, which ships llama.cpp under vendor/llama.cpp: `pip download
--no-binary :all:` fetches it into the cache folder (~/.cache/pllm-llamacpp by default), CMake builds only the three
tools used here (Release, CPU, native instructions), and a later run finds the build there and reuses it. The
converter (vendor/llama.cpp/convert_hf_to_gguf.py) runs with the `gguf` package of that same tree.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("llama-server", "llama-bench", "llama-quantize")
SDIST = "llama-cpp-python"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF",
)  # fmt: skip
# llama-quantize's type names for the precisions compared here (Q4_K is its alias of Q4_K_M)
QUANT_TYPES = {"bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K_M"}
SERVER_START_TIMEOUT_S = 300.0


class LlamaCppError(RuntimeError):
    """Building, converting or running llama.cpp failed; the message names the step and the command's output."""


@dataclass(frozen=True)
class LlamaCpp:
    """Where the tools live: the binaries' folder and the source tree (for the converter)."""

    bin_dir: Path
    source: Path | None  # vendor/llama.cpp of the sdist; None when the binaries were found on PATH

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)


@dataclass(frozen=True)
class BenchResult:
    """One llama-bench test: pp<n_prompt> (prefill) or tg<n_gen> (decode), with @d<n_depth> after a context of
    n_depth tokens; tokens/s mean and deviation."""

    test: str
    n_prompt: int
    n_gen: int
    tokens_per_s: float
    stddev: float
    threads: int
    n_depth: int = 0


def _run(cmd: list[str], step: str, cwd: Path | None = None, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise LlamaCppError(f"{step} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def find_or_build(cache: Path, bin_dir: str | None = None, jobs: int = 2) -> LlamaCpp:
    """--llama-cpp-bin, else the tools on PATH, else a build in `cache` (made now if missing: ~10+ minutes)."""
    source = find_source(cache)
    if bin_dir is not None:
        found = Path(bin_dir)
        missing = [t for t in TOOLS if not (found / t).is_file()]
        if missing:
            raise LlamaCppError(f"--llama-cpp-bin {bin_dir}: no {', '.join(missing)} there")
        return LlamaCpp(found, source)
    on_path = [shutil.which(t) for t in TOOLS]
    if all(on_path):
        return LlamaCpp(Path(on_path[0]).parent, source)
    build_bin = cache / "build" / "bin"
    if source is None:
        source = fetch_source(cache)
    if not all((build_bin / t).is_file() for t in TOOLS):
        print(f"building llama.cpp ({', '.join(TOOLS)}) in {cache / 'build'}: ~10+ minutes on 2 cores", flush=True)
        _run(["cmake", "-S", str(source), "-B", str(cache / "build"), *CMAKE_FLAGS], "cmake configure")
        _run(["cmake", "--build", str(cache / "build"), "--config", "Release", f"-j{jobs}", "--target", *TOOLS],
             "cmake build")
    return LlamaCpp(build_bin, source)


def find_source(cache: Path) -> Path | None:
    found = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))
    return found[-1] if found else None


def fetch_source(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(cache)],
         "pip download of the llama-cpp-python sdist")
    archives = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise LlamaCppError(f"{cache}: pip download left no llama_cpp_python-*.tar.gz")
    with tarfile.open(archives[-1]) as tar:
        tar.extractall(cache, filter="data")
    source = find_source(cache)
    if source is None:
        raise LlamaCppError(f"{archives[-1]}: no vendor/llama.cpp inside")
    return source


def convert_hf(llama: LlamaCpp, hf_dir: Path, out: Path, outtype: str = "bf16") -> Path:
    """An HF folder -> GGUF with llama.cpp's own converter (and the gguf package of its tree)."""
    if out.is_file():
        return out
    if llama.source is None:
        raise LlamaCppError("the converter needs llama.cpp's sources (the llama-cpp-python sdist in the cache)")
    deps = converter_deps(llama.source.parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(llama.source / "gguf-py"), str(deps)])}
    env.pop("NO_LOCAL_GGUF", None)
    tmp = out.with_suffix(".tmp.gguf")
    _run([sys.executable, str(llama.source / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(tmp),
          "--outtype", outtype], f"convert_hf_to_gguf.py {hf_dir}", env=env)
    tmp.rename(out)
    return out


def converter_deps(cache: Path) -> Path:
    """The converter imports sentencepiece before it looks for a tokenizer.model; pllm's environment lacks it, so it
    is installed into a folder of the cache (never into the running environment)."""
    deps = cache / "converter-deps"
    if not (deps / "sentencepiece").is_dir():
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(deps), "sentencepiece"],
             "pip install sentencepiece for the converter")
    return deps


def quantize(llama: LlamaCpp, src: Path, out: Path, precision: str, requantize: bool = False) -> Path:
    """llama-quantize src -> out at `precision` (a key of QUANT_TYPES); requantize: src is already quantised."""
    if out.is_file():
        return out
    tmp = out.with_suffix(".tmp.gguf")
    flags = ["--allow-requantize"] if requantize else []
    _run([llama.tool("llama-quantize"), *flags, str(src), str(tmp), QUANT_TYPES[precision]],
         f"llama-quantize {src.name} -> {QUANT_TYPES[precision]}")
    tmp.rename(out)
    return out


def parse_bench_json(text: str) -> list[BenchResult]:
    """llama-bench -o json: a list of tests, each with n_prompt, n_gen, avg_ts, stddev_ts, n_threads (and n_depth,
    where llama-bench has -d: 0 without it)."""
    try:
        tests = json.loads(text)
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench printed no JSON ({e}): {text[:300]!r}") from None
    if not isinstance(tests, list):
        raise LlamaCppError(f"llama-bench JSON: expected a list of tests, got {type(tests).__name__}")
    results = []
    for t in tests:
        missing = [k for k in ("n_prompt", "n_gen", "avg_ts", "stddev_ts", "n_threads") if k not in t]
        if missing:
            raise LlamaCppError(f"llama-bench JSON: a test lacks {', '.join(missing)}: {json.dumps(t)[:300]}")
        n_prompt, n_gen = int(t["n_prompt"]), int(t["n_gen"])
        if (n_prompt > 0) == (n_gen > 0):
            raise LlamaCppError(f"llama-bench JSON: mixed pp+tg test (n_prompt {n_prompt}, n_gen {n_gen})")
        depth = int(t.get("n_depth", 0))
        name = (f"pp{n_prompt}" if n_prompt else f"tg{n_gen}") + (f"@d{depth}" if depth else "")
        results.append(BenchResult(name, n_prompt, n_gen, float(t["avg_ts"]), float(t["stddev_ts"]),
                                   int(t["n_threads"]), depth))
    return results


def llama_bench(llama: LlamaCpp, gguf: Path, threads: int, prompt: int, gen: int, reps: int,
                depth: int = 0) -> list[BenchResult]:
    """depth: each test after a context of that many tokens (llama-bench -d)."""
    depth_args = ["-d", str(depth)] if depth else []
    out = _run([llama.tool("llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
                *depth_args, "-r", str(reps), "-o", "json"], f"llama-bench {gguf.name}")
    return parse_bench_json(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def start_server(llama: LlamaCpp, gguf: Path, threads: int, parallel: int, slot_ctx: int,
                 log: Path) -> tuple[subprocess.Popen, str]:
    """llama-server on a free loopback port, `parallel` slots of `slot_ctx` tokens each; waits for /health."""
    port = free_port()
    cmd = [llama.tool("llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * slot_ctx),
           "--no-webui", "--alias", gguf.stem]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise LlamaCppError(f"llama-server did not start (exit {proc.returncode}); log {log}:\n"
                                f"{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
