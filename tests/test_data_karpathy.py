"""Karpathy split loader: a tiny fixture in the real format, and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from model_export.data import CaptionDataset, DatasetError, check_images, load_karpathy, tokenize
from tests.support.edits import DELETE, changed


def _sentence(tokens: list[str], imgid: int, sentid: int) -> dict[str, Any]:
    return {"tokens": tokens, "raw": " ".join(tokens).capitalize() + ".", "imgid": imgid, "sentid": sentid}


def _fixture() -> dict[str, Any]:
    return {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "COCO_val2014_000000391895.jpg",
                "imgid": 0,
                "split": "test",
                "sentids": [0, 1],
                "cocoid": 391895,
                "sentences": [
                    _sentence(["a", "man", "with", "a", "red", "helmet"], 0, 0),
                    _sentence(["A", "Man", "riding", "a", "bike"], 0, 1),
                ],
            },
            {
                "filename": "1000268201_693b08cb0e.jpg",  # Flickr style: no filepath
                "imgid": 1,
                "split": "train",
                "sentids": [2],
                "sentences": [{"raw": "A child in a pink dress, climbing stairs!", "imgid": 1, "sentid": 2}],
                "scene": {"objects": []},
            },
            {
                "filepath": "train2014",
                "filename": "COCO_train2014_000000000009.jpg",
                "imgid": 2,
                "split": "restval",
                "sentids": [3],
                "cocoid": 9,
                "sentences": [_sentence(["two", "plates", "of", "food"], 2, 3)],
            },
        ],
    }


def _write(tmp_path: Path, data: Any, name: str = "dataset_coco.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> CaptionDataset:
    root = tmp_path / "images"
    (root / "val2014").mkdir(parents=True)
    Image.new("RGB", (8, 6), (200, 10, 10)).save(root / "val2014" / "COCO_val2014_000000391895.jpg")
    Image.new("RGB", (5, 9), (10, 200, 10)).save(root / "1000268201_693b08cb0e.jpg")
    return load_karpathy(_write(tmp_path, _fixture()), root)


def test_tokenize() -> None:
    assert tokenize("A man's red-helmet, 2 bikes!") == ["a", "man's", "red", "helmet", "2", "bikes"]
    assert tokenize("'Quoted' words...") == ["quoted", "words"]
    assert tokenize(" ,. ") == []


def test_loads_examples(dataset: CaptionDataset, tmp_path: Path) -> None:
    root = tmp_path / "images"
    assert dataset.name == "coco"
    assert dataset.source == tmp_path / "dataset_coco.json"
    first, second, third = dataset.examples
    assert first.image_path == root / "val2014" / "COCO_val2014_000000391895.jpg"
    assert first.split == "test"
    assert first.image_id == 391895
    assert first.references == [["a", "man", "with", "a", "red", "helmet"], ["a", "man", "riding", "a", "bike"]]
    assert first.extra == {"imgid": 0, "cocoid": 391895}
    assert second.image_path == root / "1000268201_693b08cb0e.jpg"
    assert second.image_id == 1
    assert second.references == [["a", "child", "in", "a", "pink", "dress", "climbing", "stairs"]]
    assert second.extra["scene"] == {"objects": []}
    assert third.split == "restval"


def test_splits_and_summary(dataset: CaptionDataset) -> None:
    assert [e.image_id for e in dataset.split("train")] == [1, 9]  # restval counts as train
    assert [e.image_id for e in dataset.split("restval")] == [9]
    assert [e.image_id for e in dataset.split("test")] == [391895]
    with pytest.raises(DatasetError) as err:
        dataset.split("val")
    assert err.value.path == str(dataset.source)
    assert "split 'val' is empty" in str(err.value)
    summary = dataset.summary()
    assert summary["splits"] == {
        "test": {"images": 1, "captions": 2},
        "train": {"images": 1, "captions": 1},
        "restval": {"images": 1, "captions": 1},
    }
    assert (summary["images"], summary["captions"], summary["dropped_images"]) == (3, 4, 0)


def test_check_images(dataset: CaptionDataset, tmp_path: Path) -> None:
    check_images(dataset.examples[:2])
    with pytest.raises(DatasetError) as err:
        check_images(dataset.examples)  # the third image does not exist
    assert str(err.value).startswith(str(dataset.examples[2].image_path) + ": cannot read image")
    bad = dataset.examples[0].image_path
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    with pytest.raises(DatasetError, match="cannot read image"):
        check_images(dataset.examples[:1])
    bad.write_text("not an image")
    with pytest.raises(DatasetError, match="cannot read image"):
        check_images(dataset.examples[:1])


def _changed(*keys: Any, to: Any) -> dict[str, Any]:
    """The fixture with the item at ``keys`` replaced by ``to`` (or removed when ``to`` is DELETE)."""
    return changed(_fixture(), *keys, to=to)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ('{"images": [', "invalid JSON at line 1 column 13"),
        ('{"images": []}\n\n  x', "invalid JSON at line 3 column 3"),
        ([1, 2], "top level is not a JSON object"),
        ({"dataset": "coco"}, "no 'images' key"),
        ({"images": {}}, "'images' is not a list"),
        ({"images": []}, "'images' is empty"),
        (_changed("images", 1, to="x"), "images[1] is not an object"),
        (_changed("images", 1, "filename", to=DELETE), "images[1] has no 'filename'"),
        (_changed("images", 0, "split", to=DELETE), "images[0] has no 'split'"),
        (_changed("images", 2, "sentences", to=DELETE), "images[2] has no 'sentences'"),
        (_changed("images", 0, "filename", to=7), "images[0].filename is not a non-empty string"),
        (_changed("images", 0, "filepath", to=None), "images[0].filepath is not a string"),
        (_changed("images", 0, "split", to=""), "images[0].split is not a non-empty string"),
        (_changed("images", 0, "sentences", to="a man"), "images[0].sentences is not a list"),
        (
            _changed("images", 2, "sentences", to=[]),
            "images[2] (COCO_train2014_000000000009.jpg) has an empty sentence list",
        ),
        (_changed("images", 0, "sentences", 1, to={}), "images[0].sentences[1] has no tokens and no raw text"),
        (_changed("images", 0, "sentences", 1, to=[]), "images[0].sentences[1] is not an object"),
        (_changed("images", 0, "sentences", 1, "tokens", to="a man"), "sentences[1].tokens is not a list of strings"),
        (_changed("images", 0, "sentences", 1, to={"tokens": [], "raw": "..."}), "sentences[1] is an empty caption"),
        (_changed("images", 1, "sentences", 0, "raw", to=3), "images[1].sentences[0].raw is not a string"),
    ],
)
def test_bad_input(tmp_path: Path, data: Any, problem: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError) as err:
        load_karpathy(path, tmp_path)
    assert err.value.path == str(path)
    assert problem in err.value.problem
    assert str(err.value) == f"{path}: {err.value.problem}"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_karpathy(tmp_path / "nope.json", tmp_path)
    assert str(err.value) == f"{tmp_path / 'nope.json'}: file not found"


def test_tokens_fall_back_to_raw(tmp_path: Path) -> None:
    data = _fixture()
    data["images"][0]["sentences"][0]["tokens"] = []
    data["images"][0]["sentences"][0]["raw"] = "Two DOGS, running."
    loaded = load_karpathy(_write(tmp_path, data), tmp_path)
    assert loaded.examples[0].references[0] == ["two", "dogs", "running"]


def test_dataset_error_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(DatasetError("a.json", "broken")))
    assert (err.path, err.problem, str(err)) == ("a.json", "broken", "a.json: broken")
