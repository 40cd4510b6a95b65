"""The serving side never needs torch: with torch made unimportable, the app is created, loads the
tiny bundle, and captions an image (in a fresh interpreter, so nothing is imported already)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.support.live_server import REPO, image_bytes, service_env

skimage_data = pytest.importorskip("skimage.data")

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("torch", "torchvision", "torchaudio", "model_export")
    attempts = []

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is blocked: the serving side must not import it")
            return None

    sys.meta_path.insert(0, NoTorch())

    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not work")
    attempts.clear()

    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    bundle, image_path = sys.argv[1], sys.argv[2]
    app = create_app(Settings(bundle=bundle, device="cpu", threads=1))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        with open(image_path, "rb") as f:
            r = client.post("/v1/captions", files={"image": ("cat.jpg", f, "image/jpeg")},
                            params={"num_captions": 2})
        batch = client.post("/v1/captions/batch",
                            files=[("images", ("a.jpg", open(image_path, "rb"), "image/jpeg"))])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"status": r.status_code, "body": r.json(), "batch": batch.status_code,
                      "attempts": attempts, "loaded": loaded}))
    """
)


@pytest.mark.service  # starts a subprocess
def test_app_captions_without_torch(tiny_bundle, tmp_path):
    image = tmp_path / "cat.jpg"
    image.write_bytes(image_bytes(skimage_data.chelsea(), "JPEG"))
    script = tmp_path / "no_torch.py"
    script.write_text(SCRIPT, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_bundle), str(image)],
        cwd=REPO, env=service_env(tiny_bundle), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["status"] == 200, out
    assert len(out["body"]["captions"]) == 2 and out["body"]["captions"][0]["text"]
    assert out["batch"] == 200
    assert out["loaded"] == []
    assert out["attempts"] == [], f"the app tried to import {out['attempts']}"
