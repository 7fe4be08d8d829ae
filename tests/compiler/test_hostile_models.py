"""pllm-compile on broken and hostile model folders: one-line errors naming the file, nothing written or touched."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cli_checks import run_cli, snapshot
from safetensors.torch import load_file, save_file

LAYER1_DOWN = "model.layers.1.mlp.down_proj.weight"


def edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def edit_weights(model: Path, **changes) -> None:
    tensors = load_file(str(model / "model.safetensors"))
    tensors.update({k.replace("__", "."): v for k, v in changes.items()})
    save_file(tensors, str(model / "model.safetensors"))


def with_index(model: Path, **entries) -> None:
    names = load_file(str(model / "model.safetensors"))
    weight_map = {name: "model.safetensors" for name in names} | entries
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def truncate(file: Path, keep: int) -> None:
    file.write_bytes(file.read_bytes()[:keep])


def split_shards(model: Path, shared: str) -> None:
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]} | {shared: tensors[shared]}, str(model / "a.safetensors"))
    save_file({k: tensors[k] for k in names[1::2]} | {shared: tensors[shared]}, str(model / "b.safetensors"))


def outside_shard(model: Path) -> str:
    """A valid shard outside the model folder, reached through a symlink inside it."""
    outside = model.parent / "elsewhere"
    outside.mkdir()
    shutil.move(model / "model.safetensors", outside / "model.safetensors")
    (model / "model.safetensors").symlink_to(outside / "model.safetensors")
    return "model.safetensors"


def nan_in(model: Path, name: str, value: float) -> None:
    t = load_file(str(model / "model.safetensors"))[name].clone()
    t[0, 0] = value
    edit_weights(model, **{name.replace(".", "__"): t})


# case id -> (mutation of a copy of the tiny llama folder, words the error must hold; "{m}" is the model folder)
CASES = {
    "truncated mid-tensor": (lambda m: truncate(m / "model.safetensors", -100), ["{m}/model.safetensors"]),
    "corrupt header": (
        lambda m: (m / "model.safetensors").write_bytes(b"\x20\0\0\0\0\0\0\0{not json at all..............}"),
        ["{m}/model.safetensors", "header"],
    ),
    "header length past the end": (
        lambda m: (m / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}"),
        ["{m}/model.safetensors"],
    ),
    "config is a list": (lambda m: (m / "config.json").write_text("[1, 2]"), ["{m}/config.json", "JSON object"]),
    "config is empty": (lambda m: (m / "config.json").write_text("{}"), ["{m}/config.json", "model_type"]),
    "config is not JSON": (lambda m: (m / "config.json").write_text("{oops"), ["{m}/config.json", "JSON"]),
    "config is binary": (lambda m: (m / "config.json").write_bytes(b"\xff\xfe\x00"), ["{m}/config.json"]),
    "config is a directory": (
        lambda m: ((m / "config.json").unlink(), (m / "config.json").mkdir()),
        ["{m}/config.json", "not a file"],
    ),
    "config is a fifo": (
        lambda m: ((m / "config.json").unlink(), os.mkfifo(m / "config.json")),
        ["{m}/config.json", "not a file"],
    ),
    "eos_token_id abc": (lambda m: edit_config(m, eos_token_id="abc"), ["{m}/config.json", "eos_token_id", "'abc'"]),
    "eos_token_id list of str": (
        lambda m: edit_config(m, eos_token_id=[1, "x"]),
        ["{m}/config.json", "eos_token_id", "'x'"],
    ),
    "sliding_window abc": (
        lambda m: edit_config(m, model_type="mistral", sliding_window="abc"),  # llama reads no window
        ["{m}/config.json", "sliding_window", "'abc'"],
    ),
    "max_position_embeddings 1e15": (
        lambda m: edit_config(m, max_position_embeddings=10**15),
        ["{m}/config.json", "max_position_embeddings", str(10**15)],
    ),
    "negative rope_theta": (lambda m: edit_config(m, rope_theta=-1.0), ["{m}/config.json", "rope_theta", "-1.0"]),
    "NaN rms_norm_eps": (
        lambda m: (m / "config.json").write_text(
            (m / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN')
        ),
        ["{m}/config.json", "rms_norm_eps", "nan"],
    ),
    "hidden_size 0": (lambda m: edit_config(m, hidden_size=0), ["{m}/config.json", "hidden_size", "0"]),
    "1e9 layers": (
        lambda m: edit_config(m, num_hidden_layers=10**9),
        ["{m}/config.json", "num_hidden_layers", "1000000000", "layers 0..1"],
    ),
    "more weights than layers": (
        lambda m: edit_config(m, num_hidden_layers=1),
        ["{m}/config.json", "num_hidden_layers", "layers 0..1"],
    ),
    "huge vocab, tiny weights": (
        lambda m: edit_config(m, vocab_size=10**9),
        ["{m}/config.json", "vocab_size", "model.embed_tokens.weight"],
    ),
    "garbage tokenizer.json": (lambda m: (m / "tokenizer.json").write_text("garbage"), ["{m}/tokenizer.json"]),
    "tokenizer.json outside": (
        lambda m: ((m / "tokenizer.json").unlink(), (m / "tokenizer.json").symlink_to("/etc/passwd")),
        ["{m}/tokenizer.json", "outside the model folder"],
    ),
    "NaN weight": (lambda m: nan_in(m, LAYER1_DOWN, float("nan")), ["{m}/model.safetensors", LAYER1_DOWN, "NaN"]),
    "Inf weight": (
        lambda m: nan_in(m, "lm_head.weight", float("-inf")),
        ["{m}/model.safetensors", "lm_head.weight", "infinite"],
    ),
    "int8 weight": (
        lambda m: edit_weights(m, model__norm__weight=torch.ones(64, dtype=torch.int8)),
        ["{m}/model.safetensors", "model.norm.weight", "int8"],
    ),
    "bool weight": (
        lambda m: edit_weights(m, lm_head__weight=torch.ones(len_vocab(m), 64, dtype=torch.bool)),
        ["{m}/model.safetensors", "lm_head.weight", "bool"],
    ),
    "duplicate tensor across shards": (
        lambda m: split_shards(m, "model.norm.weight"),
        ["{m}/b.safetensors", "model.norm.weight", "a.safetensors"],
    ),
    "index not JSON": (
        lambda m: (m / "model.safetensors.index.json").write_text("{"),
        ["{m}/model.safetensors.index.json", "JSON"],
    ),
    "index is a list": (
        lambda m: (m / "model.safetensors.index.json").write_text("[]"),
        ["{m}/model.safetensors.index.json", "JSON object"],
    ),
    "index entry not a string": (
        lambda m: with_index(m, **{"model.norm.weight": 5}),
        ["{m}/model.safetensors.index.json", "model.norm.weight", "5"],
    ),
    "index entry in the wrong shard": (
        lambda m: (save_file({"x": torch.ones(1)}, str(m / "other.safetensors")),
                   with_index(m, **{"model.norm.weight": "other.safetensors"})),
        ["{m}/other.safetensors", "model.norm.weight", "model.safetensors.index.json"],
    ),
    "index entry ../../etc/passwd": (
        lambda m: with_index(m, **{"model.norm.weight": "../../../../../../../../etc/passwd"}),
        ["{m}/model.safetensors.index.json", "model.norm.weight", "../etc/passwd", "outside"],
    ),
    "index entry absolute": (
        lambda m: with_index(m, **{"model.norm.weight": "/etc/passwd"}),
        ["{m}/model.safetensors.index.json", "model.norm.weight", "/etc/passwd", "outside"],
    ),
    "index entry symlink out": (
        lambda m: with_index(m, **{"model.norm.weight": outside_shard(m)}),
        ["{m}/model.safetensors.index.json", "weight_map entry", "outside"],
    ),
    "weights symlink out": (lambda m: outside_shard(m), ["{m}/model.safetensors", "outside"]),
}


def add_token(model: Path, content: str, token_id: int) -> None:
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": token_id, "content": content, "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (model / "tokenizer.json").write_text(json.dumps(tok))


def len_vocab(model: Path) -> int:
    return json.loads((model / "config.json").read_text())["vocab_size"]


@pytest.fixture
def model(tiny_dir, tmp_path):
    return Path(shutil.copytree(tiny_dir("llama"), tmp_path / "model"))


@pytest.mark.parametrize("case", list(CASES))
def test_broken_model_folder(case, model, tmp_path, capsys):
    mutate, words = CASES[case]
    mutate(model)
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(tmp_path)
    line = run_cli([str(model), "-o", str(work / "out")], capsys)
    for w in words:
        assert w.format(m=model) in line, (w, line)
    assert snapshot(tmp_path) == before  # nothing written, nothing touched, no .tmp-/.old- siblings


def test_garbage_gguf(tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + os.urandom(200))
    before = snapshot(tmp_path)
    line = run_cli([str(tmp_path / "model.gguf"), "-o", str(tmp_path / "out")], capsys)
    assert f"{tmp_path}/model.gguf" in line and "GGUF" in line
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_weights(model, tmp_path, capsys):
    (model / "model.safetensors").chmod(0)
    line = run_cli([str(model), "-o", str(tmp_path / "out")], capsys)
    assert f"{model}/model.safetensors" in line and not (tmp_path / "out").exists()


def test_tokenizer_ids_past_the_embedding_are_said_at_compile_and_refused_in_prompts(model, tmp_path, caplog):
    """A tokenizer holding ids past the model's embedding rows (transformers adds such tokens to some, as gemma's
    '<mask>' read from a GGUF) compiles, saying so; a prompt whose text encodes to one is refused naming the id (it
    failed in torch's embedding with a bare IndexError), and other prompts run."""
    from pllm import LLM, SamplingParams
    from pllm.compiler.build import BuildOptions, build

    vocab = len_vocab(model)
    add_token(model, "<big>", vocab)
    with caplog.at_level("WARNING", logger="pllm"):
        out = build(str(model), tmp_path / "out", BuildOptions(dtype="float32", progress=False))
    said = f"1 token(s) past the model's {vocab} embedding rows ('vocab_size'), first '<big>' (id {vocab})"
    assert said in caplog.text
    llm = LLM(out, backend="cpu", kv_cache_memory=1 << 22)
    with pytest.raises(ValueError, match=rf"prompt encodes to token id {vocab} \('<big>'\), outside the model's "
                                         rf"vocabulary \[0, {vocab}\)"):
        llm.generate(["Hello <big> there"], SamplingParams(max_tokens=2))
    assert len(llm.generate(["Hello there"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2
