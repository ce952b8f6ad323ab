"""The graphed training step (``LitGPT(cuda_graph=True)``) against the eager one, on a GPU."""

import pytest
import torch

from movegen.lit import LitGPT
from movegen.model import GPTConfig


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _steps(model, batches, opt):
    out = []
    for codes, labels in batches:
        loss = model.train_loss(codes, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("memory", ["none", "move", "lave"])
def test_graphed_step_trains_as_the_eager_step(memory):
    _cuda()
    cfg = GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16, memory=memory, memory_density=2,
                           resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0, class_dropout=0.0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(64, (8, 16), generator=g).cuda(), torch.randint(10, (8,), generator=g).cuda())
               for _ in range(6)]  # fmt: skip
    losses = {}
    for graph in (False, True):
        torch.manual_seed(0)
        m = LitGPT(cfg, cuda_graph=graph).cuda()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        losses[graph] = _steps(m, batches, opt)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[True][-1] < losses[True][0]  # it trains: the replays see the updated weights


@pytest.mark.gpu
def test_graphed_step_draws_fresh_dropout_and_resumes_the_stream():
    _cuda()
    cfg = GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16, memory="move", class_dropout=0.5,
                           resid_dropout=0.2)  # fmt: skip
    codes, labels = torch.randint(64, (8, 16), device="cuda"), torch.randint(10, (8,), device="cuda")
    m = LitGPT(cfg, cuda_graph=True).cuda()
    torch.cuda.manual_seed(1)
    a = [m.train_loss(codes, labels).item() for _ in range(3)]
    assert len(set(a)) == 3  # a new mask at every replay, not the captured one
    # a second model captured after the generator is put back to the same state replays the same
    # numbers: capture consumes nothing (what a resume relies on)
    m2 = LitGPT(cfg, cuda_graph=True).cuda()
    m2.load_state_dict(m.state_dict())
    torch.cuda.manual_seed(1)
    b = [m2.train_loss(codes, labels).item() for _ in range(3)]
    assert b == a
