"""The code store (pre-extracted tokenizer codes) and the DataModule that trains on it.

The code store is one directory written once by :func:`extract_codes`::

    codes.npy    [N, views, h*w]  uint16 when K <= 65536 (else int32), memory-mapped on read
    labels.npy   [N]              int64
    header.json  codebook size, h, w, views, view_list, classes, dataset, split, tokenizer
                 path and sha256

**Views.** Each image is stored under several deterministic augmentations ("views"), listed in
``header["view_list"]`` as ``{"flip": bool, "dy": int, "dx": int}``: the image translated by
``dy`` rows down and ``dx`` columns right (negative: up / left), the uncovered border filled
with the background value -1 (what padding uses), then mirrored left-right when ``flip``.
View 0 is always the original image (what validation reads), view 1 its flip when flips are
on, then each shift (and its flip). Training draws a seeded random view per item per epoch.

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
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..files import current_umask
from ..model import GPTConfig
from .images import collate_skip_none

log = logging.getLogger(__name__)

STORE_FORMAT = "movegen.codes/1"


# --------------------------------------------------------------------------- the store


def code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """``out`` may be written: it does not exist, or it is a code store and ``overwrite``."""
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite true to replace it")
    hp = out / "header.json"
    fmt = None
    if hp.is_file():
        try:
            fmt = json.loads(hp.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
    if fmt != STORE_FORMAT:
        raise FileExistsError(f"{out} exists and is not a code store (no movegen header.json); --overwrite replaces "
                              "only a code store: choose another --out")  # fmt: skip


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a finished directory into place; an existing store is removed only once the new
    one is complete."""
    if out.exists():
        _check_replaceable(out, overwrite)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
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
    from ..runs import folder_lock

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_replaceable(out, overwrite)
    with folder_lock(out.parent / f".{out.name}.lock", f"code store {out}"):
        # under the lock nobody else builds this store: what a killed run left is garbage
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in out.parent.glob(f".{out.name}.old-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return _write_store(out, batches, num_items=num_items, views=views, h=h, w=w, header=header,
                            overwrite=overwrite)  # fmt: skip


def _write_store(out: Path, batches, *, num_items: int, views: int, h: int, w: int, header: dict,
                 overwrite: bool) -> Path:  # fmt: skip
    K = int(header["codebook_size"])
    dtype = code_dtype(K)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(
        tmp, 0o777 & ~current_umask()
    )  # mkdtemp makes 0700: a shared dataset folder must stay readable
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

    @property
    def view_list(self) -> list[dict]:
        """What each view is (see the module docstring); stores written before the header
        listed them had views 1 (original) or 2 (+ flip)."""
        if "view_list" in self.header:
            return self.header["view_list"]
        return view_list(self.views)

    def __len__(self) -> int:
        return len(self.labels)


def split_holdout(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) index split."""
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * fraction)))
    return np.sort(perm[k:]), np.sort(perm[:k])


# --------------------------------------------------------------------------- views

BACKGROUND = -1.0  # the pixel value translated views are filled with (images are in [-1, 1])


def _shift_list(shifts: int | Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    if isinstance(shifts, bool):
        raise ValueError(f"shifts must be an int or a list of (dy, dx) pairs, got {shifts!r}")
    if isinstance(shifts, int):
        if shifts < 0:
            raise ValueError(f"shifts must be >= 0 (0: no shifted views), got {shifts}")
        if shifts == 0:
            return []
        return [(dy, dx) for dy in (-shifts, 0, shifts) for dx in (-shifts, 0, shifts)
                if (dy, dx) != (0, 0)]  # fmt: skip
    out = []
    for pair in shifts:
        if (isinstance(pair, (str, bytes)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):  # fmt: skip
            raise ValueError(f"each shift must be a pair of ints (dy, dx), got {pair!r}")
        dy, dx = int(pair[0]), int(pair[1])
        if (dy, dx) == (0, 0):
            raise ValueError("shift (0, 0) is the original image, always view 0: leave it out")
        if (dy, dx) in out:
            raise ValueError(f"shift {(dy, dx)} is listed twice")
        out.append((dy, dx))
    return out


def view_list(
    views: int = 2,
    shifts: int | Iterable[tuple[int, int]] = 0,
    image_size: tuple[int, int] | None = None,
    crop: int | None = None,
) -> list[dict]:
    """The views :func:`extract_codes` stores, in order, as ``{"flip", "dy", "dx"}`` dicts.

    ``views`` 1: no flips; 2: every view also mirrored (view 1 is the original's flip).
    ``shifts``: ``0`` none; an int ``s`` the 8 neighbours at distance ``s``
    (``dy, dx`` in ``{-s, 0, s}``, row-major); or an explicit list of ``(dy, dx)`` pairs.
    With ``image_size`` ``(H, W)``, every ``|dy| < H`` and ``|dx| < W`` is checked.

    ``crop`` ``S`` (ten-crop, LlamaGen's extraction): the images are larger than ``S`` and each
    view is an ``S x S`` crop, ``{"flip", "top", "left", "size"}``: the centre (view 0), then the
    four corners, each also mirrored with views 2 (10 views). Needs ``image_size``; not with
    shifts.
    """
    if views not in (1, 2):
        raise ValueError(
            f"views must be 1 (original) or 2 (original + horizontal flip), got {views}"
        )
    flips = (False, True) if views == 2 else (False,)
    if crop is not None:
        if shifts:
            raise ValueError("ten-crop views and shifts do not combine; choose one")
        if image_size is None:
            return [{"flip": f, "top": 0, "left": 0, "size": crop} for _ in range(5) for f in flips]
        H, W = image_size
        if not 0 < crop <= min(H, W):
            raise ValueError(f"crop size {crop} does not fit in {H}x{W} images")
        spots = [
            ((H - crop) // 2, (W - crop) // 2),
            (0, 0),
            (0, W - crop),
            (H - crop, 0),
            (H - crop, W - crop),
        ]
        return [{"flip": f, "top": t, "left": l, "size": crop} for t, l in spots for f in flips]
    offsets = [(0, 0), *_shift_list(shifts)]
    if image_size is not None:
        H, W = image_size
        if too_far := [o for o in offsets if abs(o[0]) >= H or abs(o[1]) >= W]:
            raise ValueError(f"shifts {too_far} move a {H}x{W} image out of its frame: each |dy| must be "
                             f"< {H} and each |dx| < {W}")  # fmt: skip
    return [{"flip": f, "dy": dy, "dx": dx} for dy, dx in offsets for f in flips]


def view_image(x: torch.Tensor, view: dict) -> torch.Tensor:
    """Images ``(..., H, W)`` as one view: translated by ``(dy, dx)`` with the background
    filling the uncovered border, then mirrored when ``flip``; a crop view (``top``, ``left``,
    ``size``) is that square of the image, then mirrored. Returns a new tensor."""
    if "size" in view:
        t, l, S = int(view["top"]), int(view["left"]), int(view["size"])
        if t < 0 or l < 0 or t + S > x.shape[-2] or l + S > x.shape[-1]:
            raise ValueError(
                f"crop {S}x{S} at ({t}, {l}) leaves the {x.shape[-2]}x{x.shape[-1]} image"
            )
        out = x[..., t : t + S, l : l + S]
        return torch.flip(out, dims=[-1]) if view["flip"] else out.clone()
    dy, dx = int(view["dy"]), int(view["dx"])
    H, W = x.shape[-2:]
    if abs(dy) >= H or abs(dx) >= W:
        raise ValueError(f"shift ({dy}, {dx}) moves a {H}x{W} image out of its frame")
    out = torch.full_like(x, BACKGROUND)
    # target rows [max(dy, 0), H + min(dy, 0)) come from source rows [max(-dy, 0), H - max(dy, 0))
    out[..., max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)] = x[
        ..., max(-dy, 0) : H - max(dy, 0), max(-dx, 0) : W - max(dx, 0)
    ]
    return torch.flip(out, dims=[-1]) if view["flip"] else out


# --------------------------------------------------------------------------- extraction


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
    shifts: int | Iterable[tuple[int, int]] = 0,
    crop: int | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
) -> Path:
    """Encode every image of ``dataset`` under each view of :func:`view_list` ``(views,
    shifts)`` with ``encode: images (B, C, H, W) -> codes (B, h, w)`` into a code store at
    ``out`` (``[N, len(view_list), h*w]``; the list is written to ``header["view_list"]``).

    ``views`` 2 adds the horizontal flip of every view, 1 does not; ``shifts`` adds translated
    copies (an int ``s``: the 8 neighbours at distance ``s``; or a list of ``(dy, dx)``);
    ``crop`` ``S``: ten-crop views of images larger than ``S`` (see :func:`view_list`).
    ``num_workers`` decode the images in that many DataLoader processes (a folder of JPEGs).

    ``world`` > 1 (torch.distributed initialised, every rank calling): rank ``r`` encodes its
    contiguous share of the batches (the same batches one process would encode) into a part
    store beside ``out``; the first rank joins the parts in rank order into ``out`` and removes
    them, so the store equals one process's.
    """
    view_list(views, shifts, crop=crop)  # the arguments' own errors before any image is read
    kw = dict(codebook_size=codebook_size, num_classes=num_classes, header=header, views=views, shifts=shifts,
              crop=crop, batch_size=batch_size, num_workers=num_workers, device=device)  # fmt: skip
    if world <= 1:
        return _extract_store(encode, dataset, out, overwrite=overwrite, progress=progress, **kw)
    return _extract_sharded(encode, dataset, Path(out), rank, world, overwrite=overwrite,
                            progress=progress, **kw)  # fmt: skip


def _extract_store(encode, dataset, out, *, codebook_size: int, num_classes: int, header: dict, views: int,
                   shifts, crop: int | None, batch_size: int, num_workers: int, device, overwrite: bool,
                   progress: bool, allow_empty: bool = False) -> Path | None:  # fmt: skip
    """:func:`extract_codes` in one process; ``allow_empty``: a dataset with no readable image
    writes nothing and returns None (a rank's share), instead of raising."""
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skip_none,
                        num_workers=num_workers, persistent_workers=False)  # fmt: skip
    failures = getattr(dataset, "failures", [])  # a folder's files already left out, then more
    skipped = len(failures)
    x0 = next((x for x, _, _ in loader if len(x)), None)
    if x0 is None and allow_empty:
        return None
    if x0 is None:
        raise ValueError(f"no readable image in the dataset to encode ({len(dataset)} items); "
                         f"unreadable: {'; '.join(failures[:3]) or 'none named'}")  # fmt: skip
    vlist = view_list(views, shifts, image_size=tuple(x0.shape[-2:]), crop=crop)
    h, w = encode(view_image(x0[:1], vlist[0]).to(device)).shape[-2:]

    def batches():
        nonlocal skipped
        for x, y, bad in tqdm(loader, desc="extract codes", disable=not progress, unit="batch"):
            skipped += bad
            if not len(x):
                continue
            x = x.to(device)
            vs = [encode(view_image(x, v)) for v in vlist]
            c = torch.stack([v.reshape(len(x), -1) for v in vs], dim=1)  # (n, views, h*w)
            yield c.cpu().numpy().astype(code_dtype(codebook_size)), y.numpy()
        if skipped:  # read by write_code_store after the last batch, before it writes header.json
            full["skipped_unreadable"] = skipped

    full = {"codebook_size": codebook_size, "num_classes": num_classes, **header,
            "view_list": vlist, "view_fill": BACKGROUND}  # fmt: skip

    path = write_code_store(out, batches(), num_items=len(dataset), views=len(vlist), h=int(h),
                            w=int(w), header=full, overwrite=overwrite)  # fmt: skip
    if skipped:
        log.warning("%d unreadable images were skipped and are not in the store: %s%s", skipped,
                    "; ".join(failures[:5]), " ..." if len(failures) > 5 else "")  # fmt: skip
    return path


def _extract_sharded(encode, dataset, out: Path, rank: int, world: int, *, overwrite: bool, progress: bool,
                     batch_size: int, **kw) -> Path:  # fmt: skip
    """Each rank encodes batches ``[nb * r // world, nb * (r + 1) // world)`` of the ``nb``
    batches into ``.<out>.part-<r>-of-<world>``; the first rank joins them into ``out``. An error
    on any rank is raised on every rank (no rank waits forever for another's part)."""
    from torch.utils.data import Subset

    from ..ranks import agree as agree_on

    def agree(fn):  # fn() on this rank; every rank raises any rank's error
        return agree_on(fn, "code extraction")

    prefix = f".{out.name}.part-"
    if rank == 0:  # what a killed run left
        agree(lambda: [shutil.rmtree(p) for p in out.parent.glob(prefix + "*") if p.is_dir()])
    else:
        agree(lambda: None)
    n = len(dataset)
    nb = -(-n // batch_size)
    lo, hi = min(n, nb * rank // world * batch_size), min(n, nb * (rank + 1) // world * batch_size)
    share = Subset(dataset, range(lo, hi))
    # a folder's files left out when it was listed: counted once, in the first share
    share.failures = getattr(dataset, "failures", []) if rank == 0 else []
    part = out.parent / f"{prefix}{rank}-of-{world}"
    agree(lambda: _extract_store(encode, share, part, overwrite=True, progress=progress and rank == 0,
                                 batch_size=batch_size, allow_empty=True, **kw))  # fmt: skip

    def join() -> Path:
        parts = [
            CodeStore(p)
            for r in range(world)
            if (p := out.parent / f"{prefix}{r}-of-{world}").is_dir()
        ]
        if not parts:
            raise ValueError(f"no readable image in the dataset to encode ({n} items)")
        head = dict(parts[0].header)
        for k in ("format", "num_items", "views", "h", "w", "dtype", "skipped_unreadable"):
            head.pop(k, None)
        skipped = sum(int(p.header.get("skipped_unreadable", 0)) for p in parts)
        if skipped:
            head["skipped_unreadable"] = skipped
        head["processes"] = world

        def batches(rows: int = 65536):  # streamed from the parts' memory maps
            for p in parts:
                for i in range(0, len(p.codes), rows):
                    yield np.asarray(p.codes[i : i + rows]), p.labels[i : i + rows]

        first = parts[0]
        h, w = int(first.header["h"]), int(first.header["w"])
        path = write_code_store(out, batches(), num_items=sum(len(p.codes) for p in parts), views=first.views,
                                h=h, w=w, header=head, overwrite=overwrite)  # fmt: skip
        for p in parts:
            shutil.rmtree(p.path, ignore_errors=True)
        return path

    agree(join if rank == 0 else lambda: None)
    return out


# --------------------------------------------------------------------------- DataModule


def epoch_order(n_items: int, views: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: every item once, in a seeded random order, each with a
    seeded random view; ``(n_items, 2)`` int64 ``[item, view]``. A function of ``(seed, epoch)``
    only (model init never touches its generator), so every arm sees the same data per seed."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_items, generator=g)
    view = torch.randint(views, (n_items,), generator=g)
    return torch.stack([order, view], dim=1)


class StepBatches:
    """Training batches as a function of the training step: batch ``b`` of epoch ``e`` is rows
    ``[(b * world + rank) * B, ... + B)`` of :func:`epoch_order` ``(seed, e)``. Iterating starts
    at the step ``position()`` returns (the trainer's global step, so a resumed run continues
    with exactly the batch it would have drawn) and ends at the epoch's end.

    The codes are gathered from the store's memory map on the host, or, with ``device``, from
    one copy of the store in device memory (no worker processes, no host round trip: the
    order of an epoch is moved once, each batch is an index on the device).
    """

    def __init__(self, store: CodeStore, indices: np.ndarray, *, batch_size: int, seed: int,
                 device: torch.device | str | None = None, rank: int = 0, world: int = 1,
                 position: Callable[[], int] = lambda: 0):  # fmt: skip
        self.store, self.indices = store, np.asarray(indices)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.position = position
        self.views = store.views
        self.device = torch.device(device) if device is not None else None
        self.steps_per_epoch = len(self.indices) // (batch_size * world)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.indices)} training items make no batch of {batch_size} x {world} "
                             "device(s); lower --data.batch_size")  # fmt: skip
        self._codes = self._labels = None
        if self.device is not None:  # the training items only, as stored (uint16 -> int32 here)
            c = np.asarray(store.codes[self.indices])  # int16 halves the copy when K <= 32768
            small = store.codebook_size <= 32768
            self._codes = torch.from_numpy(c.astype(np.int16 if small else np.int32)).to(
                self.device
            )
            self._labels = torch.from_numpy(store.labels[self.indices]).to(self.device)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch_rows(self, step: int) -> torch.Tensor:
        """``[item, view]`` rows (positions in ``indices``) of the batch at global ``step``."""
        epoch, b = divmod(step, self.steps_per_epoch)
        return self._rows(epoch_order(len(self.indices), self.views, self.seed, epoch), b)

    def _rows(self, order: torch.Tensor, b: int) -> torch.Tensor:
        """This rank's share of batch ``b`` of an epoch's ``order``."""
        lo = (b * self.world + self.rank) * self.batch_size
        return order[lo : lo + self.batch_size]

    def _host_batch(self, rows: torch.Tensor):
        items = self.indices[rows[:, 0].numpy()]
        c = self.store.codes[items, rows[:, 1].numpy()]
        return torch.from_numpy(c.astype(np.int64)), torch.from_numpy(self.store.labels[items])

    def __iter__(self):
        start = int(self.position())
        epoch, first = divmod(start, self.steps_per_epoch)
        order = epoch_order(len(self.indices), self.views, self.seed, epoch)
        if self.device is not None:
            order = order.to(self.device, non_blocking=True)
        for b in range(first, self.steps_per_epoch):
            rows = self._rows(order, b)
            if self.device is None:
                yield self._host_batch(rows)
            else:
                yield self._codes[rows[:, 0], rows[:, 1]].long(), self._labels[rows[:, 0]]

    # Lightning saves and restores this with the training state: a resume against another
    # store, split, batch size or seed would continue a different run, so it is refused.
    def state_dict(self) -> dict:
        return {"num_items": len(self.indices), "views": self.views, "batch_size": self.batch_size,
                "seed": self.seed, "world": self.world}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        diff = {k: (v, mine.get(k)) for k, v in state.items() if mine.get(k) != v}
        if diff:
            raise ValueError("--resume continues the same run, but the training data differ from the saved "
                             "state's: " + ", ".join(f"{k} {a} (saved) vs {b} (now)" for k, (a, b) in diff.items()))  # fmt: skip


class ValBatches:
    """Held-out codes (view 0) in store order, in batches; from device memory with ``device``."""

    def __init__(self, store: CodeStore, indices: np.ndarray, *, batch_size: int,
                 device: torch.device | str | None = None):  # fmt: skip
        self.batch_size = batch_size
        c = np.asarray(store.codes[np.asarray(indices), 0]).astype(np.int64)
        self.codes = torch.from_numpy(c)
        self.labels = torch.from_numpy(store.labels[np.asarray(indices)])
        if device is not None:
            self.codes, self.labels = self.codes.to(device), self.labels.to(device)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for lo in range(0, len(self.labels), self.batch_size):
            yield self.codes[lo : lo + self.batch_size], self.labels[lo : lo + self.batch_size]


# A store is fed from device memory ("feed: auto") when its training items take at
# most this many bytes there (int16 codes): Fashion-MNIST's 55k x 2 views x 64 codes are 14 MB.
DEVICE_RESIDENT_MAX_BYTES = 4 << 30


class CodeDataModule(L.LightningDataModule):
    """A code store as training data (a random view per sample, a seeded order that is a
    function of the step: see :class:`StepBatches`) and held-out validation codes (view 0):
    either a separate store (``val_codes``) or a seeded fraction of the training store."""

    def __init__(
        self,
        codes: str = "",
        val_codes: str | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        feed: Literal["auto", "device", "host"] = "auto",
    ):
        """
        Args:
            codes: code store of the training split (``movegen extract-codes``).
            val_codes: code store of held-out codes; default: hold out ``val_fraction`` of ``codes``.
            val_fraction: fraction held out when ``val_codes`` is not given.
            batch_size: sequences per batch (per device).
            num_workers: unused (kept so that older configs parse): batches are gathered in the
                training process, from the memory map or from device memory.
            seed: seed of the held-out split and of the data order (the same for every arm).
            feed: where batches are gathered: 'device' keeps the training items in GPU memory
                (no workers, no host round trip), 'host' reads the memory map; 'auto' is
                'device' on a GPU when the items fit in 4 GiB, else 'host'.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if feed not in ("auto", "device", "host"):
            raise ValueError(f"feed must be 'auto', 'device' or 'host', got {feed!r}")
        self.codes, self.val_codes, self.val_fraction = codes, val_codes, val_fraction
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.feed = feed
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

    def steps_per_epoch(self, world: int = 1) -> int:
        self.prepare()
        return len(self.train_idx) // (self.batch_size * world)

    def _device(self):
        """The device the batches are built on: the trainer's GPU when resident, else None."""
        t = getattr(self, "trainer", None)
        dev = t.strategy.root_device if t is not None else torch.device("cpu")
        if self.feed == "host" or (dev.type != "cuda" and self.feed == "auto"):
            return None
        nbytes = len(self.train_idx) * self.store.views * self.store.seq_len * 2
        if self.feed == "auto" and nbytes > DEVICE_RESIDENT_MAX_BYTES:
            return None
        return dev

    def train_dataloader(self):
        t = getattr(self, "trainer", None)
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        accumulate = t.accumulate_grad_batches if t is not None else 1
        position = (lambda: t.global_step * accumulate) if t is not None else (lambda: 0)
        return StepBatches(self.store, self.train_idx, batch_size=self.batch_size, seed=self.seed,
                           device=self._device(), rank=rank, world=world, position=position)  # fmt: skip

    def val_dataloader(self):
        return ValBatches(
            self.val_store, self.val_idx, batch_size=self.batch_size, device=self._device()
        )


__all__ = [
    "STORE_FORMAT",
    "CodeDataModule",
    "CodeStore",
    "StepBatches",
    "ValBatches",
    "code_dtype",
    "epoch_order",
    "extract_codes",
    "split_holdout",
    "view_image",
    "view_list",
    "write_code_store",
]
