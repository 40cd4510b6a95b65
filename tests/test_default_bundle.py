"""The committed default bundle: intact, within its size budget, its recorded parity and quality
meet the bar the project promises, and it really captions scenes it has never seen."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from app.bundle import load_bundle
from app.decoding import DecodingConfig
from app.engine import Engine
from app.preprocess import to_array
from model_export.data.scenes import caption_objects, render_scene

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT)  # checks every file's sha256


def test_bundle_is_complete_and_small(bundle):
    size = sum(p.stat().st_size for p in DEFAULT.iterdir())
    assert size <= 30 * 1024 * 1024
    assert bundle.manifest["architecture"]["encoder"] == "efficientnet-lite0"
    assert bundle.manifest["architecture"]["decoder"] == "show_attend_tell"
    assert bundle.manifest["training"]["data"]["splits"]["train"]["images"] >= 20000


def test_export_proved_parity(bundle):
    parity = bundle.manifest["parity"]
    assert max(parity[k] for k in parity if k.endswith(("_random", "_real"))) <= 1e-4
    assert parity["greedy_identical"] >= 50 and parity["beam3_identical"] >= 50


def test_recorded_quality_meets_the_bar(bundle):
    evaluation = bundle.manifest["evaluation"]
    assert evaluation["split"] == "test" and evaluation["images"] >= 1000
    beside = json.loads((DEFAULT / "eval.json").read_text())
    for name in ("greedy", "beam3"):
        assert evaluation[name] == beside[name]
        assert evaluation[name]["BLEU-4"] >= 0.5
    assert evaluation["beam3"]["CIDEr"] >= evaluation["greedy"]["CIDEr"]
    attributes = evaluation["beam3"]["attributes"]  # beam 3 is the service's default decoding
    assert attributes["by_objects"]["1"]["accuracy"] >= 0.9
    assert attributes["all"]["accuracy"] >= 0.7


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
