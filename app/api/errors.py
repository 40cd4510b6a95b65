"""One JSON error shape for every 4xx and 5xx answer.

    {"error": {"code": "corrupt_image", "message": "…", "request_id": "…", "details": [...]}}

`install_error_handlers(app)` routes request-validation errors, HTTPExceptions (404, 405, …), the
service's own `APIError`s and unexpected exceptions (500, no stack trace or path in the body) into
that shape. `ErrorResponse` is the pydantic model the OpenAPI documents on every route
(`error_responses(...)`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Send

log = logging.getLogger("captioner.errors")

REQUEST_ID_HEADER = "X-Request-ID"
# Methods whose requests carry a body: BodyLimitMiddleware (app/api/middleware.py) counts it; a refusal
# before reading it closes the connection (the middleware's and app/api/auth.py's).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


# ---- the shape --------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """One validation problem: where it is and what is wrong."""

    loc: list[str | int] = Field(description="Where the problem is, e.g. ['query', 'beam_size'].")
    msg: str = Field(description="What is wrong.")
    type: str = Field(description="Machine-readable kind of problem.")


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "code": "corrupt_image",
                "message": "the image data is truncated or corrupt (OSError)",
                "request_id": "9f1c2b7e4d6a4e0f8a1b2c3d4e5f6a7b",
            }
        }
    )

    code: str = Field(
        description="Machine-readable error code: validation_error, invalid_parameter, missing_field, "
        "empty_file, too_many_files, unsupported_media_type, corrupt_image, image_too_large, "
        "payload_too_large, not_found, method_not_allowed, unauthorized, rate_limited, not_ready, internal_error, "
        "model_not_found, bundle_refused, load_in_progress, no_previous_version, admin_disabled, unknown_word, "
        "guide_unavailable, ...",
        examples=["corrupt_image"],
    )
    message: str = Field(description="Human-readable explanation.")
    request_id: str = Field(description="The request's id (also in the X-Request-ID header and the logs).")
    details: list[ErrorDetail] | None = Field(None, description="Per-field problems, for validation errors.")


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer of this service has this shape."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "error": {
                    "code": "unsupported_media_type",
                    "message": "the upload is not an image in a supported format",
                    "request_id": "9f1c2b7e4d6a4e0f8a1b2c3d4e5f6a7b",
                }
            }
        }
    )

    error: ErrorBody


# ---- raising ----------------------------------------------------------------------------------


class APIError(Exception):
    """An error the service answers deliberately, with its status and code."""

    def __init__(self, status_code: int, code: str, message: str, details: list[dict] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


class PayloadTooLarge(StarletteHTTPException):
    """Raised by the body-size limiter while the body streams in (an HTTPException, so that
    FastAPI's body parsing passes it through instead of turning it into a 400)."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(status_code=413, detail=f"the request body exceeds the limit of {limit} bytes")


class BodyRefused(StarletteHTTPException):
    """Raised while the body streams in (app/api/bodies.py): 503 `overloaded` (the bytes of bodies in flight),
    408 `request_timeout` (the body is late) or 400 `bad_request` (a multipart body without its closing
    boundary). An HTTPException for the same reason as PayloadTooLarge; the answer closes the connection
    (unless `close=False`)."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None,
                 close: bool = True):
        self.code = code
        headers = {**(headers or {}), "Connection": "close"} if close else headers
        super().__init__(status_code=status_code, detail=message, headers=headers)


# status -> code for HTTPExceptions raised by Starlette/FastAPI themselves
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "not_ready",
}

_DESCRIPTIONS = {
    400: "The request body cannot be parsed (malformed multipart/form-data).",
    404: "No such resource.",
    405: "Method not allowed.",
    413: "The request body or the image is too large (the body is refused without reading it all; "
    "an image with too many pixels is refused from its header, before decoding).",
    415: "The upload is not an image, or not in a supported format.",
    422: "Invalid request: missing field, empty file, too many files, bad parameter value, or a truncated "
    "or corrupt image.",
    500: "Internal server error (a fault of the server; the body carries no internals).",
    503: "The model is not loaded and warmed up yet, the queue is full, or the service is shutting down; "
    "retry after the Retry-After header's seconds.",
    504: "The request did not finish within the service's request_timeout_s.",
}


class TrackedSend:
    """`send` for an inner app, remembering whether the response has started: a middleware can answer an
    error of its own only while it has not."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if not rid:
        rid = new_request_id()
        request.state.request_id = rid
    return rid


def error_payload(code: str, message: str, request_id: str, details: list[dict] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if details:
        body["details"] = details
    return {"error": body}


def error_json(status_code: int, code: str, message: str, request_id: str,
               details: list[dict] | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    merged = {REQUEST_ID_HEADER: request_id, **(headers or {})}
    return JSONResponse(error_payload(code, message, request_id, details), status_code=status_code, headers=merged)


def error_responses(*statuses: int, descriptions: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries documenting the error shape for the given statuses (500 always added)."""
    descriptions = descriptions or {}
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*statuses, 500}):
        out[status] = {
            "model": ErrorResponse,
            "description": descriptions.get(status, _DESCRIPTIONS.get(status, "Error.")),
        }
    return out


# ---- handlers ---------------------------------------------------------------------------------


def _jsonable_loc(loc: Iterable[Any]) -> list[str | int]:
    return [part if isinstance(part, int) else str(part) for part in loc]


MODEL_SYNTAX = ("name or name:version (each 1-128 letters, digits and . _ + -, starting with a letter "
                "or a digit)")


def _client_message(loc: list[str | int], kind: str, msg: str) -> str:
    """What the client did wrong, in its terms: no pydantic internals (class names, `Value error, `)."""
    field = next((str(p) for p in loc[1:] if isinstance(p, str)), "")
    if "UploadFile" in msg:  # a text field where a file belongs
        return "expected a file upload (a multipart part with a filename), got a text field"
    if kind == "missing" and loc[:1] == ["body"]:
        return f"the multipart field '{field}' (an image file) is missing"
    if kind == "string_pattern_mismatch":
        return f"expected {MODEL_SYNTAX}" if field == "model" else "does not have the expected form"
    return msg.removeprefix("Value error, ")


def validation_details(errors: Iterable[dict]) -> list[dict]:
    """The problems, each once (a query parameter read by several dependencies is reported by each),
    in the client's terms."""
    details: list[dict] = []
    for e in errors:
        loc = _jsonable_loc(e.get("loc", ()))
        kind = str(e.get("type", ""))
        detail = {"loc": loc, "msg": _client_message(loc, kind, str(e.get("msg", ""))), "type": kind}
        if detail not in details:
            details.append(detail)
    return details


def _summarize(details: list[dict]) -> str:
    parts = []
    for d in details[:5]:
        where = ".".join(str(p) for p in d["loc"] if p != "body") or "request"
        parts.append(f"{where}: {d['msg']}")
    more = f" (+{len(details) - 5} more)" if len(details) > 5 else ""
    return "; ".join(parts) + more if parts else "invalid request"


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = validation_details(exc.errors())
    missing_body = [d for d in details if d["type"] == "missing" and d["loc"][:1] == ["body"]]
    code = "missing_field" if missing_body and len(missing_body) == len(details) else "validation_error"
    return error_json(422, code, _summarize(details), request_id_of(request), details)


async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_json(exc.status_code, exc.code, exc.message, request_id_of(request), exc.details, exc.headers)


async def _http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    cause = exc.__cause__
    if isinstance(cause, PayloadTooLarge):  # an older FastAPI wraps body errors into a 400
        exc, status = cause, 413
    if status < 400:
        status = 500
    code = getattr(exc, "code", None) or _HTTP_CODES.get(status, "http_error" if status < 500 else "internal_error")
    detail = exc.detail
    message = detail if isinstance(detail, str) else (_DESCRIPTIONS.get(status) or "error")
    if status == 400 and message == "There was an error parsing the body":
        message = "the request body cannot be parsed (expected multipart/form-data)"
    headers = dict(getattr(exc, "headers", None) or {})
    return error_json(status, code, message, request_id_of(request), headers=headers)


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    # Runs in Starlette's ServerErrorMiddleware; the traceback goes to the server log only.
    rid = request_id_of(request)
    log.error("unhandled %s in %s %s (request %s)", type(exc).__name__, request.method,
              request.url.path, rid, exc_info=exc)
    return error_json(500, "internal_error", "internal server error", rid)


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types a handler as taking any Exception; each of these takes the class it is registered for.
    app.add_exception_handler(RequestValidationError, _validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(APIError, _api_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_handler)
