"""Evaluation of trained models: samples -> FID / IS / KID (+ bits per token) for one checkpoint.

The protocol (DESIGN §4): the samples are scored against every reference split asked for, the
held-out split first (``test``: the primary numbers, top-level ``fid``/``kid``/...), the training
split beside it (``fid_train``, ...), never in one column; IS needs no reference and is computed
once. Precision/recall (k-NN manifolds, k = 3) come with each reference, and a memorisation
score compares the samples' nearest-training-image distances with those of held-out real images.
Everything that can be checked without sampling (the held-out codes, the classifier's dataset
and image size, the reference images) is checked before sampling starts.

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

from .checkpoint import atomic_path, load_model_and_tokenizer, sha256_file_cached
from .data import CodeStore, collate_skip_none, dataset_fingerprint, load_dataset
from .metrics import (
    InceptionFeatures,
    bits_per_token,
    build_extractors,
    describe_features,
    extract_features,
    feature_statistics,
    fid_kid,
    frechet_distance,
    inception_score,
    load_adm_reference,
    memorisation,
    precision_recall,
    reference_features,
)
from .model import cost_report
from .ranks import agree, gather_to_first_rank, on_first_rank, rank_and_world
from .sample import DECODE_BATCH, SampleNoise, generate_images
from .tokenizer import CompiledDecode

log = logging.getLogger(__name__)

REF_SPLITS = ("test", "train")
"""The default references: the held-out split (primary) and the training split beside it."""
REF_MAX = 50_000
"""Reference images per split at most (a seeded subset beyond): ImageNet's train split would
otherwise take 1.28 M images through the feature network."""
KNN_MAX = 10_000
"""Images per set at most in the k-NN scores (precision/recall; the samples and held-out images
of the memorisation score), a seeded subset beyond: their cost grows with the product of sizes."""
PR_K = 3


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


def model_dataset(ckpt: dict, tck: dict) -> str:
    """The dataset a model's codes came from (its code store's), else its tokenizer's."""
    return ckpt["code_store"].get("dataset") or tck["dataset"]["name"]


def native_size(tck: dict) -> int:
    """The side of the dataset's own images: the size samples are cropped to (:func:`content_crop`)."""
    return int(tck.get("dataset", {}).get("native_size") or tck["config"]["image_size"])


def _same_dataset(a: str, b: str) -> bool:
    """Two dataset names that denote one dataset (``folder:`` paths compared resolved)."""
    if a.startswith("folder:") and b.startswith("folder:"):
        return Path(a[7:]).expanduser().resolve() == Path(b[7:]).expanduser().resolve()
    return a == b


def check_inputs(model_path: str, ckpt: dict, tck: dict, fdesc: dict, *, val_codes: str | None = None,
                 num_classes: int | None = None) -> None:  # fmt: skip
    """Every check of an evaluation's inputs that needs no sampling; a ValueError naming both
    sides of a mismatch:

    * ``val_codes`` must come from the model's tokenizer (its hash, codebook size and grid in
      the store's header against the model's code-store header) and have the model's classes;
    * classifier features must come from a classifier of the model's dataset, trained at the
      native size the samples are scored at.
    """
    model_header = ckpt["code_store"]
    if val_codes:
        header = CodeStore(val_codes).header
        keys = ("tokenizer_sha256", "codebook_size", "h", "w", "num_classes")
        want = {**model_header, "num_classes": num_classes or model_header.get("num_classes")}
        diffs = [k for k in keys if header.get(k) != want.get(k)]

        def show(v):
            return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else repr(v)

        if diffs:
            what = "; ".join(f"{k} {show(header.get(k))} vs {show(want.get(k))}" for k in diffs)
            raise ValueError(
                f"--val_codes {val_codes} does not hold codes of this model's tokenizer ({what}; "
                f"val_codes vs model {model_path}). The store was extracted with "
                f"{header.get('tokenizer_path')}, the model trained on codes of {model_header.get('tokenizer_path')}. "
                f"Extract held-out codes with the model's tokenizer: movegen extract-codes --tokenizer "
                f"{model_header.get('tokenizer_path')} --split val --out CODES"
            )
        if header.get("split") == model_header.get("split") and _same_dataset(
            str(header.get("dataset")), str(model_header.get("dataset"))
        ):
            log.warning("--val_codes %s is the %s split the model was trained on: its bits/token "
                        "are not a held-out number", val_codes, header.get("split"))  # fmt: skip
    if fdesc.get("features", "").startswith("classifier:"):
        dsname, native = model_dataset(ckpt, tck), native_size(tck)
        cds, csize = fdesc.get("classifier_dataset"), fdesc.get("classifier_image_size")
        if not _same_dataset(str(cds), dsname) or (csize is not None and int(csize) != native):
            raise ValueError(
                f"the classifier {fdesc.get('classifier_path')} was trained on {cds} at {csize}x{csize} px, "
                f"but the model {model_path} makes {dsname} images scored at {native}x{native} px "
                f"(its tokenizer's native size); train a classifier on the model's data: "
                f"movegen fit-classifier --data.name {dsname} --out DIR"
            )


def preflight(model_path: str, *, features: str, tokenizer: str | None = None, val_codes: str | None = None,
              inception_weights: str | None = None) -> None:  # fmt: skip
    """:func:`check_inputs` of one model, loaded on the CPU: run for every model of a call
    before the first is sampled, so a mistake in the last one costs no sampling time."""
    model, ckpt, _, tck = load_model_and_tokenizer(model_path, tokenizer, "cpu")
    fdesc = describe_features(features, inception_weights)
    check_inputs(
        model_path, ckpt, tck, fdesc, val_codes=val_codes, num_classes=model.config.num_classes
    )


def _subset(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """At most ``k`` rows of ``x``: a seeded subset (in the original order) when there are more."""
    if len(x) <= k:
        return x
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return x[idx]


def reference_set(module, feature_id: str, dataset: str, split: str, *, resolution: int, channels: int,
                  cache_dir: str, data_root: str | None = None, device="cpu",
                  max_images: int = REF_MAX) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Features of one reference split, from the cache when it holds them for this exact
    content (the key has the dataset's :func:`~movegen.data.dataset_fingerprint`), and
    ``{"key", "cache_hit"}``. Unreadable images are left out, counted and named; a split with
    fewer than 2 readable images is an error."""
    key = {"dataset": dataset, "split": split, "content": dataset_fingerprint(dataset, split, data_root),
           "resolution": resolution, "channels": channels, "features": feature_id,
           "max_images": max_images}  # fmt: skip

    def batches():
        ds = load_dataset(dataset, split, data_root=data_root, channels=channels,
                          image_size=resolution if dataset.startswith("folder:") else None)  # fmt: skip
        items = ds
        if len(ds) > max_images:
            items = torch.utils.data.Subset(
                ds, _subset(torch.arange(len(ds)), max_images, 0).tolist()
            )
        kept = bad = 0
        for x, _, b in torch.utils.data.DataLoader(
            items, batch_size=500, collate_fn=collate_skip_none
        ):
            bad += b
            if len(x):
                kept += len(x)
                yield x
        failures = getattr(ds, "failures", [])
        if bad:
            log.warning("%d images of the %s split of %s could not be decoded and are left out of the "
                        "reference: %s", bad, split, dataset, "; ".join(failures[-bad:][:5]))  # fmt: skip
        if kept < 2:
            raise ValueError(
                f"the {split} split of {dataset} has {kept} readable image(s); FID needs at least 2"
            )

    feats, hit = reference_features(module, key, batches, cache_dir, device)
    if len(feats) < 2:
        raise ValueError(
            f"the cached {split} reference of {dataset} has {len(feats)} image(s); FID needs 2"
        )
    return feats, {"key": key, "cache_hit": hit}


def score_reference(real: torch.Tensor, fake: torch.Tensor, *, seed: int = 0, knn_max: int = KNN_MAX,
                    device: str = "cpu") -> dict:  # fmt: skip
    """FID, KID and precision/recall (k = 3, on seeded subsets of at most ``knn_max``, searched
    on ``device``) of the samples' features against one reference's, and the reference's size."""
    out = {**fid_kid(real, fake, seed=seed), "precision": None, "recall": None, "size": len(real)}
    r, f = _subset(real, knn_max, seed).to(device), _subset(fake, knn_max, seed + 1)
    if min(len(r), len(f)) > PR_K:
        out.update(precision_recall(r, f, k=PR_K))
    else:
        log.warning("precision/recall need more than %d real and generated images (have %d and %d); "
                    "not computed", PR_K, len(r), len(f))  # fmt: skip
    return out


def score_memorisation(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, *, seed: int = 0,
                       knn_max: int = KNN_MAX, device: str = "cpu") -> dict:  # fmt: skip
    """The memorisation block of a result: :func:`~movegen.metrics.memorisation` of the samples
    against the training features, with held-out real images as the yardstick. Every training
    feature is searched (a copy must find its original); samples and held-out images are
    seeded subsets of at most ``knn_max``."""
    s, h = _subset(samples, knn_max, seed + 2), _subset(heldout, knn_max, seed + 3)
    return {**memorisation(s, train.to(device), h), "num_samples": len(s), "num_train": len(train),
            "num_heldout": len(h)}  # fmt: skip


def _check_ref_splits(ref_splits) -> tuple[str, ...]:
    refs = tuple([ref_splits] if isinstance(ref_splits, str) else ref_splits)
    bad = [s for s in refs if s not in ("train", "val", "test")]
    if not refs or bad or len(set(refs)) != len(refs):
        raise ValueError(f"--ref_splits must list distinct splits of train, val, test (the first is the "
                         f"primary reference), got {list(refs)}")  # fmt: skip
    return refs


def adm_reference_block(adm: dict, path: str, fake: torch.Tensor, fake_spatial: torch.Tensor | None,
                        feat_mod, feature_id: str, *, cache_dir: str, seed: int, knn_max: int,
                        device: str) -> dict:  # fmt: skip
    """Scores against an ADM reference batch: FID from its ``mu``/``sigma`` (the statistics of
    the reference set the papers use), sFID from ``mu_s``/``sigma_s``, and KID and
    precision/recall against the features of its ``arr_0`` images (cached by the file's hash)."""
    key = {
        "reference_npz": str(Path(path).resolve()),
        "sha256": sha256_file_cached(path, cache_dir),  # ADM's batches are ~2 GB each
        "features": feature_id,
    }
    block: dict = {
        "kid": None,
        "kid_std": None,
        "precision": None,
        "recall": None,
        "size": None,
        "cache_hit": None,
    }
    if "arr_0" in adm:
        arr = adm["arr_0"]

        def batches():
            for i in range(0, len(arr), 500):
                yield torch.from_numpy(arr[i : i + 500]).permute(0, 3, 1, 2).float() / 127.5 - 1

        real, hit = reference_features(feat_mod, key, batches, cache_dir, device)
        block.update(
            score_reference(real, fake, seed=seed, knn_max=knn_max, device=device), cache_hit=hit
        )
    block["fid"] = frechet_distance(adm["mu"], adm["sigma"], *feature_statistics(fake))
    block["sfid"] = None
    if fake_spatial is not None and "mu_s" in adm:
        block["sfid"] = frechet_distance(
            adm["mu_s"], adm["sigma_s"], *feature_statistics(fake_spatial)
        )
    return {**block, "key": key}


_COMPILED_DECODERS: dict[tuple, CompiledDecode] = {}


def compiled_decoder(tok, tck: dict, device, batch_size: int) -> CompiledDecode:
    """A :class:`~movegen.tokenizer.CompiledDecode` of ``tok``, one per tokenizer file (its
    sha256 in ``tck``), device and batch size in a process: evaluating several models of one
    tokenizer compiles its decoder once (dynamo would recompile for every new copy, and after
    a few fall back to the eager decoder). A tokenizer without a recorded sha256 gets its own."""
    key = (tck.get("sha256"), str(device), batch_size)
    if key[0] is None:
        return CompiledDecode(tok, batch_size)
    if key not in _COMPILED_DECODERS:
        _COMPILED_DECODERS[key] = CompiledDecode(tok, batch_size)
    return _COMPILED_DECODERS[key]


def evaluate_model(model_path: str, *, features: str, num_samples: int, settings: SamplingSettings, seed: int,
                   device: str, batch_size: int = 256, tokenizer: str | None = None,
                   ref_splits=None, cache_dir: str | None = None, inception_weights: str | None = None,
                   data_root: str | None = None, val_codes: str | None = None, export_npz: str | None = None,
                   ref_max: int = REF_MAX, knn_max: int = KNN_MAX, reference: str | None = None,
                   compile_decoder: bool = False) -> dict:  # fmt: skip
    """Sample ``num_samples`` images (balanced over classes) from one model and score them
    against each reference split of ``ref_splits`` (the first is the primary one; default
    ``[test, train]``, or none with ``reference``) and against the ADM reference batch
    ``reference`` (a ``.npz``; then the primary one, ``adm``); returns the result dict that
    ``movegen evaluate`` writes as ``<run>.json``. ``compile_decoder``: decode through
    :class:`~movegen.tokenizer.CompiledDecode` (the same images to within TF32's differences)."""
    if ref_splits is None:
        ref_splits = () if reference else REF_SPLITS
    refs = _check_ref_splits(ref_splits) if (ref_splits or not reference) else ()
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (FID/KID compare two sets), got {num_samples}")
    model, ckpt, tok, tck = load_model_and_tokenizer(model_path, tokenizer, device)
    feat_mod, logit_mod, fdesc = build_extractors(features, inception_weights, device)
    if reference and fdesc["features"] != "inception":
        raise ValueError(f"--reference {reference} holds Inception statistics; score with --features inception "
                         f"(these are {features!r} features)")  # fmt: skip
    check_inputs(
        model_path, ckpt, tck, fdesc, val_codes=val_codes, num_classes=model.config.num_classes
    )
    dsname, res, channels = model_dataset(ckpt, tck), native_size(tck), tok.config.channels
    cache = cache_dir or str(Path.home() / ".cache" / "movegen" / "ref")
    rank, world = rank_and_world()

    def references():  # before the samples: a missing or unreadable dataset costs no sampling time
        return {split: reference_set(feat_mod, fdesc["id"], dsname, split, resolution=res, channels=channels,
                                     cache_dir=cache, data_root=data_root, device=device, max_images=ref_max)
                for split in refs}  # fmt: skip

    # seconds per phase, in the result: where an evaluation's time goes
    phases: dict[str, float] = {}
    tick = time.time()

    def lap(name: str) -> None:
        nonlocal tick
        if torch.cuda.is_available() and str(device).startswith("cuda"):
            torch.cuda.synchronize()
        now = time.time()
        phases[name] = round(phases.get(name, 0.0) + now - tick, 2)
        tick = now

    # every rank raises the first rank's error, if any
    reals = on_first_rank(references, "loading the reference images")
    adm = (
        on_first_rank(lambda: load_adm_reference(reference), "loading the reference batch")
        if reference
        else None
    )
    lap("references")
    C = model.config.num_classes
    labels = torch.arange(num_samples, device=device) % C  # balanced over classes
    lo, hi = num_samples * rank // world, num_samples * (rank + 1) // world  # this process's shard
    t0 = time.time()
    # sample i's noise depends only on (seed, i): the same images at any batch size, on any
    # device, in any shard, so a run over several processes scores the images of a run in one
    inception = fdesc["features"] == "inception"

    def finish(x: torch.Tensor) -> torch.Tensor:  # each decoded part, on the device
        x = content_crop(x, tck)
        # Inception sees uint8 images anyway (as a PNG holds them): kept so on the host, 50,000
        # images of 256 x 256 take 9.8 GB instead of float32's 39 GB
        return _uint8(x) if inception else x.float()

    def sample_and_features():
        size = min(batch_size, DECODE_BATCH)
        decode = compiled_decoder(tok, tck, device, size) if compile_decoder else tok.decode
        images, _ = generate_images(model, decode, labels[lo:hi], settings, batch_size=batch_size,
                                    noise=SampleNoise(seed), first_index=lo, progress=rank == 0,
                                    transform=finish)  # fmt: skip
        sample_seconds = time.time() - t0
        lap("sample")
        spatial = None
        if inception:  # one pass for the pool features, the IS logits and (for sFID) mixed_6/conv
            both = InceptionFeatures(fdesc["weights"], "all" if reference else "pool+logits").to(
                device
            )
            fake, logits, *rest = extract_features(both, images, device=device)
            spatial = rest[0] if reference else None  # (every rank: adm is None off the first)
        else:
            fake = extract_features(feat_mod, images, device=device)
            logits = extract_features(logit_mod, images, device=device)
        lap("features")
        return images, fake, logits, spatial, sample_seconds

    # an error in any process's share (out of memory, a decoding error) is raised in every
    # process here, before the gather below waits for all of them
    images, fake, logits, spatial, sample_seconds = agree(sample_and_features, "sampling")
    if world > 1:  # features (and, for the .npz, the images as uint8) to the first rank
        u8 = (images if images.dtype == torch.uint8 else _uint8(images)) if export_npz else None
        parts = gather_to_first_rank((fake.cpu(), logits.cpu(), u8, sample_seconds, spatial))
        if rank != 0:
            return None
        fake, logits = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        images = torch.cat([p[2] for p in parts]) if export_npz else None
        sample_seconds = max(p[3] for p in parts)
        spatial = torch.cat([p[4] for p in parts]) if reference else None
    blocks = {}
    if adm is not None:
        blocks["adm"] = adm_reference_block(adm, reference, fake, spatial, feat_mod, fdesc["id"], cache_dir=cache,
                                            seed=seed, knn_max=knn_max, device=device)  # fmt: skip
    for split, (real, meta) in reals.items():
        blocks[split] = {
            **score_reference(real, fake, seed=seed, knn_max=knn_max, device=device),
            **meta,
        }
    lap("scores")
    heldout = next((s for s in refs if s != "train"), None)
    mem = None
    if "train" in reals and heldout:
        mem = {**score_memorisation(fake, reals["train"][0], reals[heldout][0], seed=seed, knn_max=knn_max,
                                    device=device),
               "train_split": "train", "heldout_split": heldout}  # fmt: skip
    else:
        log.info(
            "no memorisation score: it needs the train split and a held-out one in --ref_splits"
        )
    lap("memorisation")
    bits = ckpt["metrics"].get("val_bits_per_token")
    if val_codes:
        bits = bits_per_token(model, CodeStore(val_codes), device=device)
        lap("bits")
    order = list(blocks)  # the ADM reference (when given) first, then the splits in their order
    primary = blocks[order[0]]
    names = ("fid", "kid", "kid_std", "precision", "recall")
    run = Path(model_path).resolve().parent.name
    result = {
        "run": run, "model": str(Path(model_path).resolve()), **{k: primary[k] for k in names},
        **inception_score(logits, seed=seed),
        **{f"{k}_{s}": blocks[s][k] for s in order[1:] for k in names},
        **({"sfid": blocks["adm"]["sfid"]} if "adm" in blocks else {}),
        "reference_split": order[0], "references": blocks, "memorisation": mem, "val_bits_per_token": bits,
        "num_samples": num_samples, "seed": seed, "sampling": asdict(settings), **fdesc,
        "reference": primary["key"], "reference_cache_hit": primary.get("cache_hit"), "reference_size": primary["size"],
        "sample_seconds": round(sample_seconds, 2), "seconds": phases,
        "memory": model.config.memory, "memory_density": model.config.memory_density,
        "gate_standard_path": model.config.gate_standard_path, "train_tokens": ckpt["train"].get("train_tokens"),
        "train_step": ckpt["train"].get("step"), "dataset": dsname, "tokenizer_path": tck.get("path"),
        "tokenizer_sha256": tck.get("sha256"),
    }  # fmt: skip
    result.update(cost_report(model.config))
    if world > 1:
        result["processes"] = world
    if export_npz:
        arr = images if images.dtype == torch.uint8 else _uint8(images)
        arr = arr.expand(-1, 3, -1, -1) if arr.shape[1] == 1 else arr
        write_npz(
            export_npz,
            arr.permute(0, 2, 3, 1).contiguous().numpy(),
            labels.cpu().numpy().astype(np.int64),
        )
        result["npz"] = str(export_npz)
    return result


def _uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def write_npz(path, images, labels) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(
            tmp, arr_0=images, arr_1=labels
        )  # the ADM evaluator reads arr_0 (N, H, W, 3) uint8
