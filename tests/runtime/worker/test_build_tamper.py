"""Loading a build refuses any change to its manifest or listed files, naming the file, and reads no unlisted file."""

import hashlib
import json
import os
import py_compile
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib.util import cache_from_source
from pathlib import Path

import pytest
import torch

from pllm import LLM, SamplingParams
from pllm.compiler.manifest import (
    MANIFEST,
    MANIFEST_DIGEST_KEY,
    TOKENIZER_BACKEND,
    TOKENIZER_SNAPSHOT,
    BuildDirError,
    manifest_digest,
    open_build,
)
from pllm.runtime.backends.cpu.cpu_kernels import choose_cpu_kernels
from pllm.runtime.worker.model_runner import select_backend
from pllm.runtime.worker.text_loader import load_generation_config, load_tokenizer, load_transformers_tokenizer

PROBE = "Hello, world! <|im_start|>user probe<|im_end|> ok<|endoftext|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
TRITON_BACKEND = "cuda" if torch.cuda.is_available() else "interpret"  # the Triton mode conftest fixed


@pytest.fixture(scope="session")
def pristine(tiny_build) -> Path:
    return tiny_build("llama")


@pytest.fixture(scope="session")
def listed(pristine) -> list[str]:
    return sorted(json.loads((pristine / MANIFEST).read_text())["files"])


@pytest.fixture(scope="session")
def pristine_tokens(pristine) -> dict:
    tok = load_tokenizer(open_build(pristine))
    return {"ids": tok.encode(PROBE), "eos": tok.eos_token_id, "pad": tok.pad_token_id, "len": len(tok)}


@pytest.fixture
def copy(pristine, tmp_path) -> Callable[[], Path]:
    count = iter(range(10_000))

    def make() -> Path:
        return Path(shutil.copytree(pristine, tmp_path / f"build{next(count)}"))

    return make


def _refused(build: Path, names: Path, load: Callable = open_build) -> str:
    with pytest.raises(BuildDirError) as info:
        load(build)
    message = str(info.value)
    assert str(names) in message, message
    return message


def _edit_manifest(build: Path, edit: Callable[[dict], object], resign: bool = False) -> None:
    f = build / MANIFEST
    manifest = json.loads(f.read_text())
    replaced = edit(manifest)
    manifest = manifest if replaced is None else replaced
    if resign:  # a consistent digest: what the loader checks beyond it
        manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    f.write_text(json.dumps(manifest, indent=2))


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _to_dir(f: Path) -> None:
    f.unlink()
    f.mkdir()
    (f / "inner").write_text("x")


FILE_TAMPERS = {
    "one byte": _flip_byte,
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "deleted": Path.unlink,
    "a directory": _to_dir,
}


@pytest.mark.parametrize("tamper", FILE_TAMPERS)
def test_every_listed_file_tampered_is_named(copy, listed, tamper):
    assert "model.safetensors" in listed and "tokenizer.json" in listed and len(listed) >= 10
    for rel in listed:
        build = copy()
        FILE_TAMPERS[tamper](build / rel)
        _refused(build, build / rel)


def _set(keys: list[str], value) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *parents, key = keys
        for p in parents:
            m = m[p]
        m[key] = value

    return edit


def _drop(keys: list[str]) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        *parents, key = keys
        for p in parents:
            m = m[p]
        del m[key]

    return edit


def _scale_spec(key: str, factor) -> Callable[[dict], None]:
    return lambda m: m["spec"].update({key: m["spec"][key] * factor})


def _flip_digest(m: dict) -> None:
    rel = sorted(m["files"])[0]
    m["files"][rel] = ("0" if m["files"][rel][0] != "0" else "1") + m["files"][rel][1:]


MANIFEST_EDITS = {
    "rms_norm_eps": _scale_spec("rms_norm_eps", 10),
    "rope_theta": _scale_spec("rope_theta", 2),
    "max_position_embeddings": _scale_spec("max_position_embeddings", 2),
    "eos_token_ids": lambda m: m["spec"]["eos_token_ids"].append(0),
    "block_size": _set(["block_size"], 32),
    "dtype": _set(["dtype"], "bfloat16"),
    "a file digest": _flip_digest,
    "key dropped": _drop(["versions"]),
    "own digest dropped": _drop([MANIFEST_DIGEST_KEY]),
    "key added": _set(["extra"], 1),
    "a JSON list": lambda m: list(m.items()),
    "outside ../x": lambda m: m["files"].update({"../x": "0" * 64}),
    "outside absolute": lambda m: m["files"].update({"/etc/hostname": "0" * 64}),
}
# Consistent digest, malformed content: named by its key, never a KeyError or TypeError.
RESIGNED_EDITS = {
    "outside ../x": (lambda m: m["files"].update({"../x": "0" * 64}), "'files'"),
    "outside absolute": (lambda m: m["files"].update({"/etc/hostname": "0" * 64}), "'files'"),
    "outside kernels/..": (lambda m: m["files"].update({"kernels/../hf_config.json": "0" * 64}), "'files'"),
    "spec missing": (_drop(["spec"]), "'spec'"),
    "spec field type": (_set(["spec", "rope_theta"], "big"), "'spec.rope_theta'"),
    "spec field missing": (_drop(["spec", "head_dim"]), "'spec'"),
    "block_size type": (_set(["block_size"], "16"), "'block_size'"),
    "dtype unknown": (_set(["dtype"], "int4"), "'dtype'"),
    "files entry type": (_set(["files", "tokenizer.json"], 7), "'files.tokenizer.json'"),
    "files a list": (_set(["files"], ["model.safetensors"]), "'files'"),
    "weights unlisted": (_set(["weights"], ["other.safetensors"]), "'weights'"),
    "tokenizer file unlisted": (lambda m: m["tokenizer_files"].append("vocab.json"), "'tokenizer_files'"),
    "tokenizer snapshot without its backend": (lambda m: m["tokenizer_files"].remove(TOKENIZER_BACKEND),
                                               "'tokenizer_files'"),
    "library unlisted": (_set(["cpu_kernels", "libraries", "cpu_decode_attention"], "x.so"), "cpu_decode_attention"),
    "format_version": (_set(["format_version"], 1), "rebuild it"),
    "kernel op missing": (_drop(["kernels", "kernels", "rms_norm", "op"]), "'kernels.kernels.rms_norm.op'"),
    "kernel language unknown": (_set(["kernels", "kernels", "mlp", "language"], "cuda"),
                                "'kernels.kernels.mlp.language'"),
}


def test_every_manifest_edit_is_named(copy):
    for what, edit in MANIFEST_EDITS.items():
        build = copy()
        _edit_manifest(build, edit)
        message = _refused(build, build / MANIFEST)
        assert "digest does not match" in message or what == "a JSON list", (what, message)
    build = copy()
    (build / MANIFEST).write_text((build / MANIFEST).read_text()[:-20])
    assert "not valid JSON" in _refused(build, build / MANIFEST)


def test_malformed_manifest_with_a_valid_digest_is_named(copy):
    for what, (edit, key) in RESIGNED_EDITS.items():
        build = copy()
        _edit_manifest(build, edit, resign=True)
        assert key in _refused(build, build / MANIFEST), what


def test_manifest_edit_is_refused_by_the_llm(copy):
    build = copy()
    _edit_manifest(build, _scale_spec("rope_theta", 2))
    _refused(build, build / MANIFEST, lambda b: LLM(str(b), backend="cpu"))


@pytest.mark.parametrize("rel", ["model.safetensors", "kernels/rms_norm.py", "hf_config.json"])
def test_a_tampered_file_is_refused_by_the_llm(copy, rel):
    """The engine hashes the build's files on a thread beside the tokenizer: still every one, still named."""
    build = copy()
    _flip_byte(build / rel)
    _refused(build, build / rel, lambda b: LLM(str(b), backend="cpu"))


def test_files_changed_after_verification_are_refused_when_read(copy):
    """The tokenizer, generation config and kernels are hashed as they are read, not only when the build opens."""
    build = copy()
    loaded = open_build(build)
    cases = [
        (TOKENIZER_BACKEND, lambda: load_tokenizer(loaded)),  # (each case's change stays: the backend's first)
        (TOKENIZER_SNAPSHOT, lambda: load_tokenizer(loaded)),
        ("tokenizer.json", lambda: load_transformers_tokenizer(loaded)),  # a build without a snapshot reads these
        ("generation_config.json", lambda: load_generation_config(loaded)),
        ("kernels/rms_norm.py", lambda: select_backend(TRITON_BACKEND, loaded)),
    ]
    if choose_cpu_kernels(loaded).attention is not None:  # this machine runs the build's cpu kernels
        cases.append(("kernels/cpu_decode_attention.so", lambda: choose_cpu_kernels(loaded)))
    for rel, load in cases:
        _flip_byte(build / rel)
        _refused(build, build / rel, lambda _, load=load: load())


def test_garbage_tokenizer_and_generation_config_are_named(copy):
    for rel, data, why in [
        ("tokenizer.json", b"garbage", "not valid JSON"),
        ("tokenizer_config.json", b"[1, 2]", "must be a JSON object"),
        ("generation_config.json", b'{"eos_token_id": "two"}', "'eos_token_id'"),
        ("tokenizer.json", b'{"version": "1.0"}', "do not load"),
        (TOKENIZER_SNAPSHOT, b"garbage", "not valid JSON"),
        (TOKENIZER_BACKEND, b'{"version": "1.0"}', "does not load"),
        (TOKENIZER_BACKEND, b"\xff\xfe", "does not load"),
        (TOKENIZER_SNAPSHOT, b'{"format": 1}', "compile the model again"),
        (TOKENIZER_SNAPSHOT, b'{"format": 99}', "compile the model again"),
    ]:
        build = copy()
        (build / rel).write_bytes(data)
        _edit_manifest(build, _set(["files", rel], hashlib.sha256(data).hexdigest()), resign=True)
        # the tokenizer files proper are read only for a build without a snapshot (or for xgrammar)
        load = {"generation_config.json": load_generation_config, TOKENIZER_SNAPSHOT: load_tokenizer,
                TOKENIZER_BACKEND: load_tokenizer}.get(rel, load_transformers_tokenizer)
        named = build if why == "do not load" else build / rel  # the tokenizer files proper are named together
        message = _refused(build, named, lambda b, load=load: load(open_build(b)))
        assert why in message and "\n" not in message, message


STRAY_TOKENIZER_FILES = {
    "special_tokens_map.json": {"eos_token": "<|endoftext|>", "pad_token": "<|im_start|>", "bos_token": "<|im_end|>"},
    "added_tokens.json": {"probe": 400, "world": 401},
}


@pytest.mark.parametrize("name", STRAY_TOKENIZER_FILES)
def test_stray_tokenizer_files_have_no_effect(copy, pristine_tokens, name):
    build = copy()
    assert name not in json.loads((build / MANIFEST).read_text())["files"]
    (build / name).write_text(json.dumps(STRAY_TOKENIZER_FILES[name]))
    for load in (load_tokenizer, load_transformers_tokenizer):  # the snapshot, and the files without one
        tok = load(open_build(build))
        assert {"ids": tok.encode(PROBE), "eos": tok.eos_token_id, "pad": tok.pad_token_id, "len": len(tok)} == (
            pristine_tokens
        )


def test_stray_generation_config_is_not_read(copy):
    """A build made from a model without generation_config.json: one dropped in later is ignored."""
    build = copy()

    def unlist(m: dict) -> None:
        del m["files"]["generation_config.json"]
        m["tokenizer_files"].remove("generation_config.json")

    _edit_manifest(build, unlist, resign=True)
    (build / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    assert load_generation_config(open_build(build)) == {}


def test_stray_files_leave_the_engine_unchanged(copy, pristine):
    """Stray tokenizer files, an unlisted library and bytecode beside the Triton kernels change nothing."""
    build = copy()
    for name, content in STRAY_TOKENIZER_FILES.items():
        (build / name).write_text(json.dumps(content))
    shutil.copyfile(build / "kernels" / "cpu_rope_kv_write.so", build / "kernels" / "cpu_rms_norm.so")
    bad = build.parent / "bad_kernel.py"
    bad.write_text("raise RuntimeError('stray bytecode ran')\n")
    for kernel in (build / "kernels").glob("*.py"):  # used whatever the source says, if a loader looks for it
        py_compile.compile(str(bad), cfile=cache_from_source(str(kernel)),
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    loaded = open_build(build)
    assert choose_cpu_kernels(loaded).rms_norm is None  # float32 build: its manifest lists no RMSNorm library
    select_backend(TRITON_BACKEND, loaded)
    outputs = [LLM(str(b), backend="cpu").generate([PROBE], GREEDY, use_tqdm=False)[0] for b in (pristine, build)]
    assert outputs[0].prompt_token_ids == outputs[1].prompt_token_ids
    assert outputs[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids


def test_serve_names_the_tampered_file_and_exits(copy):
    build = copy()
    _flip_byte(build / "tokenizer.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "pllm.runtime.server", str(build), "--port", "0"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and str(build / "tokenizer.json") in errors[0], result.stderr
