"""`captioner evaluate`: score a model bundle on a dataset split through onnxruntime (no torch).

Greedy, beam-3 and beam-5 captions from the serving engine itself (`app.inference.engine`), then BLEU-1..4,
METEOR, ROUGE-L and CIDEr via pycocoevalcap; on generated scenes also the attribute check (every
object's colour and shape named). The rows share the other decoding settings (length penalty,
n-gram blocking): the bundle's recommended ones unless given.

`tune_decoding` (`captioner tune-decoding`) is how those recommendations are chosen: on the
validation split, a grid of length penalty and n-gram blocking at beam 3, then beam sizes at the
best of them, every COCO metric, chosen by CIDEr (plus how many captions repeat a word pair).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from app.inference.bundle import load_bundle
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine
from model_export.data.karpathy import CaptionDataset
from model_export.data.scenes import attribute_accuracy
from model_export.images import iter_batches
from model_export.metrics import coco_scores_many

STRATEGIES = {
    "greedy": DecodingConfig(strategy="greedy"),
    "beam3": DecodingConfig(strategy="beam", beam_size=3),
    "beam5": DecodingConfig(strategy="beam", beam_size=5),
}
METRIC_ORDER = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def recommended_decoding(bundle) -> DecodingConfig:
    """Beam 3 with the bundle's recommended length penalty and n-gram blocking (`Bundle.recommended_decoding`,
    read and checked with the manifest), as the service decodes by default."""
    chosen = bundle.recommended_decoding
    guided = (chosen.guide or "none") if bundle.label_words is not None else "none"
    return DecodingConfig(length_penalty=chosen.length_penalty, no_repeat_ngram_size=chosen.no_repeat_ngram_size,
                          guide=guided, guide_threshold=chosen.guide_threshold or 0.5,
                          guide_words=1 if chosen.guide_words is None else chosen.guide_words)


SHARED = ("length_penalty", "no_repeat_ngram_size", "guide", "guide_threshold", "guide_words")  # all rows decode with


def _strategies(base: DecodingConfig) -> dict[str, DecodingConfig]:
    return {name: replace(config, **{k: getattr(base, k) for k in SHARED}) for name, config in STRATEGIES.items()}


def decoding_record(config: DecodingConfig) -> dict:
    """The settings an evaluation decoded with, as the manifest's `evaluation.decoding` keeps them (the
    guide's only when guided)."""
    record = {"length_penalty": config.length_penalty, "no_repeat_ngram_size": config.no_repeat_ngram_size}
    if config.guide != "none":
        record.update(guide=config.guide, guide_threshold=config.guide_threshold, guide_words=config.guide_words)
    return record


def caption_split(engine: Engine, paths: list[Path], configs: dict[str, DecodingConfig], batch_size: int = 32,
                  progress: bool = True, desc: str = "captioning") -> dict[str, dict[int, list[str]]]:
    """The best caption's words for every image, per named decoding config (one pass over the images)."""
    from tqdm import tqdm

    predictions: dict[str, dict[int, list[str]]] = {name: {} for name in configs}
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress)
    for indices, pixels in iter_batches(paths, engine.bundle.preprocessing, batch_size):
        for name, config in configs.items():
            for i, captions in zip(indices, engine.caption(pixels, config)):
                predictions[name][i] = captions[0].tokens if captions else []
        bar.update(len(indices))
    bar.close()
    return predictions


def repeats_a_bigram(words: list[str]) -> bool:
    pairs = list(zip(words, words[1:]))
    return len(pairs) != len(set(pairs))


def evaluate_bundle(
    bundle_dir: Path,
    dataset: CaptionDataset,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    decoding: DecodingConfig | None = None,
) -> dict:
    """Scores of greedy, beam 3 and beam 5 on `split`; `decoding` gives the length penalty and
    n-gram blocking of all three (default: the bundle's recommendation)."""
    started = time.monotonic()
    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle, device=device, threads=threads)
    base = decoding or recommended_decoding(bundle)
    strategies = _strategies(base)
    examples = dataset.split(split)[: limit or None]
    paths = [e.image_path for e in examples]
    predictions = caption_split(engine, paths, strategies, batch_size, progress, desc=f"captioning {split}")
    references = {i: e.references for i, e in enumerate(examples)}
    has_scenes = all("scene" in e.extra for e in examples)
    result: dict = {
        "bundle": {"name": bundle.name, "version": bundle.version, "path": str(bundle_dir)},
        "dataset": {"name": dataset.name, "source": str(dataset.source), "split": split, "images": len(examples)},
        "provider": engine.provider,
        "decoding": decoding_record(base),
    }
    all_scores = coco_scores_many({name: predictions[name] for name in strategies}, references)
    for name in strategies:
        scores = all_scores[name]
        if has_scenes:
            scores["attributes"] = attribute_accuracy({e.image_id: predictions[name][i] for i, e in enumerate(examples)}, dataset)
        scores["repeated_bigram_share"] = sum(map(repeats_a_bigram, predictions[name].values())) / max(len(examples), 1)
        result[name] = scores
    result["samples"] = [
        {"image": str(e.image_path), "reference": " ".join(e.references[0]),
         **{n: " ".join(predictions[n][i]) for n in strategies}}
        for i, e in enumerate(examples[:10])
    ]
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def tune_decoding(
    bundle_dir: Path,
    dataset: CaptionDataset,
    split: str = "val",
    length_penalties: tuple[float, ...] = (0.0, 0.5, 1.0),
    ngram_sizes: tuple[int, ...] = (0, 2, 3),
    beam_sizes: tuple[int, ...] = (1, 2, 3, 5, 7),
    limit: int | None = None,
    device: str = "auto",
    progress: bool = True,
    guide_thresholds: tuple[float, ...] = (0.5, 0.7, 0.9),
    guide_word_counts: tuple[int, ...] = (1, 2),
) -> dict:
    """Choose the length penalty and n-gram blocking on `split` (beam 3, best validation CIDEr),
    then score beam sizes with them, and (a bundle with label words) guide=labels at each threshold
    and word count beside guide=none, choosing the guide the same way. Returns every setting tried
    with its scores (all the COCO metrics, as `evaluate` computes them)."""

    started = time.monotonic()
    engine = Engine(load_bundle(bundle_dir), device=device)
    examples = dataset.split(split)[: limit or None]
    paths = [e.image_path for e in examples]
    references = {i: e.references for i, e in enumerate(examples)}

    def score(configs: dict[str, DecodingConfig]) -> list[dict]:
        predictions = caption_split(engine, paths, configs, progress=progress, desc=f"{len(configs)} settings on {split}")
        rows = []
        all_scores = coco_scores_many({name: predictions[name] for name in configs}, references)
        for name, config in configs.items():
            scores = all_scores[name]
            rows.append({
                "beam_size": config.beam_size if config.strategy == "beam" else 1,
                **decoding_record(config),
                **scores,
                "repeated_bigram_share": sum(map(repeats_a_bigram, predictions[name].values())) / max(len(examples), 1),
                "mean_words": sum(map(len, predictions[name].values())) / max(len(examples), 1),
            })
        return rows

    grid = score({f"lp{lp}-ng{n}": DecodingConfig(beam_size=3, length_penalty=lp, no_repeat_ngram_size=n)
                  for lp in length_penalties for n in ngram_sizes})
    best = max(grid, key=lambda r: (r["CIDEr"], r["BLEU-4"]))
    beams = score({f"beam{b}": DecodingConfig(strategy="greedy" if b == 1 else "beam", beam_size=b,
                                             length_penalty=best["length_penalty"],
                                             no_repeat_ngram_size=best["no_repeat_ngram_size"])
                   for b in beam_sizes})
    chosen = {"length_penalty": best["length_penalty"], "no_repeat_ngram_size": best["no_repeat_ngram_size"]}
    guides: list[dict] = []
    if engine.has_label_words:
        base = dict(beam_size=3, **chosen)
        guides = score({f"guide{th}-{k}": DecodingConfig(guide="labels", guide_threshold=th, guide_words=k, **base)
                        for th in guide_thresholds for k in guide_word_counts})
        unguided = next(r for r in grid if r["length_penalty"] == chosen["length_penalty"]
                        and r["no_repeat_ngram_size"] == chosen["no_repeat_ngram_size"])
        top = max(guides, key=lambda r: (r["CIDEr"], r["BLEU-4"]))
        if (top["CIDEr"], top["BLEU-4"]) > (unguided["CIDEr"], unguided["BLEU-4"]):
            chosen.update(guide="labels", guide_threshold=top["guide_threshold"], guide_words=top["guide_words"])
    chosen["chosen_on"] = f"{dataset.name} {split} ({len(examples)} images), beam 3, best CIDEr"
    return {
        "split": split, "images": len(examples), "chosen": chosen,
        "grid_beam3": grid, "beam_sizes": beams, "guides": guides, "seconds": round(time.monotonic() - started, 1),
    }


def format_table(result: dict) -> str:
    names = [n for n in STRATEGIES if n in result]
    lines = [f"{'metric':<12}" + "".join(f"{n:>10}" for n in names)]
    for metric in METRIC_ORDER:
        lines.append(f"{metric:<12}" + "".join(f"{result[n][metric]:>10.4f}" for n in names))
    if all("attributes" in result[n] for n in names):
        lines.append(f"{'attrs all':<12}" + "".join(f"{result[n]['attributes']['all']['accuracy']:>10.4f}" for n in names))
        for k in sorted(result[names[0]]["attributes"]["by_objects"]):
            lines.append(
                f"{'attrs ' + k + ' obj':<12}"
                + "".join(f"{result[n]['attributes']['by_objects'][k]['accuracy']:>10.4f}" for n in names)
            )
    return "\n".join(lines)
