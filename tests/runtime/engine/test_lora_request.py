"""LoRARequest as vLLM's users write it: positionally (name, id, path), or by vLLM's keyword and attribute names."""

from __future__ import annotations

import pytest

from pllm import LoRARequest
from pllm.models.lora import LoraError


def test_vllm_keywords_and_attributes_are_taken() -> None:
    ours = LoRARequest("sql", 1, "/adapters/sql")
    theirs = LoRARequest(lora_name="sql", lora_int_id=1, lora_path="/adapters/sql")
    assert theirs == ours and hash(theirs) == hash(ours)
    assert (theirs.lora_name, theirs.lora_int_id, theirs.lora_path) == ("sql", 1, "/adapters/sql")
    assert (ours.name, ours.id, ours.path) == ("sql", 1, "/adapters/sql")
    assert LoRARequest(name="chat", id=2) == LoRARequest("chat", 2) == LoRARequest(lora_name="chat", lora_int_id=2)
    assert LoRARequest("chat", 2).path == ""


def test_a_field_given_twice_or_missing_is_refused() -> None:
    with pytest.raises(TypeError, match="name and lora_name"):
        LoRARequest("a", 1, lora_name="a")
    with pytest.raises(TypeError, match="missing id"):
        LoRARequest("a")
    with pytest.raises(LoraError, match="positive integer"):
        LoRARequest(lora_name="a", lora_int_id=0)
