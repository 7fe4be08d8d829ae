"""vLLM's own request fields beyond OpenAI's that this server reads (the request bodies use these tables):
those it cannot honour pass only at a neutral value and are otherwise refused by name, never silently dropped; the
older guided_* structured-output fields are read as structured_outputs' keys."""

from __future__ import annotations

# vLLM's own request fields this server cannot honour. Each passes only at its neutral value (the one under which
# vLLM's output is what this server makes: absent, null, false, an empty list or object, or the value named here);
# any other value is a 400 naming the field, never a silent difference.
UNHONOURED_VLLM_FIELDS: dict[str, object] = {
    "use_beam_search": False, "allowed_token_ids": None, "bad_words": None,
    "logprob_token_ids": None, "return_tokens_as_token_ids": False, "return_token_ids": False,
    "spaces_between_special_tokens": True, "priority": 0, "cache_salt": None, "kv_transfer_params": None,
    "ec_transfer_params": None, "vllm_xargs": None, "logits_processors": None, "watermarking": False,
    "repetition_detection": None, "thinking_token_budget": None, "stream_interval": None,
    "guided_whitespace_pattern": None, "mm_processor_kwargs": None, "media_io_kwargs": None,
    "prompt_embeds": None, "truncation_side": None,
}  # fmt: skip
CHAT_UNHONOURED_VLLM_FIELDS: dict[str, object] = {
    # vLLM refuses a request's own template unless started with --trust-request-chat-template; pllm has no such flag
    "chat_template": None, "echo": False, "reasoning_effort": None, "return_prompt_text": False,
}  # fmt: skip
# vLLM's older structured-output fields (before `structured_outputs`), read as structured_outputs' keys.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def is_neutral(value: object, neutral: object) -> bool:
    """Whether a field's value leaves vLLM doing what this server does (0 and 1 are not false or true here)."""
    if value is None or value is neutral or (isinstance(value, list | dict) and not value):
        return True
    return type(value) is type(neutral) and value == neutral


def first_unhonoured(extra: dict[str, object], fields: dict[str, object]) -> str | None:
    """The first of `fields` that a request body's extra fields set to a value that counts, or None."""
    return next((name for name, neutral in fields.items() if name in extra and not is_neutral(extra[name], neutral)),
                None)
