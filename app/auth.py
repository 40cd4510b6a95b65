"""Optional API keys: `Authorization: Bearer <key>` on every route but the public ones.

Off unless keys are configured (`CAPTIONER_API_KEYS` and/or `CAPTIONER_API_KEYS_FILE`). When on:

* public, no key needed: `/healthz`, `/readyz` (probes), the demo page `/` and its `/static/` files,
  and the API docs (`/docs`, `/redoc`, `/openapi.json`). `/metrics` is public only with
  `CAPTIONER_METRICS_PUBLIC=true`; by default it needs a key like the API.
* everything else (unknown paths too) needs a valid key. A missing, malformed or wrong key gets the
  same 401 (`unauthorized`, with `WWW-Authenticate: Bearer`): the answer never says which part was
  wrong.
* the check runs before anything reads the request body, so an unauthenticated upload costs
  nothing; the 401 closes the connection when the client was about to send a body.
* keys are compared in constant time: the SHA-256 of the presented key against the SHA-256 of
  every configured key with `hmac.compare_digest`, all of them every time (no early exit that
  would tell which key matched, or how long a key is). Keys never reach a log line.

This is pure ASGI middleware (no torch, no body access): `create_app` adds it inside CORS (so a
browser can read a 401 and preflights work) and outside the body-size limit.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_json, new_request_id
from app.middleware import BODY_METHODS

# Routes that never need a key.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                          "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
METRICS_PATH = "/metrics"

UNAUTHORIZED_MESSAGE = "a valid API key is required: send the header 'Authorization: Bearer <key>'"


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


class APIKeys:
    """The configured keys, kept only as SHA-256 digests; `matches` is constant-time over all keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(_digest(k) for k in keys)
        if not self._digests:
            raise ValueError("no API keys")

    def __len__(self) -> int:
        return len(self._digests)

    def matches(self, presented: bytes) -> bool:
        candidate = _digest(presented)
        found = False
        for digest in self._digests:  # every key, every time
            found |= hmac.compare_digest(candidate, digest)
        return found


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's single `Authorization: Bearer <token>` header, else None."""
    values = [value for key, value in scope.get("headers", ()) if key.lower() == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token or b" " in token:
        return None
    return token


def is_public(path: str, metrics_public: bool = False) -> bool:
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return True
    return metrics_public and path == METRICS_PATH


class APIKeyMiddleware:
    """401 `unauthorized` for a request to a protected route without a valid bearer key."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], metrics_public: bool = False) -> None:
        self.app = app
        self.keys = APIKeys(keys)
        self.metrics_public = metrics_public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_public(scope.get("path", ""), self.metrics_public):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if token is not None and self.keys.matches(token):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # none today; refuse before the handshake
            await send({"type": "websocket.close", "code": 1008})
            return
        rid = scope.get("state", {}).get("request_id") or new_request_id()
        headers = {"WWW-Authenticate": "Bearer"}
        if scope.get("method") in BODY_METHODS:
            headers["Connection"] = "close"  # the body is never read: do not wait for it
        response = error_json(401, "unauthorized", UNAUTHORIZED_MESSAGE, rid, headers=headers)
        await response(scope, receive, send)


def install_auth(app, settings) -> bool:
    """Add `APIKeyMiddleware` to `app` when `settings` configure API keys; True if it did."""
    keys = settings.all_api_keys()
    if not keys:
        return False
    app.add_middleware(APIKeyMiddleware, keys=keys, metrics_public=settings.metrics_public)
    return True


def security_openapi(schema: dict, metrics_public: bool = False) -> dict:
    """Document the bearer scheme: `components.securitySchemes.bearer`, a `security` requirement
    and a 401 answer on every protected operation (used only when keys are configured)."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key of the service (CAPTIONER_API_KEYS / CAPTIONER_API_KEYS_FILE), sent as "
        "`Authorization: Bearer <key>`.",
    }
    for path, item in schema.get("paths", {}).items():
        if is_public(path, metrics_public):
            continue
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            operation["security"] = [{"bearer": []}]
            operation["responses"].setdefault("401", {
                "description": "Missing or invalid API key.",
                "headers": {
                    "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}},
                },
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
            })
    return schema
