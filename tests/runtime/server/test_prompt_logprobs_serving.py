"""vLLM's prompt_logprobs request field over HTTP: its response shape and placement (per completion choice, on the
chat response), its limits and stream rule, and logprob token texts read from the engine's Logprob.decoded_token."""

from __future__ import annotations

import json

import httpx
import pytest

from pllm.runtime.engine.outputs import Logprob, RequestOutput
from pllm.runtime.engine.sampling_params import MAX_LOGPROBS
from pllm.runtime.server.serving import OpenAIServing
from pllm.runtime.server.serving_chat import ChatServing
from pllm.runtime.server.serving_completions import CompletionServing
from pllm.runtime.server.sse import within_top

TOL = 1e-4
PROMPT = "The quick brown fox jumps over the"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2, "temperature": 0}




def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.api}{path}", json=body, timeout=60)


def check_shape(prompt_logprobs: list, ids: list[int], k: int, tokenizer) -> None:
    """vLLM's shape: null first, then {str(token id): {logprob, rank, decoded_token}}, the prompt token first and
    then the k best (ranks 1..k), the prompt token once when it is among them."""
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    for pos, entry in enumerate(prompt_logprobs[1:], start=1):
        keys = list(entry)
        assert keys[0] == str(ids[pos])
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
        assert all(v["decoded_token"] == tokenizer.decode([int(t)]) for t, v in entry.items())
        ranks = sorted(v["rank"] for t, v in entry.items() if t != keys[0])
        own = entry[keys[0]]["rank"]
        assert ranks == [r for r in range(1, k + 1) if r != own]
        assert len(entry) == (k if own <= k else k + 1)


def test_completion_choices_carry_the_prompt_logprobs(server, hf_logprobs, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    body = {"model": "tiny", "prompt": [ids, ids[:4]], "max_tokens": 2, "n": 2, "temperature": 0,
            "prompt_logprobs": 3}
    r = post(server, "/completions", body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [len(c["prompt_logprobs"]) for c in choices] == [len(ids)] * 2 + [4] * 2  # each choice, its prompt's
    assert choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"]
    check_shape(choices[0]["prompt_logprobs"], ids, 3, tokenizer)
    check_shape(choices[2]["prompt_logprobs"], ids[:4], 3, tokenizer)
    ref = hf_logprobs(ids)  # [len(ids), vocab]
    for pos, entry in enumerate(choices[0]["prompt_logprobs"][1:], start=1):
        for t, v in entry.items():
            assert abs(v["logprob"] - ref[pos - 1, int(t)].item()) < TOL


def test_prompt_logprobs_zero_is_the_prompt_token_alone(server, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    r = post(server, "/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["prompt_logprobs"]
    assert [list(e) for e in entries[1:]] == [[str(t)] for t in ids[1:]]
    assert all(e[str(t)]["rank"] >= 1 for e, t in zip(entries[1:], ids[1:]))


def test_chat_response_carries_the_prompt_logprobs_on_top(server, tokenizer):
    r = post(server, "/chat/completions", {**CHAT, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert all("prompt_logprobs" not in c for c in body["choices"])  # vLLM's place: the response, not the choice
    ids = httpx.post(f"{server.url}/tokenize", json={"model": "tiny", "messages": CHAT["messages"]},
                     timeout=60).json()["tokens"]
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] == len(ids)
    check_shape(body["prompt_logprobs"], ids, 2, tokenizer)
    same = post(server, "/completions", {"model": "tiny", "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2})
    assert same.json()["choices"][0]["prompt_logprobs"] == body["prompt_logprobs"]


@pytest.mark.parametrize("path,base", [("/chat/completions", CHAT),
                                       ("/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2})])
def test_no_prompt_logprobs_key_unless_asked(server, path, base):
    body = post(server, path, base).json()
    assert "prompt_logprobs" not in body and all("prompt_logprobs" not in c for c in body["choices"])


def test_echo_and_prompt_logprobs_each_read_their_own_number(server, tokenizer):
    """The prompt is scored once for the larger number; echo's top_logprobs keep logprobs' count, prompt_logprobs
    its own, and both agree on the prompt tokens' logprobs."""
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    plain = post(server, "/completions", body).json()["choices"][0]
    both = post(server, "/completions", {**body, "prompt_logprobs": 4}).json()["choices"][0]
    assert both["logprobs"] == plain["logprobs"]
    ids = tokenizer(PROMPT).input_ids
    check_shape(both["prompt_logprobs"], ids, 4, tokenizer)
    echoed = both["logprobs"]["token_logprobs"][1 : len(ids)]
    assert echoed == [e[str(t)]["logprob"] for e, t in zip(both["prompt_logprobs"][1:], ids[1:])]
    plain3 = post(server, "/completions", {**body, "logprobs": 3}).json()["choices"][0]
    fewer = post(server, "/completions", {**body, "logprobs": 3, "prompt_logprobs": 1}).json()["choices"][0]
    check_shape(fewer["prompt_logprobs"], ids, 1, tokenizer)
    assert fewer["logprobs"] == plain3["logprobs"]


@pytest.mark.parametrize("path,base", [("/chat/completions", CHAT),
                                       ("/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2})])
@pytest.mark.parametrize("value,words", [
    (-1, ["-1", "whole vocabulary", str(MAX_LOGPROBS)]), (MAX_LOGPROBS + 1, [str(MAX_LOGPROBS)]), (-2, []),
    (True, ["boolean"]), ("many", []), (2.5, []),
])  # fmt: skip
def test_prompt_logprobs_out_of_range_is_a_400_naming_it(server, path, base, value, words):
    r = post(server, path, {**base, "prompt_logprobs": value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt_logprobs" and "prompt_logprobs" in error["message"], error
    assert all(w in error["message"] for w in words), error["message"]


@pytest.mark.parametrize("path,base", [("/chat/completions", CHAT),
                                       ("/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2})])
def test_streams_refuse_prompt_logprobs_beyond_zero_and_send_none_at_zero(server, path, base):
    """vLLM's rule: more than 0 with stream is a 400; 0 passes and no chunk carries them."""
    r = post(server, path, {**base, "stream": True, "prompt_logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs", r.text
    assert "stream" in r.json()["error"]["message"]
    with httpx.stream("POST", f"{server.api}{path}", json={**base, "stream": True, "prompt_logprobs": 0},
                      timeout=60) as s:
        assert s.status_code == 200
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events and not any("prompt_logprobs" in e or any("prompt_logprobs" in c for c in e["choices"])
                              for e in events)


# Unit level: the server's logprob texts come from Logprob.decoded_token (filled by the output processor), and
# the tokenizer decodes only a token no Logprob describes (an echoed prompt's first one).


class _Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return f"<tok{ids[0]}>"


def _serving() -> OpenAIServing:
    base = OpenAIServing.__new__(OpenAIServing)  # the parts the response builders read: tokenizer and its cache
    base.tokenizer, base._token_strs = _Tokenizer(), {}
    return base


def _position(token_id: int, rank: int, top: list[tuple[int, float]]) -> dict[int, Logprob]:
    own = {token_id: Logprob(-3.0, rank, f"own{token_id}")}
    return own | {t: Logprob(lp, r, f"top{t}") for r, (t, lp) in enumerate(top, start=1)}


def test_completion_logprobs_read_decoded_token():
    position = _position(7, 5, [(1, -0.5), (2, -1.0)])
    lp = CompletionServing(_serving())._completion_logprobs([(9, None), (7, position)], 0, 2)
    assert lp.tokens == ["<tok9>", "own7"]  # the first has no Logprob: decoded by the server
    assert lp.text_offset == [0, len("<tok9>")]
    assert lp.top_logprobs == [None, {"top1": -0.5, "top2": -1.0, "own7": -3.0}]


def test_chat_logprobs_read_decoded_token():
    out = ChatServing(_serving(), None)._chat_logprobs([_position(7, 5, [(1, -0.5)])], 1)
    (token,) = out.content
    assert (token.token, token.bytes) == ("own7", list(b"own7"))
    assert [(t.token, t.logprob) for t in token.top_logprobs] == [("top1", -0.5)]


def test_prompt_logprobs_body_reads_decoded_token_and_floors_minus_inf():
    position = _position(7, 2, [(1, -0.5), (7, -3.0), (4, -4.0)])
    position[4].logprob = float("-inf")
    out = RequestOutput("r", None, [9, 7], [], True, prompt_logprobs=[None, position])
    body = _serving().prompt_logprobs_body(out, 3)
    assert body[0] is None
    assert {t: (v.logprob, v.rank, v.decoded_token) for t, v in body[1].items()} == {
        7: (-3.0, 2, "top7"), 1: (-0.5, 1, "top1"), 4: (-9999.0, 3, "top4")}


def test_within_top_is_the_dict_asked_for_fewer():
    position = _position(7, 9, [(1, -0.5), (2, -1.0), (3, -2.0)])
    assert list(within_top(position, 3)) == [7, 1, 2, 3]
    assert list(within_top(position, 1)) == [7, 1]
    assert list(within_top(position, 0)) == [7]
    among = {5: Logprob(-0.9, 2, "a"), 1: Logprob(-0.5, 1, "b"), 3: Logprob(-2.0, 3, "c")}  # own token ranked 2
    assert list(within_top(among, 2)) == [5, 1] and list(within_top(among, 1)) == [5, 1]
