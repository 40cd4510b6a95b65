"""The inference engine: onnxruntime sessions for a bundle's two graphs, and captioning on top of
`app/inference/decoding.py`.

`Engine.run(images, configs)` (`Engine.caption`: its captions only) decodes with each config's
`DecodingConfig.resolved` settings: it encodes the whole batch in one encoder call, then runs the beam
search with one decoder call per step for all rows of all images, whatever each image's settings.
The feature grid stays once per image and beams never copy it: the decoder's rows are laid out in
image-major blocks of R rows (B = N * R, R = the most live rows any image has; the other rows of a
block are padding whose outputs are ignored), and each image attends with its own block
(docs/bundle-format.md). Older bundles whose step takes `row_image` get it for the same layout.

Per step only each row's best few tokens reach the search: a tiny TopK graph (app/inference/select.onnx) runs
on the decoder's log-probabilities where they are. With IO binding (the default on CUDA) the grid,
h/c and the log-probabilities stay in device memory in buffers allocated once per call and reused at
every step; only token ids go in and [rows, k] candidates come out.

Cancellation (`run(..., cancelled=...)`, app/inference/decoding.py): a cancelled image's rows leave the search
at the next step. On the host path an image without live rows (cancelled, or all its beams ended)
also leaves the decoder's layout: the step runs on the blocks of the images still decoding, with
their features (sliced once per change of the live set), so the decoder call has fewer rows. With IO
binding the buffers keep their size (padding rows are computed and ignored); the search still sheds
the rows, and the call ends as soon as no image is left. `EngineStats` times the two halves and
counts the steps (the service's metrics and trace spans).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnxruntime as ort

from app.inference.bundle import IMAGENET_OUTPUT, WORD_PRIOR, Bundle
from app.inference.confidence import confidence
from app.inference.decoding import MAX_CONSTRAINTS, DecodingConfig, Hypothesis, SearchStats, beam_search
from app.inference.graphs import REORDER_GRAPH, SELECT_GRAPH
from app.inference.guidance import GroupTable, GuideWord, guide_words

log = logging.getLogger("captioner.engine")

# REORDER_GRAPH reorders beam state where it lives; SELECT_GRAPH runs TopK for StepOutput
# (app/inference/graphs.py builds both).

ENCODER_OUTPUTS = ("features", "h0", "c0", "att_proj")
# row_image: format 1 bundles only; word_prior: label-prior decoders (the encoder outputs it too)
DECODER_INPUTS = ("tokens", "h", "c", "row_image", "features", "att_proj", WORD_PRIOR)
STATIC_INPUTS = ("features", "att_proj", WORD_PRIOR)  # one row per image, never copied per beam row
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
    token_probs: list[float] = field(default_factory=list)  # the model's probability of each word of `tokens`
    end_prob: float = 0.0  # ... and of the <end> after them
    confidence: float = 0.0  # app/inference/confidence.py: in [0, 1], calibrated when the bundle says how
    token_log_probs: list[float] = field(default_factory=list)  # every generated token's, <end> last
    met: bool = True  # False: the search's fallback, missing a constraint (include, guide) it could not meet


@dataclass
class Label:
    """One ImageNet-1k class of an image, from the encoder's head (bundles with labels)."""

    name: str
    class_id: int
    probability: float


@dataclass
class ImageResult:
    """What the engine says about one image: its captions, best first, and the labels asked for."""

    captions: list[Caption]
    labels: list[Label]
    guide: list[GuideWord] = field(default_factory=list)  # the constraints its labels gave (guide="labels")


@dataclass
class EngineStats:
    """What one `Engine.run` call did: the encoder's and the search's wall-clock times (time.time_ns(),
    for trace spans) and the search's counts (steps, rows, cancelled images)."""

    encode_start_ns: int = 0
    encode_end_ns: int = 0
    decode_start_ns: int = 0
    decode_end_ns: int = 0
    search: SearchStats = field(default_factory=SearchStats)

    @property
    def steps(self) -> int:
        return self.search.steps


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
    """onnxruntime sessions for one bundle, and `caption()` on top of app/inference/decoding.py."""

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
        # No busy-waiting between ops: the service's event loop and image decoding share these cores,
        # and even alone this was faster (2 cores, default bundle, batch 32: 82 vs 66 images/s).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        self._groups: GroupTable | None = None  # the label words as a matrix, built on first use (guide=labels)
        self._encoder_outputs = list(ENCODER_OUTPUTS) + ([WORD_PRIOR] if WORD_PRIOR in self._decoder_inputs else [])
        self._has_alpha = bundle.attention and "alpha" in [o.name for o in self.decoder.get_outputs()]
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self._vocab_out = len(bundle.vocab)  # load_bundle checked it against the manifest
        grid = bundle.manifest.architecture.grid_size
        self._grid_cells = int(grid[0]) * int(grid[1])
        self.select = ort.InferenceSession(str(SELECT_GRAPH), options, providers=self.decoder.get_providers())
        self._end = np.array([bundle.special["end"]], dtype=np.int64)
        if self.io_binding:
            self.reorder = ort.InferenceSession(str(REORDER_GRAPH), options, providers=self.decoder.get_providers())

    @property
    def has_labels(self) -> bool:
        """Whether the encoder gives ImageNet labels (bundles with labels.json)."""
        return self.bundle.has_labels

    @property
    def has_attention(self) -> bool:
        """Whether the decoder outputs attention weights (Show, Attend and Tell bundles)."""
        return bool(self._has_alpha)

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
        if self.bundle.has_labels and IMAGENET_OUTPUT not in enc_out:
            problems.append(f"the bundle has labels but the encoder lacks the {IMAGENET_OUTPUT} output")
        if missing := {"tokens", "h", "c"} - dec_in:
            problems.append(f"decoder lacks inputs {sorted(missing)}")
        if WORD_PRIOR in dec_in and WORD_PRIOR not in enc_out:
            problems.append(f"the decoder reads {WORD_PRIOR} but the encoder does not output it")
        if extra := dec_in - set(DECODER_INPUTS):
            problems.append(f"decoder has unknown inputs {sorted(extra)}")
        if missing := {"log_probs", "h_out", "c_out"} - dec_out:
            problems.append(f"decoder lacks outputs {sorted(missing)}")
        if problems:
            raise EngineError(f"{self.bundle.path}: the graphs do not match the bundle format: " + "; ".join(problems))

    # ---- the two graphs -------------------------------------------------------------------

    def encode(self, images: np.ndarray, labels: bool = False) -> dict[str, np.ndarray]:
        """The encoder's outputs by name; `labels`: also the ImageNet probabilities (IMAGENET_OUTPUT)."""
        names = [*self._encoder_outputs, IMAGENET_OUTPUT] if labels else list(self._encoder_outputs)
        return dict(zip(names, self.encoder.run(names, {"image": images}), strict=True))

    def _make_step(self, encoded: dict[str, np.ndarray], keep_attention: bool, block_limit: int | None = None):
        """The step on host arrays: each call lays the live rows out in blocks of R rows per image
        (R = the most live rows of any image at this step), padding rows zero. An image with more
        than `block_limit` rows (the widest beam of the batch; only constrained images have more)
        gets as many blocks of `block_limit` rows as it needs, each over its own grid."""
        n = encoded["h0"].shape[0]
        static = {name: encoded[name] for name in STATIC_INPUTS if name in self._decoder_inputs}
        outputs = ["log_probs", "h_out", "c_out"] + (["alpha"] if self._has_alpha else [])
        # the previous call's outputs, and where each of its live rows sits in them
        state = {"h": encoded["h0"], "c": encoded["c0"], "slots": np.arange(n)}

        live_key: bytes | None = None
        live_static = static

        def step(tokens: np.ndarray, parents: np.ndarray, row_image: np.ndarray):
            nonlocal live_key, live_static
            counts = np.bincount(row_image, minlength=n)
            if block_limit is not None and counts.max() > block_limit:
                # a constrained image (a bank of beams per set of met constraints) has more rows than any
                # plain one: it gets several blocks over its own grid, so every other image's block stays
                # `block_limit` rows wide instead of being padded to the constrained image's count
                per_block = block_limit
                per_image = -(-counts // per_block)
                owners = np.repeat(np.arange(n), per_image)  # the image of each block
                within = np.arange(row_image.size) - (np.cumsum(counts) - counts)[row_image]
                slots = ((np.cumsum(per_image) - per_image)[row_image] + within // per_block) * per_block \
                    + within % per_block
            else:
                owners = np.unique(row_image)  # the images still decoding (sorted; the search keeps their order)
                slots, per_block = block_slots(np.searchsorted(owners, row_image), int(owners.size))
            blocks = int(owners.size)
            # only the live images' blocks, with their features (fewer decoder rows), or several per image
            blocked = not np.array_equal(owners, np.arange(n))
            if blocked and owners.tobytes() != live_key:
                live_key = owners.tobytes()
                live_static = {name: value[owners] for name, value in static.items()}
            rows = blocks * per_block
            source = state["slots"][parents]
            feeds = {"tokens": np.zeros(rows, dtype=np.int64), **(live_static if blocked else static)}
            feeds["tokens"][slots] = tokens
            for name in ("h", "c"):
                padded = np.zeros((rows, state[name].shape[1]), dtype=np.float32)
                padded[slots] = state[name][source]
                feeds[name] = padded
            if "row_image" in self._decoder_inputs:
                feeds["row_image"] = np.repeat(np.arange(blocks, dtype=np.int64), per_block)
            result = self.decoder.run(outputs, feeds)
            state["h"], state["c"], state["slots"] = result[1], result[2], slots
            attention = result[3][slots] if self._has_alpha and keep_attention else None
            return _Selected(self, result[0], slots), attention

        return step

    def _make_bound_step(self, images: np.ndarray, per_block: int, keep_attention: bool, labels: bool = False):
        """The same step with IO binding. The encoder outputs, h/c and the log-probabilities stay as
        device OrtValues; every per-step buffer is allocated once for N blocks of `per_block` rows
        (the widest beam of the batch) and reused, so shapes never change between steps and nothing
        is allocated in the loop. Rows past each image's live ones are padding, outputs ignored.
        Returns the step and, with `labels`, the ImageNet probabilities (on the host)."""
        n = images.shape[0]
        capacity = n * per_block
        device = self.device
        binding = self.encoder.io_binding()
        binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(images, device, 0))
        for name in self._encoder_outputs:
            binding.bind_output(name, device)
        if labels:
            binding.bind_output(IMAGENET_OUTPUT, "cpu")
        self.encoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        encoded = dict(zip(self._encoder_outputs, outputs))
        probs = outputs[len(self._encoder_outputs)].numpy() if labels else None
        hidden = encoded["h0"].shape()[1]

        def buffer(shape, dtype=np.float32):
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)

        h_sel, c_sel, h_out, c_out = (buffer([capacity, hidden]) for _ in range(4))
        log_probs = buffer([capacity, self._vocab_out])
        tokens_v, parents_v, images_v = (buffer([capacity], np.int64) for _ in range(3))
        host_tokens = np.zeros(capacity, dtype=np.int64)
        host_parents = np.zeros(capacity, dtype=np.int64)
        host_images = np.zeros(capacity, dtype=np.int64)

        reorder = self.reorder.io_binding()
        reorder.bind_ortvalue_input("h", encoded["h0"])
        reorder.bind_ortvalue_input("c", encoded["c0"])
        reorder.bind_ortvalue_input("parents", parents_v)
        reorder.bind_ortvalue_output("h_selected", h_sel)
        reorder.bind_ortvalue_output("c_selected", c_sel)

        decoder = self.decoder.io_binding()
        decoder.bind_ortvalue_input("tokens", tokens_v)
        decoder.bind_ortvalue_input("h", h_sel)
        decoder.bind_ortvalue_input("c", c_sel)
        if "row_image" in self._decoder_inputs:
            decoder.bind_ortvalue_input("row_image", images_v)
        for name in STATIC_INPUTS:
            if name in self._decoder_inputs:
                decoder.bind_ortvalue_input(name, encoded[name])
        decoder.bind_ortvalue_output("log_probs", log_probs)
        decoder.bind_ortvalue_output("h_out", h_out)
        decoder.bind_ortvalue_output("c_out", c_out)
        alpha = None
        if self._has_alpha:
            alpha = buffer([capacity, self._grid_cells])
            decoder.bind_ortvalue_output("alpha", alpha)
        first = True

        host_images[:] = np.repeat(np.arange(n, dtype=np.int64), per_block)  # fixed: block r is image r
        images_v.update_inplace(host_images)
        previous_slots = np.arange(n)  # at the first step parents are image indices into h0/c0

        def step(tokens: np.ndarray, parents: np.ndarray, row_image: np.ndarray):
            nonlocal first, previous_slots
            slots, _ = block_slots(row_image, n, per_block)
            host_tokens[:], host_parents[:] = 0, 0
            host_tokens[slots] = tokens
            host_parents[slots] = previous_slots[parents]
            tokens_v.update_inplace(host_tokens)
            parents_v.update_inplace(host_parents)
            self.reorder.run_with_iobinding(reorder)
            if first:  # from now on the state comes from the decoder's own output buffers
                reorder.bind_ortvalue_input("h", h_out)
                reorder.bind_ortvalue_input("c", c_out)
                first = False
            self.decoder.run_with_iobinding(decoder)
            previous_slots = slots
            attention = alpha.numpy()[slots] if alpha is not None and keep_attention else None  # a copy: the buffer is reused
            return _Selected(self, log_probs, slots), attention

        return step, probs

    # ---- captioning -----------------------------------------------------------------------

    def caption(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        config: DecodingConfig | Sequence[DecodingConfig],
        attention: bool | Sequence[bool] = False,
    ) -> list[list[Caption]]:
        """Caption a batch of preprocessed images ([3, H, W] float32 each), each with its own
        settings if `config` (and `attention`) is a list. One list per image, best first,
        `num_captions` long (shorter only if the rules left no finished hypothesis)."""
        return [result.captions for result in self.run(images, config, attention)]

    def run(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        config: DecodingConfig | Sequence[DecodingConfig],
        attention: bool | Sequence[bool] = False,
        labels: int | Sequence[int] = 0,
        cancelled: Callable[[], Collection[int]] | None = None,
        stats: EngineStats | None = None,
    ) -> list[ImageResult]:
        """`caption`, plus each image's `labels` best ImageNet labels (0: none; bundles with labels
        only, else ValueError): one ImageResult per image. `cancelled()`: the images nobody waits for
        any more, asked before every decoder step (their rows are dropped, their result has no
        captions); `stats`: filled in with the times and counts of this call."""
        stats = stats if stats is not None else EngineStats()
        batch = images if isinstance(images, np.ndarray) else np.stack(list(images))
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[0] == 0:
            raise ValueError(f"expected a non-empty [N, 3, H, W] batch, got shape {batch.shape}")
        n = batch.shape[0]
        configs = [config] * n if isinstance(config, DecodingConfig) else list(config)
        wants = [attention] * n if isinstance(attention, bool) else [bool(a) for a in attention]
        top_k = [labels] * n if isinstance(labels, int) else [int(k) for k in labels]
        if len(configs) != n or len(wants) != n or len(top_k) != n:
            raise ValueError(f"{n} images but {len(configs)} configs, {len(wants)} attention flags and "
                             f"{len(top_k)} label counts")
        resolved = [c.resolved(self.bundle.max_length) for c in configs]
        guided = [c.guided for c in resolved]
        if any(guided) and not self.has_label_words:
            raise ValueError(f"the model {self.bundle.name} has no label words to guide its captions with (guide=labels "
                             "needs a bundle whose labels.json has words: captioner add-labels)")
        want_labels = any(k > 0 for k in top_k) or any(guided)
        if want_labels and not self.has_labels:
            raise ValueError(f"the model {self.bundle.name} has no ImageNet labels")
        keep_attention = self._has_alpha and any(wants)
        stats.encode_start_ns = time.time_ns()
        if self.io_binding:
            # a constrained image has up to a bank of beams per subset of its constraints
            widest = max(c.beams * 2 ** min(MAX_CONSTRAINTS, len(c.include) + (c.guide_words if g else 0))
                         for c, g in zip(resolved, guided, strict=True))
            step, probs = self._make_bound_step(batch, widest, keep_attention, want_labels)
        else:
            encoded = self.encode(batch, want_labels)
            probs = encoded.get(IMAGENET_OUTPUT)
            step = self._make_step(encoded, keep_attention, max(c.beams for c in resolved))
        stats.encode_end_ns = stats.decode_start_ns = time.time_ns()  # (with IO binding: the encoder and buffers)
        guides = [self._guide(probs[i], c) if g else [] for i, (c, g) in enumerate(zip(resolved, guided, strict=True))]
        constraints = [[set(group) for group in c.include] + [set(w.token_ids) for w in guide]
                       for c, guide in zip(resolved, guides, strict=True)]
        hypotheses = beam_search(
            step,
            num_images=n,
            config=resolved,
            special=self.bundle.special,
            keep_attention=keep_attention,
            vocab_size=self._vocab_out,
            cancelled=cancelled,
            stats=stats.search,
            constraints=constraints if any(constraints) else None,
        )
        stats.decode_end_ns = time.time_ns()
        return [
            ImageResult([self._to_caption(h, want) for h in per_image], self._top_labels(probs, i, top_k[i]), guides[i])
            for i, (per_image, want) in enumerate(zip(hypotheses, wants, strict=True))
        ]

    @property
    def label_prior(self) -> bool:
        """Whether the decoder reads the encoder's label word prior (a label-conditioned model)."""
        return WORD_PRIOR in self._decoder_inputs

    @property
    def has_label_words(self) -> bool:
        """Whether the bundle's labels.json gives caption words per class (what guide=labels needs)."""
        return self.bundle.label_words is not None

    def _guide(self, class_probs: np.ndarray, config: DecodingConfig) -> list[GuideWord]:
        """The constraints an image's labels give under `config` (guide="labels"), leaving out words the
        request's include already asks for."""
        included = {t for group in config.include for t in group}
        if self._groups is None:
            assert self.bundle.label_words is not None  # run() refuses guide=labels without them
            self._groups = GroupTable(self.bundle.label_words)
        found = guide_words(class_probs, self._groups, self.bundle.token_ids, config.guide_threshold,
                            config.guide_words + len(config.include))
        found = [w for w in found if not included & set(w.token_ids)]
        return found[: max(0, min(config.guide_words, MAX_CONSTRAINTS - len(config.include)))]

    def _top_labels(self, probs: np.ndarray | None, image: int, k: int) -> list[Label]:
        """The image's k most probable classes, best first (ties: the lower class id)."""
        if k <= 0 or probs is None or self.bundle.labels is None:
            return []
        row = probs[image]
        best = np.argsort(-row, kind="stable")[:k]
        return [Label(self.bundle.labels[c], int(c), float(row[c])) for c in best]

    def _to_caption(self, hyp: Hypothesis, attention: bool = True) -> Caption:
        words = self.bundle.words(hyp.tokens)
        probs = [min(1.0, float(np.exp(lp))) for lp in hyp.token_log_probs]
        specials = set(self.bundle.special.values())  # as Bundle.words leaves them out (never generated)
        return Caption(
            text=" ".join(words),
            tokens=words,
            token_ids=list(hyp.tokens),
            score=hyp.score,
            normalized_score=hyp.normalized_score,
            attention=hyp.attention if attention else None,
            token_probs=[p for t, p in zip(hyp.tokens, probs, strict=False) if t not in specials],
            end_prob=probs[-1] if len(probs) > len(hyp.tokens) else 0.0,
            confidence=confidence(hyp.token_log_probs, self.bundle.confidence_calibration),
            token_log_probs=list(hyp.token_log_probs),
            met=hyp.met,
        )

    def warmup(self) -> None:
        """One real caption on a blank image, so the first request pays no lazy initialisation."""
        height, width = self.bundle.preprocessing.image_size
        blank = np.zeros((1, 3, height, width), dtype=np.float32)
        self.run(blank, DecodingConfig(strategy="beam", beam_size=2, max_length=min(4, self.bundle.max_length)),
                 labels=1 if self.has_labels else 0)



def block_slots(row_image: np.ndarray, num_images: int, per_block: int | None = None) -> tuple[np.ndarray, int]:
    """Where the search's live rows go in the decoder's image-major layout: (slot of each row,
    rows per block). The search keeps an image's rows contiguous and images in order, so row i is
    the k-th row of its image and sits at `image * per_block + k`. `per_block` defaults to the
    most live rows of any image."""
    counts = np.bincount(row_image, minlength=num_images)
    widest = int(counts.max()) if row_image.size else 1
    per_block = widest if per_block is None else per_block
    first = np.cumsum(counts) - counts  # index of each image's first live row
    within = np.arange(row_image.size) - first[row_image]
    return row_image * per_block + within, per_block


class _Selected:
    """A step's log-probabilities as app/inference/decoding.py's StepOutput: TopK (and the <end> column) run
    by app/inference/select.onnx where the log-probabilities are (device memory with IO binding), so only
    [rows, k] values and ids are copied to the host; `full()` copies everything (rare). `slots`
    says which rows of the decoder's (padded, block) output are the search's live rows, in order."""

    def __init__(self, engine: Engine, log_probs: np.ndarray | ort.OrtValue, slots: np.ndarray):
        self.engine = engine
        self.log_probs = log_probs
        self.slots = slots
        self._end: np.ndarray | None = None
        self._full: np.ndarray | None = None

    def _select(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        engine = self.engine
        k_value = np.array([k], dtype=np.int64)
        if isinstance(self.log_probs, np.ndarray):
            values, ids, end = engine.select.run(None, {"log_probs": self.log_probs, "k": k_value, "end": engine._end})
        else:
            binding = engine.select.io_binding()
            binding.bind_ortvalue_input("log_probs", self.log_probs)
            binding.bind_cpu_input("k", k_value)
            binding.bind_cpu_input("end", engine._end)
            for name in ("values", "indices", "end_log_probs"):
                binding.bind_output(name, "cpu")
            engine.select.run_with_iobinding(binding)
            values, ids, end = (v.numpy() for v in binding.get_outputs())
        self._end = end[self.slots, 0]
        return values[self.slots], ids[self.slots]

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._select(min(k, self.engine._vocab_out))

    def column(self, token: int) -> np.ndarray:
        if token == int(self.engine._end[0]):
            if self._end is None:
                self._select(1)
            assert self._end is not None
            return self._end
        return self.full()[:, token]

    def full(self) -> np.ndarray:
        if self._full is None:  # once per step (constrained search reads a few columns through it)
            array = self.log_probs if isinstance(self.log_probs, np.ndarray) else self.log_probs.numpy()
            self._full = array[self.slots]
        return self._full
