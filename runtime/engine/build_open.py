"""Opening a build for the engine: its manifest, every listed file hashed against it, and the tokenizer. No torch
on this path, so pllm-serve starts it on a thread of its own before importing torch and the HTTP stack: those
imports hold the GIL, the hashing (over mmap'd files) and file reads do not."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pllm.compiler.manifest import BuildManifest, open_build, verify_files
from pllm.runtime.worker.text_loader import load_tokenizer


@dataclass(frozen=True)
class OpenedBuild:
    """A build whose listed files all match its manifest, with its served tokenizer."""

    build: BuildManifest
    tokenizer: Any  # FastTokenizer (runtime/worker/fast_tokenizer.py), or transformers' for a build without a snapshot


def open_verified(build_dir: str) -> OpenedBuild:
    """Every listed file is hashed before anything but the tokenizer is read (which reads only files it hashes
    itself); the hashing releases the GIL, so it runs beside the tokenizer's loading."""
    build = open_build(build_dir, verify=False)
    with ThreadPoolExecutor(1, thread_name_prefix="pllm-verify") as pool:
        verified = pool.submit(verify_files, build)
        tokenizer = load_tokenizer(build)
        verified.result()
    return OpenedBuild(build, tokenizer)


class BuildOpening:
    """open_verified(build_dir) on a thread of its own, started at once; result() waits for it and raises what it
    raised."""

    def __init__(self, build_dir: str) -> None:
        self.build_dir = build_dir
        self._opened: OpenedBuild | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, name="pllm-open-build", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        try:
            self._opened = open_verified(self.build_dir)
        except BaseException as e:  # handed to whoever waits on result()
            self._error = e

    def result(self) -> OpenedBuild:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._opened is not None
        return self._opened
