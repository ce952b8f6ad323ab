"""Data-parallel training through Lightning (DDP) on N GPUs against one GPU.

Trains LitGPT (GPT-B of `configs/imagenet/gpt-b-standard.yaml`: K=16384, 256 positions;
bf16-mixed, fused AdamW, clip 1.0) on a synthetic code store for a fixed number of steps and times
the steps after warm-up (synchronised). Run it from the repository root: with ``--devices N``
Lightning starts the other ranks with the same ``python -m benchmarks.ddp`` command line.

    python -m benchmarks.ddp --devices 1 --out /tmp/ddp1.json
    python -m benchmarks.ddp --devices 2 --out /tmp/ddp2.json
    python -m benchmarks.ddp --table /tmp/ddp1.json /tmp/ddp2.json
    python -m benchmarks.ddp --smoke            # CPU, tiny, one process
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ._util import arm_config, json_line, print_table


def make_store(path: Path, n: int, K: int, T: int, C: int) -> None:
    from movegen.data import write_code_store

    if (path / "header.json").exists():
        return
    rng = np.random.default_rng(0)
    batches = (
        (rng.integers(1, K, size=(1000, 1, T)), rng.integers(0, C, size=1000))
        for _ in range(n // 1000)
    )
    write_code_store(path, batches, num_items=n, views=1, h=int(T**0.5), w=int(T**0.5),
                     header={"codebook_size": K, "num_classes": C, "dataset": "synthetic"})  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch", type=int, default=64, help="per device")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--table", nargs="*", default=None)
    a = p.parse_args()
    if a.table is not None:
        rows = [json.loads(Path(f).read_text()) for f in a.table]
        base = next((r["tokens_per_s"] for r in rows if r["devices"] == 1), None)
        for r in rows:
            r["speedup"] = r["tokens_per_s"] / base if base else "-"
        json_line("ddp", {"rows": rows})
        print_table(rows, [("devices", "GPUs", "{}"), ("batch_per_device", "batch/GPU", "{}"),
                           ("ms_per_step", "ms/step", "{:.1f}"), ("tokens_per_s", "tokens/s", "{:,.0f}"),
                           ("speedup", "x 1 GPU", "{:.2f}"), ("device", "device", "{}")],
                    f"Lightning DDP, GPT-B, torch {rows[0]['torch']}")  # fmt: skip
        return

    import lightning as L

    from movegen.data import CodeDataModule
    from movegen.lit import LitGPT

    cfg = arm_config("standard", a.smoke)
    n = 40_000
    if a.smoke:
        a.devices, a.batch, a.steps, a.warmup, n = 1, 8, 6, 2, 2000
    store = Path(tempfile.gettempdir()) / f"movegen-ddp-store-{cfg.vocab_size}-{cfg.seq_len}"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        make_store(store, n, cfg.vocab_size, cfg.seq_len, cfg.num_classes)
    while not (store / "header.json").exists():
        time.sleep(0.5)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == a.warmup:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == a.steps:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.t1 = time.perf_counter()

    timer = Timer()
    gpu = torch.cuda.is_available() and not a.smoke
    model = LitGPT(cfg, lr=1e-4, warmup_steps=0, schedule="constant", compile=a.compile)
    dm = CodeDataModule(
        codes=str(store), val_fraction=0.01, batch_size=a.batch, num_workers=4 if gpu else 0
    )
    trainer = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=a.devices,
                        strategy="ddp" if a.devices > 1 else "auto", precision="bf16-mixed" if gpu else "32-true",
                        max_steps=a.steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, callbacks=[timer], default_root_dir=tempfile.gettempdir())  # fmt: skip
    trainer.fit(model, datamodule=dm)
    if trainer.is_global_zero:
        steps = a.steps - a.warmup
        s = (timer.t1 - timer.t0) / steps
        row = {"devices": a.devices, "batch_per_device": a.batch, "ms_per_step": s * 1e3,
               "tokens_per_s": a.batch * a.devices * cfg.seq_len / s, "compile": a.compile,
               "device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__}  # fmt: skip
        print(row)
        if a.out:
            Path(a.out).write_text(json.dumps(row))


if __name__ == "__main__":
    main()
