"""The value-memory path: MoVE's global bank, LaVE's layer-wise tables, and the gated mix.

MoVE (Mixture of Value Embeddings; Yangyan Li, arXiv 2601.22887, 2026) changes only the value
path of attention. A single learnable bank ``E`` of shape ``(V, M, d)`` -- ``V = K + C + 1``
unified ids (image codes, classes, the null class), ``M`` slots of model width ``d`` -- is
shared by every layer. It is gathered **once per forward** with the input ids. Each layer ``l``
has its own router ``W_G^l`` (zero-initialised, so every gate starts at exactly 1.0) that reads
the same normed hidden state as the Q/K/V projection and produces per-head soft gates
``g = 2 * sigmoid(W_G^l x)`` in (0, 2). The mixed value replaces ``v`` before attention and
before the KV cache write::

        x_t (normed) ──┬── W_Q, W_K ──► q, k (RoPE) ────────────────┐
                       │                                             ▼
                       ├── W_V ──► v_t ──(× g_0)──┐              attention ──► W_O
                       │                          (+)──► v'_t ──────▲
                       └── W_G^l ──► g (B,T,H,M+1)│
                                                  │
        id_t ──► E[id_t] (B,T,M,d), once per ─────┘  Σ_i g_i · E[id_t, i, head slice]
                 forward, all layers share it

    v'_t^h = g_{t,0}^h · v_t^h + Σ_{i=1..M} g_{t,i}^h · E[id_t, i, h·D:(h+1)·D]

``gate_standard_path=False`` drops ``g_0`` (the standard value passes through ungated).
LaVE (layer-wise value embeddings) is the baseline: layer ``l`` owns a table ``E_l`` of shape
``(V, d)`` and a gate ``Linear(d, H)``; it is the same mix with ``M = 1`` and a per-layer table.
Memory density ``xk`` means ``M = k·L/2`` slots for MoVE and, for LaVE, a table on every other
layer (x1, the last layer included) or on every layer (x2).

This module holds no Lightning, data or CLI code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels


def gates_from_logits(logits: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Router output ``(B, T, H * G)`` -> gates ``(B, T, H, G)`` in (0, 2)."""
    B, T, _ = logits.shape
    return 2.0 * torch.sigmoid(logits.view(B, T, n_heads, -1))


def mix_reference(
    v: torch.Tensor, gates: torch.Tensor, mem: torch.Tensor, gate_standard_path: bool
) -> torch.Tensor:
    """The obviously-correct mix, slot by slot. Shapes (dimension letters as in ``mix``):
    ``v (B, T, H, D)``, ``gates (B, T, H, G)``, ``mem (B, T, M, H, D)``; returns ``(B, T, H, D)``.
    ``G = M + 1`` when the standard path is gated (gate 0 scales ``v``), else ``G = M``."""
    M = mem.shape[2]
    off = 1 if gate_standard_path else 0
    out = gates[..., 0:1] * v if gate_standard_path else v
    for i in range(M):
        out = out + gates[..., off + i : off + i + 1] * mem[:, :, i]
    return out


def mix(
    v: torch.Tensor, gates: torch.Tensor, memh: torch.Tensor, gate_standard_path: bool
) -> torch.Tensor:
    """The mix as one batched product per layer.

    B batch, T positions, H heads, D head width, M slots, G gates per head.
    ``v (B, T, H, D)``; ``gates (B, T, H, G)``; ``memh (B, T, H, M, D)`` -- the gathered bank
    already laid out head-major (done once per forward by :meth:`MoVEBank.gather`), so no layer
    makes a permuted copy. Returns ``(B, T, H, D)``.
    """
    needs_grad = torch.is_grad_enabled() and (
        v.requires_grad or gates.requires_grad or memh.requires_grad
    )
    if kernels.available(memh) and not needs_grad:
        return torch.ops.movegen.mix_fwd(v, gates.to(memh.dtype), memh, gate_standard_path)
    if gate_standard_path:
        g0, gs = gates[..., :1], gates[..., 1:]
        base = g0 * v
    else:
        gs, base = gates, v
    gs = gs.to(memh.dtype)
    if torch.compiler.is_compiling():
        # one fused kernel: read each slot once, weigh, sum over M (fp32 accumulation)
        acc = (gs.unsqueeze(-1) * memh).sum(-2)
    else:
        # eager: a batched product, (B, T, H, 1, M) @ (B, T, H, M, D) -> (B, T, H, 1, D)
        acc = torch.matmul(gs.unsqueeze(-2), memh).squeeze(-2)
    return base + acc.to(base.dtype)


# --------------------------------------------------------------------------- the training path
#
# Autograd would give every layer its own bank gradient ``g_l (x) dv_l`` of shape (B, T, H, M, D)
# and sum the L of them: L bank-sized tensors written and read again. The bank gradient is
# ``sum_l g_l (x) dv_l``, a contraction over layers, so we defer it. Each layer's mix takes two
# zero-valued "taps" as extra inputs and hands back, as the taps' gradients, its gates g_l and
# its value gradient dv_l (small: H*M and D numbers per position). The function that made the
# taps receives all L of them and forms the bank gradient once, in one batched product over l.
# Pure autograd, no side channels, so torch.compile can trace it.


class _BankTaps(torch.autograd.Function):
    """``memh (B, T, H, M, D)`` -> (memh detached, 2L zero taps). Backward forms
    ``d memh = sum_l g_l (x) dv_l`` from the taps' gradients."""

    @staticmethod
    def forward(ctx, memh, n_layers: int, n_gates: int):
        B, T, H, M, D = memh.shape
        ctx.n_layers, ctx.off, ctx.slots, ctx.dtype = n_layers, n_gates - M, M, memh.dtype
        ctx.set_materialize_grads(False)  # no bank-sized zero gradient for the unused memh output
        zero = memh.new_zeros(())
        taps = []
        for _ in range(n_layers):  # distinct (expanded, storage-free) tensors per layer
            taps += [zero.expand(B, T, H, n_gates), zero.expand(B, T, H, D)]
        return (memh.detach(), *taps)

    @staticmethod
    def backward(ctx, _grad_memh, *grads):
        off = ctx.off
        gs = [g for g in grads[0::2] if g is not None]
        dvs = [d for d in grads[1::2] if d is not None]
        if not gs:
            return None, None, None
        if kernels.available(dvs[0]):  # Triton: one pass over all layers, one write
            return (
                torch.ops.movegen.bank_grad(
                    torch.stack(gs), torch.stack(dvs).to(ctx.dtype), ctx.slots
                ),
                None,
                None,
            )
        G = torch.stack([g[..., off:] for g in gs], dim=-1)  # (B, T, H, M, L)
        DV = torch.stack(dvs, dim=-2).to(G.dtype)  # (B, T, H, L, D)
        if torch.compiler.is_compiling():  # fused: sum over L of g (x) dv, written once
            grad = (G.unsqueeze(-1) * DV.unsqueeze(-3)).sum(-2)
        else:
            grad = torch.matmul(G, DV)  # (B, T, H, M, D): one product over the L layers
        return grad, None, None


class _Mix(torch.autograd.Function):
    """One layer's mix; the bank gradient leaves through the taps (see ``_BankTaps``)."""

    @staticmethod
    def forward(ctx, v, gates, memh, tap_g, tap_v, gated: bool):
        ctx.gated = gated
        ctx.save_for_backward(v, gates, memh)
        if kernels.available(memh):
            return torch.ops.movegen.mix_fwd(v, gates.to(memh.dtype), memh, gated)
        return mix(v, gates, memh, gated)

    @staticmethod
    def backward(ctx, dout):
        v, gates, memh = ctx.saved_tensors
        gated = ctx.gated
        if kernels.available(memh):
            d_v, d_gates = torch.ops.movegen.mix_bwd(dout, v, gates.to(memh.dtype), memh, gated)
            return d_v, d_gates.to(gates.dtype), None, gates.detach(), dout, None
        # gate gradients of the slots: <dout, memh_i> per (b, t, h); the one unavoidable re-read
        if torch.compiler.is_compiling():
            d_gs = (memh * dout.to(memh.dtype).unsqueeze(-2)).sum(-1)  # (B, T, H, M)
        else:
            d_gs = torch.matmul(memh, dout.to(memh.dtype).unsqueeze(-1)).squeeze(-1)
        if gated:
            g0 = gates[..., :1]
            acc = torch.promote_types(v.dtype, torch.float32)  # reduce in at least fp32
            d_g0 = (dout.to(acc) * v.to(acc)).sum(-1, keepdim=True)
            d_gates = torch.cat([d_g0, d_gs.to(acc)], dim=-1).to(gates.dtype)
            d_v = (dout * g0).to(v.dtype)
        else:
            d_gates = d_gs.to(gates.dtype)
            d_v = dout.to(v.dtype)
        # the taps carry g (value, not gradient) and dout to _BankTaps.backward
        return d_v, d_gates, None, gates.detach(), dout, None


def bank_taps(memh: torch.Tensor, n_layers: int, n_gates: int) -> tuple[torch.Tensor, list]:
    """Split the gathered bank into a detached view plus per-layer taps ``[(tap_g, tap_v), ...]``."""
    out = _BankTaps.apply(memh, n_layers, n_gates)
    return out[0], [(out[1 + 2 * l], out[2 + 2 * l]) for l in range(n_layers)]


def mix_tapped(v, gates, memh_detached, taps, gate_standard_path: bool) -> torch.Tensor:
    """The mix for training: same values as :func:`mix`, bank gradient deferred to the taps."""
    return _Mix.apply(v, gates, memh_detached, taps[0], taps[1], gate_standard_path)


class _GatherRows(torch.autograd.Function):
    """``F.embedding`` whose backward sums repeated ids with PyTorch's sort-based kernel (an op
    the compiler keeps as is) rather than a generated scatter of atomic adds."""

    @staticmethod
    def forward(ctx, weight, ids):
        ctx.save_for_backward(ids)
        ctx.num_rows = weight.shape[0]
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        return torch.ops.movegen.rows_grad(grad, ids, ctx.num_rows), None


class MoVEBank(nn.Module):
    """The global bank ``E (V, M, d)``, shared by all layers."""

    def __init__(self, num_ids: int, slots: int, dim: int, n_heads: int):
        super().__init__()
        self.slots, self.dim, self.n_heads = slots, dim, n_heads
        self.weight = nn.Parameter(torch.empty(num_ids, slots, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def gather(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``ids (B, T)`` -> ``memh (B, T, H, M, D)``, head-major, in ``dtype`` (default: the
        autocast dtype when autocast is on). No layer makes its own copy of the slots."""
        V, M, d = self.weight.shape
        H = self.n_heads
        B, T = ids.shape
        if dtype is None and torch.is_autocast_enabled(ids.device.type):
            dtype = torch.get_autocast_dtype(ids.device.type)
        dtype = dtype or self.weight.dtype
        if ids.numel() * 4 < V:  # few rows (decoding): gather, then cast and lay out the rows
            rows = F.embedding(ids, self.weight.view(V, M * d)).to(dtype)  # (B, T, M*d)
            return rows.view(B, T, M, H, d // H).transpose(2, 3).contiguous()
        # many rows (training): cast and lay out the bank once, then gather head-major rows;
        # embedding's backward sums the rows of repeated ids without atomics
        w = self.weight.to(dtype).view(V, M, H, d // H).transpose(1, 2).reshape(V, H * M * (d // H))
        return _GatherRows.apply(w, ids).view(B, T, H, M, d // H)


class LaVETable(nn.Module):
    """One layer's LaVE table ``E_l (V, d)``."""

    def __init__(self, num_ids: int, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.weight = nn.Parameter(torch.empty(num_ids, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids (B, T)`` -> ``(B, T, H, 1, D)``."""
        B, T = ids.shape
        rows = F.embedding(ids, self.weight)
        if torch.is_autocast_enabled(ids.device.type):
            rows = rows.to(torch.get_autocast_dtype(ids.device.type))
        return rows.view(B, T, self.n_heads, 1, -1)


def lave_layers(n_layer: int, density: int) -> list[int]:
    """Layers that carry a LaVE table: x1 every other layer with the last one included, x2 all."""
    if density == 2:
        return list(range(n_layer))
    if density == 1:
        return [l for l in range(n_layer) if l % 2 == (n_layer - 1) % 2]
    raise ValueError(
        f"LaVE memory_density must be 1 or 2 (one table per layer at most), got {density}"
    )


def move_slots(n_layer: int, density: float) -> int:
    """``xk`` -> ``M = k * L / 2`` slots."""
    m = density * n_layer / 2
    if m < 1 or m != int(m):
        raise ValueError(f"MoVE memory_density {density} with {n_layer} layers gives M = {m} slots; "
                         "k * n_layer / 2 must be a positive integer")  # fmt: skip
    return int(m)


__all__ = [
    "LaVETable",
    "MoVEBank",
    "gates_from_logits",
    "lave_layers",
    "mix",
    "mix_reference",
    "move_slots",
]
