"""`captioner confidence`: does a caption's confidence go with its quality, and how is it calibrated?

On a dataset split (the validation split: never the test split) the serving engine captions every
image with one decoding (default: the bundle's recommended one, as the service decodes), and each
caption gets its raw confidence (app/inference/confidence.py: the geometric mean of its token probabilities,
<end> included) and its CIDEr-D against the image's references (pycocoevalcap's `Cider` on the
dataset's own tokens, as the trainer's validation scores; the document frequencies come from the
references of the images scored). Then:

- how confidence and per-image CIDEr-D go together: Spearman and Pearson correlations, for the raw
  confidence and, for comparison, a few other candidate scores (the mean log-probability without
  <end>, the total log-probability, the least probable token);
- the calibration: a logistic curve over the mean token log-probability, fitted by maximum
  likelihood to whether each caption's CIDEr-D reaches `threshold` (the target the calibrated
  confidence estimates). Its out-of-sample quality is measured by cross-fitting (each fold's
  confidences come from a curve fitted on the other folds); the curve written to the bundle is
  fitted on the whole split;
- reliability tables (confidence bins -> captions, mean confidence, mean CIDEr-D, share reaching the
  threshold) for the raw and the cross-fitted calibrated confidence, with the expected calibration
  error (ECE: the count-weighted mean |mean confidence - share reaching the threshold| over the bins)
  and the Brier score.

`--write` stores the curve in the bundle's manifest.json (`confidence`; manifest.json is not among
the hashed `files`, so the bundle stays intact). numpy only (no scipy or scikit-learn); no torch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from app.inference.bundle import ConfidenceCalibration, Manifest, load_bundle
from app.inference.confidence import confidence, mean_log_prob, raw_confidence
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine
from model_export.bundle_files import rewrite_manifest
from model_export.data.karpathy import CaptionDataset
from model_export.evaluate import decoding_record, recommended_decoding
from model_export.images import iter_batches

DEFAULT_THRESHOLD = 0.5  # per-image CIDEr-D: the calibrated confidence estimates P(CIDEr-D >= this)
DEFAULT_BINS = 10
DEFAULT_FOLDS = 5


@dataclass
class Scored:
    """One image's best caption: its words, token log-probabilities (<end> last) and CIDEr-D."""

    words: list[str]
    token_log_probs: list[float]
    cider: float = 0.0


# ---- statistics (numpy only) ------------------------------------------------------------------------

def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    values = np.asarray(x, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    result = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        result[order[start : stop + 1]] = (start + stop) / 2.0 + 1.0
        start = stop + 1
    return result


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation; nan when either side is constant (or fewer than 2 values)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks)."""
    return pearson(ranks(x), ranks(y))


def fit_logistic(x: Sequence[float], y: Sequence[float], l2: float = 1e-4, iterations: int = 100) -> tuple[float, float]:
    """(slope, intercept) of P(y = 1) = logistic(slope * x + intercept) by maximum likelihood
    (Newton's method; a tiny ridge `l2` on the slope keeps separable data finite). x is
    standardised while fitting, the result is for the raw x."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(xs) == 0 or not np.isfinite(xs).all():
        raise ValueError("need finite scores to fit a calibration")
    mean, std = float(xs.mean()), float(xs.std()) or 1.0
    z = (xs - mean) / std
    design = np.stack([z, np.ones_like(z)], axis=1)
    w = np.zeros(2)
    penalty = np.diag([l2 * len(xs), 0.0])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        gradient = design.T @ (p - ys) + penalty @ w
        hessian = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-12 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    slope = float(w[0] / std)
    return slope, float(w[1] - slope * mean)


def reliability_table(conf: Sequence[float], cider: Sequence[float], threshold: float,
                      bins: int = DEFAULT_BINS) -> list[dict]:
    """Equal-width confidence bins over [0, 1] (the last one closed), the empty ones left out: per
    bin its range, captions, mean confidence, mean CIDEr-D and share with CIDEr-D >= threshold."""
    c, s = np.asarray(conf, dtype=np.float64), np.asarray(cider, dtype=np.float64)
    index = np.minimum((c * bins).astype(np.int64), bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        if not members.any():
            continue
        rows.append({
            "bin": [round(b / bins, 6), round((b + 1) / bins, 6)],
            "captions": int(members.sum()),
            "mean_confidence": float(c[members].mean()),
            "mean_cider": float(s[members].mean()),
            "share_reaching_threshold": float((s[members] >= threshold).mean()),
        })
    return rows


def calibration_error(table: list[dict]) -> float:
    """ECE of a reliability table: the count-weighted mean |mean confidence - share reaching the threshold|."""
    total = sum(row["captions"] for row in table)
    return sum(row["captions"] * abs(row["mean_confidence"] - row["share_reaching_threshold"]) for row in table) / max(total, 1)


def brier(conf: Sequence[float], hit: Sequence[bool]) -> float:
    c, h = np.asarray(conf, dtype=np.float64), np.asarray(hit, dtype=np.float64)
    return float(np.mean((c - h) ** 2)) if len(c) else math.nan


def folds_of(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """A fold number per item: a seeded shuffle dealt round-robin into `folds` folds."""
    assignment = np.empty(n, dtype=np.int64)
    assignment[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return assignment


# ---- captioning and scoring -------------------------------------------------------------------------

def caption_and_score(engine: Engine, paths: Sequence[Path], references: Sequence[Sequence[Sequence[str]]],
                      config: DecodingConfig, batch_size: int = 32, progress: bool = True) -> list[Scored]:
    """Each image's best caption with its token log-probabilities, and its CIDEr-D against its references."""
    from pycocoevalcap.cider.cider import Cider
    from tqdm import tqdm

    scored: list[Scored] = [Scored([], []) for _ in paths]
    bar = tqdm(total=len(paths), desc="captioning", unit="img", disable=not progress)
    for indices, pixels in iter_batches(list(paths), engine.bundle.preprocessing, batch_size):
        for i, captions in zip(indices, engine.caption(pixels, config), strict=True):
            if captions:
                scored[i] = Scored(list(captions[0].tokens), list(captions[0].token_log_probs))
        bar.update(len(indices))
    bar.close()
    if paths:
        res = {i: [" ".join(s.words)] for i, s in enumerate(scored)}
        gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
        _, per_image = Cider().compute_score(gts, res)
        for s, value in zip(scored, per_image, strict=True):
            s.cider = float(value)
    return scored


def _alternatives(scored: Sequence[Scored]) -> dict[str, np.ndarray]:
    """Candidate confidence scores, for comparison with the chosen one (the first)."""
    def without_end(s: Scored) -> float:
        return mean_log_prob(s.token_log_probs[:-1])

    return {
        "geometric mean, <end> included (the confidence)": np.array([raw_confidence(s.token_log_probs) for s in scored]),
        "geometric mean, <end> left out": np.array([math.exp(without_end(s)) for s in scored]),
        "total log-probability (score)": np.array([math.fsum(s.token_log_probs) for s in scored]),
        "least probable token": np.array([math.exp(min(s.token_log_probs)) if s.token_log_probs else 0.0 for s in scored]),
    }


# ---- the evaluation -----------------------------------------------------------------------------------

def analyse(scored: Sequence[Scored], threshold: float = DEFAULT_THRESHOLD, bins: int = DEFAULT_BINS,
            folds: int = DEFAULT_FOLDS, seed: int = 0, existing: ConfidenceCalibration | None = None) -> dict:
    """Correlations, the calibration curve (whole split) and the reliability tables (raw; cross-fitted
    calibrated; with `existing`, e.g. the bundle's own calibration, also that one's) of captions
    already scored."""
    cider = np.array([s.cider for s in scored])
    hit = cider >= threshold
    x = np.array([mean_log_prob(s.token_log_probs) for s in scored])
    raw = np.array([raw_confidence(s.token_log_probs) for s in scored])
    result: dict = {
        "images": len(scored),
        "threshold": threshold,
        "mean_cider": float(cider.mean()) if len(cider) else math.nan,
        "share_reaching_threshold": float(hit.mean()) if len(hit) else math.nan,
        "correlations": {
            name: {"spearman": spearman(values, cider), "pearson": pearson(values, cider)}
            for name, values in _alternatives(scored).items()
        },
    }
    raw_table = reliability_table(raw, cider, threshold, bins)
    result["raw"] = {"ece": calibration_error(raw_table), "brier": brier(raw, hit), "table": raw_table}
    if existing is not None:
        given = np.array([confidence(s.token_log_probs, existing) for s in scored])
        given_table = reliability_table(given, cider, threshold, bins)
        result["bundle_calibration"] = {**existing.model_dump(exclude_none=True), "ece": calibration_error(given_table),
                                        "brier": brier(given, hit), "table": given_table}
    if len(scored) < 2 or hit.all() or not hit.any():
        result["calibration"] = None  # nothing to fit: every caption on one side of the threshold
        return result
    slope, intercept = fit_logistic(x, hit)
    if not slope > 0:
        result["calibration"] = None  # confidence does not go with quality here: no monotone curve to fit
        return result
    calibration = ConfidenceCalibration(slope=round(slope, 6), intercept=round(intercept, 6), threshold=threshold)
    result["calibration"] = calibration.model_dump(exclude_none=True)
    assignment = folds_of(len(scored), min(folds, len(scored)), seed)
    crossed = np.empty(len(scored))
    for k in np.unique(assignment):
        train, held = assignment != k, assignment == k
        if hit[train].all() or not hit[train].any():
            a, b = slope, intercept
        else:
            a, b = fit_logistic(x[train], hit[train])
        held_calibration = ConfidenceCalibration(slope=max(a, 1e-9), intercept=b)
        crossed[held] = [confidence(scored[i].token_log_probs, held_calibration) for i in np.flatnonzero(held)]
    crossed_table = reliability_table(crossed, cider, threshold, bins)
    result["calibrated_cross_fitted"] = {
        "folds": int(len(np.unique(assignment))),
        "spearman": spearman(crossed, cider), "pearson": pearson(crossed, cider),
        "ece": calibration_error(crossed_table), "brier": brier(crossed, hit), "table": crossed_table,
    }
    whole = np.array([confidence(s.token_log_probs, calibration) for s in scored])
    whole_table = reliability_table(whole, cider, threshold, bins)
    result["calibrated_in_sample"] = {"ece": calibration_error(whole_table), "brier": brier(whole, hit),
                                      "table": whole_table}
    return result


def evaluate_confidence(
    bundle_dir: Path,
    dataset: CaptionDataset,
    split: str = "val",
    limit: int | None = None,
    decoding: DecodingConfig | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    bins: int = DEFAULT_BINS,
    folds: int = DEFAULT_FOLDS,
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Caption `split` (its first `limit` images) with `decoding` (default: the bundle's recommended
    decoding, beam 3) and measure and fit the confidence (`analyse`). The confidences are computed
    raw, whatever calibration the bundle already has."""
    if split == "test":
        raise ValueError("the confidence is measured and calibrated on a validation split, never the test split")
    started = time.monotonic()
    bundle = load_bundle(bundle_dir)
    existing = bundle.confidence_calibration
    bundle.confidence_calibration = None  # the engine's confidences raw; the bundle's curve is measured apart
    engine = Engine(bundle, device=device, threads=threads)
    config = decoding or recommended_decoding(bundle)  # as the service decodes by default (guide included)
    examples = dataset.split(split)[: limit or None]
    scored = caption_and_score(engine, [e.image_path for e in examples], [e.references for e in examples],
                               config, batch_size, progress)
    captioned = time.monotonic() - started
    used = config.resolved(bundle.max_length)
    result = {
        "bundle": {"name": bundle.name, "version": bundle.version, "path": str(bundle_dir)},
        "dataset": {"name": dataset.name, "source": str(dataset.source), "split": split, "images": len(examples)},
        "decoding": {"strategy": used.strategy, "beam_size": used.beam_size, **decoding_record(used)},
        "provider": engine.provider,
        **analyse(scored, threshold, bins, folds, existing=existing),
    }
    if result["calibration"] is not None:
        beam = "greedy" if used.strategy == "greedy" else f"beam {used.beam_size}"
        result["calibration"]["fitted_on"] = (
            f"{dataset.name} {split} ({len(examples)} images), {beam}, length penalty {used.length_penalty:g}, "
            f"no-repeat n-gram {used.no_repeat_ngram_size}: P(per-image CIDEr-D >= {threshold:g})")
    result["samples"] = [
        {"image": str(e.image_path), "caption": " ".join(s.words), "confidence": raw_confidence(s.token_log_probs),
         "cider": s.cider, "reference": " ".join(e.references[0])}
        for e, s in list(zip(examples, scored, strict=True))[:10]
    ]
    result["seconds"] = {"captioning_and_scoring": round(captioned, 1), "total": round(time.monotonic() - started, 1)}
    return result


def write_calibration(bundle_dir: Path, calibration: dict) -> None:
    """Store `calibration` as the manifest's `confidence` block (manifest.json rewritten in place:
    model_export/bundle_files.py rewrite_manifest), then load the bundle again to check it."""
    path = Path(bundle_dir) / "manifest.json"
    manifest = Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    updated = manifest.model_copy(update={"confidence": ConfidenceCalibration.model_validate(calibration)})
    rewrite_manifest(bundle_dir, updated)
    load_bundle(bundle_dir, verify=False)


def format_report(result: dict) -> str:
    """The numbers for people: correlations, the calibration and the reliability tables."""
    lines = [f"{result['dataset']['name']} {result['dataset']['split']}: {result['images']} images, "
             f"decoding {json.dumps(result['decoding'])}; mean CIDEr-D {result['mean_cider']:.4f}, "
             f"{result['share_reaching_threshold']:.1%} reach {result['threshold']:g}"]
    for name, corr in result["correlations"].items():
        lines.append(f"  {name:<48} Spearman {corr['spearman']:+.4f}  Pearson {corr['pearson']:+.4f}")
    if result.get("calibration"):
        cal = result["calibration"]
        lines.append(f"calibration: logistic(slope {cal['slope']:g} * mean log-probability + intercept {cal['intercept']:g})")
    sections = [("raw", "raw confidence")]
    if "bundle_calibration" in result:
        sections.append(("bundle_calibration", "the bundle's calibration"))
    if "calibrated_cross_fitted" in result:
        folds = result["calibrated_cross_fitted"]["folds"]
        sections.append(("calibrated_cross_fitted", f"calibrated ({folds}-fold cross-fitted)"))
    for key, title in sections:
        block = result[key]
        lines.append(f"{title}: ECE {block['ece']:.4f}, Brier {block['brier']:.4f}")
        lines.append(f"  {'bin':<12}{'captions':>9}{'mean conf':>11}{'mean CIDEr':>12}{'share >= t':>12}")
        for row in block["table"]:
            lines.append(f"  {row['bin'][0]:.1f}-{row['bin'][1]:.1f}     {row['captions']:>9}{row['mean_confidence']:>11.3f}"
                         f"{row['mean_cider']:>12.3f}{row['share_reaching_threshold']:>12.3f}")
    return "\n".join(lines)


def with_strategy(base: DecodingConfig, strategy: str | None, beam_size: int | None) -> DecodingConfig:
    """`base` with another strategy / beam size, if given."""
    if strategy is None and beam_size is None:
        return base
    return replace(base, strategy=strategy or base.strategy, beam_size=beam_size or base.beam_size)
