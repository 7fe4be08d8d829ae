"""The package layout's import directions (ARCHITECTURE.md), read from every module's imports with ast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the `pllm` package
# runtime layers, highest first: a layer imports its own and lower layers only
RUNTIME_LAYERS = ("server", "engine", "worker", "backends")
# The worker defines the step it receives (worker/step.py: plain values, no live engine objects); of the engine it
# reads only the two plain settings dataclasses a user fills in: SamplingParams (inside each step; its
# StructuredOutputsParams and the checks the two share live in modules of their own) and EngineConfig.
WORKER_READS_FROM_ENGINE = {"pllm.runtime.engine.sampling_params", "pllm.runtime.engine.structured_outputs_params",
                            "pllm.runtime.engine.param_checks", "pllm.runtime.engine.config"}
# what the runtime may take from the compiler: reading a build, and importing its rendered kernel files
RUNTIME_READS_FROM_COMPILER = {"pllm.compiler.manifest", "pllm.compiler.kernel_modules"}
MANIFEST_MODULE = "pllm.compiler.manifest"
HEAVY = ("torch", "triton", "safetensors", "transformers", "numpy")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("pllm", *parts))


def package_modules(root: Path) -> dict[str, Path]:
    """Every module of the installed package (tests and tools are not part of it)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        top = path.relative_to(root).parts[0]
        if top in ("tests", "tools", "build", "builds") or top.startswith("."):
            continue
        found[module_name(path, root)] = path
    return found


def imports_of(name: str, path: Path, at_import: bool = False) -> set[str]:
    """Every module `name` imports, anywhere in it (function bodies and TYPE_CHECKING blocks included); with
    `at_import`, only those that importing the module runs (none inside a function)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _walk(tree, at_import):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pllm.x import module`
    return found


def _walk(node: ast.AST, skip_functions: bool):
    yield node
    for child in ast.iter_child_nodes(node):
        if not (skip_functions and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            yield from _walk(child, skip_functions)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def runtime_layer(name: str) -> int | None:
    """Index in RUNTIME_LAYERS (0 = server, the top) of a runtime module, None outside the layers."""
    for i, layer in enumerate(RUNTIME_LAYERS):
        if within(name, f"pllm.runtime.{layer}"):
            return i
    return None


def violations(root: Path) -> list[str]:
    modules = package_modules(root)
    found = []
    for name, path in modules.items():
        # only pllm's own modules that exist count (`from pllm.x import Name` also yields pllm.x.Name)
        deps = {d for d in imports_of(name, path) if d in modules or not within(d, "pllm")}
        pllm_deps = sorted(d for d in deps if within(d, "pllm"))
        rel = path.relative_to(root)
        if within(name, "pllm.runtime") and name != "pllm.runtime" and runtime_layer(name) is None:
            found.append(f"{rel}: a runtime module outside {', '.join(RUNTIME_LAYERS)}")
        for dep in pllm_deps:
            if within(name, "pllm.compiler") and within(dep, "pllm.runtime"):
                found.append(f"{rel}: the compiler imports the runtime ({dep})")
            if within(name, "pllm.models") and (within(dep, "pllm.runtime") or within(dep, "pllm.compiler")):
                found.append(f"{rel}: models/ is the base, yet imports {dep}")
            if within(name, "pllm.runtime") and within(dep, "pllm.compiler") and dep not in RUNTIME_READS_FROM_COMPILER:
                found.append(f"{rel}: the runtime imports {dep} (only {sorted(RUNTIME_READS_FROM_COMPILER)})")
            mine, theirs = runtime_layer(name), runtime_layer(dep)
            if mine is not None and theirs is not None and theirs < mine:
                if not (RUNTIME_LAYERS[mine] == "worker" and dep in WORKER_READS_FROM_ENGINE):
                    found.append(f"{rel}: {RUNTIME_LAYERS[mine]} imports {dep}, a layer above it")
            if within(name, "pllm.runtime.backends.cpu") and within(dep, "pllm.runtime.backends.triton") or \
                    within(name, "pllm.runtime.backends.triton") and within(dep, "pllm.runtime.backends.cpu"):
                found.append(f"{rel}: one backend imports another ({dep})")
        if name in WORKER_READS_FROM_ENGINE:  # the contract stays plain data: it pulls no engine logic down
            found += [f"{rel}: the engine -> worker contract imports {d}" for d in pllm_deps
                      if within(d, "pllm.runtime") and d not in WORKER_READS_FROM_ENGINE]
    if MANIFEST_MODULE not in modules:
        found.append(f"no manifest module {MANIFEST_MODULE}: the runtime must read builds through one")
    else:
        found += [f"{modules[MANIFEST_MODULE].relative_to(root)}: {why}" for why in manifest_heavy_imports(modules)]
    return found


def manifest_heavy_imports(modules: dict[str, Path]) -> list[str]:
    """Heavy imports reachable from the manifest module through pllm's own modules (package __init__s included)."""
    seen, todo, found = set(), [MANIFEST_MODULE], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parent = name.rpartition(".")[0]
        if parent in modules:  # importing a module runs its package's __init__ first
            todo.append(parent)
        for dep in imports_of(name, modules[name], at_import=True):
            if dep.split(".")[0] in HEAVY:
                found.append(f"imports {dep} (through {name})")
            elif dep in modules:
                todo.append(dep)
    return sorted(set(found))


def test_imports_point_one_way():
    assert violations(ROOT) == []


def test_every_runtime_module_has_a_layer():
    runtime = [n for n in package_modules(ROOT) if within(n, "pllm.runtime") and n != "pllm.runtime"]
    assert runtime and all(runtime_layer(n) is not None for n in runtime)


@pytest.mark.parametrize("rule", ["compiler", "models", "upward", "manifest"])
def test_the_check_catches_each_rule(tmp_path, rule):
    """A minimal package breaking one rule at a time, so a check that silently passes everything fails here."""
    files = {
        "compiler/__init__.py": "", "compiler/manifest.py": "import json\n", "compiler/kernel_modules.py": "",
        "models/__init__.py": "", "models/spec.py": "", "runtime/__init__.py": "",
        **{f"runtime/{layer}/__init__.py": "" for layer in RUNTIME_LAYERS},
        "runtime/engine/engine.py": "", "runtime/worker/model_runner.py": "",
    }
    assert violations(_write(tmp_path / "ok", files)) == []
    broken = {
        "compiler": {"compiler/build.py": "from pllm.runtime.worker import model_runner\n"},
        "models": {"models/llama.py": "from pllm.compiler.manifest import open_build\n"},
        "upward": {"runtime/worker/sampler.py": "from pllm.runtime.engine.engine import LLMEngine\n"},
        "manifest": {"compiler/manifest.py": "from pllm.models.spec import ModelSpec\n",
                     "models/spec.py": "import torch\n"},
    }[rule]
    found = violations(_write(tmp_path / rule, {**files, **broken}))
    assert found and all(v.split(":")[0] in broken for v in found), found


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_manifest_module_loads_without_torch():
    code = "import sys, pllm.compiler.manifest; print(sorted(m for m in ('torch', 'triton') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
