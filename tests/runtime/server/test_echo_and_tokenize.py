"""echo with logprobs as evaluation harnesses send it (lm-evaluation-harness), and /tokenize, /detokenize."""

from __future__ import annotations

import json
from operator import itemgetter

import httpx
import pytest

TOL = 1e-4
CONTEXT = "The quick brown fox jumps over the"
CONTINUATIONS = [" lazy dog.", " moon and back"]





def lm_eval_parse(choices: list[dict], ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-evaluation-harness's LocalCompletionsAPI.parse_logprobs, as it reads a loglikelihood response."""
    res = []
    for choice, ctxlen in zip(sorted(choices, key=itemgetter("index")), ctxlens):
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(tok == max(top.values()) for tok, top in zip(token_logprobs, top_logprobs))
        res.append((sum(token_logprobs), is_greedy))
    return res


def test_lm_eval_loglikelihood_request(server, hf_logprobs, tokenizer):
    context = tokenizer(CONTEXT).input_ids
    prompts = [context + tokenizer(c).input_ids for c in CONTINUATIONS]
    # the body local-completions sends for loglikelihood with tokenized requests: a batch of token-id prompts
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}
    r = httpx.post(server.api + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    parsed = lm_eval_parse(choices, [len(context)] * len(prompts))
    for choice, ids, (logprob, is_greedy) in zip(choices, prompts, parsed):
        ref = hf_logprobs(ids)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing precedes the first
        for pos in range(1, len(ids)):
            assert abs(lp["token_logprobs"][pos] - ref[pos - 1, ids[pos]].item()) < TOL
            assert len(lp["top_logprobs"][pos]) in (1, 2)  # the best token, and the prompt token when it differs
        continuation = range(len(context), len(ids))
        expected = sum(ref[p - 1, ids[p]].item() for p in continuation)
        assert abs(logprob - expected) < TOL * len(ids)
        assert is_greedy == all(ref[p - 1].argmax().item() == ids[p] for p in continuation)
        # the generated token follows the prompt: greedy, so the best of the last row
        assert abs(lp["token_logprobs"][-1] - ref[-1].max().item()) < TOL
        assert choice["text"].startswith(tokenizer.decode(ids))
        offsets = lp["text_offset"]
        assert offsets[0] == 0 and all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp["tokens"]))


def test_echo_max_tokens_zero_returns_the_scored_prompt_only(server, client, tokenizer):
    ids = tokenizer(CONTEXT).input_ids
    zero = client.completions.create(model="tiny", prompt=CONTEXT, max_tokens=0, echo=True, logprobs=2,
                                     temperature=0)
    one = client.completions.create(model="tiny", prompt=CONTEXT, max_tokens=1, echo=True, logprobs=2, temperature=0)
    (c,) = zero.choices
    assert c.text == CONTEXT and c.finish_reason == "length"
    assert c.logprobs.token_logprobs[0] is None and len(c.logprobs.token_logprobs) == len(ids)
    assert c.logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert c.logprobs.token_logprobs == one.choices[0].logprobs.token_logprobs[:-1]
    assert c.logprobs.top_logprobs == one.choices[0].logprobs.top_logprobs[:-1]
    assert all(2 <= len(top) <= 3 for top in c.logprobs.top_logprobs[1:])
    # token-id prompt, with the same answer
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert by_ids.choices[0].logprobs.token_logprobs == c.logprobs.token_logprobs
    r = httpx.post(server.api + "/completions", json={"prompt": CONTEXT, "max_tokens": 0})  # 0 needs echo
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def stream_logprobs(server, body: dict) -> tuple[str, dict, str]:
    """The concatenated text and logprobs of a streamed completion of one choice, and its finish_reason."""
    text, merged, finish = "", {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}, None
    with httpx.stream("POST", server.api + "/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            (choice,) = json.loads(line[6:])["choices"]
            text += choice["text"]
            for key in merged:
                merged[key] += (choice["logprobs"] or {}).get(key, [])
            finish = choice["finish_reason"] or finish
    return text, merged, finish


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_streamed_echo_equals_the_whole_response(server, max_tokens):
    body = {"model": "tiny", "prompt": CONTEXT, "max_tokens": max_tokens, "echo": True, "logprobs": 1,
            "temperature": 0}
    whole = httpx.post(server.api + "/completions", json=body, timeout=60).json()["choices"][0]
    text, logprobs, finish = stream_logprobs(server, body)
    assert text == whole["text"] and text.startswith(CONTEXT)
    assert logprobs == whole["logprobs"]
    assert finish == whole["finish_reason"]


def test_tokenize_and_detokenize(server, client, tokenizer):
    url = server.url
    r = httpx.post(url + "/tokenize", json={"model": "tiny", "prompt": CONTEXT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tokenizer(CONTEXT).input_ids
    assert body == {"tokens": ids, "count": len(ids), "max_model_len": 256,
                    "token_strs": tokenizer.convert_ids_to_tokens(ids)}
    plain = httpx.post(url + "/tokenize", json={"prompt": CONTEXT, "add_special_tokens": False}).json()
    assert plain["tokens"] == tokenizer(CONTEXT, add_special_tokens=False).input_ids and plain["token_strs"] is None
    assert httpx.post(url + "/detokenize", json={"tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}
    # messages render as chat completions render them: the same count of prompt tokens
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat = httpx.post(url + "/tokenize", json={"messages": messages}).json()
    expected = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False).input_ids
    assert chat["tokens"] == expected
    used = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1).usage.prompt_tokens
    assert chat["count"] == used
    open_ended = httpx.post(url + "/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert open_ended["count"] < chat["count"]
    # a message's text parts are joined by newlines, as vLLM (and LLM.chat) join them
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hi\nthere"}]
    assert (httpx.post(url + "/tokenize", json={"messages": parts}).json()["tokens"]
            == httpx.post(url + "/tokenize", json={"messages": joined}).json()["tokens"])


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [1, 999999]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "12"}, 400, "tokens"),
        ("/detokenize", {}, 400, "tokens"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "messages"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "continue_final_message": True}, 400, None),
        ("/tokenize", {"prompt": "a", "model": "gpt-9"}, 404, "model"),
        ("/detokenize", {"tokens": [1], "model": "gpt-9"}, 404, "model"),
    ],
)
def test_tokenizer_endpoint_errors(server, path, body, status, param):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == status, err


def test_tokenizer_endpoints_are_documented(server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/tokenize", "/detokenize"} <= set(paths)
