"""pllm-serve with --speculative-config: the same greedy text, streamed or not, and vLLM's spec-decode counters in
/metrics and the stats log."""

import json
import time

import httpx
import pytest

PROMPT = "Paged attention keeps the KV cache in fixed-size blocks. Paged attention keeps the KV cache in"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "tags": {"type": "array", "items": {"enum": ["ab", "b c"]}, "maxItems": 5}},
          "required": ["name", "tags"]}


def _complete(server, stream: bool = False, **extra) -> str:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, **extra}
    if not stream:
        return httpx.post(f"{server.api}/completions", json=body, timeout=60).json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", f"{server.api}/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


def test_speculative_server_gives_the_same_text_and_counts_guesses(launch, server):
    spec = launch("--served-model-name", "tiny", "--max-model-len", "256", "--kv-cache-memory", "1536K",
                  "--log-stats-interval", "1", "--speculative-config", json.dumps(SPEC))
    want = _complete(server)
    assert _complete(spec) == want and _complete(spec, stream=True) == want
    stop = want[10:14]
    assert _complete(spec, stop=[stop]) == _complete(server, stop=[stop])
    before = spec.metric("spec_decode_num_draft_tokens_total")
    for constraint in ({"regex": "(ab|ba|abc){1,8}(-[0-9]{1,3}){0,6};"}, {"json": PERSON}):  # speculated too
        extra = {"structured_outputs": constraint, "ignore_eos": False, "max_tokens": 160}
        assert _complete(spec, **extra) == _complete(server, **extra)
    assert spec.metric("spec_decode_num_draft_tokens_total") > before
    drafted = spec.metric("spec_decode_num_draft_tokens_total")
    accepted = spec.metric("spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= drafted and spec.metric("spec_decode_num_drafts_total") > 0
    assert "speculative decoding: n-gram lookup (n 1..3), up to 4 tokens a step" in spec.log()
    deadline = time.monotonic() + 5
    while "SpecDecoding metrics" not in spec.log():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    line = next(x for x in spec.log().splitlines() if "SpecDecoding metrics" in x)
    assert "Draft acceptance rate" in line and "Mean acceptance length" in line
    assert server.metric("spec_decode_num_draft_tokens_total") == 0  # off unless asked


def test_bad_speculative_flags_are_refused_by_name():
    from pllm.runtime.server.cli_args import build_parser

    parser = build_parser()
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))
    args = parser.parse_args(["b", "--speculative-ngram", "3"])
    assert args.speculative_config.num_speculative_tokens == 3
    for bad, message in (
        (["--speculative-ngram", "0"], "num_speculative_tokens=0"),
        (["--speculative-config", '{"num_speculative_tokens": 2, "draft_model": "x"}'], "unknown key(s) 'draft_model'"),
        (["--speculative-config", "{"], "is not JSON"),
        (["--speculative-ngram", "2", "--speculative-config", json.dumps(SPEC)], "not allowed with argument"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parser.parse_args(["b", *bad])


def test_ray_serve_options_take_the_dict_spelling():
    from pllm.runtime.server.cli_args import args_from_options

    args = args_from_options({"build_dir": "b", "speculative_config": SPEC})
    assert (args.speculative_config.num_speculative_tokens, args.speculative_config.prompt_lookup_min) == (4, 1)
    with pytest.raises(ValueError, match="num_speculative_tokens=99"):
        args_from_options({"build_dir": "b", "speculative_config": {"num_speculative_tokens": 99}})
