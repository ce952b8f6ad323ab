"""Image datasets, the code store, and the DataModules that read it.

Named datasets (``load_dataset(name, split)``), all giving ``(image, label)`` with the image a
float tensor ``(C, S, S)`` in [-1, 1]:

=================  ==============================================  =====================
name               where it comes from                             splits (train/val/test)
=================  ==============================================  =====================
``digits``         scikit-learn's bundled 8x8 digits (embedded)    seeded stratified 80/10/10
``fashion-mnist``  Debian ``dataset-fashion-mnist`` or torchvision  55k / last 5k of train / 10k test
``mnist``          torchvision (``--data-root``)                   55k / last 5k of train / 10k test
``cifar10``        torchvision (``--data-root``)                   45k / last 5k of train / 10k test
``folder:<path>``  ImageFolder tree; ``<path>/train`` and          train / val / val
                   ``<path>/val`` when present, else one tree
                   split 95/5 (seeded)
=================  ==============================================  =====================

The code store is one directory written once by :func:`extract_codes`::

    codes.npy    [N, views, h*w]  uint16 when K <= 65536 (else int32), memory-mapped on read
    labels.npy   [N]              int64
    header.json  codebook size, h, w, views, classes, dataset, split, tokenizer path and sha256

It is built under a temporary name and renamed when complete, so a crash never leaves a
directory that has a ``header.json``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "folder:<path>")
SPLITS = ("train", "val", "test")
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
STORE_FORMAT = "movegen.codes/1"


# --------------------------------------------------------------------------- image datasets


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    native_size: int
    """Side of the images as stored (before padding/resizing)."""
    class_names: tuple[str, ...] = ()


class TensorImages(Dataset):
    """Images held in memory as uint8 ``(N, C, S, S)`` with int64 labels.

    ``image_size`` larger than the native size pads with the background (-1) symmetrically
    (``fit="pad"``) or resizes bilinearly (``fit="resize"``); :meth:`content` undoes the padding
    so metrics such as PSNR can be computed over the original pixels only.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DatasetInfo,
        *,
        image_size: int | None = None,
        fit: str = "pad",
        channels: int | None = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, S, S), got {images.dtype} {tuple(images.shape)}"
            )
        if fit not in ("pad", "resize"):
            raise ValueError(f"fit must be 'pad' or 'resize', got {fit!r}")
        self.images, self.labels, self.info = images, labels.long(), info
        self.image_size = image_size or images.shape[-1]
        self.fit = fit
        self.channels = channels or images.shape[1]
        if self.channels not in (images.shape[1], 3) or (
            self.channels == 3 and images.shape[1] not in (1, 3)
        ):
            raise ValueError(
                f"cannot turn {images.shape[1]}-channel images into {self.channels} channels"
            )
        native = images.shape[-1]
        if fit == "pad" and (self.image_size < native or (self.image_size - native) % 2):
            raise ValueError(
                f"fit='pad' needs image_size >= {native} with an even difference, got {self.image_size}; "
                "use fit='resize'"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def pad(self) -> int:
        return (self.image_size - self.images.shape[-1]) // 2 if self.fit == "pad" else 0

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., C, S, S)`` -> float ``(..., C', S', S')`` in [-1, 1]."""
        x = x.float() / 127.5 - 1.0
        if self.channels != x.shape[-3]:
            x = x.expand(*x.shape[:-3], self.channels, *x.shape[-2:])
        native = x.shape[-1]
        if self.image_size != native:
            if self.fit == "pad":
                x = F.pad(x, (self.pad,) * 4, value=-1.0)
            else:
                lead = x.shape[:-3]
                x = F.interpolate(
                    x.reshape(-1, *x.shape[-3:]),
                    size=self.image_size,
                    mode="bilinear",
                    antialias=True,
                )
                x = x.reshape(*lead, *x.shape[-3:]).clamp(-1, 1)
        return x

    def content(self, x: torch.Tensor) -> torch.Tensor:
        """Crop the padding added by ``fit='pad'`` (identity otherwise)."""
        p = self.pad
        return x[..., p : x.shape[-2] - p, p : x.shape[-1] - p] if p else x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def _stratified_split(
    labels: np.ndarray, split: str, seed: int = 0, fractions=(0.8, 0.1, 0.1)
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_tr = int(round(fractions[0] * len(idx)))
        n_va = int(round(fractions[1] * len(idx)))
        out["train"] += idx[:n_tr].tolist()
        out["val"] += idx[n_tr : n_tr + n_va].tolist()
        out["test"] += idx[n_tr + n_va :].tolist()
    return np.sort(np.asarray(out[split], dtype=np.int64))


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = _stratified_split(d.target, split)
    imgs = np.round(d.images[idx] * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
    info = DatasetInfo(name="digits", num_classes=10, channels=1, native_size=8,
                       class_names=tuple(str(i) for i in range(10)))  # fmt: skip
    return torch.from_numpy(imgs), torch.from_numpy(d.target[idx].astype(np.int64)), info


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()
    if arr.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}"
        )
    return arr.reshape(shape)


def _find_idx_files(dirs: Iterable[Path]) -> Path | None:
    for d in dirs:
        for suffix in ("", ".gz"):
            if (d / f"train-images-idx3-ubyte{suffix}").exists() and (
                d / f"t10k-images-idx3-ubyte{suffix}"
            ).exists():
                return d
    return None


def _mnist_like(
    name: str, split: str, data_root: str | None
) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    tv_name = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[name]
    dirs = [Path(p) for p in (FASHION_DIRS if name == "fashion-mnist" else ())]
    if data_root:
        dirs = [Path(data_root), Path(data_root) / tv_name / "raw", *dirs]
    found = _find_idx_files(dirs)
    train = split in ("train", "val")
    if found is not None:
        suffix = ".gz" if (found / "train-images-idx3-ubyte.gz").exists() else ""
        stem = "train" if train else "t10k"
        images = _read_idx(found / f"{stem}-images-idx3-ubyte{suffix}")
        labels = _read_idx(found / f"{stem}-labels-idx1-ubyte{suffix}").astype(np.int64)
    else:
        import torchvision

        root = data_root or os.path.expanduser("~/.cache/movegen/data")
        try:
            ds = getattr(torchvision.datasets, tv_name)(root, train=train, download=True)
        except Exception as e:  # no network, no files
            how = (
                "install Debian's package (`apt-get install -y dataset-fashion-mnist`, files in "
                "/usr/share/datasets/fashion-mnist/) or "
                if name == "fashion-mnist"
                else ""
            )
            raise FileNotFoundError(
                f"{name} not found: looked in {', '.join(map(str, dirs)) or '(no local folders)'} and "
                f"torchvision's download into {root} failed ({type(e).__name__}: {e}). To fix: {how}"
                f"put the idx files (train-images-idx3-ubyte[.gz], ...) in a folder given by --data-root, "
                "or run once with internet so torchvision can download them."
            ) from e
        images, labels = ds.data.numpy(), ds.targets.numpy().astype(np.int64)
    if train:
        sl = slice(0, 55_000) if split == "train" else slice(55_000, None)
        images, labels = images[sl], labels[sl]
    classes = FASHION_CLASSES if name == "fashion-mnist" else tuple(str(i) for i in range(10))
    info = DatasetInfo(name=name, num_classes=10, channels=1, native_size=28, class_names=classes)
    return torch.from_numpy(np.ascontiguousarray(images))[:, None], torch.from_numpy(labels), info


def _cifar10(split: str, data_root: str | None) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    import torchvision

    root = data_root or os.path.expanduser("~/.cache/movegen/data")
    try:
        ds = torchvision.datasets.CIFAR10(root, train=split != "test", download=True)
    except Exception as e:
        raise FileNotFoundError(
            f"cifar10 not found under {root} and could not be downloaded ({e}); put torchvision's "
            "cifar-10-batches-py folder under --data-root"
        ) from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    if split != "test":
        sl = slice(0, 45_000) if split == "train" else slice(45_000, None)
        images, labels = images[sl], labels[sl]
    info = DatasetInfo(
        name="cifar10", num_classes=10, channels=3, native_size=32, class_names=tuple(ds.classes)
    )
    return images, labels, info


class FolderImages(Dataset):
    """An ImageFolder tree read lazily; unreadable files are counted in ``self.failures``
    and come out as ``None`` so :func:`collate_skip_none` can drop them."""

    def __init__(self, root: Path, split: str, image_size: int, channels: int = 3):
        import torchvision

        self.image_size, self.channels = image_size, channels
        sub = root / ("train" if split == "train" else "val")
        tree = sub if sub.is_dir() else root
        if not tree.is_dir():
            raise FileNotFoundError(f"image folder {tree} does not exist")
        self.tree = torchvision.datasets.ImageFolder(str(tree), loader=lambda p: p)
        self.indices = np.arange(len(self.tree))
        if tree == root:  # one tree: a seeded 95/5 split, test == val
            rng = np.random.default_rng(0)
            perm = rng.permutation(len(self.tree))
            n_val = max(1, len(perm) // 20)
            self.indices = np.sort(perm[n_val:] if split == "train" else perm[:n_val])
        self.failures: list[str] = []
        self.info = DatasetInfo(name=f"folder:{root}", num_classes=len(self.tree.classes), channels=channels,
                                native_size=image_size, class_names=tuple(self.tree.classes))  # fmt: skip

    def __len__(self) -> int:
        return len(self.indices)

    def content(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.tree.samples[int(self.indices[i])]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                w, h = im.size
                s = min(w, h)  # centre crop to a square, then resize
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
                x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
        except Exception as e:  # corrupt or unreadable: count it, never drop it silently
            self.failures.append(f"{path}: {type(e).__name__}")
            log.warning("unreadable image %s (%s)", path, e)
            return None
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return x.float() / 127.5 - 1.0, label


def collate_skip_none(batch):
    """Default collation that drops ``None`` items (unreadable images) and reports how many."""
    kept = [b for b in batch if b is not None]
    images = torch.stack([b[0] for b in kept]) if kept else torch.empty(0)
    labels = torch.tensor([b[1] for b in kept], dtype=torch.int64)
    return images, labels, len(batch) - len(kept)


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_root: str | None = None,
    image_size: int | None = None,
    fit: str = "pad",
    channels: int | None = None,
) -> TensorImages | FolderImages:
    """A named dataset split; see the module docstring for names and splits."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name.startswith("folder:"):
        return FolderImages(Path(name.split(":", 1)[1]), split, image_size or 256, channels or 3)
    if name == "digits":
        images, labels, info = _digits(split)
    elif name in ("fashion-mnist", "mnist"):
        images, labels, info = _mnist_like(name, split, data_root)
    elif name == "cifar10":
        images, labels, info = _cifar10(split, data_root)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return TensorImages(images, labels, info, image_size=image_size, fit=fit, channels=channels)


# --------------------------------------------------------------------------- code store


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a finished directory into place; an existing store is removed only once the new
    one is complete."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        old = out.with_name(out.name + f".old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_code_store(
    out: str | os.PathLike,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    num_items: int,
    views: int,
    h: int,
    w: int,
    header: dict,
    overwrite: bool = False,
) -> Path:
    """Write a code store from ``(codes [n, views, h*w], labels [n])`` batches, atomically.

    ``num_items`` bounds the array; fewer items (e.g. unreadable images skipped) shrink it.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    K = int(header["codebook_size"])
    dtype = code_dtype(K)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        codes = np.lib.format.open_memmap(
            tmp / "codes.partial.npy", mode="w+", dtype=dtype, shape=(num_items, views, h * w)
        )
        labels = np.empty(num_items, dtype=np.int64)
        n = 0
        for c, y in batches:
            if c.shape[1:] != (views, h * w):
                raise ValueError(f"code batch has shape {c.shape}, expected (n, {views}, {h * w})")
            if c.size and (c.min() < 0 or c.max() >= K):
                raise ValueError(f"codes out of range [0, {K}): min {c.min()}, max {c.max()}")
            codes[n : n + len(c)] = c
            labels[n : n + len(c)] = y
            n += len(c)
        codes.flush()
        del codes
        final = np.load(tmp / "codes.partial.npy", mmap_mode="r")[:n]
        if n != num_items:  # shrink: rewrite the kept rows
            np.save(tmp / "codes.npy", np.ascontiguousarray(final))
            del final
            os.remove(tmp / "codes.partial.npy")
        else:
            del final
            os.replace(tmp / "codes.partial.npy", tmp / "codes.npy")
        np.save(tmp / "labels.npy", labels[:n])
        full = {"format": STORE_FORMAT, "num_items": n, "views": views, "h": h, "w": w,
                "dtype": dtype.name, **header}  # fmt: skip
        # header.json last: its presence marks a complete store
        (tmp / "header.json").write_text(json.dumps(full, indent=2, sort_keys=True))
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class CodeStore:
    """A code store on disk, memory-mapped. ``codes[i]`` is ``[views, h*w]``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        hp = self.path / "header.json"
        if not hp.exists():
            raise FileNotFoundError(
                f"{self.path} is not a code store (no header.json); create one with "
                "`movegen extract-codes --tokenizer DIR/tokenizer.ckpt --data NAME --split SPLIT --out CODES`"
            )
        self.header = json.loads(hp.read_text())
        if self.header.get("format") != STORE_FORMAT:
            raise ValueError(
                f"{hp} has format {self.header.get('format')!r}, expected {STORE_FORMAT!r}"
            )
        self.codes = np.load(self.path / "codes.npy", mmap_mode="r")
        self.labels = np.load(self.path / "labels.npy")
        if len(self.codes) != len(self.labels) or len(self.codes) != self.header["num_items"]:
            raise ValueError(
                f"{self.path}: codes ({len(self.codes)}) and labels ({len(self.labels)}) disagree"
            )

    codebook_size = property(lambda self: int(self.header["codebook_size"]))
    num_classes = property(lambda self: int(self.header["num_classes"]))
    seq_len = property(lambda self: int(self.header["h"]) * int(self.header["w"]))
    views = property(lambda self: int(self.header["views"]))

    def __len__(self) -> int:
        return len(self.labels)


def split_holdout(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) index split."""
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    return np.sort(perm[k:]), np.sort(perm[:k])


@torch.no_grad()
def extract_codes(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    out: str | os.PathLike,
    *,
    codebook_size: int,
    num_classes: int,
    header: dict,
    views: int = 2,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every image of ``dataset`` (and its horizontal flip when ``views == 2``) with
    ``encode: images (B, C, H, W) -> codes (B, h, w)`` into a code store at ``out``."""
    from tqdm.auto import tqdm

    if views not in (1, 2):
        raise ValueError(
            f"views must be 1 (original) or 2 (original + horizontal flip), got {views}"
        )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_none)
    x0 = next(x for x, _, _ in loader if len(x))
    h, w = encode(x0[:1].to(device)).shape[-2:]
    skipped = 0

    def batches():
        nonlocal skipped
        for x, y, bad in tqdm(loader, desc="extract codes", disable=not progress, unit="batch"):
            skipped += bad
            if not len(x):
                continue
            x = x.to(device)
            vs = [encode(x)]
            if views == 2:
                vs.append(encode(torch.flip(x, dims=[-1])))
            c = torch.stack([v.reshape(len(x), -1) for v in vs], dim=1)  # (n, views, h*w)
            yield c.cpu().numpy().astype(code_dtype(codebook_size)), y.numpy()
        if skipped:  # read by write_code_store after the last batch, before it writes header.json
            full["skipped_unreadable"] = skipped

    full = {"codebook_size": codebook_size, "num_classes": num_classes, **header}

    path = write_code_store(out, batches(), num_items=len(dataset), views=views, h=int(h), w=int(w),
                            header=full, overwrite=overwrite)  # fmt: skip
    if skipped:
        log.warning("%d unreadable images were skipped and are not in the store", skipped)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success the file is synced to disk, given the
    usual permissions (0666 & ~umask; mkstemp makes 0600) and renamed to ``path``, else removed.
    A crash never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before it takes the final name
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


__all__ = [
    "CodeStore",
    "DatasetInfo",
    "atomic_torch_save",
    "atomic_write_text",
    "extract_codes",
    "load_dataset",
    "sha256_file",
    "split_holdout",
    "write_code_store",
]


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
