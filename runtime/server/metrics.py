"""Prometheus metrics with vLLM's names under a `pllm:` prefix, the inference gateway's load gauges under the names
its model-server protocol lists, and the periodic one-line stats log."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge

from pllm.runtime.engine.kv_cache import PrefixCacheStats
from pllm.runtime.engine.outputs import EmbeddingRequestOutput, EngineSnapshot, LoraSnapshot, RequestOutput
from pllm.runtime.server.request_metrics import EngineInfo, FinishedRequest, RequestHistograms, Series
from pllm.runtime.server.request_stream import EngineRequest

logger = logging.getLogger("pllm.server")

# vLLM's bucket edges (vllm/v1/metrics/loggers.py), trimmed at the long end.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
# The Kubernetes Gateway API Inference Extension's endpoint picker balances model-server pods on three gauges; its
# model-server protocol (docs/proposals/003-model-server-protocol) names them TotalQueuedRequests,
# TotalRunningRequests and KVCacheUtilization (a 0..1 fraction) and lists vLLM's names for them, which are also the
# picker's defaults (--total-queued-requests-metric, --total-running-requests-metric,
# --kv-cache-usage-percentage-metric). pllm exports the same three values under those names too, so a picker with
# its default configuration balances pllm pods as it does vLLM ones; the `pllm:` series stay for dashboards.
GATEWAY_METRIC_PREFIX = "vllm"
# The same protocol's LoRA affinity reads one more series, vLLM's lora_requests_info: a gauge whose labels carry the
# adapter slots (max_lora) and the adapters of running and of waiting requests (comma-separated), and whose value
# is the time it was set, so the picker reads the newest. vLLM leaves a series behind for every label set it ever
# showed; here the previous one is removed when the labels change, so one series stands, and it is the newest.
LORA_INFO_LABELS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters")
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
# A new engine's counters, before its first step: the first snapshot's counts are all deltas from here.
START = EngineSnapshot(num_running=0, num_waiting=0, num_running_seqs=0, max_num_seqs=0, kv_cache_usage=0.0,
                       num_generation_tokens=0, num_preemptions=0, prefix_cache=PrefixCacheStats())


class ServerMetrics:
    """All metrics of one server in its own registry (so tests can build several apps in one process)."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry
        self._series = Series(r, labels)
        gauge, counter, histogram = self._series.gauge, self._series.counter, self._series.histogram

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV-cache usage: 1 means all blocks in use.")
        gateway = GATEWAY_METRIC_PREFIX
        self.gateway_requests_running = gauge("num_requests_running", "Gateway protocol: running requests.", gateway)
        self.gateway_requests_waiting = gauge("num_requests_waiting", "Gateway protocol: queued requests.", gateway)
        self.gateway_kv_cache_usage = gauge("kv_cache_usage_perc", "Gateway protocol: KV-cache usage (0..1).", gateway)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.num_preemptions = counter("num_preemptions", "Preemptions (recompute) of running sequences.")
        # vLLM's: first admissions only; a request readmitted after preemption re-finding its own blocks is not a hit
        self.prefix_cache_queries = counter("prefix_cache_queries",
                                            "Tokens of newly admitted requests looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits",
                                         "Tokens of newly admitted requests served from the prefix cache.")
        self.spec_decode_num_drafts = counter("spec_decode_num_drafts", "Speculative verify steps of a sequence.")
        self.spec_decode_num_draft_tokens = counter("spec_decode_num_draft_tokens", "Speculative tokens guessed.")
        self.spec_decode_num_accepted_tokens = counter("spec_decode_num_accepted_tokens",
                                                       "Speculative tokens the model accepted.")
        self._success = Counter(
            "pllm:request_success", "Finished requests by finish reason.", [*labels, "finished_reason"], registry=r
        )
        self._rejections = Counter(
            "pllm:admission_rejections", "Requests refused with 503 by reason.", [*labels, "reason"], registry=r
        )
        self._labels = labels
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between outputs.", ITL_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)
        self._requests: RequestHistograms | None = None  # built with the engine (engine_started)
        self.lora_info = {prefix: Gauge(f"{prefix}:lora_requests_info", "LoRA adapters: slots, and those of running "
                                        "and waiting requests; the value is when it was set.", LORA_INFO_LABELS,
                                        registry=r) for prefix in ("pllm", GATEWAY_METRIC_PREFIX)}
        self._lora_labels: tuple[str, str, str] | None = None  # the label values shown now
        self._last = START  # the snapshot the counters stand at: the first step's counts are counted too
        self._num_prompt_tokens = 0  # cumulative, for the stats log
        self._log_time = time.monotonic()
        self._log_prompt_tokens = 0
        self._log_generation_tokens = 0
        self._log_spec = (0, 0, 0)  # drafts, draft tokens, accepted tokens at the last stats line
        self._logged_idle = True  # idle since start: nothing to say until the first request

    # -- updates (engine thread) -----------------------------------------------------------------
    def engine_started(self, engine: EngineInfo) -> None:
        """Build the series that depend on the engine (vLLM's log_engine_initialized), before its first request."""
        self._requests = RequestHistograms(self._series, engine)

    @property
    def requests(self) -> RequestHistograms:
        assert self._requests is not None, "engine_started comes before the first request"
        return self._requests

    def update(self, snap: EngineSnapshot) -> None:
        """Set the gauges and advance the counters by what changed since the previous snapshot."""
        self.num_requests_running.set(snap.num_running)
        self.num_requests_waiting.set(snap.num_waiting)
        self.kv_cache_usage_perc.set(snap.kv_cache_usage)
        self.gateway_requests_running.set(snap.num_running)
        self.gateway_requests_waiting.set(snap.num_waiting)
        self.gateway_kv_cache_usage.set(snap.kv_cache_usage)
        last = self._last
        self.generation_tokens.inc(max(0, snap.num_generation_tokens - last.num_generation_tokens))
        self.num_preemptions.inc(max(0, snap.num_preemptions - last.num_preemptions))
        self.prefix_cache_queries.inc(max(0, snap.prefix_cache.queries - last.prefix_cache.queries))
        self.prefix_cache_hits.inc(max(0, snap.prefix_cache.hits - last.prefix_cache.hits))
        self.spec_decode_num_drafts.inc(max(0, snap.spec_decode_num_drafts - last.spec_decode_num_drafts))
        self.spec_decode_num_draft_tokens.inc(
            max(0, snap.spec_decode_num_draft_tokens - last.spec_decode_num_draft_tokens))
        self.spec_decode_num_accepted_tokens.inc(
            max(0, snap.spec_decode_num_accepted_tokens - last.spec_decode_num_accepted_tokens))
        self._last = snap
        self._set_lora_info(snap.lora)

    def _set_lora_info(self, lora: LoraSnapshot | None) -> None:
        """The one lora_requests_info series (none while the engine serves no adapter)."""
        labels = None if lora is None else (str(lora.max_loras), ",".join(lora.running), ",".join(lora.waiting))
        for gauge in self.lora_info.values():
            if self._lora_labels is not None and self._lora_labels != labels:
                gauge.remove(*self._lora_labels)
            if labels is not None:
                gauge.labels(*labels).set_to_current_time()
        self._lora_labels = labels

    def observe_first_token(self, num_prompt_tokens: int, num_cached_tokens: int, ttft_s: float) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)
        self.requests.prompt_tokens_cached.inc(num_cached_tokens)
        self._num_prompt_tokens += num_prompt_tokens
        self.time_to_first_token.observe(max(0.0, ttft_s))

    def observe_finished(self, finished_reason: str, e2e_s: float) -> None:
        self._success.labels(**self._labels, finished_reason=finished_reason).inc()
        self.e2e_request_latency.observe(max(0.0, e2e_s))

    def observe_output(self, out: RequestOutput | EmbeddingRequestOutput, request: EngineRequest,
                       last_time: float | None, now: float) -> None:
        """One output the engine thread routes at `now`; last_time: when the request's previous one was (None: this
        is its first). A generation's first output counts its prompt and TTFT, a later one the inter-token latency;
        its last, vLLM's per-request histograms. An embedding counts only as finished."""
        pooled = isinstance(out, EmbeddingRequestOutput)
        if not pooled:  # token latencies are a generation's only
            if last_time is None:
                first = out.metrics.get("first_token_time", now)
                self.observe_first_token(len(out.prompt_token_ids), out.num_cached_tokens,
                                         first - request.arrival_time)
            else:
                self.inter_token_latency.observe(now - last_time)
        if out.finished:
            reason = "stop" if pooled else out.outputs[0].finish_reason or "stop"
            self.observe_finished(reason, now - request.arrival_time)
            finished = None if pooled else FinishedRequest.of(out, request.params, request.arrival_time)
            if finished is not None:
                self.observe_request(finished)

    def observe_request(self, finished: FinishedRequest) -> None:
        """A generation request that ran, finished: vLLM's per-request histograms."""
        self.requests.observe(finished)

    def observe_iteration(self, num_tokens: int) -> None:
        self.requests.iteration_tokens.observe(num_tokens)

    def observe_rejection(self, reason: str) -> None:
        self._rejections.labels(**self._labels, reason=reason).inc()

    # -- the stats log ---------------------------------------------------------------------------
    def log_stats(self, now: float | None = None) -> None:
        """vLLM's periodic line; an idle server logs once and then stays quiet."""
        now = time.monotonic() if now is None else now
        snap = self._last
        elapsed = max(now - self._log_time, 1e-9)
        prompt = self._num_prompt_tokens - self._log_prompt_tokens
        generation = snap.num_generation_tokens - self._log_generation_tokens
        self._log_time, self._log_prompt_tokens = now, self._num_prompt_tokens
        self._log_generation_tokens = snap.num_generation_tokens
        idle = prompt == 0 and generation == 0 and snap.num_running == 0 and snap.num_waiting == 0
        if idle and self._logged_idle:
            return
        self._logged_idle = idle
        prefix = snap.prefix_cache
        hit_rate = prefix.hits / prefix.queries if prefix.queries else 0.0
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
            "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            prompt / elapsed,
            generation / elapsed,
            snap.num_running,
            snap.num_waiting,
            100.0 * snap.kv_cache_usage,
            100.0 * hit_rate,
        )
        spec = (snap.spec_decode_num_drafts, snap.spec_decode_num_draft_tokens, snap.spec_decode_num_accepted_tokens)
        drafts, drafted, accepted = (now_ - then for now_, then in zip(spec, self._log_spec, strict=True))
        self._log_spec = spec
        if drafts:  # vLLM's second line, for the interval: how many guesses the model took
            logger.info(
                "SpecDecoding metrics: Draft acceptance rate: %.1f%%, Mean acceptance length: %.2f, "
                "Accepted: %d tokens, Drafted: %d tokens",
                100.0 * accepted / drafted, 1.0 + accepted / drafts, accepted, drafted,
            )
