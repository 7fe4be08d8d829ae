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
from pllm.models.quant import QuantFormat, QuantizedWeight, QuantScheme


def load_weights(build: BuildManifest, device: str | torch.device = "cpu",
                 rank: int = 0) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Rank `rank`'s weights file (the only one of a single-rank build), hashed by verify_files for that rank;
    hashing it again here would double the load time. The tensors the manifest records as quantised come back as
    QuantizedWeights (models/quant.py), gathered from their parts."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = build.path / build.weight_files[rank]
    try:
        tensors = load_file(str(f), device=str(device))
    except (SafetensorError, OSError) as e:
        raise BuildDirError(f"{f}: cannot load the weights ({e})") from None
    return gather_quantized(tensors, build.manifest["quantization"].get("tensors", {}), f)


def gather_quantized(tensors: dict[str, torch.Tensor], record: dict[str, dict],
                     f: Path) -> dict[str, torch.Tensor | QuantizedWeight]:
    """name.codes, name.scales (and int4's name.mins) of each recorded tensor -> one QuantizedWeight under `name`."""
    out: dict[str, torch.Tensor | QuantizedWeight] = dict(tensors)
    for name, entry in record.items():
        fmt = QuantFormat(QuantScheme(entry["scheme"]), entry["group_size"])
        wanted = QUANT_PARTS if fmt.scheme is QuantScheme.INT4 else QUANT_PARTS[:2]
        missing = [f"{name}.{part}" for part in wanted if f"{name}.{part}" not in out]
        if missing:
            raise BuildDirError(f"{f}: quantised weight '{name}' lacks {', '.join(missing)}")
        codes, scales, mins = (out.pop(f"{name}.{part}") if part in wanted else None for part in QUANT_PARTS)
        try:
            out[name] = QuantizedWeight(codes, scales, mins, fmt)
        except ValueError as e:
            raise BuildDirError(f"{f}: quantised weight '{name}': {e}") from None
    return out
