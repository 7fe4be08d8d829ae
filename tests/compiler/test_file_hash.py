"""sha256_file: the digest hashlib gives for the whole file, whatever its size against the span it hashes at once."""

import hashlib
import os

import pytest

from pllm.compiler import manifest


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_sha256_file_matches_hashlib_across_spans(tmp_path, monkeypatch, size):
    monkeypatch.setattr(manifest, "HASH_SPAN", 4096)  # several spans, a partial last one, exactly one
    data = os.urandom(size)
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    assert manifest.sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_sha256_file_sees_a_flipped_byte(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(bytes(10_000))
    before = manifest.sha256_file(f)
    f.write_bytes(bytes(5_000) + b"\x01" + bytes(4_999))
    assert manifest.sha256_file(f) != before
