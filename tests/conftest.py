import functools
import json
import os
from pathlib import Path

import pytest
import torch

from movegen.cli import main

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class _Background:
    """Work started one after another in a background thread as soon as the tests that need it
    are collected (after ``-k`` / ``-m`` deselection), so that it runs beside the other tests
    on a second core; a test then waits for its result (these tests run last):

    * the scripts of ``tests/scripts`` (``interpreter_script(name)`` marks), run with Triton's
      CPU interpreter (single-threaded Python, minutes each);
    * the tests marked ``background`` (long, and needing no session fixture: Triton's compiler
      for an sm_90 target, its interpreter, inductor on the CPU, Inception passes), run one
      after another by a pytest process of their own on one thread; each test here (its
      fixtures set up as usual) reports that outcome: passed, skipped with its reason, or
      failed with its report.

    Each result is a job's name -> ``(returncode, stdout, stderr)``."""

    TIMEOUT = 900  # an interpreter script's, and each background test's share of their process's

    def __init__(self):
        import threading

        self.results, self.procs, self.stop, self.pending = {}, [], False, set()
        self.tests: list[str] = []  # the background tests' node ids
        self.env: dict[str, str] = {}  # the environment at collection, for every job
        self.wait = self.TIMEOUT  # the longest a test may wait for its job's result
        self.lock, self.done = threading.Lock(), threading.Condition(threading.Lock())

    def spawn(self, name: str, args: list[str], env: dict, timeout: float, cwd=ROOT):
        """Run ``python ARGS`` to its end (or its kill, with every process it started, after
        ``timeout`` s); None once closing."""
        import subprocess
        import sys

        with self.lock:
            if self.stop:
                return None
            # its own process group: killed whole (compile workers, a benchmark's process)
            proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env={**self.env, **env},
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)  # fmt: skip
            self.procs.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)
            out, err = proc.communicate()
            err += f"\n{name}: killed after {timeout:.0f} s"
        return proc.returncode, out, err

    @staticmethod
    def kill(proc) -> None:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def run(self, script: str):
        env = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        return self.spawn(script, [str(ROOT / "tests/scripts" / script)], env, self.TIMEOUT)

    def run_tests(self, config):
        """The background tests in one pytest process run as this one is (root, ini file,
        warning filters), on one thread: ``(returncode, report, its output's tails)``, where
        the report (JSON, rewritten after each test) holds each test's ``[outcome, text]``."""
        import tempfile

        args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                "--rootdir", str(config.rootpath)]  # fmt: skip
        if config.inipath:
            args += ["-c", str(config.inipath)]
        args += [f"-W{w}" for w in config.known_args_namespace.pythonwarnings or ()]
        with tempfile.TemporaryDirectory() as d:
            report = Path(d) / "report.json"
            env = {"OMP_NUM_THREADS": "1", _CHILD: str(report)}
            # (node ids are relative to the root)
            res = self.spawn(BACKGROUND_TESTS, [*args, *self.tests], env,
                             self.TIMEOUT * len(self.tests), cwd=config.rootpath)  # fmt: skip
            if res is None:
                return None
            code, out, err = res
            said = f"{out[-3000:]}\n{err[-3000:]}"
            return code, report.read_text() if report.is_file() else "{}", said

    def start(self, scripts: list[str], tests: list[str], config) -> None:
        import threading
        import traceback

        self.env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
        jobs = [(s, functools.partial(self.run, s)) for s in scripts]
        if tests:
            self.tests = tests
            jobs.append((BACKGROUND_TESTS, functools.partial(self.run_tests, config)))
        self.wait = self.TIMEOUT * (len(scripts) + len(tests)) + 60

        def work():
            for name, job in jobs:
                try:
                    res = job()
                except Exception:  # a result whatever happens: no test waits forever
                    res = (-1, "", traceback.format_exc())
                with self.done:
                    self.results[name] = res
                    self.done.notify_all()

        self.pending = {name for name, _ in jobs}
        threading.Thread(target=work, daemon=True).start()

    def finished(self) -> bool:
        """Whether every job started in the background has its result."""
        with self.done:
            return self.pending <= self.results.keys()

    def result(self, name: str):
        if name not in self.pending:
            return self.run(name)
        with self.done:  # (the jobs queued before it run first)
            if not self.done.wait_for(lambda: name in self.results, timeout=self.wait):
                return -1, "", f"{name}: no result from the background run"
            return self.results[name]

    def test_outcome(self, nodeid: str) -> tuple[str, str]:
        """``(passed | skipped | failed, what it said)`` of a background test."""
        res = self.result(BACKGROUND_TESTS)
        if res is None:
            return "failed", "the session is ending"
        code, report, said = res
        try:
            return tuple(json.loads(report)[nodeid])
        except (ValueError, KeyError):
            return "failed", f"no report of {nodeid} from its pytest process (exit {code}):\n{said}"

    def close(self) -> None:
        with self.lock:
            self.stop = True
            for proc in self.procs:
                if proc.poll() is None:
                    self.kill(proc)


BACKGROUND_TESTS = "the background tests"
_CHILD = "MOVEGEN_BACKGROUND_REPORT"  # set in the background tests' process: its report's path
_CHILD_REPORT = os.environ.get(_CHILD)  # that path, in that process (None in the main one)
_SCRIPTS = _Background()
_REPORTS: dict[str, list[str]] = {}  # the background tests' process: node id -> outcome, text


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interpreter_script(name): the test reads tests/scripts/NAME run by the "
        "interpreted fixture (started in the background once collected)",
    )  # fmt: skip
    config.addinivalue_line(
        "markers", "background: run by a pytest process of its own started once collected, "
        "beside the other tests; the test reports its outcome",
    )  # fmt: skip


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if item.get_closest_marker("background") and item.get_closest_marker("xfail"):
            raise pytest.UsageError(f"{item.nodeid}: a background test cannot be xfail (its "
                                    "outcome is reported here as passed, skipped or failed)")  # fmt: skip
    # the tests that wait on the background last, so that none holds up the others
    waits = [
        i
        for i in items
        if i.get_closest_marker("background") or i.get_closest_marker("interpreter_script")
    ]
    if waits and not _CHILD_REPORT:
        late = set(waits)
        items[:] = [i for i in items if i not in late] + waits


def pytest_collection_finish(session):
    # session.items: the tests that will run, after -k / -m deselection
    if session.config.option.collectonly or _CHILD_REPORT:
        return
    tests = [item.nodeid for item in session.items if item.get_closest_marker("background")]
    try:
        import triton  # noqa: F401
    except ImportError:
        scripts = []  # (their tests skip)
    else:
        marks = [
            m.args[0] for item in session.items for m in item.iter_markers("interpreter_script")
        ]
        scripts = list(dict.fromkeys(marks))
    if scripts or tests:
        _SCRIPTS.start(scripts, tests, session.config)
        _THREADS.share()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A background test reports the outcome of its run in the background tests' process."""
    if pyfuncitem.nodeid not in _SCRIPTS.tests:
        return None
    outcome, text = _SCRIPTS.test_outcome(pyfuncitem.nodeid)
    if outcome == "skipped":
        pytest.skip(text)
    if outcome != "passed":
        pytest.fail(f"in the background tests' process: {text}", pytrace=False)
    return True


def pytest_runtest_logreport(report):
    # the background tests' process: each test's outcome, the report rewritten after each
    if not _CHILD_REPORT:
        return
    was = _REPORTS.get(report.nodeid, ["", ""])
    if report.failed:
        text = f"{report.when}: {report.longreprtext[-6000:]}"
        _REPORTS[report.nodeid] = ["failed", f"{was[1]}\n{text}" if was[0] == "failed" else text]
    elif report.skipped and was[0] != "failed":
        where = report.longrepr  # (path, line, reason) of the skip
        reason = f"{where[0]}:{where[1]}: {where[2]}" if isinstance(where, tuple) else str(where)
        _REPORTS[report.nodeid] = ["skipped", reason]
    elif report.when == "call" and not was[0]:  # passed only once its call has run
        _REPORTS[report.nodeid] = ["passed", ""]
    tmp = Path(f"{_CHILD_REPORT}.tmp")
    tmp.write_text(json.dumps(_REPORTS))
    tmp.replace(_CHILD_REPORT)


class _Threads:
    """While the background jobs take a core, this process's ops run on the others, and so do
    the processes its tests start (``OMP_NUM_THREADS``): two threads sharing a busy core wait on
    the slower one at every parallel op (a tokenizer fit took 111 s so against 62 s on one
    thread and 34 s on two of an idle 2-core machine). The threads come back at the first
    test set up after the jobs end."""

    def __init__(self):
        self.was, self.env = None, None

    def share(self) -> None:
        self.was, self.env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
        if self.was > 1:
            torch.set_num_threads(self.was - 1)
            os.environ["OMP_NUM_THREADS"] = str(self.was - 1)

    def restore(self) -> None:
        if self.was is not None and _SCRIPTS.finished():
            torch.set_num_threads(self.was)
            if self.env is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = self.env
            self.was = None


_THREADS = _Threads()


def pytest_runtest_setup(item):
    _THREADS.restore()


def pytest_sessionfinish(session, exitstatus):
    _SCRIPTS.close()


@pytest.fixture
def interpreted():
    """Run a script of ``tests/scripts`` with Triton's CPU interpreter (or wait for the run
    started at collection); returns the worst difference it prints after ``WORST``."""
    pytest.importorskip("triton")

    def run(script: str) -> float:
        res = _SCRIPTS.result(script)
        assert res is not None, "the session is ending"
        code, out, err = res
        assert code == 0, err[-3000:]
        return float(out.split("WORST")[1])

    return run


@pytest.fixture(scope="session")
def digits_pipeline(tmp_path_factory):
    """A tiny digits tokenizer (through the CLI) and its train/val code stores."""
    d = tmp_path_factory.mktemp("pipeline")
    rc = main(
        [
            "fit-tokenizer",
            "--config",
            str(ROOT / "tokenizers/digits/config.yaml"),
            "--out",
            str(d / "tok"),
            "--trainer.max_steps",
            "120",
            "--trainer.check_val_every_n_epoch",
            "100",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(d),
        ]
    )
    assert rc == 0
    for split in ("train", "val"):
        rc = main(
            [
                "extract-codes",
                "--tokenizer",
                str(d / "tok/tokenizer.ckpt"),
                "--split",
                split,
                "--out",
                str(d / f"codes_{split}"),
            ]
        )
        assert rc == 0
    return {
        "dir": d,
        "tokenizer": d / "tok/tokenizer.ckpt",
        "codes": d / "codes_train",
        "val_codes": d / "codes_val",
        "tok_metrics": json.loads((d / "tok/metrics.json").read_text()),
    }


@pytest.fixture(scope="session")
def digits_models(digits_pipeline):
    """Two tiny AR models (standard, MoVE-x1) and a classifier on the digits pipeline."""
    d = digits_pipeline["dir"]
    out = {}
    for arm in ("standard", "move-x1"):
        rc = main(
            [
                "fit",
                "--config",
                str(ROOT / f"configs/digits/{arm}.yaml"),
                "--data.codes",
                str(digits_pipeline["codes"]),
                "--data.val_codes",
                str(digits_pipeline["val_codes"]),
                "--out",
                str(d / arm),
                "--trainer.max_steps",
                "120",
                "--trainer.val_check_interval",
                "20",
                "--trainer.default_root_dir",
                str(d),
            ]
        )
        assert rc == 0
        out[arm] = d / arm / "model.ckpt"
    rc = main(
        [
            "fit-classifier",
            "--data.name",
            "digits",
            "--out",
            str(d / "classifier"),
            "--trainer.max_epochs",
            "8",
            "--data.batch_size",
            "64",
            "--trainer.default_root_dir",
            str(d),
        ]
    )
    assert rc == 0
    out["classifier"] = d / "classifier" / "classifier.ckpt"
    out["dir"] = d
    return out
