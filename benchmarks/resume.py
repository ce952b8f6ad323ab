"""Resume fidelity: one ``movegen fit`` run uninterrupted, the same run killed with SIGKILL once
its training state holds step ``--kill_at``, then resumed with ``--resume true``; prints the
validation losses of both at every validation and the largest difference.

    python -m benchmarks.resume --codes CODES --val_codes VAL [--steps 1000 --kill_at 500]
        [--fit_flags '--model.cuda_graph true']

On the CPU the curves are identical (the test suite checks it at a small scale); on a GPU they
agree within bf16 noise. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fit(args, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "movegen", "fit", "--config", args.config, "--data.codes", args.codes,
            "--data.val_codes", args.val_codes, "--out", str(out), "--trainer.max_steps", str(args.steps),
            "--trainer.val_check_interval", str(args.every), "--state_every", str(args.kill_at // args.every),
            *args.fit_flags.split(), *extra]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/digits/standard.yaml")
    p.add_argument("--codes", required=True)
    p.add_argument("--val_codes", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--kill_at", type=int, default=500)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--work", default=None)
    p.add_argument("--fit_flags", default="", help="more fit flags, e.g. '--model.cuda_graph true'")
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="resume-"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.time()
    ref = subprocess.Popen(
        fit(a, work / "uninterrupted"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    cut = subprocess.Popen(
        fit(a, work / "resumed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    state = work / "resumed" / "last.ckpt"
    while not state.exists():  # written once, at --kill_at (--state_every)
        if cut.poll() is not None:
            sys.exit(
                f"the run ended (exit {cut.returncode}) before its state at step {a.kill_at} was written"
            )
        time.sleep(0.05)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    killed_after = time.time() - t0
    rc = subprocess.run(
        fit(a, work / "resumed", "--resume", "true"), env=env, capture_output=True, text=True
    )
    if rc.returncode != 0:
        sys.exit(f"resume failed (exit {rc.returncode}):\n{rc.stdout[-2000:]}{rc.stderr[-2000:]}")
    if ref.wait() != 0:
        sys.exit("the uninterrupted run failed")

    def curve(d):
        return {
            h["step"]: h["val_loss"]
            for h in json.loads((work / d / "metrics.json").read_text())["history"]
        }

    x, y = curve("uninterrupted"), curve("resumed")
    print(
        f"killed with SIGKILL after {killed_after:.1f} s (state at step {a.kill_at}), resumed to {a.steps}"
    )
    print("| step | uninterrupted val loss | resumed val loss | difference |")
    print("|---|---|---|---|")
    for s in sorted(x):
        d = y.get(s, float("nan")) - x[s]
        print(f"| {s} | {x[s]:.6f} | {y.get(s, float('nan')):.6f} | {d:+.2e} |")
    after = [abs(y[s] - x[s]) for s in x if s in y and s > a.kill_at]
    print(json.dumps({"steps": a.steps, "kill_at": a.kill_at, "validations": len(x), "missing": sorted(set(x) - set(y)),
                      "max_abs_diff_before_kill": max(abs(y[s] - x[s]) for s in x if s <= a.kill_at),
                      "max_abs_diff_after_resume": max(after) if after else None}))  # fmt: skip


if __name__ == "__main__":
    main()
