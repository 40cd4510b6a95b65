"""`captioner caption-dir`: the typer command. Options and exit statuses only; the work is done by
app.bulk.job.run with a LocalCaptioner (app/bulk/local.py) or, with --url, a RemoteCaptioner
(app/bulk/remote.py), each imported when used, so registering the command loads neither the engine
nor an HTTP client."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import typer

from app.bulk.errors import BulkError
from app.bulk.job import run
from app.bulk.output import format_for
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
)

Engine = Literal["local", "ray"]

if TYPE_CHECKING:  # imported where used: app.bulk.local loads the engine, app.bulk.remote httpx
    from app.bulk.local import LocalCaptioner
    from app.bulk.ray_runner import RayCaptioner
    from app.bulk.remote import RemoteCaptioner


def caption_dir(
    source: Annotated[str, typer.Argument(
        help="What to caption: a folder (recursively; images found by content), a glob ('photos/**/*.jpg') or a "
        "text file listing paths or URIs (s3://, gs://: --engine ray), one per line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (a folder of parts for Parquet); appended "
                                                        "to, and resumed from.")] = Path(
        "captions.jsonl"),
    fmt: Annotated[str | None, typer.Option("--format", help="jsonl, csv or parquet (default: by --out's ending, "
                                                                ".csv or .parquet, else jsonl)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per engine call (or per request with --url)")] = 16,
    url: Annotated[str | None, typer.Option(help="Send the images to a running service (e.g. "
                                                    "http://127.0.0.1:8000) instead of loading the model")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=64, help="With --url: requests in flight at once")] = 2,
    retries: Annotated[int, typer.Option(min=0, max=100, help="With --url: retries of a request that got "
                                                              "429/502/503/504 or no connection")] = 5,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Drop the output's error records first, "
                                                                      "so those files are tried again")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar")] = True,
    engine: Annotated[Engine, typer.Option(help="local: this process runs the model; ray: a pool of actors on a "
                                                "Ray cluster (Ray Data; the `ray` extra)")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="With --engine ray: the cluster to use (e.g. "
                                                         "127.0.0.1:6379; default: RAY_ADDRESS, else a new local one)")] = None,
    actors: Annotated[int, typer.Option(min=1, max=4096, help="With --engine ray: model actors (one engine each)")] = 1,
    gpus_per_actor: Annotated[float, typer.Option(min=0.0, max=8.0, help="With --engine ray: GPUs per actor (0: CPU "
                                                                         "actors)")] = 0.0,
    strategy: StrategyOption = None,
    beam_size: BeamSizeOption = None,
    num_captions: NumCaptionsOption = None,
    max_length: MaxLengthOption = None,
    length_penalty: LengthPenaltyOption = None,
    no_repeat_ngram_size: NoRepeatNgramOption = None,
    guide: GuideOption = None,
    guide_threshold: GuideThresholdOption = None,
    guide_words: GuideWordsOption = None,
    labels: LabelsOption = None,
    bundle: BundleOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Caption every image of a folder, glob or list into JSON lines, CSV or Parquet (resumable; locally,
    via --url, or on a Ray cluster with --engine ray). Records come in the source's order (sorted
    paths; a resumed run appends the rest in that order); each image is written once.

    With a model that has ImageNet labels, each captioned image also gets its best --labels K classes:
    JSON lines a `labels` list of {name, class_id, probability}; CSV a `labels` column of
    `class_id:name:probability` joined by `|` (e.g. `285:Egyptian cat:0.819941|282:tiger cat:0.070631`).

    Exit status: 0 all captioned, 1 some files failed (error records) or the run stopped early,
    2 bad options or a model that cannot load."""
    decoding = {"strategy": strategy, "beam_size": beam_size, "num_captions": num_captions,
                "max_length": max_length, "length_penalty": length_penalty,
                "no_repeat_ngram_size": no_repeat_ngram_size, "guide": guide, "guide_threshold": guide_threshold,
                "guide_words": guide_words}

    def fail(message: str) -> NoReturn:
        typer.echo(f"captioner: {message}", err=True)
        raise typer.Exit(2)

    def log(message: str) -> None:
        typer.echo(f"caption-dir: {message}", err=True)

    try:
        format_for(out, fmt)
    except BulkError as exc:
        fail(str(exc))
    if url and engine != "local":
        fail("--url sends the images to a service; it does not go with --engine ray")

    captioner: LocalCaptioner | RemoteCaptioner | RayCaptioner
    try:
        if engine == "ray":
            from app.bulk.ray_runner import RayCaptioner

            captioner = RayCaptioner.load(batch_size=batch_size, decoding=decoding, labels=labels, bundle=bundle,
                                          device=device, threads=threads, actors=actors, gpus_per_actor=gpus_per_actor,
                                          address=ray_address, progress=progress)
        elif url:
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
            summary = run(source, out, fmt=fmt, batch_size=captioner.batch_size, captioner=captioner,
                          retry_errors=retry_errors, progress=progress, log=lambda m: typer.echo(m, err=True))
        except BulkError as exc:
            fail(str(exc))
    if not summary.ok:
        raise typer.Exit(1)
