"""Chat templates rendered as transformers renders them, with jinja2 alone (importing transformers costs start-up).

Mirrors transformers 5's `apply_chat_template(..., tokenize=False)` (utils/chat_template_utils.py): the same sandboxed
environment (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, the `{% generation %}` tag
accepted), the same globals (raise_exception, strftime_now, a `dict` and a `namespace` that refuse underscore names),
the same `tojson` (no HTML escaping), messages with None values dropped, the reasoning field aliases, the special
tokens as template variables (overridden by the caller's), and the same continue_final_message cut.
tests/runtime/worker/test_fast_tokenizer.py holds it equal to transformers' output on the builds' templates.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@lru_cache(maxsize=8)
def compile_template(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for masks; rendering keeps the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller) -> str:
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


class ChatPromptTooLong(ValueError):
    """A chat template's output passed the caller's character budget: rendering stopped there."""

    def __init__(self, max_chars: int) -> None:
        super().__init__(f"The chat template rendered more than {max_chars} characters, more than a prompt can hold "
                         "in the model's context; rendering stopped there. Please shorten the messages.")
        self.max_chars = max_chars


def max_prompt_chars(tokenizer, max_model_len: int) -> int:
    """The most characters a prompt of max_model_len tokens can hold: the longest token in characters bounds them,
    so a check before tokenizing never rejects a prompt that would fit."""
    return max_model_len * max(len(t) for t in tokenizer.get_vocab())


def render_chat(template: str, conversation: list[dict], special_tokens: dict[str, str], *,
                tools: list[dict] | None = None, documents: list[dict] | None = None,
                add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                max_chars: int | None = None, **kwargs: Any) -> str:
    """One conversation -> the prompt text, as transformers' apply_chat_template(..., tokenize=False) gives it.
    max_chars (max_prompt_chars): ChatPromptTooLong as soon as the output passes it, so a template looping over a
    large input stops there rather than build all of its text first; None renders whatever the template makes."""
    if not conversation:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible.")
    chat = []
    for message in json.loads(json.dumps(conversation)):  # a plain copy: the edits below stay here
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, but got {message!r}.")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise ValueError("Tools should be JSON schemas (dicts).")
    final_message = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_message = chat[-1].get(field)
        if final_message is None:
            raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
        fields = [f for f in REASONING_FIELDS if chat[-1].get(f) == final_message] if field in REASONING_FIELDS \
            else [field]
        if not any(f in template for f in fields):
            raise ValueError(f'continue_final_message is set to "{field}" but this is not an accepted field in the '
                             "chat_template")
        if isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if "text" in block:
                    final_message = block["text"]
                    block["text"] = block["text"] + CONTINUE_TAG
                    break
            else:
                raise ValueError("continue_final_message is set but we could not find any text to continue in the "
                                 "final message!")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + CONTINUE_TAG
    variables = {**special_tokens, **kwargs}
    pieces, num_chars = [], 0
    for piece in compile_template(template).generate(messages=chat, tools=tools, documents=documents,
                                                     add_generation_prompt=add_generation_prompt, **variables):
        num_chars += len(piece)  # a piece is one output or literal of the template, or a whole macro's or block's
        if max_chars is not None and num_chars > max_chars:
            raise ChatPromptTooLong(max_chars)
        pieces.append(piece)
    text = "".join(pieces)
    if continue_final_message:
        if final_message.strip() not in text or CONTINUE_TAG.strip() not in text:
            raise ValueError("continue_final_message is set but the final message does not appear in the chat after "
                             "applying the chat template!")
        cut = text.rindex(CONTINUE_TAG.strip())
        text = text[:cut] if text[cut:cut + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:cut].rstrip()
    return text
