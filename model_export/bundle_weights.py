"""A float32 Show, Attend and Tell bundle's decoder weights, read back from its ONNX graphs, so a new
model can start from a shipped one (`captioner train --init-checkpoint <bundle folder>`).

The exporter keeps most parameter names (`decoder.lstm.weight_ih`, `model.decoder.init_h.weight`);
the two it folds into anonymous MatMul initializers (feature_att.weight, score.weight) are found
by the node that reads them, and stored transposed there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from app.inference.bundle import BundleError, load_bundle


class BundleWeightsError(Exception):
    """A bundle whose decoder weights cannot be read back into a torch decoder."""


def _initializers(path: Path) -> tuple[dict[str, np.ndarray], list]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}, list(model.graph.node)


def _matmul_weight(nodes: list, inits: dict[str, np.ndarray], output_prefix: str) -> np.ndarray:
    """The initializer a MatMul node named under `output_prefix` reads (torch's weight, transposed)."""
    for node in nodes:
        if node.op_type == "MatMul" and node.output[0].startswith(output_prefix):
            for name in node.input:
                if name in inits:
                    return inits[name].T.copy()
    raise BundleWeightsError(f"no MatMul weight under {output_prefix}")


def decoder_state(bundle_dir: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(AttentionDecoder state dict without label-prior parameters, the bundle's vocabulary)."""
    try:
        bundle = load_bundle(Path(bundle_dir))
    except BundleError as exc:
        raise BundleWeightsError(str(exc)) from None
    arch = bundle.manifest.architecture
    if arch.decoder != "show_attend_tell" or bundle.manifest.precision != "fp32":
        raise BundleWeightsError(f"{bundle_dir}: only float32 show_attend_tell bundles can be read back "
                                 f"(this one: {arch.decoder}, {bundle.manifest.precision})")
    enc, enc_nodes = _initializers(bundle.encoder_path)
    dec, dec_nodes = _initializers(bundle.decoder_path)
    state: dict[str, np.ndarray] = {}
    for name in ("position", "feature_att.bias", "init_h.weight", "init_h.bias", "init_c.weight", "init_c.bias"):
        state[name] = enc[f"model.decoder.{name}"]
    state["feature_att.weight"] = _matmul_weight(enc_nodes, enc, "/feature_att/")
    for name in ("embed.weight", "hidden_att.weight", "hidden_att.bias", "score.bias", "gate.weight", "gate.bias",
                 "lstm.weight_ih", "lstm.weight_hh", "lstm.bias_ih", "lstm.bias_hh", "out.weight", "out.bias"):
        if f"decoder.{name}" not in dec:
            raise BundleWeightsError(f"{bundle.decoder_path}: no initializer decoder.{name}")
        state[name] = dec[f"decoder.{name}"]
    state["score.weight"] = _matmul_weight(dec_nodes, dec, "/score/")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, list(bundle.vocab)
