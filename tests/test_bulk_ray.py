"""`caption-dir --engine ray` on a real Ray cluster started here (`ray start --head` on loopback), with
a pool of model actors: the same records as the local engine, error records for bad files, every
image exactly once, after an actor is killed mid-run and after the driver is killed and rerun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.live_server import REPO, free_port, service_env

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")
IMAGES = 200
COMMON = ("--batch-size", "4", "--no-progress", "--max-length", "40", "--beam-size", "5")


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        if os.environ.get("REQUIRE_RAY_TESTS") == "1" or os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail("Ray is not installed (pip install -e '.[ray]'), and REQUIRE_RAY_TESTS=1 or CI says it must be",
                        pytrace=False)
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def cluster():
    _require_ray()
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = subprocess.run(
        [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus",
         str(os.cpu_count() or 2), "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
        capture_output=True, text=True, timeout=180, env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=180, env=env)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """200 generated images in two folders, two corrupt ones, a text file and an empty file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i in range(IMAGES):
        folder = root / ("day1" if i % 2 else "day2")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)  # a JPEG header, then nothing
    (root / "day1" / "cut.png").write_bytes((root / "day1" / "001.png").read_bytes()[:60])  # truncated
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty.png").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Path:
    return tiny_bundles(labels=True)


def _command(photos: Path, out: Path, bundle: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "captioner.cli", "caption-dir", str(photos), "--out", str(out), "--bundle", str(bundle),
            *COMMON, *extra]


def _run(photos: Path, out: Path, bundle: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_command(photos, out, bundle, *extra), cwd=REPO, env=service_env(bundle),
                          capture_output=True, text=True, timeout=timeout)


def _records(path: Path) -> list[dict]:
    """The whole records of a JSONL output (a killed run may leave a cut last line: not a record)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


@pytest.fixture(scope="module")
def local_records(photos, bundle, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    result = _run(photos, out, bundle)
    assert result.returncode == 1, result.stderr  # 1: the two bad files failed
    return {r["path"]: r for r in _records(out)}


def _check_complete(records: list[dict], local: dict[str, dict]) -> None:
    counts = Counter(r["path"] for r in records)
    assert [p for p, n in counts.items() if n > 1] == [], "an image written twice"
    assert set(counts) == set(local), "images missing or extra"
    for record in records:
        want = local[record["path"]]
        if "error" in want:
            assert record["error"]["code"] == want["error"]["code"]
            continue
        assert [c["text"] for c in record["captions"]] == [c["text"] for c in want["captions"]], record["path"]
        assert [c["score"] for c in record["captions"]] == pytest.approx([c["score"] for c in want["captions"]],
                                                                          abs=1e-4)
        assert [x["class_id"] for x in record["labels"]] == [x["class_id"] for x in want["labels"]]


def test_ray_gives_the_local_engines_records(cluster, photos, bundle, local_records, tmp_path):
    assert len(local_records) == IMAGES + 2
    assert {p for p, r in local_records.items() if "error" in r} == {"broken.jpg", "day1/cut.png"}
    out = tmp_path / "ray.jsonl"
    result = _run(photos, out, bundle, "--engine", "ray", "--ray-address", cluster, "--actors", "2")
    assert result.returncode == 1, result.stderr
    assert f"{IMAGES + 2} images found, 0 already in" in result.stderr and f"{IMAGES} captioned now, 2 failed" in result.stderr
    assert "notes.txt" in result.stderr and "empty.png" in result.stderr  # named as other files, no record
    records = _records(out)
    _check_complete(records, local_records)
    # the documented order: the source's (the same as the local mode's)
    assert [r["path"] for r in records] == list(local_records)
    again = _run(photos, out, bundle, "--engine", "ray", "--ray-address", cluster, "--actors", "2")
    assert f"{IMAGES + 2} already in" in again.stderr and "0 captioned now" in again.stderr
    assert len(_records(out)) == IMAGES + 2


def _wait_for_lines(path: Path, lines: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= lines:
            return
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {lines} lines")


def _actor_pids() -> list[int]:
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in listing.splitlines()
            if "ray::MapWorker" in line and "CaptionActor" in line]


def test_a_killed_actor_is_restarted_and_nothing_is_lost_or_doubled(cluster, photos, bundle, local_records, tmp_path):
    out = tmp_path / "actor-kill.jsonl"
    process = subprocess.Popen(_command(photos, out, bundle, "--engine", "ray", "--ray-address", cluster, "--actors", "2"),
                               cwd=REPO, env=service_env(bundle), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lines(out, 20, process)
        victims = _actor_pids()
        assert victims, "no actor process found"
        os.kill(victims[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, stderr  # the two bad files
    assert victims[0] not in _actor_pids()
    _check_complete(_records(out), local_records)


def test_a_killed_driver_is_resumed_by_the_same_command(cluster, photos, bundle, local_records, tmp_path):
    out = tmp_path / "driver-kill.jsonl"
    command = _command(photos, out, bundle, "--engine", "ray", "--ray-address", cluster, "--actors", "2")
    process = subprocess.Popen(command, cwd=REPO, env=service_env(bundle), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_for_lines(out, 30, process)
        process.kill()  # SIGKILL: no clean-up of any kind
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    written = len(_records(out))
    assert 30 <= written < IMAGES + 2
    rerun = subprocess.run(command, cwd=REPO, env=service_env(bundle), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr
    assert f"{written} already in" in rerun.stderr, rerun.stderr
    _check_complete(_records(out), local_records)
