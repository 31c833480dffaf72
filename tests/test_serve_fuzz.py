"""Schemathesis over the server's own OpenAPI schema (short and seeded, so it runs in CI): invalid requests of every
operation (negative generation: wrong types, missing fields, odd strings including lone surrogates) never get a
5xx, and valid requests to the cheap operations do not either. Skipped where schemathesis is not installed."""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

import moetandem  # noqa: E402
from moetandem.assets import demo_model_path  # noqa: E402
from moetandem.serve import create_app  # noqa: E402
from moetandem.serve.server_thread import ServerThread  # noqa: E402


@pytest.fixture(scope="module")
def server():
    eng = moetandem.load(demo_model_path(), device="cpu", progress=False)
    with ServerThread(create_app(eng, model_id="demo-moe", max_batch=4, max_waiting=16)) as srv:
        yield srv


def _cases(srv, mode, max_examples: int, include) -> list:
    from hypothesis import HealthCheck, Phase, given, settings
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    seen = []
    for op in schema.get_all_operations():
        op = op.ok()
        if not include(op.label):
            continue
        label = op.label
        strategy = op.as_strategy(generation_mode=mode)

        @settings(max_examples=max_examples, deadline=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)
        @given(strategy)
        def run(case):
            response = case.call(base_url=srv.url, timeout=30)
            seen.append((label, response.status_code))
            assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"

        run()
    return seen


def test_invalid_requests_never_get_a_server_error(server):
    from schemathesis import GenerationMode
    seen = _cases(server, GenerationMode.NEGATIVE, 25, lambda label: label.startswith("POST"))
    assert len(seen) >= 25 and any(400 <= code < 500 for _, code in seen)


def test_valid_requests_to_cheap_operations(server):
    from schemathesis import GenerationMode
    seen = _cases(server, GenerationMode.POSITIVE, 10, lambda label: label.startswith("GET"))
    assert seen and all(code < 500 for _, code in seen)
