"""The cpu backend's weight reader: the same tensors as safetensors' own loader, on cache-line boundaries, in memory
that asks for huge pages; and a named error for each way the file can be wrong."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from pllm.compiler.manifest import BuildDirError, open_build
from pllm.runtime.worker.huge_pages import ALIGN, HUGE_PAGE, WeightFileError, huge_page_arena, read_weight_file
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


def test_the_arena_starts_on_a_huge_page():
    memory, start = huge_page_arena(3 * HUGE_PAGE + 5)
    whole = torch.frombuffer(memory, dtype=torch.uint8)
    assert whole[start:].numel() >= 3 * HUGE_PAGE + 5 and whole[start:].data_ptr() % HUGE_PAGE == 0


def test_every_safetensors_dtype_has_a_torch_dtype_of_its_size():
    from pllm.runtime.worker.huge_pages import DTYPE_SIZES

    assert TORCH_DTYPES.keys() == DTYPE_SIZES.keys()
    assert all(TORCH_DTYPES[name].itemsize == size for name, size in DTYPE_SIZES.items())


def _write_raw(path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


@pytest.mark.parametrize("case, match", [
    ("short", "too short"),
    ("header past the end", "runs past the end"),
    ("not json", "not JSON"),
    ("not an object", "not a JSON object"),
    ("unknown dtype", "tensor 'w': unreadable entry"),
    ("wrong size", r"tensor 'w' \(F32 \[2, 2\]\): bytes \[0, 12\)"),
    ("past the data", r"tensor 'w' \(F32 \[2\]\): bytes \[0, 8\) do not fit it or the 4-byte data section"),
])
def test_a_bad_file_is_named_with_what_is_wrong(tmp_path, case, match):
    f = tmp_path / "bad.safetensors"
    if case == "short":
        f.write_bytes(b"\x01\x02")
    elif case == "header past the end":
        _write_raw(f, {}, header_len=1 << 40)
    elif case == "not json":
        _write_raw(f, b"{not json")
    elif case == "not an object":
        _write_raw(f, b"[1, 2]")
    elif case == "unknown dtype":
        _write_raw(f, {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    elif case == "wrong size":
        _write_raw(f, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(12))
    else:
        _write_raw(f, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4))
    with pytest.raises(WeightFileError, match=match) as e:
        read_weight_file(f)
    assert str(f) in str(e.value)


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
