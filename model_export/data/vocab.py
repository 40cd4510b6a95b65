"""Token vocabulary; saved as the bundle's ``vocab.json`` (``{"tokens": [...]}``, index = id)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from os import PathLike
from pathlib import Path

from .errors import DatasetError
from .karpathy import read_json_file

__all__ = ["SPECIAL_TOKENS", "Vocabulary"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<start>", "<end>", "<unk>")


class Vocabulary:
    """Maps tokens to ids: ``<pad>``=0, ``<start>``=1, ``<end>``=2, ``<unk>``=3, then words."""

    PAD, START, END, UNK = 0, 1, 2, 3

    def __init__(self, tokens: Sequence[str]) -> None:
        """Wrap a full token list (specials first); see :meth:`build` to make one from captions."""
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"the first four tokens must be {list(SPECIAL_TOKENS)}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("tokens must be unique")
        self.itos: list[str] = tokens
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(tokens)}

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], min_count: int = 1) -> Vocabulary:
        """Words seen at least ``min_count`` times, by descending count then alphabetically."""
        counts = Counter(t for tokens in token_lists for t in tokens)
        words = sorted(
            (w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS),
            key=lambda w: (-counts[w], w),
        )
        return cls([*SPECIAL_TOKENS, *words])

    @property
    def special_ids(self) -> dict[str, int]:
        """``{"pad": 0, "start": 1, "end": 2, "unk": 3}``."""
        return {"pad": self.PAD, "start": self.START, "end": self.END, "unk": self.UNK}

    def encode(self, tokens: Sequence[str], max_length: int) -> list[int]:
        """``<start>``, the ids of the first ``max_length`` tokens (unknown -> ``<unk>``), ``<end>``."""
        if max_length < 0:
            raise ValueError("max_length must be >= 0")
        ids = [self.stoi.get(t, self.UNK) for t in tokens[:max_length]]
        return [self.START, *ids, self.END]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids`` up to the first ``<end>``, special tokens left out."""
        words = []
        for raw in ids:
            i = int(raw)
            if i == self.END:
                break
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self.itos)})")
            if i >= len(SPECIAL_TOKENS):
                words.append(self.itos[i])
        return words

    def save(self, path: str | PathLike[str]) -> None:
        """Write ``{"tokens": [...]}`` as UTF-8 JSON."""
        text = json.dumps({"tokens": self.itos}, ensure_ascii=False)
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Vocabulary:
        """Read a file written by :meth:`save`; any problem raises DatasetError."""
        data = read_json_file(path)
        if not isinstance(data, dict) or "tokens" not in data:
            raise DatasetError(path, "not a vocabulary: expected an object with a 'tokens' list")
        tokens = data["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DatasetError(path, "'tokens' is not a list of strings")
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise DatasetError(path, f"the first four tokens are {tokens[:4]}, expected {list(SPECIAL_TOKENS)}")
        duplicates = sorted(t for t, n in Counter(tokens).items() if n > 1)
        if duplicates:
            raise DatasetError(path, f"repeated tokens: {duplicates[:5]}")
        return cls(tokens)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self.itos == other.itos

    __hash__ = None  # type: ignore[assignment]  # mutable-looking; equality is by content

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens)"
