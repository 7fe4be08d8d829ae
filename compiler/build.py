"""Model source -> build directory: runtime-layout weights, kernels, tokenizer, manifest; written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pllm.compiler.cpu_compile import compile_cpu_kernels
from pllm.compiler.plan import make_plan
from pllm.compiler.render import render_plan
from pllm.compiler.source import ModelSource, copy_tokenizer_files, open_model
from pllm.compiler.spec import DTYPES, ModelSpec, spec_from_config
from pllm.models.llama import weight_layout

FORMAT_VERSION = 2  # 2: the manifest records its own digest (MANIFEST_DIGEST_KEY)
MANIFEST = "manifest.json"
MANIFEST_DIGEST_KEY = "manifest_sha256"
WEIGHTS_FILE = "model.safetensors"
KERNELS_DIR = "kernels"
logger = logging.getLogger("pllm")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BuildError(ValueError):
    """The model cannot be compiled; the message names the key, tensor or file."""


@dataclass(frozen=True)
class BuildOptions:
    dtype: str = "auto"  # auto: the checkpoint's torch_dtype
    block_size: int = 16
    target: str | None = None  # sm_80 | sm_90 | auto: also store GPU-compiled kernels
    progress: bool = True


def versions() -> dict[str, str]:
    import triton

    from pllm import __version__

    return {"pllm": __version__, "torch": torch.__version__.split("+")[0], "triton": triton.__version__}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest, so an edit to any key or value shows."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def resolve_dtype(option: str, spec: ModelSpec) -> str:
    if option == "auto":
        return spec.torch_dtype
    if option not in DTYPES:
        raise BuildError(f"--dtype {option!r}: must be auto or one of {', '.join(DTYPES)}")
    return option


def convert_weights(source: ModelSource, spec: ModelSpec, dtype: str, progress: bool) -> dict[str, torch.Tensor]:
    """HF tensors -> runtime tensors (fused qkv and gate_up), checking every name and shape against the config."""
    layout = weight_layout(spec)
    available = set(source.tensor_file)
    out: dict[str, torch.Tensor] = {}
    for name, (hf_names, shape) in tqdm(layout.items(), desc="Converting weights", disable=not progress):
        parts = []
        for hf_name in hf_names:
            if hf_name not in available:
                raise BuildError(f"{source.path}: missing weight '{hf_name}' (needed by {source.config_file})")
            t = source.load_tensor(hf_name)
            parts.append(t)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(tensor.shape) != shape:
            shapes = ", ".join(f"'{n}' {tuple(p.shape)}" for n, p in zip(hf_names, parts))
            raise BuildError(
                f"{source.path}: weight {shapes} contradicts {source.config_file} (runtime '{name}' expects {shape})"
            )
        out[name] = tensor.to(TORCH_DTYPES[dtype]).contiguous()
    return out


def build(model: str | None, out_dir: str | Path, options: BuildOptions = BuildOptions()) -> Path:
    """Compile `model` into `out_dir`. Nothing is left behind on failure; an existing build is replaced whole."""
    out_dir = Path(out_dir).resolve()
    source = open_model(model)
    try:
        spec = spec_from_config(source.config, source.config_file)
        dtype = resolve_dtype(options.dtype, spec)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent) as tmp:
            tmp_dir = Path(tmp) / "build"
            tmp_dir.mkdir()
            _write_build(source, spec, dtype, options, tmp_dir)
            _replace_dir(tmp_dir, out_dir)
    finally:
        source.close()
    return out_dir


def _write_build(source: ModelSource, spec: ModelSpec, dtype: str, options: BuildOptions, tmp_dir: Path) -> None:
    weights = convert_weights(source, spec, dtype, options.progress)
    save_file(weights, str(tmp_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    del weights
    tokenizer_files = copy_tokenizer_files(source, tmp_dir)
    (tmp_dir / "hf_config.json").write_text(json.dumps(source.config, indent=2, sort_keys=True, default=str))

    plan = make_plan(spec, dtype, options.block_size)
    kernel_dir = tmp_dir / KERNELS_DIR
    kernel_dir.mkdir()
    render_plan(plan, kernel_dir)
    compiled = {}
    if options.target is not None:
        from pllm.compiler.gpu_compile import compile_kernels

        compiled = compile_kernels(kernel_dir, options.target)
    cpu_kernels = compile_cpu_kernels(kernel_dir, plan)
    if "error" in cpu_kernels:
        logger.warning("cpu kernels not built (%s): the cpu backend will use its PyTorch ops", cpu_kernels["error"])

    kv_bytes_per_token = 2 * spec.num_hidden_layers * spec.kv_size * TORCH_DTYPES[dtype].itemsize
    files = {
        str(p.relative_to(tmp_dir)): sha256_file(p) for p in sorted(tmp_dir.rglob("*")) if p.is_file()
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": source.name,
        "spec": spec.to_dict(),
        "dtype": dtype,
        "block_size": options.block_size,
        "kv_bytes_per_token": kv_bytes_per_token,
        "weights": WEIGHTS_FILE,
        "tokenizer_files": tokenizer_files,
        "kernels": plan.to_manifest(),
        "compiled_kernels": compiled,
        "cpu_kernels": cpu_kernels,
        "tuning": {},
        "versions": versions(),
        "files": files,
    }
    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _replace_dir(new: Path, dest: Path) -> None:
    """Swap `new` into place; a previous build is removed only after the new one is there."""
    if dest.exists() and not (dest / MANIFEST).is_file() and any(dest.iterdir()):
        raise BuildError(f"{dest}: exists and is not a pllm build directory; refusing to overwrite it")
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{next(tempfile._get_candidate_names())}")
        dest.rename(old)
    new.rename(dest)
    if old is not None:
        shutil.rmtree(old)
