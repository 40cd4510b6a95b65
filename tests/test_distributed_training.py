"""`captioner train` under torchrun (issue 28): real ranks (`python -m torch.distributed.run --standalone
--nproc-per-node 2 -m captioner.cli train ...`, Gloo on CPU) on a few generated scenes, against the single
process.

The runs: 46 training images, a global batch of 15 (ranks of 8 and 7 rows; the fourth batch holds one
image, so the second rank runs a row that counts for nothing), 2 epochs, dropout 0. With dropout 0 the
ranks' arithmetic is the single process's (each rank's share of the global mean loss, DDP's averaged
gradients times the ranks), up to the order of float sums: the training loss per epoch agrees within
LOSS_TOLERANCE (relative) and the validation scores, the chosen epoch and the captions are the same. With
dropout the ranks draw their masks from their own random streams (the same distribution, other masks), so
the losses would agree only statistically; that is why these runs set it to 0.

Every test starts torchrun: all are `service` (tests/conftest.py). docs/training.md describes the
CAPTIONER_TEST_FAIL_* hook (model_export/distributed.py) that makes one rank leave mid-epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from captioner.cli import cli
from model_export.data.scenes import generate_scenes
from model_export.features import preprocessing_for
from model_export.images import load_pixels
from model_export.train import caption_loss, greedy_batch, load_checkpoint

pytestmark = pytest.mark.service  # torchrun: real processes

REPO = Path(__file__).resolve().parent.parent
LOSS_TOLERANCE = 1e-5  # relative, per epoch: the float sums of 2 ranks vs 1 process (measured here: under 1e-7)
DIST_TIMEOUT = 20  # --dist-timeout of the failure runs (seconds)
STEPS_PER_EPOCH = 4  # 46 images in global batches of 15
runner = CliRunner()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist-scenes")
    generate_scenes(root, n_train=46, n_val=8, n_test=6, seed=11, workers=1, progress=False)
    return root


def _args(scenes: Path, out: Path, cache: Path, epochs: int, *extra: str) -> list[str]:
    return ["train", "--data", str(scenes / "dataset.json"), "--images", str(scenes), "--out", str(out),
            "--cache", str(cache), "--epochs", str(epochs), "--batch-size", "15", "--dropout", "0", "--val-count", "0",
            "--embed-dim", "32", "--hidden-dim", "64", "--attention-dim", "32", "--patience", "5", "--seed", "3",
            "--no-progress", *extra]


def one_process(scenes: Path, out: Path, cache: Path, epochs: int, *extra: str) -> None:
    result = runner.invoke(cli, _args(scenes, out, cache, epochs, "--threads", "2", *extra))
    assert result.exit_code == 0, result.output


def torchrun(scenes: Path, out: Path, cache: Path, epochs: int, *extra: str, launcher: tuple[str, ...] = (),
             env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Two ranks on this machine (Gloo), one torch thread each."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *launcher,
               "-m", "captioner.cli", *_args(scenes, out, cache, epochs, "--threads", "1", *extra)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTIONER_TEST_FAIL", "TORCHELASTIC"))
             and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    full_env = {**clean, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    # a session of its own: on a timeout the ranks go too, not only torchrun's agent
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"torchrun did not finish within {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


def assert_same_training(reference: Path, run: Path) -> None:
    """Per epoch: the training loss within LOSS_TOLERANCE, the same validation scores; the same chosen epoch."""
    expected, got = history(reference), history(run)
    assert [h["epoch"] for h in got] == [h["epoch"] for h in expected]
    for a, b in zip(expected, got, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= LOSS_TOLERANCE * abs(a["train_loss"]), (a, b)
        assert a["CIDEr"] == pytest.approx(b["CIDEr"], abs=1e-6) and a["BLEU-4"] == pytest.approx(b["BLEU-4"], abs=1e-6)
    chosen = [torch.load(r / "best.pt", map_location="cpu", weights_only=False)["epoch"] for r in (reference, run)]
    assert chosen[0] == chosen[1]


def captions(run: Path, scenes: Path) -> list[list[int]]:
    """Greedy captions of the scene test images by the run's best.pt."""
    model, vocab, _ = load_checkpoint(run / "best.pt")
    data = json.loads((scenes / "dataset.json").read_text())
    paths = [scenes / (img.get("filepath") or "") / img["filename"] for img in data["images"] if img["split"] == "test"]
    pixels = torch.from_numpy(np.stack([load_pixels(p, preprocessing_for(model.backbone)) for p in paths]))
    with torch.no_grad():
        return greedy_batch(model, model.backbone(pixels), vocab.special_ids, 16)


@pytest.fixture(scope="module")
def reference(scenes, tmp_path_factory, feature_cache_dir) -> Path:
    """The single process, 2 epochs (in-process)."""
    run = tmp_path_factory.mktemp("dist-reference")
    one_process(scenes, run, feature_cache_dir, 2)
    return run


def test_two_ranks_train_like_one_process(scenes, reference, tmp_path, feature_cache_dir):
    run = tmp_path / "ranks"
    proc = torchrun(scenes, run, feature_cache_dir, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training(reference, run)
    assert all(h["ranks"] == 2 for h in history(run))
    assert captions(reference, scenes) == captions(run, scenes)
    # rank 0 alone reports: one JSON line per epoch and one "best checkpoint" line
    assert sum(line.startswith('{"epoch"') for line in proc.stdout.splitlines()) == 2, proc.stdout
    assert proc.stdout.count("best checkpoint:") == 1
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("module.") for k in state["decoder"])  # plain module state, not DDP's

    # the self-critical stage on the same 2 ranks: sampling, greedy baseline and reward per rank
    scst = tmp_path / "scst"
    proc = torchrun(scenes, scst, feature_cache_dir, 1, "--self-critical", "--init-checkpoint", str(run / "best.pt"),
                    "--lr", "5e-5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = history(scst)
    assert record["stage"] == "self_critical" and record["ranks"] == 2
    assert np.isfinite(record["train_loss"]) and record["train_cider_greedy"] >= 0 and record["train_cider_sample"] >= 0


def test_resume_a_one_process_checkpoint_on_two_ranks(scenes, reference, tmp_path, feature_cache_dir):
    run = tmp_path / "one-then-two"
    one_process(scenes, run, feature_cache_dir, 1)
    proc = torchrun(scenes, run, feature_cache_dir, 2, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [h.get("ranks", 1) for h in history(run)] == [1, 2]
    assert_same_training(reference, run)


def test_a_failed_rank_stops_the_job_and_resume_completes(scenes, reference, tmp_path, feature_cache_dir):
    # rank 1 exits at the first step of epoch 2: rank 0 stops too, with a clear error, well within the timeout
    run = tmp_path / "failed"
    fail = {"CAPTIONER_TEST_FAIL_RANK": "1", "CAPTIONER_TEST_FAIL_STEP": str(STEPS_PER_EPOCH + 1)}
    started = time.monotonic()
    proc = torchrun(scenes, run, feature_cache_dir, 2, "--dist-timeout", str(DIST_TIMEOUT), env=fail)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert "CAPTIONER_TEST_FAIL_RANK: rank 1 of 2 exits at its training step 5" in proc.stderr
    assert ("error: rank 0 of 2: a collective operation failed" in proc.stderr
            or "error: rank 0 of 2: stopped by torchrun" in proc.stderr), proc.stderr[-3000:]
    print(f"a failed rank stopped the job in {elapsed:.1f} s")  # reported, never a pass/fail bound
    assert [h["epoch"] for h in history(run)] == [1]  # epoch 1's checkpoint, written by the 2 ranks

    # 2 -> 1: the single process resumes the 2 ranks' checkpoint and ends where the uninterrupted run did
    alone = Path(shutil.copytree(run, tmp_path / "then-alone"))
    one_process(scenes, alone, feature_cache_dir, 2, "--resume")
    assert [h.get("ranks", 1) for h in history(alone)] == [2, 1]
    assert_same_training(reference, alone)

    # torchrun --max-restarts with --resume: the first attempt fails the same way, the restart resumes and completes
    restarted = tmp_path / "restarted"
    proc = torchrun(scenes, restarted, feature_cache_dir, 2, "--resume", "--dist-timeout", str(DIST_TIMEOUT),
                    launcher=("--max-restarts", "1"), env=fail)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exits at its training step 5" in proc.stderr
    assert "no checkpoint yet; starting from epoch 1" in proc.stdout
    assert_same_training(reference, restarted)


def test_a_hung_rank_stops_the_job_at_the_collective_timeout(scenes, tmp_path, feature_cache_dir):
    hang = {"CAPTIONER_TEST_FAIL_RANK": "1", "CAPTIONER_TEST_FAIL_STEP": "2", "CAPTIONER_TEST_FAIL_MODE": "hang"}
    started = time.monotonic()
    proc = torchrun(scenes, tmp_path / "hung", feature_cache_dir, 1, "--dist-timeout", "10", env=hang, timeout=180)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert "rank 1 of 2 hangs at its training step 2" in proc.stderr
    assert "error: rank 0 of 2: a collective operation failed" in proc.stderr, proc.stderr[-3000:]
    assert "did not answer within --dist-timeout 10 s" in proc.stderr
    assert "error: rank 1 of 2: stopped by torchrun" in proc.stderr  # the hung rank, stopped by torchrun
    print(f"a hung rank stopped the job in {elapsed:.1f} s")  # the messages above show it was the timeout


def test_one_process_resume_without_a_checkpoint_is_still_an_error(scenes, tmp_path, feature_cache_dir):
    result = runner.invoke(cli, _args(scenes, tmp_path / "none", feature_cache_dir, 1, "--resume"))
    assert result.exit_code == 1 and "no checkpoint to resume from" in result.output


def test_the_ranks_shares_of_the_loss_add_up_to_the_single_process_loss():
    torch.manual_seed(0)
    pad, rows, steps, vocab, positions = 0, 7, 5, 11, 4
    targets = torch.randint(1, vocab, (rows, steps))
    for r, length in enumerate([5, 5, 4, 3, 3, 2, 1]):
        targets[r, length:] = pad
    logits, alphas = torch.randn(rows, steps, vocab), torch.rand(rows, steps, positions)
    whole = caption_loss(logits, alphas, targets, pad, attention_reg=1.0, label_smoothing=0.1)
    totals = (int((targets != pad).sum()), rows * positions)
    shares = [caption_loss(logits[k::2], alphas[k::2], targets[k::2], pad, 1.0, 0.1, totals) for k in range(2)]
    assert float(sum(shares)) == pytest.approx(float(whole), rel=1e-6)
