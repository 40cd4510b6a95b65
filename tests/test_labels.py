"""ImageNet labels beside captions: the bundle's labels (labels.json, the encoder's imagenet_probs
output), `captioner add-labels` on an older bundle, and the HTTP API's `labels` parameter on a real
server (its default, its bounds, the 409 for a model without labels, the batch and the attention
picture)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from app.inference.bundle import BundleError, load_bundle
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine
from app.inference.preprocess import to_array
from model_export.tiny_bundle import LABEL_CLASSES, LABEL_NAMES
from tests.support.live_server import REPO, image_bytes, service_env

SCENES = REPO / "tests" / "fixtures" / "scenes-sat-lite0"  # exported before labels existed


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return image_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "PNG")


@pytest.fixture(scope="module")
def labelled(tiny_bundles) -> Path:
    return tiny_bundles(labels=True)


@pytest.fixture(scope="module")
def server(start_server, labelled):
    return start_server(labelled, "labels")


@pytest.fixture(scope="module")
def plain_server(start_server, tiny_bundle):
    return start_server(tiny_bundle, "plain")


# ---- the bundle --------------------------------------------------------------------------------


def test_a_bundle_reads_its_labels(labelled, tiny_bundle):
    bundle = load_bundle(labelled)
    assert bundle.has_labels and bundle.labels == LABEL_NAMES
    assert bundle.manifest.labels.classes == LABEL_CLASSES and "labels" in bundle.manifest.files
    assert not load_bundle(tiny_bundle).has_labels and load_bundle(tiny_bundle).labels is None


def test_labels_json_must_match_the_manifest(labelled, copy_bundle):
    broken = copy_bundle(labelled)
    (broken / "labels.json").write_text(json.dumps({"names": LABEL_NAMES[:-1]}))
    with pytest.raises(BundleError, match="has 9 names, manifest says 10 classes"):
        load_bundle(broken, verify=False)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["files"]["labels"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="go together"):
        load_bundle(broken, verify=False)


def test_the_engine_gives_the_best_labels_first_and_the_same_captions(labelled, tiny_bundle):
    images = np.random.default_rng(0).uniform(-1, 1, (4, 3, 224, 224)).astype(np.float32)
    engine = Engine(load_bundle(labelled), device="cpu")
    probs = engine.encode(images, labels=True)["imagenet_probs"]
    results = engine.run(images, DecodingConfig(), labels=[3, 0, 10, 1])
    assert [len(r.labels) for r in results] == [3, 0, 10, 1]
    for result, row in zip(results, probs, strict=True):
        want = np.argsort(-row, kind="stable")[: len(result.labels)]
        assert [label.class_id for label in result.labels] == list(want)
        assert [label.probability for label in result.labels] == pytest.approx(row[want].tolist())
        assert [label.name for label in result.labels] == [LABEL_NAMES[c] for c in want]
    plain = Engine(load_bundle(tiny_bundle), device="cpu").caption(images, DecodingConfig())
    assert [r.captions[0].token_ids for r in results] == [c[0].token_ids for c in plain]
    with pytest.raises(ValueError, match="no ImageNet labels"):
        Engine(load_bundle(tiny_bundle), device="cpu").run(images, DecodingConfig(), labels=1)


@pytest.mark.service  # starts a subprocess
@pytest.mark.slow
def test_add_labels_upgrades_an_older_bundle(tmp_path):
    """`captioner add-labels` on the scene bundle (EfficientNet-Lite0, exported before labels): the
    probabilities match torch's, the captions do not change, scikit-image's cat is a cat."""
    bundle_dir = Path(shutil.copytree(SCENES, tmp_path / "scenes"))
    before = load_bundle(bundle_dir)
    assert not before.has_labels
    result = subprocess.run([sys.executable, "-m", "captioner.cli", "add-labels", "--bundle", str(bundle_dir)],
                            cwd=REPO, env=service_env(bundle_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    after = load_bundle(bundle_dir)  # sha256s checked
    assert after.has_labels and after.labels[281] == "tabby, tabby cat" and after.labels[967] == "espresso"
    assert after.manifest.parity.labels_max_abs_random <= 1e-4 and after.manifest.parity.labels_max_abs_real <= 1e-4
    assert after.manifest.parity.greedy_identical == before.manifest.parity.greedy_identical
    photos = np.stack([to_array(Image.fromarray(getattr(skdata, n)()), after.preprocessing) for n in ("chelsea", "coffee")])
    old, new = Engine(before, device="cpu"), Engine(after, device="cpu")
    cat, coffee = new.run(photos, DecodingConfig(), labels=1)
    assert 281 <= cat.labels[0].class_id <= 285 and coffee.labels[0].class_id == 967
    assert [r.captions[0].token_ids for r in (cat, coffee)] == [c[0].token_ids for c in old.caption(photos, DecodingConfig())]
    again = subprocess.run([sys.executable, "-m", "captioner.cli", "add-labels", "--bundle", str(bundle_dir)],
                           cwd=REPO, env=service_env(bundle_dir), capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "has labels already" in again.stderr


# ---- the API -----------------------------------------------------------------------------------


def test_captions_come_with_three_labels_by_default(server):
    with server.client() as client:
        info = client.get("/v1/model").json()
        assert info["labels"] is True and info["default_labels"] == 3
        body = client.post("/v1/captions", files={"image": ("a.png", _photo(1), "image/png")}).json()
        assert len(body["labels"]) == 3 and body["captions"]
        probabilities = [label["probability"] for label in body["labels"]]
        assert probabilities == sorted(probabilities, reverse=True)
        for label in body["labels"]:
            assert label["name"] == LABEL_NAMES[label["class_id"]] and 0 <= label["probability"] <= 1
        more = client.post("/v1/captions", params={"labels": 7}, files={"image": ("a.png", _photo(1), "image/png")}).json()
        assert more["labels"][:3] == body["labels"] and len(more["labels"]) == 7
        assert more["captions"] == body["captions"]
        none = client.post("/v1/captions", params={"labels": 0}, files={"image": ("a.png", _photo(1), "image/png")}).json()
        assert "labels" not in none and none["captions"] == body["captions"]


def test_labels_out_of_bounds_are_a_422(server):
    with server.client() as client:
        for value in ("21", "-1", "many"):
            r = client.post("/v1/captions", params={"labels": value}, files={"image": ("a.png", _photo(1), "image/png")})
            assert r.status_code == 422, (value, r.text)
            assert r.json()["error"]["code"] == "validation_error" and "labels" in r.json()["error"]["message"]


def test_batch_items_have_their_own_labels(server):
    with server.client() as client:
        files = [("images", ("a.png", _photo(1), "image/png")), ("images", ("x.txt", b"not an image", "text/plain")),
                 ("images", ("b.png", _photo(2), "image/png"))]
        body = client.post("/v1/captions/batch", params={"labels": 2}, files=files).json()
        first, bad, second = body["results"]
        assert len(first["labels"]) == 2 and len(second["labels"]) == 2
        assert "labels" not in bad and bad["error"]["code"] == "unsupported_media_type"
        one = client.post("/v1/captions", params={"labels": 2}, files={"image": ("b.png", _photo(2), "image/png")}).json()
        assert [x["class_id"] for x in one["labels"]] == [x["class_id"] for x in second["labels"]]
        assert [x["probability"] for x in one["labels"]] == pytest.approx([x["probability"] for x in second["labels"]],
                                                                          abs=1e-6)


def test_the_attention_picture_takes_labels(server):
    with server.client() as client:
        r = client.post("/v1/captions/attention.png", params={"labels": 2}, files={"image": ("a.png", _photo(1), "image/png")})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size[0] > 0


def test_a_model_without_labels_answers_none_and_refuses_a_request_for_some(plain_server):
    with plain_server.client() as client:
        info = client.get("/v1/model").json()
        assert info["labels"] is False and info["default_labels"] == 0
        body = client.post("/v1/captions", files={"image": ("a.png", _photo(1), "image/png")}).json()
        assert "labels" not in body and body["captions"]
        for path, files in (("/v1/captions", {"image": ("a.png", _photo(1), "image/png")}),
                            ("/v1/captions/batch", [("images", ("a.png", _photo(1), "image/png"))]),
                            ("/v1/captions/attention.png", {"image": ("a.png", _photo(1), "image/png")})):
            r = client.post(path, params={"labels": 2}, files=files)
            assert r.status_code == 409, (path, r.text)
            error = r.json()["error"]
            assert error["code"] == "labels_unavailable" and "no ImageNet labels" in error["message"]
        assert client.post("/v1/captions", params={"labels": 0},
                           files={"image": ("a.png", _photo(1), "image/png")}).status_code == 200
        assert client.get("/readyz").status_code == 200  # still serving


def test_the_default_labels_setting(start_server, labelled):
    server = start_server(labelled, "labels-off", default_labels=0)
    with server.client() as client:
        assert client.get("/v1/model").json()["default_labels"] == 0
        body = client.post("/v1/captions", files={"image": ("a.png", _photo(1), "image/png")}).json()
        assert "labels" not in body
        assert len(client.post("/v1/captions", params={"labels": 1},
                               files={"image": ("a.png", _photo(1), "image/png")}).json()["labels"]) == 1


def test_the_openapi_spec_documents_labels(server):
    with server.client() as client:
        spec = client.get("/openapi.json").json()
    label = spec["components"]["schemas"]["Label"]
    assert set(label["properties"]) == {"name", "class_id", "probability"}
    for path in ("/v1/captions", "/v1/captions/batch", "/v1/captions/attention.png"):
        params = {p["name"]: p for p in spec["paths"][path]["post"]["parameters"]}
        assert params["labels"]["schema"]["maximum"] == 20 and params["labels"]["schema"]["minimum"] == 0
        assert "409" in spec["paths"][path]["post"]["responses"]
    response = spec["components"]["schemas"]["CaptionResponse"]["properties"]["labels"]
    assert "Label" in json.dumps(response)
