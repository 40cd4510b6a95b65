"""COCO captions loader: a tiny ``captions_*.json`` fixture and the bad-input cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from model_export.data import DatasetError, load_coco_captions, tokenize
from tests.support.edits import DELETE, changed


def _fixture() -> dict[str, Any]:
    return {
        "info": {"description": "COCO 2014 Dataset"},
        "licenses": [],
        "images": [
            {"id": 391895, "file_name": "COCO_val2014_000000391895.jpg", "height": 360, "width": 640},
            {"id": 522418, "file_name": "COCO_val2014_000000522418.jpg", "height": 480, "width": 640},
            {"id": 184613, "file_name": "COCO_val2014_000000184613.jpg", "height": 336, "width": 500},
        ],
        "annotations": [
            {"image_id": 391895, "id": 1, "caption": "A man with a red helmet on a small moped on a dirt road. "},
            {"image_id": 184613, "id": 2, "caption": "A child holding a flowered umbrella and petting a yak."},
            {"image_id": 391895, "id": 3, "caption": "Man riding a motor bike on a dirt road on the countryside."},
        ],
    }  # fmt: skip


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_loads(tmp_path: Path) -> None:
    path = _write(tmp_path, _fixture())
    dataset = load_coco_captions(path, tmp_path / "val2014", "val")
    assert dataset.source == path
    assert [e.image_id for e in dataset.examples] == [391895, 184613]  # 522418 has no caption
    first = dataset.examples[0]
    assert first.image_path == tmp_path / "val2014" / "COCO_val2014_000000391895.jpg"
    assert first.split == "val"
    assert first.references[0] == tokenize("a man with a red helmet on a small moped on a dirt road")
    assert first.references[1][:3] == ["man", "riding", "a"]
    assert first.extra == {"height": 360, "width": 640}
    assert len(dataset.split("val")) == 2
    summary = dataset.summary()
    assert summary["dropped_images"] == 1
    assert summary["splits"] == {"val": {"images": 2, "captions": 3}}
    with pytest.raises(DatasetError, match="split 'train' is empty"):
        dataset.split("train")


def _changed(*keys: Any, to: Any) -> dict[str, Any]:
    """The fixture with the item at ``keys`` replaced by ``to`` (or removed when ``to`` is DELETE)."""
    return changed(_fixture(), *keys, to=to)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ('{\n  "images": [}', "invalid JSON at line 2 column 14"),
        ([], "top level is not a JSON object"),
        (_changed("images", to=DELETE), "no 'images' key"),
        (_changed("annotations", to=DELETE), "no 'annotations' key"),
        (_changed("annotations", to={}), "'annotations' is not a list"),
        (_changed("images", 0, to=5), "images[0] is not an object"),
        (_changed("images", 1, "file_name", to=DELETE), "images[1] has no 'file_name'"),
        (_changed("images", 1, "id", to=DELETE), "images[1] has no 'id'"),
        (_changed("images", 1, "id", to=1.5), "images[1].id is not an integer"),
        (_changed("images", 2, "id", to=391895), "images[2] repeats image id 391895"),
        (_changed("annotations", 1, "caption", to=DELETE), "annotations[1] has no 'caption'"),
        (_changed("annotations", 1, "caption", to=None), "annotations[1].caption is not a string"),
        (_changed("annotations", 2, "caption", to=" ?! "), "annotations[2] is an empty caption"),
        (_changed("annotations", 2, "image_id", to=42), "annotations[2] refers to unknown image id 42"),
        (_changed("annotations", to=[]), "no image has a caption"),
    ],
)
def test_bad_input(tmp_path: Path, data: Any, problem: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError) as err:
        load_coco_captions(path, tmp_path, "train")
    assert err.value.path == str(path)
    assert problem in err.value.problem
    assert str(err.value).startswith(f"{path}: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found"):
        load_coco_captions(tmp_path / "captions_train2014.json", tmp_path, "train")
