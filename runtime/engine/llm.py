"""LLM: the offline Python API over the engine: generate, chat, embed."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

from pllm.runtime.engine.config import EngineConfig
from pllm.runtime.engine.content_parts import flatten_content
from pllm.runtime.engine.engine import LLMEngine
from pllm.runtime.engine.lora import LoRARequest
from pllm.runtime.engine.outputs import EmbeddingRequestOutput, RequestOutput
from pllm.runtime.engine.param_checks import clip_repr
from pllm.runtime.engine.sampling_params import SamplingParams
from pllm.runtime.engine.vllm_args import check_dtype, check_prompt_keys, vllm_settings

Prompt = str | list[int] | dict
Message = dict  # {"role", "content"}, and "tool_calls" / "tool_call_id" in tool-calling turns


class LLM:
    """`LLM(model, **engine_settings)`: model is a pllm build folder (pllm-compile's output), engine settings are
    EngineConfig's fields, validated at once. vLLM's keyword arguments are taken where they have a meaning here:

    - gpu_memory_utilization: kv_cache_fraction (as pllm-serve's --gpu-memory-utilization); kv_cache_memory_bytes:
      kv_cache_memory.
    - dtype: "auto" (or None) runs the build's dtype; any other must be the build's, which is fixed when it is
      compiled (pllm-compile --dtype): a different one is refused, not converted.
    - tokenizer: None or the model folder itself; the build's own tokenizer is the one served.
    - trust_remote_code: accepted either way; a build holds no model code, so none is ever run.
    - seed=None: the default seed (0), as vLLM's V1 engine defaults it.
    - runner: "auto" / "generate" / "pooling"; "pooling" refuses generate() and chat() as vLLM's pooling runner
      does, "generate" refuses an encoder build at once.
    - enable_lora: adapters are always available; enable_lora=False refuses lora_request as vLLM does.
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: object = "auto",
                 trust_remote_code: bool = False, runner: str = "auto", enable_lora: bool = True,
                 **engine_settings):
        if model is None:  # (a default only so that the old keyword gets its own message)
            renamed = " (the argument once named build_dir, named model as in vLLM)" * ("build_dir" in engine_settings)
            raise TypeError(f"LLM() needs model, the path of a pllm build folder{renamed}")
        engine_settings = vllm_settings(model, tokenizer, trust_remote_code, runner, enable_lora, engine_settings)
        config = EngineConfig(**engine_settings)
        if dtype not in ("auto", None):
            check_dtype(str(model), dtype)
        self.engine = LLMEngine(str(model), config)
        self.runner = runner
        self.enable_lora = enable_lora
        if runner == "generate":
            try:
                self.engine.check_generates()
            except ValueError:
                self.engine.close()
                raise

    @property
    def llm_engine(self) -> LLMEngine:
        """The engine under this LLM (vLLM's name for it): add_request, step, has_unfinished_requests, abort_request;
        below LLM's own checks (runner, enable_lora), as vLLM's engine is below its LLM."""
        return self.engine

    def close(self) -> None:
        """Stop the engine's worker processes (tensor_parallel_size > 1; at exit otherwise). Idempotent."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in input order. A prompt is a text, a list of token ids, or {"prompt_token_ids": [...]}.
        lora_request: one adapter for every prompt, or one (or None: the base model) per prompt; they share
        batches. Each output's lora_request is the adapter its prompt ran under."""
        self._check_generates()
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a prompt or a list of prompts ({_PROMPT_KINDS}); "
                            f"got {type(prompts).__name__}")
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            _check_prompt(prompt, f"prompts[{i}]")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            if not isinstance(sampling_params, (list, tuple)):
                raise TypeError(f"sampling_params must be a SamplingParams, None, or a list of them (one per "
                                f"prompt); got {type(sampling_params).__name__}")
            params_list = list(sampling_params)
            for i, params in enumerate(params_list):
                if not isinstance(params, SamplingParams):
                    raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(params).__name__}")
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts; pass one or one per prompt"
                )
        # Fields set after construction (params.stop = [...]) are normalised and checked now, before anything runs.
        for params in {id(p): p for p in params_list}.values():
            params.normalize_and_validate()
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            if not isinstance(lora_request, (list, tuple)):
                raise ValueError(f"lora_request must be a LoRARequest, None, or a list of them (one per prompt); "
                                 f"got {type(lora_request).__name__}")
            loras = list(lora_request)
            for i, lora in enumerate(loras):
                if lora is not None and not isinstance(lora, LoRARequest):
                    raise ValueError(f"lora_request[{i}] must be a LoRARequest or None, got {type(lora).__name__}")
            if len(loras) != len(prompts):
                raise ValueError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts; pass one or one per "
                                 "prompt")
        if not self.enable_lora and any(lora is not None for lora in loras):
            raise ValueError("lora_request given, but this LLM was made with enable_lora=False")
        for lora in {lora for lora in loras if lora is not None}:  # loaded (and checked) before anything is queued
            self.engine.add_lora(lora)
        return self._run(prompts, params_list, use_tqdm, loras)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        chat_template: str | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """One conversation or a list of them, rendered with the model's chat template (or `chat_template`, a Jinja
        template given here) and `tools`, OpenAI's tool objects, passed to it as transformers does; the output is not
        parsed for calls here. continue_final_message: the last (assistant) message is continued, not closed (with
        add_generation_prompt=False), as in vLLM. lora_request: as for generate(), one adapter for every
        conversation or one (or None) per conversation, as the server's chat endpoint takes an adapter by model
        name. The positional order is vLLM's (messages, sampling_params, use_tqdm, lora_request, chat_template); as
        in vLLM, each output's prompt is None (the prompt goes in as token ids), its prompt_token_ids the rendered
        conversation's."""
        self._check_generates()
        if not isinstance(messages, (list, tuple)) or any(not isinstance(m, (dict, list, tuple)) for m in messages):
            raise TypeError("messages must be a conversation (a list of message dicts such as "
                            "{'role': 'user', 'content': '...'}) or a list of conversations; "
                            f"got {clip_repr(messages)}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        texts = [self._render_chat(c, add_generation_prompt, chat_template_kwargs, tools, continue_final_message,
                                   chat_template) for c in conversations]
        prompts = [{"prompt_token_ids": self.engine.encode(t, "chat messages", add_special_tokens=False)}
                   for t in texts]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _check_generates(self) -> None:
        if self.runner == "pooling":
            raise ValueError("this LLM was made with runner='pooling': it embeds (LLM.embed), it does not generate")
        self.engine.check_generates()

    def apply_chat_template(
        self,
        conversation: list[Message],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
    ) -> list[int]:
        text = self._render_chat(conversation, add_generation_prompt, chat_template_kwargs, tools,
                                 continue_final_message, chat_template)
        return self.engine.encode(text, "chat messages", add_special_tokens=False)

    @functools.cached_property
    def _max_prompt_chars(self) -> int:
        """A chat render's budget: what max_model_len tokens can hold (once: it reads the whole vocabulary)."""
        from pllm.models.chat_template import max_prompt_chars

        return max_prompt_chars(self.engine.tokenizer, self.engine.max_model_len)

    def _render_chat(self, conversation: list[Message], add_generation_prompt: bool, chat_template_kwargs: dict | None,
                     tools: list[dict] | None, continue_final_message: bool, chat_template: str | None) -> str:
        if not isinstance(conversation, (list, tuple)) or any(not isinstance(m, dict) for m in conversation):
            raise TypeError(f"a conversation must be a list of message dicts; got {clip_repr(conversation)}")
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true: continuing the "
                             "final message needs add_generation_prompt=False")
        if chat_template_kwargs and "max_chars" in chat_template_kwargs:
            raise ValueError("chat_template_kwargs: 'max_chars' is reserved (the render's character budget)")
        conversation = [flatten_content(m, i) for i, m in enumerate(conversation)]
        tok = self.engine.tokenizer
        options = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                       tools=tools, **(chat_template_kwargs or {}), max_chars=self._max_prompt_chars)
        if chat_template is not None:
            from pllm.models.chat_template import render_chat

            if not isinstance(chat_template, str) or not chat_template:
                raise ValueError(f"chat_template must be a non-empty Jinja template string; got "
                                 f"{clip_repr(chat_template)}")
            return render_chat(chat_template, list(conversation), dict(tok.special_tokens_map), **options)
        if not tok.chat_template:
            raise ValueError("this model has no chat template; pass chat_template=..., or use generate() with a "
                             "plain prompt")
        return tok.apply_chat_template(list(conversation), tokenize=False, **options)

    def embed(
        self, texts: str | Sequence[str | list[int]], pooling: str | None = None
    ) -> list[EmbeddingRequestOutput]:
        """One EmbeddingRequestOutput per text, in order, as vLLM's: .outputs.embedding (the vector),
        .prompt_token_ids, .request_id. pooling "last", "mean" or "cls"; None: the build's own. A decoder build
        pools the last token and L2-normalises; an encoder build embeds as its sentence-transformers files say
        (pooling, normalisation, truncation), recorded in its manifest."""
        if isinstance(texts, (str, dict)) or (isinstance(texts, list) and texts and isinstance(texts[0], int)):
            texts = [texts]  # one prompt, as generate() takes it: a text or one list of token ids
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a prompt or a list of prompts ({_PROMPT_KINDS}); "
                            f"got {type(texts).__name__}")
        texts = list(texts)
        for i, text in enumerate(texts):
            _check_prompt(text, f"texts[{i}]")
        ids = self._add(lambda rid, i: self.engine.add_embedding_request(rid, texts[i], pooling), len(texts))
        return self._collect(ids, None)

    def _run(self, prompts: list[Prompt], params_list: list[SamplingParams], use_tqdm: bool,
             loras: list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        # Structured output: compile every distinct grammar first (in parallel with each other, once each), so a
        # bad schema raises here, naming the field, before anything is queued.
        grammars = [self.engine.grammars.compile(p.structured_outputs) for p in params_list if p.structured_outputs]
        for future in grammars:
            future.result()
        loras = loras or [None] * len(prompts)
        ids = self._add(lambda rid, i: self.engine.add_request(rid, prompts[i], params_list[i], None, loras[i]),
                        len(prompts))
        outputs = self._collect(ids, _progress(len(ids)) if use_tqdm else None)
        for out, lora in zip(outputs, loras, strict=True):
            out.lora_request = lora
            for completion in out.outputs:
                completion.lora_request = lora
        return outputs

    def _add(self, add: Callable[[str, int], None], num_requests: int) -> list[str]:
        """add(request_id, index) for each request, all or none: the first error aborts those added before."""
        ids = []
        try:
            for i in range(num_requests):
                rid = self.engine.new_request_id()
                add(rid, i)
                ids.append(rid)
        except BaseException:  # KeyboardInterrupt too: nothing queued may outlive the call
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def _collect(self, ids: list[str], bar) -> list:
        """Step the engine until every request of ids finished; their final outputs in the order of ids."""
        engine = self.engine
        order = {rid: i for i, rid in enumerate(ids)}
        results: list = [None] * len(ids)
        start = time.perf_counter()
        num_in = num_out = 0
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            num_in += len(out.prompt_token_ids)
                            num_out += sum(len(o.token_ids) for o in out.outputs)
                            elapsed = time.perf_counter() - start
                            speed = f"input: {num_in / elapsed:.1f} toks/s, output: {num_out / elapsed:.1f} toks/s"
                            bar.set_postfix_str(f"est. speed {speed}")
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for rid in ids:  # an interrupted run (KeyboardInterrupt) leaves nothing behind in the engine
                engine.abort_request(rid)
        assert all(r is not None for r in results)
        return results


_PROMPT_KINDS = 'a str, a list of token ids, {"prompt": str} or {"prompt_token_ids": [...]}'


def _check_prompt(prompt: object, where: str) -> None:
    """TypeError naming the prompt for anything that is not a prompt at all (values are checked when queued)."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, dict):
        check_prompt_keys(prompt, where)  # multi_modal_data, cache_salt, ...: before anything is queued
        if "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
        elif isinstance(prompt.get("prompt"), str):
            return
        elif "prompt" in prompt:
            raise TypeError(f"{where}['prompt'] must be a str, got {type(prompt['prompt']).__name__}")
        else:
            raise ValueError(f"{where}: a prompt dict needs 'prompt' or 'prompt_token_ids'; got keys "
                             f"{sorted(map(str, prompt))}")
        where = f"{where}['prompt_token_ids']"
    if isinstance(prompt, (list, tuple)):
        for t in prompt:
            if not isinstance(t, int) or isinstance(t, bool):
                raise TypeError(f"{where} must be a list of int token ids; it holds {t!r}")
        return
    raise TypeError(f"{where} must be {_PROMPT_KINDS}; got {clip_repr(prompt)}")


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
