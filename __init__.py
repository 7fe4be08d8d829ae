"""pllm: a compiler-style LLM inference engine."""

__version__ = "0.1.0"
__all__ = [
    "LLM", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "LoRARequest", "Logprob", "RequestOutput",
    "CompletionOutput", "EmbeddingRequestOutput", "TextPrompt", "TokensPrompt", "__version__",
]


def __getattr__(name: str):
    # Imported lazily so `pllm-compile` and `import pllm.compiler` stay light.
    if name == "LLM":
        from pllm.runtime.engine.llm import LLM

        return LLM
    if name in ("TextPrompt", "TokensPrompt"):
        from pllm.runtime.engine import vllm_args

        return getattr(vllm_args, name)
    if name == "SamplingParams":
        from pllm.runtime.engine.sampling_params import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from pllm.runtime.engine.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams
    if name == "EngineConfig":
        from pllm.runtime.engine.config import EngineConfig

        return EngineConfig
    if name == "LoRARequest":
        from pllm.runtime.engine.lora import LoRARequest

        return LoRARequest
    if name in ("Logprob", "RequestOutput", "CompletionOutput", "EmbeddingRequestOutput"):
        from pllm.runtime.engine import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'pllm' has no attribute {name!r}")
