"""Where a training step (or a sampling step) spends GPU time: torch.profiler, top kernels.

python -m benchmarks.profile_step --arm move-x4 --batch 256
python -m benchmarks.profile_step --sampling --arm standard --batch 16
python -m benchmarks.profile_step --compare standard,move-x1,move-x4   # kernel time per arm
python -m benchmarks.profile_step --smoke

``--compare`` profiles each arm's step in turn in one process and prints every GPU kernel's time
per step side by side, ordered by how much more the later arms spend than the first: what an arm
adds over the standard step, kernel by kernel. Arms take the options of ``train_step``
(``move-x4@router``).
"""

from __future__ import annotations

import argparse
import re

import torch

from movegen.lit import clip_grad_norm_for_step, optimizer_groups
from movegen.model import GPT
from movegen.sample import CompiledStep, SamplingSettings, generate

from ._util import apply_arm_options, arm_config, arm_options, kernel_times, profile_table


def build(arm: str, a, dev: torch.device):
    """The model of ``arm`` and one unit of work: a compiled training step (fused AdamW, clip
    1.0) or, with ``--sampling``, one batch sampled with CFG 2."""
    name, opts = arm_options(arm)  # ARM@opt+opt as in train_step
    cfg = arm_config(name, a.smoke)
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    if a.ops is not None:
        model.fused_ops = tuple(o for o in a.ops.split(",") if o)
    apply_arm_options(model, opts)
    codes = torch.randint(1, cfg.vocab_size, (a.batch, cfg.seq_len), device=dev)
    labels = torch.randint(0, cfg.num_classes, (a.batch,), device=dev)
    if a.sampling:
        model.eval()
        settings = SamplingSettings(cfg_scale=2.0)
        step = CompiledStep(model, a.batch, settings)  # graphed on CUDA, eager on the CPU

        def work():
            g = torch.Generator(device=dev).manual_seed(0)
            generate(model, labels, settings, generator=g, step=step)

        return model, work
    model.train()
    opt = torch.optim.AdamW(optimizer_groups(model, 0.05), lr=1e-4, fused=dev.type == "cuda")

    def loss_fn(c, l):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            return model.loss(c, l)  # fp32 cross-entropy of the logits

    fn = torch.compile(loss_fn) if dev.type == "cuda" else loss_fn

    def work():
        fn(codes, labels).backward()
        clip_grad_norm_for_step(model.parameters(), opt, 1.0)  # as movegen's training clips
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, work


def wall_ms(work, dev: torch.device, n: int = 5) -> float | None:
    """Mean wall time of ``work`` over ``n`` unprofiled runs (CUDA events), None on the CPU."""
    if dev.type != "cuda":
        return None
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(n):
        work()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / n


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arm", default="move-x4")
    p.add_argument("--compare", default="", help="comma list of arms: kernel times side by side")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sampling", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--min_ms", type=float, default=0.05,
                   help="--compare: leave out kernels under this many ms/step in every arm")  # fmt: skip
    p.add_argument("--ops", default=None,
                   help="GPT.fused_ops as a comma list (default: the model's; '' for none)")  # fmt: skip
    a = p.parse_args()
    dev = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    if a.smoke:
        a.batch = 4
    per = 1 if a.sampling else 2  # profiled units of work
    unit = "sampling run" if a.sampling else "step"
    if a.compare:
        arms = [x for x in a.compare.split(",") if x]
        times, walls = [], []
        for arm in arms:
            _, work = build(arm, a, dev)
            for _ in range(3):
                work()
            walls.append(wall_ms(work, dev))
            times.append({k: v / per for k, v in kernel_times(work, dev, per).items()})
            del work
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        print(f"\nkernel time per {unit} (ms), batch {a.batch}, {dev.type}")
        print(compare_table(arms, times, walls, a.min_ms))
        return
    model, work = build(a.arm, a, dev)
    for _ in range(3):
        work()
    wall = wall_ms(work, dev)

    def profiled():
        for _ in range(per):
            work()

    table = profile_table(profiled, dev, a.top)
    print(f"\nprofile: {a.arm} batch {a.batch} {unit} x{per}, fused ops {model.fused_ops}")
    print(table)
    if wall is not None:
        busy = sum(kernel_times(work, dev, per).values()) / per
        print(f"GPU kernel time per {unit}: {busy:.2f} ms; wall time per {unit}: {wall:.2f} ms")


def kernel_family(name: str) -> str:
    """Inductor's generated kernels without their running number: ``triton_red_fused_x_9`` in
    one arm's graph is ``triton_red_fused_x_12`` in another's, the same fused kernel."""
    return re.sub(r"_\d+$", "", name) if name.startswith("triton_") else name


def compare_table(arms: list[str], times: list[dict], walls: list, min_ms: float) -> str:
    """Kernels as rows, arms as columns (ms per unit of work), the last column each later arm's
    largest excess over the first; totals and wall times at the foot. Inductor's kernels are
    summed by ``kernel_family``, so that a kernel numbered apart in two arms is one row."""
    merged = []
    for t in times:
        m: dict[str, float] = {}
        for n, v in t.items():
            f = kernel_family(n)
            m[f] = m.get(f, 0.0) + v
        merged.append(m)
    times = merged
    names = set().union(*times)
    extra = {n: max(t.get(n, 0.0) for t in times[1:]) - times[0].get(n, 0.0) if len(times) > 1
             else times[0].get(n, 0.0) for n in names}  # fmt: skip
    rows = sorted((n for n in names if max(t.get(n, 0.0) for t in times) >= min_ms),
                  key=lambda n: (-extra[n], n))  # fmt: skip
    w = max([len(a) for a in arms] + [9])
    head = f"| {'kernel':70} | " + " | ".join(f"{a:>{w}}" for a in arms) + " | more than first |"
    lines = [
        head,
        "|" + "-" * 72 + "|" + "|".join("-" * (w + 2) for _ in arms) + "|-----------------|",
    ]
    for n in rows:
        cells = " | ".join(f"{t.get(n, 0.0):>{w}.3f}" for t in times)
        lines.append(f"| {n[:70]:70} | {cells} | {extra[n]:>15.3f} |")
    total = " | ".join(f"{sum(t.values()):>{w}.2f}" for t in times)
    lines.append(f"| {'all kernels':70} | {total} | {'':>15} |")
    if all(x is not None for x in walls):
        cells = " | ".join(f"{x:>{w}.2f}" for x in walls)
        lines.append(f"| {'wall time (unprofiled)':70} | {cells} | {'':>15} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
