"""One tensor-parallel rank beyond rank 0, in its own process: its device, weight shard and KV-cache shard.

It follows rank 0: each step's fixed header arrives on its pipe (an idle engine leaves it waiting there, not in a
collective that would time out), the payload by broadcast; it runs the same forward pass and the same LM-head
collectives as rank 0 and throws the logits away (rank 0 samples). EOF on the pipe (rank 0 is gone) or a STOP
header ends it.

It obeys rank 0 alone: SIGINT and SIGTERM are ignored, since a terminal's Ctrl-C and systemd's stop reach every
process of the group or cgroup and rank 0 may be draining its requests (it sends STOP when done). So that nothing is
orphaned, the worker exits as soon as rank 0's process is gone, whatever it was doing (a thread waits on it).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from pllm.compiler.manifest import open_build, verify_files
from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.worker.logprobs import PROMPT_LOGPROB_ROWS_PER_PASS
from pllm.runtime.worker.model_runner import ModelRunner
from pllm.runtime.worker.parallel.group import DistCommunicator, GroupAddress, RankShard, join_group, leave_group
from pllm.runtime.worker.parallel.wire import Command, Header, decode

logger = logging.getLogger("pllm")


def worker_main(build_dir: str, config: EngineConfig, max_model_len: int, address: GroupAddress, rank: int,
                headers: Connection, errors: Connection) -> None:
    """The process's entry point (multiprocessing spawn); exits non-zero on any error, which rank 0 watches for,
    after writing the error's one-line text to `errors` for rank 0 to name."""
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s rank {rank} %(name)s: %(message)s")
    follow_rank0_alone()
    try:
        join_group(address, rank)
        build = open_build(build_dir, verify=False)
        verify_files(build, rank)  # the files this rank reads: its own weights shard, not the others'
        shard = RankShard(rank, address.size, address.device(rank), DistCommunicator(rank, address.size))
        runner = ModelRunner(build, config, max_model_len, shard)
        follow(runner, headers)
    except EOFError:  # rank 0 went away without a STOP: nothing left to follow
        sys.exit(1)
    except BaseException as e:
        traceback.print_exc()
        sys.stderr.flush()
        try:
            errors.send_bytes(f"{type(e).__name__}: {e}".encode())
        except OSError:
            pass  # rank 0 is gone
        sys.exit(1)
    leave_group()


def follow_rank0_alone() -> None:
    """Ignore the stop signals a whole process group gets (rank 0 decides when this worker stops), and exit at
    once when rank 0's process ends: the header pipe's EOF says so only while idle, not while joining, loading or
    blocked in a collective."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), name="pllm-tp-rank0-watch", daemon=True).start()


def _exit_with(sentinel: int) -> None:
    wait([sentinel])
    os._exit(1)


@torch.inference_mode()
def follow(runner: ModelRunner, headers: Connection) -> None:
    """Run each step rank 0 announces until it says STOP."""
    model, device = runner.model, runner.device
    while True:
        header = Header.from_bytes(headers.recv_bytes())
        if header.command is Command.STOP:
            return
        payload = torch.empty(header.payload_len, dtype=torch.int64, device=device)
        dist.broadcast(payload, src=0)
        inputs = decode(header, payload)
        hidden = model.forward(inputs.input_ids, runner._layer_metas(inputs.metas), runner.kv_caches)
        model.logits(hidden[inputs.sample_indices])  # rank 0 gathers the vocabulary slices; this rank's share
        if inputs.prompt_logprob_rows is not None:  # the same passes as logprobs.prompt_logprobs_of on rank 0
            scored = hidden[inputs.prompt_logprob_rows]
            for start in range(0, scored.shape[0], PROMPT_LOGPROB_ROWS_PER_PASS):
                model.logits(scored[start : start + PROMPT_LOGPROB_ROWS_PER_PASS])
