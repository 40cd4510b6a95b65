"""The Open Inference Protocol's wire format (KServe "v2" REST, as Triton and KServe speak it), for the
`/v2` routes (app/api/routes/v2.py): reading an infer request's image tensor, writing the response's
tensors, and the protocol's error shape.

An infer request is a JSON object, optionally followed by binary tensor data (the `binary_tensor_data`
extension, what tritonclient sends by default):

    Inference-Header-Content-Length: <bytes of the JSON part>
    <JSON: {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [N], "parameters": {"binary_data_size": S}}]}>
    <S bytes: N elements, each a 4-byte little-endian length and then that many bytes (an encoded image)>

or, without the header, JSON only, the images in `data` as base64 strings (RFC 4648 standard alphabet,
padded; JSON strings cannot carry arbitrary bytes).

A response's outputs are JSON `data`, or binary after the JSON part (with the same header) for the
outputs asked for in binary: per output `parameters.binary_data`, else the request's
`parameters.binary_data_output`, else JSON.

Every error under /v2 is `{"error": "<code>: <message>"}` (V2ErrorMiddleware rewrites the service's
`{"error": {"code", "message", ...}}`, whoever answered: the API-key, overload and body-limit middleware
or a route), with the protocol's statuses: a bad request is 400 (the service's 409, 415 and 422).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import APIError
from app.observability.logs import service_log
from app.settings import Settings

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME = "image"
EXTENSIONS = ["binary_tensor_data", "parameters"]
PLATFORM = "captioner_onnxruntime"  # an encoder and a decoder step (ONNX) driven by the service's beam search
_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
# the service's statuses that the protocol answers as a bad request
_AS_BAD_REQUEST = frozenset({409, 415, 422})


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def infer_model(path: str) -> str | None:
    """`name` or `name:version` of a /v2 infer path, None for any other path."""
    match = _INFER_PATH.match(path)
    if match is None:
        return None
    name, version = match.groups()
    return f"{name}:{version}" if version else name


def body_limit(settings: Settings) -> int:
    """Largest /v2 request body: `max_batch_files` images of `max_upload_bytes`, base64 in JSON (4/3) with
    its framing (each image is still held to max_upload_bytes once decoded)."""
    return settings.body_limit(settings.max_batch_files) * 4 // 3 + 64 * 1024


def bad_request(message: str) -> APIError:
    return APIError(400, "bad_request", message)


# ---- outputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputSpec:
    name: str
    datatype: str  # BYTES, FP32, INT32, BOOL
    rank: int  # 1: [N]; 2: [N, K] (K: num_captions or labels)
    description: str


OUTPUTS: dict[str, OutputSpec] = {spec.name: spec for spec in (
    OutputSpec("caption", "BYTES", 1, "The best caption of each image (UTF-8)."),
    OutputSpec("score", "FP32", 1, "The best caption's score: the sum of its tokens' log-probabilities, <end> included."),
    OutputSpec("confidence", "FP32", 1, "The best caption's confidence, 0-1 (docs/confidence.md)."),
    OutputSpec("low_confidence", "BOOL", 1, "The best caption's confidence is below min_confidence."),
    OutputSpec("captions", "BYTES", 2, "The n-best captions of each image, best first: [N, num_captions]."),
    OutputSpec("scores", "FP32", 2, "The n-best captions' scores: [N, num_captions]."),
    OutputSpec("confidences", "FP32", 2, "The n-best captions' confidences: [N, num_captions]."),
    OutputSpec("labels", "BYTES", 2, "Each image's best ImageNet-1k class names, best first: [N, labels]."),
    OutputSpec("label_ids", "INT32", 2, "Their ImageNet-1k class ids: [N, labels]."),
    OutputSpec("label_probs", "FP32", 2, "Their probabilities: [N, labels]."),
)}


def default_outputs(num_captions: int, labels: int) -> list[str]:
    """The outputs answered when a request names none: the best caption's, the n-best when asked for more
    than one caption, the labels when there are any."""
    names = ["caption", "score", "confidence", "low_confidence"]
    if num_captions > 1:
        names += ["captions", "scores", "confidences"]
    if labels > 0:
        names += ["labels", "label_ids", "label_probs"]
    return names


def encode_tensor(datatype: str, values: np.ndarray | Sequence[Any], binary: bool) -> bytes | list[Any]:
    """A tensor's elements (row-major, flattened) as binary tensor data or as JSON `data`."""
    flat = list(np.asarray(values, dtype=object).reshape(-1)) if datatype == "BYTES" else np.asarray(values).reshape(-1)
    if datatype == "BYTES":
        encoded = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in flat]
        if binary:
            return b"".join(struct.pack("<I", len(v)) + v for v in encoded)
        return [v.decode("utf-8") for v in encoded]
    dtype = {"FP32": "<f4", "INT32": "<i4", "BOOL": "?"}[datatype]
    array = np.asarray(flat, dtype=dtype)
    if binary:
        return array.tobytes()
    return [bool(v) for v in array] if datatype == "BOOL" else array.tolist()


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[Any]


def encode_response(model_name: str, model_version: str, request_id: str | None, outputs: list[OutputTensor],
                    binary: dict[str, bool]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON only, or JSON and then the binary outputs in order."""
    head: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        head["id"] = request_id
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        data = encode_tensor(tensor.datatype, tensor.values, binary[tensor.name])
        if isinstance(data, bytes):
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = data
        entries.append(entry)
    head["outputs"] = entries
    text = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(text))}


# ---- the request --------------------------------------------------------------------------------


@dataclass
class InferRequest:
    """What an infer request asks: its images (encoded bytes, in order), its parameters, its outputs
    (None: the defaults) with whether each is wanted in binary."""

    id: str | None
    images: list[bytes]
    parameters: dict[str, Any]
    outputs: list[tuple[str, bool]] | None
    binary_default: bool


def _split_elements(raw: bytes, count: int) -> list[bytes]:
    """BYTES binary tensor data: `count` elements, each a 4-byte little-endian length and its bytes."""
    elements: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad_request(f"input {INPUT_NAME!r}: binary data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise bad_request(f"input {INPUT_NAME!r}: element {len(elements)} claims {size} bytes; only "
                              f"{len(raw) - pos} are left in its binary_data_size")
        elements.append(raw[pos:pos + size])
        pos += size
    if len(elements) != count:
        raise bad_request(f"input {INPUT_NAME!r}: shape says {count} elements, its binary data holds {len(elements)}")
    return elements


def _json_elements(data: Any, shape: list[int]) -> list[bytes]:
    """JSON `data` of a BYTES tensor: base64 strings, flat or nested as the shape."""
    if not isinstance(data, list):
        raise bad_request(f"input {INPUT_NAME!r}: data must be a list of base64 strings")
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list) and len(shape) == 2:
            flat.extend(item)
        else:
            flat.append(item)
    count = shape[0] * (shape[1] if len(shape) == 2 else 1)
    if len(flat) != count:
        raise bad_request(f"input {INPUT_NAME!r}: shape says {count} elements, data holds {len(flat)}")
    images: list[bytes] = []
    for index, item in enumerate(flat):
        if not isinstance(item, str):
            raise bad_request(f"input {INPUT_NAME!r}: element {index} is not a string (BYTES elements in JSON are "
                              "base64 strings of the image files)")
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise bad_request(f"input {INPUT_NAME!r}: element {index} is not valid base64 (RFC 4648, standard "
                              "alphabet, padded)") from None
    return images


def _bool_parameter(parameters: Any, key: str, where: str) -> bool | None:
    if not isinstance(parameters, dict) or key not in parameters:
        return None
    value = parameters[key]
    if not isinstance(value, bool):
        raise bad_request(f"{where} parameter {key!r} must be true or false")
    return value


def parse_infer_request(body: bytes, header_length: str | None, max_images: int) -> InferRequest:
    """Read an infer request (JSON, or JSON and binary tensor data). Raises APIError 400 (bad_request)
    for anything it cannot use, or 422 too_many_files past `max_images`."""
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise bad_request(f"{HEADER_LENGTH} must be a whole number of bytes") from None
        if not 0 < json_size <= len(body):
            raise bad_request(f"{HEADER_LENGTH} ({json_size}) must be within the body's {len(body)} bytes")
    else:
        json_size = len(body)
    try:
        head = json.loads(body[:json_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the inference request's JSON cannot be parsed ({exc})") from None
    if not isinstance(head, dict):
        raise bad_request("the inference request must be a JSON object")
    request_id = head.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("id must be a string")
    parameters = head.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request("parameters must be an object")
    binary_default = _bool_parameter(parameters, "binary_data_output", "request") or False

    inputs = head.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_request(f"inputs must hold exactly one tensor, {INPUT_NAME!r} (BYTES, shape [N] or [N, 1])")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise bad_request(f"unknown input {tensor.get('name')!r}: the model's only input is {INPUT_NAME!r}")
    if tensor.get("datatype") != "BYTES":
        raise bad_request(f"input {INPUT_NAME!r} must be BYTES (encoded image files), not {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1):
        raise bad_request(f"input {INPUT_NAME!r}: shape must be [N] or [N, 1] with N >= 1, not {shape!r}")
    count = shape[0]
    if count > max_images:
        raise APIError(422, "too_many_files", f"{count} images sent; the limit is {max_images} per request "
                       "(max_batch_files)")
    tensor_parameters = tensor.get("parameters") or {}
    if not isinstance(tensor_parameters, dict):
        raise bad_request(f"input {INPUT_NAME!r}: parameters must be an object")
    size = tensor_parameters.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise bad_request(f"input {INPUT_NAME!r} has both data and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise bad_request(f"input {INPUT_NAME!r}: binary_data_size must be a whole number of bytes")
        if json_size + size != len(body):
            raise bad_request(f"input {INPUT_NAME!r}: binary_data_size ({size}) does not match the "
                              f"{len(body) - json_size} bytes after the JSON ({HEADER_LENGTH})")
        images = _split_elements(body[json_size:], count)
    else:
        if json_size != len(body):
            raise bad_request(f"{len(body) - json_size} bytes follow the JSON but no input has binary_data_size")
        content_type = tensor_parameters.get("content_type")
        if content_type not in (None, "base64"):
            raise bad_request(f"input {INPUT_NAME!r}: content_type {content_type!r} is not supported; JSON data is "
                              "base64 (content_type 'base64' or none)")
        if "data" not in tensor:
            raise bad_request(f"input {INPUT_NAME!r} has neither data nor parameters.binary_data_size")
        images = _json_elements(tensor["data"], shape)

    outputs: list[tuple[str, bool]] | None = None
    requested = head.get("outputs")
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
            raise bad_request("outputs must be a list of {\"name\": ...} objects")
        outputs = []
        for item in requested:
            name = item.get("name")
            if name not in OUTPUTS:
                raise bad_request(f"unknown output {name!r}; the model's outputs: {', '.join(OUTPUTS)}")
            if any(name == seen for seen, _ in outputs):
                raise bad_request(f"output {name!r} is asked for twice")
            binary = _bool_parameter(item.get("parameters"), "binary_data", f"output {name!r}")
            outputs.append((name, binary_default if binary is None else binary))
    return InferRequest(request_id, images, parameters, outputs, binary_default)


# ---- errors -------------------------------------------------------------------------------------


def v2_error_body(status: int, body: bytes) -> tuple[int, bytes]:
    """The service's error answer as the protocol's: (status, `{"error": "<code>: <message>"}`)."""
    message = ""
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
        message = f"{error.get('code', 'error')}: {error.get('message', '')}"
    elif isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        message = parsed["error"]
    else:
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return (400 if status in _AS_BAD_REQUEST else status), json.dumps({"error": message}).encode()


class V2ErrorMiddleware:
    """Under /v2, every 4xx and 5xx answer in the protocol's shape (`v2_error_body`), headers kept
    (Retry-After, X-Request-ID, the rate-limit headers); an unexpected fault is answered a 500 of that
    shape too, then re-raised for RequestContextMiddleware's log."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_v2_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        chunks: list[bytes] = []
        started = False

        async def v2_send(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = True
                if int(message["status"]) >= 400:
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                status, body = v2_error_body(int(held["status"]), b"".join(chunks))
                headers = [(k, v) for k, v in held.get("headers", ())
                           if k.lower() not in (b"content-length", b"content-type")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**held, "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        try:
            await self.app(scope, receive, v2_send)
        except Exception:
            if not started:
                body = json.dumps({"error": "internal_error: internal server error"}).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            else:
                service_log.warning("a /v2 answer failed after it started")
            raise


# ---- documents (the OpenAPI schema's) -----------------------------------------------------------


class V2Error(BaseModel):
    """The Open Inference Protocol's error answer."""

    error: str = Field(description="`<code>: <message>`, the code as in the /v1 errors (e.g. `model_not_found`, "
                       "`corrupt_image`, `overloaded`).", examples=["model_not_found: model 'x' is not loaded"])


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(description="BYTES, FP32, INT32 or BOOL.")
    shape: list[int] = Field(description="-1: any size (the batch; num_captions; labels).")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="The versions the model repository holds for this name.")
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` for an output sent as binary "
                                              "data after the JSON.")
    data: list[Any] | None = Field(None, description="The elements, row-major (JSON outputs).")


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2OutputTensor]


def tensor_metadata() -> tuple[list[V2TensorMetadata], list[V2TensorMetadata]]:
    inputs = [V2TensorMetadata(name=INPUT_NAME, datatype="BYTES", shape=[-1])]
    outputs = [V2TensorMetadata(name=o.name, datatype=o.datatype, shape=[-1] * o.rank) for o in OUTPUTS.values()]
    return inputs, outputs


def request_body_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of an infer request (the binary form is the same JSON, then the binary data); `fix_openapi`
    bounds the images by max_batch_files."""
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "maxLength": 128},
            "parameters": {
                "type": "object",
                "description": "Decoding settings, as /v1's query parameters (the same names and bounds), and "
                "`binary_data_output` (answer every output as binary data). Other keys are ignored.",
                "properties": {**parameters, "binary_data_output": {"type": "boolean"}},
            },
            "inputs": {
                "type": "array", "minItems": 1, "maxItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "datatype", "shape", "data"],
                    "additionalProperties": False,
                    "properties": {
                        "parameters": {"type": "object", "additionalProperties": False,
                                       "properties": {"content_type": {"type": "string", "enum": ["base64"]}}},
                        "name": {"type": "string", "enum": [INPUT_NAME]},
                        "datatype": {"type": "string", "enum": ["BYTES"]},
                        "shape": {"type": "array", "minItems": 1, "maxItems": 1,
                                  "items": {"type": "integer", "minimum": 1}},
                        "data": {"type": "array", "minItems": 1,
                                 "items": {"type": "string", "format": "byte"},
                                 "description": "The image files, base64 (as many as shape[0])."},
                    },
                },
            },
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "enum": list(OUTPUTS)},
                        "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                    },
                },
            },
        },
    }


def fix_openapi(schema: dict[str, Any], max_images: int) -> dict[str, Any]:
    """The /v2 operations' errors are V2Error (`{"error": "..."}`), the service's 422 is the protocol's 400
    there, and an infer request carries 1..max_images images."""
    v2_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/V2Error"}}}
    for path, item in schema.get("paths", {}).items():
        if not is_v2_path(path):
            continue
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                tensor = body["properties"]["inputs"]["items"]["properties"]
                tensor["shape"]["items"]["maximum"] = max_images
                tensor["data"]["maxItems"] = max_images
            responses = operation.get("responses", {})
            if "422" in responses:
                responses.setdefault("400", responses.pop("422"))
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = v2_ref
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["V2Error"] = V2Error.model_json_schema()
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 bodies, which only /v2 had asked for
        others = {name: body for name, body in components.items() if name != unused}
        if f"#/components/schemas/{unused}\"" not in json.dumps([schema.get("paths", {}), others]):
            components.pop(unused, None)
    return schema
