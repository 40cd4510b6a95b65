"""Where decoding happens: batched beam search (greedy = beam size 1) over a one-step function.

`DecodingConfig` holds one image's settings and owns their rules: the limits (checked at
construction), `beams` (greedy is one beam), `with_overrides` (a request's settings on top of the
defaults) and `resolved` (what is actually decoded with: the engine uses it, the API and the CLI
report it).

The search knows nothing about ONNX: it calls `step(tokens, rows, row_image)` and gets
log-probabilities, the new per-row state and (optionally) attention weights. `app/inference/engine.py` plugs
the exported decoder graph in; the tests plug in tiny hand-made step functions.

The rules, which the training side's torch reference decoder (model_export/torch_decoder.py) mirrors:
- every image has `beam_size` slots. Each step takes, per image, the best `open slots` extensions
  of its live rows by cumulative log-probability (ties: lower row, then lower token id, first).
  An extension ending in <end> closes a slot; the others stay live. So greedy stops at the first
  <end>, and the search stops when every beam has ended.
- <pad>, <start> and <unk> are never generated; <end> is not allowed as the first token; after
  `max_length` words only <end> is allowed. n-gram blocking bans a token that would repeat an
  n-gram of the row's words.
- a hypothesis' score is the sum of its log-probabilities (<end> included); the finished
  hypotheses of an image are ranked by score / (words + 1) ** length_penalty, best first.
- every hypothesis keeps the log-probability of each token it emitted, <end> last
  (`Hypothesis.token_log_probs`): the model's own log-softmax value for that token at that step, as
  the step returned it. The rules never renormalise: n-gram blocking and the banned tokens only remove
  candidates, and the length penalty only reorders finished hypotheses, so neither changes these
  values (their sum is `score`). app/inference/confidence.py turns them into the caption's confidence.

Constraints (Anderson et al. 2017, constrained beam search with disjunctive constraints): an image
may have up to MAX_CONSTRAINTS constraints, each a set of token ids of which the caption must contain
one (the request's `include` words, or the words of the image's own confident ImageNet labels with
`guide="labels"`: app/inference/guidance.py). Its rows are then split into banks, one per subset of
met constraints (a bitmask); each bank has `beam_size` slots, the bank of all constraints met has
the image's open slots, and only there does <end> finish a caption. Each step a row's extension goes
to the bank of its row's met constraints plus those its token meets, and each bank keeps its best
extensions as above (ties: lower row, then lower token id); the rows of an image are laid out bank
by bank, lowest bitmask first. A row outside the full bank that reaches <end> is kept aside as a
fallback (`Hypothesis.met` false): the image gets those only when no caption met every constraint
(e.g. a forced word the n-gram rule blocks, or max_length too short). Without constraints an image
has one bank and the search is the plain one above.

All rows of all images go through one step call per step, even when the images have different
settings (each image has its own DecodingConfig: the service batches requests together). The search
asks each step only for every row's best few tokens (`StepOutput.top`), so an engine can run TopK
where the log-probabilities live and copy [rows, k] instead of [rows, vocabulary] to the host.

Cancellation: `beam_search(..., cancelled=...)` asks before every step which images nobody waits for
any more (the batcher: their client hung up while the engine ran). Their rows leave the search at
once: the next step call gets only the other rows (the step sees fewer rows, and an image without
rows gets no block in the engine's layout), their hypotheses are dropped (the image's result is
empty), and when no row is left the search stops. The other images' rows, parents and tokens are the
same as without the cancellation, so their captions are too. `SearchStats` counts the steps and rows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np

# The limits of every decoding setting, named once: DecodingConfig checks them, and the HTTP query
# parameters, the service's settings, the bundle's recommended decoding and the CLI options take
# their bounds from here.
MAX_BEAM_SIZE = 10  # beam_size and num_captions: 1..MAX_BEAM_SIZE
MAX_LENGTH_LIMIT = 64  # max_length: 1..MAX_LENGTH_LIMIT words
MAX_LENGTH_PENALTY = 5.0  # length_penalty: 0..MAX_LENGTH_PENALTY
MAX_NO_REPEAT_NGRAM_SIZE = 10  # no_repeat_ngram_size: 0 (off)..MAX_NO_REPEAT_NGRAM_SIZE
MAX_CONSTRAINTS = 3  # include groups plus guide words per image (2 ** 3 banks of beam_size rows at most)
MAX_CONSTRAINT_TOKENS = 8  # token ids in one include group (a word and its other forms)
STRATEGIES = ("greedy", "beam")
Strategy = Literal["greedy", "beam"]
GUIDES = ("none", "labels")
Guide = Literal["none", "labels"]
NEG_INF = -np.inf


@dataclass(frozen=True)
class DecodingConfig:
    """Every decoding setting, validated once at construction."""

    strategy: Strategy = "beam"
    beam_size: int = 3
    num_captions: int = 1
    max_length: int | None = None  # None: the bundle's max_length
    length_penalty: float = 0.0  # 0: rank by total log-probability (chosen on validation CIDEr)
    no_repeat_ngram_size: int = 0
    # Constraints (see the module docstring). `include`: token-id groups, the caption holds one id of
    # each. `guide="labels"`: also the words of the image's most probable label words whose
    # probability is at least `guide_threshold`, at most `guide_words` of them (the engine works
    # them out from the encoder's labels: app/inference/guidance.py).
    include: tuple[tuple[int, ...], ...] = ()
    guide: Guide = "none"
    guide_threshold: float = 0.5
    guide_words: int = 1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be 'greedy' or 'beam', not {self.strategy!r}")
        if not isinstance(self.beam_size, int) or not 1 <= self.beam_size <= MAX_BEAM_SIZE:
            raise ValueError(f"beam_size must be an integer from 1 to {MAX_BEAM_SIZE}")
        if not isinstance(self.num_captions, int) or self.num_captions < 1:
            raise ValueError("num_captions must be at least 1")
        if self.num_captions > self.beams:
            raise ValueError(
                f"num_captions ({self.num_captions}) cannot exceed the beam size ({self.beams}"
                + (", greedy decodes one caption)" if self.strategy == "greedy" else ")")
            )
        if self.max_length is not None and (not isinstance(self.max_length, int) or not 1 <= self.max_length <= MAX_LENGTH_LIMIT):
            raise ValueError(f"max_length must be an integer from 1 to {MAX_LENGTH_LIMIT}")
        if not (0.0 <= float(self.length_penalty) <= MAX_LENGTH_PENALTY) or np.isnan(self.length_penalty):
            raise ValueError(f"length_penalty must be between 0 and {MAX_LENGTH_PENALTY:g}")
        if (not isinstance(self.no_repeat_ngram_size, int)
                or not 0 <= self.no_repeat_ngram_size <= MAX_NO_REPEAT_NGRAM_SIZE):
            raise ValueError(f"no_repeat_ngram_size must be an integer from 0 (off) to {MAX_NO_REPEAT_NGRAM_SIZE}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide must be 'none' or 'labels', not {self.guide!r}")
        if isinstance(self.guide_threshold, bool) or not (0.0 < float(self.guide_threshold) <= 1.0):
            raise ValueError("guide_threshold must be above 0 and at most 1")
        if not isinstance(self.guide_words, int) or not 0 <= self.guide_words <= MAX_CONSTRAINTS:
            raise ValueError(f"guide_words must be an integer from 0 to {MAX_CONSTRAINTS}")
        groups = tuple(tuple(int(t) for t in group) for group in self.include)
        object.__setattr__(self, "include", groups)  # frozen: normalise lists to tuples once
        if len(groups) > MAX_CONSTRAINTS:
            raise ValueError(f"at most {MAX_CONSTRAINTS} include words")
        if any(not 1 <= len(g) <= MAX_CONSTRAINT_TOKENS or min(g) < 0 for g in groups):
            raise ValueError(f"each include group holds 1 to {MAX_CONSTRAINT_TOKENS} token ids")

    @property
    def guided(self) -> bool:
        """Whether the image's own label words constrain its captions (guide="labels", at least one word)."""
        return self.guide == "labels" and self.guide_words > 0

    @property
    def constrained(self) -> bool:
        """Whether the captions may have to contain words (include, or guided)."""
        return bool(self.include) or self.guided

    @property
    def beams(self) -> int:
        """The beams this config decodes with: greedy is beam search with one beam (its beam_size is
        ignored)."""
        return 1 if self.strategy == "greedy" else self.beam_size

    def with_overrides(self, **given) -> DecodingConfig:
        """A request's settings on top of these defaults (None: not given). An unset num_captions is
        1 for greedy; an unset beam_size is the default widened to num_captions. Raises ValueError."""
        chosen = {k: v for k, v in given.items() if v is not None}
        strategy = chosen.get("strategy", self.strategy)
        if "num_captions" not in chosen:
            chosen["num_captions"] = 1 if strategy == "greedy" else self.num_captions
        if "beam_size" not in chosen:
            chosen["beam_size"] = min(max(self.beam_size, chosen["num_captions"]), MAX_BEAM_SIZE)
        return replace(self, **chosen)

    def resolved(self, bundle_max_length: int | None = None) -> DecodingConfig:
        """The settings actually used, the one place they are worked out (the engine decodes with them, the
        API and the CLI report them): `beams` as beam_size (greedy: one beam, so one caption), and
        max_length filled from the bundle's where unset."""
        max_length = self.max_length if self.max_length is not None else bundle_max_length
        return replace(self, beam_size=self.beams, max_length=max_length)


@dataclass
class Hypothesis:
    tokens: list[int]  # word token ids, <start>/<end> excluded
    score: float  # sum of log-probabilities, <end> included
    normalized_score: float
    attention: np.ndarray | None = None  # [len(tokens) + 1, P]: one row per generated token, <end> last
    # [len(tokens) + 1]: the model's log-probability of each generated token, <end> last (sum: score)
    token_log_probs: list[float] = field(default_factory=list)
    met: bool = True  # False: a fallback that misses a constraint (see the module docstring)


# ---- the rules, one small function each -----------------------------------------------------

def length_normalized(score: float, num_tokens: int, length_penalty: float) -> float:
    """Ranking score of a finished hypothesis; num_tokens counts <end>."""
    return score / (num_tokens**length_penalty) if length_penalty else score


def banned_ngram_tokens(words: list[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in `words`."""
    if n <= 0 or len(words) < n - 1:
        return set()
    if n == 1:
        return set(words)
    prefix = tuple(words[len(words) - n + 1 :])
    return {words[i + n - 1] for i in range(len(words) - n + 1) if tuple(words[i : i + n - 1]) == prefix}


# ---- the search -----------------------------------------------------------------------------

class StepOutput(Protocol):
    """One step's log-probabilities [B, V], as the search reads them: usually only each row's best few
    (`top`), so an engine can select them where they live (e.g. TopK on the GPU) and send back
    [B, k] instead of [B, V]; `full()` only when the rules need more (rare)."""

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(values [B, k], token ids [B, k]): each row's k best, best first, ties: lower id first."""

    def column(self, token: int) -> np.ndarray:
        """[B] log-probabilities of one token."""

    def full(self) -> np.ndarray:
        """[B, V] all log-probabilities."""


class DenseLogProbs:
    """A StepOutput over a [B, V] array already on the host."""

    def __init__(self, log_probs: np.ndarray):
        self.log_probs = np.asarray(log_probs)

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.argsort(-self.log_probs, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(self.log_probs, ids, axis=1), ids

    def column(self, token: int) -> np.ndarray:
        return self.log_probs[:, token]

    def full(self) -> np.ndarray:
        return self.log_probs


class StepFn(Protocol):
    def __call__(
        self, tokens: np.ndarray, rows: np.ndarray, row_image: np.ndarray
    ) -> tuple[StepOutput | np.ndarray, np.ndarray | None]:
        """One decoder step for the live rows.

        tokens: [B] int64 previous tokens; rows: [B] int64 indices of the rows' state (the search
        tells the step which stored state each row continues from); row_image: [B] image index.
        Returns the log-probabilities (a StepOutput, or a [B, V] array) and attention [B, P] or None.
        The step keeps the state.
        """


@dataclass
class SearchStats:
    """What one `beam_search` call did (filled in when passed): step calls, rows decoded over all steps,
    and the rows and images dropped because they were cancelled."""

    steps: int = 0
    rows: int = 0
    dropped_rows: int = 0
    cancelled_images: set[int] = field(default_factory=set)


@dataclass
class _Row:
    image: int
    words: list[int]
    score: float
    attention: list[np.ndarray] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)  # one per word, as the step gave it
    bank: int = 0  # bitmask of the image's constraints the words meet


def constraint_masks(constraints: Sequence[Collection[int]]) -> dict[int, int]:
    """token id -> bitmask of the constraints it meets."""
    masks: dict[int, int] = {}
    for bit, group in enumerate(constraints):
        for token in group:
            masks[int(token)] = masks.get(int(token), 0) | (1 << bit)
    return masks


def _candidates(
    out: StepOutput, rows: list[_Row], t: int, need: np.ndarray, max_length: np.ndarray,
    ngram: np.ndarray, special: dict[str, int], vocab: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's allowed next tokens: (log-probabilities [B, w] with -inf where not allowed, token
    ids [B, w]), holding at least the row's best `need` allowed tokens. Reads only the top few from
    `out` unless the rules removed too many of them."""
    always_banned = [special["pad"], special["start"], special["unk"]]
    end = special["end"]
    forced = t >= max_length  # past max_length only <end>
    banned = [banned_ngram_tokens(r.words, int(n)) if n else set() for r, n in zip(rows, ngram)]

    def allowed(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
        cand = np.array(values, dtype=np.float64)
        invalid = np.isin(ids, always_banned)
        if t == 0:
            invalid |= ids == end
        for i, tokens in enumerate(banned):
            if tokens:
                invalid[i] |= np.isin(ids[i], list(tokens))
        cand[invalid] = NEG_INF
        return cand

    k = int(need.max()) + len(always_banned) + 1
    ids = None  # None: read everything (a tiny vocabulary, or the rules removed too many of the top k)
    if vocab is None or k < vocab:
        values, ids = out.top(k)
        cand = allowed(values, ids)
        if (~forced & (np.isfinite(cand).sum(axis=1) < need)).any():
            ids = None
    if ids is None:
        full = out.full()
        ids = np.broadcast_to(np.arange(full.shape[1]), full.shape)
        cand = allowed(full, ids)
    if forced.any():
        end_lp = np.asarray(out.column(end), dtype=np.float64)
        cand[forced] = NEG_INF
        ids = np.array(ids)
        cand[forced, 0] = end_lp[forced]
        ids[forced, 0] = end
    return cand, ids


def beam_search(
    step: StepFn,
    num_images: int,
    config: DecodingConfig | Sequence[DecodingConfig],
    special: dict[str, int],
    keep_attention: bool = False,
    vocab_size: int | None = None,
    cancelled: Callable[[], Collection[int]] | None = None,
    stats: SearchStats | None = None,
    constraints: Sequence[Sequence[Collection[int]]] | None = None,
) -> list[list[Hypothesis]]:
    """Decode `num_images` images at once, each with its own settings (`config`: one resolved config
    for all, or one per image; they may differ in every setting, and still share each step call).

    `step(tokens, parents, row_image)`: `parents[i]` is the index, in the previous call's rows, of
    the row that new row i continues (at the first call: the image index, whose initial state the
    step must use). Returns, per image, its `num_captions` hypotheses, best first.

    `cancelled()`, asked before every step, names the images to give up (see the module docstring):
    their rows are dropped before the step and their result is an empty list. `stats`: filled in.
    `constraints`: per image, its token-id groups (the config's `include` plus any guide words; the
    module docstring says how they are decoded).
    """
    configs = [config] * num_images if isinstance(config, DecodingConfig) else list(config)
    if len(configs) != num_images:
        raise ValueError(f"{len(configs)} decoding configs for {num_images} images")
    assert all(c.max_length is not None for c in configs), "resolve the configs first"
    beams = np.array([c.beams for c in configs], dtype=np.int64)
    open_slots = beams.copy()
    max_length = np.array([c.max_length for c in configs], dtype=np.int64)
    ngram_size = np.array([c.no_repeat_ngram_size for c in configs], dtype=np.int64)
    groups = [list(g) for g in constraints] if constraints is not None else [[] for _ in range(num_images)]
    if len(groups) != num_images:
        raise ValueError(f"constraints for {len(groups)} images, {num_images} images")
    masks = [constraint_masks(g) for g in groups]
    full_bank = np.array([(1 << len(g)) - 1 for g in groups], dtype=np.int64)
    # a constrained image's rows read its constraint tokens beside their best few (see _constrained)
    extra_need = np.array([len(m) for m in masks], dtype=np.int64)
    fallback: list[list[Hypothesis]] = [[] for _ in range(num_images)]
    finished: list[list[Hypothesis]] = [[] for _ in range(num_images)]
    rows = [_Row(image=i, words=[], score=0.0) for i in range(num_images)]
    parents = np.arange(num_images, dtype=np.int64)
    tokens = np.full(num_images, special["start"], dtype=np.int64)

    stats = stats if stats is not None else SearchStats()

    for t in range(int(max_length.max()) + 1):
        if cancelled is not None and rows:
            gone = set(cancelled()) - stats.cancelled_images
            if gone:
                stats.cancelled_images |= gone
                keep = [i for i, r in enumerate(rows) if r.image not in gone]
                stats.dropped_rows += len(rows) - len(keep)
                rows = [rows[i] for i in keep]
                parents, tokens = parents[keep], tokens[keep]  # still indices into the last call's rows
        if not rows:
            break
        row_image = np.fromiter((r.image for r in rows), dtype=np.int64, count=len(rows))
        stats.steps += 1
        stats.rows += len(rows)
        out, attention = step(tokens, parents, row_image)
        if isinstance(out, np.ndarray):
            out = DenseLogProbs(out)
        need = np.where(extra_need[row_image] > 0, beams[row_image] + extra_need[row_image], open_slots[row_image])
        cand, ids = _candidates(out, rows, t, need, max_length[row_image], ngram_size[row_image], special, vocab_size)
        totals = cand + np.fromiter((r.score for r in rows), dtype=np.float64, count=len(rows))[:, None]
        width = totals.shape[1]

        new_rows: list[_Row] = []
        new_parents: list[int] = []
        new_tokens: list[int] = []
        start = 0
        while start < len(rows):  # rows of one image are contiguous
            image = rows[start].image
            stop = start
            while stop < len(rows) and rows[stop].image == image:
                stop += 1
            if masks[image]:
                if open_slots[image] > 0:
                    _constrained(
                        out, rows, start, stop, t, cand, ids, attention if keep_attention else None,
                        masks[image], int(full_bank[image]), configs[image], special, int(max_length[image]),
                        int(ngram_size[image]), open_slots, finished[image], fallback[image],
                        new_rows, new_parents, new_tokens,
                    )
                start = stop
                continue
            block = totals[start:stop].ravel()
            block_ids = ids[start:stop].ravel()
            block_rows = np.repeat(np.arange(stop - start), width)
            finite = np.flatnonzero(np.isfinite(block))
            # best total first; ties: lower row, then lower token id
            order = finite[np.lexsort((block_ids[finite], block_rows[finite], -block[finite]))]
            kept = attention if keep_attention else None
            for flat in order[: open_slots[image]]:
                local, token = int(block_rows[flat]), int(block_ids[flat])
                parent = rows[start + local]
                score = float(block[flat])
                log_prob = float(cand[start + local, flat % width])  # the model's own value
                if token == special["end"]:
                    open_slots[image] -= 1
                    finished[image].append(_finish(parent, score, log_prob, kept, start + local, configs[image]))
                else:
                    new_rows.append(_grow(parent, token, score, log_prob, kept, start + local))
                    new_parents.append(start + local)
                    new_tokens.append(token)
            start = stop
        rows = new_rows
        parents = np.asarray(new_parents, dtype=np.int64)
        tokens = np.asarray(new_tokens, dtype=np.int64)

    results: list[list[Hypothesis]] = []
    for image in range(num_images):
        if image in stats.cancelled_images:
            results.append([])
            continue
        done = finished[image] if finished[image] else fallback[image]
        ranked = sorted(enumerate(done), key=lambda item: (-item[1].normalized_score, item[0]))
        results.append([h for _, h in ranked[: configs[image].num_captions]])
    return results


def _constrained(
    out: StepOutput, rows: list[_Row], start: int, stop: int, t: int, cand: np.ndarray,
    ids: np.ndarray, attention: np.ndarray | None, masks: dict[int, int], full: int, config: DecodingConfig,
    special: dict[str, int], max_length: int, ngram: int, open_slots: np.ndarray, finished: list[Hypothesis],
    fallback: list[Hypothesis], new_rows: list[_Row], new_parents: list[int], new_tokens: list[int],
) -> None:
    """One constrained image's step (rows start..stop): its candidates are each row's best few (as
    `_candidates` read them) plus the row's constraint tokens, each bank keeps its best. Appends the
    image's new rows bank by bank and its finished hypotheses."""
    image = rows[start].image
    end = special["end"]
    tokens = np.fromiter(masks, dtype=np.int64, count=len(masks))
    columns = np.stack([np.asarray(out.column(int(tok)), dtype=np.float64)[start:stop] for tok in tokens], axis=1)
    block, block_ids = cand[start:stop], ids[start:stop]
    finite = np.isfinite(block)
    top_rows = np.nonzero(finite)[0]
    cand_rows, cand_tokens, cand_lp = top_rows.tolist(), block_ids[finite].tolist(), block[finite].tolist()
    end_column = np.asarray(out.column(end), dtype=np.float64)[start:stop] if t > 0 else None
    for local in range(stop - start):
        row = rows[start + local]
        seen = set(block_ids[local][finite[local]].tolist())
        if t >= max_length:
            continue  # only <end>, which the row's candidates hold
        banned = banned_ngram_tokens(row.words, ngram) if ngram else set()
        for j, token in enumerate(tokens.tolist()):
            value = columns[local, j]
            if token in seen or token in banned or not np.isfinite(value):
                continue
            cand_rows.append(local)
            cand_tokens.append(token)
            cand_lp.append(float(value))
        if row.bank != full and end_column is not None and end not in seen:  # every row's <end>: a possible fallback
            value = float(end_column[local])
            if np.isfinite(value):
                cand_rows.append(local)
                cand_tokens.append(end)
                cand_lp.append(value)
    if not cand_rows:
        return
    lrows = np.asarray(cand_rows, dtype=np.int64)
    ltoks = np.asarray(cand_tokens, dtype=np.int64)
    lps = np.asarray(cand_lp, dtype=np.float64)
    scores = lps + np.fromiter((rows[start + r].score for r in cand_rows), dtype=np.float64, count=len(cand_rows))
    banks = np.fromiter((rows[start + r].bank | masks.get(tok, 0) for r, tok in zip(cand_rows, cand_tokens, strict=True)),
                        dtype=np.int64, count=len(cand_rows))
    is_end = ltoks == end
    for k in np.flatnonzero(is_end & (banks != full)):  # a caption that misses a constraint: kept aside
        parent = rows[start + int(lrows[k])]
        fallback.append(_finish(parent, float(scores[k]), float(lps[k]), attention, start + int(lrows[k]), config, met=False))
    beams = config.beams
    for bank in sorted(set(banks.tolist())):
        chosen = np.flatnonzero((banks == bank) & ~(is_end & (bank != full)))
        if not chosen.size:
            continue
        # best total first; ties: lower row, then lower token id
        chosen = chosen[np.lexsort((ltoks[chosen], lrows[chosen], -scores[chosen]))]
        for k in chosen[: (open_slots[image] if bank == full else beams)]:
            local, token = int(lrows[k]), int(ltoks[k])
            parent = rows[start + local]
            if token == end:
                open_slots[image] -= 1
                finished.append(_finish(parent, float(scores[k]), float(lps[k]), attention, start + local, config))
                continue
            new_rows.append(_grow(parent, token, float(scores[k]), float(lps[k]), attention, start + local, bank))
            new_parents.append(start + local)
            new_tokens.append(token)
    if open_slots[image] <= 0:  # every caption of the full bank has ended: the image is done
        keep = len(new_rows)
        while keep and new_rows[keep - 1].image == image:
            keep -= 1
        del new_rows[keep:], new_parents[keep:], new_tokens[keep:]


def _grow(parent: _Row, token: int, score: float, log_prob: float, attention: np.ndarray | None, row: int,
          bank: int = 0) -> _Row:
    """`parent` (the step's row `row`) extended by `token`; `attention`: the step's weights, None to keep none."""
    att = parent.attention + [attention[row]] if attention is not None else []
    return _Row(image=parent.image, words=parent.words + [token], score=score, attention=att,
                log_probs=parent.log_probs + [log_prob], bank=bank)


def _finish(parent: _Row, score: float, end_log_prob: float, attention: np.ndarray | None, row: int,
            config: DecodingConfig, met: bool = True) -> Hypothesis:
    """`parent` (the step's row `row`) ended by <end>: a finished hypothesis; `attention` as in `_grow`."""
    att = parent.attention + [attention[row]] if attention is not None else []
    return Hypothesis(
        tokens=list(parent.words), score=score,
        normalized_score=length_normalized(score, len(parent.words) + 1, config.length_penalty),
        attention=np.stack(att) if att else None, token_log_probs=parent.log_probs + [end_log_prob], met=met,
    )
