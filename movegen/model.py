"""The class-conditional AR transformer over VQ codes (LlamaGen-style) with a value-memory option.

Sequence layout: input position 0 holds the class token, positions 1..T-1 hold ``codes[:, :T-1]``;
output position t predicts ``codes[:, t]``. Ids share one space (see ``move.py``): codes are
``0..K-1``, class c is ``K + c``, the null (unconditional) class is ``K + C``.

Blocks are pre-norm (RMSNorm), attention with 2-D RoPE over the h x w grid (identity rotation on
the class prefix) through ``scaled_dot_product_attention``, SwiGLU MLP (hidden rounded up to a
multiple of 256), no biases, untied zero-initialised output head. ``memory`` picks the value
path: ``none``, ``lave`` (layer-wise tables) or ``move`` (one global bank, see ``move.py``).

Decoding has one cache type and one loop: :class:`KVCache` (static buffers, so that one CUDA graph
replays a step at every position; it stores the *mixed* values) and :meth:`GPT.step`, which runs
the same :class:`Block` / :class:`Attention` modules as the full forward. The fused one-launch
Triton layer (``kernels.decode_attn``) is an option of that loop (``KVCache(attention=...)``).
The sampler (``movegen.sample``) builds on these and owns compilation and CUDA graphs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .move import (
    LaVETable,
    MoVEBank,
    drop_memory_gates,
    gates_from_logits,
    gather_rows,
    lave_layers,
    mix,
    mix_tapped,
    move_slots,
    rope_attn_mix_tapped,
)

MEMORY_KINDS = ("none", "lave", "move")


@dataclass(kw_only=True)
class GPTConfig:
    """Size, vocabulary and value-memory options of the AR model."""

    vocab_size: int = 1024
    """K: codebook size of the tokenizer."""
    num_classes: int = 10
    """C: number of classes (the null class is added on top)."""
    seq_len: int = 64
    """T: image tokens per sample (h * w)."""
    grid_h: int = 0
    """Token grid height for 2-D RoPE (0: sqrt(seq_len))."""
    n_layer: int = 8
    """Transformer blocks."""
    n_head: int = 8
    """Attention heads."""
    n_embd: int = 512
    """Model width d."""
    mlp_multiple_of: int = 256
    """SwiGLU hidden size is 8/3 d rounded up to a multiple of this."""
    memory: Literal["none", "lave", "move"] = "none"
    """Value path: 'none' (standard), 'lave' (layer-wise tables) or 'move' (global bank)."""
    memory_density: float = 1
    """k in 'xk': MoVE gets k * n_layer / 2 slots; LaVE 1 = every other layer, 2 = every layer."""
    gate_standard_path: bool | None = None
    """Gate the standard value path too (g0). None: on for MoVE, off for LaVE (as in the paper)."""
    memory_dropout: float = 0.0
    """Dropout on the retrieved memory (MoVE slots, LaVE tables): in training, each memory gate
    (per token, head and slot) is zeroed with this probability and the others scaled by
    1 / (1 - p); the standard path's gate g0 is never dropped. 0 disables it."""
    resid_dropout: float = 0.1
    """Dropout on the attention output projection."""
    ffn_dropout: float = 0.1
    """Dropout on the MLP output."""
    attn_dropout: float = 0.0
    """Dropout on attention weights."""
    token_dropout: float = 0.1
    """Dropout on the input embeddings."""
    class_dropout: float = 0.1
    """Probability that a training label is replaced by the null class (classifier-free guidance)."""
    rope_base: float = 10000.0
    """RoPE base."""
    prefix_rope: Literal["identity", "zero"] = "identity"
    """Rotation of the class position's queries and keys: 'identity' (ours: unrotated) or
    'zero' (cos = sin = 0, which zeroes them: the class key scores 0 with every query). 'zero'
    exists for models converted from LlamaGen, whose RoPE table pads the class prefix with zeros;
    leave it at 'identity' for models trained here."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal init of linear layers, embeddings, the bank and LaVE tables."""

    def __post_init__(self):
        if self.prefix_rope not in ("identity", "zero"):
            raise ValueError(f"prefix_rope must be 'identity' or 'zero', got {self.prefix_rope!r}")
        if self.memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {self.memory!r}")
        for name in (
            "memory_dropout",
            "resid_dropout",
            "ffn_dropout",
            "token_dropout",
            "attn_dropout",
        ):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.class_dropout <= 1.0:  # 1: every label dropped (an unconditional model)
            raise ValueError(f"class_dropout must be in [0, 1], got {self.class_dropout}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {self.head_dim}")
        if self.memory == "none":
            unused = [f"memory_density {self.memory_density}"] if self.memory_density != 1 else []
            unused += ["gate_standard_path true"] if self.gate_standard_path else []
            unused += [f"memory_dropout {self.memory_dropout}"] if self.memory_dropout else []
            if unused:
                warnings.warn(f"ignored: {' and '.join(unused)} (memory is 'none'; only memory 'lave' "
                              "or 'move' uses them)", stacklevel=3)  # fmt: skip
        if self.gate_standard_path is None:
            self.gate_standard_path = self.memory == "move"
        if self.grid_h == 0:
            self.grid_h = int(math.isqrt(self.seq_len))
        if self.grid_h * self.grid_w != self.seq_len:
            raise ValueError(
                f"seq_len {self.seq_len} is not a grid of height {self.grid_h}; set grid_h"
            )
        if self.memory == "move":
            move_slots(self.n_layer, self.memory_density)  # validates
        if self.memory == "lave":
            if self.memory_density not in (1, 2):
                raise ValueError(f"LaVE memory_density must be 1 or 2, got {self.memory_density}")

    head_dim = property(lambda self: self.n_embd // self.n_head)
    grid_w = property(lambda self: self.seq_len // self.grid_h)
    num_ids = property(lambda self: self.vocab_size + self.num_classes + 1)
    null_class = property(lambda self: self.num_classes)

    @property
    def mlp_hidden(self) -> int:
        h = int(2 * 4 * self.n_embd / 3)
        return self.mlp_multiple_of * math.ceil(h / self.mlp_multiple_of)

    @property
    def slots(self) -> int:
        """MoVE slots M (0 for other memory kinds)."""
        return move_slots(self.n_layer, self.memory_density) if self.memory == "move" else 0

    @property
    def memory_layers(self) -> list[int]:
        if self.memory == "lave":
            return lave_layers(self.n_layer, int(self.memory_density))
        return list(range(self.n_layer)) if self.memory == "move" else []

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """A named size (``tiny``, ``S``, ``B``, ``L``, ``XL``) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------- helpers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_2d(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``(T, D/2)`` for the input positions: position 0 (class) gets the
    identity rotation (or cos = sin = 0 with ``prefix_rope='zero'``); position t >= 1 holds grid
    cell t-1 (row-major). The first half of the head's pairs rotate with the row index, the
    second half with the column index."""
    D = cfg.head_dim
    quarter = D // 4
    freqs = 1.0 / (cfg.rope_base ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    cell = torch.arange(cfg.seq_len - 1)
    rows, cols = (cell // cfg.grid_w).double(), (cell % cfg.grid_w).double()
    ang = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)  # (T-1, D/2)
    ang = torch.cat([torch.zeros(1, D // 2, dtype=torch.float64), ang])  # class: angle 0
    cos, sin = ang.cos().float(), ang.sin().float()
    if cfg.prefix_rope == "zero":
        cos[0] = 0.0
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x (B, S, H, D)``, ``cos/sin (S, D/2)``; rotates consecutive pairs ``(x1, x2)`` to
    ``(x1 c - x2 s, x2 c + x1 s)``, written as ``x * C + swap(x) * S`` with ``C = (c, c)``,
    ``S = (-s, s)`` per pair and ``swap`` exchanging each pair's entries (a flip, whose gradient
    is a flip): the same fp32 products, and a backward without the select/stack scatter of the
    pairwise form (``benchmarks/RESULTS.md``, 2026-12-03)."""
    c = cos.repeat_interleave(2, dim=-1)[:, None, :]  # (S, 1, D)
    s = torch.stack([-sin, sin], dim=-1).flatten(-2)[:, None, :]
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * c + swapped * s).type_as(x)


def _rate(drop: nn.Dropout) -> float:
    """The rate a dropout module applies now (0 in eval mode)."""
    return drop.p if drop.training else 0.0


def add_norm(x: torch.Tensor, y: torch.Tensor | None, norm: RMSNorm, p: float,
             fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``x' = x + dropout(y, p)`` (``x' = x`` when y is None) and ``norm(x')``: the step between
    two branches of the residual stream. ``fused``: one Triton kernel each way where the kernels
    run (:func:`kernels.residual_norm`; its own dropout masks), else these PyTorch ops."""
    if fused and p < 1 and kernels.fused_usable(x):
        return kernels.residual_norm(x, y, norm.weight, norm.eps, p)
    if y is not None:
        x = x + (F.dropout(y, p) if p > 0 else y)
    return x, norm(x)


# --------------------------------------------------------------------------- decoding state


DecodeAttention = Literal["auto", "fused", "sdpa"]
"""How :meth:`GPT.step` attends: ``fused`` runs each layer's RoPE, value mix, cache write and
one-query attention in one Triton launch (``kernels.decode_attn``; one-token steps, CUDA); ``sdpa``
writes with ``index_copy_`` and attends over the whole cache under a mask; ``auto`` picks
``fused`` where the kernels run."""


class KVCache(nn.Module):
    """The decoding state of one model for a fixed batch, held in static buffers.

    ``layers[l]`` holds layer ``l``'s keys ``k`` and *mixed* values ``v`` ``(B, H, T_max, D)``
    (``T_max = seq_len``) and its fused projection ``weight``. Positions are tensors
    (``positions``: ``0..T_max-1`` on the device) and writes are ``index_copy_`` at them, so every
    step has the same shapes and addresses and one captured CUDA graph replays it at any
    position. Reads attend over the whole cache under a ``position <= pos`` mask (or, fused, over
    the positions written so far), so rows of an earlier generation never count and a cache is
    reused by writing it again from position 0. Each layer's buffers are whole tensors, not
    views of one stacked buffer: what the fused op and ``index_copy_`` mutate under
    ``torch.compile`` is then a plain input, never a view to functionalise.

    ``weight ([3d + H*G + pad], d)``: the layer's QKV and router weights as one product, made once
    here (one matmul per layer and step instead of two); with a router, zero rows pad it to a
    multiple of 128 outputs (GEMM tiles fit; the extra is unused). Built from the model's weights
    in their dtype (a copy where a router is appended): make a new cache after they change.
    ``dtype`` is the dtype of k and v (default: the model's).
    """

    def __init__(self, model: GPT, batch_size: int, *, dtype: torch.dtype | None = None,
                 attention: DecodeAttention = "auto",
                 launch: kernels.DecodeLaunch | None = None):  # fmt: skip
        super().__init__()
        cfg = model.config
        dev = model.head.weight.device
        fusable = kernels.usable(dev, cfg.head_dim)
        if attention == "auto":
            attention = "fused" if fusable else "sdpa"
        if attention not in ("fused", "sdpa"):
            raise ValueError(f"attention must be 'auto', 'fused' or 'sdpa', got {attention!r}")
        if attention == "fused" and not fusable:
            raise ValueError(
                "attention='fused' needs the Triton kernels (a CUDA device of compute capability "
                "8.0 or newer, a power-of-two head width >= 16, MOVEGEN_KERNELS not 0); use 'sdpa'"
            )
        self.attention: Literal["fused", "sdpa"] = attention
        self.launch = launch or kernels.DecodeLaunch()
        self.batch_size = batch_size
        shape = (batch_size, cfg.n_head, cfg.seq_len, cfg.head_dim)
        dtype = dtype or model.head.weight.dtype
        self.layers = nn.ModuleList(_LayerCache(b.attn, shape, dtype) for b in model.blocks)
        self.register_buffer("positions", torch.arange(cfg.seq_len, device=dev), persistent=False)

    def fused_at(self, n_positions: int) -> bool:
        """Whether a step of ``n_positions`` runs the fused layer (one-token steps only)."""
        return self.attention == "fused" and n_positions == 1


class _LayerCache(nn.Module):
    """One layer's part of a :class:`KVCache`: ``k``, ``v`` and the fused projection ``weight``."""

    def __init__(self, attn: Attention, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        w = attn.qkv.weight.detach()
        if attn.router is not None:
            w = torch.cat([w, attn.router.weight.detach()])
            w = F.pad(w, (0, 0, 0, -w.shape[0] % 128))
        self.register_buffer("weight", w, persistent=False)
        self.register_buffer(
            "k", torch.zeros(shape, device=w.device, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "v", torch.zeros(shape, device=w.device, dtype=dtype), persistent=False
        )


# --------------------------------------------------------------------------- blocks


def _aligned_rows(w: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """A linear layer's weight with zero rows up to a multiple of ``multiple`` outputs (8: every
    row of its product, and of the product's gradient, 16-byte aligned in bf16, as Hopper's GEMM
    kernels (TMA) need; 8 is the least padding that aligns them). The extra outputs are zeros."""
    return F.pad(w, (0, 0, 0, -w.shape[0] % multiple))


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        d, H = cfg.n_embd, cfg.n_head
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.resid_drop = nn.Dropout(cfg.resid_dropout)
        # value memory of this layer
        self.has_memory = layer in cfg.memory_layers
        self.gated = cfg.gate_standard_path and self.has_memory
        self.table = (
            LaVETable(cfg.num_ids, d, H) if cfg.memory == "lave" and self.has_memory else None
        )
        n_mem = cfg.slots if cfg.memory == "move" else 1
        self.router = (
            nn.Linear(d, H * (n_mem + int(self.gated)), bias=False) if self.has_memory else None
        )

    def mixed_qkv(self, x: torch.Tensor, ids: torch.Tensor, memh: torch.Tensor | None, cos, sin, taps=None,
                  proj: torch.Tensor | None = None, fused: bool = False,
                  gate_logits: bool = False, router_pad: bool = False):  # fmt: skip
        """Normed hidden ``x (B, S, d)`` -> q, k ``(B, H, S, D)`` with RoPE and the mixed v.
        ``memh``: the gathered bank ``(B, S, H, M, D)`` (MoVE). ``taps`` (training with MoVE)
        route the bank gradient around the layer; ``memh`` is then what ``bank_taps`` handed
        out: ``memh`` or, with the Triton kernels, ``(table, ids)`` (``move.py``).
        ``proj``: the QKV (and router) projections of ``x`` already computed as one product
        ``(B, S, 3d [+ H*G])`` (decoding fuses the two weights: :class:`KVCache`). ``fused``: the
        split of the QKV product and RoPE as one Triton kernel each way where the kernels run
        (:func:`kernels.split_rope`). ``gate_logits`` (MoVE with taps made for it): the router's
        logits go to the mix kernels, which form the gates ``2 * sigmoid`` themselves.
        ``router_pad``: :meth:`router_logits`' ``pad``."""
        B, S, d = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        if proj is None:
            qkv = self.qkv(x)
            logits = self.router_logits(x, router_pad) if self.has_memory else None
        else:
            qkv = proj[..., : 3 * d]
            logits = (
                proj[..., 3 * d : 3 * d + self.router.out_features] if self.has_memory else None
            )
        qkv = qkv.view(B, S, 3, H, D)
        rotated = fused and kernels.rope_usable(qkv)
        if rotated and proj is not None and logits is not None:  # the stacked product
            q, k, v, logits = kernels.split_rope_wide(
                proj, cos[:S], sin[:S], H, D, logits.shape[-1]
            )
        elif rotated:  # each (B, S, H, D), q and k rotated
            q, k, v = kernels.split_rope(qkv, cos[:S], sin[:S])
        else:
            q, k, v = qkv.unbind(2)  # each (B, S, H, D)
        if self.has_memory and gate_logits and self.table is None and taps is not None:
            v = mix_tapped(v, self._gates(logits, True), memh, taps, self.gated, logits=True)
        elif self.has_memory:
            gates = self._gates(logits, False)  # (B, S, H, G)
            if self.table is not None:
                v = mix(v, gates, self.table.gather(ids), self.gated)  # LaVE: (B, S, H, 1, D)
            elif taps is not None:
                v = mix_tapped(v, gates, memh, taps, self.gated)
            else:
                v = mix(v, gates, memh, self.gated)  # (B, S, H, M, D)
        if not rotated:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, ids, memh, cos, sin, taps=None, dropout: bool = True, fused: bool = False,
                router: bool = False, attn: bool = False, gate_logits: bool = False,
                rope_attn: bool = False, rope_save: bool = False,
                router_pad: bool = False) -> torch.Tensor:  # fmt: skip
        """``dropout=False`` leaves the output's residual dropout to the caller (``add_norm``);
        ``fused``: :meth:`mixed_qkv`'s. ``router``: a memory layer's QKV and router products as
        one product of the stacked weights (one read of ``x``, one input gradient). ``attn``:
        the attention as :func:`kernels.attention` (without attention dropout, where it runs).
        ``gate_logits``: :meth:`mixed_qkv`'s. ``rope_attn`` (with ``fused`` and
        ``attn``): the attention straight from the QKV product (no split q, k, v written and read
        again): :func:`kernels.rope_attention`, or in a MoVE layer on the Triton kernels'
        training path :func:`move.rope_attn_mix_tapped` (with ``router`` only with
        ``gate_logits``); ``rope_save``: their ``save_rotated``. ``router_pad``:
        :meth:`router_logits`' ``pad`` (``router``'s stacked product, where it is taken, has
        padding of its own: it is then unused)."""
        p = self.cfg.attn_dropout if self.training else 0.0
        if rope_attn and fused and attn and p == 0:
            y = self._attend_product(x, memh, cos, sin, taps, router, gate_logits, rope_save,
                                     router_pad)  # fmt: skip
            if y is not None:
                y = self.proj(y.flatten(2))
                return self.resid_drop(y) if dropout else y
        proj = self._stacked_product(x) if router and self.has_memory else None
        q, k, v = self.mixed_qkv(x, ids, memh, cos, sin, taps, proj=proj, fused=fused,
                                 gate_logits=gate_logits, router_pad=router_pad)  # fmt: skip
        if attn and p == 0 and kernels.attn_usable(q.transpose(1, 2)):
            y = kernels.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
            y = y.transpose(1, 2)  # (B, H, S, D) -> (B, S, H, D)
        y = self.proj(y.flatten(2))
        return self.resid_drop(y) if dropout else y

    def _stacked_product(self, x: torch.Tensor) -> torch.Tensor:
        """A memory layer's QKV and router products as one product of the stacked weights
        ``(B, S, 3d + H*G + padding)``."""
        w = torch.cat([self.qkv.weight, self.router.weight])
        # a row of 3d + H*G bf16 values (2,388 for MoVE-x1, 2,604 for x4) padded to a multiple
        # of 64 (2,432, 2,624): 128-byte rows, as the QKV product's 2,304 are. Padded to 8 only
        # (16-byte rows, what Hopper's GEMM kernels need), the compiled H100 step copied the
        # product's q, k, v for the attention and mix kernels and its gradient after them
        # (5.2 ms), and the attention read its unaligned rows 3.7 ms slower (MoVE-x1;
        # benchmarks/RESULTS.md, 2026-12-07 fifth session)
        return F.linear(x, _aligned_rows(w, 64))

    def router_logits(self, x: torch.Tensor, pad: bool = False) -> torch.Tensor:
        """The router's logits ``(B, S, H*G)``. ``pad``: through the weight padded with zero
        rows to a multiple of 8 outputs and the product sliced back: the same values and
        gradients, but every row of the product and of its gradient 16-byte aligned. A row of
        H*G bf16 values (168 bytes for MoVE-x1's 84, 600 for x4's 300) is not, and cuBLAS then
        runs two of the router's three GEMMs with an sm80 kernel rather than Hopper's (H100
        profile, ``benchmarks/RESULTS.md``)."""
        n = self.router.out_features
        if not pad or n % 8 == 0:
            return self.router(x)
        return F.linear(x, _aligned_rows(self.router.weight))[..., :n]

    def _gates(self, logits: torch.Tensor, gate_logits: bool) -> torch.Tensor:
        """The router's ``logits (B, S, H*G)`` as the mix takes them ``(B, S, H, G)``: the logits
        themselves (``gate_logits``: the kernels form the gates), else the gates, memory dropout
        applied in training."""
        B, S, _ = logits.shape
        H = self.cfg.n_head
        if gate_logits:
            return logits.view(B, S, H, -1)
        gates = gates_from_logits(logits, H)
        if self.training and self.cfg.memory_dropout > 0:
            gates = drop_memory_gates(gates, self.cfg.memory_dropout, self.gated)
        return gates

    def _attend_product(self, x, memh, cos, sin, taps, router: bool, gate_logits: bool,
                        save: bool = False, router_pad: bool = False):  # fmt: skip
        """The attention output ``(B, S, H, D)`` straight from the QKV product where the kernels
        run (see :meth:`forward`'s ``rope_attn``), else None."""
        B, S, d = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if not kernels.attn_usable_for(x.device, dtype, S, D):  # (the product's dtype)
            return None
        save = save and torch.is_grad_enabled()  # no backward to read them (evaluation)
        if not self.has_memory:
            qkv = self.qkv(x).view(B, S, 3, H, D)
            return kernels.rope_attention(qkv, cos[:S], sin[:S], save)
        if self.table is not None or taps is None or not isinstance(memh, tuple):
            return None
        if router and gate_logits:  # the stacked product, its router columns the logits
            return rope_attn_mix_tapped(self._stacked_product(x), None, cos[:S], sin[:S], memh, taps,
                                        self.gated, True, H, D, self.router.out_features // H,
                                        save)  # fmt: skip
        if router:
            return None
        qkv, logits = self.qkv(x), self.router_logits(x, router_pad)
        gates = self._gates(logits, gate_logits)
        return rope_attn_mix_tapped(qkv, gates, cos[:S], sin[:S], memh, taps, self.gated,
                                    gate_logits, H, D, save_rotated=save)  # fmt: skip

    def forward_cached(
        self, x, ids, mem, pos, rope, mask, cache: KVCache, layer: int
    ) -> torch.Tensor:
        """Normed hidden ``x (B, S, d)`` at input positions ``pos (S,)`` -> the attention output
        ``(B, S, d)``, writing this layer's keys and mixed values into ``cache``.

        One product gives q, k, v and the router logits (``cache.layers[layer].weight``). With
        ``fused`` one-token steps the rest is one Triton launch (``mem``: the bank ``(V, M, d)``,
        ``rope``: the whole cos/sin tables, read at ``pos``); otherwise ``mixed_qkv``, an
        ``index_copy_`` into the cache and SDPA over the whole cache under ``mask (S, T_max)``
        (``mem``: the gathered bank ``(B, S, H, M, D)``, ``rope``: cos/sin at ``pos``)."""
        B, S, _ = x.shape
        state = cache.layers[layer]
        proj = F.linear(x, state.weight)  # (B, S, 3d [+ H*G + pad])
        k_cache, v_cache = state.k, state.v  # (B, H, T_max, D)
        if cache.fused_at(S):
            cfg = self.cfg
            table, slots = None, 0
            if self.table is not None:  # LaVE: this layer's table as one slot
                table, slots = self.table.weight.view(cfg.num_ids, 1, cfg.n_embd), 1
            elif self.has_memory:
                table, slots = mem, cfg.slots
            launch = cache.launch
            y = torch.ops.movegen.decode_attn(proj.view(B, -1), *rope, pos, k_cache, v_cache, table, ids, slots,
                                              self.gated, launch.block_t, launch.num_warps,
                                              launch.stages)  # fmt: skip
            y = y.view(B, 1, -1)  # (B, 1, d)
        else:
            q, k, v = self.mixed_qkv(x, ids, mem, *rope, proj=proj)  # (B, H, S, D)
            k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
            y = F.scaled_dot_product_attention(
                q.to(k_cache.dtype), k_cache, v_cache, attn_mask=mask
            )
            y = y.transpose(1, 2).flatten(2)  # (B, H, S, D) -> (B, S, d)
        return self.proj(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        h = cfg.mlp_hidden
        self.w13 = nn.Linear(cfg.n_embd, 2 * h, bias=False)
        self.w2 = nn.Linear(h, cfg.n_embd, bias=False)
        self.drop = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x: torch.Tensor, dropout: bool = True, fused: bool = False) -> torch.Tensor:
        """``fused``: the SiLU product as one Triton kernel each way where the kernels run."""
        u = self.w13(x)
        if fused and kernels.fused_usable(u):  # fmt: skip
            h = kernels.silu_mul(u)
        else:
            a, b = u.chunk(2, dim=-1)
            h = F.silu(a) * b
        y = self.w2(h)
        return self.drop(y) if dropout else y


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.norm2 = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, y, ids, memh, cos, sin, taps=None, fused: tuple = (), p_y: float = 0.0):
        """The block on the residual stream ``x`` that still lacks ``y``, the previous block's MLP
        output before its dropout (None for the first block; ``p_y``: that dropout's rate).
        Returns ``(x, y)`` in the same form for the next block: each dropout, residual add and
        the norm after it are one step (:func:`add_norm`), across block boundaries too.
        ``fused``: the ops run as Triton kernels (``"norm"``: those steps, ``"swiglu"``: the
        MLP's SiLU product, ``"rope"``: the QKV split and RoPE, ``"router"``: a memory layer's QKV
        and router products as one, ``"attn"``: the causal attention, ``"gates"``: the MoVE gates
        formed inside the mix kernels, ``"ropeattn"``: the attention straight from the QKV product, the MoVE
        mix included on its training path (with ``"rope"`` and ``"attn"``), ``"ropesave"``: its
        forward writes the rotated q and k for the backward (with ``"ropeattn"``),
        ``"routerpad"``: the router's product padded to aligned rows
        (:meth:`Attention.router_logits`); :attr:`GPT.fused_ops`)."""
        norm = "norm" in fused
        x, h = add_norm(x, y, self.norm1, p_y, norm)
        y = self.attn(h, ids, memh, cos, sin, taps, dropout=False, fused="rope" in fused,
                      router="router" in fused, attn="attn" in fused,
                      gate_logits="gates" in fused, rope_attn="ropeattn" in fused,
                      rope_save="ropesave" in fused,
                      router_pad="routerpad" in fused)  # fmt: skip
        x, h = add_norm(x, y, self.norm2, _rate(self.attn.resid_drop), norm)
        return x, self.mlp(h, dropout=False, fused="swiglu" in fused)

    def forward_cached(self, x, ids, mem, pos, rope, mask, cache: KVCache, layer: int):
        """:meth:`forward` of positions ``pos`` through the cache (see :meth:`GPT.step`)."""
        x = x + self.attn.forward_cached(self.norm1(x), ids, mem, pos, rope, mask, cache, layer)
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- model


class GPT(nn.Module):
    """Class-conditional AR transformer.

    >>> model = GPT(GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16, memory="move"))
    >>> logits = model(torch.randint(64, (2, 16)), torch.tensor([3, 7]))   # (2, 16, 64)
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.n_embd)  # + null class
        self.tok_drop = nn.Dropout(cfg.token_dropout)
        self.bank = (
            MoVEBank(cfg.num_ids, cfg.slots, cfg.n_embd, cfg.n_head)
            if cfg.memory == "move"
            else None
        )
        self.blocks = nn.ModuleList(Block(cfg, l) for l in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rope_2d(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # MoVE training path: form the bank gradient once from all layers (move.py); False
        # gives plain autograd through every layer's mix (the reference)
        self.deferred_bank_grad = True
        # the elementwise steps run as Triton kernels where the kernels run: "norm" each dropout +
        # residual add + RMSNorm (kernels.residual_norm), "swiglu" the MLP's SiLU product
        # (kernels.silu_mul), "rope" the QKV split and RoPE (kernels.split_rope), "attn" the
        # causal attention without attention dropout (kernels.attention), "ropeattn" (with "rope"
        # and "attn") that attention straight from the QKV product, rotating q and k as it loads
        # them, after the MoVE mix of its v in memory layers (kernels.rope_attention,
        # move.rope_attn_mix_tapped): no split q, k, v written either way, "ropesave" (with
        # "ropeattn") its forward also writes the rotated q and k, which the backward reads,
        # "routerpad" a memory layer's router product padded to 16-byte aligned rows
        # (Attention.router_logits); () gives the PyTorch ops (the reference). The two "rope*"
        # made the GPT-B step 2.7 ms (standard) and 2.1 ms (MoVE-x1) faster on an H100;
        # "routerpad" MoVE-x4's 2.1 ms in one run on an H100 (x1: 0.5 ms, inside the spread),
        # and the next profile showed all the router's GEMMs on Hopper's kernels, none left on
        # cuBLAS' sm80 ones (benchmarks/RESULTS.md, 2026-12-07 third and fourth sessions).
        # Built, tested and off by default (but "router" + "gates" on for MoVE-x1, below):
        # "gates" (MoVE's gates 2 * sigmoid(router logits) formed inside the mix kernels: +1.1
        # ms of the MoVE-x1 step alone), "router" (a memory layer's QKV and router products as
        # one product of the stacked weights, split by kernels.split_rope_wide, or with "gates"
        # and "ropeattn" read by the attention and mix kernels: with the product padded to a
        # multiple of 8 columns the compiled MoVE-x1 step copied it and was 5.9 ms slower;
        # padded to 64 faster, below; "router" without "gates", +2.1 ms at 8, is not measured
        # at 64), "emb" (the token embedding's gradient by a sort, move.gather_rows: +0.9 ms),
        # "ce" (kernels.cross_entropy in `loss`: 0.5 ms faster, inside the spread, for 2 GiB
        # more peak memory; 2026-12-07 fifth session).
        # (A router input gradient added inside the QKV input gradient's GEMM, addmm with beta 1,
        # measured no faster on an H100, x1 +0.6 ms and x4 -0.1 ms, and was removed: 2026-12-07
        # fourth session.)
        self.fused_ops: tuple[str, ...] = ("norm", "swiglu", "rope", "attn", "ropeattn", "ropesave",
                                           "routerpad")  # fmt: skip
        if cfg.memory == "move" and cfg.slots < kernels.GROUP_MIN_SLOTS:
            # with the per-token mix kernels (MoVE-x1, 6 slots): "router" + "gates" on, the
            # product padded to 64 columns: 2.1 and 2.2 ms faster on H100s, the second run
            # timing the default before and after it; at 24 slots (x4, grouped) 0.0 and +0.6 ms,
            # so off there (benchmarks/RESULTS.md, 2026-12-07 fifth and sixth sessions)
            self.fused_ops += ("router", "gates")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, (MoVEBank, LaVETable)):
                nn.init.normal_(m.weight, std=std)
        # after the general init: zero head (LlamaGen) and zero routers (every gate starts at 1.0)
        nn.init.zeros_(self.head.weight)
        for b in self.blocks:
            if b.attn.router is not None:
                nn.init.zeros_(b.attn.router.weight)

    # ---- inputs

    def input_ids(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Unified ids ``(B, T)``: ``[K + label, codes[:, :-1]]``."""
        K = self.config.vocab_size
        return torch.cat([(labels + K)[:, None], codes[:, :-1]], dim=1)

    def drop_labels(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Replace each label by the null class with probability ``class_dropout``."""
        p = self.config.class_dropout
        if p <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
        return torch.where(drop, torch.full_like(labels, self.config.null_class), labels)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        K = self.config.vocab_size
        is_cls = ids >= K
        if "emb" in self.fused_ops:  # the sort-based backward (move.gather_rows)
            tok = gather_rows(self.tok_emb.weight, ids.clamp(max=K - 1))
        else:
            tok = self.tok_emb(ids.clamp(max=K - 1))
        cls = self.cls_emb((ids - K).clamp(min=0))
        return self.tok_drop(torch.where(is_cls[..., None], cls, tok))

    def _check(self, codes: torch.Tensor, labels: torch.Tensor) -> None:
        cfg = self.config
        if codes.ndim != 2 or codes.shape[1] != cfg.seq_len:
            raise ValueError(f"codes must be (B, {cfg.seq_len}), got {tuple(codes.shape)}")
        if labels.shape != codes.shape[:1]:
            raise ValueError(
                f"labels must be (B,) = ({codes.shape[0]},), got {tuple(labels.shape)}"
            )

    # ---- full forward

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``codes (B, T)`` int64, ``labels (B,)`` (``num_classes`` = null) -> logits ``(B, T, K)``.
        In training mode labels are dropped to the null class at rate ``class_dropout``."""
        return self._head(codes, labels).float()

    def loss(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean next-code cross-entropy of ``codes`` (what training minimises), from fp32
        logits as :meth:`forward` gives them; with ``"ce"`` in :attr:`fused_ops` where the
        kernels run, :func:`kernels.cross_entropy` reads the head's output in its own dtype (bf16
        under autocast) with fp32 math, so no fp32 copy of the logits is made."""
        logits = self._head(codes, labels).flatten(0, 1)
        if "ce" in self.fused_ops and kernels.fused_usable(logits):
            return kernels.cross_entropy(logits, codes.flatten())
        return F.cross_entropy(logits.float(), codes.flatten())

    def _head(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The head's output ``(B, T, K)`` in the compute dtype (bf16 under autocast)."""
        self._check(codes, labels)
        cfg = self.config
        if self.training:
            labels = self.drop_labels(labels)
        ids = self.input_ids(codes, labels)  # (B, T)
        x = self.embed(ids)
        # the bank, once per forward: gathered memh (B, T, H, M, D), or on the training path
        # with the Triton kernels (table, ids) read by id in each layer (move.py)
        mem, taps = None, [None] * cfg.n_layer
        fused = self.fused_ops
        gate_logits = False
        if self.bank is not None:
            n_gates = cfg.slots + int(cfg.gate_standard_path)
            if (
                self.deferred_bank_grad
                and torch.is_grad_enabled()
                and self.bank.weight.requires_grad
            ):
                # "gates": the routers' logits to the kernels, where they run and no memory
                # dropout needs the gates first
                gate_logits = (
                    "gates" in fused
                    and self.bank.takes_logits()
                    and not (self.training and cfg.memory_dropout > 0)
                )
                mem, taps = self.bank.tapped(ids, cfg.n_layer, n_gates, logits=gate_logits)
            else:
                mem = self.bank.gather(ids)
        if "gates" in fused and not gate_logits:  # "router" was measured with "gates" only
            fused = tuple(f for f in fused if f not in ("gates", "router"))
        cos, sin = self.rope_cos, self.rope_sin
        # each block's MLP output (y) and its dropout rate (p): the dropout and residual add are
        # the next norm's step
        y, p = None, 0.0
        for block, tap in zip(self.blocks, taps):
            x, y = block(x, y, ids, mem, cos, sin, tap, fused, p)
            p = _rate(block.mlp.drop)
        _, h = add_norm(x, y, self.norm, p, "norm" in fused)
        return self.head(h)

    # ---- cached decoding

    def new_cache(self, batch_size: int, *, dtype: torch.dtype | None = None,
                  attention: DecodeAttention = "auto",
                  launch: kernels.DecodeLaunch | None = None) -> KVCache:  # fmt: skip
        """A :class:`KVCache` of this model for ``batch_size`` rows (see there)."""
        return KVCache(self, batch_size, dtype=dtype, attention=attention, launch=launch)

    def step(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run input positions ``pos`` given a cache filled for the positions before them.

        ``ids (B, S)`` unified ids (position 0 is the class id ``K + c``); ``pos (S,)`` int64
        positions on the model's device, ascending and consecutive (e.g. ``cache.positions[t :
        t + S]``: a tensor, so that a captured step replays at any position). Writes keys and
        mixed values into ``cache`` and returns logits ``(B, S, K)`` (no dropout). Prefill of
        several positions and one-token steps run the same layers; the fused Triton layer,
        when the cache asks for it, serves the one-token steps."""
        B, S = ids.shape
        if pos.shape != (S,):
            raise ValueError(
                f"pos must hold one position per id, (S,) = ({S},); got {tuple(pos.shape)}"
            )
        if B != cache.batch_size:
            raise ValueError(f"the cache holds {cache.batch_size} rows; got ids for {B}")
        if self.training:
            raise RuntimeError("step() is for inference; call model.eval() first")
        x = self.embed(ids)  # (B, S, d)
        if cache.fused_at(
            S
        ):  # the kernel reads the bank rows, the RoPE tables and the cache by position
            mem = self.bank.weight if self.bank is not None else None
            rope, mask = (self.rope_cos, self.rope_sin), None
        else:  # shared by every layer: bank rows (B, S, H, M, D), RoPE at pos, which keys each query sees
            mem = self.bank.gather(ids) if self.bank is not None else None
            rope = (
                self.rope_cos.index_select(0, pos),
                self.rope_sin.index_select(0, pos),
            )  # (S, D/2)
            mask = cache.positions[None, :] <= pos[:, None]  # (S, T_max)
        for l, block in enumerate(self.blocks):
            x = block.forward_cached(x, ids, mem, pos, rope, mask, cache, l)
        return self.head(self.norm(x)).float()

    # ---- accounting

    def param_counts(self) -> dict[str, int]:
        return param_counts(self)


def param_counts(model: GPT) -> dict[str, int]:
    """Parameters by role: backbone (non-embedding), embedding (token, class, head), memory
    (bank or LaVE tables) and router."""
    out = {"params_backbone": 0, "params_embedding": 0, "params_memory": 0, "params_router": 0}
    for name, p in model.named_parameters():
        if name.startswith(("tok_emb", "cls_emb", "head")):
            out["params_embedding"] += p.numel()
        elif name.startswith("bank") or ".table." in name:
            out["params_memory"] += p.numel()
        elif ".router." in name:
            out["params_router"] += p.numel()
        else:
            out["params_backbone"] += p.numel()
    out["params_total"] = sum(out.values())
    return out


def cost_report(cfg: GPTConfig) -> dict[str, float]:
    """Parameters (counted on the meta device), forward FLOPs per token and bank bytes per token.

    FLOPs per token: 2 per multiply-add of every matmul (QKV, output, MLP, routers, head) plus
    causal attention (on average T/2 keys: 2 * T * d per layer for QK^T and AV together) plus the
    value mix (2 * n_gates * d per layer with memory). Bank bytes: memory rows the mix reads per
    token over all layers, in bf16 (MoVE: M slots in each of the L layers; LaVE: one row per
    table layer) -- the traffic MoVE pays for its memory, not its parameter count.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    counts = param_counts(model)
    d, T, L = cfg.n_embd, cfg.seq_len, cfg.n_layer
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = L * 2 * T * d
    n_mem_layers = len(cfg.memory_layers)
    per_layer_gates = (cfg.slots if cfg.memory == "move" else 1) + int(cfg.gate_standard_path)
    mix_flops = n_mem_layers * 2 * per_layer_gates * d if cfg.memory != "none" else 0
    rows = cfg.slots * L if cfg.memory == "move" else n_mem_layers
    return {
        **counts,
        "flops_per_token": int(2 * matmul + attention + mix_flops),
        "memory_slots": cfg.slots if cfg.memory == "move" else n_mem_layers,
        "bank_bytes_per_token": int(rows * d * 2),
    }


PRESETS: dict[str, dict] = {
    # tests: seconds on a CPU
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, mlp_multiple_of=32),
    # small models for digits / Fashion-MNIST
    "S": dict(n_layer=8, n_head=8, n_embd=512),
    # LlamaGen sizes
    "B": dict(n_layer=12, n_head=12, n_embd=768),
    "L": dict(n_layer=24, n_head=16, n_embd=1024),
    "XL": dict(n_layer=36, n_head=20, n_embd=1280),
}

__all__ = ["GPT", "GPTConfig", "DecodeAttention", "KVCache", "cost_report", "param_counts"]
