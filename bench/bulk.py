"""Benchmark 8: bulk captioning (`caption-dir`): the local engine vs Ray Data with 1 and 2 actors.

    python bench/bulk.py --json bench/results/bulk.json

The same folder of `--images` JPEGs (scikit-image's photos, resized, cropped and flipped so that no two
are alike, 640 x 480) and the same settings (models/default, beam 3 and its recommended decoding,
batch 16, no labels) through app.bulk.job.run, the code `captioner caption-dir` runs:
- local: a LocalCaptioner (the model loaded before the clock starts);
- ray: a RayCaptioner on a local Ray cluster (`ray start --head` on loopback with this machine's
  cores, started before the clock), with `--actors` 1 and 2. Its time includes starting the actors
  and loading the model in each (once per run: a long run pays it once), so the script also reports
  when the first records came back (`first_records_s`; with the source's order kept, that is the
  first batch's actor, so it also includes that batch's captioning). Each of n actors
  gets cores / n onnxruntime threads (the local mode: onnxruntime's default, all cores).
Images per second = images / seconds from run() to its return, best of `--runs`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, environment, write_report


def make_photos(folder: Path, count: int) -> None:
    from PIL import Image
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.fromarray(photos[i % len(photos)]).resize((720, 540))
        x, y = int(rng.integers(0, 80)), int(rng.integers(0, 60))
        img = img.crop((x, y, x + 640, y + 480))
        if i % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def timed_run(captioner, photos: Path, out: Path, batch: int) -> dict:
    from app.bulk.job import run

    first: list[float] = []

    def watching(items):
        for records in captioner(items):
            if not first:
                first.append(time.perf_counter())
            yield records

    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    start = time.perf_counter()
    summary = run(photos, out, batch_size=batch, captioner=watching, progress=False, log=lambda m: None)
    end = time.perf_counter()
    assert summary.ok and summary.captioned == summary.images, summary
    return {"seconds": end - start, "images": summary.images, "images_per_s": summary.images / (end - start),
            "first_records_s": first[0] - start if first else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from app.bulk.local import LocalCaptioner
    from app.bulk.ray_runner import RayCaptioner

    decoding = {"strategy": None, "beam_size": None, "num_captions": None, "max_length": None,
                "length_penalty": None, "no_repeat_ngram_size": None}
    ray_bin = Path(sys.executable).with_name("ray")
    work = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    results: dict[str, dict] = {}
    try:
        photos = work / "photos"
        make_photos(photos, args.images)
        local = LocalCaptioner.load(batch_size=args.batch, decoding=decoding, labels=0, bundle=args.bundle, device="cpu")
        results["local"] = min((timed_run(local, photos, work / "local.jsonl", args.batch) for _ in range(args.runs)),
                               key=lambda r: r["seconds"])
        del local
        port = 6400 + os.getpid() % 1000
        subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                        "--num-cpus", str(os.cpu_count() or 2), "--include-dashboard", "false",
                        "--disable-usage-stats", "--temp-dir", temp], check=True, capture_output=True, timeout=180)
        for n in args.actors:
            threads = max(1, (os.cpu_count() or 2) // n)  # the actors share the cores, one onnxruntime pool each
            ray_captioner = RayCaptioner.load(batch_size=args.batch, decoding=decoding, labels=0, bundle=args.bundle,
                                              device="cpu", threads=threads, actors=n, address=f"127.0.0.1:{port}",
                                              progress=False)
            results[f"ray_{n}_actors"] = min(
                (timed_run(ray_captioner, photos, work / f"ray{n}.jsonl", args.batch) for _ in range(args.runs)),
                key=lambda r: r["seconds"])
            ray_captioner.close()
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=180)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
    for r in results.values():
        for key in ("seconds", "images_per_s", "first_records_s"):
            if r.get(key) is not None:
                r[key] = round(r[key], 2)
    report = {"benchmark": "bulk", "environment": environment(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": results}
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
