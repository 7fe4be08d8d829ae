"""tools/bench_vs_llamacpp.py's pure parts, without building llama.cpp: argument parsing, the result table with its
ratios and targets, and the reading of llama-bench's JSON (a sample saved from a real run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
SAMPLE = Path(__file__).parent / "data" / "llama_bench_sample.json"
sys.path.insert(0, str(TOOLS))

import bench_vs_llamacpp as bench  # noqa: E402
import llamacpp  # noqa: E402
from random_llama import LLAMA_1B, num_parameters  # noqa: E402
from vs_rows import Goal, Target  # noqa: E402


def test_defaults_and_options():
    args = bench.parse_args([])
    assert args.models == ["smollm2"] and args.rows == list(bench.ROWS) and args.precisions == list(bench.PRECISIONS)
    assert args.concurrency == [1, 4, 16] and args.threads == 2 and args.output_len == 128
    assert args.serve_precisions == ["bf16"]
    assert bench.parse_args(["--serve-precisions", "int4,bf16"]).serve_precisions == ["int4", "bf16"]
    args = bench.parse_args(["--models", "llama1b,smollm2", "--rows", "serve", "--concurrency", "16,1,4,4",
                             "--quick"])
    assert args.models == ["llama1b", "smollm2"] and args.rows == ["serve"] and args.concurrency == [1, 4, 16]
    assert (args.reps, args.num_requests, args.decode_steps) == (1, 8, 16)
    assert args.decode_depths == [] and bench.parse_args(["--decode-depths", "2000,500"]).decode_depths == [500, 2000]


@pytest.mark.parametrize("argv", [["--models", "gpt5"], ["--rows", "decode,nope"], ["--precisions", "fp8"],
                                  ["--serve-precisions", "q4"],
                                  ["--concurrency", "0,4"], ["--concurrency", "x"], ["--threads", "0"],
                                  ["--models", ""], ["--decode-depths", "0"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_table_ratios_and_targets():
    rows = [
        bench.Row("smollm2", "decode b1 tok/s", "bf16", "BF16", 120.0, 100.0, Target(Goal.AT_LEAST, 1.2)),
        bench.Row("smollm2", "decode b1 tok/s", "int4", "Q4_K", None, 150.0, Target(Goal.AT_LEAST, 1.2),
                  "not available: pllm-compile has no --quantization int4"),
        bench.Row("smollm2", "serve c16 out tok/s", "bf16", "BF16", 300.0, 200.0, bench.serve_targets(16)[0]),
        bench.Row("smollm2", "serve c16 TTFT p50 ms", "bf16", "BF16", 90.0, 60.0, bench.serve_targets(16)[1]),
        bench.Row("smollm2", "prefill 512 tok/s", "bf16", "BF16", 1000.0, 2000.0, None),
    ]
    assert rows[0].ratio == pytest.approx(1.2) and rows[1].ratio is None and rows[3].ratio == pytest.approx(1.5)
    lines = bench.format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    decode, missing, tput, ttft, prefill = lines[2:]
    assert "1.20x" in decode and ">=1.2x" in decode and decode.split()[-1] == "yes"
    assert "n/a" in missing and "not available" in missing and " 150.0" in missing
    assert "1.50x" in tput and ">=2x" in tput and tput.split()[-1] == "no"
    assert "<=1x" in ttft and ttft.split()[-1] == "no"
    assert "0.50x" in prefill and prefill.rstrip().endswith("-")


def test_serve_targets_follow_the_issue():
    assert bench.serve_targets(1) == (Target(Goal.AT_LEAST, 1.2), None)
    assert bench.serve_targets(4) == (None, None)
    for c in (8, 16, 32):
        tput, ttft = bench.serve_targets(c)
        assert tput.met(2.0) and not tput.met(1.99) and ttft.met(1.0) and not ttft.met(1.01)


def test_llama_bench_json_sample_is_read():
    results = llamacpp.parse_bench_json(SAMPLE.read_text())
    assert [r.test for r in results] == ["pp64", "tg16"]
    raw = json.loads(SAMPLE.read_text())
    assert results[0].tokens_per_s == pytest.approx(raw[0]["avg_ts"]) and results[0].threads == 2
    assert results[1].n_gen == 16 and results[1].n_prompt == 0 and results[1].stddev >= 0


def test_llama_bench_depth_tests_are_named_by_their_depth():
    raw = json.loads(SAMPLE.read_text())
    deep = [{**raw[1], "n_depth": 2000}, {**raw[1], "n_depth": 0}]
    results = llamacpp.parse_bench_json(json.dumps(deep))
    assert [(r.test, r.n_depth) for r in results] == [("tg16@d2000", 2000), ("tg16", 0)]


@pytest.mark.parametrize("text, message", [
    ("garbage", "no JSON"),
    ('{"a": 1}', "expected a list"),
    ('[{"n_prompt": 1}]', "lacks n_gen"),
    ('[{"n_prompt": 8, "n_gen": 8, "avg_ts": 1, "stddev_ts": 0, "n_threads": 2}]', "mixed"),
])
def test_bad_llama_bench_output_is_named(text, message):
    with pytest.raises(llamacpp.LlamaCppError, match=message):
        llamacpp.parse_bench_json(text)


def test_the_random_model_has_about_a_billion_parameters():
    assert 1.0e9 < num_parameters(LLAMA_1B, 49152) < 1.25e9


def test_every_precision_names_its_llama_types_and_source():
    """Each precision the tool takes is compared with llama.cpp types it knows; a kept-GGUF precision compiles the
    one llama.cpp file it is compared with (so both sides read the same blocks), keeping them."""
    import bench_models

    for precision in bench.PRECISIONS:
        types = bench_models.LLAMA_TYPES[precision]
        assert types and all(t in llamacpp.QUANT_TYPES for t in types)
        if precision in bench_models.KEPT_GGUF:
            assert types == (bench_models.KEPT_GGUF[precision],)
            assert bench_models.PLLM_QUANTIZATION[precision] == ["--quantization", "gguf"]
    assert set(bench_models.KEPT_GGUF) <= set(bench.PRECISIONS)


def test_a_kept_gguf_build_compiles_llama_cpp_s_own_file(monkeypatch, tmp_path):
    """prepare_model hands pllm-compile the Q8_0 / Q4_0 file llama.cpp runs for the gguf-* precisions, and the
    model's own source for the others; the head at the compared file's output precision (`--lm-head int6` where that
    is Q6_K, here the Q4_0 file's) in a build of its own name (llama.cpp's tools and the compiler stubbed: only the
    wiring is checked)."""
    import bench_models

    made: dict[str, Path] = {}

    def quantize(llama, source, out, kind, requantize=False):
        made[kind] = out
        return out

    compiled: dict[str, tuple[Path, list[str], Path]] = {}

    def compile_pllm(source, out, precision, reuse, extra=()):
        compiled[precision] = (source, [*bench_models.PLLM_QUANTIZATION.get(precision, []), *extra], out)
        return out

    monkeypatch.setattr(llamacpp, "quantize", quantize)
    monkeypatch.setattr(bench_models, "compile_pllm", compile_pllm)
    monkeypatch.setattr(bench_models, "output_type", lambda f: "Q6_K" if "q4_0" in f.name else "Q8_0")
    args = bench.parse_args(["--precisions", "int8,gguf-q8_0,gguf-q4_0", "--rows", "decode"])
    args.reuse_builds = False
    prepared = bench_models.prepare_model("smollm2", args, None, tmp_path)
    assert compiled["gguf-q8_0"][:2] == (made["q8_0"], ["--quantization", "gguf"])
    assert prepared.ggufs["q8_0"] == made["q8_0"]
    assert compiled["gguf-q4_0"][:2] == (made["q4_0"], ["--quantization", "gguf", "--lm-head", "int6"])
    assert compiled["gguf-q4_0"][2].name == "smollm2-pllm-gguf-q4_0-int6-head"  # never reused as an int8-head one
    assert compiled["int8"][0].suffix == ".gguf" and compiled["int8"][0] not in made.values()  # the default model
    assert compiled["int8"][1] == ["--quantization", "int8"]
    # serving rows alone: the builds and files of --serve-precisions, no others
    compiled.clear()
    made.clear()
    args = bench.parse_args(["--serve-precisions", "int8,gguf-q4_0", "--rows", "serve"])
    args.reuse_builds = False
    prepared = bench_models.prepare_model("smollm2", args, None, tmp_path)
    assert set(compiled) == {"int8", "gguf-q4_0"} and set(made) == {"bf16", "q8_0", "q4_0"}
    assert set(prepared.pllm_builds) == {"int8", "gguf-q4_0"}


def test_reuse_takes_only_builds_this_compiler_made(tiny_build, tmp_path):
    """--reuse-builds keeps a build only while pllm's compiler and kernel templates are those that made it: a build
    from other templates may load and run their old code (or fail to load, and the engine runs op by op)."""
    import shutil

    import bench_models

    out = tmp_path / "smollm2-pllm-int4"
    shutil.copytree(tiny_build("llama"), out)
    ours = bench_models.compiler_fingerprint()
    assert not bench_models.current_build(out, ours)  # no record of the compiler that made it
    bench_models._fingerprint_file(out).write_text(ours + "\n")
    assert bench_models.current_build(out, ours)
    assert not bench_models.current_build(out, "0" * 64)  # the templates changed since
    assert not bench_models.current_build(tmp_path / "missing", ours)


def test_step_bytes_count_what_a_decode_token_reads(tmp_path, monkeypatch):
    """The weights a token streams: every tensor once but the embedding table (one row a token), unless the table
    is the LM head too; on both sides' files."""
    import gguf
    import step_bytes
    import torch
    from safetensors.torch import save_file
    from step_bytes import gguf_step_bytes, pllm_step_bytes

    layer = {"layers.0.qkv_proj.codes": torch.zeros(48, 16, dtype=torch.uint8),
             "layers.0.qkv_proj.scales": torch.zeros(48, 1, dtype=torch.float16), "norm": torch.zeros(32)}
    embed = {"embed_tokens": torch.zeros(100, 32, dtype=torch.bfloat16)}
    head = {"lm_head.codes": torch.zeros(100, 32, dtype=torch.uint8), "lm_head.scales": torch.zeros(100, 1)}
    head6 = {"lm_head.codes": torch.zeros(96, 64, dtype=torch.int8), "lm_head.scales": torch.zeros(96, 2)}
    untied, tied, six, six_rows = (tmp_path / n for n in ("untied", "tied", "six", "six_rows"))
    packed = {"layers.0.qkv_proj": {"scheme": "int4", "group_size": 32}}
    for folder, tensors, head_scheme in ((untied, {**layer, **embed, **head}, "int8"), (tied, {**layer, **embed}, None),
                                         (six, {**layer, **embed, **head6}, "int6"),
                                         (six_rows, {**layer, **embed, **head}, "int6")):
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        schemes = {**packed, **({"lm_head": {"scheme": head_scheme, "group_size": 32}} if head_scheme else {})}
        (folder / "manifest.json").write_text(json.dumps({"quantization": {"method": "int4", "tensors": schemes}}))
    layer_bytes = 48 * 16 + 48 * 2 + 32 * 4
    assert pllm_step_bytes(untied) == layer_bytes + 100 * 32 + 100 * 4
    assert pllm_step_bytes(tied) == layer_bytes + 100 * 32 * 2
    # an int6 head's codes: 6 bits of each stored byte where the CPU reads panels (AVX512-VNNI) and the matrix is in
    # whole panels (rows a multiple of 16, width of 64); else the bytes as stored
    monkeypatch.setattr(step_bytes, "_has_vnni", lambda: True)
    assert pllm_step_bytes(six) == layer_bytes + 96 * 64 * 3 // 4 + 96 * 2 * 4
    assert pllm_step_bytes(six_rows) == pllm_step_bytes(untied)  # 100 x 32: no panels
    monkeypatch.setattr(step_bytes, "_has_vnni", lambda: False)
    assert pllm_step_bytes(six) == layer_bytes + 96 * 64 + 96 * 2 * 4
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        pllm_step_bytes(tmp_path)

    def write_gguf(path: Path, names: list[str]) -> Path:
        writer = gguf.GGUFWriter(str(path), "llama")
        for name in names:
            writer.add_tensor(name, torch.zeros(8, 32).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    one = 8 * 32 * 4
    assert gguf_step_bytes(write_gguf(tmp_path / "untied.gguf", ["token_embd.weight", "output.weight",
                                                                 "blk.0.attn_q.weight"])) == 2 * one
    assert gguf_step_bytes(write_gguf(tmp_path / "tied.gguf", ["token_embd.weight", "blk.0.attn_q.weight"])) == 2 * one


def test_bytes_table_sets_each_side_against_the_read_bandwidth():
    import dataclasses

    from vs_rows import format_bytes_table

    row = bench.Row("llama1b", "decode b1 tok/s", "int8", "Q8_0", 20.0, 16.0, Target(Goal.AT_LEAST, 1.2),
                    pllm_bytes=1_000_000_000, llama_bytes=1_100_000_000, read_bytes_per_s=25e9)
    prefill = bench.Row("llama1b", "prefill 512 tok/s", "int8", "Q8_0", 100.0, 90.0, None)
    lines = format_bytes_table([row, prefill]).splitlines()
    assert len(lines) == 3  # the header, its rule, the one decode row
    cells = lines[2]
    # 20 tok/s x 1.0 GB = 20 GB/s (80% of 25), 16 x 1.1 = 17.6 (70%); at equal GB/s 1.10x; at 25 GB/s pllm would
    # make 25 tok/s, 1.56x llama.cpp's 16
    assert "1000.0 / 1100.0" in cells and "20.0 / 17.6" in cells and " 25.0 " in cells and "80 / 70" in cells
    assert "1.10x" in cells and cells.rstrip().endswith("1.56x")
    unmeasured = format_bytes_table([dataclasses.replace(row, read_bytes_per_s=None)]).splitlines()[2]
    assert "20.0 / 17.6" in unmeasured and "1.10x" in unmeasured and unmeasured.rstrip().endswith("-")
