"""Plan and render: deterministic files, StrictUndefined, per-model constants, templates free of arithmetic."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from pllm.compiler.plan import KernelPlan, make_plan
from pllm.compiler.render import TEMPLATE_DIR, make_environment, render_kernel, render_plan
from pllm.models.spec import ModelSpec

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                head_dim=128)


def _spec(fields: dict, eps: float = 1e-5) -> ModelSpec:
    return ModelSpec(model_type="llama", num_hidden_layers=1, vocab_size=128, rms_norm_eps=eps, rope_theta=1e4,
                     rope_scaling=None, max_position_embeddings=2048, tie_word_embeddings=False,
                     attention_bias=False, torch_dtype="float32", bos_token_id=1, eos_token_ids=(2,), **fields)


def _files(paths) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in paths}


def test_same_plan_gives_byte_identical_files(tmp_path):
    plan = make_plan(_spec(SMOLLM2), "bfloat16", 16)
    first = _files(render_plan(plan, tmp_path / "a"))
    second = _files(render_plan(make_plan(_spec(SMOLLM2), "bfloat16", 16), tmp_path / "b"))
    assert first == second
    assert sorted(first) == sorted(k.file_name for k in plan.kernels)


@pytest.mark.parametrize(
    ("other", "dtype", "block_size"),
    [(LLAMA_7B, "bfloat16", 16), (SMOLLM2, "float16", 16), (SMOLLM2, "bfloat16", 32)],
)
def test_different_shapes_give_different_files(tmp_path, other, dtype, block_size):
    base = _files(render_plan(make_plan(_spec(SMOLLM2), "bfloat16", 16), tmp_path / "base"))
    changed = _files(render_plan(make_plan(_spec(other), dtype, block_size), tmp_path / "other"))
    assert base != changed
    # the attention kernels read dtype and block size, so they always differ here
    assert base["prefill_attention.py"] != changed["prefill_attention.py"]


def test_rendered_files_are_python_with_launcher_and_private_kernel(tmp_path):
    for path in render_plan(make_plan(_spec(SMOLLM2), "float16", 16), tmp_path):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert path.stem in names, f"{path.name}: no public launcher {path.stem}()"
        assert any(n.startswith("_") and n.endswith("_kernel") for n in names), f"{path.name}: no _*_kernel"
        assert "aot_variants" in names
        assert "{{" not in path.read_text() and "{%" not in path.read_text()


def test_plan_computes_the_numbers():
    plan = make_plan(_spec(SMOLLM2, eps=1e-6), "float16", 16)
    rope = plan.kernel("rope_kv_write").constants
    assert (rope["HEAD_DIM"], rope["HALF_DIM"], rope["HALF_DIM_PAD"]) == (64, 32, 32)
    assert (rope["NUM_HEADS"], rope["NUM_HEADS_PAD"], rope["NUM_KV_HEADS_PAD"], rope["GROUP_SIZE"]) == (9, 16, 4, 3)
    assert plan.kernel("rms_norm").constants["BLOCK_H"] == 1024 and plan.kernel("rms_norm").options["mask_hidden"]
    assert plan.kernel("rms_norm").constants["EPS"] == 1e-6
    decode = plan.kernel("decode_attention")
    assert decode.constants["GROUP_PAD"] == 16 and not decode.options["mask_head_dim"]
    prefill = plan.kernel("prefill_attention").constants
    assert prefill["BLOCK_M"] == prefill["BLOCK_Q"] * prefill["GROUP_PAD"] and prefill["GROUP_PAD"] == 4
    odd = make_plan(_spec(dict(SMOLLM2, head_dim=80)), "float32", 32)
    assert odd.kernel("decode_attention").options["mask_head_dim"]
    assert odd.kernel("decode_attention").constants["HEAD_DIM_PAD"] == 128
    assert odd.kernel("decode_attention").constants["DOT_PRECISION"] == "ieee"


def test_manifest_is_json_and_names_every_file():
    plan = make_plan(_spec(SMOLLM2), "bfloat16", 32)
    manifest = json.loads(json.dumps(plan.to_manifest()))
    assert manifest["dtype"] == "bfloat16" and manifest["block_size"] == 32
    triton = {"rms_norm", "rope_kv_write", "decode_attention", "prefill_attention", "mlp", "lora_shrink",
              "lora_expand"}
    assert set(manifest["kernels"]) == triton | {"cpu_decode_attention", "cpu_prefill_attention", "cpu_rms_norm",
                                                  "cpu_rope_kv_write", "cpu_decode_step"}
    for name, entry in manifest["kernels"].items():
        suffix = "py" if name in triton else "cpp"
        assert entry["file"] == f"{name}.{suffix}" and entry["template"] == f"{name}.{suffix}.jinja"
        assert entry["constants"] == plan.kernel(name).constants


def test_missing_constant_is_an_error_not_an_empty_string():
    plan = make_plan(_spec(SMOLLM2), "float16", 16)
    kernel = plan.kernel("rms_norm")
    constants = {k: v for k, v in kernel.constants.items() if k != "EPS"}
    broken = dataclasses.replace(kernel, constants=constants)
    with pytest.raises(jinja2.UndefinedError, match="EPS"):
        render_kernel(make_environment(), broken)
    with pytest.raises(jinja2.UndefinedError, match="mask_hidden"):
        render_kernel(make_environment(), dataclasses.replace(kernel, options={}))


def test_bad_build_options_are_refused():
    with pytest.raises(ValueError, match="float64"):
        make_plan(_spec(SMOLLM2), "float64", 16)
    with pytest.raises(ValueError, match="block_size 24"):
        make_plan(_spec(SMOLLM2), "float16", 24)
    assert isinstance(make_plan(_spec(SMOLLM2), "float16", 16), KernelPlan)


EXPRESSION = re.compile(r"{{(.*?)}}")
PLAIN = re.compile(r"^\s*[A-Za-z_][A-Za-z0-9_]*\s*(\|\s*py\s*)?$")  # a name, optionally `| py`
STATEMENT = re.compile(r"{%-?\s*(if|elif|else|endif)\b(.*?)-?%}")


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATE_DIR.glob("*.jinja")))
def test_templates_decide_structure_only(template):
    """House style 5: numbers come from the plan; Jinja substitutes names and branches on options, no more."""
    text = (TEMPLATE_DIR / template).read_text()
    assert text.startswith("{#"), f"{template} must open with a comment block on its notation and options"
    for expression in EXPRESSION.findall(text):
        assert PLAIN.match(expression), f"{template}: arithmetic or logic in {{{{{expression}}}}}"
    for keyword, condition in STATEMENT.findall(text):
        if keyword in ("if", "elif"):
            option = re.fullmatch(r"\s*(not\s+)?[a-z_][a-z0-9_]*\s*", condition)
            assert option, f"{template}: {{% {keyword}{condition} %}}"
    assert "{% for" not in text and "{% set" not in text


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install ruff)")
@pytest.mark.parametrize(("fields", "dtype"), [(SMOLLM2, "float16"), (dict(SMOLLM2, head_dim=80), "float32")])
def test_rendered_files_pass_ruff(tmp_path, fields, dtype):
    """House style 6: a rendered kernel reads well on its own, so it passes the project's own lint."""
    render_plan(make_plan(_spec(fields), dtype, 16), tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(PYPROJECT), str(tmp_path)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
