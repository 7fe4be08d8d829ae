"""What a kernel is to the compiler: its language, when it applies, and the rendered KernelSpec it yields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pllm.compiler.manifest import Language
from pllm.models.quant import QuantFormat
from pllm.models.spec import ModelKind, ModelSpec

__all__ = ["Kernel", "KernelSpec", "Language"]


@dataclass(frozen=True)
class KernelSpec:
    """One rendered kernel file: which template, what file name, the numbers and the structural options."""

    name: str  # "rms_norm", also the launcher's name inside the file
    template: str  # "rms_norm.py.jinja"
    file_name: str  # "rms_norm.py" (Triton, imported) or "cpu_decode_attention.cpp" (C++, compiled at build)
    # UPPER_CASE name -> int | float | str | bool; rendered as module-level constants, passed as tl.constexpr.
    # A dict inside a frozen dataclass: the plan is built once by make_plan and never mutated.
    constants: dict[str, Any] = field(hash=False)
    # lower_case name -> bool: what the template's {% if %} blocks read (e.g. whether a dim needs a mask).
    options: dict[str, bool] = field(hash=False)
    op: str  # what the backends bind it by ("rms_norm" for rms_norm and cpu_rms_norm; Ops.attention uses two)
    language: Language
    compile_flags: tuple[str, ...] = ()  # C++ only: flags this kernel needs beyond the shared ones
    # C++ only: added for a second try where the first compile fails (a toolchain without an optional instruction set
    # the source uses where it can, e.g. an assembler older than the AMX tile instructions)
    fallback_flags: tuple[str, ...] = ()

    def to_manifest(self) -> dict[str, Any]:
        entry = {
            "file": self.file_name,
            "template": self.template,
            "op": self.op,
            "language": self.language.value,
            "constants": dict(self.constants),
            "options": dict(self.options),
        }
        if self.compile_flags:
            entry["compile_flags"] = list(self.compile_flags)
        return entry


# (spec, dtype, block_size) -> (constants, options): every number the template reads, computed in Python
Render = Callable[[ModelSpec, str, int], tuple[dict[str, Any], dict[str, bool]]]


def _always(spec: ModelSpec, dtype: str) -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    """One kernel, described once: its name and op, its language, when it applies and what it renders with."""

    name: str  # file and template stem; the launcher's (Triton) or library's (C++) name
    op: str  # the operation it implements: the key the backends bind it by
    language: Language
    render: Render
    applies: Callable[[ModelSpec, str], bool] = _always  # (spec, dtype): whether the plan carries it
    compile_flags: tuple[str, ...] = ()  # C++ only
    fallback_flags: tuple[str, ...] = ()  # C++ only: KernelSpec.fallback_flags
    # the model kinds whose plans may carry it (then `applies` decides): decoder kernels read a KV cache
    kinds: frozenset[ModelKind] = frozenset({ModelKind.DECODER})
    quantized: bool = False  # reads packed weights (models/quant.py): in the plan only of a build that keeps some
    # reads float weights, and packed ones too when the build keeps some: rendered with the option `packed` (whether
    # it does), so a float build's kernel carries no packed-weight code
    packed_option: bool = False

    def spec(self, model: ModelSpec, dtype: str, block_size: int, quant: QuantFormat | None = None) -> KernelSpec:
        constants, options = self.render(model, dtype, block_size)
        if self.packed_option:
            options = {**options, "packed": quant is not None}
        suffix = self.language.suffix
        return KernelSpec(self.name, f"{self.name}.{suffix}.jinja", f"{self.name}.{suffix}", constants, options,
                          self.op, self.language, self.compile_flags, self.fallback_flags)
