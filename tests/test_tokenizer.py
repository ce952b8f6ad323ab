import pytest
import torch

from movegen.checkpoint import load_tokenizer
from movegen.cli import main
from movegen.data import load_dataset
from movegen.metrics import evaluate_tokenizer
from movegen.tokenizer import TokenizerConfig, VQTokenizer


@pytest.mark.parametrize("quantizer", ["vq", "fsq", "lfq"])
def test_eval_quantized_equals_codebook_lookup(quantizer):
    cfg = TokenizerConfig(
        image_size=8,
        channel_mult=(1, 2),
        base_channels=16,
        code_dim=8,
        quantizer=quantizer,
        codebook_size=64,
        fsq_levels=(5, 5, 3),
    )
    tok = VQTokenizer(cfg)
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    tok.train()
    tok(x)  # a training pass (k-means init, EMA update) before checking eval mode
    tok.eval()
    zq, codes, _ = tok.quantize(x)
    assert codes.shape == (6, 4, 4) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < tok.codebook_size
    torch.testing.assert_close(zq, tok.lookup(codes), rtol=0, atol=1e-6)


def test_decode_encode_shape_and_range():
    tok = VQTokenizer(
        TokenizerConfig(
            image_size=16,
            channels=3,
            channel_mult=(1, 2, 2),
            base_channels=16,
            code_dim=8,
            codebook_size=32,
        )
    )
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = tok.encode(x)
    assert codes.shape == (3, 4, 4)
    y = tok.decode(codes)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match="expected images"):
        tok.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="codes must lie"):
        tok.decode(torch.full((1, 4, 4), 32))


def test_bad_tokenizer_configs():
    with pytest.raises(ValueError, match="quantizer"):
        TokenizerConfig(quantizer="rvq")
    with pytest.raises(ValueError, match="divisible"):
        TokenizerConfig(image_size=10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="power-of-two"):
        TokenizerConfig(quantizer="lfq", codebook_size=100)


def test_fit_tokenizer_outputs_and_reported_psnr(digits_pipeline):
    d = digits_pipeline["dir"] / "tok"
    assert (d / "reconstructions.png").stat().st_size > 0
    m = digits_pipeline["tok_metrics"]
    for k in ("psnr", "codebook_usage", "perplexity"):
        assert k in m and k in m["test"]
    tok, ckpt = load_tokenizer(digits_pipeline["tokenizer"])
    assert ckpt["config"]["codebook_size"] == tok.codebook_size == 128
    # decode(encode(x)) of the loaded checkpoint gives the PSNR the metrics report
    again = evaluate_tokenizer(tok, load_dataset("digits", "val"))
    assert again["psnr"] == pytest.approx(m["val"]["psnr"], abs=1e-3)
    assert again["codebook_usage"] == pytest.approx(m["val"]["codebook_usage"])
    assert m["psnr"] > 15  # a real reconstruction, not noise (an untrained one is ~7 dB)


def test_bad_config_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  config:\n    image_size: 8\n    codebok_size: 64\n")
    with pytest.raises(SystemExit) as e:
        main(["fit-tokenizer", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert e.value.code != 0
    assert "codebok_size" in capsys.readouterr().err


def test_not_a_tokenizer_checkpoint(tmp_path, caplog):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a movegen checkpoint"):
        load_tokenizer(junk)
    other = tmp_path / "other.ckpt"
    torch.save({"format": "something/1", "state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a movegen.tokenizer checkpoint"):
        load_tokenizer(other)
    rc = main(["extract-codes", "--tokenizer", str(junk), "--out", str(tmp_path / "c")])
    assert rc == 2 and not (tmp_path / "c").exists()


def test_adversarial_loss_switches_on_and_perceptual_needs_weights(tmp_path, monkeypatch):
    import lightning as L

    from movegen.data import ImageDataModule
    from movegen.lit import LitTokenizer

    cfg = TokenizerConfig(
        image_size=8, channel_mult=(1, 2), base_channels=16, code_dim=8, codebook_size=32
    )
    lit = LitTokenizer(cfg, disc_weight=0.1, disc_start=2, warmup_steps=1)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append("train/d_loss" in trainer.callback_metrics)

    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, callbacks=[Spy()])  # fmt: skip
    trainer.fit(lit, datamodule=ImageDataModule("digits", batch_size=32))
    assert seen[0] is False and seen[-1] is True  # off before disc_start, on after
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="vgg16"):
        LitTokenizer(cfg, perceptual_weight=1.0)


@pytest.mark.background  # (inductor compiles on the CPU: tens of seconds)
def test_compiled_decode_matches_the_eager_decoder_and_compiles_once():
    """LlamaGen's VQ layout, decoded compiled in channels-last: the eager decoder's images for a
    full batch and for a short one (padded to the batch and cut back, so no second compilation),
    and a batch larger than it refused with what to do."""
    from movegen.tokenizer import CompiledDecode

    torch.manual_seed(0)
    cfg = TokenizerConfig(architecture="llamagen-vq", image_size=16, channels=3, base_channels=8,
                          channel_mult=(1, 2), num_res_blocks=1, z_channels=8, code_dim=4,
                          codebook_size=32)  # fmt: skip
    tok = VQTokenizer(cfg).eval()
    codes = torch.randint(32, (6, 8, 8))
    want = tok.decode(codes)
    dec = CompiledDecode(tok, batch_size=4)
    torch._dynamo.utils.counters.clear()
    parts = [dec(codes[:4]), dec(codes[4:])]
    assert [p.shape for p in parts] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert parts[1].is_contiguous()
    torch.testing.assert_close(torch.cat(parts), want, atol=1e-5, rtol=1e-5)
    assert want.abs().max() > 0.1 and want.abs().max() <= 1  # images, clamped
    assert torch.equal(tok.decode(codes), want)  # the tokenizer decodes as before
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one compilation
    with pytest.raises(ValueError, match="1 to 4 images"):
        dec(codes)


def test_evaluations_share_one_compiled_decoder_per_tokenizer_file():
    """``evaluate``'s compiled decoders: one per tokenizer file (sha256), device and batch size
    in a process, so evaluating several models of one tokenizer compiles it once; a tokenizer
    without a recorded sha256 gets its own (nothing here is compiled: that happens at the first
    call)."""
    from movegen.evaluate import _COMPILED_DECODERS, compiled_decoder

    tok = VQTokenizer(TokenizerConfig(image_size=8, channel_mult=(1, 2), codebook_size=64))
    again = VQTokenizer(TokenizerConfig(image_size=8, channel_mult=(1, 2), codebook_size=64))
    try:
        a = compiled_decoder(tok, {"sha256": "aa"}, "cpu", 4)
        assert compiled_decoder(again, {"sha256": "aa"}, "cpu", 4) is a  # another model's load
        assert compiled_decoder(tok, {"sha256": "bb"}, "cpu", 4) is not a
        assert compiled_decoder(tok, {"sha256": "aa"}, "cpu", 8) is not a
        assert compiled_decoder(tok, {}, "cpu", 4) is not compiled_decoder(tok, {}, "cpu", 4)
        assert a.tok is tok and a.batch_size == 4
    finally:
        _COMPILED_DECODERS.clear()
