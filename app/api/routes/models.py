"""The model routes: what the default (or `?model=`) model is and its limits (`GET /v1/model`), the model
repository's contents (`GET /v1/models`), and swapping versions with no
downtime (`POST /v1/models/{name}/load`, `POST /v1/models/{name}/rollback`: admin routes, which need a
key of CAPTIONER_ADMIN_API_KEYS). The swap itself is app/serving/registry.py's; with several worker
processes it reaches every worker through the control folder (app/serving/control.py), and the answer
says how many switched (`workers`, absent with one process)."""

from __future__ import annotations

import contextlib
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Request

from app.api.auth import bearer_token
from app.api.errors import APIError, error_responses
from app.api.routes.deps import EngineDep, SettingsDep, get_registry, model_not_found
from app.api.schemas import (
    CheckResult,
    DecodingSettings,
    Limits,
    LoadedModel,
    LoadRequest,
    LoadResult,
    ModelInfo,
    ModelList,
    RepositoryModel,
    WorkerSwitch,
)
from app.api.state import service_state
from app.serving.control import WorkerControl
from app.serving.registry import (
    NAME_PATTERN,
    BundleRefused,
    Check,
    LoadInProgress,
    ModelNotFound,
    ModelRegistry,
    NoPreviousVersion,
    ServedModel,
    process_rss_bytes,
)
from app.settings import Settings

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
        label_words=engine.has_label_words,
        label_prior=engine.label_prior,
        confidence_calibration=(bundle.confidence_calibration.model_dump(mode="json", exclude_unset=True)
                                if bundle.confidence_calibration is not None else None),
        min_confidence=settings.min_confidence,
        evaluation=evaluation.model_dump(mode="json", exclude_unset=True) if evaluation is not None else None,
        provider=engine.provider,
        device="cuda" if engine.device == "cuda" else "cpu",
        decoding_defaults=DecodingSettings.of(settings.decoding_for(bundle), bundle.max_length, bundle.vocab),
        limits=Limits(
            max_upload_bytes=settings.max_upload_bytes,
            max_image_pixels=settings.max_image_pixels,
            max_batch_files=settings.max_batch_files,
        ),
    )


ADMIN_MESSAGE = "this admin route needs an admin key: send the header 'Authorization: Bearer <admin key>'"


async def require_admin(request: Request) -> None:
    """403 `admin_disabled` without CAPTIONER_ADMIN_API_KEYS; 401 `unauthorized` without one of them
    (compared in constant time, as the API keys: app/api/auth.py)."""
    keys = service_state(request.app).admin_keys
    if keys is None:
        raise APIError(403, "admin_disabled", "the admin routes are off: set CAPTIONER_ADMIN_API_KEYS to the keys "
                       "allowed to load and roll back models")
    token = bearer_token(request.scope)
    if token is None or keys.identify(token) is None:
        raise APIError(401, "unauthorized", ADMIN_MESSAGE, headers={"WWW-Authenticate": "Bearer"})


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ModelName = Annotated[str, Path(pattern=f"^{NAME_PATTERN}$", max_length=128,
                                description="A model name of the repository (`GET /v1/models`).")]


def _checks(checks: list[Check]) -> list[CheckResult]:
    return [CheckResult(name=c.name, passed=c.passed, detail=c.detail) for c in checks]


def _loaded(served: ServedModel, default: str) -> LoadedModel:
    return LoadedModel(
        name=served.name, version=served.version, state="active" if served.state == "active" else "draining",
        default=served.name == default, provider=served.engine.provider,
        device="cuda" if served.engine.device == "cuda" else "cpu", memory_bytes=served.memory_bytes,
        loaded_at=served.loaded_at, load_seconds=round(served.load_seconds, 3), in_flight=max(0, served.users),
        checks=_checks(served.checks),
    )


_ADMIN_ERRORS = {
    401: "No admin key (`Authorization: Bearer <key>` with a key of CAPTIONER_ADMIN_API_KEYS): code unauthorized.",
    403: "The admin routes are off (CAPTIONER_ADMIN_API_KEYS is not set): code admin_disabled.",
    404: "No such model name or version in the model repository: code model_not_found (the details list what it "
    "holds).",
    409: "Another load or rollback of this name is running (code load_in_progress), or there is no earlier "
    "version to roll back to (code no_previous_version).",
    422: "The bundle failed a check and was refused; the version in use keeps serving: code bundle_refused, its "
    "details name the check (sha256, bundle, engine, warmup, smoke, parity). Or an invalid body.",
}


async def get_control(request: Request) -> WorkerControl | None:
    """This worker's side of the control folder (app/serving/control.py), or None: one process."""
    return service_state(request.app).control


ControlDep = Annotated[WorkerControl | None, Depends(get_control)]


async def _swap(registry: ModelRegistry, name: str, version: str | None, control: WorkerControl | None,
                settings: Settings) -> LoadResult:
    workers: WorkerSwitch | None = None
    try:
        # several workers: one admin swap of a name at a time over all of them, from the state they share
        with control.exclusive(name) if control is not None else contextlib.nullcontext():
            if control is not None:
                await control.sync()
            if version is None:
                served, previous, changed = await registry.rollback(name)
            else:
                served, previous, changed = await registry.load(name, version)
            if control is not None:  # switched here: now every worker (a refused load got no further)
                swap = await control.publish(name, served.version, list(registry.history.get(name, [])))
                switched, total = await control.wait_for(name, served.version, swap, settings.request_timeout_s)
                workers = WorkerSwitch(switched=switched, total=max(total, 1))
    except ModelNotFound as exc:
        raise model_not_found(exc, ("path", "name")) from None
    except LoadInProgress as exc:
        raise APIError(409, "load_in_progress", str(exc), headers={"Retry-After": "1"}) from None
    except NoPreviousVersion as exc:
        raise APIError(409, "no_previous_version", str(exc)) from None
    except BundleRefused as exc:
        where = served_key(registry, name)
        message = registry.public_text(exc.message)  # paths relative to the repository, never the server's own
        raise APIError(422, "bundle_refused", f"{name}:{version or 'previous'} refused, {exc.check} check failed: "
                       f"{message}; {where} keeps serving",
                       details=[{"loc": ["bundle", exc.check], "msg": message, "type": exc.check}]) from None
    extra = {"workers": workers} if workers is not None else {}  # absent with one process (exclude_unset)
    return LoadResult(name=served.name, version=served.version, previous=previous, changed=changed,
                      load_seconds=round(served.load_seconds, 3) if changed else 0.0, checks=_checks(served.checks),
                      **extra)


def served_key(registry: ModelRegistry, name: str) -> str:
    current = registry.active.get(name)
    return current.key if current is not None else "the version in use"


@router.get(
    "/models",
    operation_id="list_models",
    summary="The loaded models (provider, memory, checks) and the versions the repository holds",
    response_model=ModelList,
    responses=error_responses(503),
)
async def list_models(registry: RegistryDep) -> ModelList:
    served = [*registry.active.values(), *registry.draining]
    available = registry.available()
    names = sorted({*available, *registry.active})
    return ModelList(
        default=registry.default_name,
        loaded=[_loaded(s, registry.default_name) for s in sorted(served, key=lambda s: (s.name, s.state != "active"))],
        repository=[RepositoryModel(name=n, versions=available.get(n, []),
                                    active=registry.active[n].version if n in registry.active else None,
                                    previous=list(registry.history.get(n, []))) for n in names],
        process_rss_bytes=process_rss_bytes(),
    )


@router.post(
    "/models/{name}/load",
    operation_id="load_model",
    summary="Load a version beside the one serving, check it, then switch new requests to it (admin)",
    description="Reads the bundle `<repository>/<name>/<version>/`, checks every file's sha256, builds and warms "
    "up its engine, makes a smoke caption and re-captions the manifest's reference inputs (`parity.reference`), "
    "all beside the version in use; only then new requests go to it. Requests already under way finish on the "
    "version they started with, which is then unloaded. A bundle that fails a check is refused (422 "
    "bundle_refused) and the version in use keeps serving. Needs an admin key (CAPTIONER_ADMIN_API_KEYS).",
    response_model=LoadResult,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403, 404, 409, 422, 503, descriptions=_ADMIN_ERRORS),
    dependencies=[Depends(require_admin)],
)
async def load_model(name: ModelName, body: Annotated[LoadRequest, Body()], registry: RegistryDep,
                     control: ControlDep, settings: SettingsDep) -> LoadResult:
    return await _swap(registry, name, body.version, control, settings)


@router.post(
    "/models/{name}/rollback",
    operation_id="rollback_model",
    summary="Return to the version served before the current one, with the same checks (admin)",
    description="Loads the name's previous version (`previous` in `GET /v1/models`) exactly as `load` does; "
    "repeated rollbacks walk further back. Needs an admin key (CAPTIONER_ADMIN_API_KEYS).",
    response_model=LoadResult,
    response_model_exclude_unset=True,
    responses=error_responses(401, 403, 404, 409, 422, 503, descriptions=_ADMIN_ERRORS),
    dependencies=[Depends(require_admin)],
)
async def rollback_model(name: ModelName, registry: RegistryDep, control: ControlDep,
                         settings: SettingsDep) -> LoadResult:
    return await _swap(registry, name, None, control, settings)
