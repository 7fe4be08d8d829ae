"""Build directory -> LoadedBuild: verify the manifest and every file's sha256, then load weights and tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pllm.compiler.build import FORMAT_VERSION, MANIFEST, sha256_file
from pllm.compiler.spec import ModelSpec


class BuildDirError(ValueError):
    """The build directory is missing, incomplete or tampered with; the message names the file."""


@dataclass(frozen=True)
class LoadedBuild:
    path: Path
    manifest: dict
    spec: ModelSpec
    dtype: str
    block_size: int
    kernel_dir: Path

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def open_build(build_dir: str | Path, verify: bool = True) -> LoadedBuild:
    path = Path(build_dir)
    manifest_file = path / MANIFEST
    if not path.is_dir():
        raise BuildDirError(f"{path}: build directory not found (create one with pllm-compile)")
    if not manifest_file.is_file():
        raise BuildDirError(f"{manifest_file}: missing; {path} is not a complete pllm build")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as e:
        raise BuildDirError(f"{manifest_file}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BuildDirError(
            f"{manifest_file}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}; rebuild it"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BuildDirError(f"{manifest_file}: missing key 'files'")
    if verify:
        for rel, digest in files.items():
            f = path / rel
            if not f.is_file():
                raise BuildDirError(f"{f}: listed in the manifest but missing")
            if sha256_file(f) != digest:
                raise BuildDirError(f"{f}: sha256 does not match the manifest (modified since it was built)")
    try:
        spec = ModelSpec.from_dict(manifest["spec"])
        return LoadedBuild(path, manifest, spec, manifest["dtype"], manifest["block_size"], path / "kernels")
    except (KeyError, TypeError) as e:
        raise BuildDirError(f"{manifest_file}: malformed ({e})") from None


def load_weights(build: LoadedBuild, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(build.path / build.manifest["weights"]), device=str(device))


def load_tokenizer(build: LoadedBuild):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build.path))


def load_generation_config(build: LoadedBuild) -> dict:
    f = build.path / "generation_config.json"
    return json.loads(f.read_text()) if f.is_file() else {}
