"""Opening a build for the engine: its manifest, every listed file hashed against it, and the tokenizer. No torch
on this path, so pllm-serve starts it on a thread of its own before importing torch and the HTTP stack: those
imports hold the GIL, the hashing (over mmap'd files) and file reads do not."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pllm.compiler.manifest import BuildDirError, BuildManifest, open_build, verify_files
from pllm.runtime.worker.huge_pages import ResidentWeights, WeightFileError, read_weight_file
from pllm.runtime.worker.text_loader import load_tokenizer


@dataclass(frozen=True)
class OpenedBuild:
    """A build whose listed files all match its manifest, with its served tokenizer."""

    build: BuildManifest
    tokenizer: Any  # FastTokenizer (runtime/worker/fast_tokenizer.py), or transformers' for a build without a snapshot
    weights: ResidentWeights | None = None  # its one weights file, read for the cpu backend; None: read at load


def open_verified(build_dir: str, read_weights: bool = False) -> OpenedBuild:
    """Every listed file is hashed before anything but the tokenizer is read (which reads only files it hashes
    itself); the hashing releases the GIL, so it runs beside the tokenizer's loading. read_weights: then the weights
    file of a single-rank build is read into huge pages on the same thread (the page faults and reads release the
    GIL too), for a cpu engine to load."""
    build = open_build(build_dir, verify=False)

    def verify_then_read() -> ResidentWeights | None:
        verify_files(build)
        if not read_weights or len(build.weight_files) != 1:
            return None
        f = build.path / build.weight_files[0]
        try:
            return read_weight_file(f)
        except (WeightFileError, OSError) as e:  # as load_weights names it
            raise BuildDirError(f"{f}: cannot load the weights ({e})") from None

    with ThreadPoolExecutor(1, thread_name_prefix="pllm-verify") as pool:
        verified = pool.submit(verify_then_read)
        tokenizer = load_tokenizer(build)
        weights = verified.result()
    return OpenedBuild(build, tokenizer, weights)


class BuildOpening:
    """open_verified(build_dir, read_weights) on a thread of its own, started at once; result() waits for it and
    raises what it raised."""

    def __init__(self, build_dir: str, read_weights: bool = False) -> None:
        self.build_dir = build_dir
        self.read_weights = read_weights
        self._opened: OpenedBuild | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, name="pllm-open-build", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        try:
            self._opened = open_verified(self.build_dir, self.read_weights)
        except BaseException as e:  # handed to whoever waits on result()
            self._error = e

    def result(self) -> OpenedBuild:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._opened is not None
        return self._opened
