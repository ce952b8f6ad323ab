"""`movegen fit --trainer.strategy fsdp` on GPUs: the run trains as it would on one device (or
under DDP), gradients are clipped by their norm over every shard, ``model.ckpt`` holds the full
weights and loads strictly, and ``--resume`` continues the uninterrupted curve. Each run is a
process of its own (Lightning starts one per GPU). The two-GPU cases skip on one GPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_parallel import T, write_store  # noqa: E402

CLIP = 1e-3  # far below the gradients' norm: every step is clipped


def _gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPU{'s' if n > 1 else ''}")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return write_store(d / "train", 1024, 0), write_store(d / "val", 64, 1)


def run(args: list[str], log: Path) -> None:
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                            timeout=600).returncode  # fmt: skip
    assert rc == 0, log.read_text()[-4000:]


def fit_script(stores, out: Path, strategy: str, devices: int, ema: float) -> dict:
    """One run of ``tests/scripts/fit_parallel.py``: its metrics, model.ckpt, live weights and
    clipped gradient norms."""
    from movegen.checkpoint import load_model

    run([str(ROOT / "tests/scripts/fit_parallel.py"), "--store", str(stores[0]), "--val_store", str(stores[1]),
         "--out", str(out), "--strategy", strategy, "--devices", str(devices), "--ema", str(ema),
         "--clip", str(CLIP)], out.parent / f"{out.name}.log")  # fmt: skip
    model, ckpt = load_model(out / "model.ckpt", device="cuda")  # strict, weights only
    return {"metrics": json.loads((out / "metrics.json").read_text()), "model": model, "ckpt": ckpt,
            "live": torch.load(out / "live.pt", weights_only=True),
            "norms": json.loads((out / "clipped_norms.json").read_text())}  # fmt: skip


def check_run(r: dict, val_store: Path) -> None:
    from movegen.data import CodeStore
    from movegen.metrics import bits_per_token

    m, sd = r["metrics"], r["ckpt"]["state_dict"]
    # model.ckpt is the in-memory model (the one validation is the last step and the best)
    assert m["best_step"] == m["steps"] == r["ckpt"]["train"]["step"]
    assert sd.keys() == r["live"].keys() and all(torch.equal(sd[k], r["live"][k]) for k in sd)
    # and it reproduces what the run measured (the run validated under bf16 autocast)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bits = bits_per_token(
            r["model"], CodeStore(val_store), batch_size=8, device="cuda"
        )  # the run's batches
    assert bits == pytest.approx(m["val_bits_per_token"], rel=1e-4)
    # every step was clipped to the global norm (a shard's own norm would leave it sqrt(world) too big)
    assert len(r["norms"]) == m["steps"] and r["norms"] == pytest.approx(
        [CLIP] * m["steps"], rel=1e-3
    )


def check_same_training(a: dict, b: dict) -> None:
    """The same run up to the last bits: the shards compute what one device (or DDP) computes."""
    ha, hb = a["metrics"]["history"], b["metrics"]["history"]
    assert [h["step"] for h in ha] == [h["step"] for h in hb]
    assert [h["val_loss"] for h in ha] == pytest.approx([h["val_loss"] for h in hb], rel=1e-4)
    sa, sb = a["ckpt"]["state_dict"], b["ckpt"]["state_dict"]
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    assert worst < 1e-4, worst


@pytest.mark.gpu
@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_fsdp_on_one_gpu_trains_as_one_device(stores, tmp_path, ema):
    _gpus(1)
    one = fit_script(stores, tmp_path / "one", "auto", 1, ema)
    fsdp = fit_script(stores, tmp_path / "fsdp", "fsdp", 1, ema)
    for r in (one, fsdp):
        check_run(r, stores[1])
    check_same_training(fsdp, one)


@pytest.mark.gpu
def test_fsdp_on_two_gpus_trains_as_ddp(stores, tmp_path):
    """The case that shards: each rank holds half of every unit's weights, gradients and AdamW
    state (and of the EMA copy's weights)."""
    _gpus(2)
    ddp = fit_script(stores, tmp_path / "ddp", "ddp", 2, 0.9)
    fsdp = fit_script(stores, tmp_path / "fsdp", "fsdp", 2, 0.9)
    for r in (ddp, fsdp):
        check_run(r, stores[1])
    check_same_training(fsdp, ddp)


def cli_fit(stores, out: Path, steps: int, devices: int, *extra: str) -> None:
    run(["-m", "movegen", "fit", "--config", str(ROOT / "configs/digits/standard.yaml"), "--data.codes",
         str(stores[0]), "--data.val_codes", str(stores[1]), "--data.batch_size", "8", "--out", str(out),
         "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2", "--trainer.accelerator", "gpu",
         "--trainer.devices", str(devices), "--trainer.strategy", "fsdp", "--model.warmup_steps", "2",
         "--model.schedule", "constant", "--model.ema_decay", "0.9", "--state_every", "1", *extra],
        out.parent / f"{out.name}-{steps}.log")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("devices", [1, 2])
def test_fsdp_resume_gives_the_uninterrupted_curve(stores, tmp_path, devices):
    """A training state written under FSDP (weights, AdamW state, EMA, data position, RNG) continues
    the run as if it had not stopped; it resumes under FSDP only, with a message that says so."""
    from movegen.lit import read_training_state

    _gpus(devices)
    ref, split = tmp_path / "ref", tmp_path / "split"
    cli_fit(stores, ref, 8, devices)
    cli_fit(stores, split, 4, devices)
    cli_fit(stores, split, 8, devices, "--resume", "true")
    hr = json.loads((ref / "metrics.json").read_text())["history"]
    hs = json.loads((split / "metrics.json").read_text())["history"]
    assert [h["step"] for h in hs] == [h["step"] for h in hr] == [2, 4, 6, 8]
    assert [h["val_loss"] for h in hs] == pytest.approx([h["val_loss"] for h in hr], rel=1e-5)
    a, b = read_training_state(ref / "last.ckpt"), read_training_state(split / "last.ckpt")
    assert a["fsdp"] and a["global_step"] == b["global_step"] == 8
    worst = max(
        float((a["state_dict"][k] - b["state_dict"][k]).abs().max()) for k in a["state_dict"]
    )
    assert worst < 1e-5, worst
    # the state says how its optimizer state is laid out: another strategy refuses it up front
    env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    args = [sys.executable, "-m", "movegen", "fit", "--config", str(ROOT / "configs/digits/standard.yaml"),
            "--data.codes", str(stores[0]), "--data.val_codes", str(stores[1]), "--data.batch_size", "8",
            "--out", str(split), "--trainer.max_steps", "10", "--model.warmup_steps", "2", "--model.schedule",
            "constant", "--model.ema_decay", "0.9", "--resume", "true"]  # fmt: skip
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "resume it with --trainer.strategy fsdp" in out.stderr, (
        out.stderr[-2000:]
    )


@pytest.mark.gpu
def test_gpt_l_config_trains_under_fsdp(stores, tmp_path):
    """configs/imagenet/gpt-l-move-x1.yaml's settings (MoVE, compiled, bf16-mixed, constant LR)
    under ``--trainer.strategy fsdp``, at a tiny size: it trains and model.ckpt loads strictly."""
    from movegen.checkpoint import load_model

    _gpus(1)
    out = tmp_path / "gpt-l"
    run(["-m", "movegen", "fit", "--config", str(ROOT / "configs/imagenet/gpt-l-move-x1.yaml"),
         "--data.codes", str(stores[0]), "--data.val_codes", str(stores[1]), "--data.batch_size", "8",
         "--out", str(out), "--trainer.strategy", "fsdp", "--trainer.devices", "1", "--trainer.max_steps", "6",
         "--trainer.val_check_interval", "3", "--model.config.vocab_size", "128", "--model.config.num_classes",
         "10", "--model.config.seq_len", str(T), "--model.config.n_layer", "2", "--model.config.n_head", "2",
         "--model.config.n_embd", "64"], tmp_path / "gpt-l.log")  # fmt: skip
    model, ckpt = load_model(out / "model.ckpt")
    m = json.loads((out / "metrics.json").read_text())
    assert model.config.memory == "move" and ckpt["train"]["hparams"]["compile"] is True
    assert m["status"] == "finished" and m["steps"] == 6 and math.isfinite(m["val_loss"])
