"""ModelFamily: what the compiler and the runner need to know of one model_type, in one frozen definition."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from pllm.models.ops import AttentionMetadata, Ops
from pllm.models.parallel_layout import Split
from pllm.models.spec import ModelSpec


@dataclass(frozen=True)
class RuntimeTensor:
    """One tensor of the build's weights file: Hugging Face tensors concatenated along dim 0, and its shape.

    With num_stacked > 1 (experts), hf_names is that many equal groups in order: each group is concatenated along
    dim 0 into shape[1:], and the groups are stacked along a new dim 0 of size num_stacked.
    """

    hf_names: tuple[str, ...]
    shape: tuple[int, ...]
    num_stacked: int = 1
    split: Split = Split.REPLICATED  # how a tensor-parallel build divides it among ranks (models/tensor_parallel.py)


class CausalLM(Protocol):
    """A family's forward pass over the weights of a build; the runner owns the device, the model only the math."""

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        metas: Sequence[AttentionMetadata],  # [num_layers]: each layer's KV group's (models.kv_groups)
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v) [num_blocks, block_size, kv, d]
    ) -> torch.Tensor:  # [num_tokens, hidden_size], after the final norm
        """Every entry of metas has the same positions and lengths; a layer's entry holds the slot mapping and
        block tables of its group's pool, the one kv_caches[layer] is part of."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_seqs, hidden_size] -> [num_seqs, vocab_size] float32."""
        ...


LM_HEAD = "lm_head"  # the runtime name of an LM head stored apart from the embedding


def lm_head_weight(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LM head: the build's own `lm_head` (an untied model's, or a quantised build's packed copy of a tied
    embedding, the tie broken in storage only: compiler/lm_head.py), else the tied embedding itself."""
    if LM_HEAD in weights or not spec.tie_word_embeddings:
        return weights[LM_HEAD]
    return weights["embed_tokens"]


@dataclass(frozen=True)
class ModelFamily:
    model_type: str  # config.json's model_type, the registry's key
    # config dict and its file name (for errors) -> validated ModelSpec; raises models.config.ConfigError
    spec_from_config: Callable[[dict, str], ModelSpec]
    # runtime tensor name -> where it comes from in the checkpoint
    weight_layout: Callable[[ModelSpec], dict[str, RuntimeTensor]]
    # (spec, runtime tensors on the device, ops, max_positions) -> the model
    model: Callable[[ModelSpec, dict[str, torch.Tensor], Ops, int], CausalLM]
    # An HF tensor name of decoder layer N (group 1 is N), to count the checkpoint's layers against the config
    # before anything is sized by it.
    hf_layer_pattern: re.Pattern[str]
    hf_embedding: str  # the HF token embedding, [vocab_size, hidden_size]
    # the layout's splits are set and the model calls its communicator (model.comm): it can run tensor-parallel
    tensor_parallel: bool = False
