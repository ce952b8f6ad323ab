"""Run under TRITON_INTERPRET=1 (CPU): the decode loop with the fused decoding kernel against the
same loop with SDPA, step by step over a whole sequence, for every value-memory kind and several
launch settings; then the step object's codes with each. Prints the worst logit/cache difference."""

import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1"
from movegen import kernels  # noqa: E402
from movegen.model import GPT, GPTConfig  # noqa: E402
from movegen.sample import CompiledStep, SamplingSettings, generate  # noqa: E402

torch.manual_seed(0)
worst = 0.0
cases = [
    ("none", 1, None),
    ("move", 2, True),
    ("move", 1, False),
    ("lave", 1, None),
    ("lave", 2, True),
]
launches = [  # one block; several blocks, without and with pipelining
    kernels.DecodeLaunch(block_t=64),
    kernels.DecodeLaunch(block_t=4),
    kernels.DecodeLaunch(block_t=4, stages=2),
]
runs = [(c, launches[0]) for c in cases] + [(cases[1], b) for b in launches[1:]]
for (memory, density, gated), launch in runs:
    cfg = GPTConfig(vocab_size=48, num_classes=5, seq_len=9, n_layer=2, n_head=2, n_embd=32,
                    mlp_multiple_of=32, memory=memory, memory_density=density,
                    gate_standard_path=gated)  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():  # away from the zero/identity init: real gates, a real head
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    B = 3
    caches = {a: model.new_cache(B, attention=a, launch=launch) for a in ("fused", "sdpa")}
    assert caches["fused"].attention == "fused" and caches["sdpa"].attention == "sdpa"
    ids = torch.tensor([[48], [52], [53]])  # class ids (K + c, null = K + 5)
    with torch.no_grad():
        for t in range(cfg.seq_len):
            pos = caches["sdpa"].positions[t : t + 1]
            out = {a: model.step(ids, pos, c)[:, -1] for a, c in caches.items()}
            worst = max(worst, (out["fused"] - out["sdpa"]).abs().max().item())
            ids = out["sdpa"].argmax(-1, keepdim=True)  # both follow the same codes
    for a, b in zip(caches["fused"].layers, caches["sdpa"].layers):  # the same keys, mixed values
        worst = max(worst, (a.k - b.k).abs().max().item(), (a.v - b.v).abs().max().item())

# the step object through either attention draws the plain loop's codes (fused under 'auto' here)
model = GPT(GPTConfig.preset("tiny", vocab_size=48, num_classes=5, seq_len=9, memory="move")).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.2)
labels = torch.tensor([0, 3, 5])
s = SamplingSettings(cfg_scale=2.0, cfg_interval=(1, 7), top_k=12)
plain = generate(model, labels, s, generator=torch.Generator().manual_seed(0))
for attention in ("fused", "sdpa"):
    step = CompiledStep(model, 3, s, mode="eager", attention=attention)
    codes = generate(model, labels, s, generator=torch.Generator().manual_seed(0), step=step)
    assert torch.equal(codes, plain), (attention, codes, plain)
print(f"WORST {worst:.3e}")
