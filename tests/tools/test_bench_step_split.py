"""tools/bench_step_split.py on a tiny build: every piece is timed, and the pieces account for the step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_step_split  # noqa: E402


def test_the_pieces_make_up_each_step(tiny_build, tmp_path, capsys):
    out = tmp_path / "split.json"
    argv = [str(tiny_build("llama")), "--batch-sizes", "1,3", "--steps", "2", "--rounds", "2", "--prompt-len", "5",
            "--json", str(out)]
    assert bench_step_split.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["batches"]) == {"1", "3"}
    for ms in report["batches"].values():
        assert set(ms) == {"total", *bench_step_split.PIECES, "engine, other"}
        for r in range(2):
            pieces = sum(ms[name][r] for name in bench_step_split.PIECES)
            assert ms["layers"][r] > 0 and ms["lm head"][r] > 0 and ms["sample"][r] > 0 and ms["inputs"][r] > 0
            assert pieces <= ms["total"][r] and abs(pieces + ms["engine, other"][r] - ms["total"][r]) < 1e-9
    text = capsys.readouterr().out
    assert "batch 1:" in text and "batch 3:" in text and "lm head" in text


def test_bad_sizes_are_refused(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        bench_step_split.main([str(tmp_path), "--batch-sizes", "0,2"])
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_a_decode_batch_past_the_model_s_positions_is_refused(tiny_build):
    """The engine would cut such requests short and the timed steps would run empty: a named error instead."""
    import pytest
    from bench_throughput import decode_batch

    from pllm import LLM

    llm = LLM(str(tiny_build("llama")), backend="cpu", kv_cache_memory=1 << 24)
    limit = llm.engine.max_model_len
    with pytest.raises(ValueError, match=f"{limit} positions"), decode_batch(llm, 1, limit - 8, 9):
        pass
    with decode_batch(llm, 1, limit - 8, 8) as engine:  # exactly fits
        assert len(engine.scheduler.running) == 1
