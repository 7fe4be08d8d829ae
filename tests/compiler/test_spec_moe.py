"""Mixture-of-experts config rules: mixtral's and qwen3_moe's keys read under Hugging Face's names, bad ones named."""

import json

import pytest

from pllm.compiler.build import _assemble
from pllm.compiler.spec import ConfigError, ModelSpec, spec_from_config
from pllm.models.registry import family_of

MIXTRAL = {
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 256,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
}


def test_mixtral_spec_round_trips_and_routes_every_layer():
    spec = spec_from_config(MIXTRAL)
    moe = spec.moe
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (4, 2, 32)
    assert moe.norm_topk_prob and not moe.round_router_weights and moe.sparse_layers == (0, 1)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_mixtral_layout_stacks_experts_in_order():
    spec = spec_from_config(MIXTRAL)
    layout = family_of("mixtral", "cfg.json").weight_layout(spec)
    assert "layers.0.gate_up_proj" not in layout and "layers.1.down_proj" not in layout
    gate_up = layout["layers.1.experts_gate_up"]
    assert gate_up.shape == (4, 64, 64) and gate_up.num_stacked == 4
    assert gate_up.hf_names[:3] == (
        "model.layers.1.block_sparse_moe.experts.0.w1.weight",
        "model.layers.1.block_sparse_moe.experts.0.w3.weight",
        "model.layers.1.block_sparse_moe.experts.1.w1.weight",
    )
    down = layout["layers.0.experts_down"]
    assert down.shape == (4, 64, 32) and down.hf_names[3] == "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    assert layout["layers.0.router"].hf_names == ("model.layers.0.block_sparse_moe.gate.weight",)


def test_stacking_concatenates_each_group_then_stacks():
    import torch

    parts = [torch.full((2, 3), float(i)) for i in range(6)]  # 3 experts x (gate, up)
    stacked = _assemble(parts, 3)
    assert stacked.shape == (3, 4, 3)
    assert stacked[:, :, 0].tolist() == [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5]]
    # experts of different shapes cannot stack: the flat result fails the caller's shape check, which names them
    assert _assemble([torch.zeros(2, 3), torch.zeros(3, 3)], 2).dim() == 1


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_local_experts": None}, ["num_local_experts", "missing"]),
        ({"num_local_experts": 0}, ["num_local_experts", "positive", "0"]),
        ({"num_local_experts": "8"}, ["num_local_experts", "'8'"]),
        ({"num_experts_per_tok": None}, ["num_experts_per_tok", "missing"]),
        ({"num_experts_per_tok": 5}, ["num_experts_per_tok", "5", "4 experts"]),
        ({"num_experts_per_tok": True}, ["num_experts_per_tok", "True"]),
        ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    ],
)
def test_bad_mixtral_configs_name_key_value_and_file(change, words):
    cfg = {k: v for k, v in {**MIXTRAL, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        spec_from_config(cfg, "cfg.json")
    for w in ["cfg.json", *words]:
        assert w in str(e.value), (w, str(e.value))


def test_mixtral_window_covering_the_context_is_accepted():
    assert spec_from_config({**MIXTRAL, "sliding_window": 4096}).moe.num_experts == 4


def test_moe_windows_reach_every_layer_as_transformers_applies_them():
    """mixtral windows whenever `sliding_window` is set (no `use_sliding_window` read), qwen3_moe only with
    `use_sliding_window` true; both on every layer."""
    for extra in ({}, {"use_sliding_window": False}):
        spec = spec_from_config({**MIXTRAL, "sliding_window": 128, **extra})
        assert spec.sliding_window == 128 and spec.sliding_layers == tuple(range(spec.num_hidden_layers))
    spec = spec_from_config({**QWEN3_MOE, "use_sliding_window": True, "sliding_window": 64})
    assert spec.sliding_window == 64 and spec.sliding_layers == (0, 1, 2, 3)
    assert spec_from_config({**QWEN3_MOE, "sliding_window": 64}).sliding_layers == ()


QWEN3_MOE = {
    **MIXTRAL,
    "model_type": "qwen3_moe",
    "num_hidden_layers": 4,
    "intermediate_size": 96,
    "num_experts": 8,
    "moe_intermediate_size": 32,
}
del QWEN3_MOE["num_local_experts"]


def test_qwen3_moe_spec_reads_its_keys():
    spec = spec_from_config({**QWEN3_MOE, "norm_topk_prob": True, "mlp_only_layers": [1], "decoder_sparse_step": 2})
    moe = spec.moe
    assert spec.qk_norm and spec.intermediate_size == 96 and spec.head_dim == 16
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (8, 2, 32)
    assert moe.norm_topk_prob and moe.round_router_weights
    assert moe.sparse_layers == (3,)  # every 2nd layer (1 and 3), less the mlp-only layer 1
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    defaults = spec_from_config(QWEN3_MOE).moe
    assert not defaults.norm_topk_prob and defaults.sparse_layers == (0, 1, 2, 3)


def test_qwen3_moe_reads_transformers5s_num_local_experts():
    cfg = {**QWEN3_MOE, "num_local_experts": 6}
    del cfg["num_experts"]
    assert spec_from_config(cfg).moe.num_experts == 6


def test_qwen3_moe_layout_mixes_dense_and_sparse_layers():
    spec = spec_from_config({**QWEN3_MOE, "mlp_only_layers": [0, 2]})
    layout = family_of("qwen3_moe", "cfg.json").weight_layout(spec)
    assert layout["layers.0.gate_up_proj"].shape == (192, 64) and "layers.0.router" not in layout
    assert "layers.1.gate_up_proj" not in layout and layout["layers.1.experts_down"].shape == (8, 64, 32)
    assert layout["layers.1.experts_gate_up"].hf_names[1] == "model.layers.1.mlp.experts.0.up_proj.weight"
    assert layout["layers.3.router"].hf_names == ("model.layers.3.mlp.gate.weight",)
    assert "layers.3.q_norm" in layout


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_experts": None}, ["num_experts", "missing"]),
        ({"num_experts": -1}, ["num_experts", "-1"]),
        ({"num_experts_per_tok": 9}, ["num_experts_per_tok", "9", "8 experts"]),
        ({"moe_intermediate_size": None}, ["moe_intermediate_size", "missing"]),
        ({"moe_intermediate_size": 0}, ["moe_intermediate_size", "0"]),
        ({"norm_topk_prob": "yes"}, ["norm_topk_prob", "'yes'"]),
        ({"decoder_sparse_step": 0}, ["decoder_sparse_step", "0"]),
        ({"mlp_only_layers": 1}, ["mlp_only_layers", "1"]),
        ({"mlp_only_layers": [4]}, ["mlp_only_layers", "4", "num_hidden_layers=4"]),
        ({"mlp_only_layers": ["0"]}, ["mlp_only_layers", "'0'"]),
        ({"attention_bias": True}, ["attention_bias"]),
    ],
)
def test_bad_qwen3_moe_configs_name_key_value_and_file(change, words):
    cfg = {k: v for k, v in {**QWEN3_MOE, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        spec_from_config(cfg, "cfg.json")
    for w in ["cfg.json", *words]:
        assert w in str(e.value), (w, str(e.value))
