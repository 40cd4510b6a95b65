"""Captioning: one image, or a batch of images in one engine call."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from starlette.formparsers import MultiPartParser

from app.attention import attention_map, require_attention
from app.batcher import ClientGone, DeadlineExceeded, Overloaded, TooLarge
from app.decoding import MAX_BEAM_SIZE, MAX_LENGTH_LIMIT, DecodingConfig
from app.errors import APIError, error_responses, request_id_of
from app.preprocess import ImageDecodeError, decode_image, draft_size, to_array
from app.routes import EngineDep, MetricsDep, SettingsDep
from app.routes.model import decoding_settings
from app.schemas import (
    BatchItem,
    BatchItemError,
    BatchResponse,
    CaptionItem,
    CaptionResponse,
    ModelRef,
    Timings,
)
from app.settings import Settings

router = APIRouter(prefix="/v1", tags=["captions"])

# Uploads never touch the disk: Starlette spools a file part over 1 MB to a temporary file, but the
# body limit (BodyLimitMiddleware) already bounds every request, so keep each part in memory.
MultiPartParser.spool_max_size = 1 << 62

# ImageDecodeError.code -> HTTP status
DECODE_STATUS = {
    "unsupported_media_type": 415,
    "corrupt_image": 422,
    "image_too_large": 413,
    "empty_file": 422,
}

IMAGE_FORMATS = "JPEG, PNG, GIF (first frame), WebP, BMP or TIFF"


# ---- decoding parameters, validated once at the edge -----------------------------------------


def decoding_config(
    settings: SettingsDep,
    engine: EngineDep,
    strategy: Annotated[
        Literal["greedy", "beam"],
        Query(description="Decoding strategy; greedy is beam search with one beam. Default: the service's "
              "default_strategy (beam)."),
    ] = None,
    beam_size: Annotated[
        int,
        Query(ge=1, le=MAX_BEAM_SIZE, description="Beams per image (ignored by greedy). Default: the service's "
              "default_beam_size (3), widened to num_captions if that is larger."),
    ] = None,
    num_captions: Annotated[
        int, Query(ge=1, le=MAX_BEAM_SIZE, description="How many captions to return, best first; at most beam_size.")
    ] = None,
    max_length: Annotated[
        int, Query(ge=1, le=MAX_LENGTH_LIMIT, description="Most words per caption. Default: the model's max_length.")
    ] = None,
    length_penalty: Annotated[
        float, Query(ge=0.0, le=5.0, description="Ranking divides the score by length ** length_penalty. Default: the service's default_length_penalty, else the model's recommendation.")
    ] = None,
    no_repeat_ngram_size: Annotated[
        int, Query(ge=0, le=10, description="Never repeat an n-gram of this size (0 = off). Default: the service's "
                   "default_no_repeat_ngram_size, else the model's recommendation.")
    ] = None,
) -> DecodingConfig:
    try:
        return settings.decoding_defaults(engine.bundle.recommended_decoding).with_overrides(
            strategy=strategy, beam_size=beam_size, num_captions=num_captions, max_length=max_length,
            length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        )
    except (ValueError, TypeError) as exc:
        raise APIError(422, "invalid_parameter", str(exc)) from None


# ---- the work -----------------------------------------------------------------------------------


def _prepare(data: bytes, max_pixels: int, spec) -> tuple[np.ndarray, float, float]:
    """Bytes -> encoder input, with the time of each half (runs in a worker thread)."""
    t0 = time.perf_counter()
    img = decode_image(data, max_pixels, draft_size(spec))
    t1 = time.perf_counter()
    array = to_array(img, spec)
    return array, t1 - t0, time.perf_counter() - t1


async def _read_upload(upload: UploadFile, settings: Settings) -> bytes:
    size = upload.size
    if size is not None and size > settings.max_upload_bytes:
        raise ImageDecodeError(
            "file_too_large", f"the file is {size} bytes; the limit is {settings.max_upload_bytes}"
        )
    data = await upload.read()
    if len(data) > settings.max_upload_bytes:
        raise ImageDecodeError(
            "file_too_large", f"the file is {len(data)} bytes; the limit is {settings.max_upload_bytes}"
        )
    return data


def upload_error(exc: ImageDecodeError, metrics) -> APIError:
    """The API error for an upload that cannot be used (counted in the metrics by its code)."""
    metrics.image_error(exc.code)
    if exc.code == "file_too_large":
        return APIError(413, "payload_too_large", exc.message)
    return APIError(DECODE_STATUS.get(exc.code, 422), exc.code, exc.message)


def run_preprocess(request: Request, fn, *args):
    """Run `fn(*args)` in the service's image-decoding pool."""
    return asyncio.get_running_loop().run_in_executor(request.app.state.preprocess_executor, fn, *args)


async def _load_one(request: Request, upload: UploadFile, settings: Settings, spec) -> tuple[np.ndarray, float, float]:
    data = await _read_upload(upload, settings)
    return await run_preprocess(request, _prepare, data, settings.max_image_pixels, spec)


async def _infer(request: Request, arrays: list[np.ndarray], config: DecodingConfig, attention: bool = False):
    """Caption the arrays through the dynamic batcher (app/batcher.py); returns (captions, seconds
    from submission to result). `attention=True` keeps each caption's attention weights (attention
    bundles only). Queue full: 503 with Retry-After; past the request's deadline: 504."""
    settings: Settings = request.app.state.settings
    start = getattr(request.state, "start_time", None) or time.perf_counter()
    submitted = time.perf_counter()
    try:
        result = await request.app.state.batcher.submit(
            arrays, config, attention=attention, deadline=start + settings.request_timeout_s,
            disconnected=request.is_disconnected,
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
    return result.captions, time.perf_counter() - submitted


def _finite(x: float) -> float:
    x = float(x)
    return x if math.isfinite(x) else -1e30


def _items(captions) -> list[CaptionItem]:
    return [
        CaptionItem(text=c.text, score=_finite(c.score), normalized_score=_finite(c.normalized_score),
                    tokens=list(c.tokens))
        for c in captions
    ]


def _elapsed_ms(request: Request) -> float:
    start = getattr(request.state, "start_time", None)
    return round((time.perf_counter() - start) * 1000.0, 3) if start else 0.0


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


# ---- routes ---------------------------------------------------------------------------------------

_SINGLE_ERRORS = {
    413: "The request body is over the size limit (refused without reading it all), or the image has "
    "more pixels than max_image_pixels (refused from its header, before decoding).",
    415: f"The upload is not an image, or not one of {IMAGE_FORMATS}.",
    422: "Missing `image` field, empty file, truncated or corrupt image, or an invalid decoding parameter.",
    409: "`attention=true` but the model has no attention (a Show-and-Tell bundle): code attention_unavailable.",
}


@router.post(
    "/captions",
    operation_id="create_caption",
    summary="Caption one image",
    description=f"Upload one image ({IMAGE_FORMATS}) as the multipart field `image`. Decoding settings "
    "are query parameters; the answer lists the captions best first, with the settings actually used.",
    response_model=CaptionResponse,
    response_model_exclude_none=True,
    responses=error_responses(400, 409, 413, 415, 422, 503, 504, descriptions=_SINGLE_ERRORS),
)
async def create_caption(
    request: Request,
    image: Annotated[UploadFile, File(description=f"The image file ({IMAGE_FORMATS}).")],
    config: Annotated[DecodingConfig, Depends(decoding_config)],
    engine: EngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    attention: Annotated[
        bool,
        Query(description="Also answer `attention`: the best caption's attention weights per token over the "
              "encoder grid. Needs an attention model (else 409 attention_unavailable)."),
    ] = False,
) -> CaptionResponse:
    if attention:
        require_attention(engine)
    spec = engine.bundle.preprocessing
    try:
        array, t_decode, t_pre = await _load_one(request, image, settings, spec)
    except ImageDecodeError as exc:
        raise upload_error(exc, metrics) from None
    results, t_infer = await _infer(request, [array], config, attention=attention)
    bundle = engine.bundle
    return CaptionResponse(
        captions=_items(results[0]),
        settings=decoding_settings(config, bundle.max_length),
        model=ModelRef(name=bundle.name, version=bundle.version),
        timings_ms=Timings(decode_image=_ms(t_decode), preprocess=_ms(t_pre), inference=_ms(t_infer),
                           total=_elapsed_ms(request)),
        request_id=request_id_of(request),
        attention=attention_map(results[0][0], bundle) if attention and results[0] else None,
    )


_BATCH_ERRORS = {
    413: "The request body is over the size limit (refused without reading it all).",
    422: "No `images` field, more files than max_batch_files, or an invalid decoding parameter. "
    "(A file that is not a usable image gets its own error entry in a 200 answer.)",
}


@router.post(
    "/captions/batch",
    operation_id="create_captions_batch",
    summary="Caption several images in one call",
    description="Upload up to `max_batch_files` images as the repeated multipart field `images`. The "
    "answer has one result per file, in the order sent: `captions` for a file that worked, `error` "
    "for one that did not (the others still succeed). All good files go through the model together.",
    response_model=BatchResponse,
    response_model_exclude_none=True,
    responses=error_responses(400, 413, 422, 503, 504, descriptions=_BATCH_ERRORS),
)
async def create_captions_batch(
    request: Request,
    images: Annotated[list[UploadFile], File(description=f"The image files ({IMAGE_FORMATS}), one part each.")],
    config: Annotated[DecodingConfig, Depends(decoding_config)],
    engine: EngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> BatchResponse:
    if len(images) > settings.max_batch_files:
        raise APIError(422, "too_many_files",
                       f"{len(images)} files sent; the limit is {settings.max_batch_files} per request")
    spec = engine.bundle.preprocessing
    loaded = await asyncio.gather(*(_load_one(request, u, settings, spec) for u in images), return_exceptions=True)

    arrays: list[np.ndarray] = []
    slots: list[int | BatchItemError] = []
    t_decode = t_pre = 0.0
    for outcome in loaded:
        if isinstance(outcome, ImageDecodeError):
            metrics.image_error(outcome.code)
            slots.append(BatchItemError(code=outcome.code, message=outcome.message))
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            array, d, p = outcome
            t_decode += d
            t_pre += p
            slots.append(len(arrays))
            arrays.append(array)

    captions: list = []
    t_infer = 0.0
    if arrays:
        captions, t_infer = await _infer(request, arrays, config)

    results = []
    for index, (upload, slot) in enumerate(zip(images, slots, strict=True)):
        if isinstance(slot, BatchItemError):
            results.append(BatchItem(index=index, filename=upload.filename, error=slot))
        else:
            results.append(BatchItem(index=index, filename=upload.filename, captions=_items(captions[slot])))
    bundle = engine.bundle
    return BatchResponse(
        results=results,
        settings=decoding_settings(config, bundle.max_length),
        model=ModelRef(name=bundle.name, version=bundle.version),
        timings_ms=Timings(decode_image=_ms(t_decode), preprocess=_ms(t_pre), inference=_ms(t_infer),
                           total=_elapsed_ms(request)),
        request_id=request_id_of(request),
    )
