"""The Ops of the cuda and interpret backends: rendered Triton kernels imported from a build's kernel dir."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import torch

from pllm.compiler.kernel_modules import COMPILED_INFO_FILE, import_kernel_module
from pllm.compiler.manifest import BuildManifest, Language
from pllm.models.ops import ACTIVATIONS, AttentionMetadata
from pllm.models.quant import QuantizedWeight, QuantScheme

logger = logging.getLogger(__name__)

# kernel-dir-relative name -> the file's bytes, None where there is no such file (a build: verified, listed ones only)
KernelReader = Callable[[str], "bytes | None"]


def dir_reader(kernel_dir: Path) -> KernelReader:
    """Read a plain folder of rendered kernels (a build is read through BuildManifest.read_kernel instead)."""

    def read(name: str) -> bytes | None:
        f = Path(kernel_dir) / name
        return f.read_bytes() if f.is_file() else None

    return read


def load_kernel_modules(
    kernel_dir: Path, interpret: bool, files: Mapping[str, str], read: KernelReader | None = None
) -> dict[str, ModuleType]:
    """op -> the imported kernel module, for each op -> file name in `files`."""
    read = dir_reader(kernel_dir) if read is None else read
    sources = {op: read(file) for op, file in files.items()}
    missing = [files[op] for op, source in sources.items() if source is None]
    if missing:
        raise FileNotFoundError(f"{kernel_dir}: missing kernel files {', '.join(missing)}")
    return {op: import_kernel_module(Path(kernel_dir) / files[op], interpret, sources[op]) for op in files}


def compiled_artifacts_status(
    kernel_dir: Path, capability: tuple[int, int], triton_version: str, read: KernelReader | None = None
) -> tuple[bool, str]:
    """Whether ahead-of-time artifacts in kernel_dir/compiled/sm_XY match this GPU and Triton; the reason if not.

    Either way the artifacts are a compile check only: launches always go through Triton's JIT (and its on-disk
    cache); the status is logged so that a build made for another GPU or Triton says so.
    """
    target = f"sm_{capability[0]}{capability[1]}"
    info_name = f"compiled/{target}/{COMPILED_INFO_FILE}"
    info_path = Path(kernel_dir) / info_name
    info_bytes = (dir_reader(kernel_dir) if read is None else read)(info_name)
    if info_bytes is None:
        built = sorted(p.name for p in (Path(kernel_dir) / "compiled").glob("sm_*"))
        return False, f"no kernels compiled for {target} (build has: {', '.join(built) or 'none'}); using JIT"
    try:
        info = json.loads(info_bytes)
    except ValueError as e:
        raise ValueError(f"{info_path}: not valid JSON ({e})") from None
    if info.get("triton_version") != triton_version:
        return False, (
            f"{info_path}: kernels compiled with triton {info.get('triton_version')}, this runtime has "
            f"{triton_version}; using JIT"
        )
    return True, f"{info_path}: kernels compile for {target} with triton {triton_version} (a check: launches use JIT)"


class TritonOps:
    """Ops backed by a build's rendered Triton kernels (on the GPU, or on the CPU under the interpreter).

    Each op method launches the kernel bound to its own name: `files` maps op -> file, as the manifest records it.
    """

    def __init__(
        self, kernel_dir: Path, interpret: bool, files: Mapping[str, str], read: KernelReader | None = None
    ) -> None:
        self.kernel_dir = Path(kernel_dir)
        self.interpret = interpret
        self.read = dir_reader(self.kernel_dir) if read is None else read
        self.kernels = load_kernel_modules(self.kernel_dir, interpret, files, self.read)  # op -> module
        # What the build's kernels were rendered with; a model asking otherwise belongs to another build. An encoder
        # build has neither rms_norm (its LayerNorm kernel carries its own eps) nor the decoder's attention and mlp.
        rms_norm = self.kernels.get("rms_norm")
        self.eps = rms_norm.EPS if rms_norm is not None else None
        self.norm_offset = getattr(rms_norm, "NORM_OFFSET", 0.0)
        prefill = self.kernels.get("prefill_attention")
        self.window = getattr(prefill, "SLIDING_WINDOW", None)
        self.softcap = getattr(prefill, "SOFTCAP", None)
        mlp = self.kernels.get("mlp")
        self.activation = mlp.ACTIVATION if mlp is not None else None
        # Ahead-of-time artifacts are a compile check, reported only; launches go through Triton's JIT (and its
        # on-disk cache).
        self.compiled_status: tuple[bool, str] | None = None
        if not interpret and torch.cuda.is_available():
            import triton

            capability = torch.cuda.get_device_capability()
            self.compiled_status = compiled_artifacts_status(self.kernel_dir, capability, triton.__version__, self.read)
            logger.info("kernels: %s", self.compiled_status[1])

    @classmethod
    def from_build(cls, build: BuildManifest, interpret: bool) -> TritonOps:
        """The build's Triton kernels, bound by the op each one's manifest entry names, read as verified bytes."""
        files = {k.op: k.file for k in build.kernels(Language.TRITON)}
        return cls(build.kernel_dir, interpret, files, build.read_kernel)

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
        offset: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # eps is baked into the rendered kernel; a different one means the build belongs to another model
        assert eps == self.eps, f"rms_norm eps {eps} differs from the rendered kernel's {self.eps}"
        assert offset == self.norm_offset, f"rms_norm offset {offset}: the kernel has {self.norm_offset}"
        return self.kernels["rms_norm"].rms_norm(x, weight, residual)

    def qk_norm(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        q_weight: torch.Tensor,  # [head_dim]
        k_weight: torch.Tensor,  # [head_dim]
        eps: float,
        offset: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kernel = self.kernels["qk_norm"]
        # eps and offset are baked into the rendered kernel; others mean the build belongs to another model
        assert (eps, offset) == (kernel.EPS, kernel.NORM_OFFSET), f"qk_norm eps/offset {eps}/{offset} differ"
        return kernel.qk_norm(q, k, q_weight, k_weight)

    def rope_kv_write(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [T] int64
        cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [T] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels["rope_kv_write"].rope_kv_write(
            q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping
        )

    def attention(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim], already rotated
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        assert window is None or window == self.window, f"window {window}: the kernels have {self.window}"
        assert softcap == self.softcap, f"softcap {softcap}: the kernels were rendered with {self.softcap}"
        windowed = window is not None
        if meta.is_decode_only:
            # one token per sequence: token i belongs to sequence i. The grid depends only on num_seqs and the
            # split count, never on device data, so a CUDA graph may capture this call.
            return self.kernels["decode_attention"].decode_attention(
                q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale, meta.max_seq_len, windowed=windowed
            )
        return self.kernels["prefill_attention"].prefill_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
            meta.max_query_len, windowed,
        )

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(weight, QuantizedWeight):
            return self._quant_linear(x, weight, bias)
        return torch.nn.functional.linear(x, weight, bias)  # float projections stay library matmuls (cuBLAS)

    def _quant_linear(self, x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
        """The build's dequantise-in-the-matmul kernel over the packed weight (either scheme); x's leading dims kept."""
        if "quant_matmul" not in self.kernels:
            raise RuntimeError(f"a {weight.fmt.scheme.value} weight, but this build has no quant_matmul kernel (a "
                               "float build): build with --quantization")
        # `sym` only where it is true: a format-8 build's rendered kernel (no int4_sym weights) takes no such argument
        symmetric = {"sym": True} if weight.fmt.scheme is QuantScheme.INT4_SYM else {}
        out = self.kernels["quant_matmul"].quant_matmul(
            x.reshape(-1, x.shape[-1]), weight.codes, weight.scales, weight.mins, weight.fmt.group_size,
            weight.fmt.scheme.nibbles, bias, **symmetric,
        )
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def mlp(
        self,
        x: torch.Tensor,
        gate_up_weight: torch.Tensor | QuantizedWeight,
        down_weight: torch.Tensor | QuantizedWeight,
        activation: str = "silu",
    ) -> torch.Tensor:
        if isinstance(gate_up_weight, torch.Tensor) and isinstance(down_weight, torch.Tensor):
            assert activation == self.activation, f"activation {activation}: the kernel has {self.activation}"
            return self.kernels["mlp"].mlp(x, gate_up_weight, down_weight)
        # packed weights: two quant_matmul launches with the activation between them, as the cpu backend computes it
        gate, up = self.linear(x, gate_up_weight).chunk(2, dim=-1)  # [T, I] each
        return self.linear(ACTIVATIONS[activation](gate) * up, down_weight)

    def moe(
        self,
        x: torch.Tensor,  # [T, H]
        topk_weights: torch.Tensor,  # [T, K] float32
        topk_ids: torch.Tensor,  # [T, K] int64
        gate_up_weights: torch.Tensor,  # [E, 2 * I, H]
        down_weights: torch.Tensor,  # [E, H, I]
    ) -> torch.Tensor:
        return self.kernels["moe"].moe(x, topk_weights, topk_ids, gate_up_weights, down_weights)

    def decode_stack(self, spec, layers, final_norm, scale, lm_head=None):
        return None  # decode steps are op by op here; on cuda, CUDA graphs remove their launch overhead

    def lora(self, y, x, a, b, lora):
        # shrink to an fp32 [adapted tokens, R] buffer, then expand into y: both grouped by adapter
        if "lora_shrink" not in self.kernels:
            raise RuntimeError("this build has no LoRA kernels (built before pllm served adapters): rebuild it")
        args = (lora.token_rows, lora.group_start, lora.group_adapter, lora.max_group_tokens)
        buf = self.kernels["lora_shrink"].lora_shrink(x, a, *args)
        return self.kernels["lora_expand"].lora_expand(y, buf, b, *args)

    # encoders (bert) ------------------------------------------------------------------------------

    def layer_norm(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> torch.Tensor:
        kernel = self.kernels["layer_norm"]
        # eps is baked into the rendered kernel; a different one means the build belongs to another model
        assert eps == kernel.EPS, f"layer_norm eps {eps} differs from the rendered kernel's {kernel.EPS}"
        return kernel.layer_norm(x, weight, bias, residual)

    def encoder_attention(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        return self.kernels["encoder_attention"].encoder_attention(
            q, k, v, meta.query_start_loc, scale, meta.max_query_len
        )
