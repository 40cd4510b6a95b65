"""Captioning: one image, or a batch of images in one engine call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Query, Request, UploadFile

from app.api import pipeline
from app.api.errors import APIError, error_responses, request_id_of
from app.api.pipeline import IMAGE_FORMATS, Prepared
from app.api.routes.deps import CaptionOptionsDep
from app.api.schemas import (
    BatchItem,
    BatchItemError,
    BatchResponse,
    CaptionItem,
    CaptionResponse,
    DecodingSettings,
    GuideItem,
    Label,
    ModelRef,
    Timings,
)
from app.api.state import service_state
from app.inference.attention_map import attention_map
from app.inference.decoding import DecodingConfig
from app.inference.engine import Caption, ImageResult
from app.inference.engine import Label as EngineLabel
from app.inference.preprocess import ImageDecodeError
from app.observability.metrics import Metrics

router = APIRouter(prefix="/v1", tags=["captions"])


def _items(captions: Sequence[Caption], min_confidence: float, metrics: Metrics, constrained: bool) -> list[CaptionItem]:
    """The API's captions; each flagged low_confidence below `min_confidence` and counted in the metrics."""
    items = [CaptionItem.of(c, min_confidence, constrained) for c in captions]
    for item in items:
        metrics.observe_caption(item.confidence, item.low_confidence)
    return items


def _labels(labels: Sequence[EngineLabel]) -> list[Label] | None:
    return [Label.of(x) for x in labels] or None


def _guide(config: DecodingConfig, result: ImageResult) -> list[GuideItem] | None:
    """The label words that guided an image's captions (an empty list: none was confident enough), or None
    when the request was not guided."""
    if not config.guided:
        return None
    return [GuideItem.of(w) for w in result.guide]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


# ---- routes ---------------------------------------------------------------------------------------

_SINGLE_ERRORS = {
    404: "`model` names no loaded model (or a version that is not the active one): code model_not_found; the "
    "error's details list the loaded models.",
    413: "The request body is over the size limit (refused without reading it all), or the image has "
    "more pixels than max_image_pixels (refused from its header, before decoding).",
    415: f"The upload is not an image, or not one of {IMAGE_FORMATS}.",
    422: "Missing `image` field, empty file, truncated or corrupt image, an invalid decoding parameter, or an `include` "
    "word outside the model's vocabulary (code unknown_word).",
    409: "`attention=true` but the model has no attention (a Show-and-Tell bundle): code attention_unavailable; "
    "or `labels` > 0 but the model has no ImageNet labels: code labels_unavailable; or `guide=labels` but the "
    "model has no label words: code guide_unavailable.",
}


@router.post(
    "/captions",
    operation_id="create_caption",
    summary="Caption one image",
    description=f"Upload one image ({IMAGE_FORMATS}) as the multipart field `image`. Decoding settings "
    "are query parameters; the answer lists the captions best first, with the settings actually used. Each "
    "caption has its words' probabilities and a `confidence` (0-1); those below `min_confidence` are flagged "
    "`low_confidence`.",
    response_model=CaptionResponse,
    response_model_exclude_none=True,
    responses=error_responses(400, 404, 409, 413, 415, 422, 503, 504, descriptions=_SINGLE_ERRORS),
)
async def create_caption(
    request: Request,
    image: Annotated[UploadFile, File(description=f"The image file ({IMAGE_FORMATS}).")],
    options: CaptionOptionsDep,
    attention: Annotated[
        bool,
        Query(description="Also answer `attention`: the best caption's attention weights per token over the "
              "encoder grid. Needs an attention model (else 409 attention_unavailable)."),
    ] = False,
) -> CaptionResponse:
    engine, config, labels, min_confidence = options.engine, options.config, options.labels, options.min_confidence
    metrics = service_state(request.app).metrics
    if attention:
        pipeline.require_attention(engine)
    bundle = engine.bundle
    prepared = await pipeline.load_one(request, image, bundle.preprocessing, metrics)
    results, t_infer = await pipeline.caption(request, [prepared.array], config, attention=attention, labels=labels)
    captions = results[0].captions
    return CaptionResponse(
        captions=_items(captions, min_confidence, metrics, config.constrained),
        settings=DecodingSettings.of(config, bundle.max_length, bundle.vocab),
        model=ModelRef(name=bundle.name, version=bundle.version),
        timings_ms=Timings(decode_image=_ms(prepared.decode_s), preprocess=_ms(prepared.preprocess_s),
                           inference=_ms(t_infer), total=pipeline.elapsed_ms(request)),
        request_id=request_id_of(request),
        attention=attention_map(captions[0], bundle) if attention and captions else None,
        labels=_labels(results[0].labels),
        guide=_guide(config, results[0]),
    )


_BATCH_ERRORS = {
    404: "`model` names no loaded model (or a version that is not the active one): code model_not_found; the "
    "error's details list the loaded models.",
    409: "`labels` > 0 but the model has no ImageNet labels: code labels_unavailable; or `guide=labels` but the model "
    "has no label words: code guide_unavailable.",
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
    responses=error_responses(400, 404, 409, 413, 422, 503, 504, descriptions=_BATCH_ERRORS),
)
async def create_captions_batch(
    request: Request,
    images: Annotated[list[UploadFile], File(description=f"The image files ({IMAGE_FORMATS}), one part each.")],
    options: CaptionOptionsDep,
) -> BatchResponse:
    engine, config, labels, min_confidence = options.engine, options.config, options.labels, options.min_confidence
    service = service_state(request.app)
    settings, metrics = service.settings, service.metrics
    if len(images) > settings.max_batch_files:
        raise APIError(422, "too_many_files",
                       f"{len(images)} files sent; the limit is {settings.max_batch_files} per request")
    bundle = engine.bundle
    loaded = await asyncio.gather(*(pipeline.load_upload(request, u, bundle.preprocessing) for u in images),
                                  return_exceptions=True)

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
            assert isinstance(outcome, Prepared)
            t_decode += outcome.decode_s
            t_pre += outcome.preprocess_s
            slots.append(len(arrays))
            arrays.append(outcome.array)

    captions: list[ImageResult] = []
    t_infer = 0.0
    if arrays:
        captions, t_infer = await pipeline.caption(request, arrays, config, labels=labels)

    results = []
    for index, (upload, slot) in enumerate(zip(images, slots, strict=True)):
        if isinstance(slot, BatchItemError):
            results.append(BatchItem(index=index, filename=upload.filename, error=slot))
        else:
            done = captions[slot]
            results.append(BatchItem(index=index, filename=upload.filename,
                                     captions=_items(done.captions, min_confidence, metrics, config.constrained),
                                     labels=_labels(done.labels), guide=_guide(config, done)))
    return BatchResponse(
        results=results,
        settings=DecodingSettings.of(config, bundle.max_length, bundle.vocab),
        model=ModelRef(name=bundle.name, version=bundle.version),
        timings_ms=Timings(decode_image=_ms(t_decode), preprocess=_ms(t_pre), inference=_ms(t_infer),
                           total=pipeline.elapsed_ms(request)),
        request_id=request_id_of(request),
    )
