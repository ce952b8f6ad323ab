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
    if gate_standard_path:
        g0, gs = gates[..., :1], gates[..., 1:]
        base = g0 * v
    else:
        gs, base = gates, v
    # (B, T, H, 1, M) @ (B, T, H, M, D) -> (B, T, H, 1, D)
    return base + torch.matmul(gs.unsqueeze(-2).to(memh.dtype), memh).squeeze(-2).to(base.dtype)


class MoVEBank(nn.Module):
    """The global bank ``E (V, M, d)``, shared by all layers."""

    def __init__(self, num_ids: int, slots: int, dim: int, n_heads: int):
        super().__init__()
        self.slots, self.dim, self.n_heads = slots, dim, n_heads
        self.weight = nn.Parameter(torch.empty(num_ids, slots, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids (B, T)`` -> ``memh (B, T, H, M, D)``, head-major (one copy per forward)."""
        B, T = ids.shape
        M, H = self.slots, self.n_heads
        mem = self.weight[ids]  # (B, T, M, d)
        return mem.view(B, T, M, H, -1).transpose(2, 3).contiguous()  # (B, T, H, M, D)


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
        return self.weight[ids].view(B, T, self.n_heads, 1, -1)


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
