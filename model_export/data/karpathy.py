"""Caption datasets in memory, and the loader for Karpathy split files (``dataset_coco.json`` etc.).

The Karpathy format::

    {"dataset": "coco",
     "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                 "imgid": 0, "split": "test", "sentids": [0, 1], "cocoid": 391895,
                 "sentences": [{"tokens": ["a", "man"], "raw": "A man.", "imgid": 0, "sentid": 0}]}]}

``filepath`` is optional (Flickr files have none). Images are not opened while loading; call
:func:`check_images` for that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import DatasetError

__all__ = [
    "CaptionDataset",
    "Example",
    "check_images",
    "load_karpathy",
    "read_json_file",
    "tokenize",
]

_WORD = re.compile(r"[a-z0-9']+")

# Keys of an image entry that the loader turns into Example fields; all others go to `extra`.
_CONSUMED_KEYS = frozenset({"filepath", "filename", "split", "sentences", "sentids"})


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into ``[a-z0-9']`` words, dropping punctuation.

    Apostrophes are kept inside words ("man's") but stripped at word ends (quotes).
    """
    words = (w.strip("'") for w in _WORD.findall(text.lower()))
    return [w for w in words if w]


@dataclass
class Example:
    """One image and its reference captions (token lists, lower-case)."""

    image_path: Path
    split: str
    references: list[list[str]]
    image_id: str | int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaptionDataset:
    """All examples of one dataset file; ``source`` is the file they came from."""

    name: str
    examples: list[Example]
    source: Path
    dropped_images: int = 0  # images left out while loading (COCO: images without captions)
    terms: str | None = None  # the data's terms of use, where the loader knows them (carried into bundles)

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name``; ``"train"`` includes ``"restval"`` (as Karpathy does).

        Raises DatasetError naming the source file when the split is empty.
        """
        wanted = {"train", "restval"} if name == "train" else {name}
        examples = [e for e in self.examples if e.split in wanted]
        if not examples:
            present = sorted({e.split for e in self.examples})
            raise DatasetError(self.source, f"split {name!r} is empty (splits present: {present})")
        return examples

    def summary(self) -> dict[str, Any]:
        """Image and caption counts, per split (as stored, ``restval`` separate) and in total."""
        splits: dict[str, dict[str, int]] = {}
        for e in self.examples:
            counts = splits.setdefault(e.split, {"images": 0, "captions": 0})
            counts["images"] += 1
            counts["captions"] += len(e.references)
        return {
            "name": self.name,
            "source": str(self.source),
            "splits": splits,
            "images": len(self.examples),
            "captions": sum(c["captions"] for c in splits.values()),
            "dropped_images": self.dropped_images,
            **({"terms": self.terms} if self.terms else {}),
        }


def read_json_file(path: str | PathLike[str]) -> Any:
    """Parse a JSON file; a missing file or invalid JSON raises DatasetError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"cannot read file: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sentence_tokens(path: Path, where: str, sentence: Any) -> list[str]:
    """The lower-cased tokens of one Karpathy sentence; tokenises ``raw`` when tokens are missing."""
    if not isinstance(sentence, dict):
        raise DatasetError(path, f"{where} is not an object")
    tokens = sentence.get("tokens")
    if tokens is not None:
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DatasetError(path, f"{where}.tokens is not a list of strings")
        tokens = [t.lower() for t in tokens if t.strip()]
    if not tokens:
        raw = sentence.get("raw")
        if raw is None:
            raise DatasetError(path, f"{where} has no tokens and no raw text")
        if not isinstance(raw, str):
            raise DatasetError(path, f"{where}.raw is not a string")
        tokens = tokenize(raw)
    if not tokens:
        raise DatasetError(path, f"{where} is an empty caption")
    return tokens


def _example(path: Path, image_root: Path, index: int, entry: Any) -> Example:
    where = f"images[{index}]"
    if not isinstance(entry, dict):
        raise DatasetError(path, f"{where} is not an object")
    for key in ("filename", "split", "sentences"):
        if key not in entry:
            raise DatasetError(path, f"{where} has no {key!r}")
    filename, split, sentences = entry["filename"], entry["split"], entry["sentences"]
    filepath = entry.get("filepath", "")
    if not isinstance(filename, str) or not filename:
        raise DatasetError(path, f"{where}.filename is not a non-empty string")
    if not isinstance(filepath, str):
        raise DatasetError(path, f"{where}.filepath is not a string")
    if not isinstance(split, str) or not split:
        raise DatasetError(path, f"{where}.split is not a non-empty string")
    if not isinstance(sentences, list):
        raise DatasetError(path, f"{where}.sentences is not a list")
    if not sentences:
        raise DatasetError(path, f"{where} ({filename}) has an empty sentence list")
    references = [_sentence_tokens(path, f"{where}.sentences[{j}]", s) for j, s in enumerate(sentences)]
    # COCO's own id when there is one (what COCO evaluation tools use), else Karpathy's imgid.
    image_id: str | int = filename
    for key in ("cocoid", "imgid"):
        if _is_int(entry.get(key)) or isinstance(entry.get(key), str):
            image_id = entry[key]
            break
    extra = {k: v for k, v in entry.items() if k not in _CONSUMED_KEYS}
    return Example(image_root / filepath / filename, split, references, image_id, extra)


def load_karpathy(json_path: str | PathLike[str], image_root: str | PathLike[str]) -> CaptionDataset:
    """Load a Karpathy split file; image paths are ``image_root / filepath / filename``.

    ``Example.image_id`` is ``cocoid`` when present, else ``imgid``, else the file name. Images
    are not opened. Any structural problem raises DatasetError naming the file and the problem.
    """
    path = Path(json_path)
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise DatasetError(path, "top level is not a JSON object")
    if "images" not in data:
        raise DatasetError(path, "no 'images' key")
    images = data["images"]
    if not isinstance(images, list):
        raise DatasetError(path, "'images' is not a list")
    if not images:
        raise DatasetError(path, "'images' is empty")
    root = Path(image_root)
    examples = [_example(path, root, i, entry) for i, entry in enumerate(images)]
    name = data.get("dataset")
    return CaptionDataset(name if isinstance(name, str) and name else path.stem, examples, path)


def check_images(examples: Iterable[Example]) -> None:
    """Open and decode every example's image; the first bad one raises DatasetError.

    JPEGs are decoded in draft (reduced-scale) mode, which reads the whole file, so truncated
    files are caught while staying cheap.
    """
    for example in examples:
        try:
            with Image.open(example.image_path) as image:
                image.draft("RGB", (64, 64))
                image.load()
        except FileNotFoundError:
            raise DatasetError(example.image_path, "cannot read image: file not found") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(example.image_path, f"cannot read image: {exc}") from None
