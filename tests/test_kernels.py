"""The Triton kernels of the MoVE mix, run on the CPU by Triton's interpreter."""

import pytest

pytest.importorskip("triton")


def test_triton_kernels_match_reference_in_interpreter(interpreted):
    worst = interpreted("kernels_interpret.py")
    assert worst < 1e-5, worst


@pytest.mark.gpu
@pytest.mark.parametrize("grouped", [False, True])
def test_triton_kernels_on_gpu(grouped):
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from movegen.move import bank_taps, mix_reference, mix_tapped

    torch.manual_seed(0)
    B, T, H, M, D, V, L = 4, 64, 12, 24, 64, 100, 2  # 256 ids of 100: many repeats
    dev, bf = "cuda", torch.bfloat16
    weight = torch.randn(V, M, H * D, device=dev, dtype=bf, requires_grad=True)
    ids = torch.randint(V, (B, T), device=dev)
    vb = [torch.randn(B, T, 3, H, D, device=dev, dtype=bf, requires_grad=True) for _ in range(L)]
    gs = [(2 * torch.rand(B, T, H, M + 1, device=dev, dtype=bf)).requires_grad_() for _ in range(L)]
    douts = [torch.randn(B, T, H, D, device=dev, dtype=bf) for _ in range(L)]
    mem, taps = bank_taps(weight.view(V, M, H, D), L, M + 1, ids, grouped=grouped)
    outs = [mix_tapped(v[:, :, 2], g, mem, tp, True) for v, g, tp in zip(vb, gs, taps)]
    grads = torch.autograd.grad(outs, [weight, *vb, *gs], douts)
    leaves = [t.detach().double().requires_grad_() for t in (weight, *vb, *gs)]
    memd = F.embedding(ids, leaves[0].view(V, -1)).view(B, T, M, H, D)
    refs = [mix_reference(v[:, :, 2], g, memd, True) for v, g in zip(leaves[1 : L + 1], leaves[L + 1 :])]  # fmt: skip
    ref_grads = torch.autograd.grad(refs, leaves, [d.double() for d in douts])
    for a, b in zip([*outs, *grads], [*refs, *ref_grads]):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-2
