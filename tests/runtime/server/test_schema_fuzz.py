"""Schemathesis over /openapi.json against a live server: no input, valid or not, may produce a 5xx."""

from __future__ import annotations

import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance  # noqa: E402

MAX_EXAMPLES = 60  # per operation and mode; the whole run stays well under a minute on 2 cores


@pytest.fixture(scope="module")
def fuzz_server(launch):
    # max_model_len 32 keeps any generated request (n up to 128, max_tokens unbounded) to a few steps.
    return launch("--max-model-len", "32", "--max-num-seqs", "128", "--kv-cache-memory", "2M")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_server, mode):
    # The pytest plugin's lazy fixture does not run under pytest 9, so hypothesis drives each operation directly.
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/embeddings"}
    seen: dict[int, int] = {}
    start = time.monotonic()
    for op in operations:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            response = case.call_and_validate(
                checks=[not_a_server_error, response_schema_conformance, status_code_conformance], timeout=60
            )
            seen[response.status_code] = seen.get(response.status_code, 0) + 1

        try:
            run()
        except Unsatisfiable:  # negative mode on an operation with nothing to break (GET /health, POST /ping)
            assert mode is GenerationMode.NEGATIVE and (op.method.upper() == "GET" or not list(op.body)), op.path
        except Exception:
            errors = [line for line in fuzz_server.log().splitlines() if "access" not in line][-60:]
            print("server log:\n" + "\n".join(errors))
            raise
    assert not any(code >= 500 for code in seen), seen
    assert time.monotonic() - start < 120
    assert fuzz_server.proc.poll() is None
