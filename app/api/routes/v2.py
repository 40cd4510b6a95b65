"""The Open Inference Protocol (KServe "v2" REST) beside /v1: health, server and model metadata, model
readiness, and infer, so that Triton's and KServe's clients caption images (docs/deploy.md).

The wire format (tensors, binary data, the error shape) is app/api/v2_protocol.py; everything else is
/v1's: the model the path names is held like `?model=` (deps.get_served: a swap lets the request finish,
the per-model metrics, X-Model-Version), the request `parameters` are /v1's decoding query parameters
(their names, types and bounds read from deps' own signatures, then validated by the same functions),
the images go through pipeline.load_bytes and pipeline.caption (the decoding pool, the dynamic batcher,
the deadline, overload). Limits, API keys, rate limits, metrics and traces come from the middleware,
as for /v1.

A bad image in a batch refuses the whole request (the protocol has no per-element errors: an output
tensor has one element per image): 400 naming the element, or 413 for one over max_upload_bytes or
max_image_pixels; no image of such a request is captioned.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.params import Query
from pydantic import ConfigDict, TypeAdapter, ValidationError

from app.api import pipeline, v2_protocol
from app.api.errors import APIError, error_responses
from app.api.openapi import API_VERSION
from app.api.pipeline import IMAGE_FORMATS, Prepared
from app.api.routes import deps
from app.api.schemas import CaptionItem
from app.api.state import service_state
from app.api.v2_protocol import (
    OUTPUTS,
    PLATFORM,
    OutputTensor,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)
from app.inference.engine import ImageResult
from app.inference.preprocess import ImageDecodeError
from app.serving.registry import NAME_PATTERN, ServedModel

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
SERVER_NAME = "captioner"


# ---- the request parameters: /v1's query parameters ----------------------------------------------


def _query_parameters(function: Callable[..., Any]) -> dict[str, Any]:
    """name -> its Annotated type (with the Query's bounds) for each query parameter of a /v1 dependency."""
    hints = typing.get_type_hints(function, include_extras=True)
    found = {}
    for name in inspect.signature(function).parameters:
        metadata = getattr(hints.get(name), "__metadata__", ())
        if any(isinstance(m, Query) for m in metadata):
            found[name] = hints[name]
    return found


_DECODING = _query_parameters(deps.decoding_config)
_LABELS = _query_parameters(deps.labels_count)
_MIN_CONFIDENCE = _query_parameters(deps.min_confidence)
PARAMETERS = {**_DECODING, **_LABELS, **_MIN_CONFIDENCE}
# strict: 3 (and 3.0, an integer for JSON Schema) is an integer, "3" and true are not; a float setting takes an integer
_ADAPTERS = {name: TypeAdapter(annotation, config=ConfigDict(strict=True)) for name, annotation in PARAMETERS.items()}


def parameters_schema() -> dict[str, Any]:
    """The request `parameters` object's properties, as /v1 documents its query parameters."""
    properties = {}
    for name, annotation in PARAMETERS.items():
        schema = TypeAdapter(annotation).json_schema()
        query = next(m for m in annotation.__metadata__ if isinstance(m, Query))
        properties[name] = {**schema, "description": query.description or ""}
    return properties


def _parameters(given: dict[str, Any]) -> dict[str, Any]:
    """The request's decoding parameters, typed and bounded as /v1's (400 bad_request otherwise); other keys
    (the protocol's and Triton's own, e.g. binary_data_output, timeout, priority) are left out."""
    values = {}
    for name, adapter in _ADAPTERS.items():
        if name not in given:
            continue
        value = given[name]
        if isinstance(value, float) and value.is_integer() and typing.get_args(PARAMETERS[name])[0] is int:
            value = int(value)  # JSON Schema's integer: 3.0 is one
        try:
            values[name] = adapter.validate_python(value)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"]
            raise v2_protocol.bad_request(f"parameter {name!r}: {problem}") from None
    return values


# ---- the model named by the path -------------------------------------------------------------------

_NAME = re.compile(NAME_PATTERN)
_MODEL_NAME = Annotated[str, Path(description="A loaded model's name (`GET /v1/models`).")]
_MODEL_VERSION = Annotated[str, Path(description="Its version: only the active (loaded) one answers.")]


async def served_model(request: Request, response: Response) -> AsyncIterator[ServedModel]:
    """The model the path names (`name`, or `name` and `version`), held as /v1's `?model=` holds it
    (deps.get_served: 404 model_not_found for a model or version that is not loaded)."""
    name = request.path_params.get("model_name", "")
    version = request.path_params.get("model_version")
    spec = f"{name}:{version}" if version else name
    if not _NAME.fullmatch(name) or (version is not None and not _NAME.fullmatch(version)):
        loaded = deps.registry_of(request).loaded()
        raise APIError(404, "model_not_found", f"model {spec!r} is not loaded; available: {', '.join(loaded) or 'none'}")
    async with asynccontextmanager(deps.get_served)(request, response, spec) as served:
        yield served


ServedV2 = Annotated[ServedModel, Depends(served_model)]

_MODEL_ERRORS = {404: "No loaded model has this name (or this version is not the active one): model_not_found."}


# ---- health and metadata ---------------------------------------------------------------------------


@router.get("/health/live", operation_id="v2_server_live", summary="Server live (Open Inference Protocol)",
            response_model=V2Live, responses=error_responses())
async def server_live() -> V2Live:
    return V2Live(live=True)


@router.get("/health/ready", operation_id="v2_server_ready", summary="Server ready (Open Inference Protocol)",
            description="200 once the models are loaded and warmed up (as /readyz), 503 before.",
            response_model=V2Ready, responses=error_responses(503))
async def server_ready(request: Request) -> V2Ready:
    deps.registry_of(request)  # 503 not_ready before start-up has finished
    return V2Ready(ready=True)


@router.get("", operation_id="v2_server_metadata", summary="Server metadata (Open Inference Protocol)",
            response_model=V2ServerMetadata, responses=error_responses(503))
async def server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(name=SERVER_NAME, version=API_VERSION, extensions=v2_protocol.EXTENSIONS)


def _metadata(request: Request, served: ServedModel) -> V2ModelMetadata:
    inputs, outputs = v2_protocol.tensor_metadata()
    versions = deps.registry_of(request).available().get(served.name) or [served.version]
    return V2ModelMetadata(name=served.name, versions=versions, platform=PLATFORM, inputs=inputs, outputs=outputs)


@router.get("/models/{model_name}", operation_id="v2_model_metadata", summary="Model metadata (Open Inference Protocol)",
            description="The model's input (`image`: BYTES, one encoded image file per element), its outputs, and "
            "the versions the model repository holds.",
            response_model=V2ModelMetadata, responses=error_responses(404, 503, descriptions=_MODEL_ERRORS))
async def model_metadata(request: Request, model_name: _MODEL_NAME, served: ServedV2) -> V2ModelMetadata:
    return _metadata(request, served)


@router.get("/models/{model_name}/versions/{model_version}", operation_id="v2_model_version_metadata",
            summary="Model version metadata (Open Inference Protocol)",
            response_model=V2ModelMetadata, responses=error_responses(404, 503, descriptions=_MODEL_ERRORS))
async def model_version_metadata(request: Request, model_name: _MODEL_NAME, model_version: _MODEL_VERSION,
                                 served: ServedV2) -> V2ModelMetadata:
    return _metadata(request, served)


@router.get("/models/{model_name}/ready", operation_id="v2_model_ready", summary="Model ready (Open Inference Protocol)",
            description="200 while the model is loaded and serving; 404 for one that is not.",
            response_model=V2ModelReady, responses=error_responses(404, 503, descriptions=_MODEL_ERRORS))
async def model_ready(model_name: _MODEL_NAME, served: ServedV2) -> V2ModelReady:
    return V2ModelReady(name=served.name, ready=True)


@router.get("/models/{model_name}/versions/{model_version}/ready", operation_id="v2_model_version_ready",
            summary="Model version ready (Open Inference Protocol)",
            response_model=V2ModelReady, responses=error_responses(404, 503, descriptions=_MODEL_ERRORS))
async def model_version_ready(model_name: _MODEL_NAME, model_version: _MODEL_VERSION, served: ServedV2) -> V2ModelReady:
    return V2ModelReady(name=served.name, ready=True)


# ---- infer -----------------------------------------------------------------------------------------


async def _prepare_all(request: Request, images: list[bytes], served: ServedModel) -> list[Prepared]:
    """Decode every image (the decoding pool); the first that cannot be used refuses the request."""
    metrics = service_state(request.app).metrics
    spec = served.engine.bundle.preprocessing
    loaded = await asyncio.gather(*(pipeline.load_bytes(request, data, spec) for data in images),
                                  return_exceptions=True)
    failed: list[tuple[int, ImageDecodeError]] = []
    for index, outcome in enumerate(loaded):
        if isinstance(outcome, ImageDecodeError):
            failed.append((index, outcome))
        elif isinstance(outcome, BaseException):
            raise outcome
    if failed:
        for _, exc in failed[1:]:
            metrics.image_error(exc.code)
        index, first = failed[0]
        error = pipeline.upload_error(first, metrics)
        others = f" ({len(failed) - 1} more of the {len(images)} images failed too)" if len(failed) > 1 else ""
        raise APIError(error.status_code, error.code,
                       f"input 'image' element {index}: {error.message}{others}; no image was captioned")
    return [p for p in loaded if isinstance(p, Prepared)]


def _tensors(names: list[str], results: list[ImageResult], items: list[list[CaptionItem]], num_captions: int,
             labels: int) -> list[OutputTensor]:
    n = len(results)

    def padded(rows: list[list[Any]], width: int, fill: Any) -> list[list[Any]]:
        return [(row + [fill] * width)[:width] for row in rows]

    values: dict[str, tuple[list[int], Any]] = {
        "caption": ([n], [c[0].text if c else "" for c in items]),
        "score": ([n], [c[0].score if c else 0.0 for c in items]),
        "confidence": ([n], [c[0].confidence if c else 0.0 for c in items]),
        "low_confidence": ([n], [c[0].low_confidence if c else False for c in items]),
        "captions": ([n, num_captions], padded([[x.text for x in c] for c in items], num_captions, "")),
        "scores": ([n, num_captions], padded([[x.score for x in c] for c in items], num_captions, 0.0)),
        "confidences": ([n, num_captions], padded([[x.confidence for x in c] for c in items], num_captions, 0.0)),
        "labels": ([n, labels], padded([[x.name for x in r.labels] for r in results], labels, "")),
        "label_ids": ([n, labels], padded([[x.class_id for x in r.labels] for r in results], labels, -1)),
        "label_probs": ([n, labels], padded([[x.probability for x in r.labels] for r in results], labels, 0.0)),
    }
    out = []
    for name in names:
        shape, data = values[name]
        out.append(OutputTensor(name, OUTPUTS[name].datatype, shape, np.asarray(data, dtype=object).reshape(shape)
                                if OUTPUTS[name].datatype == "BYTES" else np.asarray(data)))
    return out


async def _infer(request: Request, served: ServedModel) -> Response:
    service = service_state(request.app)
    settings, metrics = service.settings, service.metrics
    engine = served.engine
    body = await request.body()
    parsed = v2_protocol.parse_infer_request(body, request.headers.get(v2_protocol.HEADER_LENGTH),
                                             settings.max_batch_files)
    given = _parameters(parsed.parameters)
    config = deps.decoding_config(settings, engine, **{k: v for k, v in given.items() if k in _DECODING})
    asked_labels: Any = given.get("labels")  # None: not given, as /v1's query parameter
    asked_min_confidence: Any = given.get("min_confidence")
    labels = deps.labels_count(settings, engine, asked_labels)
    min_confidence = deps.min_confidence(settings, asked_min_confidence)
    num_captions = config.resolved(engine.bundle.max_length).num_captions
    if parsed.outputs is None:
        wanted = [(name, parsed.binary_default) for name in v2_protocol.default_outputs(num_captions, labels)]
    else:
        wanted = parsed.outputs

    prepared = await _prepare_all(request, parsed.images, served)
    results, _ = await pipeline.caption(request, [p.array for p in prepared], config, labels=labels)
    items = [[CaptionItem.of(c, min_confidence) for c in r.captions] for r in results]
    for per_image in items:
        for item in per_image:
            metrics.observe_caption(item.confidence, item.low_confidence)
    tensors = _tensors([name for name, _ in wanted], results, items, num_captions, labels)
    content, headers = v2_protocol.encode_response(served.name, served.version, parsed.id, tensors, dict(wanted))
    headers[deps.MODEL_VERSION_HEADER] = served.key
    return Response(content=content, headers=headers)


_INFER_ERRORS = {
    400: "The request cannot be used: not the protocol's JSON, an input other than one BYTES tensor `image` of "
    "shape [N] or [N, 1], data that is not base64, binary data that does not match binary_data_size, an unknown "
    "output, a parameter out of its bounds, more images than max_batch_files, or an image that is not a usable "
    f"image ({IMAGE_FORMATS}): the whole request is refused, naming the element.",
    404: "No loaded model has this name (or this version is not the active one): model_not_found.",
    413: "The body is over the limit (refused before it is read), or an image is over max_upload_bytes or "
    "max_image_pixels.",
    503: "The model's queue is full (overloaded, with Retry-After) or the service is not ready.",
    504: "The request did not finish within request_timeout_s.",
}
_INFER_DESCRIPTION = (
    "Caption the images of the BYTES input `image` (shape [N] or [N, 1]: one encoded image file per element, "
    f"{IMAGE_FORMATS}). JSON data is base64 strings; with the binary tensor data extension "
    "(`Inference-Header-Content-Length`, `parameters.binary_data_size`) each element is a 4-byte little-endian "
    "length and the file's bytes, after the JSON. Decoding settings are request `parameters`, as /v1's query "
    "parameters. Outputs: " + "; ".join(f"`{o.name}` ({o.datatype}) {o.description}" for o in OUTPUTS.values())
    + " `outputs` selects them (an unknown name: 400) and `parameters.binary_data` asks for binary data; without "
    "`outputs`: caption, score, confidence, low_confidence, and the n-best and labels when there are any. "
    "Errors are `{\"error\": \"<code>: <message>\"}`."
)


def _infer_openapi() -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": v2_protocol.request_body_schema(parameters_schema())}}}}


_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": V2InferResponse, "description": "The outputs: JSON, or (any output asked for in binary) "
          "`application/octet-stream` with the JSON's length in `Inference-Header-Content-Length`.",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(400, 404, 413, 503, 504, descriptions=_INFER_ERRORS),
}


@router.post("/models/{model_name}/infer", operation_id="v2_model_infer", summary="Infer (Open Inference Protocol)",
             description=_INFER_DESCRIPTION, response_model=V2InferResponse, responses=_INFER_RESPONSES,
             openapi_extra=_infer_openapi(), response_class=Response)
async def model_infer(request: Request, model_name: _MODEL_NAME, served: ServedV2) -> Response:
    return await _infer(request, served)


@router.post("/models/{model_name}/versions/{model_version}/infer", operation_id="v2_model_version_infer",
             summary="Infer with a model version (Open Inference Protocol)", description=_INFER_DESCRIPTION,
             response_model=V2InferResponse, responses=_INFER_RESPONSES, openapi_extra=_infer_openapi(),
             response_class=Response)
async def model_version_infer(request: Request, model_name: _MODEL_NAME, model_version: _MODEL_VERSION,
                              served: ServedV2) -> Response:
    return await _infer(request, served)
