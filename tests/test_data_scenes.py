"""Synthetic scene generator: determinism, format, caption/scene agreement, evaluation helper."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model_export.data import (
    COLOURS,
    SHAPES,
    SIZES,
    CaptionDataset,
    attribute_accuracy,
    caption_objects,
    generate_scenes,
    load_karpathy,
    scene_captions,
)
from model_export.data.scenes import object_extent, render_scene

COUNTS = {"n_train": 12, "n_val": 4, "n_test": 4}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    json_path = generate_scenes(out, **COUNTS, seed=0, workers=2, progress=False)
    assert json_path == out / "dataset.json"
    return out


@pytest.fixture(scope="module")
def dataset(generated: Path) -> CaptionDataset:
    return load_karpathy(generated / "dataset.json", generated)


def test_deterministic(generated: Path, tmp_path: Path) -> None:
    same = tmp_path / "same"
    generate_scenes(same, **COUNTS, seed=0, workers=1, progress=False)  # serial == parallel
    assert _files(same) == _files(generated)
    other = tmp_path / "other"
    generate_scenes(other, **COUNTS, seed=1, workers=2, progress=False)
    a, b = _files(generated), _files(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_karpathy_format(generated: Path, dataset: CaptionDataset) -> None:
    raw = json.loads((generated / "dataset.json").read_text())
    assert raw["dataset"] == "scenes"
    sentids = []
    for imgid, entry in enumerate(raw["images"]):
        assert entry["imgid"] == imgid
        assert entry["filepath"] == f"images/{entry['split']}"
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        assert all(s["imgid"] == imgid and s["tokens"] == s["raw"].split() for s in entry["sentences"])
        sentids += entry["sentids"]
    assert sentids == list(range(len(sentids)))
    assert dataset.summary()["splits"] == {
        "train": {"images": 12, "captions": 48},
        "val": {"images": 4, "captions": 16},
        "test": {"images": 4, "captions": 16},
    }
    assert dataset.examples[13].image_path == generated / "images" / "val" / "val_000001.jpg"
    assert dataset.examples[13].image_id == 13


def test_images(dataset: CaptionDataset) -> None:
    for example in dataset.examples:
        with Image.open(example.image_path) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (224, 224)
            pixels = np.asarray(image, dtype=np.float32)
        for obj in example.extra["scene"]["objects"]:
            # The centre of every object has its colour, and no other colour is closer.
            x, y = int(obj["x"]), int(obj["y"])
            mean = pixels[y - 2 : y + 3, x - 2 : x + 3].reshape(-1, 3).mean(axis=0)
            nearest = min(COLOURS, key=lambda c: float(np.sum((mean - COLOURS[c]) ** 2)))
            assert nearest == obj["colour"], (example.image_path, obj, mean)


def test_scene_objects(dataset: CaptionDataset) -> None:
    seen_counts = Counter()
    for example in dataset.examples:
        objects = example.extra["scene"]["objects"]
        seen_counts[len(objects)] += 1
        assert 1 <= len(objects) <= 4
        assert [o["x"] for o in objects] == sorted(o["x"] for o in objects)
        for o in objects:
            assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in SIZES
            low, high = SIZES[o["size"]]
            assert low <= o["radius"] <= high
            assert abs(o["angle"]) <= 20
            ext = object_extent(o["shape"], o["radius"])
            assert ext <= o["x"] <= 224 - ext and ext <= o["y"] <= 224 - ext  # fully inside
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                distance = math.hypot(a["x"] - b["x"], a["y"] - b["y"])
                assert distance > object_extent(a["shape"], a["radius"]) + object_extent(b["shape"], b["radius"])
    assert len(seen_counts) >= 3  # 20 images: several object counts occur


def test_captions(dataset: CaptionDataset) -> None:
    for example in dataset.examples:
        objects = example.extra["scene"]["objects"]
        refs = example.references
        assert len(refs) == 4 and len({tuple(r) for r in refs}) == 4
        assert all(t.isalpha() and t.islower() for r in refs for t in r)
        # First reference: the canonical caption, naming exactly the scene's objects.
        named = caption_objects(refs[0])
        assert Counter(named) == Counter((o["colour"], o["shape"]) for o in objects)
        if len(objects) == 2 and abs(objects[1]["y"] - objects[0]["y"]) > abs(objects[1]["x"] - objects[0]["x"]):
            order = sorted(objects, key=lambda o: o["y"])  # "above": top to bottom
            assert "above" in refs[0]
        else:
            order = objects  # left to right (the scene lists them by x)
        assert named == [(o["colour"], o["shape"]) for o in order]
        sizes = [t for t in refs[0] if t in SIZES]
        assert sizes == [o["size"] for o in order]
        for ref in refs:
            assert Counter(caption_objects(ref)) == Counter(named)


def test_scene_captions_templates() -> None:
    def obj(colour: str, shape: str, x: float, y: float, size: str = "small") -> dict:
        return {"shape": shape, "colour": colour, "size": size, "x": x, "y": y}

    assert scene_captions([obj("red", "circle", 50, 50)])[0] == "a small red circle"
    two = scene_captions([obj("blue", "star", 150, 60), obj("red", "circle", 50, 80, "large")])
    assert two[:2] == ["a large red circle to the left of a small blue star",
                       "a large red circle on the left and a small blue star on the right"]  # fmt: skip
    above = scene_captions([obj("blue", "star", 60, 170), obj("red", "circle", 50, 40)])
    assert above[:2] == ["a small red circle above a small blue star",
                         "a small red circle at the top and a small blue star at the bottom"]  # fmt: skip
    four = scene_captions([obj("red", "cross", 200, 40), obj("white", "square", 20, 40),
                           obj("black", "star", 90, 150), obj("green", "triangle", 140, 100)])  # fmt: skip
    assert four[0] == ("a small white square next to a small black star a small green triangle"
                       " and a small red cross")  # fmt: skip
    assert four[3].startswith("there are four shapes a small white square a small black star")


def test_caption_objects() -> None:
    assert caption_objects("a small red circle to the left of a large blue star") == [
        ("red", "circle"),
        ("blue", "star"),
    ]
    assert caption_objects(["a", "red", "large", "cross", "and", "two", "green", "squares"]) == [
        ("red", "cross"),
        ("green", "square"),
    ]
    assert caption_objects(["a", "red", "thing", "circle", "<unk>", "blue"]) == []


def test_attribute_accuracy(dataset: CaptionDataset) -> None:
    truth = {e.image_id: e.references[0] for e in dataset.examples}
    result = attribute_accuracy(truth, dataset)
    assert result["all"] == {"images": 20, "correct": 20, "accuracy": 1.0}
    assert sum(v["images"] for v in result["by_objects"].values()) == 20
    assert set(result["by_objects"]) == {"1", "2", "3", "4"}

    example = dataset.examples[0]
    first = example.extra["scene"]["objects"][0]
    wrong_colour = next(c for c in COLOURS if c != first["colour"])
    bad = [wrong_colour if t == first["colour"] else t for t in example.references[0]]
    missing = example.references[0][: example.references[0].index(first["shape"])]  # drops objects
    preds = {str(example.image_id): bad, dataset.examples[1].image_id: missing}
    result = attribute_accuracy(preds, dataset)
    assert result["all"] == {"images": 2, "correct": 0, "accuracy": 0.0}
    with pytest.raises(ValueError, match="unknown image id"):
        attribute_accuracy({"nope": ["a"]}, dataset)


def test_every_wording_names_the_objects_in_the_same_order() -> None:
    for index in range(60):
        _, _, captions = render_scene(seed=9, split="train", index=index)
        orders = [caption_objects(c) for c in captions]
        assert all(order == orders[0] for order in orders), captions
