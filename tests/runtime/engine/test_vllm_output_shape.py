"""The offline outputs a vLLM user's code reads, in vLLM's shape: per-position dict[int, Logprob] (the sampled or
prompt token first with its vocabulary rank, then the top-k ranked 1..k, each token's text), prompt_logprobs[0]
None, and embed() returning EmbeddingRequestOutput. Ranks and values are checked against transformers."""

import pytest
import torch
import transformers

import pllm
from pllm import SamplingParams
from pllm.runtime.engine.outputs import EmbeddingRequestOutput, Logprob

TOL = 1e-4  # fp32 on both sides, as in test_prompt_logprobs.py
PROMPT = "Paged attention keeps the KV cache in fixed-size blocks"


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir("llama")), dtype=torch.float32)


def reference_rows(hf, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] transformers' log_softmax at each position (row i predicts token i + 1)."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_position(position, token: int, k: int, row: torch.Tensor, tokenizer) -> None:
    """One position's dict against transformers' row: vLLM's order, ranks, values and texts."""
    assert isinstance(position, dict) and all(isinstance(v, Logprob) for v in position.values())
    items = list(position.items())
    assert items[0][0] == token  # the sampled (or prompt) token first
    values, top_ids = row.topk(k)
    if token in top_ids.tolist():
        assert len(items) == k and sorted(lp.rank for lp in position.values()) == list(range(1, k + 1))
    else:  # not among the best: present anyway, with its true rank past them, and the best follow in order
        assert len(items) == k + 1 and items[0][1].rank > k
        assert [t for t, _ in items[1:]] == top_ids.tolist() and [lp.rank for _, lp in items[1:]] == list(
            range(1, k + 1))
    best = sorted((lp.rank, t, lp.logprob) for t, lp in items if lp.rank <= k)
    assert [t for _, t, _ in best] == top_ids.tolist()
    assert torch.allclose(torch.tensor([v for _, _, v in best]), values, atol=TOL, rtol=0)
    want = row[token].item()
    assert abs(position[token].logprob - want) < TOL
    # rank: 1 + the vocabulary's logprobs above it (ties count, as vLLM's >=), transformers' within the tolerance
    assert int((row > want + TOL).sum()) < position[token].rank <= int((row >= want - TOL).sum())
    for t, lp in items:
        assert lp.decoded_token == tokenizer.decode([t])  # the one token alone as text


@pytest.mark.parametrize("settings", [
    dict(temperature=0.0, logprobs=3),  # greedy: the sampled token is the best, rank 1, listed once
    dict(temperature=0.0, logprobs=3, logit_bias={7: 100.0}),  # forced from low down: outside the top 3
    dict(temperature=1.5, seed=11, logprobs=2),  # sampled: some in the top, some not
])
def test_sample_logprobs_are_vllm_dicts(plain, hf, settings):
    params = SamplingParams(max_tokens=8, ignore_eos=True, **settings)
    out = plain.generate([PROMPT], params, use_tqdm=False)[0]
    c, k = out.outputs[0], settings["logprobs"]
    assert len(c.logprobs) == len(c.token_ids) == 8
    rows = reference_rows(hf, out.prompt_token_ids + c.token_ids)
    start = len(out.prompt_token_ids) - 1
    for pos, (token, position) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        check_position(position, token, k, rows[start + pos], plain.get_tokenizer())
    assert c.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(c.token_ids, c.logprobs)))
    if "logit_bias" in settings:
        assert all(p[7].rank > k for p in c.logprobs)  # the bias chose it; its rank is the model's


def test_prompt_logprobs_are_vllm_dicts(plain, hf):
    out = plain.generate([PROMPT], SamplingParams(max_tokens=2, logprobs=1, prompt_logprobs=2), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None  # nothing precedes the first
    rows = reference_rows(hf, ids)
    for pos in range(1, len(ids)):
        check_position(out.prompt_logprobs[pos], ids[pos], 2, rows[pos - 1], plain.get_tokenizer())
    assert out.prompt_logprobs[1][ids[1]].logprob <= 0


def test_logprob_is_exported_with_vllm_fields():
    assert pllm.Logprob is Logprob
    lp = Logprob(-0.5)
    assert (lp.logprob, lp.rank, lp.decoded_token) == (-0.5, None, None)  # vLLM's defaults


def test_embed_returns_embedding_request_outputs(plain):
    emb = plain.embed(["a", "b"])
    assert len(emb) == 2 and all(isinstance(e, EmbeddingRequestOutput) for e in emb)
    assert isinstance(emb[0].outputs.embedding, list) and len(emb[0].outputs.embedding) == 64
    assert emb[0].request_id != emb[1].request_id and all(e.finished for e in emb)
    for text, e in zip(["a", "b"], emb, strict=True):
        prompt_ids = plain.generate([text], SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids
        assert e.prompt_token_ids == prompt_ids
