"""tools/gpu_check.py --dry-run: the GPU bring-up rehearsed on the CPU (interpreter, tiny model and shapes), so that a
device lease is never spent on a typo, a missing import or a broken install."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_CHECK = REPO / "tools" / "gpu_check.py"
STEPS = ["install", "machine", "tests", "kernels", "quant_kernels", "model_build", "throughput", "decode_graphs",
         "target"]


def run_check(out: Path, work: Path, *extra: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--dry-run", "--out", str(out), "--work", str(work),
                           *extra], capture_output=True, text=True, timeout=timeout)
    report = out / "gpu_check.json"
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(report.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("gpu-check-out"), tmp_path_factory.mktemp("gpu-check-work")
    # ~80 s on the 2-core VM when quiet; the steps' own limits (DRY_RUN_TIMEOUT_S each) bound it under heavy load
    proc, report = run_check(out, work, timeout=1500)
    return proc, report, {s["name"]: s for s in report["steps"]}, out, work


def test_every_step_runs_and_passes(dry_run):
    proc, report, steps, out, _ = dry_run
    failed = {name: s["error"] for name, s in steps.items() if s["status"] != "passed"}
    assert not failed, failed
    assert proc.returncode == 0 and report["all_passed"] and report["dry_run"]
    assert [s["name"] for s in report["steps"]] == STEPS
    assert all(s["seconds"] > 0 and s["returncode"] == 0 for s in steps.values())
    log = (out / "gpu_check.log").read_text()
    assert all(f"\n===== {name}: exit 0 after " in log for name in STEPS)
    table = proc.stdout.rstrip().splitlines()
    assert table[-2] == f"{len(STEPS)}/{len(STEPS)} steps passed in {report['seconds']:.0f} s"  # the table comes last


def test_steps_report_what_the_gpu_run_needs(dry_run):
    _, report, steps, _, work = dry_run
    install = steps["install"]["result"]
    assert install["pllm_file"] == str(work / "site" / "pllm" / "__init__.py")  # the installed copy, not the tree
    assert set(install["imports"]) >= {"pllm", "xgrammar", "pydantic", "fastapi", "gguf"}
    machine = steps["machine"]["result"]
    assert machine["ceilings"]["copy_gb_per_s"] > 0 and machine["ceilings"]["matmul_tflop_per_s"] > 0
    assert machine["pllm_file"] == install["pllm_file"] and machine["versions"]["torch"]
    tests = steps["tests"]["result"]
    assert "tests/runtime/engine/test_cuda_backend.py" in tests["files"]
    assert tests["failed"] == 0 and tests["skipped"] == len(tests["tests"]) >= 30  # every kernel x dtype, and more
    assert any("test_decode_attention_cuda[bfloat16]" in name for name in tests["tests"])
    checked = {case["kernel"] for case in steps["kernels"]["result"]["checked"]}
    assert checked == {"rms_norm", "rope_kv_write", "decode_attention", "prefill_attention", "mlp"}
    quant = {(case["kernel"], case["label"]) for case in steps["quant_kernels"]["result"]["checked"]}
    assert {kernel for kernel, _ in quant} == {"quant_matmul_int8", "quant_matmul_int4", "quant_matmul_int4_sym"}
    assert {label.split()[1] for _, label in quant} == {"T=1", "T=20"}  # decode- and prefill-sized launches
    assert any("test_quant_matmul_cuda" in name for name in tests["tests"])
    model = steps["model_build"]["result"]
    assert model["weight_bytes"] > 0 and {"decode_attention", "prefill_attention", "mlp"} <= set(model["kernels"])
    throughput = steps["throughput"]["result"]
    assert throughput["pllm_tok_s"] > 0 and throughput["hf_tok_s"] > 0 and throughput["ratio"] > 0
    assert [row["batch"] for row in steps["decode_graphs"]["result"]["rows"]] == [1, 2]
    target = steps["target"]["result"]
    assert target["compiled_target"] == "sm_90" and target["compiled_variants"] > 0
    assert target["serves_without_jit"] is True and target["jit_compiled_files"] == 0  # the interpreter compiles none
    assert len(target["serve"]["tokens"]) == 2


def test_a_failed_step_is_recorded_and_the_next_still_runs(tmp_path):
    # a fresh scratch folder holds no build: throughput fails, and decode_graphs runs (and fails) after it
    proc, report = run_check(tmp_path / "out", tmp_path / "work", "--only", "throughput", "decode_graphs", timeout=600)
    assert proc.returncode == 1 and not report["all_passed"]
    throughput, decode = report["steps"]
    assert throughput["status"] == decode["status"] == "failed"
    assert "the model_build step did not finish" in throughput["error"]
    assert throughput["result"]["error"].startswith("StepFailed")
    assert decode["error"]


def test_example_cap_bounds_hypothesis_counts(monkeypatch):
    from hypothesis_budget import ENV_VAR, examples

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert examples(25) == 25
    monkeypatch.setenv(ENV_VAR, "3")
    assert examples(25) == 3 and examples(2) == 2
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(ENV_VAR, bad)
        with pytest.raises(ValueError, match=f"{ENV_VAR}={bad!r}"):
            examples(25)
