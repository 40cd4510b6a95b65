"""How sure the model is: each caption's token probabilities are the model's own, its confidence is
app/inference/confidence.py's formula (raw, or the bundle's calibration), min_confidence flags and counts the
less sure captions, and `captioner confidence` measures and fits it (on generated scenes here;
docs/confidence.md has the Flickr8k numbers)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from app.bulk.output import caption_dicts
from app.inference.bundle import BundleError, ConfidenceCalibration, load_bundle
from app.inference.confidence import confidence, logistic, mean_log_prob, raw_confidence
from app.inference.decoding import DecodingConfig, beam_search
from app.inference.engine import Engine
from app.settings import SettingsError, load_settings
from tests.support.live_server import REPO, service_env
from tests.test_decoding import SPECIAL, Repeater, ToyModel

CALIBRATION = {"slope": 2.0, "intercept": 1.0}


# ---- the search keeps the model's own probabilities ------------------------------------------------


def _model_log_probs(model: ToyModel, image: int, tokens: list[int]) -> list[float]:
    """What the toy model itself says of each token of `tokens`, then of <end> (float32, as its step gives)."""
    out, history = [], ()
    for token in [*tokens, SPECIAL["end"]]:
        out.append(float(model.log_probs(image, history).astype(np.float32)[token]))
        history += (token,)
    return out


@pytest.mark.parametrize("settings", [
    {"strategy": "greedy"},
    {"beam_size": 3, "num_captions": 3},
    {"beam_size": 4, "num_captions": 2, "length_penalty": 1.5},
    {"beam_size": 3, "num_captions": 3, "no_repeat_ngram_size": 1},
    {"beam_size": 2, "max_length": 2},  # captions cut at max_length: <end> forced, its own probability kept
])
@pytest.mark.parametrize("seed", range(4))
def test_token_log_probs_are_the_models_own(settings, seed):
    model = ToyModel(5, seed, sharp=1.5)
    config = DecodingConfig(**settings).resolved(bundle_max_length=6)
    results = beam_search(model.step_fn(), 3, config, SPECIAL)
    for image, hyps in enumerate(results):
        assert hyps
        for h in hyps:
            assert len(h.token_log_probs) == len(h.tokens) + 1  # <end> last
            assert h.token_log_probs == pytest.approx(_model_log_probs(model, image, h.tokens), abs=1e-12)
            assert math.fsum(h.token_log_probs) == pytest.approx(h.score, abs=1e-9)
            # the length penalty reorders, it never changes a probability
            if config.length_penalty:
                assert h.normalized_score == pytest.approx(h.score / (len(h.tokens) + 1) ** config.length_penalty)


def test_blocking_removes_candidates_but_never_renormalises():
    """With the favourite word blocked the search takes the next one at the model's own (low)
    probability: the emitted tokens' probabilities do not sum to 1 over what was allowed."""
    model = Repeater(5, 0)
    config = DecodingConfig(beam_size=1, max_length=4, no_repeat_ngram_size=1).resolved()
    (hyp,) = beam_search(model.step_fn(), 1, config, SPECIAL)[0]
    expected = [float(model.log_probs(0, ()).astype(np.float32)[t]) for t in [*hyp.tokens, SPECIAL["end"]]]
    assert hyp.token_log_probs == pytest.approx(expected)
    assert hyp.token_log_probs[0] == pytest.approx(-0.01, abs=1e-6) and hyp.token_log_probs[1] == pytest.approx(-2.0, abs=1e-6)


# ---- the formula ---------------------------------------------------------------------------------------


def test_raw_confidence_is_the_geometric_mean_of_the_token_probabilities():
    probs = [0.9, 0.5, 0.25, 0.8]  # three words, then <end>
    log_probs = [math.log(p) for p in probs]
    assert raw_confidence(log_probs) == pytest.approx(float(np.prod(probs)) ** (1 / 4))
    assert confidence(log_probs) == raw_confidence(log_probs)
    assert mean_log_prob(log_probs) == pytest.approx(float(np.mean(log_probs)))
    assert raw_confidence([]) == 0.0 and raw_confidence([0.0, 0.0]) == 1.0
    assert raw_confidence([1e-9]) == 1.0  # a rounding error past 0 still gives at most 1
    assert raw_confidence([-1000.0]) == 0.0


def test_calibrated_confidence_is_the_logistic_curve_of_the_mean_log_probability():
    calibration = ConfidenceCalibration(**CALIBRATION)
    log_probs = [math.log(0.6), math.log(0.3), math.log(0.7)]
    m = float(np.mean(log_probs))
    assert confidence(log_probs, calibration) == pytest.approx(1 / (1 + math.exp(-(2.0 * m + 1.0))))
    assert confidence([], calibration) == 0.0
    # monotone: a caption with more probable tokens never gets a lower confidence
    values = [confidence([lp], calibration) for lp in np.linspace(-20, 0, 50)]
    assert values == sorted(values) and all(0.0 <= v <= 1.0 for v in values)
    assert logistic(-math.inf, 1.0, 0.0) == 0.0 and logistic(1e6, 1.0, 0.0) == 1.0 and logistic(-1e6, 1.0, 0.0) == 0.0


@pytest.mark.parametrize("block", [{"slope": 0.0, "intercept": 1.0}, {"slope": -1.0, "intercept": 0.0},
                                   {"slope": math.nan, "intercept": 0.0}, {"slope": 1.0, "intercept": math.inf},
                                   {"slope": 1.0, "intercept": 0.0, "method": "isotonic"}])
def test_a_bundle_with_a_bad_calibration_does_not_load(tiny_bundle, copy_bundle, block):
    path = copy_bundle(tiny_bundle)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["confidence"] = block
    (path / "manifest.json").write_text(json.dumps(manifest))  # NaN and Infinity as Python's json writes them
    with pytest.raises(BundleError, match="confidence"):
        load_bundle(path)


# ---- the engine --------------------------------------------------------------------------------------------


def _pixels(bundle, seed: int = 0) -> np.ndarray:
    height, width = bundle.preprocessing.image_size
    return np.random.default_rng(seed).normal(size=(2, 3, height, width)).astype(np.float32)


@pytest.mark.parametrize("calibrated", [False, True])
def test_engine_captions_carry_the_decoders_probabilities(tiny_bundles, calibrated):
    bundle = load_bundle(tiny_bundles(attention=True, **({"confidence": CALIBRATION} if calibrated else {})))
    assert (bundle.confidence_calibration is not None) == calibrated
    engine = Engine(bundle, device="cpu", threads=1)
    pixels = _pixels(bundle)
    results = engine.caption(pixels, DecodingConfig(beam_size=3, num_captions=3, no_repeat_ngram_size=2))
    end = bundle.special["end"]
    for image, captions in enumerate(results):
        for c in captions:
            # teacher-force the caption through the decoder step: its log-softmax at each token
            step = engine._make_step(engine.encode(pixels[image : image + 1]), False)
            previous, expected = bundle.special["start"], []
            for token in [*c.token_ids, end]:
                out, _ = step(np.array([previous]), np.array([0]), np.array([0]))
                expected.append(float(out.full()[0, token]))
                previous = token
            assert c.token_log_probs == pytest.approx(expected, abs=1e-5)
            assert len(c.token_probs) == len(c.tokens) == len(c.token_ids)
            assert c.token_probs == pytest.approx([math.exp(x) for x in expected[:-1]], rel=1e-5)
            assert c.end_prob == pytest.approx(math.exp(expected[-1]), rel=1e-5)
            assert all(0.0 <= p <= 1.0 for p in [*c.token_probs, c.end_prob])
            m = float(np.mean(expected))
            want = 1 / (1 + math.exp(-(2.0 * m + 1.0))) if calibrated else math.exp(m)
            assert c.confidence == pytest.approx(want, rel=1e-5) and 0.0 <= c.confidence <= 1.0


def test_caption_dir_records_carry_the_confidence():
    class Cap:
        text, score, normalized_score, confidence = "a cat", -1.5, -0.5, 0.1234567891

    assert caption_dicts([Cap()]) == [{"text": "a cat", "score": -1.5, "normalized_score": -0.5, "confidence": 0.123457}]
    # an answer from a service without confidence: no key (not null)
    assert caption_dicts([{"text": "t", "score": -1.0, "normalized_score": -0.5}]) == [
        {"text": "t", "score": -1.0, "normalized_score": -0.5}]
    assert caption_dicts([{"text": "t", "score": -1.0, "normalized_score": -0.5, "confidence": 0.5}])[0]["confidence"] == 0.5


# ---- settings --------------------------------------------------------------------------------------------------


def test_min_confidence_setting():
    assert load_settings(device="cpu").min_confidence == 0.0
    assert load_settings(device="cpu", min_confidence="0.25").min_confidence == 0.25
    for bad in ("-0.1", "1.01", "nan", "inf", "high"):
        with pytest.raises(SettingsError, match="CAPTIONER_MIN_CONFIDENCE"):
            load_settings(device="cpu", min_confidence=bad)


# ---- the service -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated_bundle(tiny_bundles) -> Path:
    return tiny_bundles(attention=True, confidence=CALIBRATION)


@pytest.fixture(scope="module")
def server(calibrated_bundle, start_server):
    # every caption of the tiny (random) model is flagged by default: confidence < 1 always
    return start_server(calibrated_bundle, min_confidence=0.999999)


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _check_caption(c: dict) -> None:
    assert len(c["token_probs"]) == len(c["tokens"])
    assert all(0.0 <= p <= 1.0 for p in c["token_probs"]) and 0.0 <= c["end_prob"] <= 1.0
    m = float(np.mean(np.log([*c["token_probs"], c["end_prob"]])))
    assert c["confidence"] == pytest.approx(1 / (1 + math.exp(-(2.0 * m + 1.0))), rel=1e-4)  # the bundle's curve
    assert 0.0 <= c["confidence"] <= 1.0 and isinstance(c["low_confidence"], bool)


def test_captions_carry_token_probabilities_and_a_confidence(client, cat_jpeg):
    for params in ({"strategy": "greedy"}, {"beam_size": 3, "num_captions": 3}):
        r = client.post("/v1/captions", files={"image": ("cat.jpg", cat_jpeg, "image/jpeg")}, params=params)
        assert r.status_code == 200, r.text
        captions = r.json()["captions"]
        assert len(captions) == params.get("num_captions", 1)
        for c in captions:
            _check_caption(c)


def test_min_confidence_flags_and_counts(client, cat_jpeg):
    files = {"image": ("cat.jpg", cat_jpeg, "image/jpeg")}
    before = _metric(client, "captioner_low_confidence_captions_total")
    seen = _metric(client, "captioner_caption_confidence_count")
    # the setting (0.999999) flags every caption; still returned
    caps = client.post("/v1/captions", files=files, params={"num_captions": 2}).json()["captions"]
    assert len(caps) == 2 and all(c["low_confidence"] for c in caps) and all(c["text"] for c in caps)
    # the request decides: 0 flags none; a threshold between the two captions' confidences flags one
    caps = client.post("/v1/captions", files=files, params={"num_captions": 2, "min_confidence": 0}).json()["captions"]
    assert not any(c["low_confidence"] for c in caps)
    low, high = sorted(c["confidence"] for c in caps)
    if low < high:
        middle = (low + high) / 2
        caps = client.post("/v1/captions", files=files, params={"num_captions": 2, "min_confidence": middle}).json()["captions"]
        assert sorted((c["confidence"], c["low_confidence"]) for c in caps) == [(low, True), (high, False)]
        flagged = 2 + 0 + 1
    else:
        flagged = 2
    # the batch route too, per file
    r = client.post("/v1/captions/batch", files=[("images", ("a.jpg", cat_jpeg, "image/jpeg"))] * 2,
                    params={"min_confidence": 1})
    assert r.status_code == 200, r.text
    for item in r.json()["results"]:
        (c,) = item["captions"]
        _check_caption(c)
        assert c["low_confidence"] is True
    assert _metric(client, "captioner_low_confidence_captions_total") == before + flagged + 2
    assert _metric(client, "captioner_caption_confidence_count") == seen + 2 + 2 + (2 if low < high else 0) + 2


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "inf", "-inf", "sure", ""])
@pytest.mark.parametrize("route", ["/v1/captions", "/v1/captions/batch"])
def test_bad_min_confidence_is_a_422(client, cat_jpeg, route, value):
    field = "image" if route == "/v1/captions" else "images"
    r = client.post(route, files=[(field, ("cat.jpg", cat_jpeg, "image/jpeg"))], params={"min_confidence": value})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == "validation_error"
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    assert body["error"]["details"][0]["loc"] == ["query", "min_confidence"]


def test_model_info_shows_the_calibration_and_the_threshold(client):
    info = client.get("/v1/model").json()
    assert info["confidence_calibration"] == {"method": "logistic", **CALIBRATION}
    assert info["min_confidence"] == pytest.approx(0.999999)


def test_openapi_documents_the_confidence(client):
    spec = client.get("/openapi.json").json()
    item = spec["components"]["schemas"]["CaptionItem"]
    assert {"token_probs", "end_prob", "confidence", "low_confidence"} <= set(item["required"])
    assert item["properties"]["confidence"]["minimum"] == 0 and item["properties"]["confidence"]["maximum"] == 1
    assert item["properties"]["token_probs"]["items"] == {"type": "number", "minimum": 0.0, "maximum": 1.0}
    for path in ("/v1/captions", "/v1/captions/batch"):
        (param,) = [p for p in spec["paths"][path]["post"]["parameters"] if p["name"] == "min_confidence"]
        assert param["in"] == "query" and param["schema"]["minimum"] == 0 and param["schema"]["maximum"] == 1


@pytest.mark.service  # starts a subprocess
def test_cli_caption_json_has_the_confidence(tiny_bundle, tmp_path, cat_jpeg):
    img = tmp_path / "cat.jpg"
    img.write_bytes(cat_jpeg)
    result = subprocess.run([sys.executable, "-m", "app.cli", "caption", str(img), "--json", "--num-captions", "2"],
                            cwd=REPO, env=service_env(tiny_bundle, min_confidence=1), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    for c in json.loads(result.stdout)["captions"]:
        assert len(c["token_probs"]) == len(c["tokens"]) and 0 <= c["end_prob"] <= 1
        assert c["confidence"] == pytest.approx(raw_confidence(np.log([*c["token_probs"], c["end_prob"]])), rel=1e-6)
        assert c["low_confidence"] is True


# ---- the evaluation (captioner confidence) ---------------------------------------------------------------------


def test_statistics_agree_with_scipy():
    from model_export.confidence import pearson, ranks, spearman

    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    y[:20] = 1.0  # ties
    assert list(ranks([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert math.isnan(pearson([1.0, 1.0], [0.0, 1.0]))


def test_logistic_fit_recovers_the_curve():
    from model_export.confidence import fit_logistic

    rng = np.random.default_rng(0)
    x = rng.normal(-1.0, 0.5, size=20000)
    y = rng.random(20000) < 1 / (1 + np.exp(-(3.0 * x + 2.0)))
    slope, intercept = fit_logistic(x, y)
    assert slope == pytest.approx(3.0, rel=0.08) and intercept == pytest.approx(2.0, rel=0.1)


def test_analysis_of_scored_captions():
    from model_export.confidence import Scored, analyse, calibration_error, reliability_table

    rng = np.random.default_rng(1)
    scored = []
    for _ in range(400):
        m = rng.uniform(-2.0, -0.1)
        good = rng.random() < 1 / (1 + math.exp(-(4 * m + 3)))  # more probable captions score better
        scored.append(Scored(["w"], [m, m], cider=float(rng.uniform(0.6, 2.0) if good else rng.uniform(0.0, 0.4))))
    result = analyse(scored, threshold=0.5, bins=10, folds=4)
    assert result["images"] == 400
    assert result["correlations"]["geometric mean, <end> included (the confidence)"]["spearman"] > 0.3
    calibration = ConfidenceCalibration.model_validate(result["calibration"])
    assert calibration.slope == pytest.approx(4.0, rel=0.4) and calibration.threshold == 0.5
    for key in ("raw", "calibrated_cross_fitted", "calibrated_in_sample"):
        table = result[key]["table"]
        assert sum(row["captions"] for row in table) == 400
        assert all(0 <= row["mean_confidence"] <= 1 and 0 <= row["share_reaching_threshold"] <= 1 for row in table)
        assert result[key]["ece"] == pytest.approx(calibration_error(table))
    assert result["calibrated_cross_fitted"]["ece"] < result["raw"]["ece"]
    # the bins: equal width, the last one closed, empty ones left out
    table = reliability_table([0.0, 0.05, 0.95, 1.0], [0.0, 1.0, 1.0, 0.2], threshold=0.5, bins=10)
    assert [(row["bin"], row["captions"], row["share_reaching_threshold"]) for row in table] == [
        ([0.0, 0.1], 2, 0.5), ([0.9, 1.0], 2, 0.5)]
    # nothing to fit when every caption is on one side of the threshold
    assert analyse(scored, threshold=100.0)["calibration"] is None


SCENES_BUNDLE = REPO / "tests" / "fixtures" / "scenes-sat-lite0"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from model_export.data.scenes import generate_scenes

    root = tmp_path_factory.mktemp("scenes")
    generate_scenes(root, n_train=1, n_val=40, n_test=1, seed=11, workers=1, progress=False)
    return root


def test_confidence_command_on_generated_scenes(scenes, tmp_path):
    """`captioner confidence` end to end with a real (scene) model on scenes it never saw: the report,
    the JSON, and --write storing a calibration the service then applies; never on the test split."""
    from captioner.cli import cli
    from model_export.confidence import caption_and_score
    from model_export.data.karpathy import load_karpathy

    dataset = load_karpathy(scenes / "dataset.json", scenes)
    examples = dataset.split("val")
    engine = Engine(load_bundle(SCENES_BUNDLE), device="cpu", threads=1)
    scored = caption_and_score(engine, [e.image_path for e in examples], [e.references for e in examples],
                               DecodingConfig(), progress=False)
    cider = sorted(s.cider for s in scored)
    threshold = (cider[len(cider) // 2 - 1] + cider[len(cider) // 2]) / 2  # between the two halves
    bundle = Path(shutil.copytree(SCENES_BUNDLE, tmp_path / "bundle"))
    out = tmp_path / "confidence.json"
    runner = CliRunner()
    args = ["confidence", "--bundle", str(bundle), "--data", str(scenes / "dataset.json"), "--images", str(scenes),
            "--split", "val", "--threshold", f"{threshold!r}", "--folds", "3", "--device", "cpu", "--threads", "1",
            "--no-progress", "--out", str(out)]
    result = runner.invoke(cli, [*args, "--write"])
    assert result.exit_code == 0, result.output
    assert "Spearman" in result.output and "ECE" in result.output
    report = json.loads(out.read_text())
    assert report["images"] == 40 and report["dataset"]["split"] == "val"
    assert report["decoding"]["strategy"] == "beam" and report["decoding"]["beam_size"] == 3
    assert report["mean_cider"] == pytest.approx(float(np.mean(cider)))
    assert sum(row["captions"] for row in report["raw"]["table"]) == 40
    assert report["calibration"]["slope"] > 0 and "val (40 images)" in report["calibration"]["fitted_on"]
    written = load_bundle(bundle)  # still intact: every file's sha256 checks
    assert written.confidence_calibration == ConfidenceCalibration.model_validate(report["calibration"])
    # the engine now answers calibrated confidences
    captions = Engine(written, device="cpu", threads=1).caption(_pixels(written), DecodingConfig())
    for (c,) in captions:
        assert c.confidence == pytest.approx(confidence(c.token_log_probs, written.confidence_calibration))
    # run again: the bundle's own calibration is measured beside the raw confidence (greedy here)
    result = runner.invoke(cli, [*args, "--strategy", "greedy"])
    assert result.exit_code == 0, result.output
    again = json.loads(out.read_text())
    assert again["decoding"]["strategy"] == "greedy" and "bundle_calibration" in again
    assert "the bundle's calibration" in result.output
    # never the test split
    result = runner.invoke(cli, [*args[:-2], "--split", "test"])
    assert result.exit_code == 1 and "test split" in result.output
