"""The study YAML: arms, seeds, budgets, the grid, evaluation, inputs and targets, parsed into
frozen dataclasses and checked before anything runs (every override names a real fit setting,
every arm x grid point builds a valid model config)."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..report import TARGET_KINDS

REPO = Path(__file__).resolve().parents[2]
# flags the study sets on every fit itself; an arm, grid point or budget may not set them
OWNED_FIT_KEYS = ("seed_everything", "data.seed", "data.codes", "data.val_codes", "out", "resume",
                  "overwrite")  # fmt: skip
# fit flags that parse but cannot take effect: an override of one is refused, saying why
INERT_FIT_KEYS = {
    "data.num_workers": "fit gathers its batches in-process (from device memory on a GPU), "
    "so it has no workers; remove it",
}
# flags of the fit verb itself (not of a section): a budget, grid point or fit_args may set them
FIT_FLAGS = ("patience", "state_every", "state_interval")
SECTIONS = ("arms", "seeds", "budgets", "grid", "select_on", "select_seeds", "standard", "fit_args", "evaluate",
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
    """Dotted fit flags; a bare key is a trainer setting (``max_steps`` -> ``trainer.max_steps``)
    or one of fit's own flags (``patience``: early stopping)."""


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    num_samples: int = 1000
    batch_size: int = 256
    seed: int = 0
    features: str | None = None
    """'inception' or 'classifier:PATH'; default: the classifier of the inputs."""
    references: tuple[str, ...] = ("test", "train")
    """Reference splits, passed to one ``movegen evaluate`` call as ``--ref_splits``: the first
    (a held-out split) gives the headline scores; with ``train`` and a held-out split the
    evaluation also scores memorisation."""
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
    select_seeds: tuple[int, ...] = ()
    """The seeds that choose the grid point on ``select_on`` (default: all); the other seeds
    train only the chosen point there too. Choosing on one seed halves a grid's cost."""
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


def _check_folder_name(name: Any, what: str) -> None:
    """Arm and budget names become folders of the run tree."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", str(name)):
        raise ValueError(
            f"{what} name {name!r} must be a plain folder name (letters, digits, . _ + -)"
        )


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
        _check_folder_name(name, "arm")
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
        _check_folder_name(name, "budget")
        if "max_steps" not in b and "trainer.max_steps" not in b:
            raise ValueError(
                f"budgets.{name} needs max_steps (matched steps are what make arms comparable)"
            )
        budgets.append(
            Budget(
                name=str(name),
                args={
                    (k if "." in k or k in FIT_FLAGS else f"trainer.{k}"): v for k, v in b.items()
                },
            )
        )
    grid = _grid(doc.get("grid"))
    names = [b.name for b in budgets]
    select_on = doc.get("select_on")
    if select_on is not None and select_on not in names:
        raise ValueError(f"select_on {select_on!r} is not a budget; budgets: {names}")
    select_seeds = doc.get("select_seeds")
    if select_seeds is not None:
        select_seeds = select_seeds if isinstance(select_seeds, list) else [select_seeds]
        if select_on is None:
            raise ValueError(
                "select_seeds needs select_on: the budget whose runs choose the grid point"
            )
        if not select_seeds or not set(select_seeds) <= set(seeds):
            raise ValueError(f"select_seeds {select_seeds} must be some of the seeds {list(seeds)}")
    standard = doc.get("standard", "standard" if "standard" in arms_doc else arms[0].name)
    if standard not in arms_doc:
        raise ValueError(f"standard arm {standard!r} is not one of the arms {list(arms_doc)}")
    ev = dict(_mapping(doc.get("evaluate"), "evaluate"))
    refs = ev.pop("references", list(EvalSpec.references))
    refs = tuple(refs if isinstance(refs, list) else [refs])
    if (
        not refs
        or any(r not in ("train", "val", "test") for r in refs)
        or len(set(refs)) != len(refs)
    ):
        raise ValueError(f"evaluate.references must list distinct splits of train, val, test (the first is the "
                         f"headline reference, e.g. [test, train]), got {list(refs)}")  # fmt: skip
    owned = {"ref_splits": "evaluate.references", "num_samples": "evaluate.num_samples",
             "seed": "evaluate.seed", "batch_size": "evaluate.batch_size", "features": "evaluate.features",
             "model": None, "out": None, "cache_dir": None}  # fmt: skip
    for k in _mapping(ev.get("args"), "evaluate.args"):
        if k in owned or k.startswith("sampling."):
            where = owned.get(k) or ("evaluate.sampling" if k.startswith("sampling.") else None)
            raise ValueError(f"evaluate.args: {k} is set by the study itself" +
                             (f"; set it with {where}" if where else ""))  # fmt: skip
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
                     budgets=tuple(budgets), grid=grid, select_on=select_on,
                     select_seeds=tuple(select_seeds or ()), standard=standard,
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

    from ..data import CodeDataModule
    from ..lit import LitGPT
    from ..model import GPTConfig

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
            if key in INERT_FIT_KEYS:
                raise ValueError(f"{where}: {key} has no effect: {INERT_FIT_KEYS[key]}")
            section, _, name = key.rpartition(".")
            if not section and name in FIT_FLAGS:
                continue
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
