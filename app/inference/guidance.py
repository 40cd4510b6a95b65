"""Guidance: which words an image's caption must contain, from its own ImageNet labels (`guide="labels"`)
or from the request (`include`).

A bundle's labels.json may give each ImageNet class its caption words (`words`: per class, groups of
interchangeable forms, e.g. [["cat", "cats"]]; model_export/label_words.py makes them from WordNet).
A word group's probability for an image is the sum of the probabilities of the classes that have it:
scikit-image's cat is Egyptian cat 0.79 + tiger cat 0.09 + tabby 0.07, so "cat" is 0.95. The guide
takes the most probable groups at or above a threshold, and each becomes one constraint of the
search (app/inference/decoding.py): the caption holds one word of the group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GuideWord:
    """One constraint the labels gave an image: its words (token ids and text) and probability."""

    words: tuple[str, ...]
    token_ids: tuple[int, ...]
    probability: float


class GroupTable:
    """A bundle's word groups as a matrix, built once: [classes, groups] with a 1 where a class has a
    group, so every image's group probabilities are one product (what the engine uses per batch)."""

    def __init__(self, class_words: Sequence[Sequence[Sequence[str]]]):
        self.groups = sorted({tuple(g) for groups in class_words for g in groups})
        index = {g: i for i, g in enumerate(self.groups)}
        self.matrix = np.zeros((len(class_words), len(self.groups)), dtype=np.float64)
        for c, groups in enumerate(class_words):
            for g in groups:
                self.matrix[c, index[tuple(g)]] = 1.0

    def probabilities(self, class_probs: np.ndarray) -> np.ndarray:
        """[groups] for one image ([classes]), or [N, groups] for [N, classes]; at most 1."""
        return np.minimum(1.0, np.asarray(class_probs, dtype=np.float64) @ self.matrix)


def guide_words(class_probs: np.ndarray, class_words: Sequence[Sequence[Sequence[str]]] | GroupTable,
                token_of: dict[str, int], threshold: float, limit: int) -> list[GuideWord]:
    """The image's most probable word groups with probability >= threshold, at most `limit`, best first
    (ties: the group's first word, alphabetically); words outside the vocabulary are left out."""
    if limit <= 0:
        return []
    table = class_words if isinstance(class_words, GroupTable) else GroupTable(class_words)
    probs = table.probabilities(class_probs)
    chosen = np.flatnonzero(probs >= threshold)
    ranked = sorted(((table.groups[i], float(probs[i])) for i in chosen), key=lambda kv: (-kv[1], kv[0]))
    out: list[GuideWord] = []
    for group, p in ranked:
        if len(out) >= limit:
            break
        words = tuple(w for w in group if w in token_of)
        if words:
            out.append(GuideWord(words, tuple(token_of[w] for w in words), p))
    return out


class UnknownWords(ValueError):
    """include= words the model cannot write (outside its vocabulary, or special tokens)."""

    def __init__(self, words: list[str]):
        self.words = words
        super().__init__(f"not in the model's vocabulary: {', '.join(words)} (it can only write words it was trained on)")


def include_groups(text: str, token_of: dict[str, int], special: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """`include=` as token-id groups: comma-separated constraints, each one word or alternatives joined by
    `|` ("cat|cats,table": a cat or cats, and a table). Raises UnknownWords naming every word the
    vocabulary lacks, ValueError for an empty item."""
    groups, unknown = [], []
    for item in text.split(","):
        words = [w.strip().lower() for w in item.split("|")]
        if not item.strip() or not all(words):
            raise ValueError(f"include: an empty word in {text!r} (comma-separated words, alternatives joined by |)")
        ids = []
        for word in words:
            token = token_of.get(word)
            if token is None or token in special:
                unknown.append(word)
            elif token not in ids:
                ids.append(token)
        groups.append(tuple(ids))
    if unknown:
        raise UnknownWords(unknown)
    return tuple(groups)
