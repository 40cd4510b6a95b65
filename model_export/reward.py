"""CIDEr-D per caption, with document frequencies fixed from a whole corpus: the reward of
self-critical sequence training (Rennie et al., 2017). No torch here.

pycocoevalcap's `CiderScorer` computes the document frequencies from the references it is given
in each call, so scoring one training batch would weigh n-grams by that batch alone. This is the
same CIDEr-D (n = 1..4, tf-idf vectors, clipped cosine similarity, the Gaussian length penalty with
sigma 6, mean over n and references, times 10), with the frequencies and the corpus size counted
once over the training references. `tests/test_training.py` checks it against pycocoevalcap on a
corpus where the two must agree.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

Tokens = Sequence[str]
_N = 4
_SIGMA = 6.0


def _ngrams(words: Tokens) -> Counter:
    counts: Counter = Counter()
    for n in range(1, _N + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


class CiderD:
    """CIDEr-D of candidate captions against each image's references, corpus document frequencies."""

    def __init__(self, corpus: Sequence[Sequence[Tokens]]):
        """`corpus`: every training image's references (token lists)."""
        frequency: defaultdict = defaultdict(float)
        for refs in corpus:
            for ngram in {g for ref in refs for g in _ngrams(ref)}:
                frequency[ngram] += 1.0
        self.frequency = frequency
        self.log_corpus = math.log(float(max(len(corpus), 1)))
        self._cache: dict[tuple[tuple[str, ...], ...], list] = {}

    def document_frequencies(self) -> tuple[dict, float]:
        """What the corpus contributes (n-gram -> images whose references hold it, log corpus size): computed
        once, then shared (`from_document_frequencies`), e.g. by the ranks of a distributed run."""
        return dict(self.frequency), self.log_corpus

    @classmethod
    def from_document_frequencies(cls, frequency: dict, log_corpus: float) -> CiderD:
        scorer = cls.__new__(cls)
        scorer.frequency = defaultdict(float, frequency)
        scorer.log_corpus = log_corpus
        scorer._cache = {}
        return scorer

    def _vector(self, counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(_N)]
        norm = [0.0] * _N
        length = 0
        for ngram, tf in counts.items():
            n = len(ngram) - 1
            weight = tf * (self.log_corpus - math.log(max(1.0, self.frequency.get(ngram, 0.0))))
            vec[n][ngram] = weight
            norm[n] += weight * weight
            if n == 1:  # as pycocoevalcap counts length (bigram count)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _references(self, refs: Sequence[Tokens]) -> list:
        key = tuple(tuple(r) for r in refs)
        if key not in self._cache:
            self._cache[key] = [self._vector(_ngrams(r)) for r in refs]
        return self._cache[key]

    def score(self, candidate: Tokens, refs: Sequence[Tokens]) -> float:
        vec, norm, length = self._vector(_ngrams(candidate))
        total = [0.0] * _N
        for ref_vec, ref_norm, ref_length in self._references(refs):
            delta = float(length - ref_length)
            penalty = math.exp(-(delta * delta) / (2 * _SIGMA * _SIGMA))
            for n in range(_N):
                value = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] and ref_norm[n]:
                    value /= norm[n] * ref_norm[n]
                total[n] += value * penalty
        return 10.0 * (sum(total) / _N) / max(len(refs), 1)

    def scores(self, candidates: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> list[float]:
        return [self.score(c, r) for c, r in zip(candidates, references, strict=True)]
