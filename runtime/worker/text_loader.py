"""A verified build -> its tokenizer and generation config, read only from the files its manifest lists. No torch: the
server reads these on a thread while torch is still importing."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pllm.compiler.manifest import (
    GENERATION_CONFIG,
    TOKENIZER_SNAPSHOT,
    TOKENIZER_SNAPSHOT_FORMAT,
    BuildDirError,
    BuildManifest,
    json_object,
)

TOKENIZER_JSON = "tokenizer.json"


def load_tokenizer(build: BuildManifest):
    """The served tokenizer: from the build's tokenizer snapshot with the `tokenizers` library alone when the build
    has one (compiler/tokenizer_snapshot.py), else through transformers (load_transformers_tokenizer)."""
    if TOKENIZER_SNAPSHOT not in build.manifest["tokenizer_files"]:
        return load_transformers_tokenizer(build)
    from pllm.runtime.worker.fast_tokenizer import FastTokenizer

    snapshot = build.read_json(TOKENIZER_SNAPSHOT)
    if snapshot.get("format") != TOKENIZER_SNAPSHOT_FORMAT:
        raise BuildDirError(f"{build.path / TOKENIZER_SNAPSHOT}: format {snapshot.get('format')!r}, this pllm reads "
                            f"{TOKENIZER_SNAPSHOT_FORMAT}: compile the model again")
    try:
        return FastTokenizer(snapshot, str(build.path), lambda: load_transformers_tokenizer(build))
    except Exception as e:  # tokenizers raises its own exception types for a bad backend; all mean the same
        why = " ".join(f"{type(e).__name__}: {e}".split())
        raise BuildDirError(f"{build.path / TOKENIZER_SNAPSHOT}: the tokenizer does not load ({why})") from None


def transformers_tokenizer(tokenizer):
    """The transformers tokenizer behind the served one (xgrammar reads only that type)."""
    from pllm.runtime.worker.fast_tokenizer import FastTokenizer

    return tokenizer.transformers() if isinstance(tokenizer, FastTokenizer) else tokenizer


def load_transformers_tokenizer(build: BuildManifest):
    """The tokenizer from a private copy of exactly the listed tokenizer files: the build folder may hold other
    files (added_tokens.json, special_tokens_map.json, ...) that Hugging Face would otherwise pick up."""
    from transformers import AutoTokenizer

    names = [name for name in build.manifest["tokenizer_files"] if name not in (GENERATION_CONFIG, TOKENIZER_SNAPSHOT)]
    with tempfile.TemporaryDirectory(prefix="pllm-tokenizer-") as tmp:
        for name in names:
            data = build.read_bytes(name)
            # garbage is named here, not as a bare "Expecting value" from transformers; tokenizer.json (megabytes)
            # is parsed by the tokenizers library itself, strictly, and only named here when that fails
            if name.endswith(".json") and name != TOKENIZER_JSON:
                json_object(build.path / name, data)
            (Path(tmp) / name).write_bytes(data)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as e:  # transformers and tokenizers raise many types for a bad file; all mean the same
            if TOKENIZER_JSON in names:
                json_object(build.path / TOKENIZER_JSON, (Path(tmp) / TOKENIZER_JSON).read_bytes())
            why = " ".join(f"{type(e).__name__}: {e}".replace(tmp, str(build.path)).split())
            raise BuildDirError(f"{build.path}: tokenizer files {', '.join(names)} do not load ({why})") from None
    tokenizer.name_or_path = str(build.path)
    return tokenizer


def load_generation_config(build: BuildManifest) -> dict:
    if GENERATION_CONFIG not in build.manifest["files"]:
        return {}
    config = build.read_json(GENERATION_CONFIG)
    eos = config.get("eos_token_id")
    if not (eos is None or type(eos) is int or (type(eos) is list and all(type(t) is int for t in eos))):
        raise BuildDirError(
            f"{build.path / GENERATION_CONFIG}: key 'eos_token_id' must be a token id or a list of them, got {eos!r}"
        )
    return config
