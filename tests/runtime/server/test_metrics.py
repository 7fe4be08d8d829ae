"""ServerMetrics over engine snapshots: every step counted, the first after start-up too; readmissions after
preemption kept out of the prefix-cache series (vLLM's PrefixCacheStats)."""

from __future__ import annotations

import dataclasses
import logging

from pllm.runtime.engine.kv_cache import PrefixCacheStats
from pllm.runtime.server.metrics import START, ServerMetrics


def value(metrics: ServerMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"pllm:{name}_total", {"model_name": "m"})


def test_the_first_step_after_start_up_is_counted() -> None:
    metrics = ServerMetrics("m")
    first = dataclasses.replace(
        START, num_running=1, max_num_seqs=8, num_generation_tokens=1, num_preemptions=1,
        prefix_cache=PrefixCacheStats(requests=1, queries=5, hits=4),
        spec_decode_num_drafts=1, spec_decode_num_draft_tokens=3, spec_decode_num_accepted_tokens=2,
    )  # fmt: skip
    metrics.update(first)
    counts = {name: value(metrics, name) for name in (
        "generation_tokens", "num_preemptions", "prefix_cache_queries", "prefix_cache_hits",
        "spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")}  # fmt: skip
    assert counts == {
        "generation_tokens": 1, "num_preemptions": 1, "prefix_cache_queries": 5, "prefix_cache_hits": 4,
        "spec_decode_num_drafts": 1, "spec_decode_num_draft_tokens": 3, "spec_decode_num_accepted_tokens": 2,
    }  # fmt: skip
    metrics.update(dataclasses.replace(first, num_generation_tokens=3))
    assert value(metrics, "generation_tokens") == 3 and value(metrics, "prefix_cache_queries") == 5


def test_readmissions_after_preemption_are_no_prefix_queries_or_hits(caplog) -> None:
    metrics = ServerMetrics("m")
    stats = PrefixCacheStats(requests=4, queries=40, hits=0, preempted_requests=9, preempted_queries=90,
                             preempted_hits=72)
    metrics.update(dataclasses.replace(START, num_running=4, prefix_cache=stats))
    assert value(metrics, "prefix_cache_queries") == 40 and value(metrics, "prefix_cache_hits") == 0
    with caplog.at_level(logging.INFO, logger="pllm.server"):
        metrics.log_stats()
    assert "Prefix cache hit rate: 0.0%" in caplog.text


def test_an_idle_server_logs_no_stats_line_before_its_first_request(caplog) -> None:
    metrics = ServerMetrics("m")
    with caplog.at_level(logging.INFO, logger="pllm.server"):
        metrics.log_stats()
        metrics.update(START)
        metrics.log_stats()
    assert "Avg prompt throughput" not in caplog.text


def lora_series(metrics: ServerMetrics, prefix: str) -> list[tuple[dict, float]]:
    return [(s.labels, s.value) for family in metrics.registry.collect()
            if family.name == f"{prefix}:lora_requests_info" for s in family.samples]


def test_lora_requests_info_is_one_series_whose_value_is_when_it_was_set() -> None:
    """The gateway's LoRA affinity reads vLLM's lora_requests_info: the adapter slots and the adapters of running and
    waiting requests as labels, the time it was set as the value (the picker takes the newest). One series stands:
    the previous one goes when the labels change. An engine that serves no adapter now shows none."""
    import time

    from pllm.runtime.engine.outputs import LoraSnapshot

    metrics = ServerMetrics("m")
    metrics.update(START)  # lora None: an encoder, a tensor-parallel engine
    assert lora_series(metrics, "vllm") == [] and lora_series(metrics, "pllm") == []
    before = time.time()
    metrics.update(dataclasses.replace(START, lora=LoraSnapshot(8, ("alpha",), ("beta", "gamma"))))
    labels = {"max_lora": "8", "running_lora_adapters": "alpha", "waiting_lora_adapters": "beta,gamma"}
    for prefix in ("vllm", "pllm"):
        [(got, stamp)] = lora_series(metrics, prefix)
        assert got == labels and before <= stamp <= time.time()
    metrics.update(dataclasses.replace(START, lora=LoraSnapshot(8)))
    assert [got for got, _ in lora_series(metrics, "vllm")] == [
        {"max_lora": "8", "running_lora_adapters": "", "waiting_lora_adapters": ""}]
    metrics.update(START)  # every adapter unloaded: the series goes
    assert lora_series(metrics, "vllm") == [] and lora_series(metrics, "pllm") == []
