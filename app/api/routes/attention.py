"""`POST /v1/captions/attention.png`: where the model looked, word by word, as one PNG."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api import pipeline
from app.api.errors import APIError, error_responses
from app.api.pipeline import IMAGE_FORMATS
from app.api.routes.deps import MODEL_VERSION_HEADER, AttentionOptionsDep
from app.api.state import service_state
from app.inference.attention_map import attention_map, render_attention_png

router = APIRouter(prefix="/v1", tags=["captions"])


class PNGResponse(Response):
    media_type = "image/png"


_ERRORS = {
    404: "`model` names no loaded model (or a version that is not the active one): code model_not_found; the "
    "error's details list the loaded models.",
    409: "The model has no attention (a Show-and-Tell bundle): code attention_unavailable; or `labels` > 0 but "
    "it has no ImageNet labels: code labels_unavailable.",
    413: "The request body is over the size limit (refused without reading it all), or the image has "
    "more pixels than max_image_pixels (refused from its header, before decoding).",
    415: f"The upload is not an image, or not one of {IMAGE_FORMATS}.",
    422: "Missing `image` field, empty file, truncated or corrupt image, or an invalid parameter.",
}


def _json_errors(*statuses: int, descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """`error_responses(...)`, with the error body documented as application/json explicitly (FastAPI
    would list a `model` under the route's own media type, image/png). ErrorResponse is in the
    schema's components through the other routes."""
    out = {}
    for status, entry in error_responses(*statuses, descriptions=descriptions).items():
        entry = {k: v for k, v in entry.items() if k != "model"}
        entry["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        out[status] = entry
    return out


@router.post(
    "/captions/attention.png",
    operation_id="create_attention_png",
    summary="Caption one image and draw where the model looked for each word",
    description=f"Upload one image ({IMAGE_FORMATS}) as the multipart field `image`; the decoding query "
    "parameters are those of `POST /v1/captions`. The answer is one PNG: a grid of panels, one per token of "
    "the best caption (its words, then <end>), each the upright image with that token's attention weights "
    "as a heatmap (bright = more weight, scaled per token), titled with the token; the caption is written "
    "on top, followed by the image's best ImageNet labels (`labels`, as on `POST /v1/captions`). Needs an "
    "attention model: a Show-and-Tell bundle answers 409 attention_unavailable.",
    response_class=PNGResponse,
    responses={
        200: {
            "description": "The attention picture (PNG).",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        **_json_errors(400, 404, 409, 413, 415, 422, 503, 504, descriptions=_ERRORS),
    },
)
async def create_attention_png(
    request: Request,
    image: Annotated[UploadFile, File(description=f"The image file ({IMAGE_FORMATS}).")],
    options: AttentionOptionsDep,
    panel: Annotated[int, Query(ge=64, le=512, description="Longer side of each panel, in pixels.")] = 224,
    columns: Annotated[int, Query(ge=1, le=12, description="Panels per row.")] = 4,
) -> PNGResponse:
    served, engine, config, labels = options.served, options.engine, options.config, options.labels
    metrics = service_state(request.app).metrics
    pipeline.require_attention(engine)
    prepared = await pipeline.load_one(request, image, engine.bundle.preprocessing, metrics, keep_image=True)
    results, _ = await pipeline.caption(request, [prepared.array], config, attention=True, labels=labels)
    if not results or not results[0].captions:
        raise APIError(422, "no_caption", "the decoding settings left no finished caption to draw")
    best = results[0].captions[0]
    # the labels go on the title line, after the caption: "a cat on a bed · Egyptian cat 82%, tiger cat 7%"
    named = ", ".join(f"{x.name.split(',')[0]} {x.probability:.0%}" for x in results[0].labels)
    amap = attention_map(best, engine.bundle)
    if amap is None:  # the engine said it has attention, yet returned none
        raise APIError(409, "attention_unavailable", "the model returned no attention weights")
    assert prepared.image is not None  # load_one(keep_image=True)
    png = await run_in_threadpool(
        render_attention_png, prepared.image, amap["tokens"], amap["weights"], amap["grid"],
        panel=panel, columns=columns, title=f"{best.text} · {named}" if named else best.text,
    )
    return PNGResponse(content=png, headers={"Cache-Control": "no-store", MODEL_VERSION_HEADER: served.key})
