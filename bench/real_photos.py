"""Real everyday photos from Python packages, captioned: does the caption name the photo's subject?

    python bench/real_photos.py [--bundle models/default] [--compare OTHER_BUNDLE] [--json OUT]

The nine development photos of issue 23 (scikit-image, scikit-learn and matplotlib sample images),
each with the words any one of which a caption naming its main subject contains. Each photo is
captioned through the engine with the bundle's recommended decoding, its guide included (the shipped
defaults; --beam, --guide and --guide-threshold override them), and its
caption is printed beside its top ImageNet labels and whether it names the subject; the last line
counts them. `--compare` captions the same photos with a second bundle, side by side.
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


def names_subject(caption: str, words: str) -> bool:
    return bool(set(caption.split()) & set(words.split()))


def caption_all(bundle_dir: Path, images: dict[str, Image.Image], beam: int | None, guide: str | None = None,
                guide_threshold: float | None = None) -> dict[str, dict]:
    """Caption every photo with the bundle's shipped defaults (its recommended decoding, the guide included,
    as the service answers without query parameters), or with `beam`/`guide`/`guide_threshold` instead."""
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
        out[name] = {"caption": text, "named": names_subject(text, SUBJECTS[name]),
                     "labels": [(label.name.split(",")[0], round(label.probability, 2)) for label in result.labels],
                     "guided_by": ["|".join(word.words) for word in result.guide]}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--compare", type=Path, help="a second bundle, captioned beside the first")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the bundle's recommendation, 3)")
    parser.add_argument("--guide", choices=["labels", "none"], help="default: the bundle's recommendation")
    parser.add_argument("--guide-threshold", type=float, help="default: the bundle's recommendation")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    images = photos()
    bundles = [args.bundle] + ([args.compare] if args.compare else [])
    report = {str(b): caption_all(b, images, args.beam, args.guide, args.guide_threshold) for b in bundles}
    for name in images:
        labels = ", ".join(f"{n} {p:.2f}" for n, p in report[str(args.bundle)][name]["labels"])
        print(f"{name} [{labels}]")
        for b in bundles:
            r = report[str(b)][name]
            guided = f"  (guided by {', '.join(r['guided_by'])})" if r["guided_by"] else ""
            print(f"  {'+' if r['named'] else '-'} {b.name}: {r['caption']}{guided}")
    for b in bundles:
        named = sum(r["named"] for r in report[str(b)].values())
        print(f"{b}: subject named in {named} of {len(images)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
