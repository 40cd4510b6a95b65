"""Bytes -> RGB image -> the encoder's input array, exactly as the bundle's manifest says.

The training side calls `to_array` too, so the model is trained on the same pixels it serves.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from app.inference.bundle import Preprocessing

# Formats we accept; anything else Pillow might open (EPS, PDF, ...) is refused as unsupported.
ACCEPTED_FORMATS = {"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "MPO"}
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageDecodeError(Exception):
    """An upload that is not a usable image. `code` is one of: empty_file, unsupported_media_type,
    corrupt_image, image_too_large (raised here), file_too_large (raised by app/api/pipeline.py, which
    reads the upload)."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode != "F":
            arr = arr / 257.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else arr
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an upload into an upright RGB image (first frame of an animation).

    The pixel count is checked from the header before the pixels are decoded, so a decompression
    bomb costs nothing. `draft_size` (width, height) lets JPEG decode at a reduced scale that is still
    at least that big (DCT scaling), which is much faster for large photos.
    """
    if not data:
        raise ImageDecodeError("empty_file", "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError("unsupported_media_type", "the upload is not an image in a supported format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("image_too_large", "the image has too many pixels") from None
    except Exception as exc:  # Pillow raises many types for garbage headers
        raise ImageDecodeError("corrupt_image", f"the image header cannot be read ({type(exc).__name__})") from None
    if img.format not in ACCEPTED_FORMATS:
        raise ImageDecodeError(
            "unsupported_media_type", f"image format {img.format} is not supported (use JPEG, PNG, GIF, WebP, BMP or TIFF)"
        )
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt_image", "the image has no pixels")
    if width * height > max_pixels:
        raise ImageDecodeError(
            "image_too_large", f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if img.format == "JPEG" and draft_size is not None and img.mode in ("RGB", "L"):
        fast = _decode_jpeg(data, img, draft_size)
        if fast is not None:
            return fast
    try:
        if img.format in ("JPEG", "MPO") and draft_size is not None:
            img.draft("RGB", draft_size)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Image.DecompressionBombError:
        raise ImageDecodeError("image_too_large", "the image has too many pixels") from None
    except Exception as exc:  # truncated data, bad chunks, broken LZW streams...
        raise ImageDecodeError("corrupt_image", f"the image data is truncated or corrupt ({type(exc).__name__})") from None


# EXIF orientation -> the transposition that makes the image upright (what ImageOps.exif_transpose applies)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# start-of-frame markers of sequential (non-progressive) Huffman JPEGs: baseline and extended
_SEQUENTIAL_SOF = {0xC0, 0xC1}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn: markers without a length


def sequential_jpeg_pixels(data: bytes, max_segments: int = 64) -> int | None:
    """width x height of a sequential (baseline or extended) JPEG, read from its frame header; None for
    anything else: not a JPEG, progressive or lossless, a header that does not parse, or more than
    `max_segments` marker segments before the first scan (real files have a handful: APPn, DQT, SOF, DHT).

    It tells what is cheap to decode: a sequential JPEG decodes in time bounded by its pixels and bytes,
    while a progressive one can carry thousands of scans that each pass over the image, and thousands of
    segments before the first scan would cost Pillow's `Image.open` (a marker loop in Python) as much.
    Hand-written because it must stay cheap for any input: `Image.open` is that loop, and simplejpeg's header
    reader does not say whether a file is progressive."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, pixels = 2, None
    for _ in range(max_segments):
        while pos + 1 < len(data) and data[pos] == 0xFF and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker == 0xDA:  # the first scan: the header is over
            return pixels
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SEQUENTIAL_SOF and pixels is None:
            if length < 8 or pos + 9 > len(data):
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            if not (width and height):
                return None
            pixels = width * height
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker in (0xD8, 0xD9) or length < 2:
            return None  # another kind of frame (or a second one), or an image boundary before any scan
        pos += 2 + length
    return None


def draft_scale(size: tuple[int, int], draft_size: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's `Image.draft` picks: the largest that keeps the image at least
    `draft_size` in both directions."""
    scale = min(size[0] // max(1, draft_size[0]), size[1] // max(1, draft_size[1]))
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _decode_jpeg(data: bytes, header: Image.Image, draft_size: tuple[int, int]) -> Image.Image | None:
    """A baseline or progressive RGB/greyscale JPEG decoded with libjpeg-turbo through simplejpeg, at Pillow's
    draft scale: the same pixels as `Image.draft` + `load` + `ImageOps.exif_transpose` (tests/test_preprocess.py
    checks it across sizes, chroma subsamplings, greyscale and every EXIF orientation) in about 70 % of the
    time, without Pillow's per-image decoder set-up (docs/performance.md, "The front end"). None when libjpeg
    reports any problem, even one it could recover from: Pillow then decodes the file and decides its error."""
    scale = draft_scale(header.size, draft_size)
    width, height = (-(-side // scale) for side in header.size)  # the size Pillow's draft decodes to
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if header.mode == "L" else "RGB",
                                        min_width=width, min_height=height, strict=True)
    except ValueError:
        return None
    if pixels.shape[:2] != (height, width):
        return None  # simplejpeg chose another scale: let Pillow do it
    try:
        orientation = header.getexif().get(0x0112, 1)
    except Exception:  # EXIF Pillow cannot read: its own path decides (corrupt_image, as before)
        return None
    img = Image.fromarray(pixels[:, :, 0] if pixels.ndim == 3 and header.mode == "L" else pixels)
    transpose = _ORIENTATION.get(orientation)
    if transpose is not None:
        img = img.transpose(transpose)
    return _to_rgb(img)


def draft_size(spec: Preprocessing) -> tuple[int, int]:
    """The JPEG draft size: the model's input. Pillow decodes at the largest DCT scale (1/2, 1/4,
    1/8) that keeps the image at least this big, and the antialiased resize does the rest (a 640x480
    photo: 1.6 instead of 2.8 ms to decode; bench/preprocess.py measures 1080p)."""
    height, width = spec.image_size
    return (width, height)


def _normaliser(spec: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """float32 [3, 1, 1] mean and std, both times the manifest's scale: value = (pixel - mean) / std."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1) * np.float32(spec.scale)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1) * np.float32(spec.scale)
    return mean, std


_NORMALISERS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def to_array(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    """RGB image -> float32 [3, H, W] normalised as the manifest says: the uint8 pixels converted
    straight into the planar output, then (x - mean) / std in place, in float32 (the same rounding as
    computing each level's value alone: tests/test_preprocess.py)."""
    height, width = spec.image_size
    if img.mode != "RGB":
        img = _to_rgb(img)
    if img.size != (width, height):
        img = img.resize((width, height), _RESAMPLE[spec.resample])
    key = (tuple(spec.mean), tuple(spec.std), float(spec.scale))
    normaliser = _NORMALISERS.get(key)
    if normaliser is None:
        normaliser = _NORMALISERS[key] = _normaliser(spec)
    mean, std = normaliser
    out = np.empty((3, height, width), dtype=np.float32)
    np.copyto(out, np.asarray(img).transpose(2, 0, 1), casting="unsafe")  # uint8 [H, W, 3] -> float32 [3, H, W]
    out -= mean
    out /= std
    return out
