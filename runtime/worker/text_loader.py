"""A verified build -> its tokenizer and generation config, read only from the files its manifest lists. No torch: the
server reads these on a thread while torch is still importing."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pllm.compiler.manifest import (
    GENERATION_CONFIG,
    TOKENIZER_BACKEND,
    TOKENIZER_SNAPSHOTS,
    BuildDirError,
    BuildManifest,
    json_object,
)

TOKENIZER_JSON = "tokenizer.json"


def load_tokenizer(build: BuildManifest):
    """The served tokenizer: from the build's tokenizer snapshot with the `tokenizers` library alone when the build
    has one (compiler/tokenizer_snapshot.py), else through transformers (load_transformers_tokenizer)."""
    name = next((n for n in TOKENIZER_SNAPSHOTS if n in build.manifest["tokenizer_files"]), None)
    if name is None:
        return load_transformers_tokenizer(build)
    from pllm.runtime.worker.fast_tokenizer import FastTokenizer

    snapshot, expected = build.read_json(name), TOKENIZER_SNAPSHOTS[name]
    if snapshot.get("format") != expected:
        raise BuildDirError(f"{build.path / name}: format {snapshot.get('format')!r}, where this pllm reads format "
                            f"{expected} in a file of this name: compile the model again")
    backend_file = TOKENIZER_BACKEND if expected >= 2 else name
    try:
        # format 1 held the backend as a JSON object, written back out as text for the tokenizers library
        text = build.read_bytes(TOKENIZER_BACKEND).decode() if expected >= 2 else json.dumps(snapshot["backend"])
        backend = FastTokenizer.parse_backend(text)
    except BuildDirError:  # not listed, or not what was verified: named as such
        raise
    except Exception as e:  # tokenizers raises its own exception types for a bad backend; all mean the same
        raise BuildDirError(f"{build.path / backend_file}: the tokenizer does not load ({_why(e)})") from None
    try:
        return FastTokenizer(snapshot, text, backend, str(build.path), lambda: load_transformers_tokenizer(build))
    except Exception as e:  # a fact missing or of the wrong type
        raise BuildDirError(f"{build.path / name}: the tokenizer does not load ({_why(e)})") from None


def _why(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def transformers_tokenizer(tokenizer):
    """The transformers tokenizer behind the served one (xgrammar reads only that type)."""
    from pllm.runtime.worker.fast_tokenizer import FastTokenizer

    return tokenizer.transformers() if isinstance(tokenizer, FastTokenizer) else tokenizer


def load_transformers_tokenizer(build: BuildManifest):
    """The tokenizer from a private copy of exactly the listed tokenizer files: the build folder may hold other
    files (added_tokens.json, special_tokens_map.json, ...) that Hugging Face would otherwise pick up."""
    from transformers import AutoTokenizer

    names = [name for name in build.manifest["tokenizer_files"]
             if name not in (GENERATION_CONFIG, TOKENIZER_BACKEND) and name not in TOKENIZER_SNAPSHOTS]
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
