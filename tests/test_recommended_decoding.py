"""A bundle's recommended decoding (manifest `decoding`, chosen on its validation split) is what
the service decodes with when its own defaults are unset; a setting given overrides it; a bad
recommendation is a start-up error naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.inference.bundle import BundleError, load_bundle
from tests.support.live_server import REPO, image_bytes, live_server, service_env

RECOMMENDED = {"length_penalty": 1.0, "no_repeat_ngram_size": 2, "chosen_on": "tiny test split"}


def _photo() -> bytes:
    rng = np.random.default_rng(4)
    return image_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "PNG")


def test_bundle_exposes_its_recommendation(tiny_bundles, tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundles(decoding=RECOMMENDED))
    assert (bundle.recommended_decoding.length_penalty, bundle.recommended_decoding.no_repeat_ngram_size) == (1.0, 2)
    plain = load_bundle(tiny_bundle)
    assert (plain.recommended_decoding.length_penalty, plain.recommended_decoding.no_repeat_ngram_size) == (0.0, 0)


def test_a_bad_recommendation_is_a_clear_error(tiny_bundles) -> None:
    path = tiny_bundles(decoding={"no_repeat_ngram_size": 11})
    try:
        load_bundle(path)
    except BundleError as exc:
        assert "decoding.no_repeat_ngram_size" in str(exc)
    else:
        raise AssertionError("a recommendation outside the decoding limits was accepted")


@pytest.mark.service  # starts a subprocess
def test_the_service_decodes_with_it_unless_told_otherwise(tiny_bundles, tmp_path: Path) -> None:
    bundle = tiny_bundles(decoding=RECOMMENDED)
    with live_server(bundle, tmp_path / "a.log") as server, server.client() as client:
        defaults = client.get("/v1/model").json()["decoding_defaults"]
        assert (defaults["length_penalty"], defaults["no_repeat_ngram_size"]) == (1.0, 2)
        body = client.post("/v1/captions", files={"image": ("p.png", _photo(), "image/png")}).json()
        assert (body["settings"]["length_penalty"], body["settings"]["no_repeat_ngram_size"]) == (1.0, 2)
        body = client.post("/v1/captions?no_repeat_ngram_size=0", files={"image": ("p.png", _photo(), "image/png")}).json()
        assert body["settings"]["no_repeat_ngram_size"] == 0  # a request still decides for itself
    with live_server(bundle, tmp_path / "b.log", default_length_penalty=0, default_no_repeat_ngram_size=3) as server, \
            server.client() as client:
        defaults = client.get("/v1/model").json()["decoding_defaults"]
        assert (defaults["length_penalty"], defaults["no_repeat_ngram_size"]) == (0.0, 3)  # the settings win


@pytest.mark.service  # starts a subprocess
def test_local_caption_command_uses_it(tiny_bundles, tmp_path: Path) -> None:
    bundle = tiny_bundles(decoding=RECOMMENDED)
    photo = tmp_path / "p.png"
    photo.write_bytes(_photo())
    env = service_env(bundle)
    out = subprocess.run([sys.executable, "-m", "app.cli", "caption", str(photo), "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert (record["settings"]["length_penalty"], record["settings"]["no_repeat_ngram_size"]) == (1.0, 2)
