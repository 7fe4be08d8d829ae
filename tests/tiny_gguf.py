"""Write a tiny Hugging Face checkpoint (tests/tiny_models.py) as a GGUF file, as llama.cpp's converter would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file

# Hugging Face tensor name (within a decoder layer) -> GGUF name, per GGUF architecture. Llama's q/k would need
# llama.cpp's permutation; the architectures here store q and k as Hugging Face does.
LAYER_NAMES = {
    "qwen3": {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    },
    "gemma3": {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    },
    "llama": {  # q and k rows permuted as llama.cpp's converter does (llama_permute)
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    },
    "phi3": {  # llama.cpp's Phi3 converter stores the fused matrices as they are (ffn_up: gate rows, then up)
        "input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    },
}
# llama.cpp stores gemma's RMSNorm weights as 1 + w (transformers subtracts the 1 again when it reads the file)
NORM_OFFSET = {"gemma3": 1.0}


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (q/k rows of a llama file)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, architecture: str, file_name: str = "model.gguf",
                    float_matrices: tuple[str, ...] = (), matrix_types: dict[str, str] | None = None,
                    matrix_type: str = "Q8_0", kv: Callable[[Any], None] | None = None,
                    tensors: dict[str, Any] | None = None) -> Path:
    """model_dir/file_name: the model's config, byte-level BPE tokenizer and weights (matrices in matrix_type, but
    those named in float_matrices, by GGUF name, in F32, and those whose GGUF name contains a key of matrix_types in
    that type, e.g. {"attn_v": "Q4_1"}). `kv(writer)` adds keys of the caller's; `tensors` more F32 tensors by GGUF
    name (rope_freqs.weight, ...)."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    ids = {**tokenizer["model"]["vocab"], **added}
    tokens = sorted(ids, key=ids.__getitem__)
    assert [ids[t] for t in tokens] == list(range(len(tokens))), "token ids must be dense"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads

    path = model_dir / file_name
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{architecture}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(config.get("rope_theta") or (rope.get("full_attention") or rope)["rope_theta"])
    if architecture == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
        writer.add_unk_token_id(0)  # as Gemma's files give one (transformers' gemma tokenizer reading needs it)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    if config.get("pad_token_id") is not None:
        writer.add_pad_token_id(config["pad_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    if kv is not None:
        kv(writer)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if "lm_head.weight" in state:
        names["lm_head.weight"] = "output.weight"
    for i in range(config["num_hidden_layers"]):
        for hf, name in LAYER_NAMES[architecture].items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{name}.weight"
    assert set(names) == set(state), set(state) ^ set(names)
    for hf, name in names.items():
        tensor = state[hf].float().numpy()
        if "norm" in hf:
            tensor = tensor + NORM_OFFSET.get(architecture, 0.0)
        if architecture == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            tensor = llama_permute(tensor, heads if ".q_proj." in hf else kv_heads)
        kind = next((t for key, t in (matrix_types or {}).items() if key in name), matrix_type)
        if tensor.ndim == 2 and name not in float_matrices and kind != "F32":
            # quantised, so transformers must dequantise: blocks of 32 along rows
            qtype = gguf.GGMLQuantizationType[kind]
            quantised = gguf.quants.quantize(tensor, qtype)
            writer.add_tensor(name, quantised, raw_shape=quantised.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(name, tensor.astype(np.float32))
    for name, tensor in (tensors or {}).items():
        writer.add_tensor(name, np.asarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
