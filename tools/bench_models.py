"""The models of tools/bench_vs_llamacpp.py on both sides: llama.cpp's GGUF files and pllm's builds, one per
precision compared."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import llamacpp
from random_llama import LLAMA_1B, make_random_llama, num_parameters

# pllm precision -> pllm-compile's quantisation flags. int4 is the default group of 32 (5 bits a weight with its fp16
# scale and min); int4g128 groups of 128, 4.25 bits a weight: under Q4_0's 4.5 (4-bit codes and an fp16 scale per 32);
# int4_sym Q4_0's own rule and size (groups of 32, an fp16 scale each, no min).
# gguf-q8_0 and gguf-q4_0 compile llama.cpp's own Q8_0 / Q4_0 file keeping its blocks: both sides read the same bytes
PLLM_QUANTIZATION = {"int8": ["--quantization", "int8"], "int4": ["--quantization", "int4"],
                     "int4g128": ["--quantization", "int4", "--quant-group-size", "128"],
                     "int4_sym": ["--quantization", "int4_sym"],
                     "gguf-q8_0": ["--quantization", "gguf"], "gguf-q4_0": ["--quantization", "gguf"]}
# pllm precision -> the llama.cpp types it is compared with
LLAMA_TYPES = {"bf16": ("bf16",), "int8": ("q8_0",), "int4": ("q4_0", "q4_k"), "int4g128": ("q4_0", "q4_k"),
               "int4_sym": ("q4_0",), "gguf-q8_0": ("q8_0",), "gguf-q4_0": ("q4_0",)}
# pllm precision -> the llama.cpp file pllm compiles for it (the rest compile the model's own source)
KEPT_GGUF = {"gguf-q8_0": "q8_0", "gguf-q4_0": "q4_0"}
# The LM head at the precision of the compared llama.cpp file's output matrix: where that is Q6_K (llama-quantize's
# choice for an untied output in its 4-bit types: 6.56 bits a weight), pllm's `--lm-head int6` (6.5); else pllm's
# default int8 head (8.5 bits, Q8_0's: llama.cpp's 8-bit files, and a tied table, which it keeps at Q8_0)
HEAD_FLAGS = {"Q6_K": ["--lm-head", "int6"]}


@dataclass(frozen=True)
class Prepared:
    ggufs: dict[str, Path]  # llama.cpp precision (bf16, q8_0, q4_0, q4_k) -> GGUF file
    pllm_builds: dict[str, tuple[Path | None, str]]  # pllm precision -> (build, "") or (None, why it is missing)


class QuantizationRefused(RuntimeError):
    """pllm-compile refuses the quantisation flags (none in this pllm, or not for this model: a group size its widths
    do not divide): the rows say "not available" and why, never a figure."""


def compiler_fingerprint() -> str:
    """A hash of what decides a build's contents in this pllm: its compiler's and kernel templates' source files."""
    import hashlib

    import pllm

    root = Path(pllm.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for folder in ("compiler", "templates", "models") for p in (root / folder).rglob("*")
                       if p.is_file() and p.suffix in (".py", ".jinja", ".inc")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _fingerprint_file(out: Path) -> Path:
    return out.with_name(out.name + ".compiler-sha256")


def current_build(out: Path, fingerprint: str) -> bool:
    """Whether `out` holds a build the pllm whose compiler_fingerprint() is `fingerprint` made: one left by an older
    format, or by another version of the compiler or its kernel templates (whose libraries may load and run old code,
    or fail to load and leave the engine op by op), is compiled again, not reused."""
    from pllm.compiler.manifest import BuildDirError, open_build

    try:
        open_build(out, verify=False)
    except BuildDirError:
        return False
    stamp = _fingerprint_file(out)
    return stamp.is_file() and stamp.read_text().strip() == fingerprint


def output_type(gguf_file: Path) -> str:
    """The GGUF type name of a file's output matrix (its token embedding where the output is tied to it)."""
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(gguf_file)).tensors}
    return types.get("output.weight", types["token_embd.weight"])


def compile_pllm(source: Path, out: Path, precision: str, reuse: bool, extra: list[str] = ()) -> Path:
    """pllm-compile SOURCE at bf16, quantised to int8/int4/int4_sym or its GGUF blocks kept when asked (with the
    `extra` flags); raises QuantizationRefused when this pllm's compiler refuses --quantization."""
    fingerprint = compiler_fingerprint()  # before compiling: sources edited meanwhile must not stamp this build
    if reuse and current_build(out, fingerprint):
        return out
    shutil.rmtree(out, ignore_errors=True)
    _fingerprint_file(out).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pllm.compiler.cli", str(source), "-o", str(out), "--dtype", "bfloat16", "-q"]
    cmd += [*PLLM_QUANTIZATION.get(precision, []), *extra]
    print(f"pllm-compile {source.name} -> {out.name}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        if precision in PLLM_QUANTIZATION and "--quant" in err:  # the error names the flag it refuses
            raise QuantizationRefused(f"not available: {err.removeprefix('pllm-compile: error: ')}")
        raise RuntimeError(f"pllm-compile {source} failed: {proc.stderr[-3000:]}")
    _fingerprint_file(out).write_text(fingerprint + "\n")
    return out


def prepare_model(model: str, args, llama: llamacpp.LlamaCpp, work: Path) -> Prepared:
    in_process = args.precisions if "decode" in args.rows or "prefill" in args.rows else []
    served = args.serve_precisions if "serve" in args.rows else []
    precisions = list(dict.fromkeys([*in_process, *served]))
    if model == "smollm2":
        from pllm.compiler.source import default_gguf_path

        source = default_gguf_path()
        bf16 = llamacpp.quantize(llama, source, work / "smollm2-bf16.gguf", "bf16", requantize=True)
        print(f"smollm2: llama.cpp's BF16 file is {source.name} re-quantised to BF16 (--allow-requantize): the only "
              "bf16 source here; Q8_0/Q4_0/Q4_K are made from it", flush=True)
    elif model == "llama1b":
        tokenizer = compile_pllm(_default_source(), work / "smollm2-pllm-bf16", "bf16", reuse=True)
        source = make_random_llama(work / "llama1b-hf", tokenizer)
        print(f"llama1b: {num_parameters(LLAMA_1B, 49152) / 1e9:.2f}B parameters, random weights, in {source}",
              flush=True)
        bf16 = llamacpp.convert_hf(llama, source, work / "llama1b-bf16.gguf")
    else:
        raise ValueError(f"unknown model {model!r}")
    ggufs = {"bf16": bf16}
    for p in precisions:
        for lp in LLAMA_TYPES[p]:
            if lp not in ggufs:
                ggufs[lp] = llamacpp.quantize(llama, bf16, work / f"{model}-{lp}.gguf", lp)
    builds: dict[str, tuple[Path | None, str]] = {}
    for p in precisions:
        try:
            p_source = ggufs[KEPT_GGUF[p]] if p in KEPT_GGUF else source
            their_head = output_type(ggufs[LLAMA_TYPES[p][0]]) if p in PLLM_QUANTIZATION else None
            head = HEAD_FLAGS.get(their_head, [])
            name = f"{model}-pllm-{p}" + ("-" + head[-1] + "-head" if head else "")
            if head:
                print(f"{model} {p}: llama.cpp's output matrix is {their_head}; pllm compiles its head "
                      f"{' '.join(head)}", flush=True)
            builds[p] = (compile_pllm(p_source, work / name, p, args.reuse_builds, head), "")
        except QuantizationRefused as e:
            print(f"{model} {p}: {e}", flush=True)
            builds[p] = (None, str(e))
    return Prepared(ggufs, builds)


def _default_source() -> Path:
    from pllm.compiler.source import default_gguf_path

    return default_gguf_path()
