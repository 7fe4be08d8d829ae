"""One parse of a GGUF file per compile, however many times transformers opens it.

transformers reads a .gguf through the gguf package's GGUFReader for the config, again for each tokenizer load and
again for the weights: four parses of the whole metadata for the default model, ~4 s each on the dev VM (its 49k
vocabulary entries and merges, one numpy view per field part), most of a compile. Mapping the file's tensor names
to the model's, it also builds gguf's TensorNameMap once per submodule (~400 times, ~14 ms each). Inside
`parsed_once()`, gguf.GGUFReader gives one reader per file and gguf.get_tensor_name_map one map per (architecture,
layer count): both are only read once made. transformers imports the two names from gguf when it calls them, so
it gets these; were that to change, it would parse as before (slower, the same result). Each parse also leaves a
small record of the file's RoPE settings (`file_rope_record`, for compiler/gguf_config.py), so reading them after the
parse is gone costs no second parse.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

GGUF_HEADER_BYTES = 24  # magic, version, tensor count, key-value count


class GGUFTruncated(ValueError):
    """A GGUF file ends before data its own tables place (its header, a field or a tensor's bytes): cut short, or a
    size or offset in the tables is corrupt."""


@lru_cache(maxsize=1)
def _bounded_reader_class() -> type:
    import gguf
    import numpy as np

    class BoundedReader(gguf.gguf_reader.GGUFReader):
        def _get(self, offset, dtype, count=1, *args, **kwargs):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):  # cut short, or a size or offset in its tables corrupt: the bytes cannot say
                raise GGUFTruncated(f"truncated or corrupt: the file ends at byte {len(self.data)}, before data its "
                                    f"tables place up to byte {end}")
            return super()._get(offset, dtype, count, *args, **kwargs)

    return BoundedReader


def open_reader(path: str | os.PathLike, mode: str = "r") -> Any:
    """gguf's GGUFReader over the file. A file cut short fails there in numpy's words for the short array the reader
    got (a reshape, a dtype view, an index out of bounds); such a failure is read again by a reader whose every
    read (`_get`) checks the file's end, which raises GGUFTruncated with the byte counts where that is the cause
    (only then: the check costs the ordinary parse nothing)."""
    import gguf

    size = os.path.getsize(path)
    if size < GGUF_HEADER_BYTES:  # numpy cannot map an empty file: "cannot mmap an empty file"
        raise GGUFTruncated(f"truncated: the file is {size} bytes, less than a GGUF header's {GGUF_HEADER_BYTES}")
    try:
        return gguf.gguf_reader.GGUFReader(path, mode)
    except (ValueError, IndexError):
        _bounded_reader_class()(path, mode)  # GGUFTruncated where the file ends too soon
        raise


@dataclass
class ParsedGguf:
    """The readers and name maps made inside one parsed_once(), by key."""

    readers: dict[tuple[str, str], Any] = field(default_factory=dict)  # (real path, mode) -> GGUFReader
    name_maps: dict[tuple[Any, int], Any] = field(default_factory=dict)  # (MODEL_ARCH, layers) -> TensorNameMap

    def reader(self, path: str | os.PathLike, mode: str = "r") -> Any:
        """The file's one reader: made on first use, the same object after."""

        key = (os.path.realpath(path), mode)
        if key not in self.readers:
            self.readers[key] = open_reader(path, mode)
            _remember(path, self.readers[key])
        return self.readers[key]

    def name_map(self, arch: Any, n_blocks: int) -> Any:
        import gguf

        key = (arch, n_blocks)
        if key not in self.name_maps:
            self.name_maps[key] = gguf.tensor_mapping.get_tensor_name_map(arch, n_blocks)
        return self.name_maps[key]


@dataclass(frozen=True)
class RopeRecord:
    """What a GGUF file says of RoPE beside what transformers reads (compiler/gguf_config.py reads it): its
    architecture, every `{arch}.rope.*` key's value and every `rope_*` tensor (its type name, shape and, when F32,
    values). Small: recorded from each parse, so that reading it again after the parse is gone costs nothing."""

    arch: str | None
    fields: dict[str, Any]
    tensors: dict[str, tuple[str, tuple[int, ...], Any]]


def rope_record(reader: Any) -> RopeRecord:
    import gguf
    import numpy as np

    arch_field = reader.fields.get("general.architecture")
    arch = None if arch_field is None else arch_field.contents()
    prefix = f"{arch}.rope."
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape),
                        np.array(t.data, dtype=np.float32).reshape(-1)
                        if t.tensor_type == gguf.GGMLQuantizationType.F32 else None)
               for t in reader.tensors if t.name.startswith("rope_")}
    return RopeRecord(arch, fields, tensors)


# the RoPE records of the files parsed last, by (real path, size, mtime): a few, as each is small
_RECORDS: dict[tuple[str, int, int], RopeRecord] = {}
_KEEP_RECORDS = 8


def _file_key(path: str | os.PathLike) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def _remember(path: str | os.PathLike, reader: Any) -> None:
    try:
        key, record = _file_key(path), rope_record(reader)
    except Exception:  # a file gguf parses but this cannot summarise: file_rope_record parses it again and says why
        return
    with _PATCHING:
        _RECORDS.pop(key, None)
        _RECORDS[key] = record
        while len(_RECORDS) > _KEEP_RECORDS:
            del _RECORDS[next(iter(_RECORDS))]


def file_rope_record(path: str | os.PathLike) -> RopeRecord:
    """The file's RoPE record: from its parse inside parsed_once when there was one, else from a parse now."""
    import gguf

    found = _RECORDS.get(_file_key(path))
    return found if found is not None else rope_record(gguf.gguf_reader.GGUFReader(path, "r"))


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
