"""Property-based API tests: schemathesis generates requests from the live OpenAPI schema and checks
that the real uvicorn never answers 5xx and that every answer (status, content type, headers, body)
is one the schema documents. Examples are bounded so the whole file runs in well under a minute."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

from tests.bundle_factory import make_tiny_bundle  # noqa: E402
from tests.live_server import live_server  # noqa: E402

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", max_length=8)
    with live_server(bundle, tmp_path_factory.mktemp("logs") / "service.log",
                     max_upload_bytes=200_000, max_batch_files=3) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


# One test per operation. (The schema is loaded from the running server, so the operations are
# listed here; a test below checks that this list is every operation of the schema.)
OPERATIONS = ["create_caption", "create_captions_batch", "get_model_info", "get_health", "get_readiness",
              "get_metrics"]


def test_every_operation_is_fuzzed(api_schema):
    ids = {result.ok().definition.raw["operationId"] for result in api_schema.get_all_operations()}
    assert ids == set(OPERATIONS)


def _fuzz(api_schema, server, operation_id: str, mode, checks, max_examples: int) -> list[int]:
    operation = api_schema.find_operation_by_id(operation_id)
    seen: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call_and_validate(base_url=server.url, checks=checks, timeout=30)
        seen.append(response.status_code)
        assert response.status_code < 500
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"} and body["error"]["code"] and body["error"]["request_id"]
            echoed = response.headers["x-request-id"]
            assert (echoed[0] if isinstance(echoed, list) else echoed) == body["error"]["request_id"]

    check()
    assert seen
    return seen


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_valid_requests_conform(api_schema, server, operation_id):
    """Requests that fit the schema: no 5xx, every answer as documented."""
    _fuzz(api_schema, server, operation_id, GenerationMode.POSITIVE, CHECKS, max_examples=40)


@pytest.mark.parametrize("operation_id", ["create_caption", "create_captions_batch"])
def test_invalid_requests_are_rejected(api_schema, server, operation_id):
    """Requests that break the schema (bad parameter types and ranges, missing fields): a documented
    4xx with the error shape, never a 5xx. (schemathesis' negative_data_rejection knows which
    mutations really are invalid: extra unknown query parameters, for one, are allowed.)"""
    statuses = _fuzz(api_schema, server, operation_id, GenerationMode.NEGATIVE,
                     CHECKS + [st_checks.negative_data_rejection], max_examples=40)
    assert any(400 <= s < 500 for s in statuses)


def test_server_survived(server):
    import httpx

    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    assert server.process.poll() is None
    assert "Traceback" not in server.log()
