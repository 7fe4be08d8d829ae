"""A verified build -> its weights, read only from the files its manifest lists (the tokenizer and generation config:
text_loader.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from pllm.compiler.manifest import (
    QUANT_PARTS,
    BuildDirError,
    BuildManifest,
)
from pllm.models.quant import INT6_LIMIT, QuantFormat, QuantizedWeight, QuantScheme
from pllm.runtime.backends.cpu.mapped_pages import make_read_only
from pllm.runtime.worker.huge_pages import ResidentWeights, WeightFileError, read_weight_file

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def load_weights(build: BuildManifest, device: str | torch.device = "cpu", rank: int = 0, huge_pages: bool = False,
                 resident: ResidentWeights | None = None) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Rank `rank`'s weights file (the only one of a single-rank build), hashed by verify_files for that rank;
    hashing it again here would double the load time. The tensors the manifest records as quantised come back as
    QuantizedWeights (models/quant.py), gathered from their parts. Mapped from the file (on the cpu, the mapping
    made read-only: weights are never written, and the cpu backend drops pages of it), or on the cpu with
    huge_pages read into huge pages (huge_pages.py), which the decode step streams faster: `resident`, that file
    already read so (pllm-serve reads it beside its imports), or read here."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = build.path / build.weight_files[rank]
    try:
        if huge_pages and torch.device(device).type == "cpu":
            tensors = tensors_of(resident if resident is not None and resident.path == f else read_weight_file(f))
        else:
            tensors = load_file(str(f), device=str(device))
            if torch.device(device).type == "cpu":  # views of the file's mapping: never written, so read-only
                mapped = next((t for t in tensors.values() if t.numel()), None)
                if mapped is not None:
                    make_read_only(mapped)
    except (SafetensorError, WeightFileError, OSError) as e:
        raise BuildDirError(f"{f}: cannot load the weights ({e})") from None
    return gather_quantized(tensors, build.manifest["quantization"].get("tensors", {}), f)


def tensors_of(resident: ResidentWeights) -> dict[str, torch.Tensor]:
    """The file's tensors as views of its arena (which they keep alive)."""
    whole = torch.frombuffer(memoryview(resident.memory), dtype=torch.uint8)  # pins the mapping: no close() under it
    out = {}
    for t in resident.tensors:
        at = resident.start + t.offset
        out[t.name] = whole[at:at + t.nbytes].view(TORCH_DTYPES[t.dtype]).view(t.shape)
    return out


def gather_quantized(tensors: dict[str, torch.Tensor], record: dict[str, dict],
                     f: Path) -> dict[str, torch.Tensor | QuantizedWeight]:
    """name.codes, name.scales (and int4's name.mins; not int4_sym's) of each recorded tensor -> one QuantizedWeight
    under `name`."""
    out: dict[str, torch.Tensor | QuantizedWeight] = dict(tensors)
    for name, entry in record.items():
        fmt = QuantFormat(QuantScheme(entry["scheme"]), entry["group_size"])
        wanted = QUANT_PARTS if fmt.scheme.stores_mins else QUANT_PARTS[:2]
        missing = [f"{name}.{part}" for part in wanted if f"{name}.{part}" not in out]
        if missing:
            raise BuildDirError(f"{f}: quantised weight '{name}' lacks {', '.join(missing)}")
        codes, scales, mins = (out.pop(f"{name}.{part}") if part in wanted else None for part in QUANT_PARTS)
        try:
            out[name] = QuantizedWeight(codes, scales, mins, fmt)
        except ValueError as e:
            raise BuildDirError(f"{f}: quantised weight '{name}': {e}") from None
        if fmt.scheme is QuantScheme.INT6 and codes.numel() and not (
                -INT6_LIMIT - 1 <= int((bounds := torch.aminmax(codes)).min) and int(bounds.max) <= INT6_LIMIT):
            # every reader would take such a code as INT8 does, but the cpu backend's 6-bit panels cannot hold it:
            # refused here, on every CPU and shape alike
            raise BuildDirError(f"{f}: quantised weight '{name}' is int6 but holds codes outside "
                                f"{-INT6_LIMIT - 1}..{INT6_LIMIT}; the build is damaged: rebuild it")
    return out
