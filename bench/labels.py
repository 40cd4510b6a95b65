"""Benchmark 7: what ImageNet labels cost: the same bundle with labels off and on, through the engine.

    python bench/labels.py --json bench/results/labels.json

On a bundle with labels (default models/default), with the service's default decoding (beam 3 and
the bundle's recommended length penalty and n-gram blocking), on this machine's CPU:
- one image at a time, the same photo: latency p50 over `--repeat` captions, labels 0 and
  `--labels` timed alternately (so drift and other load hit both alike);
- batches of `--batch` distinct photos (scikit-image's, cropped and flipped): images per second,
  best of `--runs` passes over `--images` images for each, the passes alternating.
- the encoder alone on a batch of `--batch` (where the head runs): median of `--repeat` calls each way.
`cost` is on / off - 1 (time per image, so positive means labels are slower). `--without BUNDLE`
adds a third way: the same model exported without labels (e.g. the bundle before `captioner
add-labels`), so `cost_vs_without` is what having the head costs at all (onnxruntime computes a
graph's every node whichever outputs are asked for, so "off" pays for the head too).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from common import REPO, environment, test_images, write_report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--labels", type=int, default=3, help="labels per image when on (the service's default)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=60, help="one-image captions timed, each way")
    parser.add_argument("--runs", type=int, default=3, help="batched passes each way; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its own)")
    parser.add_argument("--without", type=Path, default=None, help="the same model's bundle without labels")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from app.inference.bundle import load_bundle
    from app.inference.engine import Engine
    from model_export.evaluate import recommended_decoding

    bundle = load_bundle(args.bundle)
    if not bundle.has_labels:
        parser.error(f"{args.bundle} has no labels")
    engine = Engine(bundle, device="cpu", threads=args.threads)
    config = recommended_decoding(bundle)
    images = test_images(args.images)
    one = images[:1]
    ways = {"off": (engine, 0), "on": (engine, args.labels)}
    if args.without is not None:
        ways["without"] = (Engine(load_bundle(args.without), device="cpu", threads=args.threads), 0)
    for way_engine, k in ways.values():  # warm-up, every way
        for _ in range(3):
            way_engine.run(one, config, labels=k)

    latencies: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.repeat):
        for way, (way_engine, k) in ways.items():
            start = time.perf_counter()
            way_engine.run(one, config, labels=k)
            latencies[way].append((time.perf_counter() - start) * 1000)

    best = {way: float("inf") for way in ways}
    same_captions = True
    for _ in range(args.runs):
        captions = {}
        for way, (way_engine, k) in ways.items():
            start = time.perf_counter()
            out = []
            for i in range(0, len(images), args.batch):
                out += way_engine.run(images[i : i + args.batch], config, labels=k)
            best[way] = min(best[way], time.perf_counter() - start)
            captions[way] = [r.captions[0].token_ids for r in out]
            assert all(len(r.labels) == k for r in out)
        same_captions &= all(c == captions["off"] for c in captions.values())

    batch = np.ascontiguousarray(images[: args.batch])
    encoder_ms: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(args.repeat):
        for way, (way_engine, k) in ways.items():
            start = time.perf_counter()
            way_engine.encode(batch, labels=k > 0)
            encoder_ms[way].append((time.perf_counter() - start) * 1000)
    encoder = {way: statistics.median(v) for way, v in encoder_ms.items()}

    p50 = {way: statistics.median(v) for way, v in latencies.items()}
    rate = {way: len(images) / best[way] for way in ways}
    report = {
        "benchmark": "labels",
        "environment": environment(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": f"{bundle.name} {bundle.version}",
        "decoding": {"beam_size": config.beam_size, "length_penalty": config.length_penalty,
                     "no_repeat_ngram_size": config.no_repeat_ngram_size},
        "one_image_ms_p50": {way: round(v, 2) for way, v in p50.items()},
        f"batch{args.batch}_images_per_s": {way: round(v, 1) for way, v in rate.items()},
        f"encoder_batch{args.batch}_ms_median": {way: round(v, 2) for way, v in encoder.items()},
        "cost": {
            "one_image_p50": round(p50["on"] / p50["off"] - 1, 4),
            f"batch{args.batch}_time_per_image": round(rate["off"] / rate["on"] - 1, 4),
            f"encoder_batch{args.batch}": round(encoder["on"] / encoder["off"] - 1, 4),
        },
        **({"cost_vs_without": {
            "one_image_p50": round(p50["on"] / p50["without"] - 1, 4),
            f"batch{args.batch}_time_per_image": round(rate["without"] / rate["on"] - 1, 4),
            f"encoder_batch{args.batch}": round(encoder["on"] / encoder["without"] - 1, 4),
        }} if "without" in ways else {}),
        "captions_identical": bool(same_captions),
        "mean_words": round(float(np.mean([len(t) for t in captions["off"]])), 2),
    }
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
