"""The fast preprocessing paths give the very pixels of the plain ones (app/inference/preprocess.py).

* JPEGs decode through simplejpeg (libjpeg-turbo) at Pillow's draft scale: compared here with Pillow's
  own `draft` + `load` + `exif_transpose` over sizes that hit every DCT scale, odd sizes, chroma
  subsamplings, greyscale, progressive files, restart markers and all eight EXIF orientations.
* Files simplejpeg does not take, or reports a problem with, fall back to Pillow, which gives its errors.
* `sequential_jpeg_pixels` (which uploads are cheap enough to decode on the event loop) reads the pixel
  count of baseline and extended JPEGs only, and stays cheap and None for anything else.
* `to_array`'s in-place (x - mean) / std equals each uint8 level's value computed alone, for any
  mean/std/scale a manifest may hold.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from app.inference.bundle import Preprocessing
from app.inference.preprocess import ImageDecodeError, decode_image, draft_scale, sequential_jpeg_pixels, to_array

DRAFT = (224, 224)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with edges and noise (what JPEG's DCT and chroma upsampling are sensitive to)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c) for c in range(3)], axis=-1)
    base[(x // 40 + y // 40) % 2 == 0] *= 0.6
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def _jpeg(img: Image.Image, orientation: int | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif.tobytes()
    img.save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def _pillow(data: bytes, draft: tuple[int, int] | None = DRAFT) -> np.ndarray:
    """Pillow alone: what decode_image gave before simplejpeg."""
    img = Image.open(io.BytesIO(data))
    if draft is not None:
        img.draft("RGB", draft)
    img.load()
    return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


CASES = [
    # size, Pillow save options
    ((640, 480), {"quality": 90}),
    ((641, 479), {"quality": 90}),
    ((1000, 800), {"quality": 85}),  # DCT scale 2 (3/8 would also fit 224: the draft scale is kept)
    ((1920, 1080), {"quality": 80}),  # scale 4
    ((2400, 1800), {"quality": 75}),  # scale 8
    ((200, 150), {"quality": 95}),  # smaller than the draft: no scaling
    ((224, 224), {"quality": 95}),
    ((900, 500), {"quality": 90, "subsampling": 0}),  # 4:4:4
    ((900, 500), {"quality": 90, "subsampling": 1}),  # 4:2:2
    ((900, 500), {"quality": 90, "progressive": True}),
    ((900, 500), {"quality": 90, "optimize": True}),
    ((777, 555), {"quality": 70}),
]


@pytest.mark.parametrize(("size", "save"), CASES, ids=[f"{s[0]}x{s[1]}-{'-'.join(map(str, o.values()))}" for s, o in CASES])
def test_jpeg_pixels_equal_pillow_draft(size, save):
    data = _jpeg(_photo(*size), **save)
    got = np.asarray(decode_image(data, 10**9, DRAFT))
    want = _pillow(data)
    assert got.shape == want.shape
    assert np.array_equal(got, want)


def test_restart_markers_and_greyscale():
    # restart intervals (written by some cameras) and an 8-bit greyscale JPEG, which comes back as grey RGB
    img = _photo(800, 600, seed=3)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=88, restart_marker_blocks=4)
    data = buffer.getvalue()
    assert np.array_equal(np.asarray(decode_image(data, 10**9, DRAFT)), _pillow(data))
    grey = _jpeg(img.convert("L"), quality=88)
    got = decode_image(grey, 10**9, DRAFT)
    assert got.mode == "RGB"
    assert np.array_equal(np.asarray(got), _pillow(grey))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(orientation):
    data = _jpeg(_photo(700, 460, seed=orientation), orientation=orientation, quality=90)
    got = np.asarray(decode_image(data, 10**9, DRAFT))
    want = _pillow(data)
    assert got.shape == want.shape  # 5-8 turn the picture a quarter: 230 x 350
    assert np.array_equal(got, want)


def test_without_a_draft_size_pillow_decodes_at_full_size():
    data = _jpeg(_photo(640, 480), quality=90)
    assert np.array_equal(np.asarray(decode_image(data, 10**9)), _pillow(data, draft=None))


def test_cmyk_and_damaged_jpegs_go_through_pillow():
    cmyk = _jpeg(_photo(500, 400).convert("CMYK"), quality=90)
    assert np.array_equal(np.asarray(decode_image(cmyk, 10**9, DRAFT)), _pillow(cmyk))
    whole = _jpeg(_photo(640, 480), quality=90)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(whole[: len(whole) // 2], 10**9, DRAFT)  # truncated: Pillow's error, not a grey half picture
    assert caught.value.code == "corrupt_image"


def test_unreadable_exif_is_pillows_error_not_a_crash(monkeypatch):
    data = _jpeg(_photo(640, 480), orientation=6, quality=90)

    def broken(self):
        raise SyntaxError("not a TIFF file")  # what Pillow raises for some broken EXIF blocks

    monkeypatch.setattr(Image.Image, "getexif", broken)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, 10**9, DRAFT)
    assert caught.value.code == "corrupt_image"


@pytest.mark.parametrize("size, save", CASES)
def test_sequential_jpeg_pixels_agree_with_pillows_header(size, save):
    data = _jpeg(_photo(*size), orientation=6, **save)  # an EXIF segment before the frame header
    header = Image.open(io.BytesIO(data))
    expected = None if header.info.get("progressive") else size[0] * size[1]
    assert sequential_jpeg_pixels(data) == expected


def test_sequential_jpeg_pixels_is_none_for_anything_else():
    baseline = _jpeg(_photo(64, 48), quality=90)
    png = io.BytesIO()
    _photo(64, 48).save(png, format="PNG")
    comments = b"\xff\xd8" + b"\xff\xfe\x00\x04ab" * 100 + baseline[2:]  # 100 comment segments first
    sos = baseline.index(b"\xff\xda")
    late = baseline[:sos] + b"\xff\xfe\x00\x04ab" * 100 + baseline[sos:]  # 100 after the frame header
    no_scan = baseline[:sos]  # a header that never reaches a scan
    for data in (b"", b"\xff", b"\xff\xd8", b"\xff\xd8\xff", baseline[:20], png.getvalue(), b"GIF89a" + baseline,
                 _jpeg(_photo(64, 48), progressive=True), comments, late, no_scan,
                 baseline.replace(b"\xff\xc0", b"\xff\xc3", 1)):  # lossless frame
        assert sequential_jpeg_pixels(data) is None, data[:12]
    assert sequential_jpeg_pixels(comments, max_segments=200) == 64 * 48  # the same files, walked further
    assert sequential_jpeg_pixels(late, max_segments=200) == 64 * 48
    assert sequential_jpeg_pixels(_jpeg(_photo(64, 48).convert("L"))) == 64 * 48
    assert sequential_jpeg_pixels(b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10") is None  # zero height


def test_draft_scale_is_pillows():
    for size in [(640, 480), (1000, 800), (1920, 1080), (2400, 1800), (100, 100), (4000, 200)]:
        img = Image.open(io.BytesIO(_jpeg(_photo(*size), quality=80)))
        img.draft("RGB", DRAFT)
        scale = draft_scale(size, DRAFT)
        assert img.size == (-(-size[0] // scale), -(-size[1] // scale))


@pytest.mark.parametrize("spec", [
    Preprocessing(image_size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    Preprocessing(image_size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    Preprocessing(image_size=(40, 56), mean=(0.1, 0.7, 0.33), std=(0.9, 0.05, 0.31), scale=255.0),
    Preprocessing(image_size=(32, 32), mean=(103.9, 116.7, 123.6), std=(1.0, 1.0, 1.0), scale=1.0),
], ids=["imagenet", "half", "odd", "caffe"])
def test_to_array_equals_each_levels_value(spec):
    height, width = spec.image_size
    levels = np.arange(256, dtype=np.uint8)
    pixels = np.stack([np.resize(np.roll(levels, 85 * c), (height, width)) for c in range(3)], axis=-1)
    got = to_array(Image.fromarray(pixels, "RGB"), spec)
    mean = np.asarray(spec.mean, dtype=np.float32) * np.float32(spec.scale)
    std = np.asarray(spec.std, dtype=np.float32) * np.float32(spec.scale)
    for channel in range(3):
        table = (levels.astype(np.float32) - mean[channel]) / std[channel]  # every level's value, alone
        assert np.array_equal(got[channel], table[pixels[:, :, channel]])
