"""Training-step benchmark: arms x batch x eager/compiled on LlamaGen GPT-B (K=16384, 1000 classes,
256 positions; `configs/imagenet/gpt-b-*.yaml`). Protocol: dropout 0.1 (residual, FFN, token), class dropout 0.1, bf16 autocast,
cross-entropy, backward, grad clip 1.0, fused AdamW, random ids (never zeros), median of timed steps
after warm-up with CUDA events. MFU against a bf16 matmul peak measured in the same run.

    python -m benchmarks.train_step                       # GPU, full table
    python -m benchmarks.train_step --smoke               # CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import faulthandler
import time

import torch

from movegen.lit import clip_grad_norm_for_step, optimizer_groups
from movegen.model import GPT, cost_report

from ._util import (
    ID_DISTS,
    apply_arm_options,
    arm_config,
    arm_options,
    device_name,
    iqr,
    json_line,
    matmul_peak_tflops,
    median,
    print_table,
    random_codes,
    release,
    time_fn,
)


def bench(
    arm: str, batch: int, compiled: bool, args, device, peak: float, dist: str = "uniform"
) -> dict:
    name, opts = arm_options(arm)  # ARM@opt+opt: see arm_options
    cfg = arm_config(name, args.smoke)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    apply_arm_options(model, opts)
    opt = torch.optim.AdamW(
        optimizer_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda"
    )

    def loss_fn(codes, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model.loss(codes, labels)  # fp32 cross-entropy of the logits

    fn = torch.compile(loss_fn, mode=args.compile_mode) if compiled else loss_fn
    batches = random_batches(batch, cfg.seq_len, cfg.vocab_size, cfg.num_classes, device, dist=dist)
    rep = cost_report(cfg)
    row = {"arm": arm, "batch": batch, "mode": "compiled" if compiled else "eager", "ids": dist}
    row.update(time_training(fn, model, opt, batches, flops_per_token=rep["flops_per_token"], args=args,
                             device=device, peak=peak, fold_clip="noclipfold" not in opts))  # fmt: skip
    if row["ms"] != "OOM":
        row["params_memory"] = rep["params_memory"]
    return row


def random_batches(
    batch: int, T: int, K: int, C: int, device, n: int = 4, dist: str = "uniform"
) -> list[tuple]:
    """The protocol's inputs: ``n`` batches of random codes (never 0; ``dist``:
    ``_util.random_codes``) and labels, seed 0."""
    g = torch.Generator(device=device).manual_seed(0)
    return [(random_codes((batch, T), K, dist, generator=g),
             torch.randint(0, C, (batch,), device=device, generator=g)) for _ in range(n)]  # fmt: skip


def time_training(
    loss_fn,
    model,
    opt,
    batches,
    *,
    flops_per_token: float,
    args,
    device,
    peak: float,
    fold_clip: bool = True,
) -> dict:
    """The protocol's step (``loss_fn(codes, labels)``, backward, clip 1.0, ``opt`` step) over
    ``batches`` in turn, timed after ``args.warmup`` steps: ms (median), tokens/s, MFU against
    ``peak``, peak memory, spread; ``{"ms": "OOM"}`` when it does not fit. ``fold_clip``: the clip
    as movegen's training applies it (``lit.clip_grad_norm_for_step``: inside a fused AdamW's
    step), else ``clip_grad_norm_`` in place (LlamaGen's step)."""
    it = iter(range(10**9))

    def step():
        codes, labels = batches[next(it) % len(batches)]
        loss = loss_fn(codes, labels)
        loss.backward()
        if fold_clip:
            clip_grad_norm_for_step(model.parameters(), opt, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_fn(step, warmup=args.warmup, iters=args.iters, device=device)
    except torch.OutOfMemoryError:
        return {"ms": "OOM"}
    ms = median(times)
    tokens = batches[0][0].numel()
    return {"ms": ms, "tokens_per_s": tokens / (ms * 1e-3),
            "mfu": 3 * flops_per_token * tokens / (ms * 1e-3) / (peak * 1e12),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "spread": (max(times) - min(times)) / ms,
            # the middle half of the timed steps: one slow step (a host hiccup) does not widen it
            "iqr": iqr(times) / ms}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny model on CPU, to check the script runs"
    )
    p.add_argument(
        "--arms",
        default="standard,lave-x1,move-x1,move-x4",
        help="arms; ARM@grouped / ARM@token forces the MoVE kernels' form (default: kernels.group_pays), "
        "ARM@unfused the elementwise steps as PyTorch ops (nonorm, noswiglu, norope: one of them); options join with +",
    )
    p.add_argument(
        "--ids_dist", default="uniform", help=f"code distributions, comma-separated: {ID_DISTS}"
    )
    p.add_argument("--batches", default="64,256")
    p.add_argument("--modes", default="compiled,eager")
    p.add_argument(
        "--only", default="", help="comma list of arm:batch:mode to run (overrides the grid)"
    )
    p.add_argument(
        "--sdpa",
        default="default",
        choices=["default", "flash", "cudnn", "efficient"],
        help="attention backend for scaled_dot_product_attention (the @noattn arms; the others "
        "run kernels.attention)",
    )
    p.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs"
    )
    p.add_argument(
        "--coordinate-descent",
        action="store_true",
        help="inductor's coordinate-descent tuning of its generated kernels",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--dump-stacks",
        type=float,
        default=0,
        metavar="S",
        help="print every thread's stack to stderr every S seconds (0: never): where an arm that "
        "does not finish is waiting. Python's faulthandler walks the other threads' frames as "
        "they run: a run on an H100 with S = 60 ended in a segmentation fault as it printed "
        "them during compilation (2026-12-07), so use it only to find a hang",
    )
    args = p.parse_args()
    if args.dump_stacks > 0:
        faulthandler.dump_traceback_later(args.dump_stacks, repeat=True)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.warmup, args.iters, args.batches = 1, 2, "4"
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.sdpa != "default":
        for choice, name in (
            ("flash", "flash"),
            ("cudnn", "cudnn"),
            ("efficient", "mem_efficient"),
        ):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(choice == args.sdpa)
    if args.coordinate_descent:
        import torch._inductor.config as ic

        ic.coordinate_descent_tuning = True
    variant = {
        "sdpa": args.sdpa,
        "compile_mode": args.compile_mode or "default",
        "coordinate_descent": args.coordinate_descent,
    }
    peak = matmul_peak_tflops(device)
    if args.only:
        grid = [(a, int(b), m) for a, b, m in (x.split(":") for x in args.only.split(","))]
    else:
        grid = [
            (a, int(b), m)
            for m in args.modes.split(",")
            for b in args.batches.split(",")
            for a in args.arms.split(",")
        ]
    rows = []
    for dist in args.ids_dist.split(","):
        for arm, batch, mode in grid:
            t0 = time.perf_counter()
            r = bench(arm, batch, mode == "compiled", args, device, peak, dist)
            r["wall_s"] = time.perf_counter() - t0  # the arm's compile, autotuning and steps
            rows.append(r)
            print(r, flush=True)
            release(device)
    std = {
        (r["batch"], r["mode"], r["ids"]): r["ms"]
        for r in rows
        if r["arm"] == "standard" and isinstance(r.get("ms"), float)
    }
    for r in rows:
        base = std.get((r["batch"], r["mode"], r["ids"]))
        r["vs_standard"] = r["ms"] / base if base and isinstance(r.get("ms"), float) else "-"
    json_line(
        "train_step",
        {
            "device": device_name(device),
            "torch": torch.__version__,
            "peak_tflops": peak,
            "variant": variant,
            "rows": rows,
        },
    )
    print_table(rows, [("ids", "ids", "{}"), ("arm", "arm", "{}"), ("batch", "batch", "{}"), ("mode", "mode", "{}"), ("ms", "ms/step", "{:.1f}"),
                       ("tokens_per_s", "tokens/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}"),
                       ("vs_standard", "x standard", "{:.3f}"), ("peak_gib", "peak GiB", "{:.1f}"),
                       ("iqr", "IQR", "{:.1%}"), ("spread", "max-min", "{:.1%}"), ("wall_s", "arm s", "{:.0f}")],
                f"training step, {device_name(device)}, torch {torch.__version__}, bf16 matmul peak {peak:.0f} TFLOP/s, {variant}")  # fmt: skip


if __name__ == "__main__":
    main()
