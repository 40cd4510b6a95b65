"""Synthetic "shapes" scenes: the data set the default captioning model is trained on.

Each image is 224x224 RGB with 1-4 non-overlapping filled shapes on a muted, noisy background
and four reference captions such as "a small red circle to the left of a large blue star".
Objects are named "{size} {colour} {shape}". Everything about image ``i`` of split ``s`` comes
from one random generator seeded with ``(seed, s, i)``, so any number of worker processes writes
byte-identical files.

``generate_scenes`` writes a Karpathy-format ``dataset.json`` (see :mod:`.karpathy`) whose image
entries carry an extra ``"scene"`` key with the drawn objects; ``attribute_accuracy`` scores
predicted captions against it.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import tempfile
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from multiprocessing import Pool
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .errors import DatasetError
from .karpathy import CaptionDataset, tokenize

__all__ = [
    "COLOURS",
    "IMAGE_SIZE",
    "SHAPES",
    "SIZES",
    "attribute_accuracy",
    "caption_objects",
    "generate_scenes",
    "object_extent",
    "render_scene",
    "scene_captions",
]

IMAGE_SIZE = 224
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Base RGB of each colour name; every object gets a small per-channel jitter (COLOUR_JITTER).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 40),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
# Nominal radius range in pixels (half the diameter of a circle of that size).
SIZES: dict[str, tuple[float, float]] = {"small": (20.0, 26.0), "large": (35.0, 45.0)}
COLOUR_JITTER = 12
MAX_ANGLE = 20.0  # degrees, either way
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Outline proportions as multiples of the nominal radius; _EXTENT is each outline's
# circumradius, used to keep objects apart and inside the image.
_SQUARE_HALF = 0.85
_TRIANGLE_R = 1.2
_STAR_OUTER, _STAR_INNER = 1.2, 0.5
_CROSS_ARM, _CROSS_HALF_WIDTH = 1.0, 0.35
_EXTENT = {
    "circle": 1.0,
    "square": _SQUARE_HALF * math.sqrt(2.0),
    "triangle": _TRIANGLE_R,
    "star": _STAR_OUTER,
    "cross": math.hypot(_CROSS_ARM, _CROSS_HALF_WIDTH),
}
_EDGE_MARGIN = 3.0  # px between an object's extent and the image border
_GAP = 6.0  # px between the extents of two objects
_MIN_DX = 14.0  # with 3-4 objects, x centres differ at least this much (clear left-to-right order)
_DOMINANCE = 1.3  # with 2 objects, the relation's axis offset is this much larger than the other
_SUPERSAMPLE = 2

_NUMBER_WORDS = {3: "three", 4: "four"}
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES if s != "cross"}, "crosses": "cross"}

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def object_extent(shape: str, radius: float) -> float:
    """Radius of the circle around ``shape`` drawn at nominal ``radius`` (any rotation)."""
    return _EXTENT[shape] * radius


def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Polygon of ``shape`` at nominal radius 1, centred on 0, y pointing down."""
    if shape == "square":
        h = _SQUARE_HALF
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [
            (_TRIANGLE_R * math.cos(math.radians(a)), _TRIANGLE_R * math.sin(math.radians(a)))
            for a in (-90.0, 30.0, 150.0)
        ]
    if shape == "star":
        points = []
        for k in range(10):
            r = _STAR_OUTER if k % 2 == 0 else _STAR_INNER
            a = math.radians(-90.0 + 36.0 * k)
            points.append((r * math.cos(a), r * math.sin(a)))
        return points
    if shape == "cross":
        a, w = _CROSS_ARM, _CROSS_HALF_WIDTH
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


_OUTLINES = {s: _unit_outline(s) for s in SHAPES if s != "circle"}


def _draw_object(canvas: np.ndarray, obj: Mapping[str, Any], rgb: np.ndarray) -> None:
    """Blend one filled, anti-aliased object into ``canvas`` (H, W, 3 float32) in place."""
    x, y, r = obj["x"], obj["y"], obj["radius"]
    ext = object_extent(obj["shape"], r)
    x0, y0 = max(int(x - ext) - 2, 0), max(int(y - ext) - 2, 0)
    x1, y1 = min(int(x + ext) + 3, IMAGE_SIZE), min(int(y + ext) + 3, IMAGE_SIZE)
    s = _SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = (x - x0) * s, (y - y0) * s
    if obj["shape"] == "circle":
        draw.ellipse([cx - r * s, cy - r * s, cx + r * s, cy + r * s], fill=255)
    else:
        a = math.radians(obj["angle"])
        cos_a, sin_a = math.cos(a) * r * s, math.sin(a) * r * s
        draw.polygon(
            [(cx + u * cos_a - v * sin_a, cy + u * sin_a + v * cos_a) for u, v in _OUTLINES[obj["shape"]]],
            fill=255,
        )
    small = mask.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS)
    alpha = np.asarray(small, dtype=np.float32)[..., None] * (1.0 / 255.0)
    region = canvas[y0:y1, x0:x1]
    region += (rgb - region) * alpha


def _muted_colour(rng: np.random.Generator) -> list[int]:
    """A low-saturation colour that none of the object colours can be mistaken for."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.75))
    return [round(255 * c) for c in rgb]


def _background(rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A flat, gradient, soft-striped or blotchy background and its description."""
    kind = ("flat", "gradient", "stripes", "blotches")[int(rng.integers(4))]
    c1, c2 = _muted_colour(rng), _muted_colour(rng)
    record: dict[str, Any] = {"kind": kind, "colours": [c1] if kind == "flat" else [c1, c2]}
    if kind == "flat":
        t = None
    elif kind in ("gradient", "stripes"):
        theta = rng.uniform(0.0, 2.0 * math.pi)
        proj = _XX * math.cos(theta) + _YY * math.sin(theta)
        if kind == "gradient":
            t = (proj - proj.min()) / (proj.max() - proj.min())
        else:
            period = rng.uniform(28.0, 72.0)
            phase = rng.uniform(0.0, 2.0 * math.pi)
            t = 0.5 + 0.35 * np.sin(proj * (2.0 * math.pi / period) + phase)  # soft: 0.15 to 0.85
    else:
        t = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
        for _ in range(int(rng.integers(3, 7))):
            bx, by = rng.uniform(0, IMAGE_SIZE, size=2)
            sigma = rng.uniform(18.0, 45.0)
            t += np.exp(((_XX - bx) ** 2 + (_YY - by) ** 2) * (-0.5 / sigma**2))
        np.clip(t, 0.0, 1.0, out=t)
    base = np.asarray(c1, np.float32)
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    canvas[:] = base
    if t is not None:
        canvas += t[..., None] * (np.asarray(c2, np.float32) - base)
    return canvas, record


def _fits(x: float, y: float, ext: float, placed: list[tuple[float, float, float]], n: int) -> bool:
    """Whether an object at (x, y) keeps clear of ``placed`` and keeps the captions unambiguous."""
    for px, py, pext in placed:
        dx, dy = abs(x - px), abs(y - py)
        if math.hypot(dx, dy) < ext + pext + _GAP:
            return False
        if n == 2 and max(dx, dy) < _DOMINANCE * min(dx, dy):
            return False
        if n >= 3 and dx < _MIN_DX:
            return False
    return True


def _place(rng: np.random.Generator, shapes: list[str], sizes: list[str]) -> list[tuple[float, float, float]]:
    """(x, y, radius) per object; turns large objects into small ones while they do not fit."""
    n = len(shapes)
    while True:
        radii = [round(float(rng.uniform(*SIZES[size])), 2) for size in sizes]
        exts = [object_extent(shape, r) for shape, r in zip(shapes, radii, strict=True)]
        for _layout in range(20):
            placed: list[tuple[float, float, float]] = []
            for ext in exts:
                lo, hi = ext + _EDGE_MARGIN, IMAGE_SIZE - ext - _EDGE_MARGIN
                for x, y in rng.uniform(lo, hi, size=(40, 2)).round(2).tolist():
                    if _fits(x, y, ext, placed, n):
                        placed.append((x, y, ext))
                        break
                else:
                    break
            if len(placed) == n:
                return [(x, y, r) for (x, y, _), r in zip(placed, radii, strict=True)]
        large = [k for k, size in enumerate(sizes) if size == "large"]
        if not large:  # cannot happen with the constants above; guards against edits to them
            raise RuntimeError(f"cannot place {n} small objects in {IMAGE_SIZE}x{IMAGE_SIZE}")
        sizes[large[int(rng.integers(len(large)))]] = "small"


def _name(obj: Mapping[str, Any]) -> str:
    return f"{obj['size']} {obj['colour']} {obj['shape']}"


def _listing(names: Sequence[str]) -> str:
    """'a X a Y and a Z'."""
    return " ".join(f"a {n}" for n in names[:-1]) + f" and a {names[-1]}"


def scene_captions(objects: Sequence[Mapping[str, Any]]) -> list[str]:
    """Four differently worded captions; the first is the canonical one.

    Objects are listed left to right by x centre, except that two objects further apart
    vertically than horizontally are described top to bottom ("above"). Every wording keeps that
    order, so the first object a caption names is never ambiguous.
    """
    ordered = sorted(objects, key=lambda o: o["x"])
    names = [_name(o) for o in ordered]
    if len(ordered) == 1:
        a = names[0]
        return [f"a {a}", f"there is a {a}", f"a single {a}", f"one {a} in the picture"]
    if len(ordered) == 2:
        left, right = ordered
        if abs(right["x"] - left["x"]) >= abs(right["y"] - left["y"]):
            a, b = names
            return [f"a {a} to the left of a {b}", f"a {a} on the left and a {b} on the right",
                    f"a {a} and a {b}", f"there is a {a} next to a {b}"]  # fmt: skip
        a, b = (_name(o) for o in sorted(ordered, key=lambda o: o["y"]))
        return [f"a {a} above a {b}", f"a {a} at the top and a {b} at the bottom",
                f"a {a} and a {b}", f"there is a {a} over a {b}"]  # fmt: skip
    if len(ordered) not in _NUMBER_WORDS:
        raise ValueError(f"scenes have 1 to 4 objects, got {len(ordered)}")
    number, listing = _NUMBER_WORDS[len(ordered)], _listing(names)
    return [
        f"a {names[0]} next to {_listing(names[1:])}",
        f"from left to right {listing}",
        f"{number} shapes {listing}",
        f"there are {number} shapes {listing}",
    ]


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


def render_scene(seed: int, split: str, index: int) -> tuple[Image.Image, dict[str, Any], list[str]]:
    """Image ``index`` of ``split``: the picture, its scene description and its four captions."""
    rng = _image_rng(seed, split, index)
    n = int(rng.integers(1, 5))
    shapes = [SHAPES[int(k)] for k in rng.integers(len(SHAPES), size=n)]
    colours = [list(COLOURS)[int(k)] for k in rng.integers(len(COLOURS), size=n)]
    sizes = [list(SIZES)[int(k)] for k in rng.integers(len(SIZES), size=n)]
    positions = _place(rng, shapes, sizes)
    canvas, background = _background(rng)
    objects = []
    for shape, colour, size, (x, y, radius) in zip(shapes, colours, sizes, positions, strict=True):
        angle = 0.0 if shape == "circle" else round(float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)), 1)
        obj = {"shape": shape, "colour": colour, "size": size, "x": x, "y": y,
               "radius": radius, "angle": angle}  # fmt: skip
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        rgb = np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255).astype(np.float32)
        _draw_object(canvas, obj, rgb)
        objects.append(obj)
    sigma = round(float(rng.uniform(2.0, 8.0)), 2)
    background["noise"] = sigma
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * sigma
    pixels = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    objects.sort(key=lambda o: o["x"])
    scene = {"objects": objects, "background": background}
    return Image.fromarray(pixels, "RGB"), scene, scene_captions(objects)


def _write_image(task: tuple[str, int, str, int]) -> tuple[dict[str, Any], list[str]]:
    """Worker: render one image, save it as JPEG, return its scene and captions."""
    path, seed, split, index = task
    image, scene, captions = render_scene(seed, split, index)
    image.save(path, "JPEG", quality=90)
    return scene, captions


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate_scenes(
    out_dir: str | PathLike[str],
    n_train: int = 20000,
    n_val: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Write ``images/{split}/{split}_{i:06d}.jpg`` and a Karpathy-format ``dataset.json``.

    Returns the path of ``dataset.json``; ``load_karpathy(that, out_dir)`` loads the set. Image
    ``i`` of split ``s`` depends only on ``(seed, s, i)``; nothing depends on ``workers``.
    """
    counts = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
    if any(n < 0 for n in counts.values()) or seed < 0:
        raise DatasetError(out_dir, "image counts and seed must be >= 0")
    out = Path(out_dir)
    tasks = []
    for split, n in counts.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        tasks += [(str(out / "images" / split / f"{split}_{i:06d}.jpg"), seed, split, i) for i in range(n)]

    with tqdm(total=len(tasks), desc="scenes", unit="img", disable=not progress) as bar:
        if workers <= 1:
            results = []
            for task in tasks:
                results.append(_write_image(task))
                bar.update()
        else:
            with Pool(workers) as pool:
                results = []
                for result in pool.imap(_write_image, tasks, chunksize=64):
                    results.append(result)
                    bar.update()

    images, sentid = [], 0
    for imgid, ((path, _, split, _), (scene, captions)) in enumerate(zip(tasks, results, strict=True)):
        sentences = [{"tokens": c.split(), "raw": c, "imgid": imgid, "sentid": sentid + k}
                     for k, c in enumerate(captions)]  # fmt: skip
        images.append({
            "filepath": f"images/{split}",
            "filename": Path(path).name,
            "imgid": imgid,
            "sentids": [s["sentid"] for s in sentences],
            "split": split,
            "sentences": sentences,
            "scene": scene,
        })  # fmt: skip
        sentid += len(sentences)
    json_path = out / "dataset.json"
    _write_json_atomic(json_path, {"dataset": "scenes", "seed": seed, "images": images})
    return json_path


def caption_objects(tokens: Sequence[str] | str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in order.

    A pair is a colour word followed by a shape word (singular or plural), with any size words
    in between ("red circle", "red small circle"). Accepts tokens or a raw string.
    """
    words = tokenize(tokens) if isinstance(tokens, str) else [t.lower() for t in tokens]
    pairs = []
    for j, word in enumerate(words):
        shape = _SHAPE_WORDS.get(word)
        if shape is None:
            continue
        k = j - 1
        while k >= 0 and words[k] in SIZES:
            k -= 1
        if k >= 0 and words[k] in COLOURS:
            pairs.append((words[k], shape))
    return pairs


def attribute_accuracy(predictions: Mapping[str | int, Sequence[str] | str], dataset: CaptionDataset) -> dict[str, Any]:
    """Share of images whose caption names exactly the scene's (colour, shape) multiset.

    ``predictions`` maps ``Example.image_id`` (or its ``str()``) to predicted tokens. Returns
    ``{"all": {"images", "correct", "accuracy"}, "by_objects": {"1": {...}, ..., "4": {...}}}``.
    """
    examples = {e.image_id: e for e in dataset.examples}
    by_str = {str(k): e for k, e in examples.items()}
    tallies = {str(n): [0, 0] for n in range(1, 5)}
    for image_id, tokens in predictions.items():
        example = examples.get(image_id) or by_str.get(str(image_id))
        if example is None:
            raise ValueError(f"prediction for unknown image id {image_id!r}")
        scene = example.extra.get("scene")
        if not isinstance(scene, dict):
            raise ValueError(f"image {image_id!r} has no scene description")
        truth = Counter((o["colour"], o["shape"]) for o in scene["objects"])
        tally = tallies.setdefault(str(len(scene["objects"])), [0, 0])
        tally[0] += 1
        tally[1] += Counter(caption_objects(tokens)) == truth

    def entry(images: int, correct: int) -> dict[str, Any]:
        return {"images": images, "correct": correct, "accuracy": correct / images if images else 0.0}

    total = [sum(t[0] for t in tallies.values()), sum(t[1] for t in tallies.values())]
    return {"all": entry(*total), "by_objects": {k: entry(*t) for k, t in tallies.items()}}
