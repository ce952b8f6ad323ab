"""`movegen fit` over several processes, on CPUs: DDP over two processes (gloo), and what of FSDP
can be checked without a GPU (which strategy runs, the weights a gathered checkpoint takes, which
training states resume under which strategy). FSDP itself is in ``test_parallel_gpu.py``."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from movegen.cli import main
from movegen.lit import BlockFSDPStrategy, LitGPT, eval_weights
from movegen.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
K, C, T = 128, 10, 16  # configs/digits/*: 4x4 codes of a 128-code tokenizer, 10 classes


def write_store(path: Path, n: int, seed: int) -> Path:
    from movegen.data import write_code_store

    rng = np.random.default_rng(seed)
    # a little structure to learn: each class prefers its own band of codes
    labels = rng.integers(0, C, size=n)
    codes = (labels[:, None, None] * 12 + rng.integers(0, 24, size=(n, 1, T))) % K
    return write_code_store(path, [(codes, labels)], num_items=n, views=1, h=4, w=4,
                            header={"codebook_size": K, "num_classes": C, "dataset": "synthetic"})  # fmt: skip


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    return write_store(d / "train", 512, 0), write_store(d / "val", 64, 1)


def fit_args(stores, out: Path, steps: int, *extra: str) -> list[str]:
    train, val = stores
    return ["fit", "--config", str(ROOT / "configs/digits/standard.yaml"), "--data.codes", str(train),
            "--data.val_codes", str(val), "--data.batch_size", "8", "--out", str(out),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "4",
            "--model.warmup_steps", "2", "--model.schedule", "constant", "--state_every", "1", *extra]  # fmt: skip


def history(run: Path) -> list[tuple[int, float]]:
    return [
        (h["step"], h["val_loss"])
        for h in json.loads((run / "metrics.json").read_text())["history"]
    ]


# --------------------------------------------------------------------------- which strategy


@pytest.mark.parametrize(
    "strategy,says",
    [
        ("fsdp", "--trainer.strategy ddp"),  # on CPUs
        ("fsdp_cpu_offload", "pass --trainer.strategy fsdp"),
        (
            '{"class_path": "lightning.pytorch.strategies.FSDPStrategy"}',
            "pass --trainer.strategy fsdp",
        ),
    ],
)
def test_fit_refuses_fsdp_it_cannot_run_before_touching_the_folder(
    stores, tmp_path, caplog, strategy, says
):
    if torch.cuda.is_available() and strategy == "fsdp":
        pytest.skip("fsdp runs here")
    out = tmp_path / "run"
    assert main(fit_args(stores, out, 4, "--trainer.strategy", strategy)) == 2
    assert says in caplog.text and not out.exists()


def test_fsdp_states_resume_under_fsdp_only():
    """FSDP keys the optimizer's tensors in the model's order, the other strategies in the
    parameter groups' order: a state is refused by the other kind, with the flag to use."""
    from dataclasses import asdict
    from types import SimpleNamespace

    lit = LitGPT(GPTConfig.preset("tiny", vocab_size=K, num_classes=C, seq_len=T))
    state = {"model_config": asdict(lit.config), "hyper_parameters": dict(lit.hparams)}
    for strategy, written, says in [(SimpleNamespace(), True, "resume it with --trainer.strategy fsdp"),
                                    (BlockFSDPStrategy(), False, "not fsdp")]:  # fmt: skip
        lit._trainer = SimpleNamespace(strategy=strategy)
        with pytest.raises(ValueError, match=says):
            lit.check_resumable({**state, "fsdp": True} if written else state)
        lit.check_resumable(
            {**state, "fsdp": True} if not written else state
        )  # its own kind resumes


# --------------------------------------------------------------------------- gathered weights


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_eval_weights_out_of_the_whole_module_are_the_eval_models(ema):
    """What FSDP's full state dict (keyed as the LightningModule) becomes in ``model.ckpt``: the
    weights of the model validated (the EMA copy with an EMA), keyed as a GPT loads them."""
    lit = LitGPT(
        GPTConfig.preset("tiny", vocab_size=K, num_classes=C, seq_len=T, memory="move"),
        ema_decay=ema,
    )
    with torch.no_grad():
        lit.model.head.weight.add_(1.0)  # the EMA copy (zero head) and the model now differ
    w = eval_weights(lit.state_dict(), ema=ema > 0)
    want = lit.eval_model().state_dict()
    assert w.keys() == want.keys() and all(torch.equal(w[k], want[k]) for k in want)
    assert bool(w["head.weight"].eq(0).all()) == (ema > 0)
    GPT(lit.config).load_state_dict(w, strict=True)


def test_a_model_checkpoint_from_gathered_weights_is_the_modules_own():
    from movegen.checkpoint import model_checkpoint

    model = GPT(GPTConfig.preset("tiny", vocab_size=K, num_classes=C, seq_len=T, memory="lave"))
    meta = {"header": {"codebook_size": K}, "train": {"step": 1}, "metrics": {}}
    own, given = (
        model_checkpoint(model, **meta),
        model_checkpoint(model, **meta, state_dict=model.state_dict()),
    )
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)  # both hold copies, not views of the live weights
    assert own.keys() == given.keys() and own["config"] == given["config"]
    sd = own["state_dict"]
    assert sd.keys() == given["state_dict"].keys()
    assert all(torch.equal(sd[k], given["state_dict"][k]) for k in sd)
    assert not torch.equal(sd["tok_emb.weight"], model.tok_emb.weight)


# --------------------------------------------------------------------------- DDP, two processes


def spawn_fit(args: list[str], log: Path) -> int:
    """``movegen fit`` as a process of its own; with ``--trainer.devices 2`` Lightning starts the
    second process with the same command line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
    with log.open("w") as f:
        return subprocess.run([sys.executable, "-m", "movegen", *args], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=600).returncode  # fmt: skip


def test_ddp_over_two_processes_resumes_the_uninterrupted_curve(stores, tmp_path):
    """Two CPU processes (gloo), gradient clipping on: the first process claims the folder and
    writes every file; a run stopped at step 8 and resumed to 12 gives the validation curve of
    one that ran to 12; ``model.ckpt`` loads strictly and is the best validation's weights."""
    from movegen.checkpoint import load_model
    from movegen.lit import read_training_state

    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--model.ema_decay", "0.9", "--trainer.gradient_clip_val", "0.5"]  # fmt: skip
    ref, run = tmp_path / "ref", tmp_path / "run"
    for args, log in [(fit_args(stores, ref, 12, *ddp), "ref.log"), (fit_args(stores, run, 8, *ddp), "run.log"),
                      (fit_args(stores, run, 12, *ddp, "--resume", "true"), "resume.log")]:  # fmt: skip
        assert spawn_fit(args, tmp_path / log) == 0, (tmp_path / log).read_text()[-3000:]
    assert [s for s, _ in history(ref)] == [4, 8, 12]
    assert history(run) == history(ref)
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed"] is True and m["steps"] == 12 and m["train_tokens"] == 12 * 2 * 8 * T
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert not (run / ".lock").exists() and not (ref / ".lock").exists()
    state = read_training_state(run / "last.ckpt")
    assert "fsdp" not in state and state["global_step"] == 12
    model, ckpt = load_model(run / "model.ckpt")  # strict
    assert m["best_step"] == ckpt["train"]["step"] == 12  # the loss falls on these codes
    ema = eval_weights(state["state_dict"], ema=True)  # the best is the last: its EMA weights
    assert all(torch.equal(ema[k], v) for k, v in model.state_dict().items())


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path):
    """``ranks.agree`` / ``on_first_rank`` over 2 gloo processes: an ``OSError`` on the first
    rank (a full disk; not one of the user-facing kinds) reaches the other rank as a
    ``RuntimeError`` naming the step and the rank instead of leaving it waiting; a
    ``FileNotFoundError`` on the second rank reaches the first with its type; values pass
    through; and the run ends (a hang would hit the timeout)."""
    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(root),
        "RANKS_AGREE_OUT": str(tmp_path),
    }
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), str(root / "tests/scripts/ranks_agree.py")],
                         cwd=root, env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = {
        r["rank"]: r
        for r in (json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json")))
    }
    assert set(got) == {0, 1}
    assert got[0]["first_rank_oserror"] == ["OSError", "No space left on device"]
    kind, msg = got[1]["first_rank_oserror"]
    assert kind == "RuntimeError" and "writing the features failed on rank 0 of 2" in msg
    assert "OSError: No space left on device" in msg
    assert got[0]["rank1_missing"] == ["FileNotFoundError", "refs.npz is missing"]
    assert got[1]["rank1_missing"] == ["FileNotFoundError", "refs.npz is missing"]
    assert got[0]["no_error"] == ["ok", 0] and got[1]["no_error"] == ["ok", 10]
    assert got[0]["first_rank_value"] == ["ok", "made on rank 0"]
    assert got[1]["first_rank_value"] == ["ok", None]
