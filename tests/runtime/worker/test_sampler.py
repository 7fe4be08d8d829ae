"""Sampler tests: each processor against its direct definition, seeded reproducibility, sampling statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pllm.runtime.engine.request import Request, StopChecker, sample_inputs
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.worker.logprobs import TokenLogprobs
from pllm.runtime.worker.sampler import Sampler, SamplerOutput, greedy_ids, seeded_uniform
from pllm.runtime.worker.step import SampleInputs

VOCAB = 32
EOS = (3,)


def make_request(
    params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None, rid: str = "r"
) -> Request:
    return Request(
        request_id=rid, prompt_token_ids=list(prompt or [1, 2]), params=params, output_token_ids=list(output or [])
    )


def snapshot(requests: list[Request]) -> list[SampleInputs]:
    """Each request as the engine hands it to the sampler at a step."""
    return [sample_inputs(r, StopChecker(frozenset(EOS))) for r in requests]


class EngineSampler(Sampler):
    """The sampler as the engine drives it: given live requests, it samples their snapshots taken now."""

    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...], seed: int | None = None) -> None:
        assert eos_token_ids == EOS  # the engine's StopChecker in snapshot() masks these
        super().__init__(vocab_size, seed=seed)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        return super().sample(logits, snapshot(requests))


def chi2_bound(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square(df) (Wilson-Hilferty; z is the normal 1e-4 upper quantile)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def check_frequencies(tokens: list[int], probs: torch.Tensor) -> None:
    """Tokens of probability 0 never appear; the others pass a chi-square test at the 1e-4 level.

    The generators are seeded, so each run is the same run: the bound makes a correct sampler fail for only
    1 in 10^4 seeds, while a wrong distribution (not renormalised, wrong cut) exceeds it by orders of magnitude.
    """
    num = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"sampled outside the allowed set: {counts[~support]}"
    expected = probs[support].double() * num
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    if df > 0:
        assert stat < chi2_bound(df), f"chi2 {stat:.1f} >= {chi2_bound(df):.1f} (df {df})"


def sample_many(logits_row: torch.Tensor, params: SamplingParams, num: int = 20000) -> list[int]:
    sampler = EngineSampler(logits_row.numel(), EOS, seed=1234)
    requests = [make_request(params, rid=f"r{i}") for i in range(num)]
    return sampler.sample(logits_row.expand(num, -1), requests).token_ids


FIXED_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])


def test_greedy_is_argmax_any_dtype():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, VOCAB, generator=gen)
    sampler = EngineSampler(VOCAB, EOS)
    reqs = [make_request(SamplingParams(temperature=0.0), rid=str(i)) for i in range(64)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dtype)
        assert sampler.sample(x, reqs).token_ids == x.float().argmax(-1).tolist()


def test_empty_batch():
    assert EngineSampler(VOCAB, EOS).sample(torch.zeros(0, VOCAB), []) == SamplerOutput(token_ids=[], logprobs=[])


@settings(max_examples=40, deadline=None)
@given(
    rep=st.floats(0.5, 2.0),
    pres=st.floats(-2.0, 2.0),
    freq=st.floats(-2.0, 2.0),
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10),
    output=st.lists(st.integers(0, VOCAB - 1), max_size=12),
    bias=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100.0, 100.0), max_size=5),
    seed=st.integers(0, 2**16),
)
def test_penalties_and_bias_match_definitions(rep, pres, freq, prompt, output, bias, seed):
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(seed))
    params = SamplingParams(
        repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq, logit_bias=bias or None
    )
    plain = SamplingParams()
    reqs = [make_request(plain, rid="a"), make_request(params, prompt, output, rid="b"), make_request(plain, rid="c")]
    got = EngineSampler(VOCAB, EOS).process_logits(logits, snapshot(reqs))
    # the reference, one token at a time
    want = logits[1].clone()
    for t, v in bias.items():
        want[t] += v
    for t in set(prompt) | set(output):
        want[t] = want[t] / rep if want[t] > 0 else want[t] * rep
    for t in set(output):
        want[t] -= freq * output.count(t) + pres
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])  # other rows untouched


def test_input_logits_not_modified():
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    reqs = [
        make_request(SamplingParams(temperature=0.7, top_k=3, top_p=0.5, min_p=0.1, logit_bias={0: 5.0}), rid="a"),
        make_request(SamplingParams(repetition_penalty=1.3, min_tokens=2, temperature=0.0), output=[1], rid="b"),
    ]
    EngineSampler(VOCAB, EOS).sample(logits, reqs)
    assert torch.equal(logits, before)


def test_min_tokens_blocks_eos_and_stop_ids():
    logits = torch.zeros(4, VOCAB)
    logits[:, EOS[0]] = 50.0
    logits[:, 7] = 40.0  # a stop token id
    logits[:, 9] = 30.0
    sampler = EngineSampler(VOCAB, EOS)

    def req(min_tokens: int, num_out: int, ignore_eos: bool = False) -> Request:
        params = SamplingParams(temperature=0.0, min_tokens=min_tokens, stop_token_ids=[7], ignore_eos=ignore_eos)
        return make_request(params, output=[5] * num_out)

    reqs = [req(3, 2), req(3, 3), req(3, 0, ignore_eos=True), req(0, 0)]
    assert sampler.sample(logits, reqs).token_ids == [9, EOS[0], EOS[0], EOS[0]]
    # blocked tokens stay blocked under a large positive bias, and in random sampling too
    params = SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[7], logit_bias={3: 100.0, 7: 100.0})
    tokens = sampler.sample(logits[:1].expand(500, -1), [make_request(params, rid=str(i)) for i in range(500)])
    assert not {EOS[0], 7} & set(tokens.token_ids)


def run_steps(sampler: Sampler, batch_reqs: list[Request], logits_for, num_steps: int) -> None:
    for _ in range(num_steps):
        logits = torch.stack([logits_for(r) for r in batch_reqs])
        out = sampler.sample(logits, batch_reqs)
        for r, t in zip(batch_reqs, out.token_ids, strict=True):
            r.output_token_ids.append(t)


def test_seeded_requests_reproducible_whatever_the_batch():
    def logits_for(r: Request) -> torch.Tensor:  # a fixed "model": logits depend on the sequence only
        g = torch.Generator().manual_seed(len(r.output_token_ids) * 7919 + sum(r.output_token_ids))
        return torch.randn(VOCAB, generator=g) * 2

    def seeded(rid: str, seed: int) -> Request:
        return make_request(SamplingParams(temperature=0.9, top_p=0.95, seed=seed), rid=rid)

    alone = seeded("x", 42)
    run_steps(EngineSampler(VOCAB, EOS), [alone], logits_for, 20)
    # same seed, different ids, different companions and orders, other sampler seeds
    for order, sampler_seed in ((0, 1), (1, 2), (2, None)):
        target = seeded(f"t{order}", 42)
        others = [seeded("o1", 7), make_request(SamplingParams(temperature=1.0), rid="o2"),
                  make_request(SamplingParams(temperature=0.0), rid="o3"), seeded("o4", 42 + order)]
        batch = others[:order] + [target] + others[order:]
        sampler = EngineSampler(VOCAB, EOS, seed=sampler_seed)
        run_steps(sampler, batch, logits_for, 20)
        assert target.output_token_ids == alone.output_token_ids
    # a seeded draw is keyed by the output index alone: a new request under the same id and seed repeats it
    sampler = EngineSampler(VOCAB, EOS)
    first = seeded("same", 42)
    run_steps(sampler, [first], logits_for, 5)
    second = seeded("same", 42)
    run_steps(sampler, [second], logits_for, 5)
    assert first.output_token_ids == second.output_token_ids == alone.output_token_ids[:5]


def test_seeded_uniform_is_a_function_of_seed_and_index():
    draws = [[seeded_uniform(seed, i) for i in range(2000)] for seed in (0, 1, -1, 2**63 - 1, -(2**63))]
    assert draws[0] == [seeded_uniform(0, i) for i in range(2000)]
    for row in draws:
        assert all(0.0 <= u < 1.0 and u * 2**24 == int(u * 2**24) for u in row)  # on float32's grid below 1
        assert len(set(row)) > 1990  # no short cycle
        assert abs(sum(row) / len(row) - 0.5) < 4.5 * math.sqrt(1 / 12 / len(row))  # 4.5 sigma
    assert len({tuple(row[:8]) for row in draws}) == len(draws)  # each seed its own stream


def test_unseeded_sampler_seed_is_deterministic():
    logits = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(3))
    reqs = [make_request(SamplingParams(), rid=str(i)) for i in range(16)]
    first, second = EngineSampler(VOCAB, EOS, seed=5), EngineSampler(VOCAB, EOS, seed=5)
    assert first.sample(logits, reqs) == second.sample(logits, reqs)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.7])
def test_temperature_statistics(temperature):
    tokens = sample_many(FIXED_LOGITS, SamplingParams(temperature=temperature))
    check_frequencies(tokens, torch.softmax(FIXED_LOGITS / temperature, -1))


@pytest.mark.parametrize("top_k", [1, 3, 5])
def test_top_k_statistics(top_k):
    tokens = sample_many(FIXED_LOGITS, SamplingParams(top_k=top_k))
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[FIXED_LOGITS.topk(top_k).indices] = True
    check_frequencies(tokens, torch.softmax(FIXED_LOGITS.masked_fill(~allowed, -torch.inf), -1))


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_statistics(top_p):
    probs = torch.softmax(FIXED_LOGITS, -1)  # sorted already: [0.35, 0.21, 0.13, 0.08, ...]
    num_kept = int((torch.cumsum(probs, 0) < top_p).sum()) + 1  # smallest prefix whose mass reaches top_p
    want = torch.zeros(8)
    want[:num_kept] = probs[:num_kept] / probs[:num_kept].sum()
    check_frequencies(sample_many(FIXED_LOGITS, SamplingParams(top_p=top_p)), want)


@pytest.mark.parametrize("min_p", [0.1, 0.3, 0.7])
def test_min_p_statistics(min_p):
    probs = torch.softmax(FIXED_LOGITS, -1)
    want = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    check_frequencies(sample_many(FIXED_LOGITS, SamplingParams(min_p=min_p)), want / want.sum())


def test_combined_statistics_with_seeded_rows():
    # min_p, then top_k, then top_p, at temperature 0.8; every row seeded differently (per-row generators)
    params = [SamplingParams(temperature=0.8, min_p=0.05, top_k=6, top_p=0.8, seed=i) for i in range(3000)]
    sampler = EngineSampler(8, EOS)
    reqs = [make_request(p, rid=str(i)) for i, p in enumerate(params)]
    tokens = sampler.sample(FIXED_LOGITS.expand(len(reqs), -1), reqs).token_ids
    probs = torch.softmax(FIXED_LOGITS / 0.8, -1)
    probs = torch.where(probs >= 0.05 * probs.max(), probs, 0.0)
    probs[6:] = 0.0
    probs = probs / probs.sum()
    num_kept = int((torch.cumsum(probs, 0) < 0.8).sum()) + 1
    probs[num_kept:] = 0.0
    check_frequencies(tokens, probs / probs.sum())


def test_logprobs_from_raw_logits():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(11))
    reqs = [
        make_request(SamplingParams(temperature=0.0, logprobs=5, logit_bias={0: 50.0}), rid="a"),
        make_request(SamplingParams(temperature=0.5, logprobs=0), rid="b"),
        make_request(SamplingParams(temperature=0.0), rid="c"),
        make_request(SamplingParams(temperature=1.0, logprobs=20, repetition_penalty=1.5), output=[4], rid="d"),
    ]
    out = EngineSampler(VOCAB, EOS, seed=0).sample(logits, reqs)
    raw = torch.log_softmax(logits, -1)
    assert out.token_ids[0] == 0  # the bias decides the token, but the logprobs stay raw
    assert out.logprobs[2] is None
    for i, k in ((0, 5), (1, 0), (3, 20)):
        lp = out.logprobs[i]
        assert isinstance(lp, TokenLogprobs) and lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(float(raw[i, lp.token_id]), abs=1e-6)
        assert lp.rank == int((raw[i] >= raw[i, lp.token_id]).sum())  # its place in the whole vocabulary
        assert len(lp.top) == k
        values, ids = raw[i].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)


def test_logprob_rank_counts_ties_as_vllm():
    """The sampled token's rank is the count of logprobs >= its own (vLLM's batched_count_greater_than): a token
    tied with others ranks after all of them, and one the bias forced from low down keeps its true rank."""
    logits = torch.zeros(2, VOCAB)
    logits[0, :3] = 2.0  # three tokens tie for best
    logits[1] = torch.arange(VOCAB, dtype=torch.float32)  # token t ranks VOCAB - t
    reqs = [
        make_request(SamplingParams(temperature=0.0, logprobs=1, logit_bias={1: 0.5}), rid="tie"),
        make_request(SamplingParams(temperature=0.0, logprobs=2, logit_bias={5: 100.0}), rid="low"),
    ]
    out = EngineSampler(VOCAB, EOS, seed=0).sample(logits, reqs)
    assert out.token_ids == [1, 5]
    assert out.logprobs[0].rank == 3  # tied with tokens 0 and 2: all three are >= it
    assert out.logprobs[1].rank == VOCAB - 5 and [t for t, _ in out.logprobs[1].top] == [VOCAB - 1, VOCAB - 2]


def reference_support(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The tokens a row may draw, by the definitions with a full sort: min_p, then top_k, then top_p."""
    probs = torch.softmax(logits.double() / p.temperature, -1)
    keep = probs >= p.min_p * probs.max()
    if 0 < p.top_k < probs.numel():
        keep &= probs >= probs.topk(p.top_k).values[-1]
    if p.top_p < 1.0:
        kept = torch.where(keep, probs, 0.0)
        kept = kept / kept.sum()
        sorted_probs, order = kept.sort(descending=True)
        drop = (sorted_probs.cumsum(0) - sorted_probs) >= p.top_p
        keep[order[drop]] = False
    return keep


@settings(max_examples=30, deadline=None)
@given(
    vocab=st.sampled_from([8, 300, 5000]),
    seed=st.integers(0, 2**16),
    rows=st.lists(
        st.tuples(
            st.sampled_from([0.3, 1.0, 2.0]),
            st.sampled_from([0, -1, 1, 5, 100, 1000]),
            st.sampled_from([1.0, 0.5, 0.9, 0.99]),
            st.sampled_from([0.0, 0.01, 0.2]),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_cuts_match_sort_based_definitions(vocab, seed, rows):
    # a flat-ish distribution over 5000 tokens makes top_p widen past its first 256 candidates
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(seed)) * 1.5
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in rows]
    probs = EngineSampler(vocab, EOS)._probs(logits.clone(), params)
    for i, p in enumerate(params):
        assert torch.equal(probs[i] > 0, reference_support(logits[i], p)), p


def test_degenerate_but_valid_params_never_crash():
    """Values a client may send that once overflowed float32: a top_p near 0, a temperature near 0."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(7))
    reqs = [
        make_request(SamplingParams(temperature=1.0, top_p=5e-324), rid="a"),
        make_request(SamplingParams(temperature=5e-324), rid="b"),
        make_request(SamplingParams(temperature=1.0, repetition_penalty=0.01), output=[1, 2], rid="c"),
    ]
    out = EngineSampler(VOCAB, EOS, seed=0).sample(logits, reqs)
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[1] == int(logits[1].argmax())
    assert 0 <= out.token_ids[2] < VOCAB
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1e-300)


def _bitmask(allowed: set[int], vocab: int) -> torch.Tensor:
    """[ceil(vocab / 32)] int32 with bit t set for each allowed token t (xgrammar's layout)."""
    words = [0] * ((vocab + 31) // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def _grammar_rows(device: str) -> tuple[torch.Tensor, list[SampleInputs], torch.Tensor]:
    vocab = 70  # not a multiple of 32: the last bitmask word is partial
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)).to(device)
    allowed = [{5, 33, 69}, None, {0}, None]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1)] * 2
    requests = [
        SampleInputs(0, p, (), (), frozenset(), _bitmask(a, vocab) if a is not None else None)
        for i, (p, a) in enumerate(zip(params, allowed))
    ]
    expected = logits.float().cpu().clone()
    for i, a in enumerate(allowed):
        if a is not None:
            expected[i, [t for t in range(vocab) if t not in a]] = -torch.inf
    return logits, requests, expected


def test_grammar_bitmask_masks_only_its_rows_in_one_batch():
    logits, requests, expected = _grammar_rows("cpu")
    sampler = Sampler(70, seed=0)
    processed = sampler.process_logits(logits, requests)
    assert torch.equal(processed, expected)  # constrained rows masked, free rows untouched
    assert not torch.isinf(logits).any()  # the caller's logits are never written
    for _ in range(20):
        tokens = sampler.sample(logits, requests).token_ids
        assert tokens[0] in {5, 33, 69} and tokens[2] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grammar_bitmask_on_the_gpu():
    logits, requests, expected = _grammar_rows("cuda")
    processed = Sampler(70, seed=0).process_logits(logits, requests)  # xgrammar's Triton kernel
    assert processed.is_cuda and torch.equal(processed.cpu(), expected)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_greedy_ids_is_torch_argmax(num_rows, vocab, seed, with_nan):
    """Each row's first maximum, a NaN counting as the largest (even beside +inf): what torch's argmax picks, ties
    included (values drawn from a few integers, so rows tie often), for float32 (NumPy's path) and bfloat16
    (torch's); row 0 all -inf, row 1 with +inf where there is room."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (num_rows, vocab), generator=gen).float()
    logits[0] = -math.inf
    if vocab > 1:
        logits[1, int(torch.randint(0, vocab, (1,), generator=gen))] = math.inf
    if with_nan:
        logits.view(-1)[int(torch.randint(0, num_rows * vocab, (1,), generator=gen))] = float("nan")
    for x in (logits, logits.bfloat16()):
        got = greedy_ids(x)
        assert got.dtype == torch.int64 and got.tolist() == x.argmax(dim=-1).tolist()


def test_greedy_ids_of_wide_rows_and_one_row():
    """Rows as wide as a real vocabulary (NumPy's vector loop, not its tail), ties and a NaN placed past the first
    vector; a 1-D row gives a 0-d index, as torch's argmax does."""
    logits = torch.zeros(3, 49152)
    logits[0, 30000] = logits[0, 40000] = 2.0
    logits[1, 100] = 1.0
    logits[1, 45000] = float("nan")
    logits[2, 49151] = 0.5
    assert greedy_ids(logits).tolist() == logits.argmax(dim=-1).tolist() == [30000, 45000, 49151]
    one = greedy_ids(logits[0])
    assert one.dim() == 0 and one.item() == 30000
