"""``movegen report``: evaluation results -> a markdown table and plots; and the statistics and
report of ``movegen study`` (:func:`write_study_report`: mean ± sd over seeds, paired differences
with t-intervals, the grid, targets, learning and density curves).

Runs scored with different feature sets (Inception vs. a dataset classifier, or two different
classifiers) are never put in one column: each feature set gets its own table and plots.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .checkpoint import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

COLUMNS = [
    ("run", "run", "{}"),
    ("memory", "memory", "{}"),
    ("memory_density", "density", "x{:g}"),
    ("memory_slots", "slots", "{}"),
    ("params_total", "params (M)", "{:.2f}", 1e-6),
    ("params_memory", "memory params (M)", "{:.2f}", 1e-6),
    ("flops_per_token", "fwd MFLOP/token", "{:.2f}", 1e-6),
    ("train_tokens", "train tokens (M)", "{:.2f}", 1e-6),
    ("val_bits_per_token", "val bits/token", "{:.4f}"),
    ("fid", "FID", "{:.3f}"),
    ("is", "IS", "{:.3f}"),
    ("kid", "KID", "{:.4f}"),
]
"""The columns of ``movegen report``; FID/KID are against the primary reference (the table's
heading names it). More follow when the results have them (:func:`_columns`)."""
EXTRA_COLUMNS = [
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
]


def _columns(rows: list[dict]) -> list[tuple]:
    """:data:`COLUMNS`, then those of :data:`EXTRA_COLUMNS` that a row has, ``FID (<split>)`` of
    each other reference, and the memorisation ratio."""
    cols = COLUMNS + [c for c in EXTRA_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    primary = {r.get("reference_split") for r in rows}
    others = dict.fromkeys(s for r in rows for s in (r.get("references") or {}) if s not in primary)
    cols += [
        (f"fid_{s}", f"FID ({s})", "{:.3f}") for s in others if any(f"fid_{s}" in r for r in rows)
    ]
    if any(isinstance(r.get("memorisation"), dict) for r in rows):
        cols.append(("memorisation.memorisation", "memorisation", "{:.3f}"))
    return cols


def load_results(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"results folder {folder} does not exist (run `movegen evaluate --out {folder}` first)"
        )
    rows = []
    for p in sorted(folder.glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            # one truncated file (a run killed mid-copy) must not hide every other result
            log.warning("skipping %s: not readable JSON (%s)", p, e)
            continue
        if isinstance(r, dict) and "fid" in r and "id" in r:
            rows.append(r)
    if not rows:
        raise ValueError(f"no evaluation results (*.json from `movegen evaluate`) in {folder}")
    return rows


def _cell(r: dict, col) -> str:
    key, _, fmt, *scale = col
    v = r
    for part in key.split("."):  # "memorisation.memorisation": a field of a section
        v = v.get(part) if isinstance(v, dict) else None
    if v is None:
        return "–"
    if scale:
        v = v * scale[0]
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def train_flops(r: dict) -> float | None:
    """Training FLOPs ~ 3 x forward FLOPs per token x tokens seen."""
    if r.get("flops_per_token") is None or r.get("train_tokens") is None:
        return None
    return 3.0 * r["flops_per_token"] * r["train_tokens"]


def _plot(rows, x_key, y_keys, xlabel, path, logx=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(y_keys), figsize=(5 * len(y_keys), 4), squeeze=False)
    for ax, (yk, ylabel) in zip(axes[0], y_keys):
        for r in rows:
            x = x_key(r)
            y = r.get(yk)
            if x is None or y is None:
                continue
            ax.scatter([x], [y], label=r["run"])
            ax.annotate(r["run"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def write_report(results: str | Path, out: str | Path) -> Path:
    """Write ``out/README.md`` and the PNG plots; returns the README path."""
    rows = load_results(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # one table per feature set and primary reference: their FIDs never share a column
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        split = r.get("reference_split") or (r.get("reference") or {}).get("split") or "?"
        groups.setdefault((r["id"], split), []).append(r)
    lines = ["# movegen report", "", f"{len(rows)} runs from `{results}`.", ""]
    for i, ((fid_id, split), rs) in enumerate(sorted(groups.items())):
        suffix = "" if len(groups) == 1 else f"-{i}"
        r0 = rs[0]
        cols = _columns(rs)
        lines += [f"## Features: {r0['features']} (`{fid_id}`), reference: {split}", ""]
        lines.append(f"Reference: {r0['reference']['dataset']} {split} split "
                     f"({r0.get('reference_size', '?')} images); {r0['num_samples']} samples per model; "
                     f"sampling {json.dumps(r0['sampling'])}; seed {r0['seed']}.")  # fmt: skip
        if any(c[0] == "memorisation.memorisation" for c in cols):
            lines.append("Memorisation: median distance of the samples to their nearest training image "
                         "over that of held-out real images (about 1: no copying; below 1: the samples "
                         "sit closer to the training images than new real images do).")  # fmt: skip
        lines.append("")
        lines.append("| " + " | ".join(c[1] for c in cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in sorted(rs, key=lambda r: r["run"]):
            lines.append("| " + " | ".join(_cell(r, c) for c in cols) + " |")
        lines.append("")
        plots = [
            (f"fid_vs_train_flops{suffix}.png", train_flops, [("fid", "FID")], "training FLOPs", True),
            (f"fid_vs_params{suffix}.png", lambda r: r.get("params_total"), [("fid", "FID")], "total parameters", True),
            (f"fid_bits_vs_slots{suffix}.png", lambda r: r.get("memory_slots"),
             [("fid", "FID"), ("val_bits_per_token", "val bits/token")], "memory slots per token", False),
        ]  # fmt: skip
        for name, xf, ys, xlabel, logx in plots:
            _plot(rs, xf, ys, xlabel, out / name, logx)
            lines.append(f"![{name}]({name})")
        lines.append("")
    readme = out / "README.md"
    atomic_write_text(readme, "\n".join(lines) + "\n")
    return readme


# =========================================================================== studies
#
# ``movegen study`` writes study.json (one record per run, see ``study.py``); what follows turns
# it into numbers one can make a claim with: mean +- sd over seeds, paired differences to the
# standard arm (same seed: same init seed and data order) with a t-interval, the grid table, the
# targets and the plots. Scores of different feature sets or references never share a column.

TARGET_KINDS = ("at_least_pct_lower", "at_least_pct_higher", "at_least_lower", "at_least_higher")
REFERENCE_SCORES = ("fid", "kid", "kid_std", "precision", "recall")
"""Scores against one reference split: ``fid`` (the headline split), ``fid:train`` (another)."""
SAMPLE_SCORES = ("is", "is_std")
"""Scores of the samples alone (no reference)."""
MEMORISATION_SCORES = ("memorisation", "copy_z", "copy_fraction")
"""Of a record's ``memorisation`` section; ``memorisation`` is the ratio of median
nearest-training-image distances, samples over held-out real images (< 1: copying)."""
SCORES = REFERENCE_SCORES + SAMPLE_SCORES + MEMORISATION_SCORES
"""Every number measured in a feature space: comparable only within one feature set."""


def mean_sd(xs) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); sd is None for fewer than two values."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile: P(|T| <= q) = level with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def paired_difference(x: dict, base: dict, level: float = 0.95) -> dict | None:
    """``x - base`` over the seeds both have (seed -> value): mean, sd, a ``level`` t-interval of
    the mean (None for one seed) and the same relative to the base mean, in percent."""
    seeds = sorted(s for s in x if s in base and x[s] is not None and base[s] is not None)
    if not seeds:
        return None
    d = [x[s] - base[s] for s in seeds]
    m, sd = mean_sd(d)
    b, _ = mean_sd([base[s] for s in seeds])
    ci = None
    if sd is not None:
        h = t_quantile(len(d) - 1, level) * sd / len(d) ** 0.5
        ci = (m - h, m + h)
    pct = (lambda v: 100.0 * v / b) if b else (lambda v: None)
    return {
        "n": len(d), "seeds": seeds, "mean": m, "sd": sd, "ci": ci, "level": level, "base_mean": b,
        "pct": pct(m), "pct_ci": (pct(ci[0]), pct(ci[1])) if ci and b else None,
        "per_seed": dict(zip(seeds, d)),
        "per_seed_pct": {s: (100.0 * v / base[s] if base[s] else None) for s, v in zip(seeds, d)},
    }  # fmt: skip


def _scalar(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def features_of(rec: dict) -> str | None:
    """The feature set of a run's evaluation."""
    return rec.get("features") or next(iter(rec.get("scores") or {}), None)


def metric_value(rec: dict, metric: str, features: str | None = None) -> float | None:
    """A number of one run: a record field (``val_bits_per_token``...), a score against a
    reference (``fid``/``kid``/``precision``/``recall`` against the headline reference,
    ``fid:train`` against another), ``is``, or ``memorisation``/``copy_z``/``copy_fraction``;
    the scores only when the run was scored on ``features`` (default: its own feature set)."""
    name, _, split = metric.partition(":")
    if name in SCORES and features is not None and features_of(rec) != features:
        return None
    if name in REFERENCE_SCORES:
        per = (rec.get("scores") or {}).get(features_of(rec)) or {}
        return _scalar((per.get(split or rec.get("reference")) or {}).get(name))
    if name in MEMORISATION_SCORES:
        return _scalar((rec.get("memorisation") or {}).get(name))
    return _scalar(rec.get(metric))


def _finished(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "finished"]


def _seeds_note(doc: dict) -> str:
    chosen_by, seeds = doc.get("select_seeds"), doc.get("seeds") or []
    if not chosen_by or list(chosen_by) == list(seeds):
        return ""
    return f" with seed{'s' if len(chosen_by) > 1 else ''} {', '.join(map(str, chosen_by))} (the other seeds train the chosen point only)"


def choose_grid(records: list[dict], arm: str, budget: str, metric: str = "val_loss") -> str | None:
    """The grid point of ``arm`` on ``budget`` with the lowest mean ``metric`` over seeds (ties:
    the first listed), among the points with every seed finished that any point has."""
    by: dict[str, dict] = {}
    for r in _finished(records):
        if r["arm"] == arm and r["budget"] == budget and metric_value(r, metric) is not None:
            by.setdefault(r["grid"], {})[r["seed"]] = metric_value(r, metric)
    if not by:
        return None
    n = max(len(v) for v in by.values())
    full = {g: mean_sd(v.values())[0] for g, v in by.items() if len(v) == n}
    return min(full, key=lambda g: (full[g], list(full).index(g)))


def chosen_runs(records: list[dict], arm: str, budget: str) -> tuple[str | None, dict[int, dict]]:
    g = choose_grid(records, arm, budget)
    runs = {
        r["seed"]: r
        for r in _finished(records)
        if (r["arm"], r["budget"], r["grid"]) == (arm, budget, g)
    }
    return g, runs


def check_target(target: dict, records: list[dict]) -> dict:
    """Is ``target`` met? E.g. ``{arm: move-x4, vs: standard, metric: val_bits_per_token, budget:
    short, at_least_pct_lower: 2, every_seed: true}``: the paired difference (each arm at its chosen
    grid point) must be at least 2% lower, on the mean, or on every seed with ``every_seed``, and
    with ``significant`` its 95% interval must exclude 0 on the wanted side. ``margin`` is how far
    past the threshold the worst counted value is (in % for the pct kinds): > 0 met by, < 0 missed
    by."""
    kind = next(k for k in TARGET_KINDS if k in target)
    thr = float(target[kind])
    metric, budget = target.get("metric", "val_bits_per_token"), target["budget"]
    out = {**target, "kind": kind, "met": None, "margin": None}
    _, a = chosen_runs(records, target["arm"], budget)
    _, b = chosen_runs(records, target["vs"], budget)
    feats = (
        {features_of(r) for r in [*a.values(), *b.values()]} - {None}  # (None: not scored yet)
        if metric.split(":")[0] in SCORES
        else set()
    )
    if len(feats) > 1:
        return {
            **out,
            "detail": f"not comparable: scored with different feature sets {sorted(map(str, feats))}",
        }
    f = next(iter(feats), None)
    diff = paired_difference({s: metric_value(r, metric, f) for s, r in a.items()},
                             {s: metric_value(r, metric, f) for s, r in b.items()})  # fmt: skip
    if diff is None:
        ran = {r["arm"] for r in records}
        absent = [x for x in (target["arm"], target["vs"]) if x not in ran]
        why = (f"{' and '.join(absent)} not in this study's runs" if absent
               else "no seed with both arms finished and scored")  # fmt: skip
        return {**out, "detail": f"not measured: {why}"}
    pct, lower = kind.startswith("at_least_pct"), kind.endswith("lower")
    sign = -1.0 if lower else 1.0  # the wanted direction of arm - vs
    values = diff["per_seed_pct" if pct else "per_seed"] if target.get("every_seed") else {
        "mean": diff["pct" if pct else "mean"]}  # fmt: skip
    if any(v is None for v in values.values()):
        return {**out, "detail": "not measured: the reference value is 0, so no percentage"}
    gains = {s: sign * v for s, v in values.items()}
    margin = min(gains.values()) - thr
    met = margin >= 0
    detail = ""
    if target.get("significant"):
        if diff["ci"] is None:
            met, detail = False, "one seed: no interval, so not significant"
        elif (diff["ci"][1] if lower else -diff["ci"][0]) >= 0:
            met, detail = False, "the 95% interval includes 0"
    return {
        **out,
        "met": met,
        "margin": margin,
        "diff": diff,
        "detail": detail,
        "unit": "%" if pct else "",
    }


def _pm(m, sd, fmt="{:.4f}") -> str:
    if m is None:
        return "–"
    return fmt.format(m) + ("" if sd is None else " ± " + fmt.format(sd))


def _diff_cell(d: dict | None, fmt="{:+.4f}") -> str:
    if d is None:
        return "–"
    s = fmt.format(d["mean"])
    if d["ci"]:
        s += f" [{fmt.format(d['ci'][0])}, {fmt.format(d['ci'][1])}]"
    else:
        s += " (1 seed)"
    if d["pct"] is not None:
        s += f" ({d['pct']:+.2f}%)"
    return s


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def _curves_plot(series: dict[str, list[dict]], path: Path, title: str) -> None:
    """Validation bits/token against step and against training FLOPs (3 x forward FLOPs/token x
    tokens): each arm's mean over seeds with its min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm, runs in series.items():
        steps = sorted({h["step"] for r in runs for h in r.get("history") or []})
        rows = []
        for st in steps:
            pts = [(h["val_bits_per_token"], 3.0 * r["flops_per_token"] * h["train_tokens"])
                   for r in runs for h in r.get("history") or [] if h["step"] == st]  # fmt: skip
            ys = [p[0] for p in pts]
            rows.append(
                (st, sum(ys) / len(ys), min(ys), max(ys), sum(p[1] for p in pts) / len(pts))
            )
        if not rows:
            continue
        st, m, lo, hi, fl = zip(*rows)
        for ax, x in zip(axes, (st, fl)):
            (line,) = ax.plot(x, m, label=f"{arm} (n={len(runs)})")
            ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training FLOPs (3 x fwd FLOPs/token x tokens)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("val bits/token")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.suptitle(title + " (mean over seeds, band: min-max)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _points_plot(
    points: list[tuple], panels: list[str], xlabel: str, path: Path, title: str
) -> None:
    """``points``: (label, x, [(mean, sd) per panel], group) -> one errorbar point per label per
    panel; the points of a group (a memory kind: the density curve) are joined in x order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for j, (ax, ylabel) in enumerate(zip(axes[0], panels)):
        groups: dict[str, list] = {}
        for label, x, ys, group in points:
            m, sd = ys[j]
            if x is None or m is None:
                continue
            ax.errorbar([x], [m], yerr=[sd or 0.0], fmt="o", capsize=3, label=label)
            ax.annotate(label, (x, m), fontsize=7, xytext=(4, 4), textcoords="offset points")
            if group:
                groups.setdefault(group, []).append((x, m))
        for xy in groups.values():
            if len(xy) > 1:
                xs, ms = zip(*sorted(xy))
                ax.plot(xs, ms, "--", color="grey", lw=0.8, zorder=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (as a user typed it from
    the repository root), else as recorded."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_study_report(doc: dict, out: str | Path) -> Path:
    """``out/README.md`` and PNG plots from a study.json object; returns the README path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, std = doc["runs"], doc["standard"]
    arms, budgets, grid = doc["arms"], list(doc["budgets"]), doc["grid"]
    done = _finished(records)
    diverged = [r for r in records if r.get("status") == "diverged"]
    ev = doc.get("evaluate") or {}
    refs_order = list(ev.get("references") or [])
    L = [f"# Study `{doc['study']}`", "",
         f"{len(done)} of {len(records)} runs finished{f', {len(diverged)} diverged' if diverged else ''} ({len(arms)} arms x {len(grid)} grid points x "
         f"{len(budgets)} budgets x {len(doc['seeds'])} seeds {doc['seeds']}; every arm sees the same data order "
         f"per seed). Config `{_shown_path(doc['config'])}`.", "",
         f"Each arm's grid point is the one with the lowest mean validation loss over seeds "
         f"({'on budget ' + repr(doc['select_on']) + _seeds_note(doc) + ', used for every budget' if doc.get('select_on') else 'per budget'}). "
         f"Δ is the paired difference to `{std}` over matching seeds, mean [95% t-interval] (relative to "
         f"`{std}`'s mean); ± is the sd over seeds. Evaluation: {ev.get('num_samples')} samples per run, "
         f"sampling {json.dumps(ev.get('sampling') or {})}, seed {ev.get('seed')}, references {refs_order} "
         "(the first, held out, is the headline; each split has its own columns). Memorisation: median "
         "distance of the samples to their nearest training image over that of held-out real images "
         "(about 1: no copying; below 1: samples sit closer to the training images than new real images do).",
         ""]  # fmt: skip
    feats = list(dict.fromkeys(f for r in done if (f := features_of(r))))
    for budget in budgets:
        args = doc["budgets"][budget]
        settings = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in args.items())
        L += [f"## Budget `{budget}` ({settings})", ""]
        chosen = {a: chosen_runs(records, a, budget) for a in arms}
        base = chosen[std][1]
        for fi, f in enumerate(feats or [None]):
            scored = [r for r in done if r["budget"] == budget and features_of(r) == f]
            # the headline (held-out) split first, each other split in its own columns
            found = [s for r in scored for s in ((r.get("scores") or {}).get(f) or {})]
            splits = list(dict.fromkeys([s for s in refs_order if s in found] + found))
            head_split = splits[0] if splits else None
            if f is not None:
                L += [
                    f"### Features `{f}`" + (" (val bits/token repeated from above)" if fi else ""),
                    "",
                ]
            head = ["arm", "grid point", "seeds", "params (M)", "memory params (M)", "fwd MFLOP/token",
                    "val bits/token", f"Δ bits vs {std}"]  # fmt: skip
            for s in splits:
                head += (
                    [f"FID ({s})", f"Δ FID ({s}) vs {std}"] if s == head_split else [f"FID ({s})"]
                )
            if head_split is not None:
                head += [f"KID ({head_split})", f"precision ({head_split})", f"recall ({head_split})",
                         "IS", "memorisation"]  # fmt: skip
            L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for a in arms:
                g, runs = chosen[a]
                n_div = sum(
                    1 for r in diverged if (r["arm"], r["budget"], r["grid"]) == (a, budget, g)
                )
                if not runs:
                    n_all = sum(1 for r in diverged if (r["arm"], r["budget"]) == (a, budget))
                    L.append(
                        f"| {a} | – | 0{f' ({n_all} diverged)' if n_all else ''} |"
                        + " – |" * (len(head) - 3)
                    )
                    continue
                r0 = next(iter(runs.values()))

                def col(metric, runs=runs, f=f):
                    return mean_sd([metric_value(r, metric, f) for r in runs.values()])

                def dif(metric, runs=runs, f=f, base=base):
                    return paired_difference({s: metric_value(r, metric, f) for s, r in runs.items()},
                                             {s: metric_value(r, metric, f) for s, r in base.items()})  # fmt: skip

                cells = [a, g, f"{len(runs)}{f' (+{n_div} diverged)' if n_div else ''}",
                         f"{r0.get('params_total', 0) / 1e6:.2f}",
                         f"{r0.get('params_memory', 0) / 1e6:.2f}", f"{r0.get('flops_per_token', 0) / 1e6:.2f}",
                         _pm(*col("val_bits_per_token")), "–" if a == std else _diff_cell(dif("val_bits_per_token"))]  # fmt: skip
                for s in splits:
                    cells.append(_pm(*col(f"fid:{s}"), fmt="{:.3f}"))
                    if s == head_split:
                        cells.append(
                            "–" if a == std else _diff_cell(dif(f"fid:{s}"), fmt="{:+.3f}")
                        )
                if head_split is not None:
                    cells += [_pm(*col(f"kid:{head_split}"), fmt="{:.4f}"),
                              _pm(*col(f"precision:{head_split}"), fmt="{:.3f}"),
                              _pm(*col(f"recall:{head_split}"), fmt="{:.3f}"),
                              _pm(*col("is"), fmt="{:.3f}"), _pm(*col("memorisation"), fmt="{:.3f}")]  # fmt: skip
                L.append("| " + " | ".join(cells) + " |")
            L.append("")
        div_here = [r for r in diverged if r["budget"] == budget]
        if div_here:
            L += [f"Diverged on `{budget}` (the loss became NaN or infinite; left out of the means "
                  "and differences above):", ""]  # fmt: skip
            L += [f"- `{r['id']}` at step {r.get('diverged_step', '?')}" for r in div_here]
            L.append("")
        # plots of this budget: learning curves, density curve, FID against memorisation
        series = {a: list(chosen[a][1].values()) for a in arms if chosen[a][1]}
        name = f"curves-{budget}.png"
        _curves_plot(series, out / name, f"budget {budget}")
        L += [f"![validation curves, {budget}]({name})", ""]
        f = feats[0] if feats else None
        head_split = next(
            (r.get("reference") for r in done if r["budget"] == budget and features_of(r) == f),
            None,
        )
        pts = []
        for a, runs in series.items():
            r0 = runs[0]
            ys = [
                mean_sd([metric_value(r, m, f) for r in runs])
                for m in ("fid", "val_bits_per_token")
            ]
            pts.append(
                (
                    a,
                    r0.get("memory_slots"),
                    ys,
                    r0.get("memory") if r0.get("memory") != "none" else None,
                )
            )
        name = f"density-{budget}.png"
        _points_plot(pts, [f"FID ({head_split})", "val bits/token"], "memory slots per token", out / name,
                     f"budget {budget}: against memory slots (density curve; mean ± sd over seeds)")  # fmt: skip
        L += [f"![FID and bits/token against memory slots, {budget}]({name})", ""]
        mem = [(a, *mean_sd([metric_value(r, "memorisation") for r in runs]), mean_sd([metric_value(r, "fid", f) for r in runs]))
               for a, runs in series.items()]  # fmt: skip
        if any(m is not None for _, m, _, _ in mem):
            name = f"fid-vs-memorisation-{budget}.png"
            _points_plot([(a, m, [fid], None) for a, m, _, fid in mem], [f"FID ({head_split})"], "memorisation score",
                         out / name, f"budget {budget}: FID against memorisation")  # fmt: skip
            L += [f"![FID against memorisation, {budget}]({name})", ""]
        else:
            L += [
                "(No memorisation score in these evaluation results, so no FID-against-memorisation plot.)",
                "",
            ]
    # the grid: every point, every arm, every budget
    f0 = feats[0] if feats else None  # one feature set per column
    fid_head = f"FID ({refs_order[0] if refs_order else 'headline'}" + (
        f", `{f0}`)" if len(feats) > 1 else ")"
    )
    L += [
        "## Grid",
        "",
        "Every grid point of every arm; **bold**: the chosen one (lowest mean val loss).",
        "",
    ]
    L += [f"| budget | arm | grid point | overrides | seeds | val bits/token | final val bits/token | {fid_head} |",
          "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for budget in budgets:
        for a in arms:
            g_best = choose_grid(records, a, budget)
            for g, ov in grid.items():
                rs = [r for r in done if (r["arm"], r["budget"], r["grid"]) == (a, budget, g)]
                if not rs:
                    continue
                gname = f"**{g}**" if g == g_best else g
                L.append(f"| {budget} | {a} | {gname} | `{json.dumps(ov)}` | {len(rs)} | "
                         f"{_pm(*mean_sd([r.get('val_bits_per_token') for r in rs]))} | "
                         f"{_pm(*mean_sd([r.get('final_val_bits_per_token') for r in rs]))} | "
                         f"{_pm(*mean_sd([metric_value(r, 'fid', f0) for r in rs]), fmt='{:.3f}')} |")  # fmt: skip
    L.append("")
    # targets
    if doc.get("targets"):
        L += ["## Targets", ""]
        for t in doc["targets"]:
            c = check_target(t, records)
            unit = "%" if "pct" in c["kind"] else ""
            side = "lower" if c["kind"].endswith("lower") else "higher"
            claim = (f"`{t['arm']}` {t.get('metric', 'val_bits_per_token')} at least {t[c['kind']]}{unit} {side} "
                     f"than `{t['vs']}` on `{t['budget']}`{', on every seed' if t.get('every_seed') else ''}"
                     f"{', 95% interval excluding 0' if t.get('significant') else ''}")  # fmt: skip
            if c["met"] is None:
                L.append(f"- {claim}: **not measured** ({c['detail']})")
                continue
            verdict = f"**met** by {c['margin']:.3g}{unit}" if c["met"] else (
                f"**missed** by {-c['margin']:.3g}{unit}" if c["margin"] < 0 else "**missed**")  # fmt: skip
            # a study still running judges on the seeds it has: said so, next to the verdict
            k, n = len(c["diff"]["per_seed"]), len(doc.get("seeds") or [])
            if k < n and not doc.get("complete"):
                verdict += f" (provisional: {k} of {n} seeds so far)"
            L.append(f"- {claim}: {verdict}; Δ {_diff_cell(c['diff'], fmt='{:+.4g}')}, per seed "
                     + ", ".join(f"{s}: {v:+.3g}{unit}" for s, v in
                                 c["diff"]["per_seed_pct" if unit else "per_seed"].items())
                     + (f" ({c['detail']})" if c["detail"] else ""))  # fmt: skip
        L.append("")
    # every run
    L += ["## Runs", "", f"| run | status | steps | best step | val bits/token | final | {fid_head} | fit s | eval s |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        w = r.get("wall_seconds") or {}
        fid = metric_value(r, "fid", f0)
        status = r["status"] + (
            " (not evaluated)" if r["status"] == "finished" and not r.get("evaluated") else ""
        )
        if r["status"] == "diverged":
            status += f" at step {r.get('diverged_step', '?')}"
        L.append(f"| {r['id']} | {status} | "
                 f"{r.get('steps', '–')} | {r.get('best_step', '–')} | {_pm(r.get('val_bits_per_token'), None)} | "
                 f"{_pm(r.get('final_val_bits_per_token'), None)} | {_pm(fid, None, '{:.3f}')} | "
                 f"{w.get('fit', '–')} | {w.get('evaluate', '–')} |")  # fmt: skip
    if diverged:
        L += [
            "",
            "Diverged (recorded, not retried; delete a run's folder under `runs/` to train it again):",
            "",
        ]
        L += [f"- `{r['id']}`: {r.get('detail', '')}" for r in diverged]
    bad = [r for r in records if r["status"] not in ("finished", "diverged") and r.get("detail")]
    if bad:
        L += ["", "Not finished:", ""] + [f"- `{r['id']}`: {r['detail']}" for r in bad]
    readme = out / "README.md"
    atomic_write_text(readme, "\n".join(L) + "\n")
    return readme
