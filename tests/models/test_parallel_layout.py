"""The tensor-parallel layout: which sizes must divide, each rank's spec, and each rank's slice of a tensor."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pllm.models.llama import weight_layout
from pllm.models.parallel_layout import Split, TensorParallelError, check_split, kv_heads_of, rank_spec
from pllm.models.spec import ModelSpec, MoeSpec
from pllm.models.tensor_parallel import SINGLE_RANK, shard_tensor, vocab_embedding

SPEC = ModelSpec(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=400, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
    max_position_embeddings=512, tie_word_embeddings=False, attention_bias=True, torch_dtype="float32",
    bos_token_id=None, eos_token_ids=(0,),
)


@pytest.mark.parametrize("changes, size, named", [
    ({"num_attention_heads": 6, "num_key_value_heads": 6}, 4, ["num_attention_heads=6", "num_key_value_heads=6"]),
    ({"num_key_value_heads": 3, "num_attention_heads": 12}, 4, ["num_key_value_heads=3"]),  # 4 % 3: no replication
    ({"intermediate_size": 130}, 4, ["intermediate_size=130"]),
    ({"vocab_size": 401}, 2, ["vocab_size=401"]),
    ({"moe": MoeSpec(4, 2, 30, True, False, (0, 1))}, 4, ["moe_intermediate_size=30"]),
])
def test_sizes_that_do_not_divide_are_named(changes, size, named):
    with pytest.raises(TensorParallelError) as e:
        check_split(dataclasses.replace(SPEC, **changes), size)
    for name in named:
        assert name in str(e.value)
    assert f"tensor_parallel_size={size}" in str(e.value)


@pytest.mark.parametrize("size", [0, -1, True, 1.5])
def test_size_must_be_a_positive_integer(size):
    with pytest.raises(TensorParallelError, match="positive integer"):
        check_split(SPEC, size)


def test_rank_spec_divides_heads_and_mlp_and_keeps_one_kv_head_at_least():
    two = rank_spec(SPEC, 2)
    assert (two.num_attention_heads, two.num_key_value_heads, two.intermediate_size, two.vocab_size) == (2, 1, 64, 400)
    four = rank_spec(SPEC, 4)  # 2 KV heads over 4 ranks: each replicated on two
    assert (four.num_attention_heads, four.num_key_value_heads) == (1, 1)
    assert [kv_heads_of(SPEC, 4, r) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [kv_heads_of(SPEC, 2, r) for r in range(2)] == [range(0, 1), range(1, 2)]
    assert rank_spec(SPEC, 1) is SPEC


def test_shards_hold_each_ranks_heads_and_rows():
    layout = weight_layout(SPEC)
    assert layout["layers.0.qkv_proj"].split is Split.QKV and layout["layers.0.o_proj"].split is Split.COLUMNS
    assert layout["embed_tokens"].split is Split.VOCAB and layout["norm"].split is Split.REPLICATED
    q, kv, d = SPEC.q_size, SPEC.kv_size, SPEC.head_dim
    qkv = torch.arange((q + 2 * kv) * 3, dtype=torch.float32).view(q + 2 * kv, 3)
    for size in (2, 4):
        for rank in range(size):
            heads = kv_heads_of(SPEC, size, rank)
            part = shard_tensor(qkv, Split.QKV, SPEC, size, rank)
            per_q = q // size
            expected = torch.cat([qkv[rank * per_q:(rank + 1) * per_q],
                                  qkv[q + heads.start * d:q + heads.stop * d],
                                  qkv[q + kv + heads.start * d:q + kv + heads.stop * d]])
            assert torch.equal(part, expected)
    gate_up = torch.arange(2 * 128 * 2, dtype=torch.float32).view(256, 2)
    part = shard_tensor(gate_up, Split.GATE_UP, SPEC, 2, 1)
    assert torch.equal(part, torch.cat([gate_up[64:128], gate_up[192:256]]))
    experts = gate_up.view(2, 128, 2)  # [experts, 2 * inter, hidden]: split on dim -2 per expert
    assert torch.equal(shard_tensor(experts, Split.GATE_UP, SPEC, 2, 0),
                       torch.cat([experts[:, :32], experts[:, 64:96]], dim=1))
    down = torch.arange(64 * 128, dtype=torch.float32).view(64, 128)
    assert torch.equal(shard_tensor(down, Split.COLUMNS, SPEC, 2, 1), down[:, 64:])


class _Ranks:
    """Two ranks in one process: each all_reduce sums the two ranks' tensors, given in turn."""

    def __init__(self, rank: int, other: torch.Tensor | None):
        self.rank, self.world_size, self.other = rank, 2, other

    def all_reduce(self, x):
        return x + self.other

    def all_gather(self, x):
        raise AssertionError("not used")


def test_vocab_embedding_sums_to_the_whole_tables_rows():
    table = torch.randn(400, 8)
    ids = torch.tensor([0, 199, 200, 399, 5])
    local = [vocab_embedding(ids, table[r * 200:(r + 1) * 200], _Ranks(r, torch.zeros(5, 8))) for r in range(2)]
    assert torch.equal(local[0] + local[1], table[ids])
    assert torch.equal(local[0][2:4], torch.zeros(2, 8))  # ids another rank holds: zeros here
    assert torch.equal(vocab_embedding(ids, table, SINGLE_RANK), table[ids])
