"""/v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING) on a live server."""

from __future__ import annotations

import argparse
import json

import httpx
import pytest

from pllm import LLM, LoRARequest, SamplingParams
from pllm.runtime.server.cli_args import build_parser, runtime_lora_updating

PROMPT = "Hello, world!"


@pytest.fixture(scope="module")
def packed_alpha(tiny_dir, tiny_loras, tmp_path_factory):
    """The tiny llama with adapter `alpha` compiled into the build: what a runtime load must equal."""
    from pllm.compiler.build import BuildOptions, build

    out = tmp_path_factory.mktemp("packed-alpha") / "build"
    return build(str(tiny_dir("llama")), out, BuildOptions(dtype="float32", progress=False,
                                                           loras=(("alpha", str(tiny_loras["alpha"])),)))


@pytest.fixture(scope="module")
def updating_server(launch_build, tiny_build):
    return launch_build(tiny_build("llama"), "--served-model-name", "tiny", "--max-model-len", "128",
                        "--kv-cache-memory", "4M", "--max-loras", "2", "--allow-runtime-lora-updating")


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.api}/{route}", json=body, timeout=60)


def complete(server, model: str, max_tokens: int = 8) -> httpx.Response:
    return post(server, "completions", {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                        "temperature": 0, "ignore_eos": True})


def models(server) -> set[str]:
    return {m["id"] for m in httpx.get(f"{server.api}/models").json()["data"]}


def test_off_by_default_the_routes_are_not_there(server):
    for route in ("load_lora_adapter", "unload_lora_adapter"):
        assert post(server, route, {"lora_name": "a", "lora_path": "/tmp"}).status_code == 404


def test_load_serve_unload_reload(updating_server, packed_alpha, tiny_loras):
    s = updating_server
    r = post(s, "load_lora_adapter", {"lora_name": "alpha", "lora_path": str(tiny_loras["alpha"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'alpha' added successfully."
    cards = {m["id"]: m for m in httpx.get(f"{s.api}/models").json()["data"]}
    assert set(cards) == {"tiny", "alpha"} and cards["alpha"]["parent"] == "tiny"
    assert cards["alpha"]["root"] == str(tiny_loras["alpha"])
    got = complete(s, "alpha").json()
    assert got["model"] == "alpha"
    llm = LLM(str(packed_alpha), backend="cpu", kv_cache_memory=1 << 24)
    want = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False,
                        lora_request=LoRARequest("alpha", 1))[0].outputs[0].text
    assert got["choices"][0]["text"] == want != complete(s, "tiny").json()["choices"][0]["text"]

    r = post(s, "unload_lora_adapter", {"lora_name": "alpha"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'alpha' removed successfully."
    r = complete(s, "alpha")
    assert r.status_code == 404 and "`alpha` does not exist" in r.json()["error"]["message"]
    assert models(s) == {"tiny"}
    r = post(s, "unload_lora_adapter", {"lora_name": "alpha"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "The lora adapter 'alpha' cannot be found."
    # its slot is free again: two loads fit --max-loras 2, a third is refused naming the limit
    for name in ("beta", "gamma"):
        assert post(s, "load_lora_adapter", {"lora_name": name, "lora_path": str(tiny_loras[name])}).status_code == 200
    r = post(s, "load_lora_adapter", {"lora_name": "alpha", "lora_path": str(tiny_loras["alpha"])})
    assert r.status_code == 400 and "max_loras" in r.json()["error"]["message"]
    for name in ("beta", "gamma"):
        assert post(s, "unload_lora_adapter", {"lora_name": name}).status_code == 200


def test_bad_loads_are_refused_and_change_nothing(updating_server, tiny_loras, tmp_path):
    s = updating_server
    before = models(s)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 128, "target_modules": ["q_proj"]}')
    cases = [
        ({"lora_name": "big", "lora_path": str(tmp_path)}, 400, "'r' is 128; the rank must be an integer in [1, 64]"),
        ({"lora_name": "nope", "lora_path": str(tmp_path / "missing")}, 404, "No adapter found for"),
        ({"lora_name": "", "lora_path": str(tiny_loras["beta"])}, 400,
         "Both 'lora_name' and 'lora_path' must be provided."),
        ({"lora_name": "tiny", "lora_path": str(tiny_loras["beta"])}, 400, "is a served model name"),
        ({"lora_name": "bad name/", "lora_path": str(tiny_loras["beta"])}, 400, "must be 1-64 characters"),
    ]
    for body, status, message in cases:
        r = post(s, "load_lora_adapter", body)
        assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
    assert post(s, "load_lora_adapter", {"lora_name": "dup", "lora_path": str(tiny_loras["beta"])}).status_code == 200
    r = post(s, "load_lora_adapter", {"lora_name": "dup", "lora_path": str(tiny_loras["gamma"])})
    assert r.status_code == 400 and r.json()["error"]["message"] == "The lora adapter 'dup' has already been loaded."
    r = post(s, "unload_lora_adapter", {})
    assert r.status_code == 400 and "'lora_name' needs to be provided" in r.json()["error"]["message"]
    assert models(s) == before | {"dup"}
    assert post(s, "unload_lora_adapter", {"lora_name": "dup"}).status_code == 200
    assert complete(s, "tiny").status_code == 200


def test_unload_lets_a_running_request_finish_on_the_adapter(updating_server, tiny_loras):
    s = updating_server
    assert post(s, "load_lora_adapter", {"lora_name": "beta", "lora_path": str(tiny_loras["beta"])}).status_code == 200
    want = complete(s, "beta", 60).json()["choices"][0]["text"]
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": 60, "temperature": 0, "ignore_eos": True,
            "stream": True}
    text, unloaded = "", False
    with httpx.stream("POST", f"{s.api}/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text += json.loads(line[6:])["choices"][0]["text"]
            if not unloaded:  # the request runs in the engine now
                assert post(s, "unload_lora_adapter", {"lora_name": "beta"}).status_code == 200
                assert complete(s, "beta").status_code == 404
                unloaded = True
    assert unloaded and text == want


def namespace(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["build", *argv])


def test_flag_and_vllm_environment_variable():
    assert not runtime_lora_updating(namespace(), {})
    assert runtime_lora_updating(namespace("--allow-runtime-lora-updating"), {})
    for value, on in (("True", True), (" 1 ", True), ("true", True), ("0", False), ("False", False), ("yes", False)):
        assert runtime_lora_updating(namespace(), {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": value}) is on
    with pytest.raises(ValueError, match="cannot be used with --tensor-parallel-size 2"):
        runtime_lora_updating(namespace("--tensor-parallel-size", "2"), {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
