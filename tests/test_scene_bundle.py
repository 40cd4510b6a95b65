"""The scene bundle (the default model until 2.0, kept under tests/fixtures): a real trained model
that tests can rely on. It is intact, its recorded parity and quality still hold, it really captions
scenes it has never seen, and, being a format-1.0 bundle (its step takes `row_image`), it proves
that older bundles keep serving with the same captions they always gave."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from app.inference.bundle import load_bundle
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine
from app.inference.preprocess import to_array
from model_export.data.scenes import caption_objects, render_scene

DEFAULT = Path(__file__).resolve().parent / "fixtures" / "scenes-sat-lite0"


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT)  # checks every file's sha256


def test_bundle_is_complete_and_small(bundle):
    size = sum(p.stat().st_size for p in DEFAULT.iterdir())
    assert size <= 30 * 1024 * 1024
    assert bundle.manifest.architecture.encoder == "efficientnet-lite0"
    assert bundle.manifest.architecture.decoder == "show_attend_tell"
    assert bundle.manifest.training.data.splits["train"].images >= 20000


def test_is_an_older_row_layout_bundle(bundle):
    engine = Engine(bundle, device="cpu")
    assert "row_image" in [i.name for i in engine.decoder.get_inputs()]


def test_export_proved_parity(bundle):
    parity = bundle.manifest.parity
    assert max(v for k, v in parity if k.endswith(("_random", "_real")) and v is not None) <= 1e-4
    assert parity.greedy_identical >= 50 and parity.beam3_identical >= 50


def test_recorded_quality_meets_the_bar(bundle):
    evaluation = bundle.manifest.evaluation
    assert evaluation.split == "test" and evaluation.images >= 1000
    beside = json.loads((DEFAULT / "eval.json").read_text())
    for name in ("greedy", "beam3"):
        assert getattr(evaluation, name).model_dump(exclude_unset=True) == beside[name]
        assert getattr(evaluation, name).bleu4 >= 0.5
    assert evaluation.beam3.cider >= evaluation.greedy.cider
    attributes = evaluation.beam3.attributes  # beam 3 is the service's default decoding
    assert attributes.by_objects["1"].accuracy >= 0.9
    assert attributes.all.accuracy >= 0.7


def test_captions_unseen_scenes(bundle):
    engine = Engine(bundle, device="cpu")
    scenes = [render_scene(seed=12345, split="unseen", index=i) for i in range(40)]
    single = [(img, scene) for img, scene, _ in scenes if len(scene["objects"]) == 1][:12]
    images = np.stack([to_array(img, bundle.preprocessing) for img, _ in single])
    captions = engine.caption(images, DecodingConfig(beam_size=3))
    correct = sum(
        Counter(caption_objects(c[0].tokens)) == Counter((o["colour"], o["shape"]) for o in scene["objects"])
        for c, (_, scene) in zip(captions, single)
    )
    assert len(single) >= 6
    assert correct >= 0.75 * len(single), [c[0].text for c in captions]


# Recorded with the engine as it was before the decoder rows moved to image-major blocks (commit
# c72a31b, rows gathered by row_image): the same bundle must keep giving exactly these captions.
RECORDED = [
    [("a large blue square to the left of a small yellow square", -0.999)],
    [("a large orange triangle above a large purple star", -1.041), ("a large orange triangle and a large purple star", -1.629)],
    [("a small blue circle to the left of a large blue star", -0.739)],
    [("a large white cross", -0.403)],
    [("a large black circle next to a large green cross and a large green triangle", -1.533),
     ("from left to right a large black circle a large green cross and a large green triangle", -2.15)],
    [("a large black circle next to a large red circle a large orange triangle and a small purple triangle", -1.306)],
    [("a large green circle next to a large orange circle a small orange square and a large red star", -1.233)],
    [("a large blue circle next to a large blue star and a large blue circle", -0.771)],
]


@pytest.mark.parametrize("io_binding", [False, True])
def test_older_bundle_gives_the_captions_it_always_gave(bundle, io_binding):
    engine = Engine(bundle, device="cpu", io_binding=io_binding)
    scenes = [render_scene(seed=777, split="unseen", index=i) for i in range(8)]
    images = np.stack([to_array(img, bundle.preprocessing) for img, _, _ in scenes])
    configs = [DecodingConfig(strategy="greedy"), DecodingConfig(beam_size=3, num_captions=2), DecodingConfig(beam_size=5)] * 2
    configs += [DecodingConfig(beam_size=2)] * 2  # one batch, mixed settings: blocks of different widths
    got = [[(c.text, round(c.score, 3)) for c in captions] for captions in engine.caption(images, configs)]
    assert [[t for t, _ in g] for g in got] == [[t for t, _ in r] for r in RECORDED]
    for g, r in zip(got, RECORDED, strict=True):
        assert [s for _, s in g] == pytest.approx([s for _, s in r], abs=2e-3)
