"""Caption every image in a folder: `captioner caption-dir DIR --out captions.jsonl` (DIR may also be
a glob or a list of paths/URIs; `--engine ray` runs it on a Ray cluster).

* Walks DIR recursively (sorted, symlinked folders not followed) and finds images by their content
  (the file's first bytes: JPEG, PNG, GIF, WebP, BMP, TIFF), whatever their extension. Other files
  (text, archives, ...) are not images: they are counted and named on stderr, not written.
* Captions in batches of `--batch-size` images, either locally (the bundle, the Engine and the
  service's preprocessing: decode_image / to_array / draft_size) or, with `--url`, by sending the files
  to a running service's `POST /v1/captions/batch`, `--concurrency` requests at a time, retrying 429,
  502, 503, 504 and connection failures with exponential backoff (a Retry-After header is honoured).
* Writes one record per image (paths relative to DIR, `/`-separated), as JSON lines (default) or CSV
  (`--format csv`, or an --out ending in .csv); the schema is in app/bulk/output.py.
* ImageNet labels (`--labels K`; default as the HTTP API: the default_labels setting, or the
  service's, when the model has labels, else 0): a captioned image's K best ImageNet-1k classes, best
  first, probabilities rounded to 6 decimals. K > 0 for a model without labels is refused before any
  work.
* Files that cannot be used (unreadable, corrupt, too large) are recorded with an `error` and the
  run goes on; a summary on stderr names them. The exit status is 0 when this run captioned every
  image it tried, 1 when some failed (or the run stopped early), 2 for bad options or a model that
  cannot load. Only regular files are read: a FIFO, a socket, a device or a broken link is an
  `unreadable_file` record "not a regular file (...)", never opened. Any file name is captioned: one
  that is not UTF-8 is written as `path` (`\\xNN` for such bytes) plus `path_bytes_b64` (output.py).
* Resumable: paths already in the output (captioned or failed) are skipped, so running the same
  command again continues where it stopped; a truncated last line (a killed run) is cut off first.
  `--retry-errors` drops the error records first, so those files are tried again.

What is where:

  source.py   the files of a folder (`iter_files`, `list_files`, `scan_folder`), images by content
              (`sniff_image`), `Item`, batches (`in_batches`), bytes -> encoder input (`ImagePrep`)
  output.py   the record schema (`Record`, `error_record`, the CSV `labels` cell), the JSON-lines and
              CSV files and the Parquet folder, resuming (`Output`, `ParquetOutput`, `open_output`)
  job.py      one run with any captioner: scan, resume, caption, write, the progress bar and the
              `Summary` (`run`)
  local.py    the local mode: `LocalCaptioner` (the Engine in this process), `caption_locally`
  remote.py   the `--url` mode: `ServiceClient` (httpx, retries), `RemoteCaptioner`, `caption_remotely`
  ray_runner.py  `--engine ray`: `RayCaptioner` (Ray Data: read tasks, a pool of `CaptionActor`s, the
              records back to the driver in order); the only module that imports ray (the `ray` extra)
  command.py  the typer command `caption_dir` (options, exit statuses)
  errors.py   `BulkError`: the run cannot go on

A runner of its own (on other machines, say) reuses source.py, output.py and job.py: `run(folder,
out, captioner=...)` takes any callable from the items to do to their records, batch by batch.
Importing this package (or any of its modules but command.py and remote.py) loads neither typer,
the engine, Pillow nor an HTTP client: `caption_dir` and the remote names are looked up on first use,
and the local mode imports the engine when it loads the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from app.bulk.errors import BulkError
from app.bulk.job import Captioner, Summary, run
from app.bulk.local import LocalCaptioner, caption_locally
from app.bulk.output import (
    CSV_COLUMNS,
    FORMATS,
    OLD_CSV_COLUMNS,
    Output,
    Record,
    caption_dicts,
    error_record,
    format_for,
    label_dicts,
    labels_from_csv,
    labels_to_csv,
    open_output,
)
from app.bulk.source import (
    SNIFF_BYTES,
    ImagePrep,
    Item,
    Listing,
    Scan,
    in_batches,
    iter_files,
    list_files,
    os_message,
    scan_folder,
    sniff_file,
    sniff_image,
)

if TYPE_CHECKING:
    from app.bulk.command import caption_dir
    from app.bulk.remote import RETRY_STATUSES, RemoteCaptioner, ServiceClient, caption_remotely, retry_after_seconds

# Looked up on first use: the command needs typer, the remote mode httpx.
_LAZY = {"caption_dir": "app.bulk.command", "RETRY_STATUSES": "app.bulk.remote", "RemoteCaptioner": "app.bulk.remote",
         "ServiceClient": "app.bulk.remote", "caption_remotely": "app.bulk.remote",
         "retry_after_seconds": "app.bulk.remote"}

__all__ = [
    "CSV_COLUMNS", "FORMATS", "OLD_CSV_COLUMNS", "RETRY_STATUSES", "SNIFF_BYTES", "BulkError", "Captioner", "ImagePrep",
    "Item", "Listing", "LocalCaptioner", "Output", "Record", "RemoteCaptioner", "Scan", "ServiceClient", "Summary",
    "caption_dicts", "caption_dir", "caption_locally", "caption_remotely", "error_record", "format_for", "in_batches",
    "iter_files", "label_dicts", "labels_from_csv", "labels_to_csv", "list_files", "open_output", "os_message",
    "retry_after_seconds", "run", "scan_folder", "sniff_file", "sniff_image",
]


def __getattr__(name: str) -> Any:
    """The command and the remote names, imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
