"""The GPU benchmark for a lent CUDA machine (DEVELOPERS.md says how to run it there); one call of
under 10 minutes. `--device cpu` runs the same steps on the CPU with small counts.

    PYTHONPATH=/tmp/site python bench/gpu.py --json $OUT/gpu.json          # on the GPU machine
    python bench/gpu.py --device cpu --quick                               # anywhere

1. Benchmark 1 on CUDA: the engine (CUDAExecutionProvider, IO binding, TopK in the select graph)
   vs the torch CUDA reference (one image at a time, and batched with TopK on the device), COCO-sized
   decoder, beam 3, batch 64. Goal: >= 2x torch batched.
2. Beam-3 latency of one image through the engine (median and p95 over many calls). Goal: <= 5 ms.
3. Part of benchmark 3: the dynamic batcher in process, 16 concurrent clients, batching on vs off.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import engine_vs_torch
import numpy as np
from common import (
    batcher_rate,
    build_model,
    environment,
    export_bench_bundle,
    test_images,
    write_report,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=["default", "coco"], default="coco")
    parser.add_argument("--quick", action="store_true", help="tiny counts (a smoke run)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.device == "cuda":
        import torch  # loads the CUDA and cuDNN libraries onnxruntime-gpu needs

        assert torch.cuda.is_available(), "no CUDA device visible to torch"
    started = time.perf_counter()
    report: dict = {"benchmark": "gpu", "environment": environment(), "settings": vars(args)}

    batch = 4 if quick else 64
    report["engine_vs_torch"] = engine_vs_torch.main([
        "--device", args.device, "--size", args.size, "--batch", str(batch),
        "--images", str(batch if quick else 4 * batch), "--per-image", "2" if quick else "32",
        "--repeat", "1" if quick else "3", "--max-length", "4" if quick else "16",
    ])

    from app.inference.bundle import load_bundle
    from app.inference.decoding import DecodingConfig
    from app.inference.engine import Engine

    images = test_images(16)
    config = DecodingConfig(beam_size=3, max_length=4 if quick else 16)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(export_bench_bundle(build_model(args.size), Path(tmp) / "bundle", config.max_length))
        engine = Engine(bundle, device=args.device)
        report["provider"] = engine.provider
        one = images[:1]
        for _ in range(5):
            engine.caption(one, config)
        times = []
        for i in range(5 if quick else 200):
            start = time.perf_counter()
            engine.caption(images[i % 16 : i % 16 + 1], config)
            times.append(time.perf_counter() - start)
        ms = np.array(times) * 1000
        report["one_image_beam3_latency_ms"] = {"p50": round(float(np.median(ms)), 2),
                                                "p95": round(float(np.percentile(ms, 95)), 2)}
        seconds = 1.0 if quick else 15.0
        report["batcher_c16"] = [batcher_rate(engine, images, config, 16, enabled, seconds) for enabled in (True, False)]
    on, off = report["batcher_c16"]
    report["ratios"] = {
        "engine_batched / torch_batched": report["engine_vs_torch"]["ratios"]["engine_batched / torch_batched"],
        "batching_on / batching_off (c16)": round(on["images_per_s"] / off["images_per_s"], 2),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
