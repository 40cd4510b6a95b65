"""HTTP routers, one module per resource, and what they share: the dependencies and the decoding
query parameters. No route module imports another; the request's path from upload to captions is
app/api/pipeline.py.

Everything a route needs (settings, the engine, metrics) lives in the app's `ServiceState`
(app/api/state.py) and is handed in with `Depends`, so tests can build an app with
`create_app(settings)` and nothing is global. The engine
is that of the model the request picked (`?model=`, `get_served`: app/serving/registry.py's registry).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Response

from app.api import pipeline
from app.api.errors import APIError
from app.api.state import service_state
from app.inference.bundle import MAX_LABELS
from app.inference.decoding import (
    MAX_BEAM_SIZE,
    MAX_CONSTRAINTS,
    MAX_LENGTH_LIMIT,
    MAX_LENGTH_PENALTY,
    MAX_NO_REPEAT_NGRAM_SIZE,
    DecodingConfig,
    Guide,
    Strategy,
)
from app.inference.engine import Engine
from app.inference.guidance import UnknownWords, include_groups
from app.observability.metrics import Metrics
from app.serving.registry import MODEL_SPEC_PATTERN, ModelNotFound, ModelRegistry, ServedModel
from app.settings import Settings

# Every dependency is `async def`, even where it never awaits: FastAPI runs a plain `def` dependency in
# a worker thread (a thread hop per dependency per request, most of the front end's cost under load:
# docs/performance.md, "The front end").


async def get_settings(request: Request) -> Settings:
    return service_state(request.app).settings


async def get_metrics(request: Request) -> Metrics:
    return service_state(request.app).metrics


def registry_of(request: Request) -> ModelRegistry:
    """The model registry once start-up has finished (the default model loaded and warmed up);
    503 `not_ready` before that."""
    service = service_state(request.app)
    if service.models is None or not service.ready:
        raise pipeline.not_ready()
    return service.models


async def get_registry(request: Request) -> ModelRegistry:
    """`registry_of` as a dependency."""
    return registry_of(request)


async def get_default_engine(request: Request) -> Engine:
    """The default model's loaded, warmed-up engine; 503 `not_ready` before that."""
    return registry_of(request).resolve(None).engine


MODEL_VERSION_HEADER = "X-Model-Version"


def model_not_found(exc: ModelNotFound, loc: tuple[str, str]) -> APIError:
    """404 `model_not_found` for a name (or name:version) the registry does not hold, its details
    listing those it does; `loc`: where the name came from, e.g. ("query", "model")."""
    return APIError(404, "model_not_found", str(exc),
                    details=[{"loc": list(loc), "msg": key, "type": "available_model"} for key in exc.available])


async def get_served(
    request: Request,
    response: Response,
    model: Annotated[
        str,
        Query(max_length=257, pattern=MODEL_SPEC_PATTERN,
              description="The model to answer: a name of `GET /v1/models` (its active version) or name:version "
              "(only while that version is the active one). Default: the service's default model. Unknown or "
              "unloaded: 404 model_not_found, listing the loaded models."),
    ] = None,  # type: ignore[assignment]
) -> AsyncIterator[ServedModel]:
    """The model that answers this request (app/serving/registry.py), held until the request has answered, so a
    swap lets it finish on this version. Counts the request by model and version in /metrics and
    names the version in the X-Model-Version header."""
    registry = registry_of(request)  # 503 not_ready before start-up has finished
    try:
        served = registry.resolve(model)
    except ModelNotFound as exc:
        raise model_not_found(exc, ("query", "model")) from None
    served.acquire()
    request.state.served = served
    response.headers[MODEL_VERSION_HEADER] = served.key
    status = 200
    try:
        yield served
    except APIError as exc:
        status = exc.status_code
        raise
    except asyncio.CancelledError:  # the client went away mid-request
        status = 499
        raise
    except Exception:
        status = 500
        raise
    finally:
        served.release()
        start = getattr(request.state, "start_time", None)
        route = str(getattr(request.scope.get("route"), "path", "unmatched"))
        service_state(request.app).metrics.observe_model_request(
            served.name, served.version, route, status, time.perf_counter() - start if start else 0.0)


async def get_engine(served: Annotated[ServedModel, Depends(get_served)]) -> Engine:
    """The engine of the model that answers this request (`?model=`)."""
    return served.engine


# Annotated dependencies for route signatures.
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServedDep = Annotated[ServedModel, Depends(get_served)]
EngineDep = Annotated[Engine, Depends(get_engine)]
DefaultEngineDep = Annotated[Engine, Depends(get_default_engine)]


# The query parameters are typed without `| None` on purpose: their OpenAPI schemas stay plain
# (`integer`, not `anyOf: [integer, null]`), and the default None means "not given" (so mypy is
# told to accept each None default).
def decoding_config(
    settings: Settings,
    engine: Engine,
    strategy: Annotated[
        Strategy,
        Query(description="Decoding strategy; greedy is beam search with one beam. Default: the service's "
              "default_strategy (beam)."),
    ] = None,  # type: ignore[assignment]
    beam_size: Annotated[
        int,
        Query(ge=1, le=MAX_BEAM_SIZE, description="Beams per image (ignored by greedy). Default: the service's "
              "default_beam_size (3), widened to num_captions if that is larger."),
    ] = None,  # type: ignore[assignment]
    num_captions: Annotated[
        int,
        Query(ge=1, le=MAX_BEAM_SIZE, description="How many captions to return, best first; at most beam_size."),
    ] = None,  # type: ignore[assignment]
    max_length: Annotated[
        int,
        Query(ge=1, le=MAX_LENGTH_LIMIT, description="Most words per caption. Default: the model's max_length."),
    ] = None,  # type: ignore[assignment]
    length_penalty: Annotated[
        float,
        Query(ge=0.0, le=MAX_LENGTH_PENALTY, description="Ranking divides the score by length ** length_penalty. "
              "Default: the service's default_length_penalty, else the model's recommendation."),
    ] = None,  # type: ignore[assignment]
    no_repeat_ngram_size: Annotated[
        int,
        Query(ge=0, le=MAX_NO_REPEAT_NGRAM_SIZE, description="Never repeat an n-gram of this size (0 = off). "
              "Default: the service's default_no_repeat_ngram_size, else the model's recommendation."),
    ] = None,  # type: ignore[assignment]
    include: Annotated[
        str,
        Query(max_length=400, description=f"Words every caption must contain (constrained beam search), "
              f"comma-separated, at most {MAX_CONSTRAINTS}; alternatives joined by `|` (`cat|cats,sofa`: a cat or "
              "cats, and a sofa). A word outside the model's vocabulary is a 422 unknown_word naming it."),
    ] = None,  # type: ignore[assignment]
    guide: Annotated[
        Guide,
        Query(description="`labels`: every caption names the image's most probable ImageNet label words (see "
              "guide_threshold, guide_words; the answer's `guide` says which); `none`: unguided. Default: the "
              "service's default_guide, else the model's recommendation. A model without label words is a 409 "
              "guide_unavailable."),
    ] = None,  # type: ignore[assignment]
    guide_threshold: Annotated[
        float,
        Query(gt=0.0, le=1.0, allow_inf_nan=False, description="guide=labels: the least probability of a label word "
              "(summed over the classes that have it) that guides the caption. Default: the service's, else the "
              "model's recommendation (else 0.5)."),
    ] = None,  # type: ignore[assignment]
    guide_words: Annotated[
        int,
        Query(ge=0, le=MAX_CONSTRAINTS, description="guide=labels: at most this many label words guide the caption. "
              "Default: the service's, else the model's recommendation (else 1)."),
    ] = None,  # type: ignore[assignment]
    request: Request = None,  # type: ignore[assignment]  # (None: called with the /v2 protocol's parameters)
) -> DecodingConfig:
    """The request's decoding settings on top of the service's and the model's defaults, validated
    once here (app/inference/decoding.py's rules): a bad combination is a 422 invalid_parameter, and a
    setting given twice (`?beam_size=2&beam_size=5`) a 422 validation_error rather than the last one."""
    if request is not None:
        repeated = [name for name in DECODING_PARAMETERS if len(request.query_params.getlist(name)) > 1]
        if repeated:
            raise APIError(422, "validation_error", f"query parameter {repeated[0]!r} given more than once",
                           details=[{"loc": ["query", name], "msg": "given more than once; give it once",
                                     "type": "repeated"} for name in repeated])
    bundle = engine.bundle
    if guide == "labels" and not engine.has_label_words:
        raise APIError(409, "guide_unavailable", f"the model {bundle.name} has no label words to guide its captions "
                       "with (its labels.json has no `words`: captioner add-labels adds them)")
    groups = None
    if include is not None:
        try:
            groups = include_groups(include, bundle.token_ids, list(bundle.special.values()))
        except UnknownWords as exc:
            raise APIError(422, "unknown_word", str(exc), details=[
                {"loc": ["query", "include"], "msg": f"{w!r} is not in the model's vocabulary", "type": "unknown_word"}
                for w in exc.words]) from None
        except ValueError as exc:
            raise APIError(422, "invalid_parameter", str(exc)) from None
    try:
        return settings.decoding_for(bundle).with_overrides(
            strategy=strategy, beam_size=beam_size, num_captions=num_captions, max_length=max_length,
            length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size, include=groups, guide=guide,
            guide_threshold=guide_threshold, guide_words=guide_words,
        )
    except (ValueError, TypeError) as exc:
        raise APIError(422, "invalid_parameter", str(exc)) from None


# the parameters of decoding_config, labels_count and min_confidence that are not query parameters
_NOT_QUERY = ("settings", "engine", "request")
# the query parameters of decoding_config (each may be given once)
DECODING_PARAMETERS = tuple(name for name in inspect.signature(decoding_config).parameters if name not in _NOT_QUERY)


def labels_count(
    settings: Settings,
    engine: Engine,
    labels: Annotated[
        int,
        Query(ge=0, le=MAX_LABELS, description="How many ImageNet-1k labels to answer per image, best first (0 = "
              "none). Default: the service's default_labels (3) when the model has labels, else 0. Asking a model "
              "without labels for some is a 409 labels_unavailable."),
    ] = None,  # type: ignore[assignment]
) -> int:
    """The request's label count: the setting's default where not given (0 for a bundle without labels)."""
    if labels is None:
        return settings.labels_for(engine.has_labels)
    if labels > 0:
        pipeline.require_labels(engine)
    return labels


def min_confidence(
    settings: Settings,
    min_confidence: Annotated[
        float,
        Query(ge=0.0, le=1.0, allow_inf_nan=False,
              description="Flag captions whose `confidence` is below this with `low_confidence: true` (they are still "
              "returned, and counted in /metrics), e.g. to send them to a person. 0 = flag none. Default: the "
              "service's min_confidence setting (0)."),
    ] = None,  # type: ignore[assignment]
) -> float:
    """The request's confidence threshold: the setting's where not given."""
    return settings.min_confidence if min_confidence is None else float(min_confidence)


@dataclass(frozen=True)
class CaptionOptions:
    """A captioning request's query, validated: the model that answers it (held until it has answered, as
    `get_served`), its decoding settings, how many labels, and (for the routes that flag captions) the
    confidence threshold."""

    served: ServedModel
    config: DecodingConfig
    labels: int
    min_confidence: float = 0.0

    @property
    def engine(self) -> Engine:
        return self.served.engine


def _query_of(*functions: Callable[..., Any]) -> list[inspect.Parameter]:
    """The query parameters (name, Annotated type with its Query, default None) of these functions."""
    return [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for function in functions for name, parameter in inspect.signature(function).parameters.items()
            if name not in _NOT_QUERY]


def _caption_options(flags: bool) -> Callable[..., Awaitable[CaptionOptions]]:
    """The one dependency of a captioning route: every query parameter of `decoding_config` and `labels_count`
    (and of `min_confidence` when `flags`), declared once, in those functions, and validated by them. One
    dependency instead of one per function (and per setting, engine, metrics): FastAPI's dependency solving
    costs per dependency per request, and it was a third of the event loop's time per caption
    (docs/performance.md, "The front end")."""

    async def options(request: Request, served: ServedModel, **query: Any) -> CaptionOptions:
        settings = service_state(request.app).settings
        engine = served.engine
        config = decoding_config(settings, engine, **{name: query[name] for name in DECODING_PARAMETERS},
                                 request=request)
        labels = labels_count(settings, engine, query["labels"])
        threshold = min_confidence(settings, query["min_confidence"]) if flags else 0.0
        return CaptionOptions(served, config, labels, threshold)

    parameters = [inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
                  inspect.Parameter("served", inspect.Parameter.KEYWORD_ONLY, annotation=ServedDep),
                  *_query_of(decoding_config, labels_count, *([min_confidence] if flags else []))]
    options.__signature__ = inspect.Signature(parameters, return_annotation=CaptionOptions)  # type: ignore[attr-defined]
    return options


# /v1/captions and /v1/captions/batch; /v1/captions/attention.png (no min_confidence: it flags nothing)
CaptionOptionsDep = Annotated[CaptionOptions, Depends(_caption_options(flags=True))]
AttentionOptionsDep = Annotated[CaptionOptions, Depends(_caption_options(flags=False))]
