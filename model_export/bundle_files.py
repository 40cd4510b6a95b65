"""Writing a bundle's files (docs/bundle-format.md), shared by the commands that write bundles.

* `file_entries`: the manifest's `files` block (each file's name, sha256 and size);
* `copy_bundle_files`: an existing bundle's files into such a staging folder (add-labels starts from them);
* `staged_bundle`: a staging folder beside the target that replaces the target only once the block
  that fills it has finished (`replace_dir`), and is removed, target untouched, when the block raises.
  `captioner export` (model_export/export.py) and `captioner add-labels` (model_export/labels.py)
  assemble whole bundles in it;
* `rewrite_manifest`: manifest.json replaced in place through a temporary file renamed over it, for
  the commands that change only the manifest: `captioner confidence --write` (model_export/confidence.py)
  and `captioner add-reference` (model_export/reference_captions.py).

No torch here; it imports only app.inference.bundle.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.inference.bundle import FileEntry, Manifest, sha256_file


def file_entries(**paths: Path) -> dict[str, FileEntry]:
    """The manifest's `files` block: each bundle file's name, sha256 and size."""
    return {key: FileEntry(path=path.name, sha256=sha256_file(path), bytes=path.stat().st_size)
            for key, path in paths.items()}


def copy_bundle_files(source: Path, manifest: Manifest, target: Path) -> None:
    """Copy a bundle's files (those its manifest lists, and eval.json if there is one) into `target`, the
    staging folder of a command that then changes some of them."""
    for entry in manifest.files.values():
        shutil.copy2(source / entry.path, target / entry.path)
    if (source / "eval.json").is_file():
        shutil.copy2(source / "eval.json", target / "eval.json")


def replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is swapped out only once `new` is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{int(time.time())}")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


@contextmanager
def staged_bundle(target: Path, purpose: str) -> Iterator[Path]:
    """An empty folder (mode 0755) beside `target`, on the same file system, named `.<target>.<purpose>-*`.
    When the block ends normally the folder replaces `target` (replace_dir); when it raises (a failed
    check, Ctrl-C) the folder is removed and `target` is left as it was."""
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{purpose}-", dir=target.parent))
    try:
        staging.chmod(0o755)
        yield staging
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def rewrite_manifest(bundle_dir: Path, manifest: Manifest) -> Path:
    """Replace the bundle's manifest.json with `manifest`: written to a temporary file beside it, then
    renamed over it, so a reader sees the old manifest or the new one, never half of one."""
    path = Path(bundle_dir) / "manifest.json"
    temporary = path.with_name(".manifest.json.tmp")
    temporary.write_text(manifest.to_json(), encoding="utf-8")
    temporary.replace(path)
    return path
