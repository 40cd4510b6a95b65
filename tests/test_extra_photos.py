"""bench/extra_photos.json (the extra real photos of bench/real_photos.py --set extra) is well formed, and the
pieces of the benchmark that need no download work: judging a caption, counting per set and kind, reading
a file out of a Qt resource file. (Fetching and captioning the photos needs the network: bench/fetch_photos.py.)"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest

from bench.fetch_photos import cached_path, load_manifest, qt_resource
from bench.real_photos import SUBJECTS, count_named, names_subject

FIELDS = {"name", "kind", "source", "package", "version", "member", "sha256", "words", "description", "licence"}


def test_every_extra_photo_has_its_package_hash_words_and_licence():
    entries = load_manifest()
    assert len(entries) >= 25
    names = [e["name"] for e in entries]
    assert len(set(names)) == len(names) and not set(names) & set(SUBJECTS)  # --set all keys photos by name
    for e in entries:
        assert FIELDS <= set(e), e.get("name")
        assert re.fullmatch(r"[a-z0-9_]+", e["name"]) and e["kind"] and e["description"] and e["licence"]
        assert re.fullmatch(r"[0-9a-f]{64}", e["sha256"]), e["name"]
        assert e["words"].split() and e["words"] == e["words"].lower()
        assert e["source"] in ("pypi", "debian") and e["version"][0].isdigit()
        if e["source"] == "pypi":  # the exact wheel or sdist the member comes from
            assert e["file"].startswith(e["package"].replace("-", "_") + "-" + e["version"])
        suffix = cached_path(Path("/cache"), e).suffix
        assert suffix in (".jpg", ".jpeg", ".png", ".webp"), e["name"]
    assert len({e["kind"] for e in entries}) >= 8


def test_a_caption_names_the_subject_only_with_one_of_its_words():
    assert names_subject("a black cat sits on a mat", "cat cats kitten")
    assert not names_subject("a black dog sits on a mat", "cat cats kitten")
    assert not names_subject("a catalogue on a table", "cat cats kitten")  # whole words only


def test_the_last_line_counts_per_set_and_per_kind():
    results = {"chelsea": {"named": True}, "coffee": {"named": False},
               "farm_cat": {"named": True}, "kitten": {"named": False}, "farm_dog": {"named": True}}
    kinds = {"farm_cat": "cat", "kitten": "cat", "farm_dog": "dog"}
    assert count_named(results, kinds) == "dev 1 of 2, extra 2 of 3 (cat 1/2, dog 1/1)"
    assert count_named({k: results[k] for k in kinds}, kinds) == "extra 2 of 3 (cat 1/2, dog 1/1)"


def _rcc(files: dict[str, tuple[bytes, bool]]) -> bytes:
    """A Qt resource file (format version 2) holding `files` ({name: (data, compressed)}) in folder /res."""
    names, data = b"", b""

    def name(text: str) -> int:
        nonlocal names
        offset = len(names)
        names += struct.pack(">HI", len(text), 0) + text.encode("utf-16-be")
        return offset

    nodes = [struct.pack(">IHII", 0, 2, 1, 1) + bytes(8), struct.pack(">IHII", name("res"), 2, len(files), 2) + bytes(8)]
    for file_name, (content, compressed) in files.items():
        stored = struct.pack(">I", len(content)) + zlib.compress(content) if compressed else content
        nodes.append(struct.pack(">IHHHI", name(file_name), 1 if compressed else 0, 0, 0, len(data)) + bytes(8))
        data += struct.pack(">I", len(stored)) + stored
    tree = b"".join(nodes)
    header = 24
    return (b"qres" + struct.pack(">IIIII", 2, header, header + len(tree), header + len(tree) + len(data), 0)
            + tree + data + names)


def test_a_file_is_read_out_of_a_qt_resource_file():
    blob = _rcc({"cat.webp": (b"RIFF cat", False), "dog.jpg": (b"\xff\xd8 dog" * 50, True)})
    assert qt_resource(blob, "/res/cat.webp") == b"RIFF cat"
    assert qt_resource(blob, "/res/dog.jpg") == b"\xff\xd8 dog" * 50
    with pytest.raises(KeyError):
        qt_resource(blob, "/res/horse.webp")
