"""What a model bundle is, and how the serving side reads and checks one.

The bundle folder (manifest.json, vocab.json, encoder.onnx, decoder.onnx) is the only contract
between the training side and this service; docs/bundle-format.md describes it in full.
`load_bundle` validates the manifest, checks every file's sha256 and the vocabulary, and raises
`BundleError` (naming the file and the problem) for anything missing or altered.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# 2: the decoder step's rows are image-major blocks (no row_image input); 1: rows gather their
# image's grid by a row_image input. This service reads both; the exporter writes 2.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
REQUIRED_FILES = ("encoder", "decoder", "vocab")


class BundleError(Exception):
    """A bundle that cannot be served; the message names the file and the problem."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


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
    encoder: str
    decoder: Literal["show_attend_tell", "show_and_tell"]
    attention: bool
    grid_size: tuple[int, int]
    feature_dim: int
    hidden_dim: int
    vocab_size: int


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


class RecommendedDecoding(_Model):
    """The decoding settings chosen for this model on its validation split (`captioner
    tune-decoding`); the service uses them where its own defaults are unset."""

    length_penalty: float = Field(0.0, ge=0.0, le=5.0)
    no_repeat_ngram_size: int = Field(0, ge=0, le=10)


class Manifest(_Model):
    format_version: int
    model: ModelId
    architecture: Architecture
    preprocessing: Preprocessing
    special_tokens: SpecialTokens
    max_length: int = Field(gt=0)
    files: dict[str, FileEntry]
    decoding: RecommendedDecoding | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Bundle:
    """A checked bundle: the parsed manifest, the vocabulary and the paths of the two graphs."""

    def __init__(self, path: Path, manifest: Manifest, raw: dict, vocab: list[str]):
        self.path = path
        self.manifest = raw
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
    return Bundle(root, manifest, raw, tokens)
