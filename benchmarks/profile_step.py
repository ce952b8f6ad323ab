"""Where a training step (or a sampling step) spends GPU time: torch.profiler, top kernels.

python -m benchmarks.profile_step --arm move-x4 --batch 256
python -m benchmarks.profile_step --sampling --arm standard --batch 16
python -m benchmarks.profile_step --smoke
"""

from __future__ import annotations

import argparse

import torch

from movegen.lit import optimizer_groups
from movegen.model import GPT
from movegen.sample import CompiledStep, SamplingSettings, generate

from ._util import arm_config, profile_table


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arm", default="move-x4")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sampling", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--ops", default=None,
                   help="GPT.fused_ops as a comma list (default: the model's; '' for none)")  # fmt: skip
    a = p.parse_args()
    dev = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    cfg = arm_config(a.arm, a.smoke)
    if a.smoke:
        a.batch = 4
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    if a.ops is not None:
        model.fused_ops = tuple(o for o in a.ops.split(",") if o)
    codes = torch.randint(1, cfg.vocab_size, (a.batch, cfg.seq_len), device=dev)
    labels = torch.randint(0, cfg.num_classes, (a.batch,), device=dev)
    if a.sampling:
        model.eval()
        settings = SamplingSettings(cfg_scale=2.0)
        step = CompiledStep(model, a.batch, settings)  # graphed on CUDA, eager on the CPU

        def work():
            g = torch.Generator(device=dev).manual_seed(0)
            generate(model, labels, settings, generator=g, step=step)
    else:
        model.train()
        opt = torch.optim.AdamW(optimizer_groups(model, 0.05), lr=1e-4, fused=dev.type == "cuda")

        def loss_fn(c, l):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                return model.loss(c, l)  # fp32 cross-entropy of the logits

        fn = torch.compile(loss_fn) if dev.type == "cuda" else loss_fn

        def work():
            fn(codes, labels).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        work()
    if dev.type == "cuda":
        torch.cuda.synchronize()

    def profiled():
        for _ in range(2 if not a.sampling else 1):
            work()

    wall = ""
    if dev.type == "cuda":  # the wall time of the profiled steps, unprofiled
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(5):
            work()
        t1.record()
        torch.cuda.synchronize()
        per = t0.elapsed_time(t1) / 5
        wall = f"\nwall time per {'sampling run' if a.sampling else 'step'}: {per:.2f} ms"
    table = profile_table(profiled, dev, a.top)
    print(
        f"\nprofile: {a.arm} batch {a.batch} {'sampling' if a.sampling else 'training step x2'}, "
        f"fused ops {model.fused_ops}"
    )
    print(table + wall)


if __name__ == "__main__":
    main()
