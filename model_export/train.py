"""Training: teacher forcing with cross-entropy (+ the doubly stochastic attention penalty for
Show, Attend and Tell), cached encoder features when the encoder is frozen, a checkpoint every
epoch, `--resume`, early stopping on validation CIDEr, seeded and repeatable, CUDA when present.

Under torchrun (docs/training.md) the same run is N ranks with DistributedDataParallel: every rank draws
the same epoch plan from (seed, epoch) and takes every N-th example of each global batch of
--batch-size, whose mean loss the ranks' shares add up to; validation is sharded and gathered, rank 0's
scores decide for all, and rank 0 alone writes (model_export/distributed.py has the group).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from model_export import distributed
from model_export.data.errors import DatasetError
from model_export.data.karpathy import CaptionDataset, Example
from model_export.data.vocab import Vocabulary
from model_export.features import feature_cache, preprocessing_for
from model_export.images import iter_batches, load_pixels
from model_export.metrics import quick_scores
from model_export.model import Captioner, ModelConfig


class TrainError(Exception):
    pass


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    lr_decay: float = 0.85  # per epoch
    encoder_lr: float = 1e-4  # only used when fine-tuning encoder blocks
    prior_lr_scale: float = 10.0  # the label prior's learning rate, as a multiple of lr (label-prior models)
    # Label swaps (label-prior models): the share of captions (cross-entropy) or of images' references
    # (self-critical) naming a label word whose word is replaced by another of the same kind, with the
    # prior saying so (LabelSwap).
    label_swap: float = 0.0
    # label-prior models: each ImageNet class's caption word groups (None: WordNet's, model_export/label_words.py)
    label_words: list | None = None
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    attention_reg: float = 1.0  # lambda of the doubly stochastic attention regularisation
    min_count: int = 1
    max_caption_length: int = 24
    patience: int = 3  # epochs without a better validation CIDEr before stopping
    val_images: int = 500
    # None: each epoch trains on one reference per image drawn uniformly (COCO, Flickr). A share in
    # (0, 1]: the first reference (a generator's canonical wording) with that probability, the
    # others uniformly otherwise. With equally likely wordings the model's first words are a
    # coin toss that search cannot improve; a dominant wording lets beam search pay off.
    first_reference_share: float | None = None
    # True: each epoch trains on every (image, reference) pair (five per Flickr/COCO image) instead
    # of one reference per image.
    all_references: bool = False
    label_smoothing: float = 0.0
    # Probability of training on the mirrored image (features cached for both) with "left" and
    # "right" swapped in its caption.
    flip_augment: float = 0.0
    # Self-critical sequence training (Rennie et al., 2017): after cross-entropy has converged,
    # maximise each sampled caption's CIDEr-D against the image's references, with the greedy
    # caption's CIDEr-D as the baseline. One sample per image per epoch.
    self_critical: bool = False
    # Start from this checkpoint's weights (same vocabulary and model settings), with a fresh
    # optimizer: how a self-critical stage continues a cross-entropy run.
    init_checkpoint: str | None = None
    sample_max_length: int = 16
    # Sampling temperature of the self-critical stage. A label-smoothed model spreads a tenth of its
    # mass over the whole vocabulary, so at temperature 1 most sampled captions hold a stray word and
    # score far below the greedy one (measured: CIDEr-D 0.12 vs 0.55 on Flickr8k train); the policy
    # trained is the tempered one, whose sharpening greedy and beam search then share.
    sample_temperature: float = 0.5
    # Samples per image in the self-critical stage. 1: one sample, rewarded against the greedy caption
    # (Rennie et al.). K >= 2: K samples, each rewarded against the mean reward of the image's other K - 1
    # (Luo, "A Better Variant of Self-Critical Sequence Training", 2020): no greedy pass, a baseline
    # that is itself a sample of the policy, and K times the signal per image.
    scst_samples: int = 1
    seed: int = 0
    max_minutes: float | None = None  # stop after the epoch that crosses this budget
    num_threads: int | None = None
    progress: bool = True
    # Under torchrun: seconds any collective may wait for the other ranks before the job stops (model_export/distributed.py)
    dist_timeout: float = 600.0
    model: ModelConfig = field(default_factory=ModelConfig)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode_references(examples: list[Example], vocab: Vocabulary, max_length: int) -> list[list[list[int]]]:
    return [[vocab.encode(ref, max_length) for ref in ex.references] for ex in examples]


def pick_reference(rng: np.random.Generator, count: int, first_share: float | None) -> int:
    """Which of an image's `count` references to train on this epoch."""
    if first_share is None or count == 1:
        return int(rng.integers(count))
    if rng.random() < first_share:
        return 0
    return 1 + int(rng.integers(count - 1))


def pad_batch(sequences: list[list[int]], pad: int) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    out = torch.full((len(sequences), longest), pad, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s)
    return out


MIRRORED_WORDS = {"left": "right", "right": "left", "lefthand": "righthand", "righthand": "lefthand"}


def mirror_tokens(tokens: list[str]) -> list[str]:
    """A caption of the horizontally mirrored image: "left" and "right" swapped."""
    return [MIRRORED_WORDS.get(t, t) for t in tokens]


def caption_loss(logits, alphas, targets, pad: int, attention_reg: float, label_smoothing: float = 0.0,
                 totals: tuple[int, int] | None = None):
    """Cross-entropy over real tokens + lambda * sum_p (1 - sum_t alpha_tp)^2 (Xu et al. 2015), means over
    this batch. `totals` (a rank's share of a global batch): (real tokens, images x positions) of the whole
    global batch, which the sums are divided by instead, so the ranks' shares add up to the global mean."""
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if totals is None:
        loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=pad, label_smoothing=label_smoothing)
    else:
        loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=pad, label_smoothing=label_smoothing,
                               reduction="sum") / max(totals[0], 1)
    if alphas is not None and attention_reg > 0:
        mask = (targets != pad).unsqueeze(2).to(alphas.dtype)
        coverage = (alphas * mask).sum(dim=1)
        penalty = (1.0 - coverage) ** 2
        loss = loss + attention_reg * (penalty.mean() if totals is None else penalty.sum() / max(totals[1], 1))
    return loss


def allowed_log_probs(log_probs: torch.Tensor, special: dict[str, int], t: int) -> torch.Tensor:
    """Step `t`'s log-probabilities under the decoding rules: <pad>, <start> and <unk> never, <end>
    not as the first token (a new tensor: gradients flow through the rest)."""
    banned = [special["pad"], special["start"], special["unk"]] + ([special["end"]] if t == 0 else [])
    return log_probs.index_fill(1, torch.tensor(banned, device=log_probs.device), -math.inf)


def sample_batch(model: Captioner, features: torch.Tensor, special: dict[str, int], max_length: int,
                 temperature: float = 1.0, word_prior: torch.Tensor | None = None):
    """One caption sampled per image from the model's distribution at `temperature`, with the same
    token rules as decoding (run it in eval mode: no dropout, gradients on). Returns (word ids per
    image, [N, T] log-probabilities of the sampled tokens, zero after each caption's <end>). A label-prior
    model reads `word_prior` [N, V] when given (label swaps), else its own."""
    feats, h, c, att, *prior = model.init_state(features, word_prior)
    n = features.shape[0]
    tokens = torch.full((n,), special["start"], dtype=torch.long, device=features.device)
    alive = torch.ones(n, dtype=torch.bool, device=features.device)
    out: list[list[int]] = [[] for _ in range(n)]
    chosen_log_probs = []
    for t in range(max_length + 1):
        log_probs, h, c, _ = model.decoder.step(tokens, h, c, feats, att, *prior)  # one row per image
        log_probs = allowed_log_probs(log_probs, special, t)
        if t >= max_length:  # only <end> is left
            keep = torch.full_like(log_probs, -math.inf)
            keep[:, special["end"]] = 0.0
            log_probs = log_probs + keep
        log_probs = torch.log_softmax(log_probs / temperature, dim=1)  # over the allowed tokens
        sampled = torch.multinomial(log_probs.detach().exp(), 1).squeeze(1)
        chosen_log_probs.append(log_probs.gather(1, sampled[:, None]).squeeze(1) * alive)
        for i, token in enumerate(sampled.tolist()):
            if alive[i] and token != special["end"]:
                out[i].append(token)
        alive = alive & (sampled != special["end"])
        tokens = sampled
        if not alive.any():
            break
    return out, torch.stack(chosen_log_probs, 1)


def leave_one_out_advantage(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Rewards of K samples per image (rows image-major: an image's K samples together) minus, for each, the
    mean reward of the same image's other K - 1 samples (K >= 2)."""
    got = rewards.view(-1, k)
    return (got - (got.sum(dim=1, keepdim=True) - got) / (k - 1)).flatten()


@torch.no_grad()
def greedy_batch(model: Captioner, features: torch.Tensor, special: dict[str, int], max_length: int,
                 word_prior: torch.Tensor | None = None) -> list[list[int]]:
    """Fast batched greedy decoding for validation (same token rules as the reference); `word_prior` as in
    sample_batch."""
    model.eval()
    feats, h, c, att, *prior = model.init_state(features, word_prior)
    n = features.shape[0]
    tokens = torch.full((n,), special["start"], dtype=torch.long, device=features.device)
    out = [[] for _ in range(n)]
    alive = torch.ones(n, dtype=torch.bool)
    for t in range(max_length + 1):
        log_probs, h, c, _ = model.decoder.step(tokens, h, c, feats, att, *prior)  # one row per image
        log_probs = allowed_log_probs(log_probs, special, t)
        if t >= max_length:
            break
        tokens = log_probs.argmax(dim=1)
        for i, token in enumerate(tokens.tolist()):
            if alive[i]:
                if token == special["end"]:
                    alive[i] = False
                else:
                    out[i].append(token)
        if not alive.any():
            break
    return out


class Trainer:
    def __init__(self, dataset: CaptionDataset, run_dir: Path, config: TrainConfig, cache_dir: Path | None = None):
        self.dataset = dataset
        self.run_dir = Path(run_dir)
        self.config = config
        self.cache_dir = Path(cache_dir) if cache_dir else self.run_dir / "cache"
        self.label_groups: list | None = None  # a label-prior run's class -> word groups (set by _run)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.train_examples = dataset.split("train")
        val = dataset.split("val")
        self.val_examples = val[: config.val_images] if config.val_images else val
        self.vocab = Vocabulary.build([r for ex in self.train_examples for r in ex.references], config.min_count)
        if len(self.vocab) <= 4:
            raise DatasetError(dataset.source, "the training split has no caption words")

    # ---- state ----------------------------------------------------------------------------

    def _checkpoint(self, model, optimizer, epoch: int, best: float, history: list, bad_epochs: int) -> dict:
        return {
            "model_config": model.config.to_dict(),
            "decoder": model.decoder.state_dict(),
            "backbone": model.backbone.state_dict() if model.config.fine_tune_blocks else None,
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "best_cider": best,
            "bad_epochs": bad_epochs,
            "history": history,
            "vocab": self.vocab.itos,
            "label_words": self.label_groups,  # label-prior models: the class -> word groups
            "train_config": {k: v for k, v in asdict(self.config).items() if k != "model"},
            "data": self.dataset.summary(),
            "torch_rng": torch.get_rng_state(),
        }

    @staticmethod
    def _save(obj: dict, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)

    # ---- training -------------------------------------------------------------------------

    def run(self, resume: bool = False) -> Path:
        """Train; under torchrun, this rank's part of the job (model_export/distributed.py)."""
        try:
            ctx = distributed.from_environment(self.config.dist_timeout)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise TrainError(f"could not join the torchrun group ({type(exc).__name__}: {exc})") from exc
        try:
            best = self._run(ctx, resume)
        except TrainError:
            raise
        except Exception as exc:
            if ctx.enabled and distributed.is_collective_failure(exc):
                raise TrainError(distributed.collective_failure_message(ctx, exc)) from exc
            raise
        ctx.close()
        return best

    def _run(self, ctx: distributed.Context, resume: bool) -> Path:
        cfg = self.config
        world = ctx.world_size
        self.device = ctx.device
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if world > cfg.batch_size:
            raise TrainError(f"--batch-size {cfg.batch_size} is the global batch, shared by the {world} ranks: it must be "
                             "at least the number of ranks")
        _seed_everything(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        mcfg = ModelConfig(**{**asdict(cfg.model), "vocab_size": len(self.vocab)})
        if mcfg.label_prior and mcfg.label_word_ids is None:
            self.label_groups = cfg.label_words if cfg.label_words is not None else class_word_table(self.vocab.itos)
            mcfg.label_word_ids = label_word_ids(self.vocab.itos, self.label_groups)
        model = Captioner(mcfg)
        model.to(self.device)  # before the optimizer, so a resumed optimizer's state lands on the device too
        special = self.vocab.special_ids
        pad = special["pad"]

        last_path = self.run_dir / "last.pt"
        start_epoch, best, history, bad_epochs = 0, -1.0, [], 0
        named = list(model.decoder.named_parameters())
        groups = [{"params": [p for n, p in named if not n.startswith(PRIOR_KEYS)], "lr": cfg.lr, "base_lr": cfg.lr}]
        if mcfg.label_prior:  # the label prior's parameters learn faster (they start from zero on a trained model)
            prior_lr = cfg.lr * cfg.prior_lr_scale
            groups.append({"params": [p for n, p in named if n.startswith(PRIOR_KEYS)], "lr": prior_lr, "base_lr": prior_lr})
        backbone_params = [p for p in model.backbone.parameters() if p.requires_grad]
        if backbone_params:
            groups.append({"params": backbone_params, "lr": cfg.encoder_lr, "base_lr": cfg.encoder_lr})
        optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
        if resume and not last_path.is_file() and distributed.under_torchrun():
            # torchrun --max-restarts with --resume: the first attempt has no checkpoint yet
            if ctx.main:
                print(f"{last_path}: no checkpoint yet; starting from epoch 1", flush=True)
            resume = False
        if resume:
            if not last_path.is_file():
                raise TrainError(f"{last_path}: no checkpoint to resume from")
            state = torch.load(last_path, map_location="cpu", weights_only=False)
            if state["vocab"] != self.vocab.itos:
                raise TrainError(
                    f"{last_path}: vocabulary mismatch: the checkpoint has {len(state['vocab'])} tokens, "
                    f"the data gives {len(self.vocab)}; resume with the same data and --min-count"
                )
            if state["model_config"] != mcfg.to_dict():
                raise TrainError(f"{last_path}: model settings differ from the checkpoint's {state['model_config']}")
            model.decoder.load_state_dict(_plain(state["decoder"]))
            if state.get("backbone"):
                model.backbone.load_state_dict(_plain(state["backbone"]))
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, best, history, bad_epochs = state["epoch"], state["best_cider"], state["history"], state["bad_epochs"]
            torch.set_rng_state(state["torch_rng"])
        elif cfg.init_checkpoint:
            init_weights(model, Path(cfg.init_checkpoint), self.vocab.itos)
        if ctx.enabled:
            starts = ctx.gather(start_epoch)
            if len(set(starts)) != 1:
                raise TrainError(f"the ranks found different checkpoints in {self.run_dir} (epochs {starts}): with several "
                                 "nodes, --out must be on storage that every node sees")
            if ctx.rank:  # rank 0 keeps the single process's random stream; the others their own (dropout, sampling)
                torch.manual_seed(distributed.rank_seed(cfg.seed, ctx.rank, start_epoch))
        if ctx.main:
            self.vocab.save(self.run_dir / "vocab.json")

        train_refs = encode_references(self.train_examples, self.vocab, cfg.max_caption_length)
        mirrored_refs = [[self.vocab.encode(mirror_tokens(r), cfg.max_caption_length) for r in ex.references]
                         for ex in self.train_examples] if cfg.flip_augment else None
        frozen = mcfg.fine_tune_blocks == 0
        if cfg.flip_augment and not frozen:
            raise TrainError("flip augmentation needs a frozen encoder (its features are cached)")
        scorer = None
        if cfg.self_critical:
            from model_export.reward import CiderD

            # references as the vocabulary sees them (rare words are <unk>, dropped like in a caption)
            reward_refs = [[self.vocab.decode(r) for r in refs] for refs in train_refs]
            mirrored_reward_refs = [[self.vocab.decode(r) for r in refs] for refs in mirrored_refs] if mirrored_refs else None
            if ctx.enabled:  # the document frequencies are counted once, over the whole corpus, and shared
                tables = ctx.broadcast(CiderD(reward_refs).document_frequencies() if ctx.main else None)
                scorer = CiderD.from_document_frequencies(*tables)
            else:
                scorer = CiderD(reward_refs)
        if frozen:
            train_paths = [e.image_path for e in self.train_examples]
            val_paths = [e.image_path for e in self.val_examples]
            show = cfg.progress and ctx.main

            def caches() -> tuple:
                return (feature_cache(train_paths, model.backbone, self.cache_dir, progress=show),
                        feature_cache(train_paths, model.backbone, self.cache_dir, progress=show, flip=True)
                        if cfg.flip_augment else None,
                        feature_cache(val_paths, model.backbone, self.cache_dir, progress=show))

            if ctx.enabled:
                # one rank per node computes the cache (or finds it); the others wait, then read the same files
                if ctx.local_rank == 0:
                    arrays = caches()
                ctx.wait_for_node_leader()
                if ctx.local_rank != 0:
                    arrays = caches()
                # memory-mapped: the ranks of a node share one copy in the page cache
                train_feats, flipped_feats, val_feats = arrays
            else:
                # float16 in memory (2.5 GB for 20,000 images); batches are converted to float32
                arrays = caches()
                train_feats = torch.from_numpy(np.array(arrays[0]))
                flipped_feats = torch.from_numpy(np.array(arrays[1])) if cfg.flip_augment else None
                val_feats = torch.from_numpy(np.array(arrays[2]))
        swapper = None
        if mcfg.label_prior and cfg.label_swap > 0:
            swapper = LabelSwap(self.vocab.itos, self.label_groups if self.label_groups is not None
                                else class_word_table(self.vocab.itos), cfg.label_swap)
        spec = preprocessing_for(model.backbone)
        net = _TrainStep(model, encode=not frozen, special=special, max_length=cfg.sample_max_length,
                         temperature=cfg.sample_temperature, samples=cfg.scst_samples)
        net = ctx.wrap(net, broadcast_buffers=not frozen)  # DistributedDataParallel under torchrun
        positions = model.backbone.grid**2
        started = time.monotonic()
        steps_taken = 0

        from tqdm import tqdm

        for epoch in range(start_epoch, cfg.epochs):
            for i, group in enumerate(optimizer.param_groups):  # (checkpoints before base_lr: decoder, then encoder)
                group["lr"] = group.get("base_lr", cfg.lr if i == 0 else cfg.encoder_lr) * cfg.lr_decay**epoch
            # the epoch's plan (reference choice, order, mirroring) is drawn from (seed, epoch) alone, the same on
            # every rank; each rank then takes its share of every global batch
            rng = np.random.default_rng([cfg.seed, epoch])
            if cfg.self_critical:  # one sample per image; the reward reads all its references
                pairs = np.array([(i, 0) for i in range(len(train_refs))], dtype=np.int64)
            elif cfg.all_references:
                pairs = np.array([(i, j) for i, refs in enumerate(train_refs) for j in range(len(refs))], dtype=np.int64)
            else:
                pairs = np.array([(i, pick_reference(rng, len(refs), cfg.first_reference_share))
                                  for i, refs in enumerate(train_refs)],
                                 dtype=np.int64)
            pairs = pairs[rng.permutation(len(pairs))]
            mirrored = rng.random(len(pairs)) < cfg.flip_augment if cfg.flip_augment else np.zeros(len(pairs), dtype=bool)
            model.train()
            total, seen, tick = 0.0, 0, time.monotonic()
            # mean train CIDEr-D of the samples, and of the greedy captions when there are any (one sample each)
            rewards = {"sample": 0.0, **({"greedy": 0.0} if cfg.scst_samples == 1 else {})}
            bar = tqdm(total=len(pairs), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="cap",
                       disable=not (cfg.progress and ctx.main))
            for b in range(0, len(pairs), cfg.batch_size):
                steps_taken += 1
                distributed.failure_hook_for_tests(ctx, steps_taken)
                batch_pairs, batch_mirrored = pairs[b : b + cfg.batch_size], mirrored[b : b + cfg.batch_size]
                global_rows, weight, global_tokens = len(batch_pairs), 1.0, 0
                if ctx.enabled:
                    global_tokens = sum(len((mirrored_refs if m else train_refs)[i][j]) - 1
                                        for (i, j), m in zip(batch_pairs, batch_mirrored))
                    mine = distributed.shard(global_rows, ctx)
                    if len(batch_pairs[mine]):
                        batch_pairs, batch_mirrored = batch_pairs[mine], batch_mirrored[mine]
                    else:  # a last batch smaller than the ranks: this rank runs one row that counts for nothing
                        batch_pairs, batch_mirrored, weight = batch_pairs[:1], batch_mirrored[:1], 0.0
                sequences = [(mirrored_refs if m else train_refs)[i][j] for (i, j), m in zip(batch_pairs, batch_mirrored)]
                # longest first, so each teacher-forcing step runs only the captions still going
                by_length = np.argsort([-len(q) for q in sequences], kind="stable")
                batch_pairs, batch_mirrored = batch_pairs[by_length], batch_mirrored[by_length]
                sequences = [sequences[k] for k in by_length]
                idx = batch_pairs[:, 0]
                caps = pad_batch(sequences, pad).to(self.device)
                lengths = torch.tensor([len(q) - 1 for q in sequences], device=self.device)
                if frozen:
                    feats = _rows(train_feats, idx)
                    if batch_mirrored.any():
                        feats[torch.from_numpy(batch_mirrored)] = _rows(flipped_feats, idx[batch_mirrored])
                    inputs = feats.to(self.device, torch.float32)
                else:
                    inputs = torch.from_numpy(np.stack([load_pixels(self.train_examples[i].image_path, spec) for i in idx]))
                    inputs = inputs.to(self.device)
                prior = None
                if swapper is not None:  # the labels' word prior, which the swaps change where they swap
                    with torch.no_grad():
                        prior = model.word_prior(inputs if frozen else model.backbone(inputs))
                if scorer is not None:
                    refs = [(mirrored_reward_refs if m else reward_refs)[i] for i, m in zip(idx, batch_mirrored)]
                    if swapper is not None:  # some images' references and prior name another thing of the same kind
                        token_refs = [(mirrored_refs if m else train_refs)[i] for i, m in zip(idx, batch_mirrored)]
                        swapped, prior = swapper.apply_references(token_refs, prior, rng)
                        refs = [mine if new is old else [self.vocab.decode(r) for r in new]
                                for mine, new, old in zip(refs, swapped, token_refs, strict=True)]
                    # greedy (eval mode, no gradients), then one sample each; or K samples each, no greedy
                    baseline, sampled, chosen = net(inputs, word_prior=prior)
                    k = cfg.scst_samples
                    sample_reward = scorer.scores([self.vocab.decode(s) for s in sampled],
                                                  [r for r in refs for _ in range(k)])
                    if baseline is None:  # each sample against the mean of its image's other samples
                        got = torch.tensor(sample_reward, device=self.device)
                        advantage = leave_one_out_advantage(got, k)
                        sample_reward = got.view(-1, k).mean(dim=1).tolist()
                    else:
                        greedy_reward = scorer.scores([self.vocab.decode(g) for g in baseline], refs)
                        advantage = (torch.tensor(sample_reward, device=self.device)
                                     - torch.tensor(greedy_reward, device=self.device))
                        rewards["greedy"] += sum(greedy_reward) * weight
                    if ctx.enabled:  # normalised by the whole global batch's sampled tokens
                        (count,) = ctx.sum([float((chosen != 0).sum()) * weight])
                        loss = -(advantage[:, None] * chosen).sum() * weight / max(count, 1.0)
                    else:
                        loss = -(advantage[:, None] * chosen).sum() / (chosen != 0).sum().clamp(min=1)
                    rewards["sample"] += sum(sample_reward) * weight
                else:
                    if swapper is not None:  # some captions name another thing of the same kind, as their prior says
                        caps, prior = swapper.apply(caps, prior, rng)
                    logits, alphas = net(inputs, caps[:, :-1], lengths, prior)
                    totals = (global_tokens, global_rows * positions) if ctx.enabled else None
                    loss = caption_loss(logits, alphas, caps[:, 1:], pad, cfg.attention_reg, cfg.label_smoothing, totals)
                    if ctx.enabled:
                        loss = loss * weight
                optimizer.zero_grad(set_to_none=True)
                # DistributedDataParallel averages the ranks' gradients: each rank's share of the global batch's
                # mean loss, times the number of ranks, makes that average the single process's gradient
                (loss * world if ctx.enabled else loss).backward()
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
                optimizer.step()
                total += loss.item() * global_rows
                seen += global_rows
                bar.update(global_rows)
                bar.set_postfix(loss=f"{total * world / seen:.3f}", img_s=f"{seen / (time.monotonic() - tick):.0f}")
            bar.close()
            if ctx.enabled:  # the shares of every global batch's loss (and rewards), summed over the ranks
                total, *summed = ctx.sum([total, *rewards.values()])
                rewards = dict(zip(rewards, summed, strict=True))

            # validation: greedy captions on the val split (each rank its share, gathered), BLEU-4 and CIDEr
            mine = list(range(len(self.val_examples)))[distributed.shard(len(self.val_examples), ctx)]
            if not mine:
                vf = None
            elif frozen:
                vf = _rows(val_feats, np.array(mine, dtype=np.int64)).to(self.device, torch.float32)
            else:
                with torch.no_grad():
                    model.eval()
                    paths = [self.val_examples[k].image_path for k in mine]
                    vf = torch.cat([model.backbone(torch.from_numpy(px).to(self.device))
                                    for _, px in iter_batches(paths, spec, 64)])
            predictions = []
            for i in range(0, 0 if vf is None else vf.shape[0], 256):
                predictions += greedy_batch(model, vf[i : i + 256], special, cfg.max_caption_length)
            if ctx.enabled:
                gathered = {k: p for part in ctx.gather(list(zip(mine, predictions))) for k, p in part}
                predictions = [gathered[k] for k in range(len(self.val_examples))]
            # rank 0's scores and clock decide, for every rank: the same checkpoint choice and the same stop
            if ctx.main:
                scores = quick_scores(
                    {k: self.vocab.decode(p) for k, p in enumerate(predictions)},
                    {k: e.references for k, e in enumerate(self.val_examples)},
                )
                out_of_time = bool(cfg.max_minutes and (time.monotonic() - started) / 60 >= cfg.max_minutes)
            else:
                scores, out_of_time = ctx.broadcast(None)
            record = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), **scores,
                      "seconds": round(time.monotonic() - started, 1)}
            if ctx.enabled:
                record["ranks"] = world
            if scorer is not None:
                record["stage"] = "self_critical"
                record.update({f"train_cider_{k}": v / max(seen, 1) for k, v in rewards.items()})
            history.append(record)
            improved = scores["CIDEr"] > best
            if improved:
                best, bad_epochs = scores["CIDEr"], 0
            else:
                bad_epochs += 1
            if ctx.main:  # only rank 0 writes checkpoints and logs (plain module state: no DDP "module." prefix)
                print(json.dumps(record), flush=True)
                state = self._checkpoint(model, optimizer, epoch + 1, best, history, bad_epochs)
                self._save(state, last_path)
                if improved:
                    self._save(state, self.run_dir / "best.pt")
                (self.run_dir / "history.json").write_text(json.dumps(history, indent=1))
                # sent once the checkpoint is on disk: no rank starts the next epoch before it is (restarts resume it)
                ctx.broadcast((scores, out_of_time))
            if bad_epochs >= cfg.patience:
                if ctx.main:
                    print(f"early stopping: validation CIDEr has not improved for {bad_epochs} epochs", flush=True)
                break
            if out_of_time:
                if ctx.main:
                    print(f"stopping: the {cfg.max_minutes}-minute budget is spent", flush=True)
                break
        return self.run_dir / "best.pt"


class _TrainStep(torch.nn.Module):
    """One training step's forward, the module that DistributedDataParallel wraps: the encoder when it is
    fine-tuned, then teacher forcing (`caps` given: logits, alphas) or the self-critical pair (the greedy
    baseline without gradients, then one sampled caption per image with its log-probabilities; with
    `samples` K >= 2 no greedy baseline (None) and K samples per image, each image's K rows together)."""

    def __init__(self, model: Captioner, encode: bool, special: dict[str, int], max_length: int, temperature: float,
                 samples: int = 1):
        super().__init__()
        self.model = model
        self.encode = encode
        self.special = special
        self.max_length = max_length
        self.temperature = temperature
        self.samples = samples

    def forward(self, inputs: torch.Tensor, caps: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                word_prior: torch.Tensor | None = None):
        feats = self.model.backbone(inputs) if self.encode else inputs
        if caps is not None:
            return self.model.teacher_forced(feats, caps, lengths, word_prior)
        if self.samples > 1:
            k = self.samples
            prior = None if word_prior is None else word_prior.repeat_interleave(k, dim=0)
            sampled, chosen = sample_batch(self.model, feats.repeat_interleave(k, dim=0), self.special, self.max_length,
                                           self.temperature, prior)
            return None, sampled, chosen
        baseline = greedy_batch(self.model, feats, self.special, self.max_length, word_prior)  # eval mode
        sampled, chosen = sample_batch(self.model, feats, self.special, self.max_length, self.temperature, word_prior)
        return baseline, sampled, chosen


def class_word_table(vocab: list[str]) -> list[list[list[str]]]:
    """Each ImageNet class's caption word groups over `vocab` (model_export/label_words.py; WordNet)."""
    from model_export.label_words import build_table

    return build_table(vocab)


class LabelSwap:
    """Counterfactual captions for a label-prior decoder. On Flickr8k the grid alone tells a dog, so a
    decoder trained on it learns to ignore its labels, and a cat stays "a little boy". With
    probability `share`, a caption that names a label word (a dog) gets another word of the same kind
    in its place (a cat; label_words.KINDS: animals, vehicles, drinks, food, ...), every form of it,
    and its prior says so: the replaced word's probability 0, the new one's drawn from U(0.5, 1).
    The grid still shows the dog, so the only way to get such captions right is to write what the
    labels say: the behaviour wanted on photos unlike Flickr8k's."""

    def __init__(self, vocab: list[str], table: list[list[list[str]]], share: float):
        from model_export.label_words import word_kinds

        index = {w: i for i, w in enumerate(vocab)}
        kinds = word_kinds(table)
        self.share = share
        self.groups: dict[str, list[list[int]]] = {}  # kind -> its groups as token ids (singular first)
        self.group_of: dict[int, tuple[str, int]] = {}  # token id -> (kind, group number)
        for group, kind in sorted(kinds.items()):
            ids = [index[w] for w in group if w in index]
            if not ids:
                continue
            members = self.groups.setdefault(kind, [])
            for token in ids:
                self.group_of.setdefault(token, (kind, len(members)))
            members.append(ids)
        self.groups = {k: v for k, v in self.groups.items() if len(v) > 1}

    def _named(self, tokens: list[int]) -> list[tuple[str, int]]:
        """The (kind, group number) of each swappable label word in `tokens`, in order."""
        return [self.group_of[t] for t in tokens if t in self.group_of and self.group_of[t][0] in self.groups]

    def _draw(self, kind: str, number: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """(the named group's ids, another group of the same kind drawn uniformly)."""
        members = self.groups[kind]
        other = int(rng.integers(len(members) - 1))
        other += other >= number
        return members[number], members[other]

    @staticmethod
    def _say_so(prior: torch.Tensor, row: int, old: list[int], new: list[int], rng: np.random.Generator) -> None:
        """The row's prior after the swap: the replaced word's probability 0, the new one's from U(0.5, 1)."""
        prior[row, old] = 0.0
        prior[row, new] = float(rng.uniform(0.5, 1.0))

    @staticmethod
    def _replaced(tokens: list[int], old: list[int], new: list[int]) -> list[int]:
        """Every form of `old` in `tokens` replaced: singular for singular, plural for plural (or the new singular)."""
        return [new[min(old.index(t), len(new) - 1)] if t in old else t for t in tokens]

    def apply(self, caps: torch.Tensor, prior: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy's swaps: each caption [N, T] (one per image row of `prior` [N, V]) on its own."""
        caps, prior = caps.clone(), prior.clone()
        for row in range(caps.shape[0]):
            if rng.random() >= self.share:
                continue
            tokens = caps[row].tolist()
            named = self._named(tokens)
            if not named:
                continue
            old, new = self._draw(*named[0], rng)
            caps[row] = torch.tensor(self._replaced(tokens, old, new), dtype=caps.dtype)
            self._say_so(prior, row, old, new, rng)
        return caps, prior

    def apply_references(self, refs: list[list[list[int]]], prior: torch.Tensor,
                         rng: np.random.Generator) -> tuple[list[list[list[int]]], torch.Tensor]:
        """Self-critical training's swaps: with probability `share` an image whose references name a label word
        gets the group most of them name replaced by another of its kind in every reference, and its prior
        [N, V] says so, so that the reward (CIDEr-D against the changed references) pays for writing what the
        labels say. Without this, self-critical training on Flickr8k's references alone teaches the decoder to
        ignore its labels again (docs/model-card.md, "The label prior")."""
        prior, out = prior.clone(), []
        for row, image_refs in enumerate(refs):
            counts = Counter(group for ref in image_refs for group in dict.fromkeys(self._named(ref)))
            if rng.random() >= self.share or not counts:
                out.append(image_refs)
                continue
            old, new = self._draw(*counts.most_common(1)[0][0], rng)
            out.append([self._replaced(ref, old, new) for ref in image_refs])
            self._say_so(prior, row, old, new, rng)
        return out, prior


def label_word_ids(vocab: list[str], table: list[list[list[str]]]) -> list[list[int]]:
    """A class -> word group table as vocabulary ids per class (every form of every group)."""
    index = {w: i for i, w in enumerate(vocab)}
    missing = sorted({w for groups in table for g in groups for w in g} - set(index))
    if missing:
        raise TrainError(f"label words outside the vocabulary: {', '.join(missing[:5])}")
    return [[index[w] for g in groups for w in g] for groups in table]


PRIOR_KEYS = ("prior_", "class_words")  # the label prior's parameters and table (model.py)


def init_weights(model: Captioner, init: Path, vocab: list[str]) -> None:
    """Start `model` from a checkpoint or a float32 bundle folder trained on the same vocabulary and
    sizes. A label-prior model may start from a model without one: its prior starts switched off
    (model.py's initialisation) and everything else is the given model's."""
    if init.is_dir():
        from model_export.bundle_weights import BundleWeightsError, decoder_state

        try:
            weights, init_vocab = decoder_state(init)
        except BundleWeightsError as exc:
            raise TrainError(str(exc)) from None
        given_config, backbone = None, None
    elif init.is_file():
        state = torch.load(init, map_location="cpu", weights_only=False)
        weights, init_vocab = _plain(state["decoder"]), state["vocab"]
        given_config, backbone = state["model_config"], state.get("backbone")
    else:
        raise TrainError(f"{init}: checkpoint not found")
    mine = model.config.to_dict()
    if given_config is not None:
        ignore = set() if given_config.get("label_prior") else {"label_prior", "label_word_ids"}
        defaults = ModelConfig().to_dict()  # for keys an older checkpoint's config lacks
        differs = {k for k in mine if k not in ignore and given_config.get(k, defaults[k]) != mine[k]}
    else:
        differs = set()
    if init_vocab != vocab or differs:
        what = ", ".join(sorted(differs)) or "vocabulary"
        raise TrainError(f"{init}: its vocabulary or model settings differ from this run's ({what}); "
                         "start from a model trained on the same data with the same --min-count and sizes")
    missing, unexpected = model.decoder.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith(PRIOR_KEYS)]
    if missing or unexpected:
        raise TrainError(f"{init}: its decoder does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if backbone:
        model.backbone.load_state_dict(_plain(backbone))


def _rows(feats, rows: np.ndarray) -> torch.Tensor:
    """Rows of a feature cache held in memory (a tensor) or memory-mapped (an array), as a new tensor."""
    if isinstance(feats, np.ndarray):
        return torch.from_numpy(np.array(feats[rows]))
    return feats[torch.from_numpy(rows)]


def _plain(state_dict: dict) -> dict:
    """A module's state without DistributedDataParallel's "module." prefix (checkpoints store it plain)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def load_checkpoint(path: Path) -> tuple[Captioner, Vocabulary, dict]:
    """A trained model (on CPU, eval mode), its vocabulary and the whole checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = Captioner(ModelConfig(**state["model_config"]))
        model.decoder.load_state_dict(_plain(state["decoder"]))
        if state.get("backbone"):
            model.backbone.load_state_dict(_plain(state["backbone"]))
    except (KeyError, RuntimeError, TypeError, EOFError, OSError) as exc:
        raise TrainError(f"{path}: not a captioner checkpoint ({type(exc).__name__}: {exc})") from None
    model.eval()
    return model, Vocabulary(state["vocab"]), state
