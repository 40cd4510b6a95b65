"""Loader for Flickr8k in the form its authors distribute it (what a user who requests it receives).

::

    Flickr8k.token.txt          <image>.jpg#<n><TAB><caption>      (5 lines per image)
    Flickr_8k.trainImages.txt   one image file name per line       (6,000)
    Flickr_8k.devImages.txt                                         (1,000: our "val")
    Flickr_8k.testImages.txt                                        (1,000)
    Flicker8k_Dataset/          the JPEGs (the archive's folder name keeps its typo)

Images that have captions and a file but are in no list become ``restval`` (91 in Flickr8k;
:meth:`CaptionDataset.split` folds them into ``train``, as Karpathy's split does). A caption key
without an image file that no list names is left out and counted in ``dropped_images``: every copy
of the dataset has one, ``2258277193_586949ec62.jpg.1``. An image that a list names but that has no
captions or no file is an error. Captions are tokenised like the other loaders' raw text.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from .errors import DatasetError
from .karpathy import CaptionDataset, Example, tokenize

__all__ = ["TOKEN_FILE", "SPLIT_FILES", "find_flickr8k", "load_flickr8k"]

TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
# Where the images are, tried in order, relative to the dataset folder.
IMAGE_FOLDERS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "images", "Images", ".")
TERMS = ("Flickr8k is distributed by its authors (University of Illinois) for research purposes; the photographs "
         "remain their Flickr owners' copyright, and a model trained on it inherits these terms. Cite: M. Hodosh, "
         "P. Young, J. Hockenmaier, 'Framing Image Description as a Ranking Task: Data, Models and Evaluation Metrics', "
         "JAIR 47, 2013.")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"cannot read file: {exc}") from None


def find_flickr8k(folder: str | PathLike[str]) -> tuple[Path, Path]:
    """(text folder, image folder) of a Flickr8k folder: the text files in it or in ``text/``
    (the archives ``Flickr8k_text``), the images in the first of IMAGE_FOLDERS that has JPEGs."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(root, "not a folder")
    text = next((d for d in (root, root / "text", root / "Flickr8k_text") if (d / TOKEN_FILE).is_file()), None)
    if text is None:
        raise DatasetError(root, f"no {TOKEN_FILE} in it, nor in text/ or Flickr8k_text/")
    for name in IMAGE_FOLDERS:
        candidate = root / name
        if candidate.is_dir() and next(candidate.glob("*.jpg"), None) is not None:
            return text, candidate
    raise DatasetError(root, f"no image folder with JPEGs (looked for {', '.join(IMAGE_FOLDERS)})")


def load_flickr8k(text_dir: str | PathLike[str], image_dir: str | PathLike[str]) -> CaptionDataset:
    """Flickr8k from ``Flickr8k.token.txt`` and the three split lists in ``text_dir``, images in
    ``image_dir`` (only their existence is checked). Raises DatasetError naming the file and line."""
    text_dir, image_dir = Path(text_dir), Path(image_dir)
    token_path = text_dir / TOKEN_FILE
    captions: dict[str, list[tuple[int, list[str]]]] = {}
    for number, line in enumerate(_read_lines(token_path), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, index = key.partition("#")
        if not tab or not hash_ or not name:
            raise DatasetError(token_path, f"line {number}: expected '<image>#<n><TAB><caption>'")
        if not index.isdigit():
            raise DatasetError(token_path, f"line {number}: caption number {index!r} is not an integer")
        tokens = tokenize(caption)
        if not tokens:
            raise DatasetError(token_path, f"line {number}: empty caption for {name}")
        captions.setdefault(name, []).append((int(index), tokens))
    if not captions:
        raise DatasetError(token_path, "no captions")

    split_of: dict[str, str] = {}
    for split, filename in SPLIT_FILES.items():
        list_path = text_dir / filename
        for number, line in enumerate(_read_lines(list_path), start=1):
            name = line.strip()
            if not name:
                continue
            if name in split_of:
                raise DatasetError(list_path, f"line {number}: {name} is already in the {split_of[name]} list")
            if name not in captions:
                raise DatasetError(list_path, f"line {number}: {name} has no captions in {TOKEN_FILE}")
            split_of[name] = split

    examples: list[Example] = []
    dropped = 0
    for name, numbered in captions.items():
        path = image_dir / name
        if not path.is_file():
            if name in split_of:
                raise DatasetError(path, f"image file not found (listed in {SPLIT_FILES[split_of[name]]})")
            dropped += 1  # e.g. the "2258277193_586949ec62.jpg.1" key of every Flickr8k copy
            continue
        references = [tokens for _, tokens in sorted(numbered, key=lambda item: item[0])]
        examples.append(Example(path, split_of.get(name, "restval"), references, name))
    return CaptionDataset("flickr8k", examples, token_path, dropped_images=dropped, terms=TERMS)
