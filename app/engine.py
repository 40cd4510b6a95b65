"""The inference engine: onnxruntime sessions for a bundle's two graphs, and captioning on top of
`app/decoding.py`.

`Engine.caption(images, config)` encodes the whole batch in one encoder call, then runs the beam
search with one decoder call per step for all rows of all images. The feature grid stays once per
image (rows point at their image), so beams never copy it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import onnxruntime as ort

from app.bundle import Bundle
from app.decoding import DecodingConfig, Hypothesis, beam_search

log = logging.getLogger("captioner.engine")

# A two-node graph (Gather h and c by parent row) that reorders beam state where it lives, so with
# IO binding h and c never leave the device. Built by tests/test_engine_binding.py, which checks it.
REORDER_GRAPH = Path(__file__).with_name("reorder.onnx")

ENCODER_OUTPUTS = ("features", "h0", "c0", "att_proj")
DECODER_INPUTS = ("tokens", "h", "c", "row_image", "features", "att_proj")
DECODER_OUTPUTS = ("log_probs", "h_out", "c_out", "alpha")


class EngineError(Exception):
    """The engine cannot run as configured (e.g. CUDA requested but not available)."""


@dataclass
class Caption:
    text: str
    tokens: list[str]
    token_ids: list[int]
    score: float
    normalized_score: float
    attention: np.ndarray | None = None  # [len(tokens) + 1, P] for attention models, when asked


def _providers(device: str) -> tuple[list, str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    if "CUDAExecutionProvider" not in available:
        if device == "cuda":
            raise EngineError(
                "device=cuda but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use device=cpu"
            )
        log.warning("device=auto: CUDAExecutionProvider is not available; running on CPU")
        return ["CPUExecutionProvider"], "cpu"
    cuda_options = {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "1"}
    return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"], "cuda"


class Engine:
    """onnxruntime sessions for one bundle, and `caption()` on top of app/decoding.py."""

    def __init__(
        self,
        bundle: Bundle,
        device: Literal["auto", "cuda", "cpu"] = "auto",
        threads: int | None = None,
        io_binding: bool | None = None,
    ):
        """`io_binding`: keep the grid, its projection and h/c in the device's memory between steps
        (only token ids go in and log-probabilities come out each step). Default: on for CUDA."""
        if device not in ("auto", "cuda", "cpu"):
            raise EngineError(f"device must be auto, cuda or cpu, not {device!r}")
        self.bundle = bundle
        ort.disable_telemetry_events()  # nothing leaves the machine (and no write on a read-only root)
        providers, wanted = _providers(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.encoder = ort.InferenceSession(str(bundle.encoder_path), options, providers=providers)
            self.decoder = ort.InferenceSession(str(bundle.decoder_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"cannot load the bundle's ONNX graphs: {exc}") from None
        self.provider = self.decoder.get_providers()[0]
        if wanted == "cuda" and self.provider != "CUDAExecutionProvider":
            # onnxruntime falls back to CPU silently when CUDA libraries fail to load
            if device == "cuda":
                raise EngineError(
                    "device=cuda but onnxruntime could not load CUDAExecutionProvider "
                    f"(session providers: {self.decoder.get_providers()}); check the CUDA and cuDNN libraries"
                )
            log.warning("device=auto: CUDAExecutionProvider failed to load; running on CPU")
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self._check_graphs()
        self._decoder_inputs = [i.name for i in self.decoder.get_inputs()]
        self._has_alpha = bundle.attention and "alpha" in [o.name for o in self.decoder.get_outputs()]
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        if self.io_binding:
            self.reorder = ort.InferenceSession(str(REORDER_GRAPH), options, providers=self.decoder.get_providers())

    def _check_graphs(self) -> None:
        enc_in = [i.name for i in self.encoder.get_inputs()]
        enc_out = {o.name for o in self.encoder.get_outputs()}
        dec_in = {i.name for i in self.decoder.get_inputs()}
        dec_out = {o.name for o in self.decoder.get_outputs()}
        problems = []
        if enc_in != ["image"]:
            problems.append(f"encoder inputs are {enc_in}, expected ['image']")
        if missing := set(ENCODER_OUTPUTS) - enc_out:
            problems.append(f"encoder lacks outputs {sorted(missing)}")
        if missing := {"tokens", "h", "c"} - dec_in:
            problems.append(f"decoder lacks inputs {sorted(missing)}")
        if extra := dec_in - set(DECODER_INPUTS):
            problems.append(f"decoder has unknown inputs {sorted(extra)}")
        if missing := {"log_probs", "h_out", "c_out"} - dec_out:
            problems.append(f"decoder lacks outputs {sorted(missing)}")
        if problems:
            raise EngineError(f"{self.bundle.path}: the graphs do not match the bundle format: " + "; ".join(problems))

    # ---- the two graphs -------------------------------------------------------------------

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.encoder.run(list(ENCODER_OUTPUTS), {"image": images})
        return dict(zip(ENCODER_OUTPUTS, outputs))

    def _make_step(self, encoded: dict[str, np.ndarray]):
        h, c = encoded["h0"], encoded["c0"]
        static = {name: encoded[name] for name in ("features", "att_proj") if name in self._decoder_inputs}
        outputs = ["log_probs", "h_out", "c_out"] + (["alpha"] if self._has_alpha else [])
        state = {"h": h, "c": c}

        def step(tokens: np.ndarray, parents: np.ndarray, row_image: np.ndarray):
            feeds = {
                "tokens": tokens,
                "h": state["h"][parents],
                "c": state["c"][parents],
                **static,
            }
            if "row_image" in self._decoder_inputs:
                feeds["row_image"] = row_image
            result = self.decoder.run(outputs, feeds)
            state["h"], state["c"] = result[1], result[2]
            return result[0], (result[3] if self._has_alpha else None)

        return step

    def _make_bound_step(self, images: np.ndarray):
        """The same step with IO binding: encoder outputs and h/c stay as device OrtValues."""
        device = "cuda" if self.device == "cuda" else "cpu"
        binding = self.encoder.io_binding()
        binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(images, device, 0))
        for name in ENCODER_OUTPUTS:
            binding.bind_output(name, device)
        self.encoder.run_with_iobinding(binding)
        encoded = dict(zip(ENCODER_OUTPUTS, binding.get_outputs()))
        state = {"h": encoded["h0"], "c": encoded["c0"]}
        static = {name: encoded[name] for name in ("features", "att_proj") if name in self._decoder_inputs}

        def step(tokens: np.ndarray, parents: np.ndarray, row_image: np.ndarray):
            reorder = self.reorder.io_binding()
            reorder.bind_ortvalue_input("h", state["h"])
            reorder.bind_ortvalue_input("c", state["c"])
            reorder.bind_cpu_input("parents", np.ascontiguousarray(parents, dtype=np.int64))
            reorder.bind_output("h_selected", device)
            reorder.bind_output("c_selected", device)
            self.reorder.run_with_iobinding(reorder)
            h, c = reorder.get_outputs()

            bound = self.decoder.io_binding()
            bound.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
            bound.bind_ortvalue_input("h", h)
            bound.bind_ortvalue_input("c", c)
            if "row_image" in self._decoder_inputs:
                bound.bind_cpu_input("row_image", np.ascontiguousarray(row_image, dtype=np.int64))
            for name, value in static.items():
                bound.bind_ortvalue_input(name, value)
            bound.bind_output("log_probs", "cpu")
            bound.bind_output("h_out", device)
            bound.bind_output("c_out", device)
            if self._has_alpha:
                bound.bind_output("alpha", "cpu")
            self.decoder.run_with_iobinding(bound)
            outputs = bound.get_outputs()
            state["h"], state["c"] = outputs[1], outputs[2]
            return outputs[0].numpy(), (outputs[3].numpy() if self._has_alpha else None)

        return step

    # ---- captioning -----------------------------------------------------------------------

    def caption(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        config: DecodingConfig,
        attention: bool = False,
    ) -> list[list[Caption]]:
        """Caption a batch of preprocessed images ([3, H, W] float32 each). One list per image,
        best first, `num_captions` long (shorter only if the rules left no finished hypothesis)."""
        batch = np.ascontiguousarray(np.stack(list(images)) if not isinstance(images, np.ndarray) else images, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[0] == 0:
            raise ValueError(f"expected a non-empty [N, 3, H, W] batch, got shape {batch.shape}")
        resolved = config.resolved(self.bundle.max_length)
        step = self._make_bound_step(batch) if self.io_binding else self._make_step(self.encode(batch))
        hypotheses = beam_search(
            step,
            num_images=batch.shape[0],
            config=resolved,
            special=self.bundle.special,
            keep_attention=attention and self._has_alpha,
        )
        return [[self._to_caption(h) for h in per_image] for per_image in hypotheses]

    def _to_caption(self, hyp: Hypothesis) -> Caption:
        words = self.bundle.words(hyp.tokens)
        return Caption(
            text=" ".join(words),
            tokens=words,
            token_ids=list(hyp.tokens),
            score=hyp.score,
            normalized_score=hyp.normalized_score,
            attention=hyp.attention,
        )

    def warmup(self) -> None:
        """One real caption on a blank image, so the first request pays no lazy initialisation."""
        height, width = self.bundle.preprocessing.image_size
        blank = np.zeros((1, 3, height, width), dtype=np.float32)
        self.caption(blank, DecodingConfig(strategy="beam", beam_size=2, max_length=min(4, self.bundle.max_length)))

