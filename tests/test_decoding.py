"""app/inference/decoding.py on tiny hand-made step models: exhaustive search agrees with beam search where
the beam is wide enough, greedy is beam size 1, batching changes nothing, and each rule holds."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from app.inference.decoding import (
    DecodingConfig,
    DenseLogProbs,
    SearchStats,
    banned_ngram_tokens,
    beam_search,
    length_normalized,
)

SPECIAL = {"pad": 0, "start": 1, "end": 2, "unk": 3}
FIRST_WORD = 4


class ToyModel:
    """Log-probabilities that depend on (image, the row's whole history), from a seeded table.

    It tracks each row's history itself from the `parents` the search passes, exactly as the
    ONNX engine tracks h and c, and counts its calls."""

    def __init__(self, words: int, seed: int, sharp: float = 2.0):
        self.vocab = FIRST_WORD + words
        self.seed = seed
        self.sharp = sharp
        self.calls = 0
        self.rows_per_call: list[int] = []

    def log_probs(self, image: int, history: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([self.seed, image, *history, 99])
        logits = rng.normal(size=self.vocab) * self.sharp
        return logits - np.log(np.exp(logits).sum())

    def step_fn(self):
        histories: list[tuple[int, tuple[int, ...]]] = []

        def step(tokens, parents, row_image):
            nonlocal histories
            self.calls += 1
            self.rows_per_call.append(len(tokens))
            if not histories:
                new = [(int(i), ()) for i in row_image]
            else:
                new = [(int(img), histories[p][1] + (int(tok),)) for img, p, tok in zip(row_image, parents, tokens)]
            histories = new
            out = np.stack([self.log_probs(img, hist) for img, hist in new]).astype(np.float32)
            return out, None

        return step


def exhaustive(model: ToyModel, image: int, max_length: int, length_penalty: float, ngram: int = 0):
    """Score every caption the rules allow; return them best first by normalized score."""
    words = range(FIRST_WORD, model.vocab)
    found = []
    for n in range(1, max_length + 1):
        for seq in itertools.product(words, repeat=n):
            if ngram and any(seq[i] in banned_ngram_tokens(list(seq[:i]), ngram) for i in range(n)):
                continue
            score, history = 0.0, ()
            for token in seq:
                score += float(model.log_probs(image, history).astype(np.float32)[token])
                history += (token,)
            score += float(model.log_probs(image, history).astype(np.float32)[SPECIAL["end"]])
            found.append((length_normalized(score, n + 1, length_penalty), list(seq), score))
    found.sort(key=lambda item: -item[0])
    return found


@dataclasses.dataclass(frozen=True)
class UncheckedConfig(DecodingConfig):
    """The search trusts its config (validation is the edge's job), so tests may go past the
    API's limit of 10 beams to make the beam wide enough for an exhaustive comparison."""

    def __post_init__(self) -> None:
        pass


def decode(model: ToyModel, images: int, config_class=DecodingConfig, **settings):
    config = config_class(**settings).resolved(bundle_max_length=settings.get("max_length") or 5)
    return beam_search(model.step_fn(), images, config, SPECIAL)


@pytest.mark.parametrize("words,max_length", [(2, 3), (3, 2)])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("seed", range(6))
def test_wide_beam_equals_exhaustive_search(words, max_length, length_penalty, seed):
    model = ToyModel(words, seed)
    # every hypothesis takes a slot when it ends; with a slot for each of the
    # words + words**2 + ... + words**max_length possible captions, nothing is ever pruned
    beam = sum(words**n for n in range(1, max_length + 1))
    results = decode(
        model, 2, UncheckedConfig, beam_size=beam, num_captions=3, max_length=max_length, length_penalty=length_penalty
    )
    for image in range(2):
        truth = exhaustive(model, image, max_length, length_penalty)
        assert [h.tokens for h in results[image]] == [seq for _, seq, _ in truth[:3]]
        for hyp, (norm, _, score) in zip(results[image], truth):
            assert hyp.score == pytest.approx(score, abs=1e-9)
            assert hyp.normalized_score == pytest.approx(norm, abs=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_narrow_beam_never_beats_exhaustive_and_is_a_valid_caption(seed):
    model = ToyModel(4, seed, sharp=1.0)
    truth = exhaustive(model, 0, 3, 1.0)
    best = {tuple(seq): norm for norm, seq, _ in truth}
    for beam in (1, 2, 3):
        (hyp,) = decode(model, 1, beam_size=beam, max_length=3, length_penalty=1.0)[0]
        assert tuple(hyp.tokens) in best
        assert hyp.normalized_score == pytest.approx(best[tuple(hyp.tokens)], abs=1e-9)
        assert hyp.normalized_score <= truth[0][0] + 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_beam_size_one_and_follows_the_argmax(seed):
    model = ToyModel(5, seed)
    greedy = decode(model, 3, strategy="greedy", max_length=6)
    beam1 = decode(model, 3, strategy="beam", beam_size=1, max_length=6)
    assert [[h.tokens for h in r] for r in greedy] == [[h.tokens for h in r] for r in beam1]
    for image in range(3):
        history: tuple[int, ...] = ()
        while True:
            lp = model.log_probs(image, history).copy()
            lp[[0, 1, 3]] = -np.inf
            if not history:
                lp[2] = -np.inf
            if len(history) == 6:
                break
            token = int(np.argmax(lp))
            if token == 2:
                break
            history += (token,)
        assert greedy[image][0].tokens == list(history)


@pytest.mark.parametrize("beam", [1, 3, 5])
def test_batched_decoding_equals_one_image_at_a_time(beam):
    model = ToyModel(6, seed=3, sharp=1.5)
    together = decode(model, 5, beam_size=beam, num_captions=min(beam, 2), max_length=7)
    for image in range(5):

        class Shifted(ToyModel):
            def log_probs(self, img, history):
                return model.log_probs(image, history)

        alone = decode(Shifted(6, 3), 1, beam_size=beam, num_captions=min(beam, 2), max_length=7)[0]
        assert [(h.tokens, h.score) for h in alone] == [(h.tokens, h.score) for h in together[image]]


def test_one_step_call_per_step_for_all_images_and_beams():
    model = ToyModel(6, seed=1, sharp=0.5)
    decode(model, 4, beam_size=3, max_length=5)
    assert model.calls <= 6  # max_length + 1 steps, each one call
    assert model.rows_per_call[0] == 4  # step 0: one row per image
    assert max(model.rows_per_call) <= 12  # never more than images x beam rows


def test_n_best_is_sorted_distinct_and_sized():
    model = ToyModel(5, seed=7)
    (result,) = decode(model, 1, beam_size=5, num_captions=4, max_length=5)
    assert len(result) == 4
    assert len({tuple(h.tokens) for h in result}) == 4
    norms = [h.normalized_score for h in result]
    assert norms == sorted(norms, reverse=True)


def test_length_penalty_changes_the_ranking_towards_longer_captions():
    model = ToyModel(3, seed=11, sharp=0.3)
    short = decode(model, 1, UncheckedConfig, beam_size=39, max_length=3, length_penalty=0.0)[0][0]
    long = decode(model, 1, UncheckedConfig, beam_size=39, max_length=3, length_penalty=5.0)[0][0]
    assert len(long.tokens) >= len(short.tokens)
    assert long.normalized_score == pytest.approx(long.score / (len(long.tokens) + 1) ** 5.0)


def test_max_length_and_never_generated_tokens():
    model = ToyModel(4, seed=5, sharp=0.1)
    for hyps in decode(model, 6, beam_size=4, num_captions=4, max_length=3):
        for h in hyps:
            assert 1 <= len(h.tokens) <= 3
            assert all(t >= FIRST_WORD for t in h.tokens)


class Repeater(ToyModel):
    """Loves repeating its favourite word: without blocking, captions repeat it to max length."""

    def log_probs(self, image, history):
        lp = np.full(self.vocab, -8.0)
        lp[FIRST_WORD] = -0.01
        lp[FIRST_WORD + 1] = -2.0
        lp[FIRST_WORD + 2] = -3.0
        lp[SPECIAL["end"]] = -6.0
        return lp


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_blocking(n):
    free = decode(Repeater(5, 0), 1, beam_size=3, max_length=8)[0][0]
    assert free.tokens == [FIRST_WORD] * 8
    blocked = decode(Repeater(5, 0), 1, beam_size=3, max_length=8, no_repeat_ngram_size=n)[0][0]
    grams = [tuple(blocked.tokens[i : i + n]) for i in range(len(blocked.tokens) - n + 1)]
    assert len(grams) == len(set(grams))


def test_banned_ngram_tokens_rule():
    assert banned_ngram_tokens([5, 6, 5], 2) == {6}
    assert banned_ngram_tokens([5, 6, 7], 2) == set()
    assert banned_ngram_tokens([5, 6], 1) == {5, 6}
    assert banned_ngram_tokens([5, 6, 7, 5, 6], 3) == {7}
    assert banned_ngram_tokens([5], 3) == set()


def test_attention_is_kept_per_token_when_asked():
    class WithAttention(ToyModel):
        def step_fn(self):
            inner = super().step_fn()

            def step(tokens, parents, row_image):
                lp, _ = inner(tokens, parents, row_image)
                alpha = np.tile(np.linspace(0, 1, 4, dtype=np.float32), (len(tokens), 1))
                alpha[:, 0] = len(tokens)
                return lp, alpha

            return step

    model = WithAttention(4, seed=2)
    config = DecodingConfig(beam_size=2).resolved(5)
    (hyp,) = beam_search(model.step_fn(), 1, config, SPECIAL, keep_attention=True)[0]
    assert hyp.attention.shape == (len(hyp.tokens) + 1, 4)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"strategy": "sample"}, "strategy"),
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 11}, "beam_size"),
        ({"beam_size": 2, "num_captions": 3}, "num_captions"),
        ({"strategy": "greedy", "num_captions": 2}, "num_captions"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": 65}, "max_length"),
        ({"length_penalty": -1.0}, "length_penalty"),
        ({"length_penalty": math.nan}, "length_penalty"),
        ({"no_repeat_ngram_size": 11}, "no_repeat_ngram_size"),
    ],
)
def test_config_validation(settings, message):
    with pytest.raises(ValueError, match=message):
        DecodingConfig(**settings)


def test_greedy_resolves_to_one_beam():
    resolved = DecodingConfig(strategy="greedy", beam_size=5).resolved(20)
    assert (resolved.beam_size, resolved.num_captions, resolved.max_length) == (1, 1, 20)


def test_request_settings_on_top_of_the_defaults():
    defaults = DecodingConfig(strategy="beam", beam_size=3, num_captions=1, length_penalty=0.5)
    assert defaults.with_overrides() == defaults
    assert defaults.with_overrides(num_captions=5).beam_size == 5  # unset beam widened to num_captions
    assert defaults.with_overrides(strategy="greedy").num_captions == 1
    assert (defaults.with_overrides(length_penalty=None, max_length=7)
            == DecodingConfig(beam_size=3, length_penalty=0.5, max_length=7))
    with pytest.raises(ValueError, match="num_captions"):
        defaults.with_overrides(beam_size=2, num_captions=3)


MIXED = [
    DecodingConfig(strategy="greedy", max_length=6),
    DecodingConfig(beam_size=3, max_length=4),
    DecodingConfig(beam_size=5, num_captions=3, max_length=7, length_penalty=1.0),
    DecodingConfig(beam_size=4, num_captions=2, max_length=6, no_repeat_ngram_size=1),
]


def test_images_with_different_settings_share_each_step_and_match_decoding_alone():
    model = ToyModel(6, seed=21, sharp=1.2)
    together = beam_search(model.step_fn(), len(MIXED), MIXED, SPECIAL)
    assert model.calls <= 8  # the longest max_length + 1 steps, one call each, for all four images
    for image, config in enumerate(MIXED):

        class Alone(ToyModel):
            def log_probs(self, img, history):
                return model.log_probs(image, history)

        (alone,) = beam_search(Alone(6, 21).step_fn(), 1, config, SPECIAL)
        assert [(h.tokens, h.score, h.normalized_score) for h in alone] == [
            (h.tokens, h.score, h.normalized_score) for h in together[image]]


class CountingOutput:
    """A StepOutput that records how the search reads it."""

    def __init__(self, log_probs, log):
        self.inner = DenseLogProbs(log_probs)
        self.log = log

    def top(self, k):
        self.log.append(("top", k))
        return self.inner.top(k)

    def column(self, token):
        self.log.append(("column", token))
        return self.inner.column(token)

    def full(self):
        self.log.append(("full", None))
        return self.inner.full()


@pytest.mark.parametrize("config", MIXED[:3] + [DecodingConfig(beam_size=3, max_length=6, no_repeat_ngram_size=1)])
def test_only_the_best_few_tokens_are_read_unless_the_rules_need_more(config):
    """With a large vocabulary the search asks each step for the top k (k = open beams + 4) and reads
    the full log-probabilities only when blocking left a row short; the captions are the same as
    with the full log-probabilities every step."""
    words = 300
    model = ToyModel(words, seed=4, sharp=3.0)
    reads: list = []
    base = model.step_fn()

    def step(tokens, parents, row_image):
        out, att = base(tokens, parents, row_image)
        return CountingOutput(out, reads), att

    resolved = config.resolved()
    got = beam_search(step, 3, [resolved] * 3, SPECIAL, vocab_size=FIRST_WORD + words)
    want = beam_search(ToyModel(words, seed=4, sharp=3.0).step_fn(), 3, resolved, SPECIAL, vocab_size=1)  # 1: always full
    assert [[(h.tokens, h.score) for h in per] for per in got] == [[(h.tokens, h.score) for h in per] for per in want]
    beam = 1 if config.strategy == "greedy" else config.beam_size
    assert all(k <= beam + 4 for kind, k in reads if kind == "top")
    fulls = sum(kind == "full" for kind, _ in reads)
    tops = sum(kind == "top" for kind, _ in reads)
    assert tops > 0 and fulls <= tops // 2


# ---- cancellation: a cancelled image's rows leave the search ---------------------------------------

CANCEL_CONFIGS = [DecodingConfig(beam_size=4, max_length=10).resolved(),
                  DecodingConfig(beam_size=3, num_captions=2, max_length=10, no_repeat_ngram_size=2).resolved(),
                  DecodingConfig(strategy="greedy", max_length=10).resolved()]


def test_a_cancelled_image_leaves_the_search_at_the_next_step_and_the_others_decode_as_before():
    full_model, full_stats = ToyModel(6, seed=5, sharp=1.0), SearchStats()
    full = beam_search(full_model.step_fn(), 3, CANCEL_CONFIGS, SPECIAL, stats=full_stats)

    model, stats = ToyModel(6, seed=5, sharp=1.0), SearchStats()
    asked = []

    def cancelled():
        asked.append(model.calls)
        return {0} if model.calls >= 2 else set()  # image 0's client hangs up after two steps

    got = beam_search(model.step_fn(), 3, CANCEL_CONFIGS, SPECIAL, cancelled=cancelled, stats=stats)
    assert asked[:3] == [0, 1, 2]  # asked before every step
    assert got[0] == [] and full[0]  # the cancelled image has no result
    assert got[1:] == full[1:]  # the others: the very same hypotheses (tokens, scores, log-probabilities)
    assert stats.cancelled_images == {0} and stats.dropped_rows > 0
    # the first two steps are the same; from the third on, the step gets fewer rows: image 0's are gone
    assert model.rows_per_call[:2] == full_model.rows_per_call[:2]
    assert model.rows_per_call[2] == full_model.rows_per_call[2] - stats.dropped_rows
    assert stats.rows < full_stats.rows and stats.rows == sum(model.rows_per_call)
    assert stats.steps == model.calls <= full_stats.steps == full_model.calls


def test_when_every_image_is_cancelled_the_search_stops():
    model, stats = ToyModel(6, seed=5, sharp=1.0), SearchStats()
    config = DecodingConfig(beam_size=3, max_length=10).resolved()
    got = beam_search(model.step_fn(), 2, config, SPECIAL, stats=stats,
                      cancelled=lambda: {0, 1} if model.calls >= 3 else ())
    assert got == [[], []]
    assert model.calls == stats.steps == 3
    assert stats.cancelled_images == {0, 1}


def test_cancelling_before_the_first_step_decodes_only_the_others():
    model = ToyModel(6, seed=5, sharp=1.0)
    alone = beam_search(ToyModel(6, seed=5, sharp=1.0).step_fn(), 3, CANCEL_CONFIGS, SPECIAL)
    got = beam_search(model.step_fn(), 3, CANCEL_CONFIGS, SPECIAL, cancelled=lambda: {1})
    assert got[1] == [] and got[0] == alone[0] and got[2] == alone[2]
    assert model.rows_per_call[0] == 2  # the first step: one row for each image still wanted


# ---- constraints (include words, guide=labels): constrained beam search ------------------------

def constrained(model: ToyModel, images: int, groups, config_class=DecodingConfig, **settings):
    config = config_class(**settings).resolved(bundle_max_length=settings.get("max_length") or 5)
    return beam_search(model.step_fn(), images, config, SPECIAL, constraints=[groups] * images)


@pytest.mark.parametrize("groups", [[{4}], [{5, 6}], [{4}, {6}]])
@pytest.mark.parametrize("seed", range(4))
def test_wide_constrained_beam_finds_the_best_caption_that_meets_every_constraint(groups, seed):
    model = ToyModel(words=3, seed=seed)
    best = [c for c in exhaustive(model, 0, 3, 0.0) if all(g & set(c[1]) for g in groups)]
    got = constrained(model, 1, groups, UncheckedConfig, beam_size=40, max_length=3)[0][0]
    assert got.met
    assert got.tokens == best[0][1]
    assert math.isclose(got.score, best[0][2], rel_tol=1e-6, abs_tol=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("seed", range(5))
def test_every_caption_contains_one_token_of_each_group(beam, seed):
    model = ToyModel(words=8, seed=seed)
    groups = [{5, 9}, {11}]
    results = constrained(model, 3, groups, strategy="beam", beam_size=beam, num_captions=beam, max_length=6)
    for per_image in results:
        assert len(per_image) == beam
        for hyp in per_image:
            assert hyp.met and all(g & set(hyp.tokens) for g in groups), hyp.tokens
            assert math.isclose(sum(hyp.token_log_probs), hyp.score, abs_tol=1e-6)


def test_unreachable_constraints_fall_back_to_a_caption_that_misses_them():
    model = ToyModel(words=4, seed=3)
    # one word at most, two constraints: no caption can meet both
    hyp = constrained(model, 1, [{4}, {5}], beam_size=3, max_length=1)[0][0]
    assert not hyp.met
    assert len(hyp.tokens) == 1


def test_constrained_and_plain_images_share_steps_and_decode_as_alone():
    model = ToyModel(words=6, seed=11)
    config = DecodingConfig(beam_size=3, no_repeat_ngram_size=2).resolved(6)
    groups = [[{7}], [], [{4, 5}, {9}]]
    together = beam_search(model.step_fn(), 3, config, SPECIAL, constraints=groups)
    for image, g in enumerate(groups):
        alone_model = ToyModel(words=6, seed=11)

        def step_for(image=image, inner=alone_model.step_fn()):
            def step(tokens, parents, row_image):
                return inner(tokens, parents, np.full_like(row_image, image))
            return step

        alone = beam_search(step_for(), 1, config, SPECIAL, constraints=[g])[0]
        assert [h.tokens for h in together[image]] == [h.tokens for h in alone]
    assert all(g[0] & set(together[0][0].tokens) for g in [[{7}]])


def test_no_constraints_is_the_plain_search():
    model = ToyModel(words=6, seed=2)
    config = DecodingConfig(beam_size=3, num_captions=3).resolved(5)
    plain = beam_search(model.step_fn(), 2, config, SPECIAL)
    empty = beam_search(ToyModel(words=6, seed=2).step_fn(), 2, config, SPECIAL, constraints=[[], []])
    assert [[h.tokens for h in r] for r in plain] == [[h.tokens for h in r] for r in empty]


@pytest.mark.parametrize("settings,message", [
    ({"guide": "words"}, "guide must be"),
    ({"guide_threshold": 0.0}, "guide_threshold"),
    ({"guide_threshold": 1.5}, "guide_threshold"),
    ({"guide_words": 4}, "guide_words"),
    ({"include": ((4,),) * 4}, "at most 3 include"),
    ({"include": ((),)}, "each include group"),
])
def test_constraint_settings_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        DecodingConfig(**settings)
