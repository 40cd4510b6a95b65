"""The service's settings: one pydantic-settings class, read from `CAPTIONER_*` environment variables.

Every setting is documented in the README (section Serving). Invalid values are a start-up
error: `load_settings()` turns pydantic's ValidationError into a `SettingsError` whose message names
each bad variable, and the CLI / app factory exit non-zero with it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CAPTIONER_"
MiB = 1024 * 1024

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
    bundle: Path = Field(Path("models/default"), description="Path of the model bundle folder.")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="Execution device. auto: CUDA when onnxruntime can load it, else CPU (with a warning); "
        "cuda: refuse to start without CUDA; cpu: CPU only.",
    )
    threads: int | None = Field(
        None, ge=1, le=1024, description="onnxruntime intra-op threads per session; unset = onnxruntime's default."
    )

    # --- HTTP server ---
    host: str = Field("127.0.0.1", min_length=1, description="Interface to bind (the container sets 0.0.0.0).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the service's JSON logs and of uvicorn."
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

    # --- decoding defaults (each can be overridden per request) ---
    default_strategy: Literal["greedy", "beam"] = Field("beam", description="Default decoding strategy.")
    default_beam_size: int = Field(3, description="Default beam size (1-10).")
    default_num_captions: int = Field(1, description="Default number of captions returned (<= beam size).")
    default_max_length: int | None = Field(
        None, description="Default most words per caption (1-64); unset = the bundle's max_length."
    )
    default_length_penalty: float = Field(0.0, description="Default length penalty (0-5); 0 ranks by total log-probability.")
    default_no_repeat_ngram_size: int = Field(0, description="Default n-gram blocking size (0 = off, up to 10).")

    @field_validator("device", "log_level", "default_strategy", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("threads", "default_max_length", mode="before")
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

    @model_validator(mode="after")
    def _check_decoding_defaults(self) -> "Settings":
        # The decoding rules live in app/decoding.py; check the defaults with them once, here.
        try:
            self.decoding_defaults()
        except ValueError as exc:
            raise ValueError(f"invalid decoding defaults: {exc}") from None
        return self

    def decoding_defaults(self):
        """The default `DecodingConfig` (raises ValueError if the defaults are inconsistent)."""
        from app.decoding import DecodingConfig

        return DecodingConfig(
            strategy=self.default_strategy,
            beam_size=self.default_beam_size,
            num_captions=self.default_num_captions,
            max_length=self.default_max_length,
            length_penalty=self.default_length_penalty,
            no_repeat_ngram_size=self.default_no_repeat_ngram_size,
        )

    def body_limit(self, files: int = 1) -> int:
        """Largest request body accepted for a request carrying up to `files` uploads."""
        return self.max_upload_bytes * max(1, files) + 64 * 1024


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "__root__"]
        field = loc[0] if loc else ""
        name = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
        value = error.get("input")
        shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
        message = error.get("msg", "invalid value")
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        lines.append(f"{name}: {message}{shown}")
    return "\n".join(lines)


def unknown_env_vars(environ: dict[str, str] | None = None) -> list[str]:
    """`CAPTIONER_*` variables that name no setting (probably typos)."""
    environ = os.environ if environ is None else environ
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


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
