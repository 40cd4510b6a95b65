"""Benchmark 6: real bundles side by side in one run: one-image latency and batched throughput.

    python bench/bundles.py --json bench/results/bundles.json

For each bundle (default: models/default and the scene bundle tests/fixtures/scenes-sat-lite0),
through the serving engine on this machine's CPU, with the service's default decoding (beam 3 and
the bundle's recommended length penalty and n-gram blocking):
- one image at a time, the same photo: latency p50 / p95 over `--repeat` captions (after warm-up);
- batches of `--batch` distinct photos (scikit-image's, cropped and flipped): images per second,
  best of `--runs` passes over `--images` images; the mean caption length is reported beside it,
  since every word is a decoder step.
Ratios are each bundle's figures over the last bundle's (the reference), from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from common import REPO, environment, test_images, write_report


def measure(bundle_dir: Path, images: np.ndarray, batch: int, repeat: int, runs: int, threads: int | None) -> dict:
    from app.inference.bundle import load_bundle
    from app.inference.engine import Engine
    from model_export.evaluate import recommended_decoding

    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle, device="cpu", threads=threads)
    config = recommended_decoding(bundle)  # beam 3, as the service decodes by default
    one = images[:1]
    for _ in range(3):
        engine.caption(one, config)
    latencies = []
    for _ in range(repeat):
        start = time.perf_counter()
        engine.caption(one, config)
        latencies.append((time.perf_counter() - start) * 1000)
    latencies.sort()
    best, words = float("inf"), []
    for _ in range(runs):
        start = time.perf_counter()
        words = []
        for i in range(0, len(images), batch):
            words += [len(c[0].tokens) for c in engine.caption(images[i : i + batch], config)]
        best = min(best, time.perf_counter() - start)
    return {
        "bundle": str(bundle_dir),
        "model": f"{bundle.name} {bundle.version}",
        "format_version": bundle.manifest.format_version,
        "vocab_size": len(bundle.vocab),
        "hidden_dim": bundle.manifest.architecture.hidden_dim,
        "decoding": {"beam_size": config.beam_size, "length_penalty": config.length_penalty,
                     "no_repeat_ngram_size": config.no_repeat_ngram_size},
        "one_image_ms": {"p50": round(statistics.median(latencies), 2),
                         "p95": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2)},
        f"batch{batch}_images_per_s": round(len(images) / best, 1),
        "mean_words": round(float(np.mean(words)), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", type=Path, nargs="+",
                        default=[REPO / "models" / "default", REPO / "tests" / "fixtures" / "scenes-sat-lite0"])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=60, help="one-image captions timed")
    parser.add_argument("--runs", type=int, default=2, help="batched passes; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its own)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    images = test_images(args.images)
    results = [measure(b, images, args.batch, args.repeat, args.runs, args.threads) for b in args.bundles]
    report: dict = {"benchmark": "bundles", "environment": environment(),
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "bundles"},
                    "bundles": results}
    if len(results) >= 2:
        reference, key = results[-1], f"batch{args.batch}_images_per_s"
        report["ratios"] = {
            f"{r['model']} / {reference['model']}": {
                key: round(r[key] / reference[key], 2),
                "one_image_p50": round(r["one_image_ms"]["p50"] / reference["one_image_ms"]["p50"], 2),
            }
            for r in results[:-1]
        }
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
