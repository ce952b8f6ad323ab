"""Run folders: who owns one, what is in it, and the errors a run ends with.

A verb that writes a run folder (``fit``, ``fit-tokenizer``, ``fit-classifier``) claims it with
:func:`claim_run`:

* **One process at a time.** ``DIR/.lock`` names the owner (pid, host, the process's start
  time); a second process is refused while the owner lives. A lock whose process is gone (a
  ``kill -9``, a power cut) is recognised as stale and taken over, saying so.
* **Nothing replaced without being asked.** A folder that holds anything is refused unless the
  verb is told to ``resume`` its own run or to ``overwrite`` it; ``overwrite`` removes only the
  files this verb writes, and only in a folder that no other verb wrote (``run.json`` says which
  verb made it), never an arbitrary folder.
* **No leftovers.** Temporary files of an interrupted atomic write (``.NAME.XXXX``) are removed
  under the lock, where no other process can be writing them.
* **A record.** ``run.json`` holds the verb, its arguments and the status (``running``,
  ``finished``, ``interrupted``, ``diverged``, ``failed``), rewritten atomically.

Imports: the standard library and ``files`` (atomic writes) only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .files import atomic_write_text, read_json

log = logging.getLogger(__name__)

RUN_FORMAT = "movegen.run/1"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"

# What each verb writes into its folder: the only names ``overwrite`` removes.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "fit": ("model.ckpt", "last.ckpt", "metrics.json", "config.yaml", "logs"),
    "fit-tokenizer": (
        "tokenizer.ckpt",
        "metrics.json",
        "reconstructions.png",
        "config.yaml",
        "logs",
    ),
    "fit-classifier": ("classifier.ckpt", "metrics.json", "config.yaml", "logs"),
}


class RunError(Exception):
    """A run that cannot start or did not end well; ``exit_code`` is what the CLI returns."""

    exit_code = 2


class RunFolderError(RunError):
    """The run folder is taken, holds something else, or cannot be written."""


class RunInterrupted(RunError):
    """SIGINT/SIGTERM: the training state was saved (or nothing was lost); ``--resume`` goes on."""

    exit_code = 130


class TrainingDiverged(RunError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


# --------------------------------------------------------------------------- the lock


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), so a reused pid is not mistaken for
    the owner; None where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return started is None or _start_time(pid) in (None, started)


@contextmanager
def folder_lock(lock: Path, what: str) -> Iterator[None]:
    """Hold ``lock`` (a file created exclusively) for the duration; refuse a live owner, take
    over a stale one."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            owner = read_json(lock) or {}
            pid = owner.get("pid")
            same_host = owner.get("host") == me["host"]
            if isinstance(pid, int) and same_host and not _alive(pid, owner.get("started")):
                log.warning("%s: removing the stale lock of process %s, which is gone", what, pid)
                lock.unlink(missing_ok=True)
                continue
            if not owner and time.time() - lock.stat().st_mtime > 60:  # an empty lock of a crash
                lock.unlink(missing_ok=True)
                continue
            raise RunFolderError(
                f"{what} is in use by process {pid} on {owner.get('host', '?')} (since {owner.get('since', '?')}); "
                f"wait for it to finish, or, if no such process runs any more, delete {lock}"
            ) from None
        except OSError as e:  # permission bits, a read-only mount: the lock is the probe
            raise RunFolderError(
                f"cannot write in {lock.parent}: {(e.strerror or str(e)).lower()}; choose another --out"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the run folder


def _is_temp(name: str, outputs: tuple[str, ...]) -> bool:
    return any(name.startswith(f".{o}.") for o in (*outputs, RUN_FILE))


def write_run_record(out: Path, record: dict) -> None:
    """``run.json``, atomically."""
    atomic_write_text(out / RUN_FILE, json.dumps(record, indent=2))


class Run:
    """A claimed run folder: ``path``, whether it ``resumed``, and its ``record`` (run.json)."""

    def __init__(self, path: Path, verb: str, record: dict, resumed: bool):
        self.path, self.verb, self.record, self.resumed = path, verb, record, resumed

    def set_status(self, status: str, **extra) -> None:
        self.record.update(status=status, updated=time.strftime("%Y-%m-%d %H:%M:%S"), **extra)
        write_run_record(self.path, self.record)


@contextmanager
def claim_run(out: str | os.PathLike, verb: str, *, resume: bool = False, overwrite: bool = False,
              argv: list[str] | None = None) -> Iterator[Run]:  # fmt: skip
    """Own the run folder ``out`` for ``verb`` while the block runs (see the module's doc).

    ``resume``: the folder must hold this verb's run (its ``last.ckpt`` is what resumes).
    ``overwrite``: this verb's files are removed first. Neither: the folder must be empty or
    new. The status in ``run.json`` becomes ``failed`` if the block raises without setting one.
    """
    if resume and overwrite:
        raise ValueError(
            "--resume and --overwrite exclude each other: continue the run or replace it"
        )
    outputs = OUTPUTS[verb]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder; choose a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise RunFolderError(
            f"cannot create {out}: permission denied; choose another --out"
        ) from None
    except OSError as e:  # a file where a parent folder should be, a read-only file system, ...
        raise RunFolderError(f"cannot create {out}: {e.strerror}; choose another --out") from None
    with folder_lock(out / LOCK_FILE, f"run folder {out}"):
        for p in out.iterdir():  # temp files of an interrupted write: nobody else writes here
            if _is_temp(p.name, outputs):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        present = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
        old = read_json(out / RUN_FILE) if RUN_FILE in present else None
        owner = (old or {}).get("verb")
        if present and owner not in (None, verb):
            raise RunFolderError(
                f"{out} holds a `movegen {owner}` run, not a {verb} run; choose another --out"
            )
        if resume:
            if not (out / "last.ckpt").is_file():
                raise RunFolderError(f"nothing to resume in {out}: it has no last.ckpt (files: "
                                     f"{', '.join(present) or 'none'}); start the run without --resume")  # fmt: skip
        elif present and overwrite:
            foreign = [n for n in present if n not in (*outputs, RUN_FILE)]
            if foreign:
                raise RunFolderError(f"{out} holds files that `movegen {verb}` does not write ({', '.join(foreign)}); "
                                     "--overwrite replaces only a run's own files: choose another --out")  # fmt: skip
            for n in present:
                p = out / n
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif present:
            what = f"a {verb} run" if owner == verb else "files"
            hint = (
                "--resume true to continue it, "
                if verb == "fit" and (out / "last.ckpt").exists()
                else ""
            )
            raise RunFolderError(f"{out} already holds {what} ({', '.join(present[:6])}{', ...' if len(present) > 6 else ''}); "
                                 f"pass {hint}--overwrite true to replace it, or choose another --out")  # fmt: skip
        record = {"format": RUN_FORMAT, "verb": verb, "status": "running", "argv": list(argv or []),
                  "started": (old or {}).get("started") if resume else time.strftime("%Y-%m-%d %H:%M:%S"),
                  "pid": os.getpid(), "host": socket.gethostname()}  # fmt: skip
        if resume:
            record["resumed"] = [
                *((old or {}).get("resumed") or []),
                time.strftime("%Y-%m-%d %H:%M:%S"),
            ]
        run = Run(out, verb, record, resume)
        run.set_status("running")
        try:
            yield run
        except (RunInterrupted, KeyboardInterrupt):
            run.set_status("interrupted")
            raise
        except TrainingDiverged as e:
            # the message names the step and what to try (`movegen study` reads it)
            run.set_status("diverged", error=str(e)[:500])
            raise
        except BaseException as e:
            if run.record.get("status") == "running":
                run.set_status("failed", error=f"{type(e).__name__}: {e}"[:500])
            raise


class _JoinedRun(Run):
    """The run folder as a process other than the first sees it: it writes no record."""

    def set_status(self, status: str, **extra) -> None:
        self.record.update(status=status, **extra)


@contextmanager
def join_run(out: str | os.PathLike, verb: str, *, resume: bool = False) -> Iterator[Run]:
    """The run folder of a run of several processes, as every process but the first takes part
    in it: the first claims the folder (:func:`claim_run`) and writes every file in it; the
    others only train with it (Lightning's launcher starts them once the first has claimed it)."""
    yield _JoinedRun(Path(out), verb, {"verb": verb, "status": "running"}, resume)


__all__ = [
    "LOCK_FILE",
    "OUTPUTS",
    "RUN_FILE",
    "Run",
    "RunError",
    "RunFolderError",
    "RunInterrupted",
    "TrainingDiverged",
    "claim_run",
    "folder_lock",
    "join_run",
]
