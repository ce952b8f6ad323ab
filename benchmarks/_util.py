"""Shared helpers for the benchmarks: the arms' model configs, timing, the measured matmul peak,
tables."""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from movegen import kernels
from movegen.model import GPTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "imagenet"

# arm -> (fit YAML in configs/imagenet, overrides of its model.config)
ARMS: dict[str, tuple[str, dict]] = {
    "standard": ("gpt-b-standard.yaml", {}),
    "lave-x1": ("gpt-b-lave-x1.yaml", {}),
    "move-x1": ("gpt-b-move-x1.yaml", {}),
    "move-x2": ("gpt-b-move-x1.yaml", {"memory_density": 2}),
    "move-x4": ("gpt-b-move-x1.yaml", {"memory_density": 4}),
}


def arm_config(arm: str, smoke: bool = False) -> GPTConfig:
    """The model of a benchmark arm: ``model.config`` of its ImageNet fit YAML (LlamaGen GPT-B,
    K = 16384, 1000 classes, 256 positions) with the arm's overrides. ``smoke``: the ``tiny`` preset
    (K = 64, 10 classes, 16 positions) with the arm's memory settings, for a CPU check."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    name, overrides = ARMS[arm]
    # the `model.config` section as `movegen fit` reads it (parsed here so that the benchmarks
    # depend on the YAML files, not on the CLI's internals)
    fields = {**yaml.safe_load((CONFIGS / name).read_text())["model"]["config"], **overrides}
    if smoke:
        mem = {k: fields[k] for k in ("memory", "memory_density") if k in fields}
        return GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16, **mem)
    return GPTConfig(**fields)


OPS = ("norm", "swiglu", "rope", "attn", "ropeattn", "ropesave", "routerpad", "ce", "router",
       "gates", "emb")  # fmt: skip
"""The ``GPT.fused_ops`` an arm may add (``@op``: a no-op where the model has it by default, as
the first seven, and router and gates for MoVE below 16 slots) or remove (``@noop``)."""
BANK_OPTIONS = tuple(f"bank{k}" for k in kernels.BANK_KERNELS)
"""The arm options that pick the bank gradient's kernel (``bankruns``, ``banklanes``, ...)."""
MIX_OPTIONS = tuple(f"mix{k.replace('-', '')}" for k in kernels.MIX_KERNELS)
"""The arm options that pick the grouped mix kernels' form (``mixlanes``, ``mixdot``,
``mixdotbwd``)."""
ARM_OPTIONS = ("grouped", "token", "unfused", *OPS, *(f"no{o}" for o in OPS), "noclipfold",
               "dvstack", *BANK_OPTIONS, *MIX_OPTIONS)  # fmt: skip
"""What may follow an arm's ``@``, joined by ``+`` (:func:`arm_options`)."""


def arm_options(arm: str) -> tuple[str, set[str]]:
    """``ARM@opt+opt`` -> (ARM, {opt, ...}), refusing unknown options, grouped with token, and
    an op with its ``no`` form. The options: grouped / token (the MoVE kernels' form); unfused
    (the model's elementwise steps as PyTorch ops, not GPT.fused_ops' Triton kernels); ``noOP``
    one of the default ops as PyTorch's: nonorm (dropout + residual + RMSNorm), noswiglu (SiLU
    product), norope (QKV split + RoPE), noattn (SDPA in place of the Triton attention),
    noropeattn (the split written and read again before the attention, not the attention
    straight from the QKV product), noropesave (that attention's backward rotating q and k again
    rather than reading the forward's), norouterpad (the router's product at its own width, rows
    not 16-byte aligned); ``OP`` adds one (after unfused, e.g. ``@unfused+attn``):
    ce the fused cross-entropy, router the stacked QKV + router product, gates MoVE's gates
    formed in the mix kernels, emb the token embedding's sort-based backward (these four off
    by default, but router and gates on for MoVE below 16 slots: ``@norouter+nogates`` there);
    noclipfold the clip as a pass of its own (``clip_grad_norm_``) rather than
    inside the fused AdamW step (train_step); dvstack the MoVE bank gradient reading the
    layers' value gradients from a stacked copy (``MoVEBank.stack_dv`` True), not where they lie;
    bankruns / banklanes / banklayers the bank gradient by the runs / lanes / layers kernel (``kernels.BANK_KERNEL``,
    a module setting: set for every arm, back to the default None where none of them is given);
    mixlanes / mixdot / mixdotbwd the grouped mix kernels' form (``kernels.MIX_KERNEL``: lanes
    or dot both ways, or the lanes forward and the dot backward; set the same way)."""
    name, _, rest = arm.partition("@")
    opts = set(rest.split("+")) - {""}
    if not opts <= set(ARM_OPTIONS) or {"grouped", "token"} <= opts:
        raise ValueError(f"{arm}: after @ come grouped or token and "
                         f"{sorted(set(ARM_OPTIONS) - {'grouped', 'token'})}, joined by +")  # fmt: skip
    for group, what in ((BANK_OPTIONS, "the bank gradient's kernel"),
                        (MIX_OPTIONS, "the grouped mix kernels' form")):  # fmt: skip
        if len(opts & set(group)) > 1:
            raise ValueError(f"{arm}: {', '.join(group)} each pick {what}; give one")
    both = sorted(o for o in OPS if o in opts and f"no{o}" in opts)
    if both:
        raise ValueError(f"{arm}: {both[0]} and no{both[0]} contradict each other; give one")
    return name, opts


def apply_arm_options(model, opts: set[str]) -> None:
    """Set ``model.fused_ops`` and the MoVE kernels' form as :func:`arm_options`' ``opts`` say."""
    if "unfused" in opts:
        model.fused_ops = ()
    model.fused_ops = tuple(o for o in model.fused_ops if f"no{o}" not in opts)
    model.fused_ops += tuple(o for o in OPS if o in opts and o not in model.fused_ops)
    if opts & {"grouped", "token"} and model.bank is not None:
        model.bank.group_by_id = "grouped" in opts
    if "dvstack" in opts and model.bank is not None:
        model.bank.stack_dv = True
    kernels.BANK_KERNEL = next((k for k in kernels.BANK_KERNELS if f"bank{k}" in opts), None)
    kernels.MIX_KERNEL = next(
        (k for k, o in zip(kernels.MIX_KERNELS, MIX_OPTIONS, strict=True) if o in opts), None
    )


ID_DISTS = "uniform, zipf (Zipf(1)), zipf:S (Zipf(S), S >= 0), store:PATH (a code store's histogram; no comma in PATH)"
"""The id distributions :func:`random_codes` draws from (the benchmarks' ``--ids_dist``)."""


def rank_probabilities(dist: str, n: int) -> torch.Tensor:
    """Probabilities of ``n`` ranks, most frequent first, fp64 on the CPU: ``uniform``;
    ``zipf`` / ``zipf:S``: rank r (from 1) proportional to ``1 / r**S`` (S = 1 for ``zipf``);
    ``store:PATH``: the rank-frequency curve of a movegen code store's codes (every view of every
    item), stretched to ``n`` ranks by linear interpolation over the rank's fraction, so a store of
    1,024 codes gives the shape of its usage to K = 16,384."""
    if dist == "uniform":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if dist == "zipf" or dist.startswith("zipf:"):
        s = 1.0
        if dist != "zipf":
            try:
                s = float(dist[5:])
            except ValueError:
                s = float("nan")
        if not 0 <= s < float("inf"):
            raise ValueError(f"{dist!r}: give the exponent as a number >= 0, e.g. zipf:0.3")
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** s
        return p / p.sum()
    if dist.startswith("store:"):
        import numpy as np

        freq = _store_frequencies(dist[6:])
        src = (np.arange(len(freq)) + 0.5) / len(freq)
        p = torch.from_numpy(np.interp((np.arange(n) + 0.5) / n, src, freq))
        return p / p.sum()
    raise ValueError(f"unknown id distribution {dist!r}: {ID_DISTS}")


@functools.lru_cache(maxsize=4)
def _store_frequencies(path: str):
    """A code store's code frequencies, most frequent first (read once per path: a benchmark draws
    several batches from it)."""
    import numpy as np

    from movegen.data.codes import CodeStore

    store = CodeStore(path)
    counts = np.bincount(np.asarray(store.codes).reshape(-1), minlength=store.codebook_size)
    if counts.sum() == 0:
        raise ValueError(f"{path}: the code store holds no codes")
    return np.sort(counts.astype(np.float64))[::-1] / counts.sum()


def perplexity(p: torch.Tensor) -> float:
    """``exp`` of the entropy of the probabilities ``p``: how many codes are used, in effect."""
    p = p[p > 0].double()
    return float(torch.exp(-(p * p.log()).sum()))


def zipf_exponent(ratio: float, n: int) -> float:
    """The Zipf exponent S whose ``n`` ranks have ``perplexity / n == ratio`` (0 < ratio <= 1;
    bisection): a Zipf fit to a tokenizer's measured codebook perplexity."""
    if not 0 < ratio <= 1:
        raise ValueError(f"perplexity ratio {ratio} must be in (0, 1]")

    def ratio_at(s: float) -> float:
        return perplexity(rank_probabilities(f"zipf:{s}", n)) / n

    lo, hi = 0.0, 8.0
    if ratio_at(hi) > ratio:
        raise ValueError(f"perplexity ratio {ratio} is below Zipf({hi})'s at {n} ranks: no fit")
    for _ in range(60):
        mid = (lo + hi) / 2
        if ratio_at(mid) > ratio:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def random_codes(
    shape: tuple[int, ...], K: int, dist: str, *, generator: torch.Generator
) -> torch.Tensor:
    """Codes in ``[1, K)`` (never 0) of ``shape``, drawn from ``dist`` (:func:`rank_probabilities`
    over the K - 1 codes, the ranks assigned to codes by a fixed permutation). ``zipf`` (Zipf(1))
    is a strong skew: at K = 16,384 its perplexity is 995 codes (6% of the codebook), where the
    one tokenizer measured here used 93% of its codebook in effect (Fashion-MNIST, perplexity
    955 of 1,024): ``zipf:0.3`` is that fit (``zipf_exponent``)."""
    device = generator.device
    if dist == "uniform":  # drawn as every earlier table's uniform ids were (the same ids)
        return torch.randint(1, K, shape, device=device, generator=generator)
    p = rank_probabilities(dist, K - 1).float().to(device)
    codes = torch.randperm(K - 1, device=device, generator=generator) + 1
    n = 1
    for x in shape:
        n *= x
    draw = torch.multinomial(p, n, replacement=True, generator=generator)
    return codes[draw].view(shape)


def mix_parser(doc: str, *, iters: int, ids_dist: str) -> argparse.ArgumentParser:
    """The arguments of the benchmarks of MoVE's kernels alone (``move_mix``, ``bank_grad``):
    ``--smoke``, the GPT-B shapes (batch, positions, heads, head width, layers, bank rows V,
    slots M), timed calls and id distributions; each adds its own."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--ids", type=int, default=16384 + 1001, help="bank rows V")
    p.add_argument("--slots", default="6,24")
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument(
        "--ids_dist", default=ids_dist, help=f"id distributions, comma-separated: {ID_DISTS}"
    )
    return p


def mix_device(args, smoke: tuple[int, ...]) -> torch.device:
    """The device :func:`mix_parser`'s ``args`` run on (the CPU with ``--smoke`` or without a
    GPU); with ``--smoke`` the shapes become ``smoke``: (batch, positions, heads, head width,
    layers, V, timed calls)."""
    if args.smoke:
        args.batch, args.seq, args.heads, args.head_dim, args.layers, args.ids, args.iters = smoke
    return torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, *, warmup: int, iters: int, device: torch.device) -> list[float]:
    """Milliseconds per call: CUDA events on GPU, perf_counter on CPU; after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def iqr(xs: list[float]) -> float:
    """The interquartile range: the spread of the middle half, which one outlier does not widen."""
    if len(xs) < 2:
        return float("nan")
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return q3 - q1


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """bf16 dense matmul rate measured here (random data, not zeros)."""
    if device.type != "cuda":
        n, iters = 512, 3
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    ms = median(time_fn(lambda: a @ b, warmup=3, iters=iters, device=device))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus written."""
    if device.type != "cuda":
        nbytes = 64 << 20
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    ms = median(time_fn(lambda: y.copy_(x), warmup=3, iters=10, device=device))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_table(rows: list[dict], cols: list[tuple[str, str, str]], title: str) -> None:
    """``cols``: (key, header, format)."""
    print(f"\n{title}")
    heads = [h for _, h, _ in cols]
    cells = [
        [
            (f.format(r[k]) if isinstance(r.get(k), (int, float)) else str(r.get(k, "-")))
            for k, _, f in cols
        ]
        for r in rows
    ]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)
    ]
    print("| " + " | ".join(h.rjust(w) for h, w in zip(heads, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(x.rjust(w) for x, w in zip(c, widths)) + " |")


def json_line(name: str, payload: dict) -> None:
    print("JSON " + json.dumps({"benchmark": name, **payload}))


def release(device: torch.device) -> None:
    """Free what the last benchmark row held (memory, compiled graphs) before the next one."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def load_llamagen(root: str | Path):
    """LlamaGen's ``gpt``, ``generate`` and ``vq_model`` modules, executed from the files of a
    checkout of FoundationVision/LlamaGen at ``root`` (outside this repository or the git-ignored
    ``.llamagen/``; nothing of it is copied, and nothing of it stays importable by name:
    ``gpt.py``'s ``utils.drop_path`` import is served only while it loads)."""
    import importlib.util
    import sys
    import types

    root = Path(root)
    if not (root / "autoregressive/models/gpt.py").is_file():
        raise FileNotFoundError(f"{root} is not a LlamaGen checkout (no autoregressive/models/gpt.py); "
                                "clone FoundationVision/LlamaGen and pass its folder")  # fmt: skip

    def load(rel: str, name: str):
        spec = importlib.util.spec_from_file_location(name, root / rel)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    vq = load("tokenizer/tokenizer_image/vq_model.py", "_llamagen_vq_model")
    drop = root / "utils/drop_path.py"
    dp = (
        load("utils/drop_path.py", "_llamagen_drop_path")
        if drop.is_file()
        else types.SimpleNamespace(DropPath=None)
    )
    utils = types.ModuleType("utils")
    utils.drop_path = dp
    saved = {k: sys.modules.get(k) for k in ("utils", "utils.drop_path")}
    sys.modules.update({"utils": utils, "utils.drop_path": dp})
    try:
        gpt = load("autoregressive/models/gpt.py", "_llamagen_gpt")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    gen = load("autoregressive/models/generate.py", "_llamagen_generate")
    return types.SimpleNamespace(gpt=gpt, generate=gen, vq=vq)


def profile_table(fn, device: torch.device, top: int, name_width: int = 70) -> str:
    """``fn()`` once under torch.profiler (CPU and, on a GPU, CUDA activity; synchronised): its ops
    by self time, GPU time where there is a GPU, as the profiler's table of the ``top`` rows."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=name_width)


def kernel_times(fn, device: torch.device, n: int = 1) -> dict[str, float]:
    """``fn()`` ``n`` times under torch.profiler: each GPU kernel (and memset or copy) by name ->
    its summed time in ms. Only the device's own events count -- not the CPU ops that launched
    them, nor annotations spanning them -- so the values add up to the GPU's busy time. Empty
    on the CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return {}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / 1e3 for e in prof.key_averages()
            if e.device_type != DeviceType.CPU and not e.is_user_annotation}  # fmt: skip
