"""LoRA adapters on the llama wiring: reading a PEFT adapter, checked against the model, and stacking adapters.

A PEFT LoRA adapter adds, to each targeted linear layer W [out, in], the low-rank term scaling * B @ A (A [r, in],
B [out, r]). pllm fuses q/k/v and gate/up into one runtime matmul each, so adapters are stacked per runtime target:
for `qkv` the A of q, k and v are concatenated along the rank (A [n * R, in]) and their B laid out block-diagonally
(B [out, n * R], q's rows against q's rank columns), so one shrink and one expand serve the fused matmul. R is the
largest rank loaded; a smaller rank is zero-padded. The scaling is folded into B. Slot 0 is the base model; slot k
(k >= 1) is the adapter at stack index k - 1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pllm.models.spec import ModelSpec

MAX_LORA_RANK = 64  # the largest adapter rank accepted (vLLM's default max_lora_rank is 16; 64 covers common ones)
MAX_LORAS = 16  # adapters one engine holds at once: each costs stacked weights in every targeted layer
LORA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # the llama wiring, dense MLP: what the stacks are laid for
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # also a folder name inside a build

# PEFT module name -> (runtime target, its index among the target's fused modules)
TARGET_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0),
}
TARGETS: dict[str, tuple[str, ...]] = {  # runtime target -> its PEFT modules, in fused order
    "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_TENSOR = re.compile(r"base_model\.model\.model\.layers\.([0-9]+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight")
# PEFT config keys whose non-default values change the math in ways the stacks do not implement
_REFUSED = {"use_dora": False, "fan_in_fan_out": False, "layers_to_transform": None, "layers_pattern": None,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none"}


class LoraError(ValueError):
    """An adapter pllm cannot serve; the message names the adapter, its file and what is wrong."""


@dataclass(frozen=True)
class LoraAdapter:
    """One PEFT adapter read and checked against a model: its A and B per (layer, module), B scaled."""

    name: str
    path: str
    rank: int
    scaling: float  # lora_alpha / r (or / sqrt(r) with use_rslora), already folded into each B
    # (layer, PEFT module) -> (A [rank, in], B * scaling [out, rank]), float32 on the CPU
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def serves_lora(spec: ModelSpec) -> bool:
    """Whether adapters can be read for this model at all (its family's wiring, a dense MLP)."""
    return spec.model_type in LORA_FAMILIES and spec.moe is None


def check_lora_family(spec: ModelSpec) -> None:
    if not serves_lora(spec):
        raise LoraError(
            f"LoRA adapters are supported for the {', '.join(LORA_FAMILIES)} families; this model's family is "
            f"{spec.model_type!r}"
        )


def check_lora_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise LoraError(f"LoRA adapter name {name!r}: must be 1-64 characters of letters, digits, '.', '_', '-', "
                        "starting with a letter or digit")
    return name


def module_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """PEFT module -> (in_features, out_features) of the base linear layer it adapts."""
    h, q, kv, inter = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, inter),
            "up_proj": (h, inter), "down_proj": (inter, h)}


def module_key(layer: int, module: str) -> str:
    """The PEFT key of a layer's linear module: its path in the transformers model, as target_modules matches it."""
    return f"model.layers.{layer}.{'mlp' if TARGET_MODULES[module][0] in ('gate_up', 'down') else 'self_attn'}.{module}"


def targeted_modules(targets: str | list[str], num_layers: int) -> tuple[frozenset[tuple[int, str]], list[str]]:
    """PEFT's rule (check_target_module_exists) over this model's adaptable linears: a string is a regex the whole
    key must match; a list entry matches a key equal to it or ending in '.' + it (a bare `q_proj`, or a full path
    `model.layers.0.self_attn.q_proj` as peft writes for "all-linear" on a small model, which selects one layer).
    -> ((layer, module) selected, the entries that select none of them)."""
    keys = {(layer, module): module_key(layer, module) for layer in range(num_layers) for module in TARGET_MODULES}
    if isinstance(targets, str):
        selected = frozenset(lm for lm, key in keys.items() if re.fullmatch(targets, key))
        return selected, [] if selected else [targets]
    hits = {t: {lm for lm, key in keys.items() if key == t or key.endswith("." + t)} for t in targets}
    return frozenset().union(*hits.values()), [t for t, found in hits.items() if not found]


def read_adapter_config(name: str, path: Path, num_layers: int) -> tuple[int, float, frozenset[tuple[int, str]]]:
    """adapter_config.json -> (rank, scaling, the (layer, module) pairs target_modules selects), refusing anything
    the stacks do not compute. A layer target_modules leaves out keeps the base weights there: its stacks hold
    zeros for this adapter, as for a module an adapter does not target."""
    f = path / ADAPTER_CONFIG
    if not f.is_file():
        raise LoraError(f"LoRA adapter {name!r}: {f} not found (a PEFT adapter folder holds {ADAPTER_CONFIG})")
    try:
        config = json.loads(f.read_bytes())
    except ValueError as e:
        raise LoraError(f"LoRA adapter {name!r}: {f} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoraError(f"LoRA adapter {name!r}: {f} must be a JSON object")

    def bad(key: str, must: str) -> LoraError:
        return LoraError(f"LoRA adapter {name!r}: {f}: key '{key}' is {config.get(key)!r}; {must}")

    if config.get("peft_type") != "LORA":
        raise bad("peft_type", "only 'LORA' adapters are supported")
    rank = config.get("r")
    if type(rank) is not int or not 1 <= rank <= MAX_LORA_RANK:
        raise bad("r", f"the rank must be an integer in [1, {MAX_LORA_RANK}]")
    alpha = config.get("lora_alpha", 8)
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or alpha <= 0:
        raise bad("lora_alpha", "must be a positive number")
    for key, default in _REFUSED.items():
        value = config.get(key)
        if value not in (None, [], {}) and value != default:
            raise bad(key, f"only {default!r} is supported")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    ):
        raise bad("target_modules", "must list the adapted modules by name (or be one regular expression)")
    try:
        selected, unknown = targeted_modules(targets, num_layers)
    except re.error as e:
        raise bad("target_modules", f"is not a valid regular expression ({e})") from None
    if unknown:
        raise bad("target_modules", f"unknown target module(s) {sorted(unknown)}; supported: "
                  f"{', '.join(TARGET_MODULES)}, by name or by path in layers 0..{num_layers - 1}")
    rslora = config.get("use_rslora", False)
    if type(rslora) is not bool:
        raise bad("use_rslora", "must be true or false")
    scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
    return rank, float(scaling), selected


def read_adapter(name: str, path: str | Path, spec: ModelSpec) -> LoraAdapter:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), checked against the model:
    every tensor a lora_A / lora_B of a targeted module of an existing layer, with the model's shapes."""
    from safetensors import safe_open

    check_lora_name(name)
    check_lora_family(spec)
    folder = Path(path)
    if not folder.is_dir():
        raise LoraError(f"LoRA adapter {name!r}: {folder} is not a directory (a PEFT adapter folder)")
    rank, scaling, targets = read_adapter_config(name, folder, spec.num_hidden_layers)
    f = folder / ADAPTER_WEIGHTS
    if not f.is_file():
        raise LoraError(f"LoRA adapter {name!r}: {f} not found (only safetensors adapters are read)")
    shapes = module_shapes(spec)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(f, framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                m = _TENSOR.fullmatch(key)
                if m is None:
                    raise LoraError(f"LoRA adapter {name!r}: {f}: tensor {key!r} is not a LoRA A/B weight of a "
                                    f"supported module ({', '.join(TARGET_MODULES)})")
                layer, module, which = int(m.group(1)), m.group(3), m.group(4)
                if layer >= spec.num_hidden_layers:
                    raise LoraError(f"LoRA adapter {name!r}: {f}: tensor {key!r} names layer {layer}; the model "
                                    f"has {spec.num_hidden_layers}")
                path = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                if module not in TARGET_MODULES or path != module_key(layer, module) or (layer, module) not in targets:
                    raise LoraError(f"LoRA adapter {name!r}: {f}: tensor {key!r} adapts {module!r} of layer "
                                    f"{layer}, which its target_modules do not select (or is not supported)")
                in_f, out_f = shapes[module]
                want = (rank, in_f) if which == "A" else (out_f, rank)
                t = st.get_tensor(key)
                if tuple(t.shape) != want:
                    raise LoraError(f"LoRA adapter {name!r}: {f}: tensor {key!r} has shape {tuple(t.shape)}, "
                                    f"expected {want} (rank {rank}, this model's {module})")
                if not t.is_floating_point() or not torch.isfinite(t).all():
                    raise LoraError(f"LoRA adapter {name!r}: {f}: tensor {key!r} must be finite floating point")
                parts.setdefault((layer, module), {})[which] = t.float()
    except LoraError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise LoraError(f"LoRA adapter {name!r}: {f} cannot be read as safetensors ({e})") from None
    if not parts:
        raise LoraError(f"LoRA adapter {name!r}: {f} holds no LoRA weights")
    weights = {}
    for (layer, module), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            missing = "B" if "A" in ab else "A"
            raise LoraError(f"LoRA adapter {name!r}: {f}: layer {layer} {module} has no lora_{missing} weight")
        weights[(layer, module)] = (ab["A"], ab["B"] * scaling)
    return LoraAdapter(name, str(folder), rank, scaling, weights)


@dataclass(frozen=True)
class TargetLora:
    """One runtime target's stacked adapters in one layer."""

    a: torch.Tensor  # [num_adapters, n * R, in]: each fused module's A in its own R rows
    b: torch.Tensor  # [num_adapters, out, n * R]: block-diagonal, each module's output rows against its rank rows


@dataclass(frozen=True)
class LayerLora:
    """The adapters of one decoder layer, by runtime target; None where no loaded adapter adapts it."""

    qkv: TargetLora | None
    o: TargetLora | None
    gate_up: TargetLora | None
    down: TargetLora | None


def stack_adapters(
    adapters: Sequence[LoraAdapter | None], spec: ModelSpec, dtype: torch.dtype, device: torch.device
) -> list[LayerLora]:
    """The adapters, in slot order (adapter i is slot i + 1; None a free slot, all zeros), stacked per layer and
    runtime target."""
    shapes = module_shapes(spec)
    max_rank = max(a.rank for a in adapters if a is not None)
    layers = []
    for layer in range(spec.num_hidden_layers):
        by_target = {}
        for target, modules in TARGETS.items():
            if not any((layer, m) in a.weights for a in adapters if a is not None for m in modules):
                by_target[target] = None
                continue
            in_f = shapes[modules[0]][0]
            outs = [shapes[m][1] for m in modules]
            a_stack = torch.zeros(len(adapters), len(modules) * max_rank, in_f)
            b_stack = torch.zeros(len(adapters), sum(outs), len(modules) * max_rank)
            for i, adapter in enumerate(adapters):
                if adapter is not None:
                    _place(a_stack[i], b_stack[i], adapter, layer, modules, outs, max_rank)
            by_target[target] = TargetLora(a_stack.to(device, dtype).contiguous(),
                                           b_stack.to(device, dtype).contiguous())
        layers.append(LayerLora(**by_target))
    return layers


def _place(a_slot: torch.Tensor, b_slot: torch.Tensor, adapter: LoraAdapter, layer: int, modules: tuple[str, ...],
           outs: list[int], max_rank: int) -> None:
    """One adapter's A and B of one layer's runtime target into its (zeroed) rows of one stack index."""
    row = 0
    for j, module in enumerate(modules):
        ab = adapter.weights.get((layer, module))
        if ab is not None:
            r0 = j * max_rank
            a_slot[r0 : r0 + adapter.rank] = ab[0]
            b_slot[row : row + outs[j], r0 : r0 + adapter.rank] = ab[1]
        row += outs[j]


def fits_stacks(layers: Sequence[LayerLora], index: int, adapter: LoraAdapter) -> bool:
    """Whether the adapter can be written over stack index `index` in place: the stacks hold that index, its rank
    is within theirs, and every target it adapts is already stacked in that layer."""
    for layer, stacks in enumerate(layers):
        for target, modules in TARGETS.items():
            stack: TargetLora | None = getattr(stacks, target)
            if stack is None:
                if any((layer, m) in adapter.weights for m in modules):
                    return False
            elif index >= stack.a.shape[0] or adapter.rank > stack.a.shape[1] // len(modules):
                return False
    return True


def write_slot(layers: Sequence[LayerLora], index: int, adapter: LoraAdapter, spec: ModelSpec) -> None:
    """Overwrite stack index `index` with the adapter, in place (fits_stacks must hold); the other indices, and
    the adapters in them, are untouched."""
    shapes = module_shapes(spec)
    for layer, stacks in enumerate(layers):
        for target, modules in TARGETS.items():
            stack: TargetLora | None = getattr(stacks, target)
            if stack is None:
                continue
            a_slot, b_slot = torch.zeros(stack.a.shape[1:]), torch.zeros(stack.b.shape[1:])
            _place(a_slot, b_slot, adapter, layer, modules, [shapes[m][1] for m in modules],
                   stack.a.shape[1] // len(modules))
            stack.a[index].copy_(a_slot)
            stack.b[index].copy_(b_slot)


@dataclass(frozen=True)
class LoraInputs:
    """Which of a step's tokens use which adapter, grouped by adapter (Punica's segment layout): group g is rows
    token_rows[group_start[g]:group_start[g + 1]] of the step, all under stack index group_adapter[g]. Base-model
    tokens are in no group: nothing is computed for them."""

    token_rows: torch.Tensor  # [num_adapted_tokens] int64, grouped by adapter
    group_start: torch.Tensor  # [num_groups + 1] int32
    group_adapter: torch.Tensor  # [num_groups] int32, stack index (slot - 1)
    group_start_host: tuple[int, ...]  # host copies: the cpu path and the launch grid read them without a sync
    group_adapter_host: tuple[int, ...]
    # The groups padded to one length M (the largest), for one batched matmul over all groups (the cpu path):
    # padded_rows [groups * M] int64, group g's rows at [g * M, g * M + size) then row 0 as filler; padded_valid
    # [num_adapted_tokens] int64, the padded positions of token_rows' entries, in order
    padded_rows: torch.Tensor
    padded_valid: torch.Tensor

    @property
    def max_group_tokens(self) -> int:
        s = self.group_start_host
        return max(b - a for a, b in zip(s, s[1:], strict=False))

    @classmethod
    def from_slots(cls, token_slots: Sequence[tuple[int, int, int]], device: torch.device) -> LoraInputs | None:
        """(first row, end row, slot) per sequence -> the grouped rows; None when every sequence is the base's."""
        groups: dict[int, list[int]] = {}
        for start, end, slot in token_slots:
            if slot:
                groups.setdefault(slot, []).extend(range(start, end))
        if not groups:
            return None
        rows, starts, adapters = [], [0], []
        width = max(len(g) for g in groups.values())
        padded, valid = [], []
        for slot in sorted(groups):
            group = groups[slot]
            valid.extend(range(len(padded), len(padded) + len(group)))
            padded.extend(group + [0] * (width - len(group)))
            rows.extend(group)
            starts.append(len(rows))
            adapters.append(slot - 1)

        def tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(tensor(rows, torch.int64), tensor(starts, torch.int32), tensor(adapters, torch.int32),
                   tuple(starts), tuple(adapters), tensor(padded, torch.int64), tensor(valid, torch.int64))
