"""Weight averaging of checkpoints: `captioner average-checkpoints`.

Checkpoints fine-tuned from one parent (several self-critical runs from the same cross-entropy
checkpoint, or the last epochs of one run) usually sit in one basin of the loss, and the average of
their weights is often better than any of them (Wortsman et al. 2022, "Model soups"; checkpoint
averaging in machine translation). Unlike an ensemble it costs nothing at inference: the result is
one checkpoint of the same shape, which `captioner export` exports like any other.

Only the trained weights are averaged: the decoder's floating-point tensors, and the backbone's when
the runs fine-tuned it. Everything else must be the same in every checkpoint (model settings,
vocabulary, the class -> word table and its tensor), or the average would mix models that do not
fit together; the first checkpoint gives the rest of the metadata. The result records what it was
averaged from, and has no optimizer state, epoch or validation score of its own (score it with
`captioner evaluate` after the export).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from model_export.train import TrainError, _plain


def _load(path: Path) -> dict:
    if not path.is_file():
        raise TrainError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - garbage fails in many ways (unpickling, zip, truncation)
        raise TrainError(f"{path}: not a captioner checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"model_config", "decoder", "vocab"} <= set(state):
        raise TrainError(f"{path}: not a captioner checkpoint (no model_config, decoder and vocab)")
    return state


def _mean(name: str, tensors: list[torch.Tensor], weights: list[float], paths: list[Path]) -> torch.Tensor:
    first = tensors[0]
    for path, t in zip(paths[1:], tensors[1:], strict=True):
        if t.shape != first.shape or t.dtype != first.dtype:
            raise TrainError(f"{path}: {name} is {tuple(t.shape)} {t.dtype}, not {tuple(first.shape)} {first.dtype} "
                             f"as in {paths[0]}")
    if not first.is_floating_point():
        if any(not torch.equal(t, first) for t in tensors[1:]):
            raise TrainError(f"{name} differs between the checkpoints and cannot be averaged")
        return first
    total = torch.zeros_like(first, dtype=torch.float64)
    for w, t in zip(weights, tensors, strict=True):
        total += w * t.double()
    return total.to(first.dtype)


def _average_state(name: str, states: list[dict], weights: list[float], paths: list[Path],
                   fixed: tuple[str, ...] = ()) -> dict:
    """The weighted mean of each tensor of `states` (one module's state dicts); keys in `fixed` must be equal."""
    states = [_plain(s) for s in states]
    keys = list(states[0])
    for path, s in zip(paths[1:], states[1:], strict=True):
        if set(s) != set(keys):
            odd = sorted(set(s) ^ set(keys))
            raise TrainError(f"{path}: its {name} has other tensors than {paths[0]}'s ({', '.join(odd[:3])})")
    out = {}
    for key in keys:
        tensors = [s[key] for s in states]
        if key in fixed:
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise TrainError(f"{name}.{key} differs between the checkpoints: they were not trained with the same "
                                 "class -> word table")
            out[key] = tensors[0]
        else:
            out[key] = _mean(f"{name}.{key}", tensors, weights, paths)
    return out


def _epoch_cider(state: dict) -> float | None:
    """The validation CIDEr of the epoch a checkpoint holds (its history's record of that epoch)."""
    for record in state.get("history") or []:
        if record.get("epoch") == state.get("epoch"):
            return record.get("CIDEr")
    return None


def average_checkpoints(paths: list[Path], weights: list[float] | None = None) -> dict:
    """The checkpoint whose trained weights are the weighted mean of those of `paths` (equal weights by
    default; the weights are normalised to sum to 1). Raises TrainError when the checkpoints do not fit
    together or the weights are not positive numbers, one per checkpoint."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise TrainError("averaging needs at least two checkpoints")
    if weights is None:
        weights = [1.0] * len(paths)
    if len(weights) != len(paths):
        raise TrainError(f"{len(weights)} weights for {len(paths)} checkpoints: give one weight per checkpoint")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise TrainError("every weight must be a positive number")
    weights = [w / sum(weights) for w in weights]
    states = [_load(p) for p in paths]
    first = states[0]
    for path, state in zip(paths[1:], states[1:], strict=True):
        config, mine = state["model_config"], first["model_config"]
        differs = sorted(k for k in set(config) | set(mine) if config.get(k) != mine.get(k))
        if state["vocab"] != first["vocab"]:
            differs.insert(0, "vocabulary")
        if state.get("label_words") != first.get("label_words") and "label_word_ids" not in differs:
            differs.append("class -> word table")
        if differs:
            raise TrainError(f"{path}: differs from {paths[0]} ({', '.join(differs)}); average only checkpoints "
                             "fine-tuned from one parent")
        if (state.get("backbone") is None) != (first.get("backbone") is None):
            raise TrainError(f"{path}: one checkpoint fine-tuned the encoder and another did not")
    averaged = dict(first)
    averaged["decoder"] = _average_state("decoder", [s["decoder"] for s in states], weights, paths,
                                         fixed=("class_words",))
    if first.get("backbone") is not None:
        averaged["backbone"] = _average_state("backbone", [s["backbone"] for s in states], weights, paths)
    averaged.update({
        "optimizer": None,  # not a run to resume: train from it with --init-checkpoint
        "epoch": None,
        "best_cider": None,
        "bad_epochs": 0,
        "history": [],
        "torch_rng": None,
        "train_config": {**(first.get("train_config") or {}), "averaged_from": [
            {"checkpoint": str(p), "weight": round(w, 6), "epoch": s.get("epoch"), "val_cider": _epoch_cider(s),
             "stage": "self_critical" if (s.get("train_config") or {}).get("self_critical") else "cross_entropy"}
            for p, w, s in zip(paths, weights, states, strict=True)]},
    })
    return averaged


def write_average(paths: list[Path], out: Path, weights: list[float] | None = None) -> Path:
    """average_checkpoints, saved to `out` (written beside it, then moved into place)."""
    averaged = average_checkpoints(paths, weights)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(averaged, tmp)
    tmp.replace(out)
    return out
