"""``movegen report``: evaluation results -> a markdown table and plots.

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


def load_results(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"results folder {folder} does not exist (run `movegen evaluate --out {folder}` first)"
        )
    rows = []
    for p in sorted(folder.glob("*.json")):
        r = json.loads(p.read_text())
        if "fid" in r and "id" in r:
            rows.append(r)
    if not rows:
        raise ValueError(f"no evaluation results (*.json from `movegen evaluate`) in {folder}")
    return rows


def _cell(r: dict, col) -> str:
    key, _, fmt, *scale = col
    v = r.get(key)
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
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["id"], []).append(r)
    lines = ["# movegen report", "", f"{len(rows)} runs from `{results}`.", ""]
    for i, (fid_id, rs) in enumerate(sorted(groups.items())):
        suffix = "" if len(groups) == 1 else f"-{i}"
        r0 = rs[0]
        lines += [f"## Features: {r0['features']} (`{fid_id}`)", ""]
        lines.append(f"Reference: {r0['reference']['dataset']} {r0['reference']['split']} split "
                     f"({r0.get('reference_size', '?')} images); {r0['num_samples']} samples per model; "
                     f"sampling {json.dumps(r0['sampling'])}; seed {r0['seed']}.")  # fmt: skip
        lines.append("")
        lines.append("| " + " | ".join(c[1] for c in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for r in sorted(rs, key=lambda r: r["run"]):
            lines.append("| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |")
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
