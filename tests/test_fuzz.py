"""Property-based fuzzing (hypothesis) of the two places where untrusted values enter:

* `DecodingConfig` (app/inference/decoding.py): every combination of settings either constructs (exactly when
  it is valid by the documented rules) or raises ValueError; never another exception. The same for
  `with_overrides`, which is what a request's query parameters go through. The values are of the types
  the edges hand in (the query parameters and the settings are parsed to str / int / float first):
  any string, any integer, any float including nan and +-inf, None.
* `decode_image` (app/inference/preprocess.py): random bytes, and valid images of every accepted format with
  random bytes flipped, cut off, inserted or their header's size fields rewritten, give either an RGB
  image within the pixel limit or an ImageDecodeError with a known code; never another exception.

Examples are derandomized (the same every run) and counted in docs/reliability.md.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.inference.decoding import MAX_BEAM_SIZE, MAX_LENGTH_LIMIT, DecodingConfig
from app.inference.preprocess import ImageDecodeError, decode_image

CONFIG_EXAMPLES = 2000
OVERRIDE_EXAMPLES = 1500
RANDOM_BYTES_EXAMPLES = 1000
MUTATED_IMAGE_EXAMPLES = 2000
MAX_PIXELS = 250_000
CODES = {"empty_file", "unsupported_media_type", "corrupt_image", "image_too_large"}

def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ---- DecodingConfig -----------------------------------------------------------------------------

# Each mixes values near and inside the valid ranges (so a fair share of combinations is valid) with
# anything of the type.
strategies_ = st.one_of(st.sampled_from(["greedy", "beam"]), st.sampled_from(["beam", "Beam", "", "sampling"]),
                        st.text(max_size=12))
small_ints = st.one_of(st.integers(min_value=1, max_value=4), st.integers(min_value=-2, max_value=12),
                       st.integers(min_value=-3, max_value=MAX_LENGTH_LIMIT + 3), st.integers())
lengths = st.one_of(st.none(), st.integers(min_value=1, max_value=MAX_LENGTH_LIMIT), small_ints)
penalties = st.one_of(st.floats(min_value=0.0, max_value=5.0), st.sampled_from([0.0, 5.0, -0.0, 5.000001, -1e-9]),
                      st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10, max_value=10))
ngram_sizes = st.one_of(st.integers(min_value=0, max_value=3), small_ints)


def is_valid(strategy, beam_size, num_captions, max_length, length_penalty, no_repeat_ngram_size) -> bool:
    """The documented rules, written independently of app/inference/decoding.py."""
    if strategy not in ("greedy", "beam"):
        return False
    if not 1 <= beam_size <= MAX_BEAM_SIZE or num_captions < 1:
        return False
    if num_captions > (1 if strategy == "greedy" else beam_size):
        return False
    if max_length is not None and not 1 <= max_length <= MAX_LENGTH_LIMIT:
        return False
    if math.isnan(length_penalty) or not 0.0 <= length_penalty <= 5.0:
        return False
    return 0 <= no_repeat_ngram_size <= 10


ARBITRARY = {"strategy": strategies_, "beam_size": small_ints, "num_captions": small_ints, "max_length": lengths,
             "length_penalty": penalties, "no_repeat_ngram_size": ngram_sizes}


@st.composite
def config_values(draw) -> dict:
    """A valid combination, then 0 to 3 of its fields replaced by anything of their type: about
    60 % of the draws stay valid, the rest break one or more rules."""
    strategy = draw(st.sampled_from(["greedy", "beam"]))
    beam_size = draw(st.integers(min_value=1, max_value=MAX_BEAM_SIZE))
    values = {
        "strategy": strategy,
        "beam_size": beam_size,
        "num_captions": 1 if strategy == "greedy" else draw(st.integers(min_value=1, max_value=beam_size)),
        "max_length": draw(st.one_of(st.none(), st.integers(min_value=1, max_value=MAX_LENGTH_LIMIT))),
        "length_penalty": draw(st.floats(min_value=0.0, max_value=5.0)),
        "no_repeat_ngram_size": draw(st.integers(min_value=0, max_value=10)),
    }
    for name in draw(st.lists(st.sampled_from(sorted(ARBITRARY)), max_size=3, unique=True)):
        values[name] = draw(ARBITRARY[name])
    return values


@fuzz(CONFIG_EXAMPLES)
@given(values=config_values())
@example(values={"strategy": "beam", "beam_size": 10, "num_captions": 10, "max_length": 64, "length_penalty": 5.0,
                 "no_repeat_ngram_size": 10})
@example(values={"strategy": "greedy", "beam_size": 1, "num_captions": 1, "max_length": 1, "length_penalty": 0.0,
                 "no_repeat_ngram_size": 0})
@example(values={"strategy": "greedy", "beam_size": 5, "num_captions": 2, "max_length": None,
                 "length_penalty": 1.0, "no_repeat_ngram_size": 0})
@example(values={"strategy": "beam", "beam_size": 3, "num_captions": 1, "max_length": None,
                 "length_penalty": float("nan"), "no_repeat_ngram_size": 0})
def test_decoding_config_valid_iff_the_rules_say_so(values):
    valid = is_valid(**values)
    event("valid" if valid else "invalid")
    if valid:
        config = DecodingConfig(**values)
        resolved = config.resolved(16)
        assert 1 <= resolved.num_captions <= resolved.beam_size <= MAX_BEAM_SIZE
        assert 1 <= resolved.max_length <= MAX_LENGTH_LIMIT
    else:
        with pytest.raises(ValueError):
            DecodingConfig(**values)


def optional(s):
    return st.one_of(st.none(), s)


@fuzz(OVERRIDE_EXAMPLES)
@given(strategy=optional(strategies_), beam_size=optional(small_ints), num_captions=optional(small_ints),
       max_length=lengths, length_penalty=optional(penalties), no_repeat_ngram_size=optional(ngram_sizes),
       defaults=st.sampled_from([DecodingConfig(), DecodingConfig(strategy="greedy", beam_size=1),
                                 DecodingConfig(beam_size=10, num_captions=4, max_length=20, length_penalty=1.0)]))
def test_request_overrides_give_a_config_or_value_error(defaults, **given_values):
    """A request's parameters on top of the service's defaults (what the route does)."""
    try:
        config = defaults.with_overrides(**given_values)
    except ValueError:
        event("ValueError")
        return
    event("config")
    assert isinstance(config, DecodingConfig)
    for name, value in given_values.items():
        if value is not None:
            assert getattr(config, name) == value or (isinstance(value, float) and math.isnan(value))
    resolved = config.resolved(16)
    assert 1 <= resolved.num_captions <= resolved.beam_size


# ---- decode_image -------------------------------------------------------------------------------


def _seed_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    out = {}
    for fmt, img, kwargs in [
        ("JPEG", rgb, {"quality": 80}),
        ("PNG", rgb, {}),
        ("PNG-palette", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), {"transparency": 0}),
        ("PNG-16", Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16)), {}),
        ("GIF", rgb.convert("P"), {"save_all": True, "append_images": [rgb.convert("P").rotate(90)]}),
        ("WEBP", rgb, {"quality": 70}),
        ("BMP", rgb, {}),
        ("TIFF", rgb, {"compression": "tiff_lzw"}),
        ("JPEG-CMYK", rgb.convert("CMYK"), {}),
    ]:
        buf = io.BytesIO()
        img.save(buf, fmt.split("-")[0], **kwargs)
        out[fmt] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", exif=exif.tobytes())
    out["JPEG-EXIF"] = buf.getvalue()
    return out


SEEDS = _seed_images()


def _check(data: bytes, draft: tuple[int, int] | None = None) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd EXIF etc.; only exceptions matter
            img = decode_image(data, MAX_PIXELS, draft)
    except ImageDecodeError as exc:
        event(exc.code)
        assert exc.code in CODES, exc.code
        assert exc.message and "\n" not in exc.message
        return
    event("decoded")
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    width, height = img.size
    assert 1 <= width and 1 <= height and width * height <= MAX_PIXELS


@fuzz(RANDOM_BYTES_EXAMPLES)
@given(data=st.one_of(st.binary(max_size=2048),
                      st.builds(lambda magic, rest: magic + rest,
                                st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a",
                                                 b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"II*\x00", b"MM\x00*",
                                                 b"%!PS-Adobe-3.0", b"<svg", b"\x00\x00\x01\x00"]),
                                st.binary(max_size=2048))))
@example(data=b"")
def test_decode_image_random_bytes(data):
    _check(data)


def _rewrite_png_size(data: bytes, width: int, height: int) -> bytes:
    ihdr = data.index(b"IHDR")
    body = struct.pack(">II", width, height) + data[ihdr + 12: ihdr + 17]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return data[: ihdr + 4] + body + crc + data[ihdr + 21:]


@st.composite
def mutated_images(draw):
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "png-size"]))
        if not data:
            break
        at = draw(st.integers(min_value=0, max_value=len(data) - 1))
        if kind == "flip":
            data[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at: at + draw(st.integers(min_value=1, max_value=64))]
        elif kind == "png-size" and b"IHDR" in data and data.index(b"IHDR") + 21 <= len(data):
            side = st.integers(min_value=0, max_value=2**31 - 1)
            data = bytearray(_rewrite_png_size(bytes(data), draw(side), draw(side)))
    draft = draw(st.one_of(st.none(), st.tuples(st.integers(1, 600), st.integers(1, 600))))
    return bytes(data), draft


@fuzz(MUTATED_IMAGE_EXAMPLES)
@given(case=mutated_images())
def test_decode_image_mutated_images(case):
    data, draft = case
    _check(data, draft)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_images_decode(name):
    """The unmutated seeds are all accepted (so the mutations start from real images)."""
    img = decode_image(SEEDS[name], MAX_PIXELS)
    assert img.mode == "RGB" and img.size in ((32, 24), (24, 32))
