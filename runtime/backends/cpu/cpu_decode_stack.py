"""The compiled decode step bound to a model's weights: the table of pointers the kernel reads
(cpu_decode_step.WEIGHT_WORDS_PER_LAYER words a layer), checked weight by weight, and the DecodeStack the llama
wiring runs a decode-only step through."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

from pllm.models.ops import AttentionMetadata
from pllm.models.quant import ACTIVATION_BLOCK, QuantizedWeight
from pllm.runtime.backends.cpu.cpu_decode_step import (
    PACKED_KINDS,
    PACKED_LANES,
    WEIGHT_WORDS_PER_LAYER,
    CpuDecodeStep,
    WeightKind,
)
from pllm.runtime.backends.cpu.cpu_quant_linear import WIDE_FLOATS, scales_fit, scales_fp16
from pllm.runtime.backends.cpu.onednn import PANEL_ROWS, Panels


def bind_stack(kernel: CpuDecodeStep, layers: Sequence, final_norm: torch.Tensor, scale: float, rope_tables: Callable,
               panels: Callable[[QuantizedWeight], torch.Tensor | None] | None = None,
               float_panels: Callable[[torch.Tensor], Panels | None] | None = None) -> CompiledDecodeStack | str:
    """The kernel's stack over these weights, or why it cannot run them (a foreign weight, or a packed one the kernel
    does not read). panels: the packed GEMV's repacked copy of a weight, which the step then reads too (so a
    row sums the same in the step as op by op); None: every packed weight read as its rows. float_panels: a bf16
    weight in oneDNN's panels (cpu_linear's CpuLinear.panels), which the step then reads instead of its rows
    (gate_up only where its up half starts on a panel); None: every float weight read as its rows."""
    spec = kernel.spec
    if len(layers) != spec.num_hidden_layers:
        return f"{len(layers)} layers, the kernel was rendered for {spec.num_hidden_layers}"
    qkv_rows = spec.q_size + 2 * spec.kv_size
    norms = {"input_norm": (spec.hidden_size,), "post_norm": (spec.hidden_size,), "qkv_bias": (qkv_rows,),
             "q_norm": (spec.head_dim,), "k_norm": (spec.head_dim,)}
    absent = {"qkv_bias": not spec.attention_bias, "q_norm": not spec.qk_norm, "k_norm": not spec.qk_norm}
    linears = {"qkv": (qkv_rows, spec.hidden_size), "o": (spec.hidden_size, spec.q_size),
               "gate_up": (2 * spec.intermediate_size, spec.hidden_size),
               "down": (spec.hidden_size, spec.intermediate_size)}
    table: list[int] = []
    keep: list[torch.Tensor] = []
    kinds: Counter[str] = Counter()  # what the start-up log says the linears are
    in_panels: list[torch.Tensor] = []  # float linears the step reads in oneDNN's panels
    for i, layer in enumerate(layers):
        for name, shape in norms.items():
            w = getattr(layer, name, None)
            if w is None and absent.get(name, False):
                table.append(0)
                continue
            why = _why_not_float(kernel.dtype, w, shape)
            if why is not None:
                return f"layer {i} {name}: {why}"
            table.append(w.data_ptr())
            keep.append(w)
        for name, shape in linears.items():
            w = getattr(layer, name, None)
            words = _linear_words(kernel, w, shape)
            if isinstance(words, str):
                return f"layer {i} {name}: {words}"
            if isinstance(w, QuantizedWeight):
                repacked = panels(w) if panels is not None else None
                table.extend([*words, 0 if repacked is None else repacked.data_ptr()])
                keep.extend(t for t in (*_tensors(w), repacked) if t is not None)
                kinds[_kind_label(w) + ("" if repacked is None else " in panels")] += 1
                continue
            held = float_panels(w) if float_panels is not None and kernel.reads_panels else None
            if held is not None and name == "gate_up" and (shape[0] // 2) % held.rows:
                held = None  # the step reads the up half from a panel's first row
            if held is not None:
                words[4] = held.rows  # FLOAT's group: rows per panel
            table.extend([*words, 0 if held is None else held.address])
            keep.extend(t for t in (w, None if held is None else held.packed) if t is not None)
            kinds[_kind_label(w) + ("" if held is None else " in oneDNN's panels")] += 1
            if held is not None:
                assert held.rows in PANEL_ROWS, held.rows  # the step's buffers take panels of up to 64 rows
                in_panels.append(w)
    why = _why_not_float(kernel.dtype, final_norm, (spec.hidden_size,))
    if why is not None:
        return f"final norm: {why}"
    weights = torch.tensor(table, dtype=torch.int64)  # [layers * WEIGHT_WORDS_PER_LAYER]: the LayerWeights
    assert weights.numel() == len(layers) * WEIGHT_WORDS_PER_LAYER
    packed = [isinstance(getattr(layer, name), QuantizedWeight) for layer in layers for name in linears]
    return CompiledDecodeStack(kernel, weights, [*keep, final_norm], final_norm, scale, rope_tables, kinds,
                               any(packed), not all(packed), tuple(in_panels))


def _why_not_float(dtype: torch.dtype, w: object, shape: tuple[int, ...]) -> str | None:
    if not isinstance(w, torch.Tensor):
        return f"{type(w).__name__}, not a {dtype} tensor"
    if w.dtype != dtype or tuple(w.shape) != shape or not w.is_contiguous() or w.device.type != "cpu":
        return f"{w.dtype} {tuple(w.shape)}, the kernel reads contiguous {shape} in {dtype}"
    return None


def _linear_words(kernel: CpuDecodeStep, w: object, shape: tuple[int, int]) -> list[int] | str:
    """The kernel's LinearWeight for one linear but its panels (kind, data, scales, mins, group, scale type), or
    why it cannot read it."""
    if not isinstance(w, QuantizedWeight):
        why = _why_not_float(kernel.dtype, w, shape)
        return why if why is not None else [WeightKind.FLOAT, w.data_ptr(), 0, 0, 0, 0]  # type: ignore[union-attr]
    if not kernel.packed:
        return "packed, and the build's decode step was rendered for float weights only"
    if w.fmt.scheme not in PACKED_KINDS:  # INT6: an LM head's scheme, read by the packed linear alone
        return f"{w.fmt.scheme.value}, a scheme the decode step does not read"
    kind, group = PACKED_KINDS[w.fmt.scheme], w.fmt.group_size
    vector = 2 * PACKED_LANES if w.fmt.scheme.nibbles else PACKED_LANES
    if tuple(w.shape) != shape:
        return f"packed {tuple(w.shape)}, the kernel reads {shape}"
    if group % vector:
        return f"{w.fmt.scheme.value} groups of {group}, the kernel reads groups of whole {vector}-weight vectors"
    if group % ACTIVATION_BLOCK:  # the packed rows quantise their input in whole blocks (models/quant.py)
        return (f"{w.fmt.scheme.value} groups of {group}, the packed rows read groups of whole "
                f"{ACTIVATION_BLOCK}-element activation blocks")
    if not all(t.is_contiguous() and t.device.type == "cpu" for t in _tensors(w) if t is not None):
        return "packed tensors not contiguous on the cpu"
    if not scales_fit(w):
        return f"fp16 scales in rows of {w.shape[1] // group} groups, the kernel widens at most {WIDE_FLOATS}"
    mins = w.mins.data_ptr() if w.mins is not None else 0
    return [kind, w.codes.data_ptr(), w.scales.data_ptr(), mins, group, scales_fp16(w)]


def _tensors(w: torch.Tensor | QuantizedWeight) -> tuple[torch.Tensor | None, ...]:
    return (w.codes, w.scales, w.mins) if isinstance(w, QuantizedWeight) else (w,)


def _kind_label(w: torch.Tensor | QuantizedWeight) -> str:
    if isinstance(w, QuantizedWeight):
        return f"{w.fmt.scheme.value} group {w.fmt.group_size}"
    return str(w.dtype).removeprefix("torch.")


class CompiledDecodeStack:
    """models.ops.DecodeStack over the compiled step: decode-only steps of up to max_batch sequences."""

    def __init__(self, kernel: CpuDecodeStep, weights: torch.Tensor, keep: list[torch.Tensor],
                 final_norm: torch.Tensor, scale: float, rope_tables: Callable, kinds: Counter[str], packed: bool,
                 floats: bool, float_panels: tuple[torch.Tensor, ...] = ()):
        self.kernel, self.weights, self._keep, self.final_norm = kernel, weights, keep, final_norm
        self.float_panels = float_panels  # the float linears it reads in oneDNN's panels (not their rows)
        self.kinds = kinds  # "int8 group 32", "bfloat16", ... -> how many linears are kept so (the start-up log)
        self.packed = packed  # some linear is packed (and some float, where `floats`)
        self.max_batch = kernel.batch_limit(packed, floats)
        self.scale = scale
        self._rope_tables = rope_tables  # (positions, cos_sin_cache, dtype) -> cos, signed_sin [T, 1, D]
        self._caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # the KV caches the pointers are of
        self._cache_ptrs: tuple[torch.Tensor, torch.Tensor] = ()  # type: ignore[assignment]
        self._num_slots = 0

    def accepts(self, metas: Sequence[AttentionMetadata]) -> bool:
        meta = metas[0]
        return (meta.is_decode_only and meta.num_seqs <= self.max_batch
                and all(m is meta for m in metas))  # one KV group: every layer reads the same tables

    def _cache_pointers(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer pointers to the K and V caches, checked and built when the runner's cache list is first seen."""
        if self._caches is not kv_caches:
            spec, k = self.kernel.spec, kv_caches[0][0]
            for kc, vc in kv_caches:
                for c in (kc, vc):
                    assert c.dtype == self.kernel.dtype and c.is_contiguous() and c.shape == k.shape, c.shape
                    assert c.shape[1:] == (self.kernel.block_size, spec.num_key_value_heads, spec.head_dim), c.shape
            assert len(kv_caches) == spec.num_hidden_layers, len(kv_caches)
            self._cache_ptrs = (torch.tensor([kc.data_ptr() for kc, _ in kv_caches], dtype=torch.int64),
                                torch.tensor([vc.data_ptr() for _, vc in kv_caches], dtype=torch.int64))
            self._caches, self._num_slots = kv_caches, k.shape[0] * k.shape[1]
        return self._cache_ptrs

    def __call__(
        self,
        x: torch.Tensor,  # [B, hidden], the step's embeddings: overwritten with the result
        rows: torch.Tensor,  # [B] int64, each token's row of cos_sin_cache
        cos_sin_cache: torch.Tensor,  # [num_rows, head_dim] float32
        metas: Sequence[AttentionMetadata],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:  # [B, hidden] after the final norm
        meta, kernel = metas[0], self.kernel
        num_seqs = meta.num_seqs
        assert self.accepts(metas) and x.shape == (num_seqs, kernel.spec.hidden_size) and x.is_contiguous()
        assert x.dtype == kernel.dtype
        k_ptrs, v_ptrs = self._cache_pointers(kv_caches)
        cos, signed_sin = self._rope_tables(rows, cos_sin_cache, kernel.dtype)  # [B, 1, D] each
        tables, lens, slots = meta.block_tables, meta.seq_lens, meta.slot_mapping
        assert tables.dtype == lens.dtype == torch.int32 and slots.dtype == torch.int64
        assert tables.is_contiguous() and lens.is_contiguous() and slots.is_contiguous()
        assert tables.shape[0] >= num_seqs and tables.shape[1] * kernel.block_size >= meta.max_seq_len
        # the indices the kernel trusts are in range (one out of range would corrupt memory)
        assert 1 <= min(meta.seq_lens_host) and max(meta.seq_lens_host) <= meta.max_seq_len
        assert 0 <= int(slots.min()) and int(slots.max()) < self._num_slots, "slot_mapping outside the KV cache"
        status = kernel._step(
            self.weights.data_ptr(), self.final_norm.data_ptr(), x.data_ptr(), num_seqs, cos.data_ptr(),
            signed_sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.shape[1], lens.data_ptr(),
            meta.max_seq_len, k_ptrs.data_ptr(), v_ptrs.data_ptr(), self.scale, torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError(f"cpu decode step: status {status} (-1: no scratch memory, -2: batch {num_seqs}, "
                              "-3: packed weights in a step for float ones)")
        return x
