"""Start-up timing marks: with $PLLM_STARTUP_TIMING naming a file, each start-up stage appends one JSON line there:
the wall time at which it ended and the process's CPU time so far (all threads), so tools/bench_startup.py can split
the time from process start to the first answer. Unset (the default), a mark costs one environment lookup."""

from __future__ import annotations

import json
import os
import time
from enum import Enum

ENV = "PLLM_STARTUP_TIMING"


class Stage(Enum):
    """What ran since the previous mark (or since the process started, for IMPORTS)."""

    IMPORTS = "imports"  # the interpreter and every module the server imports before main() runs
    TOKENIZER = "tokenizer"  # reading the manifest, then transformers and the tokenizer files
    MANIFEST = "manifest"  # checking the build's files against the manifest: what of it the tokenizer did not hide
    KERNELS = "kernels"  # the backend and the build's kernels (cpu: loading the .so files; triton: imports)
    WEIGHTS = "weights"  # the weights file into tensors
    MODEL = "model"  # the model's forward wiring over the weights (rotary tables, per-layer views)
    KV_POOL = "kv_pool"  # the paged KV-cache pool
    ENGINE = "engine"  # scheduler, sampler, output processing, grammar cache
    APP = "app"  # the HTTP app: routes, request and response schemas
    BIND = "bind"  # uvicorn start-up and the listening socket


def mark(stage: Stage) -> None:
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage.value, "t": time.time(), "cpu": time.process_time()}) + "\n")
