"""OpenAI content parts: LLM.chat and the server take the same text part types (vLLM's), join them the same way,
and render the same prompt; a media part is refused by both, naming its type."""

from __future__ import annotations

import httpx
import pytest

from pllm import LLM, SamplingParams
from pllm.runtime.engine.content_parts import TEXT_PART_KEYS

GREEDY = {"temperature": 0.0, "max_tokens": 4}
# every text part type vLLM's chat_utils parses as text, and a bare string, over several roles
MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "input_text", "text": "Be kind."}]},
    {"role": "user", "content": ["Hi", {"type": "output_text", "text": "there"}]},
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}, {"type": "thinking", "thinking": "Hm"}]},
    {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
]
JOINED = [
    {"role": "system", "content": "Be brief.\nBe kind."},
    {"role": "user", "content": "Hi\nthere"},
    {"role": "assistant", "content": "No.\nHm"},
    {"role": "user", "content": "Why?"},
]
# media parts vLLM's server parses (as media, not text): each refused by name
MEDIA_PARTS = [
    {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "video_url", "video_url": {"url": "http://x/y.mp4"}},
    {"type": "input_image", "image_url": "http://x/y.png"},
]


@pytest.fixture(scope="module")
def llm(serve_build):
    return LLM(str(serve_build), backend="cpu", max_model_len=256)


def test_the_messages_cover_every_text_part_type():
    assert {p["type"] for m in MESSAGES for p in m["content"] if isinstance(p, dict)} == set(TEXT_PART_KEYS)


def test_llm_chat_and_the_server_render_the_same_prompt(server, llm):
    out = llm.chat(MESSAGES, SamplingParams(**GREEDY), use_tqdm=False)[0]
    joined = llm.chat(JOINED, SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert out.prompt_token_ids == joined.prompt_token_ids  # parts joined by "\n", as vLLM joins them

    tokens = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}, timeout=60)
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["tokens"] == out.prompt_token_ids
    r = httpx.post(server.api + "/chat/completions", json={"model": "tiny", "messages": MESSAGES, **GREEDY},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(out.prompt_token_ids)
    assert body["choices"][0]["message"]["content"] == out.outputs[0].text


@pytest.mark.parametrize("part", MEDIA_PARTS, ids=[p["type"] for p in MEDIA_PARTS])
def test_a_media_part_is_refused_by_both_naming_its_type(server, llm, part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    with pytest.raises(ValueError, match=rf"messages\[0\]\['content'\]\[1\]: content part type '{part['type']}'"):
        llm.chat(messages, SamplingParams(**GREEDY), use_tqdm=False)
    for path, body in (("/v1/chat/completions", {"model": "tiny", "messages": messages, **GREEDY}),
                       ("/tokenize", {"messages": messages})):
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and f"content part type '{part['type']}'" in err["message"], err


@pytest.mark.parametrize("part, key", [({"type": "refusal", "text": "x"}, "refusal"),
                                       ({"type": "thinking"}, "thinking"), ({"type": "input_text"}, "text")])
def test_a_text_part_without_its_text_names_the_key(server, llm, part, key):
    messages = [{"role": "user", "content": [part]}]
    with pytest.raises(ValueError, match=f"type '{part['type']}' needs its text: {key} is required"):
        llm.chat(messages, SamplingParams(**GREEDY), use_tqdm=False)
    r = httpx.post(server.url + "/tokenize", json={"messages": messages}, timeout=60)
    assert r.status_code == 400 and f"{key} is required" in r.json()["error"]["message"], r.text
