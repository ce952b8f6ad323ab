"""Run under torchrun with 2 CPU processes (gloo): errors in ``ranks.agree`` / ``on_first_rank``
reach every rank, whatever their type. Each rank writes its outcomes as ``rank{r}.json`` into the
folder ``$RANKS_AGREE_OUT`` (files, not a shared stdout: under PYTHONUNBUFFERED the ranks' prints
can interleave within a line)."""

import json
import os
from pathlib import Path

import torch.distributed as dist

from movegen.ranks import agree, on_first_rank

dist.init_process_group("gloo")
rank = dist.get_rank()
seen = {}


def outcome(fn):
    try:
        return ["ok", fn()]
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        return [type(e).__name__, str(e)]


def disk_full():
    raise OSError("No space left on device")


def missing():
    raise FileNotFoundError("refs.npz is missing")


seen["first_rank_oserror"] = outcome(lambda: on_first_rank(disk_full, "writing the features"))
seen["rank1_missing"] = outcome(lambda: agree(missing if rank == 1 else (lambda: rank)))
seen["no_error"] = outcome(lambda: agree(lambda: rank * 10))
seen["first_rank_value"] = outcome(lambda: on_first_rank(lambda: "made on rank 0"))
Path(os.environ["RANKS_AGREE_OUT"], f"rank{rank}.json").write_text(
    json.dumps({"rank": rank, **seen})
)
dist.destroy_process_group()
