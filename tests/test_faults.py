"""Fault injection: real processes killed mid-run, forced divergence, ``--out`` pointed at the
wrong things. Each test asserts the exit code, the message and what is left on disk."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from movegen.cli import main

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 60, 10


def fit_args(codes, val_codes, out, *extra):
    return ["fit", "--config", str(ROOT / "configs/digits/standard.yaml"), "--data.codes", str(codes),
            "--data.val_codes", str(val_codes), "--out", str(out), "--trainer.max_steps", str(STEPS),
            "--trainer.val_check_interval", str(EVERY), "--model.config.resid_dropout", "0.1",
            "--state_every", "1", *extra]  # fmt: skip


def resume_args(pipeline, run: Path) -> list[str]:
    return fit_args(pipeline["codes"], pipeline["val_codes"], run, "--resume", "true")


def history(run: Path) -> list[tuple[int, float]]:
    return [
        (h["step"], h["val_loss"])
        for h in json.loads((run / "metrics.json").read_text())["history"]
    ]


def spawn(args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "movegen", *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip


def wait_for_state(run: Path, proc: subprocess.Popen, min_step: int = EVERY, timeout: float = 300):
    """Until ``run/last.ckpt`` holds at least ``min_step`` (read from the CSV log's val rows)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if (run / "last.ckpt").exists():
            return
        time.sleep(0.1)
    raise TimeoutError


@pytest.fixture(scope="module")
def reference(digits_pipeline, tmp_path_factory):
    """An uninterrupted run: the validation curve a resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("faults") / "ref"
    assert main(fit_args(digits_pipeline["codes"], digits_pipeline["val_codes"], out)) == 0
    return history(out)


def test_kill9_mid_fit_then_resume_gives_the_same_curve(digits_pipeline, reference, tmp_path):
    run = tmp_path / "run"
    p = spawn(
        fit_args(digits_pipeline["codes"], digits_pipeline["val_codes"], run), tmp_path / "fit.log"
    )
    wait_for_state(run, p)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert not (run / "metrics.json").exists()  # a killed run does not look finished
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    # the folder is owned: a plain second fit is refused and touches nothing
    files = lambda: sorted(p.name for p in run.iterdir() if p.name != ".lock")  # noqa: E731
    before = files()
    assert main(fit_args(digits_pipeline["codes"], digits_pipeline["val_codes"], run)) == 2
    assert files() == before and not (run / ".lock").exists()  # the stale lock was cleared
    # the stale lock of the killed process is taken over; the curve is the uninterrupted one
    assert main(resume_args(digits_pipeline, run)) == 0
    assert history(run) == reference
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "finished" and m["resumed"] is True and m["steps"] == STEPS
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert not (run / ".lock").exists()


def test_sigint_saves_the_state_exits_130_and_resumes(digits_pipeline, reference, tmp_path):
    run = tmp_path / "run"
    p = spawn(
        fit_args(digits_pipeline["codes"], digits_pipeline["val_codes"], run), tmp_path / "fit.log"
    )
    wait_for_state(run, p)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    text = (tmp_path / "fit.log").read_text()
    assert "interrupted at step" in text and "--resume true" in text and "Traceback" not in text
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert main(resume_args(digits_pipeline, run)) == 0
    assert history(run) == reference


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_model(
    digits_pipeline, tmp_path, caplog
):
    run = tmp_path / "run"
    # a large LR after 30 good steps: the loss goes NaN/inf and the best model stays
    args = fit_args(digits_pipeline["codes"], digits_pipeline["val_codes"], run, "--model.lr", "1e6",
                    "--model.warmup_steps", "1000")  # fmt: skip
    rc = main(args)
    assert rc == 3
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "NaN or infinite at step" in msg
    rec = json.loads((run / "run.json").read_text())
    assert (
        rec["status"] == "diverged" and "NaN or infinite at step" in rec["error"]
    )  # `study` reads it
    if (run / "metrics.json").exists():  # strictly valid JSON when written at all
        json.loads((run / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    if (run / "last.ckpt").exists():  # never a state with non-finite weights
        import torch

        st = torch.load(run / "last.ckpt", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in st.values() if v.is_floating_point())


def test_a_diverged_run_records_why_in_run_json(tmp_path):
    from movegen.runs import TrainingDiverged, claim_run

    with pytest.raises(TrainingDiverged), claim_run(tmp_path / "run", "fit"):
        raise TrainingDiverged("the training loss became NaN or infinite at step 7; ...")
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["status"] == "diverged" and rec["error"].startswith("the training loss became NaN")
    assert not (tmp_path / "run" / ".lock").exists()


def test_resume_refuses_a_truncated_or_foreign_state_and_another_config(
    digits_pipeline, tmp_path, caplog
):
    codes, val = digits_pipeline["codes"], digits_pipeline["val_codes"]
    run = tmp_path / "run"
    assert main(fit_args(codes, val, run, "--trainer.max_steps", "20")) == 0
    state = (run / "last.ckpt").read_bytes()
    # another model config
    assert main(fit_args(codes, val, run, "--trainer.max_steps", "20", "--resume", "true",
                         "--model.config.n_layer", "3")) == 2  # fmt: skip
    assert "model.config differs" in caplog.text and "n_layer" in caplog.text
    # another data order
    assert (
        main(
            fit_args(
                codes, val, run, "--trainer.max_steps", "20", "--resume", "true", "--data.seed", "5"
            )
        )
        == 2
    )
    assert "training data differ" in caplog.text
    # truncated
    (run / "last.ckpt").write_bytes(state[: len(state) // 2])
    assert main(fit_args(codes, val, run, "--resume", "true")) == 2
    assert "not a readable training state" in caplog.text
    # foreign: a model checkpoint in its place
    (run / "last.ckpt").write_bytes((run / "model.ckpt").read_bytes())
    assert main(fit_args(codes, val, run, "--resume", "true")) == 2
    assert "not a movegen training state" in caplog.text
    # nothing to resume
    assert main(fit_args(codes, val, tmp_path / "new", "--resume", "true")) == 2
    assert "nothing to resume" in caplog.text


def test_run_folders_are_owned(digits_pipeline, tmp_path, caplog):
    codes, val = digits_pipeline["codes"], digits_pipeline["val_codes"]
    run = tmp_path / "run"
    assert main(fit_args(codes, val, run, "--trainer.max_steps", "20")) == 0
    ckpt = (run / "model.ckpt").read_bytes()
    # a second fit into the same folder is refused, the model is untouched
    assert main(fit_args(codes, val, run, "--trainer.max_steps", "10")) == 2
    assert "already holds a fit run" in caplog.text and (run / "model.ckpt").read_bytes() == ckpt
    # a fit-classifier into a fit folder is refused even with --overwrite
    assert (
        main(["fit-classifier", "--data.name", "digits", "--out", str(run), "--overwrite", "true"])
        == 2
    )
    assert "holds a `movegen fit` run" in caplog.text and (run / "model.ckpt").exists()
    # extract-codes --overwrite onto a run folder deletes nothing
    assert main(["extract-codes", "--tokenizer", str(digits_pipeline["tokenizer"]), "--out", str(run),
                 "--overwrite", "true"]) == 2  # fmt: skip
    assert "not a code store" in caplog.text and (run / "model.ckpt").read_bytes() == ckpt
    # --overwrite of a fit folder holding a foreign file is refused; of a clean one it replaces
    (run / "notes.txt").write_text("mine")
    assert main(fit_args(codes, val, run, "--trainer.max_steps", "10", "--overwrite", "true")) == 2
    assert "notes.txt" in caplog.text and (run / "notes.txt").read_text() == "mine"
    (run / "notes.txt").unlink()
    (run / ".model.ckpt.abc123").write_bytes(b"half")  # an interrupted atomic write
    assert main(fit_args(codes, val, run, "--trainer.max_steps", "10", "--overwrite", "true")) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 10
    assert not (run / ".model.ckpt.abc123").exists()


def test_a_live_lock_refuses_a_second_process_and_a_stale_one_is_taken_over(
    digits_pipeline, tmp_path, caplog
):
    from movegen.runs import _start_time

    codes, val = digits_pipeline["codes"], digits_pipeline["val_codes"]
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {
            "pid": sleeper.pid,
            "host": os.uname().nodename,
            "started": _start_time(sleeper.pid),
        }
        (run / ".lock").write_text(json.dumps(lock))
        assert main(fit_args(codes, val, run, "--trainer.max_steps", "10")) == 2
        assert f"in use by process {sleeper.pid}" in caplog.text
        assert not (run / "metrics.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(fit_args(codes, val, run, "--trainer.max_steps", "10")) == 0  # the owner is gone
    assert (run / "model.ckpt").exists() and not (run / ".lock").exists()


def test_an_out_that_cannot_be_a_run_folder_is_refused_before_any_work(
    digits_pipeline, tmp_path, caplog
):
    codes, val = digits_pipeline["codes"], digits_pipeline["val_codes"]
    (tmp_path / "afile").write_text("x")
    assert main(fit_args(codes, val, tmp_path / "afile")) == 2
    assert "is a file, not a folder" in caplog.text
    assert main(fit_args(codes, val, tmp_path / "afile" / "run")) == 2
    assert "cannot create" in caplog.text
    if os.geteuid() != 0:  # (root writes anywhere)
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert main(fit_args(codes, val, ro / "run")) == 2
        assert "permission denied" in caplog.text
    assert (tmp_path / "afile").read_text() == "x"


def test_kill9_mid_extraction_leaves_no_store_and_the_next_run_cleans_up(digits_pipeline, tmp_path):
    out = tmp_path / "codes"
    args = [
        "extract-codes",
        "--tokenizer",
        str(digits_pipeline["tokenizer"]),
        "--out",
        str(out),
        "--batch_size",
        "8",
    ]
    p = spawn(args, tmp_path / "x.log")
    t0 = time.time()
    while not list(tmp_path.glob(".codes.tmp-*")) and time.time() - t0 < 120:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".codes.tmp-*"))  # the killed run's leftovers...
    old = os.umask(0o027)
    try:
        assert main(args) == 0
    finally:
        os.umask(old)
    assert not list(tmp_path.glob(".codes.tmp-*")) and not list(
        tmp_path.glob(".codes.lock")
    )  # ...are gone
    assert (out / "header.json").exists()
    assert oct(out.stat().st_mode & 0o777) == oct(0o750)  # the folder follows the umask


def test_patience_stops_once_validation_stops_improving(digits_pipeline, tmp_path):
    run = tmp_path / "run"
    # lr 0: the validation loss never moves, so the first validation stays the best and the
    # second one is the first without improvement
    args = fit_args(digits_pipeline["codes"], digits_pipeline["val_codes"], run, "--model.lr", "0.0",
                    "--patience", "2")  # fmt: skip
    assert main(args) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 3 * EVERY and m["stopped_early"] is True and m["best_step"] == EVERY
    assert [h["step"] for h in m["history"]] == [EVERY, 2 * EVERY, 3 * EVERY]
    assert main(fit_args(digits_pipeline["codes"], digits_pipeline["val_codes"], tmp_path / "r2",
                         "--patience", "0")) == 2  # fmt: skip
