"""The cpu mixture-of-experts MLP: token-expert pairs grouped by expert, one pair of matmuls per active expert."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def grouped_moe(
    x: torch.Tensor,  # [T, H]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K] int64
    gate_up_weights: torch.Tensor,  # [E, 2 * I, H], gate rows first
    down_weights: torch.Tensor,  # [E, H, I]
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear,  # (rows, weight) -> rows @ weight.T
) -> torch.Tensor:  # [T, H]
    """One sort groups the T * K pairs by expert; each active expert then runs once over all its rows.

    The Python loop is over experts (at most E, usually far fewer active for decode), never over tokens, and the
    inputs are gathered and the outputs scattered with one index op each. With the default `linear` results equal
    transformers' loop: the same per-expert F.linear calls on the same rows, and index_add_ adds each token's terms
    in the order of the sorted pairs, ascending expert id, as transformers' loop over the experts does. A backend
    may pass its own GEMM (the cpu backend's bf16 widened to fp32 on CPUs without oneDNN's bf16 GEMM): the same
    products, summed in its order.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = gate_up_weights.shape[0]
    flat_ids = topk_ids.flatten()  # [P], P = T * K pairs, pair p = token p // K
    _, order = torch.sort(flat_ids, stable=True)  # [P] pairs grouped by expert, token order kept within one
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()  # one host read per call, not per expert
    tokens = order // top_k  # [P] token of each grouped pair
    rows = x.index_select(0, tokens)  # [P, H]
    outs = torch.empty_like(rows)  # [P, H]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        gate, up = linear(rows[start:end], gate_up_weights[expert]).chunk(2, dim=-1)  # [n, I] each
        outs[start:end] = linear(F.silu(gate) * up, down_weights[expert])  # [n, H]
        start = end
    weights = topk_weights.flatten().index_select(0, order)[:, None]  # [P, 1] float32
    terms = (outs * weights).to(x.dtype)  # weighted in float32 (x's dtype times float32), rounded once
    return torch.zeros_like(x).index_add_(0, tokens, terms)
