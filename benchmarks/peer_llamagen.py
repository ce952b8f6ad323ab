"""LlamaGen beside movegen in one process, under one protocol, and the ratios.

Training step (``benchmarks.train_step``'s protocol): GPT-B (K = 16384, 1000 classes, 256
positions), dropout 0.1 (residual, FFN, token), class dropout 0.1, bf16 autocast, cross-entropy,
backward, clip 1.0, fused AdamW (weight decay on matrices), random ids, median of the timed steps
after warm-up with CUDA events, compiled (``torch.compile``, LlamaGen's training script's
default) and eager; MFU against the bf16 matmul peak measured in the same run. Sampling
(``benchmarks.sampling``'s): CFG 2.0, temperature 1, no top-k/top-p, codes only (no VQ decode);
movegen's fast path (one CUDA graph per step) against LlamaGen's ``generate`` with the model
in bf16 and compiled ``mode="reduce-overhead", fullgraph=True``, as its ``sample_c2i.py
--compile`` does by default (``--precision bf16``).

    python -m benchmarks.peer_llamagen --llamagen PATH            # GPU: the full table
    python -m benchmarks.peer_llamagen --llamagen PATH --smoke    # CPU, tiny, seconds

``PATH``: your checkout of FoundationVision/LlamaGen (outside the repository, or the git-ignored
``.llamagen/``); its files are executed from there, never copied. Only ``gpt.py``,
``generate.py``, ``vq_model.py`` (and ``utils/drop_path.py``) are read.
"""

from __future__ import annotations

import argparse

import torch

from . import sampling, train_step
from ._util import (
    ID_DISTS,
    arm_config,
    device_name,
    json_line,
    load_llamagen,
    matmul_peak_tflops,
    print_table,
    release,
)


def llamagen_model(lg, smoke: bool):
    """LlamaGen's GPT-B as its c2i training builds it (or a tiny one for ``smoke``), with the
    dimensions of ``arm_config('standard', smoke)``."""
    cfg = arm_config("standard", smoke)
    common = dict(vocab_size=cfg.vocab_size, block_size=cfg.seq_len, num_classes=cfg.num_classes, cls_token_num=1,
                  model_type="c2i", resid_dropout_p=0.1, ffn_dropout_p=0.1, token_dropout_p=0.1,
                  class_dropout_prob=0.1)  # fmt: skip
    if smoke:
        return lg.gpt.Transformer(
            lg.gpt.ModelArgs(n_layer=cfg.n_layer, n_head=cfg.n_head, dim=cfg.n_embd, **common)
        )
    return lg.gpt.GPT_B(**common)


def llamagen_train(
    lg, batch: int, compiled: bool, args, device, peak: float, flops_per_token: float
) -> dict:
    torch.manual_seed(0)
    model = llamagen_model(lg, args.smoke).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")  # fmt: skip
    cfg = arm_config("standard", args.smoke)
    T, K, C = cfg.seq_len, cfg.vocab_size, cfg.num_classes
    fwd = torch.compile(model, mode=args.compile_mode) if compiled else model

    def loss_fn(z, c):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, loss = fwd(cond_idx=c, idx=z[:, :-1], targets=z)
        return loss

    row = {
        "arm": "llamagen",
        "batch": batch,
        "mode": "compiled" if compiled else "eager",
        "ids": "uniform",
    }
    row.update(train_step.time_training(loss_fn, model, opt, train_step.random_batches(batch, T, K, C, device),
                                        flops_per_token=flops_per_token, args=args, device=device, peak=peak,
                                        fold_clip=False))  # fmt: skip
    return row


def llamagen_sample(lg, batch: int, args, device) -> dict:
    torch.manual_seed(0)
    model = llamagen_model(lg, args.smoke).to(device).eval()
    with torch.no_grad():  # a non-degenerate head (LlamaGen zeroes it at init)
        model.output.weight.normal_(std=0.02)
    cfg = arm_config("standard", args.smoke)
    T, C, K = cfg.seq_len, cfg.num_classes, cfg.vocab_size
    run = model
    if (
        device.type == "cuda"
    ):  # bf16 weights and KV cache, as movegen's sampler and sample_c2i.py's default
        model = run = model.to(torch.bfloat16)
    if device.type == "cuda" and not args.no_compile_llamagen:
        run = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    labels = torch.arange(batch, device=device) % C

    def once():
        return lg.generate.generate(run, labels, T, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0,
                                    sample_logits=True)  # fmt: skip

    s, warm, codes = sampling.time_generation(once, args.iters, device)
    return {"arm": "llamagen", "batch": batch, "path": "compiled" if run is not model else "eager",
            "s_per_batch": s, "images_per_s": batch / s, "warmup_s": warm,
            "codes_ok": bool(codes.min() >= 0 and codes.max() < K)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--llamagen", required=True, help="a checkout of FoundationVision/LlamaGen")
    p.add_argument(
        "--smoke", action="store_true", help="tiny models on the CPU, to check the script runs"
    )
    p.add_argument("--batches", default="64,256", help="training batches")
    p.add_argument("--modes", default="compiled,eager")
    p.add_argument(
        "--arms",
        default="standard,move-x1",
        help="movegen arms beside LlamaGen (ARM@grouped / ARM@token: the MoVE kernels' form, training only)",
    )
    p.add_argument(
        "--sample_batches", default="16,64,256,1024", help="sampling batches ('' to skip)"
    )
    p.add_argument(
        "--no_compile_llamagen", action="store_true", help="sample with LlamaGen's model eager"
    )
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of both training steps")
    p.add_argument(
        "--ids_dist",
        default="uniform",
        help=f"code distributions of movegen's training arms, comma-separated: {ID_DISTS}; "
        "zipf:0.3 is the fit to a measured tokenizer's codebook usage; LlamaGen's step runs once, "
        "on uniform ids",
    )
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sample_iters", type=int, default=3)
    args = p.parse_args()
    lg = load_llamagen(args.llamagen)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        args.warmup, args.iters, args.sample_iters, args.batches, args.modes = 1, 2, 1, "4", "eager"
        args.sample_batches = "2" if args.sample_batches else ""
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak_tflops(device)
    from movegen.model import cost_report

    fpt = cost_report(arm_config("standard", args.smoke))["flops_per_token"]  # the same model
    rows = []
    for mode in args.modes.split(","):
        for b in map(int, args.batches.split(",")):
            ref = llamagen_train(lg, b, mode == "compiled", args, device, peak, fpt)
            release(device)
            rows.append(ref)
            print(ref, flush=True)
            for dist in args.ids_dist.split(","):
                for arm in args.arms.split(","):
                    r = train_step.bench(arm, b, mode == "compiled", args, device, peak, dist)
                    release(device)
                    if isinstance(r.get("ms"), float) and isinstance(ref.get("ms"), float):
                        r["speed_vs_llamagen"] = ref["ms"] / r["ms"]
                    rows.append(r)
                    print(r, flush=True)
                # each arm against the standard step on the same ids
                same = [r for r in rows if r["batch"] == b and r["mode"] == ref["mode"]
                        and r.get("ids") == dist and isinstance(r.get("ms"), float)]  # fmt: skip
                std = next((r["ms"] for r in same if r["arm"] == "standard"), None)
                for r in same if std else ():
                    r["vs_standard"] = r["ms"] / std
    print_table(rows, [("arm", "arm", "{}"), ("ids", "ids", "{}"), ("batch", "batch", "{}"), ("mode", "mode", "{}"),
                       ("ms", "ms/step", "{:.1f}"),
                       ("tokens_per_s", "tokens/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}"), ("peak_gib", "peak GiB", "{:.1f}"),
                       ("speed_vs_llamagen", "speed vs LlamaGen", "{:.3f}"),
                       ("vs_standard", "step x standard", "{:.3f}")],
                f"training step, {device_name(device)}, bf16 matmul peak {peak:.0f} TFLOP/s")  # fmt: skip
    json_line(
        "peer_llamagen_train", {"device": device_name(device), "peak_tflops": peak, "rows": rows}
    )
    srows = []
    for b in [int(x) for x in args.sample_batches.split(",") if x]:
        ref = llamagen_sample(
            lg, b, argparse.Namespace(**{**vars(args), "iters": args.sample_iters}), device
        )
        release(device)
        srows.append(ref)
        print(ref, flush=True)
        for arm in dict.fromkeys(a.partition("@")[0] for a in args.arms.split(",")):  # no @form
            r = sampling.run(
                arm,
                b,
                True,
                argparse.Namespace(**{**vars(args), "iters": args.sample_iters}),
                device,
            )
            release(device)
            r["speed_vs_llamagen"] = r["images_per_s"] / ref["images_per_s"]
            srows.append(r)
            print(r, flush=True)
    if srows:
        print_table(srows, [("arm", "arm", "{}"), ("batch", "batch", "{}"), ("path", "path", "{}"),
                            ("images_per_s", "images/s", "{:.1f}"), ("warmup_s", "warm-up s", "{:.1f}"),
                            ("speed_vs_llamagen", "images/s vs LlamaGen", "{:.3f}")],
                    f"sampling, CFG 2.0, {device_name(device)}")  # fmt: skip
        json_line("peer_llamagen_sampling", {"device": device_name(device), "rows": srows})


if __name__ == "__main__":
    main()
