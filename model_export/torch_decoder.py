"""The PyTorch reference decoder: greedy and beam search, one image at a time, as the popular
tutorials decode. It is the ground truth the ONNX decoding (app/inference/decoding.py) is checked against
at export, so it follows the same rules (see that module's docstring) but shares no code with it:
- `beam` slots per image; each step keeps the best `open slots` extensions by cumulative
  log-probability; an extension ending in <end> closes a slot; stop when no slot is open.
- <pad>, <start>, <unk> never generated; no <end> first; only <end> after max_length words.
- rank finished hypotheses by score / (words + 1) ** length_penalty.
- constraints (token-id groups, the caption holds one token of each): a bank of `beam` rows per
  subset of met constraints, rows listed bank by bank (lowest bitmask first); each bank keeps its best
  extensions over every row's whole distribution; only the bank of all constraints has the open
  slots and finishes captions; an <end> elsewhere is a fallback, used only when nothing met them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_export.model import Captioner


@dataclass
class RefHypothesis:
    tokens: list[int]
    score: float
    normalized_score: float


@torch.no_grad()
def reference_decode(
    model: Captioner,
    image: torch.Tensor,
    special: dict[str, int],
    beam: int = 1,
    max_length: int = 20,
    length_penalty: float = 0.0,
    num_captions: int = 1,
    no_repeat_ngram_size: int = 0,
    constraints: list[set[int]] | None = None,
) -> list[RefHypothesis]:
    """Decode one preprocessed image [3, H, W]; returns the best `num_captions` hypotheses."""
    if constraints or no_repeat_ngram_size:
        return _constrained_decode(model, image, special, beam, max_length, length_penalty, num_captions,
                                   no_repeat_ngram_size, [set(g) for g in constraints or []])
    model.eval()
    features, h0, c0, att_proj, *prior = model.encode(image.unsqueeze(0))
    live_tokens: list[list[int]] = [[]]
    device = image.device
    live_scores = torch.zeros(1, dtype=torch.float64, device=device)
    h, c = h0, c0
    previous = torch.tensor([special["start"]], device=device)
    slots = beam
    done: list[RefHypothesis] = []
    for t in range(max_length + 1):
        if not live_tokens:
            break
        log_probs, h, c, _ = model.decoder.step(previous, h, c, features, att_proj, *prior)  # one image: one block
        log_probs = log_probs.double()
        for name in ("pad", "start", "unk"):
            log_probs[:, special[name]] = float("-inf")
        if t == 0:
            log_probs[:, special["end"]] = float("-inf")
        if t >= max_length:
            keep = log_probs[:, special["end"]].clone()
            log_probs.fill_(float("-inf"))
            log_probs[:, special["end"]] = keep
        totals = (log_probs + live_scores.unsqueeze(1)).flatten()
        vocab = log_probs.shape[1]
        # stable descending sort: equal totals keep flat order (lower row, then lower token id)
        order = torch.sort(totals, descending=True, stable=True).indices
        chosen = [int(i) for i in order[:slots] if torch.isfinite(totals[i])]
        next_tokens, next_scores, parents, next_words = [], [], [], []
        for flat in chosen:
            row, token = divmod(flat, vocab)
            score = float(totals[flat])
            if token == special["end"]:
                slots -= 1
                words = len(live_tokens[row]) + 1
                normalized = score / words**length_penalty if length_penalty else score
                done.append(RefHypothesis(list(live_tokens[row]), score, normalized))
            else:
                next_words.append(live_tokens[row] + [token])
                next_scores.append(score)
                parents.append(row)
                next_tokens.append(token)
        if not next_words:
            break
        index = torch.tensor(parents, dtype=torch.long, device=device)
        h, c = h.index_select(0, index), c.index_select(0, index)
        previous = torch.tensor(next_tokens, dtype=torch.long, device=device)
        live_scores = torch.tensor(next_scores, dtype=torch.float64, device=device)
        live_tokens = next_words
    ranked = sorted(enumerate(done), key=lambda item: (-item[1].normalized_score, item[0]))
    return [hyp for _, hyp in ranked[:num_captions]]


def _repeats(words: list[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram of `words` (written out plainly: every earlier n-1 prefix)."""
    if n <= 0 or len(words) < n - 1:
        return set()
    tail = words[len(words) - (n - 1):] if n > 1 else []
    return {words[i + n - 1] for i in range(len(words) - n + 1) if words[i:i + n - 1] == tail}


@torch.no_grad()
def _constrained_decode(model, image, special, beam, max_length, length_penalty, num_captions, ngram, groups):
    model.eval()
    features, h, c, att_proj, *prior = model.encode(image.unsqueeze(0))
    device = image.device
    full = (1 << len(groups)) - 1

    def bank_of(words: list[int]) -> int:
        return sum(1 << i for i, g in enumerate(groups) if g & set(words))

    def normalized(score: float, words: int) -> float:
        return score / words**length_penalty if length_penalty else score

    rows: list[tuple[list[int], float]] = [([], 0.0)]  # (words, score), bank by bank
    previous = torch.tensor([special["start"]], device=device)
    open_slots = beam
    done: list[RefHypothesis] = []
    spare: list[RefHypothesis] = []
    for t in range(max_length + 1):
        if not rows or open_slots <= 0:
            break
        log_probs, h, c, _ = model.decoder.step(previous, h, c, features, att_proj, *prior)
        log_probs = log_probs.double()
        for name in ("pad", "start", "unk"):
            log_probs[:, special[name]] = float("-inf")
        if t == 0:
            log_probs[:, special["end"]] = float("-inf")
        for r, (words, _) in enumerate(rows):
            for token in _repeats(words, ngram):
                log_probs[r, token] = float("-inf")
        if t >= max_length:
            keep = log_probs[:, special["end"]].clone()
            log_probs.fill_(float("-inf"))
            log_probs[:, special["end"]] = keep
        vocab = log_probs.shape[1]
        by_bank: dict[int, list[tuple[float, int, int]]] = {}
        for r, (words, score) in enumerate(rows):
            here = bank_of(words)
            for token in range(vocab):
                value = float(log_probs[r, token])
                if value == float("-inf"):
                    continue
                total = score + value
                if token == special["end"]:
                    if here != full:
                        spare.append(RefHypothesis(list(words), total, normalized(total, len(words) + 1)))
                        continue
                    by_bank.setdefault(full, []).append((total, r, token))
                else:
                    by_bank.setdefault(bank_of(words + [token]), []).append((total, r, token))
        next_rows, parents, tokens = [], [], []
        for bank in sorted(by_bank):
            ranked = sorted(by_bank[bank], key=lambda item: (-item[0], item[1], item[2]))
            for total, r, token in ranked[: open_slots if bank == full else beam]:
                words = rows[r][0]
                if token == special["end"]:
                    open_slots -= 1
                    done.append(RefHypothesis(list(words), total, normalized(total, len(words) + 1)))
                else:
                    next_rows.append((words + [token], total))
                    parents.append(r)
                    tokens.append(token)
        if open_slots <= 0 or not next_rows:
            break
        index = torch.tensor(parents, dtype=torch.long, device=device)
        h, c = h.index_select(0, index), c.index_select(0, index)
        previous = torch.tensor(tokens, dtype=torch.long, device=device)
        rows = next_rows
    pool = done if done else spare
    ranked = sorted(enumerate(pool), key=lambda item: (-item[1].normalized_score, item[0]))
    return [hyp for _, hyp in ranked[:num_captions]]
