"""Structured output over HTTP through the official openai client: response_format and structured_outputs."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 6}, "rank": {"type": "integer", "minimum": 1,
                                                                         "maximum": 9}},
    "required": ["city", "rank"],
    "additionalProperties": False,
}


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    admin: bool
    colour: Literal["red", "green", "blue"]
    tags: list[Literal["x", "y"]] = Field(max_length=2)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_parse_with_a_pydantic_model(client, temperature):
    for seed in range(3):
        r = client.chat.completions.parse(model="tiny", messages=CHAT, response_format=Person, max_tokens=120,
                                          temperature=temperature, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Person)  # the client validated it against the model


def test_json_schema_on_completions_and_chat_streaming(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}
    r = client.completions.create(model="tiny", prompt=["Hello", "Paged"], max_tokens=60, temperature=1.0, n=2,
                                  seed=7, extra_body={"response_format": fmt})
    texts = [c.text for c in r.choices]
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=60, temperature=1.0, seed=3,
                                            response_format=fmt, stream=True)
    texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    for text in texts:
        value = json.loads(text)
        assert set(value) == {"city", "rank"} and len(value["city"]) <= 6 and 1 <= value["rank"] <= 9, text


def test_json_object(client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=100, temperature=0.0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0.0,
                                       response_format={"type": "text"})
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("spec, check", [
    ({"regex": r"[0-9]{2}:[0-9]{2}"}, lambda t: re.fullmatch(r"[0-9]{2}:[0-9]{2}", t)),
    ({"choice": ["left", "right"]}, lambda t: t in ("left", "right")),
    ({"grammar": 'root ::= "go " ("north" | "south")'}, lambda t: t in ("go north", "go south")),
    ({"json": SCHEMA}, lambda t: set(json.loads(t)) == {"city", "rank"}),
    ({"json": json.dumps(SCHEMA)}, lambda t: set(json.loads(t)) == {"city", "rank"}),
])
def test_structured_outputs_extra_field(client, spec, check):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=1.0, n=3, seed=1,
                                  extra_body={"structured_outputs": spec})
    c = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0.0,
                                       extra_body={"structured_outputs": spec})
    for text in [x.text for x in r.choices] + [c.choices[0].message.content]:
        assert check(text), text


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format", "Unsupported type"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex", "parenthesis"),
    ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs.grammar", "missing"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
    ({"structured_outputs": {"regex": "a", "bogus": 1}}, "structured_outputs", "unknown field"),
    ({"structured_outputs": {"choice": ["x"] * 1000}}, "structured_outputs.choice", "a list of 1 to"),
    ({"response_format": {"type": "json_schema"}}, None, "json_schema is required"),
    ({"response_format": {"type": "yaml"}}, None, "response_format"),
])
def test_bad_structured_output_is_a_400_naming_the_field(server, body, param, message):
    for path, base in (("chat/completions", {"messages": CHAT}), ("completions", {"prompt": "Hi"})):
        r = httpx.post(f"{server.api}/{path}", json={"model": "tiny", "max_tokens": 4, **base, **body}, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert message in error["message"], error
        if param is not None:
            assert error["param"] == param, error


def test_bad_schema_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="Unsupported type"):
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "wat"}}}}})
