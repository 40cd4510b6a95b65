"""Named response models of the HTTP API (they become the OpenAPI's component schemas).

`CaptionItem.of`, `Label.of` and `DecodingSettings.of` turn the engine's results and a `DecodingConfig`
into them, for the routes (app/api/routes/) and for `captioner caption --json` (app/cli.py), which
prints the same shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.inference.decoding import DecodingConfig, Guide, Strategy

if TYPE_CHECKING:  # the CLI imports these models before it loads the engine (onnxruntime)
    from app.inference.engine import Caption
    from app.inference.engine import Label as EngineLabel
    from app.inference.guidance import GuideWord

_RID = "9f1c2b7e4d6a4e0f8a1b2c3d4e5f6a7b"


def _finite(x: float) -> float:
    """JSON has no infinities: a score that is not finite (no finished hypothesis) is -1e30."""
    x = float(x)
    return x if math.isfinite(x) else -1e30


def _example(model: type[BaseModel]) -> dict[str, Any]:
    """The `example` a model's json_schema_extra documents (reused by the models that contain it)."""
    extra = model.model_config.get("json_schema_extra")
    assert isinstance(extra, dict)
    example = extra["example"]
    assert isinstance(example, dict)
    return example


class CaptionItem(BaseModel):
    """One caption of an image."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "text": "a cat sitting on the grass",
                "score": -4.21,
                "normalized_score": -0.6,
                "tokens": ["a", "cat", "sitting", "on", "the", "grass"],
                "token_probs": [0.91, 0.62, 0.35, 0.74, 0.88, 0.41],
                "end_prob": 0.28,
                "confidence": 0.75,
                "low_confidence": False,
            }
        }
    )

    text: str = Field(description="The caption: its words joined with single spaces.")
    score: float = Field(description="Sum of the tokens' log-probabilities, <end> included.")
    normalized_score: float = Field(
        description="The ranking score: score / (words + 1) ** length_penalty."
    )
    tokens: list[str] = Field(description="The caption's words, special tokens left out.")
    token_probs: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        description="One per entry of `tokens`: the model's probability (its softmax) of that word where it was "
        "written. n-gram blocking and the length penalty never change these values."
    )
    end_prob: float = Field(
        ge=0.0, le=1.0, description="The model's probability of ending the caption after its last word (<end>)."
    )
    confidence: float = Field(
        ge=0.0, le=1.0,
        description="How sure the model is of this caption, 0-1 (docs/confidence.md): the geometric mean of "
        "`token_probs` and `end_prob`, mapped through the model's calibration when its bundle has one (the "
        "default model's estimates the chance that the caption's CIDEr-D against people's captions reaches 0.5, "
        "fitted on Flickr8k validation photos: a ranking aid for routing, not a guarantee).",
    )
    low_confidence: bool = Field(
        description="confidence < min_confidence (the request's, else the service's setting; 0 flags none)."
    )
    constraints_met: bool | None = Field(
        None, description="With include words or guide=labels: whether the caption contains every required word "
        "(false only when no caption could: e.g. max_length too short); absent without constraints."
    )

    @classmethod
    def of(cls, caption: Caption, min_confidence: float, constrained: bool = False) -> CaptionItem:
        """An engine caption as the API (and `captioner caption --json`) answers it: flagged
        low_confidence below `min_confidence`; a score that is not finite is -1e30 (JSON has no -inf)."""
        return cls(text=caption.text, score=_finite(caption.score), normalized_score=_finite(caption.normalized_score),
                   tokens=list(caption.tokens), token_probs=list(caption.token_probs), end_prob=caption.end_prob,
                   confidence=caption.confidence, low_confidence=caption.confidence < min_confidence,
                   constraints_met=caption.met if constrained else None)


class Label(BaseModel):
    """One ImageNet-1k class the encoder's classifier sees in the image (`?labels=K`)."""

    model_config = ConfigDict(
        json_schema_extra={"example": {"name": "tabby, tabby cat", "class_id": 281, "probability": 0.61}}
    )

    name: str = Field(description="The class's name (ImageNet-1k's own, synonyms comma-separated).")
    class_id: int = Field(ge=0, description="The ImageNet-1k class id (0-999).")
    probability: float = Field(ge=0.0, le=1.0, description="The classifier's probability for this class.")

    @classmethod
    def of(cls, label: EngineLabel) -> Label:
        return cls(name=label.name, class_id=label.class_id, probability=label.probability)


class DecodingSettings(BaseModel):
    """The decoding settings actually used (after defaults and e.g. greedy = one beam)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "strategy": "beam",
                "beam_size": 3,
                "num_captions": 1,
                "max_length": 24,
                "length_penalty": 0.0,
                "no_repeat_ngram_size": 0,
            }
        }
    )

    strategy: Strategy
    beam_size: int
    num_captions: int
    max_length: int
    length_penalty: float
    no_repeat_ngram_size: int
    include: list[str] = Field(default_factory=list, description="The words every caption must contain, one entry "
                               "per constraint (alternatives joined by `|`).")
    guide: Guide = Field("none", description="`labels`: captions name the image's confident label words (each "
                         "image's answer has `guide`, the words that applied).")
    guide_threshold: float = Field(0.5, description="guide=labels: a label word's least probability.")
    guide_words: int = Field(1, description="guide=labels: the most label words that guide a caption.")

    @classmethod
    def of(cls, config: DecodingConfig, bundle_max_length: int, vocab: Sequence[str] = ()) -> DecodingSettings:
        """The settings `config` decodes with, as `DecodingConfig.resolved` works them out (greedy: one
        beam; max_length: the bundle's if unset); `vocab` spells the include words."""
        used = asdict(config.resolved(bundle_max_length))
        used["include"] = ["|".join(vocab[t] if t < len(vocab) else str(t) for t in group) for group in config.include]
        return cls.model_validate(used)


class GuideItem(BaseModel):
    """A word group that the image's own labels made its captions contain (`guide=labels`)."""

    model_config = ConfigDict(json_schema_extra={"example": {"words": ["cat", "cats"], "probability": 0.95}})

    words: list[str] = Field(description="The caption holds one of these (a word and its other forms).")
    probability: float = Field(ge=0.0, le=1.0, description="The sum of the probabilities of the ImageNet classes "
                               "whose caption words these are.")

    @classmethod
    def of(cls, word: GuideWord) -> GuideItem:
        return cls(words=list(word.words), probability=round(min(1.0, word.probability), 6))


class ModelRef(BaseModel):
    """Which model answered."""

    model_config = ConfigDict(json_schema_extra={"example": {"name": "flickr8k-sat-lite0", "version": "2.0.0"}})

    name: str
    version: str


class Timings(BaseModel):
    """Where the time went, in milliseconds."""

    model_config = ConfigDict(
        json_schema_extra={"example": {"decode_image": 4.2, "preprocess": 1.1, "inference": 38.5, "total": 45.0}}
    )

    decode_image: float = Field(description="Decoding the uploaded file(s) into pixels.")
    preprocess: float = Field(description="Resizing and normalising as the bundle's manifest says.")
    inference: float = Field(description="Encoder and decoder (including waiting for the engine).")
    total: float = Field(description="The whole request, as measured inside the service.")


class AttentionMap(BaseModel):
    """Where the model looked for each token of the best caption (`?attention=true`)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "grid": [2, 2],
                "tokens": ["a", "cat", "<end>"],
                "weights": [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]],
            }
        }
    )

    grid: list[int] = Field(
        min_length=2, max_length=2,
        description="[rows, cols] of the encoder's feature grid over the (stretched) image; P = rows * cols.",
    )
    tokens: list[str] = Field(
        description="One label per row of `weights`: the best caption's tokens as generated (special tokens "
        "such as <unk> included), then <end>."
    )
    weights: list[list[float]] = Field(
        description="Per token, P attention weights (they sum to 1), row-major over the grid: weight "
        "r * cols + c is grid cell (row r, column c), row 0 at the top of the upright image."
    )


class CaptionResponse(BaseModel):
    """Captions of one image."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "captions": [_example(CaptionItem)],
                "settings": _example(DecodingSettings),
                "model": _example(ModelRef),
                "timings_ms": _example(Timings),
                "request_id": _RID,
                "labels": [_example(Label)],
            }
        }
    )

    captions: list[CaptionItem] = Field(description="Best first; num_captions of them.")
    settings: DecodingSettings
    model: ModelRef
    timings_ms: Timings
    request_id: str
    attention: AttentionMap | None = Field(
        None, description="Only with `?attention=true`: the attention of the best caption (captions[0])."
    )
    labels: list[Label] | None = Field(
        None, description="The image's best ImageNet-1k labels, best first (`labels` of them; absent with labels=0 "
        "or a model without labels)."
    )
    guide: list[GuideItem] | None = Field(
        None, description="With guide=labels: the label words the captions had to contain (empty: no label word was "
        "confident enough); absent otherwise."
    )


class BatchItemError(BaseModel):
    """Why one file of a batch was not captioned."""

    model_config = ConfigDict(
        json_schema_extra={"example": {"code": "corrupt_image", "message": "the image data is truncated or corrupt"}}
    )

    code: str = Field(
        description="empty_file, unsupported_media_type, corrupt_image, image_too_large or file_too_large."
    )
    message: str


class BatchItem(BaseModel):
    """The result for one file of a batch: `captions` when it worked, `error` when it did not."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "index": 0,
                "filename": "cat.jpg",
                "captions": [_example(CaptionItem)],
                "labels": [_example(Label)],
            }
        }
    )

    index: int = Field(description="Position of the file in the request, from 0.")
    filename: str | None = Field(None, description="The file name the client sent, if any.")
    captions: list[CaptionItem] | None = Field(None, description="Present when the file was captioned.")
    labels: list[Label] | None = Field(
        None, description="The file's best ImageNet-1k labels, best first (when captioned and labels > 0)."
    )
    guide: list[GuideItem] | None = Field(
        None, description="With guide=labels: the label words the file's captions had to contain (when captioned)."
    )
    error: BatchItemError | None = Field(None, description="Present when the file could not be captioned.")


class BatchResponse(BaseModel):
    """One result per uploaded file, in the order they were sent."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "results": [
                    _example(BatchItem),
                    {
                        "index": 1,
                        "filename": "notes.txt",
                        "error": {
                            "code": "unsupported_media_type",
                            "message": "the upload is not an image in a supported format",
                        },
                    },
                ],
                "settings": _example(DecodingSettings),
                "model": _example(ModelRef),
                "timings_ms": _example(Timings),
                "request_id": _RID,
            }
        }
    )

    results: list[BatchItem]
    settings: DecodingSettings
    model: ModelRef
    timings_ms: Timings
    request_id: str


class Limits(BaseModel):
    """The service's input limits."""

    max_upload_bytes: int = Field(description="Largest image file, in bytes.")
    max_image_pixels: int = Field(description="Largest image, in pixels (width x height).")
    max_batch_files: int = Field(description="Most files in one batch request.")


class ModelInfo(BaseModel):
    """A summary of the loaded model bundle and how it runs."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "name": "flickr8k-sat-lite0",
                "version": "2.0.0",
                "created": "2026-12-01T09:00:00Z",
                "format_version": 2,
                "architecture": {
                    "encoder": "efficientnet-lite0",
                    "decoder": "show_attend_tell",
                    "attention": True,
                    "grid_size": [7, 7],
                    "feature_dim": 1280,
                    "hidden_dim": 512,
                    "vocab_size": 2575,
                },
                "preprocessing": {
                    "image_size": [224, 224],
                    "resize": "stretch",
                    "resample": "bilinear",
                    "color": "RGB",
                    "scale": 255.0,
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.5, 0.5, 0.5],
                    "layout": "NCHW",
                    "dtype": "float32",
                },
                "special_tokens": {"pad": 0, "start": 1, "end": 2, "unk": 3},
                "vocab_size": 2575,
                "max_length": 24,
                "attention": True,
                "labels": True,
                "default_labels": 3,
                "confidence_calibration": {"method": "logistic", "slope": 3.72, "intercept": 3.32, "threshold": 0.5,
                                           "fitted_on": "flickr8k val (1000 images), beam 3, ..."},
                "min_confidence": 0.0,
                "evaluation": {"split": "test", "images": 1000, "greedy": {"BLEU-4": 0.71, "CIDEr": 4.1}},
                "provider": "CPUExecutionProvider",
                "device": "cpu",
                "decoding_defaults": _example(DecodingSettings),
                "limits": {"max_upload_bytes": 10485760, "max_image_pixels": 40000000, "max_batch_files": 16},
            }
        }
    )

    name: str
    version: str
    created: str | None = None
    format_version: int
    architecture: dict[str, Any] = Field(description="The manifest's `architecture` block.")
    preprocessing: dict[str, Any] = Field(description="The manifest's `preprocessing` block.")
    special_tokens: dict[str, int]
    vocab_size: int
    max_length: int = Field(description="Most words the model generates per caption.")
    attention: bool
    labels: bool = Field(description="Whether the model answers ImageNet-1k labels (`?labels=K`).")
    default_labels: int = Field(description="Labels per image when a request does not say (0 for a model without).")
    label_words: bool = Field(False, description="Whether the model knows each label's caption words, so that "
                              "`guide=labels` can make its captions name what its labels see.")
    label_prior: bool = Field(False, description="Whether the model's decoder reads its own labels as it writes "
                              "(a label-conditioned decoder: docs/model-card.md).")
    confidence_calibration: dict[str, Any] | None = Field(
        None, description="The manifest's confidence calibration (docs/confidence.md); absent: captions get the raw "
        "confidence, the geometric mean of their token probabilities."
    )
    min_confidence: float = Field(
        0.0, description="The service's default min_confidence: captions below it are flagged low_confidence (0: none)."
    )
    evaluation: dict[str, Any] | None = Field(None, description="The manifest's evaluation metrics, if present.")
    provider: str = Field(description="The onnxruntime execution provider actually in use.")
    device: Literal["cpu", "cuda"]
    decoding_defaults: DecodingSettings
    limits: Limits


class Health(BaseModel):
    """The process is alive."""

    model_config = ConfigDict(json_schema_extra={"example": {"status": "ok"}})

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """The model is loaded and warmed up."""

    model_config = ConfigDict(
        json_schema_extra={"example": {"status": "ready", "model": {"name": "flickr8k-sat-lite0", "version": "2.0.0"}}}
    )

    status: Literal["ready"] = "ready"
    model: ModelRef


# ---- the model repository (app/serving/registry.py, app/api/routes/models.py) --------------------------------


class CheckResult(BaseModel):
    """One check a bundle passed before it was served."""

    name: Literal["sha256", "warmup", "smoke", "parity"] = Field(
        description="sha256: every file matches the manifest; warmup: the engine built and captioned a blank image; "
        "smoke: a greedy caption of a fixed input is not empty; parity: the manifest's reference captions "
        "(parity.reference) came out word for word.")
    passed: bool | None = Field(description="null: skipped (a bundle whose manifest records no reference captions).")
    detail: str


class LoadedModel(BaseModel):
    """A model version in memory."""

    model_config = ConfigDict(
        json_schema_extra={"example": {
            "name": "flickr8k-sat-lite0", "version": "2.0.0", "state": "active", "default": True,
            "provider": "CPUExecutionProvider", "device": "cpu", "memory_bytes": 21733120,
            "loaded_at": "2026-01-01T12:00:00Z", "load_seconds": 1.9, "in_flight": 3,
            "checks": [{"name": "sha256", "passed": True, "detail": "5 files match the manifest"}],
        }}
    )

    name: str
    version: str
    state: Literal["active", "draining"] = Field(
        description="active: new requests for its name get it; draining: replaced, finishing the requests that "
        "started on it, then unloaded.")
    default: bool = Field(description="Requests without `?model=` get this name.")
    provider: str = Field(description="The onnxruntime execution provider.")
    device: Literal["cpu", "cuda"]
    memory_bytes: int = Field(description="Bytes of its ONNX graphs (the weights its sessions hold).")
    loaded_at: str = Field(description="When it was loaded, UTC.")
    load_seconds: float = Field(description="Reading, checking and warming it up took this long.")
    in_flight: int = Field(description="Requests under way on it.")
    checks: list[CheckResult]


class RepositoryModel(BaseModel):
    """A name of the model repository and its versions."""

    name: str
    versions: list[str] = Field(description="The versions the repository holds, oldest first.")
    active: str | None = Field(description="The version serving it.")
    previous: list[str] = Field(description="The versions it served before, oldest first; rollback returns to the last.")


class ModelList(BaseModel):
    """What is loaded and what the repository holds."""

    default: str = Field(description="The model a request without `?model=` gets.")
    loaded: list[LoadedModel]
    repository: list[RepositoryModel]
    process_rss_bytes: int | None = Field(description="The service process's resident memory (Linux), all models "
                                          "included.")


class LoadRequest(BaseModel):
    """Which version to load."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"version": "2.0.0"}})

    version: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
                         description="A version of this name in the model repository.")


class WorkerSwitch(BaseModel):
    """With several worker processes: how many serve the version a load or rollback switched to."""

    switched: int = Field(ge=0, description="Live workers serving the new version when the answer was sent (the "
                          "one that answered included).")
    total: int = Field(ge=1, description="Live workers.")


class LoadResult(BaseModel):
    """A load or rollback that succeeded: the version now serving new requests."""

    name: str
    version: str = Field(description="The version now active.")
    previous: str | None = Field(description="The version it replaced (now draining), or null when nothing changed.")
    changed: bool = Field(description="false: that version was already the active one.")
    load_seconds: float = Field(description="Reading, checking and warming it up (0 when nothing changed).")
    checks: list[CheckResult]
    workers: WorkerSwitch | None = Field(
        None, description="Only with several worker processes (CAPTIONER_WORKERS > 1; absent otherwise): the swap "
        "reaches every worker, each loading and checking the version itself, and the answer waits for them (at most "
        "request_timeout_s). switched < total: a worker refused the version (its log says why) and keeps its own, "
        "or had not finished; sending the same request again retries it.")
