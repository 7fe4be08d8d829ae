"""pllm-serve-ray's own plumbing, without a Ray instance: which options reach the replicas (the API key however it
was given), how many requests a replica takes at once, the flags it refuses, how fast a dead engine leaves routing
(health checks, and the ingress trying another replica), and the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'pllm[ray]')")

from pllm.runtime.server import ray_serve  # noqa: E402
from pllm.runtime.server.cli_args import args_from_options  # noqa: E402
from pllm.runtime.server.ray_ingress import PllmIngress  # noqa: E402
from pllm.runtime.server.ray_router import ForwardedRequest, ReplicaUnavailable  # noqa: E402
from pllm.runtime.server.ray_serve import (  # noqa: E402
    CONTROL_REQUESTS,
    HEALTH_CHECK_PERIOD_S,
    PllmReplica,
    build_ray_parser,
    check_ray_args,
    deployment,
    deployment_options,
    engine_options,
)


def parse(*argv: str):
    return build_ray_parser().parse_args(["/builds/b", *argv])


def test_the_api_key_from_the_environment_reaches_the_replicas(monkeypatch):
    monkeypatch.setenv("PLLM_API_KEY", "s3cret")  # the CLI's environment; a replica on another node has none
    assert engine_options(parse())["api_key"] == "s3cret"
    assert engine_options(parse("--api-key", "s3cret"))["api_key"] == "s3cret"  # given, equal to the default
    monkeypatch.delenv("PLLM_API_KEY")
    assert "api_key" not in engine_options(parse())
    with pytest.raises(ValueError) as e:  # a bad option's error shows the options, but not the key
        args_from_options({"build_dir": "/b", "api_key": "s3cret", "max_num_seqs": 0})
    assert "s3cret" not in str(e.value) and "--api-key <hidden>" in str(e.value)


def engines(app):
    """The PllmServer deployment of a deployment() application (behind the ingress, or alone)."""
    bound = app._bound_deployment
    return bound.init_args[0]._bound_deployment if bound.name == "PllmIngress" else bound


@pytest.mark.parametrize("argv", [(), ("--num-replicas", "3"), ("--max-replicas", "4")])
def test_a_replica_takes_a_full_batch_and_its_control_requests(argv):
    options = deployment_options(parse("--max-num-seqs", "32", *argv))
    assert options["max_ongoing_requests"] >= 32 + CONTROL_REQUESTS  # Serve's default, 5, capped the batch at 5
    # a Serve config (build_app) that names none gets the same
    assert engines(deployment({"build_dir": "/b", "max_num_seqs": 32}, True)).max_ongoing_requests == 32 + 8
    assert engines(deployment({"build_dir": "/b"}, False, max_ongoing_requests=7)).max_ongoing_requests == 7


@pytest.mark.parametrize("flag", [["--max-connections", "5"], ["--timeout-keep-alive", "1"],
                                  ["--request-header-timeout", "1"], ["--disable-access-log"]])  # fmt: skip
def test_flags_of_pllm_serves_http_server_are_refused_by_name(flag, capsys):
    with pytest.raises(ValueError, match=f"{flag[0]}: pllm-serve's own HTTP server's"):
        check_ray_args(parse(*flag))
    assert ray_serve.main(["/builds/b", *flag]) == 2  # before Ray starts
    assert flag[0] in capsys.readouterr().err
    check_ray_args(parse())  # none given: nothing refused


def test_target_ongoing_requests_needs_autoscaling_and_the_log_level_reaches_the_replicas():
    with pytest.raises(ValueError, match="--target-ongoing-requests is for autoscaling: give --max-replicas"):
        check_ray_args(parse("--target-ongoing-requests", "4"))
    check_ray_args(parse("--target-ongoing-requests", "4", "--max-replicas", "2"))
    assert engine_options(parse("--log-level", "debug"))["log_level"] == "debug"


def test_a_dead_engine_is_found_within_seconds():
    for app in (deployment({"build_dir": "/b"}, True), deployment({"build_dir": "/b"}, False)):
        assert engines(app)._deployment_config.health_check_period_s == HEALTH_CHECK_PERIOD_S <= 2


class DeadEngine:
    is_alive = False
    dead_reason = "tensor-parallel rank 1 exited"

    def stop(self):
        pass


def forwarded(**fields) -> ForwardedRequest:
    return ForwardedRequest(method="POST", path="/v1/completions", root_path="", raw_path=b"/v1/completions",
                            query_string=b"", headers=(), http_version="1.1", scheme="http", client=None, body=b"{}",
                            prefix=(), **fields)  # fmt: skip


def test_a_replica_with_a_dead_engine_answers_unavailable_before_anything():
    replica = PllmReplica.__new__(PllmReplica)
    replica.engine, replica.replica, replica.asgi_app = DeadEngine(), "r1", None

    async def messages():
        return [m async for m in replica.handle_forwarded(forwarded())]

    assert asyncio.run(messages()) == [ReplicaUnavailable("r1", "tensor-parallel rank 1 exited")]


class Call:
    def __init__(self, messages):
        self.messages = messages

    def cancel(self):
        pass

    async def __aiter__(self):
        for m in self.messages:
            yield m


class Handle:
    """A deployment handle whose replicas answer in turn: each call is given the next answer."""

    def __init__(self, answers):
        self.answers, self.requests = list(answers), []
        self.handle_forwarded = self

    def options(self, stream):
        return self

    def remote(self, request):
        self.requests.append(request)
        return Call(self.answers.pop(0))


def run_ingress(answers) -> tuple[list, Handle]:
    handle, sent = Handle(answers), []

    async def go():
        async def receive():
            await asyncio.Event().wait()

        async def send(message):
            sent.append(message)

        await PllmIngress(handle, 1 << 20, 10).forward(forwarded(), receive, send)

    asyncio.run(go())
    return sent, handle


def test_the_ingress_tries_another_replica_when_the_engine_of_the_first_is_dead():
    ok = [{"type": "http.response.start", "status": 200, "headers": []}, {"type": "http.response.body", "body": b"x"}]
    sent, handle = run_ingress([[ReplicaUnavailable("r1", "dead")], ok])
    assert sent == ok
    assert [r.avoid for r in handle.requests] == [(), ("r1",)]  # the router passes r1 over for the retry
    sent, handle = run_ingress([[ReplicaUnavailable(f"r{i}", "dead")] for i in range(3)])
    assert sent[0]["status"] == 503 and b"engines of 3 replicas tried are dead" in sent[1]["body"]


def test_sigterm_drains_the_application_before_serve_stops(monkeypatch):
    calls, polls = [], iter([True, True, False])
    monkeypatch.setattr(ray_serve.serve, "delete", lambda name, _blocking: calls.append((name, _blocking)))

    class Status:
        @property
        def applications(self):
            return {"pllm": "DELETING"} if next(polls) else {}

    monkeypatch.setattr(ray_serve.serve, "status", Status)
    assert ray_serve.drain("pllm", 30, threading.Event())  # waited while the replicas drained
    assert calls == [("pllm", False)]
    now = threading.Event()
    now.set()  # a second signal: stop waiting
    polls = iter([True] * 100)
    assert not ray_serve.drain("pllm", 30, now)
    stop = ray_serve.StopSignals()
    stop(15, None)
    assert stop.drain.is_set() and not stop.now.is_set()
    stop(15, None)
    assert stop.now.is_set()


def test_runtime_adapter_loads_are_refused_under_serve(monkeypatch, capsys):
    """A load would reach the one replica that took it, and a replica started later would lack it: refused by the
    CLI before Ray starts, and by a Serve config's application (build_app) and each replica, for the flag and for
    vLLM's environment variable."""
    with pytest.raises(ValueError, match="--allow-runtime-lora-updating: not under Ray Serve, where a load would"):
        check_ray_args(parse("--allow-runtime-lora-updating"))
    assert ray_serve.main(["/builds/b", "--allow-runtime-lora-updating"]) == 2
    assert "--lora-modules" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--allow-runtime-lora-updating: not under Ray Serve"):
        ray_serve.build_app({"build_dir": "/b", "allow_runtime_lora_updating": True})
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")
    with pytest.raises(ValueError, match=r"VLLM_ALLOW_RUNTIME_LORA_UPDATING=true: not under Ray Serve"):
        ray_serve.check_options({"build_dir": "/b"})  # what each replica runs first
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0")
    check_ray_args(parse())
    ray_serve.check_options({"build_dir": "/b"})
