"""Sampling benchmark: GPT-B (K=16384, 256 tokens), CFG 2.0 (batch doubled), temperature 1,
no top-k/top-p, no VQ decode. images/s and ms per token step for the plain KV-cache loop and the
sampler's compiled step (``CompiledStep``) replayed from CUDA graphs.

    python -m benchmarks.sampling           # GPU
    python -m benchmarks.sampling --smoke   # CPU, tiny
"""

from __future__ import annotations

import argparse
import time

import torch

from movegen import kernels
from movegen.model import GPT
from movegen.sample import CompiledStep, SamplingSettings, generate

from ._util import arm_config, device_name, json_line, print_table, release, sync


def run(arm: str, batch: int, fast: bool, args, device, attention: str = "auto",
        mode: str = "graph", decode_config: str = "") -> dict:  # fmt: skip
    cfg = arm_config(arm, args.smoke)
    launch = kernels.DecodeLaunch()  # a row without a setting gets the default
    if decode_config:  # BLOCK_T-WARPS-STAGES
        bt, nw, st = map(int, decode_config.split("-"))
        launch = kernels.DecodeLaunch(block_t=bt, num_warps=nw, stages=st)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).eval()
    with torch.no_grad():  # a non-degenerate head (it is zero at init)
        model.head.weight.normal_(std=0.02)
    labels = torch.arange(batch, device=device) % cfg.num_classes
    settings = SamplingSettings(cfg_scale=2.0, temperature=1.0)
    mode = mode if device.type == "cuda" else "eager"
    step = None
    if fast:
        step = CompiledStep(model, batch, settings, mode=mode, attention=attention, launch=launch)
    g = torch.Generator(device=device).manual_seed(0)

    def once():
        return generate(model, labels, settings, generator=g, step=step)

    s, warm_s, codes = time_generation(once, args.iters, device)
    # (the fast path's rows keep their old name, static/<attention>/<mode>[/<launch>])
    path = f"static/{step.cache.attention}/{mode}" if fast else "eager"
    if fast and step.cache.attention == "fused":
        path += f"/{launch.block_t}-{launch.num_warps}-{launch.stages}"
    row = {"arm": arm, "batch": batch, "path": path, "s_per_batch": s,
           "images_per_s": batch / s, "ms_per_step": s / cfg.seq_len * 1e3, "warmup_s": warm_s,
           "codes_ok": bool(codes.min() >= 0 and codes.max() < cfg.vocab_size)}  # fmt: skip
    return row


def time_generation(once, iters: int, device) -> tuple[float, float, torch.Tensor]:
    """``once()`` (one batch of codes) timed: the median seconds of ``iters`` calls after one
    warm-up call (which compiles and captures), the warm-up's seconds, and the last codes."""
    t0 = time.perf_counter()
    once()
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        codes = once()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], warm_s, codes


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--arms", default="standard,move-x1")
    p.add_argument("--batches", default="16,64,256")
    p.add_argument("--paths", default="fast,eager")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument(
        "--attention",
        default="auto",
        help="decode attention(s) for the fast path: auto,fused,sdpa",
    )
    p.add_argument(
        "--modes",
        default="graph",
        help="fast path: graph (the compiled step and its choice in one CUDA graph), compiled "
        "(compiled, called from Python) or eager",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma list of arm:batch:attention:mode[:BLOCK_T-WARPS-STAGES] (fast path)",
    )
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.batches, args.iters = "2,4", 1
    if args.only:
        grid = [
            (a, int(b), True, at, m, *conf)
            for a, b, at, m, *conf in (x.split(":") for x in args.only.split(","))
        ]
    else:
        variants = [
            (True, a, m)
            for a in args.attention.split(",")
            for m in args.modes.split(",")
            if "fast" in args.paths.split(",")
        ] + ([(False, "-", "-")] if "eager" in args.paths else [])
        grid = [
            (arm, int(b), fast, a, m, "")
            for fast, a, m in variants
            for b in args.batches.split(",")
            for arm in args.arms.split(",")
            if fast or args.smoke or int(b) <= 64
        ]
        # eager: launch-bound, ~10 ms per step whatever the batch, so only small batches
    rows = []
    for arm, b, fast, attention, mode, *conf in grid:
        r = run(arm, b, fast, args, device, attention, mode, *conf)
        rows.append(r)
        print(r, flush=True)
        release(device)
    base = {(r["batch"], r["path"]): r["s_per_batch"] for r in rows if r["arm"] == "standard"}
    for r in rows:
        b = base.get((r["batch"], r["path"]))
        r["vs_standard"] = r["s_per_batch"] / b if b else "-"
    json_line("sampling", {"device": device_name(device), "torch": torch.__version__, "rows": rows})
    print_table(rows, [("arm", "arm", "{}"), ("batch", "batch", "{}"), ("path", "path", "{}"),
                       ("images_per_s", "images/s", "{:.1f}"), ("ms_per_step", "ms/token step", "{:.3f}"),
                       ("vs_standard", "time x standard", "{:.3f}"), ("warmup_s", "warm-up s", "{:.1f}")],
                f"sampling (CFG 2.0, 256 tokens, no VQ decode), {device_name(device)}, torch {torch.__version__}")  # fmt: skip


if __name__ == "__main__":
    main()
