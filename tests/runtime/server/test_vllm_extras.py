"""vLLM's own request fields and endpoints, as a client moving from vLLM's server sends them: each honoured as vLLM
does, or refused by name with a 400; none silently ignored."""

from __future__ import annotations

import httpx
import pytest

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
COMPLETION = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 2, "temperature": 0}


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


@pytest.mark.parametrize("path,base", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
@pytest.mark.parametrize(
    "field,value",
    [
        ("use_beam_search", True), ("allowed_token_ids", [5]), ("bad_words", ["fox"]),
        ("return_tokens_as_token_ids", True), ("spaces_between_special_tokens", False), ("priority", 1),
        ("cache_salt", "s3cret"), ("vllm_xargs", {"a": 1}), ("guided_whitespace_pattern", " "),
        ("truncation_side", "right"), ("return_token_ids", True), ("logprob_token_ids", [1]),
    ],
)  # fmt: skip
def test_vllm_fields_this_server_cannot_honour_are_refused_by_name(server, path, base, field, value):
    r = post(server, path, {**base, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"] and error["code"] == 400


@pytest.mark.parametrize(
    "field,value", [("echo", True), ("chat_template", "{{ messages }}"), ("reasoning_effort", "low")]
)
def test_chat_only_vllm_fields_are_refused_by_name(server, field, value):
    r = post(server, "/v1/chat/completions", {**CHAT, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("path,base", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_vllm_fields_at_their_defaults_pass(server, path, base):
    defaults = {"use_beam_search": False, "prompt_logprobs": None, "bad_words": [], "priority": 0,
                "spaces_between_special_tokens": True, "return_tokens_as_token_ids": False, "length_penalty": 1.0}
    r = post(server, path, {**base, **defaults})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "field,value,check",
    [
        ("guided_choice", ["yes", "no"], lambda text: text in ("yes", "no")),
        ("guided_regex", "[0-9]{3}", lambda text: text.isdigit() and len(text) == 3),
        ("guided_json", {"type": "integer"}, lambda text: text.lstrip("-").isdigit()),
    ],
)
def test_guided_fields_constrain_the_output(server, field, value, check):
    r = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 8, field: value})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    assert check(text), text


def test_guided_and_structured_outputs_together_are_refused(server):
    r = post(server, "/v1/completions", {**COMPLETION, "guided_regex": "a", "structured_outputs": {"regex": "b"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text


def test_truncate_prompt_tokens_keeps_the_last_tokens(server):
    ids = list(range(10, 30))
    r = post(server, "/v1/completions", {**COMPLETION, "prompt": ids, "truncate_prompt_tokens": 5, "echo": True,
                                         "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 5
    whole = post(server, "/v1/completions", {**COMPLETION, "prompt": ids[-5:], "echo": True, "max_tokens": 1})
    assert r.json()["choices"][0]["text"] == whole.json()["choices"][0]["text"]
    chat = post(server, "/v1/chat/completions", {**CHAT, "truncate_prompt_tokens": 3})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == 3, chat.text
    too_many = post(server, "/v1/completions", {**COMPLETION, "truncate_prompt_tokens": 100000})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "truncate_prompt_tokens"


class RecordingBase:
    """The shared model context as prepare uses it, recording what encode was asked for."""

    max_model_len = 256

    def __init__(self):
        self.special: list[bool] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.special.append(add_special_tokens)
        return [1, 2, 3]

    async def in_tokenizer_thread(self, fn, *args):
        return fn(*args)

    def params(self, req, max_tokens, logprobs):
        return req.sampling_params(max_tokens, logprobs)

    async def check_grammar(self, req, params):
        pass

    def check_generates(self):
        pass

    def check_chars(self, text, param="prompt"):
        pass

    def check_fits(self, ids, param, max_tokens, max_tokens_param):
        pass

    def truncate(self, ids, req):
        return ids


@pytest.mark.parametrize("sent,expected", [({}, True), ({"add_special_tokens": False}, False)])
def test_completion_add_special_tokens_reaches_the_tokenizer(sent, expected):
    # the tiny test tokenizer adds no special tokens, so the flag is checked where it is handed over
    import asyncio

    from pllm.runtime.server.protocol_completions import CompletionRequest
    from pllm.runtime.server.serving_completions import CompletionServing

    base = RecordingBase()
    prep = asyncio.run(CompletionServing(base).prepare(CompletionRequest(prompt="hi", **sent), 0.0))
    assert base.special == [expected] and prep.requests[0].prompt_token_ids == [1, 2, 3]


@pytest.mark.parametrize("path,base,prefix", [("/v1/chat/completions", CHAT, "chatcmpl"),
                                              ("/v1/completions", COMPLETION, "cmpl")])
@pytest.mark.parametrize("stream", [False, True])
def test_request_id_names_the_response_as_vllm_does(server, path, base, prefix, stream):
    body = {**base, "request_id": "body-id", "stream": stream}
    r = post(server, path, body)
    ids = ({r.json()["id"]} if not stream else
           {httpx.Response(200, content=line[6:]).json()["id"] for line in r.text.splitlines()
            if line.startswith("data: {")})
    assert ids == {f"{prefix}-body-id"}
    # the header wins, as in vLLM; two requests with the same id both run
    r = post(server, path, {**base, "request_id": "body-id"}, headers={"X-Request-Id": "hdr-7"})
    assert r.json()["id"] == f"{prefix}-hdr-7" and r.headers["x-request-id"] == "hdr-7"


def test_documents_reach_the_chat_template(server):
    # the tiny template reads no documents; vLLM passes them through all the same, so their use is a 200
    r = post(server, "/v1/chat/completions", {**CHAT, "documents": [{"title": "t", "text": "x"}]})
    assert r.status_code == 200, r.text
    bad = post(server, "/v1/chat/completions", {**CHAT, "documents": [{"title": 1}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "documents"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_ping_answers_as_health(server, method):
    r = httpx.request(method, f"{server.url}/ping", timeout=10)
    assert r.status_code == 200


def test_a_guided_field_the_grammar_compiler_refuses_is_named(server):
    r = post(server, "/v1/completions", {**COMPLETION, "guided_regex": "[a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text


def test_fields_read_after_all_are_not_logged_as_ignored():
    from pllm.runtime.server.protocol_chat import ChatCompletionRequest

    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                 guided_json={"type": "object"}, use_beam_search=False, priority=0, no_such_field=1)
    assert body.ignored_fields == ["no_such_field"]


def test_documents_are_handed_to_the_chat_template():
    """What the live test above cannot see (the tiny template reads none): the documents reach apply_chat_template."""
    from types import SimpleNamespace

    from pllm.runtime.server.protocol_chat import ChatCompletionRequest
    from pllm.runtime.server.serving_chat import ChatServing

    seen: dict = {}

    class Tokenizer:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, conversation, **options):
            seen.update(options)
            return "rendered"

    base = SimpleNamespace(tokenizer=Tokenizer(), check_chars=lambda *a, **k: None, max_prompt_chars=1 << 20,
                           encode=lambda text, add_special_tokens=False: [1, 2])
    serving = ChatServing(base, SimpleNamespace(template_tools=lambda req: None))
    docs = [{"title": "t", "text": "x"}]
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], documents=docs)
    assert serving._render_chat(req, req.conversation()) == [1, 2] and seen["documents"] == docs
