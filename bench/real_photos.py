"""Real everyday photos from Python packages, captioned: does the caption name the photo's subject?

    python bench/real_photos.py [--bundle models/default] [--compare OTHER_BUNDLE] [--json OUT]

The nine development photos of issue 23 (scikit-image, scikit-learn and matplotlib sample images),
each with the words any one of which a caption naming its main subject contains. Each photo is
captioned through the engine with the bundle's recommended decoding (beam 3 unless --beam), and its
caption is printed beside its top ImageNet labels and whether it names the subject; the last line
counts them. `--compare` captions the same photos with a second bundle, side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.inference.bundle import load_bundle  # noqa: E402
from app.inference.decoding import DecodingConfig  # noqa: E402
from app.inference.engine import Engine  # noqa: E402
from app.inference.preprocess import to_array  # noqa: E402

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


def caption_all(bundle_dir: Path, images: dict[str, Image.Image], beam: int | None) -> dict[str, dict]:
    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle, device="cpu")
    recommended = bundle.manifest.decoding
    config = DecodingConfig(
        strategy="beam", beam_size=beam or 3,
        length_penalty=recommended.length_penalty if recommended else 0.0,
        no_repeat_ngram_size=recommended.no_repeat_ngram_size if recommended else 0,
    )
    batch = np.stack([to_array(img, bundle.manifest.preprocessing) for img in images.values()])
    results = engine.run(batch, config, labels=3 if engine.has_labels else 0)
    out = {}
    for name, result in zip(images, results, strict=True):
        text = result.captions[0].text if result.captions else ""
        out[name] = {"caption": text, "named": names_subject(text, SUBJECTS[name]),
                     "labels": [(label.name.split(",")[0], round(label.probability, 2)) for label in result.labels]}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--compare", type=Path, help="a second bundle, captioned beside the first")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default 3)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    images = photos()
    bundles = [args.bundle] + ([args.compare] if args.compare else [])
    report = {str(b): caption_all(b, images, args.beam) for b in bundles}
    for name in images:
        labels = ", ".join(f"{n} {p:.2f}" for n, p in report[str(args.bundle)][name]["labels"])
        print(f"{name} [{labels}]")
        for b in bundles:
            r = report[str(b)][name]
            print(f"  {'+' if r['named'] else '-'} {b.name}: {r['caption']}")
    for b in bundles:
        named = sum(r["named"] for r in report[str(b)].values())
        print(f"{b}: subject named in {named} of {len(images)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
