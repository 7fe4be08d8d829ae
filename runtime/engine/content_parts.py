"""OpenAI chat content parts rendered as text: the one definition LLM.chat and the server's messages both read."""

from __future__ import annotations

from collections.abc import Iterable

from pllm.runtime.engine.param_checks import clip_repr

# vLLM's chat_utils (_parse_chat_message_content_part, MM_PARSER_MAP): the part types whose text enters the prompt,
# each -> the key its text is under. Any other type (image_url, input_audio, video_url, ...) is media pllm does not
# take, refused by name. A bare string in the list is text as well.
TEXT_PART_KEYS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
                  "thinking": "thinking"}
# vLLM joins a message's text parts with a newline (its "string" content format, the one a text template takes)
PART_SEPARATOR = "\n"


def part_text(part: object) -> str:
    """A content part's text: a string is its own text; a dict of a type in TEXT_PART_KEYS gives its text key's
    value. ValueError naming the type for any other part, or the key when a text part lacks its text."""
    if isinstance(part, str):
        return part
    kind = part.get("type") if isinstance(part, dict) else None
    key = TEXT_PART_KEYS.get(kind) if isinstance(kind, str) else None
    if key is None:
        shown = clip_repr(kind) if isinstance(part, dict) else clip_repr(part)
        raise ValueError(f"content part type {shown} is not supported; pllm takes text only: a string, or parts of "
                         f"type {', '.join(repr(k) for k in TEXT_PART_KEYS)} with their text")
    if not isinstance(part.get(key), str):
        raise ValueError(f"a content part of type {kind!r} needs its text: {key} is required (a string), got "
                         f"{clip_repr(part.get(key))}")
    return part[key]


def join_parts(parts: Iterable[object]) -> str:
    """A message's content parts -> its content, as vLLM renders them for a template that takes text."""
    return PART_SEPARATOR.join(part_text(p) for p in parts)


def flatten_content(message: dict, index: int) -> dict:
    """A message whose content is a list of content parts -> the same message with its parts joined (join_parts);
    an error names the message and part."""
    content = message.get("content")
    if not isinstance(content, (list, tuple)):
        return message
    for j, part in enumerate(content):
        try:
            part_text(part)
        except ValueError as exc:
            raise ValueError(f"messages[{index}]['content'][{j}]: {exc}") from None
    return {**message, "content": join_parts(content)}
