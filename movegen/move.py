"""The value-memory path: MoVE's global bank, LaVE's layer-wise tables, and the gated mix.

MoVE (Mixture of Value Embeddings; Yangyan Li, arXiv 2601.22887, 2026) changes only the value
path of attention. A single learnable bank ``E`` of shape ``(V, M, d)`` -- ``V = K + C + 1``
unified ids (image codes, classes, the null class), ``M`` slots of model width ``d`` -- is
shared by every layer and prepared **once per forward**: gathered per token with the input ids
(``memh (B, T, H, M, D)``), or, on the training path with the Triton kernels, cast once and read
by id inside every layer's kernels (no per-token copy; see "the training path"). Each layer ``l``
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
        id_t ──► E[id_t] (M,d), read by id ───────┘  Σ_i g_i · E[id_t, i, head slice]
                 from one per-forward copy of E

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


def drop_memory_gates(gates: torch.Tensor, p: float, gate_standard_path: bool) -> torch.Tensor:
    """Memory dropout: each memory gate of ``gates (B, T, H, G)`` (every gate but g0 when the
    standard path is gated) is zeroed with probability ``p``, the kept ones scaled by
    ``1 / (1 - p)``, so a token's retrieved slots cannot be relied on one by one."""
    off = int(gate_standard_path)
    mem = gates[..., off:]
    keep = torch.empty_like(mem).bernoulli_(1.0 - p)
    return torch.cat([gates[..., :off], mem * keep / (1.0 - p)], dim=-1)


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
    if kernels.available(memh) and not needs_grad:  # the kernel indexes token n's slots by id n
        B, T, H, M, D = memh.shape
        table = memh.reshape(B * T, H, M, D).transpose(1, 2)  # (B*T, M, H, D)
        ids = torch.arange(B * T, device=memh.device).view(B, T)
        return torch.ops.movegen.mix_fwd(v, gates, table, ids, gate_standard_path)
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
# taps receives all L of them and forms the bank gradient once. Pure autograd, no side channels,
# so torch.compile can trace it.
#
# The memory the layers read comes in two forms:
# * with the Triton kernels, ``(table, ids)``: the bank cast once to the compute dtype and viewed
#   ``(V, M, H, D)``, indexed by id inside the kernels -- no per-token copy of the slots is made
#   or kept for backward. The bank gradient is formed in one pass over the tokens in id order
#   that sums all layers and all tokens of an id into its row in fp32 (``bank_rows_grad``);
#   The layers' kernels come in two forms: per token (each token reads its own M slots), or
#   grouped by id (``kernels.gmix_*``: the ids sorted once per forward, each program a tile of
#   sorted tokens of one head whose repeated bank rows the hardware fetches about once, or, in
#   the dot form (``kernels.MIX_KERNEL``), loaded once per group of equal ids and applied by
#   tensor-core products);
#   ``MoVEBank.group_by_id`` chooses, by default ``kernels.group_pays``;
# * otherwise the gathered ``memh (B, T, H, M, D)`` and PyTorch products (the plain path).


class _BankTaps(torch.autograd.Function):
    """``mem`` -> (mem detached, 2L zero taps); ``mem`` is ``memh (B, T, H, M, D)`` (``ids``
    None) or ``table (V, M, H, D)`` read at ``ids (B, T)``. Backward forms the gradient of
    ``mem`` from the taps' gradients: ``d memh = sum_l g_l (x) dv_l``, or its rows summed by id."""

    @staticmethod
    def forward(ctx, mem, ids, n_layers: int, n_gates: int, dtype=None, groups=None, logits=False,
                stack_dv=False):  # fmt: skip
        if ids is None:
            B, T, H, M, D = mem.shape
        else:  # the table is cast here, so its gradient goes to the weight in fp32 directly
            (V, M, H, D), (B, T) = mem.shape, ids.shape
            # the grouped forward's sort (sid, order) serves the bank gradient too
            ctx.save_for_backward(ids, *(groups or ()))
            ctx.num_rows = V
            mem = mem.to(dtype or mem.dtype)
        ctx.table, ctx.off, ctx.slots, ctx.dtype = ids is not None, n_gates - M, M, mem.dtype
        ctx.logits, ctx.stack_dv = logits, stack_dv
        ctx.set_materialize_grads(False)  # no bank-sized zero gradient for the unused mem output
        zero = mem.new_zeros(())
        taps = []
        for _ in range(n_layers):  # distinct (expanded, storage-free) tensors per layer
            taps += [zero.expand(B, T, H, n_gates), zero.expand(B, T, H, D)]
        return (mem.detach(), *taps)

    @staticmethod
    def backward(ctx, _grad_mem, *grads):
        off = ctx.off
        gs = [g for g in grads[0::2] if g is not None]
        dvs = [d for d in grads[1::2] if d is not None]
        nones = (None,) * 7
        if not gs:
            return None, *nones
        if ctx.table:  # Triton: all layers and all tokens of an id summed into its row, fp32
            ids, *sorted_ids = ctx.saved_tensors
            dvs = [d.to(ctx.dtype) for d in dvs]
            # one stacked copy of the L value gradients, or each read where it lies
            dvs = [torch.stack(dvs)] if ctx.stack_dv else dvs  # (the gates as L tensors)
            sid, order = sorted_ids or (None, None)
            rows = torch.ops.movegen.bank_rows_grad(
                gs, dvs, ids, ctx.num_rows, ctx.slots, sid, order, ctx.logits
            )  # (V, M, H, D)
            return rows, *nones
        G = torch.stack([g[..., off:] for g in gs], dim=-1)  # (B, T, H, M, L)
        DV = torch.stack(dvs, dim=-2).to(G.dtype)  # (B, T, H, L, D)
        if torch.compiler.is_compiling():  # fused: sum over L of g (x) dv, written once
            grad = (G.unsqueeze(-1) * DV.unsqueeze(-3)).sum(-2)
        else:
            grad = torch.matmul(G, DV)  # (B, T, H, M, D): one product over the L layers
        return grad, *nones


def _mix_kernels(v, gates, table, ids, groups, gated: bool, logits: bool) -> torch.Tensor:
    """The training mix's forward on the Triton kernels: grouped by id (``groups``) or per token."""
    if groups is not None:
        return torch.ops.movegen.gmix_fwd(v, gates, table, *groups, gated, logits)
    return torch.ops.movegen.mix_fwd(v, gates, table, ids, gated, logits)


class _Mix(torch.autograd.Function):
    """One layer's mix; the bank gradient leaves through the taps (see ``_BankTaps``). ``mem`` is
    the detached ``table (V, M, H, D)`` read at ``ids`` by the kernels, or ``memh`` (ids None);
    ``groups`` (``kernels.id_groups`` of the ids, or None) selects the kernels grouped by id.
    ``logits`` (kernels only): ``gates`` are the router's logits, made gates inside the kernels,
    and their gradient is the logits'."""

    @staticmethod
    def forward(ctx, v, gates, mem, ids, groups, tap_g, tap_v, gated: bool, logits: bool = False):
        if logits and ids is None:
            raise ValueError("router logits in place of gates need the Triton kernels' table path")
        ctx.gated, ctx.grouped, ctx.logits = gated, groups is not None, logits
        ctx.save_for_backward(v, gates, mem, ids, *(groups or ()))
        if ids is not None:
            return _mix_kernels(v, gates, mem, ids, groups, gated, logits)
        return mix(v, gates, mem, gated)

    @staticmethod
    def backward(ctx, dout):
        v, gates, mem, ids, *groups = ctx.saved_tensors
        gated = ctx.gated
        if ctx.grouped:
            d_v, d_gates = torch.ops.movegen.gmix_bwd(
                dout, v, gates, mem, *groups, gated, ctx.logits
            )
        elif ids is not None:
            d_v, d_gates = torch.ops.movegen.mix_bwd(dout, v, gates, mem, ids, gated, ctx.logits)
        else:
            d_v, d_gates = _mix_bwd_reference(dout, v, gates, mem, gated)
        # the taps carry g (value, not gradient) and dout to _BankTaps.backward
        return d_v, d_gates, None, None, None, gates.detach(), dout, None, None


def _mix_bwd_reference(dout, v, gates, mem, gated: bool):
    """``_Mix``'s gradients of v and the gates in PyTorch ops (the gathered bank ``mem``)."""
    # gate gradients of the slots: <dout, memh_i> per (b, t, h); the one unavoidable re-read
    if torch.compiler.is_compiling():
        d_gs = (mem * dout.to(mem.dtype).unsqueeze(-2)).sum(-1)  # (B, T, H, M)
    else:
        d_gs = torch.matmul(mem, dout.to(mem.dtype).unsqueeze(-1)).squeeze(-1)
    if not gated:
        return dout.to(v.dtype), d_gs.to(gates.dtype)
    g0 = gates[..., :1]
    acc = torch.promote_types(v.dtype, torch.float32)  # reduce in at least fp32
    d_g0 = (dout.to(acc) * v.to(acc)).sum(-1, keepdim=True)
    d_gates = torch.cat([d_g0, d_gs.to(acc)], dim=-1).to(gates.dtype)
    return (dout * g0).to(v.dtype), d_gates


class _RopeAttnMix(torch.autograd.Function):
    """A memory layer's attention straight from its product (Triton kernels, the table path):
    the mix of the product's v columns, then causal attention of its q and k (rotated as the
    kernel reads them) over the mixed values, so no split q, k, v is written either way; the
    backward is one op (``kernels.rope_attn_mix_bwd``) writing the whole product's gradient.
    ``proj (B, S, W)``: ``[q | k | v]`` with ``gates (B, S, H, G)`` beside it, or (``gates``
    None) ``[q | k | v | router logits | padding]``, the logits of ``n_gates`` gates per head
    made gates by the kernels. Returns the attention's output ``(B, S, H, D)``; the bank gradient
    leaves through the taps as in ``_Mix``."""

    @staticmethod
    def forward(ctx, proj, gates, cos, sin, mem, ids, groups, tap_g, tap_v, gated: bool, logits: bool,
                n_head: int, head_dim: int, n_gates: int, save_rotated: bool = False):  # fmt: skip
        B, S = proj.shape[:2]
        H, D = n_head, head_dim
        n = 3 * H * D
        ctx.gates_in_proj = gates is None
        if gates is None:
            gates = proj[..., n : n + H * n_gates].contiguous().view(B, S, H, n_gates)
        q, k, v = proj[..., :n].view(B, S, 3, H, D).unbind(2)
        vm = _mix_kernels(v, gates, mem, ids, groups, gated, logits)
        qk = ()
        if save_rotated:  # the rotated q, k written for the backward (kernels.rope_attention)
            o, lse, *qk = torch.ops.movegen.rope_attn_fwd_saved(q, k, vm, cos, sin)
        else:
            o, lse = torch.ops.movegen.attn_fwd(q, k, vm, cos, sin)
        ctx.gated, ctx.logits, ctx.grouped, ctx.head_dim = gated, logits, groups is not None, D
        ctx.n_qk = len(qk)
        ctx.save_for_backward(proj, gates, vm, o, lse, cos, sin, mem, ids, *qk, *(groups or ()))
        return o

    @staticmethod
    def backward(ctx, do):
        proj, gates, vm, o, lse, cos, sin, mem, ids, *rest = ctx.saved_tensors
        qk, groups = rest[: ctx.n_qk], rest[ctx.n_qk :]
        sid, order = groups if ctx.grouped else (None, None)
        dproj, dg, dvm = torch.ops.movegen.rope_attn_mix_bwd(
            do.to(proj.dtype), proj, vm, o, lse, cos, sin, gates, mem, ids, sid, order, ctx.gated,
            ctx.logits, ctx.head_dim, ctx.gates_in_proj, *qk,
        )  # fmt: skip
        d_gates = None if ctx.gates_in_proj else dg
        # the taps carry g (value, not gradient) and the mixed values' gradient to _BankTaps
        return (dproj, d_gates, None, None, None, None, None, gates.detach(), dvm,
                *(None,) * 6)  # fmt: skip


def rope_attn_mix_tapped(proj, gates, cos, sin, mem, taps, gate_standard_path: bool, logits: bool,
                         n_head: int, head_dim: int, n_gates: int = 0,
                         save_rotated: bool = False) -> torch.Tensor:  # fmt: skip
    """A memory layer's attention for training straight from its product (:class:`_RopeAttnMix`):
    the same values as ``kernels.split_rope``, :func:`mix_tapped` and ``kernels.attention``.
    ``mem``: ``(table, ids, groups)`` from :func:`bank_taps`. ``proj (B, S, W)``: the QKV product
    with ``gates`` (``logits``: the router's logits) beside it, or the stacked product with
    ``gates`` None, its router columns the logits of ``n_gates`` gates per head (``logits``
    True). ``save_rotated``: as ``kernels.rope_attention``'s. Returns ``(B, S, H, D)``."""
    table, ids, groups = mem
    if gates is None and not (logits and n_gates):
        raise ValueError("rope_attn_mix_tapped: a stacked product needs logits=True and n_gates")
    return _RopeAttnMix.apply(proj, gates, cos, sin, table, ids, groups, taps[0], taps[1],
                              gate_standard_path, logits, n_head, head_dim, n_gates,
                              save_rotated)  # fmt: skip


def bank_taps(mem: torch.Tensor, n_layers: int, n_gates: int, ids: torch.Tensor | None = None,
              dtype: torch.dtype | None = None, grouped: bool = False, logits: bool = False,
              stack_dv: bool = False) -> tuple:  # fmt: skip
    """Split the memory into what every layer reads plus per-layer taps ``[(tap_g, tap_v), ...]``.
    ``mem``: the gathered ``memh (B, T, H, M, D)``, or, with ``ids (B, T)`` (Triton kernels only),
    the ``table (V, M, H, D)`` they index, cast to ``dtype``; the layers then read ``(table cast
    and detached, ids, groups)`` and the table's gradient comes back in its own dtype. With
    ``grouped`` the ids are sorted once here (``kernels.id_groups``) and every layer runs the
    kernels that take the tokens in id order (a repeated bank row fetched about once per tile).
    ``logits`` (with ``ids``): every layer's mix gets its router's logits in place of the gates
    (:func:`mix_tapped`), and the taps carry them to the bank gradient. ``stack_dv`` (with
    ``ids``): the bank gradient reads the layers' value gradients stacked into one tensor first,
    else (default) each where it lies (:func:`kernels.bank_rows_grad`)."""
    groups = kernels.id_groups(ids) if grouped and ids is not None else None
    out = _BankTaps.apply(mem, ids, n_layers, n_gates, dtype, groups, logits, stack_dv)
    taps = [(out[1 + 2 * l], out[2 + 2 * l]) for l in range(n_layers)]
    if ids is None:
        return out[0], taps
    return (out[0], ids, groups), taps


def mix_tapped(v, gates, mem, taps, gate_standard_path: bool, logits: bool = False) -> torch.Tensor:
    """The mix for training: same values as :func:`mix`, bank gradient deferred to the taps.
    ``mem``: what :func:`bank_taps` handed out, ``memh`` or ``(table, ids, groups)``. ``logits``:
    ``gates`` are the router's logits ``(B, T, H, G)``, the gates ``2 * sigmoid`` of them formed
    inside the kernels (``(table, ids, groups)`` only; the taps made with ``logits`` too)."""
    table, ids, groups = mem if isinstance(mem, tuple) else (mem, None, None)
    return _Mix.apply(v, gates, table, ids, groups, taps[0], taps[1], gate_standard_path, logits)


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


def gather_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, weight)`` whose backward sums the rows of repeated ids with PyTorch's
    sort-based kernel instead of a scatter of atomic adds."""
    return _GatherRows.apply(weight, ids)


class MoVEBank(nn.Module):
    """The global bank ``E (V, M, d)``, shared by all layers."""

    def __init__(self, num_ids: int, slots: int, dim: int, n_heads: int):
        super().__init__()
        self.slots, self.dim, self.n_heads = slots, dim, n_heads
        self.weight = nn.Parameter(torch.empty(num_ids, slots, dim))
        self.group_by_id: bool | None = None
        """The training kernels grouped by id (True), per token (False), or chosen by the number
        of tokens (None: ``kernels.group_pays``)."""
        self.stack_dv = False
        """The bank gradient reads the layers' value gradients each where it lies (False, the
        default: the kernels take L pointers), or stacked into one tensor first (True: a copy of
        all of them, 0.8 ms of an H100's GPT-B step by the profile). In place, the MoVE-x1 step
        was 0.8-1.3 ms faster (five measurements in four runs) and the MoVE-x4 step 0.7-1.6 ms
        (three runs) on H100s. Its cold first compilations used to stall in torch 2.11's
        inductor, formatting an implicit fallback's arguments for a log line;
        ``kernels._lower_as_fallbacks`` spares it that, and the one cold compilation run since
        finished (benchmarks/RESULTS.md, 2026-12-06 second section, 2026-12-07 second, fourth
        and fifth sessions)."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def _dtype(self, ids: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
        """``dtype``, else the autocast dtype when autocast is on, else the weight's."""
        if dtype is None and torch.is_autocast_enabled(ids.device.type):
            dtype = torch.get_autocast_dtype(ids.device.type)
        return dtype or self.weight.dtype

    def tapped(self, ids: torch.Tensor, n_layers: int, n_gates: int, logits: bool = False) -> tuple:
        """The training path (deferred bank gradient, see :func:`bank_taps`): the memory every
        layer reads and the per-layer taps. With the Triton kernels the memory is the bank cast
        once to the compute dtype, ``(V, M, H, D)``, with ``ids (B, T)`` -- nothing is gathered;
        else the gathered ``memh``. ``logits``: the layers pass their router's logits in place of
        the gates (the Triton kernels only: :meth:`takes_logits`)."""
        V, M, d = self.weight.shape
        H = self.n_heads
        if kernels.usable(self.weight.device, d // H):
            table = self.weight.view(V, M, H, d // H)
            grouped = self.group_by_id
            if grouped is None:
                grouped = kernels.group_pays(ids.numel(), M)
            return bank_taps(table, n_layers, n_gates, ids, self._dtype(ids, None), grouped, logits,
                             self.stack_dv)  # fmt: skip
        if logits:
            raise ValueError("router logits in place of gates need the Triton kernels")
        return bank_taps(self.gather(ids), n_layers, n_gates)

    def takes_logits(self) -> bool:
        """Whether :meth:`tapped` can take the routers' logits: the Triton kernels run here."""
        return kernels.usable(self.weight.device, self.dim // self.n_heads)

    def gather(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``ids (B, T)`` -> ``memh (B, T, H, M, D)``, head-major, in ``dtype`` (default: the
        autocast dtype when autocast is on). No layer makes its own copy of the slots."""
        V, M, d = self.weight.shape
        H = self.n_heads
        B, T = ids.shape
        dtype = self._dtype(ids, dtype)
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
    "drop_memory_gates",
    "gates_from_logits",
    "lave_layers",
    "mix",
    "mix_reference",
    "move_slots",
]
