"""Benchmark 4: decoding uploads. JPEG draft mode (DCT-domain downscaling while decoding) vs a plain
full decode followed by the resize, on 1080p JPEGs; and images/s of the service's preprocessing pool.

    python bench/preprocess.py --json bench/results/preprocess.json
"""

from __future__ import annotations

import argparse
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from common import environment, write_report
from PIL import Image


def photo_jpegs(count: int, width: int = 1920, height: int = 1080, seed: int = 0) -> list[bytes]:
    """1080p JPEGs (quality 90) made from scikit-image photographs scaled up, with noise."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    out = []
    for i in range(count):
        img = Image.fromarray(photos[i % len(photos)]).resize((width, height), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, size=(height, width, 3), dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    from app.inference.bundle import Preprocessing
    from app.inference.preprocess import decode_image, draft_size, to_array

    spec = Preprocessing(image_size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), scale=255.0)
    jpegs = photo_jpegs(args.images, args.width, args.height)
    limit = 10 * args.width * args.height

    def plain(data: bytes) -> np.ndarray:
        return to_array(decode_image(data, limit, None), spec)

    def draft(data: bytes) -> np.ndarray:
        return to_array(decode_image(data, limit, draft_size(spec)), spec)

    report: dict = {"benchmark": "preprocess", "environment": environment(), "settings": vars(args),
                    "jpeg_kib_mean": round(float(np.mean([len(j) for j in jpegs])) / 1024, 1), "images_per_s": {}}
    for name, fn in (("plain_decode_then_resize", plain), ("draft_mode_decode", draft)):
        fn(jpegs[0])
        start = time.perf_counter()
        for data in jpegs:
            fn(data)
        report["images_per_s"][name] = round(len(jpegs) / (time.perf_counter() - start), 1)
    diff = np.abs(plain(jpegs[0]) - draft(jpegs[0])).mean() / 2.0  # inputs span [-1, 1]
    report["mean_abs_input_difference_0_to_1"] = round(float(diff), 4)
    for threads in args.threads:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(draft, jpegs[:threads]))
            start = time.perf_counter()
            list(pool.map(draft, jpegs))
            report["images_per_s"][f"draft_mode_pool_{threads}_threads"] = round(len(jpegs) / (time.perf_counter() - start), 1)
    rates = report["images_per_s"]
    report["speedup_draft_vs_plain"] = round(rates["draft_mode_decode"] / rates["plain_decode_then_resize"], 2)
    write_report(args.json, report)
    return report


if __name__ == "__main__":
    main()
