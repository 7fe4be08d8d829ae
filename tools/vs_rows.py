"""The rows of tools/bench_vs_llamacpp.py's table: one figure on each side, its target from issue 15, and the table
itself. Apart so the tool's measuring and its reporting can each be read alone."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Goal(Enum):
    AT_LEAST = ">="  # pllm / llama.cpp must reach the ratio (throughput)
    AT_MOST = "<="  # pllm / llama.cpp must stay under it (latency)


@dataclass(frozen=True)
class Target:
    goal: Goal
    ratio: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.ratio if self.goal is Goal.AT_LEAST else ratio <= self.ratio

    def __str__(self) -> str:
        return f"{self.goal.value}{self.ratio:g}x"


@dataclass(frozen=True)
class Row:
    model: str
    metric: str  # e.g. "decode b1 tok/s", "serve c16 out tok/s"
    pllm_weights: str  # precision on each side, e.g. "int4" / "Q4_K"
    llama_weights: str
    pllm: float | None  # None: not measured, `note` says why
    llama: float | None
    target: Target | None
    note: str = ""
    pllm_bytes: int | None = None  # decode rows: weight bytes a token reads (tools/step_bytes.py)
    llama_bytes: int | None = None
    read_bytes_per_s: float | None = None  # decode rows: the read bandwidth sampled between the row's repetitions

    @property
    def ratio(self) -> float | None:
        return self.pllm / self.llama if self.pllm is not None and self.llama else None


@dataclass(frozen=True)
class Measured:
    """One pllm figure, or why there is none."""

    value: float | None
    why_not: str = ""


def serve_targets(concurrency: int) -> tuple[Target | None, Target | None]:
    """(output tok/s, TTFT p50) targets: batch-1 through the servers >= 1.2x; concurrency 8-16 >= 2x with TTFT no
    worse; none in between."""
    if concurrency == 1:
        return Target(Goal.AT_LEAST, 1.2), None
    if concurrency >= 8:
        return Target(Goal.AT_LEAST, 2.0), Target(Goal.AT_MOST, 1.0)
    return None, None


def format_table(rows: list[Row]) -> str:
    head = (f"{'model':<9} {'metric':<22} {'weights pllm/llama.cpp':<23} {'pllm':>9} {'llama.cpp':>10} "
            f"{'ratio':>7} {'target':>8} {'met':>4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def cell(v: float | None) -> str:
            return f"{v:>9.1f}" if v is not None else f"{'n/a':>9}"

        ratio = r.ratio
        met = "" if ratio is None or r.target is None else ("yes" if r.target.met(ratio) else "no")
        lines.append(
            f"{r.model:<9} {r.metric:<22} {r.pllm_weights + ' / ' + r.llama_weights:<23} {cell(r.pllm)} "
            f"{cell(r.llama):>10} {(f'{ratio:.2f}x' if ratio is not None else '-'):>7} "
            f"{(str(r.target) if r.target else '-'):>8} {met:>4}" + (f"  {r.note}" if r.note else "")
        )
    return "\n".join(lines)


def format_bytes_table(rows: list[Row]) -> str:
    """The decode rows as rates of memory: MB of weights a token reads on each side, the GB/s that makes at the
    row's tok/s, and that as a share of the read bandwidth measured between the row's repetitions (over 100%: read
    partly from the caches). "at equal GB/s": the ratio if both sides streamed their bytes equally fast (llama.cpp's
    bytes over pllm's); "pllm at read bw": pllm's tok/s were its bytes to stream at the read bandwidth, over
    llama.cpp's tok/s, the most a memory-bound pllm row can show."""
    head = (f"{'model':<9} {'metric':<22} {'weights pllm/llama.cpp':<23} {'MB/token':>15} {'GB/s':>13} "
            f"{'read GB/s':>9} {'% of read':>9} {'at equal GB/s':>14} {'pllm at read bw':>16}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.pllm_bytes is None or r.llama_bytes is None:
            continue

        def rate(tok_s: float | None, nbytes: int) -> float | None:
            return None if tok_s is None else tok_s * nbytes / 1e9

        ours, theirs = rate(r.pllm, r.pllm_bytes), rate(r.llama, r.llama_bytes)
        read_bytes_per_s = r.read_bytes_per_s
        share = "-" if read_bytes_per_s is None or ours is None or theirs is None else (
            f"{100 * ours * 1e9 / read_bytes_per_s:.0f} / {100 * theirs * 1e9 / read_bytes_per_s:.0f}")
        ceiling = "-" if read_bytes_per_s is None or not r.llama else (
            f"{read_bytes_per_s / r.pllm_bytes / r.llama:.2f}x")
        rates = "-" if ours is None or theirs is None else f"{ours:.1f} / {theirs:.1f}"
        read = "-" if read_bytes_per_s is None else f"{read_bytes_per_s / 1e9:.1f}"
        lines.append(f"{r.model:<9} {r.metric:<22} {r.pllm_weights + ' / ' + r.llama_weights:<23} "
                     f"{f'{r.pllm_bytes / 1e6:.1f} / {r.llama_bytes / 1e6:.1f}':>15} {rates:>13} {read:>9} {share:>9} "
                     f"{f'{r.llama_bytes / r.pllm_bytes:.2f}x':>14} {ceiling:>16}")
    return "\n".join(lines)
