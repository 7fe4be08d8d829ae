"""tools/bench_serve.py when a level completes nothing (a wrong --model, a server answering errors): it says so and
exits non-zero, rather than failing in the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))

import bench_serve  # noqa: E402


def test_a_level_with_no_completed_request_is_an_error(tmp_path, monkeypatch, capsys):
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "The model `nope` does not exist."}})

    real = httpx.AsyncClient
    monkeypatch.setattr(bench_serve.httpx, "AsyncClient",
                        lambda **kwargs: real(transport=httpx.MockTransport(refuse), **kwargs))
    out = tmp_path / "serve"
    argv = ["--url", "http://127.0.0.1:9", "--model", "nope", "--concurrency", "1,2", "--num-requests", "2",
            "--input-len", "4", "--output-len", "2", "--out", str(out)]
    assert bench_serve.main(argv) == 1
    err = capsys.readouterr().err
    assert "no request completed at concurrency 1, 2" in err and "does not exist" in err
    assert [level["num_failed"] for level in json.loads(out.with_suffix(".json").read_text())["levels"]] == [2, 2]
    assert not out.with_suffix(".png").exists()
