"""The one-launch decoding layer (``kernels.decode_attn``) alone: microseconds per call for each
launch setting (cached keys per block, warps, pipelining stages of the block loop), GPT-B shapes (H = 12,
D = 64, 256 positions), standard and MoVE-x1, at several positions. Calls are replayed from a
CUDA graph (12 per replay, as 12 layers), so launch gaps are those of the sampler's graph.

    python -m benchmarks.decode_kernel            # GPU
    python -m benchmarks.decode_kernel --smoke    # CPU (Triton interpreter), tiny
"""

from __future__ import annotations

import argparse
import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import movegen.kernels  # noqa: E402, F401  (registers torch.ops.movegen)

from ._util import device_name, json_line, median, print_table, time_fn  # noqa: E402


def run(rows: int, slots: int, conf: str, pos: int, args, dev) -> float:
    H, D, T, L = args.heads, args.head_dim, args.seq, 12 if dev.type == "cuda" else 1
    d, G = H * D, slots + 1 if slots else 0
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bt, nw, st = map(int, conf.split("-"))
    g = torch.Generator(device=dev).manual_seed(0)
    proj = torch.randn(rows, 3 * d + H * G, device=dev, dtype=dt, generator=g)
    kc = torch.randn(rows, H, T, D, device=dev, dtype=dt, generator=g)
    vc = torch.randn(rows, H, T, D, device=dev, dtype=dt, generator=g)
    cos, sin = torch.rand(T, D // 2, device=dev), torch.rand(T, D // 2, device=dev)
    table = torch.randn(1000, slots, d, device=dev, dtype=dt, generator=g) if slots else None
    ids = torch.randint(1000, (rows,), device=dev, generator=g)
    p = torch.tensor([pos], device=dev)

    def layers():
        for _ in range(L):
            torch.ops.movegen.decode_attn(
                proj, cos, sin, p, kc, vc, table, ids, slots, True, bt, nw, st
            )

    fn = layers
    if dev.type == "cuda":
        layers()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layers()
        fn = graph.replay
    return median(time_fn(fn, warmup=3, iters=args.iters, device=dev)) * 1e3 / L


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rows", default="32,128,512", help="cache rows (CFG: 2 x images)")
    p.add_argument("--configs", default="64-2-1,32-2-1,16-1-1,32-1-1,64-2-2,32-2-2,32-2-3")
    p.add_argument("--positions", default="32,128,224")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.rows, args.configs, args.positions, args.seq, args.heads, args.head_dim = (
            "2",
            "8-2-1",
            "5",
            16,
            2,
            16,
        )
        args.iters = 1
    rows = []
    for r in map(int, args.rows.split(",")):
        for slots in (0, 6):
            for conf in args.configs.split(","):
                us = [run(r, slots, conf, int(q), args, dev) for q in args.positions.split(",")]
                rows.append({"rows": r, "arm": "MoVE-x1" if slots else "standard", "config": conf,
                             "us": sum(us) / len(us), **{f"us@{q}": u for q, u in zip(args.positions.split(","), us)}})  # fmt: skip
                print(rows[-1], flush=True)
    json_line(
        "decode_kernel", {"device": device_name(dev), "torch": torch.__version__, "rows": rows}
    )
    cols = [("rows", "cache rows", "{}"), ("arm", "arm", "{}"), ("config", "block-warps-stages", "{}"),
            ("us", "us/call (mean over positions)", "{:.2f}")]  # fmt: skip
    cols += [(f"us@{q}", f"us @ pos {q}", "{:.2f}") for q in args.positions.split(",")]
    print_table(rows, cols, f"decode kernel, {device_name(dev)}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
