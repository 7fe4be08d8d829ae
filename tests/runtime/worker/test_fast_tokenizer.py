"""The served tokenizer read from the build's snapshot (no transformers) equals transformers' tokenizer of the same
build files: token ids with and without special tokens, truncation, decoding, vocabulary, and rendered chat prompts
(tools, generation prompt, continue_final_message, template variables), on the default model and tiny ones."""

from __future__ import annotations

import json

import pytest

from pllm.compiler.manifest import TOKENIZER_BACKEND, TOKENIZER_SNAPSHOT, BuildDirError, open_build
from pllm.runtime.worker.fast_tokenizer import FastTokenizer
from pllm.runtime.worker.text_loader import load_tokenizer, load_transformers_tokenizer, transformers_tokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "Bonjour le monde. Grüße aus Köln. こんにちは世界. 你好，世界! 🤖🦙",
    "def main():\n    return 42  # numbers 0123456789\n\n\ttabs",
    "<|im_start|>user\nspecial tokens in text<|im_end|>\n<|endoftext|> don't won't it's we're I'm they've",
    "",
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Grüße 🤖"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
]


@pytest.fixture(scope="module", params=["smollm2", "llama", "qwen2", "gemma3_text", "phi3"])
def pair(request, tiny_build, smollm2_build):
    if request.param == "smollm2":
        build = smollm2_build
    else:
        build = tiny_build(request.param)
    manifest = open_build(str(build))
    fast = load_tokenizer(manifest)
    assert isinstance(fast, FastTokenizer), f"{build}: no tokenizer snapshot"
    return fast, load_transformers_tokenizer(manifest)


def test_token_ids_equal_transformers(pair):
    fast, hf = pair
    for text in TEXTS:
        for special in (True, False):
            assert fast(text, add_special_tokens=special).input_ids == hf(text, add_special_tokens=special).input_ids
        assert fast.encode(text) == hf.encode(text)
        assert fast(text, truncation=True, max_length=5).input_ids == hf(text, truncation=True,
                                                                          max_length=5).input_ids
    assert fast(TEXTS[:3])["input_ids"] == hf(TEXTS[:3])["input_ids"]


def test_decoding_and_vocabulary_equal_transformers(pair):
    fast, hf = pair
    assert fast.get_vocab() == hf.get_vocab() and len(fast) == len(hf)
    assert sorted(fast.all_special_ids) == sorted(set(hf.all_special_ids))
    for name in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id", "eos_token", "bos_token"):
        assert getattr(fast, name) == getattr(hf, name), name
    for text in TEXTS:
        ids = hf(text).input_ids
        for skip in (True, False):
            for clean in (None, False, True):
                assert fast.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == hf.decode(
                    ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
        assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
        assert fast.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf.convert_ids_to_tokens(
            ids, skip_special_tokens=True)
    every = list(range(len(hf)))
    assert fast.decode(every) == hf.decode(every)
    assert [fast.decode([i]) for i in every[:300]] == [hf.decode([i]) for i in every[:300]]


def test_chat_prompts_equal_transformers(pair):
    fast, hf = pair
    assert fast.chat_template == hf.chat_template
    if not hf.chat_template:
        pytest.skip("no chat template")
    for chat in CHATS:
        for options in ({"add_generation_prompt": True}, {"add_generation_prompt": False},
                        {"tools": [WEATHER], "add_generation_prompt": True}, {"custom_flag": True}):
            expected = hf.apply_chat_template(chat, tokenize=False, **options)
            assert fast.apply_chat_template(chat, tokenize=False, **options) == expected
            assert fast.apply_chat_template(chat, **options) == hf(expected, add_special_tokens=False).input_ids
    partial = [*CHATS[0], {"role": "assistant", "content": "The capital is "}]
    assert fast.apply_chat_template(partial, tokenize=False, continue_final_message=True) == hf.apply_chat_template(
        partial, tokenize=False, continue_final_message=True)


def test_the_sandbox_refuses_what_transformers_refuses(pair):
    import jinja2

    fast, _ = pair
    fast = FastTokenizer.__new__(FastTokenizer)  # a bare copy whose template can be swapped
    fast.__dict__.update(pair[0].__dict__)
    fast.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        fast.apply_chat_template(CHATS[0], tokenize=False)
    fast.chat_template = "{% set ns = namespace(_x=1) %}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        fast.apply_chat_template(CHATS[0], tokenize=False)
    fast.chat_template = "{{ raise_exception('no') }}"
    with pytest.raises(jinja2.exceptions.TemplateError, match="no"):
        fast.apply_chat_template(CHATS[0], tokenize=False)


def test_xgrammar_gets_the_transformers_tokenizer(pair):
    fast, hf = pair
    loaded = transformers_tokenizer(fast)
    assert type(loaded) is type(hf) and loaded is transformers_tokenizer(fast)  # loaded once
    assert transformers_tokenizer(hf) is hf


def test_serving_does_not_import_transformers(smollm2_build):
    """The point of the snapshot: the server's start-up path, engine included, never imports transformers."""
    import subprocess
    import sys

    code = ("import sys; from pllm import LLM; llm = LLM(sys.argv[1], backend='cpu', kv_cache_memory=1 << 24); "
            "llm.generate(['Hi'], use_tqdm=False); import pllm.runtime.server.api; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_build)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_damaged_snapshot_is_named(tiny_build, tmp_path):
    import hashlib
    import shutil

    build = shutil.copytree(tiny_build("llama"), tmp_path / "b")
    backend = json.loads((build / TOKENIZER_BACKEND).read_text())
    backend["model"] = {"type": "NoSuchModel"}
    (build / TOKENIZER_BACKEND).write_text(json.dumps(backend))
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["files"][TOKENIZER_BACKEND] = hashlib.sha256((build / TOKENIZER_BACKEND).read_bytes()).hexdigest()
    manifest.pop("manifest_sha256")
    from pllm.compiler.manifest import manifest_digest

    manifest["manifest_sha256"] = manifest_digest(manifest)
    (build / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildDirError, match=TOKENIZER_BACKEND):
        load_tokenizer(open_build(str(build)))


def _resign(build, manifest: dict) -> None:
    from pllm.compiler.manifest import manifest_digest

    manifest.pop("manifest_sha256")
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (build / "manifest.json").write_text(json.dumps(manifest))


def test_a_format_1_snapshot_still_serves(tiny_build, tmp_path):
    """Builds compiled before format 2 held the backend inside the snapshot, as a JSON object, under the older name:
    this runtime still serves them without transformers, with the same tokens."""
    import hashlib
    import shutil

    new = tiny_build("llama")
    build = shutil.copytree(new, tmp_path / "b")
    snapshot = json.loads((build / TOKENIZER_SNAPSHOT).read_text())
    old = {**snapshot, "format": 1, "backend": json.loads((build / TOKENIZER_BACKEND).read_text())}
    (build / TOKENIZER_SNAPSHOT).unlink()
    (build / TOKENIZER_BACKEND).unlink()
    (build / "pllm_tokenizer.json").write_text(json.dumps(old))
    manifest = json.loads((build / "manifest.json").read_text())
    for name in (TOKENIZER_SNAPSHOT, TOKENIZER_BACKEND):
        del manifest["files"][name]
        manifest["tokenizer_files"].remove(name)
    manifest["files"]["pllm_tokenizer.json"] = hashlib.sha256((build / "pllm_tokenizer.json").read_bytes()).hexdigest()
    manifest["tokenizer_files"].append("pllm_tokenizer.json")
    _resign(build, manifest)
    served, current = load_tokenizer(open_build(str(build))), load_tokenizer(open_build(str(new)))
    assert isinstance(served, FastTokenizer)
    for text in TEXTS:
        assert served(text).input_ids == current(text).input_ids
        assert served.decode(current(text).input_ids) == current.decode(current(text).input_ids)


def test_a_runtime_that_knows_only_format_1_loads_a_new_build_through_transformers(tiny_build, tmp_path):
    """Such a runtime finds none of its snapshot's name among the tokenizer files, so it copies every listed one but
    the generation config into a folder and has transformers load that: the new files beside them change nothing."""
    import shutil

    from transformers import AutoTokenizer

    build = tiny_build("llama")
    manifest = open_build(str(build))
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in manifest.manifest["tokenizer_files"]:
        if name != "generation_config.json":
            shutil.copy(build / name, folder / name)
    assert (folder / TOKENIZER_BACKEND).exists()
    older, current = AutoTokenizer.from_pretrained(folder, local_files_only=True), load_tokenizer(manifest)
    for text in TEXTS:
        assert older(text).input_ids == current(text).input_ids
