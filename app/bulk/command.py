"""`captioner caption-dir`: the typer command. Options and exit statuses only; the work is done by
app.bulk.job.run with a LocalCaptioner (app/bulk/local.py) or, with --url, a RemoteCaptioner
(app/bulk/remote.py), each imported when used, so registering the command loads neither the engine
nor an HTTP client."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from app.bulk.errors import BulkError
from app.bulk.job import run
from app.bulk.output import format_for
from app.cli_options import (
    BeamSizeOption,
    BundleOption,
    DeviceOption,
    LabelsOption,
    LengthPenaltyOption,
    MaxLengthOption,
    NoRepeatNgramOption,
    NumCaptionsOption,
    StrategyOption,
    ThreadsOption,
)

if TYPE_CHECKING:  # imported where used: app.bulk.local loads the engine, app.bulk.remote httpx
    from app.bulk.local import LocalCaptioner
    from app.bulk.remote import RemoteCaptioner


def caption_dir(
    folder: Annotated[Path, typer.Argument(help="Folder to caption (recursively; images found by content).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file; appended to, and resumed from.")] = Path(
        "captions.jsonl"),
    fmt: Annotated[str | None, typer.Option("--format", help="jsonl or csv (default: csv if --out ends in "
                                                                ".csv, else jsonl)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per engine call (or per request with --url)")] = 16,
    url: Annotated[str | None, typer.Option(help="Send the images to a running service (e.g. "
                                                    "http://127.0.0.1:8000) instead of loading the model")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="With --url: requests in flight at once")] = 2,
    retries: Annotated[int, typer.Option(min=0, max=100, help="With --url: retries of a request that got "
                                                              "429/502/503/504 or no connection")] = 5,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Drop the output's error records first, "
                                                                      "so those files are tried again")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar")] = True,
    strategy: StrategyOption = None,
    beam_size: BeamSizeOption = None,
    num_captions: NumCaptionsOption = None,
    max_length: MaxLengthOption = None,
    length_penalty: LengthPenaltyOption = None,
    no_repeat_ngram_size: NoRepeatNgramOption = None,
    labels: LabelsOption = None,
    bundle: BundleOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Caption every image in a folder into a JSON-lines or CSV file (resumable; locally or via --url).

    With a model that has ImageNet labels, each captioned image also gets its best --labels K classes:
    JSON lines a `labels` list of {name, class_id, probability}; CSV a `labels` column of
    `class_id:name:probability` joined by `|` (e.g. `285:Egyptian cat:0.819941|282:tiger cat:0.070631`).

    Exit status: 0 all captioned, 1 some files failed (error records) or the run stopped early,
    2 bad options or a model that cannot load."""
    decoding = {"strategy": strategy, "beam_size": beam_size, "num_captions": num_captions,
                "max_length": max_length, "length_penalty": length_penalty,
                "no_repeat_ngram_size": no_repeat_ngram_size}

    def fail(message: str) -> NoReturn:
        typer.echo(f"captioner: {message}", err=True)
        raise typer.Exit(2)

    def log(message: str) -> None:
        typer.echo(f"caption-dir: {message}", err=True)

    try:
        format_for(out, fmt)
    except BulkError as exc:
        fail(str(exc))
    if not folder.is_dir():
        fail(f"{folder} is not a folder")

    captioner: LocalCaptioner | RemoteCaptioner
    try:
        if url:
            from app.bulk.remote import RemoteCaptioner

            captioner = RemoteCaptioner.connect(url, batch_size=batch_size, decoding=decoding, labels=labels,
                                                concurrency=concurrency, retries=retries, log=log)
        else:
            from app.bulk.local import LocalCaptioner

            captioner = LocalCaptioner.load(batch_size=batch_size, decoding=decoding, labels=labels,
                                            bundle=bundle, device=device, threads=threads)
    except BulkError as exc:
        fail(str(exc))

    with captioner:
        try:
            summary = run(folder, out, fmt=fmt, batch_size=captioner.batch_size, captioner=captioner,
                          retry_errors=retry_errors, progress=progress, log=lambda m: typer.echo(m, err=True))
        except BulkError as exc:
            fail(str(exc))
    if not summary.ok:
        raise typer.Exit(1)
