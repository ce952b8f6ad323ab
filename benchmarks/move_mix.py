"""The MoVE mix alone, forward and backward over L layers, against the bytes it must move.

Shapes of the training path: a bf16 bank ``(V, M, d)`` (V = 16384 codes + 1001 classes), random
ids in ``[1, V)`` for ``(B, T)`` (each id about B*T/V times), L layers. "deferred" is movegen's
training path (``MoVEBank.tapped``: with the Triton kernels each layer reads the slots by id from
the bank itself, and the bank gradient is formed in one pass over the tokens in id order, all
layers summed into fp32 bank rows) with the per-token kernels; "grouped" the same with the
kernels grouped by id (the ids sorted once per forward; each program takes a tile of sorted
tokens of one head; by default the lanes kernels, whose equal rows the hardware fetches about
once); "grouped-dot" the same in the dot form (a tile's groups of equal ids load their slots
once, applied by tensor-core products), "grouped-dotbwd" with the lanes forward and the dot
backward, "grouped-lanes" the lanes form whatever the default (``kernels.MIX_KERNEL``);
"grouped-tile" the same
with the bank gradient by the lanes kernels' segmented sum over tiles at every M
(``kernels.BANK_KERNEL = "lanes"``, ``BANK_TILE_MAX_SLOTS`` past M; the others take the default
kernel); "autograd" gathers the per-token slots (``MoVEBank.gather``) and runs plain autograd
through every layer's mix (one bank-sized gradient per layer).

Floor in bytes (bf16), per layer: forward reads each row's M slots, v and the gates and writes the
mixed values; backward reads the slots again, dout, v and the gates and writes dv and the gate
gradients. Once per step: the bank gradient reads the L value gradients and gates and writes the
fp32 ``(V, M*d)`` gradient. The grouped floor counts the slots once per distinct id instead of
once per token. Ids: uniform random in ``[1, V)``, or as ``--ids_dist`` says (``_util.ID_DISTS``;
Zipf(1) a strong skew, ``zipf:0.3`` the fit to a measured tokenizer's usage).
"fwd" is the training forward
(graph kept for backward); "extra GiB" is the peak memory of forward + backward above the inputs.

    python -m benchmarks.move_mix            # GPU: GPT-B shapes, batch 256, M = 6 and 24
    python -m benchmarks.move_mix --smoke    # CPU, tiny
    python -m benchmarks.move_mix --profile  # and each row's kernels by GPU time
"""

from __future__ import annotations

import torch

from movegen import kernels
from movegen.move import MoVEBank, mix, mix_tapped

from ._util import (
    copy_bandwidth_gbs,
    device_name,
    json_line,
    median,
    mix_device,
    mix_parser,
    print_table,
    profile_table,
    random_codes,
    release,
    time_fn,
)

TILE_MAX = kernels.BANK_TILE_MAX_SLOTS


def run(M: int, impl: str, dist: str, args, device, bw: float) -> dict:
    B, T, H, D, L, V = args.batch, args.seq, args.heads, args.head_dim, args.layers, args.ids
    d, G = H * D, M + 1
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    bank = MoVEBank(V, M, d, H).to(device, dt)
    bank.group_by_id = impl.startswith("grouped")
    # "grouped-tile": the bank gradient as the lanes kernels' segmented sum over tiles at any M
    kernels.BANK_TILE_MAX_SLOTS = 1024 if impl == "grouped-tile" else TILE_MAX
    kernels.BANK_KERNEL = "lanes" if impl == "grouped-tile" else None
    kernels.MIX_KERNEL = {
        "grouped-dot": "dot",
        "grouped-dotbwd": "dot-bwd",
        "grouped-lanes": "lanes",
    }.get(impl)
    ids = random_codes((B, T), V, dist, generator=g)
    distinct = ids.unique().numel()
    vs = [torch.randn(B, T, H, D, device=device, dtype=dt, generator=g).requires_grad_() for _ in range(L)]  # fmt: skip
    gs = [(2 * torch.rand(B, T, H, G, device=device, dtype=dt, generator=g)).requires_grad_() for _ in range(L)]  # fmt: skip
    dout = torch.randn(B, T, H, D, device=device, dtype=dt, generator=g)

    def fwd():
        if impl.startswith("grouped") or impl == "deferred":
            mem, taps = bank.tapped(ids, L, G)
            return [mix_tapped(v, gt, mem, tp, True) for v, gt, tp in zip(vs, gs, taps)]
        memh = bank.gather(ids)
        return [mix(v, gt, memh, True) for v, gt in zip(vs, gs)]

    def fwd_bwd():
        torch.autograd.backward(fwd(), [dout] * L)
        for t in [bank.weight, *vs, *gs]:
            t.grad = None

    try:
        ms_f = median(time_fn(fwd, warmup=2, iters=args.iters, device=device))
        ms_fb = median(time_fn(fwd_bwd, warmup=2, iters=args.iters, device=device))
        extra = float("nan")
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fwd_bwd()
            extra = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        if args.profile:
            print(f"\nprofile: M={M} {impl} {dist} ids, fwd+bwd, {L} layers")
            print(profile_table(fwd_bwd, device, top=14, name_width=60))
    except torch.OutOfMemoryError:
        return {"M": M, "impl": impl, "ids": dist, "ms_fwd": "OOM"}
    e = 2 if dt == torch.bfloat16 else 4
    N = B * T
    slots = N * M * d * e  # every row's M slots, or the per-token bank gradient (B, T, M*d)
    fwd_bytes = L * (slots + N * H * (2 * D + G) * e)  # + v, gates read, out written
    bwd_bytes = L * (slots + N * H * (3 * D + 2 * G) * e)  # + dout, v, gates read, dv, dg written
    bank_bytes = L * N * H * (D + G) * e + V * M * d * 4  # dv, gates read; fp32 rows out
    fb_bytes = fwd_bytes + bwd_bytes + bank_bytes
    # grouped by id, the slots are read once per group: one row per distinct id and tile
    grouped_bytes = fb_bytes - 2 * L * slots + 2 * L * distinct * M * d * e
    return {"M": M, "impl": impl, "ids": dist, "distinct": distinct, "ms_fwd": ms_f,
            "floor_grouped_ms": grouped_bytes / (bw * 1e9) * 1e3, "floor_fwd_ms": fwd_bytes / (bw * 1e9) * 1e3,
            "fwd_gbs": fwd_bytes / (ms_f * 1e-3) / 1e9, "ms_fwd_bwd": ms_fb,
            "floor_fwd_bwd_ms": fb_bytes / (bw * 1e9) * 1e3, "fwd_bwd_gbs": fb_bytes / (ms_fb * 1e-3) / 1e9,
            "extra_gib": extra}  # fmt: skip


def main() -> None:
    p = mix_parser(__doc__, iters=10, ids_dist="uniform,zipf")
    p.add_argument("--impls", default="deferred,grouped,autograd")
    p.add_argument("--profile", action="store_true", help="print each row's kernels by GPU time")
    args = p.parse_args()
    device = mix_device(args, smoke=(2, 16, 2, 8, 2, 50, 2))
    bw = copy_bandwidth_gbs(device)
    rows = []
    for dist in args.ids_dist.split(","):
        for M in args.slots.split(","):
            for impl in args.impls.split(","):
                rows.append(run(int(M), impl, dist, args, device, bw))
                print(rows[-1], flush=True)  # each row as measured: a run cut short keeps them
                release(device)
    json_line(
        "move_mix",
        {"device": device_name(device), "torch": torch.__version__, "copy_gbs": bw, "rows": rows},
    )
    print_table(rows, [("ids", "ids", "{}"), ("distinct", "distinct ids", "{}"), ("M", "slots M", "{}"),
                       ("impl", "path", "{}"), ("ms_fwd", "fwd ms (L layers)", "{:.2f}"),
                       ("floor_fwd_ms", "fwd floor ms", "{:.2f}"), ("fwd_gbs", "fwd GB/s", "{:.0f}"),
                       ("ms_fwd_bwd", "fwd+bwd ms", "{:.2f}"), ("floor_fwd_bwd_ms", "fwd+bwd floor ms", "{:.2f}"),
                       ("fwd_bwd_gbs", "fwd+bwd GB/s", "{:.0f}"),
                       ("floor_grouped_ms", "grouped floor ms", "{:.2f}"), ("extra_gib", "extra GiB", "{:.2f}")],
                f"MoVE mix, B={args.batch} T={args.seq} H={args.heads} D={args.head_dim} L={args.layers} "
                f"V={args.ids}, {device_name(device)}, torch {torch.__version__}, copy {bw:.0f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
