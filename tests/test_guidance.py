"""Captions that must contain words: `include=` (the request's words) and `guide=labels` (the words of the
image's own confident ImageNet labels), through the engine (host path and IO binding alike) and on a
real server (the answer's `guide`, `constraints_met` and settings; 422 for a word the model cannot
write, 409 for guide=labels on a model without label words). The search itself is tested on toy step
functions in tests/test_decoding.py; the torch mirror in tests/test_training.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.inference.bundle import BundleError, load_bundle
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine
from app.inference.guidance import GroupTable, UnknownWords, guide_words, include_groups
from model_export.tiny_bundle import LABEL_NAMES, LABEL_WORDS
from tests.support.live_server import image_bytes


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 224, 224)).astype(np.float32)


def _photo(seed: int) -> bytes:
    return image_bytes(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8), "PNG")


@pytest.fixture(scope="module")
def worded(tiny_bundles):
    return tiny_bundles(labels=True, label_words=True)


# ---- the words of the labels --------------------------------------------------------------------


def test_a_word_groups_probability_is_the_sum_over_its_classes():
    probs = np.zeros(len(LABEL_WORDS))
    probs[0], probs[9], probs[1], probs[8] = 0.5, 0.3, 0.15, 0.05  # classes 0 and 9 are both "cat"
    table = GroupTable(LABEL_WORDS)
    groups = dict(zip(table.groups, table.probabilities(probs), strict=True))
    assert groups[("cat",)] == pytest.approx(0.8) and groups[("dog",)] == pytest.approx(0.15)
    token_of = {"cat": 5, "dog": 6}
    chosen = guide_words(probs, LABEL_WORDS, token_of, threshold=0.1, limit=3)
    assert [(w.words, round(w.probability, 3)) for w in chosen] == [(("cat",), 0.8), (("dog",), 0.15)]
    assert guide_words(probs, LABEL_WORDS, token_of, threshold=0.5, limit=3)[0].token_ids == (5,)
    assert guide_words(probs, LABEL_WORDS, token_of, threshold=0.9, limit=3) == []
    assert guide_words(probs, LABEL_WORDS, token_of, threshold=0.1, limit=0) == []


def test_include_words_become_token_groups_and_unknown_words_are_named():
    token_of = {"<end>": 2, "cat": 5, "cats": 9, "sofa": 7}
    assert include_groups("cat|cats, Sofa", token_of, [0, 1, 2, 3]) == ((5, 9), (7,))
    with pytest.raises(UnknownWords) as caught:
        include_groups("zebra,cat,<end>|okapi", token_of, [0, 1, 2, 3])
    assert caught.value.words == ["zebra", "<end>", "okapi"]
    with pytest.raises(ValueError, match="empty word"):
        include_groups("cat,,sofa", token_of, [0, 1, 2, 3])


def test_the_bundle_reads_its_label_words_and_checks_them(worded, copy_bundle, tiny_bundles):
    assert load_bundle(worded).label_words == LABEL_WORDS
    assert load_bundle(tiny_bundles(labels=True)).label_words is None
    broken = copy_bundle(worded)
    (broken / "labels.json").write_text(json.dumps({"names": LABEL_NAMES, "words": [[["okapi"]]] * len(LABEL_NAMES)}))
    with pytest.raises(BundleError, match="outside the vocabulary: okapi"):
        load_bundle(broken, verify=False)
    (broken / "labels.json").write_text(json.dumps({"names": LABEL_NAMES, "words": [["cat"]] * len(LABEL_NAMES)}))
    with pytest.raises(BundleError, match="word groups"):
        load_bundle(broken, verify=False)


# ---- the engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("io_binding", [False, True])
def test_every_caption_contains_the_included_words(worded, io_binding):
    engine = Engine(load_bundle(worded), device="cpu", io_binding=io_binding)
    vocab = engine.bundle.token_ids
    config = DecodingConfig(beam_size=3, num_captions=3, include=((vocab["hat"],), (vocab["tree"], vocab["grass"])))
    for result in engine.run(_images(4), config):
        assert len(result.captions) == 3
        for caption in result.captions:
            assert caption.met and "hat" in caption.tokens and {"tree", "grass"} & set(caption.tokens), caption.text


def test_io_binding_and_host_paths_agree_with_constraints(worded):
    bundle = load_bundle(worded)
    vocab = bundle.token_ids
    configs = [DecodingConfig(beam_size=2, include=((vocab["dog"],),)), DecodingConfig(beam_size=3),
               DecodingConfig(guide="labels", guide_threshold=0.01, guide_words=2, no_repeat_ngram_size=2)]
    host = Engine(bundle, device="cpu", io_binding=False).run(_images(3, 5), configs)
    bound = Engine(bundle, device="cpu", io_binding=True).run(_images(3, 5), configs)
    assert [[c.token_ids for c in r.captions] for r in host] == [[c.token_ids for c in r.captions] for r in bound]
    assert [r.guide for r in host] == [r.guide for r in bound]


def test_guide_labels_makes_captions_name_the_confident_label_words(worded):
    engine = Engine(load_bundle(worded), device="cpu")
    plain = engine.run(_images(6, 1), DecodingConfig(), labels=10)
    guided = engine.run(_images(6, 1), DecodingConfig(guide="labels", guide_threshold=0.2, guide_words=2), labels=10)
    applied = 0
    for before, after in zip(plain, guided, strict=True):
        expected = guide_words(np.array([lbl.probability for lbl in sorted(before.labels, key=lambda x: x.class_id)]),
                               LABEL_WORDS, engine.bundle.token_ids, 0.2, 2)
        assert after.guide == expected
        for word in after.guide:
            assert set(word.words) & set(after.captions[0].tokens), (word, after.captions[0].text)
        applied += len(after.guide)
    assert applied > 0  # the tiny head is confident enough about some class on these inputs


def test_guide_labels_needs_label_words(tiny_bundles):
    engine = Engine(load_bundle(tiny_bundles(labels=True)), device="cpu")
    with pytest.raises(ValueError, match="no label words"):
        engine.run(_images(1), DecodingConfig(guide="labels"))


def test_words_that_cannot_all_fit_fall_back_to_the_best_caption_and_say_so(worded):
    engine = Engine(load_bundle(worded), device="cpu")
    vocab = engine.bundle.token_ids
    config = DecodingConfig(max_length=1, include=((vocab["hat"],), (vocab["dog"],)))
    caption = engine.run(_images(1), config)[0].captions[0]
    assert not caption.met and len(caption.tokens) == 1


# ---- the HTTP API --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(start_server, worded):
    return start_server(worded, "guidance")


@pytest.fixture(scope="module")
def plain_server(start_server, tiny_bundles):
    return start_server(tiny_bundles(labels=True), "guidance-plain")


def test_include_over_http(server):
    with server.client() as client:
        body = client.post("/v1/captions", params={"include": "hat,tree|grass", "num_captions": 2, "beam_size": 2},
                           files={"image": ("a.png", _photo(1), "image/png")}).json()
        assert body["settings"]["include"] == ["hat", "tree|grass"]
        for caption in body["captions"]:
            assert caption["constraints_met"] is True
            assert "hat" in caption["tokens"] and {"tree", "grass"} & set(caption["tokens"])
        assert "guide" not in body
        plain = client.post("/v1/captions", files={"image": ("a.png", _photo(1), "image/png")}).json()
        assert "constraints_met" not in plain["captions"][0] and plain["settings"]["include"] == []


def test_unknown_include_word_is_a_422_naming_it(server):
    with server.client() as client:
        response = client.post("/v1/captions", params={"include": "hat,zebra"},
                               files={"image": ("a.png", _photo(1), "image/png")})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "unknown_word" and "zebra" in error["message"]
        assert error["details"] == [{"loc": ["query", "include"], "msg": "'zebra' is not in the model's vocabulary",
                                     "type": "unknown_word"}]
        too_many = client.post("/v1/captions", params={"include": "hat,tree,dog,cat"},
                               files={"image": ("a.png", _photo(1), "image/png")})
        assert too_many.status_code == 422 and "at most 3" in too_many.json()["error"]["message"]


def test_guide_labels_over_http_single_and_batch(server):
    with server.client() as client:
        params = {"guide": "labels", "guide_threshold": 0.05, "guide_words": 2, "labels": 3}
        body = client.post("/v1/captions", params=params, files={"image": ("a.png", _photo(2), "image/png")}).json()
        assert body["settings"]["guide"] == "labels" and body["settings"]["guide_words"] == 2
        assert isinstance(body["guide"], list)
        for word in body["guide"]:
            assert set(word["words"]) & set(body["captions"][0]["tokens"])
        batch = client.post("/v1/captions/batch", params=params,
                            files=[("images", (f"{i}.png", _photo(i), "image/png")) for i in range(3)]).json()
        for item in batch["results"]:
            for word in item["guide"]:
                assert set(word["words"]) & set(item["captions"][0]["tokens"])
        info = client.get("/v1/model").json()
        assert info["label_words"] is True and info["label_prior"] is False


def test_guide_labels_on_a_model_without_label_words_is_a_409(plain_server):
    with plain_server.client() as client:
        response = client.post("/v1/captions", params={"guide": "labels"},
                               files={"image": ("a.png", _photo(1), "image/png")})
        assert response.status_code == 409 and response.json()["error"]["code"] == "guide_unavailable"
        assert client.post("/v1/captions", files={"image": ("a.png", _photo(1), "image/png")}).status_code == 200


def test_the_default_guide_comes_from_the_settings_else_the_bundle_and_never_without_words(worded, tiny_bundles):
    from app.settings import Settings

    with_words, without = load_bundle(worded), load_bundle(tiny_bundles(labels=True))
    assert Settings().decoding_for(with_words).guide == "none"  # the tiny bundle recommends nothing
    assert Settings(default_guide="labels").decoding_for(with_words).guide == "labels"
    assert Settings(default_guide="labels").decoding_for(without).guide == "none"
    config = Settings(default_guide="labels", default_guide_threshold=0.3, default_guide_words=2).decoding_for(with_words)
    assert (config.guide_threshold, config.guide_words) == (0.3, 2)
    with_words.recommended_decoding = with_words.recommended_decoding.model_copy(
        update={"guide": "labels", "guide_threshold": 0.7})
    recommended = Settings().decoding_for(with_words)
    assert (recommended.guide, recommended.guide_threshold, recommended.guide_words) == ("labels", 0.7, 1)


def test_a_decoding_setting_given_twice_is_a_422(server):
    with server.client() as client:
        response = client.post("/v1/captions?guide_words=1&guide_words=2",
                               files={"image": ("a.png", _photo(1), "image/png")})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "validation_error" and "'guide_words' given more than once" in error["message"]
        assert client.post("/v1/captions?beam_size=2", files={"image": ("a.png", _photo(1), "image/png")}).status_code == 200
