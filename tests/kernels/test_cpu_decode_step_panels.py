"""bf16 weights read in oneDNN's panels (templates/cpu_decode_step_panels.cpp.inc): the layout found, each weight's
panels checked against its rows, the step's GEMV over them within the fp32 bound and alike in every batch, and the
whole step over panels against the per-op path (test_cpu_decode_step.py's bound)."""

from __future__ import annotations

import ctypes

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pllm.compiler.cpu_compile import find_compiler
from pllm.compiler.kernels.cpu_decode_step import AMX_MIN_BATCH, MAX_BATCH, SPLIT_MIN_BATCH
from pllm.models.llama import LlamaModel, weight_layout
from pllm.runtime.backends.cpu import onednn
from pllm.runtime.backends.cpu.cpu_decode_step import (
    GEMV_BEFORE_ONEDNN_MAX_ROWS,
    GEMV_PANELS_BEFORE_ONEDNN_MAX_ROWS,
    GemvIsa,
)

from .cpu_step_harness import SETTINGS, U32, bound, make_build_ops, rows_scale, run_both, spec_of

pytestmark = [
    pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or clang++) on PATH"),
    pytest.mark.skipif(onednn.panel_rows() is None,
                       reason="oneDNN packs bf16 weights in no panel layout on this CPU (no AVX-512 BF16 or AMX)"),
]


@pytest.fixture(scope="module")
def build_ops(tmp_path_factory: pytest.TempPathFactory):
    return make_build_ops(tmp_path_factory)


@pytest.fixture(scope="module")
def step(build_ops):
    return build_ops(spec_of("mha-odd-rows-3"), "bfloat16")[1].decode_step


def _panels(weight: torch.Tensor) -> onednn.Panels:
    panels = onednn.panels_of(weight, onednn.pack(weight))
    assert panels is not None
    return panels


def _buffer(panels: onednn.Panels) -> ctypes.Array:
    return (ctypes.c_uint16 * (panels.nbytes // 2)).from_address(panels.address)


@pytest.mark.parametrize(("out_features", "in_features"), [(37, 64), (100, 576), (64, 96), (576, 1536)])
def test_each_element_is_where_the_layout_puts_it(out_features, in_features):
    """The probe's layout holds for other shapes: every element of a packed weight at (n // P) * K * P +
    (k // 2) * 2P + (n % P) * 2 + k % 2, and the last panel's rows past the weight zeros."""
    weight = torch.randn((out_features, in_features)).to(torch.bfloat16)
    panels = _panels(weight)
    rows = panels.rows
    got = torch.frombuffer(bytearray(_buffer(panels)), dtype=torch.int16)
    n = torch.arange(-(-out_features // rows) * rows).view(-1, 1)
    k = torch.arange(in_features).view(1, -1)
    laid = got[(n // rows) * in_features * rows + (k // 2) * 2 * rows + (n % rows) * 2 + k % 2]
    assert torch.equal(laid[:out_features], weight.view(torch.int16))
    assert not laid[out_features:].any()


def test_panels_match_finds_one_changed_element(step):
    """pllm_panels_match compares every element: one bit flipped anywhere (the first, one mid-panel, the last) and
    the weight's panels are refused; flipped back, accepted."""
    weight = torch.randn((100, 576)).to(torch.bfloat16)
    panels = _panels(weight)
    buffer = _buffer(panels)
    assert step.panels_match(weight, panels)
    last = (100 - 1) // panels.rows * 576 * panels.rows + (575 // 2) * 2 * panels.rows + (99 % panels.rows) * 2 + 1
    for at in (0, 12345, last):
        buffer[at] ^= 1
        assert not step.panels_match(weight, panels), at
        buffer[at] ^= 1
        assert step.panels_match(weight, panels), at


@SETTINGS
@given(level=st.sampled_from(list(GemvIsa)), out_features=st.sampled_from([1, 37, 64, 100]),
       in_features=st.sampled_from([32, 96, 576]), batch=st.integers(1, MAX_BATCH), seed=st.integers(0, 2**16))
def test_panel_gemv_error_bound(step, level, out_features, in_features, batch, seed):
    """Each code that reads panels (AMX tiles, AVX-512 BF16, generic): each output within gamma_n * sum |w_i x_i| of
    the exact (fp64) dot product, as test_cpu_decode_step's rows GEMV."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((out_features, in_features), generator=gen).to(torch.bfloat16)
    x = torch.randn((batch, in_features), generator=gen).to(torch.bfloat16)
    step.limit_isa(level)
    try:
        y = step.gemv(w, x, _panels(w))
    finally:
        step.limit_isa(GemvIsa.BEST)
    exact = x.double() @ w.double().T
    gamma = in_features * U32 / (1 - in_features * U32)
    assert ((y.double() - exact).abs() <= gamma * (x.double().abs() @ w.double().abs().T)).all()


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_panel_gemv_sums_alike_with_and_without_software_prefetch(step, batch):
    """Requesting the panel ahead is the CPU maker's choice (none on AMD): it may change the speed, never a bit of
    the sums, in every tile of x rows (4, 2 and 1)."""
    gen = torch.Generator().manual_seed(batch)
    w = torch.randn((100, 576), generator=gen).to(torch.bfloat16)
    x = torch.randn((batch, 576), generator=gen).to(torch.bfloat16)
    panels = _panels(w)
    try:
        assert step.set_panel_prefetch(True)
        ahead = step.gemv(w, x, panels)
        assert not step.set_panel_prefetch(False)
        none = step.gemv(w, x, panels)
    finally:
        step.reset_panel_prefetch()
    assert torch.equal(ahead, none)


@pytest.mark.parametrize("level", list(GemvIsa), ids=lambda level: level.name.lower())
def test_panel_gemv_sums_a_row_alike_in_every_batch(step, level):
    """A row of x's outputs bit for bit the same alone as in any batch up to MAX_BATCH, within one code: the AMX
    tiles from AMX_MIN_BATCH rows (where the CPU has them), the AVX-512 BF16 or generic code below."""
    gen = torch.Generator().manual_seed(int(level))
    step.limit_isa(level)
    try:
        split = AMX_MIN_BATCH if step.isa == "amx_bf16" and onednn.panel_rows() == 32 else MAX_BATCH + 1
        for out_features, in_features in ((37, 64), (100, 576)):
            w = torch.randn((out_features, in_features), generator=gen).to(torch.bfloat16)
            x = torch.randn((MAX_BATCH, in_features), generator=gen).to(torch.bfloat16)
            panels = _panels(w)
            alone = torch.cat([step.gemv(w, x[i : i + 1].contiguous(), panels) for i in range(MAX_BATCH)])
            whole = step.gemv(w, x, panels)
            for batch in range(1, MAX_BATCH + 1):
                same_as = alone if batch < split else whole
                assert torch.equal(step.gemv(w, x[:batch], panels), same_as[:batch]), (step.isa, in_features, batch)
    finally:
        step.limit_isa(GemvIsa.BEST)


@pytest.mark.parametrize("threads", [2, 3])
def test_panels_left_after_an_even_share_are_cut_by_rows_of_x_alike(step, threads):
    """Panels that do not divide evenly among the threads are each cut among all of them by rows of x from
    SPLIT_MIN_BATCH rows (share_work): every row's outputs stay bit for bit what it gets alone, for each count of
    leftover panels and every batch (the batch's slices of uneven sizes too)."""
    if step.isa == "amx_bf16" and onednn.panel_rows() == 32:
        pytest.skip("the AMX tiles read a prepared copy of x, which is never cut")
    P = onednn.panel_rows()
    gen = torch.Generator().manual_seed(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for panels_count in range(1, 2 * threads + 1):
            w = torch.randn((panels_count * P - 5, 64), generator=gen).to(torch.bfloat16)
            x = torch.randn((MAX_BATCH, 64), generator=gen).to(torch.bfloat16)
            panels = _panels(w)
            alone = torch.cat([step.gemv(w, x[i : i + 1].contiguous(), panels) for i in range(MAX_BATCH)])
            for batch in [*range(SPLIT_MIN_BATCH - 1, SPLIT_MIN_BATCH + 4), 17, MAX_BATCH]:
                got = step.gemv(w, x[:batch], panels)
                assert torch.equal(got, alone[:batch]), (threads, panels_count, batch)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("shape", "context_lens"), [("smollm2-like-1", [15]), ("smollm2-like-1", [3, 40, 7, 19]),
                                                     ("odd-panels-2", [3, 40, 7, 19, 0, 22, 31, 64, 5, 9, 11]),
                                                     ("qwen3-qk-norm-2", [0, 33, 5])])
def test_the_step_reads_panels_and_equals_the_per_op_path(build_ops, shape, context_lens):
    """Bound to bf16 weights (here in memory, so no pages to drop), the step reads every linear whose width it takes
    in panels, the LM head too through Ops.linear, and a decode step stays within the per-op path's bound (11
    sequences over odd counts of panels: those past an even share cut among the threads by sequences)."""
    spec = spec_of(shape)
    (fused, _), (ref, _) = run_both(build_ops, spec, "bfloat16", context_lens, seed=11)
    err = (fused - ref).abs() / rows_scale(ref)
    assert err.max() <= bound(spec, "bfloat16"), err.max().item()
    _, compiled = build_ops(spec, "bfloat16")
    weights = {name: (torch.randn(t.shape) / t.shape[-1] ** 0.5).to(torch.bfloat16)
               for name, t in weight_layout(spec).items()}
    model = LlamaModel(spec, weights, compiled, 64)
    stack = model.decode_stack
    assert stack is not None
    assert sum(n for label, n in stack.kinds.items() if "panels" in label) == 4 * spec.num_hidden_layers, stack.kinds
    x = torch.randn((2, spec.hidden_size)).to(torch.bfloat16)
    y = compiled.linear(x, model.lm_head)  # 2 rows: the step's GEMV, over the head's panels (packed at first use)
    assert compiled.linears.panels(model.lm_head) is not None
    exact = x.double() @ model.lm_head.double().T
    assert ((y.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-3 * exact.abs().max()).all()



def test_ops_linear_reads_a_weights_panels_up_to_their_own_row_limit(build_ops, monkeypatch):
    """Where the step's GEMV reads a bf16 weight in oneDNN's panels (no AMX tiles for its width), Ops.linear hands it
    up to GEMV_PANELS_BEFORE_ONEDNN_MAX_ROWS rows (past GEMV_BEFORE_ONEDNN_MAX_ROWS, the limit for a weight read in
    rows), each the GEMV over the panels rounded once; past them oneDNN's packed GEMM. (The two can agree bit for
    bit, so which ran is counted.)"""
    ops = build_ops(spec_of("mha-odd-rows-3"), "bfloat16")[1]
    gen = torch.Generator().manual_seed(5)
    w = torch.randn((100, 576), generator=gen).to(torch.bfloat16)
    if ops.decode_step.tiles_for(w.shape[1]):
        pytest.skip("the GEMV runs AMX tiles at this width (their own limit)")
    panels = ops.linears.panels(w)
    assert panels is not None
    assert GEMV_PANELS_BEFORE_ONEDNN_MAX_ROWS > GEMV_BEFORE_ONEDNN_MAX_ROWS
    gemv, ran = ops.decode_step.gemv, []
    monkeypatch.setattr(ops.decode_step, "gemv", lambda *args: ran.append(args[1].shape[0]) or gemv(*args))
    for rows in range(1, GEMV_PANELS_BEFORE_ONEDNN_MAX_ROWS + 2):
        x = torch.randn((rows, w.shape[1]), generator=gen).to(torch.bfloat16)
        y = ops.linear(x, w)
        if rows <= GEMV_PANELS_BEFORE_ONEDNN_MAX_ROWS:
            assert ran[-1] == rows and torch.equal(y, gemv(w, x, panels).to(torch.bfloat16)), rows
        else:
            packed = ops.linears.packed(w).packed
            assert torch.equal(y, torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    assert ran == list(range(1, GEMV_PANELS_BEFORE_ONEDNN_MAX_ROWS + 1))
