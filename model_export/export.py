"""`captioner export`: a trained checkpoint -> a model bundle (docs/bundle-format.md).

The bundle is written to a temporary folder next to the target and proves itself before it is
moved into place:
1. torch vs onnxruntime, max abs difference <= 1e-4 on the encoder outputs and on the step
   log-probabilities (and state), for random and for real images;
2. identical greedy and beam-3 captions between the torch reference decoder
   (model_export/torch_decoder.py) and the serving engine (app/inference/engine.py on the ONNX graphs) on at
   least 50 test images.
`--precision fp16` writes float16 graphs (float32 inputs and outputs, so the engine is unchanged;
half the size; faster on GPUs). They are checked against the float32 torch model with their own
tolerance: differences <= 5% of each output's largest magnitude (at least 1), and at least 90% of
the greedy and beam-3 captions identical (the rest may differ where two words were nearly tied).
`--precision int8` keeps the encoder in float32 and quantizes the decoder step's weights to int8
(onnxruntime's dynamic quantization: int8 weights per output channel, activations quantized per
call): a quarter of the decoder's size and its matrix products in integer arithmetic, for CPU
serving (onnxruntime's CUDA provider covers few int8 kernels: serve fp32 or fp16 on a GPU). Its
rules: differences <= 10% of each output's scale (measured on the default model: 6% on random
images, where fp16's 5% failed it), and fp16's 90% of identical captions.
A failed check raises ExportError and leaves nothing behind. Then, optionally, `captioner evaluate`
runs on the new bundle and its metrics go into the manifest and eval.json.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from pydantic import ValidationError

from app.inference.bundle import (
    FORMAT_VERSION,
    IMAGENET_OUTPUT,
    WORD_PRIOR,
    Architecture,
    Evaluation,
    Manifest,
    ModelId,
    Parity,
    RecommendedDecoding,
    SpecialTokens,
    Training,
    TrainingData,
    load_bundle,
    unknown_keys,
)
from app.inference.decoding import DecodingConfig
from app.inference.engine import Engine
from model_export.bundle_files import file_entries, staged_bundle
from model_export.data.karpathy import CaptionDataset
from model_export.features import preprocessing_for
from model_export.images import load_pixels
from model_export.labels import labels_spec, reference_probs, write_labels
from model_export.model import Captioner, EncoderGraph, HalfEncoderGraph, HalfStepGraph, StepGraph
from model_export.reference_captions import reference_captions
from model_export.torch_decoder import reference_decode
from model_export.train import load_checkpoint

TOLERANCE = 1e-4
OPSET = 17
FP16_RELATIVE_TOLERANCE = 0.05
FP16_MIN_IDENTICAL = 0.9
PRECISIONS = ("fp32", "fp16", "int8")
APPROXIMATE = ("fp16", "int8")  # checked with a relative tolerance and FP16_MIN_IDENTICAL
INT8_RELATIVE_TOLERANCE = 0.1


class ExportError(Exception):
    pass


# encoder.onnx's outputs: the decoder's inputs and initial state, then the ImageNet head (model_export/labels.py)
ENCODER_GRAPH_OUTPUTS = ("features", "h0", "c0", "att_proj", IMAGENET_OUTPUT)


def encoder_graph_outputs(label_prior: bool) -> list[str]:
    """encoder.onnx's outputs, in the order EncoderGraph returns them (a label-prior model's decoder
    state has the word prior last)."""
    state = ["features", "h0", "c0", "att_proj"] + ([WORD_PRIOR] if label_prior else [])
    return [*state, IMAGENET_OUTPUT]


def export_onnx(model: Captioner, out_dir: Path, precision: str = "fp32") -> tuple[Path, Path]:
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    model.eval()
    if precision == "fp16":
        half = copy.deepcopy(model).half().eval()
        encoder_graph, step_graph = HalfEncoderGraph(half), HalfStepGraph(half)
    else:
        encoder_graph, step_graph = EncoderGraph(model), StepGraph(model)
    size = model.config.image_size
    encoder_path, decoder_path = out_dir / "encoder.onnx", out_dir / "decoder.onnx"
    images = torch.zeros(2, 3, size, size)
    prior = model.label_prior
    encoder_outputs = encoder_graph_outputs(prior)
    torch.onnx.export(
        encoder_graph.eval(),
        (images,),
        str(encoder_path),
        input_names=["image"],
        output_names=encoder_outputs,
        dynamic_axes={name: {0: "n"} for name in ("image", *encoder_outputs)},
        opset_version=OPSET,
        dynamo=False,
    )
    with torch.no_grad():
        features, h0, c0, att_proj, *word_prior = model.encode(images)
    # rows in image-major blocks: 2 images x 3 rows (B = N * R; R is read from the shapes at run time)
    per_image = torch.tensor([0, 0, 0, 1, 1, 1])
    step_inputs = (
        torch.full((per_image.numel(),), 1, dtype=torch.long),
        h0[per_image],
        c0[per_image],
        features,
        att_proj,
        *word_prior,
    )
    static = ["features", "att_proj"] + ([WORD_PRIOR] if prior else [])
    row_axes = {name: {0: "b"} for name in ("tokens", "h", "c", "log_probs", "h_out", "c_out", "alpha")}
    torch.onnx.export(
        step_graph.eval(),
        step_inputs,
        str(decoder_path),
        input_names=["tokens", "h", "c", *static],
        output_names=["log_probs", "h_out", "c_out", "alpha"],
        dynamic_axes={**row_axes, **{name: {0: "n"} for name in static}},
        opset_version=OPSET,
        dynamo=False,
    )
    model.eval()  # the exporter restores the wrappers' mode; make sure nothing was left training
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = out_dir / "decoder.int8.onnx"
        quantize_dynamic(str(decoder_path), str(quantized), weight_type=QuantType.QInt8, per_channel=True)
        quantized.replace(decoder_path)
    return encoder_path, decoder_path


def architecture_of(model: Captioner, vocab_size: int) -> Architecture:
    """The manifest's `architecture` block of a model."""
    return Architecture(
        encoder=model.config.backbone,
        decoder=model.config.decoder,
        attention=model.attention,
        grid_size=(model.backbone.grid, model.backbone.grid),
        feature_dim=model.backbone.feature_dim,
        embed_dim=model.config.embed_dim,
        hidden_dim=model.config.hidden_dim,
        attention_dim=model.config.attention_dim,
        vocab_size=vocab_size,
        encoder_fine_tuned_blocks=model.config.fine_tune_blocks,
    )


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))) if np.size(a) else 0.0


def _diff(ref, got, precision: str) -> float:
    """fp32: the max abs difference; fp16/int8: the same relative to the output's scale (max |ref|, >= 1)."""
    diff = _max_diff(ref, got)
    if precision in APPROXIMATE:
        scale = max(1.0, float(np.max(np.abs(np.asarray(ref, dtype=np.float64))))) if np.size(ref) else 1.0
        return diff / scale
    return diff


def check_numeric_parity(model: Captioner, encoder_path: Path, decoder_path: Path, real_images: np.ndarray, seed: int = 0,
                         precision: str = "fp32") -> dict:
    """Encoder outputs and step outputs, torch vs onnxruntime, on random and real images."""
    tolerance = {"fp16": FP16_RELATIVE_TOLERANCE, "int8": INT8_RELATIVE_TOLERANCE}.get(precision, TOLERANCE)
    encoder = ort.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(decoder_path), providers=["CPUExecutionProvider"])
    decoder_inputs = {i.name for i in decoder.get_inputs()}
    generator = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    random_images = (torch.rand(4, 3, size, size, generator=generator) * 2 - 1).numpy()
    report = {"tolerance": tolerance, "precision": precision}
    vocab = model.config.vocab_size
    for label, images in (("random", random_images), ("real", real_images)):
        with torch.no_grad():
            ref = [t.numpy() for t in model.encode(torch.from_numpy(images))]
        *got, got_probs = encoder.run(encoder_graph_outputs(model.label_prior), {"image": images})
        enc_diff = max(_diff(r, g, precision) for r, g in zip(ref, got))
        labels_diff = _diff(reference_probs(model.backbone, images), got_probs, precision)
        report[f"labels_max_abs_{label}"] = labels_diff
        # three steps of a block of 3 rows per image, from the real encoder state, with random tokens
        n = images.shape[0]
        row_image = np.repeat(np.arange(n), 3).astype(np.int64)
        h, c = ref[1][row_image], ref[2][row_image]
        step_diff = 0.0
        for _ in range(3):
            tokens = torch.randint(4, vocab, (row_image.size,), generator=generator).numpy()
            with torch.no_grad():
                t_out = [
                    t.numpy()
                    for t in model.decoder.step(
                        torch.from_numpy(tokens), torch.from_numpy(h), torch.from_numpy(c),
                        torch.from_numpy(ref[0]), torch.from_numpy(ref[3]), *(torch.from_numpy(p) for p in ref[4:]),
                    )
                ]
            feeds = {"tokens": tokens, "h": h, "c": c, "features": ref[0], "att_proj": ref[3]}
            if len(ref) > 4:
                feeds[WORD_PRIOR] = ref[4]
            o_out = decoder.run(["log_probs", "h_out", "c_out", "alpha"], {k: v for k, v in feeds.items() if k in decoder_inputs})
            step_diff = max(step_diff, max(_diff(a, b, precision) for a, b in zip(t_out, o_out)))
            h, c = t_out[1], t_out[2]
        report[f"encoder_max_abs_{label}"] = enc_diff
        report[f"step_max_abs_{label}"] = step_diff
        if enc_diff > tolerance or step_diff > tolerance:
            raise ExportError(
                f"torch vs onnxruntime differ on {label} images ({precision}): encoder {enc_diff:.2e}, step {step_diff:.2e} "
                f"(tolerance {tolerance:.0e})"
            )
        if labels_diff > tolerance:
            raise ExportError(f"torch vs onnxruntime differ on {label} images ({precision}): ImageNet probabilities "
                              f"{labels_diff:.2e} (tolerance {tolerance:.0e})")
    return report


def check_caption_parity(model: Captioner, engine: Engine, images: np.ndarray, special: dict, max_length: int,
                         precision: str = "fp32") -> dict:
    """Greedy and beam-3 captions of the torch reference and of the engine must be identical
    (fp16, int8: at least FP16_MIN_IDENTICAL of them)."""
    report = {}
    for label, beam in (("greedy", 1), ("beam3", 3)):
        config = DecodingConfig(strategy="greedy" if beam == 1 else "beam", beam_size=beam)
        engine_out = engine.caption(images, config)
        mismatches = []
        for i, image in enumerate(images):
            ref = reference_decode(model, torch.from_numpy(image), special, beam=beam, max_length=max_length,
                                   length_penalty=config.length_penalty)
            ref_tokens = ref[0].tokens if ref else None
            got = engine_out[i][0].token_ids if engine_out[i] else None
            if ref_tokens != got:
                mismatches.append((i, ref_tokens, got))
            elif precision == "fp32" and ref and abs(ref[0].score - engine_out[i][0].score) > 1e-3:
                mismatches.append((i, f"score {ref[0].score}", f"score {engine_out[i][0].score}"))
        allowed = int(len(images) * (1 - FP16_MIN_IDENTICAL)) if precision in APPROXIMATE else 0
        if len(mismatches) > allowed:
            first = "; ".join(f"image {i}: torch {r} vs onnx {g}" for i, r, g in mismatches[:3])
            raise ExportError(f"{label}: {len(mismatches)} of {len(images)} captions differ between torch and ONNX "
                              f"({precision}) decoding, {allowed} allowed ({first})")
        report[f"{label}_identical"] = len(images) - len(mismatches)
    return report


def export_bundle(
    checkpoint: Path,
    out_dir: Path,
    dataset: CaptionDataset,
    name: str = "captioner",
    version: str = "1.0.0",
    parity_split: str = "test",
    parity_images: int = 50,
    max_length: int | None = None,
    evaluate_split: str | None = "test",
    evaluate_limit: int | None = None,
    progress: bool = True,
    precision: str = "fp32",
    decoding: dict | None = None,
    label_words: bool | None = None,
) -> Path:
    """`decoding`: the recommended length penalty and n-gram blocking (`captioner tune-decoding`
    on validation), written to the manifest; the evaluation uses them. `label_words`: write each
    class's caption words into labels.json (WordNet; model_export/label_words.py); default: for
    label-prior models, which must find the very table they were trained with."""
    from model_export.evaluate import evaluate_bundle, format_table

    started = time.monotonic()
    recommended = _recommended_decoding(decoding)
    model, vocab, state = load_checkpoint(checkpoint)
    special = vocab.special_ids
    max_length = max_length or state["train_config"]["max_caption_length"]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    parity_examples = dataset.split(parity_split)[:parity_images]
    if len(parity_examples) < min(parity_images, 50):
        raise ExportError(f"{dataset.source}: split {parity_split!r} has {len(parity_examples)} images; "
                          "the caption check needs 50")
    spec = preprocessing_for(model.backbone)
    images = np.stack([load_pixels(e.image_path, spec) for e in parity_examples])

    # assembled and proved in a staging folder beside out_dir, which replaces out_dir only at the end
    # (model_export/bundle_files.py); a failed check removes it and leaves out_dir as it was
    with staged_bundle(out_dir, "export") as tmp:
        encoder_path, decoder_path = export_onnx(model, tmp, precision)
        vocab.save(tmp / "vocab.json")
        wanted = model.label_prior if label_words is None else label_words
        words = class_word_groups(model, vocab.itos, state.get("label_words")) if wanted else None
        write_labels(tmp / "labels.json", words)
        numeric = check_numeric_parity(model, encoder_path, decoder_path, images[:8], precision=precision)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            model=ModelId(name=name, version=version, created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")),
            architecture=architecture_of(model, len(vocab)),
            preprocessing=spec,
            special_tokens=SpecialTokens(**special),
            max_length=max_length,
            precision=precision,
            decoding=recommended,
            labels=labels_spec(words=words is not None),
            files={},
            training=Training(
                # the data's terms travel with the model (the export's dataset knows them too)
                data=TrainingData(**{**(state.get("data") or {}), **({"terms": dataset.terms} if dataset.terms else {})}),
                epochs=state["epoch"],
                best_val_cider=state["best_cider"],
                history=state["history"],
                settings=state["train_config"],
                checkpoint=Path(checkpoint).name,
            ),
        )

        def write_manifest(**update) -> None:
            files = file_entries(encoder=encoder_path, decoder=decoder_path, vocab=tmp / "vocab.json",
                                 labels=tmp / "labels.json")
            written = manifest.model_copy(update={**update, "files": files})
            unknown = unknown_keys(written)
            if unknown:  # every key the exporter writes is a Manifest field (docs/bundle-format.md)
                raise ExportError("the manifest has keys app/inference/bundle.py's Manifest does not describe: "
                                  + ", ".join(unknown))
            (tmp / "manifest.json").write_text(written.to_json())

        write_manifest()  # provisional, inside the temporary folder only: the engine reads bundles
        engine = Engine(load_bundle(tmp), device="cpu")
        captions = check_caption_parity(model, engine, images, special, max_length, precision)
        final = {"parity": Parity(**numeric, **captions, images=len(images), split=parity_split,
                                  reference=reference_captions(engine, spec))}
        if evaluate_split:
            result = evaluate_bundle(tmp, dataset, split=evaluate_split, limit=evaluate_limit, device="cpu", progress=progress)
            print(format_table(result), flush=True)
            (tmp / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            final["evaluation"] = Evaluation(
                split=evaluate_split,
                images=result["dataset"]["images"],
                dataset=result["dataset"]["name"],
                decoding=result["decoding"],
                **{k: result[k] for k in ("greedy", "beam3", "beam5")},
            )
        final["export_seconds"] = round(time.monotonic() - started, 1)
        write_manifest(**final)
        load_bundle(tmp)  # the final bundle must read back
    return out_dir


def class_word_groups(model: Captioner, vocab: list[str], trained_table: list | None = None) -> list[list[list[str]]]:
    """labels.json's words for `model`: the table it was trained with (a label-prior checkpoint keeps
    it), else the WordNet table over its vocabulary; either must give the word ids per class that a
    label-prior model's config holds."""
    from model_export.label_words import build_table, flat

    table = trained_table if trained_table is not None else build_table(vocab)
    trained = model.config.label_word_ids
    if trained is not None:
        index = {w: i for i, w in enumerate(vocab)}
        differs = [c for c, (groups, ids) in enumerate(zip(table, trained, strict=True))
                   if {index[w] for w in flat(groups)} != set(ids)]
        if differs:
            raise ExportError(f"the class -> word table differs from the one the model was trained with for {len(differs)} "
                              f"classes (first: class {differs[0]}): WordNet or model_export/label_words.py changed since")
    return table


def _recommended_decoding(decoding: dict | None) -> RecommendedDecoding | None:
    """The manifest's `decoding` block, checked before the export starts."""
    if not decoding:
        return None
    try:
        recommended = RecommendedDecoding.model_validate(decoding)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ExportError(f"decoding: {problems}") from None
    unknown = unknown_keys(recommended)
    if unknown:
        raise ExportError(f"decoding: unknown key(s) {', '.join(unknown)} "
                          f"(a recommendation has {', '.join(RecommendedDecoding.model_fields)})")
    return recommended
