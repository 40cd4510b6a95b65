"""The frozen-encoder feature cache. With a frozen encoder the feature
grids of every image are computed once (through onnxruntime, which runs EfficientNet-Lite several
times faster than eager PyTorch on a CPU) and kept in a float16 .npy file that later runs reuse.

A cache file's name is a hash of everything its features depend on (`_cache_key`): the image files
(absolute path, size and modification time of each, in order), the backbone (name, input size and a
digest of its weights), the preprocessing, the mirroring, and CACHE_FORMAT for what the code decides
(the resizing, the graph, float16). So runs, and tests, on the same images may share one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from app.inference.bundle import Preprocessing
from model_export.data.errors import DatasetError
from model_export.images import iter_batches
from model_export.model import Backbone

# Bump when the same inputs would give other features (resizing, the backbone graph, the stored dtype).
CACHE_FORMAT = 2


def preprocessing_for(backbone: Backbone) -> Preprocessing:
    """The EfficientNet-Lite input convention: RGB, bilinear resize, (x / 255 - 0.5) / 0.5."""
    size = backbone.image_size
    return Preprocessing(image_size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), scale=255.0)


def export_backbone_onnx(backbone: Backbone, path: Path) -> None:
    """The frozen backbone as an ONNX graph: image [N,3,H,W] -> grid [N,P,D]."""
    size = backbone.image_size
    backbone.eval()
    torch.onnx.export(
        backbone,
        (torch.zeros(2, 3, size, size),),
        str(path),
        input_names=["image"],
        output_names=["grid"],
        dynamic_axes={"image": {0: "n"}, "grid": {0: "n"}},
        opset_version=17,
        dynamo=False,
    )
    backbone.eval()


def weights_digest(backbone: Backbone) -> str:
    """sha256 over the backbone's parameters and buffers (names, dtypes, shapes, values): the shipped
    weights of its package version, or any others loaded into it."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        digest.update(f"{name}|{array.dtype}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _cache_key(paths: Sequence[Path], backbone: Backbone, flip: bool = False) -> str:
    """What the features of `paths` depend on. An image file is known by its absolute path, size and
    modification time (not its bytes, which would mean reading every image): rewriting a file changes
    its modification time."""
    digest = hashlib.sha256()
    spec = preprocessing_for(backbone)
    digest.update(f"v{CACHE_FORMAT}|{backbone.name}|{backbone.image_size}|{weights_digest(backbone)}|"
                  f"{spec.model_dump_json()}|flipped={flip}\n".encode())
    for path in paths:
        path = Path(path).absolute()
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def feature_cache(
    paths: Sequence[Path],
    backbone: Backbone,
    cache_dir: Path,
    batch_size: int = 64,
    progress: bool = True,
    threads: int | None = None,
    flip: bool = False,
) -> np.ndarray:
    """Feature grids [N, P, D] (float16, memory-mapped) for `paths`, computed once and cached.
    `flip`: of the horizontally mirrored images (for flip augmentation; cached apart)."""
    import onnxruntime as ort
    from tqdm import tqdm

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(missing[0], f"image file not found ({len(missing)} of {len(paths)} missing)")
    key = _cache_key(paths, backbone, flip)
    target = cache_dir / f"features-{key}.npy"
    if target.is_file():
        return np.load(target, mmap_mode="r")

    spec = preprocessing_for(backbone)
    positions, dim = backbone.grid * backbone.grid, backbone.feature_dim
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        onnx_path = Path(tmp) / "backbone.onnx"
        export_backbone_onnx(backbone, onnx_path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        partial = Path(tmp) / "features.npy"
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=(len(paths), positions, dim))
        bar = tqdm(total=len(paths), desc="encoder features" + (" (mirrored)" if flip else ""), unit="img", disable=not progress)
        for indices, pixels in iter_batches(list(paths), spec, batch_size):
            if flip:
                pixels = np.ascontiguousarray(pixels[:, :, :, ::-1])
            (grid,) = session.run(["grid"], {"image": pixels})
            out[indices.start : indices.stop] = grid.astype(np.float16)
            bar.update(len(indices))
        bar.close()
        out.flush()
        del out
        os.replace(partial, target)
    (cache_dir / f"features-{key}.json").write_text(
        json.dumps({"format": CACHE_FORMAT, "backbone": backbone.name, "image_size": backbone.image_size,
                    "images": len(paths), "flipped": flip}, indent=1)
    )
    return np.load(target, mmap_mode="r")
