"""What a model bundle is, and how the serving side reads and checks one.

The bundle folder (manifest.json, vocab.json, encoder.onnx, decoder.onnx) is what the training side
hands to this service; docs/bundle-format.md describes it in full. `Manifest` is the one definition
of manifest.json: `load_bundle` reads it, and `captioner export` (model_export/export.py) and the
tests' bundle factory write it (`Manifest.to_json`). `load_bundle` validates the manifest, checks
every file's sha256 and the vocabulary, and raises `BundleError` (naming the file and the problem)
for anything missing or altered.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.inference.decoding import MAX_CONSTRAINTS, MAX_LENGTH_PENALTY, MAX_NO_REPEAT_NGRAM_SIZE, Guide

# 2: the decoder step's rows are image-major blocks (no row_image input); 1: rows gather their
# image's grid by a row_image input. This service reads both; the exporter writes 2.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
REQUIRED_FILES = ("encoder", "decoder", "vocab")
IMAGENET_OUTPUT = "imagenet_probs"  # the encoder's class-probability output, in bundles with labels
# A label-prior decoder's per-image input (and the encoder's output): each vocabulary word's probability
# from the encoder's ImageNet labels, [N, V] (docs/bundle-format.md, "The two graphs").
WORD_PRIOR = "word_prior"
MAX_LABELS = 20  # the most ImageNet labels a request (or the default_labels setting) may ask for per image
# A model name or version of a model repository (`<name>/<version>/`): the folders a repository serves.
MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_MODEL_NAME_RE = re.compile(rf"^{MODEL_NAME_PATTERN}$")


def scan_repository(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """A model repository's bundles: per name, the versions (folder order, unsorted) whose folder
    `<root>/<name>/<version>/` holds a manifest.json, where name and version match MODEL_NAME_PATTERN;
    and the `name/version` folders holding a manifest.json under a name or version that does not (not
    served: `_flickr/2.0.0`, `.hidden/1`). OSError if a folder cannot be listed."""
    found: dict[str, list[str]] = {}
    ignored: list[str] = []
    for name_dir in sorted(Path(root).iterdir()):
        if not name_dir.is_dir():
            continue
        for version_dir in sorted(name_dir.iterdir()):
            if not (version_dir.is_dir() and (version_dir / "manifest.json").is_file()):
                continue
            if _MODEL_NAME_RE.match(name_dir.name) and _MODEL_NAME_RE.match(version_dir.name):
                found.setdefault(name_dir.name, []).append(version_dir.name)
            else:
                ignored.append(f"{name_dir.name}/{version_dir.name}")
    return found, ignored


class BundleError(Exception):
    """A bundle that cannot be served; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class _Model(BaseModel):
    # extra="allow": keys from a newer exporter are kept, not refused; every key this project
    # writes is a typed field (unknown_keys() lists the rest). Fields whose JSON names are not
    # identifiers ("BLEU-4") have an alias and are read and written under it.
    model_config = ConfigDict(extra="allow", frozen=True, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True, ser_json_inf_nan="constants")


class Preprocessing(_Model):
    image_size: tuple[int, int] = Field(description="[height, width] fed to encoder.onnx")
    resize: Literal["stretch"] = "stretch"
    resample: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bilinear"
    color: Literal["RGB"] = "RGB"
    scale: float = 255.0
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) <= 0:
            raise ValueError("image_size must be positive")
        return v

    @field_validator("std")
    @classmethod
    def _nonzero(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s == 0 for s in v):
            raise ValueError("std must be non-zero")
        return v


class Architecture(_Model):
    encoder: str = Field(description="backbone name")
    decoder: Literal["show_attend_tell", "show_and_tell"]
    attention: bool = Field(description="decoder.onnx has an `alpha` output")
    grid_size: tuple[int, int] = Field(description="[rows, cols] of the feature grid: P = rows * cols")
    feature_dim: int
    # optional so that bundles written before they were recorded still load; the exporter writes them
    embed_dim: int | None = None
    hidden_dim: int
    attention_dim: int | None = None
    vocab_size: int
    encoder_fine_tuned_blocks: int | None = Field(None, description="backbone blocks trained with the decoder (0: frozen)")


class SpecialTokens(_Model):
    pad: int
    start: int
    end: int
    unk: int


class FileEntry(_Model):
    path: str
    sha256: str
    bytes: int | None = None


class ModelId(_Model):
    name: str
    version: str
    created: str | None = Field(None, description="when it was exported, UTC, YYYY-MM-DDTHH:MM:SSZ")


class RecommendedDecoding(_Model):
    """The decoding settings chosen for this model on its validation split (`captioner
    tune-decoding`); the service uses them where its own defaults are unset. (The evaluation
    block records the settings it decoded with in the same shape, without `chosen_on`.)"""

    length_penalty: float = Field(0.0, ge=0.0, le=MAX_LENGTH_PENALTY)
    no_repeat_ngram_size: int = Field(0, ge=0, le=MAX_NO_REPEAT_NGRAM_SIZE)
    # unset (older bundles): none, 0.5, 1
    guide: Guide | None = Field(None, description="labels: captions must name the image's confident label words "
                                "(needs labels.json `words`)")
    guide_threshold: float | None = Field(None, gt=0.0, le=1.0, description="guide=labels: a word group's least "
                                          "probability")
    guide_words: int | None = Field(None, ge=0, le=MAX_CONSTRAINTS, description="guide=labels: at most this many "
                                    "word groups")
    chosen_on: str | None = Field(None, description="what the choice was made on (dataset, split, images, criterion)")


class ConfidenceCalibration(_Model):
    """How the service calibrates a caption's confidence (app/inference/confidence.py): logistic(slope * the
    mean token log-probability + intercept), fitted by `captioner confidence` on the validation split
    to estimate the probability that the caption's CIDEr-D reaches `threshold`. Without this block
    the confidence is the raw geometric mean of the token probabilities."""

    method: Literal["logistic"] = Field("logistic", description="the curve: logistic over the mean token log-probability")
    slope: float = Field(gt=0.0, allow_inf_nan=False, description="> 0: a more probable caption never gets a lower confidence")
    intercept: float = Field(allow_inf_nan=False)
    threshold: float | None = Field(None, description="the per-image CIDEr-D whose reaching the confidence estimates")
    fitted_on: str | None = Field(None, description="what it was fitted on (dataset, split, images, decoding)")


# ---- what the service does not need: how the model was trained, proved and scored -------------
# Every field of these blocks is optional, so that they can never stop a bundle from loading; the
# exporter writes all of them.


class SplitCounts(_Model):
    images: int | None = None
    captions: int | None = None


class TrainingData(_Model):
    """The training data set (`CaptionDataset.summary()`, plus its terms of use)."""

    name: str | None = None
    source: str | None = None
    splits: dict[str, SplitCounts] | None = None
    images: int | None = None
    captions: int | None = None
    dropped_images: int | None = None
    terms: str | None = Field(None, description="the data's terms of use, which a model trained on it inherits")


class EpochRecord(_Model):
    """One epoch of the training history (validation scores: greedy captions on the val split)."""

    epoch: int | None = None
    train_loss: float | None = None
    bleu4: float | None = Field(None, alias="BLEU-4")
    cider: float | None = Field(None, alias="CIDEr")
    seconds: float | None = None
    stage: str | None = Field(None, description="'self_critical' for epochs of self-critical (CIDEr reward) training")
    train_cider_sample: float | None = None
    train_cider_greedy: float | None = None


class Training(_Model):
    data: TrainingData | None = None
    epochs: int | None = None
    best_val_cider: float | None = None
    history: list[EpochRecord] | None = None
    settings: dict[str, Any] | None = Field(None, description="the training run's settings (model_export's TrainConfig)")
    checkpoint: str | None = None


class ReferenceCaption(_Model):
    """One reference caption: the greedy caption of the encoder input `reference_input(seed, ...)`."""

    seed: int = Field(ge=0, description="the seed of the deterministic encoder input (app/inference/bundle.py reference_input)")
    tokens: list[str] = Field(description="the greedy caption's words, special tokens left out")


def reference_input(seed: int, preprocessing: Preprocessing) -> np.ndarray:
    """The deterministic encoder input [3, H, W] of a reference caption: a 3 x 3 grid of seeded flat
    colours in [-1, 1] (no image file, so no decoder or resampling can change it between exporter and
    service). Flat regions, unlike pixel noise, get captions that differ from seed to seed and from
    model to model, which is what makes the comparison worth doing."""
    height, width = preprocessing.image_size
    cells = np.random.default_rng(seed).uniform(-1.0, 1.0, (3, 3, 3)).astype(np.float32)
    rows = np.minimum(np.arange(height) * 3 // height, 2)
    cols = np.minimum(np.arange(width) * 3 // width, 2)
    return np.ascontiguousarray(cells[:, rows][:, :, cols])


class Parity(_Model):
    """What `captioner export` proved before it wrote the bundle: torch vs onnxruntime. `reference`:
    greedy captions of a few deterministic inputs, which the service re-captions before it switches
    to the bundle (`POST /v1/models/{name}/load`)."""

    tolerance: float | None = None
    precision: Literal["fp32", "fp16", "int8"] | None = None
    encoder_max_abs_random: float | None = None
    step_max_abs_random: float | None = None
    encoder_max_abs_real: float | None = None
    step_max_abs_real: float | None = None
    labels_max_abs_random: float | None = Field(None, description="the ImageNet probabilities (bundles with labels)")
    labels_max_abs_real: float | None = None
    greedy_identical: int | None = None
    beam3_identical: int | None = None
    images: int | None = None
    split: str | None = None
    reference: list[ReferenceCaption] | None = Field(
        None, description="greedy captions of deterministic inputs, checked by the service before it serves the bundle")


class Accuracy(_Model):
    images: int | None = None
    correct: int | None = None
    accuracy: float | None = None


class AttributeAccuracy(_Model):
    """Synthetic scenes only: captions naming exactly the scene's (colour, shape) objects."""

    all: Accuracy | None = None
    by_objects: dict[str, Accuracy] | None = None


class Scores(_Model):
    bleu1: float | None = Field(None, alias="BLEU-1")
    bleu2: float | None = Field(None, alias="BLEU-2")
    bleu3: float | None = Field(None, alias="BLEU-3")
    bleu4: float | None = Field(None, alias="BLEU-4")
    meteor: float | None = Field(None, alias="METEOR")
    rouge_l: float | None = Field(None, alias="ROUGE-L")
    cider: float | None = Field(None, alias="CIDEr")
    repeated_bigram_share: float | None = None
    attributes: AttributeAccuracy | None = None


class Evaluation(_Model):
    """`captioner evaluate` on the new bundle (its full output is eval.json)."""

    split: str | None = None
    images: int | None = None
    dataset: str | None = Field(None, description="the evaluation data set's name")
    decoding: RecommendedDecoding | None = None
    greedy: Scores | None = None
    beam3: Scores | None = None
    beam5: Scores | None = None


class Labels(_Model):
    """The encoder's ImageNet head: encoder.onnx has a further output of class probabilities per
    image (the pretrained backbone's own classifier on the pooled grid), and labels.json (files.labels)
    names the classes in class-id order."""

    output: str = Field(IMAGENET_OUTPUT, description="the encoder output: [N, classes] probabilities")
    classes: int = Field(1000, gt=0, description="how many classes (ImageNet-1k: 1000)")
    source: str | None = Field(None, description="where the class names came from")
    words_source: str | None = Field(None, description="where labels.json's caption words per class came from "
                                     "(bundles whose labels.json has `words`)")


class Manifest(_Model):
    """manifest.json: read by `load_bundle`, written (`to_json`) by `captioner export` and the tests' bundle factory."""

    format_version: int
    model: ModelId
    architecture: Architecture
    preprocessing: Preprocessing
    special_tokens: SpecialTokens
    max_length: int = Field(gt=0)
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    decoding: RecommendedDecoding | None = None
    confidence: ConfidenceCalibration | None = None
    labels: Labels | None = None
    files: dict[str, FileEntry]
    training: Training | None = None
    parity: Parity | None = None
    evaluation: Evaluation | None = None
    export_seconds: float | None = None

    def to_json(self) -> str:
        """The manifest.json text: fields in declaration order, unset optional blocks left out."""
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"


def unknown_keys(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the keys in `model` (and the models inside it) that no field describes."""
    found = [f"{prefix}{key}" for key in (model.model_extra or {})]
    for name in type(model).model_fields:
        found += _unknown_in(getattr(model, name), f"{prefix}{name}")
    return found


def _unknown_in(value: Any, path: str) -> list[str]:
    if isinstance(value, BaseModel):
        return unknown_keys(value, f"{path}.")
    if isinstance(value, dict):
        return [k for key, item in value.items() for k in _unknown_in(item, f"{path}.{key}")]
    if isinstance(value, (list, tuple)):
        return [k for i, item in enumerate(value) for k in _unknown_in(item, f"{path}[{i}]")]
    return []


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Bundle:
    """A checked bundle: the parsed manifest (`manifest`, a `Manifest`), the vocabulary, the
    paths of the two graphs and, in a bundle with an ImageNet head, the class names (`labels`)."""

    def __init__(self, path: Path, manifest: Manifest, vocab: list[str], labels: list[str] | None = None):
        self.path = path
        self.manifest = manifest
        self.vocab = vocab
        self.name = manifest.model.name
        self.version = manifest.model.version
        self.special = manifest.special_tokens.model_dump()
        self.max_length = manifest.max_length
        self.attention = manifest.architecture.attention
        self.preprocessing = manifest.preprocessing
        self.encoder_path = path / manifest.files["encoder"].path
        self.decoder_path = path / manifest.files["decoder"].path
        self.recommended_decoding = manifest.decoding or RecommendedDecoding()
        self.confidence_calibration = manifest.confidence  # None: captions get the raw confidence
        self.labels = labels  # class names by class id (labels.json), or None: no ImageNet head
        # per class, its caption words as groups of forms ([["cat", "cats"]]; labels.json `words`), or None
        self.label_words: list[list[list[str]]] | None = None
        self.token_ids = {w: i for i, w in enumerate(vocab)}

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def words(self, token_ids: list[int]) -> list[str]:
        """Token strings for ids, special tokens left out."""
        specials = set(self.special.values())
        return [self.vocab[i] for i in token_ids if i not in specials]


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle folder. `verify=False` skips the sha256 pass (tests of broken files)."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(root, "bundle folder does not exist")
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise BundleError(manifest_path, "missing manifest.json")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(manifest_path, f"cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(manifest_path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise BundleError(manifest_path, "manifest must be a JSON object")
    version = raw.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS or isinstance(version, bool):
        readable = " and ".join(map(str, READABLE_FORMAT_VERSIONS))
        raise BundleError(manifest_path, f"unsupported format_version {version!r} (this service reads {readable})")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BundleError(manifest_path, f"invalid manifest: {problems}") from None

    for key in REQUIRED_FILES:
        if key not in manifest.files:
            raise BundleError(manifest_path, f"files.{key} is missing")
    for key, entry in manifest.files.items():
        file_path = (root / entry.path).resolve()
        if root.resolve() not in file_path.parents:
            raise BundleError(manifest_path, f"files.{key} points outside the bundle: {entry.path}")
        if not file_path.is_file():
            raise BundleError(root / entry.path, f"missing file listed in manifest.json as files.{key}")
        if verify:
            actual = sha256_file(file_path)
            if actual != entry.sha256:
                raise BundleError(
                    root / entry.path,
                    f"sha256 mismatch: manifest says {entry.sha256[:16]}…, file has {actual[:16]}… (altered or corrupt)",
                )

    vocab_path = root / manifest.files["vocab"].path
    try:
        vocab_raw = json.loads(vocab_path.read_text(encoding="utf-8"))
        tokens = vocab_raw["tokens"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BundleError(vocab_path, f"not a vocabulary file ({type(exc).__name__}: {exc})") from None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise BundleError(vocab_path, "tokens must be a list of strings")
    if len(tokens) != manifest.architecture.vocab_size:
        raise BundleError(vocab_path, f"has {len(tokens)} tokens, manifest says vocab_size {manifest.architecture.vocab_size}")
    for name, index in manifest.special_tokens.model_dump().items():
        if not 0 <= index < len(tokens):
            raise BundleError(manifest_path, f"special token {name} id {index} is outside the vocabulary")
    names, words = _read_labels(root, manifest, manifest_path, set(tokens))
    bundle = Bundle(root, manifest, tokens, names)
    bundle.label_words = words
    return bundle


def _read_labels(root: Path, manifest: Manifest, manifest_path: Path,
                 vocab: set[str]) -> tuple[list[str] | None, list[list[list[str]]] | None]:
    """The class names of a bundle with an ImageNet head (manifest `labels` and files.labels go
    together), and the caption words per class where labels.json has them (each a vocabulary word)."""
    if manifest.labels is None and "labels" not in manifest.files:
        return None, None
    if manifest.labels is None or "labels" not in manifest.files:
        raise BundleError(manifest_path, "the `labels` block and files.labels go together: one is missing")
    labels_path = root / manifest.files["labels"].path
    try:
        content = json.loads(labels_path.read_text(encoding="utf-8"))
        names = content["names"]
        words = content.get("words")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(labels_path, f"not a labels file ({type(exc).__name__}: {exc})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise BundleError(labels_path, "names must be a list of non-empty strings")
    if len(names) != manifest.labels.classes:
        raise BundleError(labels_path, f"has {len(names)} names, manifest says {manifest.labels.classes} classes")
    if words is not None:
        shape_ok = isinstance(words, list) and len(words) == len(names) and all(
            isinstance(groups, list) and all(isinstance(g, list) and g and all(isinstance(w, str) for w in g) for g in groups)
            for groups in words)
        if not shape_ok:
            raise BundleError(labels_path, "words must be one list per class of word groups (non-empty lists of words)")
        unknown = sorted({w for groups in words for g in groups for w in g} - vocab)
        if unknown:
            raise BundleError(labels_path, f"words outside the vocabulary: {', '.join(unknown[:5])}")
    return names, words
