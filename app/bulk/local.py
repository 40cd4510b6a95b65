"""caption-dir's local mode: the bundle, the Engine and the service's preprocessing, in this process.

`LocalCaptioner.load(...)` loads the model as `captioner caption` does (settings, decoding options,
labels); calling it with the items to do yields their records batch by batch (`caption_locally`):
the next batch's files are read and decoded in worker threads while the engine runs this one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.bulk.errors import BulkError
from app.bulk.output import Record, caption_dicts, error_record, label_dicts
from app.bulk.source import ImagePrep, Item, in_batches, os_message

if TYPE_CHECKING:
    import numpy as np

    from app.inference.bundle import Bundle
    from app.inference.decoding import DecodingConfig
    from app.inference.engine import Engine
    from app.settings import Settings


def caption_locally(items: Sequence[Item], engine: Engine, config: DecodingConfig, max_pixels: int, batch_size: int,
                    workers: int = 2, labels: int = 0) -> Iterator[list[Record]]:
    """Records per batch, in order: files decoded in `workers` threads (the next batch while the
    engine runs this one), each batch one `engine.run` call (with each image's `labels` best labels)."""
    from app.inference.preprocess import ImageDecodeError

    prep = ImagePrep(engine.bundle.preprocessing, max_pixels)

    def load(item: Item) -> np.ndarray | Record:
        try:
            data = item.read()
        except OSError as exc:
            return error_record(item.rel, "unreadable_file", os_message(exc))
        try:
            return prep(data)
        except ImageDecodeError as exc:
            return error_record(item.rel, exc.code, exc.message)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="caption-dir-decode") as pool:
        batches = list(in_batches(items, batch_size))
        pending = [pool.submit(load, it) for it in batches[0]] if batches else []
        for index, batch in enumerate(batches):
            loaded = [f.result() for f in pending]
            pending = [pool.submit(load, it) for it in batches[index + 1]] if index + 1 < len(batches) else []
            arrays = [x for x in loaded if not isinstance(x, Record)]
            results = iter(engine.run(arrays, config, labels=labels) if arrays else [])
            records = []
            for item, outcome in zip(batch, loaded):
                if isinstance(outcome, Record):
                    records.append(outcome)
                else:
                    result = next(results)
                    records.append(Record(item.rel, captions=caption_dicts(result.captions),
                                          labels=label_dicts(result.labels)))
            yield records


@dataclass
class ModelChoice:
    """What a caption-dir run decodes with, checked before any image is read (`choose_model`)."""

    settings: Settings
    bundle: Bundle
    config: DecodingConfig  # the decoding options on the settings' and the bundle's defaults
    labels: int  # best labels per image (0: none)


def choose_model(*, decoding: dict[str, Any], labels: int | None = None, bundle: Path | None = None,
                 device: str | None = None, threads: int | None = None) -> ModelChoice:
    """Load the settings (CAPTIONER_*, overridden by bundle/device/threads), check the decoding
    options, load and check the bundle (sha256s), put the options on its recommended decoding, and
    resolve `labels` (None: the default_labels setting for a model with labels, else 0). BulkError,
    with the message to show, for anything wrong. The local and the Ray captioners both start here."""
    from app.cli_options import resolve_labels
    from app.inference.bundle import BundleError, load_bundle
    from app.settings import SettingsError, load_settings

    try:
        settings = load_settings(bundle=bundle, device=device, threads=threads)
        settings.decoding_defaults().with_overrides(**decoding)  # checked before the model loads
    except SettingsError as exc:
        raise BulkError(str(exc)) from None
    except ValueError as exc:
        raise BulkError(f"invalid decoding settings: {exc}") from None
    try:
        loaded = load_bundle(settings.bundle)
    except BundleError as exc:
        raise BulkError(f"cannot load the model: {exc}") from None
    try:
        config = settings.decoding_for(loaded).with_overrides(**decoding)
    except ValueError as exc:
        raise BulkError(f"invalid decoding settings: {exc}") from None
    try:
        top_k = resolve_labels(labels, loaded.has_labels, settings.labels_for(loaded.has_labels),
                               f"the model {loaded.name}")
    except ValueError as exc:
        raise BulkError(str(exc)) from None
    return ModelChoice(settings, loaded, config, top_k)


@dataclass
class LocalCaptioner:
    """A loaded model, as a captioner for app.bulk.job.run: `captioner(items)` yields the records."""

    engine: Engine
    config: DecodingConfig
    max_pixels: int
    batch_size: int
    labels: int = 0  # best labels per image (0: none)
    workers: int = 2  # decoding threads

    @classmethod
    def load(cls, *, batch_size: int, decoding: dict[str, Any], labels: int | None = None,
             bundle: Path | None = None, device: str | None = None, threads: int | None = None) -> LocalCaptioner:
        """`choose_model`, then the engine on its bundle. BulkError, with the message to show, for
        anything wrong (exit status 2)."""
        from app.inference.engine import Engine, EngineError

        choice = choose_model(decoding=decoding, labels=labels, bundle=bundle, device=device, threads=threads)
        settings = choice.settings
        try:
            engine = Engine(choice.bundle, device=settings.device, threads=settings.threads)
        except EngineError as exc:
            raise BulkError(f"cannot load the model: {exc}") from None
        return cls(engine, choice.config, settings.max_image_pixels, batch_size, labels=choice.labels)

    def __call__(self, items: Sequence[Item]) -> Iterator[list[Record]]:
        return caption_locally(items, self.engine, self.config, self.max_pixels, self.batch_size,
                               workers=self.workers, labels=self.labels)

    def close(self) -> None:
        """Nothing to release (the sessions go with the engine); here so both captioners close alike."""

    def __enter__(self) -> LocalCaptioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
