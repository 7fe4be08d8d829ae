"""The schema a named or required tool_choice forces: each tool's schema means there what it means alone ($defs,
"#"), a tool without parameters takes {}, and what `tools` accepts is not refused for its size."""

from __future__ import annotations

import asyncio

import pytest

from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.engine.structured_outputs_params import MAX_STRUCTURED_CHARS
from pllm.runtime.server.protocol_chat import ChatCompletionRequest
from pllm.runtime.server.request_stream import EngineError
from pllm.runtime.server.serving_tools import ForcedCallSchema, ToolCalling

USER = [{"role": "user", "content": "x"}]
# what openai.pydantic_function_tool writes for Args(city: str, unit: Unit(name: str))
PYDANTIC = {
    "$defs": {"Unit": {"properties": {"name": {"title": "Name", "type": "string"}}, "required": ["name"],
                       "title": "Unit", "type": "object", "additionalProperties": False}},
    "properties": {"city": {"title": "City", "type": "string"}, "unit": {"$ref": "#/$defs/Unit"}},
    "required": ["city", "unit"], "title": "Args", "type": "object", "additionalProperties": False,
}
TREE = {"type": "object", "properties": {"child": {"$ref": "#"}}, "additionalProperties": False}
# a second tool whose own "Unit" is another schema: each tool's $defs stay its own
OTHER = {"$defs": {"Unit": {"type": "integer"}}, "type": "object", "properties": {"n": {"$ref": "#/$defs/Unit"}},
         "required": ["n"], "additionalProperties": False}


def tool(name: str, parameters: dict | None = None) -> dict:
    function = {"name": name, **({"parameters": parameters} if parameters is not None else {})}
    return {"type": "function", "function": function}


def forced(grammars, tools: list[dict], choice: object):
    """The request's forced grammar, through ToolCalling.adjust_params as the server makes it."""
    req = ChatCompletionRequest(messages=USER, tools=tools, tool_choice=choice)
    params = asyncio.run(ToolCalling("none", None).adjust_params(req, SamplingParams(), grammars))
    return grammars.compile(params.structured_outputs).result()


def accepts(compiled, text: str) -> bool:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled)
    return matcher.accept_string(text) and matcher.is_completed()


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def test_required_keeps_each_tools_defs_its_own(grammars):
    compiled = forced(grammars, [tool("weather", PYDANTIC), tool("other", OTHER)], "required")
    good = '[{"name": "weather", "parameters": {"city": "P", "unit": {"name": "c"}}}, ' \
           '{"name": "other", "parameters": {"n": 3}}]'
    assert accepts(compiled, good)
    assert not accepts(compiled, '[{"name": "other", "parameters": {"n": {"name": "c"}}}]')
    assert not accepts(compiled, '[{"name": "weather", "parameters": {"city": "P", "unit": 3}}]')
    named_grammar = forced(grammars, [tool("weather", PYDANTIC), tool("other", OTHER)], named("weather"))
    assert accepts(named_grammar, '{"city": "P", "unit": {"name": "c"}}')


def test_a_root_reference_means_the_tools_own_schema(grammars):
    for choice, wrap in [("required", '[{{"name": "tree", "parameters": {}}}]'), (named("tree"), "{}")]:
        compiled = forced(grammars, [tool("tree", TREE)], choice)
        assert accepts(compiled, wrap.format('{"child": {"child": {}}}')), choice
        assert not accepts(compiled, wrap.format('{"child": [{"name": "tree", "parameters": {}}]}')), choice


@pytest.mark.parametrize("choice", ["required", named("ping")])
def test_a_tool_without_parameters_takes_an_empty_object(grammars, choice):
    compiled = forced(grammars, [tool("ping")], choice)
    wrap = "{}" if choice != "required" else '[{{"name": "ping", "parameters": {}}}]'
    assert accepts(compiled, wrap.format("{}"))
    assert not accepts(compiled, wrap.format('{"a": 1}'))


def test_required_takes_as_many_tools_as_tools_does(grammars):
    """60 tools of ~97 KB of JSON (under the 256 KiB of `tools`), each schema small: their forced schema passes
    64 KiB but compiles, in well under a second here."""
    props = {f"field_{j}": {"type": "string", "description": "a description of this parameter " * 2}
             for j in range(12)}
    tools = [tool(f"tool_{i}", {"type": "object", "properties": props}) for i in range(60)]
    compiled = forced(grammars, tools, "required")
    assert accepts(compiled, '[{"name": "tool_59", "parameters": {"field_3": "x"}}]')
    ForcedCallSchema(json={"a": "x" * 300_000})  # the bound of `tools`, not a client schema's 64 KiB


def test_one_tool_schema_over_a_client_schemas_bound_is_400_naming_it(grammars):
    big = {"type": "object", "properties": {"a": {"type": "string", "description": "x" * MAX_STRUCTURED_CHARS}}}
    with pytest.raises(EngineError, match="parameters schema of 'big'") as info:
        forced(grammars, [tool("big", big), tool("small", TREE)], "required")
    assert info.value.param == "tools"
