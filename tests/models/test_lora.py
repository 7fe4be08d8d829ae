"""Reading PEFT adapters: what is accepted, what is refused (naming the adapter, the file and the problem)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from pllm.compiler.spec import spec_from_config
from pllm.models.lora import MAX_LORAS, LoraError, LoraInputs, read_adapter, stack_adapters
from pllm.runtime.engine.config import MAX_LORAS_LIMIT, EngineConfig


@pytest.fixture()
def spec(tiny_dir):
    config = json.loads((tiny_dir("llama") / "config.json").read_text())
    return spec_from_config(config, "config.json")


def copy_adapter(src, dst, config_edit=None, tensors_edit=None):
    shutil.copytree(src, dst)
    if config_edit:
        f = dst / "adapter_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), **config_edit}))
    if tensors_edit:
        f = dst / "adapter_model.safetensors"
        tensors = load_file(f)
        tensors_edit(tensors)
        save_file(tensors, f)
    return dst


def test_reads_peft_adapters_with_scaling_folded(spec, tiny_loras):
    alpha = read_adapter("alpha", tiny_loras["alpha"], spec)
    assert alpha.rank == 8 and alpha.scaling == 2.0 and len(alpha.weights) == 7 * spec.num_hidden_layers
    raw = load_file(tiny_loras["alpha"] / "adapter_model.safetensors")
    a, b = alpha.weights[(1, "v_proj")]
    assert torch.equal(a, raw["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])
    assert torch.equal(b, raw["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] * 2.0)
    gamma = read_adapter("gamma", tiny_loras["gamma"], spec)  # rslora: alpha / sqrt(r)
    assert gamma.scaling == 8 / 4 and {m for _, m in gamma.weights} == {"o_proj", "gate_proj", "down_proj"}


def test_stacks_pad_ranks_and_lay_fused_targets_block_diagonally(spec, tiny_loras):
    adapters = [read_adapter(n, tiny_loras[n], spec) for n in ("alpha", "beta")]  # ranks 8 and 4
    layer = stack_adapters(adapters, spec, torch.float32, torch.device("cpu"))[0]
    assert layer.qkv.a.shape == (2, 3 * 8, spec.hidden_size)
    assert layer.qkv.b.shape == (2, spec.q_size + 2 * spec.kv_size, 3 * 8)
    beta = adapters[1]
    assert torch.equal(layer.qkv.b[1, : spec.q_size, :4], beta.weights[(0, "q_proj")][1])
    assert not layer.qkv.b[1, : spec.q_size, 4:].any()  # padding and the other modules' rank columns stay zero
    assert not layer.qkv.a[1, 8:16].any()  # beta does not adapt k_proj
    x = torch.randn(3, spec.hidden_size)
    fused = x @ layer.qkv.a[1].T @ layer.qkv.b[1].T
    q_a, q_b = beta.weights[(0, "q_proj")]
    torch.testing.assert_close(fused[:, : spec.q_size], x @ q_a.T @ q_b.T)


def test_grouping_by_adapter():
    lora = LoraInputs.from_slots([(0, 1, 2), (1, 2, 0), (2, 3, 1), (3, 7, 2)], torch.device("cpu"))
    assert lora.token_rows.tolist() == [2, 0, 3, 4, 5, 6] and lora.group_start_host == (0, 1, 6)
    assert lora.group_adapter_host == (0, 1) and lora.max_group_tokens == 5
    assert LoraInputs.from_slots([(0, 4, 0)], torch.device("cpu")) is None


def test_target_modules_match_as_peft_matches_them(spec, tiny_loras, tmp_path):
    """peft matches a list entry by '.'-suffix (a bare name, or the full path it writes for "all-linear" on a small
    model) and a string as a regex over the whole path; a path may pick some layers, the others keep the base."""
    everything = read_adapter("alpha", tiny_loras["alpha"], spec).weights
    paths = [f"model.layers.{i}.{'mlp' if m.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{m}"
             for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    full = copy_adapter(tiny_loras["alpha"], tmp_path / "full", {"target_modules": paths})
    assert read_adapter("full", full, spec).weights.keys() == everything.keys()
    regex = copy_adapter(tiny_loras["alpha"], tmp_path / "regex", {"target_modules": r".*\.(self_attn|mlp)\..*"})
    assert read_adapter("regex", regex, spec).weights.keys() == everything.keys()

    def layer_1_gone(tensors):
        for key in [k for k in tensors if ".layers.1." in k]:
            del tensors[key]

    layer_0 = [p for p in paths if ".layers.0." in p]
    one = copy_adapter(tiny_loras["alpha"], tmp_path / "one", {"target_modules": layer_0}, layer_1_gone)
    assert {layer for layer, _ in read_adapter("one", one, spec).weights} == {0}
    stacks = stack_adapters([read_adapter("one", one, spec)], spec, torch.float32, torch.device("cpu"))
    assert stacks[0].qkv is not None and stacks[1] == type(stacks[1])(None, None, None, None)
    # layer 1's tensors kept while target_modules selects layer 0 only: peft would not have written them
    stray = copy_adapter(tiny_loras["alpha"], tmp_path / "stray", {"target_modules": layer_0})
    with pytest.raises(LoraError, match="layer 1, which its target_modules do not select"):
        read_adapter("stray", stray, spec)


REFUSALS = [
    ({"target_modules": ["model.layers.7.self_attn.q_proj"]}, None,
     "unknown target module\\(s\\) \\['model.layers.7.self_attn.q_proj'\\].*layers 0..1"),
    ({"target_modules": ["model.layers.0.mlp.q_proj"]}, None, "unknown target module"),
    ({"target_modules": "(unclosed"}, None, "'target_modules'.*not a valid regular expression"),
    ({"target_modules": "lm_head"}, None, "unknown target module"),

    ({"r": 128}, None, "'r' is 128; the rank must be an integer in \\[1, 64\\]"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, None, "unknown target module\\(s\\) \\['embed_tokens'\\]"),
    ({"peft_type": "IA3"}, None, "only 'LORA'"),
    ({"use_dora": True}, None, "'use_dora'"),
    ({"bias": "all"}, None, "'bias'"),
    ({"modules_to_save": ["lm_head"]}, None, "'modules_to_save'"),
    (None, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 3)}),
     "has shape \\(8, 3\\), expected \\(8, 64\\)"),
    (None, lambda t: t.update({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64)}),
     "names layer 9; the model has 2"),
    (None, lambda t: t.pop("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"), "has no lora_B"),
    (None, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(3, 3)}), "is not a LoRA A/B weight"),
    (None, lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.full((8, 64),
                                                                                           float("nan"))}),
     "must be finite"),
]


@pytest.mark.parametrize("config_edit, tensors_edit, match", REFUSALS)
def test_bad_adapters_are_refused_by_name(spec, tiny_loras, tmp_path, config_edit, tensors_edit, match):
    bad = copy_adapter(tiny_loras["alpha"], tmp_path / "bad", config_edit, tensors_edit)
    with pytest.raises(LoraError, match=match) as info:
        read_adapter("bad", bad, spec)
    assert "'bad'" in str(info.value)


def test_missing_files_and_other_families_are_refused(spec, tiny_loras, tiny_dir, tmp_path):
    with pytest.raises(LoraError, match="not a directory"):
        read_adapter("a", tmp_path / "nowhere", spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraError, match="adapter_config.json not found"):
        read_adapter("a", tmp_path / "empty", spec)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(tiny_loras["alpha"] / "adapter_config.json", only_config)
    with pytest.raises(LoraError, match="adapter_model.safetensors not found"):
        read_adapter("a", only_config, spec)
    config = json.loads((tiny_dir("gemma3") / "config.json").read_text())
    gemma = spec_from_config(config, "config.json")
    with pytest.raises(LoraError, match="this model's family is 'gemma3'"):
        read_adapter("a", tiny_loras["alpha"], gemma)


def test_limits_agree_and_are_checked():
    assert MAX_LORAS_LIMIT == MAX_LORAS
    with pytest.raises(ValueError, match="max_loras"):
        EngineConfig(max_loras=MAX_LORAS + 1)
    with pytest.raises(ValueError, match="at most max_loras=1"):
        EngineConfig(max_loras=1, lora_modules=(("a", "/x"), ("b", "/y")))
    with pytest.raises(ValueError, match="distinct names"):
        EngineConfig(lora_modules=(("a", "/x"), ("a", "/y")))


def test_pllm_compile_refuses_a_bad_adapter(tiny_dir, tiny_loras, tmp_path):
    bad = copy_adapter(tiny_loras["beta"], tmp_path / "bad", {"r": 65})
    out = tmp_path / "build"
    cmd = [sys.executable, "-m", "pllm.compiler.cli", str(tiny_dir("llama")), "-o", str(out), "-q",
           "--lora", f"fine={tiny_loras['beta']}", "--lora", f"big={bad}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "LoRA adapter 'big'" in done.stderr and "'r' is 65" in done.stderr
    assert not out.exists()
    done = subprocess.run(cmd[:-4] + ["--lora", "noequals"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "expected NAME=PATH" in done.stderr
