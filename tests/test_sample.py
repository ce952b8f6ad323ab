import pytest
import torch

from movegen.model import GPT, GPTConfig
from movegen.sample import filter_logits, generate, sample_logits

K, C, T = 32, 5, 9


def model64(memory="move"):
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("tiny", vocab_size=K, num_classes=C, seq_len=T, memory=memory))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.double().eval()


def naive_generate(model, labels, cfg_scale, temperature, top_k, top_p, generator):
    """Sampling by full forward passes, no cache: the definition generate() must match."""
    B = len(labels)
    codes = torch.zeros(B, T, dtype=torch.long)
    null = torch.full_like(labels, model.config.null_class)
    for t in range(T):
        cond = model(codes, labels)[:, t]
        logits = cond
        if cfg_scale != 1.0:
            uncond = model(codes, null)[:, t]
            logits = uncond + cfg_scale * (cond - uncond)
        codes[:, t] = sample_logits(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
    return codes


@pytest.mark.parametrize("memory", ["none", "lave", "move"])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_generate_matches_naive_sampling(memory, cfg_scale):
    model = model64(memory)
    labels = torch.tensor([0, 3, 4, 3])
    a = generate(
        model, labels, cfg_scale=cfg_scale, top_k=8, generator=torch.Generator().manual_seed(7)
    )
    b = naive_generate(model, labels, cfg_scale, 1.0, 8, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_cfg_scale_one_is_plain_conditional_sampling_and_seeded():
    model = model64()
    labels = torch.tensor([1, 2, 2, 0, 4])
    kw = dict(temperature=0.9, top_p=0.9)
    a = generate(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(3), **kw)
    c = generate(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, T) and a.min() >= 0 and a.max() < K
    # the interval form with an empty interval is plain conditional sampling too
    d = generate(
        model,
        labels,
        cfg_scale=3.0,
        cfg_interval=(0, 0),
        generator=torch.Generator().manual_seed(3),
        **kw,
    )
    assert torch.equal(a, d)


def test_labels_not_modified_and_validated():
    model = model64()
    labels = torch.tensor([0, 1])
    before = labels.clone()
    generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels, before)
    with pytest.raises(ValueError, match="labels"):
        generate(model, torch.tensor([C + 1]))


def test_top_k_leaves_only_k_candidates_and_top_p_smallest_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g)
    out = filter_logits(logits, top_k=5)
    assert torch.all(torch.isfinite(out).sum(-1) == 5)
    assert torch.equal(out.argmax(-1), logits.argmax(-1))
    draws = torch.stack([sample_logits(logits, top_k=5, generator=g) for _ in range(50)])
    allowed = logits.topk(5).indices
    assert all(torch.isin(draws[:, i], allowed[i]).all() for i in range(16))
    assert torch.equal(sample_logits(logits, top_k=1, generator=g), logits.argmax(-1))
    # top-p: keep the smallest prefix of sorted tokens with mass >= p
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.81))
    assert kept.tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("memory", ["none", "lave", "move"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_static_decoder_matches_cached_generate(memory, cfg_scale):
    from movegen.sample import make_decoder

    model = model64(memory).float()
    labels = torch.tensor([0, 4, 2])
    kw = dict(cfg_scale=cfg_scale, temperature=1.0, top_k=10)
    a = generate(model, labels, generator=torch.Generator().manual_seed(5), **kw)
    dec = make_decoder(model, len(labels), cfg=cfg_scale != 1.0, compile=False)
    b = generate(model, labels, generator=torch.Generator().manual_seed(5), decoder=dec, **kw)
    c = generate(
        model, labels, generator=torch.Generator().manual_seed(5), decoder=dec, **kw
    )  # reused cache
    assert torch.equal(a, b) and torch.equal(b, c)
    with pytest.raises(ValueError, match="decoder was made"):
        generate(model, labels[:2], decoder=dec, **kw)


def test_static_decoder_in_another_dtype_is_a_snapshot_with_same_logits():
    from movegen.model import StaticDecoder

    model = model64("move").float()
    dec = StaticDecoder(model, 3, dtype=torch.float64)
    assert dec.model is not model and dec.model.head.weight.dtype == torch.float64
    assert model.head.weight.dtype == torch.float32  # the caller's model is untouched
    ids = torch.tensor([[K + 1], [K + 2], [K + C]])
    cache = model.new_cache(3)
    ref = model.step(ids, 0, cache)[:, -1]
    out = dec(ids, dec.positions[:1])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory", ["lave", "move"])
def test_decoder_math_attention_and_fused_projection_match(memory):
    from movegen.model import StaticDecoder

    model = model64(memory).float()
    ids = torch.tensor([[K + 1], [K + 2]])
    cache = model.new_cache(2)
    ref = model.step(ids, 0, cache)[:, -1]
    nxt = torch.tensor([[3], [7]])
    ref2 = model.step(nxt, 1, cache)[:, -1]
    for attention in ("sdpa", "math"):
        dec = StaticDecoder(model, 2, attention=attention)
        torch.testing.assert_close(dec(ids, dec.positions[:1]), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dec(nxt, dec.positions[1:2]), ref2, rtol=1e-5, atol=1e-5)


def test_fused_decode_kernel_matches_sdpa_decoder_in_interpreter(interpreted):
    """The one-launch decoding layer (RoPE, value mix, cache write, attention; Triton run by its
    CPU interpreter) gives the SDPA decoder's logits and cache contents at every position, for
    the standard model, MoVE (gated and not) and LaVE."""
    assert interpreted("decode_interpret.py") < 1e-4


def test_fused_decoder_needs_the_kernels():
    from movegen import kernels
    from movegen.model import StaticDecoder

    model = GPT(GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16)).eval()
    if kernels.usable("cpu", model.config.head_dim):
        pytest.skip("Triton interpreter active")
    assert StaticDecoder(model, 2).attention == "sdpa"  # auto on CPU
    with pytest.raises(ValueError, match="Triton"):
        StaticDecoder(model, 2, attention="fused")


@pytest.mark.gpu
def test_graphed_sampler_matches_compiled_step_on_gpu():
    """The sampler's own CUDA graph (step, choice, bookkeeping) draws the same codes as
    inductor's CUDA graphs around the step alone, from the same generator seed."""
    from movegen.sample import make_decoder

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16, memory="move")
    model = GPT(cfg).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    labels = torch.tensor([1, 2, 3], device="cuda")
    out = {}
    for mode in ("graph", "reduce-overhead"):
        dec = make_decoder(model, 3, cfg=True, compile=False).compile(mode)
        # a first interval needs only the guided step; the second also the unguided one, captured
        # then; the third replays both
        for interval in ((0, 16), (2, 12), (2, 12)):
            g = torch.Generator("cuda").manual_seed(0)
            out[mode, interval] = generate(model, labels, cfg_scale=2.0, cfg_interval=interval,
                                           generator=g, decoder=dec)  # fmt: skip
    for interval in ((0, 16), (2, 12)):
        assert torch.equal(out["graph", interval], out["reduce-overhead", interval])
    assert not torch.equal(out["graph", (0, 16)], out["graph", (2, 12)])
    assert out["graph", (2, 12)].min() >= 0 and out["graph", (2, 12)].max() < 64
