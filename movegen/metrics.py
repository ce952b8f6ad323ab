"""Feature extractors, cached reference features, and FID (float64 statistics) / IS / KID.

Two feature sets (never mixed in one column of a report):

* ``inception``: torch-fidelity's FID InceptionV3 (``pip install 'movegen[inception]'``) with its
  weights file ``weights-inception-2015-12-05-6726825d.pth`` from ``$TORCH_HOME/hub/checkpoints/``
  (or a given path), on uint8 images, TF32 off: the same features, and FID to 1e-6, as
  torch-fidelity's ``calculate_metrics`` (tested). Comparable with published numbers. It is never
  downloaded here: when the file is absent the error says which file to put where.
* ``classifier:<ckpt>``: the small CNN trained by ``movegen fit-classifier`` on the dataset itself;
  its penultimate layer feeds FID/KID and its logits feed IS. Works offline; the usual practice
  for MNIST-like data.

Reference features of the real images are computed once per key (dataset content, split,
resolution, feature set: see ``evaluate.reference_set``) and cached as a ``.pt`` file. The tokenizer's scores (PSNR, codebook usage,
perplexity) and the classifier's accuracy live here too, beside the other scores.

Imports run one way: this module imports ``checkpoint`` (the classifier loader, atomic writes) and
the model files (``tokenizer``, ``classifier``); ``lit`` and ``evaluate`` import it. Heavy
optional libraries (torchmetrics, scipy, tqdm) are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .checkpoint import atomic_torch_save, load_classifier, sha256_file
from .classifier import SmallCNN
from .tokenizer import VQTokenizer

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


# --------------------------------------------------------------------------- classifier features


class ClassifierFeatures(nn.Module):
    """A torchmetrics feature module around :class:`SmallCNN`: ``kind='features'`` (FID/KID) or
    ``'logits'`` (IS). Takes images in [-1, 1] of any size (resized to the classifier's) or
    precomputed ``(N, num_features)`` features, which pass through unchanged."""

    def __init__(self, net: SmallCNN, kind: str = "features"):
        super().__init__()
        if kind not in ("features", "logits"):
            raise ValueError(f"kind must be 'features' or 'logits', got {kind!r}")
        self.net, self.kind = net.eval(), kind
        self.num_features = net.feature_dim if kind == "features" else net.num_classes

    def train(self, mode: bool = True):  # always eval (BatchNorm statistics stay fixed)
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return x.float()
        x = prepare_images(x.float(), self.net.channels, self.net.image_size)
        return self.net.features(x) if self.kind == "features" else self.net(x)


def prepare_images(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Bring images in [-1, 1] to ``channels`` and ``size``."""
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-1] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return x


# --------------------------------------------------------------------------- Inception


def find_inception_weights(path: str | None = None) -> str:
    """The torch-fidelity InceptionV3 weights, or a FileNotFoundError saying where to put them."""
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    candidates = [Path(path)] if path else [hub]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise FileNotFoundError(
        f"Inception features need the torch-fidelity weights file {INCEPTION_WEIGHTS}; "
        f"{'it is not at ' + str(path) if path else 'it is not in ' + str(hub.parent)}. "
        f"Put the file at {hub} (or pass --inception-weights PATH); it is not downloaded automatically. "
        "Without it, use --features classifier:DIR/classifier.ckpt (train one with `movegen fit-classifier`)."
    )


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID InceptionV3 (TF1.x-compatible resize to 299, the weights of the
    original TF FID graph) on images in [-1, 1], quantised to uint8 as a PNG would hold them:
    ``'2048'`` pool features or ``'logits_unbiased'`` (IS)."""

    def __init__(self, weights: str, kind: str = "features"):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError("Inception features need torch-fidelity: pip install 'movegen[inception]' "
                              f"(or `pip install torch-fidelity`): {e}") from e  # fmt: skip
        # torch-fidelity unpickles the file in full; check first that it holds tensors only
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{weights} is not a plain InceptionV3 state dict (only tensors may be loaded): "
                             f"{type(e).__name__}: {e}") from None  # fmt: skip
        if kind not in INCEPTION_KINDS:
            raise ValueError(
                f"InceptionFeatures kind must be one of {', '.join(INCEPTION_KINDS)}, got {kind!r}"
            )
        feats = {"logits": ["logits_unbiased"], "all": ["2048", "logits_unbiased"],
                 "pool+logits": ["2048", "logits_unbiased"]}.get(kind, ["2048"])  # fmt: skip
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", feats, feature_extractor_weights_path=weights
        )
        self.kind, self.weights = kind, weights
        self.num_features = {"features": 2048, "logits": 1008, "spatial": SFID_DIM}.get(kind)

    @staticmethod
    def quantise(x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] as a PNG would hold them (uint8, 3 channels); uint8 images (already
        quantised, e.g. by :func:`movegen.evaluate.evaluate_model`) pass as they are."""
        if x.dtype == torch.uint8:
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = prepare_images(x.float(), 3, x.shape[-1])
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        """Features ``(N, F)``; with kind ``'pool+logits'`` the tuple (pool features, IS logits)
        and with ``'all'`` (pool features, IS logits, sFID features), from one pass."""
        if x.ndim == 2:
            return x.float()
        u8 = self.quantise(x)
        with _full_fp32():  # the reference evaluators' network runs in full fp32
            if self.kind == "spatial":
                return self._with_spatial(u8, stop=True)[1]
            if self.kind == "all":
                (pool, logits), spatial = self._with_spatial(u8, stop=False)
                return pool, logits, spatial
            if self.kind == "pool+logits":
                return tuple(self.net(u8))
            return self.net(u8)[0]

    def _with_spatial(self, u8: torch.Tensor, stop: bool):
        """``(the network's outputs, or None with stop, sFID features)``: the sFID features as
        ADM's evaluator takes them, the first 7 channels of ``mixed_6/conv`` (torch-fidelity's
        ``Mixed_6d.branch1x1``, after its ReLU), 17 x 17 x 7 in HWC order; with ``stop`` the
        forward ends there."""
        out = {}

        def grab(_m, _inp, y):
            out["y"] = y
            if stop:
                raise _StopForward

        h = self.net.Mixed_6d.branch1x1.register_forward_hook(grab)
        try:
            res = self.net(u8)
        except _StopForward:
            res = None
        finally:
            h.remove()
        return res, out["y"][:, :7].permute(0, 2, 3, 1).flatten(1).float()


INCEPTION_KINDS = ("features", "logits", "spatial", "pool+logits", "all")


class _StopForward(Exception):
    pass


SFID_DIM = 17 * 17 * 7
ADM_KEYS = {
    "mu": (2048,),
    "sigma": (2048, 2048),
    "mu_s": (SFID_DIM,),
    "sigma_s": (SFID_DIM, SFID_DIM),
}


def load_adm_reference(path: str | os.PathLike) -> dict:
    """An ADM evaluator reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``): ``mu``,
    ``sigma`` (Inception pool features), optionally ``mu_s``, ``sigma_s`` (sFID) and ``arr_0``
    (``(N, H, W, 3)`` uint8 reference images, for KID and precision/recall). Loaded without
    pickles; every present key's shape is checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--reference {path}: no such file (an ADM reference batch .npz)")
    try:
        return _read_adm(path)
    except ValueError:
        raise
    except Exception as e:  # a truncated or corrupt file: one clear error (and every rank sees it)
        raise ValueError(
            f"--reference {path} is not a readable .npz ({type(e).__name__}: {e})"
        ) from None


def _read_adm(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(f"--reference {path} has keys {sorted(z.files)}; an ADM reference batch has mu and "
                             "sigma (and mu_s, sigma_s, arr_0). A sample batch (arr_0 only) is not a reference")  # fmt: skip
        out = {}
        for k, shape in ADM_KEYS.items():
            if k in z.files:
                if z[k].shape != shape:
                    raise ValueError(f"--reference {path}: {k} has shape {z[k].shape}, expected {shape} "
                                     "(statistics of another network or layer?)")  # fmt: skip
                out[k] = z[k].astype(np.float64)
        if "arr_0" in z.files:
            a = z["arr_0"]
            if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
                raise ValueError(
                    f"--reference {path}: arr_0 must be (N, H, W, 3) uint8 images, got {a.shape} {a.dtype}"
                )
            out["arr_0"] = a
    return out


@contextlib.contextmanager
def _full_fp32():
    """TF32 off for matmuls and convolutions inside (as reference FID scoring needs)."""
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


def describe_features(spec: str, inception_weights: str | None = None) -> dict:
    """What ``spec`` ('inception' or 'classifier:PATH') means, without building the networks:
    the feature set's id (of the cache key and the report's tables), its files, and for a
    classifier the dataset and image size it was trained on. Raises when the files are absent."""
    if spec == "inception":
        w = find_inception_weights(inception_weights)
        return {"features": "inception", "weights": w, "id": f"inception-{Path(w).name}"}
    if spec.startswith("classifier:"):
        path = spec.split(":", 1)[1]
        _, ckpt = load_classifier(path)
        sha = sha256_file(path)
        return {"features": f"classifier:{ckpt['dataset']}", "classifier_path": str(Path(path).resolve()),
                "classifier_sha256": sha, "classifier_test_accuracy": ckpt["metrics"].get("test_accuracy"),
                "classifier_dataset": ckpt["dataset"], "classifier_image_size": ckpt.get("image_size"),
                "id": f"classifier-{sha[:12]}"}  # fmt: skip
    raise ValueError(f"--features must be 'inception' or 'classifier:PATH', got {spec!r}")


def build_extractors(
    spec: str, inception_weights: str | None = None, device="cpu"
) -> tuple[nn.Module, nn.Module, dict]:
    """``spec`` ('inception' or 'classifier:PATH') -> (FID/KID module, IS module, description
    from :func:`describe_features`)."""
    desc = describe_features(spec, inception_weights)
    if spec == "inception":
        w = desc["weights"]
        return InceptionFeatures(w).to(device), InceptionFeatures(w, "logits").to(device), desc
    net = load_classifier(desc["classifier_path"])[0].to(device)
    return ClassifierFeatures(net, "features"), ClassifierFeatures(net, "logits"), desc


# --------------------------------------------------------------------------- reference features


@torch.no_grad()
def extract_features(
    module: nn.Module, images, batch_size: int = 500, device="cpu", progress=False
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Features ``(N, F)`` of an image tensor ``(N, C, H, W)`` or an iterable of batches (a
    tuple of them for a module with several outputs, e.g. ``InceptionFeatures(kind='all')``)."""
    from tqdm.auto import tqdm

    if isinstance(images, torch.Tensor):
        images = images.split(batch_size)
    out = []
    for x in tqdm(images, desc="features", disable=not progress):
        y = module(x.to(device))  # each batch's features to the CPU as they come
        out.append(tuple(t.float().cpu() for t in y) if isinstance(y, tuple) else y.float().cpu())
    if out and isinstance(out[0], tuple):  # a module with several outputs: each concatenated
        return tuple(torch.cat([o[i] for o in out]) for i in range(len(out[0])))
    return torch.cat(out)


def reference_features(module: nn.Module, key: dict, load_images, cache_dir: str | os.PathLike,
                       device="cpu") -> tuple[torch.Tensor, bool]:  # fmt: skip
    """Real-image features for ``key`` (dataset, split, resolution, feature id), from the cache
    when present. ``load_images()`` yields batches of real images in [-1, 1]. Returns
    ``(features, cache_hit)``."""
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]
    path = (
        Path(cache_dir)
        / f"ref-{key.get('dataset', 'data').replace('/', '_').replace(':', '_')}-{digest}.pt"
    )
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") == {k: str(v) for k, v in key.items()}:
            log.info("reference features from cache %s", path)
            return blob["features"], True
    log.info("computing reference features for %s", key)
    feats = extract_features(module, load_images(), device=device, progress=True)
    try:
        atomic_torch_save({"key": {k: str(v) for k, v in key.items()}, "features": feats}, path)
    except OSError as e:  # a read-only shared cache: the features are still good for this run
        log.warning("could not cache reference features in %s (%s); pass a writable --cache_dir "
                    "to compute them only once", cache_dir, e.strerror or e)  # fmt: skip
    return feats, False


# --------------------------------------------------------------------------- the scores


def feature_statistics(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mu``, ``sigma`` of features ``(N, D)`` in float64 (``np.cov``: centred, unbiased): what
    ADM's reference batches store and torch-fidelity computes."""
    x = (
        feats.double().cpu().numpy()
        if torch.is_tensor(feats)
        else np.asarray(feats, dtype=np.float64)
    )
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"feature statistics need (N >= 2, D) features, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """FID from statistics, in float64: ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrt(s1 s2))``,
    the last trace as the sum of the square roots of the eigenvalues of ``s1 s2`` (real parts),
    as torch-fidelity and torchmetrics compute it; scipy's ``sqrtm`` (ADM's evaluator) gives
    the same trace."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs "
                         f"{s2.shape} (features of another network or layer?)")  # fmt: skip
    diff = mu1 - mu2
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of two feature sets (float64 statistics, :func:`frechet_distance`)."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


class _Passthrough(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.num_features = n

    def forward(self, x):
        return x


def fid_kid(real_feats: torch.Tensor, fake_feats: torch.Tensor, *, seed: int = 0, kid_subsets: int = 100,
            kid_subset_size: int = 1000) -> dict[str, float]:  # fmt: skip
    """FID and KID (mean, std) of generated against real features, deterministic given ``seed``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real_feats), len(fake_feats))
    if n < 2:
        raise ValueError("FID/KID need at least 2 real and 2 generated images")
    kid = KernelInceptionDistance(feature=_Passthrough(real_feats.shape[1]), subsets=kid_subsets,
                                  subset_size=min(kid_subset_size, n), sync_on_compute=False)  # fmt: skip
    kid.update(real_feats, real=True)
    kid.update(fake_feats, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": fid_from_features(real_feats, fake_feats), "kid": float(kid_mean),
            "kid_std": float(kid_std)}  # fmt: skip


def inception_score(
    fake_logits: torch.Tensor, *, seed: int = 0, splits: int = 10
) -> dict[str, float]:
    """IS (mean, std over ``splits``) of generated images' logits; needs no real images."""
    from torchmetrics.image.inception import InceptionScore

    inc = InceptionScore(
        feature=_Passthrough(fake_logits.shape[1]),
        splits=min(splits, len(fake_logits)),
        sync_on_compute=False,
    )
    inc.update(fake_logits)
    with torch.random.fork_rng(devices=[]):  # IS permutes the samples with the global generator
        torch.manual_seed(seed)
        is_mean, is_std = inc.compute()
    return {"is": float(is_mean), "is_std": float(is_std)}


def score(real_feats: torch.Tensor, fake_feats: torch.Tensor, fake_logits: torch.Tensor, *, seed: int = 0,
          kid_subsets: int = 100, kid_subset_size: int = 1000, is_splits: int = 10) -> dict[str, float]:  # fmt: skip
    """FID, IS (mean, std) and KID (mean, std) through torchmetrics, deterministic given ``seed``."""
    out = fid_kid(
        real_feats, fake_feats, seed=seed, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size
    )
    return {**out, **inception_score(fake_logits, seed=seed, splits=is_splits)}


def _nn_distances(x: torch.Tensor, ref: torch.Tensor, k: int = 1, *, skip_self: bool = False,
                  chunk: int = 2048) -> torch.Tensor:  # fmt: skip
    """Distance of each row of ``x (N, F)`` to its k-th nearest row of ``ref (R, F)`` (float64, on
    ``ref``'s device, returned on the CPU; ``skip_self``: ``x`` is ``ref``, so each row's zero
    distance to itself is not counted)."""
    x, ref = x.to(ref.device).double(), ref.double()
    chunk = max(1, min(chunk, (1 << 25) // max(1, len(ref))))  # a (chunk, R) block of <= 256 MiB
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i : i + chunk], ref)  # (n, R)
        out.append(d.topk(k + int(skip_self), dim=1, largest=False).values[:, -1])
    return torch.cat(out).cpu()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """k-NN manifold precision and recall (Kynkaanniemi et al. 2019): a real (fake) image's
    manifold ball has the radius of its k-th nearest real (fake) neighbour; precision is the
    fraction of fakes inside some real ball, recall the fraction of reals inside some fake ball.
    Computed on ``real``'s device (a GPU makes the k-NN searches of large sets take seconds)."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(
            f"precision/recall with k = {k} need more than {k} real and generated images"
        )

    def covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
        hits, radii = [], radii.to(centres.device)
        for i in range(0, len(points), 2048):
            d = torch.cdist(
                points[i : i + 2048].to(centres.device).double(), centres.double()
            )  # (n, R)
            hits.append((d <= radii[None]).any(dim=1))
        return float(torch.cat(hits).double().mean())

    r_real = _nn_distances(real, real, k, skip_self=True)
    r_fake = _nn_distances(fake, fake, k, skip_self=True)
    return {"precision": covered(fake, real, r_real), "recall": covered(real, fake, r_fake)}


def memorisation(
    samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor
) -> dict[str, float]:
    """How much closer samples sit to the training images than fresh real images do, in one
    feature space. For each sample the distance to its nearest training image, against the same
    for held-out real images (which the model never saw):

    * ``memorisation``: median sample distance over median held-out distance; about 1 for a model
      that generalises, below 1 for one that copies its training images (0 for exact copies).
    * ``copy_z``: the Mann-Whitney U test of the two distance sets as a z-score (the global form
      of the data-copying test of Meehan et al. 2020); strongly negative means copying,
      positive means samples are farther from the training set than real images are.
    * ``copy_fraction``: fraction of samples nearer to a training image than the 1st percentile
      of held-out images are.
    """
    from scipy.stats import mannwhitneyu

    d_s = _nn_distances(samples, train).numpy()
    d_h = _nn_distances(heldout, train).numpy()
    u = mannwhitneyu(d_s, d_h, alternative="two-sided").statistic
    n, m = len(d_s), len(d_h)
    z = (u - n * m / 2) / np.sqrt(n * m * (n + m + 1) / 12)
    return {"memorisation": float(np.median(d_s) / np.median(d_h)), "copy_z": float(z),
            "copy_fraction": float((d_s < np.percentile(d_h, 1)).mean())}  # fmt: skip


@torch.no_grad()
def bits_per_token(model, store, *, batch_size: int = 256, device="cpu", view: int = 0) -> float:
    """Mean validation NLL in bits per token of ``model`` on a code store (one view)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(store), batch_size):
        codes = torch.from_numpy(
            np.asarray(store.codes[i : i + batch_size, view]).astype(np.int64)
        ).to(device)
        labels = torch.from_numpy(store.labels[i : i + batch_size]).to(device)
        logits = model(codes, labels)
        total += F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="sum").item()
        n += codes.numel()
    model.train(was)
    return total / max(n, 1) / math.log(2)


# --------------------------------------------------------------------------- tokenizer and classifier


@torch.no_grad()
def tokenizer_batch_stats(tok: VQTokenizer, x: torch.Tensor, content=None) -> dict:
    """Sums over one batch in eval mode: PSNR (over ``content(...)`` when given, e.g. the
    dataset's original pixels), image count and the code histogram."""
    was = tok.training
    tok.eval()
    zq, codes, _ = tok.quantize(x)
    recon = tok.decoder(zq).clamp(-1, 1)
    tok.train(was)
    a, b = (content(recon), content(x)) if content else (recon, x)
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return {"psnr_sum": (10 * torch.log10(4.0 / mse)).sum().item(), "n": len(x),
            "hist": torch.bincount(codes.flatten().cpu(), minlength=tok.codebook_size)}  # fmt: skip


def reduce_tokenizer_stats(stats: dict, K: int) -> dict[str, float]:
    """Batch sums of :func:`tokenizer_batch_stats` (lists per key) -> PSNR, codebook usage and
    perplexity."""
    hist = torch.stack(stats["hist"]).sum(0).double()
    p = hist / hist.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return {"psnr": sum(stats["psnr_sum"]) / sum(stats["n"]),
            "codebook_usage": (hist > 0).double().mean().item(), "perplexity": ent.exp().item()}  # fmt: skip


@torch.no_grad()
def evaluate_tokenizer(
    tok: VQTokenizer, dataset, batch_size: int = 512, device="cpu"
) -> dict[str, float]:
    """PSNR (over the dataset's original pixels), codebook usage and perplexity on a split."""
    stats: dict[str, list] = {}
    content = getattr(dataset, "content", None)
    # a folder dataset's images that fail to decode come out as None; its collate drops them
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=getattr(dataset, "collate_fn", None)
    )
    for x, *_ in loader:
        if not len(x):
            continue
        for k, v in tokenizer_batch_stats(tok, x.to(device), content).items():
            stats.setdefault(k, []).append(v)
    return reduce_tokenizer_stats(stats, tok.codebook_size)


@torch.no_grad()
def classifier_accuracy(net: SmallCNN, dataset, device="cpu", batch_size: int = 1000) -> float:
    """Top-1 accuracy of the classifier on a dataset split."""
    net = net.to(device).eval()
    right = n = 0
    for x, y, *_ in DataLoader(
        dataset, batch_size=batch_size, collate_fn=getattr(dataset, "collate_fn", None)
    ):
        if not len(x):
            continue
        right += (net(x.to(device)).argmax(-1).cpu() == y).sum().item()
        n += len(y)
    return right / max(n, 1)


__all__ = [
    "ClassifierFeatures",
    "bits_per_token",
    "build_extractors",
    "classifier_accuracy",
    "describe_features",
    "evaluate_tokenizer",
    "extract_features",
    "feature_statistics",
    "load_adm_reference",
    "fid_from_features",
    "frechet_distance",
    "fid_kid",
    "find_inception_weights",
    "inception_score",
    "memorisation",
    "precision_recall",
    "reduce_tokenizer_stats",
    "reference_features",
    "score",
    "tokenizer_batch_stats",
]
