"""The MoVE bank gradient alone (``kernels.bank_rows_grad``), each kernel against its byte floor.

``dE[k, m, h] = sum over the tokens n with id k and over the L layers of g_l[n, h, m] dv_l[n, h]``,
fp32 rows ``(V, M, H, D)``, as the training step's backward forms it once per step from the L
layers' gates (or router logits) and value gradients, each read where it lies. Kernels
(``kernels.BANK_KERNEL``): ``runs`` (each run of equal ids summed whole by one program as
tensor-core products, every output row written once, absent ids' rows as zeros), ``lanes``
(fp32 sums per token into a zeroed output: a segmented sum over tiles for M <= 8, one token at a
time above; the zero fill is counted in its time), ``lanes+stack`` (the same, the gates
stacked first) and ``layers`` (a token walk at any slots, each token's sum over the layers one
tensor-core product, into a zeroed output: the default outside deterministic runs). Floor: the gates and value gradients read once and
the fp32 rows written once, at the copy rate measured in the run. Each kernel's output is
compared with the lanes kernels' at every row (``max |out - lanes| / max |lanes|``).

    python -m benchmarks.bank_grad            # GPU: GPT-B shapes, batch 256, M = 6 and 24
    python -m benchmarks.bank_grad --smoke    # CPU (Triton's interpreter), tiny
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # no GPU needed: the kernels run in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from movegen import kernels  # noqa: E402

from ._util import (  # noqa: E402
    copy_bandwidth_gbs,
    device_name,
    json_line,
    median,
    mix_device,
    mix_parser,
    print_table,
    random_codes,
    release,
    time_fn,
)

KERNELS = ("runs", "layers", "lanes", "lanes+stack")
"""``lanes+stack``: the lanes kernels given the L gates stacked first, inside the timed call (what
they did before they read each layer's gates in place)."""


def run(M: int, dist: str, args, device, bw: float) -> list[dict]:
    B, T, H, D, L, V = args.batch, args.seq, args.heads, args.head_dim, args.layers, args.ids
    G = M + 1
    logits = M < kernels.GROUP_MIN_SLOTS if args.logits == "auto" else args.logits == "on"
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    ids = random_codes((B, T), V, dist, generator=g)
    sid, order = kernels.id_groups(ids)
    gs = [torch.randn(B, T, H, G, device=device, dtype=dt, generator=g) for _ in range(L)]
    if not logits:
        gs = [2 * torch.sigmoid(x) for x in gs]
    dvs = [torch.randn(B, T, H, D, device=device, dtype=dt, generator=g) for _ in range(L)]
    e = 2 if dt == torch.bfloat16 else 4
    nbytes = L * B * T * H * (G + D) * e + V * M * H * D * 4
    distinct = int(sid.unique_consecutive().numel())
    rows, outs = [], {}
    for kern in KERNELS:
        kernels.BANK_KERNEL = kern.split("+")[0]

        def step(stack="+stack" in kern):
            return kernels.bank_rows_grad([torch.stack(gs)] if stack else gs, dvs, ids, V, M, sid,
                                          order, logits)  # fmt: skip

        outs[kern] = step()
        ms = median(time_fn(step, warmup=1 if args.smoke else 2, iters=args.iters, device=device))
        rows.append({"ids": dist, "distinct": distinct, "M": M,
                     "logits": logits, "kernel": kern, "ms": ms, "floor_ms": nbytes / (bw * 1e9) * 1e3,
                     "gbs": nbytes / (ms * 1e-3) / 1e9})  # fmt: skip
    kernels.BANK_KERNEL = None
    ref = outs["lanes"]
    for r in rows:
        r["rel_err"] = ((outs[r["kernel"]] - ref).abs().max() / ref.abs().max()).item()
    return rows


def main() -> None:
    p = mix_parser(__doc__, iters=20, ids_dist="uniform,zipf:0.3,zipf")
    p.add_argument("--logits", choices=("auto", "on", "off"), default="auto",
                   help="read router logits (gates formed in the kernel) or gates; auto: logits "
                        "below 16 slots, as the training step's defaults")  # fmt: skip
    args = p.parse_args()
    device = mix_device(args, smoke=(2, 24, 2, 16, 2, 40, 1))
    if args.smoke:
        args.ids_dist = "zipf"  # runs past their tiles and absent ids
    if not kernels.available(torch.zeros(args.head_dim, device=device)):
        raise SystemExit(
            "bank_grad: the Triton kernels are not usable here (a CUDA GPU, or --smoke)"
        )
    bw = copy_bandwidth_gbs(device)
    rows = []
    for dist in args.ids_dist.split(","):
        for M in args.slots.split(","):
            new = run(int(M), dist, args, device, bw)
            release(device)
            for r in new:  # as measured: a run cut short keeps its rows
                print(f"row {r}", flush=True)
            rows += new
    json_line(
        "bank_grad",
        {"device": device_name(device), "torch": torch.__version__, "copy_gbs": bw, "rows": rows},
    )
    print_table(rows, [("ids", "ids", "{}"), ("distinct", "distinct ids", "{}"), ("M", "slots M", "{}"),
                       ("logits", "logits", "{}"), ("kernel", "kernel", "{}"), ("ms", "ms", "{:.3f}"),
                       ("floor_ms", "floor ms", "{:.3f}"), ("gbs", "GB/s", "{:.0f}"),
                       ("rel_err", "max |out - lanes| / max |lanes|", "{:.1e}")],
                f"MoVE bank gradient, B={args.batch} T={args.seq} H={args.heads} D={args.head_dim} "
                f"L={args.layers} V={args.ids}, {device_name(device)}, torch {torch.__version__}, "
                f"copy {bw:.0f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
