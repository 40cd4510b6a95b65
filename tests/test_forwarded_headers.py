"""Forwarded headers are trusted only from configured proxies (issue 24, item 11): by default a peer's
`X-Forwarded-For` never becomes the access log's `client` (not even from 127.0.0.1, which uvicorn trusts
on its own); with `CAPTIONER_FORWARDED_ALLOW_IPS` naming the peer, the header's client is logged."""

from __future__ import annotations

import json
import time

import pytest


def logged_client(server, request_id: str) -> str:
    for _ in range(50):
        for line in server.log().splitlines():
            if line.startswith("{") and request_id in line:
                record = json.loads(line)
                if record.get("logger") == "captioner.access":
                    return record["client"]
        time.sleep(0.1)
    raise AssertionError(f"no access line for {request_id}:\n{server.log()}")


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return tiny_bundles(max_length=6)


def test_forwarded_for_is_ignored_by_default(bundle, start_server):
    server = start_server(bundle, log_name="untrusting")
    with server.client() as c:
        assert c.get("/healthz", headers={"X-Forwarded-For": "6.6.6.6", "X-Request-ID": "xff-default"}).status_code == 200
    assert logged_client(server, "xff-default") == "127.0.0.1"


def test_forwarded_for_is_used_from_a_configured_proxy(bundle, start_server):
    server = start_server(bundle, log_name="trusting", forwarded_allow_ips="127.0.0.1/32")
    with server.client() as c:
        c.get("/healthz", headers={"X-Forwarded-For": "6.6.6.6", "X-Request-ID": "xff-trusted"})
        # a client's own header before the proxy's entry is not believed: the last untrusted hop is
        c.get("/healthz", headers={"X-Forwarded-For": "1.2.3.4, 7.7.7.7", "X-Request-ID": "xff-chain"})
    assert logged_client(server, "xff-trusted") == "6.6.6.6"
    assert logged_client(server, "xff-chain") == "7.7.7.7"


def test_the_setting_reaches_uvicorn_and_is_checked(tiny_bundle):
    from app.cli import uvicorn_config
    from app.settings import SettingsError, load_settings

    off = uvicorn_config(object(), load_settings(bundle=tiny_bundle))
    assert off.proxy_headers is False
    on = uvicorn_config(object(), load_settings(bundle=tiny_bundle, forwarded_allow_ips="10.0.0.0/8, 192.168.1.7"))
    assert on.proxy_headers is True and on.forwarded_allow_ips == "10.0.0.0/8,192.168.1.7"
    with pytest.raises(SettingsError, match="CAPTIONER_FORWARDED_ALLOW_IPS"):
        load_settings(bundle=tiny_bundle, forwarded_allow_ips="balancer.local")
