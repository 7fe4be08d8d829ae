"""An encoder build's embedding recipe (pooling, normalisation, truncation) from sentence-transformers' files."""

from __future__ import annotations

import json
from pathlib import Path

from pllm.compiler.source import ModelSource, read_json
from pllm.models.config import ConfigError
from pllm.models.pooling import Pooling, PoolingConfig
from pllm.models.spec import ModelSpec

MODULES_FILE = "modules.json"
ST_CONFIG_FILE = "sentence_bert_config.json"
# sentence-transformers' pooling modes, new ("pooling_mode": "mean") and legacy (one bool key per mode) spellings
POOLING_MODES = {"mean": Pooling.MEAN, "cls": Pooling.CLS, "lasttoken": Pooling.LAST}
LEGACY_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
# modules.json entries by the last part of their type: what each means for pllm (the rest would change the vector)
TRANSFORMER, POOLING, NORMALIZE = "Transformer", "Pooling", "Normalize"
# Without sentence-transformers files the build embeds as sentence-transformers itself would load the same folder:
# mean pooling over every token, no normalisation ("Creating a new one with mean pooling").
DEFAULT_POOLING = Pooling.MEAN
DEFAULT_NORMALIZE = False


def read_pooling_config(source: ModelSource, spec: ModelSpec) -> PoolingConfig:
    """The pooling recipe in `source`'s sentence-transformers files, else the documented default."""
    folder = source.path if source.path.is_dir() else None
    modules_file = folder / MODULES_FILE if folder is not None else None
    max_seq_length = _max_seq_length(folder, spec)
    if modules_file is None or not modules_file.is_file():
        return PoolingConfig(DEFAULT_POOLING, DEFAULT_NORMALIZE, max_seq_length, "default")
    modules = _read_modules(modules_file)
    pooling_dirs = [path for kind, path in modules if kind == POOLING]
    if len(pooling_dirs) != 1:
        raise ConfigError(f"{modules_file}: needs exactly one Pooling module, found {len(pooling_dirs)}")
    pooling_file = folder / pooling_dirs[0] / "config.json"
    pooling = _read_pooling_mode(pooling_file)
    normalize = any(kind == NORMALIZE for kind, _ in modules)
    read = [MODULES_FILE, str(pooling_file.relative_to(folder))]
    if (folder / ST_CONFIG_FILE).is_file():
        read.append(ST_CONFIG_FILE)
    return PoolingConfig(pooling, normalize, max_seq_length, ", ".join(read))


def _read_modules(modules_file: Path) -> list[tuple[str, str]]:
    """(kind, path) of each module in modules.json; any module pllm does not implement is refused by name."""
    try:
        modules = json.loads(modules_file.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{modules_file}: cannot be read as JSON ({e})") from None
    if not isinstance(modules, list):
        raise ConfigError(f"{modules_file}: must be a JSON list of modules, got {type(modules).__name__}")
    out = []
    for i, module in enumerate(modules):
        kind = module.get("type") if isinstance(module, dict) else None
        path = module.get("path", "") if isinstance(module, dict) else None
        if not isinstance(kind, str) or not isinstance(path, str):
            raise ConfigError(f"{modules_file}: entry {i} must be an object with a string 'type' and 'path'")
        short = kind.rsplit(".", 1)[-1]
        if short not in (TRANSFORMER, POOLING, NORMALIZE):
            raise ConfigError(
                f"{modules_file}: module type {kind!r} is not supported (supported: {TRANSFORMER}, {POOLING}, "
                f"{NORMALIZE}); pllm would give different vectors"
            )
        if ".." in Path(path).parts or Path(path).is_absolute():
            raise ConfigError(f"{modules_file}: entry {i} path {path!r} must stay inside the model folder")
        out.append((short, path))
    return out


def _read_pooling_mode(pooling_file: Path) -> Pooling:
    config = read_json(pooling_file)
    mode = config.get("pooling_mode")
    if mode is None:  # legacy: one boolean per mode
        modes = [name for key, name in LEGACY_POOLING_KEYS.items() if config.get(key) is True]
        mode = modes[0] if len(modes) == 1 else modes
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if not isinstance(mode, str) or mode not in POOLING_MODES:
        raise ConfigError(
            f"{pooling_file}: pooling mode {mode!r} is not supported (supported: one of {', '.join(POOLING_MODES)})"
        )
    return POOLING_MODES[mode]


def _max_seq_length(folder: Path | None, spec: ModelSpec) -> int:
    """sentence-transformers' truncation length: its max_seq_length, else the tokenizer's model_max_length, capped
    at max_position_embeddings either way (the position table has no more rows)."""
    limit = spec.max_position_embeddings
    if folder is None:
        return limit
    st_file = folder / ST_CONFIG_FILE
    if st_file.is_file():
        st_config = read_json(st_file)
        if st_config.get("do_lower_case") is True:
            raise ConfigError(f"{st_file}: do_lower_case=true is not supported (pllm tokenises the text as given)")
        value = st_config.get("max_seq_length")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{st_file}: key 'max_seq_length' must be a positive integer, got {value!r}")
            return min(value, limit)
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        value = read_json(tokenizer_config).get("model_max_length")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return min(value, limit)
    return limit
