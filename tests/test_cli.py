import json
import subprocess
import sys
from pathlib import Path

from movegen.cli import COMMANDS, VERBS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out and verb in COMMANDS


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "movegen.cli", "info", "--config", "configs/imagenet/gpt-b-move-x1.yaml",
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    rep = json.loads(out.stdout)
    assert set(rep) >= {"params_backbone", "params_embedding", "params_memory", "params_router", "params_total",
                        "flops_per_token"}  # fmt: skip
    assert rep["params_memory"] == (16384 + 1001) * 6 * 768


def test_info_human_readable(capsys):
    assert main(["info", "--config", str(ROOT / "configs/fashion-mnist/move-x4.yaml")]) == 0
    out = capsys.readouterr().out
    assert "memory (bank / LaVE tables)" in out and "forward FLOPs per token" in out


def test_print_config_of_a_training_verb(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/digits/move-x1.yaml"),
                "--out",
                "/nonexistent",
                "--print_config",
            ]
        )
    assert e.value.code == 0
    assert "memory: move" in capsys.readouterr().out


def test_missing_config_file_is_a_clear_error(caplog):
    assert main(["info", "--config", "configs/nope.yaml"]) == 2
    assert "does not exist" in caplog.text
