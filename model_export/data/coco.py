"""Loader for COCO caption annotation files (``captions_train2014.json`` style).

::

    {"info": {...},
     "images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", "height": 360, "width": 640}],
     "annotations": [{"image_id": 391895, "id": 1, "caption": "A man with a red helmet ..."}]}
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

from .errors import DatasetError
from .karpathy import CaptionDataset, Example, read_json_file, tokenize

__all__ = ["load_coco_captions"]


def _list_of_objects(path: Path, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    if key not in data:
        raise DatasetError(path, f"no {key!r} key")
    items = data[key]
    if not isinstance(items, list):
        raise DatasetError(path, f"{key!r} is not a list")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DatasetError(path, f"{key}[{i}] is not an object")
    return items


def _image_id(path: Path, where: str, value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DatasetError(path, f"{where} is not an integer or string id")
    return value


def load_coco_captions(
    captions_json: str | PathLike[str], image_dir: str | PathLike[str], split: str
) -> CaptionDataset:
    """Load a COCO captions file; every image gets ``split`` and path ``image_dir / file_name``.

    Captions are tokenised with :func:`tokenize`. Images without annotations are dropped
    (counted in ``summary()["dropped_images"]``); an annotation for an unknown image id, or any
    other structural problem, raises DatasetError naming the file and the problem.
    """
    path = Path(captions_json)
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise DatasetError(path, "top level is not a JSON object")
    images = _list_of_objects(path, data, "images")
    annotations = _list_of_objects(path, data, "annotations")

    references: dict[int | str, list[list[str]]] = {}
    for i, image in enumerate(images):
        for key in ("id", "file_name"):
            if key not in image:
                raise DatasetError(path, f"images[{i}] has no {key!r}")
        image_id = _image_id(path, f"images[{i}].id", image["id"])
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise DatasetError(path, f"images[{i}].file_name is not a non-empty string")
        if image_id in references:
            raise DatasetError(path, f"images[{i}] repeats image id {image_id!r}")
        references[image_id] = []

    for i, annotation in enumerate(annotations):
        for key in ("image_id", "caption"):
            if key not in annotation:
                raise DatasetError(path, f"annotations[{i}] has no {key!r}")
        image_id = _image_id(path, f"annotations[{i}].image_id", annotation["image_id"])
        caption = annotation["caption"]
        if not isinstance(caption, str):
            raise DatasetError(path, f"annotations[{i}].caption is not a string")
        if image_id not in references:
            raise DatasetError(path, f"annotations[{i}] refers to unknown image id {image_id!r}")
        tokens = tokenize(caption)
        if not tokens:
            raise DatasetError(path, f"annotations[{i}] is an empty caption")
        references[image_id].append(tokens)

    root = Path(image_dir)
    examples = [
        Example(
            image_path=root / image["file_name"],
            split=split,
            references=references[image["id"]],
            image_id=image["id"],
            extra={k: v for k, v in image.items() if k not in ("id", "file_name")},
        )
        for image in images
        if references[image["id"]]
    ]
    if not examples:
        raise DatasetError(path, "no image has a caption")
    return CaptionDataset("coco", examples, path, dropped_images=len(images) - len(examples))
