"""Sampling from a trained :class:`~movegen.model.GPT`: pure functions over its KV cache.

``prefill`` runs the class token, ``decode_step`` one code, ``generate`` the whole image.
Classifier-free guidance doubles the batch (conditional half, then the null-class half) and mixes
the logits as ``uncond + s * (cond - uncond)``; with ``cfg_scale == 1`` no doubling happens, so
it is exactly plain conditional sampling. All randomness comes from the passed ``torch.Generator``;
the caller's tensors are never modified.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .model import GPT, KVCache, StaticDecoder


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How codes are drawn."""

    cfg_scale: float = 1.0
    """Classifier-free guidance scale: uncond + s * (cond - uncond); 1 = no guidance."""
    cfg_interval: tuple[int, int] | None = None
    """Guide only code positions a <= t < b (null: all)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_k: int = 0
    """Keep the k most likely codes (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of codes whose probability reaches p (1 = all)."""

    def __post_init__(self):
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale}")
        if self.cfg_interval is not None:
            lo, hi = self.cfg_interval
            if not 0 <= lo < hi:
                raise ValueError(f"cfg_interval must be (a, b) with 0 <= a < b, got {self.cfg_interval}")


def _autocast(device: torch.device, enabled: bool = True):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and outside the smallest set whose
    probability reaches top-p; always keeps the most likely token. ``logits (B, K)``."""
    out = logits
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(out, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``logits (B, K)`` -> tokens ``(B,)``; temperature 0 means greedy.

    Draws by the Gumbel-max trick, ``argmax(logits / temperature + Gumbel noise)``, which samples
    exactly from ``softmax(logits / temperature)`` (after top-k/top-p) with one uniform draw per
    logit from ``generator``: no host sync, and the same draw on every code path."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    return pick(logits, u, temperature, top_k, top_p)


def pick(
    logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
):
    """Gumbel-max choice given uniform noise ``u`` (same shape as ``logits``)."""
    z = filter_logits(logits.float() / temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    return (z + gumbel).argmax(-1)


def _guide(logits: torch.Tensor, cfg_scale: float, guided: bool) -> torch.Tensor:
    """Doubled-batch logits ``(2B, K)`` -> ``(B, K)``."""
    cond, uncond = logits.chunk(2)
    return uncond + cfg_scale * (cond - uncond) if guided else cond


def prefill(model: GPT, labels: torch.Tensor, cache: KVCache, *, cfg: bool = False) -> torch.Tensor:
    """Run the class token(s). ``labels (B,)``; with ``cfg`` the cache holds ``2B`` rows (labels,
    then the null class). Returns logits for the first code, ``(B, K)`` or ``(2B, K)``."""
    K = model.config.vocab_size
    if cfg:
        labels = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
    return model.step((labels + K)[:, None], 0, cache)[:, -1]


def decode_step(model: GPT, tokens: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
    """Feed codes ``tokens (B,)`` at input position ``pos`` (>= 1); returns next-code logits ``(B, K)``."""
    return model.step(tokens[:, None], pos, cache)[:, -1]


@torch.no_grad()
def generate(
    model: GPT,
    labels: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[int, int] | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    bf16: bool = True,
    decoder: StaticDecoder | None = None,
) -> torch.Tensor:
    """Sample codes ``(B, T)`` for ``labels (B,)`` (``num_classes`` = unconditional).

    ``cfg_interval=(a, b)`` applies guidance only to code positions ``a <= t < b`` (the batch
    stays doubled so the cache is consistent). bf16 autocast on CUDA when ``bf16``.
    ``decoder``: a :class:`StaticDecoder` (see :func:`make_decoder`) for the fast path, a
    fixed-shape step that a CUDA graph can replay; its batch must be ``2B`` with CFG, else ``B``.
    """
    cfg = model.config
    if model.training:
        raise RuntimeError("generate() needs model.eval()")
    labels = labels.to(model.head.weight.device)
    if labels.ndim != 1 or labels.min() < 0 or labels.max() > cfg.num_classes:
        raise ValueError(
            f"labels must be (B,) in [0, {cfg.num_classes}] ({cfg.num_classes} = unconditional)"
        )
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"bad sampling settings: temperature {temperature}, top_k {top_k}, top_p {top_p}"
        )
    use_cfg = cfg_scale != 1.0
    B, T = len(labels), cfg.seq_len
    lo, hi = cfg_interval if cfg_interval is not None else (0, T)
    rows = 2 * B if use_cfg else B
    if decoder is not None:
        if decoder.source[0] is not model or decoder.batch_size != rows:
            raise ValueError(
                f"decoder was made for batch {decoder.batch_size}; this call needs {rows} rows"
            )
        return _generate_static(decoder, labels, use_cfg, cfg_scale, (lo, hi), temperature, top_k, top_p,
                                generator, bf16)  # fmt: skip
    with _autocast(labels.device, bf16):
        cache = model.new_cache(rows)
        out = torch.empty(B, T, dtype=torch.long, device=labels.device)
        logits = prefill(model, labels, cache, cfg=use_cfg)
        for t in range(T):
            if use_cfg:
                logits = _guide(logits, cfg_scale, lo <= t < hi)
            tok = sample_logits(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            out[:, t] = tok
            if t + 1 < T:
                feed = torch.cat([tok, tok]) if use_cfg else tok
                logits = decode_step(model, feed, t + 1, cache)
    return out


def make_decoder(model: GPT, batch_size: int, *, cfg: bool = True, compile: bool | None = None,
                 attention: str = "auto") -> StaticDecoder:  # fmt: skip
    """A :class:`StaticDecoder` for ``batch_size`` images (``2 * batch_size`` cache rows with CFG),
    compiled and captured in CUDA graphs on GPU unless ``compile=False``; ``attention``: 'fused'
    (one Triton launch per layer; what 'auto' picks where the kernels run), 'sdpa' or 'math'."""
    dev = model.head.weight.device
    dtype = torch.bfloat16 if dev.type == "cuda" else None
    dec = StaticDecoder(
        model, 2 * batch_size if cfg else batch_size, dtype=dtype, attention=attention
    )
    if compile if compile is not None else dev.type == "cuda":
        dec.compile()
    return dec


def _generate_static(
    dec, labels, use_cfg, cfg_scale, interval, temperature, top_k, top_p, generator, bf16
):
    model = dec.model
    cfg = model.config
    B, T, K = len(labels), cfg.seq_len, cfg.vocab_size
    lo, hi = interval
    cond = labels + K
    ids = torch.cat([cond, torch.full_like(cond, K + cfg.null_class)]) if use_cfg else cond
    ids = ids[:, None]
    out = torch.empty(B, T, dtype=torch.long, device=labels.device)

    def make_post(guided: bool):
        def post(logits, u):
            if use_cfg:
                logits = _guide(logits, cfg_scale, guided)
            if temperature <= 0:
                return logits.argmax(-1)
            return pick(logits, u, temperature, top_k, top_p)

        return post

    settings = (use_cfg, cfg_scale, temperature, top_k, top_p, bf16)
    guided = {lo <= t < hi for t in range(T)}
    steps = {g: dec.picker((*settings, g), make_post(g)) for g in guided}
    if dec.compiled and dec.mode == "graph" and labels.is_cuda:
        with _autocast(labels.device, bf16):
            run = dec.graphs.get(settings) or dec.graphs.setdefault(settings, _StepGraphs(dec, B))
            for g, fn in steps.items():  # capture what this interval needs before the state is set
                run.capture(g, fn)
            run.ids.copy_(ids)
            run.pos.zero_()
            for t in range(T):
                torch.rand(B, K, generator=generator, device=labels.device, out=run.u)
                run.graphs[lo <= t < hi].replay()
        return run.out.clone()
    with _autocast(labels.device, bf16):
        for t in range(T):
            if dec.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            u = torch.rand(B, K, generator=generator, device=labels.device, dtype=torch.float32)
            tok, nxt = steps[lo <= t < hi](ids, dec.positions[t : t + 1], u)
            out[:, t] = tok
            ids = nxt.clone()  # the graph's output buffer is reused by the next replay
    return out


class _StepGraphs:
    """Decoding steps captured in CUDA graphs, one per value of ``guided``: the step, the choice
    of the codes, their write into ``out`` and their feedback as the next input, and the
    position's increment. Static buffers carry the state between replays, so a token costs the
    host one noise draw (into ``u``) and one replay."""

    def __init__(self, dec: StaticDecoder, n_images: int):
        dev = self.device = dec.positions.device
        T, K = dec.model.config.seq_len, dec.model.config.vocab_size
        self.ids = torch.zeros(dec.batch_size, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.u = torch.rand(n_images, K, device=dev)
        self.out = torch.zeros(n_images, T, dtype=torch.long, device=dev)
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}

    def capture(self, guided: bool, fn) -> None:
        """Capture the step ``fn`` (``step_pick`` bound to its choice) for ``guided`` once. Its
        warm-up runs change the buffers: call before setting them for a generation."""
        if guided in self.graphs:
            return

        def body():
            tok, nxt = fn(self.ids, self.pos, self.u)
            self.out.index_copy_(1, self.pos, tok[:, None])
            self.ids.copy_(nxt)
            self.pos.add_(1)

        side = torch.cuda.Stream(self.device)  # compile and warm up off the capture
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.pos.zero_()  # (a position inside the cache, whatever seq_len is)
                body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            body()
        self.graphs[guided] = graph


def generate_images(
    model: GPT,
    decode,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = False,
    grid: tuple[int, int] | None = None,
    fast: bool | None = None,
    **settings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample codes for ``labels`` in batches and decode them with ``decode(codes (B, h, w))``.
    Returns ``(images (N, C, H, W) on the CPU, codes (N, T))``. ``settings`` go to :func:`generate`."""
    from tqdm.auto import tqdm

    cfg = model.config
    h, w = grid or (cfg.grid_h, cfg.grid_w)
    images, codes = [], []
    use_cfg = settings.get("cfg_scale", 1.0) != 1.0
    decoders: dict[int, StaticDecoder] = {}
    fast = labels.device.type == "cuda" if fast is None else fast
    for chunk in tqdm(labels.split(batch_size), desc="sample", disable=not progress, unit="batch"):
        dec = None
        if fast:  # one CUDA-graph decoder per batch size (the last chunk may be smaller)
            dec = decoders.get(len(chunk)) or decoders.setdefault(
                len(chunk), make_decoder(model, len(chunk), cfg=use_cfg)
            )
        c = generate(model, chunk, generator=generator, decoder=dec, **settings)
        codes.append(c.cpu())
        images.append(decode(c.view(len(c), h, w)).float().cpu())
    return torch.cat(images), torch.cat(codes)


__all__ = [
    "decode_step",
    "generate_images",
    "filter_logits",
    "generate",
    "prefill",
    "sample_logits",
]
