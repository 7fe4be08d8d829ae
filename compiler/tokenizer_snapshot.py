"""The tokenizer as transformers resolves it, written into the build so serving need not import transformers.

Loading a tokenizer through transformers costs a second or more of a server's start-up (its import, then
AutoTokenizer's class resolution and the edits it makes to the backend: post-processor rewritten for add_bos_token,
special tokens registered, truncation and padding cleared). The compiler loads the tokenizer that way anyway, to check
it; here it also records the result: the `tokenizers` backend exactly as transformers left it (its JSON, a file of
its own), and the few facts transformers keeps beside it (special tokens, chat template, whether decode cleans up
spaces). The runtime's runtime/worker/fast_tokenizer.py serves from these files with the `tokenizers` library alone.
A tokenizer without a `tokenizers` backend (a slow, sentencepiece-only one) or with several named chat templates gets
no snapshot, and serving loads it through transformers as before. Either way the compile encodes a sample text with
the tokenizer as serving will load it (encoding_problem): one that loads but cannot encode is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from pllm.compiler.manifest import TOKENIZER_BACKEND, TOKENIZER_SNAPSHOT, TOKENIZER_SNAPSHOT_FORMAT


def tokenizer_snapshot(tokenizer) -> dict | None:
    """What serving needs of a loaded transformers tokenizer, as plain JSON; None when it has no fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    template = tokenizer.chat_template
    if backend is None or not (template is None or isinstance(template, str)):
        return None
    clean_up = bool(tokenizer.clean_up_tokenization_spaces)
    if clean_up and type(backend.model).__name__ == "BPE":  # transformers' _decode skips the clean-up for BPE
        clean_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                False))
    return {
        "format": TOKENIZER_SNAPSHOT_FORMAT,
        "special_tokens_map": dict(tokenizer.special_tokens_map),
        "all_special_ids": sorted(set(tokenizer.all_special_ids)),
        "clean_up_tokenization_spaces": clean_up,
        "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
        "truncation_side": tokenizer.truncation_side,
        "chat_template": template,
    }


def write_tokenizer_snapshot(tokenizer, out_dir: Path) -> list[str]:
    """Write the snapshot and its backend into `out_dir`; their file names, none when this tokenizer has no snapshot."""
    snapshot = tokenizer_snapshot(tokenizer)
    if snapshot is None:
        return []
    (out_dir / TOKENIZER_SNAPSHOT).write_text(json.dumps(snapshot, ensure_ascii=False, sort_keys=True),
                                              encoding="utf-8")
    (out_dir / TOKENIZER_BACKEND).write_text(tokenizer.backend_tokenizer.to_str(), encoding="utf-8")
    return [TOKENIZER_SNAPSHOT, TOKENIZER_BACKEND]


SAMPLE_TEXT = "Hello, world! 123"


def encoding_problem(tokenizer, out_dir: Path, written: list[str]) -> str | None:
    """Why the build's tokenizer cannot encode a sample text, loaded as serving will (the snapshot's backend where
    one was written, else the transformers tokenizer), or None when it can."""
    try:
        if TOKENIZER_BACKEND in written:
            from tokenizers import Tokenizer

            ids = Tokenizer.from_str((out_dir / TOKENIZER_BACKEND).read_text(encoding="utf-8")).encode(SAMPLE_TEXT).ids
        else:
            ids = tokenizer(SAMPLE_TEXT)["input_ids"]
    except Exception as e:  # tokenizers raises its own Exception type; all mean "cannot serve"
        return f"{type(e).__name__}: {e}"
    return None if ids else "it encodes text to no tokens"
