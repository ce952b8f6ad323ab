import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from movegen.cli import main
from movegen.data import load_dataset
from movegen.metrics import (
    build_extractors,
    fid_from_features,
    find_inception_weights,
    reference_features,
    score,
)

ROOT = Path(__file__).resolve().parents[1]


def feats(n=400, d=16, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) @ (
        torch.randn(d, d, generator=g, dtype=torch.float64) / 4
    )
    return a + shift


def fid_float64_scipy(real: np.ndarray, fake: np.ndarray) -> float:
    """An independent FID: float64, scipy's matrix square root (as ADM's evaluator)."""
    from scipy import linalg

    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)
    )


def test_fid_of_a_set_with_itself_is_zero():
    x = feats()
    assert abs(fid_from_features(x, x)) < 1e-3


def test_fid_matches_float64_scipy():
    real, fake = feats(seed=0), feats(seed=1, shift=0.3)
    ours = fid_from_features(real, fake)
    ref = fid_float64_scipy(real.numpy(), fake.numpy())
    assert ours == pytest.approx(ref, rel=1e-8)
    assert ref > 0.5


def test_scores_deterministic_and_sensible():
    real, fake = feats(seed=0), feats(seed=1, shift=1.0)
    logits = torch.randn(400, 10, generator=torch.Generator().manual_seed(0)) * 3
    a, b = score(real, fake, logits, seed=0), score(real, fake, logits, seed=0)
    assert a == b
    assert score(real, real, logits)["kid"] < a["kid"]
    assert 1.0 <= a["is"] <= 10.0


def test_missing_inception_weights_error_is_clear_and_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as e:
        build_extractors("inception")
    assert time.time() - t0 < 2
    msg = str(e.value)
    assert (
        "weights-inception-2015-12-05-6726825d.pth" in msg
        and str(tmp_path) in msg
        and "classifier:" in msg
    )
    with pytest.raises(FileNotFoundError, match="not at"):
        find_inception_weights(str(tmp_path / "x.pth"))


def test_reference_cache_hit_on_second_call(tmp_path):
    calls = {"n": 0}

    class Mod(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :4]

    def images():
        calls["n"] += 1
        yield torch.rand(10, 1, 4, 4)

    key = {"dataset": "digits", "split": "train", "resolution": 4, "features": "f1"}
    a, hit1 = reference_features(Mod(), key, images, tmp_path)
    b, hit2 = reference_features(Mod(), key, images, tmp_path)
    assert (hit1, hit2) == (False, True) and calls["n"] == 1 and torch.equal(a, b)
    _, hit3 = reference_features(Mod(), {**key, "features": "f2"}, images, tmp_path)
    assert hit3 is False and calls["n"] == 2


def test_classifier_learns_digits(digits_models):
    m = json.loads((digits_models["dir"] / "classifier/metrics.json").read_text())
    assert m["test_accuracy"] > 0.85


def test_sample_cli_grid_and_errors(digits_models, tmp_path, caplog):
    from PIL import Image

    ckpt = str(digits_models["move-x1"])
    rc = main(
        [
            "sample",
            "--model",
            ckpt,
            "--classes",
            "0,3,7",
            "--per_class",
            "4",
            "--out",
            str(tmp_path / "g.png"),
            "--out_dir",
            str(tmp_path / "single"),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    im = Image.open(tmp_path / "g.png")
    assert im.size[0] > im.size[1] > 0  # 3 rows of 4
    assert len(list((tmp_path / "single").glob("*.png"))) == 12
    assert (
        main(["sample", "--model", ckpt, "--classes", "0,12", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "out of range" in caplog.text
    assert (
        main(
            [
                "sample",
                "--model",
                ckpt,
                "--tokenizer",
                str(tmp_path / "none.ckpt"),
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x.png").exists()


def test_sample_rejects_mismatched_tokenizer(digits_models, tmp_path, caplog):
    from movegen.checkpoint import atomic_torch_save, tokenizer_checkpoint
    from movegen.tokenizer import TokenizerConfig, VQTokenizer

    tok = VQTokenizer(
        TokenizerConfig(image_size=8, channel_mult=(1, 2), codebook_size=64, base_channels=16)
    )
    atomic_torch_save(
        tokenizer_checkpoint(tok, dataset={"name": "digits"}, metrics={}), tmp_path / "t.ckpt"
    )
    rc = main(
        [
            "sample",
            "--model",
            str(digits_models["standard"]),
            "--tokenizer",
            str(tmp_path / "t.ckpt"),
            "--out",
            str(tmp_path / "x.png"),
        ]
    )
    assert rc == 2 and "codebook size 64" in caplog.text


def _evaluate(models, digits_models, tmp_path, out, *extra):
    args = ["evaluate", "--model", json.dumps(models), "--features", f"classifier:{digits_models['classifier']}",
            "--num_samples", "200", "--sampling.cfg_scale", "1.5", "--seed", "0", "--cache_dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / out), "--device", "cpu", *extra]  # fmt: skip
    return main(args)


def test_evaluate_and_report(digits_models, tmp_path):
    models = [str(digits_models["standard"]), str(digits_models["move-x1"])]
    assert _evaluate(models, digits_models, tmp_path, "res", "--export_npz", "true") == 0
    r = json.loads((tmp_path / "res/move-x1.json").read_text())
    keys = ("fid", "is", "kid", "val_bits_per_token", "sampling", "features", "params_total", "flops_per_token",
            "train_tokens")  # fmt: skip
    for k in keys:
        assert k in r, k
    assert r["fid"] > 0 and r["reference_cache_hit"] is True  # computed once, for the first model
    assert json.loads((tmp_path / "res/standard.json").read_text())["reference_cache_hit"] is False
    # the held-out split is the primary reference; the training split is reported beside it
    refs = r["references"]
    assert list(refs) == ["test", "train"] and r["reference_split"] == "test"
    assert refs["test"]["size"] == len(load_dataset("digits", "test"))
    assert refs["train"]["size"] == len(load_dataset("digits", "train"))
    for k in ("fid", "kid", "kid_std", "precision", "recall"):
        assert r[k] == refs["test"][k] and r[f"{k}_train"] == refs["train"][k], k
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["fid"] != r["fid_train"]
    assert "is_train" not in r and r["is"] > 1  # IS needs no reference: once
    mem = r["memorisation"]
    assert (mem["train_split"], mem["heldout_split"]) == ("train", "test")
    assert mem["num_samples"] == 200 and mem["memorisation"] > 0
    npz = np.load(tmp_path / "res/move-x1.npz")
    assert npz["arr_0"].shape == (200, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    # same seed, same numbers
    assert _evaluate(models[1:], digits_models, tmp_path, "res2") == 0
    assert json.loads((tmp_path / "res2/move-x1.json").read_text())["fid"] == r["fid"]
    # a run scored with other features never shares a table with these
    other = dict(r, run="other-features", id="inception-x", features="inception")
    (tmp_path / "res/other.json").write_text(json.dumps(other))
    assert main(["report", "--results", str(tmp_path / "res"), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep/README.md").read_text()
    assert text.count("## Features:") == 2
    assert "| move-x1 |" in text and "| standard |" in text
    assert "| FID (train) | memorisation |" in text  # beside the held-out FID, never in its column
    assert len(list((tmp_path / "rep").glob("*.png"))) == 6


def test_sample_rejects_a_retrained_tokenizer(digits_models, tmp_path, caplog):
    from movegen.checkpoint import atomic_torch_save, load_tokenizer, tokenizer_checkpoint

    tok, ckpt = load_tokenizer(digits_models["dir"] / "tok/tokenizer.ckpt")
    with torch.no_grad():
        next(tok.decoder.parameters()).add_(1.0)  # same K and grid, other weights
    atomic_torch_save(
        tokenizer_checkpoint(tok, dataset=ckpt["dataset"], metrics={}), tmp_path / "t.ckpt"
    )
    rc = main(["sample", "--model", str(digits_models["move-x1"]), "--tokenizer", str(tmp_path / "t.ckpt"),
               "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert rc == 2 and "sha256" in caplog.text and not (tmp_path / "x.png").exists()


def test_generated_images_reach_the_native_size():
    from movegen.evaluate import content_crop as _content_crop

    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert _content_crop(x, {"dataset": {"fit": "pad", "native_size": 28}}).shape[-1] == 28
    assert torch.equal(
        _content_crop(x, {"dataset": {"fit": "pad", "native_size": 28}}), x[..., 2:30, 2:30]
    )
    assert _content_crop(x, {"dataset": {"fit": "resize", "native_size": 28}}).shape[-1] == 28
    assert _content_crop(x, {"dataset": {"fit": "resize", "native_size": 32}}) is x


def test_evaluation_memorisation_block_flags_a_copying_model():
    """Through the function ``evaluate`` scores its memorisation block with, in a real feature
    space (the digits' pixels): a "model" whose samples are its training images is flagged;
    one whose samples are unseen real images (the val split) is not."""
    from movegen.evaluate import score_memorisation

    def pixels(split):
        return load_dataset("digits", split).images.flatten(1).float()

    train, heldout, unseen = pixels("train"), pixels("test"), pixels("val")
    copier = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:170]]
    bad = score_memorisation(copier, train, heldout)
    ok = score_memorisation(unseen, train, heldout)
    assert bad["memorisation"] < 0.05 and bad["copy_z"] < -10 and bad["copy_fraction"] > 0.9
    assert 0.8 < ok["memorisation"] < 1.25 and abs(ok["copy_z"]) < 3 and ok["copy_fraction"] < 0.1
    assert (bad["num_samples"], bad["num_train"], bad["num_heldout"]) == (
        170,
        len(train),
        len(heldout),
    )
    # capped: the samples and held-out images are seeded subsets, every training image is searched
    capped = score_memorisation(copier, train, heldout, knn_max=50)
    assert (capped["num_samples"], capped["num_train"], capped["num_heldout"]) == (
        50,
        len(train),
        50,
    )
    assert capped["memorisation"] < 0.05


def test_memorisation_flags_copies_and_passes_fresh_samples():
    from movegen.metrics import memorisation

    g = torch.Generator().manual_seed(0)
    train, heldout, fresh = (torch.randn(n, 16, generator=g) for n in (500, 200, 300))
    copies = train[:300] + 1e-3 * torch.randn(300, 16, generator=g)
    ok, bad = memorisation(fresh, train, heldout), memorisation(copies, train, heldout)
    assert 0.9 < ok["memorisation"] < 1.1 and abs(ok["copy_z"]) < 3 and ok["copy_fraction"] < 0.05
    assert bad["memorisation"] < 0.01 and bad["copy_z"] < -10 and bad["copy_fraction"] > 0.95


def test_precision_recall_of_a_collapsed_generator():
    from movegen.metrics import precision_recall

    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    same = precision_recall(real, torch.randn(400, 8, generator=g))
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    # all samples near one real point: precise (inside the real manifold) but no recall
    collapsed = real[:1] + 0.01 * torch.randn(400, 8, generator=g)
    pr = precision_recall(real, collapsed)
    assert pr["precision"] > 0.95 and pr["recall"] < 0.1


def test_evaluation_over_two_processes_scores_the_images_of_one(digits_models, tmp_path):
    """torchrun with 2 CPU processes (gloo): each samples half of the images (other batch sizes
    too), the first scores them all: the numbers and the exported images of one process."""
    import os
    import socket
    import subprocess
    import sys

    model = [str(digits_models["move-x1"])]
    assert (
        _evaluate(
            model, digits_models, tmp_path, "one", "--batch_size", "64", "--export_npz", "true"
        )
        == 0
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["evaluate", "--model", json.dumps(model), "--features", f"classifier:{digits_models['classifier']}",
            "--num_samples", "200", "--sampling.cfg_scale", "1.5", "--seed", "0", "--cache_dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "two"), "--device", "cpu", "--batch_size", "7", "--export_npz", "true"]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), "-m", "movegen", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    one = json.loads((tmp_path / "one/move-x1.json").read_text())
    two = json.loads((tmp_path / "two/move-x1.json").read_text())
    assert two["processes"] == 2 and "processes" not in one
    npz1, npz2 = np.load(tmp_path / "one/move-x1.npz"), np.load(tmp_path / "two/move-x1.npz")
    assert np.array_equal(npz1["arr_0"], npz2["arr_0"]) and np.array_equal(
        npz1["arr_1"], npz2["arr_1"]
    )
    for k in ("fid", "kid", "is", "precision", "recall", "fid_train"):
        assert two[k] == pytest.approx(one[k], rel=1e-6, abs=1e-9), k
    assert two["memorisation"]["memorisation"] == pytest.approx(
        one["memorisation"]["memorisation"], rel=1e-6
    )


def _random_inception_weights(path: Path) -> Path:
    """A weights file in torch-fidelity's InceptionV3 layout with random values (the released file
    cannot be fetched here): ``benchmarks.fid50k.write_inception_weights``."""
    pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from benchmarks.fid50k import write_inception_weights

    return write_inception_weights(path)


@pytest.mark.background  # (two Inception passes: beside the others)
def test_inception_fid_equals_torch_fidelity(tmp_path):
    """movegen's Inception FID (features, float64 statistics) against torch-fidelity's own
    ``calculate_metrics`` on the same uint8 images and the same weights file."""
    tf = pytest.importorskip("torch_fidelity")
    weights = _random_inception_weights(tmp_path / "inception.pth")
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (24, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = (
        (a.int() * 3 // 4 + torch.randint(0, 64, a.shape, generator=g))
        .clamp(0, 255)
        .to(torch.uint8)
    )

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    theirs = tf.calculate_metrics(input1=Images(b), input2=Images(a), fid=True, cuda=False, batch_size=12,
                                  feature_extractor_weights_path=str(weights), verbose=False,
                                  cache=False)["frechet_inception_distance"]  # fmt: skip
    fid_net, _, desc = build_extractors("inception", str(weights))
    as_model_output = lambda u8: u8.float() / 127.5 - 1  # noqa: E731  (what a decoder hands the scorer)
    ours = fid_from_features(fid_net(as_model_output(a)), fid_net(as_model_output(b)))
    assert desc["features"] == "inception" and theirs > 0
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_a_reference_batch_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    import os

    import movegen.checkpoint as ck

    f, cache, calls, real = tmp_path / "ref.npz", tmp_path / "cache", [], ck.sha256_file
    f.write_bytes(b"a" * 1000)
    monkeypatch.setattr(ck, "sha256_file", lambda p, *a: calls.append(p) or real(p))
    first = ck.sha256_file_cached(f, cache)
    assert ck.sha256_file_cached(f, cache) == first == real(f) and len(calls) == 1
    f.write_bytes(b"b" * 1000)  # replaced: same size, another content and modification time
    os.utime(f, ns=(1, 1))
    assert ck.sha256_file_cached(f, cache) == real(f) != first and len(calls) == 2
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    assert ck.sha256_file_cached(f, blocked) == real(f)  # no cache: still the hash


def test_one_inception_pass_gives_the_three_feature_sets(tmp_path):
    """The evaluation's single pass (pool features, IS logits, sFID's mixed_6/conv) on uint8
    images equals the three networks of one kind each on the same images in [-1, 1]."""
    from movegen.metrics import InceptionFeatures

    weights = str(_random_inception_weights(tmp_path / "inception.pth"))
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1  # gray
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    pool, logits, spatial = InceptionFeatures(weights, "all")(u8)
    for kind, got in (("features", pool), ("logits", logits), ("spatial", spatial)):
        want = InceptionFeatures(weights, kind)(x)
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6), kind
    two = InceptionFeatures(weights, "pool+logits")(u8)
    assert torch.equal(two[0], pool) and torch.equal(two[1], logits)
    with pytest.raises(ValueError, match="kind must be one of"):
        InceptionFeatures(weights, "pool")


def test_adm_reference_batch_gives_fid_sfid_and_precision_recall(
    digits_models, tmp_path, monkeypatch
):
    """``evaluate --reference X.npz``: FID from the batch's mu/sigma equals FID against the
    images those statistics came from; sFID, KID and precision/recall come with it."""
    from movegen import evaluate
    from movegen.data import load_dataset
    from movegen.evaluate import reference_set
    from movegen.metrics import InceptionFeatures, feature_statistics, load_adm_reference

    # the reference: a seeded 40 of the test split's 180 images (their Inception pass on a CPU
    # is most of this test's time), the same 40 through evaluate's --ref_splits
    monkeypatch.setitem(evaluate.evaluate_model.__kwdefaults__, "ref_max", 40)

    weights = str(_random_inception_weights(tmp_path / "inception.pth"))
    model, cache = str(digits_models["standard"]), str(tmp_path / "cache")
    common = ["evaluate", "--model", model, "--features", "inception", "--inception_weights", weights,
              "--num_samples", "12", "--batch_size", "12", "--cache_dir", cache, "--device", "cpu"]  # fmt: skip
    # the test split's statistics as a reference batch, with 16 of its images as arr_0
    net, _, desc = build_extractors("inception", weights)
    ds = load_dataset("digits", "test", channels=1)
    res = ds[0][0].shape[-1]
    feats, _ = reference_set(
        net,
        desc["id"],
        "digits",
        "test",
        resolution=res,
        channels=1,
        cache_dir=cache,
        max_images=40,
    )
    assert len(feats) == 40
    x = torch.stack([ds[i][0] for i in range(16)])
    u8 = ((x.expand(-1, 3, -1, -1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    spatial = InceptionFeatures(weights, "spatial")(x)
    assert spatial.shape == (16, 17 * 17 * 7)
    mu, sigma = feature_statistics(feats)
    mu_s, sigma_s = feature_statistics(spatial)
    npz = tmp_path / "ref.npz"
    np.savez(npz, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, arr_0=u8)
    assert main([*common, "--reference", str(npz), "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--ref_splits", "[test]", "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "standard.json").read_text())
    b = json.loads((tmp_path / "b" / "standard.json").read_text())
    assert a["reference_split"] == "adm" and set(a["references"]) == {"adm"}
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-9)  # same statistics, same samples
    assert b["references"]["test"]["size"] == 40
    assert a["sfid"] > 0 and 0 <= a["precision"] <= 1 and a["references"]["adm"]["size"] == 16
    # mistakes: classifier features, a sample batch given as the reference
    bad = tmp_path / "samples.npz"
    np.savez(bad, arr_0=u8)
    with pytest.raises(
        ValueError, match="has keys \\['arr_0'\\]; an ADM reference batch has mu and sigma"
    ):
        load_adm_reference(bad)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])  # a truncated download
    with pytest.raises(ValueError, match="is not a readable .npz"):
        load_adm_reference(cut)
    assert main(["evaluate", "--model", model, "--features", f"classifier:{digits_models['classifier']}",
                 "--reference", str(npz), "--num_samples", "4", "--out", str(tmp_path / "c"),
                 "--device", "cpu"]) == 2  # fmt: skip
