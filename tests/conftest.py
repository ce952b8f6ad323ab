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


class _Scripts:
    """The scripts of ``tests/scripts`` run with Triton's CPU interpreter (single-threaded
    Python, minutes each), started one after another in the background as soon as the tests
    that read them are collected (``interpreter_script`` marks), so they run beside the other
    tests on a second core; a test then waits for its script's result."""

    def __init__(self):
        import threading

        self.results, self.procs, self.stop, self.pending = {}, [], False, set()
        self.lock, self.done = threading.Lock(), threading.Condition(threading.Lock())

    def run(self, script: str):
        import subprocess
        import sys

        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        with self.lock:
            if self.stop:
                return None
            proc = subprocess.Popen([sys.executable, str(ROOT / "tests/scripts" / script)], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            self.procs.append(proc)
        try:
            out, err = proc.communicate(timeout=self.TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n{script}: killed after {self.TIMEOUT} s"
        return proc.returncode, out, err

    TIMEOUT = 900

    def start(self, scripts: list[str]) -> None:
        import threading
        import traceback

        def work():
            for script in scripts:
                try:
                    res = self.run(script)
                except Exception:  # a result whatever happens: no test waits forever
                    res = (-1, "", traceback.format_exc())
                with self.done:
                    self.results[script] = res
                    self.done.notify_all()

        self.pending = set(scripts)
        threading.Thread(target=work, daemon=True).start()

    def result(self, script: str):
        if script not in self.pending:
            return self.run(script)
        with self.done:  # (the scripts queued before it run first)
            if not self.done.wait_for(lambda: script in self.results, timeout=4 * self.TIMEOUT):
                return -1, "", f"{script}: no result from the background run"
            return self.results[script]

    def close(self) -> None:
        with self.lock:
            self.stop = True
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()


_SCRIPTS = _Scripts()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter_script(name): the test reads tests/scripts/NAME run by the "
        "interpreted fixture (started in the background once collected)",
    )  # fmt: skip


def pytest_collection_finish(session):
    # session.items: the tests that will run, after -k / -m deselection
    if session.config.option.collectonly:
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    names = [m.args[0] for item in session.items for m in item.iter_markers("interpreter_script")]
    if names:
        _SCRIPTS.start(list(dict.fromkeys(names)))


def pytest_sessionfinish(session, exitstatus):
    _SCRIPTS.close()


@pytest.fixture
def interpreted():
    """Run a script of ``tests/scripts`` with Triton's CPU interpreter (or wait for the run
    started at collection); returns the worst difference it prints after ``WORST``."""
    pytest.importorskip("triton")

    def run(script: str) -> float:
        res = _SCRIPTS.result(script)
        assert res is not None, "the session is ending"
        code, out, err = res
        assert code == 0, err[-3000:]
        return float(out.split("WORST")[1])

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
