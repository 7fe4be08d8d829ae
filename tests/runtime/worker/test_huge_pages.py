"""The cpu backend's weight reader: the same tensors as safetensors' own loader, on cache-line boundaries, in memory
that asks for huge pages; and a named error for each way the file can be wrong."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pllm.compiler.manifest import BuildDirError, open_build
from pllm.runtime.backends.cpu.mapped_pages import mapping_of
from pllm.runtime.worker.huge_pages import ALIGN, WeightFileError, read_weight_file
from pllm.runtime.worker.loader import TORCH_DTYPES, load_weights, tensors_of


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn((37, 19), generator=gen).to(torch.bfloat16),
        "w.f32": torch.randn((5, 3, 7), generator=gen),
        "codes.i8": torch.randint(-128, 128, (11, 13), generator=gen, dtype=torch.int8),
        "codes.u8": torch.randint(0, 256, (3, 33), generator=gen, dtype=torch.uint8),
        "mask": torch.rand((9,), generator=gen) > 0.5,
        "pos.i64": torch.arange(7, dtype=torch.int64),
        "half": torch.randn((4, 4), generator=gen).half(),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros((0, 6)),
    }


def test_reads_what_safetensors_reads(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file(_tensors(), str(f), metadata={"format": "pt"})
    expected, got = load_file(str(f)), tensors_of(read_weight_file(f))
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
        assert got[name].data_ptr() % ALIGN == 0, name
    got["w.f32"][0, 0, 0] = 7.0  # writable, and the file is not
    assert load_file(str(f))["w.f32"][0, 0, 0] != 7.0


def test_every_safetensors_dtype_has_a_torch_dtype_of_its_size():
    from pllm.runtime.worker.huge_pages import DTYPE_SIZES

    assert TORCH_DTYPES.keys() == DTYPE_SIZES.keys()
    assert all(TORCH_DTYPES[name].itemsize == size for name, size in DTYPE_SIZES.items())


def _write_raw(path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("header, data, match", [
    (b"{not json", b"", "not JSON"),
    (b"[1, 2]", b"", "not a JSON object"),
    ({"w": {**W, "dtype": "Q4"}}, bytes(8), "tensor 'w': unreadable entry"),
    ({"w": {**W, "shape": [2.0]}}, bytes(8), "tensor 'w': unreadable entry"),
    ({"w": {**W, "shape": "2"}}, bytes(8), "tensor 'w': unreadable entry"),
    ({"w": {**W, "shape": [-2, -1]}}, bytes(8), "tensor 'w': unreadable entry"),
    ({"w": {**W, "data_offsets": [False, 8]}}, bytes(8), "tensor 'w': unreadable entry"),
    ({"w": "F32"}, bytes(8), "tensor 'w': unreadable entry"),
    ({"w": {**W, "shape": [2, 2]}}, bytes(8), r"tensor 'w' \(F32 \[2, 2\]\): bytes \[0, 8\) do not fit it"),
    ({"w": W}, bytes(4), r"tensor 'w' \(F32 \[2\]\): bytes \[0, 8\) do not fit it or the 4-byte data section"),
    ({"w": W, "v": {**W, "data_offsets": [12, 20]}}, bytes(20), "tensor 'v' starts at byte 12 .*a gap or an overlap"),
    ({"w": W, "v": {**W, "data_offsets": [4, 12]}}, bytes(12), "tensor 'v' starts at byte 4 .*a gap or an overlap"),
    ({"w": W}, bytes(9), "the tensors end at byte 8 of the 9-byte data section"),
])
def test_a_bad_header_is_named_with_what_is_wrong(tmp_path, header, data, match):
    f = tmp_path / "bad.safetensors"
    _write_raw(f, header, data)
    with pytest.raises(WeightFileError, match=match) as e:
        read_weight_file(f)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("raw, size, match", [
    (b"\x01\x02", 2, "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", 10, "runs past the end of the file"),
    (struct.pack("<Q", 200_000_000), 300_000_000, "past safetensors' limit"),  # a sparse file: nothing read
])
def test_a_bad_header_length_is_named(tmp_path, raw, size, match):
    f = tmp_path / "bad.safetensors"
    with open(f, "wb") as out:
        out.write(raw)
        out.truncate(size)
    with pytest.raises(WeightFileError, match=match):
        read_weight_file(f)


def test_a_weights_file_cut_short_is_a_build_error(tmp_path, tiny_build):
    """A build whose weights file lost its tail after it was verified: the loader names the file, never hands back a
    tensor of whatever followed."""
    shutil.copytree(tiny_build("llama"), tmp_path / "build")
    build = open_build(tmp_path / "build")
    weights = load_weights(build, huge_pages=True)
    assert all(isinstance(t, torch.Tensor) for t in weights.values())
    f = build.path / build.weight_files[0]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(BuildDirError, match=f"{f}: cannot load the weights .*do not fit it"):
        load_weights(build, huge_pages=True)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
@pytest.mark.parametrize("huge_pages", [False, True])
def test_without_huge_pages_the_weights_are_views_of_the_files_read_only_mapping(tiny_build, huge_pages):
    """What the cpu backend relies on to drop the pages of packed rows once their panels are made (mapped_pages.py,
    which on anonymous or written memory would zero or revert them): weights loaded without huge pages lie in the
    weights file's mapping, made read-only; with huge pages, in anonymous memory."""
    build = open_build(tiny_build("llama"))
    f = (build.path / build.weight_files[0]).resolve()
    for name, t in load_weights(build, huge_pages=huge_pages).items():
        if t.numel():
            found = mapping_of(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
            assert found is not None, name
            if huge_pages:
                assert not found.is_file and "w" in found.perms, (name, found)
            else:
                assert found.path == str(f) and "w" not in found.perms, (name, found)
