"""Mixture-of-experts MLP on the llama wiring: config keys, stacked expert weights, routing, the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from pllm.models.config import ConfigError, positive
from pllm.models.family import RuntimeTensor
from pllm.models.llama import LayerWeights, LlamaModel
from pllm.models.ops import Ops
from pllm.models.parallel_layout import Split
from pllm.models.spec import ModelSpec, MoeSpec


@dataclass(frozen=True)
class ExpertNames:
    """Where a family's checkpoint keeps the sparse block of `model.layers.N.`: mixtral and qwen3_moe differ."""

    block: str  # the sparse block's module: "block_sparse_moe" (mixtral) or "mlp" (qwen3_moe)
    gate: str  # one expert's gate, up and down projections: w1, w3, w2 (mixtral); gate_proj, up_proj, down_proj
    up: str
    down: str


def read_top_k(config: dict, num_experts: int, source: str) -> int:
    top_k = positive(config, "num_experts_per_tok", source)
    if top_k > num_experts:
        raise ConfigError(f"{source}: key 'num_experts_per_tok' is {top_k}, more than the {num_experts} experts")
    return top_k


def moe_weight_layout(
    spec: ModelSpec, dense_layout: Callable[[ModelSpec], dict[str, RuntimeTensor]], names: ExpertNames
) -> dict[str, RuntimeTensor]:
    """The dense family's layout with each sparse layer's MLP replaced by its router and stacked experts."""
    moe = spec.moe
    assert moe is not None
    layout = dense_layout(spec)
    h, inter, num_experts = spec.hidden_size, moe.moe_intermediate_size, moe.num_experts
    for i in moe.sparse_layers:
        rt, block = f"layers.{i}.", f"model.layers.{i}.{names.block}."
        del layout[rt + "gate_up_proj"], layout[rt + "down_proj"]
        experts = [f"{block}experts.{e}." for e in range(num_experts)]
        layout[rt + "router"] = RuntimeTensor((block + "gate.weight",), (num_experts, h))
        gate_up = tuple(n for e in experts for n in (f"{e}{names.gate}.weight", f"{e}{names.up}.weight"))
        layout[rt + "experts_gate_up"] = RuntimeTensor(gate_up, (num_experts, 2 * inter, h), num_stacked=num_experts,
                                                        split=Split.GATE_UP)
        down = tuple(f"{e}{names.down}.weight" for e in experts)
        layout[rt + "experts_down"] = RuntimeTensor(down, (num_experts, h, inter), num_stacked=num_experts,
                                                     split=Split.COLUMNS)
    return layout


def route(
    router_logits: torch.Tensor,  # [num_tokens, num_experts]
    moe: MoeSpec,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [num_tokens, top_k] float32, expert ids [num_tokens, top_k] int64
    """transformers' router: softmax over the experts in float32, top-k, renormalised where the family does."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, moe.num_experts_per_tok, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if moe.round_router_weights:  # qwen3_moe weights the experts in the model dtype
        weights = weights.to(dtype).float()
    return weights, expert_ids


@dataclass(frozen=True)
class MoeLayerWeights(LayerWeights):
    """A decoder layer whose MLP may be the sparse block: then gate_up and down are None and these are set."""

    router: torch.Tensor | None = None  # [num_experts, hidden]
    experts_gate_up: torch.Tensor | None = None  # [num_experts, 2 * moe_intermediate, hidden], gate rows first
    experts_down: torch.Tensor | None = None  # [num_experts, hidden, moe_intermediate]

    @classmethod
    def from_tensors(cls, weights: dict[str, torch.Tensor], spec: ModelSpec, i: int) -> MoeLayerWeights:
        dense = LayerWeights.from_tensors(weights, spec, i)
        p = f"layers.{i}."
        return cls(
            **{f.name: getattr(dense, f.name) for f in fields(dense)},
            router=weights.get(p + "router"),
            experts_gate_up=weights.get(p + "experts_gate_up"),
            experts_down=weights.get(p + "experts_down"),
        )


class MoeModel(LlamaModel):
    """The llama forward pass; the layers spec.moe names route each token to its top-k experts."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], ops: Ops, max_positions: int):
        super().__init__(spec, weights, ops, max_positions)
        self.layers = [MoeLayerWeights.from_tensors(weights, spec, i) for i in range(spec.num_hidden_layers)]

    def feed_forward(self, layer: MoeLayerWeights, h: torch.Tensor) -> torch.Tensor:
        if layer.router is None:
            return super().feed_forward(layer, h)
        router_logits = self.ops.linear(h, layer.router)  # [num_tokens, num_experts]
        weights, expert_ids = route(router_logits, self.spec.moe, h.dtype)
        return self.ops.moe(h, weights, expert_ids, layer.experts_gate_up, layer.experts_down)
