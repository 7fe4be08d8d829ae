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
    """What ran since the previous mark (or since the process started, for IMPORTS). pllm-serve runs some stages
    at once: the build is opened on a thread while torch imports, and the engine thread loads and warms the model
    while the main thread imports the HTTP server, so a stage's time is from the mark before it, whichever thread
    made that, to its own: the part of it nothing else hid."""

    IMPORTS = "imports"  # the interpreter, torch and the engine's modules (pllm-serve: its flags parsed first)
    TOKENIZER = "tokenizer"  # the build opened: the manifest read, every file hashed, the tokenizer loaded
    KERNELS = "kernels"  # the backend and the build's kernels (cpu: loading the .so files; triton: imports)
    WEIGHTS = "weights"  # the weights file into tensors
    MODEL = "model"  # the model's forward wiring over the weights (rotary tables, per-layer views)
    KV_POOL = "kv_pool"  # the paged KV-cache pool
    ENGINE = "engine"  # scheduler, sampler, output processing, grammar cache
    WARM_UP = "warm_up"  # the first forward, into the padding blocks (cpu; runtime/worker/warm_up.py)
    SERVER_IMPORTS = "server_imports"  # pllm-serve: FastAPI, uvicorn and the HTTP app's modules
    APP = "app"  # the HTTP app: routes, request and response schemas
    BIND = "bind"  # uvicorn start-up and the listening socket


def mark(stage: Stage) -> None:
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage.value, "t": time.time(), "cpu": time.process_time()}) + "\n")
