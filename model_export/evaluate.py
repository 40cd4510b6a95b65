"""`captioner evaluate`: score a model bundle on a dataset split through onnxruntime (no torch).

Greedy and beam-3 captions from the serving engine itself (`app.engine`), then BLEU-1..4, METEOR,
ROUGE-L and CIDEr via pycocoevalcap; on generated scenes also the attribute check (every object's
colour and shape named).
"""

from __future__ import annotations

import time
from pathlib import Path

from app.bundle import load_bundle
from app.decoding import DecodingConfig
from app.engine import Engine
from model_export.data.karpathy import CaptionDataset
from model_export.data.scenes import attribute_accuracy
from model_export.images import iter_batches
from model_export.metrics import coco_scores

STRATEGIES = {
    "greedy": DecodingConfig(strategy="greedy"),
    "beam3": DecodingConfig(strategy="beam", beam_size=3),
}
METRIC_ORDER = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def evaluate_bundle(
    bundle_dir: Path,
    dataset: CaptionDataset,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    from tqdm import tqdm

    started = time.monotonic()
    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle, device=device, threads=threads)
    examples = dataset.split(split)[: limit or None]
    paths = [e.image_path for e in examples]
    predictions: dict[str, dict[int, list[str]]] = {name: {} for name in STRATEGIES}
    bar = tqdm(total=len(paths), desc=f"captioning {split}", unit="img", disable=not progress)
    for indices, pixels in iter_batches(paths, bundle.preprocessing, batch_size):
        for name, config in STRATEGIES.items():
            for i, captions in zip(indices, engine.caption(pixels, config)):
                predictions[name][i] = captions[0].tokens if captions else []
        bar.update(len(indices))
    bar.close()
    references = {i: e.references for i, e in enumerate(examples)}
    has_scenes = all("scene" in e.extra for e in examples)
    result: dict = {
        "bundle": {"name": bundle.name, "version": bundle.version, "path": str(bundle_dir)},
        "dataset": {"name": dataset.name, "source": str(dataset.source), "split": split, "images": len(examples)},
        "provider": engine.provider,
    }
    for name in STRATEGIES:
        scores = coco_scores(predictions[name], references)
        if has_scenes:
            scores["attributes"] = attribute_accuracy({e.image_id: predictions[name][i] for i, e in enumerate(examples)}, dataset)
        result[name] = scores
    result["samples"] = [
        {"image": str(e.image_path), "reference": " ".join(e.references[0]), **{n: " ".join(predictions[n][i]) for n in STRATEGIES}}
        for i, e in enumerate(examples[:10])
    ]
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


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
