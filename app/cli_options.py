"""The command-line options that several commands share (`caption`, `caption-dir`, `serve`), defined
once. Their bounds come from the limits in app/inference/decoding.py and app/inference/bundle.py, so the CLI refuses
what the HTTP API refuses; unset (None) means "the service's default, else the model's recommendation"."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from app.inference.bundle import MAX_LABELS
from app.inference.decoding import (
    MAX_BEAM_SIZE,
    MAX_CONSTRAINTS,
    MAX_LENGTH_LIMIT,
    MAX_LENGTH_PENALTY,
    MAX_NO_REPEAT_NGRAM_SIZE,
    Guide,
    Strategy,
)

# ---- decoding -------------------------------------------------------------------------------------

StrategyOption = Annotated[Strategy | None, typer.Option(help="greedy or beam (default: beam)")]
BeamSizeOption = Annotated[
    int | None, typer.Option(min=1, max=MAX_BEAM_SIZE, help=f"Beams per image (1-{MAX_BEAM_SIZE})")]
NumCaptionsOption = Annotated[
    int | None, typer.Option(min=1, max=MAX_BEAM_SIZE, help="Captions per image, best first (at most the beam size)")]
MaxLengthOption = Annotated[
    int | None, typer.Option(min=1, max=MAX_LENGTH_LIMIT,
                             help=f"Most words per caption (1-{MAX_LENGTH_LIMIT}; default: the model's)")]
LengthPenaltyOption = Annotated[
    float | None, typer.Option(min=0.0, max=MAX_LENGTH_PENALTY,
                               help=f"Length penalty (0-{MAX_LENGTH_PENALTY:g}; default: the model's recommendation)")]
NoRepeatNgramOption = Annotated[
    int | None, typer.Option(min=0, max=MAX_NO_REPEAT_NGRAM_SIZE,
                             help=f"Block repeated n-grams of this size (0 = off, up to {MAX_NO_REPEAT_NGRAM_SIZE}; "
                                  "default: the model's recommendation)")]

GuideOption = Annotated[
    Guide | None, typer.Option(help="labels: captions name the image's confident ImageNet label words (constrained "
                                    "beam search); none: unguided (default: the model's recommendation)")]
GuideThresholdOption = Annotated[
    float | None, typer.Option(min=0.0, max=1.0, help="--guide labels: a label word's least probability "
                                                       "(default: the model's recommendation, else 0.5)")]
GuideWordsOption = Annotated[
    int | None, typer.Option(min=0, max=MAX_CONSTRAINTS, help="--guide labels: at most this many label words "
                                                               "(default: the model's recommendation, else 1)")]

# ---- ImageNet labels ----------------------------------------------------------------------------------

LabelsOption = Annotated[
    int | None, typer.Option(min=0, max=MAX_LABELS, metavar="K",
                             help=f"ImageNet-1k labels per image, best first (0-{MAX_LABELS}; 0 = none; default: "
                                  "the default_labels setting (CAPTIONER_DEFAULT_LABELS, 3) when the model has "
                                  "labels, else 0; K > 0 on a model without labels is refused)")]


def resolve_labels(requested: int | None, has_labels: bool, default: int, model: str = "the model") -> int:
    """The label count a command uses, by the HTTP API's rule: `requested` if given, else `default`
    (`Settings.labels_for`, or a service's `default_labels`). ValueError for `requested` > 0 on a
    model without labels (the API's 409 labels_unavailable); `model` names it in the message."""
    if requested is None:
        return default
    if requested > 0 and not has_labels:
        raise ValueError(f"--labels {requested}: {model} has no ImageNet labels (its bundle has no labels.json); "
                         "use --labels 0, or a bundle exported with labels")
    return requested


# ---- the model and where it runs ---------------------------------------------------------------------

BundleOption = Annotated[
    Path | None, typer.Option(help="Model bundle folder (env CAPTIONER_BUNDLE; default models/default)")]
DeviceOption = Annotated[
    str | None, typer.Option(help="auto, cuda or cpu (env CAPTIONER_DEVICE; default auto)")]
ThreadsOption = Annotated[
    int | None, typer.Option(help="onnxruntime threads per session (env CAPTIONER_THREADS)")]
