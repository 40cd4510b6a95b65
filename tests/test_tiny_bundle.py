"""The tiny test bundle is a real bundle: its graphs follow docs/bundle-format.md exactly (checked
with onnxruntime directly), its manifest hashes match, and its captions depend on the image."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from model_export.tiny_bundle import HIDDEN, VOCAB, make_tiny_bundle


def _sessions(bundle):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    enc = ort.InferenceSession(str(bundle / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(bundle / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
    return enc, dec


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth, different images: a per-image colour gradient plus noise, in [-1, 1]
    base = rng.uniform(-1, 1, size=(n, 3, 1, 1)).astype(np.float32)
    ramp = np.linspace(-0.5, 0.5, 224, dtype=np.float32)
    x = base + rng.uniform(-1, 1, size=(n, 3, 1, 1)).astype(np.float32) * ramp[None, None, :, None]
    x = x + 0.1 * rng.standard_normal((n, 3, 224, 224)).astype(np.float32)
    return np.clip(x, -1, 1).astype(np.float32)


@pytest.mark.parametrize("attention", [True, False])
def test_graph_interface(tmp_path, attention):
    bundle = make_tiny_bundle(tmp_path / "b", attention=attention)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for model_file in ("encoder.onnx", "decoder.onnx"):
        model = onnx.load(bundle / model_file)
        onnx.checker.check_model(model, full_check=True)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    enc, dec = _sessions(bundle)
    assert [i.name for i in enc.get_inputs()] == ["image"]
    assert [o.name for o in enc.get_outputs()] == ["features", "h0", "c0", "att_proj"]
    assert [i.name for i in dec.get_inputs()] == ["tokens", "h", "c", "features", "att_proj"]
    assert [o.name for o in dec.get_outputs()] == ["log_probs", "h_out", "c_out", "alpha"]
    assert dec.get_inputs()[0].type == "tensor(int64)"

    n, per_image = 3, 3
    rows = n * per_image
    features, h0, c0, att_proj = enc.run(None, {"image": _images(n)})
    p = 49 if attention else 1
    assert features.shape[:2] == (n, p) and att_proj.shape[:2] == (n, p)
    assert h0.shape == c0.shape == (n, HIDDEN) == (n, manifest["architecture"]["hidden_dim"])
    if not attention:
        assert features.shape == att_proj.shape == (n, 1, 1)
        assert not features.any() and not att_proj.any()

    # rows (beams) in image-major blocks of 3; B != N
    row_image = np.repeat(np.arange(n), per_image)
    tokens = np.full(rows, manifest["special_tokens"]["start"], dtype=np.int64)
    log_probs, h, c, alpha = dec.run(None, {"tokens": tokens, "h": h0[row_image], "c": c0[row_image],
                                            "features": features, "att_proj": att_proj})
    assert log_probs.shape == (rows, len(VOCAB)) == (rows, manifest["architecture"]["vocab_size"])
    assert h.shape == c.shape == (rows, HIDDEN)
    assert alpha.shape == (rows, p)
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(alpha.sum(axis=1), 1.0, atol=1e-5)
    if not attention:
        np.testing.assert_array_equal(alpha, 1.0)
    # rows of the same image with the same input give the same output
    np.testing.assert_allclose(log_probs[0], log_probs[1], atol=1e-6)
    np.testing.assert_allclose(log_probs[6], log_probs[8], atol=1e-6)
    # each block attends over its own image: the same as a step for that image alone
    alone = dec.run(None, {"tokens": tokens[3:6], "h": h0[[1, 1, 1]], "c": c0[[1, 1, 1]],
                           "features": features[1:2], "att_proj": att_proj[1:2]})
    np.testing.assert_allclose(alone[0], log_probs[3:6], atol=1e-5)
    np.testing.assert_allclose(alone[3], alpha[3:6], atol=1e-6)
    # <pad> and <start> are never likely
    special = manifest["special_tokens"]
    assert (log_probs[:, special["pad"]] < -15).all() and (log_probs[:, special["start"]] < -15).all()


def test_manifest_and_files(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    for entry in manifest["files"].values():
        data = (bundle / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
    vocab = json.loads((bundle / "vocab.json").read_text())["tokens"]
    assert len(vocab) == manifest["architecture"]["vocab_size"]
    assert [vocab[manifest["special_tokens"][k]] for k in ("pad", "start", "end", "unk")] == \
        ["<pad>", "<start>", "<end>", "<unk>"]


def test_deterministic_and_seeded(tmp_path):
    a = make_tiny_bundle(tmp_path / "a")
    b = make_tiny_bundle(tmp_path / "b")
    c = make_tiny_bundle(tmp_path / "c", seed=1)
    for name in ("encoder.onnx", "decoder.onnx", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "decoder.onnx").read_bytes() != (c / "decoder.onnx").read_bytes()


def _greedy(bundle, images: np.ndarray, steps: int = 16) -> list[list[int]]:
    enc, dec = _sessions(bundle)
    features, h, c, att_proj = enc.run(None, {"image": images})
    n = images.shape[0]
    tokens = np.full(n, 1, dtype=np.int64)
    out: list[list[int]] = [[] for _ in range(n)]
    done = np.zeros(n, dtype=bool)
    for step in range(steps):
        log_probs, h, c, _ = dec.run(None, {"tokens": tokens, "h": h, "c": c,  # one row per image
                                            "features": features, "att_proj": att_proj})
        log_probs[:, :4 if step == 0 else 2] = -np.inf  # no special token first; never pad/start
        log_probs[:, 3] = -np.inf
        tokens = log_probs.argmax(axis=1).astype(np.int64)
        for i in range(n):
            if not done[i]:
                if tokens[i] == 2:
                    done[i] = True
                else:
                    out[i].append(int(tokens[i]))
    return [o + ([2] if d else []) for o, d in zip(out, done, strict=True)]


@pytest.mark.parametrize("attention", [True, False])
def test_captions_are_not_trivial(tmp_path, attention):
    bundle = make_tiny_bundle(tmp_path / "b", attention=attention)
    captions = _greedy(bundle, _images(8, seed=3))
    words = [[t for t in cap if t != 2] for cap in captions]
    assert len({tuple(w) for w in words}) >= 3, words  # they depend on the image
    assert len({t for w in words for t in w}) >= 5  # more than a couple of words in use
    assert sum(cap[-1:] == [2] for cap in captions) >= 4  # most end on their own, before max_length
    assert all(1 <= len(w) for w in words)


@pytest.mark.parametrize("attention", [True, False])
def test_row_layout_is_the_same_model(tmp_path, attention):
    """`row_layout=True` builds the format-1.0 step (rows gather by `row_image`): the same weights,
    the same outputs, so tests can prove the engine serves both kinds of bundle alike."""
    blocks = make_tiny_bundle(tmp_path / "blocks", attention=attention)
    rows = make_tiny_bundle(tmp_path / "rows", attention=attention, row_layout=True)
    enc, dec = _sessions(blocks)
    _, old = _sessions(rows)
    assert [i.name for i in old.get_inputs()] == ["tokens", "h", "c", "row_image", "features", "att_proj"]
    features, h0, c0, att_proj = enc.run(None, {"image": _images(2)})
    row_image = np.array([0, 0, 1, 1], dtype=np.int64)
    feeds = {"tokens": np.array([1, 5, 1, 7]), "h": h0[row_image], "c": c0[row_image], "features": features, "att_proj": att_proj}
    for new, legacy in zip(dec.run(None, feeds), old.run(None, {**feeds, "row_image": row_image}), strict=True):
        np.testing.assert_allclose(new, legacy, atol=1e-5)
