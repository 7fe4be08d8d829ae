"""pllm-serve's flags: the argument parser and its value types, the Ray Serve options mapped onto it, and the
EngineConfig the flags describe."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from pllm import __version__
from pllm.runtime.engine.config import BACKENDS, MAX_LORAS_LIMIT, EngineConfig, SpeculativeConfig
from pllm.runtime.server.limits import MAX_BODY_BYTES, REQUEST_BODY_TIMEOUT_S
from pllm.runtime.server.tool_parsers import NO_PARSER, TOOL_CALL_PARSERS

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's switch for /v1/load_lora_adapter and unload

SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'1073741824', '512M', '2GiB', '1.5g' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 1073741824, 512M, 2G)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])


def _number(text: str, convert: type[int] | type[float], low: float, high: float, what: str):
    """text as convert reads it, within [low, high] (nan never is), else one line naming it."""
    try:
        value = convert(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, float("inf"), "a positive integer")


def positive_seconds(text: str) -> float:
    return _number(text, float, math.ulp(0.0), sys.float_info.max, "a positive number of seconds")


def non_negative_seconds(text: str) -> float:
    return _number(text, float, 0.0, sys.float_info.max, "a number of seconds >= 0")


def memory_fraction(text: str) -> float:
    """--gpu-memory-utilization: a fraction in (0, 1], refused here naming the flag rather than by the engine once
    the build is open (as its kv_cache_fraction)."""
    return _number(text, float, math.ulp(0.0), 1.0, "a fraction in (0, 1]")


def max_loras(text: str) -> int:
    """--max-loras: 1..MAX_LORAS_LIMIT, refused here naming the flag rather than once the build is open."""
    return _number(text, int, 1, MAX_LORAS_LIMIT, f"a number of adapters in 1..{MAX_LORAS_LIMIT}")


def port_number(text: str) -> int:
    """--port: 0..65535; 0 asks the system for a free (ephemeral) port, which the ready line then names."""
    return _number(text, int, 0, 65535, "a TCP port (0..65535; 0: any free port)")


def positive_bytes(text: str) -> int:
    value = parse_bytes(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size in bytes")
    return value


def model_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a model name (an empty one no client could ask for)")
    return text


def api_key(text: str) -> str:
    """--api-key (or $PLLM_API_KEY): an empty key is refused, not taken to mean "no key". vLLM would serve open;
    but whoever sets a key means the server to be closed, and an empty one (a secret rendered empty, a variable
    left blank) would leave /v1/* open without a word. Leave both unset for an open server."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} (from --api-key or $PLLM_API_KEY) is empty: it would leave "
                                         "/v1/* open; give a key, or unset both for an open server")
    return text


def lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH (a PEFT LoRA adapter folder)")
    return name, path


def speculative_config(text: str) -> SpeculativeConfig:
    """--speculative-config: vLLM's JSON object, checked now so a bad key fails before the model loads."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {e}") from None
    try:
        return SpeculativeConfig.from_dict(value)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def speculative_ngram(text: str) -> SpeculativeConfig:
    """--speculative-ngram K: n-gram drafting of K tokens a step, lookup n as vLLM's defaults."""
    try:
        return SpeculativeConfig(num_speculative_tokens=int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e) if text.strip().lstrip("-").isdigit() else
                                         f"{text!r} is not a number of tokens") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pllm-serve", description="Serve a pllm build directory over an OpenAI-compatible HTTP API."
    )
    p.add_argument("build_dir", help="a build directory made by pllm-compile")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on (0: any free port)")
    p.add_argument(
        "--api-key",
        type=api_key,
        default=os.environ.get("PLLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $PLLM_API_KEY; neither given: open; an empty key "
        "is refused)",
    )
    p.add_argument(
        "--served-model-name",
        type=model_name,
        nargs="+",
        default=None,
        help="model name(s) clients use; the first is reported (default: the source model's name)",
    )
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--max-model-len", type=positive_int, default=None)
    p.add_argument("--max-num-seqs", type=positive_int, default=256)
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-memory", type=positive_bytes, default=None, help="KV-cache bytes (e.g. 2G)")
    kv.add_argument(
        "--gpu-memory-utilization",
        type=memory_fraction,
        default=0.9,
        help="fraction of free device memory (or of available RAM on cpu) for the KV cache",
    )
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enforce-eager", action="store_true", help="cuda: run decode steps without CUDA graphs")
    p.add_argument("--huge-pages", action="store_true",
                   help="cpu: read the weights into memory on 2 MiB pages instead of mapping the file, and move the "
                        "bf16 copies the decode step reads into 2 MiB pages too (faster decode, slower start)")
    p.add_argument(
        "--cuda-graph-sizes",
        type=positive_int,
        nargs="+",
        default=None,
        help="cuda: decode batch sizes to capture as CUDA graphs (default: 1 2 4, then every multiple of 8 up to "
        "max-num-seqs or 256)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lora-modules",
        type=lora_module,
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="PEFT LoRA adapter folders to serve, each under its NAME as a `model` (listed in /v1/models), beside "
        "those packed into the build by pllm-compile --lora",
    )
    p.add_argument("--max-loras", type=max_loras, default=8,
                   help=f"LoRA adapters held at once (at most {MAX_LORAS_LIMIT})")
    p.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM does with "
        f"{RUNTIME_LORA_ENV}=True (which turns this on too). Off by default: a load reads whatever folder the "
        "request names on this machine",
    )
    spec = p.add_mutually_exclusive_group()
    spec.add_argument(
        "--speculative-config",
        type=speculative_config,
        default=None,
        metavar="JSON",
        help='speculative decoding, as vLLM spells it: \'{"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\' (n-gram lookup in the sequence itself; no draft model)',
    )
    spec.add_argument(
        "--speculative-ngram",
        dest="speculative_config",
        type=speculative_ngram,
        metavar="K",
        help="short for --speculative-config with method ngram and num_speculative_tokens K",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="ranks to run the model split over (this process and N-1 workers; one GPU each on cuda): the build's "
        "pllm-compile --tensor-parallel-size (default: 1)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=[*TOOL_CALL_PARSERS, NO_PARSER],
        default=None,
        help="how the model writes tool calls, for tool_choice 'auto' (default: the one format the build's chat "
        "template shows, if exactly one; 'none': refuse 'auto')",
    )
    p.add_argument(
        "--max-queued-requests",
        type=positive_int,
        default=1024,
        help="waiting requests beyond which new ones get 503 + Retry-After",
    )
    p.add_argument("--max-body-bytes", type=positive_bytes, default=MAX_BODY_BYTES)
    p.add_argument(
        "--request-header-timeout",
        type=positive_seconds,
        default=10.0,
        help="seconds from connecting (or from the previous response) to a complete request head; slower or "
        "silent connections are closed (default: 10)",
    )
    p.add_argument(
        "--request-body-timeout",
        type=positive_seconds,
        default=REQUEST_BODY_TIMEOUT_S,
        help=f"seconds from the request head to the end of its body, else 408 and close (default: "
        f"{REQUEST_BODY_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--timeout-keep-alive",
        type=positive_seconds,
        default=5.0,
        help="seconds an idle keep-alive connection stays open between requests (default: 5)",
    )
    p.add_argument(
        "--max-connections",
        type=positive_int,
        default=1000,
        help="open connections served at once; a request on one past them gets 503 and the connection is closed "
        "(default: 1000, under the usual 1024 open-file limit)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=non_negative_seconds,
        default=30.0,
        help="on SIGTERM, seconds to let running requests finish before aborting them",
    )
    p.add_argument("--log-stats-interval", type=positive_seconds, default=10.0, help="seconds between stats lines")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--disable-access-log", action="store_true")
    p.add_argument("--version", action="version", version=f"pllm {__version__}")
    return p


def address(host: str, port: int) -> str:
    """host:port as a URL writes it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def default_model_name(build_dir: str) -> str:
    try:
        source = json.loads((Path(build_dir) / "manifest.json").read_text()).get("source")
    except (OSError, ValueError):
        source = None
    name = Path(str(source or build_dir).rstrip("/")).name
    return name.removesuffix(".gguf") or "pllm"


def args_from_options(options: dict[str, object]) -> argparse.Namespace:
    """pllm-serve's flags from a mapping (the Ray Serve application's `args`): keys are the flags' names with
    underscores (`build_dir`, `kv_cache_memory`, ...), values what the flag takes (a list for a flag of several
    values, true/false for a switch). Checked by the same parser, so a bad key or value is refused the same way."""
    parser = build_parser()
    flags: dict[str, argparse.Action] = {}
    for action in parser._actions:  # a dest two flags share (speculative_config) is spelled by the first
        if action.dest != "help":
            flags.setdefault(action.dest, action)
    if "build_dir" not in options:
        raise ValueError("the options name no build_dir (a build directory made by pllm-compile)")
    argv = [str(options["build_dir"])]
    for key, value in options.items():
        if key == "build_dir":
            continue
        if key not in flags or key == "version":
            known = ", ".join(sorted(k for k in flags if k != "version"))
            raise ValueError(f"unknown pllm-serve option {key!r} (known: {known})")
        flag = flags[key].option_strings[0]
        if isinstance(flags[key], argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif flags[key].nargs == 0:  # store_true
            argv += [flag] if value else []
        elif isinstance(value, dict):  # a JSON flag: speculative_config in vLLM's spelling
            argv += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]

    def refuse(message: str):
        shown = ["<hidden>" if i and argv[i - 1] == "--api-key" else a for i, a in enumerate(argv)]  # no key in logs
        raise ValueError(f"bad pllm-serve options ({' '.join(shown)}): {message}")

    parser.error = refuse  # raise instead of printing usage and exiting
    return parser.parse_args(argv)


def runtime_lora_updating(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    """--allow-runtime-lora-updating, or VLLM_ALLOW_RUNTIME_LORA_UPDATING as vLLM reads it ('1' or 'true', any
    case); ValueError with --tensor-parallel-size > 1, where no adapter can be served."""
    on = args.allow_runtime_lora_updating or environ.get(RUNTIME_LORA_ENV, "0").strip().lower() in ("1", "true")
    if on and args.tensor_parallel_size > 1:
        how = "--allow-runtime-lora-updating" if args.allow_runtime_lora_updating else f"{RUNTIME_LORA_ENV}"
        raise ValueError(f"{how} cannot be used with --tensor-parallel-size {args.tensor_parallel_size}: LoRA "
                         "adapters are not split across ranks")
    return on


def served_names(args: argparse.Namespace) -> list[str]:
    return args.served_model_name or [default_model_name(args.build_dir)]


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine settings the flags name."""
    return EngineConfig(
        backend=args.backend,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        kv_cache_fraction=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        huge_pages=args.huge_pages,
        cuda_graph_sizes=tuple(args.cuda_graph_sizes) if args.cuda_graph_sizes else None,
        lora_modules=tuple(args.lora_modules),
        max_loras=args.max_loras,
        tensor_parallel_size=args.tensor_parallel_size,
        speculative_config=args.speculative_config,
    )
