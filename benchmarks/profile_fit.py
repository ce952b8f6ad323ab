"""Where a small model's ``movegen fit`` step goes: times steps [a, b) of a real fit with the
GPU synchronised at both ends, then profiles steps [b, c) with torch.profiler and prints the
ops by GPU time and by CPU time, and the GPU's busy fraction.

    python -m benchmarks.profile_fit --codes CODES --val_codes VAL [--config ...] [-- FIT FLAGS]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/fashion-mnist/standard.yaml")
    p.add_argument("--codes", required=True)
    p.add_argument("--val_codes", required=True)
    p.add_argument("--steps", default="100,200,230", help="a,b,c: time [a, b), profile [b, c)")
    a, extra = p.parse_known_args()
    t0, t1, t2 = (int(x) for x in a.steps.split(","))
    from movegen import lit
    from movegen.cli import main as cli_main

    orig, state = lit.LitGPT.on_train_batch_end, {}

    def hook(self, outputs, batch, batch_idx):
        orig(self, outputs, batch, batch_idx)
        s = self.trainer.global_step
        if s in (t0, t1, t2):
            torch.cuda.synchronize()
            now = time.perf_counter()
        if s == t0:
            state["t"] = now
        elif s == t1:
            print(
                f"steps {t0}..{t1}: {1000 * (now - state['t']) / (t1 - t0):.2f} ms/step (synchronised ends)"
            )
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            state["p"] = torch.profiler.profile(activities=acts)
            state["p"].__enter__()
            state["t"] = time.perf_counter()
        elif s == t2:
            wall = now - state["t"]
            state["p"].__exit__(None, None, None)
            ev = state["p"].key_averages()
            gpu = sum(e.self_device_time_total for e in ev) / 1e6
            print(f"profiled steps {t1}..{t2}: {1000 * wall / (t2 - t1):.2f} ms/step under the profiler; "
                  f"GPU busy {gpu:.3f} s of {wall:.3f} s ({100 * gpu / wall:.0f}%)")  # fmt: skip
            print(
                ev.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60)
            )
            print(ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))

    lit.LitGPT.on_train_batch_end = hook
    out = tempfile.mkdtemp(prefix="profile-fit-")
    sys.exit(cli_main(["fit", "--config", a.config, "--data.codes", a.codes, "--data.val_codes", a.val_codes,
                       "--out", out, "--trainer.max_steps", str(t2 + 1), "--trainer.val_check_interval",
                       str(t2 + 1), *[x for x in extra if x != "--"]]))  # fmt: skip


if __name__ == "__main__":
    main()
