"""pllm: a compiler-style LLM inference engine."""
