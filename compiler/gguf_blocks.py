"""A GGUF file's quantised blocks kept as they are: Q8_0, Q4_0, Q4_1 and Q4_K read raw (gguf's GGUFReader) and
converted losslessly into models/quant.py's layout, each tensor under its Hugging Face name.

The conversions (d, m, dmin are the blocks' float16 fields, widened; q the stored codes):
  Q8_0: INT8, groups of 32: scale = d                         (w = d * q)
  Q4_0: INT4_SYM, groups of 32: scale = d (min -8 d, implied) (w = d * (q - 8)), the file's 18 bytes a block
  Q4_1: INT4, groups of 32: scale = d, min = m                (w = d * q + m)
  Q4_K: INT4, groups of 32 (the 8 sub-blocks of a 256-element super-block): scale = d * sc_j, min = -(dmin * m_j),
        sc_j and m_j the 6-bit values packed in its 12 scale bytes      (w = d sc_j q - dmin m_j)
Each product is exact in float32 (an 11-bit significand times at most 7 bits), so `dequantize` rounds exactly once
where gguf's own dequantiser does, and the two agree bit for bit (tests/compiler/test_gguf_blocks.py; the build
also checks every kept tensor against the float weights transformers reads from the same file).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pllm.models.quant import QuantFormat, QuantizedWeight, QuantScheme, half_if_exact, pack_int4

GROUP = 32  # elements per group of every kept type (Q4_K's sub-blocks)
SUPER_BLOCK = 256  # Q4_K


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per row, little-endian float16 -> float32 [rows, 1]."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """Bytes [n, chunks * half] whose low nibbles are a chunk's first `half` values and high nibbles its next `half`
    (ggml's order) -> values [n, chunks * 2 * half]."""
    n = qs.shape[0]
    chunks = qs.reshape(n, -1, 1, half) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (chunks & np.uint8(0x0F)).reshape(n, -1)


def _q4k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes per super-block -> the 8 six-bit scales and mins [n, 8] (ggml's get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def weight_from_blocks(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> QuantizedWeight | None:
    """One GGUF tensor's raw bytes [rows, row_bytes] (rows = out features) -> the packed weight, or None when pllm
    does not keep `type_name` (Q6_K, F16, ...: the caller dequantises those)."""
    out, in_features = shape
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(out, -1)
    if type_name == "Q8_0":
        blocks = raw.reshape(-1, 34)
        d, qs = _f16(blocks[:, :2]), blocks[:, 2:].view(np.int8)
        codes = torch.from_numpy(qs.reshape(out, in_features).copy())
        scales, _ = half_if_exact(torch.from_numpy(d.reshape(out, -1).copy()))  # the blocks' own fp16 d
        return QuantizedWeight(codes, scales, None, QuantFormat(QuantScheme.INT8, GROUP))
    if type_name == "Q4_0":  # no mins: INT4_SYM's are -8 d
        blocks = raw.reshape(-1, 18)
        scheme, scales, mins = QuantScheme.INT4_SYM, _f16(blocks[:, :2]), None
        q = _nibbles(blocks[:, 2:], 16)  # [blocks, 32]
    elif type_name == "Q4_1":
        blocks = raw.reshape(-1, 20)
        scheme, scales, mins = QuantScheme.INT4, _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        q = _nibbles(blocks[:, 4:], 16)  # [blocks, 32]
    elif type_name == "Q4_K":
        blocks = raw.reshape(-1, 144)
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mn = _q4k_scales(blocks[:, 4:16])
        scheme, scales = QuantScheme.INT4, d * sc.astype(np.float32)  # [blocks, 8]
        mins = -(dmin * mn.astype(np.float32))
        q = _nibbles(blocks[:, 16:], 32)  # [blocks, 256]
    else:
        return None
    values = torch.from_numpy(np.ascontiguousarray(q).reshape(out, in_features))

    def per_row(groups: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(groups, dtype=np.float32).reshape(out, -1))

    # Q4_0's and Q4_1's fp16 d (and m) stay fp16; Q4_K's products where exact
    scales_t, mins_t = half_if_exact(per_row(scales), None if mins is None else per_row(mins))
    return QuantizedWeight(pack_int4(values), scales_t, mins_t, QuantFormat(scheme, GROUP))


def permute_rows(weight: QuantizedWeight, order: torch.Tensor) -> QuantizedWeight:
    """The same weight with its output rows reordered (rows are independent in the layout: lossless)."""
    mins = None if weight.mins is None else weight.mins.index_select(0, order)
    return QuantizedWeight(weight.codes.index_select(0, order), weight.scales.index_select(0, order), mins,
                           weight.fmt)


def unpermute_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order undoing llama.cpp's q/k permutation (transformers' _reverse_permute_weights, applied to indices)."""
    dim = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, dim, 2).transpose(1, 2).reshape(rows)


# a decoder layer's matrices, by their Hugging Face names within the layer
LAYER_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")


def _fused_layer_matrices() -> dict[Any, tuple[str, ...]]:
    """GGUF architectures whose files store Hugging Face's fused matrices as they are: phi3's attn_qkv is qkv_proj
    (q, k, v rows; llama.cpp's Phi3 converter permutes no rows) and its ffn_up is gate_up_proj (gate rows then up),
    which gguf's name map would otherwise give mlp.up_proj's name."""
    from gguf import MODEL_ARCH

    return {MODEL_ARCH.PHI3: ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}


# the matrices read as blocks besides the layers': the output matrix and the token embedding, which is the output
# matrix of a file without one (tied); the embedding itself is always built float (compiler/lm_head.py)
OUTPUT_MATRICES = ("model.embed_tokens", "lm_head")


def read_kept_blocks(reader: Any, config: dict) -> tuple[dict[str, QuantizedWeight], dict[str, str]]:
    """Every decoder-layer matrix of the file (reader: its gguf GGUFReader) in a kept type, and its output matrix and
    token embedding, under their Hugging Face names (q/k rows unpermuted as transformers does for llama files; phi3's
    fused qkv_proj and gate_up_proj whole); and every other one's type, by HF name."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    field = reader.fields["general.architecture"]
    arch_name = bytes(field.parts[field.data[0]]).decode()
    arch = {name: a for a, name in MODEL_ARCH_NAMES.items()}.get(arch_name)
    n_layers = config.get("num_hidden_layers", 0)
    names = get_tensor_name_map(arch, n_layers) if arch is not None else None
    gguf_to_hf = {}
    if names is not None:
        matrices = _fused_layer_matrices().get(arch, LAYER_MATRICES)
        hf_bases = [f"model.layers.{i}.{m}" for i in range(n_layers) for m in matrices]
        for hf in (*hf_bases, *OUTPUT_MATRICES):
            gguf_name = names.get_name(hf)
            if gguf_name is not None:
                gguf_to_hf[gguf_name + ".weight"] = hf + ".weight"
    kept: dict[str, QuantizedWeight] = {}
    others: dict[str, str] = {}
    for t in reader.tensors:
        hf = gguf_to_hf.get(t.name)
        if hf is None or len(t.shape) != 2:
            continue
        shape = (int(t.shape[1]), int(t.shape[0]))  # GGUF lists dims innermost first
        weight = weight_from_blocks(t.tensor_type.name, t.data, shape)
        if weight is None:
            others[hf] = t.tensor_type.name
            continue
        if arch_name == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            heads = config["num_attention_heads"] if ".q_proj." in hf else config.get(
                "num_key_value_heads", config["num_attention_heads"])
            weight = permute_rows(weight, unpermute_order(shape[0], heads))
        kept[hf] = weight
    return kept, others
