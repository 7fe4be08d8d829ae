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
        ({"sliding_window": 128}, ["sliding_window=128", "not supported"]),
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
