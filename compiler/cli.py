"""pllm-compile: read a model and write a self-contained build directory."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time

from pllm.compiler.build import BuildError, BuildOptions, build
from pllm.compiler.gpu_compile import GpuCompileError
from pllm.compiler.lm_head import LmHead
from pllm.compiler.plan import BLOCK_SIZES
from pllm.compiler.quantize import INT4_DEFAULT_GROUP, INT4_GROUP_SIZES, Quantization
from pllm.compiler.source import DEFAULT_MODEL, ModelSourceError
from pllm.compiler.spec import ConfigError
from pllm.models.spec import DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pllm-compile",
        description="Compile a Hugging Face model (folder, cached hub id, or .gguf) into a pllm build directory.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help=f"model folder, hub id in the local HF cache, .gguf file, or a short name (default: {DEFAULT_MODEL})",
    )
    p.add_argument("-o", "--output", default="build", help="build directory to write (default: build)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", *DTYPES),
        help="weight dtype (auto: for the CPU, bfloat16 where it has native bf16 arithmetic, else float32; for a "
        "GPU, the checkpoint's). float32 for comparison with transformers: its greedy tokens equal transformers'",
    )
    p.add_argument("--block-size", type=int, default=16, choices=BLOCK_SIZES, help="KV-cache block size in tokens")
    p.add_argument(
        "--target",
        default=None,
        choices=("sm_80", "sm_90", "auto"),
        help="also compile the kernels for this GPU, as a check that they compile: serving never loads the stored "
        "binaries (it JIT-compiles on first launch)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        type=name_path,
        metavar="NAME=PATH",
        help="pack a PEFT LoRA adapter folder into the build under NAME (repeatable); requests pick it by name",
    )
    p.add_argument(
        "--quantization",
        default=None,
        choices=[q.value for q in Quantization],
        help="keep the decoder's linear weights packed: int8 (per output channel), int4 (groups with a scale and "
        "min), int4_sym (groups with a scale, llama.cpp's Q4_0 rule), or gguf (a .gguf input's Q8_0/Q4_0/Q4_1/Q4_K "
        "blocks as they are; other types are dequantised); the LM head then at 8 bits, or 6 or float (--lm-head). "
        "Default: float "
        "weights in --dtype",
    )
    p.add_argument(
        "--quant-group-size",
        type=int,
        default=None,
        help=f"int4 and int4_sym group size, even, {INT4_GROUP_SIZES[0]}..{INT4_GROUP_SIZES[-1]}, dividing the "
        f"model's input widths (default {INT4_DEFAULT_GROUP}, as llama.cpp's 4-bit types)",
    )
    p.add_argument(
        "--lm-head",
        default=None,
        choices=[h.value for h in LmHead],
        help="with --quantization: the LM head's storage, int8 (groups of 32, as GGUF's Q8_0; the default), int6 "
        "(groups of 32, 6.5 bits a weight, as llama.cpp's 4-bit files keep theirs at Q6_K) or float (in --dtype). "
        "The embedding stays float either way",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N ranks (GPUs, or CPU processes): kernels for one rank's heads and one weights "
        "file per rank; serve it with pllm-serve --tensor-parallel-size N (default: 1)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def name_path(text: str) -> tuple[str, str]:
    """NAME=PATH, as --lora takes it (and pllm-serve's --lora-modules)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH")
    return name, path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    options = BuildOptions(dtype=args.dtype, block_size=args.block_size, target=args.target, progress=not args.quiet,
                           loras=tuple(args.lora), tensor_parallel_size=args.tensor_parallel_size,
                           quantization=None if args.quantization is None else Quantization(args.quantization),
                           quant_group_size=args.quant_group_size,
                           lm_head=None if args.lm_head is None else LmHead(args.lm_head))
    try:
        with _say_choices(), _interrupt_once():
            out = build(args.model, args.output, options)
    except (BuildError, ModelSourceError, ConfigError, GpuCompileError) as e:
        return _error(str(e))
    except OSError as e:  # disk full, permissions changed mid-compile: the OS names the file (a write, not always)
        return _error(f"{e.filename or args.output}: {e.strerror or e}")
    except KeyboardInterrupt as e:  # the build has cleaned up on its way out, as for any failure
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        _error(f"interrupted by {signum.name}; the compile stopped and removed what it had written")
        return 128 + signum
    print(f"pllm-compile: wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (docker stop, timeout), raised where the compile is, so it cleans up as for Ctrl-C."""

    signum = signal.SIGTERM


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def _interrupt_once():
    """Ctrl-C (SIGINT) and SIGTERM raised where the compile is (KeyboardInterrupt, Terminated), so it cleans up on
    its way out as for any failure; once: both are ignored from the first on, so a second cannot cut the clean-up
    short. The previous handlers come back afterwards (main may run inside another program)."""

    def on_signal(signum, frame):
        _ignore_stop_signals()
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    try:
        previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread (an embedding application's): its own handling stands
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _say_choices():
    """The build's choices (its dtype and why) as 'pllm-compile: ...' lines on stdout, warnings on stderr; stderr
    otherwise stays for the one error line of a failed compile."""
    info = logging.StreamHandler(sys.stdout)
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    warning = logging.StreamHandler(sys.stderr)
    warning.setLevel(logging.WARNING)
    logger = logging.getLogger("pllm")
    level = logger.level
    for handler in (info, warning):
        handler.setFormatter(logging.Formatter("pllm-compile: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(info)
        logger.removeHandler(warning)
        logger.setLevel(level)


def _error(message: str) -> int:
    # one line, whatever a library put in the message
    print(f"pllm-compile: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def entry() -> int:
    """The pllm-compile command: main, then the process exits ignoring Ctrl-C and SIGTERM (one while the interpreter
    waits for the compile's threads printed a traceback after the one-line message, or made a finished compile's
    exit status a failure)."""
    code = main()
    _ignore_stop_signals()
    return code


if __name__ == "__main__":
    sys.exit(entry())
