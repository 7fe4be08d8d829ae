"""The bytes of weights one batch-1 decode token reads, on each side of tools/bench_vs_llamacpp.py: what a decode row's
tok/s is a rate of, when the weights stream from memory (its GB/s = these bytes times tok/s, set against the read
bandwidth measured in the same sitting).

Counted: every tensor a step multiplies by or scales with (the layers' linears and norms, the final norm, the LM
head), each once, as stored. Left out: the token embedding table, of which a token reads one row, except where it is
the LM head too (a tied head kept as the table itself); and the KV cache (64 tokens of context in the decode row:
under 1% of either model's weights). pllm's panels (runtime/backends/cpu/cpu_quant_linear.py) are the same bytes in
another order, read in place of the rows, so the build's file counts for them; but for an INT6 tensor (`--lm-head
int6`), whose panels keep 6 bits of each code byte the file stores: three quarters of its codes' bytes, where the CPU
makes panels (AVX512-VNNI) and the matrix is in whole panels (rows a multiple of 16, width of 64: the kernel's
panels_fit); elsewhere its rows are read, a byte a code.
"""

from __future__ import annotations

import json
from pathlib import Path

from pllm.runtime.worker.huge_pages import read_header

# pllm's build: the embedding table's tensor, and the prefix of the LM head's (absent where the head is tied)
PLLM_EMBEDDING = "embed_tokens"
PLLM_HEAD_PREFIX = "lm_head"
# llama.cpp's GGUF: the embedding table, and the output matrix (absent where tied to the table)
GGUF_EMBEDDING = "token_embd.weight"
GGUF_HEAD = "output.weight"


def _safetensors_sizes(path: Path) -> dict[str, tuple[int, tuple[int, ...]]]:
    """tensor name -> (bytes, shape), from a safetensors file's header (read and checked as the weights' loader
    reads it)."""
    with open(path, "rb") as f:
        entries, _ = read_header(f, path, path.stat().st_size)
    return {e.name: (e.end - e.begin, tuple(e.shape)) for e in entries}


def _in_panels(shape: tuple[int, ...]) -> bool:
    """Whether an INT6 codes matrix [n, k] is repacked into panels (cpu_quant_panels.cpp.inc's panels_fit: whole
    panels of 16 rows, whole 64-element chunks; its groups of 32 always divide)."""
    return len(shape) == 2 and shape[0] % 16 == 0 and shape[0] > 0 and shape[1] % 64 == 0


def pllm_step_bytes(build: Path) -> int:
    """Weight bytes a decode token of this pllm build reads."""
    sizes: dict[str, tuple[int, tuple[int, ...]]] = {}
    for path in sorted(build.glob("*.safetensors")):
        sizes.update(_safetensors_sizes(path))
    if not sizes:
        raise FileNotFoundError(f"{build}: no .safetensors weights")
    tied = not any(name.startswith(PLLM_HEAD_PREFIX) for name in sizes)
    packed = json.loads((build / "manifest.json").read_text()).get("quantization", {}).get("tensors", {})
    six = {f"{name}.codes" for name, entry in packed.items() if entry["scheme"] == "int6"} if _has_vnni() else set()
    return sum(size * 3 // 4 if name in six and _in_panels(shape) else size for name, (size, shape) in sizes.items()
               if tied or name != PLLM_EMBEDDING)


def _has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI, where the cpu backend reads packed weights from its panels."""
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def gguf_step_bytes(path: Path) -> int:
    """Weight bytes a decode token of llama.cpp over this GGUF file reads."""
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    tied = GGUF_HEAD not in sizes
    return sum(size for name, size in sizes.items() if tied or name != GGUF_EMBEDDING)
