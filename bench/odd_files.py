"""caption-dir over odd files (issue 24): `--files` images under names that are not UTF-8, plus a named
pipe (FIFO), a socket and a device file (a symbolic link to /dev/zero), captioned by `captioner
caption-dir` (the real command, `python -m app.cli caption-dir`, in a subprocess with a deadline) on the
tiny bundle (model_export/tiny_bundle.py `make_tiny_bundle`), into JSON lines, CSV and Parquet; then the
JSON-lines run again (resume). Counts, per format, that every regular image has exactly one record and
it holds captions, and that each odd file is one error record "not a regular file".

    python bench/odd_files.py --json bench/results/odd_files.json

The images are generated (Pillow, random noise, 64 x 48, JPEG and PNG by turns), in the folder's top
level and in two subfolders, one of them with a name that is not UTF-8 itself. A record's file is
`base64.b64decode(path_bytes_b64)` where present, else `path` in UTF-8 (README, "Captioning a folder").
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Bytes that are not UTF-8 in a name: a lone continuation byte, Latin-1 letters, invalid lead bytes.
ODD_BYTES = [b"\xff\xfe", b"caf\xe9", b"\x80", b"na\xefve", b"\xc3(", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]
SUBFOLDERS = [b"", b"plain/", b"dir-\xfe\xfd/"]
ODD_KINDS = {b"pipe.jpg": "named pipe", b"socket.jpg": "socket", b"zero.jpg": "character device"}


def build(root: Path, files: int) -> tuple[set[bytes], socket.socket]:
    """The folder: `files` images (their relative paths as bytes, returned) and the three odd files; the
    socket is returned to be closed after the run."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    broot = os.fsencode(root)
    images: set[bytes] = set()
    for sub in SUBFOLDERS:
        os.makedirs(os.path.join(broot, sub), exist_ok=True)
    for i in range(files):
        fmt, ext = ("JPEG", b".jpg") if i % 2 == 0 else ("PNG", b".png")
        rel = SUBFOLDERS[i % len(SUBFOLDERS)] + b"%03d-" % i + ODD_BYTES[i % len(ODD_BYTES)] + ext
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        with open(os.path.join(broot, rel), "wb") as handle:
            Image.fromarray(pixels).save(handle, fmt)
        images.add(rel)
    os.mkfifo(os.path.join(broot, b"pipe.jpg"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(broot, b"socket.jpg"))
    os.symlink(b"/dev/zero", os.path.join(broot, b"zero.jpg"))
    return images, sock


def caption_dir(folder: Path, out: Path, bundle: Path, timeout: float) -> dict:
    command = [sys.executable, "-m", "app.cli", "caption-dir", str(folder), "--out", str(out), "--bundle", str(bundle),
               "--device", "cpu", "--no-progress"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"exit": None, "seconds": round(time.perf_counter() - started, 2), "hung": True, "summary": ""}
    summary = next((line for line in done.stderr.splitlines() if line.startswith("caption-dir:")), done.stderr[-500:])
    return {"exit": done.returncode, "seconds": round(time.perf_counter() - started, 2), "hung": False,
            "summary": summary}


def records(out: Path, fmt: str) -> list[dict]:
    """The records of an output as {path, path_bytes_b64?, captions | error} dicts (CSV: one per row)."""
    if fmt == "jsonl":
        return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    if fmt == "csv":
        with open(out, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        by_file: dict[tuple[str, str], dict] = {}
        for row in rows:  # one row per caption: back to one record per file
            record = by_file.setdefault((row["path"], row["path_bytes_b64"]),
                                        {"path": row["path"], "path_bytes_b64": row["path_bytes_b64"] or None})
            if row["error_code"]:
                record["error"] = {"code": row["error_code"], "message": row["error_message"]}
            else:
                record.setdefault("captions", []).append({"text": row["text"]})
        return list(by_file.values())
    import pyarrow.parquet as pq

    return [{"path": row["path"], "path_bytes_b64": row["path_bytes_b64"], "captions": row["captions"],
             **({"error": {"code": row["error_code"], "message": row["error_message"]}} if row["error_code"] else {})}
            for row in pq.read_table(out).to_pylist()]


def count(found: list[dict], images: set[bytes]) -> dict:
    seen: dict[bytes, int] = {}
    captioned = 0
    odd: dict[str, str] = {}
    for record in found:
        raw = base64.b64decode(record["path_bytes_b64"]) if record.get("path_bytes_b64") else record["path"].encode()
        seen[raw] = seen.get(raw, 0) + 1
        if raw in ODD_KINDS:
            odd[raw.decode()] = (record.get("error") or {}).get("message", "captioned?!")
        elif record.get("captions") and not record.get("error"):
            captioned += 1
    odd_ok = all(kind in odd.get(name.decode(), "") and odd[name.decode()].startswith("not a regular file")
                 for name, kind in ODD_KINDS.items())
    return {
        "records": len(found),
        "images_captioned": captioned,
        "images_once": sum(1 for raw in images if seen.get(raw) == 1),
        "images_missing": sum(1 for raw in images if raw not in seen),
        "duplicates": sum(1 for n in seen.values() if n > 1),
        "unexpected": sum(1 for raw in seen if raw not in images and raw not in ODD_KINDS),
        "odd_files": odd,
        "odd_files_ok": odd_ok,
        "readable_paths": all(isinstance(r["path"], str) and r["path"].isprintable() for r in found),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200, help="images with names that are not UTF-8")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline of each caption-dir run, seconds")
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args()

    from model_export.tiny_bundle import make_tiny_bundle

    with tempfile.TemporaryDirectory(prefix="odd-files-") as tmp:
        work = Path(tmp)
        bundle = make_tiny_bundle(work / "bundle", attention=True)
        folder = work / "photos"
        images, sock = build(folder, args.files)
        report: dict = {"files": args.files, "odd_files": sorted(n.decode() for n in ODD_KINDS),
                        "non_utf8_names": sum(1 for raw in images if not _utf8(raw)), "formats": {}}
        try:
            for fmt in ("jsonl", "csv", "parquet"):
                out = work / f"captions.{fmt}"
                run = caption_dir(folder, out, bundle, args.timeout)
                result = {**run, **(count(records(out, fmt), images) if not run["hung"] else {})}
                if fmt == "jsonl":
                    again = caption_dir(folder, out, bundle, args.timeout)
                    result["resume"] = {**again, **(count(records(out, fmt), images) if not again["hung"] else {})}
                report["formats"][fmt] = result
        finally:
            sock.close()
    runs = [*report["formats"].values(), report["formats"]["jsonl"]["resume"]]
    report["every_image_captioned_once"] = all(
        not r["hung"] and r["images_once"] == args.files and r["images_captioned"] == args.files
        and r["duplicates"] == 0 and r["unexpected"] == 0 and r["odd_files_ok"] for r in runs)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0 if report["every_image_captioned_once"] else 1


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


if __name__ == "__main__":
    sys.exit(main())
