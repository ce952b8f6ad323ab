"""Work over several processes (``torch.distributed``; one process without it): which rank this
is, a step whose error every rank raises (:func:`agree`, :func:`on_first_rank`), and gathering to
the first rank. Used by evaluation and code extraction."""

from __future__ import annotations


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_KINDS = {k.__name__: k for k in (ValueError, FileNotFoundError, PermissionError)}


def agree(fn, what: str = "this step"):
    """``fn()`` on this rank (each rank its own ``fn``), then every rank learns every rank's
    error, whatever its type: the failing rank raises its own exception, the others the same type
    where it is a ``ValueError``, ``FileNotFoundError`` or ``PermissionError`` (the errors that
    tell a user what to fix) and otherwise a ``RuntimeError`` naming ``what``, the rank and the
    error. So no process waits forever on a peer that failed. One collective per call."""
    rank, world = rank_and_world()
    value, err = None, None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - passed on to every rank below
        err = e
    if world > 1:
        import torch.distributed as dist

        errors = [None] * world
        dist.all_gather_object(errors, None if err is None else (type(err).__name__, str(err)))
        bad = next(((r, e) for r, e in enumerate(errors) if e is not None), None)
        if err is None and bad is not None:
            r, (kind, msg) = bad
            if kind in _KINDS:
                raise _KINDS[kind](msg)
            raise RuntimeError(f"{what} failed on rank {r} of {world}: {kind}: {msg}")
    if err is not None:
        raise err
    return value


def on_first_rank(fn, what: str = "this step"):
    """``fn()`` on rank 0 only (None elsewhere); an error there is raised on every rank
    (:func:`agree`)."""
    return agree(fn if rank_and_world()[0] == 0 else (lambda: None), what)


def gather_to_first_rank(obj) -> list | None:
    """Every rank's ``obj`` on rank 0, in rank order (None elsewhere)."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    parts = [None] * world if rank == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts
