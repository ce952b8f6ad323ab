"""A small scheduler of subprocesses: jobs with dependencies, at most ``parallel`` at once,
spread over the visible GPUs (one ``CUDA_VISIBLE_DEVICES`` per subprocess), each logging to its
own file. Knows nothing of studies."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# the subprocesses import this checkout's movegen, whatever the current folder
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    state: str
    """What became of the job: "done" (nothing to do), "ok" (ran and succeeded), "failed",
    "skipped" (a dependency did not succeed), or a state of the job's own (``Job.exit_states``,
    or an Outcome returned by ``prepare``)."""
    detail: str = ""
    seconds: float | None = None
    rc: int | None = None


SUCCEEDED = ("ok", "done")


@dataclass(eq=False, kw_only=True)
class Job:
    """One subprocess. ``prepare`` runs when every dependency has succeeded (and every job of
    ``after`` has ended, whatever its outcome) and returns the command, None when there is
    nothing to do (already done), or an :class:`Outcome` when the job is settled without running
    (its dependents are skipped unless that outcome succeeded); ``done`` says afterwards whether
    it produced what it should. ``exit_states`` names the outcome of particular exit codes
    (e.g. ``{3: "diverged"}``); any other non-zero code is "failed"."""

    key: str
    kind: str
    deps: tuple[str, ...]
    prepare: Callable[[], list[str] | Outcome | None]
    done: Callable[[], bool]
    log: Path | Callable[[], Path]
    after: tuple[str, ...] = ()
    exit_states: dict[int, str] = field(default_factory=dict)


def _cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(l.strip() for l in lines[-n:] if l.strip())


def run_jobs(jobs: list[Job], *, parallel: int, gpus: list[str],
             on_finish: Callable[[Job, Outcome], None] = lambda j, o: None,
             start_until: dict[str, float] | None = None) -> dict[str, Outcome]:  # fmt: skip
    """Run ``jobs`` as subprocesses, at most ``parallel`` at once, each after its dependencies;
    a job whose dependency did not succeed is skipped. With GPUs, each subprocess sees one of them
    (``CUDA_VISIBLE_DEVICES``), the least loaded first. Each gets cores // parallel CPU threads
    (``OMP_NUM_THREADS``, unless set).
    The subprocesses still running when this returns by an exception are terminated.
    ``start_until``: kind -> a ``time.time()`` after which no job of that kind starts (e.g. no new
    fit late in a time slot, while the evaluations of the finished ones still run); such jobs,
    and those waiting on them, are left without an outcome once nothing else can run."""
    keys = {j.key for j in jobs}
    if missing := sorted({d for j in jobs for d in (*j.deps, *j.after)} - keys):
        raise ValueError(f"jobs depend on unknown jobs {missing}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])
        ),
    }
    env.setdefault("TQDM_DISABLE", "1")  # progress bars would fill the logs with carriage returns
    # each subprocess gets its share of the cores, on a GPU machine too: the jobs' CPU work (an
    # evaluation's KID subsets and FID eigenvalues, the fits' data and launches) otherwise runs
    # with a thread per core in every job at once; measured on one H200 host (16 cores, 8 jobs),
    # an evaluation's scores took 60-167 s that way against 2.6 s alone
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // parallel)))
    order = {"input": 0, "evaluate": 1, "fit": 2}  # a ready evaluation goes before a new fit
    pending = sorted(jobs, key=lambda j: order.get(j.kind, 3))
    outcomes: dict[str, Outcome] = {}
    running: list[tuple[Job, subprocess.Popen, str | None, float, Any]] = []
    load = dict.fromkeys(gpus, 0)

    def finish(job: Job, o: Outcome) -> None:
        outcomes[job.key] = o
        on_finish(job, o)

    was_done: dict[str, bool] = {}  # (a job that has not run does not become done: asked once)

    def closed(job: Job) -> bool:  # past its kind's last start time (and not already done:
        # a finished fit is still settled, when a slot frees, so that its evaluation runs)
        if start_until is None or time.time() <= start_until.get(job.kind, float("inf")):
            return False
        if job.key not in was_done:
            was_done[job.key] = job.done()
        return not was_done[job.key]

    def ready(job: Job) -> bool:
        return all(d in outcomes for d in (*job.deps, *job.after)) and not closed(job)

    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= parallel:
                    break
                if not ready(job):
                    continue
                pending.remove(job)
                if bad := [d for d in job.deps if outcomes[d].state not in SUCCEEDED]:
                    why = ", ".join(f"{d} ({outcomes[d].state})" for d in bad)
                    finish(job, Outcome("skipped", f"{why} did not succeed"))
                    continue
                try:
                    cmd = job.prepare()
                except (ValueError, FileNotFoundError) as e:
                    finish(job, Outcome("failed", str(e)))
                    continue
                if cmd is None:
                    finish(job, Outcome("done"))
                    continue
                if isinstance(cmd, Outcome):
                    finish(job, cmd)
                    continue
                gpu = min(gpus, key=lambda g: (load[g], gpus.index(g))) if gpus else None
                logp = job.log() if callable(job.log) else job.log
                logp.parent.mkdir(parents=True, exist_ok=True)
                fh = open(logp, "ab")  # appended: a retry keeps the failure it retries
                fh.write(
                    f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} gpu={gpu}\n# {' '.join(cmd)}\n".encode()
                )
                fh.flush()
                job_env = env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu}
                p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=job_env, cwd=str(logp.parent))  # fmt: skip
                if gpu is not None:
                    load[gpu] += 1
                log.info("started %s%s", job.key, f" on GPU {gpu}" if gpu is not None else "")
                running.append((job, p, gpu, time.time(), fh))
            for item in list(running):
                job, p, gpu, t0, fh = item
                if (rc := p.poll()) is None:
                    continue
                running.remove(item)
                fh.close()
                if gpu is not None:
                    load[gpu] -= 1
                seconds = round(time.time() - t0, 1)
                logp = job.log() if callable(job.log) else job.log
                if rc == 0 and job.done():
                    log.info("finished %s in %.0f s", job.key, seconds)
                    finish(job, Outcome("ok", seconds=seconds, rc=rc))
                    continue
                state = job.exit_states.get(rc, "failed") if rc else "failed"
                why = f"exit status {rc}" if rc else "it exited 0 but wrote no result"
                log.error("%s %s (%s); log %s: %s", job.key, state, why, logp, _tail(logp, 3))
                finish(job, Outcome(state, f"{why}; see {logp}: {_tail(logp)}", seconds, rc))
            if running:
                time.sleep(0.05)
            elif pending and not any(ready(j) for j in pending):
                if any(closed(j) for j in pending):
                    log.warning("%d job(s) not started: past the last start time of their kind (or waiting "
                                "on such a job)", len(pending))  # fmt: skip
                    break
                raise ValueError(f"jobs wait on each other: {[j.key for j in pending]}")
    finally:
        for job, p, *_ in running:
            log.warning("stopping %s (pid %d)", job.key, p.pid)
            p.terminate()
        for _job, p, _, _, fh in running:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            fh.close()
    return outcomes
