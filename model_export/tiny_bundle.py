"""Build a tiny but real model bundle (docs/bundle-format.md, format version 2; 1 with ``row_layout``) without torch.

The graphs are written with ``onnx.helper`` and filled with seeded random weights, so the same
``seed`` always gives byte-identical files. They follow the bundle contract exactly:

encoder.onnx
    ``image`` [N, 3, 224, 224] -> ``features`` [N, P, D], ``h0``/``c0`` [N, hidden],
    ``att_proj`` [N, P, A]. The image is average-pooled to a 7x7 grid (P = 49), a 1x1 convolution
    plus tanh projects each cell to D features; h0/c0 are tanh of a linear map of the mean feature.
    With ``attention=False`` (show_and_tell) ``features`` and ``att_proj`` are [N, 1, 1] zeros.

decoder.onnx (one step)
    ``tokens`` [B], ``h``/``c`` [B, hidden], ``features`` [N, P, D], ``att_proj`` [N, P, A] ->
    ``log_probs`` [B, V], ``h_out``/``c_out`` [B, hidden], ``alpha`` [B, P]. The B = N * R rows
    are image-major blocks: each image's R rows attend over its own grid with a batched MatMul
    ([N, R, P] x [N, P, D]); additive attention (softmax over P) gives ``alpha`` and a context
    vector; an LSTM cell takes [embedding(token), context]; a linear layer and LogSoftmax give the
    next-token distribution. ``row_layout=True`` builds the older (format 1.0) step instead, whose
    rows gather their image's grid by an extra ``row_image`` [B] input: the same arithmetic, so the
    same weights give the same captions either way.

To make captions non-trivial, the weights are random but shaped: one hidden unit is a "clock"
whose cell value grows by a fixed step each step and drives the ``<end>`` logit, so captions end
after a few tokens (how many depends on the image); ``<pad>`` and ``<start>`` get a large negative
bias so they are practically never produced; and the output layer also reads the attention context
and the initial image state, so the words depend on the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.inference.bundle import (
    IMAGENET_OUTPUT,
    Architecture,
    ConfidenceCalibration,
    Evaluation,
    FileEntry,
    Labels,
    Manifest,
    ModelId,
    Parity,
    Preprocessing,
    RecommendedDecoding,
    ReferenceCaption,
    SpecialTokens,
    Training,
    TrainingData,
    sha256_file,
)

OPSET = 17
IR_VERSION = 8  # readable by every onnxruntime >= 1.14

VOCAB = [
    "<pad>", "<start>", "<end>", "<unk>",
    "a", "cat", "dog", "man", "woman", "sitting", "standing", "on", "in", "the",
    "grass", "red", "blue", "with", "hat", "street", "near", "tree",
]
SPECIAL = {"pad": 0, "start": 1, "end": 2, "unk": 3}

IMAGE_SIZE = 224
GRID = 7
POOL = IMAGE_SIZE // GRID  # 32
EMBED = 12
HIDDEN = 24
FEAT = 16
ATT = 12
LABEL_CLASSES = 10  # the stand-in ImageNet head of a bundle made with labels=True
LABEL_NAMES = [f"tiny class {i}" for i in range(LABEL_CLASSES)]
# labels.json `words` of a bundle made with label_words=True: two classes share "cat" (its probability
# is their sum), one class has no word
LABEL_WORDS = [[["cat"]], [["dog"]], [["man"]], [["woman"]], [["hat"]], [["tree"]], [["grass"]], [["street"]], [],
               [["cat"]]]


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def _f32(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _build_encoder(rng: np.random.Generator, attention: bool, labels_rng: np.random.Generator | None = None
                   ) -> onnx.ModelProto:
    conv_w = _f32(rng, FEAT, 3, 1, 1, scale=1.5)
    conv_b = _f32(rng, FEAT, scale=0.3)
    w_h = _f32(rng, FEAT, HIDDEN, scale=2.5)
    b_h = _f32(rng, HIDDEN, scale=0.2)
    w_c = _f32(rng, FEAT, HIDDEN, scale=2.5)
    b_c = _f32(rng, HIDDEN, scale=0.2)
    w_att = _f32(rng, FEAT, ATT, scale=1.0 / np.sqrt(FEAT))  # drawn in both cases: same stream
    # the clock unit (index 0) starts at a small image-dependent value
    w_h[:, 0] *= 0.2
    w_c[:, 0] *= 0.2
    b_c[0] = -1.0

    inits = [
        _init("conv_w", conv_w), _init("conv_b", conv_b),
        _init("w_h", w_h), _init("b_h", b_h), _init("w_c", w_c), _init("b_c", b_c),
        _init("grid_shape", np.array([0, FEAT, GRID * GRID], dtype=np.int64)),
    ]
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"],
                         kernel_shape=[POOL, POOL], strides=[POOL, POOL]),
        helper.make_node("Conv", ["pooled", "conv_w", "conv_b"], ["conv"]),
        helper.make_node("Tanh", ["conv"], ["conv_act"]),
        # [N, D, 7, 7] -> [N, D, 49] -> [N, 49, D] (row-major grid)
        helper.make_node("Reshape", ["conv_act", "grid_shape"], ["grid_flat"]),
        helper.make_node("Transpose", ["grid_flat"], ["grid"], perm=[0, 2, 1]),
        helper.make_node("ReduceMean", ["grid"], ["mean_feat"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["mean_feat", "w_h"], ["h_lin"]),
        helper.make_node("Add", ["h_lin", "b_h"], ["h_pre"]),
        helper.make_node("Tanh", ["h_pre"], ["h0"]),
        helper.make_node("MatMul", ["mean_feat", "w_c"], ["c_lin"]),
        helper.make_node("Add", ["c_lin", "b_c"], ["c_pre"]),
        helper.make_node("Tanh", ["c_pre"], ["c0"]),
    ]
    if attention:
        inits.append(_init("w_att", w_att))
        nodes += [
            helper.make_node("Identity", ["grid"], ["features"]),
            helper.make_node("MatMul", ["grid", "w_att"], ["att_proj"]),
        ]
        p, d, a = GRID * GRID, FEAT, ATT
    else:
        # [N, 1, 1] zeros that keep the dynamic batch axis
        inits.append(_init("zero", np.zeros((), dtype=np.float32)))
        nodes += [
            helper.make_node("ReduceMean", ["grid"], ["grid_mean"], axes=[1, 2], keepdims=1),
            helper.make_node("Mul", ["grid_mean", "zero"], ["features"]),
            helper.make_node("Identity", ["features"], ["att_proj"]),
        ]
        p, d, a = 1, 1, 1
    head = []
    if labels_rng is not None:  # a stand-in ImageNet head: softmax of a projection of the pooled grid
        inits += [_init("w_cls", _f32(labels_rng, FEAT, LABEL_CLASSES, scale=3.0)),
                  _init("b_cls", _f32(labels_rng, LABEL_CLASSES, scale=0.5))]
        nodes += [
            helper.make_node("MatMul", ["mean_feat", "w_cls"], ["cls_lin"]),
            helper.make_node("Add", ["cls_lin", "b_cls"], ["cls_logits"]),
            helper.make_node("Softmax", ["cls_logits"], [IMAGENET_OUTPUT], axis=1),
        ]
        head = [helper.make_tensor_value_info(IMAGENET_OUTPUT, TensorProto.FLOAT, ["N", LABEL_CLASSES])]

    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", p, d]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["N", HIDDEN]),
            helper.make_tensor_value_info("c0", TensorProto.FLOAT, ["N", HIDDEN]),
            helper.make_tensor_value_info("att_proj", TensorProto.FLOAT, ["N", p, a]),
            *head,
        ],
        inits,
    )
    return _finish(graph, "tiny-encoder")


def _build_decoder(rng: np.random.Generator, attention: bool, row_layout: bool = False,
                   end_bias: float = -9.0) -> onnx.ModelProto:
    vocab_size = len(VOCAB)
    d, a = (FEAT, ATT) if attention else (1, 1)
    p = GRID * GRID if attention else 1

    embed = _f32(rng, vocab_size, EMBED, scale=1.0)
    w_ha = _f32(rng, HIDDEN, a, scale=1.0 / np.sqrt(HIDDEN))
    v_att = _f32(rng, a, 1, scale=2.0)
    w_x = _f32(rng, EMBED + d, 4 * HIDDEN, scale=0.8 / np.sqrt(EMBED + d))
    w_hh = _f32(rng, HIDDEN, 4 * HIDDEN, scale=0.8 / np.sqrt(HIDDEN))
    b = _f32(rng, 4 * HIDDEN, scale=0.1)
    b[HIDDEN:2 * HIDDEN] += 2.0  # forget gates mostly open: the image state persists
    w_out = _f32(rng, HIDDEN, vocab_size, scale=3.5 / np.sqrt(HIDDEN))
    w_ctx = _f32(rng, d, vocab_size, scale=1.5 / np.sqrt(d))
    b_out = _f32(rng, vocab_size, scale=0.3)
    # bigram term: the previous token shifts the next-token logits; repeating a word is unlikely
    bigram = _f32(rng, vocab_size, vocab_size, scale=1.0)
    np.fill_diagonal(bigram, -4.0)

    # Gate layout [i, f, g, o]. Unit 0 is a clock: input/forget/output gates saturated open,
    # candidate fixed, so c grows by ~0.3 a step and h[0] = tanh(c[0]) rises toward 1.
    clock = 0
    for gate in range(4):
        w_x[:, gate * HIDDEN + clock] = 0.0
        w_hh[:, gate * HIDDEN + clock] = 0.0
    b[0 * HIDDEN + clock] = 12.0  # i
    b[1 * HIDDEN + clock] = 12.0  # f
    b[2 * HIDDEN + clock] = 0.31  # g: tanh(0.31) ~ 0.3
    b[3 * HIDDEN + clock] = 12.0  # o
    # <end> is driven by the clock; no other unit pushes it much
    end = SPECIAL["end"]
    w_out[:, end] *= 0.3
    w_out[clock, :] = 0.0
    w_out[clock, end] = 14.0
    b_out[end] = end_bias  # the default -9 ends after a few words; -30 never before max_length
    w_ctx[:, end] = 0.0
    # <pad> and <start> are never a next token; <unk> is rare
    bigram[:, end] = 0.0
    for name, bias in (("pad", -30.0), ("start", -30.0), ("unk", -4.0)):
        w_out[:, SPECIAL[name]] = 0.0
        w_ctx[:, SPECIAL[name]] = 0.0
        bigram[:, SPECIAL[name]] = 0.0
        b_out[SPECIAL[name]] = bias

    inits = [
        _init("embed", embed), _init("w_ha", w_ha), _init("v_att", v_att),
        _init("w_x", w_x), _init("w_hh", w_hh), _init("b", b),
        _init("w_out", w_out), _init("w_ctx", w_ctx), _init("b_out", b_out), _init("bigram", bigram),
        _init("axes_last", np.array([-1], dtype=np.int64)),
        _init("axes_p", np.array([1], dtype=np.int64)),
    ]
    if not row_layout:
        inits += [
            _init("zero", np.array([0], dtype=np.int64)),
            _init("block_tail", np.array([-1, 1, a], dtype=np.int64)),
            _init("rows_d", np.array([-1, d], dtype=np.int64)),
            _init("rows_p", np.array([-1, p], dtype=np.int64)),
        ]
    if row_layout:  # format 1.0: rows gather their image's grid
        attend = [
            helper.make_node("Gather", ["features", "row_image"], ["row_feat"], axis=0),   # [B, P, D]
            helper.make_node("Gather", ["att_proj", "row_image"], ["row_att"], axis=0),    # [B, P, A]
            # additive attention: e = v . tanh(att_proj + h W_ha)
            helper.make_node("MatMul", ["h", "w_ha"], ["h_att"]),                          # [B, A]
            helper.make_node("Unsqueeze", ["h_att", "axes_p"], ["h_att3"]),                # [B, 1, A]
            helper.make_node("Add", ["row_att", "h_att3"], ["att_sum"]),                   # [B, P, A]
            helper.make_node("Tanh", ["att_sum"], ["att_act"]),
            helper.make_node("MatMul", ["att_act", "v_att"], ["scores3"]),                 # [B, P, 1]
            helper.make_node("Squeeze", ["scores3", "axes_last"], ["scores"]),             # [B, P]
            helper.make_node("Softmax", ["scores"], ["alpha"], axis=-1),                   # [B, P]
            helper.make_node("Unsqueeze", ["alpha", "axes_last"], ["alpha3"]),             # [B, P, 1]
            helper.make_node("Mul", ["row_feat", "alpha3"], ["weighted"]),                 # [B, P, D]
            helper.make_node("ReduceSum", ["weighted", "axes_p"], ["context"], keepdims=0),  # [B, D]
        ]
    else:  # image-major blocks of R rows: each image attends with its own rows, nothing is gathered
        attend = [
            helper.make_node("Shape", ["features"], ["feature_shape"]),
            helper.make_node("Gather", ["feature_shape", "zero"], ["n"], axis=0),              # [1]: N
            helper.make_node("Concat", ["n", "block_tail"], ["block_shape"], axis=0),          # [N, -1, 1, A]
            helper.make_node("MatMul", ["h", "w_ha"], ["h_att"]),                              # [B, A]
            helper.make_node("Reshape", ["h_att", "block_shape"], ["h_att4"]),                 # [N, R, 1, A]
            helper.make_node("Unsqueeze", ["att_proj", "axes_p"], ["att4"]),                   # [N, 1, P, A]
            helper.make_node("Add", ["att4", "h_att4"], ["att_sum"]),                          # [N, R, P, A]
            helper.make_node("Tanh", ["att_sum"], ["att_act"]),
            helper.make_node("MatMul", ["att_act", "v_att"], ["scores4"]),                     # [N, R, P, 1]
            helper.make_node("Squeeze", ["scores4", "axes_last"], ["scores"]),                 # [N, R, P]
            helper.make_node("Softmax", ["scores"], ["alpha_block"], axis=-1),                 # [N, R, P]
            helper.make_node("MatMul", ["alpha_block", "features"], ["context_block"]),        # [N, R, D]
            helper.make_node("Reshape", ["context_block", "rows_d"], ["context"]),             # [B, D]
            helper.make_node("Reshape", ["alpha_block", "rows_p"], ["alpha"]),                 # [B, P]
        ]
    nodes = [
        helper.make_node("Gather", ["embed", "tokens"], ["emb"], axis=0),              # [B, E]
        *attend,
        # LSTM cell on [emb, context]
        helper.make_node("Concat", ["emb", "context"], ["x"], axis=1),                 # [B, E+D]
        helper.make_node("MatMul", ["x", "w_x"], ["gx"]),
        helper.make_node("MatMul", ["h", "w_hh"], ["gh"]),
        helper.make_node("Add", ["gx", "gh"], ["g_sum"]),
        helper.make_node("Add", ["g_sum", "b"], ["gates"]),                            # [B, 4H]
        helper.make_node("Split", ["gates"], ["gi", "gf", "gg", "go"], axis=1),
        helper.make_node("Sigmoid", ["gi"], ["i"]),
        helper.make_node("Sigmoid", ["gf"], ["f"]),
        helper.make_node("Tanh", ["gg"], ["g"]),
        helper.make_node("Sigmoid", ["go"], ["o"]),
        helper.make_node("Mul", ["f", "c"], ["fc"]),
        helper.make_node("Mul", ["i", "g"], ["ig"]),
        helper.make_node("Add", ["fc", "ig"], ["c_out"]),
        helper.make_node("Tanh", ["c_out"], ["c_act"]),
        helper.make_node("Mul", ["o", "c_act"], ["h_out"]),
        # next-token distribution
        helper.make_node("MatMul", ["h_out", "w_out"], ["logit_h"]),
        helper.make_node("MatMul", ["context", "w_ctx"], ["logit_c"]),
        helper.make_node("Gather", ["bigram", "tokens"], ["logit_b"], axis=0),
        helper.make_node("Add", ["logit_h", "logit_c"], ["logit_hc"]),
        helper.make_node("Add", ["logit_hc", "logit_b"], ["logit_hcb"]),
        helper.make_node("Add", ["logit_hcb", "b_out"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_decoder_step",
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["B"]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", HIDDEN]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, ["B", HIDDEN]),
            *([helper.make_tensor_value_info("row_image", TensorProto.INT64, ["B"])] if row_layout else []),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", "P", d]),
            helper.make_tensor_value_info("att_proj", TensorProto.FLOAT, ["N", "P", a]),
        ],
        [
            helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["B", vocab_size]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["B", HIDDEN]),
            helper.make_tensor_value_info("c_out", TensorProto.FLOAT, ["B", HIDDEN]),
            helper.make_tensor_value_info("alpha", TensorProto.FLOAT, ["B", "P"]),
        ],
        inits,
    )
    return _finish(graph, "tiny-decoder")


def _finish(graph: onnx.GraphProto, producer: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="model_export.tiny_bundle",
        producer_version="1",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def make_tiny_bundle(
    path: str | Path,
    attention: bool = True,
    *,
    seed: int = 0,
    max_length: int = 16,
    name: str | None = None,
    version: str = "0.0.1",
    with_eval: bool = True,
    row_layout: bool = False,
    decoding: dict | None = None,
    labels: bool = False,
    label_words: bool = False,
    confidence: dict | None = None,
    reference: bool = False,
    end_bias: float = -9.0,
) -> Path:
    """Write a complete bundle into the folder ``path`` (created if needed) and return it.

    ``attention=True`` gives a show_attend_tell bundle (P = 49), ``False`` a show_and_tell one
    (features/att_proj are [N, 1, 1] zeros, alpha is all ones). The same arguments always give
    byte-identical files. ``labels=True`` adds a stand-in ImageNet head (LABEL_CLASSES classes, its
    own random weights, so the captions are those of the same bundle without labels) and labels.json;
    ``label_words=True`` also gives labels.json its caption words per class (LABEL_WORDS), for guide=labels.
    ``confidence``: the manifest's confidence calibration block (``{"slope": ..., "intercept": ...}``).
    ``reference=True`` records `parity.reference`: the greedy captions of REFERENCE_SEEDS' inputs
    (app/inference/bundle.py reference_input), made with the service's own engine, as `captioner export` does.
    ``end_bias``: the <end> logit's bias (-30: captions never end before max_length, for long searches).
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    encoder = _build_encoder(rng, attention, np.random.default_rng(seed + 7919) if labels else None)
    decoder = _build_decoder(rng, attention, row_layout, end_bias)
    onnx.save_model(encoder, out / "encoder.onnx")
    onnx.save_model(decoder, out / "decoder.onnx")
    (out / "vocab.json").write_text(json.dumps({"tokens": VOCAB}, indent=1) + "\n", encoding="utf-8")

    files = {}
    names = (("encoder", "encoder.onnx"), ("decoder", "decoder.onnx"), ("vocab", "vocab.json"))
    if labels:
        content = {"names": LABEL_NAMES, **({"words": LABEL_WORDS} if label_words else {})}
        (out / "labels.json").write_text(json.dumps(content) + "\n", encoding="utf-8")
        names += (("labels", "labels.json"),)
    for key, fname in names:
        fpath = out / fname
        files[key] = FileEntry(path=fname, sha256=sha256_file(fpath), bytes=fpath.stat().st_size)

    evaluation = {
        "split": "test",
        "images": 8,
        "greedy": {"BLEU-4": 0.01, "CIDEr": 0.02},
        "beam3": {"BLEU-4": 0.02, "CIDEr": 0.03},
    }
    manifest = Manifest(
        format_version=1 if row_layout else 2,
        model=ModelId(name=name or ("tiny-sat" if attention else "tiny-st"), version=version, created="2026-01-01T00:00:00Z"),
        architecture=Architecture(
            encoder="avgpool-conv1x1",
            decoder="show_attend_tell" if attention else "show_and_tell",
            attention=attention,
            grid_size=(GRID, GRID) if attention else (1, 1),
            feature_dim=FEAT if attention else 1,
            embed_dim=EMBED,
            hidden_dim=HIDDEN,
            attention_dim=ATT if attention else 1,
            vocab_size=len(VOCAB),
        ),
        preprocessing=Preprocessing(image_size=(IMAGE_SIZE, IMAGE_SIZE), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        special_tokens=SpecialTokens(**SPECIAL),
        max_length=max_length,
        # not validated here: tests write out-of-range recommendations for load_bundle to refuse
        decoding=RecommendedDecoding.model_construct(**decoding) if decoding else None,
        confidence=ConfidenceCalibration.model_validate(confidence) if confidence else None,
        labels=Labels(classes=LABEL_CLASSES, source="model_export/tiny_bundle.py") if labels else None,
        files=files,
        training=Training(data=TrainingData(name="random weights (model_export/tiny_bundle.py)"), epochs=0,
                          settings={"seed": seed}),
        evaluation=Evaluation.model_validate(evaluation),
    )
    (out / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
    if reference:
        manifest = manifest.model_copy(update={"parity": Parity(reference=reference_captions(out))})
        (out / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
    if with_eval:
        (out / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
    return out


REFERENCE_SEEDS = (0, 1, 2)


def reference_captions(bundle_path: Path, seeds: tuple[int, ...] = REFERENCE_SEEDS) -> list[ReferenceCaption]:
    """The greedy captions of the reference inputs, by the service's engine on CPU (no torch)."""
    from app.inference.bundle import load_bundle, reference_input
    from app.inference.decoding import DecodingConfig
    from app.inference.engine import Engine

    bundle = load_bundle(bundle_path)
    engine = Engine(bundle, "cpu", threads=1)
    greedy = DecodingConfig(strategy="greedy", beam_size=1, num_captions=1)
    results = engine.run([reference_input(seed, bundle.preprocessing) for seed in seeds], greedy)
    return [ReferenceCaption(seed=seed, tokens=r.captions[0].tokens) for seed, r in zip(seeds, results, strict=True)]


if __name__ == "__main__":  # python -m model_export.tiny_bundle OUT_DIR [--no-attention]
    import sys

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(make_tiny_bundle(args[0] if args else "models/tiny", attention="--no-attention" not in sys.argv))
