"""``movegen study``: the digits smoke study end to end, resume and scheduling with stand-in
verbs, the statistics on hand-computed numbers, targets, the study YAMLs, and ``movegen report``
on a folder with a corrupt result."""

import json
import logging
import os
import sys
import textwrap
from pathlib import Path

import pytest

from movegen import study
from movegen.cli import main
from movegen.report import (
    check_target,
    choose_grid,
    mean_sd,
    paired_difference,
    t_quantile,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- statistics


def test_mean_and_sd_on_known_numbers():
    m, sd = mean_sd([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and sd == pytest.approx(1.2909944487)  # sqrt(5/3): the n - 1 estimate
    assert mean_sd([7.0]) == (7.0, None)
    assert mean_sd([]) == (None, None)


def test_t_quantiles_match_the_table():
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(30) == pytest.approx(2.0423, abs=1e-4)


def test_paired_difference_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    x, base = {0: 3.0, 1: 5.0, 2: 7.0, 9: 1.0}, {0: 2.0, 1: 3.0, 2: 4.0, 5: 0.0}
    d = paired_difference(x, base)
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3  # only the seeds both arms have
    assert d["mean"] == pytest.approx(2.0) and d["sd"] == pytest.approx(1.0)
    assert d["ci"][0] == pytest.approx(2 - 2.484138, abs=1e-5)
    assert d["ci"][1] == pytest.approx(2 + 2.484138, abs=1e-5)
    assert d["base_mean"] == pytest.approx(3.0) and d["pct"] == pytest.approx(200 / 3)
    assert d["per_seed_pct"] == pytest.approx({0: 50.0, 1: 200 / 3, 2: 75.0})
    one = paired_difference({0: 1.0}, {0: 2.0})
    assert one["mean"] == -1.0 and one["ci"] is None and one["pct"] == -50.0
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def _rec(arm, seed, bits, grid="g", budget="short", fid=None):
    r = {"arm": arm, "seed": seed, "grid": grid, "budget": budget, "status": "finished",
         "val_loss": bits * 0.6931, "val_bits_per_token": bits}  # fmt: skip
    if fid is not None:
        r.update(scores={"feat": {"test": {"fid": fid}}}, reference="test")
    return r


def test_grid_choice_is_the_lowest_mean_val_loss():
    recs = [_rec("a", 0, 5.0, "g0"), _rec("a", 1, 5.2, "g0"), _rec("a", 0, 5.3, "g1"),
            _rec("a", 1, 4.8, "g1"), _rec("a", 0, 4.0, "g2")]  # fmt: skip
    assert choose_grid(recs, "a", "short") == "g1"  # g2 has one seed of two: not a full point
    assert choose_grid(recs, "b", "short") is None


def test_targets_met_and_missed_with_margins():
    # move is 2%, 3%, 4% lower than standard per seed: mean 3% lower
    recs = [_rec("std", s, 10.0, fid=20.0) for s in (0, 1, 2)]
    recs += [
        _rec("move", s, 10.0 * (1 - p), fid=f)
        for s, p, f in ((0, 0.02, 19.0), (1, 0.03, 21.0), (2, 0.04, 19.0))
    ]
    t = {"arm": "move", "vs": "std", "metric": "val_bits_per_token", "budget": "short"}
    mean_t = check_target({**t, "at_least_pct_lower": 2.5}, recs)
    assert mean_t["met"] and mean_t["margin"] == pytest.approx(0.5)  # 3% vs 2.5%
    every = check_target({**t, "at_least_pct_lower": 2.5, "every_seed": True}, recs)
    assert not every["met"] and every["margin"] == pytest.approx(-0.5)  # seed 0 is only 2% lower
    absolute = check_target({**t, "at_least_lower": 0.25}, recs)
    assert absolute["met"] and absolute["margin"] == pytest.approx(0.05)
    higher = check_target({**t, "at_least_pct_higher": 1}, recs)
    assert not higher["met"] and higher["margin"] == pytest.approx(-4.0)
    assert check_target({**t, "at_least_pct_lower": 1, "significant": True}, recs)["met"]
    fid = check_target({**t, "metric": "fid", "at_least_pct_lower": 0, "significant": True}, recs)
    assert not fid["met"] and "includes 0" in fid["detail"]  # -1, +1, -1: the interval spans 0
    missing = check_target({**t, "arm": "lave", "at_least_pct_lower": 1}, recs)
    assert missing["met"] is None and "not measured" in missing["detail"]
    # an arm trained but not yet scored: not measured, not "different feature sets"
    unscored = [*recs[:3], *(_rec("lave", s, 9.0) for s in (0, 1, 2))]
    pending = check_target({**t, "arm": "lave", "metric": "fid", "at_least_pct_lower": 0}, unscored)
    assert (
        pending["met"] is None and "no seed with both arms finished and scored" in pending["detail"]
    )


# --------------------------------------------------------------------------- the study YAMLs


def test_study_configs_are_valid():
    from movegen.cli import load_model_config
    from movegen.model import cost_report

    smoke = study.load_study(ROOT / "configs/studies/digits-smoke.yaml")
    assert [a.name for a in smoke.arms] == ["standard", "move-x1"] and len(smoke.seeds) == 2
    fm = study.load_study(ROOT / "configs/studies/fashion-mnist.yaml")  # checks every override key
    assert {a.name for a in fm.arms} >= {
        "standard",
        "lave-x1",
        "move-x1",
        "move-x2",
        "move-x4",
        "move-x8",
    }
    assert len(fm.seeds) == 3 and [b.name for b in fm.budgets] == ["short", "long"]
    assert fm.budgets[0].args["trainer.max_steps"] == 600 and len(fm.grid) == 2
    for a in fm.arms:
        assert a.config.is_file() and str(a.config).startswith(str(ROOT / "configs/fashion-mnist"))
    # the dense control holds as many parameters as MoVE-x4 (to 2%), as its comment says
    import dataclasses

    dense = fm.arm("dense-x4params")
    cfg = load_model_config(str(dense.config))
    cfg = dataclasses.replace(cfg, **{k.split(".")[-1]: v for k, v in dense.overrides.items()})
    x4 = cost_report(load_model_config(str(ROOT / "configs/fashion-mnist/move-x4.yaml")))[
        "params_total"
    ]
    assert abs(cost_report(cfg)["params_total"] - x4) / x4 < 0.02


@pytest.mark.parametrize(
    "extra,message",
    [
        ("    overrides: {model.config.memory_densty: 4}\n", "memory_densty is not a fit setting"),
        ("    overrides: {data.seed: 3}\n", "set by the study itself"),
        ("    overrides: {model.config.n_embd: 100}\n", "bad model config"),
        ("    overrides: {data.num_workers: 2}\n", "data.num_workers has no effect"),
    ],
)
def test_a_bad_override_is_a_clear_error(tmp_path, caplog, extra, message):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path, arm_extra=extra))
    with caplog.at_level(logging.ERROR):
        assert main(["study", "--config", str(y), "--out", str(tmp_path / "out")]) == 2
    assert message in caplog.text
    assert not (tmp_path / "out" / "runs").exists()  # nothing started


@pytest.mark.parametrize(
    "evaluate,message",
    [
        ("{references: [test, test]}", "distinct splits"),
        ("{references: [holdout]}", "distinct splits"),
        ("{references: []}", "distinct splits"),
        ("{args: {ref_splits: [test]}}", "set it with evaluate.references"),
        ("{args: {num_samples: 5}}", "set it with evaluate.num_samples"),
        ("{args: {sampling.cfg_scale: 2}}", "set it with evaluate.sampling"),
    ],
)
def test_bad_references_are_a_clear_error(tmp_path, evaluate, message):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path, evaluate=evaluate))
    with pytest.raises(ValueError, match=message):
        study.load_study(y)


def test_references_default_to_the_held_out_split_then_train(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path, evaluate="{num_samples: 10}"))
    assert study.load_study(y).evaluate.references == ("test", "train")


# --------------------------------------------------------------------------- stand-in verbs

# Plays `movegen fit` / `movegen evaluate` in milliseconds, keeping their contracts: fit owns its
# --out (a non-empty one only with --resume or --overwrite, run.json with the status, exit 3 when
# the loss diverges), evaluate takes --ref_splits and writes one <run>.json scoring every
# reference, IS once and a memorisation block; both refuse flags the real verbs do not have.
FAKE_VERBS = r"""
import json, os, shutil, sys
from pathlib import Path

verb, a = sys.argv[1], sys.argv[2:]
flags = dict(zip([k[2:] for k in a[0::2]], a[1::2]))
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({"verb": verb, "flags": flags, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
out = Path(flags["out"])
if verb == "fit":
    resume, overwrite = flags.get("resume") == "true", flags.get("overwrite") == "true"
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        print(f"{out} already holds files; pass --resume true or --overwrite true", file=sys.stderr)
        sys.exit(2)
    if resume and not (out / "last.ckpt").exists():
        sys.exit(2)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"verb": "fit", "status": "running"}))
    seed = int(flags["seed_everything"])
    if os.environ.get("FAKE_FAIL") == f"seed{seed}":
        sys.exit(1)  # a crash: run.json stays behind
    if os.environ.get("FAKE_DIVERGE") == f"seed{seed}":
        msg = "the training loss became NaN or infinite at step 17; training stopped, no model.ckpt was written"
        (out / "last.ckpt").write_text("the state at step 10")
        (out / "run.json").write_text(json.dumps({"verb": "fit", "status": "diverged", "error": msg}))
        print("ERROR movegen.cli: " + msg, file=sys.stderr)
        sys.exit(3)
    drop = float(flags.get("model.config.resid_dropout", 0.1))
    move = "move" in Path(flags["config"]).name
    loss = 4.0 - 0.1 * move + drop * (1 if move else -1) + 0.01 * seed
    steps, every = int(flags["trainer.max_steps"]), int(flags["trainer.val_check_interval"])
    hist = [{"step": s, "val_loss": loss + 1 / s, "val_bits_per_token": (loss + 1 / s) / 0.693147,
             "train_tokens": 100 * s} for s in range(every, steps + 1, every)]
    (out / "model.ckpt").write_text("weights")
    (out / "last.ckpt").write_text("state")
    (out / "metrics.json").write_text(json.dumps({
        "status": "finished", "val_loss": loss, "val_bits_per_token": loss / 0.693147, "best_step": steps,
        "final_val_bits_per_token": hist[-1]["val_bits_per_token"], "steps": steps, "train_tokens": 100 * steps,
        "flops_per_token": 1000, "params_total": 10 + 5 * move, "params_memory": 5 * move,
        "memory": "move" if move else "none", "memory_slots": 2 * move, "history": hist,
        "resumed": resume}))
    (out / "run.json").write_text(json.dumps({"verb": "fit", "status": "finished", "steps": steps}))
elif verb == "evaluate":
    known = {"model", "features", "out", "num_samples", "batch_size", "seed", "ref_splits", "cache_dir",
             "data.root", "overwrite", "tokenizer"}
    if bad := [k for k in flags if k not in known and not k.startswith("sampling.")]:
        sys.exit(f"error: unrecognized arguments {bad}")
    out.mkdir(parents=True, exist_ok=True)
    run = Path(flags["model"]).parent
    m = json.loads((run / "metrics.json").read_text())
    refs = json.loads(flags.get("ref_splits", '["test", "train"]'))
    names = ("fid", "kid", "kid_std", "precision", "recall")
    blocks = {s: {"fid": 10 * m["val_loss"] / (2 if s == "train" else 1), "kid": 0.01, "kid_std": 0.001,
                  "precision": 0.7, "recall": 0.6 if s == "test" else 0.5, "size": 100,
                  "key": {"dataset": "digits", "split": s}, "cache_hit": False} for s in refs}
    held = next((s for s in refs if s != "train"), None)
    mem = {"memorisation": 0.8 if m.get("memory") == "move" else 0.95, "copy_z": -1.5, "copy_fraction": 0.02,
           "num_samples": 10, "num_train": 100, "num_heldout": 100, "train_split": "train",
           "heldout_split": held} if "train" in refs and held else None
    r = {"run": run.name, "id": "feat-1", "features": flags["features"], **{k: blocks[refs[0]][k] for k in names},
         "is": 2.0, "is_std": 0.1, **{f"{k}_{s}": blocks[s][k] for s in refs[1:] for k in names},
         "reference_split": refs[0], "references": blocks, "memorisation": mem,
         "num_samples": int(flags["num_samples"]), "seed": int(flags.get("seed", 0)),
         "sampling": {"cfg_scale": float(flags.get("sampling.cfg_scale", 1.0)), "temperature": 1.0},
         "reference": blocks[refs[0]]["key"]}
    (out / f"{run.name}.json").write_text(json.dumps(r))
"""


def _study_yaml(tmp_path: Path, *, arm_extra: str = "", grid: str = "", budgets: str = "", more: str = "",
                evaluate: str = "{num_samples: 10, references: [test, train]}") -> str:  # fmt: skip
    for name in ("codes", "val_codes"):
        (tmp_path / name).mkdir(exist_ok=True)
    (tmp_path / "classifier.ckpt").write_text("c")
    budgets = budgets or "  short: {max_steps: 20, val_check_interval: 10}\n"
    return textwrap.dedent(f"""\
        name: fake
        inputs:
          codes: {tmp_path / "codes"}
          val_codes: {tmp_path / "val_codes"}
          classifier: {tmp_path / "classifier.ckpt"}
        arms:
          standard:
            config: configs/digits/standard.yaml
        """) + arm_extra + textwrap.dedent("""\
          move-x1: {config: configs/digits/move-x1.yaml}
        seeds: [0, 1]
        """) + f"evaluate: {evaluate}\nbudgets:\n" + budgets + grid + more  # fmt: skip


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_verbs.py"
    script.write_text(FAKE_VERBS)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setattr(
        study.runs, "_movegen", lambda verb, *a: [sys.executable, str(script), verb, *a]
    )

    def read() -> list[dict]:
        return [json.loads(l) for l in calls.read_text().splitlines()] if calls.exists() else []

    return read


FIT_FILES = {"model.ckpt", "last.ckpt", "metrics.json", "config.yaml", "logs", "run.json"}


def test_resume_contract(tmp_path, fake):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path))
    out = tmp_path / "out"
    runs = out / "runs"
    d = {
        arm: {s: runs / arm / "default" / "short" / f"seed{s}" for s in (0, 1)}
        for arm in ("standard", "move-x1")
    }
    # standard/seed0: finished by an older fit (no status field) and evaluated against the test
    # split only; standard/seed1: interrupted with a last.ckpt; move-x1/seed0: a folder with
    # nothing resumable; move-x1/seed1: never started
    d["standard"][0].mkdir(parents=True)
    (d["standard"][0] / "model.ckpt").write_text("w")
    (d["standard"][0] / "metrics.json").write_text(
        json.dumps({"val_loss": 3.0, "history": [], "steps": 20})
    )
    stale = out / "evals" / "standard/default/short/seed0" / "seed0.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"id": "feat-1", "fid": 1.0, "reference_split": "test", "num_samples": 10,
                                 "seed": 0, "references": {"test": {"fid": 1.0}}}))  # fmt: skip
    d["standard"][1].mkdir(parents=True)
    (d["standard"][1] / "last.ckpt").write_text("state")
    (d["standard"][1] / "metrics.json").write_text(json.dumps({"status": "running"}))
    (d["move-x1"][0] / "logs").mkdir(parents=True)
    doc = study.run_study(y, out)
    fits = {c["flags"]["out"]: c["flags"] for c in fake() if c["verb"] == "fit"}
    assert set(fits) == {str(d["standard"][1]), str(d["move-x1"][0]), str(d["move-x1"][1])}
    assert fits[str(d["standard"][1])].get("resume") == "true"
    # nothing to resume: fit is told to replace its own files (it owns the folder), not bypassed
    assert fits[str(d["move-x1"][0])].get("overwrite") == "true"
    assert (
        "resume" not in fits[str(d["move-x1"][0])] and "overwrite" not in fits[str(d["move-x1"][1])]
    )
    # the seed reaches both the init and the data order
    assert all(f["seed_everything"] == f["data.seed"] == p[-1] for p, f in fits.items())
    # one evaluation per run scores both references (the stale test-only one is redone)
    evals = [c["flags"] for c in fake() if c["verb"] == "evaluate"]
    assert len(evals) == 4 and all(json.loads(e["ref_splits"]) == ["test", "train"] for e in evals)
    assert all("ref_split" not in e for e in evals)
    assert doc["complete"] and doc["launched"] == {"input": 0, "fit": 3, "evaluate": 4}
    rec = {r["id"]: r for r in doc["runs"]}["move-x1/default/short/seed1"]
    assert set(rec["scores"]["feat-1"]) == {"test", "train"} and rec["reference"] == "test"
    test, train = rec["scores"]["feat-1"]["test"], rec["scores"]["feat-1"]["train"]
    assert train["fid"] == test["fid"] / 2 and (test["precision"], test["recall"]) == (0.7, 0.6)
    assert rec["memorisation"]["memorisation"] == 0.8 and rec["memorisation"]["copy_z"] == -1.5
    assert rec["memorisation"]["copy_fraction"] == 0.02 and rec["is"] == 2.0
    assert rec["history"][-1]["step"] == 20
    # the evaluations live beside the runs, not in a fit's folder
    for arm in d.values():
        for run in arm.values():
            assert {p.name for p in run.iterdir()} <= FIT_FILES
    assert rec["eval_file"] == "evals/move-x1/default/short/seed1/seed1.json"
    readme = (out / "report" / "README.md").read_text()
    for col in ("FID (test)", "FID (train)", "precision (test)", "recall (test)", "memorisation"):
        assert f"| {col}" in readme or f" {col} |" in readme, col
    assert "| move-x1 | default | 2 |" in readme and "| 0.800 ± 0.000 |" in readme
    n = len(fake())
    again = study.run_study(y, out)
    assert len(fake()) == n and again["launched"] == {"input": 0, "fit": 0, "evaluate": 0}
    # another evaluation setting is not the evaluation asked for: it is redone, the fits kept
    y.write_text(_study_yaml(tmp_path, evaluate="{num_samples: 12, references: [test, train]}"))
    again = study.run_study(y, out)
    assert again["launched"] == {"input": 0, "fit": 0, "evaluate": 4}


def test_select_on_trains_only_the_chosen_point_on_other_budgets(tmp_path, fake):
    y = tmp_path / "s.yaml"
    grid = "grid: {model.config.resid_dropout: [0.0, 0.1]}\nselect_on: short\n"
    budgets = "  short: {max_steps: 20, val_check_interval: 10}\n  long: {max_steps: 40, val_check_interval: 10}\n"
    y.write_text(_study_yaml(tmp_path, grid=grid, budgets=budgets))
    doc = study.run_study(y, tmp_path / "out")
    fits = [c["flags"] for c in fake() if c["verb"] == "fit"]
    long = {
        (Path(f["config"]).stem, f["model.config.resid_dropout"])
        for f in fits
        if f["trainer.max_steps"] == "40"
    }
    # the stand-in's loss: MoVE is best without dropout, the standard model with it
    assert long == {("standard", "0.1"), ("move-x1", "0.0")}
    assert len(fits) == 2 * 2 * 2 + 2 * 2  # every point on short, the chosen one on long
    assert len(doc["runs"]) == 12 and doc["complete"]
    assert sum(c["verb"] == "evaluate" for c in fake()) == 12  # one per run
    rec = doc["runs"][-1]
    assert rec["scores"]["feat-1"]["train"]["fid"] == rec["scores"]["feat-1"]["test"]["fid"] / 2
    readme = (tmp_path / "out" / "report" / "README.md").read_text()
    assert "**resid_dropout-0.0**" in readme and "**resid_dropout-0.1**" in readme


def test_a_failed_run_is_reported_and_retried(tmp_path, fake, monkeypatch, caplog):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path))
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_FAIL", "seed1")
    with caplog.at_level(logging.ERROR):
        assert main(["study", "--config", str(y), "--out", str(out)]) == 2
    assert "did not succeed" in caplog.text and "Run the same command again" in caplog.text
    doc = json.loads((out / "study.json").read_text())
    status = {r["id"]: r["status"] for r in doc["runs"]}
    assert status == {"standard/default/short/seed0": "finished", "standard/default/short/seed1": "failed",
                      "move-x1/default/short/seed0": "finished", "move-x1/default/short/seed1": "failed"}  # fmt: skip
    assert (
        "exit status 1"
        in {r["id"]: r for r in doc["runs"]}["standard/default/short/seed1"]["detail"]
    )
    assert (out / "report" / "README.md").exists() and not doc["complete"]
    monkeypatch.delenv("FAKE_FAIL")
    n = len(fake())
    doc = study.run_study(y, out)
    retried = [c["flags"] for c in fake()[n:] if c["verb"] == "fit"]
    assert sorted(Path(f["out"]).name for f in retried) == ["seed1", "seed1"] and doc["complete"]
    assert all(f.get("overwrite") == "true" for f in retried)  # the crash left a folder behind


def test_a_diverged_run_is_recorded_reported_and_not_retried(tmp_path, fake, monkeypatch, caplog):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path))
    out = tmp_path / "out"
    monkeypatch.setenv("FAKE_DIVERGE", "seed1")
    with caplog.at_level(logging.WARNING):
        assert (
            main(["study", "--config", str(y), "--out", str(out)]) == 0
        )  # a result, not a failure
    assert "2 run(s) diverged" in caplog.text
    doc = json.loads((out / "study.json").read_text())
    by = {r["id"]: r for r in doc["runs"]}
    div = ["standard/default/short/seed1", "move-x1/default/short/seed1"]
    assert doc["diverged"] == div and doc["complete"]
    for i in div:
        assert by[i]["status"] == "diverged" and by[i]["diverged_step"] == 17
        assert "NaN or infinite" in by[i]["detail"] and not by[i].get("evaluated")
    assert [c["flags"]["out"].endswith("seed1") for c in fake() if c["verb"] == "evaluate"] == [
        False
    ] * 2
    readme = (out / "report" / "README.md").read_text()
    assert "2 of 4 runs finished, 2 diverged" in readme and "Diverged on `short`" in readme
    assert "| standard/default/short/seed1 | diverged at step 17 |" in readme
    assert "| standard | default | 1 (+1 diverged) |" in readme
    # a rerun, even once the cause is gone, does not train the diverged runs again
    monkeypatch.delenv("FAKE_DIVERGE")
    n = len(fake())
    again = study.run_study(y, out)
    assert len(fake()) == n and again["launched"] == {"input": 0, "fit": 0, "evaluate": 0}
    assert again["diverged"] == div


def test_changed_settings_are_refused(tmp_path, fake):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path))
    study.run_study(y, tmp_path / "out")
    y.write_text(_study_yaml(tmp_path, more="fit_args: {model.lr: 0.01}\n"))
    with pytest.raises(ValueError, match="was trained with"):
        study.run_study(y, tmp_path / "out")


def test_two_studies_in_one_folder_are_refused(tmp_path, fake):
    import fcntl

    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path))
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / "study.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another `movegen study` is running"):
            study.run_study(y, tmp_path / "out")
    assert fake() == []


def test_jobs_spread_over_gpus_and_never_exceed_parallel(tmp_path, monkeypatch):
    # each job records its GPU and its start/end; the scheduler may run at most 2 at once
    # (and its CPU threads: its share of the cores, GPU or not)
    code = ("import os, sys, time; t = time.time(); time.sleep(0.3); open(sys.argv[1], 'w').write("
            "f\"{os.environ['CUDA_VISIBLE_DEVICES']} {t} {time.time()} {os.environ['OMP_NUM_THREADS']}\")")  # fmt: skip
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    jobs = []
    for i in range(5):
        f = tmp_path / f"j{i}"
        jobs.append(study.Job(key=f"j{i}", kind="fit", deps=("j0",) if i == 4 else (),
                              prepare=lambda f=f: [sys.executable, "-c", code, str(f)],
                              done=lambda f=f: f.exists(), log=tmp_path / f"j{i}.log"))  # fmt: skip
    jobs.append(study.Job(key="bad", kind="fit", deps=(), prepare=lambda: [sys.executable, "-c", "exit(1)"],
                          done=lambda: True, log=tmp_path / "bad.log"))  # fmt: skip
    jobs.append(study.Job(key="after-bad", kind="fit", deps=("bad",), prepare=lambda: ["false"],
                          done=lambda: True, log=tmp_path / "x.log"))  # fmt: skip
    res = study.run_jobs(jobs, parallel=2, gpus=["3", "5"])
    assert res["bad"].state == "failed" and res["after-bad"].state == "skipped"
    assert all(res[f"j{i}"].state == "ok" for i in range(5))
    spans = [(tmp_path / f"j{i}").read_text().split() for i in range(5)]
    assert {s[0] for s in spans} == {"3", "5"}
    assert {s[3] for s in spans} == {"8"}  # 16 cores, 2 at once
    assert float(spans[4][1]) >= float(spans[0][2])  # j4 started after its dependency ended
    for s in spans:  # at no job's start were more than 2 jobs running
        t = float(s[1])
        assert sum(float(o[1]) <= t < float(o[2]) for o in spans) <= 2


def test_no_job_of_a_closed_kind_starts_after_its_time(tmp_path):
    # fits may start only in the first 0.3 s: the first two run past it and are evaluated after
    # it; the fit that waits on the first never starts, nor its evaluation, and nothing fails
    import time

    code = "import sys, time; time.sleep(float(sys.argv[2])); open(sys.argv[1], 'w')"

    def job(key, kind, deps=(), sleep=0.0):
        f = tmp_path / key
        return study.Job(key=key, kind=kind, deps=deps, log=tmp_path / f"{key}.log", done=f.exists,
                         prepare=lambda: [sys.executable, "-c", code, str(f), str(sleep)])  # fmt: skip

    # a fit finished in an earlier call, queued behind the two running fits: it is still settled
    # after the deadline (when a slot frees) and evaluated
    (tmp_path / "fit-c").touch()
    settled = study.Job(key="fit-c", kind="fit", deps=(), log=tmp_path / "c.log", prepare=lambda: None,
                        done=(tmp_path / "fit-c").exists)  # fmt: skip
    jobs = [job("fit-a", "fit", sleep=0.6), job("eval-a", "evaluate", ("fit-a",)),
            job("fit-b", "fit", ("fit-a",)), job("eval-b", "evaluate", ("fit-b",)),
            job("fit-x", "fit", sleep=0.6), settled, job("eval-c", "evaluate", ("fit-c",))]  # fmt: skip
    t = time.time()
    res = study.run_jobs(jobs, parallel=2, gpus=[], start_until={"fit": time.time() + 0.3})
    assert set(res) == {"fit-a", "eval-a", "fit-x", "fit-c", "eval-c"}
    assert all(res[k].state == "ok" for k in ("fit-a", "eval-a", "fit-x", "eval-c"))
    assert res["fit-c"].state == "done"
    assert (tmp_path / "eval-a").exists() and not (tmp_path / "fit-b").exists()
    assert time.time() - t < 10


def test_job_exit_states_settled_jobs_and_after(tmp_path):
    # a job that exits 3 is "diverged" (its dependents skipped, its `after` jobs run); prepare
    # may settle a job without running it
    out = tmp_path / "ran"
    jobs = [
        study.Job(key="div", kind="fit", deps=(), prepare=lambda: [sys.executable, "-c", "exit(3)"],
                  done=lambda: False, log=tmp_path / "div.log", exit_states={3: "diverged"}),
        study.Job(key="dep", kind="evaluate", deps=("div",), prepare=lambda: ["false"], done=lambda: True,
                  log=tmp_path / "dep.log"),
        study.Job(key="aft", kind="fit", deps=(), after=("div",),
                  prepare=lambda: [sys.executable, "-c", f"open({str(out)!r}, 'w')"],
                  done=out.exists, log=tmp_path / "aft.log"),
        study.Job(key="set", kind="fit", deps=(), prepare=lambda: study.Outcome("diverged", "before"),
                  done=lambda: False, log=tmp_path / "set.log"),
        study.Job(key="exit4", kind="fit", deps=(), prepare=lambda: [sys.executable, "-c", "exit(4)"],
                  done=lambda: False, log=tmp_path / "e4.log", exit_states={3: "diverged"}),
    ]  # fmt: skip
    res = study.run_jobs(jobs, parallel=2, gpus=[])
    assert res["div"].state == "diverged" and res["div"].rc == 3
    assert res["dep"].state == "skipped" and "div (diverged)" in res["dep"].detail
    assert res["aft"].state == "ok" and out.exists()
    assert res["set"].state == "diverged" and res["set"].rc is None
    assert res["exit4"].state == "failed"


# --------------------------------------------------------------------------- movegen report


def test_report_skips_a_corrupt_result_file(tmp_path, caplog):
    res = tmp_path / "results"
    res.mkdir()
    good = {"run": "a", "id": "feat", "features": "classifier:digits", "fid": 3.0, "num_samples": 10, "seed": 0,
            "sampling": {}, "reference": {"dataset": "digits", "split": "test"}}  # fmt: skip
    (res / "a.json").write_text(json.dumps(good))
    (res / "b.json").write_text(json.dumps({**good, "run": "b"})[:60])  # truncated mid-copy
    with caplog.at_level(logging.WARNING):
        readme = write_report(res, tmp_path / "report")
    assert "b.json" in caplog.text and "skipping" in caplog.text
    text = readme.read_text()
    assert "| a |" in text and "| b |" not in text


def test_report_shows_the_training_reference_and_memorisation_when_present(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    base = {"id": "feat", "features": "classifier:digits", "num_samples": 10, "seed": 0, "sampling": {},
            "reference": {"dataset": "digits", "split": "test"}, "reference_split": "test"}  # fmt: skip
    new = {**base, "run": "new", "fid": 3.0, "fid_train": 1.5, "precision": 0.7, "recall": 0.6,
           "references": {"test": {"fid": 3.0}, "train": {"fid": 1.5}},
           "memorisation": {"memorisation": 0.875, "copy_z": -2.0, "copy_fraction": 0.01}}  # fmt: skip
    (res / "new.json").write_text(json.dumps(new))
    (res / "old.json").write_text(json.dumps({**base, "run": "old", "fid": 4.0}))  # one reference
    text = write_report(res, tmp_path / "report").read_text()
    head = next(l for l in text.splitlines() if l.startswith("| run |"))
    assert head.endswith("| FID | IS | KID | precision | recall | FID (train) | memorisation |")
    assert "| new |" in text and "| 3.000 | – | – | 0.700 | 0.600 | 1.500 | 0.875 |" in text
    assert "| 4.000 | – | – | – | – | – | – |" in text and "reference: test" in text
    # a result whose primary reference is the training split gets a table of its own
    (res / "tr.json").write_text(json.dumps({**base, "run": "tr", "fid": 1.0, "reference_split": "train",
                                             "reference": {"dataset": "digits", "split": "train"}}))  # fmt: skip
    text = write_report(res, tmp_path / "report").read_text()
    assert text.count("| run |") == 2 and "reference: train" in text


# --------------------------------------------------------------------------- the smoke study


def test_digits_smoke_study_end_to_end(tmp_path):
    """The real verbs on the embedded digits data: inputs built, 2 arms x 2 seeds trained and
    evaluated, study.json and the report written; a second call trains and evaluates nothing."""
    out = tmp_path / "study"
    cfg = str(ROOT / "configs/studies/digits-smoke.yaml")
    assert main(["study", "--config", cfg, "--out", str(out)]) == 0
    doc = json.loads((out / "study.json").read_text())
    assert doc["complete"] and doc["launched"] == {"input": 4, "fit": 4, "evaluate": 4}
    assert len(doc["runs"]) == 2 * 2 * 1 * 1  # arms x seeds x budgets x grid points
    assert {(r["arm"], r["seed"]) for r in doc["runs"]} == {
        (a, s) for a in ("standard", "move-x1") for s in (0, 1)
    }
    for r in doc["runs"]:
        assert r["status"] == "finished" and r["steps"] == 30
        assert [h["step"] for h in r["history"]] == [10, 20, 30]
        assert r["history"][-1]["val_bits_per_token"] < r["history"][0]["val_bits_per_token"]
        ev, scores = r["evaluation"], r["scores"][r["evaluation"]["id"]]
        # one evaluation: the held-out split is the headline, train beside it
        assert ev["reference_split"] == "test" and list(scores) == ["test", "train"]
        assert (
            scores["test"]["fid"] == ev["fid"] > 0 and scores["train"]["fid"] == ev["fid_train"] > 0
        )
        assert 0 <= scores["test"]["precision"] <= 1 and 0 <= scores["test"]["recall"] <= 1
        assert r["memorisation"]["memorisation"] > 0 and "copy_z" in r["memorisation"]
        assert r["memorisation"]["heldout_split"] == "test"
        assert {
            p.name for p in (out / r["run_dir"]).iterdir()
        } <= FIT_FILES  # fit's folder, fit's files
        assert (out / r["eval_file"]).is_file()
        assert r["flops_per_token"] > 0 and r["params_total"] > 0 and r["wall_seconds"]["fit"] > 0
    by = {(r["arm"], r["seed"]): r for r in doc["runs"]}
    assert by[("standard", 0)]["val_loss"] != by[("standard", 1)]["val_loss"]  # seeds differ
    assert by[("move-x1", 0)]["params_memory"] > 0 == by[("standard", 0)]["params_memory"]
    readme = (out / "report" / "README.md").read_text()
    assert "| standard | resid_dropout-0.1 | 2 |" in readme and "| move-x1 |" in readme
    assert "Δ bits vs standard" in readme and "## Targets" in readme
    assert "| FID (test) | Δ FID (test) vs standard | FID (train) |" in readme
    assert "| precision (test) | recall (test) | IS | memorisation |" in readme
    assert "## Grid" in readme and ("**met**" in readme or "**missed**" in readme)
    for png in ("curves-short.png", "density-short.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in readme
    stamps = {
        p: p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.suffix in (".ckpt", ".json") and "runs" in p.parts
    }
    assert main(["study", "--config", cfg, "--out", str(out)]) == 0
    doc2 = json.loads((out / "study.json").read_text())
    assert doc2["launched"] == {"input": 0, "fit": 0, "evaluate": 0} and doc2["complete"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [r["val_bits_per_token"] for r in doc2["runs"]] == [
        r["val_bits_per_token"] for r in doc["runs"]
    ]


def test_study_inputs_pass_extraction_shifts_on(tmp_path):
    from movegen.study.runs import _input_jobs
    from movegen.study.spec import load_study

    text = (ROOT / "configs/studies/digits-smoke.yaml").read_text()
    cfg = tmp_path / "s.yaml"
    cfg.write_text(text.replace("codes: {split: train}", "codes: {split: train, shifts: 1}"))
    paths, jobs, settings = _input_jobs(load_study(cfg), tmp_path / "out")
    cmds = {j.key: j.prepare() for j in jobs}
    train, val = cmds["input:codes"], cmds["input:val_codes"]
    assert train[train.index("--shifts") + 1] == "1" and "--shifts" not in val
    assert settings["codes"]["shifts"] == 1  # part of the recipe a rerun is checked against


def test_select_seeds_choose_the_point_and_the_other_seeds_train_it_only(tmp_path, fake, caplog):
    y = tmp_path / "s.yaml"
    grid = "grid: {model.config.resid_dropout: [0.0, 0.1]}\nselect_on: long\nselect_seeds: [0]\n"
    budgets = ("  short: {max_steps: 20, val_check_interval: 10}\n"
               "  long: {max_steps: 40, val_check_interval: 10, patience: 3}\n")  # fmt: skip
    y.write_text(_study_yaml(tmp_path, grid=grid, budgets=budgets))
    doc = study.run_study(y, tmp_path / "out")
    fits = [c["flags"] for c in fake() if c["verb"] == "fit"]
    assert all(f["patience"] == "3" for f in fits if f["trainer.max_steps"] == "40")
    assert not any("patience" in f for f in fits if f["trainer.max_steps"] == "20")
    by = {}
    for f in fits:
        by.setdefault((Path(f["config"]).stem, f["trainer.max_steps"]), set()).add(
            (f["seed_everything"], f["model.config.resid_dropout"]))  # fmt: skip
    # seed 0 tries both points on long; seed 1 there and both seeds on short train the choice
    assert by[("standard", "40")] == {("0", "0.0"), ("0", "0.1"), ("1", "0.1")}
    assert by[("move-x1", "40")] == {("0", "0.0"), ("0", "0.1"), ("1", "0.0")}
    assert by[("standard", "20")] == {("0", "0.1"), ("1", "0.1")}
    assert by[("move-x1", "20")] == {("0", "0.0"), ("1", "0.0")}
    assert doc["complete"] and doc["select_seeds"] == [0] and len(doc["runs"]) == 2 * (3 + 2)
    readme = (tmp_path / "out" / "report" / "README.md").read_text()
    assert "with seed 0 (the other seeds train the chosen point only)" in readme
    # the small files alone (records, metrics, evaluations: what a machine given back between
    # calls can keep) carry the study on: no fit or evaluation again, the same choice
    for ckpt in (tmp_path / "out" / "runs").rglob("*.ckpt"):
        ckpt.unlink()
    n = len(fake())
    again = study.run_study(y, tmp_path / "out")
    assert len(fake()) == n and again["launched"] == {"input": 0, "fit": 0, "evaluate": 0}
    assert again["complete"] and [r["id"] for r in again["runs"]] == [r["id"] for r in doc["runs"]]
    # a run without its checkpoint and without its evaluation is trained again
    ev = next((tmp_path / "out" / "evals").rglob("*.json"))
    ev.unlink()
    with caplog.at_level(logging.WARNING):
        again = study.run_study(y, tmp_path / "out")
    assert again["launched"] == {"input": 0, "fit": 1, "evaluate": 1}
    assert (
        "finished before but has no current evaluation, and its model.ckpt is gone" in caplog.text
    )
    with pytest.raises(ValueError, match="select_seeds needs select_on"):
        y.write_text(_study_yaml(tmp_path, grid="grid: {model.config.resid_dropout: [0.0, 0.1]}\nselect_seeds: [0]\n",
                                 budgets=budgets))  # fmt: skip
        study.run_study(y, tmp_path / "out2")


def test_inputs_folder_replaces_the_recipes(tmp_path, fake):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path))
    inp = tmp_path / "built"
    with pytest.raises(ValueError, match="lacks tokenizer/tokenizer.ckpt, codes-train"):
        study.run_study(y, tmp_path / "out", inputs=inp)
    for rel in ("tokenizer", "codes-train", "codes-val", "classifier"):
        (inp / rel).mkdir(parents=True)
    (inp / "tokenizer/tokenizer.ckpt").write_text("t")
    (inp / "classifier/classifier.ckpt").write_text("c")
    with pytest.raises(ValueError, match=r"--arms: \['move-x9'\] not in"):
        study.run_study(y, tmp_path / "out", inputs=inp, arms=["move-x9"])
    doc = study.run_study(y, tmp_path / "out", inputs=inp, arms=["standard"])
    # the record keeps every arm: the other one's runs pending, not dropped
    assert doc["arms"] == ["standard", "move-x1"] and doc["arms_subset"] == ["standard"]
    assert [r["status"] for r in doc["runs"] if r["arm"] == "standard"] == ["finished"] * 2
    assert [r["status"] for r in doc["runs"] if r["arm"] == "move-x1"] == ["pending"] * 2
    assert not doc["complete"] and doc["launched"]["fit"] == 2
    doc = study.run_study(y, tmp_path / "out", inputs=inp, arms=["move-x1"])
    assert doc["launched"]["fit"] == 2  # the other arm only (standard's runs are settled)
    assert doc["complete"] and doc["inputs"]["codes"] == str(inp.resolve() / "codes-train")
    # a subset call after the others finished leaves every arm's records in study.json
    doc = study.run_study(y, tmp_path / "out", inputs=inp, arms=["standard"])
    assert doc["launched"]["fit"] == 0 and len(doc["runs"]) == 4 and doc["complete"]
    fits = [c["flags"] for c in fake() if c["verb"] == "fit"]
    assert {f["data.codes"] for f in fits} == {str(inp.resolve() / "codes-train")}
    assert {c["flags"]["features"] for c in fake() if c["verb"] == "evaluate"} == {
        "classifier:" + str(inp.resolve() / "classifier/classifier.ckpt")
    }
    # the model's code store records where the tokenizer was when the codes were extracted (often
    # another machine's path); the evaluation is given the study's own
    assert {c["flags"]["tokenizer"] for c in fake() if c["verb"] == "evaluate"} == {
        str(inp.resolve() / "tokenizer/tokenizer.ckpt")
    }


def _interrupted_study(y, out, monkeypatch):
    """`movegen study` interrupted (Ctrl-C) before any job runs: it still writes its report."""

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(study, "run_jobs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(y, out)


def test_an_interrupted_study_still_reports_what_finished(tmp_path, fake, monkeypatch):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path))
    out = tmp_path / "out"
    study.run_study(y, out, arms=["standard"])  # two runs finished and evaluated
    (out / "report" / "README.md").unlink()
    _interrupted_study(y, out, monkeypatch)
    readme = (out / "report" / "README.md").read_text()
    assert "2 of 4 runs finished" in readme
    assert not json.loads((out / "study.json").read_text())["complete"]


def test_a_study_told_to_stop_starting_fits_ends_incomplete_and_goes_on_later(
    tmp_path, fake, caplog
):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        doc = study.run_study(y, out, stop_fits_after=0)
    assert doc["launched"]["fit"] == 0 and not doc["complete"]
    assert "stopped starting fits after 0 s: 4 fit(s) and 4 evaluation(s) left" in caplog.text
    with caplog.at_level(logging.INFO):
        again = study.run_study(y, out)
    assert again["complete"] and again["launched"] == {"input": 0, "fit": 4, "evaluate": 4}
    assert "progress: fits 1/4, evaluations 0/4" in caplog.text  # logged as runs end
    assert "progress: fits 4/4, evaluations 4/4" in caplog.text


def test_plan_says_what_a_call_would_do_and_does_nothing(tmp_path, fake, capsys):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path))
    out = tmp_path / "out"
    fresh = study.run_study(y, out, plan=True)
    assert not out.exists() and fake() == []  # nothing written, nothing run
    assert (fresh["fits"], fresh["evaluations"]) == (4, 4)
    study.run_study(y, out, arms=["standard"])  # standard's two runs: trained and evaluated
    next((out / "evals" / "standard").rglob("seed1.json")).unlink()
    n, before = len(fake()), sorted(p.name for p in out.rglob("*"))
    assert main(["study", "--config", str(y), "--out", str(out), "--plan", "true"]) == 0
    printed = capsys.readouterr().out
    assert "| standard/default/short/seed0 | settled |" in printed
    assert "| standard/default/short/seed1 | evaluate |" in printed
    assert "| move-x1/default/short/seed0 | fit, evaluate |" in printed
    assert "2 fit(s) and 3 evaluation(s) to run" in printed
    args = ["study", "--config", str(y), "--out", str(out), "--plan", "true"]
    assert main([*args, "--arms", "[standard]"]) == 0
    printed = capsys.readouterr().out
    assert "| move-x1/default/short/seed0 | not in --arms |" in printed
    assert "0 fit(s) and 1 evaluation(s) to run" in printed
    assert len(fake()) == n and sorted(p.name for p in out.rglob("*")) == before


def test_a_target_judged_on_part_of_the_seeds_says_so(tmp_path, fake, monkeypatch):
    import shutil

    y = tmp_path / "s.yaml"
    target = "targets:\n  - {arm: move-x1, vs: standard, metric: val_bits_per_token, budget: short, at_least_lower: -100}\n"
    y.write_text(_study_yaml(tmp_path, more=target))
    out = tmp_path / "out"
    study.run_study(y, out)
    done = (out / "report" / "README.md").read_text()
    assert (
        "at least -100 lower than `standard` on `short`: **met**" in done
        and "provisional" not in done
    )
    for d in (*out.glob("runs/move-x1/*/short/seed1"), *out.glob("evals/move-x1/*/short/seed1")):
        shutil.rmtree(d)  # as if that run had not been trained yet
    _interrupted_study(y, out, monkeypatch)
    part = (out / "report" / "README.md").read_text()
    assert "(provisional: 1 of 2 seeds so far); Δ" in part and "(1 seed)" in part


def test_an_unreadable_reference_dataset_stops_the_study_before_any_fit(tmp_path, fake):
    y = tmp_path / "s.yaml"
    missing = tmp_path / "no-images"
    text = _study_yaml(tmp_path).replace(
        "inputs:\n", f"inputs:\n  data: {{name: 'folder:{missing}'}}\n", 1
    )
    y.write_text(text)
    with pytest.raises(
        ValueError, match="the evaluation's test reference of folder:.* cannot be read"
    ):
        study.run_study(y, tmp_path / "out")
    assert not [c for c in fake() if c["verb"] == "fit"]


def test_the_longest_budget_fits_first_and_the_choosing_budget_before_all(tmp_path, fake):
    budgets = ("  short: {max_steps: 20, val_check_interval: 10}\n  long: {max_steps: 40, val_check_interval: 10}\n"
               "  mid: {max_steps: 30, val_check_interval: 10}\n")  # fmt: skip
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path, budgets=budgets))
    study.run_study(y, tmp_path / "out", parallel=1)
    steps = [f["flags"]["trainer.max_steps"] for f in fake() if f["verb"] == "fit"]
    assert steps == ["40"] * 4 + ["30"] * 4 + ["20"] * 4  # 2 arms x 2 seeds per budget
    # with a grid chosen on the short budget, its choosing runs start first
    grid = "grid: {model.config.resid_dropout: [0.0, 0.1]}\nselect_on: short\n"
    y.write_text(_study_yaml(tmp_path, budgets=budgets, grid=grid))
    before = len(fake())
    study.run_study(y, tmp_path / "out2", parallel=1)
    steps = [f["flags"]["trainer.max_steps"] for f in fake()[before:] if f["verb"] == "fit"]
    assert steps == ["20"] * 8 + ["40"] * 4 + ["30"] * 4, steps


def test_study_report_shows_the_config_relative_to_the_working_directory(tmp_path, monkeypatch):
    from movegen.report import _shown_path

    (tmp_path / "configs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert _shown_path(str(tmp_path / "configs/s.yaml")) == "configs/s.yaml"
    assert _shown_path("/elsewhere/s.yaml") == "/elsewhere/s.yaml"  # outside it: as recorded
