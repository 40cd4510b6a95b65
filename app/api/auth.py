"""Optional API keys: `Authorization: Bearer <key>` on every route but the public ones.

Off unless keys are configured (`CAPTIONER_API_KEYS` and/or `CAPTIONER_API_KEYS_FILE`). When on:

* public, no key needed: `/healthz`, `/readyz`, `/v2/health/live`, `/v2/health/ready` (probes), the demo
  page `/` and its `/static/` files, and, unless `CAPTIONER_DOCS_PUBLIC=false`, the API docs (`/docs`,
  `/redoc`, their `/docs/assets/`, `/openapi.json`). `/metrics` is public only with
  `CAPTIONER_METRICS_PUBLIC=true`; by default it needs a key like the API.
* everything else (unknown paths too) needs a valid key. A missing, malformed or wrong key gets the
  same 401 (`unauthorized`, with `WWW-Authenticate: Bearer`): the answer never says which part was
  wrong.
* the check runs before anything reads the request body, so an unauthenticated upload costs
  nothing; the 401 closes the connection when the client was about to send a body.
* keys are compared in constant time: the SHA-256 of the presented key against the SHA-256 of
  every configured key with `hmac.compare_digest`, all of them every time (no early exit that
  would tell which key matched, or how long a key is). Keys never reach a log line. An entry may
  give the SHA-256 itself (`sha256:<64 hex digits>`, app/security/keys.py has the syntax), so the
  service need not hold the key at all.
* the keys file is re-read when it changes (`KeyStore`): a task of the lifespan checks its stat
  (resolved path, device, inode, size, mtime, ctime: a Kubernetes Secret volume's `..data` symlink
  swap changes the resolved path) once a second and re-reads it in a worker thread when it changed.
  A file that became unreadable or invalid changes nothing: the keys in use stay, one warning is
  logged per bad version (never a key) and counted in `captioner_api_keys_reloads_total{result="error"}`;
  the next valid version is picked up (an info line with the number of keys, `result="ok"`).
* admin keys (`CAPTIONER_ADMIN_API_KEYS`, `admin_keys`): the model swap routes
  (app/api/routes/models.py) check for one of them with the same constant-time comparison; they are
  accepted as API keys too. Without them those routes answer 403 `admin_disabled`.
* optional rate limits per key (app/security/ratelimit.py, a token bucket by key digest; never for an admin
  key, whatever its entries say): a key over its limit gets 429 `rate_limited` with `Retry-After`, before
  the body is read; every answer to a request of a key with a limit carries `X-RateLimit-Limit`,
  `X-RateLimit-Remaining` and `X-RateLimit-Reset`.

This is pure ASGI middleware (no torch, no body access): `create_app` adds it inside CORS (so a
browser can read a 401 and preflights work) and outside the body-size limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import BODY_METHODS, error_json, new_request_id
from app.observability.logs import service_log
from app.observability.metrics import Metrics
from app.security.keys import key_digest, parse_entry, read_keys_file
from app.security.ratelimit import LIMIT_HEADER, REMAINING_HEADER, RESET_HEADER, RateLimit, TokenBuckets

# Routes that never need a key.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/favicon.ico", "/v2/health/live", "/v2/health/ready"})
PUBLIC_PREFIXES = ("/static/",)
# The API docs (app/api/routes/docs.py): public unless CAPTIONER_DOCS_PUBLIC=false.
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
DOCS_PREFIX = "/docs/assets/"
METRICS_PATH = "/metrics"

UNAUTHORIZED_MESSAGE = "a valid API key is required: send the header 'Authorization: Bearer <key>'"
RELOAD_INTERVAL_S = 1.0  # how often the keys file's stat is checked
# Response headers a browser may read cross-origin (CORS expose_headers): the rate-limit ones.
EXPOSED_AUTH_HEADERS = ("Retry-After", LIMIT_HEADER, REMAINING_HEADER, RESET_HEADER)


class APIKeys:
    """The configured keys, kept only as SHA-256 digests, with each key's rate limit; `identify` and
    `matches` are constant-time over all keys.

    `entries`: key entries (app/security/keys.py: a key or `sha256:<hex>`, optional `rate=` / `burst=`);
    ValueError for an invalid one. A key listed twice counts once, with its first entry's options.
    `rate_limit` / `rate_burst`: CAPTIONER_API_KEY_RATE_LIMIT / _BURST, for entries that give none.
    `unlimited`: entries never limited whatever an entry says (the admin keys)."""

    def __init__(self, entries: Iterable[str], rate_limit: int | None = None, rate_burst: int | None = None,
                 unlimited: Iterable[str] = ()) -> None:
        exempt = {parse_entry(text).digest for text in unlimited}
        digests: list[bytes] = []
        self._limits: dict[bytes, RateLimit | None] = {}
        for text in entries:
            entry = parse_entry(text)
            if entry.digest in self._limits:
                continue
            digests.append(entry.digest)
            per_minute = entry.rate if entry.rate is not None else rate_limit
            self._limits[entry.digest] = (RateLimit(per_minute, entry.burst or rate_burst or per_minute)
                                          if per_minute and entry.digest not in exempt else None)
        if not digests:
            raise ValueError("no API keys")
        self._digests = tuple(digests)
        self.limited = frozenset(d for d, limit in self._limits.items() if limit is not None)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, presented: bytes) -> bytes | None:
        """The digest of the presented key if it is a configured one, else None. Every configured
        digest is compared every time; on a match the presented key's own digest *is* the key's id,
        so nothing depends on which entry matched."""
        candidate = key_digest(presented)
        found = False
        for digest in self._digests:  # every key, every time
            found |= hmac.compare_digest(candidate, digest)
        return candidate if found else None

    def matches(self, presented: bytes) -> bool:
        return self.identify(presented) is not None

    def limit_for(self, digest: bytes) -> RateLimit | None:
        """The rate limit of an identified key (None: unlimited)."""
        return self._limits.get(digest)


def _file_state(path: Path) -> tuple[Any, ...]:
    """What changes when the file does: its resolved path (a Kubernetes `..data` symlink swap), device,
    inode (a file renamed over it), size, mtime and ctime (an edit in place). OSError if it is gone."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class KeyStore:
    """The keys in use (`current`): the environment's entries plus the keys file's, re-read when the
    file changes (`check`, run once a second by the task `start` creates in the lifespan).

    A change is picked up within about RELOAD_INTERVAL_S (plus one interval when the file was still
    being written: it is read only when its stat is the same before and after the read)."""

    def __init__(self, env_entries: Iterable[str], path: Path | None = None, *, rate_limit: int | None = None,
                 rate_burst: int | None = None, metrics: Metrics | None = None,
                 fallback_file_entries: Iterable[str] = (), unlimited: Iterable[str] = ()) -> None:
        self.path = path
        self._env = list(env_entries)
        self._unlimited = list(unlimited)  # the admin keys: never rate-limited
        self._rate = (rate_limit, rate_burst)
        self.metrics = metrics
        self._loaded: tuple[Any, ...] | None = None  # the file state whose keys are in use
        self._failed: tuple[Any, ...] | None = None  # the last file state that could not be used
        self._task: asyncio.Task[None] | None = None
        self.current = self._build([])
        if path is not None:
            try:
                state, keys = self._read()
                self._loaded, self.current = state, keys
            except (OSError, ValueError):  # changed since the settings read it: use what they read
                self.current = self._build(fallback_file_entries)
        if metrics is not None:
            metrics.api_keys.set(len(self.current))

    def _build(self, file_entries: Iterable[str]) -> APIKeys:
        if not (self._env or file_entries):
            return _NO_KEYS
        return APIKeys([*self._env, *file_entries], *self._rate, unlimited=self._unlimited)

    def _read(self) -> tuple[tuple[Any, ...], APIKeys]:
        """(the file's state, the keys): ValueError if the file is unreadable or invalid, or changed
        while being read (then the next check reads it again)."""
        assert self.path is not None
        before = _file_state(self.path)
        entries = read_keys_file(self.path)
        if _file_state(self.path) != before:
            raise _Changing()
        return before, self._build(entries)

    def check(self) -> str | None:
        """Re-read the keys file if it changed: "ok" (new keys in use), "error" (the keys in use stay)
        or None (unchanged, already refused, or still being written)."""
        if self.path is None:
            return None
        try:
            state = _file_state(self.path)
        except OSError as exc:
            state = ("unreadable", exc.errno)
            if state == self._failed:
                return None
            return self._refuse(state, f"cannot read the API keys file: {exc.strerror or type(exc).__name__}")
        if state in (self._loaded, self._failed):
            return None
        try:
            state, keys = self._read()
        except _Changing:
            return None
        except OSError:
            return None  # removed between two stats: the next check says so
        except ValueError as exc:
            return self._refuse(state, str(exc))
        self._loaded, self._failed, self.current = state, None, keys
        if self.metrics is not None:
            self.metrics.api_key_reloads.labels("ok").inc()
            self.metrics.api_keys.set(len(keys))
        service_log.info("API keys reloaded from the keys file: %d in use", len(keys),
                         extra={"fields": {"keys": len(keys), "path": str(self.path)}})
        return "ok"

    def _refuse(self, state: tuple[Any, ...], reason: str) -> str:
        self._failed = state
        if self.metrics is not None:
            self.metrics.api_key_reloads.labels("error").inc()
        # `reason` comes from app/security/keys.py: a line number and what is wrong, never a key
        service_log.warning("the API keys file changed but cannot be used (%s); the %d keys in use stay until a valid "
                            "version appears", reason, len(self.current),
                            extra={"fields": {"keys": len(self.current), "path": str(self.path)}})
        return "error"

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.check)
            except Exception as exc:  # never let the watcher die: the keys in use stay
                service_log.error("checking the API keys file failed (%s)", type(exc).__name__)

    def start(self, interval: float = RELOAD_INTERVAL_S) -> None:
        """Watch the keys file (from the lifespan: needs the running event loop). No file: nothing to do."""
        if self.path is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(interval), name="captioner-api-keys")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Changing(ValueError):
    """The keys file changed while it was read."""


class _NoKeys(APIKeys):
    """No key at all (only while a KeyStore is being built)."""

    def __init__(self) -> None:
        self._digests = ()
        self._limits = {}
        self.limited = frozenset()


_NO_KEYS = _NoKeys()


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


def is_public(path: str, metrics_public: bool = False, docs_public: bool = True) -> bool:
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return True
    if docs_public and (path in DOCS_PATHS or path.startswith(DOCS_PREFIX)):
        return True
    return metrics_public and path == METRICS_PATH


class APIKeyMiddleware:
    """401 `unauthorized` for a request to a protected route without a valid bearer key; 429
    `rate_limited` for a valid key over its rate limit."""

    def __init__(self, app: ASGIApp, store: KeyStore, metrics_public: bool = False,
                 metrics: Metrics | None = None, docs_public: bool = True) -> None:
        self.app = app
        self.store = store
        self.metrics_public = metrics_public
        self.docs_public = docs_public
        self.metrics = metrics
        self.buckets = TokenBuckets()
        self._keys_seen: APIKeys | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_public(scope.get("path", ""), self.metrics_public,
                                                                     self.docs_public):
            await self.app(scope, receive, send)
            return
        keys = self.store.current  # one snapshot for the whole check (a reload swaps it whole)
        token = bearer_token(scope)
        digest = keys.identify(token) if token is not None else None
        if digest is None:
            await self._refuse(scope, receive, send, 401, "unauthorized", UNAUTHORIZED_MESSAGE,
                               {"WWW-Authenticate": "Bearer"})
            return
        limit = keys.limit_for(digest)
        if limit is None:
            await self.app(scope, receive, send)
            return
        if keys is not self._keys_seen:  # the keys changed: forget the buckets of keys now gone
            self.buckets.retain(keys.limited)
            self._keys_seen = keys
        decision = self.buckets.take(digest, limit)
        headers = decision.headers()
        if not decision.allowed:
            if self.metrics is not None:
                self.metrics.rate_limited.inc()
            await self._refuse(scope, receive, send, 429, "rate_limited",
                               f"this API key's rate limit ({limit.per_minute} requests per minute) is used up; "
                               f"retry after {decision.retry_after_s} s",
                               {"Retry-After": str(decision.retry_after_s), **headers})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_limits)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str,
                      headers: dict[str, str]) -> None:
        if scope["type"] == "websocket":  # none today; refuse before the handshake
            await send({"type": "websocket.close", "code": 1008})
            return
        rid = scope.get("state", {}).get("request_id") or new_request_id()
        if scope.get("method") in BODY_METHODS:
            headers = {**headers, "Connection": "close"}  # the body is never read: do not wait for it
        response = error_json(status, code, message, rid, headers=headers)
        await response(scope, receive, send)


def install_auth(app, settings, metrics: Metrics | None = None) -> KeyStore | None:
    """Add `APIKeyMiddleware` to `app` when `settings` configure API keys; returns their `KeyStore`
    (`ServiceState.api_keys`, app/api/state.py: the lifespan starts and stops their file's watch), or
    None: no keys, the API is open."""
    if not settings.all_api_keys():
        return None
    admin = [k.get_secret_value() for k in settings.admin_api_keys]
    store = KeyStore(  # an admin key (CAPTIONER_ADMIN_API_KEYS) is an API key too, never rate-limited
        [*(k.get_secret_value() for k in settings.api_keys), *admin], settings.api_keys_file,
        rate_limit=settings.api_key_rate_limit, rate_burst=settings.api_key_rate_burst, metrics=metrics,
        fallback_file_entries=settings.all_api_keys()[len(settings.api_keys):],  # the file's, as read at start-up
        unlimited=admin,
    )
    app.add_middleware(APIKeyMiddleware, store=store, metrics_public=settings.metrics_public, metrics=metrics,
                       docs_public=settings.docs_public)
    return store


def admin_keys(settings) -> APIKeys | None:
    """The keys of the admin routes (CAPTIONER_ADMIN_API_KEYS, compared like the API keys), or None:
    the admin routes are off (403 admin_disabled)."""
    entries = [k.get_secret_value() for k in settings.admin_api_keys]
    return APIKeys(entries) if entries else None


def _integer_header(description: str, minimum: int = 0) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "integer", "minimum": minimum}}


RATE_LIMIT_HEADERS = {
    LIMIT_HEADER: _integer_header("The API key's rate limit, requests per minute (only for a key with a limit)."),
    REMAINING_HEADER: _integer_header("Requests this key may send right now (only for a key with a limit)."),
    RESET_HEADER: _integer_header("Seconds until this key's full burst is available again (only for a key with a "
                                  "limit)."),
}


def security_openapi(schema: dict, metrics_public: bool = False) -> dict:
    """Document the bearer scheme: `components.securitySchemes.bearer`, a `security` requirement,
    a 401 and a 429 answer, and the rate-limit headers on every protected operation (used only when
    keys are configured: a key may get a rate limit from the keys file at any time)."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key of the service (CAPTIONER_API_KEYS / CAPTIONER_API_KEYS_FILE), sent as "
        "`Authorization: Bearer <key>`.",
    }
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in schema.get("paths", {}).items():
        if is_public(path, metrics_public):
            continue
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            operation["security"] = [{"bearer": []}]
            responses = operation["responses"]
            for response in responses.values():  # any answer to a key with a limit carries them
                response.setdefault("headers", {}).update(RATE_LIMIT_HEADERS)
            responses.setdefault("401", {
                "description": "Missing or invalid API key.",
                "headers": {
                    "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}},
                },
                "content": error_body,
            })
            responses.setdefault("429", {
                "description": "The API key is over its rate limit (CAPTIONER_API_KEY_RATE_LIMIT, or the key's "
                "`rate=` in the keys file); retry after the Retry-After header's seconds. Answered before the "
                "request body is read.",
                "headers": {
                    "Retry-After": {**_integer_header("Seconds until this key may send a request again.", 1),
                                    "required": True},
                    **{name: {**header, "required": True} for name, header in RATE_LIMIT_HEADERS.items()},
                },
                "content": error_body,
            })
    return schema
