"""prepare_step: the step's tensors, each vector's values and where each view starts in the storage it shares."""

from __future__ import annotations

import torch

from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.worker.step import GroupBlockTable, PromptLogprobInputs, SampleInputs, SeqStep, StepBatch
from pllm.runtime.worker.step_inputs import ALIGN_BYTES, prepare_step

BS = 4  # block size
PAD = (99, 98)  # each group's padding block


def sample(rid: str) -> SampleInputs:
    return SampleInputs(0, SamplingParams(temperature=0.0), (), (), frozenset())


def test_every_vector_and_table_starts_aligned_and_holds_its_values():
    """Three sequences (a decode, an odd prompt chunk, a pooled one) over two KV groups, one of them windowed, with
    an over-long table cut to the step's widest: odd lengths everywhere, so a view packed end to end would start
    off a 16-byte boundary (Triton specialises kernels on it)."""
    seqs = (
        SeqStep("a", (7,), 9, (GroupBlockTable(0, (1, 2, 3)), GroupBlockTable(1, (5, 6))), True, 10, sample("a")),
        SeqStep("b", (3, 4, 5), 0, (GroupBlockTable(0, (8,)), GroupBlockTable(0, (9,))), True, 3, sample("b"),
                prompt_logprobs=PromptLogprobInputs(1, 0, (4, 5))),
        SeqStep("c", (6, 2, 1, 1, 3), 2, (GroupBlockTable(0, (10, 11, 12, 13, 14)), GroupBlockTable(0, (15, 16))),
                False, 7),
    )
    inputs = prepare_step(StepBatch(seqs), BS, PAD, torch.device("cpu"))
    metas = inputs.metas
    tensors = [inputs.input_ids, inputs.sample_indices, inputs.prompt_logprob_rows]
    tensors += [metas[0].positions, metas[0].query_start_loc, metas[0].seq_lens, metas[0].seq_total_lens]
    tensors += [t for m in metas for t in (m.slot_mapping, m.block_tables)]
    for t in tensors:
        assert t.is_contiguous() and t.data_ptr() % ALIGN_BYTES == 0
    assert inputs.input_ids.tolist() == [7, 3, 4, 5, 6, 2, 1, 1, 3]
    assert metas[0].positions.tolist() == [9, 0, 1, 2, 2, 3, 4, 5, 6]
    assert metas[0].seq_total_lens.tolist() == [10, 3, 3, 3, 7, 7, 7, 7, 7]
    assert metas[0].query_start_loc.tolist() == [0, 1, 4, 9] and metas[0].seq_lens.tolist() == [10, 3, 7]
    assert inputs.sample_indices.tolist() == [0, 3] and inputs.prompt_logprob_rows.tolist() == [1, 2]
    assert metas[0].slot_mapping.tolist() == [3 * BS + 1, 8 * BS, 8 * BS + 1, 8 * BS + 2,
                                              10 * BS + 2, 10 * BS + 3, 11 * BS, 11 * BS + 1, 11 * BS + 2]
    # widest sequence: 10 tokens -> 3 blocks; c's five blocks are cut to three, b's one padded with 0
    assert metas[0].block_tables.tolist() == [[1, 2, 3], [8, 0, 0], [10, 11, 12]]
    # group 1: a's first block is out of the window, so its table starts with the padding block
    assert metas[1].block_tables.tolist() == [[PAD[1], 5, 6], [9, 0, 0], [15, 16, 0]]
    assert metas[1].slot_mapping[0].item() == 6 * BS + 1
    for t in (metas[0].block_tables, metas[0].seq_lens, metas[0].query_start_loc):
        assert t.dtype == torch.int32
    for t in (inputs.input_ids, metas[0].positions, metas[1].slot_mapping, inputs.sample_indices):
        assert t.dtype == torch.int64


def test_a_step_without_sampling_or_prompt_logprobs():
    seqs = (SeqStep("e", (1, 2), 0, (GroupBlockTable(0, (4,)),), True, 2),)  # an embedding's only chunk
    inputs = prepare_step(StepBatch(seqs), BS, PAD[:1], torch.device("cpu"))
    assert inputs.sample_indices.numel() == 0 and inputs.prompt_logprob_rows is None
    assert inputs.metas[0].block_tables.tolist() == [[4]] and inputs.input_ids.tolist() == [1, 2]
