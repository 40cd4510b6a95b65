"""One caption-dir run, whatever captions the images: scan the folder, skip what the output already
has, caption the rest with a captioner, append the records, and sum it up on stderr.

A captioner is any callable that takes the items to do and yields their records, a list per batch,
in any order, one record per item (an error record for a file it could not use); raising BulkError
stops the run early (what was written stays, and the same command resumes). The local mode
(app.bulk.local.LocalCaptioner) and the `--url` mode (app.bulk.remote.RemoteCaptioner) are two.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.bulk.errors import BulkError
from app.bulk.output import Record, display_path, error_record, open_output
from app.bulk.source import Item, scan_source

Captioner = Callable[[Sequence[Item]], Iterable[list[Record]]]


@dataclass
class Summary:
    """What a run did: `ok` is exit status 0 (every image it tried was captioned), else 1."""

    images: int = 0  # images found in the folder
    skipped: int = 0  # of them, already in the output
    captioned: int = 0  # captioned by this run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, "code: message"), this run's
    not_images: list[str] = field(default_factory=list)
    stopped: str | None = None  # why the run stopped early (a BulkError's message)

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped is None

    def add(self, records: Iterable[Record]) -> None:
        """Count records this run wrote."""
        for record in records:
            if record.failure is not None:
                self.failed.append((record.path, record.failure))
            else:
                self.captioned += 1

    def report(self, out: Path, log: Callable[[str], None]) -> None:
        """The summary lines: the counts, the other files, the first 20 failures, why it stopped."""
        log(f"caption-dir: {self.images} images found, {self.skipped} already in {out}, "
            f"{self.captioned} captioned now, {len(self.failed)} failed, "
            f"{len(self.not_images)} other files skipped (not images)")
        if self.not_images:
            shown = ", ".join(map(display_path, self.not_images[:10])) + (" ..." if len(self.not_images) > 10 else "")
            log(f"  not images: {shown}")
        for path, why in self.failed[:20]:
            log(f"  failed: {display_path(path)}: {why}")
        if len(self.failed) > 20:
            log(f"  ... and {len(self.failed) - 20} more failures (error records in {out})")
        if self.stopped:
            log(f"caption-dir: stopped early: {self.stopped}. Run the same command again to continue.")


def run(
    source: str | Path,
    out: Path,
    *,
    fmt: str | None = None,
    batch_size: int = 16,
    captioner: Captioner,
    retry_errors: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> Summary:
    """Scan `source` (a folder, a glob or a list of files: app.bulk.source.scan_source), skip what
    `out` already has, caption the rest with `captioner` and append the records to `out` (files that
    cannot be read get an `unreadable_file` record first); a progress bar (tqdm, on stderr) unless
    `progress` is false; the summary is logged and returned. BulkError for a source that is none of
    these, a bad `fmt` or `batch_size`, or an output file it cannot use."""
    from tqdm import tqdm

    out = Path(out)
    if batch_size < 1:
        raise BulkError("--batch-size must be at least 1")
    output = open_output(out, fmt, retry_errors=retry_errors, log=log)

    scan = scan_source(source, exclude=[out, output.temp_path])
    summary = Summary(images=len(scan.images), not_images=scan.not_images)
    todo = [item for item in scan.images if not output.is_done(item.rel)]
    summary.skipped = len(scan.images) - len(todo)
    fresh_unreadable = [(rel, msg) for rel, msg in scan.unreadable if not output.is_done(rel)]

    with output:
        if fresh_unreadable:
            records = [error_record(rel, "unreadable_file", msg) for rel, msg in fresh_unreadable]
            output.write(records)
            summary.add(records)
        bar = tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True,
                   desc="captioning")
        try:
            for records in captioner(todo) if todo else ():
                output.write(records)
                summary.add(records)
                bar.update(len(records))
        except BulkError as exc:
            summary.stopped = str(exc)
        finally:
            bar.close()
    summary.report(out, log)
    return summary
