"""The Triton kernels of the MoVE mix, run on the CPU by Triton's interpreter."""

import itertools
import re

import pytest

pytest.importorskip("triton")


@pytest.mark.interpreter_script("kernels_interpret.py")
def test_triton_kernels_match_reference_in_interpreter(interpreted):
    worst = interpreted("kernels_interpret.py")
    assert worst < 1e-5, worst


@pytest.mark.gpu
@pytest.mark.parametrize("grouped,M,form", [(False, 6, None), (False, 24, None), (True, 6, "lanes"),
                                            (True, 24, "lanes"), (True, 6, "dot"), (True, 24, "dot")])  # fmt: skip
def test_triton_kernels_on_gpu(grouped, M, form, monkeypatch):
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from movegen import kernels
    from movegen.move import bank_taps, mix_reference, mix_tapped

    monkeypatch.setattr(kernels, "MIX_KERNEL", form)  # the grouped kernels' form
    torch.manual_seed(0)
    # 256 ids of 100: many repeats; M = 6 and 24: both kernels of the bank gradient
    B, T, H, D, V, L = 4, 64, 12, 64, 100, 2
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


@pytest.mark.gpu
@pytest.mark.parametrize("M,logits", [(6, True), (24, False), (24, True)])
def test_grouped_mix_dot_form_at_gpt_b_scale_on_gpu(M, logits, monkeypatch):
    """The grouped mix kernels' dot form at GPT-B's shapes (65,536 tokens of 16,384 ids, half
    of them one id: runs over many tiles, and tiles of many groups; 12 heads of 64; bf16), its
    products in bf16 (gates, and every backward) or the gates in TF32 parts (the routers'
    logits), against the same mix in float64 and against the lanes form."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from movegen import kernels

    torch.manual_seed(0)
    B, T, H, D, V, bf = 256, 256, 12, 64, 16384, torch.bfloat16
    G = M + 1
    ids = torch.randint(V, (B, T), device="cuda")
    ids = torch.where(torch.rand(B, T, device="cuda") < 0.5, 7, ids)
    table = torch.randn(V, M, H, D, device="cuda", dtype=bf)
    v = torch.randn(B, T, H, D, device="cuda", dtype=bf)
    x = torch.randn(B, T, H, G, device="cuda", dtype=bf)
    gates = x if logits else 2 * torch.sigmoid(x)
    dout = torch.randn(B, T, H, D, device="cuda", dtype=bf)
    groups = kernels.id_groups(ids)
    res = {}
    for form in ("lanes", "dot"):
        monkeypatch.setattr(kernels, "MIX_KERNEL", form)
        res[form] = (torch.ops.movegen.gmix_fwd(v, gates, table, *groups, True, logits),
                     *torch.ops.movegen.gmix_bwd(dout, v, gates, table, *groups, True, logits))  # fmt: skip
    g = 2 * torch.sigmoid(x.double()) if logits else gates.double()
    mem = table.double()[ids]  # (B, T, M, H, D)
    out = g[..., :1] * v.double() + torch.einsum("bthm,btmhd->bthd", g[..., 1:], mem)
    dg = torch.einsum("bthd,btmhd->bthm", dout.double(), mem)
    if logits:  # the logits' gradient
        dg = dg * g[..., 1:] * (1 - g[..., 1:] / 2)
    for form, (o, dv, dgs) in res.items():
        for a, b in ((o, out), (dv, g[..., :1] * dout.double()), (dgs[..., 1:], dg)):
            assert ((a.double() - b).norm() / b.norm()).item() < 5e-3, form
    for a, b in zip(*res.values()):
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("M", [6, 24])
@pytest.mark.parametrize("stack_dv", [True, False])  # both stacked cases first
@pytest.mark.parametrize("bank", ["runs", "lanes", "layers"])
def test_bank_gradient_at_gpt_b_scale_on_gpu(M, stack_dv, bank, monkeypatch):
    """The bank gradient at GPT-B's training shapes (12 layers, 65,536 tokens of 16,384 ids, 12
    heads of 64), by each kernel, from the stacked value gradients or each read in place,
    against the same sum formed by PyTorch layer by layer (fp32 ``index_add_``; row 0, no
    token's id, must come out zero: the output is allocated NaN-filled here; the runs kernel
    gives the same bits when called again, in one process)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from movegen import kernels

    monkeypatch.setattr(kernels, "BANK_KERNEL", bank)
    empty = torch.empty  # the runs kernel's output allocated NaN-filled: every row it must write

    def nan_empty(*args, **kwargs):  # float tensors only: the autotuner's int32 L2 flush buffer too
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    torch.manual_seed(0)
    B, T, H, D, V, L = 256, 256, 12, 64, 16384, 12
    gs = torch.rand(L, B, T, H, M + 1, device="cuda", dtype=torch.bfloat16)
    dvs = [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
    ids = torch.randint(1, V, (B, T), device="cuda")
    # stacked: the gates stacked too; else each layer's gates a view of a wider product
    wide = [torch.cat([g, torch.rand_like(g[..., :3])], -1) for g in gs]
    g_in = [gs] if stack_dv else [w[..., : M + 1] for w in wide]
    out = kernels.bank_rows_grad(g_in, [torch.stack(dvs)] if stack_dv else dvs, ids, V, M)
    ref = torch.zeros(V, M * H * D, device="cuda")
    for g, dv in zip(gs, dvs):  # (B, T, H, M, D) -> rows (M, H, D) of each token
        t = (g[..., -M:].float()[..., None] * dv.float()[..., None, :]).permute(0, 1, 3, 2, 4)
        ref.index_add_(0, ids.reshape(-1), t.reshape(B * T, -1))
    assert ((out.reshape(V, -1) - ref).norm() / ref.norm()).item() < 1e-5
    assert out[0].abs().max().item() == 0
    if bank == "runs":  # no atomics: the same bits again
        again = kernels.bank_rows_grad(g_in, [torch.stack(dvs)] if stack_dv else dvs, ids, V, M)
        assert torch.equal(out, again)


@pytest.mark.interpreter_script("norm_interpret.py")
def test_residual_norm_kernels_match_pytorch_in_interpreter(interpreted):
    worst = interpreted("norm_interpret.py")
    assert worst < 1e-4, worst


@pytest.mark.gpu
def test_residual_norm_on_gpu():
    """The fused dropout + residual + RMSNorm on the GPU, bf16 branch under autocast: the mask
    read back from x' - x keeps 1 - p of the elements, and x', n and every gradient match the
    PyTorch ops under that mask; a GPT-B-shaped model's fused and plain paths agree (dropout off)."""
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from movegen import kernels
    from movegen.model import GPT, GPTConfig

    torch.manual_seed(0)
    R, D, p = 4096, 768, 0.1
    x = torch.randn(R, D, device="cuda", requires_grad=True)
    y = (torch.randn(R, D, device="cuda").abs() + 1).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(D, device="cuda")).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        xo, n = kernels.residual_norm(x, y, w, 1e-5, p)
    assert xo.dtype == torch.float32 and n.dtype == torch.bfloat16
    gxo, gn = torch.randn_like(xo), torch.randn_like(n)
    torch.autograd.backward([xo, n], [gxo, gn])
    keep = (xo - x).detach().abs() > 1e-2
    assert abs(keep.float().mean().item() - (1 - p)) < 0.005
    refs = [t.detach().clone().requires_grad_() for t in (x, y, w)]
    xr = refs[0] + refs[1].float() * keep / (1 - p)
    nr = F.rms_norm(xr, (D,), refs[2], 1e-5)
    torch.autograd.backward([xr, nr], [gxo, gn.float()])
    for a, b in [(xo, xr), (n.float(), nr)] + [(a.grad, b.grad) for a, b in zip((x, y, w), refs)]:
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2

    codes = torch.randint(512, (8, 64), device="cuda")
    labels = torch.randint(10, (8,), device="cuda")
    # the standard model, with its attention straight from the QKV product too; MoVE (x4: 4 slots
    # of 2 layers) with the QKV and router stacked, the gates formed in the mix kernels and the
    # attention straight from the product; MoVE with that attention, its rotated q, k saved,
    # with and without the router's product padded to aligned rows
    x4 = {"memory": "move", "memory_density": 4}
    for memory, ops in (
        ({}, ()),
        ({}, ("ropeattn",)),
        ({}, ("ropeattn", "ropesave")),
        (x4, ("router", "gates", "ropeattn")),
        (x4, ("ropeattn", "ropesave")),
        (x4, ("ropeattn", "ropesave", "routerpad")),
    ):
        cfg = GPTConfig.preset("tiny", vocab_size=512, num_classes=10, seq_len=64, n_embd=768,
                               n_head=12, resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0,
                               class_dropout=0.0, **memory)  # fmt: skip
        model = GPT(cfg).cuda().train()
        for prm in model.parameters():
            torch.nn.init.normal_(prm, std=0.02)
        res = []
        for fused in (True, False):
            model.fused_ops = ("norm", "swiglu", "rope", "attn", *ops) if fused else ()
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(codes, labels)
            F.cross_entropy(out.flatten(0, 1), codes.flatten()).backward()
            res.append([out, *(q.grad.clone() for q in model.parameters())])
        for a, b in zip(*res):
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2


@pytest.mark.gpu
def test_cross_entropy_and_split_rope_on_gpu():
    """``kernels.cross_entropy`` on bf16 logits against ``F.cross_entropy`` of their fp32 copy
    (GPT-B's K = 16384), and ``kernels.split_rope`` against ``apply_rope`` with SDPA-strided
    gradients: values and gradients."""
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from movegen import kernels
    from movegen.model import apply_rope

    torch.manual_seed(0)
    x = (3 * torch.randn(512, 16384, device="cuda")).bfloat16().requires_grad_()
    t = torch.randint(16384, (512,), device="cuda")
    (g,) = torch.autograd.grad(kernels.cross_entropy(x, t), x)
    xr = x.detach().float().requires_grad_()
    lr = F.cross_entropy(xr, t)
    (gr,) = torch.autograd.grad(lr, xr)
    assert abs(kernels.cross_entropy(x, t).item() - lr.item()) < 1e-4
    assert ((g.float() - gr).norm() / gr.norm()).item() < 1e-2

    B, S, H, D = 4, 256, 12, 64
    ang = torch.rand(S, D // 2, device="cuda") * 6
    cos, sin = ang.cos(), ang.sin()
    qkv = torch.randn(B, S, 3 * H * D, device="cuda").bfloat16().requires_grad_()
    outs = kernels.split_rope(qkv.view(B, S, 3, H, D), cos, sin)
    grads = [torch.randn(B, H, S, D, device="cuda").bfloat16().transpose(1, 2) for _ in range(3)]
    (dqkv,) = torch.autograd.grad(outs, qkv, grads)
    qr = qkv.detach().float().requires_grad_()
    q, k, v = qr.view(B, S, 3, H, D).unbind(2)
    refs = [apply_rope(q, cos, sin), apply_rope(k, cos, sin), v]
    (dref,) = torch.autograd.grad(refs, qr, [g.float() for g in grads])
    for a, b in zip([*outs, dqkv], [*refs, dref]):
        assert ((a.float() - b).norm() / b.norm()).item() < 1e-2


@pytest.mark.gpu
def test_attention_on_gpu():
    """``kernels.attention`` on bf16 q, k, v of the training step's layout (transposed views of
    ``(B, S, H, D)``; 256 positions, and 200: partial blocks; heads of 64 as in GPT-B and of 128,
    the widest it takes) against SDPA of their fp32 copies: the output and the gradients of q, k
    and v (the model's fused path with it: ``test_residual_norm_on_gpu``)."""
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from movegen import kernels

    torch.manual_seed(0)
    for S, D in ((256, 64), (200, 64), (256, 128)):
        B, H = 8, 12
        qkv = torch.randn(B, S, 3, H, D, device="cuda").bfloat16().requires_grad_()
        do = torch.randn(B, H, S, D, device="cuda").bfloat16().transpose(1, 2)
        assert kernels.attn_usable(qkv[:, :, 0])
        o = kernels.attention(*qkv.unbind(2))
        (dqkv,) = torch.autograd.grad(o, qkv, do)
        qr = qkv.detach().float().requires_grad_()
        ref = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in qr.unbind(2)), is_causal=True
        )
        ref = ref.transpose(1, 2)
        (dref,) = torch.autograd.grad(ref, qr, do.float())
        for a, b in ((o, ref), (dqkv, dref)):
            assert ((a.float() - b).norm() / b.norm()).item() < 1e-2


def _compile_for_hopper(jit, sig: dict, consts: dict, aligned: bool = False, **options):
    """Triton's whole compiler on ``jit`` for an sm_90 target (no GPU needed): ``sig`` the
    arguments' types, ``consts`` the constexprs' values; ``aligned``: every pointer (tuples'
    included) 16-byte aligned, as a launch on the GPU tells the compiler of PyTorch's tensors;
    returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {}
    for i, t in enumerate(sig[n] for n in jit.arg_names):
        paths = [(i, j) for j in range(len(t))] if isinstance(t, tuple) else [(i,)]
        for path in paths if aligned and "*" in str(t) else ():
            attrs[path] = [["tt.divisibility", 16]]
    src = ASTSource(jit, sig, constexprs={(jit.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)  # fmt: skip
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, **options}
    )


@pytest.mark.background  # (minutes of the compiler on a cold cache: beside the others)
def test_attention_kernels_compile_for_hopper():
    """Every autotuned block shape and warp count of the attention kernels (at its most
    pipeline stages; rotating q and k as they load them, and one shape without and one with the
    rotated q, k saved) goes through Triton's whole compiler for an sm_90 target on this GPU-free
    machine: the interpreter runs the kernels as
    Python and does not see what only the compiler rejects (a loop re-assigning a tensor at
    another shape, say)."""
    triton = pytest.importorskip("triton")

    from movegen import kernels

    if kernels.INTERPRET:
        pytest.skip("the interpreter is on: the kernels are not the autotuned ones")
    bf, f32 = "*bf16", "*fp32"
    ptrs = {"lse_ptr": f32, "delta_ptr": f32, "cos_ptr": f32, "sin_ptr": f32}
    kinds = [(kernels._attn_fwd_kernel, ("qk_scale",)), (kernels._attn_bwd_kernel, ("scale", "qk_scale")),
             (kernels._attn_delta_kernel, ())]  # fmt: skip
    compiled = set()
    for kern, floats in kinds:
        jit, configs = kern, [triton.Config({"BLOCK": 64})]
        if isinstance(kern, triton.runtime.Autotuner):
            jit, configs = kern.fn, kern.configs
        deepest = {}  # each block shape and warp count at its most pipeline stages
        for cfg in configs:
            key = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps)
            if key not in deepest or cfg.num_stages > deepest[key].num_stages:
                deepest[key] = cfg
        # RoPE on load (rope_attention) at every shape; at the first shape, without it, and
        # with the rotated q, k saved by the forward and read by the backward ("ropesave")
        first = next(iter(deepest.items()))
        modes = [(kc, "rope") for kc in deepest.items()] + [(first, "none"), (first, "saved")]
        for (key, cfg), mode in modes:
            consts = {"D": 64, **cfg.kwargs}
            if "ROPE" not in jit.arg_names:
                if mode != "rope":
                    continue
            elif "SAVE_QK" in jit.arg_names:  # the forward
                consts.update(ROPE=mode != "none", SAVE_QK=mode == "saved")
            else:  # the backward: saved q, k are read as they are, dq and dk rotated back
                consts.update(ROPE=mode == "rope", UNROT=mode != "none")
            sig = {n: "constexpr" if n in consts else ptrs.get(n, bf) if n.endswith("_ptr")
                   else "fp32" if n in floats else "i32" for n in jit.arg_names}  # fmt: skip
            _compile_for_hopper(
                jit, sig, consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages
            )
            compiled.add((jit.__name__, key, mode))
    # delta; forward and backward shapes with RoPE, one of each without and one saved
    assert len(compiled) == 1 + 5 + 5 + 2 + 2, sorted(compiled)


@pytest.mark.background  # (minutes of the compiler on a cold cache: beside the others)
def test_bank_kernels_compile_for_hopper():
    """The bank-gradient kernels take the L layers' gates and value gradients as one stacked
    tensor each or as tuples of L pointers (no stacked copy); each goes through Triton's whole compiler for an
    sm_90 target here, at GPT-B's shapes (12 layers; x1: 6 slots, the tile kernel; x4: 24, the
    token walk; the runs kernel at both, its TF32 products as tensor-core instructions; the
    layers kernel, the same, its value gradients' rows loaded as 16-byte asynchronous copies
    (pipelined) where every layer's is aligned, and at 3 layers too, its products' inner size
    kept at 16), reading gates or the routers' logits."""
    triton = pytest.importorskip("triton")

    from movegen import kernels

    if kernels.INTERPRET:
        pytest.skip("the interpreter is on: the kernels are not the autotuned ones")
    cases = [(kernels._bank_tile_kernel, {"G": 7, "M": 6, "MB": 8, "BLOCK_T": 16}),
             (kernels._bank_rows_kernel, {"G": 25, "M": 24, "M_PAD": 32, "CHUNK": 64}),
             (kernels._bank_runs_kernel, {"G": 7, "M": 6, "M_PAD": 8, "BLOCK_T": 16, "DV_TF32": True}),
             (kernels._bank_runs_kernel, {"G": 25, "M": 24, "M_PAD": 32, "BLOCK_T": 16, "DV_TF32": False}),
             (kernels._bank_layers_kernel, {"G": 25, "M": 24, "M_PAD": 32, "CHUNK": 64, "STAGES": 3,
                                            "DV_TF32": True, "DV_ALIGNED": True}),
             (kernels._bank_layers_kernel, {"L": 3, "G": 7, "M": 6, "M_PAD": 16, "CHUNK": 16, "STAGES": 2,
                                            "DV_TF32": False, "DV_ALIGNED": False})]  # fmt: skip
    # gates with the value gradients stacked, logits with them each in place (the default)
    for (kern, consts), (logits, stacked) in itertools.product(
        cases, ((False, True), (True, False))
    ):
        jit = kern.fn if isinstance(kern, triton.runtime.Autotuner) else kern
        L = consts.get("L", 12)
        consts = {"L": L, "D": 64, "LOGITS": logits, "STACKED": stacked, **consts}
        if "LP" in jit.arg_names:  # as bank_rows_grad gives it
            consts["LP"] = max(16, kernels._pad(L))
        consts["GSTACKED"] = stacked  # the gates as the value gradients
        types = {
            "dvs": "*bf16" if stacked else ("*bf16",) * L,
            "gts": "*bf16" if stacked else ("*bf16",) * L,
            "out_ptr": "*fp32",
        }
        sig = {n: "constexpr" if n in consts else types.get(n, "*i32" if n.endswith("_ptr") else "i32")
               for n in jit.arg_names}  # fmt: skip
        compiled = _compile_for_hopper(jit, sig, consts, aligned=True)
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"], jit.__name__
        if jit.__name__ in ("_bank_runs_kernel", "_bank_layers_kernel"):
            assert "mma.sync.aligned" in ptx and ".tf32" in ptx
        if jit.__name__ == "_bank_layers_kernel":  # 16-byte asynchronous copies where aligned
            wide = re.search(r"cp\.async\.c[ag]\.shared\.global[^\n]*, (0x10|16)[,;]", ptx)
            assert bool(wide) == consts["DV_ALIGNED"], consts
    # what the compiler here (Triton 3.8) takes and the GPU's (3.6) refuses: TF32 products over
    # fewer than 16 rows, so no tile of the runs kernel is smaller
    assert all(c.kwargs["BLOCK_T"] >= 16 for c in kernels._runs_configs())


def _ptxas_spill_bytes(ptx: str, tmp_path) -> int:
    """Bytes of spill stores a thread that ptxas (Triton's own, sm_90a) reports for ``ptx``."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(90)
    except TypeError:  # older Triton: no arch argument
        ptxas = get_ptxas()
    src = tmp_path / "kernel.ptx"
    src.write_text(ptx)
    run = subprocess.run([getattr(ptxas, "path", ptxas), "-v", "--gpu-name=sm_90a", str(src), "-o",
                          str(tmp_path / "kernel.cubin")], capture_output=True, text=True, check=True)  # fmt: skip
    return int(re.search(r"(\d+) bytes spill stores", run.stderr).group(1))


@pytest.mark.background  # (minutes of the compiler on a cold cache: beside the others)
def test_attention_forward_does_not_spill_on_hopper(tmp_path):
    """The attention forward at the block the H100s chose (64 x 32, 4 warps, 3 stages), in the
    training step's form (q and k rotated as they load, the rotated q and k written for the
    backward): no register spills for sm_90 (ptxas: 254 registers). With the causal mask's
    compare-and-select in every key block it spilled (16 bytes a thread)."""
    triton = pytest.importorskip("triton")

    from movegen import kernels

    if kernels.INTERPRET:
        pytest.skip("the interpreter is on: the kernels are not the autotuned ones")
    jit = kernels._attn_fwd_kernel
    jit = jit.fn if isinstance(jit, triton.runtime.Autotuner) else jit
    consts = {"D": 64, "BLOCK_M": 64, "BLOCK_N": 32, "ROPE": True, "SAVE_QK": True}
    ptrs = {"lse_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*bf16") if n.endswith("_ptr")
           else "fp32" if n == "qk_scale" else "i32" for n in jit.arg_names}  # fmt: skip
    ptx = _compile_for_hopper(jit, sig, consts, num_warps=4, num_stages=3).asm["ptx"]
    assert _ptxas_spill_bytes(ptx, tmp_path) == 0


@pytest.mark.background  # (minutes of the compiler on a cold cache: beside the others)
def test_mix_backward_kernels_compile_for_hopper():
    """The mix's backward kernels (per token and grouped by id) write the value and gate
    gradients at row strides of their own, so that ``rope_attn_mix_bwd`` can point them into
    the QKV product's gradient: each goes through Triton's whole compiler for an sm_90 target
    here at GPT-B's head width, with gates and with the routers' logits; the grouped kernels
    (forward too) with their loop over slot blocks unrolled and rolled (``ROLL``, which the
    interpreter's one configuration runs), and the grouped kernels' dot form (forward and
    backward, blocks of one to eight groups, 16, 64 and 128 tokens (eight warps), products in
    bf16 and in TF32 parts) with its products as tensor-core instructions (``mma.sync``;
    ``wgmma`` from 64 tokens)."""
    pytest.importorskip("triton")

    from movegen import kernels

    if kernels.INTERPRET:
        pytest.skip("the interpreter is on: the kernels are not the autotuned ones")
    lane = {"G": 25, "M": 24, "MB": 8, "BLOCK_T": 32}
    cases = [(kernels._mix_bwd_kernel, {"G": 7, "M": 6, "M_PAD": 8, "BLOCK_R": 64}),
             *((kern, {**lane, "ROLL": roll}) for kern in (kernels._lmix_bwd_kernel, kernels._lmix_fwd_kernel)
               for roll in (False, True)),
             (kernels._dmix_bwd_kernel, {"G": 25, "M": 24, "M_PAD": 32, "JB": 1, "BLOCK_T": 16, "NATIVE": True,
                                         "TAB_TF32": True}),
             (kernels._dmix_fwd_kernel, {"G": 7, "M": 6, "M_PAD": 8, "JB": 2, "BLOCK_T": 64, "NATIVE": False,
                                         "TAB_TF32": True}),
             (kernels._dmix_bwd_kernel, {"G": 7, "M": 6, "M_PAD": 8, "JB": 8, "BLOCK_T": 128, "NATIVE": True,
                                         "TAB_TF32": True, "num_warps": 8}),
             (kernels._dmix_fwd_kernel, {"G": 25, "M": 24, "M_PAD": 32, "JB": 2, "BLOCK_T": 128, "NATIVE": True,
                                         "TAB_TF32": True, "num_warps": 8})]  # fmt: skip
    for (kern, consts), logits in itertools.product(cases, (False, True)):
        consts = {"D": 64, "GATED": 1, "LOGITS": logits, **consts}
        warps = consts.pop("num_warps", 4)
        jit = kern.fn
        sig = {n: "constexpr" if n in consts else "*i32" if n in ("ids_ptr", "sid_ptr", "order_ptr")
               else "*bf16" if n.endswith("_ptr") else "i32" for n in jit.arg_names}  # fmt: skip
        compiled = _compile_for_hopper(jit, sig, consts, num_warps=warps)
        assert compiled.asm["cubin"], jit.__name__
        if "JB" in consts:
            mma = "wgmma.mma_async" if consts["BLOCK_T"] >= 64 else "mma.sync.aligned"
            assert mma in compiled.asm["ptx"], (jit.__name__, consts)


def test_inductor_gets_the_ops_as_fallbacks_before_it_lowers_one(monkeypatch):
    """Compiling a graph that holds a ``movegen::`` op never takes inductor's own path for an op
    it has no lowering for (a fallback made on first sight, whose log line torch 2.11 formats
    eagerly: minutes for the bank gradient's arguments on a cold GPT-B compile): the ops'
    fake implementations have registered every op first, and the compiled op computes what
    the op does eagerly."""
    import torch
    import torch._inductor.graph as graph
    import torch._inductor.lowering as lowering
    from torch._library.utils import get_layout_constraint_tag

    from movegen import kernels

    ops = [getattr(torch.ops.movegen, n).default for n in torch.ops.movegen]
    for op in ops:  # as if no graph had been compiled in this process yet
        monkeypatch.delitem(lowering.lowerings, op, raising=False)
        monkeypatch.delitem(lowering._maybe_layout_constraints, op, raising=False)
    monkeypatch.setattr(kernels, "_LOWERED", False)
    said = []
    monkeypatch.setattr(graph.log, "info", lambda msg, *args, **kw: said.append(msg % args))
    torch._dynamo.reset()
    grad, ids = torch.randn(2, 5, 3), torch.randint(7, (2, 5))

    def summed(g, i):
        return torch.ops.movegen.rows_grad(g * 2, i, 7) + 1

    with torch._inductor.config.patch(fx_graph_cache=False):
        out = torch.compile(summed)(grad, ids)
    torch._dynamo.reset()
    assert not [m for m in said if "implicit fallback" in m], said
    assert all(op in lowering.lowerings for op in ops)
    for op in ops:  # the layout constraint inductor's own fallback would have had
        tag = get_layout_constraint_tag(op, with_default=True)
        assert lowering.maybe_layout_constraints(op) is lowering.tag_to_layout_constraint(tag)
    torch.testing.assert_close(out, summed(grad, ids))


def test_bank_kernel_is_the_runs_kernel_under_deterministic_algorithms(monkeypatch):
    """The bank gradient's kernel: the fastest, the layers kernel (fp32 atomics), by default, the runs
    kernel (no atomics: the same bits on every run) where PyTorch is asked for deterministic
    algorithms (as Lightning's ``Trainer(deterministic=True)`` asks), and whichever
    ``BANK_KERNEL`` names where it is set."""
    import torch

    from movegen import kernels

    assert kernels.BANK_KERNEL is None and kernels.bank_kernel() == "layers"
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert kernels.bank_kernel() == "runs"
        monkeypatch.setattr(kernels, "BANK_KERNEL", "lanes")
        assert kernels.bank_kernel() == "lanes"
    finally:
        torch.use_deterministic_algorithms(was)
    monkeypatch.setattr(kernels, "BANK_KERNEL", "runs")
    assert kernels.bank_kernel() == "runs"


def test_autotuned_mix_kernels_tune_the_gates_and_logits_forms_apart():
    """Triton's autotuner keys its choice on the named key arguments and the tensors' dtypes
    only: every autotuned kernel that reads gates or router logits (``LOGITS``) keys on it, so
    neither form runs with the block the other was tuned for."""
    triton = pytest.importorskip("triton")

    from movegen import kernels

    tuned = [k for k in vars(kernels).values() if isinstance(k, triton.runtime.Autotuner)]
    with_logits = [k for k in tuned if "LOGITS" in k.fn.arg_names]
    assert len(with_logits) >= 5  # per token fwd / bwd, grouped fwd / bwd, the bank's tile, runs
    for k in with_logits:
        assert "LOGITS" in k.keys, k.fn.__name__


def test_kernels_need_a_gpu_of_compute_capability_8(monkeypatch):
    """On a GPU before Ampere (compute capability under 8.0) the model takes its PyTorch paths,
    with one warning a device; a newer one gets the kernels. Each device is asked once, and a
    compiled graph takes the answer as a constant (no graph break, no query at run time).
    ``MOVEGEN_KERNELS=0`` (``kernels.ENABLED``) turns them off everywhere; a ROCm torch gets
    none (untested there)."""
    pytest.importorskip("triton")
    import warnings

    import torch

    from movegen import kernels

    if kernels.INTERPRET:
        pytest.skip("the interpreter runs the kernels anywhere")
    asked = []

    def capability(index):
        asked.append(index)
        return {0: (7, 5), 1: (9, 0), 2: (9, 4)}[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(kernels, "_CAPABLE", {})
    try:
        with pytest.warns(
            UserWarning, match=r"compute capability 8\.0 or newer; CUDA device 0 has 7\.5"
        ):
            assert not kernels.usable("cuda:0", 64)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            assert not kernels.usable(torch.device("cuda", 0), 64)
            assert kernels.usable("cuda:1", 64) and not kernels.usable("cuda:1", 48)
            assert not kernels.usable("cpu", 64)

            @torch.compile(fullgraph=True, backend="eager")
            def step(x):
                return x + 1 if kernels.usable("cuda:1", 64) else x - 1

            torch._dynamo.reset()
            assert step(torch.zeros(2)).tolist() == [1.0, 1.0]
        assert not [w for w in said if "compute capability" in str(w.message)]  # once a device
        assert asked == [0, 1]
        monkeypatch.setattr(kernels, "ENABLED", False)  # MOVEGEN_KERNELS=0: no kernel anywhere
        assert not kernels.usable("cuda:1", 64)
        monkeypatch.setattr(kernels, "ENABLED", True)
        monkeypatch.setattr(torch.version, "hip", "6.4")  # a ROCm torch: untested, so none
        with pytest.warns(UserWarning, match="NVIDIA GPUs only"):
            assert not kernels.usable("cuda:2", 64)
    finally:
        torch._dynamo.reset()


def test_movegen_kernels_switch_is_read_at_import():
    """``MOVEGEN_KERNELS=0`` turns the kernels off for the process; any value but 0 or 1 is an
    error at import that says what to set."""
    import os
    import subprocess
    import sys

    probe = "from movegen import kernels; print(kernels.ENABLED)"
    for value, want in (("0", "False"), ("1", "True")):
        out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "MOVEGEN_KERNELS": value},
                             capture_output=True, text=True, check=True)  # fmt: skip
        assert out.stdout.split() == [want], (value, out.stderr[-2000:])
    bad = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "MOVEGEN_KERNELS": "off"},
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "MOVEGEN_KERNELS='off': set it to 0" in bad.stderr
