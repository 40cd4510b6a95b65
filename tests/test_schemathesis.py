"""Property-based API tests: schemathesis generates requests from the live OpenAPI schema of a real
uvicorn (tiny bundle, so every case is cheap) and runs every check it has on each answer: no 5xx,
status code, content type, headers and body as documented, invalid data rejected, valid data
accepted, auth not ignored, ...

* positive mode: requests that fit the schema, for every operation. Uploads are real images (a
  strategy for `format: binary`), so these cases go through decoding and the model with random
  decoding settings; valid data must be accepted (2xx), except for the cross-field rule the schema
  cannot express (num_captions <= beam_size: 422 `invalid_parameter`) and too many batch files.
* negative mode: requests that break the schema (types, ranges, missing fields) for every operation
  that takes input: a documented 4xx with the error shape.
* with API keys on: the same server settings plus keys; schemathesis' `ignored_auth` check re-sends
  each request without the key and with a wrong one and needs the 401 the schema documents. The key
  has a rate limit too high to reach, so every answer carries the X-RateLimit-* headers and the
  header checks hold them to the schema.

More than 1,000 cases in all (`test_case_count`, docs/reliability.md). Derandomized: the same
cases every run.
"""

from __future__ import annotations

import base64
import io
from collections import Counter

import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import CHECKS, load_all_checks  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

load_all_checks()
ALL_CHECKS = list(CHECKS.get_all())  # every check schemathesis has
MAX_FILES = 3
API_KEY = "fuzz-key-0123456789abcdef"

# (an operation without parameters has one possible request: hypothesis stops after it)
POSITIVE_EXAMPLES = 200
NEGATIVE_EXAMPLES = 150
KEYED_EXAMPLES = 40
COUNTS: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


def _operation_ids() -> list[str]:
    """The operations of the service's schema (built in-process, nothing loaded): every one is fuzzed."""
    from app.main import create_app
    from app.settings import Settings

    spec = create_app(Settings(device="cpu")).openapi()
    return sorted(op["operationId"] for item in spec["paths"].values() for op in item.values())


OPERATIONS = _operation_ids()
UPLOADS = {"create_caption", "create_captions_batch", "create_attention_png"}
WITH_INPUT = sorted(UPLOADS & set(OPERATIONS))
# `?model=` may name a model that is not loaded: 404 model_not_found (the schema cannot list them)
WITH_MODEL = sorted((UPLOADS | {"get_model_info"}) & set(OPERATIONS))
# the admin routes (app/api/routes/models.py): off on these servers (no CAPTIONER_ADMIN_API_KEYS), 403 admin_disabled
ADMIN = sorted({"load_model", "rollback_model"} & set(OPERATIONS))
# The Open Inference Protocol (app/api/routes/v2.py): errors are {"error": "<code>: <message>"}. The model is a path
# parameter: positive cases name the served model (the schema cannot list the loaded ones; tests/test_open_inference.py
# covers unknown ones). Infer's positive cases get shape [len(data)] (a rule across fields) and may be 400 for the
# other one (num_captions > beam_size: invalid_parameter) or an output asked for twice. Infer is not fuzzed in
# negative mode: with a random model name every case is a 404 before the body is read; its malformed bodies are
# tests/test_open_inference.py's test_wire_format_corners.
V2 = sorted(op for op in OPERATIONS if op.startswith("v2_"))
V2_MODEL = sorted(op for op in V2 if "model" in op)
V2_INFER = sorted(op for op in V2 if op.endswith("_infer"))


def _image(seed: int, fmt: str, width: int, height: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


IMAGES = [_image(i, fmt, w, h) for i, (fmt, w, h) in enumerate(
    [("PNG", 32, 24), ("JPEG", 64, 48), ("GIF", 16, 16), ("WEBP", 40, 30), ("BMP", 8, 8), ("PNG", 1, 1)])]
# Uploads: real images; schemathesis fills `format: binary` fields with these, and /v2's base64 (`format: byte`) too.
schemathesis.openapi.format("binary", st.sampled_from(IMAGES))
schemathesis.openapi.format("byte", st.sampled_from([base64.b64encode(x).decode() for x in IMAGES]))


def _config(keyed: bool) -> SchemathesisConfig:
    """Valid data must get a 2xx; the upload operations may also answer 422 (cross-field rules), those
    with `?model=` 404 (a model that is not loaded), the admin routes their 403 (admin routes off)."""
    keyed_statuses = ["401"] if keyed else []

    def expected(op: str) -> list[str]:
        if op in ADMIN:
            return ["403", *keyed_statuses]
        if op in V2_INFER:
            return ["2xx", "400", *keyed_statuses]
        return ["2xx", *(["422"] if op in WITH_INPUT else []), *(["404"] if op in WITH_MODEL else []), *keyed_statuses]

    return SchemathesisConfig.from_dict({
        "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", *keyed_statuses]}},
        "operations": [
            {"include-operation-id": op, "checks": {"positive_data_acceptance": {"expected-statuses": expected(op)}}}
            for op in sorted({*WITH_INPUT, *WITH_MODEL, *ADMIN, *V2_INFER})
        ],
    })


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    # every schema-valid request is one it can answer (labels, and their words for guide=labels)
    return tiny_bundles(max_length=8, labels=True, label_words=True)


@pytest.fixture(scope="module")
def server(bundle, start_server):
    return start_server(bundle, max_upload_bytes=200_000, max_batch_files=MAX_FILES)


@pytest.fixture(scope="module")
def keyed_server(bundle, start_server):
    return start_server(bundle, log_name="keyed", max_upload_bytes=200_000, max_batch_files=MAX_FILES,
                        api_keys=API_KEY, api_key_rate_limit=1_000_000)


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=_config(keyed=False))


@pytest.fixture(scope="module")
def keyed_schema(keyed_server):
    return schemathesis.openapi.from_url(f"{keyed_server.url}/openapi.json", config=_config(keyed=True))


def test_every_operation_is_fuzzed(api_schema, keyed_schema):
    for schema in (api_schema, keyed_schema):
        ids = {result.ok().definition.raw["operationId"] for result in schema.get_all_operations()}
        assert ids == set(OPERATIONS)
    spec = keyed_schema.raw_schema
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "securitySchemes" not in api_schema.raw_schema.get("components", {})


def _fuzz(schema, server, operation_id: str, mode, max_examples: int, label: str,
          headers: dict | None = None) -> Counter[int]:
    from app.api.auth import is_public

    operation = schema.find_operation_by_id(operation_id)
    seen: Counter[int] = Counter()
    strategy = operation.as_strategy(generation_mode=mode)
    if operation_id in V2_MODEL and mode is GenerationMode.POSITIVE:
        strategy = strategy.map(lambda case: _on_served_model(case, server))

    @given(case=strategy)
    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call_and_validate(base_url=server.url, checks=ALL_CHECKS, headers=headers, timeout=30)
        seen[response.status_code] += 1
        COUNTS[label] += 1
        STATUSES[response.status_code] += 1
        assert response.status_code < 500, response.text
        if headers is not None and response.status_code != 401 and not is_public(case.path):
            # the keyed server's key has a rate limit: every answer to it says how much is left
            assert "x-ratelimit-remaining" in response.headers, response.headers
        if response.status_code >= 400 and operation_id in V2:
            body = response.json()
            assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
            assert response.headers["x-request-id"]
            code, _, message = body["error"].partition(": ")
            if mode is GenerationMode.POSITIVE and response.status_code == 400:
                assert (code in ("invalid_parameter", "unknown_word")
                        or (code == "bad_request" and "asked for twice" in message)), body
        elif response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"} and body["error"]["code"] and body["error"]["request_id"]
            echoed = response.headers["x-request-id"]
            assert (echoed[0] if isinstance(echoed, list) else echoed) == body["error"]["request_id"]
            if mode is GenerationMode.POSITIVE and response.status_code == 422:
                # the only valid-by-schema requests refused: rules across fields (num_captions > beam), and
                # include words outside the model's vocabulary
                assert body["error"]["code"] in ("invalid_parameter", "unknown_word"), body
            if mode is GenerationMode.POSITIVE and response.status_code == 404:
                assert body["error"]["code"] == "model_not_found", body
            if mode is GenerationMode.POSITIVE and response.status_code == 403:
                assert body["error"]["code"] == "admin_disabled", body

    check()
    assert seen
    if operation_id in WITH_INPUT:  # an upload route's inputs are rich enough for half the budget, at least:
        # with every test's share, the whole file generates over 1,000 cases
        assert sum(seen.values()) >= max_examples // 2, (operation_id, label, dict(seen))
    return seen


_SERVED: dict[str, dict] = {}


def _on_served_model(case, server):
    """A /v2 case for the served model (its name and version from /readyz), infer's shape fitting its data."""
    if server.url not in _SERVED:
        import httpx

        _SERVED[server.url] = httpx.get(f"{server.url}/readyz", timeout=10).json()["model"]
    model = _SERVED[server.url]
    case.path_parameters["model_name"] = model["name"]
    if "model_version" in case.path_parameters:
        case.path_parameters["model_version"] = model["version"]
    inputs = case.body.get("inputs") if isinstance(case.body, dict) else None
    if inputs and isinstance(inputs[0], dict) and isinstance(inputs[0].get("data"), list):
        inputs[0]["shape"] = [len(inputs[0]["data"])]
    return case


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_valid_requests_conform(api_schema, server, operation_id):
    """Requests that fit the schema: accepted, and every answer as documented."""
    statuses = _fuzz(api_schema, server, operation_id, GenerationMode.POSITIVE, POSITIVE_EXAMPLES, "positive")
    if operation_id in ADMIN:
        assert set(statuses) == {403}, statuses  # off without CAPTIONER_ADMIN_API_KEYS (tests/test_model_repository.py)
    else:
        assert statuses[200] > 0, statuses  # real work was done, not only refusals


@pytest.mark.parametrize("operation_id", WITH_INPUT)
def test_invalid_requests_are_rejected(api_schema, server, operation_id):
    """Requests that break the schema (bad parameter types and ranges, missing fields): a documented
    4xx with the error shape, never a 5xx. (schemathesis' negative_data_rejection knows which
    mutations really are invalid: extra unknown query parameters, for one, are allowed.)"""
    statuses = _fuzz(api_schema, server, operation_id, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, "negative")
    assert any(400 <= s < 500 for s in statuses)


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_api_keys_are_enforced_as_documented(keyed_schema, keyed_server, operation_id):
    """With keys on: requests with the key behave as documented; ignored_auth re-sends them without
    a key and with a wrong one (protected operations must answer 401)."""
    _fuzz(keyed_schema, keyed_server, operation_id, GenerationMode.POSITIVE, KEYED_EXAMPLES, "keyed",
          headers={"Authorization": f"Bearer {API_KEY}"})


def test_servers_survived(server, keyed_server):
    import httpx

    for srv in (server, keyed_server):
        assert httpx.get(f"{srv.url}/readyz", timeout=10).status_code == 200
        assert srv.process.poll() is None
        assert "Traceback" not in srv.log()
    # ignored_auth really ran: it re-sent requests without a (valid) key and got 401s
    assert '"status": 401' in keyed_server.log()


@pytest.fixture(scope="module", autouse=True)
def _report_case_count(request):
    """After the module: how many cases ran, on the terminal (docs quote it)."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if COUNTS and reporter is not None:
        reporter.write_line(f"schemathesis cases: {sum(COUNTS.values())} ({dict(COUNTS)}) with {len(ALL_CHECKS)} "
                            f"checks; statuses {dict(sorted(STATUSES.items()))}")
