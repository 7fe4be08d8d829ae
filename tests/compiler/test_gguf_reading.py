"""A GGUF compile parses the file once, however often transformers opens it, and leaves the gguf package as it was."""

from __future__ import annotations

import gguf
import torch
from tiny_gguf import write_tiny_gguf
from tiny_models import make_tiny_model

from pllm.compiler.gguf_reading import parsed_once
from pllm.compiler.source import open_model


def _counting_parses(monkeypatch) -> list[str]:
    parses: list[str] = []
    real_init = gguf.gguf_reader.GGUFReader.__init__

    def counting_init(self, path, *args, **kwargs):
        parses.append(str(path))
        real_init(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.gguf_reader.GGUFReader, "__init__", counting_init)
    return parses


def _tiny_gguf(tmp_path):
    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1)
    return write_tiny_gguf(model_dir, "qwen3")


def test_a_gguf_source_is_parsed_once_kept_blocks_included(tmp_path, monkeypatch):
    path = _tiny_gguf(tmp_path)
    parses = _counting_parses(monkeypatch)
    source = open_model(str(path), keeps_blocks=True)
    try:
        assert len(parses) == 1, parses  # config, tokenizer and weights: transformers opened it more than once
        assert source.kept_blocks(("model.layers.0.self_attn.o_proj.weight",)) is not None
        assert len(parses) == 1, parses  # the kept blocks came from the same parse
        assert source._gguf_reader is None  # and it is not held past them
    finally:
        source.close()
    plain = open_model(str(path))  # no kept blocks to read: the parse is not kept at all
    try:
        assert plain._gguf_reader is None and len(parses) == 2
    finally:
        plain.close()
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader
    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map


def test_the_shared_reader_reads_what_a_fresh_one_reads(tmp_path):
    path = _tiny_gguf(tmp_path)
    fresh = gguf.GGUFReader(str(path))
    with parsed_once() as parsed:
        first, again = gguf.GGUFReader(str(path)), gguf.GGUFReader(path)
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 2) is name_map
    assert first is again is parsed.reader(path)
    assert list(first.fields) == list(fresh.fields)
    for a, b in zip(first.tensors, fresh.tensors, strict=True):
        assert a.name == b.name and a.tensor_type == b.tensor_type
        assert torch.equal(torch.from_numpy(a.data.copy()), torch.from_numpy(b.data.copy()))
    assert gguf.GGUFReader is gguf.gguf_reader.GGUFReader  # restored on leaving
