import copy
import math

import pytest
import torch
import torch.nn as nn

from movegen.lit import clip_grad_norm_for_step, optimizer_groups
from movegen.model import GPT, Attention, GPTConfig, cost_report
from movegen.move import gates_from_logits, lave_layers, mix, mix_reference, move_slots

K, C, T = 64, 10, 16


def tiny(memory="none", **kw):
    return GPTConfig.preset("tiny", vocab_size=K, num_classes=C, seq_len=T, memory=memory, **kw)


def randomize(model):
    """Non-trivial weights everywhere (the head and routers are zero at init)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model


def batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(K, (B, T), generator=g), torch.tensor([0, 5, C][:B])


@pytest.mark.parametrize("M", [1, 2, 6, 24])
@pytest.mark.parametrize("gated", [True, False])
def test_fast_mix_equals_reference_forward_and_backward(M, gated):
    B, Tn, H, D = 2, 5, 3, 8
    g = torch.Generator().manual_seed(M)
    v = torch.randn(B, Tn, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    gates = (
        2 * torch.rand(B, Tn, H, M + int(gated), generator=g, dtype=torch.float64)
    ).requires_grad_()
    mem = torch.randn(B, Tn, M, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    ref = mix_reference(v, gates, mem, gated)
    memh = mem.transpose(2, 3)  # head-major, as MoVEBank.gather lays it out
    fast = mix(v, gates, memh, gated)
    torch.testing.assert_close(fast, ref)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((ref * w).sum(), (v, gates, mem))
    gb = torch.autograd.grad((fast * w).sum(), (v, gates, mem))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_bank_gather_layout_matches_definition():
    cfg = tiny("move", memory_density=2)
    model = GPT(cfg)
    ids = torch.randint(cfg.num_ids, (2, 5))
    memh = model.bank.gather(ids)  # (B, T, H, M, D)
    E = model.bank.weight
    D = cfg.head_dim
    for h in range(cfg.n_head):
        for i in range(cfg.slots):
            torch.testing.assert_close(memh[:, :, h, i], E[ids, i, h * D : (h + 1) * D])


def test_move_at_init_is_standard_value_plus_plain_slot_sum():
    cfg = tiny("move", memory_density=2)
    model = GPT(cfg).eval()
    attn = model.blocks[1].attn
    x = torch.randn(2, T, cfg.n_embd)
    ids = torch.randint(cfg.num_ids, (2, T))
    memh = model.bank.gather(ids)
    _, _, v = attn.mixed_qkv(x, ids, memh, model.rope_cos, model.rope_sin)  # (B, H, T, D)
    v_std = attn.qkv(x).view(2, T, 3, cfg.n_head, cfg.head_dim)[:, :, 2]
    expected = v_std + model.bank.weight[ids].view(2, T, cfg.slots, cfg.n_head, -1).sum(2)
    torch.testing.assert_close(v.transpose(1, 2), expected)


@pytest.mark.parametrize("memory", ["move", "lave"])
def test_every_gate_is_one_at_init(memory):
    model = GPT(tiny(memory, memory_density=2))
    x = torch.randn(2, T, model.config.n_embd)
    n = 0
    for b in model.blocks:
        if b.attn.router is not None:
            assert torch.all(gates_from_logits(b.attn.router(x), model.config.n_head) == 1.0)
            n += 1
    assert n == model.config.n_layer


@pytest.mark.parametrize("gated", [True, False])
def test_zero_bank_gives_exactly_the_standard_model(gated):
    std = randomize(GPT(tiny("none"))).eval()
    mv = GPT(tiny("move", memory_density=2, gate_standard_path=gated)).eval()
    sd = mv.state_dict()
    sd.update(std.state_dict())  # same backbone, embeddings, head
    mv.load_state_dict(sd)
    with torch.no_grad():
        mv.bank.weight.zero_()
        if not gated:  # ungated standard path: any router gives the standard model
            for b in mv.blocks:
                b.attn.router.weight.normal_()
    codes, labels = batch()
    assert torch.equal(mv(codes, labels), std(codes, labels))
    with torch.no_grad():
        mv.bank.weight.normal_()
    assert not torch.allclose(mv(codes, labels), std(codes, labels))


@pytest.mark.parametrize(
    "memory,density", [("none", 1), ("lave", 1), ("lave", 2), ("move", 1), ("move", 4)]
)
def test_causality(memory, density):
    model = randomize(GPT(tiny(memory, memory_density=density))).eval()
    codes, labels = batch()
    base = model(codes, labels)
    for t in (0, 5, T - 1):
        changed = codes.clone()
        changed[:, t] = (changed[:, t] + 1) % K
        out = model(changed, labels)
        # position t predicts codes[:, t]; changing it may only affect later positions
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])
        if t < T - 1:
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize(
    "memory,density,gated",
    [
        ("none", 1, None),
        ("lave", 1, None),
        ("lave", 2, True),
        ("move", 1, None),
        ("move", 2, False),
        ("move", 4, True),
    ],
)
def test_kv_cache_decoding_equals_full_forward(memory, density, gated):
    model = randomize(GPT(tiny(memory, memory_density=density, gate_standard_path=gated))).eval()
    codes, labels = batch()
    full = model(codes, labels)
    ids = model.input_ids(codes, labels)
    cache = model.new_cache(len(codes))
    pos = cache.positions
    outs = [
        model.step(ids[:, :1], pos[:1], cache),
        model.step(ids[:, 1:4], pos[1:4], cache),
    ]  # prefill, then a chunk
    outs += [
        model.step(ids[:, t : t + 1], pos[t : t + 1], cache) for t in range(4, T)
    ]  # one at a time
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    # a reused cache is overwritten from position 0: stale rows of the first pass never count
    codes2, _ = batch(seed=1)
    ids2 = model.input_ids(codes2, labels)
    again = [model.step(ids2[:, :5], pos[:5], cache)]
    again += [model.step(ids2[:, t : t + 1], pos[t : t + 1], cache) for t in range(5, T)]
    torch.testing.assert_close(torch.cat(again, 1), model(codes2, labels), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one position per id"):
        model.step(ids[:, :2], pos[:1], cache)
    with pytest.raises(ValueError, match="rows"):
        model.step(ids[:2, :1], pos[:1], cache)


def test_decode_cache_layout_and_fused_projection():
    """Each layer's cache holds k, v (B, H, T, D) and [W_qkv; W_router] padded to 128 outputs
    (LaVE x1: layers without a table have no router rows and no padding); 'fused' needs the
    kernels."""
    from movegen import kernels

    model = randomize(GPT(tiny("lave", memory_density=1))).eval()
    cache = model.new_cache(2)
    cfg = model.config
    d = cfg.n_embd
    assert len(cache.layers) == cfg.n_layer
    for b, state in zip(model.blocks, cache.layers):
        assert state.k.shape == (2, cfg.n_head, T, cfg.head_dim) == state.v.shape
        w = state.weight
        assert torch.equal(w[: 3 * d], b.attn.qkv.weight)
        if b.attn.router is None:
            assert w.shape[0] == 3 * d
        else:
            n = b.attn.router.out_features
            assert w.shape[0] % 128 == 0 and torch.equal(w[3 * d : 3 * d + n], b.attn.router.weight)
            assert not w[3 * d + n :].any()
    assert {b.attn.router is None for b in model.blocks} == {True, False}  # both kinds of layer
    if not kernels.usable("cpu", cfg.head_dim):  # (the Triton interpreter makes the CPU usable)
        assert cache.attention == "sdpa"  # 'auto' on the CPU
        with pytest.raises(ValueError, match="Triton"):
            model.new_cache(2, attention="fused")
    with pytest.raises(ValueError, match="attention must be"):
        model.new_cache(2, attention="math")


def test_null_class_used_at_configured_rate():
    model = GPT(tiny("none", class_dropout=0.1))
    labels = torch.randint(C, (200_000,))
    dropped = model.drop_labels(labels, generator=torch.Generator().manual_seed(0))
    rate = (dropped == C).float().mean().item()
    assert abs(rate - 0.1) < 0.004  # 6 sigma at n = 2e5
    assert torch.equal(dropped[dropped != C], labels[dropped != C])
    # training forward uses it, eval does not
    model = randomize(model)
    codes, labels = batch(2)
    labels = labels[:2]
    model.eval()
    a = model(codes[:2], labels)
    model.config.class_dropout = 1.0
    torch.testing.assert_close(model(codes[:2], labels), a)  # eval: no dropout of labels
    model.train()
    for m in model.modules():  # only class dropout left stochastic
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    null = model(codes[:2], torch.full_like(labels, C))
    torch.testing.assert_close(model(codes[:2], labels), null)


def test_imagenet_cost_accounting():
    b = GPTConfig.preset("B", vocab_size=16384, num_classes=1000, seq_len=256)
    std = cost_report(b)
    assert abs(std["params_total"] - 111e6) / 111e6 < 0.01
    mv = cost_report(
        GPTConfig.preset("B", vocab_size=16384, num_classes=1000, seq_len=256, memory="move")
    )
    lv = cost_report(
        GPTConfig.preset("B", vocab_size=16384, num_classes=1000, seq_len=256, memory="lave")
    )
    assert mv["params_memory"] == (16384 + 1001) * 6 * 768 == lv["params_memory"]
    assert mv["params_backbone"] == std["params_backbone"] == lv["params_backbone"]
    assert mv["params_router"] == 12 * 768 * 12 * 7
    # memory adds almost no compute: routers + mix are < 1% of the forward FLOPs
    assert mv["flops_per_token"] / std["flops_per_token"] < 1.01


def test_density_conventions_and_errors():
    assert move_slots(12, 1) == 6 and move_slots(12, 4) == 24
    assert (
        lave_layers(4, 1) == [1, 3]
        and lave_layers(5, 1) == [0, 2, 4]
        and lave_layers(4, 2) == [0, 1, 2, 3]
    )
    with pytest.raises(ValueError, match="LaVE"):
        tiny("lave", memory_density=4)
    with pytest.raises(ValueError, match="slots"):
        GPTConfig(n_layer=3, n_head=2, n_embd=32, memory="move", memory_density=1)
    with pytest.raises(ValueError, match="memory must be"):
        tiny("bank")
    with pytest.raises(ValueError, match="seq_len"):
        GPTConfig(seq_len=17, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match="codes must be"):
        GPT(tiny())(torch.zeros(2, T + 1, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_weight_decay_only_on_matrices_not_tables():
    model = GPT(tiny("move", memory_density=2))
    decay, no_decay = optimizer_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    nn_ = {names[id(p)] for p in no_decay["params"]}
    assert "bank.weight" in nn_ and "tok_emb.weight" in nn_ and "cls_emb.weight" in nn_
    assert all("norm" not in n for n in dn)
    assert (
        "head.weight" in dn
        and "blocks.0.attn.router.weight" in dn
        and "blocks.0.attn.qkv.weight" in dn
    )
    lave = GPT(tiny("lave", memory_density=2))
    d2, _ = optimizer_groups(lave, 0.05)
    assert not any(p is lave.blocks[0].attn.table.weight for p in d2["params"])


@pytest.mark.parametrize("memory,density,gated", [("none", 1, False), ("lave", 1, False),
                                                  ("lave", 2, True), ("move", 2, True), ("move", 1, False)])  # fmt: skip
def test_weight_decay_groups_by_module_match_the_name_rule(memory, density, gated):
    """Grouping by module type gives the groups of the former name rule (decay: 2-D weights
    that are not tables), and every parameter lands in exactly one group."""
    model = GPT(tiny(memory, memory_density=density, gate_standard_path=gated))
    decay, no_decay = optimizer_groups(model, 0.05)
    by_name = {
        n: p.ndim == 2 and not (n.startswith(("tok_emb", "cls_emb", "bank")) or ".table." in n)
        for n, p in model.named_parameters()
    }
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in decay["params"]] == [n for n, d in by_name.items() if d]
    assert [names[id(p)] for p in no_decay["params"]] == [n for n, d in by_name.items() if not d]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)


def test_weight_decay_groups_refuse_a_parameter_without_a_rule():
    model = GPT(tiny("move"))
    model.blocks[0].scale = torch.nn.Module()
    model.blocks[0].scale.gain = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(TypeError, match=r"blocks\.0\.scale\.gain"):
        optimizer_groups(model, 0.05)


def test_tiny_model_learns_digits_codes(digits_models):
    """The session's MoVE-x1 model (120 steps through `movegen fit`, validated every 20)."""
    import json

    from movegen.checkpoint import load_model

    d = digits_models["dir"] / "move-x1"
    m = json.loads((d / "metrics.json").read_text())
    hist = [h["val_bits_per_token"] for h in m["history"]]
    assert len(hist) == 6
    assert hist[-1] < hist[0] - 0.5, hist  # validation loss falls: a real learning signal
    assert m["val_bits_per_token"] == pytest.approx(min(hist))
    assert m["val_bits_per_token"] < math.log2(128)  # better than uniform over K
    model, ckpt = load_model(d / "model.ckpt")
    assert ckpt["code_store"]["tokenizer_sha256"] and model.config.memory == "move"
    assert m["train_tokens"] == 120 * 64 * 16


def test_fit_rejects_mismatched_code_store(digits_pipeline, tmp_path):
    from movegen.cli import main

    rc = main(
        [
            "fit",
            "--config",
            "configs/digits/standard.yaml",
            "--data.codes",
            str(digits_pipeline["codes"]),
            "--out",
            str(tmp_path),
            "--model.config.vocab_size",
            "256",
        ]
    )
    assert rc == 2 and not (tmp_path / "model.ckpt").exists()


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("density", [1, 4])
def test_deferred_bank_gradient_equals_plain_autograd(gated, density):
    """The training path (bank gradient formed once from all layers) equals plain autograd
    through every layer's mix: logits and every parameter's gradient."""
    torch.manual_seed(0)
    model = randomize(GPT(tiny("move", memory_density=density, gate_standard_path=gated))).double()
    model.eval()  # no dropout: both passes see the same function
    codes, labels = batch()
    grads = {}
    for deferred in (True, False):
        model.zero_grad()
        model.deferred_bank_grad = deferred
        out = model(codes, labels)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[deferred] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[True][0], grads[False][0])
    for n in grads[True][1]:
        torch.testing.assert_close(grads[True][1][n], grads[False][1][n], msg=n)
    assert grads[True][1]["bank.weight"].abs().sum() > 0


@pytest.mark.background  # (inductor compiling on a CPU: beside the others)
@pytest.mark.parametrize("memory", ["move", "lave"])
def test_compiled_training_path_equals_eager(memory):
    """torch.compile takes the fused forms of the mix and of the deferred bank gradient
    (move.py); loss and every gradient must match the eager path."""
    import torch.nn.functional as F

    model = randomize(GPT(tiny(memory, memory_density=2))).eval()
    codes, labels = batch()

    def loss(c, l):
        return F.cross_entropy(model(c, l).flatten(0, 1), c.flatten())

    out = {}
    for name, fn in (("eager", loss), ("compiled", torch.compile(loss))):
        model.zero_grad()
        value = fn(codes, labels)
        value.backward()
        out[name] = (value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(out["compiled"][0], out["eager"][0])
    for n, g in out["eager"][1].items():
        torch.testing.assert_close(out["compiled"][1][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_memory_dropout_drops_memory_gates_only_in_training():
    from movegen.move import drop_memory_gates

    torch.manual_seed(0)
    gates = torch.rand(64, 16, 4, 7) + 0.5
    out = drop_memory_gates(gates, 0.25, gate_standard_path=True)
    assert torch.equal(out[..., 0], gates[..., 0])  # g0 is never dropped
    dropped = out[..., 1:] == 0
    assert 0.22 < dropped.float().mean() < 0.28
    kept = ~dropped
    torch.testing.assert_close(out[..., 1:][kept], gates[..., 1:][kept] / 0.75)
    assert (
        drop_memory_gates(gates, 0.25, gate_standard_path=False)[..., 0].eq(0).any()
    )  # LaVE: all gates
    for memory in ("move", "lave"):
        model = randomize(GPT(tiny(memory, memory_dropout=0.5)))
        plain = randomize(GPT(tiny(memory)))
        plain.load_state_dict(model.state_dict())
        codes, labels = batch()
        model.eval(), plain.eval()
        torch.testing.assert_close(model(codes, labels), plain(codes, labels))  # off in eval
        model.train(), plain.train()
        for m in (model, plain):  # the same dropout draws elsewhere, so only the gates differ
            for mod in m.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = 0.0
        torch.manual_seed(1)
        a = model(codes, labels)
        torch.manual_seed(1)
        b = plain(codes, labels)
        assert not torch.allclose(a, b)
        a.square().mean().backward()  # gradients reach the bank / tables through the kept gates
        mem = model.bank.weight if memory == "move" else model.blocks[-1].attn.table.weight
        assert mem.grad is not None and mem.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="memory_dropout"):
        tiny("move", memory_dropout=1.0)
    for name in ("resid_dropout", "ffn_dropout", "token_dropout", "attn_dropout"):
        with pytest.raises(ValueError, match=name):  # 1 would zero a whole branch every step
            tiny("move", **{name: 1.0})
    with pytest.raises(ValueError, match="class_dropout"):
        tiny("move", class_dropout=-0.1)
    assert tiny("none", class_dropout=1.0).class_dropout == 1.0  # unconditional: allowed


def test_the_memory_can_have_its_own_learning_rate_and_weight_decay():
    model = GPT(tiny("move", memory_density=2))
    assert len(optimizer_groups(model, 0.05)) == 2  # default: the bank in the no-decay group
    decay, no_decay, memory = optimizer_groups(
        model, 0.05, memory_lr_scale=0.1, memory_weight_decay=0.01, lr=1e-3
    )
    assert [p is model.bank.weight for p in memory["params"]] == [True]
    assert memory["lr"] == pytest.approx(1e-4) and memory["weight_decay"] == 0.01
    assert not any(p is model.bank.weight for p in decay["params"] + no_decay["params"])
    opt = torch.optim.AdamW(optimizer_groups(model, 0.05, memory_lr_scale=0.1, lr=1e-3), lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # applied at construction
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-4, 5e-5])  # one schedule
    lave = GPT(tiny("lave", memory_density=2))
    *_, mem = optimizer_groups(lave, 0.05, memory_weight_decay=0.1, lr=1e-3)
    assert len(mem["params"]) == len([m for m in lave.modules() if type(m).__name__ == "LaVETable"])


def test_rope_is_the_pairwise_rotation_exactly_and_its_gradient_the_inverse_rotation():
    """apply_rope (x * C + swap(x) * S) against the rotation written out pair by pair: the same
    fp32 values bit for bit; the gradient is the rotation by the opposite angle (an isometry:
    the gradient's norm is the incoming one's)."""
    from movegen.model import apply_rope, rope_2d

    cos, sin = rope_2d(GPTConfig.preset("tiny", vocab_size=32, num_classes=4, seq_len=16))
    S, half = cos.shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, S, 3, 2 * half, generator=g, requires_grad=True)
    out = apply_rope(x, cos, sin)
    x1, x2 = x.detach().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]
    ref = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    assert torch.equal(out, ref)
    dout = torch.randn(out.shape, generator=g)
    (dx,) = torch.autograd.grad(out, x, dout)
    assert torch.allclose(dx, apply_rope(dout, cos, -sin), atol=1e-6)
    assert torch.allclose(dx.norm(), dout.norm(), rtol=1e-5)
    bf = x.detach().bfloat16()
    assert apply_rope(bf, cos, sin).dtype == torch.bfloat16
    assert torch.equal(apply_rope(bf, cos, sin), apply_rope(bf.float(), cos, sin).bfloat16())


def _fused_ops_agree(model, op_sets) -> None:
    """The loss and every gradient of ``model`` on one batch under each of ``op_sets`` (its
    ``GPT.fused_ops``, in turn) are those under the first."""
    codes, labels = torch.randint(K, (3, T)), torch.tensor([0, 1, 2])
    res = []
    for ops in op_sets:
        model.fused_ops = ops
        model.zero_grad()
        loss = model.loss(codes, labels)
        loss.backward()
        res.append([loss, *(p.grad.clone() for p in model.parameters() if p.grad is not None)])
    for other in res[1:]:
        assert len(other) == len(res[0])
        for a, b in zip(res[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory", ["move", "lave"])
def test_stacked_router_product_matches_two_products(memory):
    """``"router"`` in ``GPT.fused_ops``: a memory layer's QKV and router products as one product
    of the stacked weights gives the outputs and every gradient of the two products. The
    product is 64 columns wide or a multiple (128-byte rows in bf16, as the QKV product's are at
    GPT-B's width), its columns past the QKV and router ones zeros."""
    model = randomize(GPT(tiny(memory, resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0,
                               class_dropout=0.0)))  # fmt: skip
    attn = next(b.attn for b in model.blocks if b.attn.router is not None)
    x = torch.randn(2, T, model.config.n_embd)
    prod, used = attn._stacked_product(x), attn.qkv.out_features + attn.router.out_features
    assert used % 64 != 0 and prod.shape[-1] % 64 == 0 and prod.shape[-1] - used < 64
    torch.testing.assert_close(prod[..., :used], torch.cat([attn.qkv(x), attn.router(x)], -1))
    assert torch.equal(prod[..., used:], torch.zeros_like(prod[..., used:]))
    _fused_ops_agree(model, ((), ("router",)))


def test_router_and_gates_default_with_the_per_token_mix(monkeypatch):
    """MoVE below 16 slots (x1, the per-token mix kernels) runs ``"router"`` + ``"gates"`` by
    default, MoVE at 16 and more (grouped) and the other memory kinds do not; where the gates
    cannot go to the kernels (here: no deferred bank gradient) the stacked product is dropped
    with them, not run alone (split by ``kernels.split_rope_wide``)."""

    assert {"router", "gates"} <= set(GPT(tiny("move")).fused_ops)
    for cfg in (tiny("move", n_layer=8, memory_density=4), tiny("lave"), tiny()):
        assert cfg.slots >= 16 or cfg.memory != "move"
        assert not {"router", "gates"} & set(GPT(cfg).fused_ops), cfg
    model = randomize(GPT(tiny("move", resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0,
                               class_dropout=0.0)))  # fmt: skip
    calls = []
    real = Attention._stacked_product
    monkeypatch.setattr(
        Attention, "_stacked_product", lambda self, x: calls.append(1) or real(self, x)
    )
    codes, labels = torch.randint(K, (2, T)), torch.tensor([0, 1])
    for deferred in (False, True):  # True: the gates reach the kernels only where those run
        model.deferred_bank_grad = deferred
        model(codes, labels).sum().backward()
        assert len(calls) == (model.config.n_layer if deferred and model.bank.takes_logits() else 0)
        calls.clear()


@pytest.mark.parametrize("memory", ["move", "lave"])
def test_padded_router_product_matches_the_router(monkeypatch, memory):
    """``"routerpad"`` in ``GPT.fused_ops``: the router's product through its weight padded with
    zero rows gives the loss and every gradient of the plain product, and the logits it hands
    on are rows of a product 8 columns wide (16-byte aligned in bf16) where the router's own
    width is not (MoVE's and LaVE's memory layers)."""
    model = randomize(GPT(tiny(memory, resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0,
                               class_dropout=0.0)))  # fmt: skip
    routed = [b.attn for b in model.blocks if b.attn.router is not None]
    attn = routed[0]
    assert attn.router.out_features % 8 != 0
    x = torch.randn(2, T, model.config.n_embd)
    padded = attn.router_logits(x, pad=True)
    assert padded.stride(-2) % 8 == 0 and padded.shape == attn.router(x).shape
    pads, plain = [], type(attn).router_logits
    monkeypatch.setattr(type(attn), "router_logits",
                        lambda self, x, pad=False: pads.append(pad) or plain(self, x, pad))  # fmt: skip
    _fused_ops_agree(model, ((), ("routerpad",)))
    n = len(routed)
    assert pads == [False] * n + [True] * n  # every memory layer's router, padded only when asked


def test_sort_based_token_embedding_matches_embedding():
    """``"emb"`` in ``GPT.fused_ops``: the token embedding's gradient summed by a sort
    (``move.gather_rows``) equals ``nn.Embedding``'s, repeated codes included; the class rows,
    looked up in the same input, keep theirs."""
    model = randomize(GPT(tiny("none", resid_dropout=0.0, ffn_dropout=0.0, token_dropout=0.0,
                               class_dropout=0.0)))  # fmt: skip
    codes = torch.randint(4, (3, T))  # few distinct codes: many repeats
    labels = torch.tensor([0, 1, 1])
    res = []
    for ops in ((), ("emb",)):
        model.fused_ops = ops
        model.zero_grad()
        model.loss(codes, labels).backward()
        res.append((model.tok_emb.weight.grad.clone(), model.cls_emb.weight.grad.clone()))
    assert res[0][0][:4].abs().sum() > 0 and res[0][0][4:].abs().sum() == 0
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_clip_inside_fused_adamw_step_matches_clipping_in_place(fused):
    """``lit.clip_grad_norm_for_step``: with a fused AdamW the clip's coefficient goes into the
    step (``grad_scale``), which then updates the weights as ``clip_grad_norm_`` + step does,
    for norms above and below the limit, leaves ``.grad`` unclipped and serves one step only;
    any other optimizer has its gradients clipped in place."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    net = copy.deepcopy(ref)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=fused)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=fused)
    for scale in (0.01, 10.0, 0.01, 30.0):  # total norm below, above, below, above 1
        x = torch.randn(32, 8) * scale
        (ref(x) ** 2).mean().backward()
        want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        (net(x) ** 2).mean().backward()
        before = [p.grad.clone() for p in net.parameters()]
        norm = clip_grad_norm_for_step(net.parameters(), opt, 1.0)
        torch.testing.assert_close(norm, want)
        clipped = [p.grad for p in ref.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before if fused else clipped, [p.grad for p in net.parameters()]))  # fmt: skip
        assert ("grad_scale" in opt.__dict__) == fused
        opt_ref.step(), opt.step()
        assert "grad_scale" not in opt.__dict__
        opt_ref.zero_grad(), opt.zero_grad()
        for a, b in zip(ref.parameters(), net.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lightning_clips_inside_the_fused_step(tmp_path, monkeypatch):
    """``LitGPT``'s clipping with a fused AdamW (forced here on the CPU): Lightning hands the
    optimizer itself to ``configure_gradient_clipping``, the coefficient goes into the step, and
    three clipped steps end at the weights that clipping in place gives."""
    import lightning as L

    import movegen.lit as lit_mod
    from movegen.lit import LitGPT

    class FusedAdamW(torch.optim.AdamW):  # what LitGPT builds on a GPU
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "fused": True})

    monkeypatch.setattr(torch.optim, "AdamW", FusedAdamW)
    folds = []
    real_folds = lit_mod._folds_clip
    codes = torch.randint(K, (12, T))
    labels = torch.randint(3, (12,))
    weights = []
    for fold in (True, False):
        monkeypatch.setattr(lit_mod, "_folds_clip", lambda o, p, f=fold: folds.append(f and real_folds(o, p)) or folds[-1])  # fmt: skip
        torch.manual_seed(0)
        model = LitGPT(tiny("move"), warmup_steps=0)
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(codes, labels), batch_size=4
        )
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1e-3,
                            default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(model, data)
        weights.append([p.detach().clone() for p in model.model.parameters()])
    assert folds == [True] * 3 + [False] * 3  # the first run folded every step
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
