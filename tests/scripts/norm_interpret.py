"""Run under TRITON_INTERPRET=1 (CPU): ``kernels.residual_norm`` (x + dropout(y), RMSNorm, one
kernel each way) against PyTorch's ops, with and without y, with dropout 0 and 0.3: x', the norm
and the gradients of x, y and the weight. With dropout the mask is read back from x' - x and the
reference applies that mask, so the backward must redraw the forward's mask exactly; the kept
fraction must be near 1 - p. ``kernels.silu_mul``, ``kernels.split_rope``, ``kernels.cross_entropy`` and ``kernels.attention`` and
their gradients against PyTorch's. A GPT's fused and plain training paths agree with dropout off."""

import os

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1"
from movegen import kernels  # noqa: E402
from movegen.model import GPT, GPTConfig  # noqa: E402

torch.manual_seed(0)
worst = 0.0
R, D = 301, 48  # rows: a partial last block; several rows per backward program
for has_y in (True, False):
    for p in (0.0, 0.3):
        x = torch.randn(R, D).requires_grad_()
        y = (torch.randn(R, D).abs() + 1).requires_grad_() if has_y else None  # never near 0
        w = (1 + 0.1 * torch.randn(D)).requires_grad_()
        leaves = [t for t in (x, y, w) if t is not None]
        xo, n = kernels.residual_norm(x, y, w, 1e-5, p)
        gxo, gn = torch.randn(R, D), torch.randn(R, D)
        torch.autograd.backward([xo, n] if has_y else [n], [gxo, gn] if has_y else [gn])
        refs = [t.detach().clone().requires_grad_() for t in leaves]
        xr = refs[0]
        if has_y:
            keep = (xo - x).detach().abs() > 1e-3
            frac = keep.float().mean().item()
            assert abs(frac - (1 - p)) < 0.03, (p, frac)
            xr = xr + refs[1] * keep / (1 - p)
        nr = F.rms_norm(xr, (D,), refs[-1], 1e-5)
        loss = (nr * gn).sum() + ((xr * gxo).sum() if has_y else 0)
        loss.backward()
        outs = [(xo, xr), (n, nr)] + [(a.grad, b.grad) for a, b in zip(leaves, refs)]
        worst = max(worst, *((a - b).abs().max().item() for a, b in outs))

# the SwiGLU product: silu(a) * b and the gradient of u = [a | b]
u = (3 * torch.randn(5, 7, 2 * 40)).requires_grad_()  # h = 40: a partial column block
h = kernels.silu_mul(u)
dh = torch.randn(h.shape)
(du,) = torch.autograd.grad(h, u, dh)
ur = u.detach().clone().requires_grad_()
a, b = ur.chunk(2, dim=-1)
hr = F.silu(a) * b
(dur,) = torch.autograd.grad(hr, ur, dh)
worst = max(worst, (h - hr).abs().max().item(), (du - dur).abs().max().item())

# the QKV split + RoPE: q, k rotated as apply_rope does, v as it is, and the gradient of qkv
from movegen.model import apply_rope  # noqa: E402

B, S, H, Dh = 2, 11, 3, 16  # S: a partial row block
ang = torch.rand(S, Dh // 2) * 6
cos, sin = ang.cos(), ang.sin()
qkv = torch.randn(B, S, 3 * H * Dh).requires_grad_()
outs = kernels.split_rope(qkv.view(B, S, 3, H, Dh), cos, sin)
grads = [torch.randn(B, H, S, Dh).transpose(1, 2) for _ in range(3)]  # strided, as SDPA's
(dqkv,) = torch.autograd.grad(outs, qkv, grads)
qr = qkv.detach().clone().requires_grad_()
q, k, v = qr.view(B, S, 3, H, Dh).unbind(2)
refs = [apply_rope(q, cos, sin), apply_rope(k, cos, sin), v]
(dref,) = torch.autograd.grad(refs, qr, grads)
worst = max(worst, *((a - b).abs().max().item() for a, b in zip([*outs, dqkv], [*refs, dref])))

# the same of a wider product [q | k | v | extra | padding]: the extra columns as they are, the
# whole gradient in one tensor with zeros in the padding
proj = torch.randn(B, S, 3 * H * Dh + 7 + 5).requires_grad_()
outs = kernels.split_rope_wide(proj, cos, sin, H, Dh, 7)
grads.append(torch.randn(B, S, 7))
(dproj,) = torch.autograd.grad(outs, proj, grads)
pr = proj.detach().clone().requires_grad_()
q, k, v = pr[..., : 3 * H * Dh].view(B, S, 3, H, Dh).unbind(2)
refs = [apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, pr[..., 3 * H * Dh : 3 * H * Dh + 7]]
(dref,) = torch.autograd.grad(refs, pr, grads)
assert dproj.shape == proj.shape and (dproj[..., -5:] == 0).all()
worst = max(worst, *((a - b).abs().max().item() for a, b in zip([*outs, dproj], [*refs, dref])))

# the cross-entropy: F.cross_entropy's loss and gradient (K = 300: a partial last chunk)
x = (3 * torch.randn(37, 300)).requires_grad_()
t = torch.randint(300, (37,))
(g,) = torch.autograd.grad(kernels.cross_entropy(x, t) * 2.5, x)
xr = x.detach().clone().requires_grad_()
lr = F.cross_entropy(xr, t)
(gr,) = torch.autograd.grad(lr * 2.5, xr)
worst = max(worst, (kernels.cross_entropy(x, t) - lr).abs().item(), (g - gr).abs().max().item())

# causal attention: SDPA's output and the gradients of q, k, v; S = 37 (partial blocks of 16),
# q, k, v as the model hands them (transposed views), the output gradient strided
B, S, H, Dh = 2, 37, 3, 16
qkv = torch.randn(B, S, 3, H, Dh).requires_grad_()
q, k, v = qkv.unbind(2)
o = kernels.attention(q, k, v)
do = torch.randn(B, H, S, Dh).transpose(1, 2)
(dqkv,) = torch.autograd.grad(o, qkv, do)
qr = qkv.detach().clone().requires_grad_()
ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in qr.unbind(2)), is_causal=True)
(dref,) = torch.autograd.grad(ref.transpose(1, 2), qr, do)
assert o.is_contiguous() and o.shape == (B, S, H, Dh)
worst = max(worst, (o - ref.transpose(1, 2)).abs().max().item(), (dqkv - dref).abs().max().item())

# attention straight from the QKV product, RoPE applied as q and k are read: SDPA of the rotated
# q, k and v, and the product's gradient (dq, dk rotated back) in one tensor
ang = torch.rand(S, Dh // 2) * 6
cos, sin = ang.cos(), ang.sin()
o = kernels.rope_attention(qkv, cos, sin)
(dqkv,) = torch.autograd.grad(o, qkv, do)
qr = qkv.detach().clone().requires_grad_()
q, k, v = qr.unbind(2)
qk = [apply_rope(t, cos, sin).transpose(1, 2) for t in (q, k)]
ref = F.scaled_dot_product_attention(*qk, v.transpose(1, 2), is_causal=True)
(dref,) = torch.autograd.grad(ref.transpose(1, 2), qr, do)
assert o.is_contiguous() and dqkv.shape == qkv.shape
worst = max(worst, (o - ref.transpose(1, 2)).abs().max().item(), (dqkv - dref).abs().max().item())
# the same with the rotated q, k written by the forward and read by the backward
o = kernels.rope_attention(qkv, cos, sin, save_rotated=True)
(dqkv,) = torch.autograd.grad(o, qkv, do)
worst = max(worst, (o - ref.transpose(1, 2)).abs().max().item(), (dqkv - dref).abs().max().item())

# the model: fused (kernels) and plain paths, same weights, dropout off, forward and gradients
settings = dict(vocab_size=64, num_classes=10, seq_len=16, resid_dropout=0.0, ffn_dropout=0.0,
                token_dropout=0.0, class_dropout=0.0)  # fmt: skip
codes, labels = torch.randint(64, (3, 16)), torch.tensor([1, 5, 9])
# the standard model, and MoVE with the QKV and router products stacked ("router") and the gates
# formed in the mix kernels ("gates"); the standard model's attention straight from its QKV
# product ("ropeattn")
for memory, ops in (("none", ()), ("none", ("ropeattn",)), ("none", ("ropeattn", "ropesave")),
                    ("move", ("router", "gates"))):  # fmt: skip
    model = GPT(GPTConfig.preset("tiny", memory=memory, **settings)).train()
    for prm in model.parameters():
        torch.nn.init.normal_(prm, std=0.1)
    res = []
    for fused in (True, False):
        model.fused_ops = ("norm", "swiglu", "rope", "ce", "attn", *ops) if fused else ()
        model.zero_grad()
        out = model(codes, labels)
        (out.square().mean() + model.loss(codes, labels)).backward()
        res.append([out, *(q.grad.clone() for q in model.parameters())])
    worst = max(worst, *((a - b).abs().max().item() for a, b in zip(*res)))
print("WORST", worst)
