"""Multi-LoRA throughput: a batch mixing 4 adapters against the base model alone, same build, same run.

    python tools/bench_lora.py build/ [--rank 16] [--num-requests 32] [--backend auto]

Writes 4 random PEFT LoRA adapters (rank --rank, every q/k/v/o and MLP projection: the heaviest case) for the build's
model, loads them with the engine, then generates the same requests twice, timed alternately: all on the base model,
and spread round-robin over the 4 adapters (so every batch mixes all four). Prints output tokens/s of each and the
ratio mixed / base. A benchmark, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pllm.compiler.manifest import open_build
from pllm.models.lora import TARGET_MODULES, module_shapes

NUM_ADAPTERS = 4


def write_adapter(folder: Path, spec, rank: int, seed: int) -> Path:
    """A PEFT-format adapter with random A and B on every supported module of every layer."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    tensors = {}
    for layer in range(spec.num_hidden_layers):
        for module, (in_f, out_f) in module_shapes(spec).items():
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn((rank, in_f), generator=gen) * in_f**-0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn((out_f, rank), generator=gen) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(TARGET_MODULES),
              "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("build_dir")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed rounds of each, alternating; the best is kept")
    p.add_argument("--backend", default="auto")
    args = p.parse_args()

    from pllm import LLM, LoRARequest, SamplingParams

    spec = open_build(args.build_dir, verify=False).spec
    with tempfile.TemporaryDirectory() as tmp:
        folders = [write_adapter(Path(tmp) / f"lora{i}", spec, args.rank, i) for i in range(NUM_ADAPTERS)]
        modules = tuple((f"lora{i}", str(f)) for i, f in enumerate(folders))
        llm = LLM(args.build_dir, backend=args.backend, lora_modules=modules, enable_prefix_caching=False)
        rng = random.Random(0)
        vocab = spec.vocab_size
        prompts = [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(args.prompt_len)]}
                   for _ in range(args.num_requests)]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        loras = [LoRARequest(name, i + 1) for i, (name, _) in enumerate(modules)]
        mixed = [loras[i % NUM_ADAPTERS] for i in range(args.num_requests)]

        def run(lora_request) -> float:
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)
            elapsed = time.perf_counter() - start
            assert sum(len(o.outputs[0].token_ids) for o in outs) == args.num_requests * args.max_tokens
            return args.num_requests * args.max_tokens / elapsed

        run(None), run(mixed)  # warm-up (and the first launches' compiles on cuda)
        base_rates, mixed_rates = [], []
        for _ in range(args.repeats):
            base_rates.append(run(None))
            mixed_rates.append(run(mixed))
    base, mix = max(base_rates), max(mixed_rates)
    print(json.dumps({"backend": llm.engine.runner.backend, "model": spec.model_type, "rank": args.rank,
                      "adapters": NUM_ADAPTERS, "requests": args.num_requests, "prompt_len": args.prompt_len,
                      "max_tokens": args.max_tokens, "base_tok_s": round(base, 1), "mixed_tok_s": round(mix, 1)}))
    print(f"mixed {NUM_ADAPTERS} adapters / base alone: {mix / base:.2f}x output tokens/s")


if __name__ == "__main__":
    main()
