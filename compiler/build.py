"""Model source -> build directory: runtime-layout weights, kernels, tokenizer, manifest; written atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pllm.compiler.cpu_compile import compile_cpu_kernels
from pllm.compiler.dtype_choice import DtypeChoice, choose_dtype
from pllm.compiler.lm_head import LmHead, choose_lm_head, head_source, pack_lm_head
from pllm.compiler.manifest import (
    KERNELS_DIR,
    LORA_DIR,
    LORA_FILES,
    MANIFEST,
    MANIFEST_DIGEST_KEY,
    format_version_for,
    manifest_digest,
    sha256_file,
    weights_file,
)
from pllm.compiler.output_dir import (
    BuildError,
    as_umask_allows,
    check_output_dir,
    make_parents,
    remove_stale_swaps,
    replace_dir,
    write_weights,
)
from pllm.compiler.plan import make_plan
from pllm.compiler.pooling import read_pooling_config
from pllm.compiler.quantize import (
    Quantization,
    QuantizeError,
    Quantizer,
    check_quantizable,
    flatten,
    int4_group_size,
    principal_format,
)
from pllm.compiler.render import render_plan
from pllm.compiler.scratch import make_scratch_dir, remove_scratch_dir
from pllm.compiler.source import ModelSource, layer_mismatch, open_model, with_file_keys
from pllm.compiler.spec import ConfigError, spec_from_config
from pllm.compiler.tied_head import untie_stored_head
from pllm.compiler.tokenizer_files import copy_tokenizer_files
from pllm.models.family import LM_HEAD
from pllm.models.lora import MAX_LORAS, LoraError, read_adapter
from pllm.models.parallel_layout import TensorParallelError, check_split, rank_spec
from pllm.models.quant import QuantizedWeight
from pllm.models.registry import family_of
from pllm.models.spec import ModelKind, ModelSpec
from pllm.models.tensor_parallel import shard_tensor

logger = logging.getLogger("pllm")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# checkpoint dtypes that hold plain float weights; int8/bool/fp8 tensors need scales or are not weights at all
SOURCE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BuildOptions:
    dtype: str = "auto"  # auto: bfloat16 on a CPU with native bf16, else float32; a GPU build: the checkpoint's
    block_size: int = 16
    target: str | None = None  # sm_80 | sm_90 | auto: also store GPU-compiled kernels
    loras: tuple[tuple[str, str], ...] = ()  # LoRA adapters to pack: (name, PEFT adapter folder) each
    progress: bool = True
    quantization: Quantization | None = None  # None: float weights in `dtype`
    quant_group_size: int | None = None  # int4 and int4_sym only; None: quantize.INT4_DEFAULT_GROUP (32)
    # ranks to split the model over: kernels for one rank's heads, one weights file per rank (model-rank<r>)
    tensor_parallel_size: int = 1
    lm_head: LmHead | None = None  # None: INT8 group 32 with `quantization`, else float (compiler/lm_head.py)


def versions() -> dict[str, str]:
    import triton

    from pllm import __version__

    return {"pllm": __version__, "torch": torch.__version__.split("+")[0], "triton": triton.__version__}


def resolve_dtype(options: BuildOptions, spec: ModelSpec) -> DtypeChoice:
    """The build's weight dtype (dtype_choice.choose_dtype): a build is for a GPU when it is also compiled for one
    (--target) or this machine has one, since serving then picks the cuda backend."""
    for_gpu = options.target is not None or torch.cuda.is_available()
    try:
        return choose_dtype(options.dtype, spec.torch_dtype, for_gpu)
    except ValueError as e:
        raise BuildError(str(e)) from None


def convert_weights(source: ModelSource, spec: ModelSpec, dtype: str, progress: bool,
                    quantizer: Quantizer | None = None,
                    lm_head: LmHead = LmHead.FLOAT) -> dict[str, torch.Tensor | QuantizedWeight]:
    """HF tensors -> runtime tensors (fused qkv and gate_up), checking every name and shape against the config.
    With a quantizer, its targets become QuantizedWeights: GGUF blocks kept as read where the source has them for
    every part (compiler/gguf_blocks.py), else quantised from the float values (int8, int4, int4_sym). A packed
    `lm_head` (INT8, INT6) is made from the head's values (compiler/lm_head.py); the embedding stays float, tied or
    not."""
    layout = family_of(spec.model_type, source.config_file).weight_layout(spec)
    packed_head = head_source(layout) if lm_head.fmt is not None else None
    available = set(source.tensor_file)
    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    float_targets = []  # GGUF: targets the file holds in a type pllm does not keep
    for name, entry in tqdm(layout.items(), desc="Converting weights", disable=not progress):
        hf_names, shape = entry.hf_names, entry.shape
        if quantizer is not None and quantizer.applies(name):
            if quantizer.quantization is Quantization.GGUF:
                kept = source.kept_blocks(hf_names)
                if kept is not None and kept.shape == shape:
                    out[name] = kept
                    continue
                float_targets.append(name)
        parts = []
        for hf_name in hf_names:
            if hf_name not in available:
                raise BuildError(f"{source.path}: missing weight '{hf_name}' (needed by {source.config_file})")
            t = source.load_tensor(hf_name)
            where = f"{source.file_of(hf_name)}: tensor '{hf_name}'"
            if t.dtype not in SOURCE_DTYPES:
                raise BuildError(f"{where} has dtype {t.dtype}; pllm reads float weights only")
            if not torch.isfinite(t).all():
                raise BuildError(f"{where} holds NaN or infinite values")
            parts.append(t)
        _check_parts(source, spec, name, entry, parts)
        tensor = _assemble(parts, entry.num_stacked)
        if tuple(tensor.shape) != shape:
            shapes = ", ".join(f"'{n}' {tuple(p.shape)}" for n, p in zip(hf_names, parts))
            raise BuildError(
                f"{source.path}: weight {shapes} contradicts {source.config_file} (runtime '{name}' expects {shape})"
            )
        if name == packed_head:
            assert quantizer is not None, "a packed LM head comes with --quantization"
            out[LM_HEAD] = pack_lm_head(source, entry, tensor, quantizer.quantization, lm_head)
            if name == LM_HEAD:
                continue
        if quantizer is not None and quantizer.applies(name) and quantizer.quantization is not Quantization.GGUF:
            out[name] = quantizer(tensor)
        else:
            out[name] = tensor.to(TORCH_DTYPES[dtype]).contiguous()
    _warn_unused(source, spec, layout)
    if float_targets:
        shown = ", ".join(float_targets[:4]) + (" ..." if len(float_targets) > 4 else "")
        logger.info("gguf: %d linear weights are in types pllm does not keep packed, dequantised to %s: %s",
                    len(float_targets), dtype, shown)
    return out


def _warn_unused(source: ModelSource, spec: ModelSpec, layout: dict) -> None:
    """Decoder-layer tensors of the checkpoint that the config gives no place (a q_proj.bias beside attention_bias
    false, an extra norm): the build runs without them, as transformers does, but the config may be the wrong one."""
    if source.is_gguf:
        return
    pattern = family_of(spec.model_type, source.config_file).hf_layer_pattern
    used = {hf for entry in layout.values() for hf in entry.hf_names}
    unused = sorted(n for n in source.tensor_file
                    if n not in used and pattern.match(n) and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        shown = ", ".join(f"'{n}' ({source.tensor_file[n]})" for n in unused[:4]) + (" ..." if len(unused) > 4 else "")
        logger.warning("%s: %d decoder tensors that %s gives no place are not used (transformers drops them too; "
                       "check the config is this checkpoint's): %s", source.path, len(unused), source.config_file,
                       shown)


def make_quantizer(options: BuildOptions, spec: ModelSpec, source: ModelSource) -> Quantizer | None:
    """The build's quantizer, or None for float weights; refuses what cannot be kept packed, naming why."""
    q = options.quantization
    if q is None:
        if options.quant_group_size is not None:
            raise BuildError(f"--quant-group-size {options.quant_group_size} needs --quantization int4 or int4_sym")
        return None
    try:
        check_quantizable(spec, q)
        if q.grouped:
            return Quantizer(q, int4_group_size(spec, options.quant_group_size))
        if options.quant_group_size is not None:
            raise QuantizeError(f"--quant-group-size applies to int4 and int4_sym only; {q.value} "
                                f"{'is per output channel' if q is Quantization.INT8 else 'keeps the file groups'}")
    except QuantizeError as e:
        raise BuildError(str(e)) from None
    if q is Quantization.GGUF and not source.is_gguf:
        raise BuildError(f"--quantization gguf keeps a GGUF file's blocks, but {source.path} is not a .gguf file "
                         "(use int8, int4 or int4_sym)")
    return Quantizer(q, 0)


def _part_rows(spec: ModelSpec, num_parts: int, rows: int) -> tuple[int, ...] | None:
    """The rows each HF tensor of a fused runtime tensor (one stacked group of it) must have: q, k, v rows for three
    parts, gate and up halves for two; None for one part (its shape is the runtime tensor's own)."""
    if num_parts == 3:
        return (spec.q_size, spec.kv_size, spec.kv_size) if spec.q_size + 2 * spec.kv_size == rows else (rows // 3,) * 3
    if num_parts == 2:
        return (rows // 2, rows // 2)
    return None


def _check_parts(source: ModelSource, spec: ModelSpec, name: str, entry, parts: list[torch.Tensor]) -> None:
    """Each HF tensor of a fused runtime tensor has its own shape: a q_proj that took rows from k_proj (or gate_up
    halves of other sizes) concatenates to the right total and would run with its rows in the wrong heads."""
    per_group = len(entry.hf_names) // entry.num_stacked
    group_shape = entry.shape if entry.num_stacked == 1 else entry.shape[1:]
    rows = _part_rows(spec, per_group, group_shape[0])
    if rows is None:
        return
    for i, (hf_name, part) in enumerate(zip(entry.hf_names, parts)):
        want = (rows[i % per_group], *group_shape[1:])
        if tuple(part.shape) != want:
            raise BuildError(f"{source.file_of(hf_name)}: tensor '{hf_name}' {tuple(part.shape)} contradicts "
                             f"{source.config_file}, which makes it {want} (part of runtime '{name}')")


def _assemble(parts: list[torch.Tensor], num_stacked: int) -> torch.Tensor:
    """Concatenate along dim 0; with num_stacked groups (experts), concatenate each group and stack the groups."""
    if num_stacked == 1:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    assert len(parts) % num_stacked == 0, (len(parts), num_stacked)
    per_group = len(parts) // num_stacked
    groups = [_assemble(parts[g * per_group : (g + 1) * per_group], 1) for g in range(num_stacked)]
    if any(g.shape != groups[0].shape for g in groups):
        return torch.cat([g.flatten() for g in groups])  # unequal experts: the caller's shape check names them
    return torch.stack(groups)


def check_against_weights(source: ModelSource, spec: ModelSpec) -> None:
    """Config sizes vs the checkpoint's tensors, before anything is sized by the config (one layer per config layer)."""
    family = family_of(spec.model_type, source.config_file)
    layers = {int(m[1]) for name in source.tensor_file if (m := family.hf_layer_pattern.match(name))}
    if (found := layer_mismatch(layers, spec.num_hidden_layers, "layer")) is not None:
        raise BuildError(
            f"{source.config_file}: key 'num_hidden_layers' is {spec.num_hidden_layers} but the weights in "
            f"{source.path} hold {found}"
        )
    shape = source.tensor_shape.get(family.hf_embedding)
    if shape is not None and shape != (spec.vocab_size, spec.hidden_size):
        raise BuildError(
            f"{source.config_file}: keys 'vocab_size' {spec.vocab_size} and 'hidden_size' {spec.hidden_size} "
            f"contradict tensor '{family.hf_embedding}' {shape} in {source.path}"
        )


def build(model: str | None, out_dir: str | Path, options: BuildOptions = BuildOptions()) -> Path:
    """Compile `model` into `out_dir`. Nothing is left behind on failure; only a pllm build holding nothing but its
    own listed files, as it wrote them, is replaced."""
    out_dir = Path(os.path.abspath(out_dir))  # not resolve(): a symlinked output must be seen, and refused
    remove_stale_swaps(out_dir.parent)  # first: a killed compile's previous build of out_dir goes back in place
    seen = check_output_dir(out_dir)
    source = open_model(model, keeps_blocks=options.quantization is Quantization.GGUF)
    made: list[Path] = []  # parent folders this compile created, removed again if it fails
    try:
        try:
            spec = spec_from_config(source.config, source.config_file)
            check_against_weights(source, spec)
        except (ConfigError, BuildError) as e:  # config keys named as the file names them, where it is not HF's
            raise (type(e)(with_file_keys(str(e), source.config_keys)) if source.config_keys else e) from None
        choice = resolve_dtype(options, spec)
        logger.info("dtype %s (%s)", choice.dtype, choice.reason)
        dtype = choice.dtype
        spec = untie_stored_head(source, spec)  # a stored head that differs from the tied embedding wins
        check_tensor_parallel(options, spec, source.config_file)
        loras = check_loras(options.loras, spec)  # refused before the work, naming the adapter and its file
        quantizer = make_quantizer(options, spec, source)
        try:
            lm_head = choose_lm_head(options.lm_head, options.quantization, spec)
        except QuantizeError as e:
            raise BuildError(str(e)) from None
        if quantizer is not None:
            logger.info("quantization %s%s: decoder linear weights kept packed; the embedding, %snorms in %s",
                        quantizer.quantization.value,
                        f" (group {quantizer.group_size})" if quantizer.quantization.grouped else "",
                        "LM head and " if lm_head is LmHead.FLOAT else "", dtype)
        made = make_parents(out_dir.parent)
        try:
            tmp = make_scratch_dir(out_dir.parent, f".{out_dir.name}.tmp-")
        except OSError as e:
            raise BuildError(f"{out_dir.parent}: cannot write the build here ({e.strerror})") from None
        try:
            tmp_dir = tmp / "build"
            tmp_dir.mkdir()
            _write_build(source, spec, dtype, options, tmp_dir, loras, quantizer, lm_head)
            replace_dir(tmp_dir, out_dir, seen)
        finally:
            remove_scratch_dir(tmp)
    except BaseException:
        for d in reversed(made):
            with contextlib.suppress(OSError):  # not empty: something else now lives there, keep it
                d.rmdir()
        raise
    finally:
        source.close()
    return out_dir


def check_tensor_parallel(options: BuildOptions, spec: ModelSpec, config_file: str) -> None:
    """A split build: a family whose model runs split, sizes that divide, no LoRA (adapters are not split)."""
    size = options.tensor_parallel_size
    if size == 1:
        return
    try:
        check_split(spec, size)
    except TensorParallelError as e:
        raise BuildError(f"{config_file}: {e}") from None
    if not family_of(spec.model_type, config_file).tensor_parallel:
        raise BuildError(f"{config_file}: model_type {spec.model_type!r} does not run tensor-parallel yet "
                         "(the llama wiring and its mixture-of-experts families do); build with tensor_parallel_size=1")
    if options.loras:
        raise BuildError(f"LoRA adapters cannot be packed into a build for tensor_parallel_size={size}: adapters are "
                         "not split across ranks")
    if options.quantization is not None:
        raise BuildError(f"--quantization {options.quantization.value} cannot be combined with tensor_parallel_size="
                         f"{size} yet: packed weights are not split across ranks")


def check_loras(loras: tuple[tuple[str, str], ...], spec: ModelSpec) -> list[dict]:
    """Each adapter read and checked against the model (models/lora.py); their manifest entries."""
    if len(loras) > MAX_LORAS:
        raise BuildError(f"{len(loras)} LoRA adapters: at most {MAX_LORAS} can be packed")
    names = [name for name, _ in loras]
    if len(set(names)) != len(names):
        raise BuildError(f"LoRA adapter names must be distinct, got {names}")
    try:
        return [{"name": name, "rank": read_adapter(name, path, spec).rank} for name, path in loras]
    except LoraError as e:
        raise BuildError(str(e)) from None


def _copy_loras(loras: tuple[tuple[str, str], ...], tmp_dir: Path) -> None:
    for name, path in loras:
        folder = tmp_dir / LORA_DIR / name
        folder.mkdir(parents=True)
        for f in LORA_FILES:
            shutil.copyfile(Path(path) / f, folder / f)
            as_umask_allows(folder / f)


def _write_build(source: ModelSource, spec: ModelSpec, dtype: str, options: BuildOptions, tmp_dir: Path,
                 loras: list[dict], quantizer: Quantizer | None = None, lm_head: LmHead = LmHead.FLOAT) -> None:
    # an encoder embeds as its sentence-transformers files say; read first, so a refusal comes before the work
    pooling = read_pooling_config(source, spec) if spec.kind is ModelKind.ENCODER else None
    weights, packed = flatten(convert_weights(source, spec, dtype, options.progress, quantizer, lm_head))
    _write_shards(weights, spec, options.tensor_parallel_size, tmp_dir)
    del weights
    tokenizer_files = copy_tokenizer_files(source, tmp_dir, spec.vocab_size)
    (tmp_dir / "hf_config.json").write_text(json.dumps(source.config, indent=2, sort_keys=True, default=str))
    _copy_loras(options.loras, tmp_dir)

    # one rank's heads; the quantised kernels specialised to the format most packed weights share
    plan = make_plan(rank_spec(spec, options.tensor_parallel_size), dtype, options.block_size,
                     quant=principal_format(packed))
    kernel_dir = tmp_dir / KERNELS_DIR
    kernel_dir.mkdir()
    render_plan(plan, kernel_dir)
    compiled = {}
    if options.target is not None:
        from pllm.compiler.gpu_compile import compile_kernels

        compiled = compile_kernels(kernel_dir, options.target)
    cpu_kernels = compile_cpu_kernels(kernel_dir, plan)
    if "error" in cpu_kernels:
        logger.warning("cpu kernels not built (%s): the cpu backend will use its PyTorch ops", cpu_kernels["error"])

    files = {
        str(p.relative_to(tmp_dir)): sha256_file(p) for p in sorted(tmp_dir.rglob("*")) if p.is_file()
    }
    manifest = {
        "format_version": format_version_for(packed),
        "source": source.name,
        "spec": spec.to_dict(),
        "dtype": dtype,
        "block_size": options.block_size,
        "weights": [weights_file(r, options.tensor_parallel_size) for r in range(options.tensor_parallel_size)],
        "tensor_parallel_size": options.tensor_parallel_size,
        "tokenizer_files": tokenizer_files,
        "kernels": plan.to_manifest(),
        "compiled_kernels": compiled,
        "cpu_kernels": cpu_kernels,
        "versions": versions(),
        "files": files,
        "loras": loras,
        "quantization": {"method": quantizer.quantization.value, "tensors": packed, "lm_head": lm_head.value}
        if quantizer else {},
    }
    if pooling is not None:
        manifest["pooling"] = pooling.to_dict()
    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _write_shards(weights: dict[str, torch.Tensor], spec: ModelSpec, size: int, tmp_dir: Path) -> None:
    """One weights file per rank, each holding exactly the bytes that rank computes with (the whole model on one)."""
    layout = family_of(spec.model_type, "").weight_layout(spec)
    for rank in range(size):
        # one rank holds everything as it is (packed weights' parts too, which the layout does not name)
        shard = weights if size == 1 else {name: shard_tensor(t, layout[name].split, spec, size, rank).contiguous()
                                           for name, t in weights.items()}
        f = tmp_dir / weights_file(rank, size)
        write_weights(shard, f)


