"""vLLM's per-request histograms, iteration tokens, cached prompt tokens and cache_config_info on a live server's
/metrics: counts equal the finished requests, sums equal the token counts the responses report, and the phases of
each request add up (queue + prefill = TTFT, prefill + decode = inference, queue + inference = e2e)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pllm.runtime.server.request_metrics import build_1_2_5_buckets

MAX_MODEL_LEN = 256
PROMPT = "The quick brown fox jumps over the lazy dog, again and again, until the dog wakes up and barks. " * 2
HISTOGRAMS = (
    "request_prompt_tokens", "request_generation_tokens", "request_max_num_generation_tokens",
    "request_prefill_kv_computed_tokens", "request_params_n", "request_params_max_tokens",
    "request_queue_time_seconds", "request_inference_time_seconds", "request_prefill_time_seconds",
    "request_decode_time_seconds", "request_time_per_output_token_seconds", "time_to_first_token_seconds",
    "e2e_request_latency_seconds", "iteration_tokens_total",
)  # fmt: skip


@pytest.fixture(scope="module")
def metered(launch):
    # two sequence slots: an n=2 request fills the batch, so concurrent requests queue behind one another
    return launch("--served-model-name", "m", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "2",
                  "--kv-cache-memory", "1536K")  # fmt: skip


def scrape(server) -> dict[str, float]:
    """Every pllm: sample by name (histogram buckets as NAME_bucket:LE), the model_name label dropped."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("pllm:") and s.labels.get("model_name") == "m":
                key = f"{s.name}:{s.labels['le']}" if "le" in s.labels else s.name
                samples[key] = s.value
    return samples


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def complete(server, prompt: str, max_tokens: int, n: int = 1) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "n": n, "ignore_eos": True,
            "temperature": 1.0 if n > 1 else 0.0}  # fmt: skip
    r = httpx.post(f"{server.api}/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def settled(server, before: dict[str, float], num_requests: int) -> dict[str, float]:
    """The change since `before` once num_requests more requests have finished (counted on the engine thread)."""
    deadline = time.monotonic() + 10
    while True:
        d = delta(before, scrape(server))
        if d.get('pllm:request_success_total', 0) >= num_requests or time.monotonic() > deadline:
            return d
        time.sleep(0.02)


def test_per_request_histograms_add_up_over_concurrent_requests(metered):
    asks = [(PROMPT, 6, 1), (PROMPT + " Then", 6, 1), ("Hello there", 6, 2), ("One token only", 1, 1)]
    before = scrape(metered)
    start = threading.Barrier(len(asks))

    def run(ask):
        start.wait()
        return complete(metered, *ask)

    with ThreadPoolExecutor(len(asks)) as pool:
        bodies = list(pool.map(run, asks))
    d = settled(metered, before, len(asks))
    count = len(asks)
    for name in HISTOGRAMS[:-1]:
        assert d[f"pllm:{name}_count"] == count, name
    prompt = sum(b["usage"]["prompt_tokens"] for b in bodies)
    generated = sum(b["usage"]["completion_tokens"] for b in bodies)
    assert generated == 6 + 6 + 12 + 1
    assert d["pllm:request_prompt_tokens_sum"] == prompt == d["pllm:prompt_tokens_total"]
    assert d["pllm:request_generation_tokens_sum"] == generated == d["pllm:generation_tokens_total"]
    assert d["pllm:request_max_num_generation_tokens_sum"] == 6 + 6 + 6 + 1
    assert d["pllm:request_params_n_sum"] == 5 and d["pllm:request_params_n_bucket:1.0"] == 3
    assert d["pllm:request_params_max_tokens_sum"] == 19 and d["pllm:request_params_max_tokens_bucket:1.0"] == 1
    assert d["pllm:request_prefill_kv_computed_tokens_sum"] == prompt - d["pllm:prompt_tokens_cached_total"]

    s = {name: d[f"pllm:{name}_seconds_sum"] for name in (
        "request_queue_time", "request_inference_time", "request_prefill_time", "request_decode_time",
        "request_time_per_output_token", "time_to_first_token", "e2e_request_latency")}  # fmt: skip
    assert all(v >= 0 for v in s.values()), s
    assert s["request_queue_time"] > 0  # two slots, five sequences asked for at once: someone waited
    # the same timestamps: exact up to float rounding
    assert s["request_queue_time"] + s["request_prefill_time"] == pytest.approx(s["time_to_first_token"], abs=1e-6)
    assert s["request_prefill_time"] + s["request_decode_time"] == pytest.approx(s["request_inference_time"],
                                                                                   abs=1e-6)
    # e2e is read on the engine thread just after the step that finished each request
    assert 0 <= s["e2e_request_latency"] - (s["request_queue_time"] + s["request_inference_time"]) < 0.05 * count
    # vLLM's mean per request: decode / (tokens - 1); the one-token request decodes for 0 s and counts 0
    assert s["request_time_per_output_token"] == pytest.approx(s["request_decode_time"] / 5, rel=1e-6)


def test_iteration_tokens_and_cached_prompt_tokens_follow_the_steps(metered):
    before = scrape(metered)
    for _ in range(2):  # the second finds the first's prompt blocks in the prefix cache
        complete(metered, PROMPT + " Once more", 4)
    d = settled(metered, before, 2)
    cached = d["pllm:prompt_tokens_cached_total"]
    assert cached > 0 and cached == d["pllm:prefix_cache_hits_total"]
    computed = d["pllm:request_prefill_kv_computed_tokens_sum"]
    assert computed == d["pllm:request_prompt_tokens_sum"] - cached
    # one at a time, each prompt in one step: one prefill step (its first token) and three decode steps a request
    assert d["pllm:iteration_tokens_total_count"] == 2 * 4
    assert d["pllm:iteration_tokens_total_sum"] == computed + 2 * 4


def test_cache_config_info_and_the_token_buckets_follow_the_engine(metered):
    text = httpx.get(f"{metered.url}/metrics", timeout=10).text
    (info,) = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "pllm:cache_config_info"]  # fmt: skip
    assert info.value == 1 and info.labels["model_name"] == "m" and info.labels["enable_prefix_caching"] == "True"
    assert int(info.labels["block_size"]) > 0 and int(info.labels["num_gpu_blocks"]) > 0
    edges = [float(e) for e in build_1_2_5_buckets(MAX_MODEL_LEN)] + [float("inf")]
    assert edges[-2] == 200 and all(f'pllm:request_prompt_tokens_bucket{{le="{e}",model_name="m"}}' in text
                                    for e in ("1.0", "200.0", "+Inf"))  # fmt: skip
    assert len([1 for line in text.splitlines() if line.startswith("pllm:request_prompt_tokens_bucket")]) == len(edges)
