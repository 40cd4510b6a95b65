"""`caption-dir --engine ray`: captioning on a Ray cluster with Ray Data (offline batch inference).

The driver (this process) scans the source and the output as the local mode does (app.bulk.job.run:
resume, error records, the summary); what it has left to do becomes a Ray dataset of file locations:

    from_items(locations) -> map_batches(read_files)            Ray tasks: the bytes, through pyarrow's
                                                                 file systems (local paths, s3://, gs://)
                          -> map_batches(CaptionActor, concurrency=N)   a pool of N actors, each one Engine
                          -> iter_batches()                      back to the driver, in the source's order

Each actor loads the bundle once (`num_gpus` per actor when asked, else one CPU) and runs the local
mode's preprocessing (app.bulk.source.ImagePrep) and `Engine.run` on its batches, so its records are
the local mode's. Bytes that are not a usable image become an error record and the run goes on.

Only the driver writes the output (JSONL, CSV or Parquet, app/bulk/output.py), one batch of records
at a time, in the source's order (Ray Data's `preserve_order`): a record is written once, when its
batch comes back. A killed actor is restarted by Ray and its unfinished batches are run again; a
killed driver loses only the batches in flight, which the next run of the same command does.

Needs the `ray` extra (`pip install 'captioner[ray]'`); nothing else in the project imports this module.
Every node must see the bundle folder at the same path (a shared or copied folder) and have the
project installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app.bulk.errors import BulkError
from app.bulk.output import Record, caption_dicts, error_record, label_dicts, raw_path
from app.bulk.source import ImagePrep, Item, read_location


def read_files(batch: dict[str, Any]) -> dict[str, Any]:
    """Ray task: the bytes of each location, or why they could not be read."""
    data, problems = [], []
    for location in batch["location"]:  # bytes (a name that is not UTF-8 cannot be an Arrow string)
        try:
            data.append(read_location(_text(location)))
            problems.append("")
        except OSError as exc:
            data.append(b"")
            problems.append(exc.strerror or str(exc) or type(exc).__name__)
    return {"rel": batch["rel"], "data": data, "read_error": problems}


class CaptionActor:
    """Ray actor: one Engine, loaded once; each call captions one batch into record columns."""

    def __init__(self, bundle: str, device: Literal["auto", "cuda", "cpu"], threads: int | None,
                 config: dict[str, Any], labels: int, max_pixels: int) -> None:
        from app.inference.bundle import load_bundle
        from app.inference.decoding import DecodingConfig
        from app.inference.engine import Engine

        self.engine = Engine(load_bundle(bundle), device=device, threads=threads)
        self.config = DecodingConfig(**config)
        self.labels = labels
        self.prep = ImagePrep(self.engine.bundle.preprocessing, max_pixels)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from app.inference.preprocess import ImageDecodeError

        records: list[Record | None] = []
        arrays, where = [], []
        for rel, data, problem in zip(batch["rel"], batch["data"], batch["read_error"], strict=True):
            rel = _text(rel)
            if problem:
                records.append(error_record(rel, "unreadable_file", str(problem)))
                continue
            try:
                arrays.append(self.prep(bytes(data)))
                where.append(len(records))
                records.append(None)
            except ImageDecodeError as exc:
                records.append(error_record(rel, exc.code, exc.message))
        if arrays:
            results = self.engine.run(arrays, self.config, labels=self.labels)
            for index, result in zip(where, results, strict=True):
                records[index] = Record(_text(batch["rel"][index]), captions=caption_dicts(result.captions),
                                        labels=label_dicts(result.labels))
        return {"record": [json.dumps(r.as_json(), ensure_ascii=False) for r in records if r is not None]}


@dataclass
class RayCaptioner:
    """A captioner for app.bulk.job.run that captions on a Ray cluster (see the module docstring)."""

    bundle: Path
    device: Literal["auto", "cuda", "cpu"]
    threads: int | None
    config: dict[str, Any]
    max_pixels: int
    batch_size: int
    labels: int = 0
    actors: int = 1
    gpus_per_actor: float = 0.0
    address: str | None = None
    progress: bool = True

    @classmethod
    def load(cls, *, batch_size: int, decoding: dict[str, Any], labels: int | None = None, bundle: Path | None = None,
             device: str | None = None, threads: int | None = None, actors: int = 1, gpus_per_actor: float = 0.0,
             address: str | None = None, progress: bool = True) -> RayCaptioner:
        """Check everything on the driver first (settings, the bundle, the decoding options, labels),
        as the local mode does, then connect to the cluster (`address`: a running one; None: the one
        RAY_ADDRESS names, else a local one started for this run). BulkError with the message to show."""
        from app.bulk.local import choose_model

        try:
            import ray
        except ImportError:
            raise BulkError("--engine ray needs Ray: pip install 'captioner[ray]'") from None
        choice = choose_model(decoding=decoding, labels=labels, bundle=bundle, device=device, threads=threads)
        settings = choice.settings
        if actors < 1:
            raise BulkError("--actors must be at least 1")
        device_name: Literal["auto", "cuda", "cpu"] = "cuda" if gpus_per_actor > 0 and settings.device == "auto" \
            else settings.device
        try:
            if not ray.is_initialized():
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BulkError(f"cannot connect to the Ray cluster at {address or 'RAY_ADDRESS / a new local one'}: "
                            f"{exc}") from None
        return cls(bundle=Path(settings.bundle).resolve(), device=device_name, threads=settings.threads,
                   config=dataclasses.asdict(choice.config), max_pixels=settings.max_image_pixels,
                   batch_size=batch_size, labels=choice.labels, actors=actors, gpus_per_actor=gpus_per_actor, address=address,
                   progress=progress)

    def __call__(self, items: Sequence[Item]) -> Iterator[list[Record]]:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # records come back in the source's order
        context.enable_progress_bars = self.progress  # Ray Data's own bars, per stage (with --progress)
        rows = [{"rel": raw_path(item.rel), "location": raw_path(item.location)} for item in items]
        items_ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / self.batch_size)))
        dataset = items_ds.map_batches(read_files, batch_size=self.batch_size).map_batches(
            CaptionActor,
            fn_constructor_kwargs={"bundle": str(self.bundle), "device": self.device, "threads": self.threads,
                                   "config": self.config, "labels": self.labels, "max_pixels": self.max_pixels},
            batch_size=self.batch_size,
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            num_cpus=0 if self.gpus_per_actor > 0 else 1,
            num_gpus=self.gpus_per_actor or None,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield [_record(json.loads(str(text))) for text in batch["record"]]

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> RayCaptioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record(obj: dict[str, Any]) -> Record:
    return Record.from_json(obj)


def _text(value: Any) -> str:
    """A path or location of the rows (bytes, surrogateescape'd back to the item's str)."""
    return bytes(value).decode("utf-8", "surrogateescape") if isinstance(value, bytes | bytearray) else str(value)
