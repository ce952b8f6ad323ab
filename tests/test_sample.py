from unittest import mock

import pytest
import torch

from movegen.model import GPT, GPTConfig
from movegen.sample import (
    CompiledStep,
    SampleNoise,
    SamplingSettings,
    filter_logits,
    generate,
    generate_images,
    sample_logits,
)

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
    settings = SamplingSettings(cfg_scale=cfg_scale, top_k=8)
    a = generate(model, labels, settings, generator=torch.Generator().manual_seed(7))
    b = naive_generate(model, labels, cfg_scale, 1.0, 8, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_cfg_scale_one_is_plain_conditional_sampling_and_seeded():
    model = model64()
    labels = torch.tensor([1, 2, 2, 0, 4])
    s = SamplingSettings(cfg_scale=1.0, temperature=0.9, top_p=0.9)
    a = generate(model, labels, s, generator=torch.Generator().manual_seed(3))
    b = generate(model, labels, s, generator=torch.Generator().manual_seed(3))
    c = generate(model, labels, s, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, T) and a.min() >= 0 and a.max() < K
    # the interval form with an empty interval is plain conditional sampling too
    empty = SamplingSettings(cfg_scale=3.0, cfg_interval=(0, 0), temperature=0.9, top_p=0.9)
    d = generate(model, labels, empty, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, d)
    # and so is the fast path at cfg 1
    step = CompiledStep(model, len(labels), s)
    e = generate(model, labels, s, generator=torch.Generator().manual_seed(3), step=step)
    assert torch.equal(a, e)


def test_labels_not_modified_and_validated():
    model = model64()
    labels = torch.tensor([0, 1])
    before = labels.clone()
    generate(
        model, labels, SamplingSettings(cfg_scale=2.0), generator=torch.Generator().manual_seed(0)
    )
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


SETTINGS = [
    SamplingSettings(),  # cfg 1: no doubling
    SamplingSettings(cfg_scale=3.0, top_k=10),
    SamplingSettings(cfg_scale=2.0, cfg_interval=(2, 6), temperature=0.8, top_p=0.9),
    SamplingSettings(cfg_scale=1.5, cfg_interval=(0, 4), temperature=0.0),  # greedy
]


@pytest.mark.parametrize("memory", ["none", "lave", "move"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["cfg1", "cfg3-topk", "interval-topp", "greedy"])
def test_compiled_step_draws_the_codes_of_the_plain_loop(memory, settings):
    """The step object (its cache, step + CFG mix + choice, and the in-place bookkeeping that a
    CUDA graph captures; run eagerly on the CPU) picks exactly the plain loop's codes from the same
    generator, and again when reused."""
    model = model64(memory).float()
    labels = torch.tensor([0, 4, 2])
    a = generate(model, labels, settings, generator=torch.Generator().manual_seed(5))
    step = CompiledStep(model, len(labels), settings)
    assert step.mode == "eager" and step.model is model  # auto on the CPU: no copy, no compile
    b = generate(model, labels, settings, generator=torch.Generator().manual_seed(5), step=step)
    c = generate(model, labels, settings, generator=torch.Generator().manual_seed(5), step=step)
    assert torch.equal(a, b) and torch.equal(b, c)
    d = generate(model, labels, settings, generator=torch.Generator().manual_seed(6), step=step)
    assert settings.temperature == 0 or not torch.equal(a, d)
    with pytest.raises(ValueError, match="made for 3 images"):
        generate(model, labels[:2], settings, step=step)
    with pytest.raises(ValueError, match="made for"):
        generate(model, labels, SamplingSettings(cfg_scale=7.0), step=step)


@pytest.mark.slow
def test_torch_compiled_step_draws_the_codes_of_the_plain_loop():
    """The same with the step compiled by inductor on the CPU (slow: a C++ compile)."""
    model = model64("move").float()
    labels = torch.tensor([0, 4])
    s = SETTINGS[2]
    a = generate(model, labels, s, generator=torch.Generator().manual_seed(5))
    step = CompiledStep(model, len(labels), s, mode="compiled")
    b = generate(model, labels, s, generator=torch.Generator().manual_seed(5), step=step)
    assert torch.equal(a, b)


def test_sampling_settings_reject_what_cannot_be_sampled():
    bad = [
        (dict(cfg_scale=float("nan")), "cfg_scale must be a finite"),
        (dict(cfg_scale=float("inf")), "cfg_scale must be a finite"),
        (dict(cfg_interval=(5, 2)), "0 <= a <= b"),
        (dict(cfg_interval=(-1, 2)), "0 <= a <= b"),
        (dict(cfg_interval=(1, 2, 3)), "two integers"),
        (dict(cfg_interval=(0.5, 2)), "two integers"),
        (dict(cfg_interval=3), "two integers"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(top_k=2.5), "top_k must be an integer >= 0"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            SamplingSettings(**kw)
    with pytest.raises(TypeError):
        SamplingSettings(2.0)  # keyword-only
    s = SamplingSettings(cfg_scale=2.0, cfg_interval=[1, 3])
    assert s.cfg_interval == (1, 3) and hash(s) == hash(
        SamplingSettings(cfg_scale=2.0, cfg_interval=(1, 3))
    )
    assert [s.guided(t) for t in range(5)] == [False, True, True, False, False]
    assert not SamplingSettings(cfg_interval=(0, 9)).guided(0)  # cfg 1 guides nothing
    with pytest.raises(AttributeError):
        s.cfg_scale = 3.0  # frozen


@pytest.mark.interpreter_script("decode_interpret.py")
def test_fused_decode_kernel_matches_sdpa_decoder_in_interpreter(interpreted):
    """The one-launch decoding layer (RoPE, value mix, cache write, attention; Triton run by its
    CPU interpreter) gives the logits and cache contents of the SDPA form of the same decode loop
    at every position, for the standard model, MoVE (gated and not) and LaVE, and draws the same
    codes through the step object."""
    assert interpreted("decode_interpret.py") < 1e-4


@pytest.fixture
def fp32_matmuls():
    """Full-precision fp32 matmuls for the test (the training verbs switch on TF32 process-wide)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["fused", "sdpa"])
def test_graphed_step_draws_the_codes_of_the_plain_loop_on_gpu(attention, fp32_matmuls):
    """The sampler's own CUDA graphs (compiled step, CFG mix, choice, bookkeeping) pick exactly
    the codes of the plain loop from the same generator seed: of ``generate`` without a step
    (fused attention, as 'auto' picks on CUDA) and of the same step object run eagerly. In fp32
    (``bf16=False``): bf16 rounding differs between compiled and eager kernels and flips an
    argmax now and then; fp32 differences are far below the gaps between Gumbel-max candidates.
    Intervals: the first needs only the guided graph, the second also the unguided one."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16, memory="move")
    model = GPT(cfg).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    labels = torch.tensor([1, 2, 3], device="cuda")
    seeded = lambda: torch.Generator("cuda").manual_seed(0)
    for interval in ((0, 16), (2, 12)):
        s = SamplingSettings(cfg_scale=2.0, cfg_interval=interval, top_k=20, bf16=False)
        plain = generate(model, labels, s, generator=seeded())
        assert model.new_cache(6).attention == "fused"  # what the plain loop ran
        eager = CompiledStep(model, 3, s, mode="eager", attention=attention)
        assert torch.equal(generate(model, labels, s, generator=seeded(), step=eager), plain)
        step = CompiledStep(model, 3, s, attention=attention)
        assert step.mode == "graph" and step.cache.attention == attention
        for _ in range(2):  # compiled and captured on the first call, replayed on the second
            assert torch.equal(generate(model, labels, s, generator=seeded(), step=step), plain)
        assert set(step.graphs) == {(s.guided(t), False) for t in range(16)}  # generator noise
    # bf16 (the default): a snapshot of the weights, the caller's model untouched; reproducible
    s = SamplingSettings(cfg_scale=2.0)
    step = CompiledStep(model, 3, s, attention=attention)
    assert step.model is not model and step.model.head.weight.dtype == torch.bfloat16
    assert model.head.weight.dtype == torch.float32 and step.model.rope_cos.dtype == torch.float32
    a = generate(model, labels, s, generator=seeded(), step=step)
    b = generate(model, labels, s, generator=seeded(), step=step)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 64
    # per-sample noise through the graphs: the plain loop's codes, whatever the batch
    s = SamplingSettings(cfg_scale=2.0, top_k=20, bf16=False)
    noise = SampleNoise(5)
    plain = generate(model, labels, s, noise=noise)
    step = CompiledStep(model, 1, s, attention=attention)
    rows = [
        generate(model, labels[i : i + 1], s, noise=noise, index=torch.tensor([i]), step=step)
        for i in range(3)
    ]
    assert torch.equal(torch.cat(rows), plain)


def test_sample_noise_is_a_function_of_seed_index_position_and_code_only():
    n = SampleNoise(7)
    u = n.uniform(torch.arange(40), 3, 500)
    assert u.shape == (40, 500) and u.dtype == torch.float32 and 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    assert torch.equal(n.uniform(torch.tensor([12, 5]), 3, 500), u[[12, 5]])  # whatever the batch
    assert not torch.equal(n.uniform(torch.arange(40), 4, 500), u)  # another position
    assert not torch.equal(SampleNoise(8).uniform(torch.arange(40), 3, 500), u)  # another seed
    assert torch.corrcoef(u[:2])[0, 1].abs() < 0.15  # rows are not copies of each other
    if torch.cuda.is_available():  # integer arithmetic: the same bits on a GPU
        assert torch.equal(n.uniform(torch.arange(40, device="cuda"), 3, 500).cpu(), u)


@pytest.mark.parametrize(
    "settings", [SamplingSettings(cfg_scale=2.0, top_k=10), SamplingSettings(temperature=0.7)]
)
def test_per_sample_noise_gives_the_same_images_at_any_batch_size(settings):
    model = model64("move")
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0])
    noise = SampleNoise(3)
    decode = lambda c: c.float()[:, None]  # noqa: E731 (codes as images)
    images, whole = generate_images(
        model, decode, labels, settings, batch_size=11, noise=noise, fast=False
    )
    made = []
    init = CompiledStep.__init__

    def counted(self, model, batch_size, *args, **kwargs):
        made.append(batch_size)
        init(self, model, batch_size, *args, **kwargs)

    with mock.patch.object(CompiledStep, "__init__", counted):
        for bs in (1, 4, 5, 16):
            imgs, parts = generate_images(
                model, decode, labels, settings, batch_size=bs, noise=noise, fast=True
            )
            assert torch.equal(parts, whole), bs  # the compiled step and the plain loop, any split
            assert torch.equal(imgs, images), bs  # and no padding's image among them
    # the short last batch (11 = 2 x 4 + 3 = 2 x 5 + 1) ran padded on the full batch's step; a
    # run of one short batch (16) has one step of its size
    assert made == [1, 4, 5, 11]
    # a shard of the evaluation (samples 6..10) draws the same images as in the whole run
    _, shard = generate_images(
        model, decode, labels[6:], settings, batch_size=2, noise=noise, first_index=6
    )
    assert torch.equal(shard, whole[6:])
    _, other = generate_images(model, decode, labels, settings, batch_size=11, noise=SampleNoise(4))
    assert not torch.equal(other, whole)
    with pytest.raises(ValueError, match="one sample index per label"):
        generate(model, labels, settings, noise=noise, index=torch.arange(3))


@pytest.mark.gpu
def test_overlapped_decoding_gives_the_images_of_the_serial_order_on_gpu():
    """Each batch decoded on a second stream while the next one samples (``overlap=True``):
    the same images and codes as decoding each batch after its sampling, with a short last
    batch (per-sample noise: run padded on the full batch's step; a generator's noise: a second
    compiled step, made with nothing decoding beside it), a decoder heavy enough to be still
    running when the next batch starts, and uint8 parts as the evaluation makes them."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from movegen.tokenizer import TokenizerConfig, VQTokenizer

    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16, memory="move")
    model = GPT(cfg).cuda().eval()
    tok = VQTokenizer(TokenizerConfig(architecture="llamagen-vq", image_size=64, channels=3,
                                      base_channels=64, channel_mult=(1, 1, 2, 2, 2), num_res_blocks=2,
                                      z_channels=64, code_dim=8, codebook_size=64)).cuda().eval()  # fmt: skip
    labels = torch.arange(40, device="cuda") % 10
    u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    s, noise = SamplingSettings(cfg_scale=2.0), SampleNoise(5)
    runs = {o: generate_images(model, tok.decode, labels, s, batch_size=16, noise=noise, overlap=o,
                               decode_batch_size=8, transform=u8) for o in (False, True)}  # fmt: skip
    (serial, codes), (overlapped, codes2) = runs[False], runs[True]
    assert serial.shape == (40, 3, 64, 64) and serial.dtype == torch.uint8
    assert torch.equal(codes2, codes) and torch.equal(overlapped, serial)
    assert serial.float().std() > 1  # images, not a constant
    seeded = lambda: torch.Generator("cuda").manual_seed(0)  # noqa: E731
    runs = {o: generate_images(model, tok.decode, labels, s, batch_size=16, generator=seeded(),
                               overlap=o, transform=u8) for o in (False, True)}  # fmt: skip
    assert torch.equal(runs[True][1], runs[False][1]) and torch.equal(runs[True][0], runs[False][0])


def test_overlapped_decoding_needs_a_gpu():
    model = model64("none")
    decode = lambda c: c.float()[:, None]  # noqa: E731
    with pytest.raises(ValueError, match="CUDA"):
        generate_images(model, decode, torch.arange(3), overlap=True)


def test_images_are_decoded_in_parts_and_transformed_on_the_device():
    # a batch of 11 decoded 4 at a time: the decoder never sees more than 4 codes, the images
    # are those of one whole decode, and `transform` (here the evaluation's uint8) sees each part
    model = model64("move")
    labels = torch.arange(11) % 5
    seen = []

    def decode(c):
        seen.append(len(c))
        return torch.tanh(c.float()[:, None] / 100 - 2)  # images in [-1, 1]

    settings, noise = SamplingSettings(cfg_scale=2.0), SampleNoise(1)
    whole, codes = generate_images(model, decode, labels, settings, batch_size=11, noise=noise,
                                   decode_batch_size=None)  # fmt: skip
    assert seen == [11]
    seen.clear()
    parts, codes4 = generate_images(model, decode, labels, settings, batch_size=11, noise=noise,
                                    decode_batch_size=4)  # fmt: skip
    assert seen == [4, 4, 3] and torch.equal(parts, whole) and torch.equal(codes4, codes)
    u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    small, _ = generate_images(model, decode, labels, settings, batch_size=11, noise=noise,
                               decode_batch_size=4, transform=u8)  # fmt: skip
    assert small.dtype == torch.uint8 and torch.equal(small, u8(whole))
