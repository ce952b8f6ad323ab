"""The graphed training step (``LitGPT(cuda_graph=True)``) against the eager one, on a GPU."""

import pytest
import torch

from movegen.lit import LitGPT
from movegen.model import GPTConfig


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _model(cfg, graph: bool = False, **kw) -> LitGPT:
    torch.manual_seed(0)
    m = LitGPT(cfg, cuda_graph=graph, **kw)
    torch.nn.init.normal_(m.model.head.weight, std=0.05)  # the zero-initialised head would give
    return m.cuda()  # ln(K) whatever dropout does


def _steps(model, batches, opt, keep: list | None = None):
    out = []
    for codes, labels in batches:
        loss = model.train_loss(codes, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if keep is not None:
            keep.append(loss)
        out.append(loss.item())
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("memory", ["none", "move", "lave"])
def test_graphed_step_trains_as_the_eager_step(memory):
    _cuda()
    cfg = GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16, memory=memory, memory_density=2,
                           resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0, class_dropout=0.0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    two = [(torch.randint(64, (8, 16), generator=g).cuda(), torch.randint(10, (8,), generator=g).cuda())
           for _ in range(2)]  # fmt: skip
    batches = two * 4  # seen again: the loss must fall
    losses = {}
    for graph in (False, True):
        m = _model(cfg, graph)
        # SGD: its step is linear in the gradient, so the last-bit noise of fp32 atomics stays
        # last-bit noise (AdamW's normalised step would turn a near-zero gradient's sign into
        # a full-size difference)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        losses[graph] = _steps(m, batches, opt)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[True][-1] < losses[True][0]  # it trains: the replays see the updated weights


@pytest.mark.gpu
def test_graphed_step_draws_fresh_dropout_and_resumes_the_stream():
    _cuda()
    cfg = GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16, memory="move", class_dropout=0.5,
                           resid_dropout=0.2)  # fmt: skip
    codes, labels = (
        torch.randint(64, (8, 16), device="cuda"),
        torch.randint(10, (8,), device="cuda"),
    )
    m = _model(cfg, True)
    torch.cuda.manual_seed(1)
    a = [m.train_loss(codes, labels).item() for _ in range(3)]
    assert len(set(a)) == 3  # a new mask at every replay, not the captured one
    # a second model captured after the generator is put back to the same state replays the same
    # numbers: capture consumes nothing (what a resume relies on)
    m2 = _model(cfg, True)
    m2.load_state_dict(m.state_dict())
    torch.cuda.manual_seed(1)
    b = [m2.train_loss(codes, labels).item() for _ in range(3)]
    assert b == a


@pytest.mark.gpu
def test_compiled_graphs_train_as_the_eager_step():
    """``compile_mode='reduce-overhead'``: compiled kernels replayed as CUDA graphs, the loss
    handed out as a copy (the graphs reuse their output buffer)."""
    _cuda()
    cfg = GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16, memory="move",
                           resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0, class_dropout=0.0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    two = [(torch.randint(64, (8, 16), generator=g).cuda(), torch.randint(10, (8,), generator=g).cuda())
           for _ in range(2)]  # fmt: skip
    losses, kept = {}, []
    for kw in ({}, {"compile": True, "compile_mode": "reduce-overhead"}):
        m = _model(cfg, **kw)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        losses[bool(kw)] = _steps(
            m, two * 3, opt, keep=kept
        )  # kept: still readable after later replays
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert [t.item() for t in kept[-6:]] == losses[True]
