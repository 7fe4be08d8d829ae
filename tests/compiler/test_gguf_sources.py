"""What a GGUF file gives the compiler, and what it refuses: tensors transformers cannot place (mixtral's experts in a
llama file, a missing tensor, a split file's first shard), sizes transformers takes from defaults, families pllm lacks,
--quantization gguf on a float file, a tokenizer that cannot encode, tables that contradict themselves (block count,
tensor offsets), a truncated file; the tokenizer read from the file, not its folder;
qwen3_moe's fused experts split into the per-expert names and the build equal to transformers."""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_gguf import write_tiny_gguf
from tiny_models import make_tiny_model

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildOptions, build
from pllm.compiler.quantize import Quantization
from pllm.compiler.source import ModelSourceError, open_model
from pllm.compiler.spec import ConfigError

gguf = pytest.importorskip("gguf")

OPTS = BuildOptions(dtype="float32", progress=False)
GGUF_ARCH = {"qwen3": gguf.MODEL_ARCH.QWEN3, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE, "llama": gguf.MODEL_ARCH.LLAMA}


def write_gguf(model_dir, arch, path, drop=(), extra=None, tensors=None):
    """model_dir's weights as a GGUF file of `arch` (F32, names by gguf's own map; per-expert weights stacked into
    ffn_*_exps), its byte-level BPE vocabulary, and `extra` metadata (key -> int)."""
    config = json.loads((model_dir / "config.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    ids = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    n = config["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(n)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if "num_local_experts" in config:
        w.add_expert_count(config["num_local_experts"])
        w.add_expert_used_count(config["num_experts_per_tok"])
        if config.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(sorted(ids, key=ids.__getitem__))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], n)
    out = {}
    for hf, t in state.items():
        base, _, e = hf.rpartition(".weight")[0].partition(".experts.")
        if e:  # model.layers.0.mlp.experts.3.gate_proj: stacked by expert
            num, proj = e.split(".")
            out.setdefault(names.get_name(f"{base}.experts.{proj}") + ".weight", {})[int(num)] = t
        else:
            out[names.get_name(hf.removesuffix(".weight")) + ".weight"] = t
    for name, t in {**out, **(tensors or {})}.items():
        if name not in drop:
            t = torch.stack([t[i] for i in sorted(t)]) if isinstance(t, dict) else t
            w.add_tensor(name, t.float().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_mixtral_experts_in_a_llama_gguf_are_refused(tmp_path):
    """llama.cpp writes mixtral as arch llama with ffn_*_exps: transformers built a dense llama, its MLPs random."""
    model_dir = make_tiny_model(tmp_path / "hf", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    path = write_gguf(model_dir, "llama", tmp_path / "m.gguf")
    with pytest.raises(ModelSourceError, match=r"m\.gguf: a mixture of 4 experts in a 'llama' GGUF"):
        build(str(path), tmp_path / "out", OPTS)
    assert not (tmp_path / "out").exists()


def test_a_tensor_transformers_cannot_find_is_refused_by_name(tmp_path, capfd):
    """In pllm's one line alone: transformers' multi-line LOAD REPORT of the same tensor is held back."""
    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1)
    path = write_gguf(model_dir, "qwen3", tmp_path / "m.gguf", drop=("blk.1.ffn_down.weight",))
    capfd.readouterr()
    with pytest.raises(ModelSourceError, match=r"finds no values for 1 tensors of the qwen3 model "
                                               r"\('model\.layers\.1\.mlp\.down_proj\.weight'\)"):
        open_model(str(path))
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err


def test_a_held_load_report_is_shown_where_pllm_says_nothing_of_it(monkeypatch):
    import logging

    from pllm.compiler.gguf_source import held_load_report

    logger = logging.getLogger("transformers.modeling_utils")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    try:
        with held_load_report() as report:
            logger.warning("LlamaForCausalLM LOAD REPORT from: x\nkey | UNEXPECTED")
            logger.warning("another warning")  # not the report: passes as ever
            assert seen == ["another warning"]
            report.show()
        assert seen == ["another warning", "LlamaForCausalLM LOAD REPORT from: x\nkey | UNEXPECTED"]
    finally:
        logger.removeHandler(handler)


def _edit(path, edit) -> None:
    """Change numbers in the file's tables in place (gguf's reader over a writable map): edit(reader)."""
    reader = gguf.GGUFReader(str(path), "r+")
    edit(reader)
    reader.data.flush()
    del reader


def _tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def _set_offset(reader, name, offset) -> None:  # the tensor's offset within the data
    _tensor(reader, name).field.parts[-1][0] = offset


def _data_offset(reader, name) -> int:
    return _tensor(reader, name).data_offset - reader.data_offset


@pytest.mark.parametrize(("edit", "match"), [
    # transformers built the count's layers: blocks past it were dropped in silence
    (lambda r: r.fields["llama.block_count"].parts[-1].__setitem__(0, 1),
     r"llama\.block_count is 1 but the file's tensors hold blocks 0\.\.1 \(2 blocks\)"),
    # read from where the offset points: a misaligned start, a tensor over its neighbour, a type that is wider
    (lambda r: _set_offset(r, "blk.0.attn_q.weight", _data_offset(r, "blk.0.attn_q.weight") + 2),
     r"tensor 'blk\.0\.attn_q\.weight' starts at byte \d+ of the data, not a multiple of the file's alignment"),
    (lambda r: _set_offset(r, "blk.1.ffn_down.weight", 0),
     r"tensor '.*' \(\d+ bytes of F32\) runs into tensor 'blk\.1\.ffn_down\.weight': the tensor table is inconsistent"),
    (lambda r: _tensor(r, "blk.0.attn_q.weight").field.parts[-2].__setitem__(0, int(gguf.GGMLQuantizationType.F64)),
     r"tensor 'blk\.0\.attn_q\.weight' \(\d+ bytes of F64\) runs into tensor"),
    # numpy's or python's words before ("integer modulo by zero", "list index out of range"), not the key's
    (lambda r: r.fields["llama.attention.head_count"].parts[-1].__setitem__(0, 0),
     r"llama\.attention\.head_count is 0, not a positive whole number"),
    (lambda r: r.fields["tokenizer.ggml.bos_token_id"].parts[-1].__setitem__(0, 10**9),
     r"tokenizer\.ggml\.bos_token_id is 1000000000, but the file's vocabulary has \d+ tokens"),
], ids=["block-count-short", "misaligned", "overlapping", "wider-type", "no-heads", "bos-past-vocabulary"])
def test_a_gguf_whose_tables_contradict_themselves_is_refused(tmp_path, edit, match):
    """Tables a corrupt or hand-edited file gets wrong that transformers reads anyway, into another model: refused
    in one line before anything is built (as llama.cpp's loader refuses them), in bounded time and memory."""
    model_dir = make_tiny_model(tmp_path / "hf", "llama")
    path = write_gguf(model_dir, "llama", tmp_path / "m.gguf")
    open_model(str(path))  # the file as written reads
    _edit(path, edit)
    with pytest.raises(ModelSourceError, match=r"m\.gguf: " + match):
        build(str(path), tmp_path / "out", OPTS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("key", "value", "named"), [
    ("llama.context_length", 2**31, "key 'max_position_embeddings' (llama.context_length in the file) is 2147483648"),
    ("llama.attention.layer_norm_rms_epsilon", 0.0,
     "key 'rms_norm_eps' (llama.attention.layer_norm_rms_epsilon in the file) must be a finite positive number"),
])
def test_a_gguf_value_pllm_refuses_is_named_by_the_files_key_too(tmp_path, key, value, named):
    """The config checks name transformers' keys; a GGUF file's user knows the file's."""
    model_dir = make_tiny_model(tmp_path / "hf", "llama")
    path = write_gguf(model_dir, "llama", tmp_path / "m.gguf")
    _edit(path, lambda r: r.fields[key].parts[-1].__setitem__(0, value))
    with pytest.raises(ConfigError, match=r"m\.gguf: " + re.escape(named)):
        build(str(path), tmp_path / "out", OPTS)


def test_a_truncated_gguf_is_refused_as_truncated(tmp_path):
    """Cut in its header, its tables or its tensor data: one line saying so with the byte counts, where numpy's
    words came before ("cannot reshape array of size ...", "When changing to a larger dtype ...")."""
    model_dir = make_tiny_model(tmp_path / "hf", "llama")
    whole = write_gguf(model_dir, "llama", tmp_path / "m.gguf").read_bytes()
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    cuts = {"in-header": 20, "tables": reader.data_offset - 100, "data": len(whole) - 1}
    del reader
    for where, size in cuts.items():
        path = tmp_path / f"cut-{where}.gguf"
        path.write_bytes(whole[:size])
        said = (rf"truncated: the file is {size} bytes, less than a GGUF header's 24" if size < 24 else
                rf"truncated or corrupt: the file ends at byte {size}, before data its tables place up to byte")
        with pytest.raises(ModelSourceError, match=rf"cut-{where}\.gguf: cannot read GGUF file: {said}"):
            build(str(path), tmp_path / "out", OPTS)
        assert not (tmp_path / "out").exists()
    (tmp_path / "empty.gguf").write_bytes(b"")  # numpy's "cannot mmap an empty file" before
    with pytest.raises(ModelSourceError, match=r"empty\.gguf: cannot read GGUF file: truncated: the file is 0 bytes"):
        build(str(tmp_path / "empty.gguf"), tmp_path / "out", OPTS)


def test_a_gguf_block_count_of_billions_fails_fast_in_bounded_memory(tmp_path):
    """Through the console entry point in a subprocess (memory capped, should it regress): transformers built
    2^32 - 1 layers for such a file, growing without bound."""
    model_dir = make_tiny_model(tmp_path / "hf", "llama")
    path = write_gguf(model_dir, "llama", tmp_path / "m.gguf")
    _edit(path, lambda r: r.fields["llama.block_count"].parts[-1].__setitem__(0, 2**32 - 1))
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # noqa: E731
    proc = subprocess.run([sys.executable, "-m", "pllm.compiler.cli", str(path), "-o", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, timeout=120, preexec_fn=cap)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("pllm-compile: error:"), proc.stderr[-2000:]
    assert "llama.block_count is 4294967295 but the file's tensors hold blocks 0..1 (2 blocks)" in lines[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, extra", [("m-00001-of-00002.gguf", {}), ("m.gguf", {"split.count": 2})])
def test_a_split_gguf_shard_is_refused(tmp_path, name, extra):
    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1)
    path = write_gguf(model_dir, "qwen3", tmp_path / name, extra=extra)
    with pytest.raises(ModelSourceError, match="of a split GGUF .*merge them first"):
        open_model(str(path))


def test_the_tokenizer_comes_from_the_file_not_its_folder(tmp_path):
    """A foreign tokenizer.json beside the file (a GGUF in its HF folder, or anything else) is not read."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1)
    path = write_tiny_gguf(model_dir, "qwen3")
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    foreign = Tokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign.train_from_iterator(["zebra yak quokka " * 50], trainers.BpeTrainer(
        vocab_size=len(vocab) // 2 + 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    foreign.save(str(model_dir / "tokenizer.json"))
    assert (model_dir / "tokenizer_config.json").is_file()  # with it, transformers prefers the folder's tokenizer
    source = open_model(str(path))
    try:
        read = json.loads((source.tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
        assert read == vocab
    finally:
        source.close()


def _qwen3_moe(tmp_path, inter):
    model_dir = make_tiny_model(tmp_path / "hf", "qwen3_moe", num_experts=4, num_experts_per_tok=2, head_dim=16,
                                moe_intermediate_size=inter)
    return model_dir, write_gguf(model_dir, "qwen3moe", tmp_path / "moe.gguf")


def test_qwen3_moe_gguf_matches_transformers(tmp_path):
    """transformers reads the experts fused; the build reads them per expert, split, and generates as transformers."""
    import transformers

    model_dir, path = _qwen3_moe(tmp_path, 768)  # the width transformers' GGUF reader assumes (it reads no other)
    out = build(str(path), tmp_path / "build", OPTS)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    hf.generation_config.eos_token_id = None
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 24)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for result in llm.generate(["Hello, world!", "The quick brown fox", "numbers 0123456789"], params,
                               use_tqdm=False):
        ids = torch.tensor([result.prompt_token_ids])
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert result.outputs[0].token_ids == ref, result.prompt


def test_sizes_transformers_takes_from_defaults_are_refused_in_one_line(tmp_path):
    _, path = _qwen3_moe(tmp_path / "moe", 96)
    with pytest.raises(ModelSourceError, match=r"qwen3moe\.expert_feed_forward_length is 96 but transformers' GGUF "
                                               r"reader builds moe_intermediate_size 768") as e:
        open_model(str(path))
    assert "\n" not in str(e.value) and "ignore_mismatched_sizes" not in str(e.value)
    model_dir = make_tiny_model(tmp_path / "hd", "qwen3", head_dim=16)
    with pytest.raises(ModelSourceError, match=r"qwen3\.attention\.key_length is 16 but transformers' GGUF reader "
                                               r"builds head_dim 128"):
        open_model(str(write_tiny_gguf(model_dir, "qwen3")))


def test_a_family_pllm_lacks_is_refused_by_its_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelSourceError, match=r"m\.gguf: GGUF architecture 'qwen2moe' is not supported"):
        open_model(str(path))


def test_quantization_gguf_on_a_float_file_is_refused(tmp_path):
    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1)
    path = write_gguf(model_dir, "qwen3", tmp_path / "m.gguf")
    options = BuildOptions(dtype="float32", progress=False, quantization=Quantization.GGUF)
    with pytest.raises(ModelSourceError, match=r"--quantization gguf keeps .* the file's layer matrices are F32"):
        build(str(path), tmp_path / "out", options)


def test_a_tokenizer_that_loads_but_cannot_encode_is_refused(tmp_path):
    """(What a gemma3 GGUF with a GPT-2 vocabulary gave: a BPE whose unknown token is not in its vocabulary.)"""
    model_dir = make_tiny_model(tmp_path / "hf", "qwen3", head_dim=128, num_attention_heads=2, num_key_value_heads=1)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = None  # raw characters reach the BPE, which lacks ' ' and ','
    tok["model"]["unk_token"] = "None"
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelSourceError, match=r"tokenizer in .*tokenizer\.json.* loads but cannot encode"):
        build(str(model_dir), tmp_path / "out", OPTS)
    shutil.rmtree(tmp_path / "hf")
