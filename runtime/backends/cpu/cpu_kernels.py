"""The build's compiled cpu kernels: find, check and load them, and call them on torch tensors through ctypes."""

from __future__ import annotations

import ctypes
import dataclasses
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pllm.compiler.manifest import BuildDirError, BuildManifest, Language
from pllm.models.spec import ModelSpec
from pllm.runtime.backends.cpu.cpu_decode_step import CpuDecodeStep, why_no_decode_step
from pllm.runtime.backends.cpu.cpu_prefill_attention import CpuPrefillAttention
from pllm.runtime.backends.cpu.cpu_quant_linear import CpuQuantLinear

# what each instruction set a build may be compiled for needs of the machine, in torch's own words
ISA_CAPABILITIES = {"avx2-fma": ("AVX2", "AVX512")}
KERNEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _load_function(library: Path, symbol: str, argtypes: list) -> ctypes._CFuncPtr:
    """A kernel's extern "C" entry point, returning int (0: done). Loaded after `import torch`, so the library binds
    to torch's libgomp."""
    fn = getattr(ctypes.CDLL(str(library)), symbol)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


@dataclass(frozen=True)
class CpuKernelChoice:
    """The compiled kernels the cpu backend will run, and why (logged at start-up)."""

    attention: CpuDecodeAttention | None  # None: PyTorch gather + batched matmuls
    rms_norm: CpuRmsNorm | None  # None: PyTorch ops
    rope_kv_write: CpuRopeKvWrite | None  # None: PyTorch ops
    reason: str
    quant_linear: CpuQuantLinear | None = None  # None: packed weights dequantised by PyTorch ops at each call
    decode_step: CpuDecodeStep | None = None  # None: decode steps op by op
    prefill_attention: CpuPrefillAttention | None = None  # None: torch's SDPA a prompt chunk

    @property
    def op_by_op(self) -> bool:
        """No compiled kernel runs: every step is PyTorch ops, several times slower (the start-up log warns)."""
        return all(k is None for k in (self.attention, self.rms_norm, self.rope_kv_write, self.quant_linear,
                                       self.decode_step, self.prefill_attention))


class CpuDecodeAttention:
    """kernels/cpu_decode_attention.so: paged attention of one query token per sequence, read in place."""

    def __init__(self, library: Path, dtype: torch.dtype, block_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, sliding_window: int | None = None, softcap: float | None = None):
        self.dtype = dtype
        # the shape the kernel was specialised to: it trusts every pointer and index it is given
        self.block_size, self.num_heads = block_size, num_heads
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.sliding_window, self.softcap = sliding_window, softcap  # baked in as the plan's constants
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        self._fn = _load_function(library, "pllm_decode_attention",
                                  [ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, i64, i32, ctypes.c_float, ctypes.c_int,
                                   ctypes.c_int])
        try:  # kernels compiled before the SIMD code have no switch: they run the generic code
            self._use_simd = _load_function(library, "pllm_decode_attention_use_simd", [ctypes.c_int])
        except AttributeError:
            self._use_simd = None
        self.simd = self.use_simd(True)  # bf16 items run the AVX-512 BF16 code (this CPU has it)
        try:  # kernels compiled before contexts were cut into parts attend each item whole
            self._parts = _load_function(library, "pllm_decode_attention_parts", [i64, ctypes.c_int])
        except AttributeError:
            self._parts = None

    def use_simd(self, on: bool) -> bool:
        """Run bf16 items by the AVX-512 BF16 code (on, where the kernel and CPU have it) or the generic code (the
        tests run each); returns whether the SIMD code now runs."""
        self.simd = self._use_simd is not None and bool(self._use_simd(int(on)))
        return self.simd

    def parts(self, num_seqs: int, num_threads: int) -> int:
        """How many parts each (sequence, KV head) item's context is cut into, to share a short batch out between
        threads (a context gets at most one part per 64 keys from its first visible 16-key tile: under 128, whole)."""
        return 1 if self._parts is None else int(self._parts(num_seqs, num_threads))

    def __call__(
        self,
        q: torch.Tensor,  # [T, H, D], rotated
        k_cache: torch.Tensor,  # [num_blocks, block_size, KV, D]
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [S, max_blocks] int32
        seq_lens: torch.Tensor,  # [S] int32, including the query token
        q_rows: torch.Tensor,  # [S] int64, each sequence's row of q
        max_seq_len: int,
        scale: float,
        out: torch.Tensor,  # [T, H, D]: rows q_rows are written, others untouched
        window: int | None = None,  # a windowed layer's window: the build's, or None
        softcap: float | None = None,  # the build's score soft-cap, or None when it has none
    ) -> torch.Tensor:
        num_seqs = q_rows.shape[0]
        assert window is None or window == self.sliding_window, f"window {window}: the kernel has {self.sliding_window}"
        assert softcap == self.softcap, f"softcap {softcap}: the kernel was rendered with {self.softcap}"
        for t in (q, k_cache, v_cache, out):
            assert t.dtype == self.dtype and t.is_contiguous() and t.device.type == "cpu", (t.dtype, t.shape)
        assert q.shape[1:] == (self.num_heads, self.head_dim) and out.shape == q.shape, q.shape
        assert k_cache.shape[1:] == (self.block_size, self.num_kv_heads, self.head_dim), k_cache.shape
        assert k_cache.shape == v_cache.shape
        assert block_tables.dtype == torch.int32 and block_tables.is_contiguous() and block_tables.shape[0] >= num_seqs
        assert seq_lens.dtype == torch.int32 and seq_lens.is_contiguous() and seq_lens.shape[0] >= num_seqs
        assert q_rows.dtype == torch.int64 and q_rows.is_contiguous()
        assert block_tables.shape[1] * self.block_size >= max_seq_len, "block_tables narrower than max_seq_len"
        status = self._fn(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
            seq_lens.data_ptr(), q_rows.data_ptr(), out.data_ptr(), num_seqs, max_seq_len, scale,
            int(window is not None), torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("cpu decode attention could not allocate its scratch buffers")
        return out


def check_step_rows(num_tokens: int, seq_lens: torch.Tensor, q_rows: torch.Tensor, max_seq_len: int) -> None:
    """Once per step: the indices the kernel trusts are in range (one out of range would corrupt memory)."""
    if q_rows.numel():
        assert 0 <= int(q_rows.min()) and int(q_rows.max()) < num_tokens, "q_rows outside the step's tokens"
        assert int(seq_lens.min()) >= 1 and int(seq_lens.max()) <= max_seq_len, "seq_lens outside [1, max_seq_len]"


class CpuRmsNorm:
    """kernels/cpu_rms_norm.so: residual add + RMSNorm of bfloat16 rows in one pass."""

    def __init__(self, library: Path, hidden_size: int, eps: float):
        self.hidden_size, self.eps = hidden_size, eps  # what the kernel was specialised to
        ptr = ctypes.c_void_p
        self._fn = _load_function(library, "pllm_rms_norm", [ptr, ptr, ptr, ptr, ptr, ctypes.c_int64, ctypes.c_int])

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [T, H] bfloat16. Returns (norm(r) * weight, r) with r = x + residual, or r = x without one."""
        for t in (x, weight) if residual is None else (x, weight, residual):
            assert t.dtype == torch.bfloat16 and t.is_contiguous() and t.device.type == "cpu", (t.dtype, t.shape)
        assert x.dim() == 2 and x.shape[1] == self.hidden_size and weight.shape == (self.hidden_size,), x.shape
        out = torch.empty_like(x)  # [T, H]
        residual_out = None if residual is None else torch.empty_like(x)  # [T, H]
        if residual is not None:
            assert residual.shape == x.shape, (residual.shape, x.shape)
        self._fn(
            x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
            None if residual_out is None else residual_out.data_ptr(), x.shape[0], torch.get_num_threads(),
        )
        return out, x if residual_out is None else residual_out


class CpuRopeKvWrite:
    """kernels/cpu_rope_kv_write.so: rotary embedding of q and k, and k and v written into the paged cache."""

    def __init__(self, library: Path, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int):
        self.dtype, self.num_heads, self.num_kv_heads, self.head_dim = dtype, num_heads, num_kv_heads, head_dim
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        self._fn = _load_function(library, "pllm_rope_kv_write",
                                  [ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ctypes.c_int])
        self._checked_slots: torch.Tensor | None = None  # the step whose tables were checked
        self._cache_shape: tuple[int, ...] = ()

    def _check_step(self, cos: torch.Tensor, signed_sin: torch.Tensor, slot_mapping: torch.Tensor,
                    k_cache: torch.Tensor, num_tokens: int) -> None:
        for t in (cos, signed_sin):
            assert t.dtype == self.dtype and t.is_contiguous() and t.shape == (num_tokens, 1, self.head_dim), t.shape
        assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64
        assert slot_mapping.is_contiguous()
        assert k_cache.dim() == 4 and k_cache.shape[2:] == (self.num_kv_heads, self.head_dim), k_cache.shape
        self._cache_shape = tuple(k_cache.shape)
        if num_tokens:  # a slot past the cache would write outside it
            assert 0 <= int(slot_mapping.min()) and int(slot_mapping.max()) < k_cache.shape[0] * k_cache.shape[1]

    def accepts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether q, k, v have the layout the kernel reads: rows of one fused projection, heads contiguous. (One
        token's views may report any row stride: torch recomputes strides of size-1 dimensions.)"""
        return (q.shape[0] <= 1 or q.stride(0) == k.stride(0) == v.stride(0)) and all(
            t.stride(1) == self.head_dim and t.stride(2) == 1 for t in (q, k, v)
        )

    def __call__(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KV, D]
        v: torch.Tensor,  # [T, KV, D]
        cos: torch.Tensor,  # [T, 1, D] in the dtype
        signed_sin: torch.Tensor,  # [T, 1, D] in the dtype, first half negated
        k_cache: torch.Tensor,  # [num_blocks, block_size, KV, D]
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [T] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens = q.shape[0]
        if slot_mapping is not self._checked_slots:  # once per step, not per layer: the step's shared tables
            self._check_step(cos, signed_sin, slot_mapping, k_cache, num_tokens)
            self._checked_slots = slot_mapping
        assert q.dtype == self.dtype and self.accepts(q, k, v), (q.dtype, q.stride(), k.stride(), v.stride())
        assert q.shape == (num_tokens, self.num_heads, self.head_dim), q.shape
        assert k.shape == v.shape == (num_tokens, self.num_kv_heads, self.head_dim), (k.shape, v.shape)
        assert k_cache.shape == v_cache.shape == self._cache_shape and k_cache.dtype == v_cache.dtype == self.dtype
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        q_out = torch.empty((num_tokens, self.num_heads, self.head_dim), dtype=self.dtype)  # [T, H, D]
        k_out = torch.empty((num_tokens, self.num_kv_heads, self.head_dim), dtype=self.dtype)  # [T, KV, D]
        self._fn(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), cos.data_ptr(), signed_sin.data_ptr(),
            slot_mapping.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            num_tokens, torch.get_num_threads(),
        )
        return q_out, k_out


CpuKernel = CpuDecodeAttention | CpuRmsNorm | CpuRopeKvWrite | CpuQuantLinear | CpuDecodeStep | CpuPrefillAttention


@dataclass(frozen=True)
class CpuBinding:
    """How the cpu backend runs one op's compiled kernel: its name in the start-up log and its loader."""

    label: str  # "decode attention"
    # (build, library) -> the callable kernel, or None where this CPU cannot run it (the op then runs in PyTorch)
    load: Callable[[BuildManifest, Path], CpuKernel | None]


def _decode_attention(build: BuildManifest, library: Path) -> CpuDecodeAttention:
    spec = build.rank_spec
    return CpuDecodeAttention(library, KERNEL_DTYPES[build.dtype], build.block_size, spec.num_attention_heads,
                              spec.num_key_value_heads, spec.head_dim,
                              spec.sliding_window if spec.sliding_layers else None, spec.attn_logit_softcapping)


def _prefill_attention(build: BuildManifest, library: Path) -> CpuPrefillAttention | None:
    spec = build.rank_spec
    kernel = CpuPrefillAttention(library, build.block_size, spec.num_attention_heads, spec.num_key_value_heads,
                                 spec.head_dim)
    return kernel if kernel.runs else None  # no AVX-512 BF16 here: torch's SDPA takes prompts


def _rms_norm(build: BuildManifest, library: Path) -> CpuRmsNorm:
    return CpuRmsNorm(library, build.rank_spec.hidden_size, build.rank_spec.rms_norm_eps)


def _rope_kv_write(build: BuildManifest, library: Path) -> CpuRopeKvWrite:
    spec = build.rank_spec
    return CpuRopeKvWrite(library, KERNEL_DTYPES[build.dtype], spec.num_attention_heads, spec.num_key_value_heads,
                          spec.head_dim)


def _quant_linear(build: BuildManifest, library: Path) -> CpuQuantLinear:
    return CpuQuantLinear(library)


def _decode_step(build: BuildManifest, library: Path) -> CpuDecodeStep:
    return CpuDecodeStep(library, build.spec, KERNEL_DTYPES[build.dtype], build.block_size)


# op (as a kernel's manifest entry names it) -> its binding: the one place the cpu backend knows its kernels
BINDINGS = {
    "decode_attention": CpuBinding("decode attention", _decode_attention),
    "prefill_attention": CpuBinding("prefill attention", _prefill_attention),
    "rms_norm": CpuBinding("RMSNorm", _rms_norm),
    "rope_kv_write": CpuBinding("RoPE + KV write", _rope_kv_write),
    "quant_linear": CpuBinding("packed-weight linear", _quant_linear),
    "decode_step": CpuBinding("decode step", _decode_step),
}


# Model features no compiled cpu kernel implements: (what the start-up log calls it, whether the model has it)
PYTORCH_ONLY: tuple[tuple[str, Callable[[ModelSpec], bool]], ...] = (
    ("q/k norm", lambda spec: spec.qk_norm),
    ("RoPE + KV write (partial rotary)", lambda spec: spec.rotary_dim != spec.head_dim),
    ("mixture of experts (grouped by expert, cpu_moe.py)", lambda spec: spec.moe is not None),
)


def choose_cpu_kernels(build: BuildManifest) -> CpuKernelChoice:
    """The build's compiled cpu kernels that this machine can run, else None for each, and the reason."""
    choice = _choose_compiled(build)
    torch_only = [label for label, has in PYTORCH_ONLY if has(build.rank_spec)]
    if not torch_only:
        return choice
    return dataclasses.replace(choice, reason=f"{choice.reason}; in PyTorch always: {', '.join(torch_only)}")


def _choose_compiled(build: BuildManifest) -> CpuKernelChoice:
    why_not = _why_not_runnable(build)
    if why_not is not None:
        return CpuKernelChoice(None, None, None, f"PyTorch ops ({why_not})")
    entry = build.manifest["cpu_kernels"]
    ops = {kernel.name: kernel.op for kernel in build.kernels(Language.CPP)}
    loaded: dict[str, CpuKernel] = {}  # op -> kernel, in plan order
    # Each library is loaded from a private copy of the bytes just checked against the manifest, so what runs is
    # what was verified (the build folder may change in between); once loaded, the copy is no longer needed.
    with tempfile.TemporaryDirectory(prefix="pllm-cpu-kernels-") as tmp:
        for name, library in entry["libraries"].items():
            op = ops.get(name)
            if op not in BINDINGS:
                raise BuildDirError(f"{build.path}: cpu kernel {name} implements op {op!r}, which this pllm cannot "
                                    f"run (it runs: {', '.join(BINDINGS)})")
            data = build.read_kernel(library)
            if data is None:
                raise BuildDirError(f"{build.kernel_dir / library}: not listed in the manifest's files")
            path = Path(tmp) / library
            path.write_bytes(data)
            try:
                kernel = BINDINGS[op].load(build, path)
            except (OSError, AttributeError) as e:  # not loadable here (a runtime library missing), or no symbol
                why = str(e).replace(tmp, str(build.kernel_dir))
                return CpuKernelChoice(None, None, None, f"PyTorch ops (could not load {library}: {why}; a build "
                                       "made by another version of pllm, or elsewhere: run pllm-compile again here)")
            if kernel is not None:
                loaded[op] = kernel
    if not loaded:
        return CpuKernelChoice(None, None, None, f"PyTorch ops (the build has no cpu kernel for dtype {build.dtype})")
    names = ", ".join(BINDINGS[op].label for op in loaded)
    step = loaded.get("decode_step")
    assert step is None or isinstance(step, CpuDecodeStep)
    step_note = (f"decode steps of up to {step.max_batch} sequences in one call (GEMV: {step.isa}"
                 f"{'; packed weights read packed' if step.packed else ''})"
                 if step is not None else f"decode steps op by op ({why_no_decode_step(build.spec, build.dtype)})")
    return CpuKernelChoice(loaded.get("decode_attention"), loaded.get("rms_norm"), loaded.get("rope_kv_write"),
                           f"compiled {names} ({entry['isa']}), PyTorch for the rest; {step_note}",
                           quant_linear=loaded.get("quant_linear"), decode_step=step,
                           prefill_attention=loaded.get("prefill_attention"))


def _why_not_runnable(build: BuildManifest) -> str | None:
    """Why the build's cpu kernels cannot run on this machine, or None if they can."""
    if "cpu_kernels" not in build.manifest:
        return "the build predates the compiled cpu kernels: run pllm-compile again to use them"
    entry = build.manifest["cpu_kernels"]
    if not entry.get("libraries"):
        return entry.get("error", f"the build has no cpu kernel for dtype {build.dtype}")
    if entry.get("machine") != platform.machine():
        return f"kernels built for {entry.get('machine')}, this machine is {platform.machine()}; rebuild here"
    needs = ISA_CAPABILITIES.get(entry.get("isa", ""))
    capability = torch.backends.cpu.get_cpu_capability()
    if needs is not None and capability not in needs:
        return f"kernels need {entry['isa']}, this CPU offers {capability}"
    return None
