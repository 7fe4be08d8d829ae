"""LoRA adapters over HTTP: packed by pllm-compile --lora and loaded by --lora-modules, picked by `model`."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from pllm import LLM, LoRARequest, SamplingParams
from pllm.runtime.engine.outputs import LoraSnapshot


@pytest.fixture(scope="module")
def lora_build(tiny_dir, tiny_loras, tmp_path_factory):
    """The tiny llama with adapter `alpha` packed in by the pllm-compile command line."""
    out = tmp_path_factory.mktemp("lora-build") / "build"
    cmd = [sys.executable, "-m", "pllm.compiler.cli", str(tiny_dir("llama")), "-o", str(out), "-q",
           "--lora", f"alpha={tiny_loras['alpha']}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def lora_server(launch_build, lora_build, tiny_loras):
    return launch_build(lora_build, "--served-model-name", "tiny", "--max-model-len", "128", "--kv-cache-memory",
                        "4M", "--lora-modules", f"beta={tiny_loras['beta']}", f"gamma={tiny_loras['gamma']}")


def test_models_list_adapters_and_completions_pick_them(lora_server, lora_build, tiny_loras):
    from openai import OpenAI

    client = OpenAI(base_url=lora_server.api, api_key="unused", max_retries=0, timeout=60)
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "alpha", "beta", "gamma"}
    assert cards["beta"].parent == "tiny" and cards["beta"].root == str(tiny_loras["beta"])
    prompt = "Hello, world!"
    got = {}
    for model in ("tiny", "alpha", "beta", "gamma"):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        assert r.model == model
        got[model] = r.choices[0].text
    chat = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "gamma" and chat.choices[0].message.content is not None
    # the same adapters through the Python API: the packed one by name, the others from their folders
    llm = LLM(str(lora_build), backend="cpu", kv_cache_memory=1 << 24)
    params = SamplingParams(temperature=0, max_tokens=8)
    for i, model in enumerate(("alpha", "beta", "gamma")):
        lora = LoRARequest(model, i + 1, "" if model == "alpha" else str(tiny_loras[model]))
        assert llm.generate(prompt, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text == got[model]
    assert llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text == got["tiny"]
    assert len(set(got.values())) > 1


def test_the_snapshot_names_the_adapters_of_running_and_waiting_requests(lora_build, tiny_loras, tiny_build):
    """What lora_requests_info shows (the gateway's LoRA affinity): one sequence at a time, so after a step one
    adapter's request runs and the others wait; each name once; the base model's requests name none."""
    llm = LLM(str(lora_build), backend="cpu", kv_cache_memory=1 << 24, max_num_seqs=1)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=4)
    loras = {"alpha": LoRARequest("alpha", 1, ""), "beta": LoRARequest("beta", 2, str(tiny_loras["beta"]))}
    for i, name in enumerate(("alpha", "beta", "beta", None)):
        engine.add_request(f"r{i}", "Hello", params, lora_request=loras.get(name))
    engine.step()
    assert engine.snapshot().lora == LoraSnapshot(8, ("alpha",), ("beta",))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.snapshot().lora == LoraSnapshot(8)
    plain = LLM(str(tiny_build("llama")), backend="cpu", kv_cache_memory=1 << 24)  # no adapter loaded: LoRA off
    assert plain.engine.snapshot().lora is None


def test_metrics_carry_lora_requests_info(lora_server):
    text = httpx.get(lora_server.url + "/metrics", timeout=10).text
    assert "# TYPE vllm:lora_requests_info gauge" in text
    assert re.search(r'^vllm:lora_requests_info\{max_lora="8",running_lora_adapters="",waiting_lora_adapters=""\} '
                     r"1\.\d+e\+09$", text, re.MULTILINE), text[-2000:]


def test_unknown_model_and_adapter_embeddings_are_clean_errors(lora_server):
    r = httpx.post(f"{lora_server.api}/completions", json={"model": "delta", "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["param"] == "model" and "`delta` does not exist" in err["message"] and err["type"]
    r = httpx.post(f"{lora_server.api}/embeddings", json={"model": "beta", "input": "Hi"})
    assert r.status_code == 400 and "LoRA adapter" in r.json()["error"]["message"]


def test_bad_lora_modules_refused_at_start(lora_build, tiny_loras, tmp_path, capsys):
    from pllm.runtime.server.cli import main

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 128, "target_modules": ["q_proj"]}')
    assert main([str(lora_build), "--backend", "cpu", "--lora-modules", f"big={tmp_path}"]) == 2
    assert "'r' is 128; the rank must be an integer in [1, 64]" in capsys.readouterr().err
    assert main([str(lora_build), "--backend", "cpu", "--lora-modules", f"alpha={tiny_loras['beta']}"]) == 2
    assert "names must be distinct" in capsys.readouterr().err
