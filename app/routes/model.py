"""What model is served, how, and with which limits."""

from __future__ import annotations

from fastapi import APIRouter

from app.errors import error_responses
from app.routes import EngineDep, SettingsDep
from app.schemas import DecodingSettings, Limits, ModelInfo

router = APIRouter(prefix="/v1", tags=["model"])


@router.get(
    "/model",
    operation_id="get_model_info",
    summary="The loaded model bundle, the execution provider in use, and the limits",
    response_model=ModelInfo,
    description="The default model, or the one `?model=name[:version]` names (404 model_not_found when it is "
    "not loaded; `GET /v1/models` lists them all).",
    responses=error_responses(404, 422, 503),
)
async def get_model_info(engine: EngineDep, settings: SettingsDep) -> ModelInfo:
    bundle = engine.bundle
    manifest = bundle.manifest
    evaluation = manifest.evaluation
    # the blocks as manifest.json has them (exclude_unset: keys it leaves out stay out)
    return ModelInfo(
        name=bundle.name,
        version=bundle.version,
        created=manifest.model.created,
        format_version=manifest.format_version,
        architecture=manifest.architecture.model_dump(mode="json", exclude_unset=True),
        preprocessing=manifest.preprocessing.model_dump(mode="json", exclude_unset=True),
        special_tokens=dict(bundle.special),
        vocab_size=len(bundle.vocab),
        max_length=bundle.max_length,
        attention=bool(bundle.attention),
        labels=engine.has_labels,
        default_labels=settings.labels_for(engine.has_labels),
        confidence_calibration=(bundle.confidence_calibration.model_dump(mode="json", exclude_unset=True)
                                if bundle.confidence_calibration is not None else None),
        min_confidence=settings.min_confidence,
        evaluation=evaluation.model_dump(mode="json", exclude_unset=True) if evaluation is not None else None,
        provider=engine.provider,
        device="cuda" if engine.device == "cuda" else "cpu",
        decoding_defaults=DecodingSettings.of(settings.decoding_defaults(bundle.recommended_decoding), bundle.max_length),
        limits=Limits(
            max_upload_bytes=settings.max_upload_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_batch_files=settings.max_batch_files,
        ),
    )
