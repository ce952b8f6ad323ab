"""The MoVE mix alone, forward and backward over L layers, against the bytes it must move.

Floor per layer (bf16): forward reads the gathered slots (B*T*M*d*2 bytes), the values and gates
and writes the mixed values; backward reads the slots once more (gate gradients). The bank
gradient is formed once for all layers (B*T*M*d*2 written) from each layer's gates and value
gradient. Compares the deferred-gradient path (movegen's) with plain autograd per layer.

    python benchmarks/move_mix.py            # GPU: GPT-B shapes, batch 256, M = 6 and 24
    python benchmarks/move_mix.py --smoke    # CPU, tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import copy_bandwidth_gbs, device_name, json_line, median, print_table, time_fn  # noqa: E402

from movegen.move import bank_taps, mix, mix_tapped  # noqa: E402


def run(M: int, impl: str, args, device, bw: float) -> dict:
    B, T, H, D, L = args.batch, args.seq, args.heads, args.head_dim, args.layers
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    memh0 = torch.randn(B, T, H, M, D, device=device, dtype=dt, generator=g).requires_grad_()
    vs = [
        torch.randn(B, T, H, D, device=device, dtype=dt, generator=g).requires_grad_()
        for _ in range(L)
    ]
    gs = [
        (2 * torch.rand(B, T, H, M + 1, device=device, dtype=dt, generator=g)).requires_grad_()
        for _ in range(L)
    ]
    dout = torch.randn(B, T, H, D, device=device, dtype=dt, generator=g)

    def fwd_bwd():
        if impl == "deferred":
            memh, taps = bank_taps(memh0, L, M + 1)
            outs = [mix_tapped(v, gt, memh, tp, True) for v, gt, tp in zip(vs, gs, taps)]
        else:
            outs = [mix(v, gt, memh0, True) for v, gt in zip(vs, gs)]
        torch.autograd.backward(outs, [dout] * L)
        for t in [memh0, *vs, *gs]:
            t.grad = None

    def fwd():
        with torch.no_grad():
            for v, gt in zip(vs, gs):
                mix(v, gt, memh0, True)

    try:
        ms_f = median(time_fn(fwd, warmup=2, iters=args.iters, device=device))
        ms_fb = median(time_fn(fwd_bwd, warmup=2, iters=args.iters, device=device))
    except torch.OutOfMemoryError:
        return {"M": M, "impl": impl, "ms_fwd": "OOM"}
    e = 2 if dt == torch.bfloat16 else 4
    slots = B * T * H * M * D * e
    small = B * T * H * (2 * D + M + 1) * e  # v in, out written, gates
    fwd_bytes = L * (slots + small)
    # backward: slots re-read per layer + dv/gates traffic; bank gradient formed once (written)
    fb_bytes = fwd_bytes + L * (slots + 3 * small) + slots
    return {"M": M, "impl": impl, "ms_fwd": ms_f, "floor_fwd_ms": fwd_bytes / (bw * 1e9) * 1e3,
            "fwd_gbs": fwd_bytes / (ms_f * 1e-3) / 1e9, "ms_fwd_bwd": ms_fb,
            "floor_fwd_bwd_ms": fb_bytes / (bw * 1e9) * 1e3, "fwd_bwd_gbs": fb_bytes / (ms_fb * 1e-3) / 1e9}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--slots", default="6,24")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.batch, args.seq, args.heads, args.head_dim, args.layers, args.iters = 2, 16, 2, 8, 2, 2
    bw = copy_bandwidth_gbs(device)
    rows = [
        run(int(M), impl, args, device, bw)
        for M in args.slots.split(",")
        for impl in ("deferred", "autograd")
    ]
    json_line(
        "move_mix",
        {"device": device_name(device), "torch": torch.__version__, "copy_gbs": bw, "rows": rows},
    )
    print_table(rows, [("M", "slots M", "{}"), ("impl", "bank grad", "{}"), ("ms_fwd", "fwd ms (L layers)", "{:.2f}"),
                       ("floor_fwd_ms", "fwd floor ms", "{:.2f}"), ("fwd_gbs", "fwd GB/s", "{:.0f}"),
                       ("ms_fwd_bwd", "fwd+bwd ms", "{:.2f}"), ("floor_fwd_bwd_ms", "fwd+bwd floor ms", "{:.2f}"),
                       ("fwd_bwd_gbs", "fwd+bwd GB/s", "{:.0f}")],
                f"MoVE mix, B={args.batch} T={args.seq} H={args.heads} D={args.head_dim} L={args.layers}, "
                f"{device_name(device)}, torch {torch.__version__}, copy {bw:.0f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
