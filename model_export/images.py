"""Image files -> model input arrays for training and evaluation. No torch here.

Images go through the serving side's own decoding and preprocessing (`app.inference.preprocess`), so the
model is trained and evaluated on exactly the pixels the service feeds it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app.inference.bundle import Preprocessing
from app.inference.preprocess import ImageDecodeError, decode_image, draft_size, to_array
from model_export.data.errors import DatasetError

TRAINING_MAX_PIXELS = 200_000_000


def load_pixels(path: Path, spec: Preprocessing) -> np.ndarray:
    """One image file -> float32 [3, H, W]; DatasetError naming the file if it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(path, f"cannot read image: {exc.strerror or exc}") from None
    try:
        image = decode_image(data, max_pixels=TRAINING_MAX_PIXELS, draft_size=draft_size(spec))
    except ImageDecodeError as exc:
        raise DatasetError(path, f"cannot read image: {exc.message}") from None
    return to_array(image, spec)


def iter_batches(paths: Sequence[Path], spec: Preprocessing, batch_size: int) -> Iterator[tuple[range, np.ndarray]]:
    """(index range, [n, 3, H, W] pixels) per batch; the next batch loads while the caller works."""
    ranges = [range(i, min(i + batch_size, len(paths))) for i in range(0, len(paths), batch_size)]

    def load(r: range) -> np.ndarray:
        return np.stack([load_pixels(paths[i], spec) for i in r])

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, ranges[0]) if ranges else None
        for n, r in enumerate(ranges):
            pixels = pending.result()
            if n + 1 < len(ranges):
                pending = pool.submit(load, ranges[n + 1])
            yield r, pixels
