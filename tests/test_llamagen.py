"""LlamaGen's tokenizer and GPT inside movegen: strict conversion, and parity with LlamaGen's code.

The parity tests import LlamaGen's own modules from a checkout named by ``MOVEGEN_LLAMAGEN``
(e.g. ``MOVEGEN_LLAMAGEN=.llamagen``, a git-ignored copy of FoundationVision/LlamaGen's
``autoregressive/models/gpt.py``, ``tokenizer/tokenizer_image/vq_model.py`` and
``utils/drop_path.py``) and are skipped without it. The other tests need no LlamaGen code: the
released tokenizer's key/shape list is ``tests/data/llamagen-vq16-state-dict-shapes.json``.
"""

import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from movegen.checkpoint import atomic_torch_save, load_model, load_tokenizer, tokenizer_checkpoint
from movegen.convert import convert_llamagen_gpt, convert_llamagen_vq, load_llamagen_state_dict
from movegen.model import GPT, GPTConfig
from movegen.tokenizer import TokenizerConfig, VQTokenizer

ROOT = Path(__file__).resolve().parents[1]
VQ16_SHAPES = ROOT / "tests/data/llamagen-vq16-state-dict-shapes.json"

# the small GPT of the parity tests: LlamaGen ModelArgs fields and ours
V, C, GRID, DIM, LAYERS, HEADS, MULTIPLE = 256, 10, 4, 64, 2, 4, 32


# --------------------------------------------------------------------------- LlamaGen's code


@pytest.fixture(scope="module")
def llamagen():
    """LlamaGen's ``vq_model`` and ``gpt`` modules, loaded from their files (nothing of theirs
    stays importable by name)."""
    root = os.environ.get("MOVEGEN_LLAMAGEN")
    if not root:
        pytest.skip("set MOVEGEN_LLAMAGEN to a checkout of FoundationVision/LlamaGen")
    from benchmarks._util import load_llamagen

    return load_llamagen(root)


def _randomize(module: torch.nn.Module, std: float, seed: int) -> None:
    """Non-trivial values in every tensor (norm scales around 1, LlamaGen's zero head too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            norm = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if norm else std) + float(norm))


def _save_llamagen(state_dict: dict, path: Path, **args) -> Path:
    """LlamaGen's checkpoint layout: the weights under "model", its arguments as a Namespace."""
    torch.save({"model": state_dict, "steps": 1, "args": argparse.Namespace(**args)}, path)
    return path


# --------------------------------------------------------------------------- helpers without LlamaGen


def _tiny_tokenizer(tmp_path: Path) -> Path:
    """A movegen tokenizer.ckpt with K = 256 and a 4 x 4 grid (what the small GPT is over)."""
    cfg = TokenizerConfig(
        image_size=16,
        channel_mult=(1, 2, 2),
        base_channels=8,
        code_dim=4,
        codebook_size=V,
        kmeans_init=False,
    )
    path = tmp_path / "tok" / "tokenizer.ckpt"
    path.parent.mkdir()
    atomic_torch_save(
        tokenizer_checkpoint(VQTokenizer(cfg), dataset={"name": "digits"}, metrics={}), path
    )
    return path


def _llamagen_gpt_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The small GPT in LlamaGen's key layout, random values (written out by hand from its
    ``Transformer``: an independent statement of the layout the converter expects)."""
    g = torch.Generator().manual_seed(seed)
    hidden = 192  # int(2 * 4 * 64 / 3) = 170, rounded up to a multiple of 32
    shapes = {
        "tok_embeddings.weight": (V, DIM),
        "cls_embedding.embedding_table.weight": (C + 1, DIM),
        "norm.weight": (DIM,),
        "output.weight": (V, DIM),
    }
    for i in range(LAYERS):
        shapes |= {
            f"layers.{i}.attention.wqkv.weight": (3 * DIM, DIM),
            f"layers.{i}.attention.wo.weight": (DIM, DIM),
            f"layers.{i}.feed_forward.w1.weight": (hidden, DIM),
            f"layers.{i}.feed_forward.w3.weight": (hidden, DIM),
            f"layers.{i}.feed_forward.w2.weight": (DIM, hidden),
            f"layers.{i}.attention_norm.weight": (DIM,),
            f"layers.{i}.ffn_norm.weight": (DIM,),
        }
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def _convert_gpt(ckpt: Path, tok: Path, out: Path) -> Path:
    return convert_llamagen_gpt(
        ckpt,
        out,
        tokenizer=tok,
        size="B",
        num_classes=C,
        n_layer=LAYERS,
        n_head=HEADS,
        n_embd=DIM,
        mlp_multiple_of=MULTIPLE,
    )


# --------------------------------------------------------------------------- conversion, no LlamaGen


@pytest.fixture(scope="module")
def vq16_release(tmp_path_factory):
    """A checkpoint with exactly the released VQ-16's keys and shapes (random values)."""
    shapes = json.loads(VQ16_SHAPES.read_text())
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    sd["quantize.embedding.weight"] = torch.randn(shapes["quantize.embedding.weight"], generator=g)
    sd["quantize.codebook_used"] = torch.zeros(shapes["quantize.codebook_used"])
    for k in sd:  # GroupNorm scales around 1
        if ".norm" in k and k.endswith(".weight"):
            sd[k] = 1 + sd[k]
    d = tmp_path_factory.mktemp("vq16")
    return _save_llamagen(sd, d / "vq_ds16_c2i.pt", vq_model="VQ-16", codebook_size=16384), sd


def test_released_vq16_layout_converts_strictly_and_encodes_256_to_16x16(vq16_release, tmp_path):
    src, sd = vq16_release
    path = convert_llamagen_vq(src, tmp_path / "tok")
    tok, ckpt = load_tokenizer(path)
    assert tok.config.architecture == "llamagen-vq" and tok.codebook_size == 16384
    assert (
        ckpt["converted_from"]["model"] == "VQ-16" and len(ckpt["converted_from"]["sha256"]) == 64
    )
    # every weight arrived: the codebook as it was, one attention's q/k/v fused in order
    torch.testing.assert_close(tok.quantizer.embedding.weight, sd["quantize.embedding.weight"])
    qkv = tok.decoder.mid[1].qkv.weight
    want = torch.cat([sd[f"decoder.mid.1.{p}.weight"] for p in "qkv"])
    torch.testing.assert_close(qkv, want, rtol=0, atol=0)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (1, 16, 16) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 16384
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_llamagen_vq(src, tmp_path / "tok")


def test_vq_missing_extra_and_misshaped_keys_are_named(vq16_release, tmp_path):
    _, sd = vq16_release
    bad = dict(sd)
    del bad["encoder.mid.1.k.weight"]
    bad["encoder.extra.weight"] = torch.zeros(3)
    bad["decoder.conv_out.bias"] = torch.zeros(4)
    path = _save_llamagen(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as e:
        convert_llamagen_vq(path, tmp_path / "tok")
    msg = str(e.value)
    assert "3 problems" in msg
    assert "missing key 'encoder.mid.1.k.weight'" in msg
    assert "unexpected key 'encoder.extra.weight'" in msg
    assert "'decoder.conv_out.bias' has shape (4,), expected (3,)" in msg
    assert not (tmp_path / "tok" / "tokenizer.ckpt").exists()


def test_gpt_missing_extra_and_misshaped_keys_are_named(tmp_path):
    tok = _tiny_tokenizer(tmp_path)
    good = _llamagen_gpt_state_dict()
    path = _convert_gpt(_save_llamagen(good, tmp_path / "good.pt"), tok, tmp_path / "ok")
    model = load_model(path)[0]
    assert model.config.prefix_rope == "zero" and model.config.mlp_hidden == 192
    w13 = torch.cat([good[f"layers.1.feed_forward.{w}.weight"] for w in ("w1", "w3")])
    assert torch.equal(model.blocks[1].mlp.w13.weight, w13)  # silu(w1 x) * w3 x: (a, b) chunks
    # a bare state dict (as FSDP saves) with LlamaGen's RoPE table, which is checked and dropped
    bare = {**good, "freqs_cis": torch.zeros(1 + GRID * GRID, DIM // HEADS // 2, 2)}
    torch.save(bare, tmp_path / "bare.pt")
    _convert_gpt(tmp_path / "bare.pt", tok, tmp_path / "bare")
    cases = {
        "missing key 'layers.1.feed_forward.w3.weight'": lambda sd: sd.pop(
            "layers.1.feed_forward.w3.weight"
        ),
        "unexpected key 'layers.0.attention.bias'": lambda sd: sd.update(
            {"layers.0.attention.bias": torch.zeros(1)}
        ),
        "'cls_embedding.embedding_table.weight' has shape (10, 64), expected (11, 64)": lambda sd: (
            sd.update({"cls_embedding.embedding_table.weight": torch.zeros(C, DIM)})
        ),
        "'freqs_cis' has shape (16, 8, 2), expected (17, 8, 2)": lambda sd: sd.update(
            {"freqs_cis": torch.zeros(GRID * GRID, 8, 2)}
        ),
    }
    for i, (needle, edit) in enumerate(cases.items()):
        sd = dict(good)
        edit(sd)
        with pytest.raises(ValueError, match="1 problem;") as e:
            _convert_gpt(_save_llamagen(sd, tmp_path / f"bad{i}.pt"), tok, tmp_path / f"out{i}")
        assert needle in str(e.value)


class _Payload:
    """A pickled object whose unpickling would run a function (here: create a folder)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_namespace_is_allow_listed_and_other_globals_fail_safely(tmp_path):
    ns = _save_llamagen(_llamagen_gpt_state_dict(), tmp_path / "ns.pt", gpt_model="GPT-B")
    with pytest.raises(pickle.UnpicklingError):  # weights_only alone refuses the Namespace
        torch.load(ns, weights_only=True)
    assert len(load_llamagen_state_dict(ns)) == 4 + 7 * LAYERS
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    torch.save({"model": _llamagen_gpt_state_dict(), "args": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_llamagen_state_dict(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a LlamaGen checkpoint"):
        torch.save({"ema": {}}, tmp_path / "other.pt")
        load_llamagen_state_dict(tmp_path / "other.pt")


def test_llamagen_vq_architecture_trains_and_quantizes_to_unit_codes():
    cfg = TokenizerConfig.preset(
        "llamagen-vq16",
        image_size=16,
        channels=1,
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        z_channels=16,
        codebook_size=64,
    )
    tok = VQTokenizer(cfg)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    recon, codes, loss = tok(x)
    assert recon.shape == x.shape and codes.shape == (4, 8, 8) and loss > 0
    ((recon - x).pow(2).mean() + loss).backward()
    assert tok.quantizer.embedding.weight.grad.abs().sum() > 0  # the codebook learns by gradient
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0  # straight through the quantizer
    tok.eval()
    zq, codes, _ = tok.quantize(x)
    torch.testing.assert_close(zq, tok.lookup(codes), rtol=0, atol=1e-6)
    torch.testing.assert_close(tok.lookup(codes).norm(dim=1), torch.ones(4, 8, 8))
    assert tok.decode(codes).shape == x.shape
    with pytest.raises(ValueError, match="quantizer='vq'"):
        TokenizerConfig(architecture="llamagen-vq", quantizer="fsq")
    with pytest.raises(ValueError, match="architecture"):
        TokenizerConfig(architecture="vqgan")


# --------------------------------------------------------------------------- prefix_rope


def test_prefix_rope_zero_zeroes_the_class_query_and_key_only():
    kw = dict(vocab_size=V, num_classes=C, seq_len=16, token_dropout=0.0)
    assert GPTConfig(**kw).prefix_rope == "identity"
    ours = GPT(GPTConfig.preset("tiny", **kw)).eval()
    llg = GPT(GPTConfig.preset("tiny", prefix_rope="zero", **kw)).eval()
    _randomize(ours, 0.2, seed=3)
    llg.load_state_dict(ours.state_dict())
    # identity by default: cos 1, sin 0 at the class position; the grid positions agree
    assert torch.equal(ours.rope_cos[0], torch.ones_like(ours.rope_cos[0]))
    assert not ours.rope_sin[0].any() and not llg.rope_cos[0].any() and not llg.rope_sin[0].any()
    assert torch.equal(ours.rope_cos[1:], llg.rope_cos[1:])
    assert torch.equal(ours.rope_sin[1:], llg.rope_sin[1:])
    x = torch.randn(2, 16, ours.config.n_embd)
    ids = torch.randint(V, (2, 16))
    q0, k0, v0 = ours.blocks[0].attn.mixed_qkv(x, ids, None, ours.rope_cos, ours.rope_sin)
    q1, k1, v1 = llg.blocks[0].attn.mixed_qkv(x, ids, None, llg.rope_cos, llg.rope_sin)
    assert not q1[:, :, 0].any() and not k1[:, :, 0].any() and q0[:, :, 0].abs().min() > 0
    torch.testing.assert_close(q1[:, :, 1:], q0[:, :, 1:], rtol=0, atol=0)
    torch.testing.assert_close(k1[:, :, 1:], k0[:, :, 1:], rtol=0, atol=0)
    torch.testing.assert_close(v1, v0, rtol=0, atol=0)
    # the class position attends only to itself, so its logits do not change; later ones do
    codes, labels = torch.randint(V, (2, 16)), torch.tensor([1, C])
    a, b = ours(codes, labels), llg(codes, labels)
    torch.testing.assert_close(a[:, 0], b[:, 0])
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-3
    # cached decoding reads the same table
    ids = llg.input_ids(codes, labels)
    cache = llg.new_cache(2)
    steps = [llg.step(ids[:, :1], cache.positions[:1], cache)] + [
        llg.step(ids[:, t : t + 1], cache.positions[t : t + 1], cache) for t in range(1, 16)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prefix_rope"):
        GPTConfig(prefix_rope="none")


# --------------------------------------------------------------------------- parity with LlamaGen


def test_vq_parity_with_llamagen(llamagen, tmp_path):
    torch.manual_seed(0)
    # LlamaGen's VQ-16 layout at a quarter of its width (its Encoder/Decoder take ch; VQModel
    # fixes 128): GroupNorm's 32 groups then hold 1 to 4 channels
    small = dict(ch=32, ch_mult=[1, 1, 2, 2, 4], z_channels=64)
    ref = llamagen.vq.VQ_16(codebook_size=512, codebook_embed_dim=8, z_channels=64)
    ref.encoder, ref.decoder = llamagen.vq.Encoder(**small), llamagen.vq.Decoder(**small)
    ref.eval()
    _randomize(ref.encoder, 0.05, seed=1)  # GroupNorm scales and biases off their init
    _randomize(ref.decoder, 0.05, seed=2)
    src = _save_llamagen(ref.state_dict(), tmp_path / "vq.pt", vq_model="VQ-16")
    path = convert_llamagen_vq(
        src, tmp_path / "tok", codebook_size=512, z_channels=64, base_channels=32, image_size=64
    )
    tok, _ = load_tokenizer(path)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z_ref = ref.quant_conv(ref.encoder(x))
        _, _, (_, _, idx) = ref.quantize(z_ref)
        z = tok.encoder(x)
    print(f"VQ latent max abs diff {(z - z_ref).abs().max():.3g} (scale {z_ref.abs().max():.3g})")
    torch.testing.assert_close(z, z_ref, rtol=1e-4, atol=1e-5)
    codes = tok.encode(x)
    assert codes.shape == (2, 4, 4)
    assert torch.equal(codes, idx.view(2, 4, 4))
    assert len(codes.unique()) > 8  # a real test of the nearest-code search
    with torch.no_grad():
        img_ref = ref.decode_code(codes.flatten(), shape=(2, 8, 4, 4)).clamp(-1, 1)
    img = tok.decode(codes)
    print(f"VQ decoded pixels max abs diff {(img - img_ref).abs().max():.3g}")
    assert img.shape == x.shape and (img_ref.abs() < 1).float().mean() > 0.5  # not all clamped
    torch.testing.assert_close(img, img_ref, rtol=0, atol=1e-4)


def test_gpt_logits_parity_with_llamagen(llamagen, tmp_path):
    from movegen.evaluate import load_model_and_tokenizer

    args = llamagen.gpt.ModelArgs(
        dim=DIM,
        n_layer=LAYERS,
        n_head=HEADS,
        multiple_of=MULTIPLE,
        vocab_size=V,
        num_classes=C,
        block_size=GRID * GRID,
        cls_token_num=1,
    )
    ref = llamagen.gpt.Transformer(args).eval()
    _randomize(ref, 0.2, seed=4)  # its head is zero at init
    assert ref.output.weight.abs().min() > 0
    src = _save_llamagen(ref.state_dict(), tmp_path / "c2i.pt", gpt_model="GPT-custom")
    tok = _tiny_tokenizer(tmp_path)
    path = _convert_gpt(src, tok, tmp_path / "gpt")
    model, ckpt, _, tck = load_model_and_tokenizer(
        str(path), None, "cpu"
    )  # header finds the tokenizer
    assert ckpt["code_store"]["tokenizer_sha256"] == tck["sha256"]
    g = torch.Generator().manual_seed(5)
    T = GRID * GRID
    worst = 0.0
    for labels in (torch.tensor([0, 3, 9, C]), torch.tensor([7, C, 1, 1])):  # C: the null class
        codes = torch.randint(V, (len(labels), T), generator=g)
        with torch.no_grad():
            want, _ = ref(codes[:, :-1], labels, input_pos=torch.arange(T))  # eval: no dropout
            got = model(codes, labels)
        assert got.shape == want.shape == (len(labels), T, V)
        assert want.abs().max() > 1.0  # logits of a real size
        worst = max(worst, (got - want).abs().max().item())
        torch.testing.assert_close(got[:, 0], want[:, 0], rtol=0, atol=1e-4)  # the class position
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    print(f"GPT logits max abs diff {worst:.3g}")
    # the identity prefix (our own models) would not reproduce LlamaGen
    ours = GPT(GPTConfig(**{**model.config.to_dict(), "prefix_rope": "identity"})).eval()
    ours.load_state_dict(model.state_dict())
    assert (ours(codes, labels) - want).abs().max() > 1e-3
