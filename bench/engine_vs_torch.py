"""Benchmark 1: the serving engine vs a PyTorch eager reference of the same model, beam 3.

    python bench/engine_vs_torch.py --json bench/results/engine_vs_torch.json

Same weights (bench/common.py exports the torch model into a bundle), same preprocessed images, one
run. Images per second for:
- torch, one image at a time: model_export/torch_decoder.py (the per-image loop of the tutorials);
- torch, batched: bench/common.py torch_batched_beam_search (fixed width, TopK on the device);
- engine, one image at a time and batched (app/inference/engine.py on onnxruntime; plain and IO binding).
Ratios are engine / torch. `--device cuda` runs both sides on the GPU (bench/gpu.py does that).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import (
    SPECIAL,
    build_model,
    environment,
    export_bench_bundle,
    test_images,
    timed,
    torch_batched_beam_search,
    write_report,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["default", "coco"], default="default")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--images", type=int, default=128, help="images for the batched runs")
    parser.add_argument("--per-image", type=int, default=24, help="images for the one-at-a-time runs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args(argv)

    import torch

    from app.inference.bundle import load_bundle
    from app.inference.decoding import DecodingConfig
    from app.inference.engine import Engine
    from model_export.torch_decoder import reference_decode

    model = build_model(args.size).to(args.device)
    images = test_images(max(args.images, args.per_image))
    config = DecodingConfig(beam_size=args.beam, max_length=args.max_length)
    report: dict = {"benchmark": "engine_vs_torch", "environment": environment(), "settings": vars(args), "images_per_s": {}}
    rates = report["images_per_s"]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(export_bench_bundle(model.cpu(), Path(tmp) / "bundle", args.max_length))
        model.to(args.device)
        engines = {"engine": Engine(bundle, device=args.device)}
        if args.device == "cpu":
            engines["engine_io_binding"] = Engine(bundle, device="cpu", io_binding=True)

        per_image = torch.from_numpy(images[: args.per_image]).to(args.device)
        batched = torch.from_numpy(images[: args.images]).to(args.device)

        def torch_one_at_a_time():
            out = [reference_decode(model, img, SPECIAL, beam=args.beam, max_length=args.max_length)[0].tokens
                   for img in per_image]
            sync()
            return out

        def torch_batched():
            out = []
            for start in range(0, len(batched), args.batch):
                out += torch_batched_beam_search(model, batched[start : start + args.batch], args.beam, args.max_length)
            sync()
            return out

        torch_one_at_a_time()  # warm-up (lazy init, cuDNN autotuning)
        seconds, torch_single = timed(torch_one_at_a_time, args.repeat)
        rates["torch_one_at_a_time"] = args.per_image / seconds
        torch_batched()
        seconds, torch_batch = timed(torch_batched, args.repeat)
        rates["torch_batched"] = args.images / seconds

        for name, engine in engines.items():
            engine.warmup()

            def one_at_a_time(engine=engine):
                return [engine.caption(images[i : i + 1], config)[0][0].token_ids for i in range(args.per_image)]

            def batch(engine=engine):
                out = []
                for start in range(0, args.images, args.batch):
                    out += [c[0].token_ids for c in engine.caption(images[start : min(start + args.batch, args.images)], config)]
                return out

            one_at_a_time()
            seconds, engine_single = timed(one_at_a_time, args.repeat)
            rates[f"{name}_one_at_a_time"] = args.per_image / seconds
            batch()
            seconds, engine_batch = timed(batch, args.repeat)
            rates[f"{name}_batched"] = args.images / seconds
            report.setdefault("same_captions", {})[name] = {
                # the per-image reference follows the engine's rules exactly: captions must match
                "vs_torch_one_at_a_time": float(np.mean([a == b for a, b in zip(engine_single, torch_single)])),
                # the fixed-width batched baseline keeps all beams open until `beam` have ended
                "vs_torch_batched": float(np.mean([a == b for a, b in zip(engine_batch, torch_batch)])),
            }

    best_single = max(v for k, v in rates.items() if k.startswith("engine") and k.endswith("one_at_a_time"))
    best_batched = max(v for k, v in rates.items() if k.startswith("engine") and k.endswith("batched"))
    report["ratios"] = {
        "engine_batched / torch_one_at_a_time": best_batched / rates["torch_one_at_a_time"],
        "engine_batched / torch_batched": best_batched / rates["torch_batched"],
        "engine_one_at_a_time / torch_one_at_a_time": best_single / rates["torch_one_at_a_time"],
    }
    report["images_per_s"] = {k: round(v, 2) for k, v in rates.items()}
    report["ratios"] = {k: round(v, 2) for k, v in report["ratios"].items()}
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
