"""What a kernel is to the compiler: its language, when it applies, and the rendered KernelSpec it yields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pllm.compiler.manifest import Language
from pllm.models.spec import ModelKind, ModelSpec

if TYPE_CHECKING:  # models.quant pulls in torch; the kernel descriptions need only the type
    from pllm.models.quant import QuantFormat

__all__ = ["Kernel", "KernelSpec", "Language", "QuantKernel"]


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
    # the model kinds whose plans may carry it (then `applies` decides): decoder kernels read a KV cache
    kinds: frozenset[ModelKind] = frozenset({ModelKind.DECODER})

    def spec(self, model: ModelSpec, dtype: str, block_size: int) -> KernelSpec:
        constants, options = self.render(model, dtype, block_size)
        suffix = self.language.suffix
        return KernelSpec(self.name, f"{self.name}.{suffix}.jinja", f"{self.name}.{suffix}", constants, options,
                          self.op, self.language, self.compile_flags)

    def planned(self, model: ModelSpec, dtype: str, block_size: int, quant: QuantFormat | None) -> KernelSpec | None:
        """This kernel specialised to a build, or None where the build does not carry it. A kernel over float
        weights is the same in a quantised build (its float weights, e.g. embeddings, still use it)."""
        if model.kind not in self.kinds or not self.applies(model, dtype):
            return None
        return self.spec(model, dtype, block_size)


# (spec, dtype, block_size, quant) -> (constants, options): a kernel over packed weights also renders with the format
QuantRender = Callable[[ModelSpec, str, int, "QuantFormat"], tuple[dict[str, Any], dict[str, bool]]]


def _any_format(spec: ModelSpec, dtype: str, quant: QuantFormat) -> bool:
    return True


@dataclass(frozen=True)
class QuantKernel:
    """A kernel that reads packed weights (models/quant.py): a quantised build carries it, rendered for its format
    (scheme and group size baked in); a float build does not."""

    name: str
    op: str
    language: Language
    render: QuantRender
    applies: Callable[[ModelSpec, str, QuantFormat], bool] = _any_format  # (spec, dtype, the build's format)
    compile_flags: tuple[str, ...] = ()
    kinds: frozenset[ModelKind] = frozenset({ModelKind.DECODER})

    def spec(self, model: ModelSpec, dtype: str, block_size: int, quant: QuantFormat) -> KernelSpec:
        constants, options = self.render(model, dtype, block_size, quant)
        suffix = self.language.suffix
        return KernelSpec(self.name, f"{self.name}.{suffix}.jinja", f"{self.name}.{suffix}", constants, options,
                          self.op, self.language, self.compile_flags)

    def planned(self, model: ModelSpec, dtype: str, block_size: int, quant: QuantFormat | None) -> KernelSpec | None:
        if quant is None or model.kind not in self.kinds or not self.applies(model, dtype, quant):
            return None
        return self.spec(model, dtype, block_size, quant)
