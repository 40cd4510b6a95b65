"""Attention maps: app/inference/attention_map.py (pure functions) and the API that uses them:
`POST /v1/captions?attention=true` (JSON weights) and `POST /v1/captions/attention.png` (a picture),
with an attention bundle, a Show-and-Tell bundle (409 attention_unavailable) and models/default."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.inference.attention_map import (
    attention_map,
    colorize,
    grid_shape,
    heatmap,
    render_attention,
    render_attention_png,
    token_labels,
)
from app.settings import load_settings
from model_export.tiny_bundle import VOCAB
from tests.support.live_server import REPO

# ---- pure functions -------------------------------------------------------------------------------


def _one_hot(rows: int, cols: int, r: int, c: int) -> list[float]:
    w = [0.0] * (rows * cols)
    w[r * cols + c] = 1.0
    return w


def test_colorize_ramp_ends_and_clipping():
    out = colorize(np.array([[-1.0, 0.0], [1.0, 7.0]]))
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == out[0, 1].tolist() == [13, 8, 135]
    assert out[1, 0].tolist() == out[1, 1].tolist() == [240, 249, 33]
    mid = colorize(np.array([0.5]))[0]
    assert mid.tolist() == [204, 71, 120]
    assert colorize(np.array([np.nan]))[0].tolist() == [13, 8, 135]


def test_heatmap_is_normalized_and_upsampled():
    weights = np.zeros(12)
    weights[5] = 0.02  # row 1, col 1 of a 3x4 grid; small absolute weights still reach 1
    heat = heatmap(weights, (3, 4), (80, 60))
    assert heat.shape == (60, 80) and heat.dtype == np.float32
    assert heat.max() == pytest.approx(1.0, abs=0.05) and heat.min() >= 0.0
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert 20 <= x < 40 and 20 <= y < 40  # inside cell (1, 1): x in [20, 40), y in [20, 40)
    assert heatmap(np.zeros(12), (3, 4), (8, 6)).max() == 0.0  # nothing to show: no NaNs


def test_render_draws_one_panel_per_token_with_the_heat_where_the_weight_is():
    image = Image.new("RGB", (200, 100), (128, 128, 128))
    tokens = ["a", "cat", "<end>"]
    weights = [_one_hot(2, 4, 0, 3), _one_hot(2, 4, 1, 0), [1 / 8] * 8]
    picture = render_attention(image, tokens, weights, (2, 4), panel=100, columns=2, title="a cat")
    pad, label_h = 4, 14
    # 2 columns x 2 rows of 100x50 panels, a title line on top
    assert picture.size == (2 * 100 + 3 * pad, (label_h + pad) + 2 * (50 + label_h) + 3 * pad)
    arr = np.asarray(picture).astype(int)

    def panel_origin(index):
        r, c = divmod(index, 2)
        return pad + c * (100 + pad), (label_h + pad) + pad + r * (50 + label_h + pad) + label_h

    def yellowness(index, x, y):
        ox, oy = panel_origin(index)
        r, g, b = arr[oy + y, ox + x]
        return r + g - 2 * b

    # "a" looks top-right, "cat" bottom-left
    assert yellowness(0, 90, 5) > yellowness(0, 10, 45) + 100
    assert yellowness(1, 10, 45) > yellowness(1, 90, 5) + 100
    # uniform attention: one even tint
    assert abs(yellowness(2, 90, 5) - yellowness(2, 10, 45)) < 5
    # the fourth slot of the grid stays blank (white)
    ox, oy = panel_origin(3)
    assert (arr[oy:oy + 50, ox:ox + 100] == 255).all()
    # titles are drawn: dark pixels in the label strip above the first panel
    ox, oy = panel_origin(0)
    assert (arr[oy - label_h:oy, ox:ox + 100].sum(axis=2) < 200).any()


def test_render_png_and_its_checks():
    png = render_attention_png(Image.new("L", (30, 60), 40), ["x"], [[0.25, 0.75]], (1, 2), panel=64)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB"
    with pytest.raises(ValueError, match="weights must be"):
        render_attention(Image.new("RGB", (8, 8)), ["x"], [[1.0, 0.0, 0.0]], (1, 2))
    with pytest.raises(ValueError, match="tokens but"):
        render_attention(Image.new("RGB", (8, 8)), ["x", "y"], [[1.0, 0.0]], (1, 2))
    with pytest.raises(ValueError, match="no tokens"):
        render_attention(Image.new("RGB", (8, 8)), [], np.zeros((0, 2)), (1, 2))


def test_grid_shape_and_labels():
    bundle = SimpleNamespace(manifest=SimpleNamespace(architecture=SimpleNamespace(grid_size=(7, 7))))
    assert grid_shape(bundle) == (7, 7)
    assert grid_shape(bundle, 49) == (7, 7)
    assert grid_shape(bundle, 16) == (4, 4)  # the manifest disagrees with the weights: derived
    assert grid_shape(bundle, 6) == (1, 6)
    vocab = ["<pad>", "<start>", "<end>", "<unk>", "a", "cat"]
    assert token_labels([4, 3, 5], vocab, 2) == ["a", "<unk>", "cat", "<end>"]


def test_attention_map_lines_up_rows_and_tokens():
    bundle = SimpleNamespace(manifest=SimpleNamespace(architecture=SimpleNamespace(grid_size=(1, 2))),
                             vocab=["<pad>", "<start>", "<end>", "<unk>", "a"], special={"end": 2})
    caption = SimpleNamespace(token_ids=[4, 3], attention=np.array([[0.5, 0.5], [0.9, 0.1], [np.nan, 1.0]]))
    out = attention_map(caption, bundle)
    assert out == {"grid": [1, 2], "tokens": ["a", "<unk>", "<end>"],
                   "weights": [[0.5, 0.5], [0.9, 0.1], [0.0, 1.0]]}
    assert attention_map(SimpleNamespace(token_ids=[4], attention=None), bundle) is None


# ---- the API --------------------------------------------------------------------------------------


def _client(bundle: Path) -> TestClient:
    from app.main import create_app

    return TestClient(create_app(load_settings(bundle=bundle, device="cpu", threads=1, max_batch_files=4)))


@pytest.fixture(scope="module")
def sat(tiny_bundles):
    with _client(tiny_bundles(attention=True, max_length=10)) as client:
        yield client


@pytest.fixture(scope="module")
def st(tiny_bundles):
    with _client(tiny_bundles(attention=False, max_length=10)) as client:
        yield client


def _upload(data: bytes, name: str = "cat.jpg", mime: str = "image/jpeg"):
    return {"image": (name, data, mime)}


def test_attention_json(sat, cat_jpeg):
    r = sat.post("/v1/captions", params={"attention": "true", "num_captions": 2}, files=_upload(cat_jpeg))
    assert r.status_code == 200, r.text
    body = r.json()
    att = body["attention"]
    best = body["captions"][0]
    assert att["grid"] == [7, 7]
    assert att["tokens"] == best["tokens"] + ["<end>"]  # the tiny model (practically) never says <unk>
    assert len(att["weights"]) == len(att["tokens"])
    for row in att["weights"]:
        assert len(row) == 49 and min(row) >= 0 and sum(row) == pytest.approx(1.0, abs=1e-4)
    assert len(body["captions"]) == 2


def test_attention_matches_the_engine(sat, cat_jpeg):
    from app.api.state import service_state
    from app.inference.decoding import DecodingConfig
    from app.inference.preprocess import decode_image, draft_size, to_array

    engine = service_state(sat.app).engine
    spec = engine.bundle.preprocessing
    array = to_array(decode_image(cat_jpeg, 10**8, draft_size(spec)), spec)
    direct = engine.caption([array], DecodingConfig(strategy="greedy"), attention=True)[0][0]
    r = sat.post("/v1/captions?attention=true&strategy=greedy", files=_upload(cat_jpeg))
    assert r.status_code == 200
    np.testing.assert_allclose(np.array(r.json()["attention"]["weights"]), direct.attention, atol=2e-6)


@pytest.mark.parametrize("query", ["", "?attention=false"])
def test_no_attention_unless_asked(sat, cat_jpeg, query):
    r = sat.post("/v1/captions" + query, files=_upload(cat_jpeg))
    assert r.status_code == 200
    assert set(r.json()) == {"captions", "settings", "model", "timings_ms", "request_id"}


def test_attention_png(sat, cat_jpeg):
    r = sat.post("/v1/captions/attention.png", params={"panel": 96, "columns": 3, "max_length": 4},
                 files=_upload(cat_jpeg))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-request-id"]
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG"
    words = sat.post("/v1/captions?attention=true&max_length=4", files=_upload(cat_jpeg)).json()["attention"]["tokens"]
    rows = -(-len(words) // 3)
    panel_h = round(300 / 451 * 96)  # chelsea is 451x300
    pad, label_h = 4, 14
    assert img.size == (min(3, len(words)) * 96 + (min(3, len(words)) + 1) * pad,
                        (label_h + pad) + rows * (panel_h + label_h) + (rows + 1) * pad)


def test_attention_png_errors(sat, cat_jpeg):
    r = sat.post("/v1/captions/attention.png", files=_upload(b"just text", "a.txt", "text/plain"))
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = sat.post("/v1/captions/attention.png", files=_upload(cat_jpeg[: len(cat_jpeg) // 3]))
    assert r.status_code == 422 and r.json()["error"]["code"] == "corrupt_image"
    r = sat.post("/v1/captions/attention.png?beam_size=2&num_captions=3", files=_upload(cat_jpeg))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"
    r = sat.post("/v1/captions/attention.png?panel=5", files=_upload(cat_jpeg))
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
    r = sat.post("/v1/captions/attention.png")
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_field"


def test_show_and_tell_has_no_attention(st, cat_jpeg):
    for path in ("/v1/captions?attention=true", "/v1/captions/attention.png"):
        r = st.post(path, files=_upload(cat_jpeg))
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "attention_unavailable" and "no attention" in error["message"]
        assert r.headers["x-request-id"] == error["request_id"]
    r = st.post("/v1/captions", files=_upload(cat_jpeg))
    assert r.status_code == 200 and "attention" not in r.json()


def test_openapi_documents_attention(sat):
    spec = sat.get("/openapi.json").json()
    single = spec["paths"]["/v1/captions"]["post"]
    param = next(p for p in single["parameters"] if p["name"] == "attention")
    assert param["in"] == "query" and param["schema"]["type"] == "boolean" and param["schema"]["default"] is False
    assert "409" in single["responses"]
    response = spec["components"]["schemas"]["CaptionResponse"]
    assert "attention" not in response.get("required", [])
    amap = spec["components"]["schemas"]["AttentionMap"]
    assert set(amap["required"]) == {"grid", "tokens", "weights"}

    png = spec["paths"]["/v1/captions/attention.png"]["post"]
    assert png["operationId"] == "create_attention_png"
    assert png["responses"]["200"]["content"] == {"image/png": {"schema": {"type": "string", "format": "binary"}}}
    for status in ("409", "413", "415", "422", "500", "503"):
        assert png["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    body = png["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    image = spec["components"]["schemas"][body]["properties"]["image"]
    assert image["type"] == "string" and image["format"] == "binary"
    assert "/" not in spec["paths"]


def test_default_model_attention(cat_jpeg):
    bundle = REPO / "models" / "default"
    if not (bundle / "encoder.onnx").exists():
        pytest.skip("models/default is not there")
    with _client(bundle) as client:
        r = client.post("/v1/captions?attention=true&strategy=greedy", files=_upload(cat_jpeg))
        assert r.status_code == 200, r.text
        att = r.json()["attention"]
        assert att["grid"] == [7, 7] and all(len(row) == 49 for row in att["weights"])
        assert att["tokens"][-1] == "<end>" and len(att["weights"]) == len(att["tokens"])
        r = client.post("/v1/captions/attention.png?strategy=greedy", files=_upload(cat_jpeg))
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).format == "PNG"


def test_vocab_of_the_factory_is_what_the_tests_assume():
    assert VOCAB[2] == "<end>"
