# syntax=docker/dockerfile:1
# pllm-serve in a container, as a non-root user, serving a build directory made by pllm-compile.
#
#   CPU (default):  docker build -t pllm:cpu .
#   CUDA:           docker build -t pllm:cu128 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#                   (torch's CUDA wheels carry the CUDA libraries; the host's driver comes in through the NVIDIA
#                   container toolkit: docker run --gpus all ...)
#   Ray Serve:      docker build -t pllm:cpu-ray --build-arg PLLM_EXTRAS=ray .
#   Build baked in: docker build -t pllm:cpu-smollm2 --target baked --build-context build=./build .
#
# Run with the build mounted at /models/build:
#   docker run -p 8000:8000 -v "$PWD/build:/models/build:ro" pllm:cpu
# Compile a build with the image itself (its g++ and libraries are the ones that load the cpu kernels):
#   docker run --rm -v "$PWD/models:/models" --entrypoint pllm-compile pllm:cpu MODEL -o /models/build

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS runtime

# torch is pinned and installed first from its own index, so the CPU image never pulls CUDA wheels.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pllm's optional extras, comma-separated: `ray` for the Ray Serve image (deploy/kubernetes/rayservice.yaml).
ARG PLLM_EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TRITON_CACHE_DIR=/tmp/triton-cache \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# g++: pllm-compile builds the cpu backend's kernels with it, and Triton compiles its launchers with a C compiler.
# wget: KubeRay's default probes of Ray pods run it (deploy/kubernetes/rayservice.yaml).
# Versions follow the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ wget \
    && rm -rf /var/lib/apt/lists/*

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /opt/pllm
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ARCHITECTURE.md ./
COPY __init__.py ./
COPY compiler ./compiler
COPY models ./models
COPY runtime ./runtime
COPY templates ./templates
# the project itself (".", or ".[ray]"): hadolint cannot tell this local path from an unpinned package name
# hadolint ignore=DL3013
RUN pip install ".${PLLM_EXTRAS:+[${PLLM_EXTRAS}]}" && python -c "import pllm, torch; print('pllm', pllm.__version__, 'torch', torch.__version__)"

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin pllm \
    && mkdir -p /models \
    && chown pllm:pllm /models
USER 10001:10001
WORKDIR /home/pllm

EXPOSE 8000
# /health answers 200 while the engine loop lives and the server is not draining, else 503 (urlopen raises).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["pllm-serve"]
CMD ["/models/build", "--host", "0.0.0.0", "--port", "8000"]


# The build directory copied into the image, from a named build context: --build-context build=PATH.
FROM runtime AS baked
# hadolint ignore=DL3022
COPY --from=build --chown=10001:10001 . /models/build


# The default target: the build directory is mounted at /models/build.
FROM runtime AS mounted
