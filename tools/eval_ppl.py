"""Perplexity of builds on a fixed text: what quantising the weights costs in quality.

    python tools/eval_ppl.py BUILD [BUILD ...] [--text tools/data/declaration.txt] [--window 256] [--generate]
                             [--max-batched-tokens N]

The text (default: the Declaration of Independence, public domain, 8 KB) is tokenised once and cut into
non-overlapping windows of --window tokens, each starting with the model's BOS token where it has one; every build
scores the same windows through the engine's prompt logprobs (each token's log-probability given the tokens before
it in its window). Perplexity = exp(mean negative log-likelihood) over all scored tokens. With --generate, each
build's greedy completion of a chat prompt is printed too, to show the output stays sensible. --max-batched-tokens
caps the tokens of each engine step (the windows are then prefilled in chunks): at the cpu backend's packed-row
limit (64) or below, a quantised build scores every token through the packed rows, activations quantised as in
decode, rather than through the prefill path's float GEMM. An evaluation, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pllm import LLM, SamplingParams

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "declaration.txt"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def windows(llm: LLM, text: str, size: int) -> list[list[int]]:
    tokenizer = llm.engine.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = llm.engine.spec.bos_token_id
    body = size - (bos is not None)
    return [([bos] if bos is not None else []) + ids[i : i + body] for i in range(0, len(ids) - 1, body)]


def perplexity(llm: LLM, chunks: list[list[int]]) -> tuple[float, int]:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    nll, count = 0.0, 0
    outputs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    for out in outputs:
        for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):  # the first has nothing before
            nll -= entry[token].logprob
            count += 1
    return math.exp(nll / count), count


def describe(build: Path) -> str:
    manifest = json.loads((build / "manifest.json").read_text())
    q = manifest.get("quantization") or {}
    if not q:
        return manifest["dtype"]
    layers = [e for name, e in q["tensors"].items() if name != "lm_head"]
    formats = sorted({f"{e['scheme']}/g{e['group_size']}" for e in layers})
    head = q.get("lm_head", "float")  # builds from before --lm-head kept it float
    return f"{manifest['dtype']} + {q['method']} ({', '.join(formats)}), lm head {head}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", type=Path)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--window", type=int, default=256, help="tokens per scored window (default 256)")
    ap.add_argument("--generate", action="store_true", help="also print each build's greedy chat completion")
    ap.add_argument("--max-batched-tokens", type=int, default=None,
                    help="tokens per engine step (default: the engine's); 64 or fewer scores through the packed rows")
    args = ap.parse_args()
    text = args.text.read_text()
    rows = []
    for build in args.builds:
        limit = {} if args.max_batched_tokens is None else {"max_num_batched_tokens": args.max_batched_tokens}
        llm = LLM(str(build), backend="cpu", kv_cache_memory=1 << 28, **limit)
        ppl, count = perplexity(llm, windows(llm, text, args.window))
        size = sum(f.stat().st_size for f in build.glob("*.safetensors"))
        rows.append((str(build), describe(build), size, ppl, count))
        if args.generate:
            out = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
            print(f"{build}: {out[0].outputs[0].text!r}")
        del llm
    base = rows[0][3]
    print(f"\ntext: {args.text.name}, {rows[0][4]} scored tokens in windows of {args.window}")
    print(f"{'build':<28} {'weights':<52} {'MB':>7} {'ppl':>8} {'vs first':>9}")
    for build, kind, size, ppl, _ in rows:
        print(f"{build:<28} {kind:<52} {size / 1e6:>7.1f} {ppl:>8.3f} {ppl / base:>8.3f}x")


if __name__ == "__main__":
    main()
