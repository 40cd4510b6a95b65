"""Admin keys are never rate-limited (issue 24, item 5): CAPTIONER_API_KEY_RATE_LIMIT applies to the API
keys, not to CAPTIONER_ADMIN_API_KEYS (README: Security), even when an admin key is also listed as an API
key with its own `rate=`, so a `load` or `rollback` during an incident never gets 429."""

from __future__ import annotations

from fastapi.testclient import TestClient

API_KEY = "api-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"


def test_admin_keys_are_not_rate_limited(tiny_bundle):
    from app.main import create_app
    from app.settings import Settings

    settings = Settings(bundle=tiny_bundle, device="cpu", api_keys=[API_KEY, f"{ADMIN_KEY} rate=1"],
                        admin_api_keys=[ADMIN_KEY], api_key_rate_limit=1, api_key_rate_burst=1)
    with TestClient(create_app(settings)) as c:
        api = {"Authorization": f"Bearer {API_KEY}"}
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert c.get("/v1/model", headers=api).status_code == 200
        limited = c.get("/v1/model", headers=api)
        assert limited.status_code == 429, "the API key keeps its limit"
        statuses = [c.get("/v1/model", headers=admin).status_code for _ in range(5)]
        assert statuses == [200] * 5, statuses
        r = c.get("/v1/model", headers=admin)
        assert "x-ratelimit-limit" not in r.headers
