"""Where the images of a caption-dir run come from, and how their bytes become encoder input.

* `iter_files` / `list_files`: every file under a folder (recursively, sorted, symlinked folders not
  followed), as `Item`s keyed by their path relative to the folder, `/`-separated.
* `sniff_image` / `sniff_file`: an image is found by its content (the first `SNIFF_BYTES` bytes:
  JPEG, PNG, GIF, WebP, BMP, TIFF), whatever its extension.
* `scan_folder`: both together, the files sorted into images, other files and unreadable ones.
* `ImagePrep`: bytes -> the encoder's input array, with the service's preprocessing (decode_image,
  to_array, the JPEG draft size); an `ImageDecodeError` for a file that is not a usable image.
* `in_batches`: consecutive batches of items.
* `read_regular`: only regular files are read (symbolic links to them followed): a FIFO, a socket, a
  device (a link to /dev/zero), a folder or a broken link is a `NotRegularFile` (an OSError, so an
  `unreadable_file` record "not a regular file (...)"), checked with os.stat before the open and with
  os.fstat after it (opened O_NONBLOCK), so nothing waits on a pipe or reads an endless device.
* Names: an `Item.rel` is a str; a name that is not UTF-8 keeps its bytes as surrogates
  (os.fsdecode's surrogateescape), so the file opens as named; app/bulk/output.py writes it readably
  and losslessly (`display_path`, `path_bytes_b64`).

Nothing here imports the engine, typer or an HTTP client, and app.inference.preprocess (Pillow, numpy) only
when an `ImagePrep` is first used, so a runner on other machines (Ray workers) can use all of it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from app.inference.bundle import Preprocessing

SNIFF_BYTES = 32  # how much of a file `sniff_image` needs

T = TypeVar("T")


def sniff_image(head: bytes) -> str | None:
    """The image format from a file's first bytes, or None if it is not an image we caption."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (12, 16, 40, 52, 56, 64, 108, 124):
        return "BMP"  # "BM" plus a known DIB header size, so a text file starting "BM" is not one
    return None


def sniff_file(path: Path) -> str | None:
    """`sniff_image` of the file's first bytes. OSError if it cannot be read (`NotRegularFile` if it is
    not a regular file)."""
    return sniff_image(read_regular(path, SNIFF_BYTES))


class NotRegularFile(OSError):
    """The path is not a regular file (a FIFO, a socket, a device, a folder, a broken symbolic link):
    caption-dir records it as `unreadable_file`, "not a regular file (a named pipe)", and never
    opens it (a FIFO would block, a device such as /dev/zero never ends)."""

    def __init__(self, what: str):
        super().__init__(errno.EINVAL, f"not a regular file ({what})")


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, in words (for a `NotRegularFile`)."""
    kinds = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def read_regular(path: Path | str, limit: int | None = None) -> bytes:
    """The bytes of a regular file (its first `limit` bytes, or all of it), following symbolic links.

    Anything else is a `NotRegularFile` before it is opened (os.stat: a FIFO would block the open, a
    device such as /dev/zero would be read for ever, a tape or a serial port has side effects); it is
    opened with O_NONBLOCK and checked again with os.fstat (the path may have changed in between), so no
    read ever waits on a writer. OSError for a file that cannot be read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise NotRegularFile("a broken symbolic link") from None
        raise
    if not stat.S_ISREG(mode):
        raise NotRegularFile(file_kind(mode))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(file_kind(mode))
        return handle.read() if limit is None else handle.read(limit)


def os_message(exc: OSError) -> str:
    """The message an `unreadable_file` error record carries for `exc`."""
    return exc.strerror or str(exc)


@dataclass
class Item:
    """One file of the source."""

    rel: str  # relative to the folder, "/"-separated (or as a list file names it): the record's key
    path: Path
    uri: str | None = None  # a URI (s3://, gs://, ... from a list file): read through pyarrow's file systems

    @property
    def location(self) -> str:
        """Where to read it: the URI, else the local path."""
        return self.uri if self.uri is not None else str(self.path)

    def read(self) -> bytes:
        """The file's bytes. OSError if it cannot be read (`NotRegularFile`: not a regular file)."""
        return read_location(self.location)


def read_location(location: str) -> bytes:
    """The bytes at a local path (a regular file only: `read_regular`) or a URI (pyarrow's file systems:
    s3://, gs://, hdfs://, where the user has configured them). OSError if they cannot be read."""
    if "://" not in location:
        return read_regular(location)
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(location)
        with fs.open_input_stream(inner) as stream:
            return bytes(stream.read())
    except (OSError, ValueError) as exc:  # pyarrow raises OSError subclasses, or ValueError for a bad URI
        raise OSError(str(exc) or type(exc).__name__) from None


@dataclass
class Listing:
    """`list_files`: the files, and the folders that could not be listed."""

    files: list[Item] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (rel + "/", message)


@dataclass
class Scan:
    """`scan_folder`: the files sorted into images, other files, and files or folders that could not
    be read (those get an `unreadable_file` error record)."""

    images: list[Item] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (rel, message); a folder's rel ends in "/"


def iter_files(root: Path, exclude: Iterable[Path] = (),
               on_error: Callable[[str, str], None] | None = None) -> Iterator[Item]:
    """Every file under `root`, recursively, sorted (folder by folder, as os.walk goes; symlinked
    folders are not followed), except the paths in `exclude` (the output file, ...). A folder that
    cannot be listed is passed to `on_error(rel + "/", message)` ("./" for `root` itself) as the walk
    meets it, and skipped."""
    root = Path(root)
    skip = {Path(p).resolve() for p in exclude}

    def walk_error(exc: OSError) -> None:
        if on_error is None:
            return
        where = Path(exc.filename) if exc.filename else root
        rel = where.relative_to(root).as_posix() if where != root and where.is_relative_to(root) else "."
        on_error(rel + "/", os_message(exc))

    for folder, dirs, files in os.walk(root, onerror=walk_error):
        dirs[:] = sorted(d for d in dirs if (Path(folder) / d).resolve() not in skip)  # e.g. a Parquet output
        for name in sorted(files):
            path = Path(folder) / name
            if path.resolve() in skip:
                continue
            yield Item(path.relative_to(root).as_posix(), path)


def list_files(root: Path, exclude: Iterable[Path] = ()) -> Listing:
    """The candidate files of a folder (see `iter_files`), not yet sniffed: a runner that reads the
    files elsewhere sniffs them there (`sniff_image` of the first `SNIFF_BYTES` bytes)."""
    listing = Listing()
    listing.files = list(iter_files(root, exclude, on_error=lambda rel, msg: listing.unreadable.append((rel, msg))))
    return listing


def scan_folder(root: Path, exclude: Iterable[Path] = ()) -> Scan:
    """Every file under `root` (see `iter_files`), sorted into images (by content), other files, and
    unreadable files and folders (in the order the walk met them)."""
    scan = Scan()
    return _sniffed(iter_files(root, exclude, on_error=lambda rel, msg: scan.unreadable.append((rel, msg))), scan)


GLOB_CHARS = frozenset("*?[")
SOURCE_KINDS = "a folder, a glob (e.g. 'photos/**/*.jpg') or a text file listing paths or URIs, one per line"


def scan_source(source: str | Path, exclude: Iterable[Path] = ()) -> Scan:
    """The images of a SOURCE: a folder (`scan_folder`: by content, paths relative to it), a glob
    (matches sorted, sniffed, paths relative to the part before the first wildcard), or a text file
    listing local paths (relative ones to the list's folder) or URIs, one per line (blank lines and
    `#` comments skipped; local files are sniffed, URIs are read and checked by the runner). BulkError
    for anything else."""
    from app.bulk.errors import BulkError

    text = str(source)
    path = Path(text)
    if path.is_dir():
        return scan_folder(path, exclude)
    if GLOB_CHARS & set(text):
        import glob as globbing

        base = Path(text.split("*")[0].split("?")[0].split("[")[0])
        base = base if text.endswith("/") or base.is_dir() else base.parent
        skip = {Path(p).resolve() for p in exclude}
        matches = [Path(m) for m in sorted(globbing.glob(text, recursive=True))]
        return _sniffed([Item(m.relative_to(base).as_posix() if m.is_relative_to(base) else m.as_posix(), m)
                         for m in matches if not m.is_dir() and m.resolve() not in skip])  # a FIFO: a record
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise BulkError(f"{source}: cannot read the list of files ({exc})") from None
        items, uris = [], []
        for line in (ln.strip() for ln in lines):
            if not line or line.startswith("#"):
                continue
            if "://" in line:
                uris.append(Item(line, Path(), uri=line))
            else:
                items.append(Item(line, path.parent / line))
        scan = _sniffed(items)
        scan.images += uris
        return scan
    raise BulkError(f"{source} is not {SOURCE_KINDS}")


def _sniffed(items: Iterable[Item], scan: Scan | None = None) -> Scan:
    """`items` sorted into `scan` (a new one by default) by content: images, other files, unreadable."""
    scan = Scan() if scan is None else scan
    for item in items:
        try:
            kind = sniff_file(item.path)
        except OSError as exc:
            scan.unreadable.append((item.rel, os_message(exc)))
            continue
        if kind:
            scan.images.append(item)
        else:
            scan.not_images.append(item.rel)
    return scan


def in_batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    """`items` in consecutive lists of `size` (the last one shorter)."""
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


@dataclass(frozen=True)
class ImagePrep:
    """Bytes -> the encoder's input array ([3, H, W] float32), as the service and the local mode do
    it: decode_image (at most `max_pixels`, JPEGs drafted at the model's size), then to_array.
    Raises app.inference.preprocess.ImageDecodeError (`.code`, `.message`: the error record's) for bytes that
    are not a usable image. Picklable: build it once and ship it to the workers.

        prep = ImagePrep(engine.bundle.preprocessing, settings.max_image_pixels)
        array = prep(item.read())
    """

    spec: Preprocessing
    max_pixels: int

    def __call__(self, data: bytes) -> np.ndarray:
        from app.inference.preprocess import decode_image, draft_size, to_array

        return to_array(decode_image(data, self.max_pixels, draft_size(self.spec)), self.spec)
