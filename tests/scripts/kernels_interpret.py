"""Run under TRITON_INTERPRET=1 (CPU): the Triton MoVE kernels against the reference mix.

The id-indexed kernels (bank table + ids, repeated ids, int64 and int32 ids, a strided ``v`` as
the QKV split gives) against ``mix_reference`` over an ``F.embedding`` gather: forward and the
gradients of v, gates and the bank weight; the per-token form (``mix`` on a gathered memh); and
the whole model, its Triton training path against plain autograd, eager and compiled."""

import contextlib
import os
from unittest import mock

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1"
from movegen import kernels, move  # noqa: E402
from movegen.model import GPT, GPTConfig  # noqa: E402
from movegen.move import bank_taps, mix, mix_reference, mix_tapped  # noqa: E402

torch.manual_seed(0)
worst = 0.0


def diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def reference(weight, ids, vbase, gates, gated):
    """``mix_reference`` over the gathered rows ``F.embedding(ids, weight)``, per layer."""
    (V, M, d), (B, T), H = weight.shape, ids.shape, vbase[0].shape[3]
    mem = F.embedding(ids, weight.view(V, M * d)).view(B, T, M, H, d // H)
    return [mix_reference(v[:, :, 2], g, mem, gated) for v, g in zip(vbase, gates)]


@contextlib.contextmanager
def bank_kernel(bank):
    """``"runs"`` / ``"layers"``: the bank gradient by that kernel; a number: by the lanes
    kernels, the tile kernel up to that many slots."""
    if isinstance(bank, str):
        with mock.patch.object(kernels, "BANK_KERNEL", bank):
            yield
    else:
        with mock.patch.object(kernels, "BANK_KERNEL", "lanes"), \
                mock.patch.object(kernels, "BANK_TILE_MAX_SLOTS", bank):  # fmt: skip
            yield


# the bank gradient alone, every kernel, against fp32 index_add_: long runs (most tokens of one
# id: runs over many 16-token tiles), absent ids (their rows must be written as zeros: the output
# is allocated NaN-filled here), logits or gates, value gradients stacked or each in place
empty = torch.empty


def nan_empty(*args, **kwargs):
    t = empty(*args, **kwargs)  # float tensors only (an int one cannot hold NaN)
    return t.fill_(float("nan")) if t.is_floating_point() else t


class Launches:
    """In place of an autotuned kernel: each launch's keyword arguments kept, then launched
    (``call=False``: a launch is an error)."""

    def __init__(self, kern, call=True):
        self.kern, self.call, self.kwargs = kern, call, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            assert self.call, "a kernel launched for an empty batch"
            self.kwargs.append(kwargs)
            return self.kern[grid](*args, **kwargs)

        return launch


layers = Launches(kernels._bank_layers_kernel)


for M, logits, stacked, skew, V, dt in [(6, True, False, True, 60, torch.bfloat16),
                                        (24, False, True, False, 9, torch.float32),
                                        (3, True, True, False, 200, torch.bfloat16),
                                        (24, True, False, True, 30, torch.float32)]:  # fmt: skip
    # (bf16 value gradients: exact in TF32, two products; fp32 ones: three)
    B, T, H, D, L = 2, 31, 2, 16, 3
    gs = torch.randn(L, B, T, H, M + 1)
    gates = 2 * torch.sigmoid(gs) if logits else gs
    dvs = [torch.randn(B, T, H, D).to(dt) for _ in range(L)]
    ids = torch.randint(1, V - 1, (B, T))  # rows 0 and V - 1 never drawn: zeros at both ends
    if skew:
        ids = torch.where(torch.rand(B, T) < 0.7, torch.full_like(ids, 5), ids)
    ref = torch.zeros(V, M * H * D)
    for g, dv in zip(gates, dvs):
        ref.index_add_(0, ids.reshape(-1), (g[..., -M:, None] * dv.float()[..., None, :]).transpose(2, 3).reshape(B * T, -1))  # fmt: skip
    # lanes: the tile kernel (up to 8 slots; at 24 too, with 64), or the token walk (24 slots, 8)
    for bank in ("runs", "layers", 8 if M <= 8 or skew else 64):
        with bank_kernel(bank), mock.patch.object(torch, "empty", nan_empty), \
                mock.patch.object(kernels, "_bank_layers_kernel", layers):  # fmt: skip
            x = gs if logits else gates  # stacked, or each layer's a view of a wider tensor
            x = [x] if stacked else [torch.cat([t, t[..., :2]], -1)[..., : M + 1] for t in x]
            out = kernels.bank_rows_grad(x, [torch.stack(dvs)] if stacked else dvs, ids.int(), V, M,
                                         logits=logits)  # fmt: skip
        worst = max(worst, diff(out.reshape(V, -1), ref) / ref.abs().max().item())  # relative:
        # sums of up to 130 products here

# the layers kernel's products at least 16 wide inside and out (3 layers, 3 or 6 slots here;
# Triton 3.6, the GPU's, refuses smaller TF32 products, which the interpreter takes)
assert len(layers.kwargs) == 4 and all(k["LP"] >= 16 and k["M_PAD"] >= 16 for k in layers.kwargs)

# no token at all (an empty batch): every kernel gives the rows as zeros, and none is launched
# (an autotuner would tune on the empty batch and keep its choice for every later one)
names = ("_bank_runs_kernel", "_bank_layers_kernel", "_bank_tile_kernel", "_bank_rows_kernel")
for bank in ("runs", "layers", 8, 2):
    with bank_kernel(bank), mock.patch.object(torch, "empty", nan_empty), \
            mock.patch.multiple(kernels, **{n: Launches(None, call=False) for n in names}):  # fmt: skip
        out = kernels.bank_rows_grad([torch.rand(2, 0, 4, 2, 5)], [torch.rand(2, 0, 4, 2, 16)],
                                     torch.zeros(0, 4, dtype=torch.long), 7, 4)  # fmt: skip
    assert out.shape == (7, 4, 2, 16) and not out.any(), bank


for M, gated, T in [(6, True, 5), (3, False, 5), (24, True, 5), (6, True, 23)]:
    B, H, D, L, V = 2, 3, 16, 3, 7  # R = 30 rows: a partial last block; 10 ids of 7 (T = 23: 46
    # tokens, three 16-token tiles of the grouped kernels, groups of ~7 spanning tiles)
    G = M + int(gated)
    assert kernels.available(torch.zeros(D))
    ids = torch.randint(V, (B, T))
    ids[1, 3] = ids[0, 0]  # a repeated id for sure
    weight = torch.randn(V, M, H * D)
    vbase = [torch.randn(B, T, 3, H, D) for _ in range(L)]
    gts = [2 * torch.rand(B, T, H, G) for _ in range(L)]
    douts = [torch.randn(B, T, H, D) for _ in range(L)]
    ref = reference(weight, ids, vbase, gts, gated)
    for idx in (ids, ids.int()):
        out = torch.ops.movegen.mix_fwd(
            vbase[0][:, :, 2], gts[0], weight.view(V, M, H, D), idx, gated
        )
        worst = max(worst, diff(out, ref[0]))
    # the per-token form: mix() on the gathered memh (B, T, H, M, D) calls the kernel when no grad
    memh = F.embedding(ids, weight.view(V, -1)).view(B, T, M, H, D).transpose(2, 3).contiguous()
    with torch.no_grad():
        worst = max(worst, diff(mix(vbase[0][:, :, 2], gts[0], memh, gated), ref[0]))

    # the training path: layers read (table, ids); bank gradient per token, then rows by id
    leaves = [t.clone().requires_grad_() for t in (weight, *vbase, *gts)]
    refs = reference(leaves[0], ids, leaves[1 : L + 1], leaves[L + 1 :], gated)
    g_ref = torch.autograd.grad(refs, leaves, douts)
    # per token (int64 and int32 ids) and grouped by id (the ids sorted once, as int32 whatever
    # their dtype; 16-token tiles: groups that span tiles, and tiles of several groups); the bank
    # gradient by runs ("runs": 16-token tiles; at T = 23 runs go past their tile), by the
    # default "layers" (a token walk, each token's sum over the layers one product) or by the
    # lanes kernels (8: the segmented sum over tiles of sorted tokens at M <= 8, the token walk at
    # M = 24); the layers' value gradients stacked into one tensor or each read where it lies
    # (the grouped mix kernels in their dot form too: "dot", last)
    cases = [(ids, False, "runs", True), (ids.int(), False, "runs", False), (ids, True, "runs", True),
             (ids, True, 8, False), (ids, False, "layers", True)] + [(ids, True, "layers", True), (ids, True, "layers", False), (ids, False, 8, True)] * (M > 8) + [(ids, True, "layers", False, "dot")]  # fmt: skip
    cases = [c if len(c) == 5 else (*c, "lanes") for c in cases]
    for idx, grouped, bank, stack_dv, form in cases:
        leaves = [t.clone().requires_grad_() for t in (weight, *vbase, *gts)]
        with mock.patch.object(torch, "sort", wraps=torch.sort) as sort, bank_kernel(bank), \
                mock.patch.object(kernels, "MIX_KERNEL", form):  # fmt: skip
            mem, taps = bank_taps(leaves[0].view(V, M, H, D), L, G, idx, grouped=grouped,
                                  stack_dv=stack_dv)  # fmt: skip
            assert isinstance(mem, tuple) and (mem[2] is not None) == grouped
            outs = [mix_tapped(v[:, :, 2], g, mem, tp, gated) for v, g, tp in zip(leaves[1 : L + 1], leaves[L + 1 :], taps)]  # fmt: skip
            worst = max(worst, *(diff(a, b) for a, b in zip(outs, refs)))
            grads = torch.autograd.grad(outs, leaves, douts)
        # one sort per step: grouped, the forward's (int32) sort serves the bank gradient too
        assert sort.call_count == 1, sort.call_count
        worst = max(worst, *(diff(a, b) for a, b in zip(grads, g_ref)))

    # the routers' logits in place of the gates: the kernels form 2 * sigmoid and hand back the
    # logits' gradient (the bank gradient reads the logits too)
    lgs = [torch.logit(g / 2) for g in gts]
    leaves = [t.clone().requires_grad_() for t in (weight, *vbase, *lgs)]
    refs = reference(
        leaves[0], ids, leaves[1 : L + 1], [2 * torch.sigmoid(x) for x in leaves[L + 1 :]], gated
    )
    g_ref = torch.autograd.grad(refs, leaves, douts)
    for idx, grouped, bank, stack_dv, form in [cases[0], cases[1], cases[3], cases[4]] + cases[5:]:
        leaves = [t.clone().requires_grad_() for t in (weight, *vbase, *lgs)]
        with bank_kernel(bank), mock.patch.object(kernels, "MIX_KERNEL", form):
            mem, taps = bank_taps(leaves[0].view(V, M, H, D), L, G, idx, grouped=grouped,
                                  logits=True, stack_dv=stack_dv)  # fmt: skip
            outs = [mix_tapped(v[:, :, 2], x, mem, tp, gated, logits=True) for v, x, tp in zip(leaves[1 : L + 1], leaves[L + 1 :], taps)]  # fmt: skip
            worst = max(worst, *(diff(a, b) for a, b in zip(outs, refs)))
            grads = torch.autograd.grad(outs, leaves, douts)
        worst = max(worst, *(diff(a, b) for a, b in zip(grads, g_ref)))

# the grouped mix kernels' dot form against their lanes form in bf16 (the dot form's own path:
# its products in the table's dtype, or the gates in TF32 parts where they are logits; fp32
# tables take TF32 x 3, above); ids with a long run over several tiles, tiles of many groups
for M, gated, logits in [(6, True, True), (24, True, False), (3, False, False)]:
    B, T, H, D, V = 2, 37, 2, 16, 50
    G, bf = M + int(gated), torch.bfloat16
    ids = torch.randint(V, (B, T))
    ids = torch.where(torch.rand(B, T) < 0.5, torch.full_like(ids, 7), ids)
    table = torch.randn(V, M, H, D, dtype=bf)
    v = torch.randn(B, T, 3, H, D, dtype=bf)[:, :, 2]
    gates = torch.randn(B, T, H, G, dtype=bf) if logits else 2 * torch.rand(B, T, H, G, dtype=bf)
    dout = torch.randn(B, T, H, D, dtype=bf)
    groups = kernels.id_groups(ids)
    res = {}
    for form in ("lanes", "dot"):
        with mock.patch.object(kernels, "MIX_KERNEL", form):
            res[form] = (torch.ops.movegen.gmix_fwd(v, gates, table, *groups, gated, logits),
                         *torch.ops.movegen.gmix_bwd(dout, v, gates, table, *groups, gated, logits))  # fmt: skip
    for a, b in zip(*res.values()):  # bf16 outputs: sums in another order may round apart
        rel = diff(a.float(), b.float()) / a.float().abs().max().item()
        assert rel < 1e-2, (M, gated, logits, rel)

# the whole model: kernels + deferred bank gradient against plain autograd, eager and compiled
cfg = GPTConfig.preset(
    "tiny", vocab_size=32, num_classes=4, seq_len=9, memory="move", memory_density=2
)
model = GPT(cfg).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
codes, labels = torch.randint(32, (3, 9)), torch.tensor([0, 3, 4])
assert isinstance(model.bank.tapped(model.input_ids(codes, labels), 2, cfg.slots + 1)[0], tuple)


res = []
compiled = torch.compile(model, fullgraph=True)
ops = ("norm", "swiglu", "rope", "attn")  # the default less the attention from the product
# the last run, plain autograd through every mix, is the reference ("gates": the logits to the
# kernels; dropped by the model where it cannot apply, as in that last run; the bank gradient
# from the stacked value gradients or from each where it lies; "ropeattn": the attention
# straight from the product, the mix of its v columns included; "router" without "gates" keeps
# the split and the mix apart; "routerpad", default, the router's product padded to aligned
# rows)
G, R, A, AS = ("gates",), ("router",), ("ropeattn",), ("ropeattn", "ropesave")
P = ("routerpad",)
# the grouped mix kernels' form (kernels.MIX_KERNEL): dot, or lanes, forward and backward, or
# dot-bwd (lanes forward, dot backward); the default (none of them) lanes
DOT, LANES, DOT_BWD = ("dot",), ("lanes",), ("dot-bwd",)
for deferred, grouped, fn, extra, stack in ((True, False, model, (), True), (True, False, compiled, (), False),
                                            (True, True, model, LANES, False), (True, True, compiled, DOT_BWD, True),
                                            (True, False, model, G, False), (True, True, compiled, G, True),
                                            (True, False, compiled, G + R, True), (True, True, model, R + DOT_BWD, True),
                                            (True, False, model, A, True), (True, True, model, A + G + R, False),
                                            (True, True, compiled, A + G, True), (True, False, model, A + R, True),
                                            (True, True, model, AS + G + R, True), (True, False, compiled, AS, False),
                                            (True, False, model, AS + P + G, True),
                                            (True, True, model, A + G + DOT, False), (True, True, compiled, G + DOT, True),
                                            (False, False, model, G, True)):  # fmt: skip
    model.zero_grad()
    model.deferred_bank_grad = deferred
    model.bank.group_by_id = grouped
    model.bank.stack_dv = stack
    kernels.MIX_KERNEL = next((f for f in kernels.MIX_KERNELS if f in extra), None)
    extra = tuple(e for e in extra if e not in kernels.MIX_KERNELS)
    model.fused_ops = ops + extra
    dots = [Launches(kernels._dmix_fwd_kernel), Launches(kernels._dmix_bwd_kernel)]
    with mock.patch.object(move._RopeAttnMix, "apply", wraps=move._RopeAttnMix.apply) as attn_mix, \
            mock.patch.multiple(kernels, _dmix_fwd_kernel=dots[0], _dmix_bwd_kernel=dots[1]):  # fmt: skip
        out = fn(codes, labels)
        out.square().mean().backward()
    # the dot form where asked (both ways, or backward), in every layer, and only there
    form = kernels.MIX_KERNEL
    want = [grouped and form == "dot", grouped and form in ("dot", "dot-bwd")]
    assert [len(k.kwargs) for k in dots] == [cfg.n_layer * w for w in want], (form, grouped)
    if fn is model:  # a fused function runs in every layer where it can, and only there
        fits = "router" not in extra or "gates" in extra
        assert attn_mix.call_count == cfg.n_layer * ("ropeattn" in extra and fits), (extra, attn_mix.call_count)  # fmt: skip
    res.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
for out, grads in res[:-1]:
    worst = max(worst, diff(out, res[-1][0]))
    worst = max(worst, *(diff(a, b) for a, b in zip(grads, res[-1][1])))
print(f"WORST {worst:.3e}")
