"""One run of a study: its folder, its ``movegen fit`` and ``movegen evaluate`` commands, the
fit verb's finished/diverged/resumable contract, the jobs that build missing inputs, and the record a
finished run gets in study.json."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import read_json
from .jobs import Job
from .spec import Arm, Budget, GridPoint, StudySpec, _mapping, _resolve_path

log = logging.getLogger(__name__)


def _flags(args: dict[str, Any]) -> list[str]:
    out = []
    for k, v in args.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif v is None:
            v = "null"
        elif isinstance(v, list | dict):
            v = json.dumps(v)
        out += [f"--{k}", str(v)]
    return out


def _movegen(verb: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "movegen.cli", "--log-level", "INFO", verb, *args]


@dataclass(frozen=True, kw_only=True)
class Run:
    arm: str
    grid: GridPoint
    budget: Budget
    seed: int
    root: Path

    @property
    def id(self) -> str:
        return f"{self.arm}/{self.grid.id}/{self.budget.name}/seed{self.seed}"

    @property
    def dir(self) -> Path:
        return self.root / "runs" / self.id

    def log(self, verb: str) -> Path:
        return self.root / "logs" / f"{self.id}.{verb}.log"

    @property
    def eval_dir(self) -> Path:
        # outside the run folder: `movegen fit` owns that one (a later --overwrite or --resume of
        # it must find only its own files)
        return self.root / "evals" / self.id

    @property
    def eval_file(self) -> Path:
        # (evaluate names its result after the model's folder)
        return self.eval_dir / f"{self.dir.name}.json"


def fit_finished(run_dir: Path) -> bool:
    """The fit verb's contract: ``metrics.json`` with ``"status": "finished"``; a metrics.json
    without a status (fits before that field) counts when the best ``model.ckpt`` is beside it."""
    m = read_json(run_dir / "metrics.json")
    if m is None:
        return False
    if "status" in m:
        return m["status"] == "finished" and (run_dir / "model.ckpt").exists()
    return (run_dir / "model.ckpt").exists()


def run_settled(spec: StudySpec, run: Run) -> bool:
    """A run the study need not train again: its fit finished (:func:`fit_finished`), or its
    ``metrics.json`` says finished and its evaluation is the one the study asks for. The second
    lets a study go on where only the small files of its runs were kept (the records, the
    metrics and the evaluations, without the checkpoints: e.g. on a machine that is given back
    between calls)."""
    if fit_finished(run.dir):
        return True
    return recorded_finished(run.dir) and evaluation(spec, run) is not None


def recorded_finished(run_dir: Path) -> bool:
    """The run's ``metrics.json`` says its fit finished (its checkpoints may be gone)."""
    return (read_json(run_dir / "metrics.json") or {}).get("status") == "finished"


def fit_action(spec: StudySpec, run: Run) -> str:
    """What a call of the study does with a run's fit: ``settled`` (:func:`run_settled`: nothing),
    ``diverged`` (not retried), ``resume`` (from its last.ckpt), ``again`` (it finished once, but
    neither its checkpoint nor a current evaluation is kept), ``restart`` (a folder with nothing
    to resume from) or ``new``."""
    if run_settled(spec, run):
        return "settled"
    if fit_diverged(run.dir, run.log("fit")):
        return "diverged"
    if (run.dir / "last.ckpt").exists():
        return "resume"
    if recorded_finished(run.dir):
        return "again"
    return "restart" if run.dir.is_dir() and any(run.dir.iterdir()) else "new"


DIVERGED_EXIT = 3  # `movegen fit`: the loss became NaN or infinite (runs.TrainingDiverged)
_AT_STEP = re.compile(r"NaN or infinite at step (\d+)")


def fit_diverged(run_dir: Path, log: Path | None = None) -> dict | None:
    """``{"step", "message"}`` of a fit whose ``run.json`` says ``diverged`` (the step from its
    message there, else from the last such message in its log), or None."""
    rec = read_json(run_dir / "run.json")
    if rec is None or rec.get("status") != "diverged" or recorded_finished(run_dir):
        return None
    msg = rec.get("error") or ""
    if not _AT_STEP.search(msg) and log is not None and log.exists():
        lines = [l for l in log.read_text(errors="replace").splitlines() if _AT_STEP.search(l)]
        msg = lines[-1].strip() if lines else msg
    m = _AT_STEP.search(msg)
    return {
        "step": int(m.group(1)) if m else None,
        "message": msg or "the loss became NaN or infinite",
    }


def fit_settings(spec: StudySpec, arm: Arm, run: Run) -> dict:
    """What a run was trained with, beside its record: a finished run is reused only when the YAML
    still asks for exactly this."""
    import yaml

    args = {**spec.fit_args, **arm.overrides, **run.grid.overrides, **run.budget.args}
    # the arm YAML's content, not its bytes: an edited comment changes no run
    content = json.dumps(yaml.safe_load(arm.config.read_text()), sort_keys=True)
    return {"config": arm.config_text, "config_sha256": hashlib.sha256(content.encode()).hexdigest(),
            "args": args, "seed": run.seed}  # fmt: skip


def fit_command(spec: StudySpec, arm: Arm, run: Run, inputs: dict[str, Path], *, resume: bool = False,
                overwrite: bool = False) -> list[str]:  # fmt: skip
    args = {**spec.fit_args, **arm.overrides, **run.grid.overrides, **run.budget.args,
            "seed_everything": run.seed, "data.seed": run.seed,
            "data.codes": str(inputs["codes"]), "data.val_codes": str(inputs["val_codes"])}  # fmt: skip
    cmd = _movegen("fit", "--config", str(arm.config), *_flags(args), "--out", str(run.dir))
    return (
        cmd
        + (["--resume", "true"] if resume else [])
        + (["--overwrite", "true"] if overwrite else [])
    )


def eval_command(spec: StudySpec, run: Run, inputs: dict[str, Path], out: Path) -> list[str]:
    """One ``movegen evaluate`` of the run's best model against every reference of the study."""
    ev = spec.evaluate
    features = ev.features or f"classifier:{inputs['classifier']}"
    args = {"model": str(run.dir / "model.ckpt"), "features": features, "out": str(run.eval_dir),
            "num_samples": ev.num_samples, "batch_size": ev.batch_size, "seed": ev.seed,
            "ref_splits": list(ev.references), "cache_dir": str(out / "cache"),
            "overwrite": True,  # the study decides when a run is (re-)evaluated
            **{f"sampling.{k}": v for k, v in ev.sampling.items()}}  # fmt: skip
    if inputs.get(
        "tokenizer"
    ):  # the code store records the path it was built at, which may have moved
        args["tokenizer"] = str(
            inputs["tokenizer"]
        )  # (evaluate still checks its hash against the model's)
    if root := (spec.inputs.get("data") or {}).get("root"):
        args["data.root"] = root
    return _movegen("evaluate", *_flags({**args, **ev.args}))


def evaluation(spec: StudySpec, run: Run) -> dict | None:
    """The run's evaluation result when it is one the study asks for now (its references, in
    order, and its number of samples and seed); None when missing, unreadable or stale."""
    r = read_json(run.eval_file)
    if r is None:
        return None
    ev = spec.evaluate
    refs = list(r.get("references") or {})
    if (r.get("reference_split"), refs) != (ev.references[0], list(ev.references)):
        return None
    if (r.get("num_samples"), r.get("seed")) != (ev.num_samples, ev.seed):
        return None
    sampling = r.get("sampling") or {}
    if any(sampling.get(k) != v for k, v in ev.sampling.items()):
        return None
    return r


# =========================================================================== inputs


def _input_jobs(spec: StudySpec, out: Path) -> tuple[dict[str, Path], list[Job], dict]:
    """Paths of the four inputs, the jobs that build the missing ones (into ``out/inputs``), and
    the settings they are built with (kept in study.json to refuse a changed recipe)."""
    import yaml

    inp = dict(spec.inputs)
    data = _mapping(inp.pop("data", None), "inputs.data")
    if bad := sorted(set(data) - {"name", "root"}):
        raise ValueError(f"inputs.data: unknown keys {bad} (name, root)")
    if bad := sorted(set(inp) - {"tokenizer", "codes", "val_codes", "classifier"}):
        raise ValueError(
            f"inputs: unknown keys {bad} (tokenizer, codes, val_codes, classifier, data)"
        )
    base = spec.path.parent
    data_flags = {f"data.{k}": v for k, v in data.items() if v is not None}
    paths: dict[str, Path] = {}
    jobs: list[Job] = []
    settings: dict[str, Any] = {"data": data}
    dataset = data.get("name")

    def given(key: str, file: str | None) -> bool:
        v = inp.get(key)
        if isinstance(v, str):
            p = _resolve_path(v, base)
            paths[key] = p / file if file and p.is_dir() else p
            settings[key] = str(paths[key])
            return True
        return False

    def add(key: str, cmd: list[str], folder: Path, done: Callable[[], bool], deps=()) -> None:
        def prepare() -> list[str] | None:
            if done():
                return None
            if folder.exists():  # an interrupted build: nothing in it is resumable
                log.warning("removing the incomplete %s", folder)
                shutil.rmtree(folder)
            return cmd

        jobs.append(Job(key=f"input:{key}", deps=tuple(deps), prepare=prepare, done=done,
                        log=out / "logs" / "inputs" / f"{key}.log", kind="input"))  # fmt: skip

    if not given("tokenizer", "tokenizer.ckpt") and inp.get("tokenizer") is not None:
        t = _mapping(inp["tokenizer"], "inputs.tokenizer")
        if "config" not in t or set(t) - {"config", "args"}:
            raise ValueError(
                "inputs.tokenizer is a tokenizer.ckpt path or {config: tokenizers/...yaml, args: {...}}"
            )
        cfg = _resolve_path(t["config"], base)
        dataset = dataset or ((yaml.safe_load(cfg.read_text()) or {}).get("data") or {}).get("name")
        folder = out / "inputs" / "tokenizer"
        paths["tokenizer"] = folder / "tokenizer.ckpt"
        args = {**data_flags, **_mapping(t.get("args"), "inputs.tokenizer.args")}
        settings["tokenizer"] = {"config": t["config"], "args": args}
        add("tokenizer", _movegen("fit-tokenizer", "--config", str(cfg), *_flags(args), "--out", str(folder)),
            folder, lambda f=folder: (f / "tokenizer.ckpt").exists() and (f / "metrics.json").exists())  # fmt: skip
    for key, split in (("codes", "train"), ("val_codes", "val")):
        if given(key, None):
            continue
        c = _mapping(inp.get(key), f"inputs.{key}")
        if "tokenizer" not in paths:
            raise ValueError(
                f"inputs.{key}: give a code store path, or a tokenizer (a path or a config) to build it"
            )
        if bad := sorted(set(c) - {"split", "views", "shifts", "args"}):
            raise ValueError(f"inputs.{key}: unknown keys {bad} (split, views, shifts, args)")
        folder = out / "inputs" / f"codes-{c.get('split', split)}"
        paths[key] = folder
        args = {"tokenizer": str(paths["tokenizer"]), "split": c.get("split", split), "views": c.get("views", 2),
                **({"shifts": c["shifts"]} if c.get("shifts") else {}),
                **data_flags, **_mapping(c.get("args"), f"inputs.{key}.args"), "out": str(folder),
                "overwrite": True}  # fmt: skip
        settings[key] = {k: v for k, v in args.items() if k not in ("tokenizer", "out")}
        deps = ("input:tokenizer",) if any(j.key == "input:tokenizer" for j in jobs) else ()
        add(key, _movegen("extract-codes", *_flags(args)), folder,
            lambda f=folder: (f / "header.json").exists(), deps)  # fmt: skip
    if not given("classifier", "classifier.ckpt") and spec.evaluate.features is None:
        c = _mapping(inp.get("classifier"), "inputs.classifier")
        if bad := sorted(set(c) - {"args"}):
            raise ValueError(
                f"inputs.classifier: unknown keys {bad} (a classifier.ckpt path, or {{args: {{...}}}})"
            )
        if not dataset:
            raise ValueError("inputs.classifier: which dataset? set inputs.data.name")
        folder = out / "inputs" / "classifier"
        paths["classifier"] = folder / "classifier.ckpt"
        args = {
            "data.name": dataset,
            **data_flags,
            **_mapping(c.get("args"), "inputs.classifier.args"),
        }
        settings["classifier"] = args
        add("classifier", _movegen("fit-classifier", *_flags(args), "--out", str(folder)), folder,
            lambda f=folder: (f / "classifier.ckpt").exists() and (f / "metrics.json").exists())  # fmt: skip
    return paths, jobs, settings


# =========================================================================== records

# what a record keeps of each reference of its evaluation (the whole evaluation is kept too)
REFERENCE_KEYS = ("fid", "kid", "kid_std", "precision", "recall", "size")
MEMORISATION_KEYS = ("memorisation", "copy_z", "copy_fraction", "num_samples", "num_train",
                     "num_heldout", "train_split", "heldout_split")  # fmt: skip


def _run_record(spec: StudySpec, run: Run, arm: Arm, status: str, detail: str, walls: dict,
                diverged: dict | None = None) -> dict:  # fmt: skip
    m = read_json(run.dir / "metrics.json") if status == "finished" else None
    rec: dict[str, Any] = {
        "id": run.id, "arm": run.arm, "grid": run.grid.id, "grid_overrides": run.grid.overrides,
        "budget": run.budget.name, "seed": run.seed, "config": arm.config_text, "overrides": arm.overrides,
        "status": status, "run_dir": str(run.dir.relative_to(run.root)), "settings": fit_settings(spec, arm, run),
    }  # fmt: skip
    if detail:
        rec["detail"] = detail
    if diverged is not None:
        rec.update(status="diverged", diverged_step=diverged["step"], detail=diverged["message"])
    if m is not None:
        keep = ("steps", "train_tokens", "flops_per_token", "memory", "memory_density", "memory_slots",
                "bank_bytes_per_token", "val_loss", "val_bits_per_token", "best_step", "final_val_loss",
                "final_val_bits_per_token", "train_seconds", "device", "history")  # fmt: skip
        rec.update({k: m[k] for k in keep if k in m})
        rec.update({k: v for k, v in m.items() if k.startswith("params_")})
        rec["status"] = "finished"
    r = evaluation(spec, run) if rec["status"] == "finished" else None
    if r is not None:
        # scores per feature set, then per reference split: never one column across either
        fid_id = r.get("id") or r.get("features") or "features"
        refs = r.get("references") or {}
        rec["evaluation"] = r  # every key of the evaluation, copied through
        rec["eval_file"] = str(run.eval_file.relative_to(run.root))
        rec["features"] = fid_id
        rec["reference"] = r["reference_split"]
        rec["scores"] = {fid_id: {split: {k: b.get(k) for k in REFERENCE_KEYS}
                                  for split, b in refs.items() if isinstance(b, dict)}}  # fmt: skip
        rec["is"], rec["is_std"] = r.get("is"), r.get("is_std")
        mem = r.get("memorisation")
        if isinstance(mem, dict):
            rec["memorisation"] = {k: mem[k] for k in MEMORISATION_KEYS if k in mem}
        rec["evaluated"] = True
    rec["wall_seconds"] = walls.get(run.id, {})
    return rec
