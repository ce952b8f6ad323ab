"""``movegen study``: arms x grid points x budgets x seeds, trained and evaluated by one command.

A study YAML names the inputs (a tokenizer, train and validation code stores, an evaluation
classifier: paths, or how to build them), the arms (a ``movegen fit`` config plus dotted
overrides), the seeds, the budgets (trainer settings such as ``max_steps``), an optional
regularisation grid applied to every arm alike, the evaluation and the claims to check::

    DIR/
      inputs/      tokenizer/, codes-train/, codes-val/, classifier/ (when built here)
      runs/<arm>/<grid point>/<budget>/seed<S>/   a `movegen fit` run folder (owned by fit)
      evals/<arm>/<grid point>/<budget>/seed<S>/  its `movegen evaluate` result, seed<S>.json
      logs/        one log per subprocess, mirroring runs/ (a run folder belongs to its verb)
      cache/       reference statistics, shared by every evaluation
      study.json   one record per run, rewritten (atomically) after every subprocess
      report/      README.md (tables, targets) and PNG plots (see ``report.write_study_report``)

Every training and evaluation is a subprocess (``python -m movegen.cli fit|evaluate ...``), so a
crash costs one run and its log says why; up to ``parallel`` run at once, spread over the visible
GPUs (``CUDA_VISIBLE_DEVICES`` per subprocess, least-loaded first). Seed S sets both the model
init (``--seed_everything``) and the data order (``--data.seed``): every arm sees the same batches
in the same order for a given seed.

One evaluation per run scores every reference of ``evaluate.references`` (``--ref_splits``; the
first, a held-out split, is the headline) and, with ``train`` and a held-out split, memorisation.

Resume: a run whose ``metrics.json`` says ``"status": "finished"`` (or, from a fit without that
field, a ``metrics.json`` beside a ``model.ckpt``) is never trained again; an unfinished one with
a ``last.ckpt`` continues with ``--resume true``; one with neither starts again with
``--overwrite true`` (fit removes only its own files). A fit that exits 3 (the loss became NaN
or infinite; ``run.json`` says ``diverged``) is a result, not a failure: it is recorded with its
step, reported, never evaluated and never retried (delete its run folder to train it again). A
run with a current evaluation result (the references, samples, seed and sampling asked for) is
never evaluated again. A run trained with other settings than the YAML now asks for is an
error, not a silent reuse.

The package: ``spec`` (the YAML and its checks), ``runs`` (a run's folder, commands, contract
and record), ``jobs`` (the subprocess scheduler), and here :func:`run_study`, which ties them.
Imports: ``report`` (statistics and the report) and ``files`` (atomic writes); ``lit``,
``model`` and ``data`` only to check overrides. ``cli`` imports this package, never the reverse:
the verbs run as subprocesses.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..files import atomic_write_text, read_json
from ..report import choose_grid, write_study_report
from .jobs import Job, Outcome, run_jobs, visible_gpus
from .runs import (
    DIVERGED_EXIT,
    Run,
    _input_jobs,
    _run_record,
    eval_command,
    evaluation,
    fit_action,
    fit_command,
    fit_diverged,
    fit_finished,
    fit_settings,
    run_settled,
)
from .spec import Arm, Budget, StudySpec, load_study

log = logging.getLogger(__name__)

STUDY_FORMAT = "movegen.study/1"

__all__ = [
    "Job",
    "Outcome",
    "StudySpec",
    "fit_diverged",
    "fit_finished",
    "run_settled",
    "load_study",
    "run_jobs",
    "run_study",
    "visible_gpus",
]


def run_study(config: str | Path, out: str | Path, *, parallel: int | None = None,
              inputs: str | Path | None = None, arms: list[str] | None = None,
              stop_fits_after: float | None = None, plan: bool = False) -> dict:  # fmt: skip
    """Train and evaluate every run of the study ``config`` into ``out`` (resuming what is
    there), write ``out/study.json`` and ``out/report/``; returns the study.json object.
    ``inputs``: a folder of inputs built before (an earlier study's ``OUT/inputs``), used instead
    of the YAML's input recipes. ``arms``: only these arms (and the standard arm), e.g. to
    see the key comparison first; a later call with all arms adds the rest. ``stop_fits_after``
    (seconds): no fit starts after it; the running ones and the evaluations of every finished
    fit go on, then the study stops, incomplete, and a later call goes on. ``plan``: write and run
    nothing; return ``{"plan": [...], "fits": n, "evaluations": m, "inputs": [names]}``, what a call
    would do now with each run (see :func:`_plan`)."""
    import dataclasses
    import fcntl

    spec = load_study(config)
    if inputs is not None:
        spec = dataclasses.replace(spec, inputs=given_inputs(Path(inputs), spec))
    subset = None  # --arms: only these arms' runs are trained and evaluated
    if arms:
        names = [a.name for a in spec.arms]
        if bad := [a for a in arms if a not in names]:
            raise ValueError(f"--arms: {bad} not in the study's arms {names}")
        subset = [a for a in names if a in {*arms, spec.standard}]
    out = Path(out).resolve()
    if plan:
        return _run_study(spec, out, parallel, subset, plan=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "study.lock", "w") as lock:
        try:  # two studies in one folder would train the same runs twice
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another `movegen study` is running in {out}") from None
        return _run_study(spec, out, parallel, subset, stop_fits_after)


def _run_study(spec: StudySpec, out: Path, parallel: int | None, subset: list[str] | None = None,
               stop_fits_after: float | None = None, plan: bool = False) -> dict:  # fmt: skip
    study_path = out / "study.json"
    prev = read_json(study_path) if study_path.exists() else None
    if study_path.exists() and prev is None:
        raise ValueError(
            f"{study_path} is unreadable (truncated?); move it aside to rebuild it from the runs"
        )
    if prev and prev.get("study") not in (None, spec.name):
        raise ValueError(
            f"{out} holds study {prev.get('study')!r}, not {spec.name!r}; use another --out"
        )
    gpus = visible_gpus()
    parallel = parallel or spec.parallel or max(1, len(gpus))
    inputs, jobs, in_settings = _input_jobs(spec, out)
    if prev and prev.get("inputs_settings") not in (None, in_settings):
        raise ValueError(f"the inputs in {out} were built with {prev['inputs_settings']}, the YAML now asks for "
                         f"{in_settings}; use another --out, or delete {out / 'inputs'} and the runs")  # fmt: skip
    walls: dict[str, dict] = {
        r["id"]: r.get("wall_seconds") or {} for r in (prev or {}).get("runs", [])
    }
    prev_settings = {r["id"]: r.get("settings") for r in (prev or {}).get("runs", [])}
    outcomes: dict[str, Outcome] = {}
    counts = {"input": 0, "fit": 0, "evaluate": 0}
    t_start = time.time()

    bound: dict[str, Run] = {}  # run key -> Run, once its grid point is known
    keys = []  # (arm, budget, seed, grid id or None), in order

    def run_of(arm: str, gid: str, budget: Budget, seed: int) -> Run:
        grid = next(g for g in spec.grid if g.id == gid)
        return Run(arm=arm, grid=grid, budget=budget, seed=seed, root=out)

    def records() -> list[dict]:
        recs = []
        for arm_name, budget, seed, gid in keys:
            arm = spec.arm(arm_name)
            key = _key(arm_name, gid, budget.name, seed)
            run = bound.get(key) or (run_of(arm_name, gid, budget, seed) if gid else None)
            if run is None:
                gid = _chosen(arm_name, budget)
                run = run_of(arm_name, gid, budget, seed) if gid else None
            if run is None:  # its grid point is chosen on another budget, not yet
                recs.append({"id": f"{arm_name}/?/{budget.name}/seed{seed}", "arm": arm_name, "grid": None,
                             "budget": budget.name, "seed": seed, "status": outcome_status(key)[0]})  # fmt: skip
                continue
            diverged = fit_diverged(run.dir, run.log("fit"))
            status, detail = ("finished", "") if run_settled(spec, run) else outcome_status(key)
            ekey = "eval:" + key
            if ekey in outcomes and outcomes[ekey].state in ("failed", "skipped") and not diverged:
                detail = (detail + "; " if detail else "") + "evaluation: " + outcomes[ekey].detail
            recs.append(_run_record(spec, run, arm, status, detail, walls, diverged))
        return recs

    def outcome_status(key: str) -> tuple[str, str]:
        o = outcomes.get("fit:" + key)
        if o is None:
            return "pending", ""
        states = {"failed": "failed", "skipped": "skipped", "diverged": "diverged"}
        return states.get(o.state, "pending"), o.detail

    def _chosen(arm: str, budget: Budget) -> str | None:
        """The grid point of ``arm`` on ``budget`` when it is chosen on the select_on budget: once
        every run there has finished or diverged (a point with a diverged seed is not chosen)."""
        sel = next(b for b in spec.budgets if b.name == spec.select_on)
        sel_runs = [run_of(arm, g.id, sel, s) for g in spec.grid for s in choosing_seeds]
        if not all(run_settled(spec, r) or fit_diverged(r.dir) for r in sel_runs):
            return None
        recs = [_run_record(spec, r, spec.arm(arm), "finished", "", {}) for r in sel_runs
                if run_settled(spec, r)]  # fmt: skip
        return choose_grid(recs, arm, sel.name)

    def write(final: bool = False) -> dict:
        doc = {
            "format": STUDY_FORMAT, "study": spec.name, "config": str(spec.path), "config_sha256": spec.sha256,
            "out": str(out), "standard": spec.standard, "arms": [a.name for a in spec.arms],
            "seeds": list(spec.seeds), "budgets": {b.name: b.args for b in spec.budgets},
            "grid": {g.id: g.overrides for g in spec.grid}, "select_on": spec.select_on,
            "select_seeds": list(choosing_seeds) if spec.select_on else None,
            "evaluate": {**vars(spec.evaluate), "references": list(spec.evaluate.references)},
            "targets": list(spec.targets), "inputs": {k: str(v) for k, v in inputs.items()},
            "inputs_settings": in_settings, "parallel": parallel, "gpus": gpus,
            "launched": dict(counts), "seconds": round(time.time() - t_start, 1), "runs": records(),
        }  # fmt: skip
        doc["diverged"] = [r["id"] for r in doc["runs"] if r["status"] == "diverged"]
        # complete: nothing left to do (a diverged run is a result, and is not retried)
        # --arms: the arms this call ran; the record still holds every arm's runs (the others as
        # an earlier call left them), so it is complete once they are all settled
        doc["arms_subset"] = subset
        doc["complete"] = final and all(
            (r["status"] == "finished" and r.get("evaluated")) or r["status"] == "diverged"
            for r in doc["runs"]
        )
        atomic_write_text(study_path, json.dumps(doc, indent=1))
        return doc

    def on_finish(job: Job, o: Outcome) -> None:
        outcomes[job.key] = o
        if o.rc is not None or o.state == "failed":
            counts[job.kind] += 1
        if o.seconds is not None and job.kind in ("fit", "evaluate"):
            run = bound.get(job.key.split(":", 1)[1])
            if run is not None:
                w = walls.setdefault(run.id, {})
                # a resumed fit adds its new part to the time of the part before
                resumed = job.kind == "fit" and "--resume" in (launched.get(job.key) or [])
                w[job.kind] = round(w.get(job.kind, 0) + o.seconds, 1) if resumed else o.seconds
        if job.kind in ("fit", "evaluate") and o.state != "done":
            write()
            log.info("progress: %s; %.0f s since the start", progress(), time.time() - t_start)

    def progress() -> str:
        """``fits a/n, evaluations b/n``: the ended ones (settled, run, diverged or failed)."""
        parts = []
        for kind, name in (("fit", "fits"), ("evaluate", "evaluations")):
            mine = [j.key for j in jobs if j.kind == kind]
            parts.append(f"{name} {sum(k in outcomes for k in mine)}/{len(mine)}")
        return ", ".join(parts)

    def bind(arm: Arm, budget: Budget, seed: int, gid: str | None, key: str) -> Run:
        if key in bound:
            return bound[key]
        gid = gid or _chosen(arm.name, budget)
        if gid is None:
            raise ValueError(f"no grid point of {arm.name} can be chosen on budget {spec.select_on}: its runs there "
                             "did not all finish (or diverge), or a seed diverged at every point")  # fmt: skip
        run = bound[key] = run_of(arm.name, gid, budget, seed)
        settings = fit_settings(spec, arm, run)
        settled = run_settled(spec, run) or fit_diverged(run.dir)
        if settled and prev_settings.get(run.id) not in (None, settings):
            raise ValueError(f"{run.dir} was trained with {prev_settings[run.id]}, the study now asks for "
                             f"{settings}; delete that run folder or use another --out")  # fmt: skip
        return run

    def fit_done(arm: Arm, budget: Budget, seed: int, gid: str | None, key: str) -> bool:
        if key in bound:
            return run_settled(spec, bound[key])
        g = gid or _chosen(arm.name, budget)  # (a run waiting for the choice, not bound yet)
        return g is not None and run_settled(spec, run_of(arm.name, g, budget, seed))

    launched: dict[str, Any] = {}  # fit job key -> its command

    def fit_prepare(
        arm: Arm, budget: Budget, seed: int, gid: str | None, key: str
    ) -> list[str] | Outcome | None:
        run = bind(arm, budget, seed, gid, key)
        action = fit_action(spec, run)
        if action == "settled":
            return None
        if action == "diverged":
            d = fit_diverged(run.dir, run.log("fit"))
            log.info("%s diverged at step %s before; not retried (delete %s to train it again)",
                     run.id, d["step"], run.dir)  # fmt: skip
            return Outcome("diverged", d["message"])
        resume = action == "resume"
        # a folder with nothing to resume from: fit replaces its own files (and refuses others)
        overwrite = action in ("again", "restart")
        if overwrite:
            log.warning("%s %s; starting it again", run.dir,
                        "finished before but has no current evaluation, and its model.ckpt is gone"
                        if action == "again" else "has no finished run and nothing to resume from")  # fmt: skip
        cmd = fit_command(spec, arm, run, inputs, resume=resume, overwrite=overwrite)
        launched["fit:" + key] = cmd
        return cmd

    def eval_prepare(key: str) -> list[str] | None:
        run = bound[key]
        return None if evaluation(spec, run) else eval_command(spec, run, inputs, out)

    # the runs: every arm x grid point x seed on each budget (only the chosen point off select_on)
    deps_in = tuple(j.key for j in jobs)
    fit_deps = tuple(k for k in deps_in if k in ("input:codes", "input:val_codes"))
    eval_deps = tuple(k for k in deps_in if k == "input:classifier")
    choosing_seeds = spec.select_seeds or spec.seeds
    # the longest budget's fits start first (the choosing budget before all): its runs bound the
    # study's end, and a call cut short by --stop_fits_after then leaves the short runs, not the long
    for budget in launch_order(spec):
        for arm in spec.arms:
            # a run waits for the choice unless it is one of the choosing runs (and with one grid
            # point there is nothing to choose, so nothing to wait for)
            def is_lazy(seed: int, budget: Budget = budget) -> bool:
                choosing = budget.name == spec.select_on and seed in choosing_seeds
                return spec.select_on is not None and len(spec.grid) > 1 and not choosing

            pairs = [(g.id, s) for g in spec.grid for s in spec.seeds if not is_lazy(s)]
            for gid, seed in pairs + [(None, s) for s in spec.seeds if is_lazy(s)]:
                lazy = gid is None
                key = _key(arm.name, gid, budget.name, seed)
                keys.append((arm.name, budget, seed, gid))
                sel_deps = tuple(f"fit:{_key(arm.name, g.id, spec.select_on, s)}"
                                 for g in spec.grid for s in choosing_seeds) if lazy else ()  # fmt: skip
                if not lazy:
                    bind(arm, budget, seed, gid, key)
                if subset is not None and arm.name not in subset:
                    continue  # recorded as it stands, not run
                # (a diverged run on select_on still lets the choice be made: `after`, not deps)
                jobs.append(Job(key="fit:" + key, kind="fit", deps=fit_deps, after=sel_deps,
                                prepare=lambda a=arm, b=budget, s=seed, g=gid, k=key: fit_prepare(a, b, s, g, k),
                                done=lambda a=arm, b=budget, s=seed, g=gid, k=key: fit_done(a, b, s, g, k),
                                log=lambda k=key: bound[k].log("fit"),
                                exit_states={DIVERGED_EXIT: "diverged"}))  # fmt: skip
                # one evaluation scores every reference (and memorisation)
                jobs.append(Job(key="eval:" + key, kind="evaluate", deps=("fit:" + key, *eval_deps),
                                prepare=lambda k=key: eval_prepare(k),
                                done=lambda k=key: evaluation(spec, bound[k]) is not None,
                                log=lambda k=key: bound[k].log("evaluate")))  # fmt: skip
    keys.sort(key=lambda k: spec.budgets.index(k[1]))  # the records keep the config's order
    log.info("study %s: %d arms x %d grid points x %d budgets x %d seeds; %d at once%s", spec.name,
             len(spec.arms), len(spec.grid), len(spec.budgets), len(spec.seeds), parallel,
             f" on GPUs {','.join(gpus)}" if gpus else " on the CPU")  # fmt: skip
    if plan:
        return _plan(spec, keys, jobs, run_of, _chosen, subset)
    check_reference_data(spec, inputs)  # before hours of training, not at the first evaluation
    write()
    try:
        until = None if stop_fits_after is None else {"fit": t_start + stop_fits_after}
        run_jobs(jobs, parallel=parallel, gpus=gpus, on_finish=on_finish, start_until=until)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM) or failed: report what finished
        doc = write(final=True)
        try:
            write_study_report(doc, out / "report")
        except Exception as e:  # never hide the first error behind the report's
            log.warning("could not write the report of the runs so far: %s", e)
        raise
    doc = write(final=True)
    report = write_study_report(doc, out / "report")
    log.info("wrote %s and %s (launched %d fits, %d evaluations, %d input builds)", study_path, report,
             counts["fit"], counts["evaluate"], counts["input"])  # fmt: skip
    if doc["diverged"]:
        log.warning("%d run(s) diverged (recorded, reported, not retried): %s", len(doc["diverged"]),
                    ", ".join(doc["diverged"]))  # fmt: skip
    left = [k for k in (j.key for j in jobs) if k not in outcomes]
    if left:  # (only --stop_fits_after leaves jobs without an outcome)
        log.warning("stopped starting fits after %s s: %d fit(s) and %d evaluation(s) left; run the same "
                    "command again to go on", stop_fits_after, sum(k.startswith("fit:") for k in left),
                    sum(k.startswith("eval:") for k in left))  # fmt: skip

    def diverged_fit(k: str) -> bool:  # an evaluation skipped because its fit diverged
        return (
            k.startswith("eval:") and outcomes.get("fit:" + k[5:], Outcome("")).state == "diverged"
        )

    bad = {k: o for k, o in outcomes.items()
           if o.state == "failed" or (o.state == "skipped" and not diverged_fit(k))}  # fmt: skip
    if bad:
        first = "; ".join(f"{k}: {o.detail}" for k, o in list(bad.items())[:3])
        raise ValueError(f"{len(bad)} of {len(outcomes)} steps of the study did not succeed ({first}); the report "
                         "covers the rest. Run the same command again to retry them: finished runs are kept")  # fmt: skip
    return doc


def _plan(spec: StudySpec, keys: list, jobs: list[Job], run_of, chosen,
          subset: list[str] | None = None) -> dict:  # fmt: skip
    """What a call of the study would do now, run by run, without doing it: ``settled`` (fit
    and evaluation done), ``evaluate`` (the fit's model.ckpt is there), ``resume, evaluate``
    (a last.ckpt), ``fit again, evaluate`` (finished once, but neither its checkpoint nor its
    evaluation is kept), ``fit, evaluate``, ``diverged`` (not retried), or ``after the choice``
    (its grid point is chosen on another budget first); with ``subset`` (``--arms``), an arm
    outside it is ``not in --arms`` unless settled."""
    rows, fits, evals = [], 0, 0
    for arm, budget, seed, gid in keys:
        g = gid or chosen(arm, budget)
        if g is None:
            rid, action = f"{arm}/?/{budget.name}/seed{seed}", "after the choice"
        else:
            run = run_of(arm, g, budget, seed)
            fit = fit_action(spec, run)  # what fit_prepare will decide
            if fit == "settled":
                action = "settled" if evaluation(spec, run) is not None else "evaluate"
            else:
                action = {"diverged": "diverged", "resume": "resume, evaluate",
                          "again": "fit again, evaluate"}.get(fit, "fit, evaluate")  # fmt: skip
            rid = run.id
        if subset is not None and arm not in subset and action != "settled":
            action = "not in --arms"  # this call leaves it as it is
        after = action == "after the choice"
        fits += after or "fit" in action or action.startswith("resume")
        evals += after or "evaluate" in action
        rows.append({"id": rid, "action": action})
    missing = [j.key.split(":", 1)[1] for j in jobs if j.kind == "input" and not j.done()]
    return {"plan": rows, "fits": fits, "evaluations": evals, "inputs": missing}


def check_reference_data(spec: StudySpec, inputs: dict[str, Path]) -> None:
    """The evaluation's reference splits load (the dataset of ``inputs.data``, or of a given code
    store's header); a clear error before any fit is launched. Skipped when the dataset cannot
    be known yet (a code store the study builds later from a tokenizer recipe names it then)."""
    from ..data import load_dataset

    data = spec.inputs.get("data") or {}
    name = data.get("name")
    if name is None and (header := read_json(Path(inputs.get("codes", "")) / "header.json")):
        name = header.get("dataset")
    if not name or not spec.evaluate.references:
        return
    for split in spec.evaluate.references:
        try:
            load_dataset(name, split, data_root=data.get("root"))
        except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
            raise ValueError(f"the evaluation's {split} reference of {name} cannot be read ({e}); every run "
                             "would train and then fail to be scored. Make the dataset readable (or set "
                             "inputs.data.root) and run the study again") from None  # fmt: skip


INPUT_FILES = {"tokenizer": "tokenizer/tokenizer.ckpt", "codes": "codes-train", "val_codes": "codes-val",
               "classifier": "classifier/classifier.ckpt"}  # fmt: skip


def given_inputs(folder: Path, spec: StudySpec) -> dict:
    """The study's ``inputs`` section pointing at the inputs in ``folder`` (laid out as a study's
    ``OUT/inputs``); the data source stays the YAML's."""
    folder = folder.resolve()
    need = dict(INPUT_FILES)
    if spec.evaluate.features is not None:  # the evaluation brings its own features
        need.pop("classifier")
    missing = [rel for rel in need.values() if not (folder / rel).exists()]
    if missing:
        raise ValueError(f"--inputs {folder} lacks {', '.join(missing)}; it takes a study's OUT/inputs folder "
                         f"({', '.join(INPUT_FILES.values())})")  # fmt: skip
    return {"data": spec.inputs.get("data"), **{k: str(folder / rel) for k, rel in need.items()}}


def launch_order(spec: StudySpec) -> list[Budget]:
    """The budgets in the order their fits start: the one that chooses the grid point first
    (the other budgets' runs wait on it), then the most steps first (longest-job-first keeps
    a study's wall time near its longest run's and leaves the quick runs for the end)."""
    # (load_study gives every budget trainer.max_steps)
    return sorted(
        spec.budgets, key=lambda b: (b.name != spec.select_on, -int(b.args["trainer.max_steps"]))
    )


def _key(arm: str, gid: str | None, budget: str, seed: int) -> str:
    return f"{arm}/{gid or '@chosen'}/{budget}/seed{seed}"
