"""Start-up faults, one table: each bad bundle, device or setting stops `python -m app.cli serve` within
seconds with a non-zero exit status and one clear line naming the problem: no traceback, and no path
of the service's own source files (only the operator's own paths, such as the bundle's, appear).

Exit statuses: 2 for an invalid setting (the settings are checked before anything loads), 3 for a
bundle or engine that cannot load and for a port already taken (uvicorn's start-up failure status).

A row with `bundle="repo"` runs against a model repository built for it (CAPTIONER_MODEL_REPOSITORY, no
CAPTIONER_BUNDLE): a copy of the tiny bundle in each folder of `repo`, and the empty folders of
`repo_empty`.

The rows that load a bundle, an engine or a port run the real `python -m app.cli serve` in a subprocess
(tier `service`). The settings-only rows (exit 2) stop before anything loads, so they run the same `serve`
command in-process through typer's CliRunner (tier `unit`), with uvicorn replaced by a trap that fails the
test should the settings ever be accepted; SUBPROCESS_TOO keeps two of them as real subprocesses as well,
so the exit status 2 of the real process stays proven.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support.live_server import REPO, free_port, service_env

SECRET = "tiny-secret"  # an API key too short to accept: the message must not echo it
TIMES: dict[str, float] = {}  # fault id -> seconds to exit, printed at the end of the module
SUBPROCESS_TOO = ("device-tpu", "api-key-too-short", "repository-only-invalid-names")  # also as a real process


def _altered(bundle: Path) -> None:
    with open(bundle / "decoder.onnx", "ab") as f:
        f.write(b"\x00")


def _flipped_byte(bundle: Path) -> None:
    path = bundle / "encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@dataclass
class Fault:
    id: str
    settings: dict = field(default_factory=dict)
    status: int = 3
    expect: tuple[str, ...] = ()  # all on one line of the output
    edit: Callable[[Path], None] | None = None  # how to damage a fresh tiny bundle
    bundle: str = "tiny"  # "tiny", "absent" (a path that does not exist), "empty" (an empty folder) or "repo"
    repo: tuple[str, ...] = ("tiny-sat/0.0.1",)  # bundle="repo": the folders holding a copy of the tiny bundle
    repo_empty: tuple[str, ...] = ()  # bundle="repo": empty folders of the repository
    hold_port: bool = False
    absent: tuple[str, ...] = ()  # must not appear anywhere in the output


FAULTS = [
    # -- the bundle
    Fault("bundle-missing", bundle="absent", expect=("cannot start", "model bundle", "does not exist")),
    Fault("bundle-empty-folder", bundle="empty", expect=("cannot start", "model bundle", "manifest.json")),
    Fault("bundle-file-missing", edit=lambda b: (b / "encoder.onnx").unlink(),
          expect=("cannot start", "encoder.onnx", "missing")),
    Fault("bundle-file-appended", edit=_altered, expect=("cannot start", "decoder.onnx", "sha256 mismatch")),
    Fault("bundle-file-byte-flipped", edit=_flipped_byte, expect=("cannot start", "encoder.onnx", "sha256 mismatch")),
    Fault("bundle-manifest-not-json", edit=lambda b: (b / "manifest.json").write_text("{not json"),
          expect=("cannot start", "manifest.json", "invalid JSON")),
    Fault("bundle-vocab-missing", edit=lambda b: (b / "vocab.json").unlink(), expect=("cannot start", "vocab.json")),
    # -- the device
    Fault("device-cuda-without-cuda", {"device": "cuda"},
          expect=("cannot start", "inference engine error", "device=cuda", "CUDAExecutionProvider")),
    # -- settings
    Fault("device-tpu", {"device": "tpu"}, 2, ("CAPTIONER_DEVICE", "'tpu'")),
    Fault("port-abc", {"port": "abc"}, 2, ("CAPTIONER_PORT", "integer", "'abc'")),
    Fault("port-70000", {"port": "70000"}, 2, ("CAPTIONER_PORT", "65535")),
    Fault("threads-0", {"threads": "0"}, 2, ("CAPTIONER_THREADS",)),
    Fault("log-level-verbose", {"log_level": "verbose"}, 2, ("CAPTIONER_LOG_LEVEL", "'verbose'")),
    Fault("max-upload-negative", {"max_upload_bytes": "-1"}, 2, ("CAPTIONER_MAX_UPLOAD_BYTES",)),
    Fault("max-batch-files-lots", {"max_batch_files": "lots"}, 2, ("CAPTIONER_MAX_BATCH_FILES",)),
    Fault("cors-origins-bad-json", {"cors_origins": "[\"https://a.example\""}, 2,
          ("CAPTIONER_CORS_ORIGINS", "not a JSON list")),
    Fault("decoding-defaults-inconsistent", {"default_beam_size": "2", "default_num_captions": "3"}, 2,
          ("invalid decoding defaults", "num_captions")),
    Fault("api-key-too-short", {"api_keys": SECRET}, 2, ("CAPTIONER_API_KEYS", "16 to 256 characters"),
          absent=(SECRET,)),
    Fault("api-keys-bad-json", {"api_keys": f"[\"{SECRET}-0123456789\""}, 2,
          ("CAPTIONER_API_KEYS", "not a JSON list"), absent=(SECRET,)),
    Fault("api-keys-file-missing", {"api_keys_file": "/nonexistent/captioner/keys"}, 2,
          ("CAPTIONER_API_KEYS_FILE", "cannot read", "No such file")),
    Fault("api-key-hash-malformed", {"api_keys": f"sha256:{'ab' * 31}zz"}, 2,
          ("CAPTIONER_API_KEYS", "sha256:", "64 hexadecimal digits"), absent=("ab" * 31,)),
    Fault("api-key-rate-option-bad", {"api_keys": f"{SECRET}-0123456789 rate=lots"}, 2,
          ("CAPTIONER_API_KEYS", "rate=", "requests per minute"), absent=(SECRET,)),
    Fault("api-key-rate-limit-0", {"api_keys": f"{SECRET}-0123456789", "api_key_rate_limit": "0"}, 2,
          ("CAPTIONER_API_KEY_RATE_LIMIT", "greater than or equal to 1"), absent=(SECRET,)),
    Fault("api-key-rate-limit-without-keys", {"api_key_rate_limit": "60"}, 2,
          ("CAPTIONER_API_KEY_RATE_LIMIT", "need API keys")),
    # -- the model repository (CAPTIONER_MODEL_REPOSITORY)
    Fault("default-model-empty-folder", {"default_model": "emptyname"}, 2,
          ("CAPTIONER_DEFAULT_MODEL", "'emptyname'", "not a model of the repository", "tiny-sat"),
          bundle="repo", repo_empty=("emptyname",)),
    Fault("default-model-dot", {"default_model": "."}, 2, ("CAPTIONER_DEFAULT_MODEL", "'.'", "not a model"),
          bundle="repo"),
    Fault("default-model-dotdot", {"default_model": ".."}, 2, ("CAPTIONER_DEFAULT_MODEL", "'..'", "not a model"),
          bundle="repo"),
    Fault("default-model-version-empty", {"default_model": "tiny-sat:9.9.9"}, 2,
          ("CAPTIONER_DEFAULT_MODEL", "'tiny-sat:9.9.9'", "not a model"), bundle="repo", repo_empty=("tiny-sat/9.9.9",)),
    Fault("repository-only-invalid-names", {}, 2,
          ("CAPTIONER_MODEL_REPOSITORY", "no bundle under a valid name", "_flickr/2.0.0"),
          bundle="repo", repo=("_flickr/2.0.0",)),
    # -- the host
    Fault("port-in-use", status=3, hold_port=True, expect=("address already in use",)),
]

# Paths of the service's own code: never in a start-up message.
CODE_PATHS = (str(REPO / "app"), str(REPO / "captioner"), "site-packages", 'File "', ".py\"", ".py:")


def _bundle_for(fault: Fault, tiny: Path, tmp_path: Path, copy_bundle) -> Path:
    if fault.bundle == "absent":
        return tmp_path / "no-such-bundle"
    if fault.bundle == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if fault.bundle == "repo":
        root = tmp_path / "repo"
        for folder in fault.repo:
            shutil.copytree(tiny, root / folder)
        for folder in fault.repo_empty:
            (root / folder).mkdir(parents=True)
        return root
    if fault.edit is None:
        return tiny
    bundle = copy_bundle(tiny, "damaged")
    fault.edit(bundle)
    return bundle


def test_the_table_covers_the_issue():
    ids = {f.id for f in FAULTS}
    assert len(ids) == len(FAULTS) >= 15
    assert {"bundle-missing", "bundle-file-appended", "device-cuda-without-cuda", "device-tpu", "port-abc"} <= ids


def _check_output(fault: Fault, status: int, output: str) -> None:
    assert status == fault.status, output
    assert "Traceback" not in output, output
    for leak in CODE_PATHS:
        assert leak not in output, (leak, output)
    for text in fault.absent:
        assert text not in output, output
    # one line says it all
    lines = [line for line in output.splitlines() if all(e in line for e in fault.expect)]
    assert lines, f"no line holds all of {fault.expect}:\n{output}"
    assert len(output.splitlines()) <= 8, output  # a few lines, not a dump


def _settings_for(fault: Fault, bundle: Path) -> tuple[dict, socket.socket | None]:
    holder = None
    settings = dict(fault.settings)
    if fault.bundle == "repo":
        settings["model_repository"] = bundle  # service_env then sets no CAPTIONER_BUNDLE
    if fault.hold_port:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        settings["port"] = holder.getsockname()[1]
    settings.setdefault("port", free_port())
    return settings, holder


SETTINGS_ONLY = [f for f in FAULTS if f.status == 2]
PROCESS_ROWS = [f for f in FAULTS if f.status != 2 or f.id in SUBPROCESS_TOO]


@pytest.fixture(scope="module", autouse=True)
def _report_exit_times(request):
    """After the module: the measured exit times (docs/reliability.md quotes them), on the terminal."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if TIMES and reporter is not None:
        slowest = max(TIMES, key=TIMES.__getitem__)
        reporter.write_line(f"start-up faults: {len(TIMES)}; exit times {min(TIMES.values()):.2f}-"
                            f"{TIMES[slowest]:.2f} s (slowest: {slowest})")


@pytest.mark.service
@pytest.mark.parametrize("fault", PROCESS_ROWS, ids=[f.id for f in PROCESS_ROWS])
def test_startup_fault_in_a_real_process(fault: Fault, tiny_bundle: Path, tmp_path: Path, copy_bundle):
    bundle = _bundle_for(fault, tiny_bundle, tmp_path, copy_bundle)
    settings, holder = _settings_for(fault, bundle)
    env = service_env(bundle, **settings)
    started = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "app.cli", "serve"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=60, check=False)
    finally:
        if holder is not None:
            holder.close()
    TIMES[fault.id] = time.perf_counter() - started  # reported, never a pass/fail bound
    _check_output(fault, result.returncode, result.stdout + result.stderr)


@pytest.mark.parametrize("fault", SETTINGS_ONLY, ids=[f.id for f in SETTINGS_ONLY])
def test_settings_fault_in_process(fault: Fault, tiny_bundle: Path, tmp_path: Path, copy_bundle, monkeypatch):
    """The same `serve` command, in-process: an invalid setting must stop it before uvicorn is built."""
    import uvicorn

    def accepted(*args, **kwargs):
        raise AssertionError(f"{fault.id}: the settings were accepted and the server was being built")

    monkeypatch.setattr(uvicorn, "Config", accepted)
    monkeypatch.setattr(uvicorn, "Server", accepted)
    for key in list(os.environ):
        if key.upper().startswith("CAPTIONER_"):
            monkeypatch.delenv(key)
    bundle = _bundle_for(fault, tiny_bundle, tmp_path, copy_bundle)
    settings, _ = _settings_for(fault, bundle)
    env = {k: v for k, v in service_env(bundle, **settings).items() if k.startswith("CAPTIONER_")}
    from app.cli import app_cli

    started = time.perf_counter()
    result = CliRunner().invoke(app_cli, ["serve"], env=env)
    TIMES[fault.id] = time.perf_counter() - started
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # typer.Exit, not a crash
    _check_output(fault, result.exit_code, result.output)


def test_every_row_runs_one_way_or_both():
    assert {f.id for f in SETTINGS_ONLY} | {f.id for f in PROCESS_ROWS} == {f.id for f in FAULTS}
    assert set(SUBPROCESS_TOO) <= {f.id for f in SETTINGS_ONLY}
