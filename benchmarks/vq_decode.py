"""The VQ-16 decode of an evaluation (codes 16 x 16 -> images 256 x 256, ``VQTokenizer.decode``)
alone, batch by batch as ``sample.generate_images`` runs it (``sample.DECODE_BATCH`` codes a call),
under the ways it could run: fp32 as today (cuDNN's TF32 convolutions as torch sets them by
default), fp32 in channels-last layout, compiled by inductor, and bf16 autocast. Each row: ms per
batch, images/s, × today's rate, and its images against the strict fp32 decode (TF32 off): the
largest and mean absolute difference in [-1, 1] units before the clamp, and the fraction of
uint8 pixel values that differ (what the Inception network sees). Random weights (the network's
own initialisation; no released weights can be fetched here) and random codes, so the pixel
differences are those of this network at its initialisation, not of trained weights.

    python -m benchmarks.vq_decode                     # GPU: VQ-16, batch 256
    python -m benchmarks.vq_decode --variants eager,cl,bf16-cl --batch 128
    python -m benchmarks.vq_decode --smoke             # CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import functools

import torch

from ._util import device_name, iqr, json_line, median, print_table, release, time_fn

VARIANTS = (
    "eager",
    "cl",
    "bench",
    "cl-bench",
    "compiled",
    "compiled-cl",
    "bf16-cl",
    "bf16-compiled-cl",
)
"""``cl``: channels-last; ``bench``: cuDNN's benchmark mode (each convolution's algorithm timed
on its first call of a shape); ``compiled``: inductor; ``bf16``: bf16 autocast."""


def decoder_fn(tok, variant: str, device: torch.device):
    """``codes -> images before the clamp`` run the way ``variant`` names."""
    net = tok.decoder
    cl = "cl" in variant.split("-")
    if cl:
        net = net.to(memory_format=torch.channels_last)
    else:
        net = net.to(memory_format=torch.contiguous_format)
    if "compiled" in variant:
        net = torch.compile(net, dynamic=False)
    bf16 = variant.startswith("bf16") and device.type == "cuda"

    @torch.no_grad()
    def fn(codes):
        z = tok.lookup(codes)
        if cl:
            z = z.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            return net(z).float()

    return fn


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    from movegen.evaluate import _uint8 as uint8  # the evaluation's own quantisation
    from movegen.tokenizer import TokenizerConfig, VQTokenizer

    from .fid50k import tokenizer_config

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.batch, args.iters, args.warmup = 4, 2, 1
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: one of {', '.join(VARIANTS)}")
    cfg: TokenizerConfig = tokenizer_config(args.smoke)
    torch.manual_seed(0)
    tok = VQTokenizer(cfg).eval().to(device)
    g = torch.Generator(device=device).manual_seed(0)
    h = cfg.latent_size
    codes = torch.randint(cfg.codebook_size, (args.batch, h, h), device=device, generator=g)
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    print(f"{device_name(device)}, torch {torch.__version__}; batch {args.batch}, {h} x {h} codes -> "
          f"{cfg.image_size} x {cfg.image_size}; TF32 (cuDNN, matmul) by default: {tf32}")  # fmt: skip
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    ref = decoder_fn(tok, "eager", device)(codes)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    ref8, scale = uint8(ref), ref.std().item()
    rows = []
    for v in variants:
        torch.backends.cudnn.benchmark = "bench" in v.split("-")
        fn = decoder_fn(tok, v, device)
        try:
            out = fn(codes)
            ms = time_fn(
                functools.partial(fn, codes), warmup=args.warmup, iters=args.iters, device=device
            )
        except torch.OutOfMemoryError:
            rows.append({"variant": v, "ms": "OOM"})
            release(device)
            continue
        d = (out - ref).abs()
        row = {"variant": v, "ms": median(ms), "iqr": iqr(ms) / median(ms) * 100,
               "img_s": args.batch / median(ms) * 1e3, "max_abs": d.max().item(),
               "mean_abs": d.mean().item(), "u8": (uint8(out) != ref8).float().mean().item() * 100,
               "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
        del out, d
        release(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    base = next((r["img_s"] for r in rows if r["variant"] == "eager" and "img_s" in r), None)
    for r in rows:
        if base and "img_s" in r:
            r["speed"] = r["img_s"] / base
    json_line("vq_decode", {"device": device_name(device), "torch": torch.__version__,
                            "batch": args.batch, "tf32_default": tf32, "ref_std": scale, "rows": rows})  # fmt: skip
    print_table(rows, [("variant", "variant", "{}"), ("ms", "ms/batch", "{:.1f}"), ("iqr", "IQR %", "{:.1f}"),
                       ("img_s", "img/s", "{:.0f}"), ("speed", "× eager", "{:.2f}"),
                       ("max_abs", "max |Δ|", "{:.2e}"), ("mean_abs", "mean |Δ|", "{:.2e}"),
                       ("u8", "uint8 differing %", "{:.3f}"), ("peak_gib", "peak GiB", "{:.1f}")],
                f"VQ decode, {device_name(device)}: Δ against fp32 without TF32 (output std {scale:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
