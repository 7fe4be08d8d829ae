"""The prefix-affinity router's pure parts, without a Ray instance: what a prompt's routing text is, the hash
chain over it, and which replica holds the longest known prefix."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'pllm[ray]')")

from pllm.runtime.server.ray_router import CHUNK_CHARS, prefix_chain, prompt_text  # noqa: E402


def chat_body(system: str, user: str, **extra) -> bytes:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return json.dumps({"model": "m", "messages": msgs, **extra}).encode()


def test_chain_covers_full_chunks_and_shares_a_common_prefix():
    system = "s" * (3 * CHUNK_CHARS)
    a = prefix_chain(prompt_text("/v1/chat/completions", chat_body(system, "question one")))
    b = prefix_chain(prompt_text("/v1/chat/completions", chat_body(system, "another, longer question")))
    assert len(a) == 3 and len(b) == 3  # the partial last chunk is not hashed
    assert a[:2] == b[:2]  # the system prompt's chunks agree
    other = prefix_chain(prompt_text("/v1/chat/completions", chat_body("t" + system[1:], "question one")))
    assert not set(other) & set(a)  # a change in the first chunk changes every hash after it


def test_what_splits_the_engine_cache_splits_the_chain():
    system = "s" * (2 * CHUNK_CHARS)
    base = prefix_chain(prompt_text("/v1/chat/completions", chat_body(system, "q")))
    salted = prefix_chain(prompt_text("/v1/chat/completions", chat_body(system, "q", cache_salt="tenant-2")))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = prefix_chain(prompt_text("/v1/chat/completions", chat_body(system, "q", tools=tools)))
    assert base[0] != salted[0] and base[0] != with_tools[0]


def test_completion_prompts_and_bad_bodies():
    text = "p" * (2 * CHUNK_CHARS)
    body = json.dumps({"model": "m", "prompt": text}).encode()
    batch = json.dumps({"model": "m", "prompt": [text, "other"]}).encode()
    assert prefix_chain(prompt_text("/v1/completions", body)) == prefix_chain(prompt_text("/v1/completions", batch))
    assert len(prefix_chain(prompt_text("/v1/completions", body))) == 2
    assert prompt_text("/v1/completions", b"{not json") == ""
    assert prompt_text("/v1/completions", b"[1, 2]") == ""
    assert prompt_text("/v1/embeddings", body) == ""
    assert prefix_chain("") == ()


@pytest.mark.parametrize("argv, expected", [
    ([], {"num_cpus": 1.0, "num_gpus": 0.0}),
    (["--tensor-parallel-size", "2"], {"num_cpus": 2.0, "num_gpus": 0.0}),  # a cpu rank is a process of its own
    (["--backend", "cuda", "--tensor-parallel-size", "4"], {"num_cpus": 1.0, "num_gpus": 4.0}),
    (["--num-cpus-per-replica", "3", "--num-gpus-per-replica", "0.5"], {"num_cpus": 3.0, "num_gpus": 0.5}),
])
def test_a_replica_reserves_one_device_per_tensor_parallel_rank(argv, expected):
    from pllm.runtime.server.ray_serve import build_ray_parser, replica_resources

    assert replica_resources(build_ray_parser().parse_args(["build", *argv])) == expected


def test_too_few_gpus_for_the_ranks_are_refused_by_name():
    from pllm.runtime.server.ray_serve import build_ray_parser, replica_resources

    args = build_ray_parser().parse_args(["build", "--backend", "cuda", "--tensor-parallel-size", "2",
                                          "--num-gpus-per-replica", "1"])
    with pytest.raises(ValueError, match="--num-gpus-per-replica 1 is fewer than --tensor-parallel-size 2"):
        replica_resources(args)


def test_a_body_nested_too_deep_is_left_to_the_replica():
    # json.loads raises RecursionError on this; the replica answers it 400 as pllm-serve does (its strict parse)
    deep = b'{"prompt":"hi","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert prompt_text("/v1/completions", deep) == ""
    chat = b'{"messages":[{"role":"user","content":[' + b"[" * 3000 + b"]" * 3000 + b"]}]}"
    assert prompt_text("/v1/chat/completions", chat) == ""


class Replica:
    """What the router reads of a Serve RunningReplica: its id and max_ongoing_requests."""

    def __init__(self, name: str, max_ongoing_requests: int):
        self.replica_id = ReplicaName(name)
        self.max_ongoing_requests = max_ongoing_requests


class ReplicaName(str):
    def to_full_id_str(self) -> str:
        return str(self)


class Pending:
    def __init__(self, request):
        self.args = [request]


def router(replicas: list[Replica], queues: dict[str, int], max_imbalance: int):
    from pllm.runtime.server.ray_router import PrefixAffinityRouter

    r = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # no Serve around it: only what choose_replicas reads
    r.initialize_state(max_imbalance=max_imbalance)
    r._replicas = {x.replica_id: x for x in replicas}
    r._replica_queue_len_cache = {x.replica_id: queues[x.replica_id] for x in replicas}
    r.apply_locality_routing = lambda pending_request: set(r._replicas)
    return r


def test_an_overloaded_holder_is_passed_over_at_an_imbalance_serve_can_report():
    import asyncio

    from pllm.runtime.server.ray_router import ForwardedRequest

    a, b = Replica("a", 40), Replica("b", 40)  # max_num_seqs 32: max_ongoing_requests 40, the most Serve reports
    prefix = prefix_chain("p" * (2 * CHUNK_CHARS))
    request = ForwardedRequest("POST", "/v1/completions", "", b"/", b"", (), "1.1", "http", None, b"", prefix)
    busy = router([a, b], {"a": 30, "b": 5}, max_imbalance=32)
    busy._owner = {h: a.replica_id for h in prefix}
    assert busy.max_imbalance(a) == 20  # half of 40: 32 could never be seen
    ranks = asyncio.run(busy.choose_replicas([a, b], Pending(request)))
    assert len(ranks) == 1  # passed over: power of two choices only
    idle = router([a, b], {"a": 10, "b": 5}, max_imbalance=32)
    idle._owner = {h: a.replica_id for h in prefix}
    assert asyncio.run(idle.choose_replicas([a, b], Pending(request)))[0] == [a]
    # a retry names the replica whose engine was dead: the holder is not offered again while another is there
    retry = ForwardedRequest("POST", "/v1/completions", "", b"/", b"", (), "1.1", "http", None, b"", prefix, ("a",))
    assert asyncio.run(idle.choose_replicas([a, b], Pending(retry))) == [[b]]
