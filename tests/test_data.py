import json
from pathlib import Path

import numpy as np
import pytest
import torch

from movegen import data as D
from movegen.data import images as DI


def test_digits_splits_are_disjoint_stratified_and_shaped():
    sets = {s: D.load_dataset("digits", s) for s in D.SPLITS}
    assert sum(len(s) for s in sets.values()) == 1797
    x, y = sets["train"][0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    for s in sets.values():  # every class present in every split
        assert set(s.labels.tolist()) == set(range(10))
    # same seed, same split
    assert torch.equal(D.load_dataset("digits", "val").labels, sets["val"].labels)


def test_digits_padding_and_content_crop():
    ds = D.load_dataset("digits", "test", image_size=12, fit="pad")
    x, _ = ds[0]
    assert x.shape == (1, 12, 12)
    assert torch.all(x[:, :2] == -1) and torch.all(x[:, :, -2:] == -1)
    assert torch.equal(ds.content(x[None])[0], D.load_dataset("digits", "test")[0][0])
    assert ds.transform(ds.images[:1]).shape == (1, 1, 12, 12)
    rgb = D.load_dataset("digits", "test", channels=3)
    assert rgb[0][0].shape == (3, 8, 8)


@pytest.mark.skipif(
    DI._find_idx_files(map(__import__("pathlib").Path, DI.FASHION_DIRS)) is None,
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_splits_and_shapes():
    tr, va, te = (D.load_dataset("fashion-mnist", s, image_size=32) for s in D.SPLITS)
    assert (len(tr), len(va), len(te)) == (55_000, 5_000, 10_000)
    x, y = te[0]
    assert x.shape == (1, 32, 32) and 0 <= y < 10
    assert te.content(x[None]).shape == (1, 1, 28, 28)
    assert torch.bincount(te.labels).tolist() == [1000] * 10


def test_missing_fashion_mnist_error_names_both_ways(monkeypatch, tmp_path):
    import torchvision

    monkeypatch.setattr(DI, "FASHION_DIRS", (str(tmp_path / "nowhere"),))

    def offline(*a, **k):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(FileNotFoundError) as e:
        D.load_dataset("fashion-mnist", "train", data_root=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "torchvision" in msg


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_dataset("imagenet-typo", "train")
    with pytest.raises(ValueError, match="split"):
        D.load_dataset("digits", "training")


def _image_folder(root, classes=("a", "b"), n=10, side=(12, 10), seed=0):
    """An ImageFolder tree of random RGB PNGs, ``n`` per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray((rng.random((*side, 3)) * 255).astype(np.uint8)).save(
                root / c / f"{i}.png"
            )
    return root


def test_folder_dataset_counts_unreadable_images(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")  # caught when the split is built
    (tmp_path / "b" / "empty.png").write_bytes(b"")
    good = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "b" / "truncated.png").write_bytes(good[:80])  # a header, no pixels: fails decoding
    ds_all = [D.load_dataset(f"folder:{tmp_path}", s, image_size=8) for s in ("train", "val")]
    left_out = [f for d in ds_all for f in d.failures]
    assert sorted(Path(f.split(" (")[0]).name for f in left_out) == ["broken.png", "empty.png"]
    assert sum(len(d) for d in ds_all) == 21  # 20 good + the truncated one, read lazily
    seen, bad = 0, 0
    for ds in ds_all:
        for batch in torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=ds.collate_fn):
            x, y, b = batch
            seen += len(x)
            bad += b
            assert len(x) == 0 or x.shape[1:] == (3, 8, 8)
    assert (seen, bad) == (20, 1)
    assert sum(len(d.failures) for d in ds_all) == 3
    assert any("truncated.png" in f for d in ds_all for f in d.failures)
    # extraction leaves them out and says so in the header
    train = D.load_dataset(f"folder:{tmp_path}", "train", image_size=8)
    files = len(train) + len(train.failures)  # the files of this split
    enc = lambda x: (x[:, 0, ::4, ::4] > 0).long()
    D.extract_codes(enc, train, tmp_path / "codes", codebook_size=2, num_classes=2, header={}, views=1,
                    batch_size=4, progress=False)  # fmt: skip
    hd = json.loads((tmp_path / "codes/header.json").read_text())
    assert hd["num_items"] + hd.get("skipped_unreadable", 0) == files
    assert hd["skipped_unreadable"] == len(set(train.failures)) >= 1  # each named once in the log


def test_folder_of_only_unreadable_images_is_a_clear_error(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable image") as e:
        D.load_dataset(f"folder:{tmp_path}", "train", image_size=8)
    assert "x.png" in str(e.value)


def test_dataset_fingerprint_follows_the_content(tmp_path):
    import os

    root = _image_folder(tmp_path / "imgs", n=3)
    name = f"folder:{root}"
    a = D.dataset_fingerprint(name, "train")
    assert a == D.dataset_fingerprint(name, "train")  # stable
    assert D.dataset_fingerprint(f"folder:{tmp_path}/./imgs", "train") == a  # one folder, one print
    _image_folder(root, classes=("a",), n=1, seed=1)  # rewrite a.0 with other pixels and mtime
    st = (root / "a" / "0.png").stat()
    os.utime(root / "a" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    b = D.dataset_fingerprint(name, "train")
    assert b != a
    (root / "b" / "new.png").write_bytes((root / "b" / "0.png").read_bytes())
    assert D.dataset_fingerprint(name, "train") not in (a, b)
    # digits: stable, split-specific; unknown names are refused
    assert D.dataset_fingerprint("digits", "test") == D.dataset_fingerprint("digits", "test")
    assert D.dataset_fingerprint("digits", "test") != D.dataset_fingerprint("digits", "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        D.dataset_fingerprint("imagenet-typo", "train")


def _write_fake_store(path, n, views, side, K, bs=7):
    """Random codes ``[n, views, side*side]`` and labels written as a store; returns them."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, K, size=(n, views, side * side))
    labels = rng.integers(0, 10, size=n)
    batches = ((codes[i : i + bs], labels[i : i + bs]) for i in range(0, n, bs))
    D.write_code_store(path, batches, num_items=n, views=views, h=side, w=side,
                       header={"codebook_size": K, "num_classes": 10, "dataset": "x"})  # fmt: skip
    return codes, labels


def test_code_store_round_trip_exact_uint16(tmp_path):
    codes, labels = _write_fake_store(tmp_path / "s", 30, 2, 4, 1000)
    s = D.CodeStore(tmp_path / "s")
    assert s.codes.dtype == np.uint16 and isinstance(s.codes, np.memmap)
    assert np.array_equal(np.asarray(s.codes), codes) and np.array_equal(s.labels, labels)
    assert (len(s), s.views, s.seq_len, s.codebook_size) == (30, 2, 16, 1000)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _write_fake_store(tmp_path / "s", 30, 2, 4, 1000)
    # big codebooks fall back to int32
    _write_fake_store(tmp_path / "big", 5, 1, 2, 70000)
    assert D.CodeStore(tmp_path / "big").codes.dtype == np.int32


def test_interrupted_extraction_leaves_no_store(tmp_path):
    ds = D.load_dataset("digits", "val")
    calls = {"n": 0}

    def flaky_encode(x):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("power cut")
        return torch.zeros(len(x), 2, 2, dtype=torch.long)

    with pytest.raises(KeyboardInterrupt):
        D.extract_codes(
            flaky_encode,
            ds,
            tmp_path / "codes",
            codebook_size=16,
            num_classes=10,
            header={},
            batch_size=16,
            progress=False,
        )
    assert not (tmp_path / "codes").exists()
    assert not list(tmp_path.rglob("header.json"))
    assert list(tmp_path.iterdir()) == []  # temporary folder cleaned up


def test_extraction_flip_view_and_header(tmp_path):
    ds = D.load_dataset("digits", "val")
    enc = lambda x: (x[:, 0, ::4, ::4] > 0).long()  # (B, 2, 2), depends on orientation
    D.extract_codes(
        enc,
        ds,
        tmp_path / "c",
        codebook_size=2,
        num_classes=10,
        header={"dataset": "digits"},
        progress=False,
    )
    s = D.CodeStore(tmp_path / "c")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert np.array_equal(np.asarray(s.codes[:, 0]), enc(x).reshape(len(ds), -1).numpy())
    assert np.array_equal(np.asarray(s.codes[:, 1]), enc(x.flip(-1)).reshape(len(ds), -1).numpy())
    hd = json.loads((tmp_path / "c/header.json").read_text())
    assert hd["num_items"] == len(ds) and hd["views"] == 2 and hd["codebook_size"] == 2


def _shifted(x, dy, dx):
    """A reference translation, written independently of the library: numpy, pixel by pixel."""
    a = x.numpy()
    out = np.full_like(a, -1.0)
    H, W = a.shape[-2:]
    for i in range(H):
        for j in range(W):
            if 0 <= i - dy < H and 0 <= j - dx < W:
                out[..., i, j] = a[..., i - dy, j - dx]
    return torch.from_numpy(out)


def test_extraction_shifted_views_equal_the_encoded_shifted_images(tmp_path):
    ds = D.load_dataset("digits", "val")  # 8x8
    enc = lambda x: ((x[:, 0] + 1) * 2).round().long().clamp(0, 4)  # (B, 8, 8): every pixel
    D.extract_codes(enc, ds, tmp_path / "c", codebook_size=5, num_classes=10, header={}, shifts=1,
                    batch_size=64, progress=False)  # fmt: skip
    s = D.CodeStore(tmp_path / "c")
    hd = json.loads((tmp_path / "c/header.json").read_text())
    assert s.views == hd["views"] == 18 and s.codes.shape == (len(ds), 18, 64)
    assert hd["view_list"] == s.view_list
    assert hd["view_list"][:2] == [
        {"flip": False, "dy": 0, "dx": 0},
        {"flip": True, "dy": 0, "dx": 0},
    ]
    offsets = [(v["dy"], v["dx"]) for v in hd["view_list"]]
    neighbours = {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert set(offsets) == neighbours and all(offsets.count(o) == 2 for o in neighbours)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    for k, v in enumerate(hd["view_list"]):
        img = _shifted(x, v["dy"], v["dx"])
        img = img.flip(-1) if v["flip"] else img
        assert np.array_equal(np.asarray(s.codes[:, k]), enc(img).reshape(len(ds), -1).numpy()), v
    # a shift moves the content: the shifted views differ from the original
    assert not np.array_equal(np.asarray(s.codes[:, 0]), np.asarray(s.codes[:, 2]))


def test_explicit_shift_list_without_flips_and_the_old_views_unchanged(tmp_path):
    ds = D.load_dataset("digits", "val")
    enc = lambda x: (x[:, 0] > 0).long()
    D.extract_codes(enc, ds, tmp_path / "c", codebook_size=2, num_classes=10, header={}, views=1,
                    shifts=[(0, 3), (-2, 0)], progress=False)  # fmt: skip
    s = D.CodeStore(tmp_path / "c")
    assert s.view_list == [{"flip": False, "dy": 0, "dx": 0}, {"flip": False, "dy": 0, "dx": 3},
                           {"flip": False, "dy": -2, "dx": 0}]  # fmt: skip
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert np.array_equal(
        np.asarray(s.codes[:, 1]), enc(_shifted(x, 0, 3)).reshape(len(ds), -1).numpy()
    )
    assert np.array_equal(
        np.asarray(s.codes[:, 2]), enc(_shifted(x, -2, 0)).reshape(len(ds), -1).numpy()
    )
    # the defaults are the two views stores always had, now listed
    assert D.view_list() == [{"flip": False, "dy": 0, "dx": 0}, {"flip": True, "dy": 0, "dx": 0}]
    # a store written before view_list existed still says what its views are
    _write_fake_store(tmp_path / "old", 3, 2, 2, 16)
    assert D.CodeStore(tmp_path / "old").view_list == D.view_list(2)


@pytest.mark.parametrize(
    "shifts, match",
    [
        (8, "out of its frame"),  # 8x8 digits: a shift of 8 leaves only background
        ([(0, -8)], "out of its frame"),
        (-1, ">= 0"),
        ([(0, 0)], "original image"),
        ([(1, 1), (1, 1)], "twice"),
        ([(1,)], "pair of ints"),
        ([(1.5, 0)], "pair of ints"),
        (True, "an int or a list"),
    ],
)
def test_bad_shifts_are_refused_before_a_store_is_written(tmp_path, shifts, match):
    ds = D.load_dataset("digits", "val")
    enc = lambda x: (x[:, 0] > 0).long()
    with pytest.raises(ValueError, match=match):
        D.extract_codes(enc, ds, tmp_path / "c", codebook_size=2, num_classes=10, header={},
                        shifts=shifts, progress=False)  # fmt: skip
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="views must be 1"):
        D.view_list(3)


def test_cli_extract_codes_with_shifts(digits_pipeline, tmp_path):
    from movegen.cli import main

    tok = str(digits_pipeline["tokenizer"])
    rc = main(["extract-codes", "--tokenizer", tok, "--split", "val", "--shifts", "1", "--device", "cpu",
               "--out", str(tmp_path / "c")])  # fmt: skip
    assert rc == 0
    s = D.CodeStore(tmp_path / "c")
    base = D.CodeStore(digits_pipeline["val_codes"])
    assert s.views == 18 and len(s.view_list) == 18 and base.views == 2
    assert np.array_equal(
        np.asarray(s.codes[:, :2]), np.asarray(base.codes)
    )  # views 0, 1 as before
    rc = main(["extract-codes", "--tokenizer", tok, "--split", "val", "--views", "1", "--device", "cpu",
               "--shifts", "[[0, 1], [1, 0]]", "--out", str(tmp_path / "l")])  # fmt: skip
    assert rc == 0 and [(v["dy"], v["dx"]) for v in D.CodeStore(tmp_path / "l").view_list] == [
        (0, 0), (0, 1), (1, 0)]  # fmt: skip
    rc = main(["extract-codes", "--tokenizer", tok, "--split", "val", "--shifts", "8", "--device", "cpu",
               "--out", str(tmp_path / "bad")])  # fmt: skip
    assert rc == 2 and not (tmp_path / "bad").exists()


def test_not_a_code_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="extract-codes"):
        D.CodeStore(tmp_path)


def test_step_batches_cover_every_item_once_per_epoch_and_resume_mid_epoch(tmp_path):
    codes, labels = _write_fake_store(tmp_path / "s", 103, 2, 2, 50)
    store = D.CodeStore(tmp_path / "s")
    idx = np.arange(3, 103)  # a held-out split of 3 items
    sb = D.StepBatches(store, idx, batch_size=10, seed=7)
    assert len(sb) == 10
    epoch0 = [(c.clone(), y.clone()) for c, y in sb]
    rows = torch.cat([sb.batch_rows(s) for s in range(10)])
    assert sorted(rows[:, 0].tolist()) == list(range(100))  # every training item once
    assert 0.3 < rows[:, 1].float().mean() < 0.7  # both views drawn
    for b, (c, y) in enumerate(epoch0):  # what is yielded is the store's row and view
        r = sb.batch_rows(b)
        assert torch.equal(c, torch.from_numpy(codes[idx[r[:, 0]], r[:, 1]].astype(np.int64)))
        assert torch.equal(y, torch.from_numpy(labels[idx[r[:, 0]]]))
    # the order is a function of (seed, step): a new order each epoch, the same for every arm
    assert not torch.equal(sb.batch_rows(0), sb.batch_rows(10))
    assert torch.equal(
        D.StepBatches(store, idx, batch_size=10, seed=7).batch_rows(13), sb.batch_rows(13)
    )
    assert not torch.equal(
        D.StepBatches(store, idx, batch_size=10, seed=8).batch_rows(0), sb.batch_rows(0)
    )
    # started mid-epoch (a resumed run), it yields the rest of that epoch's batches exactly
    resumed = D.StepBatches(store, idx, batch_size=10, seed=7, position=lambda: 16)
    tail = list(resumed)
    assert len(tail) == 4
    full1 = list(D.StepBatches(store, idx, batch_size=10, seed=7, position=lambda: 10))
    for (a, ya), (b, yb) in zip(tail, full1[6:]):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    # device feed (here the CPU device) gives the same batches as the memory-map feed
    dev = list(D.StepBatches(store, idx, batch_size=10, seed=7, device="cpu"))
    for (a, ya), (b, yb) in zip(dev, epoch0):
        assert torch.equal(a, b) and torch.equal(ya, yb) and a.dtype == torch.int64
    # ranks share out each global batch without overlap
    r0 = D.StepBatches(store, idx, batch_size=5, seed=7, rank=0, world=2)
    r1 = D.StepBatches(store, idx, batch_size=5, seed=7, rank=1, world=2)
    both = torch.cat([torch.cat([r0.batch_rows(s), r1.batch_rows(s)]) for s in range(len(r0))])
    assert sorted(both[:, 0].tolist()) == list(range(100))
    # a resume against other data is refused
    with pytest.raises(ValueError, match="training data differ"):
        D.StepBatches(store, idx, batch_size=10, seed=8).load_state_dict(sb.state_dict())


def test_val_batches_are_view_zero_in_store_order(tmp_path):
    codes, labels = _write_fake_store(tmp_path / "s", 23, 2, 2, 50)
    vb = D.ValBatches(D.CodeStore(tmp_path / "s"), np.arange(23), batch_size=10)
    got = list(vb)
    assert len(vb) == len(got) == 3
    assert torch.equal(
        torch.cat([c for c, _ in got]), torch.from_numpy(codes[:, 0].astype(np.int64))
    )


def test_ten_crop_views_are_the_centre_and_corner_crops_and_their_flips(tmp_path):
    from movegen.data.images import DatasetInfo, TensorImages

    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (6, 1, 12, 12), generator=g, dtype=torch.uint8)
    ds = TensorImages(
        u8, torch.arange(6) % 2, DatasetInfo(name="t", num_classes=2, channels=1, native_size=12)
    )
    x = torch.stack([ds[i][0] for i in range(6)])
    enc = lambda im: ((im[:, 0] + 1) * 2).round().long().clamp(0, 4)  # noqa: E731  (every pixel)
    D.extract_codes(enc, ds, tmp_path / "c", codebook_size=5, num_classes=2, header={}, crop=10,
                    batch_size=4, num_workers=2, progress=False)  # fmt: skip
    s = D.CodeStore(tmp_path / "c")
    assert s.views == 10 and s.codes.shape == (6, 10, 100)
    spots = [(v["top"], v["left"]) for v in s.view_list[::2]]
    assert spots == [(1, 1), (0, 0), (0, 2), (2, 0), (2, 2)]  # centre first: view 0
    for k, v in enumerate(s.view_list):
        img = x[..., v["top"] : v["top"] + 10, v["left"] : v["left"] + 10]
        img = img.flip(-1) if v["flip"] else img
        assert v["flip"] == bool(k % 2) and v["size"] == 10
        assert np.array_equal(np.asarray(s.codes[:, k]), enc(img).reshape(6, -1).numpy()), v
    with pytest.raises(ValueError, match="do not combine"):
        D.view_list(2, 1, crop=10)
    with pytest.raises(ValueError, match="does not fit"):
        D.view_list(2, 0, image_size=(8, 8), crop=10)


def test_cli_ten_crop_needs_a_folder_dataset(digits_pipeline, tmp_path):
    from movegen.cli import main

    rc = main(["extract-codes", "--tokenizer", str(digits_pipeline["tokenizer"]), "--split", "val",
               "--ten_crop", "true", "--device", "cpu", "--out", str(tmp_path / "c")])  # fmt: skip
    assert rc == 2 and not (tmp_path / "c").exists()


def test_extraction_over_two_processes_writes_the_store_of_one(digits_pipeline, tmp_path):
    """torchrun with 2 CPU processes (gloo): each encodes its share of the batches into a part
    beside the store, the first joins them: the store one process writes, and no part left."""
    import os
    import socket
    import subprocess
    import sys

    from movegen.cli import main

    root = Path(__file__).resolve().parents[1]
    tok = str(digits_pipeline["tokenizer"])
    args = [
        "extract-codes",
        "--tokenizer",
        tok,
        "--split",
        "train",
        "--device",
        "cpu",
        "--batch_size",
        "100",
    ]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / ".two.part-1-of-2").mkdir()  # what a killed run left: removed, not joined
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), "-m", "movegen", *args, "--out", str(tmp_path / "two")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = D.CodeStore(tmp_path / "one"), D.CodeStore(tmp_path / "two")
    assert (
        len(one) > 1000 and -(-len(one) // 100) % 2 == 1
    )  # an odd number of batches: unequal shares
    assert np.array_equal(np.asarray(one.codes), np.asarray(two.codes))
    assert np.array_equal(one.labels, two.labels)
    assert two.header["processes"] == 2 and "processes" not in one.header
    assert {k: v for k, v in two.header.items() if k != "processes"} == json.loads(
        (tmp_path / "one/header.json").read_text()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no part, no lock left
