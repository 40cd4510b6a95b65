"""The benchmark scripts run end to end on tiny inputs and write the report they promise. (No
timing is checked here: the figures are in docs/performance.md.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def run_script(name: str, *args: str, timeout: float = 600) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=BENCH, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_gpu_script_cpu_mode_includes_engine_vs_torch(tmp_path):
    report_path = tmp_path / "gpu.json"
    run_script("gpu.py", "--device", "cpu", "--quick", "--size", "default", "--json", str(report_path))
    report = json.loads(report_path.read_text())
    rates = report["engine_vs_torch"]["images_per_s"]
    assert {"torch_one_at_a_time", "torch_batched", "engine_one_at_a_time", "engine_batched",
            "engine_io_binding_batched"} <= set(rates)
    assert all(v > 0 for v in rates.values())
    # same weights on both sides: the per-image torch reference and the engine agree caption for caption
    assert report["engine_vs_torch"]["same_captions"]["engine"]["vs_torch_one_at_a_time"] == 1.0
    assert report["provider"] == "CPUExecutionProvider"
    assert [r["batching"] for r in report["batcher_c16"]] == [True, False]
    assert set(report["ratios"]) == {"engine_batched / torch_batched", "batching_on / batching_off (c16)"}


def test_preprocess_benchmark(tmp_path):
    report_path = tmp_path / "pre.json"
    run_script("preprocess.py", "--images", "3", "--threads", "1", "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert {"plain_decode_then_resize", "draft_mode_decode", "draft_mode_pool_1_threads"} == set(report["images_per_s"])
    assert report["mean_abs_input_difference_0_to_1"] < 0.02  # draft mode barely changes the model's input


@pytest.mark.parametrize("loadgen", ["python", "wrk"])
def test_http_load_benchmark(tmp_path, loadgen):
    if loadgen == "wrk" and shutil.which("wrk") is None:
        if os.environ.get("REQUIRE_BENCH_TOOLS") == "1":
            pytest.fail("wrk is not installed (apt-get install wrk)")
        pytest.skip("wrk is not installed (apt-get install wrk); the python load generator is tested")
    report_path = tmp_path / "http.json"
    run_script("http_load.py", "--duration", "1", "--concurrency", "1", "2", "--batching-concurrency", "2",
               "--max-batch-images", "2", "--loadgen", loadgen, "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert [r["concurrency"] for r in report["service"]] == [1, 2]
    for point in report["service"] + [report["batching_on"], report["batching_off"]]:
        assert point["requests"] > 0 and point["ok"] == point["requests"], point
        assert set(point["latency_ms"]) == {"p50", "p90", "p95", "p99"}
    assert report["memory_kib_idle"]["VmRSS"] > 0
    assert len(report["ratios"]) == 2


def test_bundles_benchmark_compares_two_bundles(tiny_bundles, tiny_bundle, tmp_path):
    blocks = tiny_bundle
    rows = tiny_bundles(row_layout=True)
    report_path = tmp_path / "bundles.json"
    run_script("bundles.py", "--bundles", str(blocks), str(rows), "--images", "4", "--batch", "2", "--repeat", "3",
               "--runs", "1", "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert [b["format_version"] for b in report["bundles"]] == [2, 1]
    for result in report["bundles"]:
        assert result["batch2_images_per_s"] > 0 and result["one_image_ms"]["p50"] > 0
        assert result["decoding"]["beam_size"] == 3
    assert list(report["ratios"]) == ["tiny-sat 0.0.1 / tiny-sat 0.0.1"]
    assert set(report["ratios"]["tiny-sat 0.0.1 / tiny-sat 0.0.1"]) == {"batch2_images_per_s", "one_image_p50"}


def test_labels_benchmark_times_both_ways(tiny_bundles, tmp_path):
    report_path = tmp_path / "labels.json"
    run_script("labels.py", "--bundle", str(tiny_bundles(labels=True)), "--images", "4", "--batch", "2", "--repeat", "3",
               "--runs", "1", "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert set(report["one_image_ms_p50"]) == set(report["batch2_images_per_s"]) == {"off", "on"}
    assert all(v > 0 for v in report["batch2_images_per_s"].values())
    assert set(report["cost"]) == {"one_image_p50", "batch2_time_per_image", "encoder_batch2"}
    assert all(v > 0 for v in report["encoder_batch2_ms_median"].values())
    assert report["captions_identical"] is True  # labels never change the captions


def test_v2_load_benchmark_compares_the_three_wire_formats(tiny_bundles, tmp_path):
    report_path = tmp_path / "v2_load.json"
    run_script("v2_load.py", "--bundle", str(tiny_bundles(labels=True)), "--seconds", "1", "--warmup", "0.3",
               "--concurrency", "2", "--images", "2", "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert set(report["results"]) == {"v1-multipart", "v2-binary", "v2-json"}
    for row in report["results"].values():
        assert set(row["statuses"]) == {"200"} and row["requests_per_s"] > 0 and row["server_cpu_ms_per_request"] > 0
    sizes = {mode: row["request_bytes"] for mode, row in report["results"].items()}
    assert sizes["v2-json"] > sizes["v2-binary"]  # base64: a third more


def test_bulk_benchmark_runs_local_and_ray(tiny_bundle, tmp_path):
    if os.environ.get("REQUIRE_RAY_TESTS") != "1":
        pytest.importorskip("ray")
    report_path = tmp_path / "bulk.json"
    run_script("bulk.py", "--bundle", str(tiny_bundle), "--images", "8", "--batch", "4", "--actors", "1",
               "--runs", "1", "--json", str(report_path))
    results = json.loads(report_path.read_text())["results"]
    assert set(results) == {"local", "ray_1_actors"}
    for result in results.values():
        assert result["images"] == 8 and result["images_per_s"] > 0 and result["first_records_s"] > 0


def test_odd_files_benchmark(tmp_path):
    """bench/odd_files.py: caption-dir over names that are not UTF-8, a FIFO, a socket and a link to /dev/zero."""
    report_path = tmp_path / "odd.json"
    run_script("odd_files.py", "--files", "14", "--timeout", "120", "--json", str(report_path))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["every_image_captioned_once"] is True and report["non_utf8_names"] == 14
    for result in report["formats"].values():
        assert result["images_once"] == 14 and result["odd_files_ok"] and not result["hung"]
    assert "0 captioned now" in report["formats"]["jsonl"]["resume"]["summary"]


def test_real_photos_benchmark_counts_the_subjects_named(tiny_bundles, tmp_path):
    """bench/real_photos.py: the nine development photos, captioned, each judged by its subject's words."""
    report_path = tmp_path / "photos.json"
    bundle = tiny_bundles(labels=True, label_words=True)
    out = run_script("real_photos.py", "--bundle", str(bundle), "--compare", str(tiny_bundles(labels=True)),
                     "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert len(report) == 2 and all(len(photos) == 9 for photos in report.values())
    for photos in report.values():
        for photo in photos.values():
            assert photo["caption"] and len(photo["labels"]) == 3 and isinstance(photo["named"], bool)
    assert f"{bundle}: subject named in" in out.stdout


def test_label_words_benchmark_on_a_flickr8k_layout(tiny_bundles, tmp_path):
    """bench/label_words.py on a tiny folder in Flickr8k's layout: coverage, precision, captions."""
    from tests.test_data_flickr8k import _make

    data = _make(tmp_path / "flickr8k")
    report_path = tmp_path / "words.json"
    run_script("label_words.py", "--data", str(data), "--split", "val", "--bundle",
               str(tiny_bundles(labels=True, label_words=True)), "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert report["images"] == 1 and report["coverage"] == {"classes_with_words": 9, "classes": 10}
    for threshold in ("0.5", "0.8"):
        block = report[f"top_label_p>={threshold}"]
        assert 0 <= block["captions_naming_it"] <= block["images"] <= 1
        assert block["references"] == 2 * block["images"]  # the val image has two references


def test_frontend_benchmark_measures_cpu_per_request(tmp_path):
    """bench/frontend.py: the service over a stub bundle under load, its CPU per request measured."""
    report_path = tmp_path / "frontend.json"
    # uploads decoded in the decoding pool (by default a small JPEG is decoded on the event loop), so that every
    # kind of thread works: --setting reaches the service
    run_script("frontend.py", "--duration", "1", "--concurrency", "2", "--workers", "1", "2", "--loadgen", "python",
               "--setting", "CAPTIONER_INLINE_DECODE_PIXELS=0", "--json", str(report_path))
    report = json.loads(report_path.read_text())
    assert [run["workers"] for run in report["runs"]] == [1, 2]
    assert report["runs"][0]["memory_kib_idle"]["processes"] == 1
    assert report["runs"][1]["memory_kib_idle"]["processes"] >= 3  # the supervisor and its two workers
    for run in report["runs"]:
        (point,) = run["points"]
        assert point["requests"] > 0 and point["concurrency"] == 2
        # the threads are told apart by their OS names (app/observability/threads.py): each kind did some work
        by_kind = point["cpu_ms_per_request"]
        assert by_kind["event_loop"] > 0 and by_kind["decode"] > 0 and by_kind["engine"] > 0
        assert point["frontend_cpu_ms_per_request"] == pytest.approx(
            point["service_cpu_ms_per_request"] - by_kind["engine"], abs=0.01)
    assert set(report["scaling"]) == {"1", "2"}
