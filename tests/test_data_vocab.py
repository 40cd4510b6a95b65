"""Vocabulary: build, encode/decode, save/load round trip, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_export.data import DatasetError, Vocabulary

CAPTIONS = [
    ["a", "red", "circle"],
    ["a", "blue", "square"],
    ["a", "red", "star", "and", "a", "blue", "circle"],
    ["one", "zebra"],
]


def test_build_order_and_specials() -> None:
    vocab = Vocabulary.build(CAPTIONS)
    # a:4, blue:2, circle:2, red:2, then the count-1 words alphabetically
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>", "a", "blue", "circle", "red",
                          "and", "one", "square", "star", "zebra"]  # fmt: skip
    assert vocab.stoi["a"] == 4 and vocab.stoi["<unk>"] == 3
    assert vocab.special_ids == {"pad": 0, "start": 1, "end": 2, "unk": 3}
    assert len(vocab) == 13
    assert Vocabulary.build(reversed(CAPTIONS)) == vocab  # deterministic, order independent


def test_min_count() -> None:
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    assert vocab.itos[4:] == ["a", "blue", "circle", "red"]
    assert Vocabulary.build(CAPTIONS, min_count=5).itos[4:] == []


def test_encode_decode() -> None:
    vocab = Vocabulary.build(CAPTIONS)
    ids = vocab.encode(["a", "red", "giraffe"], max_length=10)
    assert ids == [1, 4, 7, 3, 2]
    assert vocab.decode(ids) == ["a", "red"]  # <unk> and the other specials are skipped
    assert vocab.encode(["a", "red", "circle"], max_length=2) == [1, 4, 7, 2]
    assert vocab.encode([], max_length=3) == [1, 2]
    assert vocab.decode([4, 7, 6, 2, 5, 5]) == ["a", "red", "circle"]  # stops at <end>
    assert vocab.decode([0, 4, 0]) == ["a"]
    with pytest.raises(ValueError):
        vocab.decode([99])


def test_save_load_round_trip(tmp_path: Path) -> None:
    vocab = Vocabulary.build(CAPTIONS)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert json.loads(path.read_text()) == {"tokens": vocab.itos}
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert loaded.stoi == vocab.stoi
    assert loaded != Vocabulary.build(CAPTIONS, min_count=2)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"tokens": [', "invalid JSON"),
        ('["<pad>"]', "expected an object with a 'tokens' list"),
        ('{"words": []}', "expected an object with a 'tokens' list"),
        ('{"tokens": "abc"}', "'tokens' is not a list of strings"),
        ('{"tokens": ["<pad>", "<start>", "<end>", "<unk>", 5]}', "'tokens' is not a list of strings"),
        ('{"tokens": ["<start>", "<pad>", "<end>", "<unk>", "a"]}', "the first four tokens are"),
        ('{"tokens": ["<pad>", "<start>", "<end>"]}', "the first four tokens are"),
        ('{"tokens": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}', "repeated tokens: ['a']"),
    ],
)
def test_load_bad_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(text)
    with pytest.raises(DatasetError) as err:
        Vocabulary.load(path)
    assert err.value.path == str(path)
    assert problem in err.value.problem


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found"):
        Vocabulary.load(tmp_path / "vocab.json")
