"""KernelPlan -> Triton source: one readable .py per kernel, rendered from templates/*.py.jinja."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from pllm.compiler.plan import KernelPlan, KernelSpec

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"


def _py(value: Any) -> str:
    """A constant as Python source: repr round-trips ints, floats (1e-05), strings and bools exactly."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # filters receive undefined values unchecked; StrictUndefined raises here, naming the variable
    assert isinstance(value, (bool, int, float, str)), f"constant of unsupported type: {value!r}"
    return repr(value)


def make_environment(template_dir: Path = TEMPLATE_DIR) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)),
        undefined=jinja2.StrictUndefined,  # a name the plan did not provide is an error, never an empty string
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["py"] = _py
    return env


def render_kernel(env: jinja2.Environment, kernel: KernelSpec) -> str:
    template = env.get_template(kernel.template)
    # constants by their UPPER_CASE names, options by their lower_case names, nothing else
    return template.render(kernel_name=kernel.name, template_name=kernel.template, **kernel.constants,
                           **kernel.options)


def render_plan(plan: KernelPlan, out_dir: Path, template_dir: Path = TEMPLATE_DIR) -> list[Path]:
    """Write one .py per kernel into out_dir. Same plan -> byte-identical files (no timestamps, fixed order)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = make_environment(template_dir)
    paths = []
    for kernel in plan.kernels:
        path = out_dir / kernel.file_name
        # write bytes: text mode would translate newlines on some platforms
        path.write_bytes(render_kernel(env, kernel).encode("utf-8"))
        paths.append(path)
    return paths
