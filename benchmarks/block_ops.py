"""Pieces of the GPT-B training step alone, forward + backward (``torch.autograd.grad``, so no
leaf gradients accumulate), each fused Triton kernel against the same PyTorch ops under
``torch.compile`` (what the step runs without ``GPT.fused_ops``), batch 256 x 256 positions:

* ``norm``: the block boundary ``x' = x + dropout(y, 0.1)``, ``n = rmsnorm(x') * w`` (65,536 x 768,
  x fp32, y and n bf16; ``kernels.residual_norm``). Floor: forward reads x, y and writes x', n;
  backward reads dn, dx', x' and writes dx, dy (the mask's bits not counted).
* ``swiglu``: ``silu(a) * b`` of the 65,536 x 4,096 bf16 product (``kernels.silu_mul``). Floor:
  forward reads u and writes h; backward reads u and dh and writes du.
* ``rope``: the QKV split and RoPE of (256, 256, 3, 12, 64) bf16 (``kernels.split_rope``), the
  gradients strided as SDPA returns them. Floor: each way reads and writes the three tensors.
* ``ce``: cross-entropy of 65,536 x 16,384 bf16 logits (``kernels.cross_entropy``; the PyTorch
  form casts to fp32 first). Floor: forward reads the logits, backward reads them and writes the
  gradient.
* ``attention``: causal self-attention of (256, 12, 256, 64) bf16 through ``kernels.attention``
  (``triton``), each SDPA backend (cuDNN, flash, memory-efficient) and ``flex_attention``
  (compiled, causal block mask); and from the QKV product with RoPE, ``kernels.split_rope`` then
  ``kernels.attention`` (``split+triton``) against ``kernels.rope_attention`` (``ropeattn``:
  q and k rotated as the kernels load them, no split written; ``ropesave``: the forward also
  writes the rotated q, k for the backward). Floor: the FLOPs
  (QK and PV, causal half; backward 2.5x the forward) at the bf16 matmul peak of the run.

Byte floors are at the copy rate measured in the run.

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
    release,
    time_fn,
)


def _timed(
    op: str, impl: str, fn, inputs: list, grads: list, floor_ms: float, args, device
) -> dict:
    """Forward, and forward + backward (``torch.autograd.grad``: no leaf accumulation), timed."""

    def both():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, inputs, grads[: len(outs)])

    f_ms = median(time_fn(lambda: fn(*inputs), warmup=3, iters=args.iters, device=device))
    b_ms = median(time_fn(both, warmup=3, iters=args.iters, device=device))
    return {"op": op, "impl": impl, "fwd_ms": f_ms, "bwd_ms": b_ms - f_ms, "total_ms": b_ms,
            "floor_ms": floor_ms, "of_floor": floor_ms / b_ms}  # fmt: skip


def _pick(impl: str, fused, plain):
    return fused if impl == "fused" else torch.compile(plain) if impl == "compiled" else plain


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

    fn = _pick(impl, lambda x, y, w: kernels.residual_norm(x, y, w, 1e-5, p), plain)
    e32, e16 = R * D * 4, R * D * lowp.itemsize
    floor = (
        (2 * e32 + 2 * e16 + 3 * e32 + 2 * e16) / bw / 1e6
    )  # fwd: x, x'; y, n. bwd: dx', x', dx; dn, dy
    return _timed("norm", impl, fn, [x, y, w], [dxo, dn], floor, args, device)


def bench_swiglu(impl: str, args, device, bw: float) -> dict:
    R, h = args.batch * args.seq, args.hidden
    lowp = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    u = torch.randn(R, 2 * h, device=device, generator=g, dtype=lowp).requires_grad_()
    dh = torch.randn(R, h, device=device, generator=g, dtype=lowp)

    def plain(u):
        a, b = u.chunk(2, dim=-1)
        return F.silu(a) * b

    fn = _pick(impl, kernels.silu_mul, plain)
    floor = R * h * lowp.itemsize * (3 + 5) / bw / 1e6  # fwd: u, h. bwd: u, dh, du
    return _timed("swiglu", impl, fn, [u], [dh], floor, args, device)


def bench_rope(impl: str, args, device, bw: float) -> dict:
    from movegen.model import apply_rope

    B, S, H, Dh = args.batch, args.seq, args.width // 64, 64
    lowp = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, S, 3, H, Dh, device=device, generator=g, dtype=lowp).requires_grad_()
    ang = torch.rand(S, Dh // 2, device=device, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    grads = [torch.randn(B, H, S, Dh, device=device, generator=g, dtype=lowp).transpose(1, 2) for _ in range(3)]  # fmt: skip

    def plain(qkv):
        q, k, v = qkv.unbind(2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    fn = _pick(impl, lambda qkv: kernels.split_rope(qkv, cos, sin), plain)
    floor = qkv.numel() * lowp.itemsize * 4 / bw / 1e6  # each way: qkv read, q, k, v written
    return _timed("rope", impl, fn, [qkv], grads, floor, args, device)


def bench_ce(impl: str, args, device, bw: float) -> dict:
    N, K = args.batch * args.seq, args.vocab
    lowp = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, K, device=device, generator=g, dtype=lowp).requires_grad_()
    t = torch.randint(K, (N,), device=device, generator=g)
    one = torch.ones((), device=device)

    def plain(x):
        return F.cross_entropy(x.float(), t)

    fn = _pick(impl, lambda x: kernels.cross_entropy(x, t), plain)
    floor = x.numel() * lowp.itemsize * 3 / bw / 1e6  # fwd: a read; bwd: a read and a write
    return _timed("ce", impl, fn, [x], [one], floor, args, device)


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
    elif impl == "triton":
        if not kernels.attn_usable(q.transpose(1, 2)):
            return {"op": "attention", "impl": impl, "error": "the Triton kernels do not run here"}
        fn = lambda: kernels.attention(*(t.transpose(1, 2) for t in (q, k, v)))  # noqa: E731
        do = do.transpose(1, 2)  # its output is (B, S, H, D)
    elif impl in ("split+triton", "ropeattn", "ropesave"):  # from the QKV product, RoPE included
        if not kernels.attn_usable(q.transpose(1, 2)):
            return {"op": "attention", "impl": impl, "error": "the Triton kernels do not run here"}
        qkv = torch.randn(B, S, 3, H, Dh, device=device, dtype=dt, generator=g).requires_grad_()
        ang = torch.rand(S, Dh // 2, device=device, generator=g) * 6
        cos, sin = ang.cos(), ang.sin()
        if impl in ("ropeattn", "ropesave"):
            save = impl == "ropesave"
            fn = lambda: kernels.rope_attention(qkv, cos, sin, save)  # noqa: E731
        else:
            fn = lambda: kernels.attention(*kernels.split_rope(qkv, cos, sin))  # noqa: E731
        do = do.transpose(1, 2)  # its output is (B, S, H, D)
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
    p.add_argument("--norm", default="fused,compiled", help="residual + dropout + RMSNorm variants")
    p.add_argument("--swiglu", default="fused,compiled", help="SwiGLU product variants")
    p.add_argument("--rope", default="fused,compiled", help="QKV split + RoPE variants")
    p.add_argument("--ce", default="fused,compiled", help="cross-entropy variants (K = 16384)")
    p.add_argument(
        "--attention",
        default="triton,split+triton,ropeattn,ropesave,cudnn,flash,efficient,flex",
        help="attention variants",
    )
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.batch, args.seq, args.width = (2, 16, 128) if args.smoke else (256, 256, 768)
    args.hidden, args.vocab = (256, 64) if args.smoke else (2048, 16384)
    if args.smoke:
        args.iters, args.attention = 2, "math"
        args.norm = args.swiglu = args.rope = args.ce = "eager"
    bw, peak = copy_bandwidth_gbs(device), matmul_peak_tflops(device)
    rows = []
    for op, bench in (
        ("norm", bench_norm),
        ("swiglu", bench_swiglu),
        ("rope", bench_rope),
        ("ce", bench_ce),
    ):
        rows += [bench(i, args, device, bw) for i in getattr(args, op).split(",") if i]
        release(device)
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
