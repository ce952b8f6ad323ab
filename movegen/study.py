"""``movegen study``: arms x grid points x budgets x seeds, trained and evaluated by one command.

A study YAML names the inputs (a tokenizer, train and validation code stores, an evaluation
classifier: paths, or how to build them), the arms (a ``movegen fit`` config plus dotted
overrides), the seeds, the budgets (trainer settings such as ``max_steps``), an optional
regularisation grid applied to every arm alike, the evaluation and the claims to check::

    DIR/
      inputs/      tokenizer/, codes-train/, codes-val/, classifier/ (when built here)
      runs/<arm>/<grid point>/<budget>/seed<S>/       a `movegen fit` run folder
      runs/<arm>/<grid point>/<budget>/seed<S>/eval/  its `movegen evaluate` results
      logs/        one log per subprocess, mirroring runs/ (a run folder belongs to its verb)
      cache/       reference statistics, shared by every evaluation
      study.json   one record per run, rewritten (atomically) after every subprocess
      report/      README.md (tables, targets) and PNG plots (see ``report.write_study_report``)

Every training and evaluation is a subprocess (``python -m movegen.cli fit|evaluate ...``), so a
crash costs one run and its log says why; up to ``parallel`` run at once, spread over the visible
GPUs (``CUDA_VISIBLE_DEVICES`` per subprocess, least-loaded first). Seed S sets both the model
init (``--seed_everything``) and the data order (``--data.seed``): every arm sees the same batches
in the same order for a given seed.

Resume: a run whose ``metrics.json`` says ``"status": "finished"`` (or, from a fit without that
field, a ``metrics.json`` beside a ``model.ckpt``) is never trained again; an unfinished one with
a ``last.ckpt`` continues with ``--resume true``; one with neither is removed and restarted. A
run with its evaluation files is never evaluated again. A run trained with other settings than
the YAML now asks for is an error, not a silent reuse.

Imports: ``report`` (statistics and the report) and ``checkpoint`` (atomic writes); ``lit``,
``model`` and ``data`` only to check overrides. ``cli`` imports this module, never the reverse:
the verbs run as subprocesses.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .report import TARGET_KINDS, choose_grid, write_study_report

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
STUDY_FORMAT = "movegen.study/1"
# flags the study sets on every fit itself; an arm, grid point or budget may not set them
OWNED_FIT_KEYS = ("seed_everything", "data.seed", "data.codes", "data.val_codes", "out", "resume")
SECTIONS = ("arms", "seeds", "budgets", "grid", "select_on", "standard", "fit_args", "evaluate",
            "inputs", "parallel", "targets", "name", "description")  # fmt: skip


# =========================================================================== the study YAML


@dataclass(frozen=True, kw_only=True)
class Arm:
    name: str
    config: Path
    """The ``movegen fit`` YAML of the arm (absolute)."""
    config_text: str
    """How the study YAML spells it (kept in study.json; paths move between machines)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted fit flags, e.g. ``model.config.memory_density: 4``."""


@dataclass(frozen=True, kw_only=True)
class GridPoint:
    id: str
    overrides: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Budget:
    name: str
    args: dict[str, Any]
    """Dotted fit flags; a bare key is a trainer setting (``max_steps`` -> ``trainer.max_steps``)."""


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    num_samples: int = 1000
    batch_size: int = 256
    seed: int = 0
    features: str | None = None
    """'inception' or 'classifier:PATH'; default: the classifier of the inputs."""
    references: tuple[str | None, ...] = (None,)
    """Reference splits (``--ref_split``), the first is the headline one; None: the verb's default."""
    sampling: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    """More ``movegen evaluate`` flags, passed as they are."""


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    name: str
    path: Path
    sha256: str
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    budgets: tuple[Budget, ...]
    grid: tuple[GridPoint, ...]
    select_on: str | None
    """Budget whose validation loss chooses each arm's grid point; the other budgets then train
    only the chosen point. None: every budget trains every point and chooses on its own."""
    standard: str
    fit_args: dict[str, Any]
    evaluate: EvalSpec
    inputs: dict[str, Any]
    parallel: int | None
    targets: tuple[dict, ...]

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


def _resolve_path(p: str, base: Path) -> Path:
    """A path as given (relative to the current folder), else beside the study YAML, else in the
    repository (``configs/...``)."""
    for cand in (Path(p), base / p, REPO / p):
        if cand.exists():
            return cand.resolve()
    raise FileNotFoundError(f"{p} not found (looked in {Path.cwd()}, {base} and {REPO})")


def _mapping(doc: Any, where: str) -> dict:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"{where} must be a mapping, got {type(doc).__name__}: {doc!r}")
    return doc


def _slug(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", s).strip("_") or "x"


def _grid(doc: Any) -> tuple[GridPoint, ...]:
    """``grid:`` as a list of override sets, or a mapping key -> list of values (their product)."""
    if doc is None or doc == [] or doc == {}:
        return (GridPoint(id="default", overrides={}),)
    if isinstance(doc, dict):
        keys = list(doc)
        values = [v if isinstance(v, list) else [v] for v in doc.values()]
        if any(not v for v in values):
            raise ValueError(f"grid: every key needs at least one value, got {doc}")
        points = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    elif isinstance(doc, list):
        points = [_mapping(p, f"grid[{i}]") for i, p in enumerate(doc)]
    else:
        raise ValueError(f"grid must be a list of override sets or a mapping of lists, got {doc!r}")
    ids = [
        "+".join(f"{k.split('.')[-1]}-{_slug(v)}" for k, v in p.items()) or "default"
        for p in points
    ]
    if len(set(ids)) != len(ids):
        ids = [f"g{i}" for i in range(len(points))]
    if len({json.dumps(p, sort_keys=True) for p in points}) != len(points):
        raise ValueError(f"grid has repeated points: {points}")
    return tuple(GridPoint(id=i, overrides=p) for i, p in zip(ids, points))


def load_study(path: str | Path) -> StudySpec:
    """Parse and check a study YAML (clear ``ValueError``s; nothing is run)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config {path} does not exist")
    text = path.read_text()
    try:
        doc = _mapping(yaml.safe_load(text), str(path))
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if unknown := sorted(set(doc) - set(SECTIONS)):
        raise ValueError(f"{path}: unknown sections {unknown}; known: {list(SECTIONS)}")
    base = path.resolve().parent
    arms_doc = _mapping(doc.get("arms"), "arms")
    if not arms_doc:
        raise ValueError(
            f"{path}: arms is empty; give at least one `name: {{config: configs/...yaml}}`"
        )
    arms = []
    for name, a in arms_doc.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", str(name)):
            raise ValueError(
                f"arm name {name!r} must be a plain folder name (letters, digits, . _ + -)"
            )
        a = {"config": a} if isinstance(a, str) else _mapping(a, f"arms.{name}")
        if "config" not in a or set(a) - {"config", "overrides"}:
            raise ValueError(
                f"arms.{name} needs `config:` (and optionally `overrides:`), got {sorted(a)}"
            )
        arms.append(Arm(name=str(name), config=_resolve_path(a["config"], base), config_text=a["config"],
                        overrides=dict(_mapping(a.get("overrides"), f"arms.{name}.overrides"))))  # fmt: skip
    seeds = doc.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    budgets_doc = _mapping(doc.get("budgets"), "budgets")
    if not budgets_doc:
        raise ValueError(
            f"{path}: budgets is empty; e.g. `short: {{max_steps: 600, val_check_interval: 100}}`"
        )
    budgets = []
    for name, b in budgets_doc.items():
        b = _mapping(b, f"budgets.{name}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", str(name)):
            raise ValueError(f"budget name {name!r} must be a plain folder name")
        if "max_steps" not in b and "trainer.max_steps" not in b:
            raise ValueError(
                f"budgets.{name} needs max_steps (matched steps are what make arms comparable)"
            )
        budgets.append(
            Budget(
                name=str(name), args={(k if "." in k else f"trainer.{k}"): v for k, v in b.items()}
            )
        )
    grid = _grid(doc.get("grid"))
    names = [b.name for b in budgets]
    select_on = doc.get("select_on")
    if select_on is not None and select_on not in names:
        raise ValueError(f"select_on {select_on!r} is not a budget; budgets: {names}")
    standard = doc.get("standard", "standard" if "standard" in arms_doc else arms[0].name)
    if standard not in arms_doc:
        raise ValueError(f"standard arm {standard!r} is not one of the arms {list(arms_doc)}")
    ev = dict(_mapping(doc.get("evaluate"), "evaluate"))
    refs = ev.pop("references", None)
    refs = (None,) if refs is None else tuple(refs if isinstance(refs, list) else [refs])
    if any(r not in ("train", "val", "test") for r in refs if r is not None) or len(
        set(refs)
    ) != len(refs):
        raise ValueError(
            f"evaluate.references must be distinct splits among train/val/test, got {list(refs)}"
        )
    known = set(inspect.signature(EvalSpec).parameters)
    if bad := sorted(set(ev) - known):
        raise ValueError(
            f"evaluate: unknown keys {bad}; known: {sorted(known)} (other flags go under args:)"
        )
    try:
        evaluate = EvalSpec(references=refs, **ev)
    except TypeError as e:
        raise ValueError(f"evaluate: {e}") from None
    if evaluate.num_samples < 1 or evaluate.batch_size < 1:
        raise ValueError("evaluate.num_samples and evaluate.batch_size must be >= 1")
    parallel = doc.get("parallel")
    if parallel is not None and (not isinstance(parallel, int) or parallel < 1):
        raise ValueError(f"parallel must be an int >= 1, got {parallel!r}")
    targets = tuple(
        _check_target(t, i, arms_doc, names) for i, t in enumerate(doc.get("targets") or [])
    )
    spec = StudySpec(name=str(doc.get("name") or path.stem), path=path.resolve(),
                     sha256=hashlib.sha256(text.encode()).hexdigest(), arms=tuple(arms), seeds=tuple(seeds),
                     budgets=tuple(budgets), grid=grid, select_on=select_on, standard=standard,
                     fit_args=dict(_mapping(doc.get("fit_args"), "fit_args")), evaluate=evaluate,
                     inputs=_mapping(doc.get("inputs"), "inputs"), parallel=parallel, targets=targets)  # fmt: skip
    check_overrides(spec)
    return spec


def _check_target(t: Any, i: int, arms: dict, budgets: list[str]) -> dict:
    t = dict(_mapping(t, f"targets[{i}]"))
    kinds = [k for k in TARGET_KINDS if k in t]
    if len(kinds) != 1:
        raise ValueError(f"targets[{i}] needs exactly one of {list(TARGET_KINDS)}, got {sorted(t)}")
    for k in ("arm", "vs"):
        if t.get(k) not in arms:
            raise ValueError(f"targets[{i}].{k} {t.get(k)!r} is not an arm ({list(arms)})")
    t.setdefault("metric", "val_bits_per_token")
    t.setdefault("budget", budgets[0])
    if t["budget"] not in budgets:
        raise ValueError(f"targets[{i}].budget {t['budget']!r} is not a budget ({budgets})")
    allowed = {"arm", "vs", "metric", "budget", "every_seed", "significant", *TARGET_KINDS}
    if bad := sorted(set(t) - allowed):
        raise ValueError(f"targets[{i}]: unknown keys {bad}; known: {sorted(allowed)}")
    return t


def _apply(doc: dict, key: str, value: Any) -> None:
    node = doc
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"{key}: {p} is not a section")
    node[leaf] = value


def check_overrides(spec: StudySpec) -> None:
    """Every dotted key an arm, grid point, budget or ``fit_args`` sets names a real field of the
    fit verb (``model.config.*`` of ``GPTConfig``, ``model.*`` of ``LitGPT``, ``data.*`` of
    ``CodeDataModule``, ``trainer.*`` of Lightning's ``Trainer``), and every arm x grid point
    builds a valid model config."""
    import dataclasses

    import lightning as L
    import yaml

    from .data import CodeDataModule
    from .lit import LitGPT
    from .model import GPTConfig

    fields = {
        "model.config": {f.name for f in dataclasses.fields(GPTConfig)},
        "model": set(inspect.signature(LitGPT.__init__).parameters) - {"self", "config"},
        "data": set(inspect.signature(CodeDataModule.__init__).parameters) - {"self"},
        "trainer": set(inspect.signature(L.Trainer.__init__).parameters) - {"self"},
    }

    def check(where: str, overrides: dict) -> None:
        for key in overrides:
            if key in OWNED_FIT_KEYS:
                raise ValueError(
                    f"{where}: {key} is set by the study itself (seeds, inputs, run folder)"
                )
            section, _, name = key.rpartition(".")
            if section not in fields or name not in fields[section]:
                close = sorted(fields.get(section, ()))
                raise ValueError(f"{where}: {key} is not a fit setting" +
                                 (f" ({section} has: {', '.join(close)})" if close else
                                  f" (keys start with {', '.join(sorted(fields))})"))  # fmt: skip

    check("fit_args", spec.fit_args)
    for b in spec.budgets:
        check(f"budgets.{b.name}", b.args)
    for g in spec.grid:
        check(f"grid point {g.id}", g.overrides)
    for arm in spec.arms:
        check(f"arms.{arm.name}.overrides", arm.overrides)
        for g in spec.grid:
            if clash := sorted(set(arm.overrides) & set(g.overrides)):
                raise ValueError(f"arms.{arm.name} and grid point {g.id} both set {clash}: the grid applies "
                                 "to every arm alike, so an arm may not set its keys")  # fmt: skip
            doc = yaml.safe_load(arm.config.read_text()) or {}
            for k, v in {**spec.fit_args, **arm.overrides, **g.overrides}.items():
                _apply(doc, k, v)
            cfg = (doc.get("model") or {}).get("config")
            if not isinstance(cfg, dict):
                raise ValueError(
                    f"{arm.config} has no model.config section (a `movegen fit` config is expected)"
                )
            try:
                GPTConfig(**cfg)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"arm {arm.name}, grid point {g.id}: bad model config: {e}"
                ) from None


# =========================================================================== runs and commands


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

    def eval_dir(self, ref: str | None) -> Path:
        return self.dir / "eval" / (ref or "default")

    def eval_file(self, ref: str | None) -> Path:
        # (evaluate names its result after the model's folder)
        return self.eval_dir(ref) / f"{self.dir.name}.json"


def _read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is missing, truncated or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def fit_finished(run_dir: Path) -> bool:
    """The fit verb's contract: ``metrics.json`` with ``"status": "finished"``; a metrics.json
    without a status (fits before that field) counts when the best ``model.ckpt`` is beside it."""
    m = _read_json(run_dir / "metrics.json")
    if m is None:
        return False
    if "status" in m:
        return m["status"] == "finished" and (run_dir / "model.ckpt").exists()
    return (run_dir / "model.ckpt").exists()


def fit_settings(spec: StudySpec, arm: Arm, run: Run) -> dict:
    """What a run was trained with, beside its record: a finished run is reused only when the YAML
    still asks for exactly this."""
    import yaml

    args = {**spec.fit_args, **arm.overrides, **run.grid.overrides, **run.budget.args}
    # the arm YAML's content, not its bytes: an edited comment changes no run
    content = json.dumps(yaml.safe_load(arm.config.read_text()), sort_keys=True)
    return {"config": arm.config_text, "config_sha256": hashlib.sha256(content.encode()).hexdigest(),
            "args": args, "seed": run.seed}  # fmt: skip


def fit_command(
    spec: StudySpec, arm: Arm, run: Run, inputs: dict[str, Path], resume: bool
) -> list[str]:
    args = {**spec.fit_args, **arm.overrides, **run.grid.overrides, **run.budget.args,
            "seed_everything": run.seed, "data.seed": run.seed,
            "data.codes": str(inputs["codes"]), "data.val_codes": str(inputs["val_codes"])}  # fmt: skip
    cmd = _movegen("fit", "--config", str(arm.config), *_flags(args), "--out", str(run.dir))
    return cmd + (["--resume", "true"] if resume else [])


def eval_command(
    spec: StudySpec, run: Run, ref: str | None, inputs: dict[str, Path], out: Path
) -> list[str]:
    ev = spec.evaluate
    features = ev.features or f"classifier:{inputs['classifier']}"
    args = {"model": str(run.dir / "model.ckpt"), "features": features, "out": str(run.eval_dir(ref)),
            "num_samples": ev.num_samples, "batch_size": ev.batch_size, "seed": ev.seed,
            "cache_dir": str(out / "cache"), **{f"sampling.{k}": v for k, v in ev.sampling.items()}}  # fmt: skip
    if ref is not None:
        args["ref_split"] = ref
    if root := (spec.inputs.get("data") or {}).get("root"):
        args["data.root"] = root
    return _movegen("evaluate", *_flags({**args, **ev.args}))


def evaluated_refs(run: Run, refs: tuple[str | None, ...]) -> set[str | None]:
    """Reference splits this run has scores for: its own eval file, or another's ``references``
    section (a single evaluation may score several references)."""
    have: set[str | None] = set()
    for ref in refs:
        r = _read_json(run.eval_file(ref))
        if r is None:
            continue
        have.add(ref)
        have.update(k for k in r.get("references") or {} if k in refs)
        split = (r.get("reference") or {}).get("split")
        if split in refs:
            have.add(split)
    return have


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
        if bad := sorted(set(c) - {"split", "views", "args"}):
            raise ValueError(f"inputs.{key}: unknown keys {bad} (split, views, args)")
        folder = out / "inputs" / f"codes-{c.get('split', split)}"
        paths[key] = folder
        args = {"tokenizer": str(paths["tokenizer"]), "split": c.get("split", split), "views": c.get("views", 2),
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


# =========================================================================== the scheduler


@dataclass(eq=False, kw_only=True)
class Job:
    """One subprocess. ``prepare`` runs when every dependency has succeeded and returns the
    command, or None when there is nothing to do (already done); ``done`` says afterwards whether
    it produced what it should."""

    key: str
    kind: str
    deps: tuple[str, ...]
    prepare: Callable[[], list[str] | None]
    done: Callable[[], bool]
    log: Path | Callable[[], Path]


@dataclass
class Outcome:
    state: str  # "done" (nothing to do), "ok" (ran and succeeded), "failed", "skipped"
    detail: str = ""
    seconds: float | None = None


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(l.strip() for l in lines[-n:] if l.strip())


def run_jobs(jobs: list[Job], *, parallel: int, gpus: list[str],
             on_finish: Callable[[Job, Outcome], None] = lambda j, o: None) -> dict[str, Outcome]:  # fmt: skip
    """Run ``jobs`` as subprocesses, at most ``parallel`` at once, each after its dependencies;
    a job whose dependency failed is skipped. With GPUs, each subprocess sees one of them
    (``CUDA_VISIBLE_DEVICES``), the least loaded first. On CPU each gets cores // parallel threads.
    The subprocesses still running when this returns by an exception are terminated."""
    keys = {j.key for j in jobs}
    if missing := sorted({d for j in jobs for d in j.deps} - keys):
        raise ValueError(f"jobs depend on unknown jobs {missing}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    env.setdefault("TQDM_DISABLE", "1")  # progress bars would fill the logs with carriage returns
    if not gpus:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    order = {"input": 0, "evaluate": 1, "fit": 2}  # a ready evaluation goes before a new fit
    pending = sorted(jobs, key=lambda j: order.get(j.kind, 3))
    outcomes: dict[str, Outcome] = {}
    running: list[tuple[Job, subprocess.Popen, str | None, float, Any]] = []
    load = dict.fromkeys(gpus, 0)

    def finish(job: Job, o: Outcome) -> None:
        outcomes[job.key] = o
        on_finish(job, o)

    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= parallel:
                    break
                states = [outcomes[d].state if d in outcomes else None for d in job.deps]
                if None in states:
                    continue
                pending.remove(job)
                if bad := [d for d, s in zip(job.deps, states) if s in ("failed", "skipped")]:
                    finish(job, Outcome("skipped", f"{', '.join(bad)} did not succeed"))
                    continue
                try:
                    cmd = job.prepare()
                except (ValueError, FileNotFoundError) as e:
                    finish(job, Outcome("failed", str(e)))
                    continue
                if cmd is None:
                    finish(job, Outcome("done"))
                    continue
                gpu = min(gpus, key=lambda g: (load[g], gpus.index(g))) if gpus else None
                logp = job.log() if callable(job.log) else job.log
                logp.parent.mkdir(parents=True, exist_ok=True)
                fh = open(logp, "ab")  # appended: a retry keeps the failure it retries
                fh.write(
                    f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} gpu={gpu}\n# {' '.join(cmd)}\n".encode()
                )
                fh.flush()
                job_env = env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}
                p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=job_env, cwd=str(logp.parent))  # fmt: skip
                if gpu is not None:
                    load[gpu] += 1
                log.info("started %s%s", job.key, f" on GPU {gpu}" if gpu is not None else "")
                running.append((job, p, gpu, time.time(), fh))
            for item in list(running):
                job, p, gpu, t0, fh = item
                if (rc := p.poll()) is None:
                    continue
                running.remove(item)
                fh.close()
                if gpu is not None:
                    load[gpu] -= 1
                seconds = round(time.time() - t0, 1)
                logp = job.log() if callable(job.log) else job.log
                if rc == 0 and job.done():
                    log.info("finished %s in %.0f s", job.key, seconds)
                    finish(job, Outcome("ok", seconds=seconds))
                else:
                    why = f"exit status {rc}" if rc else "it exited 0 but wrote no result"
                    log.error("%s failed (%s); log %s: %s", job.key, why, logp, _tail(logp, 3))
                    finish(job, Outcome("failed", f"{why}; see {logp}: {_tail(logp)}", seconds))
            if running:
                time.sleep(0.05)
            elif pending and not any(all(d in outcomes for d in j.deps) for j in pending):
                raise ValueError(f"jobs wait on each other: {[j.key for j in pending]}")
    finally:
        for job, p, *_ in running:
            log.warning("stopping %s (pid %d)", job.key, p.pid)
            p.terminate()
        for _job, p, _, _, fh in running:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            fh.close()
    return outcomes


# =========================================================================== records

# what a record's ``scores`` keep of each reference (the whole headline evaluation is kept too)
SCORE_KEYS = ("fid", "is", "is_std", "kid", "kid_std", "precision", "recall", "memorisation", "num_samples")  # fmt: skip


def _run_record(spec: StudySpec, run: Run, arm: Arm, status: str, detail: str, walls: dict) -> dict:
    m = _read_json(run.dir / "metrics.json") if status == "finished" else None
    rec: dict[str, Any] = {
        "id": run.id, "arm": run.arm, "grid": run.grid.id, "grid_overrides": run.grid.overrides,
        "budget": run.budget.name, "seed": run.seed, "config": arm.config_text, "overrides": arm.overrides,
        "status": status, "run_dir": str(run.dir.relative_to(run.root)), "settings": fit_settings(spec, arm, run),
    }  # fmt: skip
    if detail:
        rec["detail"] = detail
    if m is not None:
        keep = ("steps", "train_tokens", "flops_per_token", "memory", "memory_density", "memory_slots",
                "bank_bytes_per_token", "val_loss", "val_bits_per_token", "best_step", "final_val_loss",
                "final_val_bits_per_token", "train_seconds", "device", "history")  # fmt: skip
        rec.update({k: m[k] for k in keep if k in m})
        rec.update({k: v for k, v in m.items() if k.startswith("params_")})
        rec["status"] = "finished"
    evals, scores = [], {}
    for ref in spec.evaluate.references:
        r = _read_json(run.eval_file(ref))
        if r is None:
            continue
        evals.append(r)
        fid_id = r.get("id") or r.get("features") or "features"
        split = (r.get("reference") or {}).get("split") or ref or "default"
        per = scores.setdefault(fid_id, {})
        per.setdefault(split, {k: r[k] for k in r if k in SCORE_KEYS})
        for split2, s in (r.get("references") or {}).items():
            if isinstance(s, dict):
                per.setdefault(split2, {k: v for k, v in s.items() if k in SCORE_KEYS})
    if evals:
        rec["evaluation"] = evals[0]  # every key of the headline evaluation, copied through
        rec["evaluations"] = evals[1:]
        rec["scores"] = scores
        rec["reference"] = (evals[0].get("reference") or {}).get(
            "split"
        ) or spec.evaluate.references[0]
        if isinstance(evals[0].get("memorisation"), dict | int | float):
            rec["memorisation"] = evals[0]["memorisation"]
        rec["evaluated"] = True
    rec["wall_seconds"] = walls.get(run.id, {})
    return rec


# =========================================================================== the study


def run_study(config: str | Path, out: str | Path, *, parallel: int | None = None) -> dict:
    """Train and evaluate every run of the study ``config`` into ``out`` (resuming what is
    there), write ``out/study.json`` and ``out/report/``; returns the study.json object."""
    import fcntl

    spec = load_study(config)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "study.lock", "w") as lock:
        try:  # two studies in one folder would train the same runs twice
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another `movegen study` is running in {out}") from None
        return _run_study(spec, out, parallel)


def _run_study(spec: StudySpec, out: Path, parallel: int | None) -> dict:
    study_path = out / "study.json"
    prev = _read_json(study_path) if study_path.exists() else None
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
            status, detail = ("finished", "") if fit_finished(run.dir) else outcome_status(key)
            ekey = "eval:" + key
            if ekey in outcomes and outcomes[ekey].state in ("failed", "skipped"):
                detail = (detail + "; " if detail else "") + "evaluation: " + outcomes[ekey].detail
            recs.append(_run_record(spec, run, arm, status, detail, walls))
        return recs

    def outcome_status(key: str) -> tuple[str, str]:
        o = outcomes.get("fit:" + key)
        if o is None:
            return "pending", ""
        return {"failed": "failed", "skipped": "skipped"}.get(o.state, "pending"), o.detail

    def _chosen(arm: str, budget: Budget) -> str | None:
        """The grid point of ``arm`` on ``budget`` when it is chosen on the select_on budget."""
        sel = next(b for b in spec.budgets if b.name == spec.select_on)
        recs = [_run_record(spec, run_of(arm, g.id, sel, s), spec.arm(arm), "finished", "", {})
                for g in spec.grid for s in spec.seeds if fit_finished(run_of(arm, g.id, sel, s).dir)]  # fmt: skip
        if len(recs) < len(spec.grid) * len(spec.seeds):
            return None
        return choose_grid(recs, arm, sel.name)

    def write(final: bool = False) -> dict:
        doc = {
            "format": STUDY_FORMAT, "study": spec.name, "config": str(spec.path), "config_sha256": spec.sha256,
            "out": str(out), "standard": spec.standard, "arms": [a.name for a in spec.arms],
            "seeds": list(spec.seeds), "budgets": {b.name: b.args for b in spec.budgets},
            "grid": {g.id: g.overrides for g in spec.grid}, "select_on": spec.select_on,
            "evaluate": {**vars(spec.evaluate), "references": list(spec.evaluate.references)},
            "targets": list(spec.targets), "inputs": {k: str(v) for k, v in inputs.items()},
            "inputs_settings": in_settings, "parallel": parallel, "gpus": gpus,
            "launched": dict(counts), "seconds": round(time.time() - t_start, 1), "runs": records(),
        }  # fmt: skip
        doc["complete"] = final and all(
            r["status"] == "finished" and r.get("evaluated") for r in doc["runs"]
        )
        atomic_write_text(study_path, json.dumps(doc, indent=1))
        return doc

    def on_finish(job: Job, o: Outcome) -> None:
        outcomes[job.key] = o
        if o.state in ("ok", "failed"):
            counts[job.kind] += 1
        if o.seconds is not None and job.kind in ("fit", "evaluate"):
            run = bound.get(job.key.split(":", 1)[1].split("#")[0])
            if run is not None:
                w = walls.setdefault(run.id, {})
                # a fit is timed once (a resumed one adds its new part); the passes of an evaluation add up
                w[job.kind] = (
                    round(w.get(job.kind, 0) + o.seconds, 1)
                    if job.kind == "evaluate" or "--resume" in (launched.get(job.key) or [])
                    else o.seconds
                )
        if job.kind in ("fit", "evaluate") and o.state != "done":
            write()

    def bind(arm: Arm, budget: Budget, seed: int, gid: str | None, key: str) -> Run:
        if key in bound:
            return bound[key]
        gid = gid or _chosen(arm.name, budget)
        if gid is None:
            raise ValueError(f"no grid point chosen for {arm.name} on {spec.select_on}")
        run = bound[key] = run_of(arm.name, gid, budget, seed)
        settings = fit_settings(spec, arm, run)
        if fit_finished(run.dir) and prev_settings.get(run.id) not in (None, settings):
            raise ValueError(f"{run.dir} was trained with {prev_settings[run.id]}, the study now asks for "
                             f"{settings}; delete that run folder or use another --out")  # fmt: skip
        return run

    launched: dict[str, Any] = {}  # job key -> its command (fit) or reference split (evaluate)

    def fit_prepare(
        arm: Arm, budget: Budget, seed: int, gid: str | None, key: str
    ) -> list[str] | None:
        run = bind(arm, budget, seed, gid, key)
        if fit_finished(run.dir):
            return None
        resume = (run.dir / "last.ckpt").exists()
        if run.dir.exists() and not resume:
            log.warning(
                "%s has no finished run and nothing to resume from; starting it again", run.dir
            )
            shutil.rmtree(run.dir)
        cmd = launched["fit:" + key] = fit_command(spec, arm, run, inputs, resume)
        return cmd

    def eval_prepare(key: str, ekey: str) -> list[str] | None:
        run = bound[key]
        refs = spec.evaluate.references
        missing = [r for r in refs if r not in evaluated_refs(run, refs)]
        if not missing:
            return None
        # one reference per pass: the next pass skips what this one also scored
        ref = launched[ekey] = missing[0]
        return eval_command(spec, run, ref, inputs, out)

    # the runs: every arm x grid point x seed on each budget (only the chosen point off select_on)
    deps_in = tuple(j.key for j in jobs)
    fit_deps = tuple(k for k in deps_in if k in ("input:codes", "input:val_codes"))
    eval_deps = tuple(k for k in deps_in if k == "input:classifier")
    for budget in spec.budgets:
        # (with one grid point there is nothing to choose, so nothing to wait for)
        lazy = spec.select_on is not None and budget.name != spec.select_on and len(spec.grid) > 1
        for arm in spec.arms:
            for gid in [None] if lazy else [g.id for g in spec.grid]:
                for seed in spec.seeds:
                    key = _key(arm.name, gid, budget.name, seed)
                    keys.append((arm.name, budget, seed, gid))
                    sel_deps = tuple(f"fit:{_key(arm.name, g.id, spec.select_on, s)}"
                                     for g in spec.grid for s in spec.seeds) if lazy else ()  # fmt: skip
                    if not lazy:
                        bind(arm, budget, seed, gid, key)
                    jobs.append(Job(key="fit:" + key, kind="fit", deps=fit_deps + sel_deps,
                                    prepare=lambda a=arm, b=budget, s=seed, g=gid, k=key: fit_prepare(a, b, s, g, k),
                                    done=lambda k=key: fit_finished(bound[k].dir),
                                    log=lambda k=key: bound[k].log("fit")))  # fmt: skip
                    # each evaluation scores one reference; more references, more passes
                    for i in range(len(spec.evaluate.references)):
                        ek = "eval:" + key + (f"#{i}" if i else "")
                        prev_e = ("eval:" + key + (f"#{i - 1}" if i > 1 else ""),) if i else ()
                        jobs.append(Job(key=ek, kind="evaluate", deps=("fit:" + key, *eval_deps, *prev_e),
                                        prepare=lambda k=key, e=ek: eval_prepare(k, e),
                                        done=lambda k=key, e=ek: bound[k].eval_file(launched[e]).exists(),
                                        log=lambda k=key: bound[k].log("evaluate")))  # fmt: skip
    log.info("study %s: %d arms x %d grid points x %d budgets x %d seeds; %d at once%s", spec.name,
             len(spec.arms), len(spec.grid), len(spec.budgets), len(spec.seeds), parallel,
             f" on GPUs {','.join(gpus)}" if gpus else " on the CPU")  # fmt: skip
    write()
    try:
        run_jobs(jobs, parallel=parallel, gpus=gpus, on_finish=on_finish)
    finally:
        doc = write(final=True)
    report = write_study_report(doc, out / "report")
    log.info("wrote %s and %s (launched %d fits, %d evaluations, %d input builds)", study_path, report,
             counts["fit"], counts["evaluate"], counts["input"])  # fmt: skip
    bad = {k: o for k, o in outcomes.items() if o.state in ("failed", "skipped")}
    if bad:
        first = "; ".join(f"{k}: {o.detail}" for k, o in list(bad.items())[:3])
        raise ValueError(f"{len(bad)} of {len(outcomes)} steps of the study did not succeed ({first}); the report "
                         "covers the rest. Run the same command again to retry them: finished runs are kept")  # fmt: skip
    return doc


def _key(arm: str, gid: str | None, budget: str, seed: int) -> str:
    return f"{arm}/{gid or '@chosen'}/{budget}/seed{seed}"
