"""Run under TRITON_INTERPRET=1 (CPU): the Triton MoVE kernels against the reference mix."""

import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1"
from movegen import kernels  # noqa: E402
from movegen.model import GPT, GPTConfig  # noqa: E402
from movegen.move import bank_taps, mix_reference, mix_tapped  # noqa: E402

torch.manual_seed(0)
worst = 0.0
for M, gated in [(6, True), (3, False), (24, True)]:
    B, T, H, D, L = 2, 3, 2, 16, 3
    G = M + int(gated)
    assert kernels.available(torch.zeros(D))
    v = torch.randn(B, T, 3, H, D)[:, :, 2]  # a strided view, as the model's qkv split gives
    gates = 2 * torch.rand(B, T, H, G)
    memh = torch.randn(B, T, H, M, D)
    worst = max(worst, (torch.ops.movegen.mix_fwd(v, gates, memh, gated)
                        - mix_reference(v, gates, memh.transpose(2, 3), gated)).abs().max().item())  # fmt: skip
    mm = memh.clone().requires_grad_()
    vs = [torch.randn(B, T, H, D, requires_grad=True) for _ in range(L)]
    gts = [(2 * torch.rand(B, T, H, G)).requires_grad_() for _ in range(L)]
    douts = [torch.randn(B, T, H, D) for _ in range(L)]
    mdet, taps = bank_taps(mm, L, G)
    outs = [mix_tapped(a, b, mdet, t, gated) for a, b, t in zip(vs, gts, taps)]
    g1 = torch.autograd.grad(outs, [mm, *vs, *gts], douts)
    mm2 = memh.clone().requires_grad_()
    ref = [mix_reference(a, b, mm2.transpose(2, 3), gated) for a, b in zip(vs, gts)]
    g2 = torch.autograd.grad(ref, [mm2, *vs, *gts], douts)
    worst = max(worst, *((a - b).abs().max().item() for a, b in zip(g1, g2)))
    worst = max(worst, *((a - b).abs().max().item() for a, b in zip(outs, ref)))

# the whole model: kernels + deferred bank gradient against plain autograd
cfg = GPTConfig.preset(
    "tiny", vocab_size=32, num_classes=4, seq_len=9, memory="move", memory_density=2
)
model = GPT(cfg).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
codes, labels = torch.randint(32, (3, 9)), torch.tensor([0, 3, 4])
res = []
for deferred in (True, False):
    model.zero_grad()
    model.deferred_bank_grad = deferred
    out = model(codes, labels)
    out.square().mean().backward()
    res.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
worst = max(worst, (res[0][0] - res[1][0]).abs().max().item())
worst = max(worst, *((a - b).abs().max().item() for a, b in zip(res[0][1], res[1][1])))
print(f"WORST {worst:.3e}")
