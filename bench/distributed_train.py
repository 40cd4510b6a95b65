"""Time per epoch of `captioner train` as one process and as torchrun ranks (Gloo on CPU) on generated
scenes (issue 28; figures in docs/training.md).

    python bench/distributed_train.py --train 1024 --val 64 --epochs 3 --json bench/results/distributed_train.json

Generates the scenes (or takes --scenes), computes the frozen encoder's feature cache once (a 1-epoch run
whose time is not counted), then runs the same training (same global batch, seed, sizes) as: one process
with --threads T; N ranks (torchrun --standalone --nproc-per-node N) with --threads T/N each, so both use the
same T cores. The time of an epoch is the difference of history.json's "seconds" (training and validation,
after the cache); the first epoch is reported apart (warm-up) and the rest as a median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train_args(scenes: Path, out: Path, cache: Path, epochs: int, batch: int, threads: int) -> list[str]:
    return ["-m", "captioner.cli", "train", "--data", str(scenes / "dataset.json"), "--images", str(scenes),
            "--out", str(out), "--cache", str(cache), "--epochs", str(epochs), "--batch-size", str(batch),
            "--val-count", "0", "--patience", "100", "--seed", "0", "--no-progress", "--threads", str(threads)]


def run(command: list[str], threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:8])} ... failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - started


def epochs_of(out: Path) -> dict:
    history = json.loads((out / "history.json").read_text())
    seconds = [h["seconds"] for h in history]
    per_epoch = [round(b - a, 2) for a, b in zip([0.0, *seconds[:-1]], seconds, strict=True)]
    return {"epoch_seconds": per_epoch, "first_epoch_s": per_epoch[0],
            "median_epoch_s": round(statistics.median(per_epoch[1:] or per_epoch), 2),
            "train_loss": [round(h["train_loss"], 4) for h in history], "CIDEr": [round(h["CIDEr"], 4) for h in history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=Path, help="An existing scene set (default: generate one)")
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="The global batch (every run)")
    parser.add_argument("--threads", type=int, default=2, help="Cores for every run: T threads, or N ranks x T/N")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scenes = args.scenes
        if scenes is None:
            from model_export.data.scenes import generate_scenes

            scenes = root / "scenes"
            generate_scenes(scenes, n_train=args.train, n_val=args.val, n_test=0, seed=0, workers=args.threads,
                            progress=False)
        cache = root / "cache"
        warm = run([sys.executable, *train_args(scenes, root / "warm", cache, 1, args.batch_size, args.threads)], args.threads)
        results = {"scenes": {"train": args.train, "val": args.val}, "global_batch": args.batch_size,
                   "epochs": args.epochs, "threads": args.threads, "cache_and_first_run_s": round(warm, 1), "runs": {}}
        wall = run([sys.executable, *train_args(scenes, root / "one", cache, args.epochs, args.batch_size, args.threads)],
                   args.threads)
        results["runs"]["1 process"] = {"wall_s": round(wall, 1), **epochs_of(root / "one")}
        for n in args.ranks:
            per_rank = max(1, args.threads // n)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                       *train_args(scenes, root / f"ranks{n}", cache, args.epochs, args.batch_size, per_rank)]
            wall = run(command, per_rank)
            results["runs"][f"{n} ranks"] = {"wall_s": round(wall, 1), **epochs_of(root / f"ranks{n}")}

    import torch

    results["environment"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                              "machine": platform.machine()}
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
