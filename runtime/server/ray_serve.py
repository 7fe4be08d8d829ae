"""pllm on Ray Serve: replicas of pllm's own FastAPI app, one engine each, behind Serve's proxy and router.

    pllm-serve-ray build/ --num-replicas 2 [pllm-serve's engine and API flags]
    (or, in a Serve config / KubeRay RayService: import_path pllm.runtime.server.ray_serve:build_app, args = the
    same flags by name, e.g. {build_dir: /models/build, kv_cache_memory: 1G})

Each replica (the `PllmServer` deployment) launches the engine thread exactly as pllm-serve does and serves the app
`create_app` makes over it, so the OpenAI API, errors, streaming and /metrics are pllm-serve's. With prefix affinity
(the default), Serve's proxy calls `PllmIngress` (ray_ingress.py), which forwards each request to the replica
`PrefixAffinityRouter` picks (ray_router.py); without it, the replica is Serve's ingress itself
(`__serve_build_asgi_app__`) and the proxy picks by power of two choices.
Serve owns HTTP (host, port, connections) and shutdown: a replica
being removed gets --shutdown-timeout seconds for its requests (graceful_shutdown_timeout_s), then its engine stops;
pllm-serve-ray's SIGTERM removes the application that way before stopping Serve. A replica takes a full engine batch
plus a few control requests at once (max_ongoing_requests); Serve's autoscaler counts the requests each replica
holds, running and queued in pllm's engine alike. A replica whose engine died fails Serve's health check, which
runs every HEALTH_CHECK_PERIOD_S.
Needs the `ray` extra: pip install 'pllm[ray]'.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from ray import serve
from ray.serve.config import RequestRouterConfig

from pllm.runtime.server.cli import LOG_FORMAT, app_for, launch_engine
from pllm.runtime.server.cli_args import (
    RUNTIME_LORA_ENV,
    args_from_options,
    build_parser,
    positive_int,
    runtime_lora_updating,
    served_names,
)
from pllm.runtime.server.ray_ingress import ingress_deployment, run_forwarded
from pllm.runtime.server.ray_router import ForwardedRequest, PrefixAffinityRouter, ReplicaUnavailable

logger = logging.getLogger("pllm.server")

# pllm-serve's flags that belong to its own HTTP server: under Serve, the proxy listens and holds the connections.
SERVE_OWNED_OPTIONS = frozenset(
    {"host", "port", "timeout_keep_alive", "max_connections", "request_header_timeout", "disable_access_log"}
)
# pllm-serve's flags for its own HTTP server that pllm-serve-ray has no use for (Serve's proxy holds the connections):
# refused by name when given, rather than ignored
UNUSED_HTTP_FLAGS = {
    "max_connections": "--max-connections",
    "timeout_keep_alive": "--timeout-keep-alive",
    "request_header_timeout": "--request-header-timeout",
    "disable_access_log": "--disable-access-log",
}
REPLICA_HEADER = "x-pllm-replica"  # which replica answered (its actor name), for logs, debugging and tests
APP_NAME = "pllm"  # the Serve application pllm-serve-ray runs
# requests a replica takes beyond a full engine batch (max_num_seqs): /health, /metrics, /v1/models beside it
CONTROL_REQUESTS = 8
# seconds between Serve's health checks of a replica (Serve's default: 10); Serve removes a replica after 3 failed
# checks in a row, so one whose engine died leaves routing within a few seconds
HEALTH_CHECK_PERIOD_S = 1.0
DRAIN_SLACK_S = 10.0  # beyond --shutdown-timeout: Serve stopping the replicas after their drain


def check_options(options: dict[str, object]) -> argparse.Namespace:
    owned = sorted(SERVE_OWNED_OPTIONS & set(options))
    if owned:
        raise ValueError(f"{', '.join(owned)}: set by Ray Serve's HTTP proxy (serve.start's http_options), not here")
    args = args_from_options(options)
    refuse_runtime_lora(args)
    return args


def refuse_runtime_lora(args: argparse.Namespace) -> None:
    """Runtime adapter loads (/v1/load_lora_adapter) are one engine's: under Serve a load would reach the one replica
    that took the request, and a replica added or replaced later would start without it, so requests naming the
    adapter would fail on the others. Refused (ValueError, naming the flag or the environment variable), in the
    driver and in each replica (whose environment may differ)."""
    if runtime_lora_updating(args, os.environ):
        how = ("--allow-runtime-lora-updating" if args.allow_runtime_lora_updating
               else f"{RUNTIME_LORA_ENV}={os.environ.get(RUNTIME_LORA_ENV)}")
        raise ValueError(f"{how}: not under Ray Serve, where a load would reach one replica and a replica added or "
                         "replaced later would start without it; give adapters at start (--lora-modules) or in the "
                         "build (pllm-compile --lora)")


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that made it (plain ASGI, so streaming responses and
    disconnect detection pass through untouched). Serve's proxy gives each request an X-Request-Id and adds it to
    the response itself, so pllm's echo of that same id is dropped here rather than sent twice."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        proxy_id = (b"x-request-id", dict(scope["headers"]).get(b"x-request-id"))

        async def send_named(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if tuple(h) != proxy_id]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        return await self.app(scope, receive, send_named)


class PllmReplica:
    """One replica: one engine over the build, and pllm's FastAPI app over it. Behind PllmIngress (prefix
    affinity) it answers forwarded requests; as PllmServer it is Serve's ingress itself."""

    def __init__(self, options: dict[str, object]):
        self.args = check_options(options)
        logging.getLogger("pllm").setLevel(self.args.log_level.upper())
        self.names = served_names(self.args)
        self.engine = launch_engine(self.args, self.names)
        # the replica's actor name (namespace "serve"): what `ray.get_actor` and Serve's logs call it
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        self.asgi_app = ReplicaHeader(app_for(self.engine, self.args, self.names), self.replica)

    async def handle_forwarded(self, request: ForwardedRequest):
        """A request forwarded by PllmIngress (the prefix-affinity path): the same app answers it, message by
        message. A dead engine answers ReplicaUnavailable instead, so the ingress tries another replica."""
        if not self.engine.is_alive:
            yield ReplicaUnavailable(self.replica, self.engine.dead_reason or "the engine loop has stopped")
            return
        async for message in run_forwarded(self.asgi_app, request):
            yield message

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine loop died is replaced."""
        if not self.engine.is_alive:
            raise RuntimeError(f"replica {self.replica}: the engine loop is dead")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


@serve.ingress()  # the app is made in each replica, over that replica's engine (__serve_build_asgi_app__)
class PllmServer(PllmReplica):
    """A replica that Serve's proxy calls directly (--no-prefix-affinity)."""

    def __serve_build_asgi_app__(self):
        return self.asgi_app


def deployment(options: dict[str, object], prefix_affinity: bool = True, **deployment_options) -> serve.Application:
    """The Serve application: PllmServer over the options (pllm-serve's flags by name), with Serve's deployment
    options (num_replicas or autoscaling_config, ray_actor_options, max_ongoing_requests, ...).
    prefix_affinity: Serve's proxy calls PllmIngress, which routes to the PllmServer replicas by prompt prefix
    (ray_router.py); without it, the proxy calls the PllmServer replicas itself (power of two choices)."""
    args = check_options(options)  # refuse bad options here, before any replica starts
    deployment_options.setdefault("graceful_shutdown_timeout_s", args.shutdown_timeout)
    deployment_options.setdefault("health_check_period_s", HEALTH_CHECK_PERIOD_S)
    deployment_options.setdefault("max_ongoing_requests", replica_max_ongoing_requests(args.max_num_seqs))
    if prefix_affinity:
        # a holder a whole batch busier than the least loaded replica is passed over (PrefixAffinityRouter; at most
        # half the replica's max_ongoing_requests, which caps the queue lengths Serve reports)
        router = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter, request_router_kwargs={"max_imbalance": args.max_num_seqs}
        )
        deployment_options.setdefault("request_router_config", router)
    if not prefix_affinity:
        return serve.deployment(PllmServer).options(**deployment_options).bind(dict(options))
    # the same name either way, so a Serve config's `deployments` entry for PllmServer holds for both
    engines = serve.deployment(PllmReplica, name="PllmServer").options(**deployment_options).bind(dict(options))
    return ingress_deployment(args.shutdown_timeout).bind(engines, args.max_body_bytes, args.request_body_timeout)


def build_app(args: dict[str, object]) -> serve.Application:
    """Serve's application builder (import_path pllm.runtime.server.ray_serve:build_app): `args` are pllm-serve's
    flags by name, plus prefix_affinity (default true); replicas, autoscaling and resources come from the
    config's `deployments` entry for PllmServer."""
    args = dict(args)
    prefix_affinity = args.pop("prefix_affinity", True)
    if not isinstance(prefix_affinity, bool):
        raise ValueError(f"prefix_affinity must be true or false, not {prefix_affinity!r}")
    return deployment(args, prefix_affinity)


# -- pllm-serve-ray: a local Ray instance (or --address) serving the replicas ------------------------------------
def build_ray_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "pllm-serve-ray"
    p.description = "Serve a pllm build in replicas on Ray Serve, one engine each, behind one OpenAI-compatible API."
    for action in p._actions:  # refused when given (check_ray_args): None tells given from not
        if action.dest in UNUSED_HTTP_FLAGS:
            action.default, action.help = None, "not for pllm-serve-ray: Serve's proxy holds the connections"
    ray = p.add_argument_group("Ray Serve")
    ray.add_argument("--address", default=None, help="a Ray cluster to join (default: start a local one)")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--num-replicas", type=positive_int, default=1)
    scale.add_argument(
        "--max-replicas",
        type=positive_int,
        default=None,
        help="autoscale between 1 and this many replicas on the requests each holds (running or queued)",
    )
    ray.add_argument(
        "--target-ongoing-requests",
        type=positive_int,
        default=None,
        help="with --max-replicas: requests per replica Serve aims for (default: --max-num-seqs, a full batch); "
        "without it, refused",
    )
    ray.add_argument("--num-cpus-per-replica", type=float, default=None,
                     help="default: one per tensor-parallel rank on the cpu backends, 1 with --backend cuda")
    ray.add_argument("--num-gpus-per-replica", type=float, default=None,
                     help="default: the replica's --tensor-parallel-size with --backend cuda, none otherwise")
    ray.add_argument(
        "--prefix-affinity",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="route requests that share a prompt prefix to the replica that has it cached, else by power of two "
        "choices; --no-prefix-affinity: Serve's proxy picks replicas itself, one hop fewer (default: on)",
    )
    return p


def replica_resources(args: argparse.Namespace) -> dict[str, float]:
    """What Ray reserves for one replica: a GPU per tensor-parallel rank on cuda, a CPU per rank otherwise (each
    rank is a process of its own), unless given."""
    ranks, on_gpus = args.tensor_parallel_size, args.backend == "cuda"
    gpus = args.num_gpus_per_replica if args.num_gpus_per_replica is not None else float(ranks if on_gpus else 0)
    cpus = args.num_cpus_per_replica if args.num_cpus_per_replica is not None else float(1 if on_gpus else ranks)
    if on_gpus and gpus < ranks:
        raise ValueError(f"--num-gpus-per-replica {gpus:g} is fewer than --tensor-parallel-size {ranks}: each rank "
                         "needs a GPU of its own")
    return {"num_cpus": cpus, "num_gpus": gpus}


def replica_max_ongoing_requests(max_num_seqs: int) -> int:
    """The requests Serve sends one replica at once: a full engine batch and the control requests beside it (Serve's
    own default, 5, would cap the batch at 5)."""
    return max_num_seqs + CONTROL_REQUESTS


def deployment_options(args: argparse.Namespace) -> dict[str, object]:
    actor = replica_resources(args)
    batch = replica_max_ongoing_requests(args.max_num_seqs)
    if args.max_replicas is None:
        return {"num_replicas": args.num_replicas, "max_ongoing_requests": batch, "ray_actor_options": actor}
    target = args.target_ongoing_requests or args.max_num_seqs
    return {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": target},
        "max_ongoing_requests": max(target * 2, batch),  # room above the target, so the queue Serve sees can grow
        "ray_actor_options": actor,
    }


def check_ray_args(args: argparse.Namespace) -> None:
    """pllm-serve's flags that mean nothing under Serve, --target-ongoing-requests without autoscaling, and runtime
    adapter loads (refuse_runtime_lora): refused by name (ValueError), not ignored."""
    given = [flag for dest, flag in UNUSED_HTTP_FLAGS.items() if getattr(args, dest) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: pllm-serve's own HTTP server's, not pllm-serve-ray's (Ray Serve's "
                         "proxy holds the connections; see Serve's http_options)")
    if args.target_ongoing_requests is not None and args.max_replicas is None:
        raise ValueError("--target-ongoing-requests is for autoscaling: give --max-replicas too")
    refuse_runtime_lora(args)


def engine_options(args: argparse.Namespace) -> dict[str, object]:
    """The pllm-serve options a replica takes: those given on the command line, by name, and the API key however it
    was given (its default, $PLLM_API_KEY, is read here: a replica on another node has another environment)."""
    defaults = vars(build_parser().parse_args([args.build_dir]))
    keep = set(defaults) - SERVE_OWNED_OPTIONS
    return {
        k: getattr(args, k)
        for k in keep
        if getattr(args, k) != defaults[k] or k == "build_dir" or (k == "api_key" and args.api_key is not None)
    }


class StopSignals:
    """SIGTERM/SIGINT: the first drains (`drain`), a second stops at once (`now`)."""

    def __init__(self):
        self.drain = threading.Event()
        self.now = threading.Event()

    def __call__(self, signum, frame) -> None:
        (self.now if self.drain.is_set() else self.drain).set()


def drain(app_name: str, timeout_s: float, now: threading.Event) -> bool:
    """Delete the application as Serve removes replicas: its routes go (new requests get Serve's 404), each replica
    (and ingress) finishes the requests it holds for up to timeout_s, then stops. True once it is gone; False when
    `now` was set or it outlived timeout_s + DRAIN_SLACK_S."""
    serve.delete(app_name, _blocking=False)
    deadline = time.monotonic() + timeout_s + DRAIN_SLACK_S
    while app_name in serve.status().applications:
        if now.wait(0.5) or time.monotonic() > deadline:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    import ray  # the CLI alone starts Ray

    parser = build_ray_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT, datefmt="%m-%d %H:%M:%S")
    try:
        check_ray_args(args)
        app = deployment(engine_options(args), args.prefix_affinity, **deployment_options(args))
    except ValueError as exc:
        print(f"pllm-serve-ray: error: {exc}", file=sys.stderr)
        return 2
    ray.init(address=args.address)
    stop = StopSignals()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"pllm-serve-ray: ready at http://{args.host}:{args.port} (OpenAI API under /v1)", flush=True)
        stop.drain.wait()
        logger.info("stopping: new requests get 404 from Serve's proxy; requests in flight finish for up to %.0f s "
                    "(a second signal stops at once)", args.shutdown_timeout)
        if not drain(APP_NAME, args.shutdown_timeout, stop.now):
            logger.warning("drain cut short: stopping Serve with requests still in flight")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
