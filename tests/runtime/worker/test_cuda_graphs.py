"""Captured decode steps: static buffers, padding to the captured batch sizes, and replay equal to eager steps.

Without a GPU the graphs are replayed eagerly (eager_capture) under the interpret backend, which runs the same
rendered kernels on the same static buffers a CUDA graph would hold; the test marked gpu captures real graphs.
"""

import dataclasses

import pytest
import torch

from pllm import LLM, SamplingParams
from pllm.models.ops import AttentionMetadata
from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.worker.cuda_graphs import DecodeGraphs, default_capture_sizes, eager_capture

# 6 prompts with 3..8 new tokens: decode batches shrink 6, 5, 4, 3, 2, 1 and are padded to 8, 8, 4, 4, 2, 1
PROMPTS = ["Hello, world!", "a", "def main():", "Paged attention " * 3, "The capital of", "1 2 3"]
PARAMS = [SamplingParams(temperature=0.0, max_tokens=3 + i, ignore_eos=True) for i in range(len(PROMPTS))]
SETTINGS = dict(kv_cache_memory=1 << 22, max_model_len=128, max_num_seqs=8)


def test_default_capture_sizes():
    assert default_capture_sizes(1) == (1,)
    assert default_capture_sizes(6) == (1, 2, 4, 6)
    assert default_capture_sizes(20) == (1, 2, 4, 8, 16, 20)
    sizes = default_capture_sizes(256)
    assert sizes[:4] == (1, 2, 4, 8) and sizes[-1] == 256 and len(sizes) == 35
    assert default_capture_sizes(1024) == sizes  # larger batches run eagerly


@pytest.mark.parametrize("sizes", [(), (0, 4), (True,), (4, 300), [2.0]])
def test_engine_setting_rejects_bad_capture_sizes(sizes):
    with pytest.raises(ValueError, match="cuda_graph_sizes"):
        EngineConfig(cuda_graph_sizes=sizes, max_num_seqs=256)


def _decode_meta(slots, seq_lens, block_tables) -> AttentionMetadata:
    n = len(slots)
    return AttentionMetadata(
        positions=torch.tensor([s - 1 for s in seq_lens]),
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(block_tables, dtype=torch.int32),
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_lens_host=(1,) * n,
        seq_lens_host=tuple(seq_lens),
    )


def test_padding_rows_touch_only_the_padding_block():
    """A smaller step after a larger one resets the rows it does not use: stale slots would overwrite real KV."""
    seen = []

    def forward(input_ids, metas):
        (meta,) = metas  # one KV group
        seen.append((input_ids.clone(), meta.slot_mapping.clone(), meta.seq_lens.clone(), meta.block_tables.clone(),
                     meta.max_seq_len))
        return input_ids.float()[:, None].repeat(1, 3)  # [T, hidden]: row t carries its token

    block_size, pad_block = 4, 9
    graphs = DecodeGraphs(forward, (2, 4), torch.device("cpu"), 64, block_size, (pad_block,), eager_capture)
    assert graphs.size_for(1) == 2 and graphs.size_for(3) == 4 and graphs.size_for(5) is None

    ids = torch.tensor([11, 12, 13, 14])
    out = graphs.run(ids, (_decode_meta([5, 9, 13, 17], [2, 2, 2, 2], [[1], [2], [3], [4]]),))
    assert out.shape == (4, 3) and out[:, 0].tolist() == [11, 12, 13, 14]
    out = graphs.run(ids[:3], (_decode_meta([6, 10, 22], [3, 3, 7], [[1, 0], [2, 0], [3, 5]]),))
    assert out.shape == (3, 3) and out[:, 0].tolist() == [11, 12, 13]
    input_ids, slots, seq_lens, tables, max_seq_len = seen[-1]
    assert input_ids.tolist() == [11, 12, 13, 0]
    assert slots.tolist() == [6, 10, 22, pad_block * block_size]
    assert seq_lens.tolist() == [3, 3, 7, 1]
    assert tables[:, :2].tolist() == [[1, 0], [2, 0], [3, 5], [pad_block, pad_block]]
    assert max_seq_len == 64  # fixed at capture: the attention grid cannot change between replays

    prefill = dataclasses.replace(_decode_meta([6, 7], [2, 2], [[1], [1]]), max_query_len=2)
    assert graphs.run(ids[:2], (prefill,)) is None and graphs.run(torch.arange(5), (_decode_meta(
        [1, 2, 3, 4, 5], [1] * 5, [[0]] * 5),)) is None  # not decode-only; larger than any graph: eager


def test_replayed_decode_equals_eager(tiny_build):
    build = str(tiny_build("llama"))
    eager = LLM(build, backend="interpret", **SETTINGS)
    expected = eager.generate(PROMPTS, PARAMS, use_tqdm=False)

    llm = LLM(build, backend="interpret", **SETTINGS)
    runner = llm.engine.runner
    graphs = runner.capture_decode_graphs((1, 2, 4, 8), eager_capture)
    replayed = []
    for size, replay in list(graphs.replays.items()):
        graphs.replays[size] = lambda replay=replay, size=size: replayed.append(size) or replay()
    runner.decode_graphs = graphs
    got = llm.generate(PROMPTS, PARAMS, use_tqdm=False)

    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert {1, 2, 4, 8} <= set(replayed)  # every size ran, padded batches (5 -> 8, 3 -> 4) among them
    # nothing but the padding block differs from the eager engine's cache, block for block
    blocks = runner.num_blocks
    torch.testing.assert_close(runner.kv_cache[0][:, :, :blocks], eager.engine.runner.kv_cache[0][:, :, :blocks],
                               rtol=0, atol=1e-5)


def test_cpu_backend_is_never_captured(tiny_build):
    llm = LLM(str(tiny_build("llama")), backend="cpu", **SETTINGS)
    assert llm.engine.runner.decode_graphs is None
    with pytest.raises(ValueError, match="cannot be captured"):
        llm.engine.runner.capture_decode_graphs((1, 2), eager_capture)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_equal_eager_on_gpu(tiny_build):
    build = str(tiny_build("llama", dtype="float32"))
    eager = LLM(build, backend="cuda", enforce_eager=True, **SETTINGS)
    assert eager.engine.runner.decode_graphs is None
    expected = eager.generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM(build, backend="cuda", **SETTINGS)
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None, "capture failed: see the warning in the log"
    assert graphs.sizes == (1, 2, 4, 8)
    replayed = []
    for size, replay in list(graphs.replays.items()):
        graphs.replays[size] = lambda replay=replay, size=size: replayed.append(size) or replay()
    got = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert {1, 2, 4, 8} <= set(replayed)


def test_server_flags():
    from pllm.runtime.server.cli_args import build_parser

    args = build_parser().parse_args(["build", "--enforce-eager", "--cuda-graph-sizes", "1", "8", "32"])
    assert args.enforce_eager and args.cuda_graph_sizes == [1, 8, 32]
    assert not build_parser().parse_args(["build"]).enforce_eager
    with pytest.raises(SystemExit):
        build_parser().parse_args(["build", "--cuda-graph-sizes", "0"])
