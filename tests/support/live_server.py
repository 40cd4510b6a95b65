"""Run the real service (uvicorn via `python -m app.cli serve`) on 127.0.0.1 for tests."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.error_bodies import check_error_response

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, process: subprocess.Popen, port: int, log_path: Path):
        self.process = process
        self.port = port
        self.host = "127.0.0.1"
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def client(self, **kwargs) -> httpx.Client:
        """An httpx client of the server; every JSON error body it receives is checked to show no path of
        this machine (tests/support/error_bodies.py)."""
        hooks = dict(kwargs.pop("event_hooks", None) or {})
        hooks["response"] = [*hooks.get("response", []), check_error_response]
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), event_hooks=hooks, **kwargs)


def service_env(bundle: Path, **settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CAPTIONER_")}
    if "model_repository" not in settings:  # a repository replaces the single bundle
        env["CAPTIONER_BUNDLE"] = str(bundle)
    env["CAPTIONER_DEVICE"] = "cpu"
    env["CAPTIONER_THREADS"] = "1"
    for key, value in settings.items():
        env[f"CAPTIONER_{key.upper()}"] = str(value)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextmanager
def live_server(bundle: Path, log_path: Path, startup_timeout: float = 60.0, args: Sequence[str] = (),
                **settings: object) -> Iterator[LiveServer]:
    """Start `python -m app.cli serve [args]` on a free port and wait for /readyz; stop it afterwards.
    With several workers (`workers=N` or `--workers N` in `args`) the server is the leader of a process group
    of its own, so that a server that must be killed takes its workers with it."""
    port = free_port()
    env = service_env(bundle, port=port, host="127.0.0.1", **settings)
    log_file = open(log_path, "wb")
    several = int(str(settings.get("workers", 1))) > 1 or "--workers" in args
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", *args],
        cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=several,
    )
    server = LiveServer(process, port, log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not become ready in {startup_timeout} s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                if several:
                    os.killpg(process.pid, signal.SIGKILL)
                process.kill()
                process.wait()
        log_file.close()


def partial_upload(host: str, port: int, target: str, headers: str = "", filename: str = "a.png") -> tuple[bytes, bytes]:
    """Declare a 10 MB multipart upload to `target`, send the headers and 64 KB only, and read the answer:
    (status line and headers, body). An answer at all shows the server did not wait for the body: had it,
    the socket's 10 s timeout would end the read with nothing."""
    head = (f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary=XyZ\r\n{headers}"
            f"Content-Length: {10 * 1000 * 1000}\r\n\r\n").encode()
    part = f'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n\r\n'.encode()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head + part + b"\x00" * 65536)
        data = b""
        while not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_text, _, body = data.partition(b"\r\n\r\n")
    return head_text, body


def image_bytes(array, fmt: str, **save_args) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **save_args)
    return buf.getvalue()
