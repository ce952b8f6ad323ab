"""Run under torchrun with 2 CPU processes (gloo): errors in ``ranks.agree`` / ``on_first_rank``
reach every rank, whatever their type. Prints one JSON line per rank."""

import json

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
print("RESULT", json.dumps({"rank": rank, **seen}), flush=True)
dist.destroy_process_group()
