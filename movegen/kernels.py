"""Triton kernels for the MoVE mix on GPU, registered as PyTorch custom ops.

Rows are (position, head) pairs ``r = n * H + h`` with ``n = b * T + t``: R = B * T * H. The
mix kernels read the slots of row ``r`` from a ``table (N, M, H, D)`` of any strides (unit stride
on D) at table row ``ids[n]``, so one kernel serves both forms of the memory:

* the bank itself, ``(V, M, d)`` viewed as ``(V, M, H, D)``, with the input ids: the training
  path, which never materialises the per-token slots;
* the gathered per-token slots ``memh (B, T, H, M, D)`` viewed as ``(B*T, M, H, D)``, with
  ``ids = arange(B*T)``: ``move.mix`` in no-grad use (evaluation, decoding, LaVE).

Each kernel loads all M slots of a block of rows as one ``(BLOCK_R, M_PAD, D)`` tile
(``M_PAD`` = M rounded up to a power of two, masked) and sums in fp32:

* ``mix_fwd``:   out[r] = g0[r] * v[r] + sum_m g[r, m] * E[ids[n], m, h]   (one read of the slots)
* ``mix_bwd``:   dg[r, m] = <dout[r], E[ids[n], m, h]> (all m in one reduction over D, one tile
                 store), dg0[r] = <dout[r], v[r]>, dv[r] = g0[r] * dout[r]  (the second read)
* ``gmix_fwd``, ``gmix_bwd``: the same with the tokens in id order, one head per program, in two
                 forms (below; ``MIX_KERNEL``): every lane loading its own slots, or a tile's
                 groups of equal ids loading theirs once for tensor-core products
* ``bank_rows_grad``: dE[k, m, h] = sum over tokens n with ids[n] = k and over all L layers of
                 g_l[r, m] * dv_l[r], in fp32, in one pass over the tokens in id order (no
                 per-token slot gradient is written): by default a walk over the sorted
                 tokens, each token's sum over the layers one tensor-core product; under
                 deterministic algorithms each run of one id summed whole as tensor-core
                 products, no atomics; with ``BANK_KERNEL = "lanes"`` a segmented sum over
                 tiles of sorted tokens for few slots, one token at a time for many
* ``rows_grad``: sums gathered rows' gradients by id with PyTorch's sort-based embedding
  backward (the plain path's gather), kept opaque to the compiler.
* ``decode_attn``: one layer of one-token decoding (below).

Mix block sizes and warps are autotuned per (M, D, G) (one fixed small block in the interpreter).
The ops are opaque to ``torch.compile`` (it calls them as they are). Off CUDA, on a GPU older
than compute capability 8.0 (before Ampere: the kernels' bf16 loads and tensor-core products
need it), on ROCm (untested there), without Triton, or with ``MOVEGEN_KERNELS=0``,
``available()`` is False and ``move.py`` uses its plain PyTorch path. Setting
``TRITON_INTERPRET=1`` before import runs the kernels on CPU tensors (used by the tests).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - Triton missing
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


_SWITCH = os.environ.get("MOVEGEN_KERNELS", "1")
if _SWITCH not in ("0", "1"):
    raise ValueError(f"MOVEGEN_KERNELS={_SWITCH!r}: set it to 0 (the plain PyTorch paths everywhere) "
                     "or 1 (the Triton kernels wherever they can run: the default)")  # fmt: skip
ENABLED = _SWITCH == "1"
"""False with ``MOVEGEN_KERNELS=0`` in the environment at import: every path is the plain
PyTorch one and no kernel runs (the same model: to compare a GPU's results with the reference
paths, or to get round a kernel that fails on some GPU)."""

MIN_CAPABILITY = (8, 0)  # the kernels' bf16 loads and tensor-core products (Ampere and later)


_CAPABLE: dict[int, bool] = {}  # CUDA device index -> whether the kernels run on it


@torch.compiler.assume_constant_result  # (a compiled graph takes it as the constant it is)
def _capable(index: int) -> bool:
    """Whether CUDA device ``index`` can run the kernels (compute capability 8.0 or newer),
    asked once a device; warns once for a device that cannot."""
    if index not in _CAPABLE:
        cap = torch.cuda.get_device_capability(index)
        _CAPABLE[index] = cap >= MIN_CAPABILITY and not torch.version.hip
        if not _CAPABLE[index]:
            why = (f"need a GPU of compute capability 8.0 or newer; CUDA device {index} has {cap[0]}.{cap[1]}"
                   if not torch.version.hip else
                   "are built and tested for NVIDIA GPUs only, and this torch is a ROCm one")  # fmt: skip
            warnings.warn(f"movegen's Triton kernels {why}, so the plain PyTorch paths run instead: "
                          "the same model, more slowly.", stacklevel=3)  # fmt: skip
    return _CAPABLE[index]


def _on_device(device: torch.device | str) -> bool:
    """Whether the kernels run on ``device``: a capable CUDA device, or any under the interpreter
    (never where :data:`ENABLED` is False)."""
    device = torch.device(device)
    if not ENABLED:
        return False
    if INTERPRET:
        return True
    if device.type != "cuda":
        return False
    return _capable(torch.cuda.current_device() if device.index is None else device.index)


def usable(device: torch.device | str, head_dim: int) -> bool:
    """Whether the kernels can run for tensors on ``device`` with head width ``head_dim``."""
    return HAVE_TRITON and _on_device(device) and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def available(t: torch.Tensor) -> bool:
    """:func:`usable` for this tensor's device and head width (its last dim)."""
    return usable(t.device, t.shape[-1])


_LOWERED = False


def _lower_as_fallbacks() -> None:
    """Give inductor every ``movegen::`` op as a fallback (called as it is, as before) before it
    lowers a graph holding one, rather than letting it make one on first sight. Making one on
    first sight, torch 2.11's inductor formats the op's arguments for an INFO log line even when
    that log is off, and an argument's text recurses through every input of the graph behind it:
    the bank gradient's backward, with the 12 layers' value gradients as its arguments, spent
    minutes in that formatting on a cold compile (H100, ``benchmarks/RESULTS.md``, 2026-12-07
    fifth session). Runs from the ops' fake implementations, once inductor is imported; the
    fallbacks get the layout constraints inductor would have given them. Off inductor (eager,
    another backend) it does nothing."""
    global _LOWERED
    lowering = sys.modules.get("torch._inductor.lowering")
    if _LOWERED or lowering is None:
        return
    _LOWERED = True
    try:
        from torch._library.utils import get_layout_constraint_tag

        for name in torch.ops.movegen:
            packet = getattr(torch.ops.movegen, name)
            for overload in packet.overloads():
                op = getattr(packet, overload)
                if op not in lowering.lowerings:
                    tag = get_layout_constraint_tag(op, with_default=True)
                    layout = lowering.tag_to_layout_constraint(tag)
                    lowering.make_fallback(op, layout_constraint=layout)
    except Exception as e:  # pragma: no cover - a torch without these helpers: inductor's own way
        warnings.warn(f"movegen ops left to inductor's implicit fallbacks ({e!r}): a first "
                      "compilation may be slow on torch 2.11", stacklevel=2)  # fmt: skip


def _fake(op):
    """``op.register_fake`` whose function first runs :func:`_lower_as_fallbacks`."""

    def register(fn):
        @functools.wraps(fn)
        def fake(*args, **kwargs):
            _lower_as_fallbacks()
            return fn(*args, **kwargs)

        return op.register_fake(fake)

    return register


def _autotune(configs, key, **kwargs):
    """``triton.autotune`` whose choices are kept in Triton's cache directory (keyed by the
    kernel's source, the GPU architecture and the tuning key), so a later process on the same
    machine starts without autotuning again."""
    return triton.autotune(configs, key, cache_results=True, **kwargs)


def _pad(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def _prune(configs, named_args, **kwargs):
    """Keep the row blocks whose ``(BLOCK_R, M_PAD, D)`` tile holds 4096 to 16384 elements (one
    row when a row alone is larger)."""
    row = kwargs["M_PAD"] * kwargs["D"]
    keep = [c for c in configs if 4096 <= c.kwargs["BLOCK_R"] * row <= 16384]
    return keep or [c for c in configs if c.kwargs["BLOCK_R"] == 1]


def _tuned(fn):
    """Autotune ``BLOCK_R`` and ``num_warps`` per (M, D, G, LOGITS); the interpreter gets one
    small block. (Triton's autotuner keys on the named arguments and the tensors' dtypes only:
    without ``LOGITS`` in a key, the gates and logits forms of a kernel share whichever tuning
    ran first, in a process or through the kept choices.)"""
    if INTERPRET:
        configs = [triton.Config({"BLOCK_R": 4}, num_warps=4)]
    else:
        configs = [triton.Config({"BLOCK_R": 2**k}, num_warps=w) for k in range(11) for w in (4, 8)]
    return _autotune(
        configs, key=["M", "D", "G", "LOGITS"], prune_configs_by={"early_config_prune": _prune}
    )(fn)


if HAVE_TRITON:

    @triton.jit
    def _rows(R, H, BLOCK_R: tl.constexpr):
        """This program's rows: indices, mask, position n and head h."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        return rows, rows < R, rows // H, rows % H

    @triton.jit
    def _load_v(v_ptr, n, h, rmask, d, s_vn, s_vh):
        """The ``(BLOCK_R, D)`` tile of ``v`` at rows (n, h) of a strided view."""
        return tl.load(
            v_ptr + n[:, None] * s_vn + h[:, None] * s_vh + d[None, :],
            mask=rmask[:, None],
            other=0.0,
        )

    @triton.jit
    def _gate(x, LOGITS: tl.constexpr):
        """Gates from what ``g_ptr`` holds, in fp32: the gates themselves, or with ``LOGITS`` the
        router's logits, whose gates are ``2 * sigmoid(x)``."""
        x = x.to(tl.float32)
        if LOGITS:
            return 2.0 * tl.sigmoid(x)
        return x

    @triton.jit
    def _gate_grad(dg, x, LOGITS: tl.constexpr):
        """What the backward stores for a gate of stored value ``x`` and gradient ``dg``: ``dg``,
        or with ``LOGITS`` the logit's gradient ``dg * g * (1 - g / 2)``, ``g = 2 sigmoid(x)``."""
        if LOGITS:
            g = 2.0 * tl.sigmoid(x.to(tl.float32))
            return dg * g * (1.0 - 0.5 * g)
        return dg

    @triton.jit
    def _store_gate_grads(dg, g_ptr, dg_ptr, dgo, rows, m, gm, G: tl.constexpr, GATED: tl.constexpr,
                          LOGITS: tl.constexpr):  # fmt: skip
        """Stores ``dg (rows, len(m))``, the gradients of the slot gates ``m`` of rows ``rows``,
        at ``dg_ptr + dgo`` (with ``LOGITS`` those of their logits, read at ``g_ptr``); ``gm``
        the mask."""
        if LOGITS:
            x = tl.load(g_ptr + rows[:, None] * G + GATED + m[None, :], mask=gm, other=0.0)
            dg = _gate_grad(dg, x, LOGITS)
        tl.store(dg_ptr + dgo[:, None] + GATED + m[None, :], dg.to(dg_ptr.dtype.element_ty),
                 mask=gm)  # fmt: skip

    @triton.jit
    def _slot_gates(g_ptr, rows, m, gm, G: tl.constexpr, GATED: tl.constexpr, LOGITS: tl.constexpr):
        """The fp32 gates of slots ``m`` of rows ``rows`` (``gm`` the mask; masked: from 0)."""
        x = tl.load(g_ptr + rows[:, None] * G + GATED + m[None, :], mask=gm, other=0.0)
        return _gate(x, LOGITS)

    @triton.jit
    def _store_mixed(acc, v_ptr, g_ptr, out_ptr, rows, n, h, rmask, d, s_vn, s_vh, G: tl.constexpr,
                     D: tl.constexpr, GATED: tl.constexpr, LOGITS: tl.constexpr):  # fmt: skip
        """Stores the mixed values of rows ``rows`` at ``out_ptr``: the slots' sum ``acc`` plus the
        standard path, ``g0 * v`` (gated) or ``v``, summed in fp32."""
        v = _load_v(v_ptr, n, h, rmask, d, s_vn, s_vh).to(tl.float32)
        if GATED:
            g0 = _gate(tl.load(g_ptr + rows * G, mask=rmask, other=0.0), LOGITS)
            acc += g0[:, None] * v
        else:
            acc += v
        tl.store(
            out_ptr + rows[:, None] * D + d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=rmask[:, None],
        )

    @triton.jit
    def _store_standard_grads(dout, v_ptr, g_ptr, dv_ptr, dvo, dg_ptr, dgo, rows, n, h, rmask, d, s_vn, s_vh,
                              G: tl.constexpr, GATED: tl.constexpr, LOGITS: tl.constexpr):  # fmt: skip
        """The standard path's gradients from the fp32 ``dout`` tile: stores ``dg0 = <dout, v>``
        at ``dg_ptr + dgo`` (gated; its logit's gradient with ``LOGITS``) and ``dv`` (``g0 *
        dout``, or ``dout``) at ``dv_ptr + dvo``."""
        dv = dout
        if GATED:
            v = _load_v(v_ptr, n, h, rmask, d, s_vn, s_vh)
            dg0 = tl.sum(v.to(tl.float32) * dout, axis=1)
            x0 = tl.load(g_ptr + rows * G, mask=rmask, other=0.0)
            tl.store(dg_ptr + dgo, _gate_grad(dg0, x0, LOGITS).to(dg_ptr.dtype.element_ty),
                     mask=rmask)  # fmt: skip
            dv = _gate(x0, LOGITS)[:, None] * dout
        tl.store(dv_ptr + dvo[:, None] + d[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=rmask[:, None])  # fmt: skip

    @triton.jit
    def _row_base(ids_ptr, n, h, rmask, s_id, s_h):
        """Each row's offset in the table: ``ids[n] * s_id + h * s_h`` (64-bit)."""
        return tl.load(ids_ptr + n, mask=rmask, other=0).to(tl.int64) * s_id + h * s_h

    @triton.jit
    def _slots_at(tab_ptr, base, rmask, m, mmask, d, s_m):
        """The ``(rows, len(m), D)`` fp32 tile of slots m of the rows at offsets ``base``."""
        ptr = tab_ptr + base[:, None, None] + m[None, :, None] * s_m + d[None, None, :]
        mask = rmask[:, None, None] & mmask[None, :, None]
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _load_slots(tab_ptr, ids_ptr, n, h, rmask, m, mmask, d, s_id, s_m, s_h):
        """The ``(BLOCK_R, M_PAD, D)`` tile of slots ``table[ids[n], m, h, :]`` in fp32."""
        return _slots_at(
            tab_ptr, _row_base(ids_ptr, n, h, rmask, s_id, s_h), rmask, m, mmask, d, s_m
        )

    @triton.jit
    def _out_rows(n, h, s_on, s_gn, D: tl.constexpr, G: tl.constexpr):
        """64-bit offsets of rows (n, h) in the backward's outputs: dv ``n * s_on + h * D``, the
        gates' gradient ``n * s_gn + h * G``."""
        n = n.to(tl.int64)
        return n * s_on + h * D, n * s_gn + h * G

    @triton.jit
    def _mix_fwd_kernel(v_ptr, g_ptr, tab_ptr, ids_ptr, out_ptr, R, H, s_vn, s_vh, s_id, s_m, s_h, G: tl.constexpr,
                        M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr, GATED: tl.constexpr,
                        LOGITS: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
        rows, rmask, n, h = _rows(R, H, BLOCK_R)
        m = tl.arange(0, M_PAD)
        mmask = m < M
        d = tl.arange(0, D)
        g = _slot_gates(g_ptr, rows, m, rmask[:, None] & mmask[None, :], G, GATED, LOGITS)
        mem = _load_slots(tab_ptr, ids_ptr, n, h, rmask, m, mmask, d, s_id, s_m, s_h)
        acc = tl.sum(g[:, :, None] * mem, axis=1)  # (BLOCK_R, D); padded slots: mem 0
        _store_mixed(
            acc, v_ptr, g_ptr, out_ptr, rows, n, h, rmask, d, s_vn, s_vh, G, D, GATED, LOGITS
        )

    @triton.jit
    def _mix_bwd_kernel(dout_ptr, v_ptr, g_ptr, tab_ptr, ids_ptr, dv_ptr, dg_ptr, R, H, s_vn, s_vh, s_id, s_m, s_h,
                        s_on, s_gn, G: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
                        GATED: tl.constexpr, LOGITS: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
        # dv row (n, h) at n * s_on + h * D, dg at n * s_gn + h * G: their own tensors, or the
        # v and router columns of the QKV product's gradient (rope_attn_mix_bwd)
        rows, rmask, n, h = _rows(R, H, BLOCK_R)
        dvo, dgo = _out_rows(n, h, s_on, s_gn, D, G)
        m = tl.arange(0, M_PAD)
        mmask = m < M
        d = tl.arange(0, D)
        dout = tl.load(
            dout_ptr + rows[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0
        ).to(tl.float32)
        mem = _load_slots(tab_ptr, ids_ptr, n, h, rmask, m, mmask, d, s_id, s_m, s_h)
        dg = tl.sum(mem * dout[:, None, :], axis=2)  # (BLOCK_R, M_PAD): every slot's gate at once
        _store_gate_grads(dg, g_ptr, dg_ptr, dgo, rows, m, rmask[:, None] & mmask[None, :], G, GATED,
                          LOGITS)  # fmt: skip
        _store_standard_grads(dout, v_ptr, g_ptr, dv_ptr, dvo, dg_ptr, dgo, rows, n, h, rmask, d, s_vn,
                              s_vh, G, GATED, LOGITS)  # fmt: skip

    @triton.jit
    def _layer_ptr(ptrs, l: tl.constexpr, s_l, STACKED: tl.constexpr):
        """Layer ``l``'s tensor (its value gradient, or its gates): its own ``ptrs[l]`` (a tuple
        of L pointers), or with ``STACKED`` the ``l``-th slice of the one stacked tensor ``ptrs``
        (a pointer, slices ``s_l`` apart; a 64-bit offset: past 2**31 at large batches)."""
        if STACKED:
            ptr = ptrs + s_l.to(tl.int64) * l
        else:
            ptr = ptrs[l]
        return ptr

    @triton.jit
    def _bank_rows_kernel(gts, dvs, order_ptr, sid_ptr, out_ptr, N, H, s_gl, s_gn, s_gh, s_dl,
                          L: tl.constexpr, G: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
                          D: tl.constexpr, LOGITS: tl.constexpr, STACKED: tl.constexpr,
                          GSTACKED: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
        # program (c, h): sorted tokens c*CHUNK.. of head h; a run of equal ids sums in registers
        # and is added to its bank row once when the id changes (atomics only at run ends)
        c = tl.program_id(0)
        h = tl.program_id(1)
        m = tl.arange(0, M_PAD)
        mm = m < M
        d = tl.arange(0, D)
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, N)
        prev = tl.load(sid_ptr + start).to(tl.int64)  # (int32 or int64 indices: 64-bit offsets)
        acc = tl.zeros((M_PAD, D), dtype=tl.float32)
        cols = m[:, None] * (H * D) + h * D + d[None, :]  # a row's (M, H, D) layout
        for i in range(start, end):
            idv = tl.load(sid_ptr + i).to(tl.int64)
            if idv != prev:
                tl.atomic_add(
                    out_ptr + prev * (M * H * D) + cols, acc, mask=mm[:, None], sem="relaxed"
                )
                acc = tl.zeros((M_PAD, D), dtype=tl.float32)
                prev = idv
            tok = tl.load(order_ptr + i).to(tl.int64)  # b*T + t
            row = tok * H + h
            goff = tok * s_gn + h * s_gh + (G - M) + m
            for l in tl.static_range(L):
                x = tl.load(_layer_ptr(gts, l, s_gl, GSTACKED) + goff, mask=mm, other=0.0)
                g = tl.where(mm, _gate(x, LOGITS), 0.0)
                dv = tl.load(_layer_ptr(dvs, l, s_dl, STACKED) + row * D + d)
                acc += g[:, None] * dv.to(tl.float32)[None, :]
        tl.atomic_add(out_ptr + prev * (M * H * D) + cols, acc, mask=mm[:, None], sem="relaxed")

    _mix_fwd_kernel = _tuned(_mix_fwd_kernel)
    _mix_bwd_kernel = _tuned(_mix_bwd_kernel)


# --------------------------------------------------------------------------- grouped by id
#
# The same mix and gate gradients with the tokens visited in id order: every layer reads the bank
# at the same ids, so one sort per forward (``id_groups``) serves all layers and the backward. A
# program takes BLOCK_T consecutive sorted tokens of one head, and every token (lane) loads its own
# slots ``table[k, m, h, :]`` in blocks of MB slots, all lanes' loads at once (no loop-carried
# dependence). Tokens of one id sit in neighbouring lanes of the same load, so a repeated row is
# fetched from memory about once: the hardware merges equal addresses within a warp's load and L1
# serves the program's other warps. The token side (v, gates, out, dout, dv) is read and written
# once, at the tokens' rows. The products are fp32 FMAs, M*D per token and head. (An earlier form
# walked each tile's runs of equal ids, one tensor-core product per run; its loop of dependent
# loads made it slower at every shape measured, ``benchmarks/RESULTS.md`` 2026-12-03 fifth section.)

if HAVE_TRITON:

    @triton.jit
    def _tile(sid_ptr, order_ptr, N, H, BLOCK_T: tl.constexpr):
        """This program's sorted tokens: positions i, mask, span [start, end), row n*H + h."""
        c = tl.program_id(0)
        h = tl.program_id(1)
        start = c * BLOCK_T
        i = start + tl.arange(0, BLOCK_T)
        im = i < N
        n = tl.load(order_ptr + i, mask=im, other=0).to(tl.int64)
        return h, start, tl.minimum(start + BLOCK_T, N), i, im, n, n * H + h

    @triton.jit
    def _lmix_fwd_block(acc, m0, g_ptr, tab_ptr, base, rows, im, d, s_m, G: tl.constexpr, M: tl.constexpr,
                        GATED: tl.constexpr, LOGITS: tl.constexpr, MB: tl.constexpr):  # fmt: skip
        """``acc (BLOCK_T, D)`` plus slots ``m0..m0+MB`` of every lane, weighted by their gates."""
        m = m0 + tl.arange(0, MB)
        mm = m < M
        g = _slot_gates(g_ptr, rows, m, im[:, None] & mm[None, :], G, GATED, LOGITS)
        return acc + tl.sum(g[:, :, None] * _slots_at(tab_ptr, base, im, m, mm, d, s_m), axis=1)

    @triton.jit
    def _lmix_fwd_kernel(v_ptr, g_ptr, tab_ptr, sid_ptr, order_ptr, out_ptr, N, H, s_vn, s_vh, s_id, s_m, s_h,
                         G: tl.constexpr, M: tl.constexpr, D: tl.constexpr, GATED: tl.constexpr,
                         LOGITS: tl.constexpr, MB: tl.constexpr, BLOCK_T: tl.constexpr,
                         ROLL: tl.constexpr):  # fmt: skip
        h, start, end, i, im, n, rows = _tile(sid_ptr, order_ptr, N, H, BLOCK_T)
        base = _row_base(
            sid_ptr, i, h, im, s_id, s_h
        )  # each lane's row offset, once for all slot blocks
        d = tl.arange(0, D)
        acc = tl.zeros((BLOCK_T, D), dtype=tl.float32)
        if ROLL:  # (see _lane_configs)
            for m0 in range(0, M, MB):
                acc = _lmix_fwd_block(acc, m0, g_ptr, tab_ptr, base, rows, im, d, s_m, G, M, GATED,
                                      LOGITS, MB)  # fmt: skip
        else:
            for m0 in tl.static_range(0, M, MB):
                acc = _lmix_fwd_block(acc, m0, g_ptr, tab_ptr, base, rows, im, d, s_m, G, M, GATED,
                                      LOGITS, MB)  # fmt: skip
        _store_mixed(acc, v_ptr, g_ptr, out_ptr, rows, n, h, im, d, s_vn, s_vh, G, D, GATED, LOGITS)

    @triton.jit
    def _lmix_bwd_block(m0, dout, g_ptr, tab_ptr, dg_ptr, base, dgo, rows, im, d, s_m, G: tl.constexpr,
                        M: tl.constexpr, GATED: tl.constexpr, LOGITS: tl.constexpr, MB: tl.constexpr):  # fmt: skip
        """Stores the gradients of every lane's gates of slots ``m0..m0+MB``: <slot, dout>."""
        m = m0 + tl.arange(0, MB)
        mm = m < M
        dg = tl.sum(_slots_at(tab_ptr, base, im, m, mm, d, s_m) * dout[:, None, :], axis=2)
        _store_gate_grads(
            dg, g_ptr, dg_ptr, dgo, rows, m, im[:, None] & mm[None, :], G, GATED, LOGITS
        )

    @triton.jit
    def _lmix_bwd_kernel(dout_ptr, v_ptr, g_ptr, tab_ptr, sid_ptr, order_ptr, dv_ptr, dg_ptr, N, H, s_vn, s_vh,
                         s_id, s_m, s_h, s_on, s_gn, G: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                         GATED: tl.constexpr, LOGITS: tl.constexpr, MB: tl.constexpr,
                         BLOCK_T: tl.constexpr, ROLL: tl.constexpr):  # fmt: skip
        # outputs as in _mix_bwd_kernel
        h, start, end, i, im, n, rows = _tile(sid_ptr, order_ptr, N, H, BLOCK_T)
        dvo, dgo = _out_rows(n, h, s_on, s_gn, D, G)
        base = _row_base(
            sid_ptr, i, h, im, s_id, s_h
        )  # each lane's row offset, once for all slot blocks
        d = tl.arange(0, D)
        dout = tl.load(dout_ptr + rows[:, None] * D + d[None, :], mask=im[:, None], other=0.0)
        dout = dout.to(tl.float32)
        if ROLL:  # (see _lane_configs)
            for m0 in range(0, M, MB):
                _lmix_bwd_block(m0, dout, g_ptr, tab_ptr, dg_ptr, base, dgo, rows, im, d, s_m, G, M,
                                GATED, LOGITS, MB)  # fmt: skip
        else:
            for m0 in tl.static_range(0, M, MB):
                _lmix_bwd_block(m0, dout, g_ptr, tab_ptr, dg_ptr, base, dgo, rows, im, d, s_m, G, M,
                                GATED, LOGITS, MB)  # fmt: skip
        _store_standard_grads(dout, v_ptr, g_ptr, dv_ptr, dvo, dg_ptr, dgo, rows, n, h, im, d, s_vn, s_vh,
                              G, GATED, LOGITS)  # fmt: skip

    # The dot form of the grouped kernels (``MIX_KERNEL = "dot"``): the program's tile of sorted
    # tokens is split into its groups of equal ids (each lane's group: the count of id changes
    # along the lanes before it), and the slots of JB groups at a time are loaded once, as one
    # ``(JB * M_PAD, D)`` tile, and applied to every lane by a tensor-core product with a one-hot
    # operand: the forward ``A @ S`` with ``A[t, j * M_PAD + m] = g[t, m]`` where lane t is in
    # group j (else 0), the backward ``dout @ S^T`` of which each lane keeps its own group's
    # columns. A repeated row is loaded once per tile rather than once per lane, and the gates'
    # gradients need no reduction across the threads that hold D. The group blocks' loads depend
    # only on registers, none on an earlier load, so they can be in flight together.

    _INTERPRETED = tl.constexpr(INTERPRET)

    @triton.jit
    def _dot16(a, b, acc):
        """``acc + a @ b`` of two operands of one 16-bit dtype: exact products, fp32 sums. (The
        interpreter's 16-bit products are wrong (Triton 3.8), so there the same product of the
        operands made fp32, which the interpreter takes exactly.)"""
        if _INTERPRETED:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _tile_groups(sid_ptr, i, im, start):
        """The tile's groups of equal ids: each lane's id ``s`` and group ``rank`` (the id
        changes along the sorted lanes before it; lanes past the end keep the last group's rank
        with id 0, which the group's max over its lanes ignores), and the number of groups."""
        s = tl.load(sid_ptr + i, mask=im, other=0)
        after = im & (i > start)
        change = after & (s != tl.load(sid_ptr + i - 1, mask=after, other=0))
        rank = tl.cumsum(change.to(tl.int32), axis=0)
        return s, rank, tl.max(rank, axis=0) + 1

    @triton.jit
    def _group_slots(tab_ptr, s, rank, j0, h, m, mm, d, s_id, s_m, s_h, JB: tl.constexpr,
                     M_PAD: tl.constexpr, D: tl.constexpr):  # fmt: skip
        """Groups ``j0..j0+JB`` of the tile: ``sel (BLOCK_T, JB)``, whether each lane is in each,
        and their slots of head ``h`` as one ``(JB * M_PAD, D)`` tile (zeros at padded slots and
        for the blocks past the tile's last group)."""
        j = j0 + tl.arange(0, JB)
        sel = rank[:, None] == j[None, :]
        gid = tl.max(tl.where(sel, s[:, None], -1), axis=0)  # each group's id; -1: no group
        base = gid.to(tl.int64) * s_id + h * s_h
        ptr = tab_ptr + base[:, None, None] + m[None, :, None] * s_m + d[None, None, :]
        slots = tl.load(ptr, mask=(gid >= 0)[:, None, None] & mm[None, :, None], other=0.0)
        return sel, tl.reshape(slots, (JB * M_PAD, D))

    @triton.jit
    def _dmix_fwd_kernel(v_ptr, g_ptr, tab_ptr, sid_ptr, order_ptr, out_ptr, N, H, s_vn, s_vh, s_id, s_m, s_h,
                         G: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
                         GATED: tl.constexpr, LOGITS: tl.constexpr, NATIVE: tl.constexpr,
                         TAB_TF32: tl.constexpr, JB: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        # NATIVE: the gates exact in the table's 16-bit dtype, one product in it; else the one-hot
        # gates in two TF32 parts (the table's slots exact in TF32 with TAB_TF32, else TF32 x 3)
        h, start, end, i, im, n, rows = _tile(sid_ptr, order_ptr, N, H, BLOCK_T)
        s, rank, U = _tile_groups(sid_ptr, i, im, start)
        m = tl.arange(0, M_PAD)
        mm = m < M
        d = tl.arange(0, D)
        g = _slot_gates(g_ptr, rows, m, im[:, None] & mm[None, :], G, GATED, LOGITS)
        # (padded slots: gates of 1 with logits, their slots loaded as zeros)
        acc = tl.zeros((BLOCK_T, D), dtype=tl.float32)
        for j0 in range(0, U, JB):
            sel, slots = _group_slots(
                tab_ptr, s, rank, j0, h, m, mm, d, s_id, s_m, s_h, JB, M_PAD, D
            )
            a = tl.reshape(tl.where(sel[:, :, None], g[:, None, :], 0.0), (BLOCK_T, JB * M_PAD))
            if NATIVE:
                acc = _dot16(a.to(slots.dtype), slots, acc)
            else:
                acc += _tf32_product(a, slots.to(tl.float32), TAB_TF32)
        _store_mixed(acc, v_ptr, g_ptr, out_ptr, rows, n, h, im, d, s_vn, s_vh, G, D, GATED, LOGITS)

    @triton.jit
    def _dmix_bwd_kernel(dout_ptr, v_ptr, g_ptr, tab_ptr, sid_ptr, order_ptr, dv_ptr, dg_ptr, N, H, s_vn, s_vh,
                         s_id, s_m, s_h, s_on, s_gn, G: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
                         D: tl.constexpr, GATED: tl.constexpr, LOGITS: tl.constexpr, NATIVE: tl.constexpr,
                         TAB_TF32: tl.constexpr, JB: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        # outputs as in _mix_bwd_kernel; NATIVE: dout in the table's 16-bit dtype, one product
        # in it (exact products), else dout in two TF32 parts
        h, start, end, i, im, n, rows = _tile(sid_ptr, order_ptr, N, H, BLOCK_T)
        dvo, dgo = _out_rows(n, h, s_on, s_gn, D, G)
        s, rank, U = _tile_groups(sid_ptr, i, im, start)
        m = tl.arange(0, M_PAD)
        mm = m < M
        d = tl.arange(0, D)
        dout = tl.load(dout_ptr + rows[:, None] * D + d[None, :], mask=im[:, None], other=0.0)
        dg = tl.zeros((BLOCK_T, M_PAD), dtype=tl.float32)
        for j0 in range(0, U, JB):
            sel, slots = _group_slots(
                tab_ptr, s, rank, j0, h, m, mm, d, s_id, s_m, s_h, JB, M_PAD, D
            )
            if NATIVE:
                r = _dot16(dout, tl.trans(slots), tl.zeros((BLOCK_T, JB * M_PAD), tl.float32))
            else:
                r = _tf32_product(dout.to(tl.float32), tl.trans(slots).to(tl.float32), TAB_TF32)
            r = tl.reshape(r, (BLOCK_T, JB, M_PAD))  # each lane keeps its own group's columns
            dg += tl.sum(tl.where(sel[:, :, None], r, 0.0), axis=1)
        _store_gate_grads(dg, g_ptr, dg_ptr, dgo, rows, m, im[:, None] & mm[None, :], G, GATED,
                          LOGITS)  # fmt: skip
        _store_standard_grads(dout.to(tl.float32), v_ptr, g_ptr, dv_ptr, dvo, dg_ptr, dgo, rows, n, h, im,
                              d, s_vn, s_vh, G, GATED, LOGITS)  # fmt: skip

    @triton.jit
    def _seg_add(f1, v1, f2, v2):
        """Combine of a segmented sum: a segment start (f2) on the right cuts the left's sum."""
        return f1 | f2, tl.where(f2 != 0, v2, v1 + v2)

    @triton.jit
    def _bank_tile_kernel(gts, dvs, order_ptr, sid_ptr, out_ptr, N, H, s_gl, s_gn, s_gh, s_dl,
                          L: tl.constexpr, G: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
                          LOGITS: tl.constexpr, STACKED: tl.constexpr, GSTACKED: tl.constexpr,
                          MB: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        # program (c, h): sorted tokens c*BLOCK_T.. of head h, its slots MB at a time: every
        # lane's sum over layers of g (x) dv at once, then a segmented sum over runs of equal
        # ids in the lanes; each run's total is written from its last lane, by a plain store
        # when the run lies inside the tile (no other program has that id), by an atomic add
        # when it may continue into a neighbouring tile. The tile's dv is read from memory for
        # the first slot block and from cache for the others (one program walks them in turn)
        h, start, end, i, im, n, rows = _tile(sid_ptr, order_ptr, N, H, BLOCK_T)
        d = tl.arange(0, D)
        k = tl.load(sid_ptr + i, mask=im, other=-1).to(tl.int64)
        prev = tl.load(sid_ptr + i - 1, mask=im & (i > start), other=-1).to(tl.int64)
        nxt = tl.load(sid_ptr + i + 1, mask=(i + 1) < end, other=-1).to(tl.int64)
        first = tl.broadcast_to((k != prev).to(tl.int32)[:, None, None], (BLOCK_T, MB, D))
        last = im & (k != nxt)
        edge = (k == tl.load(sid_ptr + start).to(tl.int64)) | (
            k == tl.load(sid_ptr + end - 1).to(tl.int64)
        )
        for j in tl.static_range(0, M, MB):
            m = j + tl.arange(0, MB)
            mm = m < M
            acc = tl.zeros((BLOCK_T, MB, D), dtype=tl.float32)
            goff = n[:, None] * s_gn + h * s_gh + (G - M) + m[None, :]
            gm = im[:, None] & mm[None, :]
            # The loop unrolled over the layers spills for sm_90 (ptxas: 1-57 kB of spill stores a thread, 9 kB at the
            # block chosen on H100s), yet the rolled loop, without spills, lost: autotuned beside
            # the unrolled one on the same H100 it was not chosen, and forced it took 2.46 ms of
            # a MoVE-x1 step on one H100 against 1.55 unrolled on another (the next layer's
            # loads not in flight; benchmarks/RESULTS.md, 2026-12-07 third session)
            for l in tl.static_range(L):
                x = tl.load(_layer_ptr(gts, l, s_gl, GSTACKED) + goff, mask=gm, other=0.0)
                g = tl.where(gm, _gate(x, LOGITS), 0.0)
                dv = tl.load(_layer_ptr(dvs, l, s_dl, STACKED) + rows[:, None] * D + d[None, :],
                             mask=im[:, None], other=0.0)  # fmt: skip
                acc += g[:, :, None] * dv.to(tl.float32)[:, None, :]
            _, acc = tl.associative_scan((first, acc), 0, _seg_add)
            ptr = (
                out_ptr
                + k[:, None, None] * (M * H * D)
                + m[None, :, None] * (H * D)
                + h * D
                + d[None, None, :]
            )
            mask = tl.broadcast_to(mm[None, :, None], (BLOCK_T, MB, D))
            tl.atomic_add(ptr, acc, mask=(last & edge)[:, None, None] & mask, sem="relaxed")
            tl.store(ptr, acc, mask=(last & ~edge)[:, None, None] & mask)

    @triton.jit
    def _tf32_parts(x):
        """fp32 ``x`` as ``hi + lo`` with ``hi`` exact in TF32 (its low 13 mantissa bits cleared)
        and ``lo`` the rest: TF32 products of each part by a TF32-exact operand (bf16 values are),
        summed in fp32, lose only ``lo``'s own rounding, about 2**-21 of ``x`` (and whatever the
        tensor cores' own accumulation of a block's products loses)."""
        hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return hi, x - hi

    @triton.jit
    def _tf32_product(gt, dv, DV_TF32: tl.constexpr):
        """``gt @ dv`` in fp32 from TF32 tensor-core products, summed from zero: ``gt`` in two
        TF32 parts; ``dv`` as it is where it is exact in TF32 (``DV_TF32``: bf16 / fp16
        values), else in two parts too (hi hi + lo hi + hi lo, TF32 x 3)."""
        hi, lo = _tf32_parts(gt)
        if DV_TF32:
            part = tl.dot(lo, dv, tl.dot(hi, dv, input_precision="tf32"), input_precision="tf32")
        else:
            dh, dl = _tf32_parts(dv)
            part = tl.dot(hi, dh, input_precision="tf32")
            part = tl.dot(lo, dh, part, input_precision="tf32")
            part = tl.dot(hi, dl, part, input_precision="tf32")
        return part

    @triton.jit
    def _zero_rows(out_ptr, lo, hi, row, cols, mm, M_PAD: tl.constexpr, D: tl.constexpr):
        """Zeros into rows ``lo..hi-1`` of the output (``row`` elements apart; this program's
        head and slots)."""
        for z in range(lo, hi):
            tl.store(out_ptr + z * row + cols, tl.zeros((M_PAD, D), dtype=tl.float32),
                     mask=mm[:, None])  # fmt: skip

    @triton.jit
    def _bank_runs_kernel(gts, dvs, order_ptr, sid_ptr, out_ptr, N, H, V, s_gl, s_gn, s_gh, s_dl,
                          L: tl.constexpr, G: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr,
                          D: tl.constexpr, LOGITS: tl.constexpr, STACKED: tl.constexpr,
                          GSTACKED: tl.constexpr, DV_TF32: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        # program (c, h): the runs of equal ids that start among sorted tokens c*BLOCK_T.. , head h.
        # Each run is summed whole by this program, walking past its tile while it lasts, as
        # tensor-core products g^T @ dv over BLOCK_T tokens at a time, one per layer (the gates in
        # two TF32 parts; each block's products summed in fp32 registers), and its row is written with a plain
        # store; the rows of ids no token has (between a run's id and the next) are written as
        # zeros by the same program. Every output element is written exactly once: no zero fill,
        # no atomics, the same bits on every run. The gates (or logits) of layer l: the l-th of
        # the tuple ``gts`` (or slice of one stacked tensor), token n and head h at
        # n * s_gn + h * s_gh (the views of a wider product read in place)
        c = tl.program_id(0)
        h = tl.program_id(1)
        lane = tl.arange(0, BLOCK_T)
        i = c * BLOCK_T + lane
        im = i < N
        k = tl.load(sid_ptr + i, mask=im, other=-1).to(tl.int64)
        kp = tl.load(sid_ptr + i - 1, mask=im & (i > 0), other=-1).to(tl.int64)
        first = im & (k != kp)  # a run starts here (its earlier part is no other tile's)
        rank = tl.cumsum(first.to(tl.int32), 0) - 1
        m = tl.arange(0, M_PAD)
        mm = m < M
        d = tl.arange(0, D)
        cols = m[:, None] * (H * D) + h * D + d[None, :]
        row = M * H * D  # elements of a bank row (M, H, D)
        if c == 0:  # the rows below the smallest id
            _zero_rows(out_ptr, 0, tl.load(sid_ptr).to(tl.int64), row, cols, mm, M_PAD, D)
        for r in range(0, tl.sum(first.to(tl.int32), 0)):
            q = tl.min(tl.where(first & (rank == r), i, N), 0)  # the run's first sorted position
            kid = tl.max(tl.where(i == q, k, -1), 0)
            acc = tl.zeros((M_PAD, D), dtype=tl.float32)
            more = q < N
            while more:
                j = q + lane
                sel = (j < N) & (tl.load(sid_ptr + j, mask=j < N, other=-1).to(tl.int64) == kid)
                tok = tl.load(order_ptr + j, mask=sel, other=0).to(tl.int64)
                goff = tok[:, None] * s_gn + h * s_gh + (G - M) + m[None, :]
                dvoff = (tok * H + h)[:, None] * D + d[None, :]
                gm = sel[:, None] & mm[None, :]
                for l in tl.static_range(L):
                    x = tl.load(_layer_ptr(gts, l, s_gl, GSTACKED) + goff, mask=gm, other=0.0)
                    g = tl.where(gm, _gate(x, LOGITS), 0.0)
                    dv = tl.load(_layer_ptr(dvs, l, s_dl, STACKED) + dvoff, mask=sel[:, None],
                                 other=0.0).to(tl.float32)  # fmt: skip
                    # this block's products summed in the tensor cores from zero, the run's sum
                    # in fp32 registers (not a long sum inside the tensor cores' accumulation)
                    acc += _tf32_product(tl.trans(g), dv, DV_TF32)
                n = tl.sum(sel.to(tl.int32), 0)
                q += n
                more = n == BLOCK_T  # a full block: the run may go on
            tl.store(out_ptr + kid * row + cols, acc, mask=mm[:, None])
            nxt = tl.load(sid_ptr + q, mask=q < N, other=V).to(tl.int64)
            _zero_rows(out_ptr, kid + 1, nxt, row, cols, mm, M_PAD, D)

    @triton.jit
    def _layer_bases(ps, s_l, L: tl.constexpr, LP: tl.constexpr, STACKED: tl.constexpr,
                     ALIGNED: tl.constexpr):  # fmt: skip
        """The L layers' base pointers as one ``(LP,)`` tensor (rows from L on repeat layer 0,
        for the caller to mask): of the tuple ``ps``, or the slices of one stacked tensor.
        ``ALIGNED``: every one is 16-byte aligned (the caller checked), said to the compiler,
        which loses the pointers' own alignment through the selects: with it, rows of 8 bf16
        load as 16-byte asynchronous copies, pipelined; without, as 2-byte loads."""
        li = tl.arange(0, LP)
        if STACKED:
            base = ps + li.to(tl.int64) * s_l
        else:
            base = ps[0] + tl.zeros((LP,), dtype=tl.int64)
            for l in tl.static_range(1, L):
                base = tl.where(li == l, ps[l], base)
        if ALIGNED:
            base = tl.multiple_of(base, 16)
        return base

    @triton.jit
    def _bank_layers_kernel(gts, dvs, order_ptr, sid_ptr, out_ptr, N, H, s_gl, s_gn, s_gh, s_dl,
                            L: tl.constexpr, LP: tl.constexpr, G: tl.constexpr, M: tl.constexpr,
                            M_PAD: tl.constexpr, D: tl.constexpr, LOGITS: tl.constexpr,
                            STACKED: tl.constexpr, GSTACKED: tl.constexpr, DV_TF32: tl.constexpr,
                            DV_ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                            STAGES: tl.constexpr):  # fmt: skip
        # program (c, h): sorted tokens c*CHUNK.. of head h, one at a time, each token's sum over
        # the L layers as one tensor-core product g^T @ dv, (M, LP) @ (LP, D), from two 2-D loads
        # (the layers' rows gathered through a tensor of L base pointers: no stacked copy), the
        # gates in two TF32 parts (as the runs kernel). A run of equal ids sums in fp32 registers
        # and is written where it ends: by a plain store when the whole run lies in this chunk,
        # else added to its bank row (zeroed before) by an atomic add. The loop has no branch
        # (store and add masked, the sum reset by a select), so its loads can be pipelined
        # STAGES deep
        c = tl.program_id(0)
        h = tl.program_id(1)
        li = tl.arange(0, LP)
        lm = li < L
        m = tl.arange(0, M_PAD)
        mm = m < M
        d = tl.arange(0, D)
        gm = lm[:, None] & mm[None, :]
        # (the gates' rows start at G - M: not aligned whatever their base)
        gb = (
            _layer_bases(gts, s_gl, L, LP, GSTACKED, False)[:, None]
            + ((G - M) + h * s_gh)
            + m[None, :]
        )
        db = _layer_bases(dvs, s_dl, L, LP, STACKED, DV_ALIGNED)[:, None] + h * D + d[None, :]
        cols = m[:, None] * (H * D) + h * D + d[None, :]
        start = c * CHUNK
        end = tl.minimum(start + CHUNK, N)
        acc = tl.zeros((M_PAD, D), dtype=tl.float32)
        # whether the run now summed started in this chunk (no earlier program has its id)
        fresh = (start == 0) | (
            tl.load(sid_ptr + start - 1, mask=start > 0, other=-1) != tl.load(sid_ptr + start)
        )
        # the gates' rows are not 16-byte aligned (they start at G - M), so the pipelining's
        # asynchronous copies cannot take them: each token's gates are loaded one step ahead
        x = tl.load(gb + tl.load(order_ptr + start).to(tl.int64) * s_gn, mask=gm, other=0.0)
        for i in tl.range(start, end, num_stages=STAGES):
            k = tl.load(sid_ptr + i).to(tl.int64)
            ends = k != tl.load(sid_ptr + i + 1, mask=i + 1 < N, other=-1).to(tl.int64)
            last = ends | (i + 1 == end)  # the run ends here, or this chunk does
            whole = fresh & ends  # the whole run is this program's: a plain store
            tok = tl.load(order_ptr + i).to(tl.int64)  # b*T + t
            nxt = i + 1 < end
            tn = tl.load(order_ptr + i + 1, mask=nxt, other=0).to(tl.int64)
            x_next = tl.load(gb + tn * s_gn, mask=gm & nxt, other=0.0)
            g = tl.where(gm, _gate(x, LOGITS), 0.0)
            dv = tl.load(db + tok * (H * D), mask=lm[:, None], other=0.0).to(tl.float32)
            acc += _tf32_product(tl.trans(g), dv, DV_TF32)  # (M_PAD, LP) @ (LP, D)
            ptr = out_ptr + k * (M * H * D) + cols
            tl.store(ptr, acc, mask=mm[:, None] & whole)
            tl.atomic_add(ptr, acc, mask=mm[:, None] & last & ~whole, sem="relaxed")
            acc = tl.where(last, 0.0, acc)
            fresh = fresh | last
            x = x_next


BANK_KERNEL: str | None = None
"""The bank gradient's kernel: ``"layers"`` (``_bank_layers_kernel``: a walk over the tokens
sorted by id, each token's sum over the layers one tensor-core product, at any slots; a run of
one id stored where it ends inside a program's chunk, else added by an fp32 atomic, so the last
bits may differ between runs), ``"lanes"`` (the fp32 sums per token of ``_bank_tile_kernel`` /
``_bank_rows_kernel``, as ``BANK_TILE_MAX_SLOTS`` picks, added into a zeroed output; fp32
atomics where a run of one id crosses a tile), or ``"runs"`` (``_bank_runs_kernel``: each run of
equal ids summed whole by one program as tensor-core products, every row written once, zeros
included: no atomics, the same bits on every run). None (default): ``"runs"`` under
``torch.use_deterministic_algorithms(True)`` (Lightning's ``Trainer(deterministic=True)``), else
``"layers"``, the fastest: on an H100 at GPT-B's shapes (``benchmarks/bank_grad.py``, uniform ids)
layers took 1.25 / 2.54 ms against lanes' 1.63 / 5.12 and runs' 3.97 / 6.90 (6 / 24 slots), on
Zipf(1) ids 1.31 / 2.36 against 1.61 / 4.87 and 7.08 / 8.23 (``benchmarks/RESULTS.md``,
2026-12-07 eighth session)."""


BANK_KERNELS = ("runs", "lanes", "layers")


def bank_kernel() -> str:
    """The bank gradient's kernel now: :data:`BANK_KERNEL`, or where None as it says."""
    if BANK_KERNEL is not None:
        if BANK_KERNEL not in BANK_KERNELS:
            raise ValueError(
                f"kernels.BANK_KERNEL: one of {BANK_KERNELS} or None, not {BANK_KERNEL!r}"
            )
        return BANK_KERNEL
    return "runs" if torch.are_deterministic_algorithms_enabled() else "layers"


BANK_TILE_MAX_SLOTS = 8
"""With ``BANK_KERNEL = "lanes"``: the bank gradient as a segmented sum over tiles of sorted tokens (``_bank_tile_kernel``) up to
this many slots, one token at a time (``_bank_rows_kernel``) above. Measured on an H200 (12 layers, 65,536 tokens, GPT-B): M = 6 1.34 vs 2.07 ms, M = 24
4.33 vs 2.86 ms (``benchmarks/RESULTS.md``, 2026-12-03 fifth section)."""


def _lane_configs(roll: bool = False):
    """Autotuned (BLOCK_T, MB, warps) of the lane kernels; one small block in the interpreter.
    ``roll``: each shape also with ``ROLL`` (the mix kernels' loop over slot blocks kept rolled
    rather than unrolled: fewer registers, so fewer spills at the larger blocks (ptxas for sm_90,
    x4's grouped backward at BLOCK_T 32, MB 8, 4 warps: 552 bytes of spill stores a thread
    unrolled, 108 rolled), against loads in flight from every slot block at once; the
    autotuner measures both)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 16, "MB": 4, **({"ROLL": True} if roll else {})},
                              num_warps=4)]  # fmt: skip
    rolls = ({"ROLL": False}, {"ROLL": True}) if roll else ({},)
    return [triton.Config({"BLOCK_T": t, "MB": mb, **r}, num_warps=w) for t in (16, 32, 64, 128)
            for mb in (2, 4, 8) for w in (4, 8) for r in rolls]  # fmt: skip


def _tile_configs():
    """(BLOCK_T, MB, warps) of ``_bank_tile_kernel``: the lane kernels' blocks at 16 tokens and
    4 or 8 slots. On H100s the autotuner chose 16 tokens for all nine recorded (shape, form) keys
    of the twelve blocks offered (and 8 slots for eight of them; 2026-12-07, fourth to seventh
    sessions), while compiling the twelve took about 60 s a key on a fresh machine."""
    if INTERPRET:
        return _lane_configs()
    return [triton.Config({"BLOCK_T": 16, "MB": mb}, num_warps=w) for mb in (4, 8) for w in (4, 8)]


def _runs_configs():
    """The warps of ``_bank_runs_kernel`` autotuned, its tile fixed at 16 tokens: the autotuner
    chose 16 of 16 / 32 / 64 at every shape on an H100 (2026-12-07 sixth session), and a fixed
    tile fixes the order of each run's sums, so repeated runs give the same bits (what
    ``torch.use_deterministic_algorithms`` asks for). Not 8: Triton 3.6 (the GPU's) refuses TF32
    products over fewer than 16 rows (3.8 takes 8). One warp in the interpreter."""
    return [triton.Config({"BLOCK_T": 16}, num_warps=w) for w in ((1,) if INTERPRET else (1, 2, 4))]


def _layers_configs():
    """(CHUNK, STAGES, warps) of ``_bank_layers_kernel``: tokens a program walks, how deep its
    loads are pipelined, warps (none spills for sm_90 at GPT-B's shapes; one warp did at 24
    slots, 184 bytes a thread); one small case in the interpreter."""
    if INTERPRET:
        return [triton.Config({"CHUNK": 16, "STAGES": 1}, num_warps=1)]
    return [triton.Config({"CHUNK": c, "STAGES": s}, num_warps=w)
            for c, s, w in ((64, 1, 4), (64, 3, 4), (16, 3, 4), (64, 3, 2), (16, 3, 2), (16, 2, 2))]  # fmt: skip


MIX_KERNEL: str | None = None
"""The form of the mix kernels grouped by id (``MoVEBank.group_by_id``): ``"lanes"``
(``_lmix_*``: every lane of a tile loads its own slots, fp32 FMAs) or ``"dot"`` (``_dmix_*``:
the tile's groups of equal ids load their slots once, applied to the lanes by tensor-core
products with a one-hot operand; heads of at least 16 dimensions), forward and backward.
``"dot-bwd"``: the lanes forward and the dot backward, as measured on an H100 at GPT-B's
shapes (with dot blocks of 16, 32 and 64 tokens) (``benchmarks/move_mix.py``, 12 layers, 65,536 tokens; uniform / Zipf(0.3) ids):
the forward 5.40 / 5.49 ms lanes against 5.53 / 5.45 dot at 24 slots, 2.99 / 2.59 against
3.20 / 2.91 at 6; the backward with the bank gradient 9.90 / 9.83 against 8.49 / 8.50 at 24,
5.71 / 6.60 against 4.53 / 5.92 at 6 (``benchmarks/RESULTS.md``, 2026-12-07 ninth session).
None (default): ``"lanes"``, until the dot form's GPU tests
(``test_grouped_mix_dot_form_at_gpt_b_scale_on_gpu``) have passed on a GPU; then
``"dot-bwd"``."""

MIX_KERNELS = ("lanes", "dot", "dot-bwd")


def mix_kernel(table: torch.Tensor, bwd: bool) -> str:
    """The grouped mix kernels' form for ``table (N, M, H, D)``, forward or (``bwd``) backward:
    :data:`MIX_KERNEL`, or where None as it says; ``"lanes"`` for heads under 16 dimensions
    (too narrow for the products)."""
    if MIX_KERNEL is not None and MIX_KERNEL not in MIX_KERNELS:
        raise ValueError(f"kernels.MIX_KERNEL: one of {MIX_KERNELS} or None, not {MIX_KERNEL!r}")
    form = MIX_KERNEL or "lanes"
    if form == "dot-bwd":
        form = "dot" if bwd else "lanes"
    return form if table.shape[-1] >= 16 else "lanes"


def _dot_configs():
    """(BLOCK_T, JB, warps) of the dot-form mix kernels: tokens a program takes, groups a
    product takes; four warps, eight at 128 tokens. (Of 16, 32 and 64 tokens an H100 chose 16
    or 64 for each of five keys, 2026-12-07 ninth session.)"""
    return [triton.Config({"BLOCK_T": t, "JB": jb}, num_warps=8 if t > 64 else 4)
            for t in (16, 64, 128) for jb in (1, 2, 4, 8)]  # fmt: skip


def _dot_prune(configs, named_args, **kwargs):
    """Keep the group blocks whose products are 16 to 64 wide (``JB * M_PAD``: 16 the least the
    tensor cores take), one group a block where a group alone is wider; in the interpreter the
    narrowest block of 16 tokens (the most group blocks a tile)."""
    w = kwargs["M_PAD"]
    keep = [c for c in configs if 16 <= c.kwargs["JB"] * w <= 64] or [
        c for c in configs if c.kwargs["JB"] == 1
    ]
    return keep[:1] if INTERPRET else keep


def _grouped_kernel(bwd: bool, table: torch.Tensor, x: torch.Tensor, logits: bool):
    """The grouped mix kernel, forward or (``bwd``) backward, of the form :func:`mix_kernel`
    picks, with the keyword arguments only the dot form takes; ``x`` is what meets the slots in
    its product (the gates forward, ``dout`` backward). Its product runs natively in the table's
    16-bit dtype where ``x`` is exact in it (the gates as they are, or ``dout``), else in TF32
    parts."""
    if mix_kernel(table, bwd) == "lanes":
        return (_lmix_bwd_kernel if bwd else _lmix_fwd_kernel), {}
    half = table.dtype in (torch.bfloat16, torch.float16)
    native = half and x.dtype == table.dtype and (bwd or not logits)
    return (_dmix_bwd_kernel if bwd else _dmix_fwd_kernel), {
        "M_PAD": _pad(table.shape[1]),
        "NATIVE": native,
        "TAB_TF32": half,
    }


def _lane_prune(limit: int):
    def prune(configs, named_args, **kwargs):
        """Keep the blocks whose ``(BLOCK_T, MB, D)`` tile holds 2048 to ``limit`` elements and
        whose slot block is no wider than M needs."""
        D, M = kwargs["D"], kwargs["M"]
        keep = [c for c in configs if 2048 <= c.kwargs["BLOCK_T"] * c.kwargs["MB"] * D <= limit
                and c.kwargs["MB"] <= _pad(M)]  # fmt: skip
        return keep or configs[:1]

    return prune


if HAVE_TRITON:
    _lmix_fwd_kernel = _autotune(_lane_configs(roll=True), key=["M", "D", "G", "LOGITS"],
                                       prune_configs_by={"early_config_prune": _lane_prune(16384)})(
        _lmix_fwd_kernel)  # fmt: skip
    _lmix_bwd_kernel = _autotune(_lane_configs(roll=True), key=["M", "D", "G", "LOGITS"],
                                       prune_configs_by={"early_config_prune": _lane_prune(16384)})(
        _lmix_bwd_kernel)  # fmt: skip
    _dmix_fwd_kernel = _autotune(
        _dot_configs(),
        key=["M", "D", "G", "LOGITS", "NATIVE", "TAB_TF32"],
        prune_configs_by={"early_config_prune": _dot_prune},
    )(_dmix_fwd_kernel)
    _dmix_bwd_kernel = _autotune(
        _dot_configs(),
        key=["M", "D", "G", "LOGITS", "NATIVE", "TAB_TF32"],
        prune_configs_by={"early_config_prune": _dot_prune},
    )(_dmix_bwd_kernel)
    # the bank kernel adds into its output: every autotuning run starts from zeros
    _bank_tile_kernel = _autotune(_tile_configs(), key=["M", "D", "G", "L", "STACKED", "GSTACKED", "LOGITS"], reset_to_zero=["out_ptr"],
                                        prune_configs_by={"early_config_prune": _lane_prune(8192)})(
        _bank_tile_kernel)  # fmt: skip
    _bank_layers_kernel = _autotune(
        _layers_configs(),
        key=["M", "D", "G", "L", "STACKED", "GSTACKED", "LOGITS", "DV_TF32", "DV_ALIGNED"],
        reset_to_zero=["out_ptr"],
    )(_bank_layers_kernel)
    # every output element written once (no accumulation): autotuning needs no reset
    _bank_runs_kernel = _autotune(
        _runs_configs(), key=["M", "D", "G", "L", "STACKED", "GSTACKED", "LOGITS", "DV_TF32"]
    )(_bank_runs_kernel)


def _lane_grid(N: int, H: int):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_T"]), H)


GROUP_MIN_TOKENS = 65536
GROUP_MIN_SLOTS = 16
"""``group_pays``: the grouped kernels from these tokens per forward and slots on. Measured on an
H200 at GPT-B shapes, 65,536 tokens (``benchmarks/RESULTS.md``, 2026-12-03 fifth section): with
M = 24 grouping pays (the mix kernels without the bank gradient, forward + backward, 12 layers,
uniform ids: 9.6 ms grouped against 17.3 ms per token); with M = 6 it is a wash (4.0 vs 4.6 ms
of those kernels, but 8.99 vs 8.16 ms of timed forward + backward, and a step of 1.110 vs 1.115x
the standard), so M = 6 keeps the per-token kernels. Smaller batches are unmeasured and keep
them too."""


def group_pays(tokens: int, slots: int) -> bool:
    """Whether the training mix runs grouped by id for a forward of ``tokens`` ids and ``slots``
    slots (``MoVEBank.group_by_id`` None): where it was measured to pay (``GROUP_MIN_*``)."""
    return tokens >= GROUP_MIN_TOKENS and slots >= GROUP_MIN_SLOTS


def id_groups(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sort of the flat ids for every layer's grouped kernels and the bank gradient:
    ``(sid, order)``, int32 ``(B*T,)``: the sorted ids and the flat position of each sorted
    token. No host sync."""
    sid, order = torch.sort(ids.reshape(-1))
    return sid.to(torch.int32), order.to(torch.int32)


@torch.library.custom_op("movegen::gmix_fwd", mutates_args=())
def gmix_fwd(v: torch.Tensor, gates: torch.Tensor, table: torch.Tensor, sid: torch.Tensor, order: torch.Tensor,
             gated: bool, logits: bool = False) -> torch.Tensor:  # fmt: skip
    """``mix_fwd`` with the tokens grouped by id (``id_groups`` of the ids): same arguments, the
    ids given as their sort."""
    B, T, H, D = v.shape
    table, _, s_id, s_m, s_h = _table_args(table, sid)
    v, s_vn, s_vh = _as_rows(v)
    out = torch.empty(B, T, H, D, device=v.device, dtype=v.dtype)
    kern, extra = _grouped_kernel(False, table, gates, logits)
    kern[_lane_grid(B * T, H)](v, gates.contiguous(), table, sid, order, out, B * T, H, s_vn, s_vh, s_id, s_m,
                               s_h, G=gates.shape[-1], M=table.shape[1], D=D, GATED=int(gated), LOGITS=logits,
                               **extra)  # fmt: skip
    return out


@_fake(gmix_fwd)
def _(v, gates, table, sid, order, gated, logits=False):
    return torch.empty(v.shape, dtype=v.dtype, device=v.device)


@torch.library.custom_op("movegen::gmix_bwd", mutates_args=())
def gmix_bwd(dout: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, table: torch.Tensor, sid: torch.Tensor,
             order: torch.Tensor, gated: bool, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``mix_bwd`` with the tokens grouped by id: ``dv``, ``dg``."""
    return _mix_bwd_new(dout, v, gates, table, sid, sid, order, gated, logits)


@_fake(gmix_bwd)
def _(dout, v, gates, table, sid, order, gated, logits=False):
    return torch.empty(v.shape, dtype=v.dtype, device=v.device), torch.empty(
        gates.shape, dtype=gates.dtype, device=gates.device
    )


def _as_rows(v: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``v (B, T, H, D)`` addressed as rows (b*T + t, h): a view as it is when D has unit stride
    and (B, T) merge (the model's QKV split), else a contiguous copy. Returns (v, s_bt, s_h)."""
    B, T, H, D = v.shape
    if v.stride(3) != 1 or (B > 1 and v.stride(0) != T * v.stride(1)):
        v = v.contiguous()
    return v, v.stride(1), v.stride(2)


def _unit_d(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride on its last dim: as it is, or a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _table_args(table: torch.Tensor, ids: torch.Tensor) -> tuple:
    """``table (N, M, H, D)`` with unit stride on D, flat ids, and the strides (s_id, s_m, s_h)."""
    table = _unit_d(table)
    return table, ids.contiguous(), *table.stride()[:3]


def _grid(R: int):
    return lambda meta: (triton.cdiv(R, meta["BLOCK_R"]),)


@torch.library.custom_op("movegen::mix_fwd", mutates_args=())
def mix_fwd(v: torch.Tensor, gates: torch.Tensor, table: torch.Tensor, ids: torch.Tensor,
            gated: bool, logits: bool = False) -> torch.Tensor:  # fmt: skip
    """``v (B, T, H, D)``, ``gates (B, T, H, G)``, ``table (N, M, H, D)`` (any strides, unit on D),
    ``ids (B, T)`` int32/int64 rows of the table -> mixed ``(B, T, H, D)`` in ``v``'s dtype.
    ``logits``: ``gates`` holds the router's logits; the gates ``2 * sigmoid`` of them are formed
    in the kernel (and ``mix_bwd`` returns the logits' gradient)."""
    B, T, H, D = v.shape
    M, G = table.shape[1], gates.shape[-1]
    table, ids, s_id, s_m, s_h = _table_args(table, ids)
    v, s_vn, s_vh = _as_rows(v)
    out = torch.empty(B, T, H, D, device=v.device, dtype=v.dtype)
    R = B * T * H
    _mix_fwd_kernel[_grid(R)](v, gates.contiguous(), table, ids, out, R, H, s_vn, s_vh, s_id, s_m, s_h, G=G, M=M,
                              M_PAD=_pad(M), D=D, GATED=int(gated), LOGITS=logits)  # fmt: skip
    return out


@_fake(mix_fwd)
def _(v, gates, table, ids, gated, logits=False):
    return torch.empty(v.shape, dtype=v.dtype, device=v.device)


@torch.library.custom_op("movegen::mix_bwd", mutates_args=())
def mix_bwd(dout: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, table: torch.Tensor, ids: torch.Tensor,
            gated: bool, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients of ``mix_fwd`` for ``v`` and ``gates`` (the table's via ``bank_rows_grad``):
    ``dout (B, T, H, D)`` -> ``dv (B, T, H, D)``, ``dg (B, T, H, G)`` in the dtypes of v, gates."""
    return _mix_bwd_new(dout, v, gates, table, ids, None, None, gated, logits)


def _mix_bwd_new(dout, v, gates, table, ids, sid, order, gated: bool, logits: bool) -> tuple:
    """:func:`_mix_bwd_into` new tensors ``dv (B, T, H, D)``, ``dg (B, T, H, G)`` in the dtypes of
    v and the gates; returns them."""
    B, T, H, D = v.shape
    G = gates.shape[-1]
    dv = torch.empty(B, T, H, D, device=v.device, dtype=v.dtype)
    dg = torch.empty(B, T, H, G, device=v.device, dtype=gates.dtype)
    _mix_bwd_into(dout, v, gates, table, ids, sid, order, dv, H * D, dg, H * G, gated, logits)
    return dv, dg


@_fake(mix_bwd)
def _(dout, v, gates, table, ids, gated, logits=False):
    return torch.empty(v.shape, dtype=v.dtype, device=v.device), torch.empty(
        gates.shape, dtype=gates.dtype, device=gates.device
    )


@torch.library.custom_op("movegen::bank_rows_grad", mutates_args=())
def bank_rows_grad(gs: list[torch.Tensor], dvs: list[torch.Tensor], ids: torch.Tensor, num_rows: int, slots: int,
                   sid: torch.Tensor | None = None, order: torch.Tensor | None = None,
                   logits: bool = False) -> torch.Tensor:  # fmt: skip
    """The bank gradient in one pass: ``gs`` the L layers' gates ``(B, T, H, G)`` and ``dvs``
    their value gradients ``(B, T, H, D)``, each either as L tensors, each read where it lies
    (a tuple of L pointers: no stacked copy; the gates may be views with rows of their own
    stride, as a slice of a wider product: every kernel reads them in place), or as one
    stacked ``(L, B, T, H, ·)``; ``ids (B, T)``
    -> fp32 ``(num_rows, M, H, D)``, row ``k`` = sum over the tokens with id ``k`` and over
    layers of ``g_l[..., -M:] (x) dv_l``. Tokens are visited in id order. :func:`bank_kernel`:
    ``"runs"`` sums each run of one id whole in one program and writes every row once, the
    rows of absent ids as zeros (the same bits on every run); ``"lanes"`` adds each run's sum
    into a zeroed output (fp32 atomics where a run crosses a tile: the order of the adds, and
    so the last bits, may vary between runs); ``"layers"`` walks the tokens in id order with
    each token's sum over the layers one tensor-core product, into a zeroed output (atomics
    where a run crosses a chunk, as the lanes kernels). ``sid, order``: the ids sorted before
    (``id_groups``, as the grouped forward sorted them), else sorted here. ``logits``: ``gs``
    holds the router's logits (gates ``2 * sigmoid`` of them)."""
    gstacked = len(gs) == 1 and gs[0].dim() == 5
    L, (B, T, H, G) = (gs[0].shape[0], gs[0].shape[1:]) if gstacked else (len(gs), gs[0].shape)
    D = dvs[0].shape[-1]
    stacked = len(dvs) == 1 and dvs[0].dim() == 5
    layers = dvs[0].shape[0] if stacked else len(dvs)
    if layers != L or len({d.dtype for d in dvs}) != 1 or len({g.dtype for g in gs}) != 1:
        raise ValueError(f"gs, dvs: {L} gates and value gradients of one dtype each, or one stack of them, "
                         f"expected; got {[(tuple(t.shape), t.dtype) for t in (*gs, *dvs)]}")  # fmt: skip
    dvs = tuple(d.contiguous() for d in dvs)
    s_dl = dvs[0].stride(0) if stacked else 0
    if stacked:  # one pointer, as the kernels took it before the tuple form
        dvs = dvs[0]
    if sid is None or order is None:
        sid, order = torch.sort(ids.reshape(-1))
    N, chunk = B * T, 64
    if gstacked:
        gts = gs[0].contiguous()
        s_gl = gts.stride(0)
    else:  # in place where every layer's view has one token stride and unit stride on G
        s0 = gs[0].stride()
        inplace = s0[3] == 1 and s0[0] == T * s0[1] and all(g.stride() == s0 for g in gs)
        gts, s_gl = tuple(g if inplace else g.contiguous() for g in gs), 0
    st = (gts if gstacked else gts[0]).stride()[-3:-1]  # (token, head) strides
    consts = dict(L=L, G=G, M=slots, D=D, LOGITS=logits, STACKED=stacked, GSTACKED=gstacked)
    if N == 0:  # no token: nothing to launch (nor to autotune on, for every later batch)
        return torch.zeros(num_rows, slots, H, D, device=ids.device, dtype=torch.float32)
    dv0 = dvs if stacked else dvs[0]
    # bf16 / fp16 value gradients are exact in TF32 (the tensor-core kernels give fp32 ones a
    # third product)
    exact = dv0.dtype in (torch.bfloat16, torch.float16)
    kern = bank_kernel()
    if kern == "runs":
        out = torch.empty(num_rows, slots, H, D, device=ids.device, dtype=torch.float32)
        _bank_runs_kernel[_lane_grid(N, H)](gts, dvs, order, sid, out, N, H, num_rows, s_gl, *st, s_dl,
                                            M_PAD=_pad(slots), DV_TF32=exact, **consts)  # fmt: skip
        return out
    out = torch.zeros(num_rows, slots, H, D, device=ids.device, dtype=torch.float32)
    if kern == "layers":
        aligned = all(t.data_ptr() % 16 == 0 for t in ((dvs,) if stacked else dvs)) and (
            s_dl * dv0.element_size() % 16 == 0
        )
        grid = lambda meta: (triton.cdiv(N, meta["CHUNK"]), H)  # noqa: E731
        # the products' inner and outer sizes at least 16 (Triton 3.6 refuses smaller TF32 ones)
        _bank_layers_kernel[grid](gts, dvs, order, sid, out, N, H, s_gl, *st, s_dl, LP=max(16, _pad(L)),
                                  M_PAD=max(16, _pad(slots)), DV_TF32=exact, DV_ALIGNED=aligned,
                                  **consts)  # fmt: skip
        return out
    if slots <= BANK_TILE_MAX_SLOTS:
        _bank_tile_kernel[_lane_grid(N, H)](
            gts, dvs, order, sid, out, N, H, s_gl, *st, s_dl, **consts
        )
        return out
    _bank_rows_kernel[(triton.cdiv(N, chunk), H)](gts, dvs, order, sid, out, N, H, s_gl, *st, s_dl,
                                                  M_PAD=_pad(slots), CHUNK=chunk, num_warps=4,
                                                  **consts)  # fmt: skip
    return out


@_fake(bank_rows_grad)
def _(gs, dvs, ids, num_rows, slots, sid=None, order=None, logits=False):
    H, D = dvs[0].shape[-2:]
    return torch.empty(num_rows, slots, H, D, dtype=torch.float32, device=dvs[0].device)


@torch.library.custom_op("movegen::rows_grad", mutates_args=())
def rows_grad(grad: torch.Tensor, ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sum of the gradients of gathered rows per id: ``grad (B, T, C)`` -> ``(num_rows, C)``,
    with PyTorch's sort-based embedding backward (no atomics)."""
    return torch.ops.aten.embedding_dense_backward(grad.contiguous(), ids, num_rows, -1, False)


@_fake(rows_grad)
def _(grad, ids, num_rows):
    return torch.empty(num_rows, grad.shape[-1], dtype=grad.dtype, device=grad.device)


# --------------------------------------------------------------------------- one-token decoding
#
# A decoding step of one layer after the QKV (and router) product, in one launch per layer:
# RoPE on q and k at the step's position, the value mix (MoVE bank rows or a LaVE table row,
# gates from the router logits), the write of k and the mixed v into the static cache, and
# attention of the one query over cache positions 0..pos (the current key and value come from
# registers). One program per (row, head); an online softmax over blocks of cached keys
# (:class:`DecodeLaunch`) whose loop stops at the positions written so far.

if HAVE_TRITON:

    @triton.jit
    def _decode_kernel(proj_ptr, s_pb, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, y_ptr, tab_ptr, ids_ptr,
                       s_id, s_m, H, T_MAX, scale, D: tl.constexpr, MEM: tl.constexpr, M: tl.constexpr,
                       M_PAD: tl.constexpr, G: tl.constexpr, GATED: tl.constexpr, BLOCK_T: tl.constexpr,
                       STAGES: tl.constexpr):  # fmt: skip
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        pos = tl.load(pos_ptr)
        dd = tl.arange(0, D)
        row = proj_ptr + b * s_pb
        dm = H * D
        ty = kc_ptr.dtype.element_ty
        if MEM:  # issue the memory-row loads first: their addresses hang on the id load
            m = tl.arange(0, M_PAD)
            mm = m < M
            tok = tl.load(ids_ptr + b)
            mem = tl.load(tab_ptr + tok * s_id + m[:, None] * s_m + h * D + dd[None, :], mask=mm[:, None],
                          other=0.0).to(tl.float32)  # fmt: skip
        # RoPE on consecutive pairs: x'[2i] = x[2i] c - x[2i+1] s, x'[2i+1] = x[2i+1] c + x[2i] s
        c = tl.load(cos_ptr + pos * (D // 2) + dd // 2)
        s = tl.load(sin_ptr + pos * (D // 2) + dd // 2) * tl.where(dd % 2 == 0, -1.0, 1.0)
        q = tl.load(row + h * D + dd).to(tl.float32)
        q = q * c + tl.load(row + h * D + (dd ^ 1)).to(tl.float32) * s
        k = tl.load(row + dm + h * D + dd).to(tl.float32)
        k = k * c + tl.load(row + dm + h * D + (dd ^ 1)).to(tl.float32) * s
        v = tl.load(row + 2 * dm + h * D + dd).to(tl.float32)
        if MEM:  # v' = g0 v + sum_m g_m E[id, m, head slice], gates 2 sigmoid(router logits)
            gt = proj_ptr.dtype.element_ty
            lg = row + 3 * dm + h * G
            g = 2.0 * tl.sigmoid(tl.load(lg + GATED + m, mask=mm, other=0.0).to(tl.float32))
            g = g.to(gt).to(tl.float32)
            if GATED:
                g0 = (2.0 * tl.sigmoid(tl.load(lg).to(tl.float32))).to(gt).to(tl.float32)
                v = g0 * v
            v = v + tl.sum(g[:, None] * mem, axis=0)
        # the cache holds ty values: attend with the rounded ones, as a cached read would
        q = q.to(ty).to(tl.float32)
        k = k.to(ty)
        v = v.to(ty)
        base = (b * H + h) * T_MAX * D
        tl.store(kc_ptr + base + pos * D + dd, k)
        tl.store(vc_ptr + base + pos * D + dd, v)
        m_i = tl.sum(q * k.to(tl.float32), axis=0) * scale  # the current position's score
        l_i = m_i * 0.0 + 1.0
        acc = v.to(tl.float32)
        for start in tl.range(0, pos, BLOCK_T, num_stages=STAGES):
            j = start + tl.arange(0, BLOCK_T)
            jm = j < pos
            kt = tl.load(kc_ptr + base + j[:, None] * D + dd[None, :], mask=jm[:, None], other=0.0)
            vt = tl.load(vc_ptr + base + j[:, None] * D + dd[None, :], mask=jm[:, None], other=0.0)
            sc = tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * scale
            sc = tl.where(jm, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=0))
            p = tl.exp(sc - m_new)
            alpha = tl.exp(m_i - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        tl.store(y_ptr + b * dm + h * D + dd, (acc / l_i).to(y_ptr.dtype.element_ty))


@dataclass(frozen=True, kw_only=True)
class DecodeLaunch:
    """Launch settings of the decoding kernel. The defaults were the fastest of a sweep on an
    H100 at 32, 128 and 512 cache rows (``benchmarks/decode_kernel.py``, ``benchmarks/RESULTS.md``)."""

    block_t: int = 32
    """Cached keys per block of the online softmax (a power of two)."""
    num_warps: int = 1
    """Warps per (row, head) program."""
    stages: int = 1
    """Software-pipelining stages of the block loop."""

    def __post_init__(self):
        if self.block_t < 1 or self.block_t & (self.block_t - 1):
            raise ValueError(f"block_t must be a power of two, got {self.block_t}")
        if self.num_warps < 1 or self.stages < 1:
            raise ValueError(
                f"num_warps and stages must be >= 1, got {self.num_warps}, {self.stages}"
            )


@torch.library.custom_op("movegen::decode_attn", mutates_args=("k_cache", "v_cache"))
def decode_attn(proj: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor | None,
                ids: torch.Tensor, slots: int, gated: bool, block_t: int = 32, num_warps: int = 1,
                stages: int = 1) -> torch.Tensor:  # fmt: skip
    """One layer of one-token decoding after the QKV/router product.

    ``proj (B, 3d + H*G)``: q, k, v, then the router logits (G gates per head) when ``table`` is
    given; ``cos/sin (T, D/2)`` RoPE tables; ``pos (1,)`` the input position; ``k_cache/v_cache
    (B, H, T, D)`` written at ``pos``; ``table (V, slots, d)`` memory rows (MoVE bank, or a LaVE
    table viewed ``(V, 1, d)``) indexed by ``ids (B,)``; ``block_t, num_warps, stages``: the
    launch (:class:`DecodeLaunch`). Returns the attention output ``(B, d)``.
    """
    B, H, T, D = k_cache.shape
    proj = _unit_d(proj)
    ids, cos, sin = ids.reshape(B).contiguous(), cos.contiguous(), sin.contiguous()
    y = torch.empty(B, H * D, device=proj.device, dtype=k_cache.dtype)
    mem = table is not None
    tab = table if mem else k_cache
    _decode_kernel[(B * H,)](proj, proj.stride(0), cos, sin, pos, k_cache, v_cache, y, tab, ids,
                             tab.stride(0) if mem else 0, tab.stride(1) if mem else 0, H, T,
                             1.0 / D**0.5, D=D, MEM=mem, M=max(slots, 1), M_PAD=_pad(slots),
                             G=slots + int(gated) if mem else 1, GATED=int(gated and mem),
                             BLOCK_T=block_t, STAGES=stages, num_warps=num_warps)  # fmt: skip
    return y


@_fake(decode_attn)
def _(proj, cos, sin, pos, k_cache, v_cache, table, ids, slots, gated, block_t=32, num_warps=1,
      stages=1):  # fmt: skip
    B, H, T, D = k_cache.shape
    return torch.empty(B, H * D, device=proj.device, dtype=k_cache.dtype)


__all__ = [
    "DecodeLaunch",
    "available",
    "bank_rows_grad",
    "decode_attn",
    "gmix_bwd",
    "gmix_fwd",
    "id_groups",
    "mix_bwd",
    "mix_fwd",
    "rows_grad",
    "usable",
]


# --------------------------------------------------------------------------- residual + RMSNorm
#
# The block boundary of training, ``x' = x + dropout(y)`` then ``n = rmsnorm(x') * w``, in one
# pass each way (``residual_norm``). The forward writes x' (the residual stream's dtype), n (the
# matmuls' dtype), one fp32 rstd per row and the dropout mask as bits (one byte per 8 elements);
# the mask comes from Philox under a seed drawn from torch's generator as a device tensor (no host
# sync; CUDA graphs replay fresh masks), four draws per Philox call. The backward computes the
# residual's gradient ``dx = dx'_in + rstd * (g - x_hat * mean(g * x_hat))`` with ``g = dn * w``,
# the branch's ``dy = mask * dx / (1 - p)`` in y's dtype, and the weight's gradient as fp32
# partial sums of a fixed grid of programs. Widths must be multiples of 8 (``fused_usable``).

if HAVE_TRITON:

    def _norm_configs(persistent: bool):
        if INTERPRET:  # 8 rows: partial last blocks at the test shapes, fewer programs to interpret
            return [triton.Config({"BLOCK_M": 8, "PER_SM": 1}, num_warps=4)]
        return [triton.Config({"BLOCK_M": m, "PER_SM": s}, num_warps=w) for m in (1, 2, 4, 8)
                for w in (4, 8) for s in ((4, 8, 16) if persistent else (1,))]  # fmt: skip

    def _norm_prune(configs, named_args, **kwargs):
        """Tiles of 1024 to 8192 elements (one row when a row is larger)."""
        bd = kwargs["BLOCK_D"]
        keep = [c for c in configs if 1024 <= c.kwargs["BLOCK_M"] * bd <= 8192]
        return keep or [c for c in configs if c.kwargs["BLOCK_M"] == 1]

    @triton.jit
    def _keep_bits(seed, rows, D, thr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """The keep mask of a (BLOCK_M, BLOCK_D) tile: elements 4i..4i+3 of a row from draws 0, 2,
        1, 3 of the Philox call at offset row * D/4 + i (the order the joins lay them out)."""
        q = rows[:, None].to(tl.int64) * (D // 4) + tl.arange(0, BLOCK_D // 4)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, q)
        r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_D))
        return r >= thr

    @_autotune(_norm_configs(False), key=["D", "HAS_Y", "DROP"],
                     prune_configs_by={"early_config_prune": _norm_prune})  # fmt: skip
    @triton.jit
    def _resnorm_fwd_kernel(x_ptr, y_ptr, w_ptr, seed_ptr, xo_ptr, n_ptr, rstd_ptr, bits_ptr, R, D, thr, scale,
                            eps, HAS_Y: tl.constexpr, DROP: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr, PER_SM: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask, cmask = rows < R, cols < D
        m = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if DROP:
                keep = _keep_bits(tl.load(seed_ptr), rows, D, thr.to(tl.uint32), BLOCK_M, BLOCK_D)
                y = tl.where(keep, y * scale, 0.0)
                b = tl.reshape(keep.to(tl.int32), (BLOCK_M, BLOCK_D // 8, 8))
                b = tl.sum(b << tl.arange(0, 8)[None, None, :], axis=2)
                bcols = tl.arange(0, BLOCK_D // 8)
                bm = rmask[:, None] & (bcols < D // 8)[None, :]
                tl.store(
                    bits_ptr + rows[:, None].to(tl.int64) * (D // 8) + bcols[None, :],
                    b.to(tl.uint8),
                    mask=bm,
                )
            x = (x + y).to(xo_ptr.dtype.element_ty)  # x' as stored: the norm of what is kept
            tl.store(xo_ptr + offs, x, mask=m)
            x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        n = x * rstd[:, None] * w[None, :]
        tl.store(n_ptr + offs, n.to(n_ptr.dtype.element_ty), mask=m)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @_autotune(_norm_configs(True), key=["D", "HAS_DXI", "HAS_Y", "DROP"],
                     prune_configs_by={"early_config_prune": _norm_prune},
                     reset_to_zero=["dw_ptr"])  # fmt: skip
    @triton.jit
    def _resnorm_bwd_kernel(dn_ptr, dxi_ptr, x_ptr, w_ptr, rstd_ptr, bits_ptr, dx_ptr, dy_ptr, dw_ptr, R, D,
                            scale, HAS_DXI: tl.constexpr, HAS_Y: tl.constexpr, DROP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PER_SM: tl.constexpr):  # fmt: skip
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start in range(pid * BLOCK_M, R, nprog * BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            rmask = rows < R
            m = rmask[:, None] & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * D + cols[None, :]
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            xhat = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) * rstd[:, None]
            dn = tl.load(dn_ptr + offs, mask=m, other=0.0).to(tl.float32)
            g = dn * w[None, :]
            c = tl.sum(g * xhat, axis=1) / D
            dx = rstd[:, None] * (g - xhat * c[:, None])
            if HAS_DXI:
                dx += tl.load(dxi_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
            if HAS_Y:
                dy = dx
                if DROP:
                    bcols = tl.arange(0, BLOCK_D // 8)
                    bm = rmask[:, None] & (bcols < D // 8)[None, :]
                    b = tl.load(
                        bits_ptr + rows[:, None].to(tl.int64) * (D // 8) + bcols[None, :],
                        mask=bm,
                        other=0,
                    )
                    b = (b.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
                    keep = tl.reshape(b, (BLOCK_M, BLOCK_D)) != 0
                    dy = tl.where(keep, dx * scale, 0.0)
                tl.store(dy_ptr + offs, dy.to(dy_ptr.dtype.element_ty), mask=m)
            dw += dn * xhat
        tl.store(dw_ptr + pid * D + cols, tl.sum(dw, axis=0), mask=cmask)


def fused_usable(x: torch.Tensor) -> bool:
    """Whether :func:`residual_norm` and :func:`silu_mul` run for ``x`` (a capable CUDA device or
    the interpreter, a floating dtype, a last dim that is a multiple of 8 and at most 16384)."""
    D = x.shape[-1]
    return (
        HAVE_TRITON and _on_device(x.device) and D % 8 == 0 and D <= 16384 and x.is_floating_point()
    )


def _sms(device: torch.device) -> int:
    return 2 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


@torch.library.custom_op("movegen::resnorm_fwd", mutates_args=())
def resnorm_fwd(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, seed: torch.Tensor | None,
                p: float, eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``x (..., D)`` (+ ``y`` with dropout ``p`` under ``seed``) -> ``(x', n, rstd, bits)``; x' is
    empty when ``y`` is None (x' = x), bits (``(R, D/8)`` uint8, the kept elements) without dropout."""
    D = x.shape[-1]
    R = x.numel() // D
    x = x.contiguous()
    drop = y is not None and p > 0
    xo = torch.empty_like(x) if y is not None else x.new_empty(0)
    n = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    rstd = torch.empty(R, device=x.device, dtype=torch.float32)
    bits = torch.empty(R if drop else 0, D // 8, device=x.device, dtype=torch.uint8)
    thr = min(max(int(p * 2**32), 2), 2**32 - 1)  # drop below thr (2 or more: never a constexpr 1)
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]),)  # noqa: E731
    _resnorm_fwd_kernel[grid](
        x, y.contiguous() if y is not None else x, weight, seed if drop else x, xo, n, rstd, bits, R, D, thr,
        1.0 / (1.0 - p), eps, HAS_Y=y is not None, DROP=drop, BLOCK_D=triton.next_power_of_2(D),
    )  # fmt: skip
    return xo, n, rstd, bits


@_fake(resnorm_fwd)
def _(x, y, weight, seed, p, eps, out_dtype):
    xo = torch.empty_like(x) if y is not None else x.new_empty(0)
    D = x.shape[-1]
    R = x.numel() // D
    n = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    bits = x.new_empty(R if y is not None and p > 0 else 0, D // 8, dtype=torch.uint8)
    return xo, n, x.new_empty(R, dtype=torch.float32), bits


@torch.library.custom_op("movegen::resnorm_bwd", mutates_args=())
def resnorm_bwd(dn: torch.Tensor, dxi: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                bits: torch.Tensor, p: float, has_y: bool,
                y_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Gradients of :func:`resnorm_fwd`: ``dx`` (x's dtype), ``dy`` (``y_dtype``; empty without
    y) and ``dw`` (fp32). ``x`` is the saved x'; ``dxi`` the incoming gradient of x' (or None)."""
    D = x.shape[-1]
    R = x.numel() // D
    dn, x = dn.contiguous(), x.contiguous()
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dy = torch.empty(x.shape, device=x.device, dtype=y_dtype) if has_y else x.new_empty(0)
    sms = _sms(x.device)
    dw = torch.zeros(16 * sms, D, device=x.device, dtype=torch.float32)  # a row per program
    grid = lambda meta: (min(triton.cdiv(R, meta["BLOCK_M"]), meta["PER_SM"] * sms),)  # noqa: E731
    _resnorm_bwd_kernel[grid](
        dn, dxi.contiguous() if dxi is not None else dn, x, weight, rstd, bits, dx, dy, dw, R, D, 1.0 / (1.0 - p),
        HAS_DXI=dxi is not None, HAS_Y=has_y, DROP=bits.numel() > 0, BLOCK_D=triton.next_power_of_2(D),
    )  # fmt: skip
    return dx, dy, dw.sum(0).to(weight.dtype)


@_fake(resnorm_bwd)
def _(dn, dxi, x, weight, rstd, bits, p, has_y, y_dtype):
    dy = torch.empty(x.shape, device=x.device, dtype=y_dtype) if has_y else x.new_empty(0)
    return torch.empty_like(x), dy, torch.empty_like(weight)


class _ResidualNorm(torch.autograd.Function):
    """(x, y) -> (x', n); without y, x -> n (x' is x, whose gradient autograd sums itself)."""

    @staticmethod
    def forward(ctx, x, y, weight, seed, p: float, eps: float, out_dtype):
        xo, n, rstd, bits = torch.ops.movegen.resnorm_fwd(x, y, weight, seed, p, eps, out_dtype)
        ctx.p, ctx.has_y, ctx.n_dtype = p, y is not None, out_dtype
        ctx.y_dtype = y.dtype if y is not None else x.dtype
        ctx.save_for_backward(xo if y is not None else x, weight, rstd, bits)
        ctx.set_materialize_grads(False)
        return (xo, n) if y is not None else n

    @staticmethod
    def backward(ctx, *grads):
        xo, weight, rstd, bits = ctx.saved_tensors
        dxo, dn = grads if ctx.has_y else (None, grads[0])
        if dn is None:  # only x' was used: its gradient through the dropout alone
            dn = torch.zeros(xo.shape, device=xo.device, dtype=ctx.n_dtype)
        dx, dy, dw = torch.ops.movegen.resnorm_bwd(
            dn, dxo, xo, weight, rstd, bits, ctx.p, ctx.has_y, ctx.y_dtype
        )
        return dx, (dy if ctx.has_y else None), dw, None, None, None, None


def residual_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float,
                  p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``x' = x + dropout(y, p)`` (``x' = x`` when y is None) and ``rmsnorm(x') * weight``, as two
    fused kernels (forward, backward). The norm comes out in the autocast dtype when autocast is
    on (what the next product reads), else in x's dtype; x' in x's dtype."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"residual_norm needs a dropout rate in [0, 1), got {p}")
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    seed = None
    if y is not None and p > 0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    if y is None:
        return x, _ResidualNorm.apply(x, None, weight, None, 0.0, float(eps), out_dtype)
    return _ResidualNorm.apply(x, y, weight, seed, float(p), float(eps), out_dtype)


# --------------------------------------------------------------------------- SwiGLU product
#
# ``h = silu(a) * b`` for ``u = [a | b]`` (the MLP's one input product, halves on the last dim),
# and its backward ``du = [dh * b * s * (1 + a * (1 - s)) | dh * silu(a)]`` with ``s = sigmoid(a)``:
# one read of u (and dh) and one write each way, in fp32 registers. The backward reads u again
# rather than a saved h; the output product saves h itself for its weight gradient.

if HAVE_TRITON:

    @triton.jit
    def _silu_mul_kernel(u_ptr, dh_ptr, out_ptr, R, Hd, BWD: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (rows < R)[:, None] & (cols < Hd)[None, :]
        ua = rows[:, None].to(tl.int64) * (2 * Hd) + cols[None, :]
        a = tl.load(u_ptr + ua, mask=m, other=0.0).to(tl.float32)
        b = tl.load(u_ptr + ua + Hd, mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        if BWD:
            dh = tl.load(
                dh_ptr + rows[:, None].to(tl.int64) * Hd + cols[None, :], mask=m, other=0.0
            )
            dh = dh.to(tl.float32)
            tl.store(
                out_ptr + ua, (dh * b * s * (1 + a * (1 - s))).to(out_ptr.dtype.element_ty), mask=m
            )
            tl.store(out_ptr + ua + Hd, (dh * a * s).to(out_ptr.dtype.element_ty), mask=m)
        else:
            off = rows[:, None].to(tl.int64) * Hd + cols[None, :]
            tl.store(out_ptr + off, (a * s * b).to(out_ptr.dtype.element_ty), mask=m)


def _silu_mul_launch(R: int, Hd: int):
    # the interpreter: 32 x 8 blocks (partial ones at the test shapes; the interpreter's cost is
    # per program, so not smaller)
    bc = min(1024, triton.next_power_of_2(Hd)) if not INTERPRET else 32
    br = max(1, (8192 if not INTERPRET else 256) // bc)
    return (triton.cdiv(R, br), triton.cdiv(Hd, bc)), {
        "BLOCK_R": br,
        "BLOCK_C": bc,
        "num_warps": 8 if not INTERPRET else 4,
    }


@torch.library.custom_op("movegen::silu_mul", mutates_args=())
def silu_mul_op(u: torch.Tensor, dh: torch.Tensor | None) -> torch.Tensor:
    """``u (..., 2h)`` -> ``silu(u[..., :h]) * u[..., h:]`` (dh None), or the gradient of u."""
    u = u.contiguous()
    Hd = u.shape[-1] // 2
    R = u.numel() // (2 * Hd)
    out = torch.empty_like(u) if dh is not None else u.new_empty(*u.shape[:-1], Hd)
    grid, meta = _silu_mul_launch(R, Hd)
    _silu_mul_kernel[grid](
        u, dh.contiguous() if dh is not None else u, out, R, Hd, BWD=dh is not None, **meta
    )
    return out


@_fake(silu_mul_op)
def _(u, dh):
    return torch.empty_like(u) if dh is not None else u.new_empty(*u.shape[:-1], u.shape[-1] // 2)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return torch.ops.movegen.silu_mul(u, None)

    @staticmethod
    def backward(ctx, dh):
        (u,) = ctx.saved_tensors
        return torch.ops.movegen.silu_mul(u, dh)


def silu_mul(u: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` for ``u = [a | b]`` on the last dim (SwiGLU), one kernel each way."""
    if u.shape[-1] % 2:
        raise ValueError(f"silu_mul needs an even last dim, got {u.shape[-1]}")
    return _SiluMul.apply(u)


# --------------------------------------------------------------------------- QKV split + RoPE
#
# The attention's input product ``qkv (B, S, 3, H, D)`` split into q, k, v ``(B, S, H, D)``
# (contiguous; their transposes are what attention reads), RoPE applied to q and k in fp32 on
# consecutive pairs ``(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)``. The backward takes dq, dk, dv of
# any strides (unit stride on D) and writes the whole ``dqkv`` in one pass, q and k rotated back
# (``(d1 c + d2 s, d2 c - d1 s)``): no separate re-layout or concatenation of the three gradients.
# One program per (row block, head, b).

if HAVE_TRITON:

    @triton.jit
    def _rot(x, c, s, INVERSE: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr):
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_S, D // 2, 2)))
        if INVERSE:
            o1, o2 = x1 * c + x2 * s, x2 * c - x1 * s
        else:
            o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        return tl.reshape(tl.join(o1, o2), (BLOCK_S, D))

    @triton.jit
    def _cos_sin(cos_ptr, sin_ptr, rows, m, D: tl.constexpr):
        """The ``(rows, D / 2)`` fp32 tiles of the RoPE tables at positions ``rows``."""
        at = rows[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :]
        return tl.load(cos_ptr + at, mask=m, other=0.0), tl.load(sin_ptr + at, mask=m, other=0.0)

    @triton.jit
    def _bshd_tile(ptr, b, rows, h, cols, s_b, s_s, s_h):
        """Pointers of the (rows, cols) tile of batch b, head h in a (B, S, H, D) layout."""
        return (
            ptr + b.to(tl.int64) * s_b + rows[:, None].to(tl.int64) * s_s + h * s_h + cols[None, :]
        )

    @triton.jit
    def _split_rope_kernel(src_ptr, s_b, s_s, s_j, s_h, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, qs_b, qs_s, qs_h,
                           ks_b, ks_s, ks_h, vs_b, vs_s, vs_h, S, BWD: tl.constexpr, D: tl.constexpr,
                           BLOCK_S: tl.constexpr):  # fmt: skip
        """Forward: src = qkv (strides s_*, j = 0, 1, 2 selects q, k, v) -> q, k, v (strides q*, k*,
        v*). Backward: q, k, v pointers are dq, dk, dv (read) and src is dqkv (written)."""
        sb, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = tl.arange(0, D)
        m = (rows < S)[:, None]
        c, s = _cos_sin(cos_ptr, sin_ptr, rows, m, D)
        src = _bshd_tile(src_ptr, b, rows, h, cols, s_b, s_s, s_h)
        q = _bshd_tile(q_ptr, b, rows, h, cols, qs_b, qs_s, qs_h)
        k = _bshd_tile(k_ptr, b, rows, h, cols, ks_b, ks_s, ks_h)
        v = _bshd_tile(v_ptr, b, rows, h, cols, vs_b, vs_s, vs_h)
        if BWD:
            dq = tl.load(q, mask=m, other=0.0).to(tl.float32)
            dk = tl.load(k, mask=m, other=0.0).to(tl.float32)
            ty = src_ptr.dtype.element_ty
            tl.store(src, _rot(dq, c, s, True, BLOCK_S, D).to(ty), mask=m)
            tl.store(src + s_j, _rot(dk, c, s, True, BLOCK_S, D).to(ty), mask=m)
            tl.store(src + 2 * s_j, tl.load(v, mask=m, other=0.0).to(ty), mask=m)
        else:
            xq = tl.load(src, mask=m, other=0.0).to(tl.float32)
            xk = tl.load(src + s_j, mask=m, other=0.0).to(tl.float32)
            tl.store(q, _rot(xq, c, s, False, BLOCK_S, D).to(q_ptr.dtype.element_ty), mask=m)
            tl.store(k, _rot(xk, c, s, False, BLOCK_S, D).to(k_ptr.dtype.element_ty), mask=m)
            tl.store(v, tl.load(src + 2 * s_j, mask=m, other=0.0), mask=m)


def _rope_launch(B: int, S: int, H: int):
    bs = 4 if INTERPRET else 32
    return (triton.cdiv(S, bs), H, B), {"BLOCK_S": bs, "num_warps": 4}


@torch.library.custom_op("movegen::split_rope_fwd", mutates_args=())
def split_rope_fwd(qkv: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``qkv (B, S, 3, H, D)`` (unit stride on D), ``cos/sin (>= S, D/2)`` fp32 -> q, k, v
    ``(B, S, H, D)`` contiguous, q and k rotated."""
    B, S, _, H, D = qkv.shape
    qkv = _unit_d(qkv)
    q, k, v = (torch.empty(B, S, H, D, device=qkv.device, dtype=qkv.dtype) for _ in range(3))
    grid, meta = _rope_launch(B, S, H)
    _split_rope_kernel[grid](qkv, qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3), cos.contiguous(),
                             sin.contiguous(), q, k, v, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], S,
                             BWD=False, D=D, **meta)  # fmt: skip
    return q, k, v


@_fake(split_rope_fwd)
def _(qkv, cos, sin):
    B, S, _, H, D = qkv.shape
    return tuple(qkv.new_empty(B, S, H, D) for _ in range(3))


@torch.library.custom_op("movegen::split_rope_bwd", mutates_args=())
def split_rope_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   extra: torch.Tensor | None = None, width: int = 0) -> torch.Tensor:  # fmt: skip
    """Gradients ``(B, S, H, D)`` of any strides (unit stride on D) -> ``dqkv (B, S, 3, H, D)``;
    with ``extra (B, S, E)``: ``(B, S, width)`` rows of ``[dqkv | extra | zeros]``, the gradient
    of a wider product whose first ``3 * H * D`` columns were the QKV (``split_rope_wide``)."""
    B, S, H, D = dq.shape
    dq, dk, dv = _unit_d(dq), _unit_d(dk), _unit_d(dv)
    n = 3 * H * D
    if extra is None:
        out = torch.empty(B, S, 3, H, D, device=dq.device, dtype=dq.dtype)
        dqkv = out
    else:
        out = torch.empty(B, S, width, device=dq.device, dtype=dq.dtype)
        E = extra.shape[-1]
        out[..., n : n + E].copy_(extra)
        out[..., n + E :].zero_()
        dqkv = out[..., :n].view(B, S, 3, H, D)
    grid, meta = _rope_launch(B, S, H)
    _split_rope_kernel[grid](dqkv, dqkv.stride(0), dqkv.stride(1), dqkv.stride(2), dqkv.stride(3), cos.contiguous(),
                             sin.contiguous(), dq, dk, dv, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
                             S, BWD=True, D=D, **meta)  # fmt: skip
    return out


@_fake(split_rope_bwd)
def _(dq, dk, dv, cos, sin, extra=None, width=0):
    B, S, H, D = dq.shape
    return dq.new_empty(B, S, 3, H, D) if extra is None else dq.new_empty(B, S, width)


def _mix_bwd_into(dout, v, gates, table, ids, sid, order, dv, s_on: int, dg, s_gn: int, gated: bool,
                  logits: bool) -> None:  # fmt: skip
    """The mix's backward (per token, or grouped by id with ``sid, order``) writing the value
    gradient of row (n, h) at ``dv + n * s_on + h * D`` and the gates' at ``dg + n * s_gn + h * G``
    (n = b * T + t)."""
    B, T, H, D = dout.shape
    G, M = gates.shape[-1], table.shape[1]
    table, ids, s_id, s_m, s_h = _table_args(table, ids)
    v, s_vn, s_vh = _as_rows(v)
    dout, gates = dout.contiguous(), gates.contiguous()
    if sid is not None and order is not None:
        kern, extra = _grouped_kernel(True, table, dout, logits)
        kern[_lane_grid(B * T, H)](dout, v, gates, table, sid, order, dv, dg, B * T, H, s_vn, s_vh, s_id, s_m,
                                   s_h, s_on, s_gn, G=G, M=M, D=D, GATED=int(gated), LOGITS=logits,
                                   **extra)  # fmt: skip
    else:
        R = B * T * H
        _mix_bwd_kernel[_grid(R)](dout, v, gates, table, ids, dv, dg, R, H, s_vn, s_vh, s_id, s_m, s_h, s_on,
                                  s_gn, G=G, M=M, M_PAD=_pad(M), D=D, GATED=int(gated),
                                  LOGITS=logits)  # fmt: skip


class _SplitRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.movegen.split_rope_fwd(qkv, cos, sin)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors  # (unused outputs' gradients come as zeros)
        dk, dv = dk.to(dq.dtype), dv.to(dq.dtype)
        return torch.ops.movegen.split_rope_bwd(dq, dk, dv, cos, sin), None, None


class _SplitRopeWide(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj, cos, sin, n_head: int, head_dim: int, n_extra: int):
        B, S, W = proj.shape
        n = 3 * n_head * head_dim
        ctx.save_for_backward(cos, sin)
        ctx.width = W
        qkv = proj[..., :n].view(B, S, 3, n_head, head_dim)
        q, k, v = torch.ops.movegen.split_rope_fwd(qkv, cos, sin)
        return q, k, v, proj[..., n : n + n_extra].contiguous()

    @staticmethod
    def backward(ctx, dq, dk, dv, dextra):
        cos, sin = ctx.saved_tensors
        dk, dv, dextra = dk.to(dq.dtype), dv.to(dq.dtype), dextra.to(dq.dtype)
        dproj = torch.ops.movegen.split_rope_bwd(dq, dk, dv, cos, sin, dextra, ctx.width)
        return dproj, None, None, None, None, None


def split_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """``qkv (B, S, 3, H, D)`` -> q, k, v ``(B, S, H, D)``, RoPE on q and k (``model.apply_rope``'s
    rotation, fp32 math), one kernel each way. ``cos/sin``: fp32 tables with at least S rows."""
    return _SplitRope.apply(qkv, cos, sin)


def split_rope_wide(proj: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int,
                    head_dim: int, n_extra: int) -> tuple:  # fmt: skip
    """:func:`split_rope` of a wider product ``proj (B, S, W)`` whose columns are
    ``[q | k | v | extra | padding]`` (``3 * n_head * head_dim`` QKV columns, then ``n_extra``):
    q, k, v ``(B, S, H, D)`` and ``extra (B, S, n_extra)`` contiguous. The backward writes the
    whole ``(B, S, W)`` gradient in one pass (zeros in the padding), so the QKV and extra
    gradients are never concatenated."""
    return _SplitRopeWide.apply(proj, cos, sin, n_head, head_dim, n_extra)


def rope_usable(qkv: torch.Tensor) -> bool:
    """Whether :func:`split_rope` runs for ``qkv (B, S, 3, H, D)``: CUDA or the interpreter, a
    power-of-two head width of at least 16."""
    return usable(qkv.device, qkv.shape[-1]) and qkv.is_floating_point()


# --------------------------------------------------------------------------- cross-entropy
#
# Per-row cross-entropy of logits ``(N, K)`` in their own dtype (the head's bf16 under autocast)
# with fp32 math: the forward reads each row once (online max and sum) and keeps one fp32 log-sum-
# exp per row; the backward reads the row again and writes ``(softmax - onehot) * g`` in the
# logits' dtype. No fp32 copy of the logits is made or kept.

if HAVE_TRITON:

    @triton.jit
    def _ce_kernel(
        x_ptr, t_ptr, lse_ptr, loss_ptr, g_ptr, dx_ptr, K, BWD: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * K
        t = tl.load(t_ptr + row)
        if BWD:
            lse = tl.load(lse_ptr + row)
            g = tl.load(g_ptr + row)
            for start in range(0, K, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                x = tl.load(base + cols, mask=cols < K, other=0.0).to(tl.float32)
                d = tl.exp(x - lse) - (cols == t).to(tl.float32)
                tl.store(
                    dx_ptr + row * K + cols, (d * g).to(dx_ptr.dtype.element_ty), mask=cols < K
                )
        else:
            # per lane: running max (a finite floor, so no inf - inf) and sum of exp(x - max)
            m = tl.full((BLOCK_K,), -1e30, tl.float32)
            s = tl.zeros((BLOCK_K,), tl.float32)
            for start in range(0, K, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                x = tl.load(base + cols, mask=cols < K, other=-1e30).to(tl.float32)
                m_new = tl.maximum(m, x)
                s = s * tl.exp(m - m_new) + tl.where(cols < K, tl.exp(x - m_new), 0.0)
                m = m_new
            mx = tl.max(m, 0)
            lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
            tl.store(lse_ptr + row, lse)
            tl.store(loss_ptr + row, lse - tl.load(base + t).to(tl.float32))


def _ce_block(K: int) -> int:
    return 128 if INTERPRET else min(4096, triton.next_power_of_2(K))


@torch.library.custom_op("movegen::ce_fwd", mutates_args=())
def ce_fwd(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits (N, K)``, ``targets (N,)`` in [0, K) -> per-row loss and log-sum-exp, fp32."""
    N, K = logits.shape
    logits = logits.contiguous()
    lse = torch.empty(N, device=logits.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    _ce_kernel[(N,)](logits, targets.contiguous(), lse, loss, lse, logits, K, BWD=False,
                     BLOCK_K=_ce_block(K), num_warps=8 if not INTERPRET else 4)  # fmt: skip
    return loss, lse


@_fake(ce_fwd)
def _(logits, targets):
    N = logits.shape[0]
    return logits.new_empty(N, dtype=torch.float32), logits.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("movegen::ce_bwd", mutates_args=())
def ce_bwd(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """The gradient of the logits for per-row loss gradients ``grad (N,)``."""
    N, K = logits.shape
    logits = logits.contiguous()
    dx = torch.empty_like(logits)
    _ce_kernel[(N,)](logits, targets.contiguous(), lse, lse, grad.float().contiguous(), dx, K, BWD=True,
                     BLOCK_K=_ce_block(K), num_warps=8 if not INTERPRET else 4)  # fmt: skip
    return dx


@_fake(ce_bwd)
def _(logits, targets, lse, grad):
    return torch.empty_like(logits)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        loss, lse = torch.ops.movegen.ce_fwd(logits, targets)
        ctx.save_for_backward(logits, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        return torch.ops.movegen.ce_bwd(logits, targets, lse, grad), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits (N, K)`` (any float dtype; fp32 math) against ``targets
    (N,)`` in [0, K): ``F.cross_entropy(logits.float(), targets)``, one kernel each way."""
    return _CrossEntropy.apply(logits, targets).mean()


# --------------------------------------------------------------------------- causal attention
#
# Causal self-attention of q, k, v ``(B, S, H, D)`` (any strides, unit stride on D) for short
# sequences, where a (b, h)'s keys stay on chip: the training step's 256 positions. The forward
# is one program per (query block, h, b) with an online softmax in base 2 (fp32), writing o
# ``(B, S, H, D)`` (what the output projection reads, no transpose) and one fp32 log-sum-exp per
# row. The backward's main kernel has one program per (block, h, b): first dk, dv of its key block
# over the queries at and after it, then dq of its query block over the keys up to it, in smaller
# steps; it recomputes the probabilities from the saved log-sum-exp, after one small pass that
# forms rowsum(o * do). No dropout.

if HAVE_TRITON:

    @triton.jit
    def _load_qk(ptr, b, rows, h, cols, s_b, s_s, s_h, m, cos_ptr, sin_ptr, ROPE: tl.constexpr,
                 BLOCK: tl.constexpr, D: tl.constexpr):  # fmt: skip
        """The (BLOCK, D) tile of q or k at positions ``rows``; with ``ROPE`` rotated as
        :func:`split_rope` rotates it (fp32 math, back in the input's dtype)."""
        x = tl.load(_bshd_tile(ptr, b, rows, h, cols, s_b, s_s, s_h), mask=m, other=0.0)
        if ROPE:
            c, sn = _cos_sin(cos_ptr, sin_ptr, rows, m, D)
            x = _rot(x.to(tl.float32), c, sn, False, BLOCK, D).to(x.dtype)
        return x

    @triton.jit
    def _unrotate(x, rows, m, cos_ptr, sin_ptr, ROPE: tl.constexpr, BLOCK: tl.constexpr,
                  D: tl.constexpr):  # fmt: skip
        """The gradient ``x (BLOCK, D)`` of rotated q or k at positions ``rows`` -> that of the
        unrotated input (the inverse rotation), or ``x`` as it is without ``ROPE``."""
        if ROPE:
            c, sn = _cos_sin(cos_ptr, sin_ptr, rows, m, D)
            x = _rot(x, c, sn, True, BLOCK, D)
        return x

    @triton.jit
    def _attn_fwd_keys(acc, l_i, m_i, q, rows, lo, hi, b, h, cols, k_ptr, v_ptr, kr_ptr, sk_b, sk_s, sk_h, sv_b,
                       sv_s, sv_h, so_b, so_s, so_h, S, qk_scale, cos_ptr, sin_ptr, ROPE: tl.constexpr,
                       MASK: tl.constexpr, SAVE_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       D: tl.constexpr):  # fmt: skip
        """The online softmax of the query block ``q`` over keys ``lo..hi``, BLOCK_N at a time:
        ``(acc, l_i, m_i)`` carried on. ``MASK``: the causal mask (keys on the block's own
        rows; the keys before them precede every row); ``SAVE_K``: each rotated k written."""
        for start in range(lo, hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            km = (keys < S)[:, None]
            k = _load_qk(k_ptr, b, keys, h, cols, sk_b, sk_s, sk_h, km, cos_ptr, sin_ptr, ROPE,
                         BLOCK_N, D)  # fmt: skip
            if SAVE_K:
                tl.store(_bshd_tile(kr_ptr, b, keys, h, cols, so_b, so_s, so_h), k, mask=km)
            v = tl.load(_bshd_tile(v_ptr, b, keys, h, cols, sv_b, sv_s, sv_h), mask=km, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if MASK:  # (for rows < S, keys < S follows; rows past S are never stored)
                s = tl.where(keys[None, :] <= rows[:, None], s, -float("inf"))
            # finite: the first block of keys holds key 0 (unmasked for every row), or m_i is
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cos_ptr, sin_ptr, qr_ptr, kr_ptr, sq_b, sq_s, sq_h,
                         sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h, S, H, qk_scale, D: tl.constexpr,
                         ROPE: tl.constexpr, SAVE_QK: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):  # fmt: skip
        # ROPE: q and k rotated as they are loaded (the QKV product read as it is); SAVE_QK: the
        # rotated q of this block and k of the keys at its own rows written to qr, kr (o's
        # strides), so every row's are written once
        mb, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, D)
        rm = (rows < S)[:, None]
        q = _load_qk(
            q_ptr, b, rows, h, cols, sq_b, sq_s, sq_h, rm, cos_ptr, sin_ptr, ROPE, BLOCK_M, D
        )
        tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the key blocks end where the block's rows start
        if SAVE_QK:
            tl.store(_bshd_tile(qr_ptr, b, rows, h, cols, so_b, so_s, so_h), q, mask=rm)
        m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        # the keys before this block precede every row of it (no mask); then the keys of its
        # own rows, masked (and with SAVE_QK written)
        diag = mb * BLOCK_M
        acc, l_i, m_i = _attn_fwd_keys(acc, l_i, m_i, q, rows, 0, diag, b, h, cols, k_ptr, v_ptr, kr_ptr, sk_b,
                                       sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h, S, qk_scale, cos_ptr,
                                       sin_ptr, ROPE, False, False, BLOCK_N, D)  # fmt: skip
        acc, l_i, m_i = _attn_fwd_keys(acc, l_i, m_i, q, rows, diag, tl.minimum(diag + BLOCK_M, S), b, h, cols,
                                       k_ptr, v_ptr, kr_ptr, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s,
                                       so_h, S, qk_scale, cos_ptr, sin_ptr, ROPE, True, SAVE_QK, BLOCK_N,
                                       D)  # fmt: skip
        o = acc / l_i[:, None]
        tl.store(
            _bshd_tile(o_ptr, b, rows, h, cols, so_b, so_s, so_h),
            o.to(o_ptr.dtype.element_ty),
            mask=rm,
        )
        tl.store(lse_ptr + (b * H + h).to(tl.int64) * S + rows, m_i + tl.log2(l_i), mask=rows < S)

    @triton.jit
    def _attn_delta_kernel(o_ptr, do_ptr, delta_ptr, so_b, so_s, so_h, sd_b, sd_s, sd_h, S, H, D: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
        """rowsum(o * do) ``(B, H, S)`` fp32, the backward's softmax correction."""
        sb, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = sb * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, D)
        rm = (rows < S)[:, None]
        o = tl.load(_bshd_tile(o_ptr, b, rows, h, cols, so_b, so_s, so_h), mask=rm, other=0.0)
        do = tl.load(_bshd_tile(do_ptr, b, rows, h, cols, sd_b, sd_s, sd_h), mask=rm, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(delta_ptr + (b * H + h).to(tl.int64) * S + rows, delta, mask=rows < S)

    @triton.jit
    def _attn_bwd_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr,
                         sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sd_b, sd_s, sd_h, sg_b, sg_s, sg_h,
                         sw_b, sw_s, sw_h, S, H, scale, qk_scale, D: tl.constexpr, ROPE: tl.constexpr,
                         UNROT: tl.constexpr, BLOCK: tl.constexpr, STEP: tl.constexpr):  # fmt: skip
        """dq, dk share the strides ``sg_*``, dv has ``sw_*``. Program (j, h, b): dk, dv of keys j*BLOCK..
        over the queries at and after them, STEP queries at a time; then dq of queries
        j*BLOCK.. over the keys up to them, STEP keys at a time. ``ROPE``: q and k rotated as
        they are loaded; ``UNROT``: dq and dk rotated back as they are stored (the unrotated
        product's; with ``ROPE``, or q and k given rotated, as the forward saved them)."""
        nb, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        cols = tl.arange(0, D)
        stat = (b * H + h).to(tl.int64) * S
        keys = nb * BLOCK + tl.arange(0, BLOCK)
        km = (keys < S)[:, None]
        k = _load_qk(
            k_ptr, b, keys, h, cols, sk_b, sk_s, sk_h, km, cos_ptr, sin_ptr, ROPE, BLOCK, D
        )
        v = tl.load(_bshd_tile(v_ptr, b, keys, h, cols, sv_b, sv_s, sv_h), mask=km, other=0.0)
        dk = tl.zeros((BLOCK, D), tl.float32)
        dv = tl.zeros((BLOCK, D), tl.float32)
        for start in range(nb * BLOCK, S, STEP):
            rows = start + tl.arange(0, STEP)
            rm = rows < S
            q = _load_qk(q_ptr, b, rows, h, cols, sq_b, sq_s, sq_h, rm[:, None], cos_ptr, sin_ptr,
                         ROPE, STEP, D)  # fmt: skip
            do = tl.load(
                _bshd_tile(do_ptr, b, rows, h, cols, sd_b, sd_s, sd_h), mask=rm[:, None], other=0.0
            )
            lse = tl.load(lse_ptr + stat + rows, mask=rm, other=0.0)
            delta = tl.load(delta_ptr + stat + rows, mask=rm, other=0.0)
            pt = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (keys, rows)
            pt = tl.where((keys[:, None] <= rows[None, :]) & rm[None, :], pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
            dk += tl.dot((pt * (dpt - delta[None, :])).to(q.dtype), q)
        dk = _unrotate(dk * scale, keys, km, cos_ptr, sin_ptr, UNROT, BLOCK, D)
        tl.store(_bshd_tile(dk_ptr, b, keys, h, cols, sg_b, sg_s, sg_h), dk.to(dk_ptr.dtype.element_ty),
                 mask=km)  # fmt: skip
        tl.store(
            _bshd_tile(dv_ptr, b, keys, h, cols, sw_b, sw_s, sw_h),
            dv.to(dv_ptr.dtype.element_ty),
            mask=km,
        )
        rows = nb * BLOCK + tl.arange(0, BLOCK)
        rm = rows < S
        q = _load_qk(q_ptr, b, rows, h, cols, sq_b, sq_s, sq_h, rm[:, None], cos_ptr, sin_ptr,
                     ROPE, BLOCK, D)  # fmt: skip
        do = tl.load(
            _bshd_tile(do_ptr, b, rows, h, cols, sd_b, sd_s, sd_h), mask=rm[:, None], other=0.0
        )
        lse = tl.load(lse_ptr + stat + rows, mask=rm, other=0.0)
        delta = tl.load(delta_ptr + stat + rows, mask=rm, other=0.0)
        dq = tl.zeros((BLOCK, D), tl.float32)
        for start in range(0, tl.minimum((nb + 1) * BLOCK, S), STEP):
            # (new names: a loop must not re-assign the key block's tensors at another shape)
            kn = start + tl.arange(0, STEP)
            knm = (kn < S)[:, None]
            kt = _load_qk(k_ptr, b, kn, h, cols, sk_b, sk_s, sk_h, knm, cos_ptr, sin_ptr, ROPE, STEP,
                          D)  # fmt: skip
            vt = tl.load(_bshd_tile(v_ptr, b, kn, h, cols, sv_b, sv_s, sv_h), mask=knm, other=0.0)
            p = tl.exp2(tl.dot(q, tl.trans(kt)) * qk_scale - lse[:, None])
            p = tl.where((kn[None, :] <= rows[:, None]) & rm[:, None], p, 0.0)
            dp = tl.dot(do, tl.trans(vt))
            dq += tl.dot((p * (dp - delta[:, None])).to(kt.dtype), kt)
        dq = _unrotate(dq * scale, rows, rm[:, None], cos_ptr, sin_ptr, UNROT, BLOCK, D)
        tl.store(_bshd_tile(dq_ptr, b, rows, h, cols, sg_b, sg_s, sg_h), dq.to(dq_ptr.dtype.element_ty),
                 mask=rm[:, None])  # fmt: skip

    def _attn_configs(bwd: bool):
        """Autotuned blocks, warps and pipeline stages; one small block in the interpreter."""
        if INTERPRET:
            return [
                triton.Config({"BLOCK": 16, "STEP": 8} if bwd else {"BLOCK_M": 16, "BLOCK_N": 16})
            ]
        if bwd:
            return [triton.Config({"BLOCK": b, "STEP": t}, num_warps=w, num_stages=s)
                    for b, t, w, s in ((128, 32, 4, 3), (128, 32, 4, 5), (128, 32, 8, 3), (64, 32, 4, 3),
                                       (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3))]  # fmt: skip
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w in ((64, 64, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (64, 32, 4))
                for s in (2, 3, 4)]  # fmt: skip

    _attn_fwd_kernel = _autotune(_attn_configs(False), key=["S", "D", "ROPE", "SAVE_QK"])(
        _attn_fwd_kernel
    )
    _attn_bwd_kernel = _autotune(_attn_configs(True), key=["S", "D", "ROPE", "UNROT"])(
        _attn_bwd_kernel
    )


def _bsh(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _rope_args(q: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> tuple:
    """(cos, sin, ROPE) for the attention kernels: the fp32 tables, or ``q`` twice as unused
    pointers when there is no rotation."""
    if (cos is None) != (sin is None):
        raise ValueError("the attention's RoPE needs both cos and sin, or neither")
    if cos is None:
        return q, q, False
    return cos.contiguous(), sin.contiguous(), True


@torch.library.custom_op("movegen::attn_fwd", mutates_args=())
def attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, S, H, D)`` of one dtype (unit stride on D) -> o ``(B, S, H, D)`` contiguous
    and the log-sum-exp ``(B, H, S)`` fp32 (base 2, of the scaled scores). With ``cos, sin``
    (fp32 ``(>= S, D/2)``) q and k are rotated by RoPE as they are read (:func:`split_rope`'s
    rotation): the unrotated QKV product's q and k are what is given."""
    return _attn_fwd_launch(q, k, v, cos, sin, save_qk=False)[:2]


def _attn_fwd_launch(q, k, v, cos, sin, save_qk: bool) -> tuple:
    """(o, lse, qr, kr) of :func:`attn_fwd`; with ``save_qk`` (and ``cos, sin``) qr, kr are the
    rotated q and k ``(B, S, H, D)`` contiguous, else ``o`` twice (not written)."""
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, S, H, D = q.shape
    q, k, v = _unit_d(q), _unit_d(k), _unit_d(v)
    o = torch.empty(B, S, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    cos, sin, rope = _rope_args(q, cos, sin)
    if save_qk and not rope:
        raise ValueError("the rotated q and k are saved only with cos and sin")
    qr, kr = (torch.empty_like(o), torch.empty_like(o)) if save_qk else (o, o)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), H, B)  # noqa: E731
    _attn_fwd_kernel[grid](q, k, v, o, lse, cos, sin, qr, kr, *_bsh(q), *_bsh(k), *_bsh(v), *_bsh(o), S, H,
                           D**-0.5 * 1.4426950408889634, D=D, ROPE=rope, SAVE_QK=save_qk)  # fmt: skip
    return o, lse, qr, kr


@_fake(attn_fwd)
def _(q, k, v, cos=None, sin=None):
    B, S, H, D = q.shape
    return q.new_empty(B, S, H, D), q.new_empty(B, H, S, dtype=torch.float32)


@torch.library.custom_op("movegen::rope_attn_fwd_saved", mutates_args=())
def rope_attn_fwd_saved(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`attn_fwd` with RoPE on load that also writes the rotated q and k ``(B, S, H, D)``
    (each row once) for a backward that need not rotate them again: ``(o, lse, qr, kr)``."""
    return _attn_fwd_launch(q, k, v, cos, sin, save_qk=True)


@_fake(rope_attn_fwd_saved)
def _(q, k, v, cos, sin):
    B, S, H, D = q.shape
    o = q.new_empty(B, S, H, D)
    return o, q.new_empty(B, H, S, dtype=torch.float32), torch.empty_like(o), torch.empty_like(o)


@torch.library.custom_op("movegen::attn_bwd", mutates_args=())
def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of q, k, v ``(B, S, H, D)`` (contiguous) for the output gradient ``do``."""
    dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    _attn_bwd_into(do, q, k, v, o, lse, dq, dk, dv)
    return dq, dk, dv


def _attn_bwd_into(do, q, k, v, o, lse, dq, dk, dv, cos=None, sin=None, qr=None, kr=None) -> None:
    """The attention's backward written into dq, dk, dv (``(B, S, H, D)``, unit stride on D; dq
    and dk of one set of strides); with ``cos, sin`` dq and dk are those of the unrotated q, k
    (``attn_fwd``'s), which are rotated as read, or, given ``qr, kr``, read rotated as
    :func:`rope_attn_fwd_saved` wrote them."""
    rotated = qr is not None and kr is not None
    if rotated:
        q, k = qr, kr
    B, S, H, D = q.shape
    if dq.stride() != dk.stride():
        raise ValueError(f"dq, dk must share strides; got {dq.stride()}, {dk.stride()}")
    do, q, k, v, o = (_unit_d(t) for t in (do, q, k, v, o))
    delta = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    bs = 16 if INTERPRET else 64
    _attn_delta_kernel[(triton.cdiv(S, bs), H, B)](
        o, do, delta, *_bsh(o), *_bsh(do), S, H, D=D, BLOCK=bs
    )
    cos, sin, rope = _rope_args(q, cos, sin)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK"]), H, B)  # noqa: E731
    _attn_bwd_kernel[grid](q, k, v, do, lse, delta, dq, dk, dv, cos, sin, *_bsh(q), *_bsh(k), *_bsh(v),
                           *_bsh(do), *_bsh(dq), *_bsh(dv), S, H, D**-0.5, D**-0.5 * 1.4426950408889634,
                           D=D, ROPE=rope and not rotated, UNROT=rope)  # fmt: skip


@torch.library.custom_op("movegen::rope_attn_bwd", mutates_args=())
def rope_attn_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, qr: torch.Tensor | None = None,
                  kr: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The gradient of the QKV product ``qkv (B, S, 3, H, D)`` (unit stride on D) of
    :func:`rope_attention`, written as one ``(B, S, 3, H, D)`` tensor: dq and dk rotated back.
    ``qr, kr``: q and k as the forward saved them rotated (:func:`rope_attn_fwd_saved`), read in
    place of rotating the product's again."""
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    q, k, v = _unit_d(qkv).unbind(2)
    dq, dk, dv = dqkv.unbind(2)
    _attn_bwd_into(do, q, k, v, o, lse, dq, dk, dv, cos, sin, qr, kr)
    return dqkv


@_fake(rope_attn_bwd)
def _(do, qkv, o, lse, cos, sin, qr=None, kr=None):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


@torch.library.custom_op("movegen::rope_attn_mix_bwd", mutates_args=())
def rope_attn_mix_bwd(do: torch.Tensor, proj: torch.Tensor, vm: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, gates: torch.Tensor, table: torch.Tensor,
                      ids: torch.Tensor, sid: torch.Tensor | None, order: torch.Tensor | None, gated: bool,
                      logits: bool, head_dim: int, gates_in_proj: bool, qr: torch.Tensor | None = None,
                      kr: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The backward of a memory layer's attention straight from its product ``proj (B, S, W)``
    (columns ``[q | k | v | router logits | padding]``, or only the QKV): q, k rotated as read,
    the mixed values ``vm (B, S, H, D)`` (the mix of proj's v) attended. The attention's kernel
    writes dq and dk, rotated back, into the product's gradient and the mixed values' gradient
    ``dvm`` apart (the bank gradient reads it); the mix's kernel then writes the value gradient
    into the product's v columns, and with ``gates_in_proj`` (``gates``: the router's logits as
    the product holds them) the logits' gradient into its router columns (zeros in the padding).
    ``qr, kr``: q and k as the forward saved them rotated (:func:`rope_attn_fwd_saved`).
    Returns ``(dproj (B, S, W), dgates (B, S, H, G), or empty with gates_in_proj, dvm)``."""
    B, S, W = proj.shape
    H, D = vm.shape[2], head_dim
    G, n = gates.shape[-1], 3 * H * D
    if gates_in_proj and not logits:
        raise ValueError("rope_attn_mix_bwd: gates in the product are the router's logits")
    used = n + H * G * gates_in_proj
    if W < used:
        raise ValueError(f"a product of width {W} has no room for {H * G} router columns after "
                         f"its {n} QKV columns")  # fmt: skip
    dproj = torch.empty(B, S, W, device=proj.device, dtype=proj.dtype)
    if W > used:  # zeros in the padding after the router columns
        dproj[..., used:].zero_()
    # the gates' gradient: into the product's router columns (the logits it holds), or apart
    if gates_in_proj:
        dg, s_gn, dg_out = dproj[..., n:], W, dproj.new_empty(0)
    else:
        dg_out = torch.empty(B, S, H, G, device=proj.device, dtype=gates.dtype)
        dg, s_gn = dg_out, H * G
    q, k, v = proj[..., :n].view(B, S, 3, H, D).unbind(2)
    dq, dk, _ = dproj[..., :n].view(B, S, 3, H, D).unbind(2)
    dvm = torch.empty(B, S, H, D, device=proj.device, dtype=proj.dtype)
    _attn_bwd_into(do, q, k, vm, o, lse, dq, dk, dvm, cos, sin, qr, kr)
    _mix_bwd_into(dvm, v, gates, table, ids, sid, order, dproj[..., 2 * H * D :], W, dg, s_gn, gated,
                  logits)  # fmt: skip
    return dproj, dg_out, dvm


@_fake(rope_attn_mix_bwd)
def _(do, proj, vm, o, lse, cos, sin, gates, table, ids, sid, order, gated, logits, head_dim,
      gates_in_proj, qr=None, kr=None):  # fmt: skip
    dg = gates.new_empty(0) if gates_in_proj else gates.new_empty(gates.shape)
    return proj.new_empty(proj.shape), dg, vm.new_empty(vm.shape)


@_fake(attn_bwd)
def _(do, q, k, v, o, lse):
    return tuple(torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = torch.ops.movegen.attn_fwd(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return torch.ops.movegen.attn_bwd(do.to(q.dtype), q, k, v, o, lse)


class _RopeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, save_rotated: bool = False):
        q, k, v = qkv.unbind(2)
        if save_rotated:
            o, lse, qr, kr = torch.ops.movegen.rope_attn_fwd_saved(q, k, v, cos, sin)
            ctx.save_for_backward(qkv, o, lse, cos, sin, qr, kr)
        else:
            o, lse = torch.ops.movegen.attn_fwd(q, k, v, cos, sin)
            ctx.save_for_backward(qkv, o, lse, cos, sin)
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse, cos, sin, *qk = ctx.saved_tensors
        dqkv = torch.ops.movegen.rope_attn_bwd(do.to(qkv.dtype), qkv, o, lse, cos, sin, *qk)
        return dqkv, None, None, None


def rope_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, save_rotated: bool = False
) -> torch.Tensor:
    """Causal self-attention straight from the QKV product ``qkv (B, S, 3, H, D)`` (unit stride on
    D): :func:`split_rope` then :func:`attention` in one function, q and k rotated as the kernels
    read them and their gradients rotated back as they are written, so neither the split q, k, v
    nor their gradients are written and read again; the backward writes ``dqkv`` in one tensor.
    ``cos/sin``: fp32 tables with at least S rows. ``save_rotated``: the forward also writes the
    rotated q and k (each row once) and the backward reads them rather than rotating the
    product's tiles again in its loops (200 MB more saved per GPT-B layer at batch 256). Returns
    ``(B, S, H, D)`` contiguous."""
    return _RopeAttention.apply(qkv, cos, sin, save_rotated)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of q, k, v ``(B, S, H, D)`` (any strides, unit stride on D; k and v
    cast to q's dtype) -> ``(B, S, H, D)`` contiguous: ``F.scaled_dot_product_attention`` of their
    ``(B, H, S, D)`` transposes with ``is_causal=True``, one kernel each way (:func:`attn_usable`)."""
    return _Attention.apply(q, k.to(q.dtype), v.to(q.dtype))


ATTN_MAX_SEQ = 1024
""":func:`attention` holds a (b, h)'s keys on chip block by block and recomputes the softmax in
its backward without splitting the keys across programs; it is for short sequences (the training
step's 256 positions) and is not used above this many."""


def attn_usable(q: torch.Tensor) -> bool:
    """Whether :func:`attention` runs for ``q (B, S, H, D)``: CUDA (bf16 or fp16: in fp32 its
    products would run in TF32 whatever ``torch.set_float32_matmul_precision`` says, so fp32
    keeps SDPA) or the interpreter (fp32 only: Triton's interpreter gets bf16 products wrong), a
    power-of-two head width from 16 to 128, at most :data:`ATTN_MAX_SEQ` positions. Each new
    sequence length autotunes the kernels again (the key is (S, D))."""
    return attn_usable_for(q.device, q.dtype, q.shape[1], q.shape[-1])


def attn_usable_for(
    device: torch.device | str, dtype: torch.dtype, seq: int, head_dim: int
) -> bool:
    """:func:`attn_usable` for q of this device, dtype, length and head width."""
    ok = (torch.float32,) if INTERPRET else (torch.bfloat16, torch.float16)
    D = head_dim
    return usable(device, D) and D <= 128 and seq <= ATTN_MAX_SEQ and dtype in ok
