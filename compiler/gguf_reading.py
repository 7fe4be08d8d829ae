"""One parse of a GGUF file per compile, however many times transformers opens it.

transformers reads a .gguf through the gguf package's GGUFReader for the config, again for each tokenizer load and
again for the weights: four parses of the whole metadata for the default model, ~4 s each on the dev VM (its 49k
vocabulary entries and merges, one numpy view per field part), most of a compile. Mapping the file's tensor names
to the model's, it also builds gguf's TensorNameMap once per submodule (~400 times, ~14 ms each). Inside
`parsed_once()`, gguf.GGUFReader gives one reader per file and gguf.get_tensor_name_map one map per (architecture,
layer count): both are only read once made. transformers imports the two names from gguf when it calls them, so
it gets these; were that to change, it would parse as before (slower, the same result).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedGguf:
    """The readers and name maps made inside one parsed_once(), by key."""

    readers: dict[tuple[str, str], Any] = field(default_factory=dict)  # (real path, mode) -> GGUFReader
    name_maps: dict[tuple[Any, int], Any] = field(default_factory=dict)  # (MODEL_ARCH, layers) -> TensorNameMap

    def reader(self, path: str | os.PathLike, mode: str = "r") -> Any:
        """The file's one reader: made on first use, the same object after."""
        import gguf

        key = (os.path.realpath(path), mode)
        if key not in self.readers:
            self.readers[key] = gguf.gguf_reader.GGUFReader(path, mode)
        return self.readers[key]

    def name_map(self, arch: Any, n_blocks: int) -> Any:
        import gguf

        key = (arch, n_blocks)
        if key not in self.name_maps:
            self.name_maps[key] = gguf.tensor_mapping.get_tensor_name_map(arch, n_blocks)
        return self.name_maps[key]


# held while the gguf package is patched: two threads' parsed_once would otherwise restore each other's functions
_PATCHING = threading.RLock()


@contextmanager
def parsed_once() -> Iterator[ParsedGguf]:
    """gguf.GGUFReader and gguf.get_tensor_name_map made to share their results while it is open (the gguf package
    is patched for the whole process: another thread's parsed_once waits); the ParsedGguf it yields keeps the readers
    for use after (compiler/gguf_blocks.py reads the kept blocks from the same one)."""
    import gguf

    with _PATCHING:
        parsed = ParsedGguf()
        real = gguf.GGUFReader, gguf.get_tensor_name_map
        gguf.GGUFReader, gguf.get_tensor_name_map = parsed.reader, parsed.name_map
        try:
            yield parsed
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real
