"""Training-side commands of the `captioner` CLI: generate-scenes, train, export, evaluate.

Heavy imports (torch) happen inside the commands, so `captioner --help` and the serving commands
stay fast and torch-free. Every expected failure (bad dataset, unreadable image, vocabulary
mismatch, failed export check) prints `error: <file>: <problem>` and exits with status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from enum import StrEnum
from pathlib import Path

import typer

from model_export.data.errors import DatasetError


class DataFormat(StrEnum):
    karpathy = "karpathy"
    coco = "coco"
    flickr8k = "flickr8k"  # the authors' text files: --data is their folder


class DecoderKind(StrEnum):
    show_attend_tell = "show_attend_tell"
    show_and_tell = "show_and_tell"


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def load_dataset(data: Path, images: Path | None, fmt: DataFormat, val_data: Path | None = None, val_images: Path | None = None):
    """A Karpathy split file, COCO captions files (train, plus val if given; else 5 % of train is
    val), or a Flickr8k folder in its authors' text format (images found in it unless given)."""
    from model_export.data.coco import load_coco_captions
    from model_export.data.flickr8k import find_flickr8k, load_flickr8k
    from model_export.data.karpathy import CaptionDataset, load_karpathy

    if fmt == DataFormat.flickr8k:
        text_dir, found_images = find_flickr8k(data)
        return load_flickr8k(text_dir, images or found_images)
    if images is None:
        raise DatasetError(data, "--images (the image root folder) is needed for this format")
    if fmt == DataFormat.karpathy:
        return load_karpathy(data, images)
    train = load_coco_captions(data, images, "train")
    if val_data:
        val = load_coco_captions(val_data, val_images or images, "val")
        examples = train.examples + val.examples
    else:
        examples = list(train.examples)
        cut = max(1, len(examples) // 20)
        for e in examples[-cut:]:
            e.split = "val"
    return CaptionDataset(name="coco", examples=examples, source=Path(data), dropped_images=train.dropped_images)


def _guard(fn):
    """Run a command body, turning the project's own errors (bad data, bundle, model settings, a
    failed training or export check, no Java for METEOR) into a clear message and exit status 1.
    Anything else is a bug and keeps its traceback."""
    try:
        return fn()
    except Exception as exc:
        if isinstance(exc, _own_errors()):
            fail(str(exc))
        raise


def _own_errors() -> tuple[type[Exception], ...]:
    # imported here: `generate-scenes` alone must not pay for importing torch
    from app.inference.bundle import BundleError
    from model_export.export import ExportError
    from model_export.label_words import WordNetError
    from model_export.labels import LabelsError
    from model_export.metrics import JavaMissing
    from model_export.model import ModelConfigError
    from model_export.train import TrainError

    return (DatasetError, BundleError, ModelConfigError, TrainError, ExportError, JavaMissing, LabelsError, WordNetError)


def generate_scenes_cmd(
    out: Path = typer.Argument(..., help="Folder for images/ and dataset.json"),
    train: int = typer.Option(20000, help="Training images"),
    val: int = typer.Option(500, help="Validation images"),
    test: int = typer.Option(1000, help="Test images"),
    seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical files"),
    workers: int = typer.Option(2, help="Processes"),
) -> None:
    """Generate the synthetic shapes scenes (Karpathy split JSON + JPEGs)."""
    from model_export.data.scenes import generate_scenes

    started = time.monotonic()
    path = _guard(lambda: generate_scenes(out, n_train=train, n_val=val, n_test=test, seed=seed, workers=workers))
    typer.echo(f"wrote {path} in {time.monotonic() - started:.0f} s")


def train_cmd(
    data: Path = typer.Option(
        ..., help="Karpathy split JSON (dataset_coco.json shape), COCO captions_*.json, or a Flickr8k folder"),
    images: Path | None = typer.Option(None, help="Image root folder (flickr8k: found in --data unless given)"),
    out: Path = typer.Option(..., help="Run folder: checkpoints, vocab.json, history.json, feature cache"),
    format: DataFormat = typer.Option(DataFormat.karpathy, help="Format of --data"),
    val_data: Path | None = typer.Option(None, help="COCO only: validation captions JSON"),
    val_images: Path | None = typer.Option(None, help="COCO only: validation image folder"),
    decoder: DecoderKind = typer.Option(DecoderKind.show_attend_tell, help="Decoder architecture"),
    backbone: str = typer.Option("efficientnet-lite0", help="efficientnet-lite0, -lite1 or -lite2"),
    image_size: int = typer.Option(224, help="Input size (multiple of 32)"),
    fine_tune_blocks: int = typer.Option(0, help="Fine-tune the last N encoder blocks (0: frozen, features cached)"),
    embed_dim: int = typer.Option(128),
    hidden_dim: int = typer.Option(256),
    attention_dim: int = typer.Option(128),
    dropout: float = typer.Option(0.3),
    epochs: int = typer.Option(15),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(1e-3),
    lr_decay: float = typer.Option(0.85, help="Learning-rate factor per epoch"),
    attention_reg: float = typer.Option(1.0, help="Doubly stochastic attention regularisation weight"),
    min_count: int = typer.Option(1, help="Vocabulary: minimum word count"),
    max_caption_length: int = typer.Option(24),
    patience: int = typer.Option(3, help="Early stopping: epochs without better validation CIDEr"),
    val_images_count: int = typer.Option(500, "--val-count", help="Validation images used per epoch (0: all)"),
    first_reference_share: float | None = typer.Option(
        None, min=0.0, max=1.0,
        help="Train on each image's first reference with this probability (unset: all references alike)",
    ),
    all_references: bool = typer.Option(False, "--all-references", help="Every epoch trains on all references of every image"),
    label_smoothing: float = typer.Option(0.0, min=0.0, max=0.5),
    flip_augment: float = typer.Option(0.0, min=0.0, max=1.0, help="Probability of a mirrored image (left/right swapped)"),
    self_critical: bool = typer.Option(
        False, "--self-critical", help="Self-critical training: reward each sampled caption's CIDEr-D over the greedy one's"
    ),
    sample_temperature: float = typer.Option(0.5, min=0.05, max=2.0, help="Self-critical: sampling temperature"),
    scst_samples: int = typer.Option(
        1, min=1, max=16, help="Self-critical: samples per image. 1: one, against the greedy caption's reward; "
        "K >= 2: K, each against the mean reward of the image's other samples (no greedy pass)"),
    init_checkpoint: Path | None = typer.Option(
        None, help="Start from this checkpoint's weights with a fresh optimizer (e.g. a cross-entropy best.pt before "
        "--self-critical), or from a float32 bundle folder's; a --label-prior run may start from a model without one"
    ),
    prior_lr_scale: float = typer.Option(10.0, min=0.0, help="--label-prior: the prior's learning rate as a multiple of --lr"),
    label_swap: float = typer.Option(
        0.0, min=0.0, max=1.0, help="--label-prior: the share of captions (cross-entropy) or of images' references "
        "(--self-critical) whose label word is swapped for another of its kind, with the prior saying so (teaches the "
        "decoder to write what its labels see)"),
    label_prior: bool = typer.Option(
        False, "--label-prior", help="The decoder also reads the encoder's ImageNet labels as caption-word probabilities "
        "(class -> words from WordNet, model_export/label_words.py; show_attend_tell only)"),
    seed: int = typer.Option(0),
    max_minutes: float | None = typer.Option(None, help="Stop after the epoch that crosses this time budget"),
    threads: int | None = typer.Option(None, help="torch CPU threads"),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from OUT/last.pt (under torchrun, with none there yet: start at epoch 1, so "
        "--max-restarts can rerun the same command)"),
    dist_timeout: float = typer.Option(
        600.0, min=10.0, help="Under torchrun: seconds a rank waits for the others in any collective before the job "
        "stops with an error"),
    progress: bool = typer.Option(True, help="Progress bars"),
    cache: Path | None = typer.Option(
        None, help="Feature cache folder (default OUT/cache; runs on the same images may share one)"),
) -> None:
    """Train a captioner (frozen encoder: features cached, fast on CPU; uses CUDA when present). Under
    `torchrun --nproc-per-node N` it trains on N ranks with DistributedDataParallel (docs/training.md)."""

    def run():
        from model_export.model import ModelConfig
        from model_export.train import TrainConfig, Trainer

        dataset = load_dataset(data, images, format, val_data, val_images)
        model = ModelConfig(
            backbone=backbone, image_size=image_size, decoder=decoder.value, embed_dim=embed_dim, hidden_dim=hidden_dim,
            attention_dim=attention_dim, dropout=dropout, fine_tune_blocks=fine_tune_blocks, label_prior=label_prior,
        )
        config = TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay, attention_reg=attention_reg, min_count=min_count,
            max_caption_length=max_caption_length, patience=patience, val_images=val_images_count, seed=seed,
            first_reference_share=first_reference_share, all_references=all_references, label_smoothing=label_smoothing,
            flip_augment=flip_augment, self_critical=self_critical, prior_lr_scale=prior_lr_scale, label_swap=label_swap,
            sample_temperature=sample_temperature, scst_samples=scst_samples,
            init_checkpoint=str(init_checkpoint) if init_checkpoint else None,
            max_minutes=max_minutes, num_threads=threads, progress=progress, dist_timeout=dist_timeout, model=model,
        )
        return Trainer(dataset, out, config, cache_dir=cache).run(resume=resume)

    best = _guard(run)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun, rank 0 speaks for the job
        typer.echo(f"best checkpoint: {best}")


def export_cmd(
    checkpoint: Path = typer.Option(..., help="Checkpoint from `captioner train` (best.pt)"),
    data: Path = typer.Option(..., help="Dataset for the parity check and the evaluation"),
    images: Path | None = typer.Option(None, help="Image root folder (flickr8k: found in --data unless given)"),
    out: Path = typer.Option(..., help="Bundle folder to write (replaced atomically)"),
    format: DataFormat = typer.Option(DataFormat.karpathy),
    name: str = typer.Option("captioner", help="Model name in the manifest"),
    version: str = typer.Option("1.0.0", help="Model version in the manifest"),
    parity_images: int = typer.Option(50, help="Test images whose torch and ONNX captions must be identical"),
    parity_split: str = typer.Option("test"),
    evaluate_split: str | None = typer.Option("test", help="Split to evaluate into the manifest ('' to skip)"),
    evaluate_limit: int | None = typer.Option(None, help="Evaluate at most this many images"),
    progress: bool = typer.Option(True),
    precision: str = typer.Option(
        "fp32", help="fp32; fp16 (half the size, for GPUs); int8 (an int8 decoder, for CPUs); each with its parity rules"),
    decoding: Path | None = typer.Option(
        None, help="JSON from `captioner tune-decoding`: its chosen length penalty and n-gram blocking become the "
        "bundle's recommendation"
    ),
    label_words: bool | None = typer.Option(
        None, "--label-words/--no-label-words", help="Write each ImageNet class's caption words into labels.json "
        "(WordNet 3.0: apt install wordnet-base), which guide=labels reads (default: for --label-prior models only)"),
) -> None:
    """Export a checkpoint to a model bundle; it proves parity before anything is written."""

    def run():
        from model_export.data.karpathy import read_json_file
        from model_export.export import export_bundle

        dataset = load_dataset(data, images, format)
        chosen = None
        if decoding:
            tuned = read_json_file(decoding)
            if not isinstance(tuned, dict) or not isinstance(tuned.get("chosen"), dict):
                raise DatasetError(decoding, "not a `captioner tune-decoding` result (no 'chosen' object)")
            chosen = tuned["chosen"]
        return export_bundle(
            checkpoint, out, dataset, name=name, version=version, parity_split=parity_split, parity_images=parity_images,
            evaluate_split=evaluate_split or None, evaluate_limit=evaluate_limit, progress=progress,
            precision=precision, decoding=chosen, label_words=label_words,
        )

    path = _guard(run)
    manifest = json.loads((path / "manifest.json").read_text())
    typer.echo(f"wrote {path} (parity: {json.dumps(manifest['parity'])})")


def evaluate_cmd(
    bundle: Path = typer.Option(Path("models/default"), help="Model bundle folder"),
    data: Path = typer.Option(..., help="Karpathy split JSON or COCO captions JSON"),
    images: Path | None = typer.Option(None, help="Image root folder (flickr8k: found in --data unless given)"),
    format: DataFormat = typer.Option(DataFormat.karpathy),
    split: str = typer.Option("test"),
    limit: int | None = typer.Option(None, help="At most this many images"),
    out: Path | None = typer.Option(None, help="Write the full result as JSON here"),
    device: str = typer.Option("auto", help="auto, cuda or cpu"),
    progress: bool = typer.Option(True),
) -> None:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) for greedy, beam 3 and beam 5, through onnxruntime."""

    def run():
        from model_export.evaluate import evaluate_bundle

        dataset = load_dataset(data, images, format)
        return evaluate_bundle(bundle, dataset, split=split, limit=limit, device=device, progress=progress)

    from model_export.evaluate import format_table

    result = _guard(run)
    typer.echo(format_table(result))
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {out}", err=True)


def tune_decoding_cmd(
    bundle: Path = typer.Option(Path("models/default"), help="Model bundle folder"),
    data: Path = typer.Option(..., help="Karpathy split JSON, COCO captions JSON or a Flickr8k folder"),
    images: Path | None = typer.Option(None, help="Image root folder (flickr8k: found in --data unless given)"),
    format: DataFormat = typer.Option(DataFormat.karpathy),
    split: str = typer.Option("val", help="Choose on this split (never the test split)"),
    limit: int | None = typer.Option(None, help="At most this many images"),
    out: Path | None = typer.Option(None, help="Write every setting's scores as JSON here (input of export --decoding)"),
    device: str = typer.Option("auto"),
    progress: bool = typer.Option(True),
) -> None:
    """Choose the length penalty and n-gram blocking (and see beam sizes) on the validation split."""

    def run():
        from model_export.evaluate import tune_decoding

        dataset = load_dataset(data, images, format)
        return tune_decoding(bundle, dataset, split=split, limit=limit, device=device, progress=progress)

    result = _guard(run)
    for row in result["grid_beam3"] + result["beam_sizes"]:
        typer.echo(
            f"beam {row['beam_size']}  length_penalty {row['length_penalty']:<4} no_repeat_ngram {row['no_repeat_ngram_size']}  "
            f"BLEU-4 {row['BLEU-4']:.4f}  METEOR {row['METEOR']:.4f}  CIDEr {row['CIDEr']:.4f}  "
            f"repeats {row['repeated_bigram_share']:.3f}  words {row['mean_words']:.1f}"
        )
    typer.echo(f"chosen: {json.dumps(result['chosen'])}")
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {out}", err=True)


def confidence_cmd(
    bundle: Path = typer.Option(Path("models/default"), help="Model bundle folder"),
    data: Path = typer.Option(..., help="Karpathy split JSON, COCO captions JSON or a Flickr8k folder"),
    images: Path | None = typer.Option(None, help="Image root folder (flickr8k: found in --data unless given)"),
    format: DataFormat = typer.Option(DataFormat.karpathy),
    split: str = typer.Option("val", help="Measure and fit on this split (never the test split)"),
    limit: int | None = typer.Option(None, help="The split's first N images only"),
    strategy: str | None = typer.Option(None, help="greedy or beam (default: beam, as the service)"),
    beam_size: int | None = typer.Option(None, help="Beam size (default 3, as the service)"),
    threshold: float = typer.Option(0.5, help="Per-image CIDEr-D the calibrated confidence estimates the chance of reaching"),
    bins: int = typer.Option(10, min=2, max=100, help="Reliability table bins over 0..1"),
    folds: int = typer.Option(5, min=2, max=20, help="Cross-fitting folds for the out-of-sample calibration check"),
    out: Path | None = typer.Option(None, help="Write the full result as JSON here"),
    write: bool = typer.Option(False, "--write", help="Store the fitted calibration in the bundle's manifest.json"),
    device: str = typer.Option("auto", help="auto, cuda or cpu"),
    threads: int | None = typer.Option(None, help="onnxruntime threads"),
    progress: bool = typer.Option(True),
) -> None:
    """Caption confidence vs per-image CIDEr-D (correlations, reliability tables) and its calibration."""

    def run():
        from model_export.confidence import evaluate_confidence, with_strategy
        from model_export.evaluate import recommended_decoding

        dataset = load_dataset(data, images, format)
        decoding = with_strategy(recommended_decoding(_load(bundle)), strategy, beam_size)
        return evaluate_confidence(bundle, dataset, split=split, limit=limit, decoding=decoding, threshold=threshold,
                                   bins=bins, folds=folds, device=device, threads=threads, progress=progress)

    def _load(path: Path):
        from app.inference.bundle import load_bundle

        return load_bundle(path, verify=False)

    from model_export.confidence import format_report, write_calibration

    try:
        result = _guard(run)
    except ValueError as exc:  # a bad split, strategy or beam size
        fail(str(exc))
    typer.echo(format_report(result))
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"wrote {out}", err=True)
    if write:
        if result.get("calibration") is None:
            fail("no calibration to write: confidence does not separate the captions above and below the threshold")
        _guard(lambda: write_calibration(bundle, result["calibration"]))
        typer.echo(f"wrote the calibration into {bundle / 'manifest.json'}", err=True)


def add_labels_cmd(
    bundle: Path = typer.Option(..., help="Bundle folder without labels (exported before they existed), or with "
                                "labels but no caption words; changed in place"),
    images: list[Path] = typer.Option(
        [], "--image", help="Real images for the torch vs onnxruntime check (repeat; default: scikit-image's photos "
        "if installed)"),
    words: bool = typer.Option(
        True, help="Also give labels.json each class's caption words (WordNet 3.0: apt install wordnet-base), which "
        "guide=labels needs; on a bundle with labels already, only that"),
) -> None:
    """Add the encoder's ImageNet head and labels.json to an older bundle (`captioner export` writes them),
    and the caption words per class that guide=labels reads."""

    def run():
        import numpy as np

        from app.inference.bundle import load_bundle
        from model_export.images import load_pixels
        from model_export.labels import add_labels, add_words

        loaded = load_bundle(bundle, verify=False)
        report = {}
        if not loaded.has_labels:
            spec = loaded.preprocessing
            pixels = [load_pixels(p, spec) for p in images] if images else _sample_photos(spec)
            report = add_labels(bundle, np.stack(pixels) if pixels else None)
        elif not words or loaded.label_words is not None:
            fail(f"{bundle} has labels already" + (", with their caption words" if loaded.label_words is not None else ""))
        if words:
            report["classes_with_words"] = add_words(bundle)
        return report

    report = _guard(run)
    typer.echo(f"added labels to {bundle} ({json.dumps(report)})")


def add_reference_cmd(
    bundle: Path = typer.Option(..., help="Bundle folder whose manifest has no parity.reference yet; manifest.json "
                                "is changed in place"),
) -> None:
    """Record the reference captions the service checks before it switches to a new version of a
    model (`captioner export` writes them; docs/bundle-format.md)."""

    def run():
        from model_export.reference_captions import add_reference

        return add_reference(bundle)

    reference = _guard(run)
    typer.echo(f"recorded {len(reference)} reference captions in {bundle / 'manifest.json'}")


def average_checkpoints_cmd(
    checkpoints: list[Path] = typer.Argument(..., help="Two or more checkpoints fine-tuned from one parent (best.pt, last.pt)"),
    out: Path = typer.Option(..., help="The averaged checkpoint to write"),
    weight: list[float] | None = typer.Option(
        None, help="One weight per checkpoint, in their order (repeat the option; default: equal weights)"),
) -> None:
    """Average the trained weights of checkpoints fine-tuned from one parent (a "model soup"): one
    checkpoint of the same size, to export like any other (model_export/average.py)."""

    def run():
        from model_export.average import write_average

        return write_average(checkpoints, out, weight or None)

    path = _guard(run)
    typer.echo(f"wrote {path}: the average of {len(checkpoints)} checkpoints")


def _sample_photos(spec) -> list:
    try:
        from skimage import data as skdata
    except ImportError:
        return []
    import io

    from PIL import Image

    from app.inference.preprocess import decode_image, to_array

    out = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(skdata, name)()).save(buffer, "PNG")
        out.append(to_array(decode_image(buffer.getvalue(), 10**8), spec))
    return out


COMMANDS = {
    "generate-scenes": generate_scenes_cmd,
    "train": train_cmd,
    "export": export_cmd,
    "evaluate": evaluate_cmd,
    "tune-decoding": tune_decoding_cmd,
    "confidence": confidence_cmd,
    "add-labels": add_labels_cmd,
    "add-reference": add_reference_cmd,
    "average-checkpoints": average_checkpoints_cmd,
}


if __name__ == "__main__":  # pragma: no cover
    app = typer.Typer()
    for command_name, fn in COMMANDS.items():
        app.command(command_name)(fn)
    app(sys.argv[1:])
