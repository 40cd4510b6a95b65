"""The engine's IO-binding path (what device=cuda uses, so that the grid and h/c stay in device
memory between steps) gives exactly the captions of the plain path. Run here on the CPU, where
onnxruntime binds CPU OrtValues through the same API; and CUDA is never silently replaced by CPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.inference.bundle import load_bundle
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine, EngineError
from app.inference.graphs import REORDER_GRAPH, SELECT_GRAPH, build_reorder_model, build_select_model


def test_committed_reorder_graph_is_the_one_app_engine_graphs_builds():
    assert onnx.load(str(REORDER_GRAPH)).graph.SerializeToString() == build_reorder_model().graph.SerializeToString()
    session = ort.InferenceSession(str(REORDER_GRAPH), providers=["CPUExecutionProvider"])
    h = np.arange(12, dtype=np.float32).reshape(4, 3)
    got_h, got_c = session.run(None, {"h": h, "c": -h, "parents": np.array([3, 0, 0], dtype=np.int64)})
    np.testing.assert_array_equal(got_h, h[[3, 0, 0]])
    np.testing.assert_array_equal(got_c, -h[[3, 0, 0]])


@pytest.fixture(scope="module", params=[True, False], ids=["attention", "show_and_tell"])
def bundle(request, tiny_bundles):
    return load_bundle(tiny_bundles(attention=request.param))


@pytest.mark.parametrize(
    "config",
    [
        DecodingConfig(strategy="greedy"),
        DecodingConfig(beam_size=3),
        DecodingConfig(beam_size=5, num_captions=3, length_penalty=0.0),
        DecodingConfig(beam_size=4, num_captions=2, no_repeat_ngram_size=2, max_length=9),
    ],
    ids=["greedy", "beam3", "nbest", "ngram"],
)
def test_io_binding_path_gives_the_same_captions(bundle, config):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(5, 3, 224, 224)).astype(np.float32)
    plain = Engine(bundle, device="cpu", io_binding=False)
    bound = Engine(bundle, device="cpu", io_binding=True)
    assert bound.io_binding and not plain.io_binding
    want = plain.caption(images, config, attention=True)
    got = bound.caption(images, config, attention=True)
    for w, g in zip(want, got):
        assert [c.token_ids for c in w] == [c.token_ids for c in g]
        assert [c.score for c in w] == pytest.approx([c.score for c in g], abs=1e-5)
        for wc, gc in zip(w, g):
            if bundle.attention:
                np.testing.assert_allclose(wc.attention, gc.attention, atol=1e-6)
            else:
                assert wc.attention is None and gc.attention is None


def test_cuda_is_never_replaced_by_cpu_silently(bundle):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the refusal is tested where it does not")
    with pytest.raises(EngineError, match="device=cuda"):
        Engine(bundle, device="cuda")
    engine = Engine(bundle, device="auto")  # falls back, with a warning, and says so
    assert engine.provider == "CPUExecutionProvider" and engine.device == "cpu"


def test_committed_select_graph_is_the_one_app_engine_graphs_builds():
    assert onnx.load(str(SELECT_GRAPH)).graph.SerializeToString() == build_select_model().graph.SerializeToString()
    session = ort.InferenceSession(str(SELECT_GRAPH), providers=["CPUExecutionProvider"])
    log_probs = np.log(np.array([[0.1, 0.4, 0.1, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=np.float32))
    values, ids, end = session.run(None, {"log_probs": log_probs, "k": np.array([3]), "end": np.array([2])})
    np.testing.assert_array_equal(ids, [[1, 3, 0], [0, 1, 2]])  # ties: lower token id first
    np.testing.assert_allclose(values, np.take_along_axis(log_probs, ids, axis=1))
    np.testing.assert_allclose(end[:, 0], log_probs[:, 2])


@pytest.mark.parametrize("io_binding", [False, True], ids=["plain", "bound"])
def test_one_call_with_mixed_settings_equals_separate_calls(bundle, io_binding):
    """What the service's dynamic batcher relies on: requests with different settings in one engine
    call get exactly what they would get alone."""
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, size=(4, 3, 224, 224)).astype(np.float32)
    configs = [
        DecodingConfig(strategy="greedy"),
        DecodingConfig(beam_size=3),
        DecodingConfig(beam_size=5, num_captions=3, length_penalty=1.0),
        DecodingConfig(beam_size=2, num_captions=2, no_repeat_ngram_size=2, max_length=5),
    ]
    engine = Engine(bundle, device="cpu", io_binding=io_binding)
    together = engine.caption(images, configs, attention=[True, False, False, True])
    for i, config in enumerate(configs):
        (alone,) = engine.caption(images[i : i + 1], config, attention=True)
        assert [c.token_ids for c in together[i]] == [c.token_ids for c in alone]
        assert [c.score for c in together[i]] == pytest.approx([c.score for c in alone], abs=1e-5)
        if bundle.attention and i in (0, 3):
            np.testing.assert_allclose(together[i][0].attention, alone[0].attention, atol=1e-6)
        else:
            assert together[i][0].attention is None or not bundle.attention
    assert together[1][0].attention is None
