"""Every benchmark still runs as a module (``python -m benchmarks.X --smoke``: tiny, CPU) and
prints its table and JSON line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(module, *args):
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize(
    "script,extra",
    [
        ("train_step", ["--modes", "eager"]),
        ("move_mix", []),
        # (the interpreter: in the background)
        pytest.param("bank_grad", [], marks=pytest.mark.background),
        ("move_floor", []),
        ("sampling", []),
        ("decode_kernel", []),
        ("vq_decode", ["--variants", "eager,cl"]),
        ("block_ops", []),
        ("train_step", ["--modes", "eager", "--arms", "standard@unfused,move-x1@grouped+unfused"]),
    ],
)
def test_benchmark_smoke(script, extra):
    out = run(script, "--smoke", *extra)
    line = next(l for l in out.splitlines() if l.startswith("JSON "))
    payload = json.loads(line[5:].replace("NaN", "null"))
    assert payload["rows"] and out.rstrip().splitlines()[-1].startswith("|")


def test_ddp_benchmark_smoke(tmp_path):
    run("ddp", "--smoke", "--out", str(tmp_path / "r.json"))
    out = run("ddp", "--table", str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["tokens_per_s"] > 0 and "x 1 GPU" in out


def test_peer_llamagen_smoke():
    """LlamaGen's model beside movegen's under one protocol (needs a checkout of LlamaGen)."""
    import os

    root = os.environ.get("MOVEGEN_LLAMAGEN")
    if not root:
        pytest.skip("set MOVEGEN_LLAMAGEN to a checkout of FoundationVision/LlamaGen")
    out = run("peer_llamagen", "--llamagen", str(Path(root).resolve()), "--smoke")
    payloads = [json.loads(l[5:]) for l in out.splitlines() if l.startswith("JSON ")]
    train, sample = payloads
    arms = [r["arm"] for r in train["rows"]]
    assert arms[0] == "llamagen" and {"standard", "move-x1"} <= set(arms)
    assert all(r["speed_vs_llamagen"] > 0 for r in train["rows"][1:])
    assert all(r["codes_ok"] for r in sample["rows"])


def _payloads(out: str) -> dict:
    return {
        p["benchmark"]: p
        for p in (json.loads(l[5:]) for l in out.splitlines() if l.startswith("JSON "))
    }


def test_fid50k_extraction_smoke():
    """The extraction half of the FID-50k benchmark (``movegen extract-codes`` over a written
    JPEG folder, plain and ten-crop): every image coded, 10 views with ten-crop."""
    out = run("fid50k", "--smoke", "--parts", "extract")
    rows = _payloads(out)["fid50k_extract"]["rows"]
    assert [(r["views"], r["num_views"]) for r in rows] == [("plain", 2), ("ten-crop", 10)]
    assert all(r["images"] == 12 and r["grid"] == "4x4" and r["images_per_s"] > 0 for r in rows)
    assert out.rstrip().splitlines()[-1].startswith("|")


@pytest.mark.slow
def test_fid50k_smoke():
    """The whole FID-50k benchmark on tiny models: ``evaluate_model`` with torch-fidelity's
    InceptionV3 (random weights) against a written ADM batch, each phase timed (~30 s on 2 CPU
    cores, most of it the 2048-dimensional FID eigenproblems and Inception at 299 x 299)."""
    pytest.importorskip("torch_fidelity")
    payloads = _payloads(run("fid50k", "--smoke", "--only", "standard:4:8,move-x1:4:8:compiled"))
    rows = payloads["fid50k_eval"]["rows"]
    assert [(r["arm"], r["decode"]) for r in rows] == [
        ("standard", "serial"),
        ("move-x1", "compiled"),
    ]
    for r in rows:
        assert r["scores_finite"] and r["num_samples"] == 8
        assert all(
            r[f"{p}_s"] > 0
            for p in ("setup", "sample", "decode", "inception", "ref_feats", "scoring")
        )
        # the timed phases and the untimed rest make up the total
        assert r["other_s"] >= 0 and r["other_s"] < 0.2 * r["total_s"]
    assert len(payloads["fid50k_extract"]["rows"]) == 2


def test_profile_compare_orders_kernels_by_what_later_arms_add():
    """``profile_step --compare``'s table: kernels ordered by the later arms' largest excess over
    the first arm, kernels under ``min_ms`` in every arm left out, per-arm totals at the foot."""
    from benchmarks.profile_step import compare_table

    times = [{"gemm": 10.0, "norm": 2.0}, {"gemm": 10.5, "norm": 1.5, "mix": 3.0, "tiny": 0.01}]
    lines = compare_table(["standard", "move-x1"], times, [12.5, 15.5], 0.05).splitlines()
    rows = [l.split("|")[1].strip() for l in lines[2:]]
    assert rows == ["mix", "gemm", "norm", "all kernels", "wall time (unprofiled)"]
    assert lines[-2].split("|")[2:4] == [f" {12.0:>9.2f} ", f" {15.01:>9.2f} "]
    # inductor numbers its kernels per graph: the same fused kernel is one row across the arms
    times = [{"triton_red_fused_softmax_9": 1.5, "triton_poi_fused_copy_3": 0.1, "gemm_1": 1.0},
             {"triton_red_fused_softmax_12": 1.6, "triton_poi_fused_copy_4": 0.2, "gemm_2": 1.0}]  # fmt: skip
    lines = compare_table(["standard", "move-x1"], times, [None, None], 0.05).splitlines()
    rows = {l.split("|")[1].strip(): l.split("|")[2:5] for l in lines[2:]}
    assert set(rows) == {"triton_red_fused_softmax", "triton_poi_fused_copy", "gemm_1", "gemm_2",
                         "all kernels"}  # fmt: skip
    assert float(rows["triton_red_fused_softmax"][2]) == pytest.approx(0.1)


def test_arm_options_add_remove_and_refuse_contradictions(monkeypatch):
    """An arm's ``@`` options: a default op given again is a no-op (arm names of earlier tables
    still run), ``no`` removes one, ``unfused`` then an op keeps only that op, the bank
    gradient's kernel and the grouped mix kernels' form are set for the arm and back to the
    default after it, and an op with its ``no`` form (or two bank kernels, or two mix forms) is
    refused."""
    sys.path.insert(0, str(ROOT))
    from benchmarks._util import apply_arm_options, arm_options
    from movegen.model import GPT, GPTConfig

    model = GPT(GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16))
    default = model.fused_ops
    for arm, ops in [("standard@ropeattn+ropesave", default),
                     ("standard@noropesave", tuple(o for o in default if o != "ropesave")),
                     ("standard@unfused+attn", ("attn",)), ("standard@gates", (*default, "gates"))]:  # fmt: skip
        model.fused_ops = default
        name, opts = arm_options(arm)
        apply_arm_options(model, opts)
        assert name == "standard" and model.fused_ops == ops, (arm, model.fused_ops)
    from movegen import kernels

    monkeypatch.setattr(kernels, "BANK_KERNEL", None)  # back to it after the test, pass or fail
    monkeypatch.setattr(kernels, "MIX_KERNEL", None)
    for arm, kern, mix in [
        ("move-x4@banklayers", "layers", None),
        ("move-x4@bankruns+mixdot", "runs", "dot"),
        ("move-x4@banklanes", "lanes", None),
        ("move-x1@grouped+mixlanes", None, "lanes"),
        ("move-x4@mixdotbwd", None, "dot-bwd"),
        ("move-x4", None, None),
    ]:
        apply_arm_options(model, arm_options(arm)[1])
        assert (kernels.BANK_KERNEL, kernels.MIX_KERNEL) == (kern, mix), arm
    for arm in ("standard@ce+noce", "standard@splitmix", "move-x1@grouped+token",
                "move-x4@bankruns+banklayers", "move-x1@banklanes+banklayers", "move-x4@mixdot+mixlanes"):  # fmt: skip
        with pytest.raises(ValueError):
            arm_options(arm)


def test_iqr_is_not_widened_by_one_slow_step():
    """The step table's IQR column: one slow step among fifteen (a host hiccup) leaves it where
    the other steps put it, where max - min takes the outlier whole."""
    from benchmarks._util import iqr

    steady = [100.0 + 0.1 * i for i in range(15)]
    hiccup = steady[:-1] + [700.0]
    assert iqr(hiccup) == pytest.approx(iqr(steady), rel=0.1)
    assert iqr(steady) == pytest.approx(0.8, rel=0.1)
    assert max(hiccup) - min(hiccup) > 500
    assert math.isnan(iqr([1.0]))


def test_id_distributions_zipf_fit_and_a_stores_histogram(tmp_path):
    """The benchmarks' id distributions: Zipf's exponent fitted to a perplexity gives that
    perplexity back; a code store's rank-frequency curve at its own number of codes is its
    sorted histogram, and stretched to more codes keeps its order and about its perplexity
    ratio; codes are drawn in ``[1, K)``; an unknown name says which exist."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks._util import perplexity, random_codes, rank_probabilities, zipf_exponent
    from movegen.data import write_code_store

    n = 4096
    for ratio in (0.93, 0.5):
        s = zipf_exponent(ratio, n)
        assert perplexity(rank_probabilities(f"zipf:{s}", n)) / n == pytest.approx(ratio, abs=1e-6)
    # Zipf(1) is a far stronger skew than the fit to 93% of a codebook
    assert zipf_exponent(0.93, 16383) == pytest.approx(0.3, abs=0.01)
    assert perplexity(rank_probabilities("zipf", 16383)) < 0.07 * 16383
    # a store of 8 codes: counts 40, 20, 10, 10, 5, 5, 5, 5 (code order shuffled)
    counts = [40, 20, 10, 10, 5, 5, 5, 5]
    flat = np.concatenate(
        [np.full(c, k, dtype=np.int64) for k, c in zip([3, 0, 7, 1, 5, 2, 6, 4], counts)]
    )
    codes = np.random.default_rng(0).permutation(flat).reshape(-1, 1, 4)
    store = write_code_store(tmp_path / "s", [(codes, np.zeros(len(codes), dtype=np.int64))], num_items=len(codes),
                             views=1, h=2, w=2, header={"codebook_size": 8, "num_classes": 1})  # fmt: skip
    own = rank_probabilities(f"store:{store}", 8)
    torch.testing.assert_close(own, torch.tensor(counts, dtype=torch.float64) / sum(counts))
    wide = rank_probabilities(f"store:{store}", 64)
    assert wide.sum().item() == pytest.approx(1.0) and bool((wide[:-1] >= wide[1:]).all())
    assert perplexity(wide) / 64 == pytest.approx(perplexity(own) / 8, rel=0.1)
    g = torch.Generator().manual_seed(0)
    for dist in ("uniform", "zipf:0.3", f"store:{store}"):
        ids = random_codes((4, 256), 64, dist, generator=g)
        assert ids.shape == (4, 256) and ids.min() >= 1 and ids.max() < 64, dist
    with pytest.raises(ValueError, match="uniform, zipf"):
        random_codes((2, 2), 64, "lognormal", generator=g)
    for bad in ("zipf:high", "zipf:", "zipf:-1", "zipf:nan"):
        with pytest.raises(ValueError, match="zipf:0.3"):
            rank_probabilities(bad, 8)
    with pytest.raises(ValueError, match="no fit"):
        zipf_exponent(1e-9, n)
