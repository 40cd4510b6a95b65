"""The API docs work offline (issue 24, item 10): /docs (Swagger UI) and /redoc reference no external host,
and every script, stylesheet and icon they load comes from the service itself (Swagger UI from the
`swagger-ui-bundle` package, ReDoc's standalone bundle pinned in app/api/static/ with its licence).
`CAPTIONER_DOCS_PUBLIC` says whether they stay public when API keys are on."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

KEY = "docs-test-key-0123456789"


def app_for(tiny_bundle, **settings):
    from app.main import create_app
    from app.settings import Settings

    return create_app(Settings(bundle=tiny_bundle, device="cpu", **settings))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_load_everything_from_the_service(tiny_bundle, page):
    with TestClient(app_for(tiny_bundle)) as c:
        r = c.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        external = re.findall(r"(?:https?:)?//[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+", html)
        assert not external, f"{page} references external hosts: {external}"
        local = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
        local += re.findall(r"""url\s*:\s*['"]([^'"]+)['"]""", html)
        scripts = [u for u in local if u.endswith(".js")]
        assert scripts, f"{page} loads no script of its own: {local}"
        for url in local:
            asset = c.get(url)
            assert asset.status_code == 200, (url, asset.status_code)
            if url.endswith(".js"):
                assert "javascript" in asset.headers["content-type"] and len(asset.content) > 100_000, url
            if url.endswith(".css"):
                assert asset.headers["content-type"].startswith("text/css"), url
        print(page, "loads", local)


def test_the_docs_follow_docs_public_when_keys_are_on(tiny_bundle):
    with TestClient(app_for(tiny_bundle, api_keys=[KEY])) as c:  # default: public
        assert c.get("/docs").status_code == 200
        assert c.get("/openapi.json").status_code == 200
    with TestClient(app_for(tiny_bundle, api_keys=[KEY], docs_public=False)) as c:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path


def test_only_the_known_assets_are_served(tiny_bundle):
    with TestClient(app_for(tiny_bundle)) as c:
        for name in ("../settings.py", "index.j2", "swagger-ui-bundle.js.map", "%2e%2e%2fsettings.py"):
            assert c.get(f"/docs/assets/{name}").status_code == 404, name
