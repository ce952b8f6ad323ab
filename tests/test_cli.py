import json
import subprocess
import sys
from pathlib import Path

import pytest

from movegen.cli import COMMANDS, VERBS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out and verb in COMMANDS


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "movegen.cli", "info", "--config", "configs/imagenet/gpt-b-move-x1.yaml",
                          "--format", "json"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    rep = json.loads(out.stdout)
    assert set(rep) >= {"params_backbone", "params_embedding", "params_memory", "params_router", "params_total",
                        "flops_per_token"}  # fmt: skip
    assert rep["params_memory"] == (16384 + 1001) * 6 * 768


def test_info_human_readable(capsys):
    assert main(["info", "--config", str(ROOT / "configs/fashion-mnist/move-x4.yaml")]) == 0
    out = capsys.readouterr().out
    assert "memory (bank / LaVE tables)" in out and "forward FLOPs per token" in out


def _exit_output(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out + cap.err


def _print_config(capsys, verb: str, *extra: str) -> str:
    code, out = _exit_output(capsys, [verb, *extra, "--out", "/nonexistent", "--print_config"])
    assert code == 0, out
    return out


def test_print_config_of_a_training_verb(capsys):
    out = _print_config(capsys, "fit", "--config", str(ROOT / "configs/digits/move-x1.yaml"))
    assert "memory: move" in out


@pytest.mark.parametrize(
    "verb,defaults",
    [
        # fit: clip 1.0; bf16 on a GPU, fp32 here; a finite length even without a YAML
        ("fit", ["gradient_clip_val: 1.0", "precision: 32-true", "max_steps: 5000"]),
        ("fit-tokenizer", ["max_steps: 2000", "precision: 32-true"]),
        ("fit-classifier", ["max_epochs: 6"]),
    ],
)
def test_training_verbs_show_their_real_defaults(capsys, verb, defaults):
    out = _print_config(capsys, verb)
    for line in defaults:
        assert line in out, (line, out)
    assert "enable_checkpointing: false" in out


def test_trainer_defaults_really_apply(tmp_path, monkeypatch):
    """What --print_config shows is what the Trainer gets (the old CLI dropped these)."""
    import movegen.cli as cli

    seen = {}

    def capture(model, data, *, out, trainer, overwrite, argv, config_yaml):
        seen.update(trainer, overwrite=overwrite, config_yaml=config_yaml)

    monkeypatch.setattr(cli, "fit_classifier", capture)
    assert main(["fit-classifier", "--data.name", "digits", "--out", str(tmp_path / "c")]) == 0
    assert seen["max_epochs"] == 6 and seen["enable_checkpointing"] is False
    assert seen["overwrite"] is False and "max_epochs: 6" in seen["config_yaml"]  # the run's record


def test_fit_help_shows_field_docstrings(capsys):
    code, out = _exit_output(capsys, ["fit", "--help"])
    assert code == 0
    assert "MoVE gets k * n_layer / 2 slots" in out  # the docstring of GPTConfig.memory_density
    assert "--optimizer" not in out  # would bypass the bank's weight-decay exclusion


def test_typed_verbs_document_every_knob(capsys):
    code, out = _exit_output(capsys, ["sample", "--help"])
    assert code == 0
    assert "Classifier-free guidance scale" in out and "default: 2.0" in out
    for flag in ("--sampling.cfg_interval", "--sampling.top_p", "--per_class", "--out_dir"):
        assert flag in out


def test_one_spelling_of_the_data_root(capsys):
    for verb in ("fit-tokenizer", "fit-classifier", "extract-codes", "evaluate"):
        code, out = _exit_output(capsys, [verb, "--help"])
        assert code == 0 and "--data.root" in out, verb
        assert "--data-root" not in out and "data_root" not in out, verb


def test_bad_log_level_is_refused(capsys):
    code, out = _exit_output(capsys, ["--log-level", "loud", "info", "--config", "x.yaml"])
    assert code == 2 and "invalid choice" in out


def test_missing_config_file_is_a_clear_error(caplog):
    assert main(["info", "--config", "configs/nope.yaml"]) == 2
    assert "does not exist" in caplog.text


def test_unused_config_field_warns():
    from movegen.model import GPTConfig
    from movegen.tokenizer import TokenizerConfig

    with pytest.warns(UserWarning, match="memory_density 4"):
        GPTConfig(memory="none", memory_density=4)
    with pytest.warns(UserWarning, match="codebook_size 512 is ignored"):
        TokenizerConfig(quantizer="fsq", codebook_size=512)
    with pytest.warns(UserWarning, match="fsq_levels"):
        TokenizerConfig(quantizer="vq", fsq_levels=(4, 4))


def test_training_verb_terminal_is_quiet(tmp_path):
    """A user sees movegen's lines, not third-party warnings or deprecations."""
    out = subprocess.run([sys.executable, "-m", "movegen.cli", "fit-classifier", "--data.name", "digits",
                          "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
                          "--out", str(tmp_path / "c")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    noisy = [l for l in text.splitlines() if "warning" in l.lower() or "deprecat" in l.lower()]
    assert not noisy, noisy
    assert "test accuracy" in text


def test_convert_names_its_kinds(capsys, caplog):
    assert main(["convert", "nonsense"]) == 2 and "llamagen-vq" in caplog.text
    code, out = _exit_output(capsys, ["convert", "llamagen-gpt", "--help"])
    assert code == 0 and "--tokenizer" in out and "--checkpoint" in out


def test_save_rotated_qk_is_a_fit_setting(capsys):
    """``--model.save_rotated_qk false`` (memory for speed) reaches the config, and ``LitGPT``
    then builds its model without ``"ropesave"``, keeping the attention from the QKV product; a
    resume may change it."""
    from movegen.lit import LitGPT
    from movegen.model import GPTConfig

    out = _print_config(capsys, "fit", "--model.save_rotated_qk", "false")
    assert "save_rotated_qk: false" in out
    cfg = GPTConfig.preset("tiny", vocab_size=64, num_classes=10, seq_len=16)
    assert {"ropeattn", "ropesave"} <= set(LitGPT(cfg).model.fused_ops)
    ops = LitGPT(cfg, save_rotated_qk=False).model.fused_ops
    assert "ropeattn" in ops and "ropesave" not in ops
    # a resume may change it (memory, not numbers), and not the learning rate
    from dataclasses import asdict
    from types import SimpleNamespace

    saved = LitGPT(cfg)
    state = {"model_config": asdict(cfg), "hyper_parameters": dict(saved.hparams)}
    for lit, refused in ((LitGPT(cfg, save_rotated_qk=False), False), (LitGPT(cfg, lr=1e-3), True)):
        lit._trainer = SimpleNamespace(strategy=SimpleNamespace())
        if refused:
            with pytest.raises(ValueError, match="lr"):
                lit.check_resumable(state)
        else:
            lit.check_resumable(state)
