import json
import os
from pathlib import Path

import pytest
import torch

from movegen.cli import main

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def interpreted():
    """Run a script of ``tests/scripts`` with Triton's CPU interpreter; returns the worst
    difference it prints after ``WORST``."""
    import subprocess
    import sys

    pytest.importorskip("triton")

    def run(script: str) -> float:
        out = subprocess.run([sys.executable, str(ROOT / "tests/scripts" / script)], cwd=ROOT,
                             env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        return float(out.stdout.split("WORST")[1])

    return run


@pytest.fixture(scope="session")
def digits_pipeline(tmp_path_factory):
    """A tiny digits tokenizer (through the CLI) and its train/val code stores."""
    d = tmp_path_factory.mktemp("pipeline")
    rc = main(
        [
            "fit-tokenizer",
            "--config",
            str(ROOT / "tokenizers/digits/config.yaml"),
            "--out",
            str(d / "tok"),
            "--trainer.max_steps",
            "120",
            "--trainer.check_val_every_n_epoch",
            "100",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(d),
        ]
    )
    assert rc == 0
    for split in ("train", "val"):
        rc = main(
            [
                "extract-codes",
                "--tokenizer",
                str(d / "tok/tokenizer.ckpt"),
                "--split",
                split,
                "--out",
                str(d / f"codes_{split}"),
            ]
        )
        assert rc == 0
    return {
        "dir": d,
        "tokenizer": d / "tok/tokenizer.ckpt",
        "codes": d / "codes_train",
        "val_codes": d / "codes_val",
        "tok_metrics": json.loads((d / "tok/metrics.json").read_text()),
    }


@pytest.fixture(scope="session")
def digits_models(digits_pipeline):
    """Two tiny AR models (standard, MoVE-x1) and a classifier on the digits pipeline."""
    d = digits_pipeline["dir"]
    out = {}
    for arm in ("standard", "move-x1"):
        rc = main(
            [
                "fit",
                "--config",
                str(ROOT / f"configs/digits/{arm}.yaml"),
                "--data.codes",
                str(digits_pipeline["codes"]),
                "--data.val_codes",
                str(digits_pipeline["val_codes"]),
                "--out",
                str(d / arm),
                "--trainer.max_steps",
                "120",
                "--trainer.val_check_interval",
                "20",
                "--trainer.default_root_dir",
                str(d),
            ]
        )
        assert rc == 0
        out[arm] = d / arm / "model.ckpt"
    rc = main(
        [
            "fit-classifier",
            "--data.name",
            "digits",
            "--out",
            str(d / "classifier"),
            "--trainer.max_epochs",
            "8",
            "--data.batch_size",
            "64",
            "--trainer.default_root_dir",
            str(d),
        ]
    )
    assert rc == 0
    out["classifier"] = d / "classifier" / "classifier.ckpt"
    out["dir"] = d
    return out
