"""pllm-serve: the flags (cli_args.py), the engine thread over the build, and the HTTP server (draining.py) on it.

Start-up runs three ways at once, so the time to the first answer is close to what the imports alone take: the
build is opened (manifest, every file hashed, the tokenizer; with --huge-pages the weights read) on a thread
while torch and the engine's modules import; then the engine thread loads the model and runs its first forward
(warm_up.py) while this thread imports FastAPI and uvicorn. Hashing, file reads and torch's ops release the GIL;
the imports hold it, so two imports at once would only take turns. (Loading torch's shared library on a third
thread, beside FastAPI's imports, measured no faster on 2 cores: the hashing already has the second one.) Cyclic
garbage collection waits until the engine is ready (main). The listening socket comes first of all
(listen_socket), so a port in use fails at once; nothing accepts on it until the engine is ready, so /health never
answers before it (a connection made earlier waits in the backlog, then is served).
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from pllm.runtime.engine.build_open import BuildOpening
from pllm.runtime.server.cli_args import address, build_parser, engine_config, runtime_lora_updating, served_names
from pllm.runtime.worker.startup_timing import Stage, mark

if TYPE_CHECKING:
    from pllm.runtime.server.async_engine import AsyncEngine

logger = logging.getLogger("pllm.server")

LOG_FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"
# After the drain (--shutdown-timeout): seconds uvicorn gives open connections to close before it exits. A
# supervisor's grace period (Kubernetes' terminationGracePeriodSeconds) must cover both, and engine teardown.
CONNECTIONS_CLOSE_TIMEOUT_S = 5
LISTEN_BACKLOG = 2048  # uvicorn's default


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound and listening before anything loads, then handed to uvicorn: a port in use (or a
    host that is no address here) fails at once, not once the model has loaded, and no other process can take the
    port in between. Bound as uvicorn binds: SO_REUSEADDR (a restart need not wait out the previous server's
    TIME_WAIT connections; a port something listens on is still refused), IPv6 for a host with ':'. OSError."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def launch_engine(args: argparse.Namespace, names: list[str], opening: BuildOpening | None = None) -> AsyncEngine:
    """The engine thread over args.build_dir, with its metrics (raises ValueError or OSError on a bad build).
    opening: the build already being opened; else the engine opens it."""
    from pllm.runtime.engine.engine import LLMEngine
    from pllm.runtime.server.async_engine import AsyncEngine
    from pllm.runtime.server.metrics import ServerMetrics

    config = engine_config(args)
    return AsyncEngine.launch(
        lambda: LLMEngine(args.build_dir, config, opening),
        metrics=ServerMetrics(names[0]),
        max_queued_requests=args.max_queued_requests,
        log_stats_interval_s=args.log_stats_interval,
    )


def app_for(engine: AsyncEngine, args: argparse.Namespace, names: list[str]):
    """pllm's FastAPI app over a launched engine, as the flags configure it."""
    from pllm.runtime.server.api import create_app

    return create_app(
        engine, names, args.api_key, args.max_body_bytes, args.request_body_timeout, args.tool_call_parser,
        runtime_lora_updating(args, os.environ),
    )


def reads_weights_early(args: argparse.Namespace) -> bool:
    """Whether the engine will run on the cpu in this one process with --huge-pages: then the thread that opens the
    build also reads its weights into huge pages (loader.load_weights), beside the imports. Only for an explicit
    --backend cpu: `auto` may pick a GPU, and weights read for the cpu would then sit unused (`auto` reads them at
    load instead)."""
    return args.huge_pages and args.backend == "cpu" and args.tensor_parallel_size == 1


def main(argv: list[str] | None = None) -> int:
    # Start-up makes ~300k long-lived objects (torch's and FastAPI's modules) and little garbage (~1 MB of import
    # cycles): collecting while they are made costs a tenth of the imports, and every full collection afterwards
    # would walk them all again (~0.1 s, held under the GIL, in the middle of serving). So no collection until the
    # engine is ready; then what start-up made is frozen (gc.freeze: never walked or collected) and collection
    # resumes for what serving makes.
    gc.disable()
    try:
        return serve(build_parser().parse_args(argv))
    finally:
        gc.enable()  # (an error before ready, or a caller's own process)


def serve(args: argparse.Namespace) -> int:
    """Starts the engine and the HTTP server over args.build_dir and serves until stopped; the exit status."""
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, datefmt="%m-%d %H:%M:%S")
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as exc:
        where = address(args.host, args.port)
        print(f"pllm-serve: error: cannot listen on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with sock:
        return serve_on(args, sock)


def serve_on(args: argparse.Namespace, sock: socket.socket) -> int:
    """serve() once its socket listens."""
    names = served_names(args)
    try:
        runtime_lora_updating(args, os.environ)  # refused with tensor parallelism before anything loads
    except ValueError as exc:
        print(f"pllm-serve: error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    opening = BuildOpening(args.build_dir, reads_weights_early(args))  # hashing, file reads, beside the imports
    import pllm.runtime.server.async_engine  # noqa: F401  (torch and the engine, before the engine thread needs them)

    mark(Stage.IMPORTS)
    with ThreadPoolExecutor(1, thread_name_prefix="pllm-launch") as pool:
        launching = pool.submit(launch_engine, args, names, opening)  # the model loads and warms up meanwhile
        import uvicorn

        from pllm.runtime.server.api import create_app  # noqa: F401  (FastAPI, pydantic: the app's modules)
        from pllm.runtime.server.connections import ConnectionLimits, LimitedH11Protocol
        from pllm.runtime.server.draining import DrainingServer
        from pllm.runtime.worker.model_runner import BackendUnavailable

        mark(Stage.SERVER_IMPORTS)
        try:
            engine = launching.result()
        except (ValueError, OSError, BackendUnavailable) as exc:
            print(f"pllm-serve: error: {exc}", file=sys.stderr)
            return 2
    app = app_for(engine, args, names)
    mark(Stage.APP)
    limits = ConnectionLimits(args.request_header_timeout, args.max_connections)
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=not args.disable_access_log,
        http=functools.partial(LimitedH11Protocol, limits=limits),
        timeout_keep_alive=args.timeout_keep_alive,
        timeout_graceful_shutdown=CONNECTIONS_CLOSE_TIMEOUT_S,
        log_config=None,  # keep our logging format
    )
    server = DrainingServer(uv_config, engine, args.shutdown_timeout)
    logger.info("engine ready in %.1f s; serving %s", time.perf_counter() - start, ", ".join(names))
    gc.freeze()
    gc.enable()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    return 0 if server.started and not server.engine_died else 1


if __name__ == "__main__":
    sys.exit(main())
