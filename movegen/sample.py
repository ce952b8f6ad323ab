"""Sampling from a trained :class:`~movegen.model.GPT`: pure functions over its KV cache, and the
compiled step that makes them fast.

``prefill`` runs the class token, ``decode_step`` one code, ``generate`` the whole image.
Classifier-free guidance doubles the batch (conditional half, then the null-class half) and mixes
the logits as ``uncond + s * (cond - uncond)``; with ``cfg_scale == 1`` no doubling happens, so
it is exactly plain conditional sampling. Codes are chosen by the Gumbel-max trick from one
uniform draw per logit. All randomness comes from the passed ``torch.Generator``, or from a
:class:`SampleNoise` (a hash of seed, sample index, position and code: each image the same
whatever the batch size, the process or the device); the caller's tensors are never modified. Settings travel as one frozen :class:`SamplingSettings`.

:class:`CompiledStep` is the fast path of the same loop: it holds a cache and the step with its
choice of codes (``model.step`` + the CFG mix + the Gumbel-max choice), compiled by
``torch.compile``; on CUDA it captures the step, the write of the codes, their feedback as the next
input and the position's increment in one CUDA graph per guidance value, so a token costs the
host one replay (and, with noise from a generator, one draw; :class:`SampleNoise` is drawn inside
the step). It draws exactly the codes of the plain loop (same noise, same
ops; compiled kernels may round differently).

    ids (rows, 1), pos ──► model.step ──► logits (rows, K) ──► CFG mix ──► (B, K) ──► Gumbel-max
         ▲                                  rows = 2B with CFG, else B          u (B, K) ──┘   │
         └──────────── codes (B,) repeated for the null half; pos + 1 ◄──────────────────────┘
"""

from __future__ import annotations

import copy
import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from . import kernels
from .model import GPT, DecodeAttention, KVCache

StepMode = Literal["auto", "graph", "compiled", "eager"]
"""How :class:`CompiledStep` runs its step: ``graph`` compiles it and replays it from CUDA graphs
(CUDA only), ``compiled`` compiles it and calls it from Python, ``eager`` calls it as it is;
``auto`` is ``graph`` on CUDA and ``eager`` elsewhere (compiling on the CPU costs more than it
saves for the sizes sampled there)."""


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How codes are drawn; validated once here, so no sampler checks them again."""

    cfg_scale: float = 1.0
    """Classifier-free guidance scale s: ``uncond + s * (cond - uncond)``; 1 = plain conditional
    sampling (no batch doubling)."""
    cfg_interval: tuple[int, int] | None = None
    """Guide only code positions ``a <= t < b`` (the batch stays doubled so the cache is
    consistent); None: every position."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (no noise drawn)."""
    top_k: int = 0
    """Keep only the k most likely codes; 0 = off."""
    top_p: float = 1.0
    """Keep the smallest set of codes whose probability reaches p; 1 = off."""
    bf16: bool = True
    """On CUDA: bf16 autocast, and bf16 weights and cache on the compiled step. Ignored on the CPU."""

    def __post_init__(self):
        if not isinstance(self.cfg_scale, (int, float)) or not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale!r}")
        if self.cfg_interval is not None:
            pair = isinstance(self.cfg_interval, (tuple, list)) and len(self.cfg_interval) == 2
            if not pair or not all(isinstance(x, int) for x in self.cfg_interval):
                raise ValueError(
                    f"cfg_interval must be two integers (a, b), got {self.cfg_interval!r}"
                )
            lo, hi = self.cfg_interval
            if not 0 <= lo <= hi:
                raise ValueError(
                    f"cfg_interval (a, b) must have 0 <= a <= b (guidance on positions a <= t < b), "
                    f"got ({lo}, {hi})"
                )
            object.__setattr__(self, "cfg_interval", (lo, hi))  # a list from a config: a tuple
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be finite, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")

    @property
    def doubled(self) -> bool:
        """Whether the batch is doubled for guidance (``cfg_scale != 1``)."""
        return self.cfg_scale != 1.0

    def guided(self, t: int) -> bool:
        """Whether code position ``t`` is guided."""
        if not self.doubled:
            return False
        return self.cfg_interval is None or self.cfg_interval[0] <= t < self.cfg_interval[1]


def _autocast(device: torch.device, enabled: bool = True):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------- the choice of codes


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
    u = _noise(logits.shape, generator, logits.device)
    return pick(logits, u, temperature, top_k, top_p)


def _noise(shape, generator: torch.Generator | None, device, out: torch.Tensor | None = None):
    """The uniform draw of one token step, ``(B, K)`` from a generator (its state depends on
    everything drawn before: see :class:`SampleNoise` for noise that does not)."""
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32, out=out)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), in 16-bit halves so nothing overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xor-shift-multiply, two rounds) of int64 ``x`` in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash32_int(x: int) -> int:
    """:func:`_hash32` of one Python int (no device copy for the per-step key)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=8)
def _code_hashes(K: int, device: torch.device) -> torch.Tensor:
    """The per-code half of :class:`SampleNoise`'s key, ``(K,)``: the same at every step, so made
    once per vocabulary and device rather than at every token."""
    return _hash32(torch.arange(K, device=device, dtype=torch.long) * 0x9E37 + 0x632B)


@dataclass(frozen=True)
class SampleNoise:
    """Counter-based noise: the uniform draw of sample ``i`` at code position ``t`` for code ``k``
    is a hash of ``(seed, i, t, k)``, so each image depends only on the seed and its own index,
    never on the batch size, the batch it lands in, the process or the device (integer
    arithmetic: bit-identical on the CPU and a GPU). Uniforms have 24 bits, in (0, 1)."""

    seed: int

    def key(self, t: int) -> int:
        """The (seed, position) half of the key, on the host."""
        return _hash32_int((self.seed * 0x9E3779B1 + t * 0x85EBCA77) & _M32)

    @staticmethod
    def rows(index: torch.Tensor) -> torch.Tensor:
        """The per-sample half of the key, ``(B,)`` int64: the same at every position."""
        return _hash32(index.long() & _M32)

    @staticmethod
    def draw(rows: torch.Tensor, key: int | torch.Tensor, K: int) -> torch.Tensor:
        """``(B, K)`` uniforms from :meth:`rows` and a position's :meth:`key` (an int, or an int64
        tensor of one element: how a captured step reads its position's key)."""
        x = _hash32(_hash32(rows ^ key)[:, None] ^ _code_hashes(K, rows.device)[None, :])
        return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))

    def uniform(
        self, index: torch.Tensor, t: int, K: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(B, K)`` float32 uniforms for samples ``index (B,)`` (int64) at position ``t``."""
        u = self.draw(self.rows(index), self.key(t), K)
        if out is not None:
            return out.copy_(u)
        return u


def pick(
    logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
):
    """Gumbel-max choice given uniform noise ``u`` (same shape as ``logits``)."""
    z = filter_logits(logits.float() / temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    return (z + gumbel).argmax(-1)


def choose(
    logits: torch.Tensor, u: torch.Tensor | None, settings: SamplingSettings, guided: bool
) -> torch.Tensor:
    """The codes of one step: next-code logits ``(rows, K)`` (doubled with CFG) and uniform noise
    ``u (B, K)`` (unused when greedy) -> codes ``(B,)``. The CFG mix happens here, on ``guided``
    steps; unguided steps of a doubled batch take the conditional half."""
    if settings.doubled:
        cond, uncond = logits.chunk(2)  # (B, K) each
        logits = uncond + settings.cfg_scale * (cond - uncond) if guided else cond
    if settings.temperature <= 0:
        return logits.argmax(-1)
    return pick(logits, u, settings.temperature, settings.top_k, settings.top_p)


# --------------------------------------------------------------------------- pure functions


def _class_ids(model: GPT, labels: torch.Tensor, doubled: bool) -> torch.Tensor:
    """Position 0's unified ids ``(rows, 1)``: ``K + label``, then (CFG) ``K + null``."""
    if doubled:
        labels = torch.cat([labels, torch.full_like(labels, model.config.null_class)])
    return (labels + model.config.vocab_size)[:, None]


def prefill(model: GPT, labels: torch.Tensor, cache: KVCache, *, cfg: bool = False) -> torch.Tensor:
    """Run the class token(s). ``labels (B,)``; with ``cfg`` the cache holds ``2B`` rows (labels,
    then the null class). Returns logits for the first code, ``(B, K)`` or ``(2B, K)``."""
    return model.step(_class_ids(model, labels, cfg), cache.positions[:1], cache)[:, -1]


def decode_step(model: GPT, tokens: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
    """Feed codes ``tokens (B,)`` at input position ``pos`` (>= 1); returns next-code logits ``(B, K)``."""
    return model.step(tokens[:, None], cache.positions[pos : pos + 1], cache)[:, -1]


def _check_labels(model: GPT, labels: torch.Tensor) -> None:
    C = model.config.num_classes
    if labels.ndim != 1 or len(labels) == 0 or labels.min() < 0 or labels.max() > C:
        raise ValueError(f"labels must be (B,) in [0, {C}] ({C} = unconditional)")


@torch.no_grad()
def generate(
    model: GPT,
    labels: torch.Tensor,
    settings: SamplingSettings | None = None,
    *,
    generator: torch.Generator | None = None,
    step: CompiledStep | None = None,
    noise: SampleNoise | None = None,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample codes ``(B, T)`` for ``labels (B,)`` (``num_classes`` = unconditional).

    ``settings`` default to ``SamplingSettings()`` (no guidance, temperature 1). Noise comes from
    ``noise`` (a :class:`SampleNoise`, for samples ``index (B,)``, default ``0..B-1``) when given,
    else from ``generator``. ``step``: a :class:`CompiledStep` of this model, batch and settings
    for the fast path; it draws the same codes from the same noise as this plain loop."""
    settings = settings or SamplingSettings()
    if model.training:
        raise RuntimeError("generate() needs model.eval()")
    labels = labels.to(model.head.weight.device)
    _check_labels(model, labels)
    if noise is not None and index is None:
        index = torch.arange(len(labels), device=labels.device)
    if index is not None:
        index = index.to(labels.device)
        if index.shape != labels.shape:
            raise ValueError(
                f"index must give one sample index per label, got {tuple(index.shape)}"
            )
    if step is not None:
        step.check(model, len(labels), settings)
        return step.sample(labels, generator, noise=noise, index=index)
    B, T = len(labels), model.config.seq_len
    rows = 2 * B if settings.doubled else B
    K = model.config.vocab_size
    with _autocast(labels.device, settings.bf16):
        cache = model.new_cache(rows)
        out = torch.empty(B, T, dtype=torch.long, device=labels.device)
        logits = prefill(model, labels, cache, cfg=settings.doubled)
        for t in range(T):
            u = None
            if settings.temperature > 0:
                u = (
                    noise.uniform(index, t, K)
                    if noise
                    else _noise((B, K), generator, labels.device)
                )
            tok = choose(logits, u, settings, settings.guided(t))
            out[:, t] = tok
            if t + 1 < T:
                logits = decode_step(model, tok.repeat(rows // B), t + 1, cache)
    return out


# --------------------------------------------------------------------------- the fast path


class CompiledStep:
    """The decoding step of one model for ``batch_size`` images and one :class:`SamplingSettings`,
    made fast: a :class:`KVCache` of its own, the step with its choice of codes compiled once per
    guidance value, and (``mode="graph"``) CUDA graphs that replay step and bookkeeping.

    On CUDA with ``settings.bf16`` it decodes with a bf16 copy of the model made once here (RoPE
    tables kept in fp32), so no step casts a weight; the cache's fused QKV/router weights are
    another snapshot. Make a new step after the model's weights change. ``attention`` and
    ``launch`` go to the cache (:class:`~movegen.model.KVCache`)."""

    def __init__(self, model: GPT, batch_size: int, settings: SamplingSettings, *,
                 mode: StepMode = "auto", attention: DecodeAttention = "auto",
                 launch: kernels.DecodeLaunch | None = None):  # fmt: skip
        if model.training:
            raise RuntimeError("CompiledStep needs model.eval()")
        dev = self.device = model.head.weight.device
        if mode == "auto":
            mode = "graph" if dev.type == "cuda" else "eager"
        if mode not in ("graph", "compiled", "eager"):
            raise ValueError(f"mode must be 'auto', 'graph', 'compiled' or 'eager', got {mode!r}")
        if mode == "graph" and dev.type != "cuda":
            raise ValueError("mode='graph' needs a CUDA device; use 'compiled' or 'eager'")
        self.mode, self.settings, self.batch_size, self.source = mode, settings, batch_size, model
        self.model = model
        if dev.type == "cuda" and settings.bf16 and model.head.weight.dtype != torch.bfloat16:
            self.model = copy.deepcopy(model).to(torch.bfloat16)
            self.model.rope_cos, self.model.rope_sin = model.rope_cos, model.rope_sin  # fp32
        cfg = model.config
        self.rows = 2 * batch_size if settings.doubled else batch_size
        self.cache = self.model.new_cache(self.rows, attention=attention, launch=launch)
        # the state a replay reads and advances: next ids, position, noise, the codes so far
        self.ids = torch.zeros(self.rows, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.u = torch.zeros(batch_size, cfg.vocab_size, device=dev)
        self.out = torch.zeros(batch_size, cfg.seq_len, dtype=torch.long, device=dev)
        # SampleNoise's state, read inside the step: each sample's row hash, each position's key
        self.noise_rows = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.noise_keys = torch.zeros(cfg.seq_len, dtype=torch.long, device=dev)
        self._fns: dict = {}  # (guided, counter) -> step and choice (compiled unless eager)
        self.graphs: dict[tuple[bool, bool], torch.cuda.CUDAGraph] = {}

    def check(self, model: GPT, batch_size: int, settings: SamplingSettings) -> None:
        """Raise unless this step serves ``model``, ``batch_size`` images and ``settings``."""
        if model is not self.source or batch_size != self.batch_size or settings != self.settings:
            raise ValueError(
                f"this CompiledStep was made for {self.batch_size} images with {self.settings} "
                f"(of its model); this call has {batch_size} with {settings}: make a step for it"
            )

    def step_choose(self, ids: torch.Tensor, pos: torch.Tensor, u: torch.Tensor, guided: bool,
                    counter: bool = False):  # fmt: skip
        """One decoding step and the choice of its codes: ``ids (rows, 1)`` at position ``pos
        (1,)`` and noise ``u (B, K)`` -> codes ``(B,)`` and the next step's ids ``(rows, 1)``
        (the codes repeated for the null half). ``counter``: the noise is drawn here, from the
        :class:`SampleNoise` state (``self.noise_rows``, ``self.noise_keys`` at ``pos``), fused into
        the choice (``u`` unused)."""
        logits = self.model.step(ids, pos, self.cache)[:, -1]  # (rows, K)
        if counter:
            u = SampleNoise.draw(self.noise_rows, self.noise_keys[pos], logits.shape[-1])
        tok = choose(logits, u, self.settings, guided)
        return tok, tok.repeat(self.rows // self.batch_size)[:, None]

    def _fn(self, guided: bool, counter: bool):
        """:meth:`step_choose` for one value of ``guided`` and of ``counter``, compiled once
        (unless eager)."""
        if (guided, counter) not in self._fns:
            fn = lambda ids, pos, u: self.step_choose(ids, pos, u, guided, counter)
            if self.mode != "eager":
                fn = torch.compile(fn, fullgraph=True, dynamic=False)
            self._fns[guided, counter] = fn
        return self._fns[guided, counter]

    def _advance(self, fn) -> None:
        """One token: the step and choice, the codes written at ``pos`` and fed back, ``pos + 1``
        (all on the device, so a CUDA graph captures all of it)."""
        tok, nxt = fn(self.ids, self.pos, self.u)
        self.out.index_copy_(1, self.pos, tok[:, None])
        self.ids.copy_(nxt)
        self.pos.add_(1)

    def _capture(self, guided: bool, counter: bool) -> None:
        """Capture :meth:`_advance` for ``guided`` and ``counter`` once. Its warm-up runs change
        the state (and write cache position 0): call before the state is set for a generation."""
        if (guided, counter) in self.graphs:
            return
        fn = self._fn(guided, counter)
        side = torch.cuda.Stream(self.device)  # compile and warm up off the capture
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.pos.zero_()  # (a position inside the cache, whatever seq_len is)
                self._advance(fn)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            self._advance(fn)
        self.graphs[guided, counter] = graph

    @torch.no_grad()
    def sample(
        self, labels: torch.Tensor, generator: torch.Generator | None = None, *,
        noise: SampleNoise | None = None, index: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Codes ``(B, T)`` for ``labels (B,)`` (checked by :func:`generate`, the public entry)."""
        s, T = self.settings, self.model.config.seq_len
        counter = s.temperature > 0 and noise is not None  # noise drawn inside the step
        needed = {s.guided(t) for t in range(T)}
        with _autocast(self.device, s.bf16):
            if self.mode == "graph":  # capture what these settings need before setting the state
                for g in needed:
                    self._capture(g, counter)
            self.ids.copy_(_class_ids(self.model, labels, s.doubled))
            self.pos.zero_()
            if counter:
                self.noise_rows.copy_(SampleNoise.rows(index))
                keys = torch.tensor([noise.key(t) for t in range(T)], dtype=torch.long)
                self.noise_keys.copy_(keys)
            for t in range(T):
                if s.temperature > 0 and not counter:
                    _noise(self.u.shape, generator, self.device, out=self.u)
                if self.mode == "graph":
                    self.graphs[s.guided(t), counter].replay()
                else:
                    self._advance(self._fn(s.guided(t), counter))
        return self.out.clone()


DECODE_BATCH = 256
"""Images decoded at once by :func:`generate_images`: LlamaGen's VQ-16 decoder in fp32 ran out of
memory on an H200 (139 GiB) with 1,024 images of 256 x 256 at once."""


def generate_images(
    model: GPT,
    decode,
    labels: torch.Tensor,
    settings: SamplingSettings | None = None,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = False,
    grid: tuple[int, int] | None = None,
    fast: bool | None = None,
    noise: SampleNoise | None = None,
    first_index: int = 0,
    decode_batch_size: int | None = DECODE_BATCH,
    transform=None,
    overlap: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample codes for ``labels`` in batches and decode them with ``decode(codes (B, h, w))``,
    at most ``decode_batch_size`` at a time (None: a whole batch; a decoder runs in fp32 and
    holds far more activations per image than the sampler). Returns ``(images (N, C, H, W) on
    the CPU, codes (N, T))``: float images, or what ``transform`` makes of each decoded part on
    the device (e.g. a crop and uint8, a quarter of float32's host memory at 50,000 images).
    ``fast`` (default: on CUDA): one :class:`CompiledStep` per batch size (the last batch may be
    smaller; with ``noise`` it is padded to the batch size instead, so one step serves the whole
    run). With ``noise``, label ``j`` is sample ``first_index + j`` whatever the batch size (a
    shard of a larger evaluation passes its offset).

    ``overlap`` (CUDA only, off by default): each batch is decoded on a second CUDA stream while
    the next batch is sampled, its images brought to the host once that next batch is sampled;
    the sampling runs on a stream of higher priority, so its small kernels go first wherever
    both wait for the GPU. The images are those of the serial order (the same kernels on the
    same inputs); ``decode`` and ``transform`` must not synchronise the whole device (a decoder
    checking its codes on the host, as ``VQTokenizer.lookup`` does, waits for the parts before
    it when a batch is decoded in several). Not yet measured: the one timing so far (an H100,
    ``benchmarks/RESULTS.md`` 2026-12-08) was serialised by the benchmark's own
    synchronisation before every batch."""
    from tqdm.auto import tqdm

    settings = settings or SamplingSettings()
    cfg = model.config
    h, w = grid or (cfg.grid_h, cfg.grid_w)
    images, codes = [], []
    steps: dict[int, CompiledStep] = {}
    cuda = labels.device.type == "cuda"
    fast = cuda if fast is None else fast
    if overlap and not cuda:
        raise ValueError(
            "overlap=True needs labels on a CUDA device (it decodes on a second stream)"
        )
    # (a lower number is a higher priority; the decoding stream keeps the default)
    side = torch.cuda.Stream(labels.device) if overlap else None
    first = torch.cuda.Stream(labels.device, priority=-1) if overlap else None
    pending: list[tuple[torch.cuda.Event, list[torch.Tensor]]] = []

    def collect() -> None:  # the decoded parts of the earlier batch, to the host
        for done, parts in pending:
            done.synchronize()
            images.extend(p.cpu() for p in parts)
        pending.clear()

    def decoded(c: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for part in c.view(len(c), h, w).split(decode_batch_size or len(c)):
            x = decode(part)
            out.append(transform(x) if transform is not None else x.float())
        return out

    try:
        start = first_index
        for chunk in tqdm(
            labels.split(batch_size), desc="sample", disable=not progress, unit="batch"
        ):
            n = len(chunk)
            if fast and noise is not None and n < batch_size and batch_size in steps:
                # a short last batch runs on the full batch's step, padded with samples it throws
                # away (each sample's noise is its own: the padding changes no other image), rather
                # than compiling and capturing a step of its own
                chunk = torch.cat([chunk, chunk[:1].expand(batch_size - n)])
            index = torch.arange(start, start + len(chunk), device=chunk.device) if noise else None
            start += n
            step = None
            if fast:
                if len(chunk) not in steps:
                    collect()  # nothing decoding beside a step's compilation and capture
                    steps[len(chunk)] = CompiledStep(model, len(chunk), settings)
                step = steps[len(chunk)]
            if first is not None:
                first.wait_stream(torch.cuda.current_stream(chunk.device))
            with torch.cuda.stream(first) if first is not None else nullcontext():
                c = generate(
                    model, chunk, settings, generator=generator, step=step, noise=noise, index=index
                )[:n]
                codes.append(c.cpu())  # (waits for this batch's tokens)
            collect()  # the earlier batch, decoded while this one was sampled
            if side is None:
                images.extend(p.cpu() for p in decoded(c))
                continue
            side.wait_stream(first)
            with torch.cuda.stream(side):
                parts = decoded(c)
            c.record_stream(side)  # (made on the sampler's stream, read on this one)
            pending.append((side.record_event(), parts))
        collect()
    finally:  # (also on an error) later work on this stream waits for both streams' work
        if overlap:
            cur = torch.cuda.current_stream(labels.device)
            cur.wait_stream(first)
            cur.wait_stream(side)
    return torch.cat(images), torch.cat(codes)


__all__ = [
    "CompiledStep",
    "SampleNoise",
    "SamplingSettings",
    "StepMode",
    "choose",
    "decode_step",
    "filter_logits",
    "generate",
    "generate_images",
    "prefill",
    "sample_logits",
]
