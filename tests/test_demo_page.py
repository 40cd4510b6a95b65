"""The demo page (`GET /`, app/api/static/index.html) in a real headless Chromium against a real uvicorn:
upload an image, see the captions, hover/click a word and see its heatmap drawn on the canvas; a
non-image and bad settings give the API's error message as text; a Show-and-Tell bundle says that
it has no heatmaps; a bundle with ImageNet labels shows them under the caption.

Uses Debian's chromium (/usr/bin/chromium, `apt-get install chromium`) driven by the Python
`playwright` package; `playwright install` (a browser download) is never needed. Without them the
tests skip, unless REQUIRE_BROWSER_TESTS=1 (CI), where they fail. Screenshots go to pytest's tmp_path
and to tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.live_server import image_bytes

skimage_data = pytest.importorskip("skimage.data")

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
REQUIRED = os.environ.get("REQUIRE_BROWSER_TESTS") == "1"


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _missing(why: str):
    if REQUIRED:
        pytest.fail(f"REQUIRE_BROWSER_TESTS=1 but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install playwright)")
    executable = _chromium()
    if executable is None:
        _missing("no Chromium at /usr/bin/chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def sat_server(tiny_bundles, start_server):
    return start_server(tiny_bundles(attention=True, max_length=8), log_name="sat")


@pytest.fixture(scope="module")
def st_server(tiny_bundles, start_server):
    return start_server(tiny_bundles(attention=False, max_length=8), log_name="st")


@pytest.fixture(scope="module")
def labels_server(tiny_bundles, start_server):
    return start_server(tiny_bundles(attention=True, max_length=8, labels=True), log_name="labels")


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("uploads")
    out = {
        "cat": root / "cat.jpg",
        "astronaut": root / "astronaut.png",
        "notes": root / "notes.txt",
    }
    out["cat"].write_bytes(image_bytes(skimage_data.chelsea(), "JPEG", quality=90))
    out["astronaut"].write_bytes(image_bytes(skimage_data.astronaut(), "PNG"))
    out["notes"].write_text("this is not an image\n", encoding="utf-8")
    return out


def _shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    try:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    except OSError:  # a read-only checkout: tmp_path has them anyway
        pass


CANVAS_SUM = """() => {
  const c = document.getElementById('canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let sum = 0, nonzero = 0;
  for (let i = 0; i < d.length; i += 4) {
    sum += d[i] + 2 * d[i + 1] + 3 * d[i + 2]; if (d[i] || d[i + 1] || d[i + 2]) nonzero++;
  }
  return {sum, nonzero, width: c.width, height: c.height};
}"""


def _open(page, server) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']", timeout=20_000)


def _upload(page, path: Path, state: str = "done") -> None:
    # forget the previous request's state first: waiting for "error" after an error must wait for
    # this upload's answer, not find the old one
    page.evaluate("document.body.dataset.state = 'test-pending'")
    page.set_input_files("#file", str(path))
    page.wait_for_selector(f"body[data-state='{state}']", timeout=30_000)


def test_caption_and_heatmap(page, sat_server, files, tmp_path):
    _open(page, sat_server)
    assert "tiny-sat" in page.inner_text("#model")
    assert not page.is_visible("#note")

    _upload(page, files["cat"])
    captions = page.locator("#captions li")
    assert captions.count() == 1
    best = captions.first.inner_text()
    assert "score" in best and "normalized" in best
    words = page.locator("#words .word")
    labels = [words.nth(i).inner_text() for i in range(words.count())]
    assert len(labels) >= 2 and labels[-1] == "<end>"

    plain = page.evaluate(CANVAS_SUM)
    assert plain["nonzero"] > 0.9 * plain["width"] * plain["height"]  # the image is drawn
    assert page.get_attribute("#canvas", "data-shown") == ""
    _shot(page, tmp_path, "demo-caption")

    # click pins a word: its heatmap is drawn over the image
    words.first.click()
    page.wait_for_selector("#canvas[data-shown='0']")
    page.mouse.move(5, 5)  # leave the word: the pinned heatmap stays
    page.wait_for_selector("#canvas[data-shown='0']")
    first = page.evaluate(CANVAS_SUM)
    assert first["sum"] != plain["sum"]
    assert "pinned" in (words.first.get_attribute("class") or "")
    assert page.is_visible("#legend")
    _shot(page, tmp_path, "demo-heatmap-first-word")

    # hovering another word shows that word's map (a different picture)
    last = len(labels) - 1
    words.nth(last).hover()
    page.wait_for_selector(f"#canvas[data-shown='{last}']")
    hovered = page.evaluate(CANVAS_SUM)
    assert hovered["sum"] != plain["sum"]
    _shot(page, tmp_path, "demo-heatmap-end")

    # click the pinned word again: back to the plain image
    page.mouse.move(5, 5)
    words.first.click()
    page.mouse.move(5, 5)
    page.wait_for_selector("#canvas[data-shown='']")
    assert page.evaluate(CANVAS_SUM)["sum"] == plain["sum"]
    assert page.js_errors == []


def test_settings_and_errors_are_shown(page, sat_server, files, tmp_path):
    _open(page, sat_server)
    _upload(page, files["astronaut"])

    # beam search with two captions
    page.select_option("#strategy", "beam")
    page.fill("#beam_size", "3")
    page.fill("#num_captions", "2")
    page.fill("#max_length", "5")
    page.fill("#length_penalty", "0.5")
    page.fill("#no_repeat_ngram_size", "1")
    page.click("#run")
    page.wait_for_selector("body[data-state='done']")
    page.wait_for_function("document.querySelectorAll('#captions li').length === 2")
    meta = page.inner_text("#meta")
    assert "beam 3" in meta and "2 caption(s)" in meta and "max 5 words" in meta and "no-repeat 1" in meta
    words = page.locator("#words .word")
    assert 2 <= words.count() <= 6
    texts = [words.nth(i).inner_text() for i in range(words.count() - 1)]
    assert len(texts) == len(set(texts))  # no_repeat_ngram_size=1: no word twice

    # greedy disables the beam settings
    page.select_option("#strategy", "greedy")
    assert page.is_disabled("#beam_size") and page.is_disabled("#num_captions")
    page.click("#run")
    page.wait_for_function("document.querySelectorAll('#captions li').length === 1")
    assert "greedy, beam 1" in page.inner_text("#meta")

    # an invalid combination: the API's message, as text
    page.select_option("#strategy", "beam")
    page.fill("#beam_size", "2")
    page.fill("#num_captions", "5")
    page.click("#run")
    page.wait_for_selector("body[data-state='error']")
    error = page.inner_text("#error")
    assert "num_captions" in error and "invalid_parameter" in error and "422" in error
    assert page.locator("#captions li").count() == 0

    # a text file: the API's message about the upload
    page.fill("#num_captions", "")
    _upload(page, files["notes"], state="error")
    error = page.inner_text("#error")
    assert "not an image in a supported format" in error and "unsupported_media_type" in error
    assert page.is_visible("#error")
    _shot(page, tmp_path, "demo-error")

    # and a good image afterwards clears the error
    _upload(page, files["cat"])
    assert not page.is_visible("#error")
    assert page.js_errors == []


def test_show_and_tell_bundle_has_no_heatmaps(page, st_server, files, tmp_path):
    _open(page, st_server)
    assert page.is_visible("#note")
    assert "no attention" in page.inner_text("#note")
    _upload(page, files["cat"])  # captioned without ?attention=true (no 409)
    assert page.locator("#captions li").count() == 1
    assert not page.is_visible("#error")
    words = page.locator("#words .word")
    assert words.count() >= 1 and words.first.is_disabled()
    assert "No heatmaps" in page.inner_text("#hint")
    assert page.get_attribute("#canvas", "data-shown") == ""
    _shot(page, tmp_path, "demo-show-and-tell")
    assert page.js_errors == []


def test_labels_under_the_caption(page, labels_server, sat_server, files, tmp_path):
    import re

    import httpx

    _open(page, labels_server)
    assert not page.is_visible("#labels")  # nothing before an answer
    _upload(page, files["cat"])
    assert page.is_visible("#labels")
    chips = page.locator("#labels .label")
    assert chips.count() == 3  # the service's default_labels
    answer = httpx.post(labels_server.url + "/v1/captions?strategy=beam",
                        files={"image": ("cat.jpg", files["cat"].read_bytes(), "image/jpeg")}, timeout=30).json()
    for chip, label in zip((chips.nth(i) for i in range(3)), answer["labels"], strict=True):
        text = chip.inner_text()
        assert re.fullmatch(r"tiny class \d \d+\.\d%", text.replace("\n", " ").strip()), text
        assert text.startswith(label["name"]) and f"{100 * label['probability']:.1f}%" in text
        assert chip.get_attribute("title") == f"{label['name']} (class {label['class_id']})"
    # under the caption (and above the settings line)
    caption_box = page.locator("#captions li").last.bounding_box()
    labels_box, meta_box = page.locator("#labels").bounding_box(), page.locator("#meta").bounding_box()
    assert caption_box and labels_box and meta_box
    assert caption_box["y"] + caption_box["height"] <= labels_box["y"] + 1
    assert labels_box["y"] + labels_box["height"] <= meta_box["y"] + 1
    _shot(page, tmp_path, "demo-labels")

    # an error answer clears them
    _upload(page, files["notes"], state="error")
    assert not page.is_visible("#labels") and page.locator("#labels .label").count() == 0
    assert page.js_errors == []

    # a bundle without labels: the answer has none, so nothing is shown
    _open(page, sat_server)
    _upload(page, files["cat"])
    assert page.locator("#captions li").count() == 1
    assert not page.is_visible("#labels") and page.locator("#labels .label").count() == 0
    assert page.js_errors == []


def test_page_is_served_offline_and_not_in_the_schema(sat_server):
    import httpx

    r = httpx.get(sat_server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "<script" in html and "http://" not in html and "https://" not in html  # no CDN, nothing remote
    spec = httpx.get(sat_server.url + "/openapi.json", timeout=10).json()
    assert "/" not in spec["paths"]
