"""The service's settings: one pydantic-settings class, read from `CAPTIONER_*` environment variables.

Every setting is documented in the README (section Serving). Invalid values are a start-up
error: `load_settings()` turns pydantic's ValidationError into a `SettingsError` whose message names
each bad variable, and the CLI / app factory exit non-zero with it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.inference.bundle import MAX_LABELS, scan_repository
from app.inference.decoding import (
    MAX_BEAM_SIZE,
    MAX_CONSTRAINTS,
    MAX_LENGTH_LIMIT,
    MAX_LENGTH_PENALTY,
    MAX_NO_REPEAT_NGRAM_SIZE,
    DecodingConfig,
    Guide,
    Strategy,
)
from app.security.keys import HASH_PREFIX, MAX_API_KEY_LENGTH, MAX_RATE, MIN_API_KEY_LENGTH, entry_problem, read_keys_file

if TYPE_CHECKING:  # pragma: no cover
    from app.inference.bundle import RecommendedDecoding

ENV_PREFIX = "CAPTIONER_"
MiB = 1024 * 1024
# Settings whose values are secrets: never echoed in an error message.
SECRET_FIELDS = frozenset({"api_keys", "admin_api_keys"})
# Most HTTP worker processes (`workers`): far more than any node's cores would use well.
MAX_WORKERS = 64
# `captioner serve --workers N` hands its workers the control folder (app/serving/control.py) in this
# variable: a CAPTIONER_* variable that is no setting, but is expected (never warned about).
CONTROL_DIR_ENV = "CAPTIONER_CONTROL_DIR"
INTERNAL_VARIABLES = frozenset({CONTROL_DIR_ENV})

log = logging.getLogger("captioner.settings")


class SettingsError(Exception):
    """The configuration is invalid; the message lists every problem, one per line."""


class Settings(BaseSettings):
    """Configuration of the HTTP service (and `captioner caption`)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    # --- model and execution ---
    bundle: Path = Field(Path("models/default"), description="Path of the model bundle folder (a model repository "
                         "of one; not together with model_repository).")
    model_repository: Path | None = Field(
        None, description="A folder of bundles as <name>/<version>/ (each a bundle folder whose manifest names that "
        "model and version). Each name's newest version is loaded at start-up; `?model=name[:version]` picks one, "
        "`POST /v1/models/{name}/load` swaps versions (README: Model versions). Unset: serve `bundle` alone.",
    )
    default_model: str | None = Field(
        None, description="The model a request without `?model=` gets: a name of the repository, or name:version to "
        "start on that version. Unset: the first name in alphabetical order.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="Execution device. auto: CUDA when onnxruntime can load it, else CPU (with a warning); "
        "cuda: refuse to start without CUDA; cpu: CPU only.",
    )
    threads: int | None = Field(
        None, ge=1, le=1024, description="onnxruntime intra-op threads per session; unset = onnxruntime's default "
        "(with workers > 1: the CPUs divided among the workers, at least 1 each)."
    )
    workers: int = Field(
        1, ge=1, le=MAX_WORKERS, description="HTTP worker processes on the one port, each a whole service (its own "
        "model registry, batcher and onnxruntime engine), under a supervisor that replaces a worker that dies "
        "(docs/scale.md). Only `captioner serve`. 1: one process, no supervisor.",
    )

    # --- HTTP server ---
    host: str = Field("127.0.0.1", min_length=1, description="Interface to bind (the container sets 0.0.0.0).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the service's JSON logs and of uvicorn."
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (uvicorn's forwarded_allow_ips): "
        "IP addresses or networks (CIDR), comma-separated, or '*' for any peer (only when nothing but the proxy can "
        "reach the service). Empty: none; the client is always the connection's peer. Only `captioner serve`.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed by CORS, comma-separated (or a JSON list); '*' allows any. Empty: CORS off.",
    )

    # --- limits ---
    max_upload_bytes: int = Field(
        10 * MiB,
        ge=1,
        description="Largest accepted image file in bytes. A request body is refused (413) once it exceeds "
        "this (times max_batch_files for the batch endpoint) plus 64 KiB for the multipart framing.",
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest accepted image in pixels (width x height), checked from the header."
    )
    max_batch_files: int = Field(16, ge=1, le=256, description="Most files in one /v1/captions/batch request.")
    max_inflight_body_bytes: int | None = Field(
        None, ge=1, description="Most bytes of request bodies held at once, over all requests in flight (a body "
        "counts from its Content-Length, or as a chunked body streams, until its request is answered). A request "
        "that would pass it gets 503 overloaded with Retry-After, before its body is read. Unset: an eighth of the "
        "memory the process may use (the cgroup's limit, else the machine's RAM), at least the largest request body.",
    )

    # --- dynamic batching and load (README: Performance) ---
    batching: bool = Field(
        True, description="Dynamic batching: requests waiting together share one engine call (one encoder call and "
        "one decoder call per step for all their beams). false: one request per engine call."
    )
    max_batch_images: int = Field(32, ge=1, le=1024, description="Most images in one engine call.")
    max_queue_delay_ms: float = Field(
        5.0, ge=0.0, le=1000.0, description="When the engine is idle, how long the first waiting request may wait "
        "for others to join its batch (milliseconds)."
    )
    max_queue_images: int = Field(
        256, ge=1, le=100_000, description="Most images waiting for the engine; past it requests get 503 with Retry-After."
    )
    request_timeout_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="Deadline of a captioning request from its arrival; past it, 504."
    )
    body_timeout_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="Deadline of a request's body from the request's arrival: a body "
        "not complete by then gets 408 request_timeout and the connection is closed (a slow or stalled upload "
        "cannot hold a connection and its bytes for ever)."
    )
    max_connections: int = Field(
        1000, ge=1, le=1_000_000, description="Most connections and requests uvicorn holds at once "
        "(limit_concurrency); past it a new one gets uvicorn's plain 503. Only `captioner serve`."
    )
    keep_alive_s: int = Field(
        5, ge=1, le=300, description="Seconds an idle keep-alive connection stays open (uvicorn's "
        "timeout_keep_alive). Only `captioner serve`."
    )
    preprocess_threads: int | None = Field(
        None, ge=1, le=256, description="Threads decoding and resizing uploads; unset = half the CPUs (at least 1, at most 8)."
    )
    inline_decode_pixels: int = Field(
        1_000_000, ge=0, le=1_000_000_000,
        description="Sequential (non-progressive) JPEG uploads of at most this many pixels (width x height, from "
        "the header) are decoded on the event loop rather than handed to the decoding threads: for them the "
        "hand-over costs more CPU than it saves (docs/performance.md, section 12). Larger or progressive JPEGs "
        "and every other format go to the threads. 0 = every upload to the threads."
    )

    # --- decoding defaults (each can be overridden per request) ---
    # (bounds: app/inference/decoding.py's limits; the combination is checked by DecodingConfig below)
    default_strategy: Strategy = Field("beam", description="Default decoding strategy.")
    default_beam_size: int = Field(3, ge=1, le=MAX_BEAM_SIZE, description=f"Default beam size (1-{MAX_BEAM_SIZE}).")
    default_num_captions: int = Field(
        1, ge=1, le=MAX_BEAM_SIZE, description="Default number of captions returned (<= beam size)."
    )
    default_max_length: int | None = Field(
        None, ge=1, le=MAX_LENGTH_LIMIT,
        description=f"Default most words per caption (1-{MAX_LENGTH_LIMIT}); unset = the bundle's max_length.",
    )
    default_length_penalty: float | None = Field(
        None, ge=0.0, le=MAX_LENGTH_PENALTY,
        description=f"Default length penalty (0-{MAX_LENGTH_PENALTY:g}); 0 ranks by total log-probability; "
        "unset = the bundle's recommendation (else 0).",
    )
    default_no_repeat_ngram_size: int | None = Field(
        None, ge=0, le=MAX_NO_REPEAT_NGRAM_SIZE,
        description=f"Default n-gram blocking size (0 = off, up to {MAX_NO_REPEAT_NGRAM_SIZE}); unset = the "
        "bundle's recommendation (else 0).",
    )

    default_guide: Guide | None = Field(
        None, description="Default guide: `labels` makes every caption name its image's confident label words "
        "(constrained beam search), `none` does not; unset = the bundle's recommendation (else none). A model "
        "without label words is never guided by default.",
    )
    default_guide_threshold: float | None = Field(
        None, gt=0.0, le=1.0, description="Default least probability of a label word group that guides a caption; "
        "unset = the bundle's recommendation (else 0.5).",
    )
    default_guide_words: int | None = Field(
        None, ge=0, le=MAX_CONSTRAINTS, description=f"Default most label word groups that guide a caption (0-"
        f"{MAX_CONSTRAINTS}); unset = the bundle's recommendation (else 1).",
    )

    default_labels: int = Field(
        3, ge=0, le=MAX_LABELS, description=f"ImageNet-1k labels per image when a request does not say (0-{MAX_LABELS}; "
        "0 = none); a bundle without labels answers none."
    )
    min_confidence: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Captions whose confidence (0-1, docs/confidence.md) is below this are still returned, "
        "flagged `low_confidence: true` and counted in captioner_low_confidence_captions_total; 0 = off. A "
        "request's `min_confidence` overrides it.",
    )

    # --- security (app/api/auth.py) ---
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys, comma-separated (or a JSON list). When set (here or in api_keys_file), every "
        "route but /healthz, /readyz, the demo page and the API docs needs `Authorization: Bearer <key>`. "
        f"Each entry: a key ({MIN_API_KEY_LENGTH}-{MAX_API_KEY_LENGTH} visible ASCII characters) or its SHA-256 "
        f"as `{HASH_PREFIX}<64 hex digits>`, optionally followed by ` rate=<n|off>` and ` burst=<n>` "
        "(app/security/keys.py, README: Security).",
    )
    api_keys_file: Path | None = Field(
        None,
        description="A file with more API keys, one entry per line, as in api_keys (blank lines and lines "
        "starting with # are skipped), so keys need not sit in the environment. Checked at start-up; re-read "
        "within about a second whenever it changes (a Kubernetes Secret update too); a version that cannot be "
        "used is logged and the keys in use stay.",
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without an API key even when API keys are set (e.g. for a scraper "
        "on a private network). Off: /metrics needs a key like the API."
    )
    docs_public: bool = Field(
        True, description="Serve the API docs (/docs, /redoc, their assets and /openapi.json) without an API key "
        "even when API keys are set. false: they need a key like the API."
    )
    api_key_rate_limit: int | None = Field(
        None, ge=1, le=MAX_RATE, description="Rate limit of each API key, requests per minute (a token bucket per "
        "key); past it, 429 `rate_limited` with Retry-After. A key's own `rate=` overrides it. Unset: no limit."
    )
    api_key_rate_burst: int | None = Field(
        None, ge=1, le=MAX_RATE, description="Most requests a key with a rate limit may send at once (its bucket "
        "size). A key's own `burst=` overrides it. Unset: the key's rate limit (one minute's worth)."
    )
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys of the admin routes (`POST /v1/models/{name}/load` and `.../rollback`), comma-separated, "
        "entries as in api_keys (rate limits do not apply). These routes need `Authorization: Bearer <admin key>`; "
        "unset: they answer 403 admin_disabled. An admin key is also accepted wherever an API key is.",
    )
    _file_api_keys: list[SecretStr] = PrivateAttr(default_factory=list)  # read from api_keys_file

    @field_validator("device", "log_level", "default_strategy", "default_guide", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("threads", "default_max_length", "preprocess_threads", "default_length_penalty",
                     "default_no_repeat_ngram_size", "api_key_rate_limit", "api_key_rate_burst",
                     "default_guide_threshold", "default_guide_words",
                     "max_inflight_body_bytes", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "none", "auto"):
            return None
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"not a JSON list: {exc.msg}") from None
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("forwarded_allow_ips", mode="after")
    @classmethod
    def _check_proxies(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            if entry != "*":
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"{entry!r} is not an IP address, a network (CIDR) or '*'") from None
        return value

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise ValueError("not a JSON list") from None  # no excerpt: the text holds keys
            else:
                value = [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("api_keys", "admin_api_keys", mode="after")
    @classmethod
    def _check_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for index, key in enumerate(value):
            problem = entry_problem(key.get_secret_value())
            if problem:
                raise ValueError(f"key #{index + 1} {problem}")
        return value

    @field_validator("api_keys_file", mode="after")
    @classmethod
    def _check_keys_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            _read_keys_file(value)  # a clear start-up error for a missing, unreadable or bad file
        return value

    @model_validator(mode="after")
    def _load_keys_file(self) -> Settings:
        self._file_api_keys = [] if self.api_keys_file is None else _read_keys_file(self.api_keys_file)
        return self

    @model_validator(mode="after")
    def _check_repository(self) -> Settings:
        if self.model_repository is None:
            if self.default_model is not None:
                raise ValueError("CAPTIONER_DEFAULT_MODEL needs CAPTIONER_MODEL_REPOSITORY (a single bundle is its "
                                 "own default)")
            return self
        if "bundle" in self.model_fields_set:
            raise ValueError("set CAPTIONER_BUNDLE or CAPTIONER_MODEL_REPOSITORY, not both (a single bundle is a "
                             "repository of one)")
        root = self.model_repository
        if not root.is_dir():
            raise ValueError(f"CAPTIONER_MODEL_REPOSITORY: {root} is not a folder")
        try:
            models, ignored = scan_repository(root)  # what the registry serves (app/inference/bundle.py)
        except OSError as exc:
            raise ValueError(f"CAPTIONER_MODEL_REPOSITORY: cannot read {root} ({exc.strerror})") from None
        if not models and ignored:
            raise ValueError(f"CAPTIONER_MODEL_REPOSITORY: {root} holds no bundle under a valid name (a name and a "
                             "version are letters, digits and . _ + -, starting with a letter or a digit); not served: "
                             f"{', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''}")
        if not models:
            raise ValueError(f"CAPTIONER_MODEL_REPOSITORY: {root} holds no bundle (expected <name>/<version>/"
                             "manifest.json)")
        if self.default_model is not None:
            name, _, version = self.default_model.partition(":")
            if name not in models or (version and version not in models[name]):  # also "", ".", "..", "a/b"
                held = [f"{n}:{v}" for n in sorted(models) for v in sorted(models[n])]
                raise ValueError(f"CAPTIONER_DEFAULT_MODEL: {self.default_model!r} is not a model of the repository "
                                 f"{root} (it holds {', '.join(held[:10])}{' ...' if len(held) > 10 else ''})")
        return self

    def all_api_keys(self) -> list[str]:
        """Every configured API key entry (api_keys, then api_keys_file); empty: no authentication."""
        return [k.get_secret_value() for k in [*self.api_keys, *self._file_api_keys]]

    @model_validator(mode="after")
    def _check_rate_limit(self) -> Settings:
        if (self.api_key_rate_limit or self.api_key_rate_burst) and not self.all_api_keys():
            raise ValueError("CAPTIONER_API_KEY_RATE_LIMIT / CAPTIONER_API_KEY_RATE_BURST need API keys "
                             "(CAPTIONER_API_KEYS or CAPTIONER_API_KEYS_FILE): rate limits are per key")
        return self

    @model_validator(mode="after")
    def _check_decoding_defaults(self) -> Settings:
        # The decoding rules live in app/inference/decoding.py; check the defaults with them once, here.
        try:
            self.decoding_defaults()
        except ValueError as exc:
            raise ValueError(f"invalid decoding defaults: {exc}") from None
        return self

    def decoding_defaults(self, recommended: RecommendedDecoding | None = None, label_words: bool = False) -> DecodingConfig:
        """The default `DecodingConfig` (raises ValueError if the defaults are inconsistent).
        `recommended`: the bundle's recommended decoding (`Bundle.recommended_decoding`), used for
        the length penalty, n-gram blocking and guide where these settings are unset. `label_words`:
        whether the model can be guided by its labels (else the default guide is none)."""

        def chosen(value: Any, name: str, fallback: Any) -> Any:
            if value is not None:
                return value
            given = getattr(recommended, name) if recommended is not None else None
            return fallback if given is None else given

        return DecodingConfig(
            strategy=self.default_strategy,
            beam_size=self.default_beam_size,
            num_captions=self.default_num_captions,
            max_length=self.default_max_length,
            length_penalty=chosen(self.default_length_penalty, "length_penalty", 0.0),
            no_repeat_ngram_size=chosen(self.default_no_repeat_ngram_size, "no_repeat_ngram_size", 0),
            guide=chosen(self.default_guide, "guide", "none") if label_words else "none",
            guide_threshold=chosen(self.default_guide_threshold, "guide_threshold", 0.5),
            guide_words=chosen(self.default_guide_words, "guide_words", 1),
        )

    def decoding_for(self, bundle: Any) -> DecodingConfig:
        """The default `DecodingConfig` for a loaded bundle (app/inference/bundle.py's Bundle): its
        recommendation where these settings are unset, guided by labels only if it has label words."""
        return self.decoding_defaults(bundle.recommended_decoding, bundle.label_words is not None)

    def labels_for(self, has_labels: bool) -> int:
        """The label count when a request (or a command) does not say: default_labels for a model with
        labels, 0 for one without."""
        return self.default_labels if has_labels else 0

    def cpu_share(self) -> int:
        """The CPUs one worker process may count on: all of them, or with workers > 1 an equal share (at least 1)."""
        return max(1, (os.cpu_count() or 2) // self.workers)

    def engine_threads(self) -> int | None:
        """onnxruntime's intra-op threads per session: `threads`, else onnxruntime's default (None) for one
        process, else the worker's share of the CPUs (docs/scale.md: N workers must not each take every core)."""
        if self.threads is not None or self.workers == 1:
            return self.threads
        return self.cpu_share()

    def preprocess_workers(self) -> int:
        # half the CPUs (at most 8): the other half is left to onnxruntime (measured on 2 cores: 39 vs
        # 36.5 requests/s at concurrency 32 with 1 rather than 2 decoding threads); with workers > 1, half of
        # this worker's share
        return self.preprocess_threads or max(1, min(8, self.cpu_share() // 2))

    def body_limit(self, files: int = 1) -> int:
        """Largest request body accepted for a request carrying up to `files` uploads."""
        return self.max_upload_bytes * max(1, files) + 64 * 1024

    def inflight_body_limit(self) -> int:
        """Most bytes of request bodies in flight at once (in this process): max_inflight_body_bytes, else an
        eighth of the memory available (app/settings.py `available_memory`) shared among the workers, at least
        the largest request body."""
        if self.max_inflight_body_bytes is not None:
            return self.max_inflight_body_bytes
        return max(self.body_limit(self.max_batch_files), available_memory() // (8 * self.workers))

    @model_validator(mode="after")
    def _check_inflight_bound(self) -> Settings:
        largest = self.body_limit(self.max_batch_files)
        if self.max_inflight_body_bytes is not None and self.max_inflight_body_bytes < largest:
            raise ValueError(f"CAPTIONER_MAX_INFLIGHT_BODY_BYTES ({self.max_inflight_body_bytes}) is smaller than the "
                             f"largest request body ({largest} bytes: max_upload_bytes x max_batch_files + 64 KiB), "
                             "which could then never be accepted")
        return self


def available_memory() -> int:
    """Bytes of memory this process may use: the cgroup's limit (v2 `memory.max`, v1
    `memory.limit_in_bytes`) when there is one, else the machine's physical memory (4 GiB if unknown)."""
    physical = 4 << 30
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


def _read_keys_file(path: Path) -> list[SecretStr]:
    """The entries of an API keys file (app/security/keys.py checks each; its errors never quote one)."""
    return [SecretStr(entry) for entry in read_keys_file(path)]


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "__root__"]
        field = loc[0] if loc else ""
        name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
        value = error.get("input")
        secret = field in SECRET_FIELDS
        shown = "" if secret or isinstance(value, dict) or value is None else f" (got {value!r})"
        message = error.get("msg", "invalid value")
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        lines.append(f"{name}: {message}{shown}")
    return "\n".join(lines)


def unknown_env_vars(environ: dict[str, str] | None = None) -> list[str]:
    """`CAPTIONER_*` variables that name no setting (probably typos)."""
    names = os.environ if environ is None else environ
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | INTERNAL_VARIABLES
    return sorted(k for k in names if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with `overrides` (e.g. CLI options; None values ignored) on top.

    Raises `SettingsError` with one line per problem. Unknown `CAPTIONER_*` variables are logged as a
    warning (other parts of the project may define their own).
    """
    for name in unknown_env_vars():
        log.warning("ignoring unknown environment variable %s (not a setting)", name)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SettingsError("invalid configuration:\n" + _format_errors(exc)) from None
