"""``movegen study``: the digits smoke study end to end, resume and scheduling with stand-in
verbs, the statistics on hand-computed numbers, targets, the study YAMLs, and ``movegen report``
on a folder with a corrupt result."""

import json
import logging
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
    ],
)
def test_a_bad_override_is_a_clear_error(tmp_path, caplog, extra, message):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path, arm_extra=extra))
    with caplog.at_level(logging.ERROR):
        assert main(["study", "--config", str(y), "--out", str(tmp_path / "out")]) == 2
    assert message in caplog.text
    assert not (tmp_path / "out" / "runs").exists()  # nothing started


# --------------------------------------------------------------------------- stand-in verbs

# Plays `movegen fit` / `movegen evaluate` in milliseconds: writes what the real verbs write
# (metrics.json with the fields study.py reads, model.ckpt, <run>.json) and logs every call.
FAKE_VERBS = r"""
import json, os, sys
from pathlib import Path

verb, a = sys.argv[1], sys.argv[2:]
flags = dict(zip([k[2:] for k in a[0::2]], a[1::2]))
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps({"verb": verb, "flags": flags, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
out = Path(flags["out"])
if verb == "fit":
    seed = int(flags["seed_everything"])
    if os.environ.get("FAKE_FAIL") == f"seed{seed}":
        sys.exit(3)
    out.mkdir(parents=True, exist_ok=True)
    drop = float(flags.get("model.config.resid_dropout", 0.1))
    move = "move" in Path(flags["config"]).name
    loss = 4.0 - 0.1 * move + drop * (1 if move else -1) + 0.01 * seed
    steps, every = int(flags["trainer.max_steps"]), int(flags["trainer.val_check_interval"])
    hist = [{"step": s, "val_loss": loss + 1 / s, "val_bits_per_token": (loss + 1 / s) / 0.693147,
             "train_tokens": 100 * s} for s in range(every, steps + 1, every)]
    (out / "model.ckpt").write_text("weights")
    (out / "metrics.json").write_text(json.dumps({
        "status": "finished", "val_loss": loss, "val_bits_per_token": loss / 0.693147, "best_step": steps,
        "final_val_bits_per_token": hist[-1]["val_bits_per_token"], "steps": steps, "train_tokens": 100 * steps,
        "flops_per_token": 1000, "params_total": 10 + 5 * move, "params_memory": 5 * move,
        "memory": "move" if move else "none", "memory_slots": 2 * move, "history": hist,
        "resumed": flags.get("resume") == "true"}))
elif verb == "evaluate":
    out.mkdir(parents=True, exist_ok=True)
    run = Path(flags["model"]).parent
    m = json.loads((run / "metrics.json").read_text())
    split = flags.get("ref_split", "train")
    r = {"run": run.name, "id": "feat-1", "features": flags["features"], "fid": 10 * m["val_loss"], "is": 2.0,
         "kid": 0.01, "reference": {"split": split}, "memorisation": {"score": 0.5}}
    if os.environ.get("FAKE_REFS"):  # the evaluate that scores every reference in one call
        r["references"] = {"test": {"fid": r["fid"]}, "train": {"fid": r["fid"] / 2}}
    (out / f"{run.name}.json").write_text(json.dumps(r))
"""


def _study_yaml(tmp_path: Path, *, arm_extra: str = "", grid: str = "", budgets: str = "",
                more: str = "") -> str:  # fmt: skip
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
        evaluate: {num_samples: 10, references: [test, train]}
        """) + "budgets:\n" + budgets + grid + more  # fmt: skip


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


def test_resume_contract(tmp_path, fake):
    y = tmp_path / "s.yaml"
    y.write_text(_study_yaml(tmp_path))
    out = tmp_path / "out"
    runs = out / "runs"
    d = {
        arm: {s: runs / arm / "default" / "short" / f"seed{s}" for s in (0, 1)}
        for arm in ("standard", "move-x1")
    }
    # standard/seed0: finished by today's fit (no status field); standard/seed1: interrupted with a
    # last.ckpt; move-x1/seed0: a folder with nothing resumable; move-x1/seed1: never started
    d["standard"][0].mkdir(parents=True)
    (d["standard"][0] / "model.ckpt").write_text("w")
    (d["standard"][0] / "metrics.json").write_text(
        json.dumps({"val_loss": 3.0, "history": [], "steps": 20})
    )
    d["standard"][1].mkdir(parents=True)
    (d["standard"][1] / "last.ckpt").write_text("state")
    (d["standard"][1] / "metrics.json").write_text(json.dumps({"status": "running"}))
    (d["move-x1"][0] / "logs").mkdir(parents=True)
    doc = study.run_study(y, out)
    fits = {c["flags"]["out"]: c["flags"] for c in fake() if c["verb"] == "fit"}
    assert set(fits) == {str(d["standard"][1]), str(d["move-x1"][0]), str(d["move-x1"][1])}
    assert fits[str(d["standard"][1])].get("resume") == "true"
    assert "resume" not in fits[str(d["move-x1"][0])] and not (d["move-x1"][0] / "logs").exists()
    # the seed reaches both the init and the data order
    assert all(f["seed_everything"] == f["data.seed"] == p[-1] for p, f in fits.items())
    # two references on a verb that scores one per call: two evaluations per run
    evals = [c for c in fake() if c["verb"] == "evaluate"]
    assert sorted(c["flags"]["ref_split"] for c in evals) == ["test"] * 4 + ["train"] * 4
    assert doc["complete"] and doc["launched"] == {"input": 0, "fit": 3, "evaluate": 8}
    rec = {r["id"]: r for r in doc["runs"]}["move-x1/default/short/seed1"]
    assert set(rec["scores"]["feat-1"]) == {"test", "train"} and rec["reference"] == "test"
    assert rec["memorisation"] == {"score": 0.5} and rec["history"][-1]["step"] == 20
    n = len(fake())
    again = study.run_study(y, out)
    assert len(fake()) == n and again["launched"] == {"input": 0, "fit": 0, "evaluate": 0}


def test_select_on_trains_only_the_chosen_point_on_other_budgets(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_REFS", "1")
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
    # one evaluation scored both references, so no second pass
    assert sum(c["verb"] == "evaluate" for c in fake()) == 12
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
        "exit status 3"
        in {r["id"]: r for r in doc["runs"]}["standard/default/short/seed1"]["detail"]
    )
    assert (out / "report" / "README.md").exists() and not doc["complete"]
    monkeypatch.delenv("FAKE_FAIL")
    n = len(fake())
    doc = study.run_study(y, out)
    retried = [c["flags"]["out"] for c in fake()[n:] if c["verb"] == "fit"]
    assert sorted(Path(p).name for p in retried) == ["seed1", "seed1"] and doc["complete"]


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


def test_jobs_spread_over_gpus_and_never_exceed_parallel(tmp_path):
    # each job records its GPU and its start/end; the scheduler may run at most 2 at once
    code = ("import os, sys, time; t = time.time(); time.sleep(0.3); "
            "open(sys.argv[1], 'w').write(f\"{os.environ['CUDA_VISIBLE_DEVICES']} {t} {time.time()}\")")  # fmt: skip
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
    assert float(spans[4][1]) >= float(spans[0][2])  # j4 started after its dependency ended
    for s in spans:  # at no job's start were more than 2 jobs running
        t = float(s[1])
        assert sum(float(o[1]) <= t < float(o[2]) for o in spans) <= 2


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
        fid = r["scores"][r["evaluation"]["id"]]["test"]["fid"]
        assert (
            fid == r["evaluation"]["fid"]
            and fid > 0
            and r["evaluation"]["reference"]["split"] == "test"
        )
        assert r["flops_per_token"] > 0 and r["params_total"] > 0 and r["wall_seconds"]["fit"] > 0
    by = {(r["arm"], r["seed"]): r for r in doc["runs"]}
    assert by[("standard", 0)]["val_loss"] != by[("standard", 1)]["val_loss"]  # seeds differ
    assert by[("move-x1", 0)]["params_memory"] > 0 == by[("standard", 0)]["params_memory"]
    readme = (out / "report" / "README.md").read_text()
    assert "| standard | resid_dropout-0.1 | 2 |" in readme and "| move-x1 |" in readme
    assert "Δ bits vs standard" in readme and "FID (test)" in readme and "## Targets" in readme
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
