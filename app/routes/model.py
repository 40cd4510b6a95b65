"""What model is served, how, and with which limits."""

from __future__ import annotations

from fastapi import APIRouter

from app.errors import error_responses
from app.routes import EngineDep, SettingsDep
from app.schemas import DecodingSettings, Limits, ModelInfo

router = APIRouter(prefix="/v1", tags=["model"])


def decoding_settings(config, bundle_max_length: int) -> DecodingSettings:
    """The DecodingSettings schema of a DecodingConfig, as actually used."""
    used = config.resolved(bundle_max_length)
    return DecodingSettings(
        strategy=used.strategy,
        beam_size=used.beam_size,
        num_captions=used.num_captions,
        max_length=used.max_length if used.max_length is not None else bundle_max_length,
        length_penalty=float(used.length_penalty),
        no_repeat_ngram_size=used.no_repeat_ngram_size,
    )


@router.get(
    "/model",
    operation_id="get_model_info",
    summary="The loaded model bundle, the execution provider in use, and the limits",
    response_model=ModelInfo,
    responses=error_responses(503),
)
async def get_model_info(engine: EngineDep, settings: SettingsDep) -> ModelInfo:
    bundle = engine.bundle
    manifest = bundle.manifest
    model = manifest.get("model", {})
    evaluation = manifest.get("evaluation")
    return ModelInfo(
        name=bundle.name,
        version=bundle.version,
        created=str(model["created"]) if model.get("created") is not None else None,
        format_version=int(manifest.get("format_version", 1)),
        architecture=dict(manifest.get("architecture", {})),
        preprocessing=dict(manifest.get("preprocessing", {})),
        special_tokens=dict(bundle.special),
        vocab_size=len(bundle.vocab),
        max_length=bundle.max_length,
        attention=bool(bundle.attention),
        evaluation=evaluation if isinstance(evaluation, dict) else None,
        provider=engine.provider,
        device="cuda" if engine.device == "cuda" else "cpu",
        decoding_defaults=decoding_settings(settings.decoding_defaults(bundle.recommended_decoding), bundle.max_length),
        limits=Limits(
            max_upload_bytes=settings.max_upload_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_batch_files=settings.max_batch_files,
        ),
    )
