"""Image datasets and the DataModule that feeds them to the tokenizer and the classifier.

Named datasets (``load_dataset(name, split)``), all giving ``(image, label)`` with the image a
float tensor ``(C, S, S)`` in [-1, 1]:

=================  ==============================================  =====================
name               where it comes from                             splits (train/val/test)
=================  ==============================================  =====================
``digits``         scikit-learn's bundled 8x8 digits (embedded)    seeded stratified 80/10/10
``fashion-mnist``  Debian ``dataset-fashion-mnist`` or torchvision  55k / last 5k of train / 10k test
``mnist``          torchvision (``--data.root``)                   55k / last 5k of train / 10k test
``cifar10``        torchvision (``--data.root``)                   45k / last 5k of train / 10k test
``folder:<path>``  ImageFolder tree; ``<path>/train`` and          train / val / val
                   ``<path>/val`` when present, else one tree
                   split 95/5 (seeded)
=================  ==============================================  =====================

Imports: torch, Lightning (for :class:`ImageDataModule`), the data libraries; nothing else
from movegen.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
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


# --------------------------------------------------------------------------- datasets


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


TORCHVISION_NAMES = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def _idx_dirs(name: str, data_root: str | None) -> list[Path]:
    """Where the idx files of (fashion-)mnist are looked for, in order."""
    dirs = [Path(p) for p in (FASHION_DIRS if name == "fashion-mnist" else ())]
    if data_root:
        dirs = [Path(data_root), Path(data_root) / TORCHVISION_NAMES[name] / "raw", *dirs]
    return dirs


def _mnist_like(
    name: str, split: str, data_root: str | None
) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    tv_name = TORCHVISION_NAMES[name]
    dirs = _idx_dirs(name, data_root)
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
                f"put the idx files (train-images-idx3-ubyte[.gz], ...) in a folder given by --data.root, "
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
            "cifar-10-batches-py folder under --data.root"
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


def collate_skip_none(batch):
    """Default collation that drops ``None`` items (unreadable images) and reports how many."""
    kept = [b for b in batch if b is not None]
    images = torch.stack([b[0] for b in kept]) if kept else torch.empty(0)
    labels = torch.tensor([b[1] for b in kept], dtype=torch.int64)
    return images, labels, len(batch) - len(kept)


def _folder_tree(root: Path, split: str) -> Path:
    """The tree a split of ``folder:<root>`` reads: ``root/train`` or ``root/val`` when present,
    else ``root`` itself (split 95/5)."""
    sub = root / ("train" if split == "train" else "val")
    return sub if sub.is_dir() else root


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot be an image (None when its header reads): the cheap check (no
    decoding) that catches empty, truncated-to-nothing and non-image files."""
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path):  # opening parses the header, decodes nothing
            pass
    except Exception as e:  # (PIL's messages repeat the path)
        return getattr(e, "strerror", None) or type(e).__name__
    return None


class FolderImages(Dataset):
    """An ImageFolder tree read lazily.

    Every file's header is checked once when the split is built: unreadable files (empty, not
    an image) are left out of the split, counted in ``self.failures`` and named in one warning;
    a split with no readable image is a clear error. A file that fails later, while decoding,
    comes out as ``None`` (and is counted too), so loaders use :func:`collate_skip_none`
    (``self.collate_fn``)."""

    collate_fn = staticmethod(collate_skip_none)

    def __init__(self, root: Path, split: str, image_size: int, channels: int = 3):
        import torchvision

        self.image_size, self.channels = image_size, channels
        tree = _folder_tree(root, split)
        if not tree.is_dir():
            raise FileNotFoundError(f"image folder {tree} does not exist")
        self.tree = torchvision.datasets.ImageFolder(str(tree), loader=lambda p: p)
        indices = np.arange(len(self.tree))
        if tree == root:  # one tree: a seeded 95/5 split, test == val
            rng = np.random.default_rng(0)
            perm = rng.permutation(len(self.tree))
            n_val = max(1, len(perm) // 20)
            indices = np.sort(perm[n_val:] if split == "train" else perm[:n_val])
        self.failures: list[str] = []
        self.indices = self._readable(indices, tree, split)
        self.info = DatasetInfo(name=f"folder:{root}", num_classes=len(self.tree.classes), channels=channels,
                                native_size=image_size, class_names=tuple(self.tree.classes))  # fmt: skip

    def _readable(self, indices: np.ndarray, tree: Path, split: str) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        paths = [self.tree.samples[int(i)][0] for i in indices]
        with ThreadPoolExecutor(min(16, (os.cpu_count() or 1) * 2)) as pool:
            why = list(pool.map(_unreadable, paths))
        bad = [f"{p} ({w})" for p, w in zip(paths, why) if w is not None]
        if len(bad) == len(paths):
            raise ValueError(
                f"no readable image in the {split} split of {tree}: all {len(paths)} files are "
                f"unreadable, e.g. {'; '.join(bad[:3])}. Replace or remove them"
            )
        if bad:
            self.failures += bad
            log.warning("%d of %d images of the %s split of %s are unreadable and left out: %s%s",
                        len(bad), len(paths), split, tree, "; ".join(bad[:5]),
                        f"; ... ({len(bad) - 5} more)" if len(bad) > 5 else "")  # fmt: skip
        return indices[[w is None for w in why]]

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
            self.failures.append(f"{path} ({type(e).__name__})")
            log.warning("unreadable image %s (%s); left out of its batch", path, e)
            return None
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return x.float() / 127.5 - 1.0, label


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


def _file_stats(folder: Path, pattern: str = "*") -> list[str]:
    """``relative path, size, mtime`` of every file under ``folder`` matching ``pattern``, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if p.match(pattern):
                st = p.stat()
                out.append(f"{p.relative_to(folder)}\t{st.st_size}\t{st.st_mtime_ns}")
    return out


def dataset_fingerprint(name: str, split: str, root: str | None = None) -> str:
    """A short hash of what a dataset split is made of, cheap to compute (no image is decoded).
    Cached reference features are keyed on it, so features of data that changed are never reused.

    * ``folder:<path>``: the split's tree: every file's relative path, size and mtime.
    * ``digits``: scikit-learn's version and a hash of its arrays.
    * ``fashion-mnist``, ``mnist``, ``cifar10``: the names, sizes and mtimes of the source files
      the loader would read (from ``root`` or the usual places).
    """
    h = hashlib.sha256(f"{split}\n".encode())
    if not name.startswith("folder:"):  # (a folder is named by its resolved tree below)
        h.update(f"{name}\n".encode())
    if name.startswith("folder:"):
        tree = _folder_tree(Path(name.split(":", 1)[1]), split)
        h.update(f"{tree.resolve()}\n".encode())
        h.update("\n".join(_file_stats(tree) if tree.is_dir() else ["(missing)"]).encode())
    elif name == "digits":
        import sklearn
        from sklearn.datasets import load_digits

        d = load_digits()
        h.update(sklearn.__version__.encode())
        h.update(
            np.ascontiguousarray(d.images).tobytes() + np.ascontiguousarray(d.target).tobytes()
        )
    elif name in TORCHVISION_NAMES:
        cache = Path(root or os.path.expanduser("~/.cache/movegen/data")) / TORCHVISION_NAMES[name]
        found = _find_idx_files([*_idx_dirs(name, root), cache / "raw"])
        if found is not None:
            h.update(f"{found.resolve()}\n".encode())
            h.update("\n".join(_file_stats(found, "*-idx?-ubyte*")).encode())
    elif name == "cifar10":
        folder = Path(root or os.path.expanduser("~/.cache/movegen/data")) / "cifar-10-batches-py"
        if folder.is_dir():
            h.update("\n".join(_file_stats(folder)).encode())
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- DataModule


class ImageDataModule(L.LightningDataModule):
    """A named image dataset (see :func:`load_dataset`) as train/val loaders."""

    def __init__(
        self,
        name: str = "digits",
        root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        fit: Literal["pad", "resize"] = "pad",
        image_size: int | None = None,
        channels: int | None = None,
    ):
        """
        Args:
            name: dataset name: digits, fashion-mnist, mnist, cifar10 or folder:<path>.
            root: where torchvision datasets live (or the idx files of (fashion-)mnist).
            batch_size: images per batch.
            num_workers: DataLoader workers.
            fit: how images reach the tokenizer's size: 'pad' (with background) or 'resize'.
            image_size: image side; defaults to the tokenizer's image_size.
            channels: image channels; defaults to the tokenizer's.
        """
        super().__init__()
        self.name, self.root, self.batch_size = name, root, batch_size
        self.num_workers, self.fit, self.image_size, self.channels = (
            num_workers,
            fit,
            image_size,
            channels,
        )

    def dataset(self, split: str):
        return load_dataset(self.name, split, data_root=self.root, image_size=self.image_size,
                            fit=self.fit, channels=self.channels)  # fmt: skip

    def setup(self, stage: str | None = None):
        if not hasattr(self, "train_set"):
            self.train_set = self.dataset("train")
            self.val_set = self.dataset("val")

    def _loader(self, ds, shuffle: bool):
        # batches are (images, labels, unreadable count): a folder image that fails to decode
        # is left out of its batch and counted (the steps read batch[:2])
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=shuffle and len(ds) > self.batch_size, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_skip_none)  # fmt: skip

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)


__all__ = [
    "DATASETS",
    "FASHION_DIRS",
    "SPLITS",
    "DatasetInfo",
    "FolderImages",
    "ImageDataModule",
    "TensorImages",
    "collate_skip_none",
    "dataset_fingerprint",
    "load_dataset",
]
