"""How sure the model is of a caption: the one definition of a caption's `confidence` (0..1).

1. raw confidence: the geometric mean of the probabilities the model gave the caption's tokens, the
   closing <end> included: exp(mean of the token log-probabilities). The log-probabilities are the
   model's own softmax values for each emitted token (app/inference/decoding.py keeps them; n-gram blocking
   and the length penalty never change them). <end> counts because it is the model's say on whether
   the caption is complete: a caption cut at max_length has an improbable <end> and a lower confidence.
   The mean (not the product) keeps long captions from being penalised for their length alone.
2. calibration (a bundle's manifest `confidence` block, optional): a logistic curve over the mean
   log-probability, fitted on the validation split (`captioner confidence`, model_export/confidence.py)
   so that the calibrated value estimates the probability that the caption's CIDEr-D against the
   image's references reaches the block's `threshold`. Without the block (older bundles) the
   confidence is the raw value.

docs/confidence.md has what was measured and what "calibrated" does and does not mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from app.inference.bundle import ConfidenceCalibration


def mean_log_prob(token_log_probs: Sequence[float]) -> float:
    """The mean of the tokens' log-probabilities (<end> included); -inf for no tokens."""
    return math.fsum(token_log_probs) / len(token_log_probs) if len(token_log_probs) else -math.inf


def raw_confidence(token_log_probs: Sequence[float]) -> float:
    """The geometric mean of the tokens' probabilities, in [0, 1] (0 for no tokens)."""
    return min(1.0, math.exp(mean_log_prob(token_log_probs)))


def logistic(x: float, slope: float, intercept: float) -> float:
    """1 / (1 + exp(-(slope * x + intercept))), in [0, 1]; 0 at x = -inf (slope > 0)."""
    z = slope * x + intercept
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)  # z may be -inf: e = 0
    return e / (1.0 + e)


def confidence(token_log_probs: Sequence[float], calibration: ConfidenceCalibration | None = None) -> float:
    """A caption's confidence in [0, 1]: the raw geometric mean, or, with a calibration, the
    logistic curve over the mean log-probability that the calibration holds."""
    if calibration is None:
        return raw_confidence(token_log_probs)
    return logistic(mean_log_prob(token_log_probs), calibration.slope, calibration.intercept)
