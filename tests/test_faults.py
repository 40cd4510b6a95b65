"""bench/faults.py's scenarios, small, against the real service: overload, deadline, soak, SIGTERM
and disconnects behave as promised (docs/reliability.md has the full-size figures). Only
behaviour is checked, never a timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("faults") / "faults.json"
    out = subprocess.run(
        # the deadline burst (12 x 16 images in 0.5 s) is far more than a CPU captions in time, while one
        # image alone still fits
        [sys.executable, str(BENCH / "faults.py"), "--queue-capacity", "4", "--soak-requests", "400",
         "--deadline-s", "0.5", "--deadline-requests", "12",
         "--soak-warmup", "100", "--sigterm-jobs", "3", "--disconnect-clients", "3", "--json", str(path)],
        cwd=BENCH, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(path.read_text())


def test_overload_refuses_the_excess_with_retry_after_and_recovers(report):
    o = report["overload"]
    assert o["other_statuses"] == 0, o["statuses"]  # only 200 and 503
    assert o["statuses"].get("200", 0) >= 1 and o["statuses"].get("503", 0) >= 1
    assert o["refused_with_retry_after"] == o["statuses"]["503"]
    assert o["after_overload_statuses"] == [200, 200, 200] and o["service_alive"]
    deadline = o["deadline"]
    assert set(deadline["statuses"]) <= {"200", "504"} and "504" in deadline["statuses"]
    # afterwards it captions again: at most the batch it had started, whose requests gave up, is
    # still finishing (a 504 or two on a busy machine), then a 200
    after = deadline["after_statuses"]
    assert after[-1] == 200 and set(after) <= {200, 504}, after


def test_soak_has_no_unexpected_errors(report):
    s = report["soak"]
    assert s["requests"] == 400 and s["statuses"] == {"200": 400} and s["unexpected_5xx"] == 0
    assert s["rss_kib_end"] > 0


def test_sigterm_finishes_accepted_requests_refuses_new_ones_and_exits_0(report):
    t = report["sigterm"]
    assert t["statuses"] == {"200": 3}
    assert all(status == "ConnectError" for status in t["new_requests_after_signal"])
    assert t["exit_code"] == 0


def test_clients_that_hang_up_free_their_places(report):
    d = report["disconnect"]
    assert d["client_gone"] >= 1  # withdrawn from the queue while the long jobs ran
    assert d["queued_images_at_end"] == 0
    assert d["long_job_statuses"] == {"200": 3}
    assert d["after_statuses"] == [200] and d["service_alive"] and d["server_errors_logged"] == 0
