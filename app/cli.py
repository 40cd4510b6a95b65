"""Command-line entry points of the serving side.

`serve` and `caption` are plain functions with typer annotations, so the project CLI (`captioner`)
can register them; `app_cli` has both, so `python -m app.cli serve|caption` works on its own.
`caption --json` prints one object per image whose captions, labels, settings and model are the
API's (app/api/schemas.py: `CaptionItem.of`, `Label.of`, `DecodingSettings.of`, `ModelRef`).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from app.cli_options import (
    BeamSizeOption,
    BundleOption,
    DeviceOption,
    GuideOption,
    GuideThresholdOption,
    GuideWordsOption,
    LabelsOption,
    LengthPenaltyOption,
    MaxLengthOption,
    NoRepeatNgramOption,
    NumCaptionsOption,
    StrategyOption,
    ThreadsOption,
    resolve_labels,
)
from app.settings import ENV_PREFIX, Settings, SettingsError, load_settings

if TYPE_CHECKING:
    import uvicorn

    from app.inference.engine import Label


def _settings_or_exit(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        typer.echo(f"captioner: {exc}", err=True)
        raise typer.Exit(2) from None


def serve(
    bundle: BundleOption = None,
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (env CAPTIONER_HOST; default 127.0.0.1)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (env CAPTIONER_PORT; default 8000)")] = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    log_level: Annotated[
        str | None, typer.Option(help="critical|error|warning|info|debug (env CAPTIONER_LOG_LEVEL)")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="HTTP worker processes on the port, each with its own engine (env "
                                 "CAPTIONER_WORKERS; default 1; docs/scale.md)")
    ] = None,
) -> None:
    """Run the HTTP service (uvicorn) on the model bundle. Options override CAPTIONER_* variables."""
    overrides: dict[str, object] = {"bundle": bundle, "host": host, "port": port, "device": device,
                                    "threads": threads, "log_level": log_level, "workers": workers}
    settings = _settings_or_exit(**overrides)
    if settings.workers > 1:
        _serve_workers(settings, overrides)
        return

    import uvicorn

    from app.main import create_app

    app = create_app(settings)
    # The service writes its own JSON access log (with the request id); uvicorn's would duplicate it.
    # On SIGTERM or SIGINT uvicorn stops accepting connections, lets the requests in flight finish
    # (at most request_timeout_s more), runs the lifespan shutdown and returns.
    server = uvicorn.Server(uvicorn_config(app, settings))
    # uvicorn re-raises the signal it caught once it has shut down, which would end the process
    # with "killed by SIGTERM" after a clean drain: make that re-raise a no-op, so the exit is 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        raise typer.Exit(3)  # start-up failed (the lifespan logged why), as uvicorn.run exits


def _serve_workers(settings: Settings, overrides: dict[str, object]) -> None:
    """`settings.workers` worker processes under a supervisor (app/serving/supervisor.py). Each worker builds
    the app itself from the CAPTIONER_* environment (`app.main:create_app`), so the command line's
    overrides travel to them as CAPTIONER_* variables."""
    from app.observability.logs import configure_logging
    from app.serving.supervisor import run_workers

    configure_logging(settings.log_level, pid=True)
    environment = {f"{ENV_PREFIX}{name.upper()}": str(value) for name, value in overrides.items() if value is not None}
    code = run_workers(uvicorn_config("app.main:create_app", settings), environment)
    if code:
        raise typer.Exit(code)


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for `serve`: no access log of its own, no Server header, at most
    max_connections connections and requests at once (limit_concurrency; per worker), idle keep-alive
    connections closed after keep_alive_s, the drain on SIGTERM bounded by request_timeout_s, and
    X-Forwarded-* believed only from forwarded_allow_ips (none by default: uvicorn on its own trusts
    127.0.0.1). `app` an import string: the factory each of `settings.workers` workers calls."""
    import uvicorn

    proxies = ",".join(settings.forwarded_allow_ips)
    several = isinstance(app, str)

    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,  # type: ignore[arg-type]
                          factory=several, workers=settings.workers if several else None,
                          log_config=None,  # uvicorn's loggers write JSON lines (app/observability/logs.py)
                          access_log=False, server_header=False,
                          limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_s,
                          proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None,
                          timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)


def labels_line(labels: Sequence[Label]) -> str:
    """Labels for people: each class's first synonym and its probability in percent, best first
    ("Egyptian cat 82.1%, tiger cat 7.1%, tabby 7.0%"); --json has the full names and class ids."""
    return ", ".join(f"{x.name.split(',')[0].strip()} {x.probability:.1%}" for x in labels)


def caption(
    images: Annotated[list[Path], typer.Argument(help="Image files to caption.", exists=False)],
    strategy: StrategyOption = None,
    beam_size: BeamSizeOption = None,
    num_captions: NumCaptionsOption = None,
    max_length: MaxLengthOption = None,
    length_penalty: LengthPenaltyOption = None,
    no_repeat_ngram_size: NoRepeatNgramOption = None,
    include: Annotated[str | None, typer.Option(
        help="Words every caption must contain, comma-separated (alternatives joined by |: 'cat|cats,sofa')")] = None,
    guide: GuideOption = None,
    guide_threshold: GuideThresholdOption = None,
    guide_words: GuideWordsOption = None,
    labels: LabelsOption = None,
    bundle: BundleOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per image")] = False,
) -> None:
    """Caption image files locally (no server): load the bundle, run the engine, print the captions
    and, for a bundle with labels, each image's best ImageNet labels (`--labels K`)."""
    from app.inference.bundle import BundleError, load_bundle
    from app.inference.engine import Engine, EngineError
    from app.inference.preprocess import ImageDecodeError, decode_image, draft_size, to_array

    settings = _settings_or_exit(bundle=bundle, device=device, threads=threads)
    def decoding(loaded=None):
        groups = None
        if include is not None and loaded is not None:
            from app.inference.guidance import include_groups

            groups = include_groups(include, loaded.token_ids, list(loaded.special.values()))
        base = settings.decoding_for(loaded) if loaded is not None else settings.decoding_defaults()
        return base.with_overrides(
            strategy=strategy, beam_size=beam_size, num_captions=num_captions, max_length=max_length,
            length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size, include=groups, guide=guide,
            guide_threshold=guide_threshold, guide_words=guide_words,
        )

    try:
        config = decoding()  # checked before the model loads; then again with its recommendation
    except ValueError as exc:
        typer.echo(f"captioner: invalid decoding settings: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        loaded = load_bundle(settings.bundle)
        engine = Engine(loaded, device=settings.device, threads=settings.threads)
    except (BundleError, EngineError) as exc:
        typer.echo(f"captioner: cannot load the model: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        config = decoding(loaded)
        if config.guide == "labels" and not engine.has_label_words:
            raise ValueError(f"--guide labels: the model {loaded.name} has no label words (captioner add-labels adds them)")
    except ValueError as exc:
        typer.echo(f"captioner: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        top_k = resolve_labels(labels, engine.has_labels, settings.labels_for(engine.has_labels), f"the model {loaded.name}")
    except ValueError as exc:
        typer.echo(f"captioner: {exc}", err=True)
        raise typer.Exit(2) from None

    spec = loaded.preprocessing
    arrays, good, failed = [], [], 0
    for path in images:
        try:
            data = path.read_bytes()
            arrays.append(to_array(decode_image(data, settings.max_image_pixels, draft_size(spec)), spec))
            good.append(path)
        except (OSError, ImageDecodeError) as exc:
            failed += 1
            message = exc.message if isinstance(exc, ImageDecodeError) else (exc.strerror or str(exc))
            code = exc.code if isinstance(exc, ImageDecodeError) else "unreadable_file"
            if as_json:
                typer.echo(json.dumps({"image": str(path), "error": {"code": code, "message": message}}))
            else:
                typer.echo(f"{path}: error: {message}", err=True)

    if arrays:
        from app.api.schemas import CaptionItem, DecodingSettings, GuideItem, Label, ModelRef

        results = engine.run(arrays, config, labels=top_k)
        # --json: each image's captions, settings, model and labels as the API answers them (app/api/schemas.py)
        used = DecodingSettings.of(config, loaded.max_length, loaded.vocab).model_dump()
        model = ModelRef(name=loaded.name, version=loaded.version).model_dump()
        for path, result in zip(good, results, strict=True):
            captions = result.captions
            if as_json:
                record: dict[str, object] = {
                    "image": str(path),
                    "captions": [CaptionItem.of(c, settings.min_confidence, config.constrained).model_dump(exclude_none=True)
                                 for c in captions],
                    "settings": used,
                    "model": model,
                }
                if result.labels:  # as the API: absent with --labels 0 or a bundle without labels
                    record["labels"] = [Label.of(x).model_dump() for x in result.labels]
                if config.guided:
                    record["guide"] = [GuideItem.of(w).model_dump() for w in result.guide]
                typer.echo(json.dumps(record))
                continue
            if len(captions) == 1:
                typer.echo(f"{path}: {captions[0].text}")
            else:
                typer.echo(f"{path}:")
                for rank, c in enumerate(captions, 1):
                    typer.echo(f"  {rank}. {c.text}  ({c.normalized_score:.3f})")
            if result.labels:
                typer.echo(f"  labels: {labels_line(result.labels)}")
            if result.guide:
                typer.echo("  guided by: " + ", ".join(f"{'|'.join(w.words)} {w.probability:.1%}" for w in result.guide))
    if failed:
        raise typer.Exit(1)


from app.bulk.command import caption_dir  # noqa: E402  (imports nothing heavy: the engine or httpx load on use)

COMMANDS: dict[str, Callable[..., None]] = {"serve": serve, "caption": caption, "caption-dir": caption_dir}

app_cli = typer.Typer(help="Image captioning service.", no_args_is_help=True, add_completion=False)
for _name, _fn in COMMANDS.items():
    app_cli.command(_name)(_fn)


def main() -> None:  # pragma: no cover
    app_cli()


if __name__ == "__main__":  # pragma: no cover
    main()
