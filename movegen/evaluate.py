"""Evaluation of trained models: samples -> FID / IS / KID (+ bits per token) for one checkpoint.

Used by ``movegen evaluate``; the scores themselves live in ``metrics.py``, the loaders in
``checkpoint.py``.

Imports run one way: this module imports ``checkpoint``, ``data``, ``metrics``, ``model`` and
``sample`` (never ``lit``: evaluation needs no training layer); ``cli`` imports it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (torch is imported inside the functions)
    from .sample import SamplingSettings

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_path, load_model_and_tokenizer
from .data import CodeStore, load_dataset
from .metrics import bits_per_token, build_extractors, extract_features, reference_features, score
from .model import cost_report
from .sample import generate_images

log = logging.getLogger(__name__)


def content_crop(images, tck: dict):
    """Bring generated images to the dataset's native size, as the reference images are: undo the
    tokenizer's padding (``fit='pad'``) or resize back (``fit='resize'``)."""
    ds = tck.get("dataset", {})
    native = ds.get("native_size")
    if not native or images.shape[-1] == native:
        return images
    if ds.get("fit", "pad") == "pad" and images.shape[-1] > native:
        p = (images.shape[-1] - native) // 2
        return images[..., p : p + native, p : p + native]
    out = F.interpolate(
        images, size=(native, native), mode="bilinear", antialias=True, align_corners=False
    )
    return out.clamp(-1, 1)


def evaluate_model(model_path: str, *, features: str, num_samples: int, settings: SamplingSettings, seed: int,
                   device: str, batch_size: int = 256, tokenizer: str | None = None, ref_split: str = "train",
                   cache_dir: str | None = None, inception_weights: str | None = None, data_root: str | None = None,
                   val_codes: str | None = None, export_npz: str | None = None) -> dict:  # fmt: skip
    model, ckpt, tok, tck = load_model_and_tokenizer(model_path, tokenizer, device)
    feat_mod, logit_mod, fdesc = build_extractors(features, inception_weights, device)
    C = model.config.num_classes
    labels = torch.arange(num_samples, device=device) % C  # balanced over classes
    g = torch.Generator(device=device).manual_seed(seed)
    t0 = time.time()
    images, _ = generate_images(model, tok.decode, labels, settings, batch_size=batch_size, generator=g,
                                progress=True)  # fmt: skip
    sample_seconds = time.time() - t0
    images = content_crop(images, tck)
    dsname = ckpt["code_store"].get("dataset") or tck["dataset"]["name"]
    if fdesc["features"].startswith("classifier:") and fdesc["features"].split(":", 1)[1] != dsname:
        raise ValueError(f"classifier features were trained on {fdesc['features'].split(':', 1)[1]}, the model on "
                         f"{dsname}; use a classifier of the same dataset")  # fmt: skip
    res = images.shape[-1]

    def real_batches():
        ds = load_dataset(dsname, ref_split, data_root=data_root, channels=images.shape[1],
                          image_size=None if not dsname.startswith("folder:") else res)  # fmt: skip
        loader = torch.utils.data.DataLoader(ds, batch_size=500)
        for batch in loader:
            yield batch[0]

    key = {"dataset": dsname, "split": ref_split, "resolution": res, "features": fdesc["id"]}
    cache = cache_dir or str(Path.home() / ".cache" / "movegen" / "ref")
    real, hit = reference_features(feat_mod, key, real_batches, cache, device)
    fake = extract_features(feat_mod, images, device=device)
    logits = extract_features(logit_mod, images, device=device)
    scores = score(real, fake, logits, seed=seed)
    bits = ckpt["metrics"].get("val_bits_per_token")
    if val_codes:
        bits = bits_per_token(model, CodeStore(val_codes), device=device)
    run = Path(model_path).resolve().parent.name
    result = {
        "run": run, "model": str(Path(model_path).resolve()), **scores, "val_bits_per_token": bits,
        "num_samples": num_samples, "seed": seed, "sampling": asdict(settings), **fdesc, "reference": key,
        "reference_cache_hit": hit, "reference_size": len(real), "sample_seconds": round(sample_seconds, 2),
        "memory": model.config.memory, "memory_density": model.config.memory_density,
        "gate_standard_path": model.config.gate_standard_path, "train_tokens": ckpt["train"].get("train_tokens"),
        "train_step": ckpt["train"].get("step"), "dataset": dsname, "tokenizer_path": tck.get("path"),
        "tokenizer_sha256": tck.get("sha256"),
    }  # fmt: skip
    result.update(cost_report(model.config))
    if export_npz:
        arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        arr = arr.expand(-1, 3, -1, -1) if arr.shape[1] == 1 else arr
        write_npz(
            export_npz,
            arr.permute(0, 2, 3, 1).contiguous().numpy(),
            labels.cpu().numpy().astype(np.int64),
        )
        result["npz"] = str(export_npz)
    return result


def write_npz(path, images, labels) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(
            tmp, arr_0=images, arr_1=labels
        )  # the ADM evaluator reads arr_0 (N, H, W, 3) uint8
