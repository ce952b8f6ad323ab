"""The code store (pre-extracted tokenizer codes) and the DataModule that trains on it.

The code store is one directory written once by :func:`extract_codes`::

    codes.npy    [N, views, h*w]  uint16 when K <= 65536 (else int32), memory-mapped on read
    labels.npy   [N]              int64
    header.json  codebook size, h, w, views, classes, dataset, split, tokenizer path and sha256

It is built under a temporary name and renamed when complete, so a crash never leaves a
directory that has a ``header.json``.

Imports: torch, Lightning (for :class:`CodeDataModule`), ``data.images`` (the collate function
that skips unreadable images) and ``model`` (the config a store is checked against).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..model import GPTConfig
from .images import collate_skip_none

log = logging.getLogger(__name__)

STORE_FORMAT = "movegen.codes/1"


# --------------------------------------------------------------------------- the store


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
                "`movegen extract-codes --tokenizer DIR/tokenizer.ckpt --data.name NAME --split SPLIT --out CODES`"
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
    failures = getattr(dataset, "failures", [])  # a folder's files already left out, then more
    skipped = len(failures)
    x0 = next((x for x, _, _ in loader if len(x)), None)
    if x0 is None:
        raise ValueError(f"no readable image in the dataset to encode ({len(dataset)} items); "
                         f"unreadable: {'; '.join(failures[:3]) or 'none named'}")  # fmt: skip
    h, w = encode(x0[:1].to(device)).shape[-2:]

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
        log.warning("%d unreadable images were skipped and are not in the store: %s%s", skipped,
                    "; ".join(failures[:5]), " ..." if len(failures) > 5 else "")  # fmt: skip
    return path


# --------------------------------------------------------------------------- DataModule


class FlatViews(Dataset):
    """Every (item, view) pair of a code store as one index: ``i -> (codes[i // V, i % V], label)``.
    A seeded sampler over this set picks a random view per sample deterministically."""

    def __init__(self, store: CodeStore, indices: np.ndarray, views: int | None = None):
        self.store, self.indices = store, np.asarray(indices)
        self.views = store.views if views is None else views

    def __len__(self) -> int:
        return len(self.indices) * self.views

    def __getitem__(self, i: int):
        j, v = int(self.indices[i // self.views]), i % self.views
        return torch.from_numpy(self.store.codes[j, v].astype(np.int64)), int(self.store.labels[j])


class ViewSampler(torch.utils.data.Sampler):
    """Each epoch: every item once, in a seeded random order, each with a random view; yields
    :class:`FlatViews` indices ``item * views + view``. The same seed gives the same order for
    every arm (model init does not touch this generator)."""

    def __init__(self, n_items: int, views: int, seed: int = 0):
        self.n, self.views, self.seed, self.epoch = n_items, views, seed, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1  # a fresh order next time even if nobody calls set_epoch
        order = torch.randperm(self.n, generator=g)
        view = torch.randint(self.views, (self.n,), generator=g)
        return iter((order * self.views + view).tolist())


class CodeDataModule(L.LightningDataModule):
    """A code store as training data (a random view per sample) and held-out validation codes
    (view 0): either a separate store (``val_codes``) or a seeded fraction of the training store."""

    def __init__(
        self,
        codes: str = "",
        val_codes: str | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            codes: code store of the training split (``movegen extract-codes``).
            val_codes: code store of held-out codes; default: hold out ``val_fraction`` of ``codes``.
            val_fraction: fraction held out when ``val_codes`` is not given.
            batch_size: sequences per batch (per device).
            num_workers: DataLoader workers.
            seed: seed of the held-out split and of the data order (the same for every arm).
        """
        super().__init__()
        self.codes, self.val_codes, self.val_fraction = codes, val_codes, val_fraction
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.store: CodeStore | None = None

    def prepare(self) -> None:
        if self.store is not None:
            return
        if not self.codes:
            raise ValueError(
                "no code store given: pass --data.codes CODES (from `movegen extract-codes`)"
            )
        self.store = CodeStore(self.codes)
        if self.val_codes:
            self.val_store = CodeStore(self.val_codes)
            for key in ("codebook_size", "h", "w", "tokenizer_sha256"):
                if self.val_store.header.get(key) != self.store.header.get(key):
                    raise ValueError(f"val_codes {self.val_codes} differs from codes in {key!r}: "
                                     f"{self.val_store.header.get(key)} vs {self.store.header.get(key)}")  # fmt: skip
            self.train_idx, self.val_idx = (
                np.arange(len(self.store)),
                np.arange(len(self.val_store)),
            )
        else:
            self.val_store = self.store
            self.train_idx, self.val_idx = split_holdout(
                len(self.store), self.val_fraction, self.seed
            )

    def check(self, cfg: GPTConfig) -> None:
        """A clear error before training when the store does not fit the model config."""
        self.prepare()
        s = self.store
        problems = []
        if s.codebook_size != cfg.vocab_size:
            problems.append(
                f"codebook size {s.codebook_size} (store) vs vocab_size {cfg.vocab_size} (model)"
            )
        if s.num_classes != cfg.num_classes:
            problems.append(
                f"{s.num_classes} classes (store) vs num_classes {cfg.num_classes} (model)"
            )
        if s.seq_len != cfg.seq_len:
            problems.append(
                f"{s.seq_len} tokens per image (store) vs seq_len {cfg.seq_len} (model)"
            )
        if problems:
            raise ValueError(f"code store {self.codes} does not match the model config: " + "; ".join(problems)
                             + ". Use a config made for this tokenizer or override --model.config.*")  # fmt: skip

    def setup(self, stage: str | None = None):
        self.prepare()

    def train_dataloader(self):
        ds = FlatViews(self.store, self.train_idx)
        sampler = ViewSampler(len(self.train_idx), self.store.views, self.seed)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)  # fmt: skip

    def val_dataloader(self):
        ds = FlatViews(self.val_store, self.val_idx, views=1)
        return DataLoader(
            ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )


__all__ = [
    "STORE_FORMAT",
    "CodeDataModule",
    "CodeStore",
    "FlatViews",
    "ViewSampler",
    "code_dtype",
    "extract_codes",
    "split_holdout",
    "write_code_store",
]
