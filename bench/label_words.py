"""The class -> caption word table against people's captions, and whether a bundle's captions name what
its confident labels see.

    python bench/label_words.py --data ../shared/datasets/flickr8k --split val [--bundle models/default] \
        [--json bench/results/label_words.json]

- coverage: how many of the 1,000 ImageNet classes have caption words (labels.json `words`);
- precision: over the split's images whose top label has probability >= each threshold and has words,
  how often one of those words appears in at least one of the image's references, and in how many
  of all their references;
- captions (with --bundle, the bundle's recommended decoding, or `--guide none|labels` to force one):
  over the same images, how many best captions contain one of those words.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.inference.bundle import load_bundle  # noqa: E402
from app.inference.engine import Engine  # noqa: E402
from model_export.cli import DataFormat, load_dataset  # noqa: E402
from model_export.evaluate import recommended_decoding  # noqa: E402
from model_export.images import iter_batches  # noqa: E402

THRESHOLDS = (0.5, 0.8)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a Flickr8k folder (the authors' text format)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--guide", choices=("none", "labels"), help="decode with this guide (default: the bundle's)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle)
    if bundle.label_words is None:
        raise SystemExit(f"{args.bundle}: its labels.json has no words (captioner add-labels adds them)")
    engine = Engine(bundle, device="cpu")
    config = recommended_decoding(bundle)
    if args.guide:
        from dataclasses import replace

        config = replace(config, guide=args.guide)
    examples = load_dataset(args.data, None, DataFormat.flickr8k).split(args.split)[: args.limit or None]
    tops, captions = [], []
    for indices, pixels in iter_batches([e.image_path for e in examples], bundle.preprocessing, 32):
        for result in engine.run(pixels, config, labels=1):
            tops.append(result.labels[0])
            captions.append(set(result.captions[0].tokens) if result.captions else set())
    covered = sum(1 for groups in bundle.label_words if groups)
    report: dict = {"bundle": f"{bundle.name} {bundle.version}", "split": args.split, "images": len(examples),
                    "decoding": {"guide": config.guide, "guide_threshold": config.guide_threshold,
                                 "guide_words": config.guide_words},
                    "coverage": {"classes_with_words": covered, "classes": len(bundle.label_words)}}
    for threshold in THRESHOLDS:
        images = refs_any = refs_all = refs_total = named = 0
        for example, top, caption in zip(examples, tops, captions, strict=True):
            words = {w for group in bundle.label_words[top.class_id] for w in group}
            if top.probability < threshold or not words:
                continue
            images += 1
            hits = [bool(words & set(ref)) for ref in example.references]
            refs_any += any(hits)
            refs_all += sum(hits)
            refs_total += len(hits)
            named += bool(words & caption)
        report[f"top_label_p>={threshold}"] = {
            "images": images,
            "a_reference_names_it": refs_any, "precision_any_reference": round(refs_any / max(images, 1), 4),
            "references_naming_it": refs_all, "references": refs_total,
            "precision_per_reference": round(refs_all / max(refs_total, 1), 4),
            "captions_naming_it": named, "caption_share": round(named / max(images, 1), 4),
        }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
