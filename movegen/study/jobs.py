"""A small scheduler of subprocesses: jobs with dependencies, at most ``parallel`` at once,
spread over the visible GPUs (one ``CUDA_VISIBLE_DEVICES`` per subprocess), each logging to its
own file. Knows nothing of studies."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# the subprocesses import this checkout's movegen, whatever the current folder
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass(eq=False, kw_only=True)
class Job:
    """One subprocess. ``prepare`` runs when every dependency has succeeded and returns the
    command, or None when there is nothing to do (already done); ``done`` says afterwards whether
    it produced what it should."""

    key: str
    kind: str
    deps: tuple[str, ...]
    prepare: Callable[[], list[str] | None]
    done: Callable[[], bool]
    log: Path | Callable[[], Path]


@dataclass
class Outcome:
    state: str  # "done" (nothing to do), "ok" (ran and succeeded), "failed", "skipped"
    detail: str = ""
    seconds: float | None = None


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
             on_finish: Callable[[Job, Outcome], None] = lambda j, o: None) -> dict[str, Outcome]:  # fmt: skip
    """Run ``jobs`` as subprocesses, at most ``parallel`` at once, each after its dependencies;
    a job whose dependency failed is skipped. With GPUs, each subprocess sees one of them
    (``CUDA_VISIBLE_DEVICES``), the least loaded first. On CPU each gets cores // parallel threads.
    The subprocesses still running when this returns by an exception are terminated."""
    keys = {j.key for j in jobs}
    if missing := sorted({d for j in jobs for d in j.deps} - keys):
        raise ValueError(f"jobs depend on unknown jobs {missing}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])
        ),
    }
    env.setdefault("TQDM_DISABLE", "1")  # progress bars would fill the logs with carriage returns
    if not gpus:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    order = {"input": 0, "evaluate": 1, "fit": 2}  # a ready evaluation goes before a new fit
    pending = sorted(jobs, key=lambda j: order.get(j.kind, 3))
    outcomes: dict[str, Outcome] = {}
    running: list[tuple[Job, subprocess.Popen, str | None, float, Any]] = []
    load = dict.fromkeys(gpus, 0)

    def finish(job: Job, o: Outcome) -> None:
        outcomes[job.key] = o
        on_finish(job, o)

    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= parallel:
                    break
                states = [outcomes[d].state if d in outcomes else None for d in job.deps]
                if None in states:
                    continue
                pending.remove(job)
                if bad := [d for d, s in zip(job.deps, states) if s in ("failed", "skipped")]:
                    finish(job, Outcome("skipped", f"{', '.join(bad)} did not succeed"))
                    continue
                try:
                    cmd = job.prepare()
                except (ValueError, FileNotFoundError) as e:
                    finish(job, Outcome("failed", str(e)))
                    continue
                if cmd is None:
                    finish(job, Outcome("done"))
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
                    finish(job, Outcome("ok", seconds=seconds))
                else:
                    why = f"exit status {rc}" if rc else "it exited 0 but wrote no result"
                    log.error("%s failed (%s); log %s: %s", job.key, why, logp, _tail(logp, 3))
                    finish(job, Outcome("failed", f"{why}; see {logp}: {_tail(logp)}", seconds))
            if running:
                time.sleep(0.05)
            elif pending and not any(all(d in outcomes for d in j.deps) for j in pending):
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
