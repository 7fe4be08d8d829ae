"""pllm-compile on unusual Hugging Face checkpoints: a malformed one is refused naming the file, tensor and config
key, nothing written; a valid but unusual one builds and its greedy tokens equal transformers' (fp32)."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from cli_checks import run_cli, snapshot
from safetensors.torch import load_file, save_file

from pllm import LLM, SamplingParams
from pllm.compiler.build import BuildOptions, build

ATTN0 = "model.layers.0.self_attn."
MLP1 = "model.layers.1.mlp."
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["Hello, world!", "def main():"]


def _edit(model: Path, change) -> None:
    tensors = load_file(str(model / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(model / "model.safetensors"))


def _move_rows(tensors: dict, into: str, out_of: str, rows: int) -> None:
    """`rows` rows of `out_of` moved onto the end of `into`: the concatenation of the two is unchanged."""
    both = torch.cat([tensors[into], tensors[out_of]])
    cut = tensors[into].shape[0] + rows
    tensors[into], tensors[out_of] = both[:cut].clone(), both[cut:].clone()


def _edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


# case id -> (model_type, mutation of a copy of its tiny folder, words the error must hold; "{m}" is the folder)
REFUSED = {
    # fused parts whose rows add up to the fused size but are split wrongly between q, k and v (or gate and up)
    "q_proj took k_proj rows": (
        "llama",
        lambda m: _edit(m, lambda t: _move_rows(t, ATTN0 + "q_proj.weight", ATTN0 + "k_proj.weight", 16)),
        ["{m}/model.safetensors", ATTN0 + "q_proj.weight", "(80, 64)", "(64, 64)", "{m}/config.json"],
    ),
    "v_proj took k_proj rows": (
        "qwen2",
        lambda m: _edit(m, lambda t: _move_rows(t, ATTN0 + "k_proj.bias", ATTN0 + "v_proj.bias", -8)),
        ["{m}/model.safetensors", ATTN0 + "k_proj.bias", "(24,)", "(32,)"],
    ),
    "gate and up halves unequal": (
        "llama",
        lambda m: _edit(m, lambda t: _move_rows(t, MLP1 + "gate_proj.weight", MLP1 + "up_proj.weight", 8)),
        ["{m}/model.safetensors", MLP1 + "gate_proj.weight", "(136, 64)", "(128, 64)", "{m}/config.json"],
    ),
    "gemma3 q_proj took k_proj rows": (
        "gemma3_text",
        lambda m: _edit(m, lambda t: _move_rows(t, ATTN0 + "q_proj.weight", ATTN0 + "k_proj.weight", 16)),
        ["{m}/model.safetensors", ATTN0 + "q_proj.weight", "(80, 64)"],
    ),
    "expert gate and up unequal": (
        "mixtral",
        lambda m: _edit(m, lambda t: _move_rows(t, "model.layers.0.block_sparse_moe.experts.1.w1.weight",
                                                "model.layers.0.block_sparse_moe.experts.1.w3.weight", 8)),
        ["{m}/model.safetensors", "experts.1.w1.weight", "(136, 64)", "(128, 64)"],
    ),
    "untied config, no lm_head": (
        "llama",
        lambda m: _edit(m, lambda t: t.pop("lm_head.weight")),
        ["{m}", "lm_head.weight", "{m}/config.json"],
    ),
    "fp8 weight": (
        "llama",
        lambda m: _edit(m, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.float8_e4m3fn)})),
        ["{m}/model.safetensors", "model.norm.weight", "float8_e4m3fn"],
    ),
}


def _shards(model: Path, second_copy: str | None = None, drop_shard: bool = False) -> None:
    """Two shards and their index; `second_copy`: that tensor of the first shard also stored (zeros) in the second;
    drop_shard: the second shard deleted."""
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    first, second = names[::2], names[1::2]
    assert second_copy is None or second_copy in first
    save_file({k: tensors[k] for k in first}, str(model / "a.safetensors"))
    extra = {second_copy: torch.zeros_like(tensors[second_copy])} if second_copy else {}
    save_file({k: tensors[k] for k in second} | extra, str(model / "b.safetensors"))
    weight_map = {k: "a.safetensors" for k in first} | {k: "b.safetensors" for k in second}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if drop_shard:
        (model / "b.safetensors").unlink()


REFUSED |= {
    # transformers loads every tensor of each shard the index names: the zeros in b.safetensors, not a's values
    "index shard holds a second copy": (
        "llama",
        lambda m: _shards(m, second_copy="model.norm.weight"),
        ["{m}/b.safetensors", "model.norm.weight", "a.safetensors", "model.safetensors.index.json", "ambiguous"],
    ),
    "index names a missing shard": (
        "llama",
        lambda m: _shards(m, drop_shard=True),
        ["{m}/b.safetensors", "model.safetensors.index.json", "missing"],
    ),
}


def _named_template(model: Path, name: str, text: str) -> None:
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / f"{name}.jinja").write_text(text)


def _config_template(model: Path, text: str) -> None:
    """The template in tokenizer_config.json, the older place, with no chat_template.jinja beside it."""
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": text}))


# chat templates serving could never render: each names the file, template and line (checked by the environment
# serving renders with, models/chat_template.py), where the build would fail every chat request instead
REFUSED |= {
    "chat template syntax error": (
        "llama",
        lambda m: (m / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"),
        ["{m}/chat_template.jinja", "chat template 'default'", "line 2", "unexpected '}}'"],
    ),
    "named template unknown filter": (
        "llama",
        lambda m: _named_template(m, "tool_use", "{{ tools | no_such_filter }}"),
        ["{m}/additional_chat_templates/tool_use.jinja", "chat template 'tool_use'", "line 1", "no_such_filter",
         "every chat request that picks 'tool_use' would fail"],
    ),
    "chat template nested past the parser's recursion": (  # a RecursionError traceback before
        "llama",
        lambda m: (m / "chat_template.jinja").write_text("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"),
        ["{m}/chat_template.jinja", "chat template 'default' nests too deeply to parse"],
    ),
    "template in tokenizer_config unclosed": (
        "qwen2",
        lambda m: _config_template(m, "{% if messages %}{{ messages[0]['content'] }}"),
        ["{m}/tokenizer_config.json", "chat template 'default'", "'endif'"],
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused(case, tiny_dir, tmp_path, capsys):
    model_type, mutate, words = REFUSED[case]
    model = Path(shutil.copytree(tiny_dir(model_type), tmp_path / "model"))
    mutate(model)
    before = snapshot(tmp_path)
    line = run_cli([str(model), "-o", str(tmp_path / "out"), "--dtype", "float32"], capsys)
    for w in words:
        assert w.format(m=model) in line, (w, line)
    assert snapshot(tmp_path) == before


def _garbage_bin(model: Path) -> None:
    """A pytorch_model.bin beside the safetensors, with other values: transformers reads the safetensors."""
    torch.save({k: torch.randn_like(v) for k, v in load_file(str(model / "model.safetensors")).items()},
               model / "pytorch_model.bin")


def _sharded_with_stray(model: Path) -> None:
    """Two shards and their index, plus a shard the index does not name holding other values of a tensor."""
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(model / file), metadata={"format": "pt"})
    weight_map = {k: file for file, part in shards.items() for k in part}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({"model.norm.weight": torch.zeros_like(tensors["model.norm.weight"])}, str(model / "stray.safetensors"))


def _symlinked_weights(model: Path) -> None:
    """The weights a symlink to a file inside the folder, as in an HF cache snapshot."""
    (model / "blobs").mkdir()
    shutil.move(model / "model.safetensors", model / "blobs" / "abc123")
    (model / "model.safetensors").symlink_to(Path("blobs") / "abc123")


def _float64(model: Path) -> None:
    _edit(model, lambda t: t.update({k: v.double() for k, v in t.items()}))


def _unplaced_biases(model: Path) -> None:
    """q/k/v biases that a llama config without attention_bias gives no place: transformers drops them."""
    def add(t: dict) -> None:
        for p in "qkv":
            t[ATTN0 + f"{p}_proj.bias"] = torch.full((t[ATTN0 + f"{p}_proj.weight"].shape[0],), 3.0)

    _edit(model, add)


def _inv_freq(model: Path) -> None:
    """An old llama checkpoint's stored rotary buffers: not weights, dropped without a word."""
    _edit(model, lambda t: t.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in (0, 1)}))


# case id -> (model_type, config overrides for the tiny model, mutation of a copy of its folder, words of the one
# warning the build must log, or None for none)
VALID = {
    "float64 weights": ("llama", {}, _float64, None),
    "bin beside safetensors": ("llama", {}, _garbage_bin, None),
    "sharded, stray shard": ("llama", {}, _sharded_with_stray, None),
    "symlinked weights": ("llama", {}, _symlinked_weights, None),
    "tied, no lm_head": ("qwen3", {"tie_word_embeddings": True}, lambda m: None, None),
    "phi3 sharded": ("phi3", {}, _sharded_with_stray, None),
    "gemma3 tied float64": ("gemma3_text", {"tie_word_embeddings": True}, _float64, None),
    "mixtral": ("mixtral", {}, lambda m: None, None),
    "stored inv_freq": ("llama", {}, _inv_freq, None),
    "biases the config has no place for": (
        "llama", {}, _unplaced_biases,
        ["{m}", "3 decoder tensors", "{m}/config.json", ATTN0 + "k_proj.bias", ATTN0 + "v_proj.bias"],
    ),
}


@pytest.mark.parametrize("case", list(VALID))
def test_valid_unusual_matches_hf(case, tiny_dir, tmp_path, caplog):
    model_type, overrides, mutate, warned = VALID[case]
    model = Path(shutil.copytree(tiny_dir(model_type, **overrides), tmp_path / "model", symlinks=True))
    mutate(model)
    with caplog.at_level(logging.WARNING, logger="pllm"):
        out = build(str(model), tmp_path / "out", BuildOptions(dtype="float32", progress=False))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == (0 if warned is None else 1), warnings
    for w in warned or []:
        assert w.format(m=model) in warnings[0], (w, warnings[0])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    llm = LLM(str(out), backend="cpu", kv_cache_memory=1 << 22)
    for result in llm.generate(PROMPTS, GREEDY, use_tqdm=False):
        ids = result.prompt_token_ids
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]
        assert result.outputs[0].token_ids == ref.tolist(), result.prompt

