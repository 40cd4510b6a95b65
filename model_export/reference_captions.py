"""`parity.reference` of a bundle: the greedy captions of a few deterministic inputs
(`app.inference.bundle.reference_input`), which the service captions again and compares word for word before it
switches to a newly loaded version (app/serving/registry.py; docs/bundle-format.md).

`captioner export` records them for every new bundle; `captioner add-reference --bundle DIR` adds
them to a bundle exported before they existed. Both caption with the bundle's own onnxruntime graphs
on CPU, as the service does. No torch here.
"""

from __future__ import annotations

from pathlib import Path

from app.inference.bundle import Preprocessing, ReferenceCaption, load_bundle, reference_input
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine
from model_export.bundle_files import rewrite_manifest

REFERENCE_SEEDS = (0, 1, 2, 3)


def reference_captions(engine: Engine, spec: Preprocessing) -> list[ReferenceCaption]:
    """The engine's greedy captions of the reference inputs."""
    config = DecodingConfig(strategy="greedy", beam_size=1, num_captions=1)
    results = engine.run([reference_input(seed, spec) for seed in REFERENCE_SEEDS], config)
    return [ReferenceCaption(seed=seed, tokens=r.captions[0].tokens if r.captions else [])
            for seed, r in zip(REFERENCE_SEEDS, results, strict=True)]


def add_reference(bundle_dir: Path) -> list[ReferenceCaption]:
    """Record `parity.reference` in the manifest of the bundle at `bundle_dir` (its files' sha256s are
    checked first; only manifest.json changes: model_export/bundle_files.py rewrite_manifest)."""
    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle, device="cpu")
    reference = reference_captions(engine, bundle.manifest.preprocessing)
    manifest = bundle.manifest
    parity = manifest.parity.model_copy(update={"reference": reference}) if manifest.parity is not None else None
    if parity is None:
        from app.inference.bundle import Parity

        parity = Parity(reference=reference)
    rewrite_manifest(bundle_dir, manifest.model_copy(update={"parity": parity}))
    return reference
