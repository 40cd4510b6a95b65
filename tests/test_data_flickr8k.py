"""Flickr8k's own text format: a tiny fixture laid out exactly as the authors' archives are
(``Flickr8k_text/`` beside ``Flicker8k_Dataset/``), including the ``.jpg.1`` key with no image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from model_export.data import DatasetError, find_flickr8k, load_flickr8k

IMAGES = {
    "1000268201_693b08cb0e.jpg": "train",
    "1001773457_577c3a7d70.jpg": "train",
    "1002674143_1b742ab4b8.jpg": "val",
    "1003163366_44323f5815.jpg": "test",
    "1007129816_e794419615.jpg": None,  # in no list: restval
}
TOKEN_LINES = [
    "1000268201_693b08cb0e.jpg#0\tA child in a pink dress is climbing up a set of stairs in an entry way .",
    "1000268201_693b08cb0e.jpg#1\tA girl going into a wooden building .",
    "1001773457_577c3a7d70.jpg#0\tA black dog and a tri-colored dog playing with each other on the road .",
    "1001773457_577c3a7d70.jpg#1\tA black dog and a white dog with brown spots are staring at each other in the street .",
    "1002674143_1b742ab4b8.jpg#1\tA little girl is sitting in front of a large painted rainbow .",
    "1002674143_1b742ab4b8.jpg#0\tA little girl covered in paint sits in front of a painted rainbow with her hands in a bowl .",
    "1003163366_44323f5815.jpg#0\tA man lays on a bench while his dog sits by him .",
    "1007129816_e794419615.jpg#0\tA man in an orange hat starring at something .",
    "2258277193_586949ec62.jpg.1#0\tpeople waiting for the subway",
    "2258277193_586949ec62.jpg.1#1\tSome people looking out windows in a large building .",
]  # fmt: skip


def _make(root: Path, lines: list[str] = TOKEN_LINES, lists: dict[str, list[str]] | None = None) -> Path:
    text = root / "Flickr8k_text"
    images = root / "Flicker8k_Dataset"
    text.mkdir(parents=True)
    images.mkdir()
    for name in IMAGES:
        Image.new("RGB", (50, 40), (120, 30, 200)).save(images / name)
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    if lists is None:
        lists = {s: [n for n, split in IMAGES.items() if split == s] for s in ("train", "val", "test")}
    files = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
    for split, names in lists.items():
        (text / files[split]).write_text("".join(f"{n}\n" for n in names))
    return root


def test_loads_the_authors_layout(tmp_path: Path) -> None:
    root = _make(tmp_path)
    text_dir, image_dir = find_flickr8k(root)
    assert text_dir == root / "Flickr8k_text" and image_dir == root / "Flicker8k_Dataset"
    dataset = load_flickr8k(text_dir, image_dir)
    assert dataset.name == "flickr8k"
    by_name = {e.image_id: e for e in dataset.examples}
    assert set(by_name) == set(IMAGES)  # the .jpg.1 key has no image: left out
    assert dataset.dropped_images == 1
    assert {n: e.split for n, e in by_name.items()} == {n: s or "restval" for n, s in IMAGES.items()}
    assert [e.image_id for e in dataset.split("train")] == [
        "1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1007129816_e794419615.jpg",
    ]  # restval folded into train
    # captions in their #n order, tokenised like the other loaders (hyphens split, full stop dropped)
    assert by_name["1002674143_1b742ab4b8.jpg"].references[0][:5] == ["a", "little", "girl", "covered", "in"]
    assert by_name["1001773457_577c3a7d70.jpg"].references[0][:6] == ["a", "black", "dog", "and", "a", "tri"]
    assert by_name["1000268201_693b08cb0e.jpg"].image_path == image_dir / "1000268201_693b08cb0e.jpg"
    summary = dataset.summary()
    assert summary["splits"]["train"] == {"images": 2, "captions": 4}
    assert summary["dropped_images"] == 1
    assert "research purposes" in summary["terms"] and "Hodosh" in summary["terms"]


def test_text_folder_named_text_and_images_folder(tmp_path: Path) -> None:
    root = _make(tmp_path)
    (root / "Flickr8k_text").rename(root / "text")
    (root / "Flicker8k_Dataset").rename(root / "images")
    text_dir, image_dir = find_flickr8k(root)
    assert (text_dir, image_dir) == (root / "text", root / "images")


@pytest.mark.parametrize(
    ("lines", "lists", "message"),
    [
        (["1000268201_693b08cb0e.jpg 0 no tab"], None, "line 1: expected '<image>#<n><TAB><caption>'"),
        (["1000268201_693b08cb0e.jpg#x\tA dog ."], None, "caption number 'x' is not an integer"),
        (["1000268201_693b08cb0e.jpg#0\t . ,"], None, "line 1: empty caption"),
        ([], None, "no captions"),
        (TOKEN_LINES[:2], None, "has no captions in Flickr8k.token.txt"),
        (TOKEN_LINES, {"train": ["1000268201_693b08cb0e.jpg"], "val": ["1000268201_693b08cb0e.jpg"], "test": []},
         "is already in the train list"),
    ],
)
def test_bad_files(tmp_path: Path, lines: list[str], lists, message: str) -> None:
    root = _make(tmp_path, lines, lists)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_flickr8k(*find_flickr8k(root))


def test_listed_image_without_file(tmp_path: Path) -> None:
    root = _make(tmp_path)
    (root / "Flicker8k_Dataset" / "1003163366_44323f5815.jpg").unlink()
    with pytest.raises(DatasetError,
                       match=r"1003163366_44323f5815\.jpg: image file not found \(listed in Flickr_8k\.testImages\.txt\)"):
        load_flickr8k(*find_flickr8k(root))


def test_missing_pieces(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a folder"):
        find_flickr8k(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="no Flickr8k.token.txt"):
        find_flickr8k(tmp_path)
    root = _make(tmp_path / "a")
    (root / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(DatasetError, match=r"Flickr_8k\.devImages\.txt: file not found"):
        load_flickr8k(*find_flickr8k(root))
    for image in (root / "Flicker8k_Dataset").iterdir():
        image.unlink()
    with pytest.raises(DatasetError, match="no image folder with JPEGs"):
        find_flickr8k(root)


@pytest.mark.service  # starts a subprocess
def test_cli_reports_a_bad_folder(tmp_path: Path) -> None:
    """`captioner train --format flickr8k` names the folder and the problem, exit status 1."""
    result = subprocess.run(
        [sys.executable, "-m", "captioner.cli", "train", "--format", "flickr8k", "--data", str(tmp_path),
         "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 1, result.stderr
    assert f"error: {tmp_path}: no Flickr8k.token.txt" in result.stderr
