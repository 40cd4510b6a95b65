"""How a request flows, from the upload to the engine's captions, for every captioning route.

    route (app/api/routes/)  ->  read_upload -> prepare (decode, resize, normalise: on the event loop for a
                                 small sequential JPEG, else in a decoding thread; load_bytes decides)
                         ->  caption (app/serving/batcher.py -> app/inference/engine.py -> app/inference/decoding.py)

Each step maps its own failures to the API's errors, so the routes only shape answers:
an upload that is not a usable image is an `ImageDecodeError` (`upload_error` gives its status and
counts it in the metrics); the batcher's refusals become 422 / 503 / 504 / 499 in `caption`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from fastapi import Request, UploadFile
from PIL import Image
from starlette.formparsers import MultiPartParser

from app.api.errors import APIError
from app.api.state import service_state
from app.inference.bundle import Preprocessing
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine, ImageResult
from app.inference.preprocess import ImageDecodeError, decode_image, draft_size, sequential_jpeg_pixels, to_array
from app.observability import tracing
from app.observability.metrics import Metrics
from app.serving.batcher import ClientGone, DeadlineExceeded, Overloaded, TooLarge
from app.serving.registry import ServedModel
from app.settings import Settings

# Uploads never touch the disk: Starlette spools a file part over 1 MB to a temporary file, but the
# body limit (app/api/middleware.py) already bounds every request, so keep each part in memory.
MultiPartParser.spool_max_size = 1 << 62

IMAGE_FORMATS = "JPEG, PNG, GIF (first frame), WebP, BMP or TIFF"

# ImageDecodeError.code -> HTTP status (file_too_large is answered as payload_too_large, 413)
DECODE_STATUS = {
    "unsupported_media_type": 415,
    "corrupt_image": 422,
    "image_too_large": 413,
    "empty_file": 422,
    "file_too_large": 413,
}


@dataclass
class Prepared:
    """One upload, ready for the encoder, with the time each half took."""

    array: np.ndarray
    decode_s: float
    preprocess_s: float
    image: Image.Image | None = None  # the upright RGB image, when asked for (the attention picture)


def not_ready() -> APIError:
    """503 `not_ready`: start-up has not finished loading and warming up the model."""
    return APIError(503, "not_ready", "the model is not loaded and warmed up yet; retry shortly",
                    headers={"Retry-After": "1"})


def require_attention(engine: Engine) -> None:
    """409 `attention_unavailable` unless the engine's model produces attention weights."""
    if not engine.has_attention:
        raise APIError(409, "attention_unavailable",
                       f"the model {engine.bundle.name} has no attention (a Show-and-Tell decoder): there are no "
                       "attention weights to show")


def require_labels(engine: Engine) -> None:
    """409 `labels_unavailable` unless the bundle has the encoder's ImageNet head."""
    if not engine.has_labels:
        raise APIError(409, "labels_unavailable",
                       f"the model {engine.bundle.name} has no ImageNet labels (its bundle has no labels.json); "
                       "ask with labels=0, or serve a bundle exported with labels")


def prepare(data: bytes, max_pixels: int, spec: Preprocessing, keep_image: bool = False) -> Prepared:
    """Bytes -> encoder input (runs in a worker thread). Raises ImageDecodeError."""
    t0 = time.perf_counter()
    img = decode_image(data, max_pixels, draft_size(spec))
    t1 = time.perf_counter()
    array = to_array(img, spec)
    return Prepared(array, t1 - t0, time.perf_counter() - t1, img if keep_image else None)


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    """The upload's bytes; ImageDecodeError `file_too_large` past `max_upload_bytes`."""
    limit = settings.max_upload_bytes
    if upload.size is not None and upload.size > limit:
        raise ImageDecodeError("file_too_large", f"the file is {upload.size} bytes; the limit is {limit}")
    data = await upload.read()
    if len(data) > limit:
        raise ImageDecodeError("file_too_large", f"the file is {len(data)} bytes; the limit is {limit}")
    return data


async def load_upload(request: Request, upload: UploadFile, spec: Preprocessing, keep_image: bool = False) -> Prepared:
    """Read one upload and prepare it in the service's image-decoding pool. Raises ImageDecodeError."""
    data = await read_upload(upload, service_state(request.app).settings)
    return await load_bytes(request, data, spec, keep_image)


async def load_bytes(request: Request, data: bytes, spec: Preprocessing, keep_image: bool = False) -> Prepared:
    """One image's bytes (an upload's, or an element of a /v2 BYTES tensor) prepared: a sequential JPEG of at
    most `inline_decode_pixels` on the event loop, anything else in the service's image-decoding pool. Raises
    ImageDecodeError (`file_too_large` past `max_upload_bytes`)."""
    service = service_state(request.app)
    settings = service.settings
    if len(data) > settings.max_upload_bytes:
        raise ImageDecodeError("file_too_large", f"the file is {len(data)} bytes; the limit is {settings.max_upload_bytes}")
    pixels = sequential_jpeg_pixels(data) if settings.inline_decode_pixels else None
    # a small sequential JPEG costs about 1.5 ms here, less CPU than the hand-over to a decoding thread and back
    # (docs/performance.md, section 12); anything else could hold the event loop, so it goes to the threads
    inline = pixels is not None and pixels <= settings.inline_decode_pixels
    with tracing.span("preprocess", **{"captioner.upload.bytes": len(data), "captioner.preprocess.inline": inline}):
        if inline:
            return prepare(data, settings.max_image_pixels, spec, keep_image)
        return await asyncio.get_running_loop().run_in_executor(
            service.preprocess_executor, prepare, data, settings.max_image_pixels, spec, keep_image)


def upload_error(exc: ImageDecodeError, metrics: Metrics) -> APIError:
    """The API error for an upload that cannot be used (counted in the metrics by its code)."""
    metrics.image_error(exc.code)
    code = "payload_too_large" if exc.code == "file_too_large" else exc.code
    return APIError(DECODE_STATUS.get(exc.code, 422), code, exc.message)


async def load_one(request: Request, upload: UploadFile, spec: Preprocessing, metrics: Metrics,
                   keep_image: bool = False) -> Prepared:
    """`load_upload` for a one-image route: an unusable upload is the request's error."""
    try:
        return await load_upload(request, upload, spec, keep_image)
    except ImageDecodeError as exc:
        raise upload_error(exc, metrics) from None


async def caption(request: Request, arrays: list[np.ndarray], config: DecodingConfig,
                  attention: bool = False, labels: int = 0) -> tuple[list[ImageResult], float]:
    """Caption the arrays through the dynamic batcher; returns (per image its captions and labels,
    seconds from submission to result). `attention=True` keeps each caption's attention weights
    (attention bundles only); `labels`: each image's best ImageNet labels (bundles with labels).
    Too many images for the queue: 422; queue full: 503 with Retry-After; past the request's
    deadline: 504; the client hung up: 499."""
    service = service_state(request.app)
    settings = service.settings
    start = getattr(request.state, "start_time", None) or time.perf_counter()
    submitted = time.perf_counter()
    # the model the request picked (app/api/routes/deps.py get_served), else the default
    served: ServedModel | None = getattr(request.state, "served", None) or service.default_model
    if served is None or served.batcher is None:
        raise not_ready()
    try:
        result = await served.batcher.submit(
            arrays, config, attention=attention, deadline=start + settings.request_timeout_s,
            disconnected=lambda: until_disconnected(request), labels=labels,
        )
    except TooLarge as exc:
        raise APIError(422, "too_many_files", exc.message + " (max_queue_images)") from None
    except Overloaded as exc:
        raise APIError(503, "overloaded", exc.message, headers={"Retry-After": str(exc.retry_after)}) from None
    except DeadlineExceeded:
        raise APIError(504, "deadline_exceeded",
                       f"the request did not finish within request_timeout_s ({settings.request_timeout_s:g} s)") from None
    except ClientGone:
        raise APIError(499, "client_closed_request", "the client disconnected before the captions were ready") from None
    return result.results, time.perf_counter() - submitted


async def until_disconnected(request: Request) -> bool:
    """Wait until the client hangs up (True). The body has been read by now, so the server's next message is
    `http.disconnect`: one wait instead of polling `Request.is_disconnected` every 50 ms per request in the queue
    (each poll an AnyIO cancel scope: docs/performance.md, "The front end"). The batcher cancels the wait
    once the captions are ready."""
    while (await request.receive())["type"] != "http.disconnect":
        pass  # a body chunk nobody reads any more
    return True


def elapsed_ms(request: Request) -> float:
    """Milliseconds since the request arrived (app/api/middleware.py stamps it)."""
    start = getattr(request.state, "start_time", None)
    return round((time.perf_counter() - start) * 1000.0, 3) if start else 0.0
