"""Sampler: per-request logits processing (bias, min_tokens, penalties, grammar, top-k/p, min-p) and token choice."""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.worker.logprobs import TokenLogprobs, gather_logprobs, raw_logprobs_of, row_index
from pllm.runtime.worker.step import SampleInputs


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """[num_rows] int64: each row's argmax, the first where tied, a NaN counting as the largest (torch's rules, and
    NumPy's). float32 on the CPU goes through NumPy: torch's CPU argmax reduces about one element a nanosecond (55 us
    for a 49152-token row on a 2-core AVX2 VM, 450 us for 16 rows), NumPy's about ten times faster."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(np.asarray(np.argmax(logits.numpy(), axis=-1)))
    return logits.argmax(dim=-1)


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # [num_seqs], one per request in the order given
    logprobs: list[TokenLogprobs | None]  # [num_seqs]; None where params.logprobs is None


def _uses_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _uses_top_k(p: SamplingParams, vocab_size: int) -> bool:
    return 0 < p.top_k < vocab_size


def _kth_kept(
    values: torch.Tensor, mass: torch.Tensor, total: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The last value kept by top_p, given values sorted descending and their normalised running mass."""
    # [num_rows, num_candidates] x2, [num_rows, 1] x2 -> [num_rows, 1]
    # keep a token while the tokens ranked above it hold less than top_p: always keeps the first
    num_kept = ((mass - values / total) < top_p).sum(dim=-1, keepdim=True)
    return values.gather(1, (num_kept - 1).clamp(0, values.shape[1] - 1))  # a top_p of ~0 keeps the top token


def _top_p_cut(values: torch.Tensor, threshold: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_p's threshold when `values` (sorted descending) hold every token surviving `threshold`."""
    values = values.masked_fill(values < threshold, 0.0)  # [num_rows, num_candidates]
    total = values.sum(dim=-1, keepdim=True)
    kth = _kth_kept(values, values.cumsum(dim=-1) / total, total, top_p)
    return torch.maximum(threshold, kth)


def apply_grammar_masks(logits: torch.Tensor, requests: Sequence[SampleInputs], rows: list[int]) -> None:
    """Structured output: set to -inf, in place, every token the grammar of a constrained row forbids, for the whole
    batch at once; unconstrained rows are left alone. The path is chosen by the logits' device."""
    bitmask = torch.stack([requests[i].token_bitmask for i in rows])  # [num_rows, ceil(vocab_size / 32)] int32
    _BITMASK_APPLIERS.get(logits.device.type, _mask_with_xgrammar)(logits, bitmask, rows)


def _mask_on_cpu(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    # numpy unpacks the bits and one masked_fill applies them: ~0.6 ms for 32 rows of a 49,152-token vocabulary
    # whatever the mask, where xgrammar's CPU kernel took 0.1 ms for mostly open masks but 5 ms for mostly closed
    # ones (the structural positions of JSON), measured on this project's 2-core VM
    vocab_size = logits.shape[1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")  # [num_rows, words * 32]
    blocked = torch.from_numpy(bits[:, :vocab_size].view(np.bool_)).logical_not()  # [num_rows, vocab_size]
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(blocked, -torch.inf)
    else:
        index = torch.tensor(rows)
        logits[index] = logits[index].masked_fill_(blocked, -torch.inf)


def _mask_with_xgrammar(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    import xgrammar as xgr  # only a step holding a constrained request gets here

    # xgrammar reads bitmask row i for logits row i: a full-batch bitmask, its free rows skipped through indices
    full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)  # [num_seqs, words]
    full[rows] = bitmask
    backend = "triton" if logits.device.type == "cuda" else "torch_native"  # its Triton kernel on a GPU
    xgr.apply_token_bitmask_inplace(logits, full.to(logits.device, non_blocking=True), vocab_size=logits.shape[1],
                                    indices=rows, backend=backend)


# the logits' device type -> how the grammar masks reach them; any other device takes xgrammar's portable path
_BITMASK_APPLIERS = {"cpu": _mask_on_cpu, "cuda": _mask_with_xgrammar}


class Sampler:
    """Turns one step's logits into one token per request.

    Order (vLLM v1's): logit_bias, penalties, min_tokens mask, the grammar's mask (structured output), then for
    greedy rows argmax; for the others temperature, min_p, top_k, top_p, and a draw. Logprobs are taken from the raw
    logits, before any of this (vLLM v1's default "raw_logprobs"), so they describe the model, not the sampling.

    A request with a seed draws its token at output index i from seeded_uniform(seed, i), a function of the two
    alone: its tokens do not depend on what else is in the batch, nor on how many draws came before (a verify step
    samples several positions of one sequence at once). Requests without a seed share one sampler-level generator
    (seeded by `seed` when given).
    """

    def __init__(self, vocab_size: int, seed: int | None = None) -> None:
        self.vocab_size = vocab_size
        self._seed = seed
        self._shared_generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, requests: Sequence[SampleInputs]) -> SamplerOutput:
        num_seqs = len(requests)
        assert logits.dim() == 2 and tuple(logits.shape) == (num_seqs, self.vocab_size), (
            f"logits {tuple(logits.shape)} for {num_seqs} requests and vocab {self.vocab_size}"
        )
        if num_seqs == 0:
            return SamplerOutput(token_ids=[], logprobs=[])
        raw_logprobs = raw_logprobs_of(logits, requests)  # before anything below changes the logits
        logits = self.process_logits(logits, requests)  # [num_seqs, vocab_size] float32
        token_ids = self._choose(logits, requests)  # [num_seqs]
        logprobs = gather_logprobs(raw_logprobs, requests, token_ids)
        return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)

    # -- logits processing -------------------------------------------------------------------------------

    def process_logits(self, logits: torch.Tensor, requests: Sequence[SampleInputs]) -> torch.Tensor:
        """logit_bias, penalties and the min_tokens mask, in float32; the input is never written."""
        bias_rows: list[int] = []
        bias_cols: list[int] = []
        bias_values: list[float] = []
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        penalty_rows: list[int] = []
        grammar_rows: list[int] = []
        for i, req in enumerate(requests):
            p = req.params
            if p.logit_bias:
                bias_rows.extend([i] * len(p.logit_bias))
                bias_cols.extend(p.logit_bias.keys())
                bias_values.extend(p.logit_bias.values())
            blocked = req.masked_token_ids
            if blocked:
                mask_rows.extend([i] * len(blocked))
                mask_cols.extend(blocked)
            if _uses_penalties(p):
                penalty_rows.append(i)
            if req.token_bitmask is not None:
                grammar_rows.append(i)
        if not (bias_rows or mask_rows or penalty_rows or grammar_rows):
            return logits.float()  # a view when already float32: nothing below writes into it
        logits = logits.to(torch.float32, copy=True)  # [num_seqs, vocab_size]; never write the caller's
        device = logits.device
        if bias_rows:
            index = (torch.tensor(bias_rows, device=device), torch.tensor(bias_cols, device=device))
            logits.index_put_(index, torch.tensor(bias_values, device=device), accumulate=True)
        if penalty_rows:
            self._apply_penalties(logits, requests, penalty_rows)
        if mask_rows:
            # last, so no penalty or bias can lift a blocked token back
            index = (torch.tensor(mask_rows, device=device), torch.tensor(mask_cols, device=device))
            logits[index] = -torch.inf
        if grammar_rows:
            apply_grammar_masks(logits, requests, grammar_rows)
        return logits

    def _apply_penalties(self, logits: torch.Tensor, requests: Sequence[SampleInputs], rows: list[int]) -> None:
        """Repetition (HF/vLLM, over prompt + output) and presence/frequency (OpenAI, over output), in place.

        Sparse: only the (row, token) pairs that occur are touched, so the cost follows the number of
        distinct tokens seen, not num_seqs * vocab_size.
        """
        device = logits.device
        flat = logits.view(-1)  # [num_seqs * vocab_size]; logits is our own contiguous copy
        seen_keys: list[int] = []  # row * vocab_size + token, once per distinct token
        seen_factors: list[float] = []
        out_keys: list[int] = []
        out_shifts: list[float] = []  # frequency_penalty * count + presence_penalty
        for i in rows:
            req = requests[i]
            p = req.params
            base = i * self.vocab_size
            if p.repetition_penalty != 1.0:
                seen = set(req.prompt_token_ids).union(req.output_token_ids)
                seen_keys.extend(base + t for t in seen)
                seen_factors.extend([p.repetition_penalty] * len(seen))
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                for t, count in Counter(req.output_token_ids).items():
                    out_keys.append(base + t)
                    out_shifts.append(p.frequency_penalty * count + p.presence_penalty)
        if seen_keys:
            keys = torch.tensor(seen_keys, dtype=torch.long, device=device)  # [num_seen]
            factor = torch.tensor(seen_factors, device=device)
            values = flat[keys]
            flat[keys] = torch.where(values > 0, values / factor, values * factor)
        if out_keys:
            keys = torch.tensor(out_keys, dtype=torch.long, device=device)  # [num_distinct_out]
            flat[keys] -= torch.tensor(out_shifts, device=device)

    # -- choosing ----------------------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, requests: Sequence[SampleInputs]) -> torch.Tensor:
        device = logits.device
        greedy_rows = [i for i, r in enumerate(requests) if r.params.greedy]
        if len(greedy_rows) == len(requests):
            return greedy_ids(logits)  # [num_seqs]
        token_ids = torch.empty(len(requests), dtype=torch.long, device=device)  # [num_seqs]
        if greedy_rows:
            g = torch.tensor(greedy_rows, device=device)
            token_ids[g] = greedy_ids(logits[g])
        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        random_reqs = [requests[i] for i in random_rows]
        if greedy_rows:
            r = torch.tensor(random_rows, device=device)
            logits = logits[r]  # [num_random, vocab_size]
        probs = self._probs(logits, [q.params for q in random_reqs])  # [num_random, vocab_size], unnormalised
        sampled = self._draw(probs, random_reqs)  # [num_random]
        if not greedy_rows:
            return sampled
        token_ids[r] = sampled
        return token_ids

    def _probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """softmax(logits / temperature) with tokens below the min_p, top_k and top_p cuts set to 0.

        Each cut is a probability threshold per row, and a token survives when it reaches all of them, so
        one masking pass applies the three (ties at a cut are kept, as vLLM's top_k keeps them). The result
        is left unnormalised: the draw scales by its row sum. This avoids a full sort of the vocabulary,
        which on a CPU costs more than everything else here together.
        """
        device = logits.device
        num_rows = logits.shape[0]
        temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
        probs = torch.softmax(logits / temperature, dim=-1)  # [num_rows, vocab_size]
        threshold = torch.zeros(num_rows, 1, device=device)  # [num_rows, 1]
        uses_min_p = any(p.min_p > 0.0 for p in params)
        if uses_min_p:
            min_p = torch.tensor([p.min_p for p in params], device=device).unsqueeze(1)
            threshold = min_p * probs.amax(dim=-1, keepdim=True)  # relative to the most likely token
        top_k_rows = [j for j, p in enumerate(params) if _uses_top_k(p, self.vocab_size)]
        if top_k_rows:
            rows = row_index(top_k_rows, num_rows, device)
            top_k = torch.tensor([params[j].top_k for j in top_k_rows], device=device).unsqueeze(1)
            values = probs[rows].topk(int(top_k.max()), dim=-1).values  # [num_top_k, max_top_k]
            threshold[rows] = torch.maximum(threshold[rows], values.gather(1, top_k - 1))
        top_p_rows = [j for j, p in enumerate(params) if p.top_p < 1.0]
        if top_p_rows:
            rows = row_index(top_p_rows, num_rows, device)
            top_p = torch.tensor([params[j].top_p for j in top_p_rows], device=device).unsqueeze(1)
            if top_p_rows == top_k_rows:  # the top-k values already hold every survivor, sorted
                threshold[rows] = _top_p_cut(values, threshold[rows], top_p)
            else:
                cut = uses_min_p or bool(top_k_rows)
                threshold[rows] = self._top_p_threshold(probs[rows], threshold[rows], top_p, cut)
        if uses_min_p or top_k_rows or top_p_rows:
            probs = probs.masked_fill_(probs < threshold, 0.0)
        return probs

    def _top_p_threshold(
        self, probs: torch.Tensor, threshold: torch.Tensor, top_p: torch.Tensor, cut: bool
    ) -> torch.Tensor:
        """The probability of the last token in the smallest most-likely set holding top_p of the mass left
        after the earlier cuts (`threshold`, when `cut`). Looks at the top 256 tokens first and widens only
        the rows whose set is larger: a peaked distribution never pays for a sort of the whole vocabulary."""
        # [num_rows, vocab_size], [num_rows, 1], [num_rows, 1] -> [num_rows, 1]
        num_rows = probs.shape[0]
        if cut:
            total = torch.where(probs >= threshold, probs, 0.0).sum(dim=-1, keepdim=True)  # [num_rows, 1]
        else:
            total = probs.sum(dim=-1, keepdim=True)  # ~1, but summed the way the cumsum below sums
        out = threshold.clone()
        pending = torch.arange(num_rows, device=probs.device)
        num_candidates = 256
        while pending.numel():
            num_candidates = min(num_candidates, self.vocab_size)
            rows = pending if pending.numel() < num_rows else slice(None)
            values = probs[rows].topk(num_candidates, dim=-1).values  # [num_pending, num_candidates]
            if cut:
                values = values.masked_fill(values < threshold[rows], 0.0)
            mass = values.cumsum(dim=-1) / total[rows]  # [num_pending, num_candidates]
            done = ((mass[:, -1:] >= top_p[rows]) | (num_candidates == self.vocab_size)).squeeze(1)
            kth = _kth_kept(values, mass, total[rows], top_p[rows])  # [num_pending, 1]
            out[pending[done]] = torch.maximum(threshold[pending[done]], kth[done])
            pending = pending[~done]
            num_candidates *= 8
        return out

    def _draw(self, probs: torch.Tensor, requests: Sequence[SampleInputs]) -> torch.Tensor:
        """Inverse-CDF sampling: one uniform draw per row, scaled by the row's mass, found in its cumsum.

        A seeded row's uniform is seeded_uniform(seed, draw_index), so its token does not depend on other rows.
        """
        device = probs.device
        uniform = torch.empty(len(requests), 1, device=device)  # [num_rows, 1]
        seeded_rows = [j for j, req in enumerate(requests) if req.params.seed is not None]
        shared_rows = [j for j, req in enumerate(requests) if req.params.seed is None]
        if seeded_rows:  # computed on the host, moved in one copy (none at all for a step without seeds)
            values = [seeded_uniform(requests[j].params.seed, requests[j].draw_index) for j in seeded_rows]
            uniform[seeded_rows] = torch.tensor(values).unsqueeze(1).to(device)
        if shared_rows:
            uniform[shared_rows] = torch.rand(len(shared_rows), 1, generator=self._shared_generator(device),
                                              device=device)
        cdf = probs.cumsum_(dim=-1)  # [num_rows, vocab_size]; probs is ours and not needed after this
        # the first index whose cdf exceeds u: a token of probability 0 adds nothing to the cdf, so never wins
        token_ids = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(1)  # [num_rows]
        overflow = token_ids >= self.vocab_size  # u * mass rounded up to the mass: take the last live token
        if bool(overflow.any()):
            live = cdf[overflow] < cdf[overflow][:, -1:]  # [num_overflow, vocab_size]: before the last step
            token_ids[overflow] = live.sum(dim=-1)
        return token_ids

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._shared_generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._shared_generators[device] = gen
        return gen


def seeded_uniform(seed: int, draw_index: int) -> float:
    """A uniform in [0, 1) on float32's grid of 2^-24, a function of (seed, draw_index) alone: a counter-based
    stream (BLAKE2b over the pair), so a seeded request's i-th token comes from the same draw however many tokens
    each step samples for it, and on any device or torch version."""
    digest = hashlib.blake2b(struct.pack("<qQ", seed, draw_index), digest_size=8, person=b"pllm.draw").digest()
    return (int.from_bytes(digest, "little") >> 40) * 2.0**-24
