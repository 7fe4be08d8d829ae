"""Well-formed checkpoint folders in the shapes real ones come in: named chat templates saved as transformers saves
them, PyTorch pickle weights, a task head in place of the LM head."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from pllm.compiler.build import BuildOptions, build
from pllm.compiler.manifest import open_build
from pllm.compiler.source import ModelSourceError
from pllm.compiler.spec import ConfigError
from pllm.runtime.worker.text_loader import load_tokenizer

TOOLS = [{"type": "function", "function": {"name": "f", "description": "d",
                                           "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [{"role": "user", "content": "hi"}]


def _copy(tiny_dir, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_dir("llama"), model)
    return model


def _build(model: Path, tmp_path: Path) -> Path:
    return build(str(model), tmp_path / "build", BuildOptions(dtype="float32", progress=False))


@pytest.mark.parametrize("with_default", [True, False])
def test_named_chat_templates_in_their_folder_are_served(tiny_dir, tmp_path, with_default):
    """transformers saves named templates as additional_chat_templates/<name>.jinja beside chat_template.jinja and
    renders 'tool_use' when tools are given; the build keeps every one of them."""
    model = _copy(tiny_dir, tmp_path)
    if not with_default:
        (model / "chat_template.jinja").unlink()
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS|{{ messages[0]['content'] }}")
    hf = transformers.AutoTokenizer.from_pretrained(str(model))
    assert isinstance(hf.chat_template, dict) and "tool_use" in hf.chat_template
    served = load_tokenizer(open_build(_build(model, tmp_path)))
    assert served.chat_template == hf.chat_template
    for kwargs in ({"tools": TOOLS}, {"chat_template": "tool_use"}, *([{}] if with_default else [])):
        expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False, **kwargs)
        assert served.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False, **kwargs) == expected
    assert expected.startswith("TOOLS") or with_default


def test_a_lone_default_template_in_the_folder_stays_a_plain_template(tiny_dir, tmp_path):
    model = _copy(tiny_dir, tmp_path)
    (model / "additional_chat_templates").mkdir()  # empty, as a save with no named templates may leave it
    hf = transformers.AutoTokenizer.from_pretrained(str(model))
    served = load_tokenizer(open_build(_build(model, tmp_path)))
    assert isinstance(hf.chat_template, str) and served.chat_template == hf.chat_template


@pytest.mark.parametrize("files", [("pytorch_model.bin",),
                                   ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")])
def test_pytorch_pickle_weights_are_refused_by_name(tiny_dir, tmp_path, files):
    model = _copy(tiny_dir, tmp_path)
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    for i, name in enumerate(files):
        torch.save({k: v for j, (k, v) in enumerate(sorted(tensors.items())) if j % len(files) == i}, model / name)
    with pytest.raises(ModelSourceError, match=r"PyTorch pickle weights \(pytorch_model.*\.bin.*safetensors"):
        _build(model, tmp_path)


def test_a_sequence_classification_checkpoint_is_refused_naming_architectures(tiny_dir, tmp_path):
    model = _copy(tiny_dir, tmp_path)
    (model / "model.safetensors").unlink()
    config = transformers.AutoConfig.from_pretrained(str(model))
    config.num_labels, config.pad_token_id = 2, 0
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(str(model))
    assert json.loads((model / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    with pytest.raises(ConfigError, match=r"key 'architectures' is \['LlamaForSequenceClassification'\]"):
        _build(model, tmp_path)


def test_a_sentencepiece_only_tokenizer_without_the_package_is_refused_naming_it(tiny_dir, tmp_path):
    """A Llama-2 style folder (tokenizer.model, no tokenizer.json): transformers converts it with sentencepiece;
    without the package it falls back to tiktoken and names that, which is not what the user lacks."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: transformers converts the file")
    model = _copy(tiny_dir, tmp_path)
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                              "eos_token": "</s>", "unk_token": "<unk>"}))
    shutil.copyfile(tiny_dir("llama") / "model.safetensors", model / "tokenizer.model")  # never parsed: no package
    with pytest.raises(ModelSourceError, match=r"tokenizer.model: a sentencepiece tokenizer with no tokenizer.json; "
                                               r".*pip install sentencepiece"):
        _build(model, tmp_path)
