"""Every line the service writes to stderr is one JSON object (issue 24, item 9): uvicorn's own start-up,
shutdown and error lines (loggers `uvicorn`, `uvicorn.error`) go through the service's JSON formatter,
with `captioner serve` and with plain `uvicorn --factory`, and so does a port-in-use error. With several
workers (`captioner serve --workers 2`) the supervisor's lines and every worker's are JSON too, each
naming its process (`pid`), and uvicorn's own access log stays off in the workers."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.live_server import REPO, free_port, service_env

pytestmark = pytest.mark.service


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    bad = []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad.append(line)
    assert not bad, "lines that are not JSON:\n" + "\n".join(bad)
    return records


def run_until_ready_then_stop(command: list[str], env: dict[str, str], port: int) -> str:
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return out


@pytest.mark.parametrize("how", ["captioner serve", "uvicorn --factory", "captioner serve --workers 2"])
def test_start_up_and_shutdown_lines_are_json(tiny_bundle, how):
    port = free_port()
    env = service_env(tiny_bundle, port=port, host="127.0.0.1")
    if how.startswith("captioner serve"):
        command = [sys.executable, "-m", "app.cli", *how.split()[1:]]
    else:
        command = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--port", str(port),
                   "--no-access-log"]
    out = run_until_ready_then_stop(command, env, port)
    records = json_lines(out)
    messages = " | ".join(r["msg"] for r in records)
    print(messages)
    assert any(r["logger"].startswith("uvicorn") and "Started server process" in r["msg"] for r in records), messages
    assert any("Application startup complete" in r["msg"] for r in records), messages
    assert any("Finished server process" in r["msg"] for r in records), messages
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert not [r for r in records if r["logger"] == "uvicorn.access"], "uvicorn's access log is off (ours is on)"
    if how.endswith("--workers 2"):
        assert all("pid" in r for r in records)
        assert any("Started parent process" in r["msg"] for r in records), messages
        assert len({r["pid"] for r in records}) >= 2, "the supervisor's lines and a worker's"
    else:
        assert not [r for r in records if "pid" in r]


@pytest.mark.parametrize("args", [(), ("--workers", "2")])
def test_a_port_in_use_is_one_json_line(tiny_bundle, args):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = service_env(tiny_bundle, port=port, host="127.0.0.1")
        done = subprocess.run([sys.executable, "-m", "app.cli", "serve", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.returncode  # as tests/test_startup_faults.py: a port in use is exit 3
    records = json_lines(done.stderr + done.stdout)
    errors = [r for r in records if r["level"] == "error"]
    print([r["msg"] for r in errors])
    assert any("address already in use" in r["msg"].lower() for r in errors), records
