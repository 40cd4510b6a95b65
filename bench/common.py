"""Shared pieces of the benchmarks: one model in both worlds (the same torch weights exported to an
ONNX bundle), a batched torch baseline, test images, timing and reporting.

The default bundle's checkpoint is not in the repository, so the benchmarks build the model from
the architecture in a manifest: the shipped ImageNet EfficientNet-Lite weights and a seeded, randomly
initialised decoder, exported with model_export/export.py's exporter. Both sides run exactly these
weights. An untrained decoder rarely says <end>, so captions run to max_length: every image costs
the full number of steps on both sides (a worst case, the same for both).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Model sizes: "default" is models/default's architecture; "coco" is a COCO-sized decoder
# (10,000 words, LSTM 512) on the same encoder, as in the GPU notes.
SIZES = {
    "default": dict(embed_dim=128, hidden_dim=256, attention_dim=128, vocab_size=44),
    "coco": dict(embed_dim=512, hidden_dim=512, attention_dim=512, vocab_size=10_000),
}
SPECIAL = {"pad": 0, "start": 1, "end": 2, "unk": 3}


def build_model(size: str = "default", seed: int = 0, backbone: str = "efficientnet-lite0"):
    import torch

    from model_export.model import Captioner, ModelConfig

    torch.manual_seed(seed)
    model = Captioner(ModelConfig(backbone=backbone, decoder="show_attend_tell", dropout=0.0, **SIZES[size]))
    return model.eval()


def export_bench_bundle(model, out_dir: Path, max_length: int = 16) -> Path:
    """The torch model as a bundle folder the serving engine loads (sha256s, manifest, vocab)."""
    from app.inference.bundle import FORMAT_VERSION, Manifest, ModelId, SpecialTokens
    from model_export.bundle_files import file_entries
    from model_export.export import architecture_of, export_onnx
    from model_export.features import preprocessing_for

    out_dir.mkdir(parents=True, exist_ok=True)
    encoder, decoder = export_onnx(model, out_dir)
    vocab = ["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(4, model.config.vocab_size)]
    (out_dir / "vocab.json").write_text(json.dumps({"tokens": vocab}))
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model=ModelId(name="bench", version="0.0.0", created="2026-01-01T00:00:00Z"),
        architecture=architecture_of(model, model.config.vocab_size),
        preprocessing=preprocessing_for(model.backbone),
        special_tokens=SpecialTokens(**SPECIAL),
        max_length=max_length,
        files=file_entries(encoder=encoder, decoder=decoder, vocab=out_dir / "vocab.json"),
    )
    (out_dir / "manifest.json").write_text(manifest.to_json())
    return out_dir


def test_images(count: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """Preprocessed [count, 3, size, size] float32 inputs from scikit-image's photographs (resized,
    flipped and shifted so that no two are the same)."""
    from PIL import Image
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.hubble_deep_field()]
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)])
        w, h = photo.size
        left, top = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        crop = photo.crop((left, top, left + 3 * w // 4, top + 3 * h // 4)).resize((size, size), Image.BILINEAR)
        if i % 2:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(crop, dtype=np.float32) / 255.0
        out[i] = ((arr - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Best-of-`repeat` wall time of fn() in seconds, and its last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def environment() -> dict:
    import onnxruntime

    info = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "onnxruntime": onnxruntime.__version__,
        "ort_providers": onnxruntime.get_available_providers(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, check=False).stdout.strip()
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_report(path: str | None, report: dict) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def add_setting_option(parser) -> None:
    """`--setting NAME=VALUE` (repeatable) on a benchmark that starts the service: read with service_settings."""
    parser.add_argument("--setting", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                        help="a service setting, e.g. CAPTIONER_INLINE_DECODE_PIXELS=0 (repeatable)")


def service_settings(items: list[str]) -> dict[str, str]:
    """`CAPTIONER_NAME=value` (or `name=value`) arguments as live-server settings: {"name": "value"}."""
    settings = {}
    for item in items:
        name, _, value = item.partition("=")
        settings[name.upper().removeprefix("CAPTIONER_").lower()] = value
    return settings


def service_pids(root: int) -> list[int]:
    """The process and all its descendants (a supervisor's workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_kib(pid: int) -> dict[str, int]:
    """Resident memory of a process (VmRSS) and its peak (VmHWM), KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def rss_kib_tree(pid: int) -> dict[str, int]:
    """`rss_kib` summed over a process and its descendants (a supervisor and its workers), with their count."""
    pids = service_pids(pid)
    total = {"VmRSS": 0, "VmHWM": 0, "processes": len(pids)}
    for p in pids:
        for key, value in rss_kib(p).items():
            total[key] += value
    return total


def torch_batched_beam_search(model, images, beam: int, max_length: int, special: dict = SPECIAL) -> list[list[int]]:
    """A fair batched baseline: the usual fixed-width batched beam search, everything on the model's
    device (TopK in torch, no per-step copy to the host except one 'all done?' flag). Each image keeps
    `beam` live rows; an <end> among an image's best `beam` candidates finishes a hypothesis; an image
    is done once `beam` hypotheses have finished. Returns the best word ids per image."""
    import torch

    device = images.device
    with torch.no_grad():
        features, h0, c0, att_proj = model.encode(images)
        n, b = images.shape[0], beam
        h, c = h0.repeat_interleave(b, 0), c0.repeat_interleave(b, 0)
        scores = torch.full((n, b), float("-inf"), device=device)
        scores[:, 0] = 0.0
        tokens = torch.full((n * b,), special["start"], dtype=torch.long, device=device)
        words = torch.zeros((n * b, max_length + 1), dtype=torch.long, device=device)
        best_score = torch.full((n,), float("-inf"), device=device)
        best_words = torch.zeros((n, max_length + 1), dtype=torch.long, device=device)
        best_len = torch.zeros(n, dtype=torch.long, device=device)
        finished = torch.zeros(n, dtype=torch.long, device=device)
        banned = torch.tensor([special["pad"], special["start"], special["unk"]], device=device)
        base = (torch.arange(n, device=device) * b)[:, None]
        rank = torch.arange(2 * b, device=device)[None, :]
        for t in range(max_length + 1):
            log_probs, h, c, _ = model.decoder.step(tokens, h, c, features, att_proj)  # blocks of b rows per image
            log_probs = log_probs.float()
            vocab = log_probs.shape[1]
            log_probs[:, banned] = float("-inf")
            if t == 0:
                log_probs[:, special["end"]] = float("-inf")
            if t == max_length:
                end_column = log_probs[:, special["end"]].clone()
                log_probs.fill_(float("-inf"))
                log_probs[:, special["end"]] = end_column
            done = finished >= b
            total = (scores.masked_fill(done[:, None], float("-inf")).reshape(-1, 1) + log_probs).reshape(n, b * vocab)
            top_v, top_i = total.topk(2 * b, dim=1)
            parent, token = top_i // vocab, top_i % vocab
            is_end = (token == special["end"]) & (rank < b) & torch.isfinite(top_v)
            end_v = top_v.masked_fill(~is_end, float("-inf"))
            cand_v, cand_k = end_v.max(dim=1)
            better = cand_v > best_score
            src = (base[:, 0] + parent.gather(1, cand_k[:, None])[:, 0])
            best_words = torch.where(better[:, None], words[src], best_words)
            best_len = torch.where(better, torch.full_like(best_len, t), best_len)
            best_score = torch.maximum(best_score, cand_v)
            finished += is_end.sum(dim=1)
            order = torch.sort((token == special["end"]).int(), dim=1, stable=True).indices[:, :b]
            scores = top_v.gather(1, order)
            rows = (base + parent.gather(1, order)).reshape(-1)
            tokens = token.gather(1, order).reshape(-1)
            h, c, words = h[rows], c[rows], words[rows]
            words[:, t] = tokens
            if bool((finished >= b).all()):
                break
        best_words, best_len = best_words.cpu().numpy(), best_len.cpu().numpy()
    return [list(map(int, best_words[i, : best_len[i]])) for i in range(n)]


def batcher_rate(engine, arrays, config, concurrency: int, enabled: bool, seconds: float,
                 max_batch_images: int = 64) -> dict:
    """In-process dynamic batching: `concurrency` clients each submit one image at a time to
    app/serving/batcher.py's DynamicBatcher for `seconds`. Images/s and latency percentiles (ms)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from app.serving.batcher import DynamicBatcher

    latencies: list[float] = []

    async def main() -> float:
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(engine, pool, enabled=enabled, max_batch_images=max_batch_images,
                                     max_queue_delay_s=0.002, max_queue_images=10 * concurrency)
            batcher.start()
            stop = time.perf_counter() + seconds

            async def client(i: int) -> None:
                while time.perf_counter() < stop:
                    start = time.perf_counter()
                    await batcher.submit([arrays[i % len(arrays)]], config)
                    latencies.append(time.perf_counter() - start)

            began = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(concurrency)))
            elapsed = time.perf_counter() - began
            await batcher.close()
            return elapsed

    elapsed = asyncio.run(main())
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "batching": enabled, "images_per_s": round(len(latencies) / elapsed, 2),
            "latency_ms": {f"p{p}": round(float(np.percentile(lat, p)), 2) for p in (50, 95, 99)}}
