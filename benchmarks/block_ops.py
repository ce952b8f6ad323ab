"""Pieces of the GPT-B training step alone, forward + backward, against their floors.

* ``norm``: the block boundary ``x' = x + dropout(y, 0.1)``, ``n = rmsnorm(x') * w`` on the batch-256
  residual stream (65,536 x 768, x fp32, y and n bf16): ``kernels.residual_norm`` (one Triton kernel
  each way, masks redrawn from Philox) against the same PyTorch ops under ``torch.compile`` (what
  the step ran before). Floor: the bytes each way at the copy rate measured in the run (forward
  reads x, y and writes x', n; backward reads dn, dx', x' and writes dx, dy).
* ``attention``: causal self-attention of (256, 12, 256, 64) bf16 through each SDPA backend (cuDNN,
  flash, memory-efficient) and ``flex_attention`` (compiled, causal block mask). Floor: the FLOPs
  (QK and PV, causal half; backward 2.5x the forward) at the bf16 matmul peak of the run.

    python -m benchmarks.block_ops              # GPU
    python -m benchmarks.block_ops --smoke      # CPU, tiny, the PyTorch variants only
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from movegen import kernels

from ._util import (
    copy_bandwidth_gbs,
    device_name,
    json_line,
    matmul_peak_tflops,
    median,
    print_table,
    time_fn,
)


def bench_norm(impl: str, args, device, bw: float) -> dict:
    R, D, p = args.batch * args.seq, args.width, 0.1
    g = torch.Generator(device=device).manual_seed(0)
    lowp = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(R, D, device=device, generator=g).requires_grad_()
    y = torch.randn(R, D, device=device, generator=g, dtype=lowp).requires_grad_()
    w = torch.ones(D, device=device, requires_grad=True)
    dxo = torch.randn(R, D, device=device, generator=g)
    dn = torch.randn(R, D, device=device, generator=g, dtype=lowp)

    def plain(x, y, w):
        xo = x + F.dropout(y, p)
        return xo, F.rms_norm(xo, (D,), w, 1e-5).to(lowp)

    if impl == "fused":
        fn = lambda x, y, w: kernels.residual_norm(x, y, w, 1e-5, p)  # noqa: E731
    else:
        fn = torch.compile(plain) if impl == "compiled" else plain

    def fwd():
        return fn(x, y, w)

    def both():
        xo, n = fwd()
        torch.autograd.backward([xo, n], [dxo, dn])

    f_ms = median(time_fn(fwd, warmup=3, iters=args.iters, device=device))
    b_ms = median(time_fn(both, warmup=3, iters=args.iters, device=device))
    e32, e16 = R * D * 4, R * D * lowp.itemsize
    floor_f = (2 * e32 + 2 * e16) / bw / 1e6  # x, x' fp32; y, n low precision
    floor_b = (3 * e32 + 2 * e16) / bw / 1e6  # dx', x', dx fp32; dn, dy
    return {"op": "norm", "impl": impl, "fwd_ms": f_ms, "bwd_ms": b_ms - f_ms, "total_ms": b_ms,
            "floor_ms": floor_f + floor_b, "of_floor": (floor_f + floor_b) / b_ms}  # fmt: skip


def bench_attention(impl: str, args, device, peak: float) -> dict:
    B, H, S, Dh = args.batch, args.width // 64, args.seq, 64
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, Dh, device=device, dtype=dt, generator=g).requires_grad_() for _ in range(3))  # fmt: skip
    do = torch.randn(B, H, S, Dh, device=device, dtype=dt, generator=g)
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(
            lambda b, h, qi, ki: qi >= ki, None, None, S, S, device=device.type
        )
        flex = torch.compile(flex_attention)
        fn = lambda: flex(q, k, v, block_mask=mask)  # noqa: E731
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[impl]  # fmt: skip

        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def both():
        fn().backward(do)

    try:
        f_ms = median(time_fn(fn, warmup=3, iters=args.iters, device=device))
        b_ms = median(time_fn(both, warmup=3, iters=args.iters, device=device))
    except RuntimeError as e:  # a backend that does not run here
        return {"op": "attention", "impl": impl, "error": str(e).splitlines()[0][:80]}
    flops_f = 4 * B * H * S * S * Dh / 2
    floor = 3.5 * flops_f / (peak * 1e12) * 1e3
    return {"op": "attention", "impl": impl, "fwd_ms": f_ms, "bwd_ms": b_ms - f_ms, "total_ms": b_ms,
            "floor_ms": floor, "of_floor": floor / b_ms}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny, CPU, to check the script runs")
    p.add_argument("--norm", default="fused,compiled,eager", help="norm variants")
    p.add_argument("--attention", default="cudnn,flash,efficient,flex", help="attention variants")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.batch, args.seq, args.width = (2, 16, 128) if args.smoke else (256, 256, 768)
    if args.smoke:
        args.iters, args.norm, args.attention = 2, "eager", "math"
    bw, peak = copy_bandwidth_gbs(device), matmul_peak_tflops(device)
    rows = [bench_norm(i, args, device, bw) for i in args.norm.split(",") if i]
    rows += [bench_attention(i, args, device, peak) for i in args.attention.split(",") if i]
    for r in rows:
        print(r, flush=True)
    json_line("block_ops", {"device": device_name(device), "torch": torch.__version__,
                            "copy_gbs": bw, "peak_tflops": peak, "rows": rows})  # fmt: skip
    print_table(rows, [("op", "op", "{}"), ("impl", "impl", "{}"), ("fwd_ms", "fwd ms", "{:.3f}"),
                       ("bwd_ms", "bwd ms", "{:.3f}"), ("total_ms", "fwd+bwd ms", "{:.3f}"),
                       ("floor_ms", "floor ms", "{:.3f}"), ("of_floor", "floor/time", "{:.0%}"),
                       ("error", "error", "{}")],
                f"block ops, {device_name(device)}, torch {torch.__version__}, copy {bw:.0f} GB/s, "
                f"bf16 peak {peak:.0f} TFLOP/s")  # fmt: skip


if __name__ == "__main__":
    main()
