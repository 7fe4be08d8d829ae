"""vLLM's per-request and per-step histograms (vllm/v1/metrics/loggers.py, PrometheusStatLogger) under `pllm:`, and
its cache_config_info gauge: what a finished request's last output carries (token counts, its parameters, the
timestamps of its life) turned into the series vLLM's dashboards read."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pllm.runtime.engine.outputs import RequestOutput
from pllm.runtime.engine.sampling_params import SamplingParams

# vLLM's bucket edges, as its PrometheusStatLogger has them.
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)


@dataclass(frozen=True)
class Series:
    """Makes one server's series in its registry, each under the `pllm:` prefix (or another) with its label values
    bound."""

    registry: CollectorRegistry
    labels: dict[str, str]

    def gauge(self, name: str, doc: str, prefix: str = "pllm") -> Gauge:
        return Gauge(f"{prefix}:{name}", doc, list(self.labels), registry=self.registry).labels(**self.labels)

    def counter(self, name: str, doc: str) -> Counter:
        return Counter(f"pllm:{name}", doc, list(self.labels), registry=self.registry).labels(**self.labels)

    def histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"pllm:{name}", doc, list(self.labels), buckets=buckets,
                         registry=self.registry).labels(**self.labels)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's token-count edges: 1, 2, 5, 10, 20, 50, ... up to max_value (build_1_2_5_buckets(100) ends at 100)."""
    edges: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(edges)
            edges.append(mantissa * scale)
        scale *= 10


@dataclass(frozen=True)
class EngineInfo:
    """What the metrics need of the engine once it is built: the token-count buckets end at max_model_len, and the
    KV cache's shape is cache_config_info's labels."""

    max_model_len: int
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool


@dataclass(frozen=True)
class FinishedRequest:
    """One finished generation request as vLLM's FinishedRequestStats sees it. Times are time.monotonic(); n > 1
    is one request (as pllm:request_success counts it): its sequences' tokens summed, its longest sequence read for
    max_num_generation_tokens and the time per output token."""

    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache at first admission
    num_generation_tokens: tuple[int, ...]  # per sequence
    n: int
    max_tokens: int | None  # the max_tokens parameter as asked (None: not set)
    arrival_time: float
    first_scheduled_time: float  # first admitted to the running batch
    first_token_time: float
    finished_time: float  # its last token

    @classmethod
    def of(cls, out: RequestOutput, params: SamplingParams, arrival_time: float) -> FinishedRequest | None:
        """From a request's final output; None for one that never ran (refused while it waited)."""
        times = out.metrics
        if "first_scheduled_time" not in times:
            return None
        return cls(
            num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens,
            num_generation_tokens=tuple(len(o.token_ids) for o in out.outputs),
            n=params.n,
            max_tokens=params.max_tokens,
            arrival_time=arrival_time,
            first_scheduled_time=times["first_scheduled_time"],
            first_token_time=times["first_token_time"],
            finished_time=times["finished_time"],
        )

    # vLLM's intervals (IterationStats.update_from_finished_request); a preemption falls inside whichever it hit
    @property
    def queued_time(self) -> float:
        return self.first_scheduled_time - self.arrival_time

    @property
    def prefill_time(self) -> float:
        return self.first_token_time - self.first_scheduled_time

    @property
    def decode_time(self) -> float:
        return self.finished_time - self.first_token_time

    @property
    def inference_time(self) -> float:
        return self.finished_time - self.first_scheduled_time

    @property
    def max_num_generation_tokens(self) -> int:
        return max(self.num_generation_tokens)

    @property
    def mean_time_per_output_token(self) -> float:
        """The decode time over the tokens after the first (the prefill's); 0 for a single token, as vLLM's."""
        later = self.max_num_generation_tokens - 1
        return self.decode_time / later if later > 0 else 0.0


class RequestHistograms:
    """The series built once the engine is: their token-count buckets end at its max_model_len."""

    def __init__(self, series: Series, engine: EngineInfo) -> None:
        histogram = series.histogram
        tokens = build_1_2_5_buckets(engine.max_model_len)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens of finished requests.", tokens)
        self.generation_tokens = histogram("request_generation_tokens",
                                           "Generated tokens of finished requests (n sequences summed).", tokens)
        self.max_num_generation_tokens = histogram("request_max_num_generation_tokens",
                                                   "Generated tokens of a finished request's longest sequence.", tokens)
        self.prefill_kv_computed = histogram("request_prefill_kv_computed_tokens",
                                             "Prompt tokens of finished requests not served by the prefix cache.",
                                             tokens)
        self.params_n = histogram("request_params_n", "The n request parameter.", PARAMS_N_BUCKETS)
        self.params_max_tokens = histogram("request_params_max_tokens", "The max_tokens request parameter.", tokens)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled (WAITING).",
                                    REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", "First scheduled to finish (RUNNING).",
                                        REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "First scheduled to first token (PREFILL).",
                                      REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "First token to finish (DECODE).",
                                     REQUEST_LATENCY_BUCKETS)
        self.time_per_output_token = histogram("request_time_per_output_token_seconds",
                                               "Decode time per output token after the first, per request.",
                                               TPOT_BUCKETS)
        self.iteration_tokens = histogram("iteration_tokens_total",
                                          "Tokens per engine step: prompt tokens computed plus tokens generated.",
                                          ITERATION_TOKENS_BUCKETS)
        info = {"block_size": str(engine.block_size), "num_gpu_blocks": str(engine.num_blocks),
                "enable_prefix_caching": str(engine.enable_prefix_caching)}
        # vLLM's info gauge, always 1; num_gpu_blocks is its label name for the KV blocks, on whatever device
        Gauge("pllm:cache_config_info", "The engine's KV-cache configuration.", [*series.labels, *info],
              registry=series.registry).labels(**series.labels, **info).set(1)
        self.prompt_tokens_cached = series.counter("prompt_tokens_cached",
                                                   "Prompt tokens served from the prefix cache (at first token).")

    def observe(self, r: FinishedRequest) -> None:
        self.prompt_tokens.observe(r.num_prompt_tokens)
        self.generation_tokens.observe(sum(r.num_generation_tokens))
        self.max_num_generation_tokens.observe(r.max_num_generation_tokens)
        self.prefill_kv_computed.observe(r.num_prompt_tokens - r.num_cached_tokens)
        self.params_n.observe(r.n)
        if r.max_tokens:  # vLLM observes it only when set
            self.params_max_tokens.observe(r.max_tokens)
        self.queue_time.observe(max(0.0, r.queued_time))
        self.inference_time.observe(max(0.0, r.inference_time))
        self.prefill_time.observe(max(0.0, r.prefill_time))
        self.decode_time.observe(max(0.0, r.decode_time))
        self.time_per_output_token.observe(max(0.0, r.mean_time_per_output_token))
