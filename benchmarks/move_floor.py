"""What MoVE must add to the GPT-B training step, counted: the floor of each part in bytes or FLOPs.

No GPU needed: the bytes each part of MoVE's work must move (or the FLOPs it must do), at a
copy rate and a bf16 matmul rate measured on a card, against the standard step's time there:
the least MoVE-x1 and MoVE-x4 can add, as a ratio to the standard step. Parts, per training step
(L layers, N = B*T tokens, bf16 activations, fp32 bank and optimizer state):

* mix forward: v read, the mixed v written, the gates (or router logits) read, and the bank rows:
  every token's M slots (per token) or each distinct id's once (per group: the ids sorted, each
  row read once per layer);
* mix backward: the mixed v's gradient, v and the gates read, v's and the gates' gradients
  written, and the rows again;
* bank gradient: the L layers' gates and value gradients read, the fp32 rows written once;
* the bank's bf16 cast for the step (fp32 read, bf16 written);
* AdamW over the bank with the clip's norm: fp32 parameter, gradient, two moments read (16 B),
  parameter and moments written (12 B), the gradient read once more for the norm (4 B);
* the routers' products: 2 * d * H*(M+1) FLOPs a token and layer, three products (forward and
  both gradients), at the measured bf16 peak.

Distinct ids: drawn as the benchmarks draw them (``_util.random_codes``, batch 256 x 256). The
default rates are the ones measured on an H100 (``--card h100``) on 2026-12-07 (sixth session:
copy 3,006 GB/s in ``bank_grad``, bf16 peak 785 TFLOP/s and the standard step 96.1 ms in
``train_step``) or on an H200 (``--card h200``: copy 4,255 GB/s and peak 767 TFLOP/s on
2026-12-02, the standard step 93.0 ms on 2026-12-03, before later work on it); any can be given.

    python -m benchmarks.move_floor                 # both cards, uniform and Zipf(0.3) ids
    python -m benchmarks.move_floor --card h100 --standard_ms 95.0
"""

from __future__ import annotations

import argparse

import torch

from ._util import ID_DISTS, json_line, print_table, random_codes

CARDS = {  # name: (copy GB/s, bf16 matmul TFLOP/s, standard step ms), measured (see above)
    "h100": (3006.0, 785.0, 96.1),
    "h200": (4255.0, 767.0, 93.0),
}


def parts(M: int, distinct: int, *, B=256, T=256, H=12, D=64, L=12, V=16384 + 1001) -> dict:
    """Bytes (or FLOPs, for the routers) of each part of MoVE's work in one training step."""
    N, d, G, e = B * T, H * D, M + 1, 2
    act, gates = N * d * e, N * H * G * e  # one (B, T, d) bf16 tensor; one layer's gates
    per_token, per_group = N * M * d * e, distinct * M * d * e  # one layer's bank rows read
    rows = V * M * d  # bank parameters
    return {
        "mix forward, per token": L * (2 * act + gates + per_token),
        "mix forward, per group": L * (2 * act + gates + per_group),
        "mix backward, per token": L * (3 * act + 2 * gates + per_token),
        "mix backward, per group": L * (3 * act + 2 * gates + per_group),
        "bank gradient": L * (gates + act) + rows * 4,
        "bank bf16 cast": rows * (4 + 2),
        "AdamW + clip norm over the bank": rows * 32,
        "router products (FLOPs)": 3 * 2 * N * d * H * G * L,
    }


def rows_for(
    M: int, dist: str, card: str, copy_gbs: float, tflops: float, std_ms: float
) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    distinct = int(random_codes((256, 256), 16384 + 1001, dist, generator=g).unique().numel())
    out, total = [], {"per token": 0.0, "per group": 0.0}
    for name, n in parts(M, distinct).items():
        flops = name.endswith("(FLOPs)")
        ms = n / (tflops * 1e12) * 1e3 if flops else n / (copy_gbs * 1e9) * 1e3
        for kind in total:  # the mix in one form; everything else in both sums
            other = "per group" if kind == "per token" else "per token"
            if not name.endswith(other):
                total[kind] += ms
        out.append({"card": card, "ids": dist, "distinct": distinct, "M": M, "part": name,
                    "amount": n / 1e12 if flops else n / 1e9, "unit": "TFLOP" if flops else "GB",
                    "ms": ms})  # fmt: skip
    for kind, ms in total.items():
        out.append({"card": card, "ids": dist, "distinct": distinct, "M": M,
                    "part": f"total, mix {kind}", "ms": ms, "ratio": (std_ms + ms) / std_ms})  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="(the same: it needs no GPU)")
    p.add_argument("--card", default="h100,h200", help=f"comma list of {sorted(CARDS)}")
    p.add_argument("--copy_gbs", type=float, help="copy rate (read + write), overrides the card's")
    p.add_argument("--peak_tflops", type=float, help="bf16 matmul rate, overrides the card's")
    p.add_argument("--standard_ms", type=float, help="the standard step, overrides the card's")
    p.add_argument("--slots", default="6,24", help="MoVE slots M (GPT-B: x1 = 6, x4 = 24)")
    p.add_argument("--ids_dist", default="uniform,zipf:0.3", help=f"comma list: {ID_DISTS}")
    args = p.parse_args()
    rows = []
    for card in args.card.split(","):
        copy_gbs, tflops, std_ms = CARDS[card]
        copy_gbs, tflops = args.copy_gbs or copy_gbs, args.peak_tflops or tflops
        std_ms = args.standard_ms or std_ms
        for dist in args.ids_dist.split(","):
            for M in args.slots.split(","):
                rows += rows_for(int(M), dist, card, copy_gbs, tflops, std_ms)
    json_line("move_floor", {"rows": rows})
    print_table(rows, [("card", "card", "{}"), ("ids", "ids", "{}"), ("distinct", "distinct ids", "{}"),
                       ("M", "slots M", "{}"), ("part", "part", "{}"), ("amount", "amount", "{:.3f}"),
                       ("unit", "unit", "{}"), ("ms", "floor ms", "{:.2f}"),
                       ("ratio", "x standard", "{:.3f}")],
                "What MoVE adds to the GPT-B step at batch 256, counted (floors at the cards' measured "
                "rates; see --help)")  # fmt: skip


if __name__ == "__main__":
    main()
