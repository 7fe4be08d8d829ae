"""Generate from a build directory: the README's main job (python tools/demo.py build/)."""

import sys
import time

from pllm import LLM, SamplingParams


def main() -> None:
    build_dir = sys.argv[1] if len(sys.argv) > 1 else "build"
    start = time.perf_counter()
    llm = LLM(build_dir)
    print(f"loaded {build_dir} in {time.perf_counter() - start:.1f}s")
    params = SamplingParams(temperature=0.0, max_tokens=48)
    prompts = ["The three primary colors are", "def fibonacci(n):"]
    for out in llm.generate(prompts, params, use_tqdm=False):
        print(f"--- {out.prompt!r}\n{out.outputs[0].text}")
    chat = llm.chat([{"role": "user", "content": "Write a haiku about compilers."}], params, use_tqdm=False)
    print(f"--- chat\n{chat[0].outputs[0].text}")


if __name__ == "__main__":
    main()
