"""The OpenAPI document: FastAPI's, made friendly to client generators.

Readable names for the multipart bodies, `format: binary` for uploads, the batch's file-count bounds,
the bearer scheme when API keys are configured, and `X-Request-ID` on every response.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.auth import security_openapi
from app.api.errors import REQUEST_ID_HEADER
from app.api.state import service_state
from app.api.v2_protocol import fix_openapi as fix_v2_openapi

API_VERSION = "1.0.0"
API_TITLE = "Captioner"
API_DESCRIPTION = """\
Image captioning: a CNN encoder and an LSTM decoder (exported to ONNX, served by onnxruntime).

* `POST /v1/captions` captions one image (multipart field `image`).
* `POST /v1/captions/batch` captions up to `max_batch_files` images (repeated field `images`) in one
  model call; a file that fails gets its own error entry.
* Decoding settings (`strategy`, `beam_size`, `num_captions`, `max_length`, `length_penalty`,
  `no_repeat_ngram_size`) are query parameters, and so is `labels`: how many ImageNet-1k labels to
  answer per image beside its captions (models with labels; `GET /v1/model` says).
* Every caption carries its words' probabilities (`token_probs`, `end_prob`) and a `confidence` in
  0..1; `min_confidence` (query parameter, or the service's setting) flags the captions below it
  `low_confidence: true` (still returned, and counted in `/metrics`) so they can go to a person.

Every error is `{"error": {"code", "message", "request_id"}}`. Send `X-Request-ID` to choose the
request id (up to 128 of `A-Z a-z 0-9 . _ : - @ + =`); otherwise one is generated. It is echoed on
every response and in the logs.
"""
OPENAPI_TAGS = [
    {"name": "captions", "description": "Caption images."},
    {"name": "model", "description": "The model being served."},
    {"name": "health", "description": "Liveness, readiness and metrics."},
    {"name": "open inference protocol", "description": "The Open Inference Protocol (KServe v2 REST): Triton's and "
     "KServe's clients caption images through it (docs/deploy.md). Its errors are `{\"error\": \"<code>: <message>\"}`."},
]

_BODY_SCHEMA_NAMES = {
    "Body_create_caption": "CaptionUpload",
    "Body_create_captions_batch": "BatchUpload",
    "Body_create_attention_png": "AttentionUpload",
}


def _fix_upload_schemas(node: Any) -> Any:
    """FastAPI emits `contentMediaType: application/octet-stream` for UploadFile; generators want
    `format: binary`. Also give the multipart body schemas readable names."""
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("contentMediaType") == "application/octet-stream":
            node = {k: v for k, v in node.items() if k != "contentMediaType"}
            node["format"] = "binary"
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                prefix, _, name = value.rpartition("/")
                value = f"{prefix}/{_BODY_SCHEMA_NAMES.get(name, name)}"
            out[key] = _fix_upload_schemas(value)
        return out
    if isinstance(node, list):
        return [_fix_upload_schemas(v) for v in node]
    return node


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    schemas = schema.get("components", {}).get("schemas", {})
    for old, new in _BODY_SCHEMA_NAMES.items():
        if old in schemas:
            body = schemas.pop(old)
            body["title"] = new
            schemas[new] = body
    schema = _fix_upload_schemas(copy.deepcopy(schema))
    settings = service_state(app).settings
    images = schema.get("components", {}).get("schemas", {}).get("BatchUpload", {}).get("properties", {}).get("images")
    if images is not None:  # a batch carries 1..max_batch_files files
        images["minItems"] = 1
        images["maxItems"] = settings.max_batch_files
    if settings.all_api_keys():  # bearer scheme only when keys are configured
        security_openapi(schema, settings.metrics_public)
    fix_v2_openapi(schema, settings.max_batch_files)  # /v2: the protocol's {"error": "..."}, 400 for bad input
    # Every answer carries X-Request-ID; say so on every documented response.
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            for response in operation.get("responses", {}).values():
                response.setdefault("headers", {})[REQUEST_ID_HEADER] = {
                    "description": "The request's id: the client's X-Request-ID if it was valid, else a generated one.",
                    "schema": {"type": "string", "maxLength": 128},
                }
    app.openapi_schema = schema
    return schema
