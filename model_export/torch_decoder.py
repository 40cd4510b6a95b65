"""The PyTorch reference decoder: greedy and beam search, one image at a time, as the popular
tutorials decode. It is the ground truth the ONNX decoding (app/inference/decoding.py) is checked against
at export, so it follows the same rules (see that module's docstring) but shares no code with it:
- `beam` slots per image; each step keeps the best `open slots` extensions by cumulative
  log-probability; an extension ending in <end> closes a slot; stop when no slot is open.
- <pad>, <start>, <unk> never generated; no <end> first; only <end> after max_length words.
- rank finished hypotheses by score / (words + 1) ** length_penalty.
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
) -> list[RefHypothesis]:
    """Decode one preprocessed image [3, H, W]; returns the best `num_captions` hypotheses."""
    model.eval()
    features, h0, c0, att_proj = model.encode(image.unsqueeze(0))
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
        log_probs, h, c, _ = model.decoder.step(previous, h, c, features, att_proj)  # one image: one block
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
