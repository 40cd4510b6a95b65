"""Attention maps: the encoder-grid weights of a caption's words, as data and as a picture.

`attention_map(caption, bundle)` turns an engine `Caption` (asked with `attention=True`) into the
JSON-able `{grid, tokens, weights}` the API answers. `render_attention_png(image, tokens, weights,
grid)` draws the picture `POST /v1/captions/attention.png` answers: one panel per token (the words,
then `<end>`), each the upright image with that token's weights as a heatmap, titled with the token.
Pillow and numpy only (no matplotlib), and no state: both are pure functions (the API's 409 for a
model without attention is `app.api.pipeline.require_attention`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A perceptually ordered colour ramp (dark blue -> purple -> orange -> yellow), as anchors that
# are interpolated linearly; weight 0 is the first colour, the token's largest weight the last.
_RAMP = np.array(
    [
        [13, 8, 135],
        [126, 3, 168],
        [204, 71, 120],
        [248, 149, 64],
        [240, 249, 33],
    ],
    dtype=np.float32,
)


def grid_shape(bundle, cells: int | None = None) -> tuple[int, int]:
    """The encoder's feature grid [rows, cols]: the manifest's `architecture.grid_size`, unless that
    does not match the number of weights per token (`cells`), when a shape is derived from `cells`
    (square if it can be, else one row)."""
    manifest = getattr(bundle, "manifest", None)
    grid = manifest.architecture.grid_size if manifest is not None else None
    if isinstance(grid, (list, tuple)) and len(grid) == 2:
        rows, cols = int(grid[0]), int(grid[1])
        if cells is None or rows * cols == cells:
            return rows, cols
    if cells is None:
        raise ValueError("the bundle's manifest names no grid_size")
    side = math.isqrt(cells)
    return (side, side) if side * side == cells else (1, cells)


def token_labels(token_ids: Sequence[int], vocab: Sequence[str], end_id: int) -> list[str]:
    """One label per attention row: the generated tokens as the vocabulary spells them (special
    tokens such as `<unk>` included, so rows and labels line up), then `<end>`."""
    labels = [vocab[i] if 0 <= i < len(vocab) else f"<{i}>" for i in token_ids]
    labels.append(vocab[end_id] if 0 <= end_id < len(vocab) else "<end>")
    return labels


def attention_map(caption, bundle) -> dict | None:
    """`{grid: [rows, cols], tokens: [...], weights: [[P floats] per token]}` for an engine Caption
    decoded with attention, or None when it has none."""
    weights = getattr(caption, "attention", None)
    if weights is None:
        return None
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2:
        raise ValueError(f"expected attention [tokens, cells], got shape {weights.shape}")
    rows, cols = grid_shape(bundle, weights.shape[1])
    tokens = token_labels(caption.token_ids, bundle.vocab, bundle.special["end"])
    if len(tokens) != weights.shape[0]:  # never expected; keep labels and rows aligned regardless
        tokens = (tokens + [""] * weights.shape[0])[: weights.shape[0]]
    clean = np.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
    return {
        "grid": [rows, cols],
        "tokens": tokens,
        "weights": [[round(float(w), 6) for w in row] for row in clean],
    }


# ---- the picture ------------------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB along the colour ramp (shape + (3,))."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    pos = v * (len(_RAMP) - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, len(_RAMP) - 1)
    frac = (pos - low)[..., None]
    rgb = _RAMP[low] * (1.0 - frac) + _RAMP[high] * frac
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def heatmap(weights: Sequence[float], grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """One token's weights over the grid, upsampled smoothly to `size` (width, height) and scaled so
    the largest weight is 1: float32 [height, width] in [0, 1]."""
    rows, cols = grid
    cells = np.asarray(weights, dtype=np.float32).reshape(rows, cols)
    cells = np.nan_to_num(cells, nan=0.0, posinf=0.0, neginf=0.0)
    cells = np.clip(cells, 0.0, None)
    peak = float(cells.max(initial=0.0))
    cells = cells / peak if peak > 0 else cells
    small = Image.fromarray(cells.astype(np.float32), mode="F")
    big = small.resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.asarray(big, dtype=np.float32), 0.0, 1.0)


def overlay(image: Image.Image, weights: Sequence[float], grid: tuple[int, int], opacity: float = 0.6) -> Image.Image:
    """The image (dimmed where the token does not look) blended with the token's heatmap."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = rgb.shape[:2]
    heat = heatmap(weights, grid, (width, height))
    colors = colorize(heat).astype(np.float32)
    alpha = (opacity * (0.25 + 0.75 * heat))[..., None]
    mixed = rgb * (1.0 - alpha) + colors * alpha
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), "RGB")


def render_attention(
    image: Image.Image,
    tokens: Sequence[str],
    weights: Sequence[Sequence[float]] | np.ndarray,
    grid: tuple[int, int] | Sequence[int],
    *,
    panel: int = 224,
    columns: int = 4,
    title: str | None = None,
) -> Image.Image:
    """A grid of panels, one per token: the image, with that token's heatmap, titled with the token.
    `panel` is the longer side of each panel in pixels; `title` (e.g. the caption) goes on top."""
    weights = np.asarray(weights, dtype=np.float32)
    rows, cols = int(grid[0]), int(grid[1])
    if weights.ndim != 2 or weights.shape[1] != rows * cols:
        raise ValueError(f"weights must be [tokens, {rows * cols}], got shape {weights.shape}")
    if len(tokens) != weights.shape[0]:
        raise ValueError(f"{len(tokens)} tokens but {weights.shape[0]} rows of weights")
    if not tokens:
        raise ValueError("nothing to draw: no tokens")
    if panel < 16:
        raise ValueError("panel must be at least 16 pixels")

    base = image.convert("RGB")
    scale = panel / max(base.size)
    pw, ph = max(1, round(base.size[0] * scale)), max(1, round(base.size[1] * scale))
    base = base.resize((pw, ph), Image.Resampling.BILINEAR)

    font = _font(max(10, panel // 14))
    label_h = max(14, panel // 10)
    pad = max(4, panel // 40)
    ncols = max(1, min(columns, len(tokens)))
    nrows = math.ceil(len(tokens) / ncols)
    title_h = label_h + pad if title else 0
    width = ncols * pw + (ncols + 1) * pad
    height = title_h + nrows * (ph + label_h) + (nrows + 1) * pad

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for index, (token, row) in enumerate(zip(tokens, weights)):
        r, c = divmod(index, ncols)
        x = pad + c * (pw + pad)
        y = title_h + pad + r * (ph + label_h + pad)
        draw.text((x, y + 1), str(token), fill=(0, 0, 0), font=font)
        canvas.paste(overlay(base, row, (rows, cols)), (x, y + label_h))
    return canvas


def render_attention_png(
    image: Image.Image,
    tokens: Sequence[str],
    weights: Sequence[Sequence[float]] | np.ndarray,
    grid: tuple[int, int] | Sequence[int],
    **options,
) -> bytes:
    """`render_attention(...)` encoded as PNG bytes."""
    buf = io.BytesIO()
    render_attention(image, tokens, weights, grid, **options).save(buf, "PNG", optimize=False)
    return buf.getvalue()
