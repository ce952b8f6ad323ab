"""Checkpoints: their formats, the builders that write them, strict loaders, and atomic writes.

Every file movegen writes for a later command describes itself (``format``, package version,
config, the data it came from) and is loaded strictly: ``torch.load(weights_only=True)``, a
format check, ``load_state_dict(strict=True)``. A file of the wrong kind is a clear error, never
a guess.

=====================  ==========================  ============================================
format                 written by                  built / loaded with
=====================  ==========================  ============================================
``movegen.tokenizer``  ``movegen fit-tokenizer``   :func:`tokenizer_checkpoint` / :func:`load_tokenizer`
``movegen.model``      ``movegen fit``             :func:`model_checkpoint` / :func:`load_model`,
                                                   :func:`load_model_and_tokenizer`
``movegen.classifier`` ``movegen fit-classifier``  :func:`classifier_checkpoint` / :func:`load_classifier`
=====================  ==========================  ============================================

Files reach their final name only when complete (:func:`~movegen.files.atomic_path`, imported
here): a crash never leaves a half-written checkpoint, result or image grid that looks whole.

Imports run one way (DESIGN §6): this module imports only the model files (``model``,
``tokenizer``, ``classifier``); ``metrics``, ``lit``, ``evaluate``, ``report`` and ``cli`` import
it (and ``files``, the standard-library file helpers). It never imports Lightning, ``data`` or
``metrics``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .classifier import SmallCNN
from .files import atomic_path, atomic_write_text  # noqa: F401 (written from here too)
from .model import GPT, GPTConfig
from .tokenizer import TokenizerConfig, VQTokenizer

CKPT_FORMAT_TOKENIZER = "movegen.tokenizer/1"
CKPT_FORMAT_MODEL = "movegen.model/1"
CKPT_FORMAT_CLASSIFIER = "movegen.classifier/1"


def package_version() -> str:
    try:
        return version("movegen")
    except PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------- atomic writes


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def ensure_writable(folder: str | os.PathLike, what: str | None = None) -> None:
    """Raise now, before any long work, if files cannot be created in ``folder`` (which may not
    exist yet: its nearest existing ancestor must then take the new folders). ``what`` names
    the output in the message (e.g. ``"--out grid.png"``). Probes with a real temporary file, so
    read-only mounts and immutable folders are caught whatever the permission bits say (and a
    user who may write anyway is not refused). Creates nothing."""
    folder = Path(folder).expanduser().absolute()
    what = what or str(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FileExistsError(
            f"cannot write {what}: {existing} is a file, not a folder; choose another location"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".movegen-write-test-", dir=existing)
    except OSError as e:
        raise PermissionError(
            f"cannot write {what}: {existing} is not writable ({e.strerror or e}); "
            "choose a location you can write to"
        ) from None
    os.close(fd)
    os.remove(probe)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file_cached(path: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """:func:`sha256_file`, remembered in ``cache_dir`` under the file's resolved path with its
    size and modification time: a reference batch of gigabytes is hashed once, not at every
    evaluation, and hashed again as soon as it is replaced or touched. A cache that cannot be
    written costs only the hashing."""
    import json

    p = Path(path).resolve()
    st = p.stat()
    stamp = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = Path(cache_dir) / f"sha256-{hashlib.sha256(str(p).encode()).hexdigest()[:16]}.json"
    try:
        old = json.loads(memo.read_text())
        if isinstance(old, dict) and {k: old.get(k) for k in stamp} == stamp and old.get("sha256"):
            return old["sha256"]
    except (OSError, ValueError):
        pass
    sha = sha256_file(p)
    try:
        atomic_write_text(memo, json.dumps({**stamp, "sha256": sha}))
    except OSError:
        pass
    return sha


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int, min_tile: int = 64
) -> Path:
    """Write images ``(N, C, H, W)`` in [-1, 1] as one PNG grid (``nrow`` images per row),
    upscaled with nearest neighbours so that tiny images stay visible. Atomic."""
    from PIL import Image
    from torchvision.utils import make_grid

    x = images.detach().float().cpu().clamp(-1, 1)
    scale = max(1, -(-min_tile // x.shape[-1]))
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    # a mid-grey gap a tenth of a tile wide keeps white-on-black tiles from running together
    pad = max(2, x.shape[-1] // 10)
    grid = make_grid((x + 1) / 2, nrow=nrow, padding=pad, pad_value=0.5)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)


# --------------------------------------------------------------------------- builders


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: a view of a live parameter must not change after the checkpoint is built
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return _cpu_copy(module.state_dict())


def tokenizer_checkpoint(tok: VQTokenizer, *, dataset: dict, metrics: dict) -> dict:
    """The self-describing ``tokenizer.ckpt``: config, weights, the dataset it was trained on
    (name, size, fit) and its validation metrics."""
    return {
        "format": CKPT_FORMAT_TOKENIZER,
        "movegen_version": package_version(),
        "config": tok.config.to_dict(),
        "state_dict": _cpu_state(tok),
        "dataset": dataset,
        "metrics": metrics,
    }


def model_checkpoint(model: GPT, *, header: dict, train: dict, metrics: dict,
                     state_dict: dict[str, torch.Tensor] | None = None) -> dict:  # fmt: skip
    """The self-describing ``model.ckpt``: config, code-store header (tokenizer path and hash),
    training facts, metrics, package version. ``state_dict``: the weights when the module does
    not hold them whole (gathered from FSDP's shards); default: ``model.state_dict()``."""
    return {
        "format": CKPT_FORMAT_MODEL,
        "movegen_version": package_version(),
        "config": model.config.to_dict(),
        "state_dict": _cpu_state(model) if state_dict is None else _cpu_copy(state_dict),
        "code_store": header,
        "train": train,
        "metrics": metrics,
    }


def classifier_checkpoint(
    net: SmallCNN, *, dataset: str, image_size: int, fit: str, metrics: dict
) -> dict:
    """The self-describing ``classifier.ckpt``: architecture, weights, the dataset and image
    size it was trained on, and its accuracies."""
    return {
        "format": CKPT_FORMAT_CLASSIFIER,
        "movegen_version": package_version(),
        "hparams": net.hparams(),
        "state_dict": _cpu_state(net),
        "dataset": dataset,
        "image_size": int(image_size),
        "fit": fit,
        "metrics": metrics,
    }


# --------------------------------------------------------------------------- loaders


def load_checkpoint(path: str | os.PathLike, expected_format: str) -> dict:
    """Load a movegen checkpoint strictly (``weights_only=True``) and check what it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a movegen checkpoint (could not load it safely: {type(e).__name__}: {e})"
        ) from e
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != expected_format:
        raise ValueError(
            f"{path} is not a {expected_format.split('/')[0]} checkpoint (format {fmt!r}); "
            f"pass the file written by the matching movegen command"
        )
    return ckpt


def load_tokenizer(path: str | os.PathLike, device="cpu") -> tuple[VQTokenizer, dict]:
    """A trained tokenizer from ``tokenizer.ckpt`` (strict), in eval mode, and its checkpoint dict."""
    ckpt = load_checkpoint(path, CKPT_FORMAT_TOKENIZER)
    tok = VQTokenizer(TokenizerConfig(**ckpt["config"]))
    tok.load_state_dict(ckpt["state_dict"], strict=True)
    return tok.to(device).eval(), ckpt


def load_model(path: str | os.PathLike, device="cpu") -> tuple[GPT, dict]:
    """A trained AR model from ``model.ckpt`` (strict, ``weights_only``), in eval mode."""
    ckpt = load_checkpoint(path, CKPT_FORMAT_MODEL)
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.to(device).eval(), ckpt


def load_classifier(path: str | os.PathLike) -> tuple[SmallCNN, dict]:
    """The evaluation classifier from ``classifier.ckpt`` (strict), in eval mode, on the CPU."""
    ckpt = load_checkpoint(path, CKPT_FORMAT_CLASSIFIER)
    net = SmallCNN(**ckpt["hparams"])
    net.load_state_dict(ckpt["state_dict"], strict=True)
    return net.eval(), ckpt


def load_model_and_tokenizer(
    model_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None, device="cpu"
) -> tuple[GPT, dict, VQTokenizer, dict]:
    """A model and the tokenizer its codes came from: ``tokenizer_path``, else the path recorded
    in the model's code-store header. Refuses a tokenizer of another codebook size or grid, or
    one whose file hash differs from the recorded one. Returns ``(model, model checkpoint,
    tokenizer, tokenizer checkpoint)``; the latter gains the tokenizer's ``path`` and ``sha256``."""
    model, ckpt = load_model(model_path, device)
    recorded = ckpt["code_store"].get("tokenizer_path")
    path = tokenizer_path or recorded
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"tokenizer {path!r} (recorded in {model_path}) not found; pass --tokenizer DIR/tokenizer.ckpt"
        )
    tok, tck = load_tokenizer(path, device)
    if tok.codebook_size != model.config.vocab_size:
        raise ValueError(f"tokenizer {path} has codebook size {tok.codebook_size} but the model was trained "
                         f"on K = {model.config.vocab_size}; pass the tokenizer the codes came from")  # fmt: skip
    if tok.config.latent_size**2 != model.config.seq_len:
        raise ValueError(f"tokenizer {path} gives {tok.config.latent_size}^2 tokens per image; the model expects "
                         f"{model.config.seq_len}")  # fmt: skip
    want = ckpt["code_store"].get("tokenizer_sha256")
    if want and sha256_file(path) != want:
        raise ValueError(
            f"tokenizer {path} is not the one the model's codes came from (sha256 differs from "
            f"{want[:12]}..., recorded in {model_path}); its codes mean other things. Pass the "
            f"original tokenizer with --tokenizer (recorded path: {recorded})"
        )
    tck["path"], tck["sha256"] = str(Path(path).resolve()), want or sha256_file(path)
    return model, ckpt, tok, tck


__all__ = [
    "CKPT_FORMAT_CLASSIFIER",
    "CKPT_FORMAT_MODEL",
    "CKPT_FORMAT_TOKENIZER",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_text",
    "classifier_checkpoint",
    "ensure_writable",
    "load_checkpoint",
    "load_classifier",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_checkpoint",
    "package_version",
    "save_image_grid",
    "sha256_file",
    "tokenizer_checkpoint",
]
