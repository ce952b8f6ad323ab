"""Run under TRITON_INTERPRET=1 (CPU): the fused decoding kernel against the SDPA decoder, step by
step over a whole sequence, for every value-memory kind; prints the worst logit difference."""

import os

import torch

assert os.environ.get("TRITON_INTERPRET") == "1"
from movegen import kernels  # noqa: E402
from movegen.model import GPT, GPTConfig, StaticDecoder  # noqa: E402

torch.manual_seed(0)
worst = 0.0
cases = [
    ("none", 1, None),
    ("move", 2, True),
    ("move", 1, False),
    ("lave", 1, None),
    ("lave", 2, True),
]
blocks = [(64, 1), (4, 1), (4, 2)]  # one block; several blocks, without and with pipelining
runs = [(c, blocks[0]) for c in cases] + [(cases[1], b) for b in blocks[1:]]
for (memory, density, gated), (block_t, stages) in runs:
    kernels.DECODE_CONFIG.update(block_t=block_t, stages=stages)
    cfg = GPTConfig(vocab_size=48, num_classes=5, seq_len=9, n_layer=2, n_head=2, n_embd=32,
                    mlp_multiple_of=32, memory=memory, memory_density=density,
                    gate_standard_path=gated)  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():  # away from the zero/identity init: real gates, a real head
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    B = 3
    decs = {a: StaticDecoder(model, B, attention=a) for a in ("fused", "sdpa")}
    ids = {a: torch.tensor([[48], [52], [53]]) for a in decs}  # class ids (K + c, null = K + 5)
    for t in range(cfg.seq_len):
        pos = torch.tensor([t])
        out = {a: d(ids[a], pos) for a, d in decs.items()}
        worst = max(worst, (out["fused"] - out["sdpa"]).abs().max().item())
        nxt = out["sdpa"].argmax(-1, keepdim=True)  # both follow the same codes
        ids = {a: nxt for a in decs}
    for l in range(cfg.n_layer):  # the caches hold the same keys and mixed values
        for kind in "kv":
            a, b = (getattr(decs[x], f"{kind}{l}") for x in ("fused", "sdpa"))
            worst = max(worst, (a - b).abs().max().item())
print(f"WORST {worst:.3e}")
