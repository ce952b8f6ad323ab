"""A tiny `movegen fit` (Python API) on GPUs for ``tests/test_parallel_gpu.py``; with ``--devices
N`` Lightning starts the other N - 1 processes with this same command line. Besides the run
folder it writes, from the first process:

* ``OUT/clipped_norms.json``: after every step, the norm of all gradients after clipping, over
  every process's shards (what the clipping must have bounded);
* ``OUT/live.pt``: the validated model's weights in memory at the end, read through FSDP's own
  ``summon_full_params`` under FSDP (not through the code that writes ``model.ckpt``).

    python tests/scripts/fit_parallel.py --store S --val_store V --out DIR --strategy fsdp --devices 1
"""

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from movegen.cli import fit  # noqa: E402
from movegen.data import CodeDataModule  # noqa: E402
from movegen.lit import LitGPT  # noqa: E402
from movegen.model import GPTConfig  # noqa: E402


class ClippedNorms(L.Callback):
    """The gradients' norm after clipping (and the optimizer step, which leaves them as they are)."""

    def __init__(self):
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.model.parameters() if p.grad is not None]
        sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
            dist.all_reduce(sq)  # each element of a gradient is on one rank only (FULL_SHARD)
        self.norms.append(float(sq.sqrt()))


def live_weights(model: LitGPT) -> dict[str, torch.Tensor]:
    strategy = model.trainer.strategy
    if not isinstance(strategy, FSDPStrategy):
        return {k: v.detach().cpu().clone() for k, v in model.eval_model().state_dict().items()}
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(strategy.model, writeback=False):
        # the names of an FSDP module's parameters in this context are its module's own
        return {n: p.detach().cpu().clone() for n, p in model.eval_model().named_parameters()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", required=True)
    p.add_argument("--val_store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ema", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1e-3)
    a = p.parse_args()
    L.seed_everything(0)
    cfg = GPTConfig.preset(
        "tiny", vocab_size=128, num_classes=10, seq_len=16, memory="move", memory_density=2
    )
    model = LitGPT(cfg, lr=1e-3, warmup_steps=2, schedule="constant", ema_decay=a.ema)
    data = CodeDataModule(codes=a.store, val_codes=a.val_store, batch_size=8)
    probe = ClippedNorms()
    trainer = {"accelerator": "gpu", "devices": a.devices, "strategy": a.strategy, "max_steps": a.steps,
               "val_check_interval": a.steps, "gradient_clip_val": a.clip, "logger": False,
               "enable_progress_bar": False, "num_sanity_val_steps": 0, "callbacks": [probe]}  # fmt: skip
    fit(model, data, out=a.out, trainer=trainer)
    live = live_weights(model)  # a collective under FSDP: every process
    if model.trainer.is_global_zero:
        out = Path(a.out)
        (out / "clipped_norms.json").write_text(json.dumps(probe.norms))
        torch.save(live, out / "live.pt")


if __name__ == "__main__":
    main()
