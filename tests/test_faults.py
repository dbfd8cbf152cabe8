"""Faults: interrupted and killed searches resume without losing or duplicating anything.

Two real searches through ``scripts/tune.py`` in subprocesses, on the tiny synthetic
data, each with a private Ray (``RAY_TMPDIR``), storage directory and SQLite store;
3 trials of FCN-32s/ResNet-18, 2 at a time, 3 epochs of 2 steps, no early stopping:

- ``sigint``: while a trial is in its second epoch its worker process is killed (a
  crash: Tune retries it from its last checkpoint, ``max_failures: 1``); once a trial
  has finished, the search gets Ctrl-C (SIGINT to its process group, as a terminal
  sends it); then ``--resume``.
- ``sigkill``: once a trial has finished, the driver is killed with SIGKILL (no
  clean-up at all); the Ray processes it leaves are checked; then ``--resume``.

After each resume: every trial finished before the fault is kept as it was (same run,
same metrics, not rerun), one MLflow child run per trial, no run left RUNNING, and
the Optuna study holds exactly Tune's trials with their states. The two searches use
one space and seed, so their first trials must sample the same values.

Divergence (NaN loss) is covered by test_search.py::test_diverged_trial_fails_with_its_reason_and_is_not_chosen
and ::test_optuna_study_has_no_trial_left_running, train.py's by test_train_script.py.
Checkpoint files: the kill-while-saving test and the commands' errors on damaged
checkpoints are here (library level: test_checkpoint.py). The SQLite store under
load from many processes is here too.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from helpers import (SCRIPTS, create_tracking_store, descendants, load_script, model_checkpoint, proc_stat,
                     ray_tmp_dir, script_env, shared_tmp_path, tiny_space, write_config)

TUNE = SCRIPTS / "tune.py"
TRIALS = 3
EPOCHS = 3
FINAL_STATES = ("completed", "early_stopped", "failed")

# --- processes ---------------------------------------------------------------------------------

def _identity(pid: int) -> tuple[str, str] | None:
    """(start time, command line) of a live process: a pid alone may be reused."""
    stat = proc_stat(pid)
    if stat is None or stat[0] == "Z":
        return None
    with contextlib.suppress(OSError):
        return stat[19], Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return None


class Driver:
    """``scripts/tune.py`` in its own session, and every process it starts (for clean-up by pid)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.log = log
        with open(log, "a") as out:
            out.write(f"\n$ tune.py {' '.join(args)}\n")
            out.flush()
            self.process = subprocess.Popen([sys.executable, str(TUNE), *args], stdout=out, stderr=subprocess.STDOUT,
                                            env=env, cwd=cwd, start_new_session=True)
        self.seen: dict[int, tuple[str, str]] = {}

    def tree(self) -> set[int]:
        """The driver and its live descendants (remembered for :meth:`leftovers`)."""
        pids = descendants(self.process.pid) | {self.process.pid}
        for pid in pids:
            identity = _identity(pid)
            if identity is not None:
                self.seen.setdefault(pid, identity)
        return {pid for pid in pids if pid in self.seen}

    def leftovers(self) -> dict[int, str]:
        """Processes of this driver's tree that are still alive (same pid and start time)."""
        return {pid: identity[1] for pid, identity in self.seen.items() if _identity(pid) == identity}

    def kill_leftovers(self) -> None:
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"tune.py exited early with code {self.process.returncode}:\n{self.output()[-4000:]}")

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"tune.py still running after {timeout:.0f} s:\n{self.output()[-4000:]}")
            self.tree()
            time.sleep(0.5)
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# --- the tracking store, read directly (no MLflow client in the polling loop) --------------------

def _query(database: Path, sql: str) -> list[tuple]:
    if not database.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as connection:
            return connection.execute(sql).fetchall()
    except sqlite3.OperationalError:  # no tables yet, or busy
        return []


def trial_states(database: Path) -> dict[str, tuple[str, str]]:
    """trial id -> (run id, state tag) of every trial run."""
    rows = _query(database, "SELECT t.value, t.run_uuid, s.value FROM tags t JOIN tags s ON s.run_uuid = t.run_uuid "
                            "WHERE t.key = 'trial_id' AND s.key = 'state'")
    return {trial: (run, state) for trial, run, state in rows}


def running_trials_by_epoch(database: Path) -> dict[str, int]:
    """trial id -> last epoch logged, for trial runs still in state ``running``."""
    rows = _query(database, "SELECT t.value, MAX(m.step) FROM tags t JOIN tags s ON s.run_uuid = t.run_uuid "
                            "JOIN metrics m ON m.run_uuid = t.run_uuid WHERE t.key = 'trial_id' AND s.key = 'state' "
                            "AND s.value = 'running' AND m.key = 'val_miou' GROUP BY t.value")
    return dict(rows)


def wait_for(condition, driver: Driver, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        driver.tree()
        value = condition()
        if value:
            return value
        driver.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{driver.output()[-4000:]}")
        time.sleep(0.3)


# --- the two searches -------------------------------------------------------------------------

@dataclass
class FaultySearch:
    kind: str
    directory: Path
    database: Path
    search_dir: Path
    first: Driver
    resumed: Driver
    first_code: int
    resumed_code: int
    finished_before: dict[str, tuple[str, str]]  # trial id -> (run id, state) at the fault
    metric_rows_before: dict[str, int]  # run id -> rows of val_miou at the fault
    running_after_fault: list[str] = field(default_factory=list)  # run ids RUNNING once the driver was gone
    crashed_trial: str | None = None
    leftovers_after_kill: dict[int, str] = field(default_factory=dict)  # pid -> command, 2 min after the kill
    lost_trials: list[str] = field(default_factory=list)  # running at the kill, not yet in Tune's snapshot
    output_at_fault: int = 0  # length of the log when the fault came

    @property
    def summary(self) -> dict:
        return json.loads((self.search_dir / "summary.json").read_text())

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.database}"


def metric_rows(database: Path) -> dict[str, int]:
    return dict(_query(database, "SELECT run_uuid, COUNT(*) FROM metrics WHERE key = 'val_miou' GROUP BY run_uuid"))


def running_runs(database: Path) -> list[str]:
    return [row[0] for row in _query(database, "SELECT run_uuid FROM runs WHERE status = 'RUNNING'")]


def snapshot_text(search_dir: Path) -> str:
    """Tune's newest experiment snapshot (it names every trial it knows), or ''."""
    files = sorted(search_dir.glob("experiment_state-*.json"))
    with contextlib.suppress(OSError):
        return files[-1].read_text() if files else ""
    return ""


def worker_of(driver: Driver, trial_id: str) -> list[int]:
    """The Ray worker processes running ``trial_id``: Tune runs a trial in its own working directory."""
    found = []
    for pid in driver.tree() - {driver.process.pid}:
        with contextlib.suppress(OSError):
            if trial_id in os.readlink(f"/proc/{pid}/cwd"):
                found.append(pid)
    return found


def run_faulty_search(kind: str, synthetic_root: Path, directory: Path) -> FaultySearch:
    space = directory / "space.yaml"
    space.write_text(tiny_space(synthetic_root, name="faults", budget={
        "trials": TRIALS, "max_epochs": EPOCHS, "concurrency": 2, "cpus_per_trial": 1, "seed": 0,
        "startup_trials": TRIALS, "grace_period": EPOCHS, "max_failures": 1}))  # no early stopping
    database = directory / "mlflow.db"
    with ray_tmp_dir("segflt") as ray_tmp:
        return fault_and_resume(kind, space, database, directory, script_env(ray_tmp, PYTHONUNBUFFERED="1"))


def fault_and_resume(kind: str, space: Path, database: Path, directory: Path, env: dict[str, str]) -> FaultySearch:
    """Runs the search in ``directory``, brings the fault ``kind`` on it, then resumes it."""
    common = ["--name", kind, "--storage", str(directory / "ray"), "--quiet", "--overlays", "0"]
    log = directory / "tune.log"
    first = Driver([str(space), *common, "--tracking-uri", f"sqlite:///{database}"], env, log, directory)
    resumed = None
    try:
        crashed = None
        if kind == "sigint":
            # a crash: kill the worker of a trial in its second epoch, i.e. once Tune holds the
            # checkpoint of its first (the trainable unlinks report/last.pt when tune.report
            # returns, which it does once the driver has taken the result)
            search_dir = directory / "ray" / kind

            def in_second_epoch():
                return [trial for trial, epoch in running_trials_by_epoch(database).items()
                        if epoch == 1 and (search_dir / f"trial_{trial}" / "checkpoint_000000").is_dir()
                        and not (search_dir / "trials" / trial / "report" / "last.pt").exists()
                        and worker_of(first, trial)]

            crashed = wait_for(in_second_epoch, first, 420, "a trial in its second epoch")[0]
            for pid in worker_of(first, crashed):
                os.kill(pid, signal.SIGKILL)

        def some_finished():
            return {t: v for t, v in trial_states(database).items() if v[1] in FINAL_STATES}

        wait_for(some_finished, first, 420, "a finished trial")
        lost: list[str] = []
        if kind == "sigkill":
            # aim for the moment STACK_NOTES warns about: a trial has started since Tune's last
            # experiment snapshot (a window of about a second), so a hard kill makes Tune forget
            # it; failing that, kill once the last trial is running
            deadline = time.monotonic() + 120
            while first.process.poll() is None and time.monotonic() < deadline:
                states = trial_states(database)
                snapshot = snapshot_text(directory / "ray" / kind)
                lost = [trial for trial, (_, state) in states.items() if state == "running" and trial not in snapshot]
                if lost or (len(states) == TRIALS and any(state == "running" for _, state in states.values())):
                    break
                time.sleep(0.05)
        first.check_alive()  # the fault must come while the search runs
        first.tree()  # remember every process before the fault
        finished_before = some_finished()
        rows_before = metric_rows(database)
        output_at_fault = len(first.output())
        leftovers: dict[int, str] = {}
        if kind == "sigint":
            os.killpg(first.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            first_code = first.wait(240)
        else:
            killed_at = time.monotonic()
            os.kill(first.process.pid, signal.SIGKILL)
            first_code = first.wait(60)
        finished_before = {t: v for t, v in some_finished().items() if t in finished_before or kind == "sigint"}
        rows_before = metric_rows(database) if kind == "sigint" else rows_before
        running_after_fault = running_runs(database)

        resumed = Driver([str(space), "--resume", *common], env, log, directory)
        resumed_code = resumed.wait(600)
        if kind == "sigkill":  # what is left of the killed driver's Ray two minutes on
            while first.leftovers() and time.monotonic() < killed_at + 120:
                time.sleep(1)
            leftovers = first.leftovers()
        return FaultySearch(kind=kind, directory=directory, database=database, search_dir=directory / "ray" / kind,
                            first=first, resumed=resumed, first_code=first_code, resumed_code=resumed_code,
                            finished_before=finished_before, metric_rows_before=rows_before,
                            running_after_fault=running_after_fault, crashed_trial=crashed,
                            leftovers_after_kill=leftovers, lost_trials=lost, output_at_fault=output_at_fault)
    finally:
        for driver in (first, resumed):
            if driver is not None:
                if driver.process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(driver.process.pid, signal.SIGKILL)
                    driver.process.wait()
                driver.kill_leftovers()


@pytest.fixture(scope="module")
def sigint_search(synthetic_root, tmp_path_factory, request) -> Iterator[FaultySearch]:
    with shared_tmp_path(request, tmp_path_factory, "sigint") as directory:
        yield run_faulty_search("sigint", synthetic_root, directory)


@pytest.fixture(scope="module")
def sigkill_search(synthetic_root, tmp_path_factory, request) -> Iterator[FaultySearch]:
    with shared_tmp_path(request, tmp_path_factory, "sigkill") as directory:
        yield run_faulty_search("sigkill", synthetic_root, directory)


@pytest.fixture(params=["sigint", "sigkill"])
def faulty(request) -> FaultySearch:
    return request.getfixturevalue(f"{request.param}_search")


def client_for(search: FaultySearch):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=search.uri)


def newest_searcher_state(search: FaultySearch) -> dict:
    """The OptunaSearch state Tune saved last (one file per session, named by its start time)."""
    return pickle.loads(sorted(search.search_dir.glob("searcher-state-*.pkl"))[-1].read_bytes())


# --- after the resume ---------------------------------------------------------------------------

@pytest.mark.slow
def test_resumed_search_completes_with_every_trial(faulty):
    assert faulty.resumed_code == 0, faulty.resumed.output()[-4000:]
    summary = faulty.summary
    assert not summary["interrupted"], faulty.resumed.output()[-4000:]
    assert len(summary["trials"]) == TRIALS
    assert all(t["state"] in FINAL_STATES for t in summary["trials"]), summary["trials"]
    assert summary["best"] is not None


@pytest.mark.slow
def test_trials_finished_before_the_fault_are_kept_not_rerun(faulty):
    assert faulty.finished_before, "the fault came before any trial finished"
    after = {t["trial_id"]: t for t in faulty.summary["trials"]}
    rows_after = metric_rows(faulty.database)
    for trial_id, (run_id, state) in faulty.finished_before.items():
        assert after[trial_id]["run_id"] == run_id and after[trial_id]["state"] == state
        assert rows_after.get(run_id) == faulty.metric_rows_before.get(run_id), f"trial {trial_id} was rerun"


def child_runs(search: FaultySearch) -> list:
    from seg.tuning.runs import trial_runs

    summary = search.summary
    return trial_runs(summary["experiment_id"], summary["parent_run_id"], client_for(search))


@pytest.mark.slow
def test_one_child_run_per_trial_and_none_left_running(faulty):
    client = client_for(faulty)
    summary = faulty.summary
    by_trial = {t["trial_id"]: t for t in summary["trials"]}
    children = [run for run in child_runs(faulty) if run.data.tags["trial_id"] in by_trial]
    assert sorted(run.data.tags["trial_id"] for run in children) == sorted(by_trial)  # one each, no duplicate
    for run in children:
        assert run.info.run_id == by_trial[run.data.tags["trial_id"]]["run_id"]
        assert run.data.tags["state"] == by_trial[run.data.tags["trial_id"]]["state"]
    assert running_runs(faulty.database) == []
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["state"] == "completed"


@pytest.mark.slow
def test_optuna_study_holds_the_same_trials_as_tune(faulty):
    from optuna.trial import TrialState

    from seg.tuning.trainable import NOT_RETRIED

    summary = faulty.summary
    searcher = newest_searcher_state(faulty)
    study, ot_trials = searcher["_ot_study"], searcher["_ot_trials"]
    tune_trials = {t["trial_id"]: t for t in summary["trials"]}
    assert set(ot_trials) == set(tune_trials)
    assert len(study.trials) == len(tune_trials), [t.state for t in study.trials]
    expected_state = {"completed": TrialState.COMPLETE, "early_stopped": TrialState.PRUNED,
                      "failed": TrialState.FAIL}
    for trial_id, ot_trial in ot_trials.items():
        frozen = study.trials[ot_trial.number]
        trial = tune_trials[trial_id]
        expected = expected_state[trial["state"]]
        if trial["state"] == "failed" and (trial.get("failure_reason") or "").startswith(
                tuple(error.__name__ for error in NOT_RETRIED)):
            expected = TrialState.PRUNED  # failed because of its parameters: TPE must avoid them
        assert frozen.state == expected, (trial_id, frozen.state, trial["state"])
        assert frozen.params.keys() == trial["params"].keys()
        for key, value in frozen.params.items():
            assert value == pytest.approx(trial["params"][key]), (trial_id, key)
        if frozen.state == TrialState.COMPLETE:
            assert frozen.value == pytest.approx(trial["best"])


# --- fault specifics ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sigint", "sigkill"])
def test_no_child_run_without_a_tune_trial(kind, request):
    # a hard kill makes Tune forget a trial started after its last snapshot (the searcher,
    # restored from the same snapshot, suggests its values again under a new id): the
    # forgotten trial's run must not stay among the search's trials
    search = request.getfixturevalue(f"{kind}_search")
    tune_trials = {t["trial_id"] for t in search.summary["trials"]}
    if kind == "sigkill" and all(trial in tune_trials for trial in search.lost_trials):
        pytest.skip("the kill did not come between a trial's start and Tune's next snapshot")
    orphans = {run.data.tags["trial_id"]: run.data.tags.get("state") for run in child_runs(search)
               if run.data.tags["trial_id"] not in tune_trials}
    assert orphans == {}, f"child runs of trials Tune does not know (lost: {search.lost_trials})"


@pytest.mark.slow
def test_ctrl_c_stops_the_search_cleanly(sigint_search):
    after = sigint_search.first.output()[sigint_search.output_at_fault:]
    assert "Traceback" not in after, after[-4000:]
    assert "--resume" in after  # the command that continues it is printed
    assert sigint_search.running_after_fault == []  # every run closed by the driver itself
    # Tune handles the SIGINT itself, so run_search returns: the exit status must still say
    # "interrupted", or `tune.py ... && retrain.py` would go on with a partial search
    assert sigint_search.first_code == 130


@pytest.mark.slow
def test_crashed_trial_is_retried_from_its_checkpoint(sigint_search):
    client = client_for(sigint_search)
    summary = sigint_search.summary
    trial = next(t for t in summary["trials"] if t["trial_id"] == sigint_search.crashed_trial)
    assert trial["state"] == "completed", trial  # one crash is within max_failures
    run = client.get_run(trial["run_id"])
    assert run.data.tags.get("retries") == "1", run.data.tags
    assert run.data.tags.get("last_error"), run.data.tags  # the failure is recorded
    assert "seg.resumed_from" in run.data.tags  # from its checkpoint, not from scratch
    history = client.get_metric_history(run.info.run_id, "val_miou")
    by_step: dict[int, set[float]] = {}
    for metric in history:
        by_step.setdefault(metric.step, set()).add(metric.value)
    # every epoch once (an epoch redone after the crash gives the same value: resuming is exact)
    assert sorted(by_step) == list(range(1, EPOCHS + 1)) and all(len(v) == 1 for v in by_step.values()), by_step


@pytest.mark.slow
def test_killed_driver_leaves_runs_that_the_resume_closes(sigkill_search):
    assert sigkill_search.first_code == -signal.SIGKILL
    assert sigkill_search.running_after_fault, "a SIGKILLed driver cannot close its runs: expected some RUNNING"
    assert running_runs(sigkill_search.database) == []


@pytest.mark.slow
def test_killed_driver_leaves_no_ray_process_for_long(sigkill_search):
    # Ray's gcs_server, raylet and workers die with the driver (they share its fate); its
    # dashboard and runtime-env agents, orphaned, notice the raylet is gone within about a
    # minute and exit. Two minutes on, nothing of the killed driver's Ray may be left.
    assert sigkill_search.leftovers_after_kill == {}


@pytest.mark.slow
def test_two_searches_with_one_seed_sample_the_same_first_trials(sigint_search, sigkill_search):
    def first_trials(search: FaultySearch) -> list[dict]:
        order = {trial_id: ot_trial.number for trial_id, ot_trial in newest_searcher_state(search)["_ot_trials"].items()}
        trials = sorted(search.summary["trials"], key=lambda t: order[t["trial_id"]])  # in the order suggested
        return [t["params"] for t in trials[:2]]  # sampled before either search was interrupted

    assert first_trials(sigint_search) == first_trials(sigkill_search)
    assert first_trials(sigint_search)[0] != first_trials(sigint_search)[1]


# --- checkpoints ---------------------------------------------------------------------------------

SAVE_FOREVER = textwrap.dedent("""
    import sys, torch
    from seg.checkpoint import save_checkpoint
    path = sys.argv[1]
    base = {"optimizer": {}, "scheduler": {}, "config": {}}
    save_checkpoint(path, {**base, "model": {"w": torch.zeros(4)}, "epoch": 1})
    print("READY", flush=True)
    big = torch.ones(32 * 1024 * 1024)  # 128 MB: each save takes a while
    epoch = 2
    while True:
        save_checkpoint(path, {**base, "model": {"w": big}, "epoch": epoch})
        epoch += 1
""")


def test_kill_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    from seg.checkpoint import load_checkpoint

    path = tmp_path / "last.pt"
    process = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 120
        while True:  # kill it in the middle of writing a temporary file
            partial = [p for p in tmp_path.glob(".last.pt.*.tmp") if p.stat().st_size > 0] if process.poll() is None \
                else []
            if partial:
                os.kill(process.pid, signal.SIGKILL)
                break
            assert process.poll() is None and time.monotonic() < deadline, "never caught a save in progress"
            time.sleep(0.001)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    state = load_checkpoint(path)
    if state["epoch"] == 1:
        assert torch.equal(state["model"]["w"], torch.zeros(4))
    else:  # a complete earlier save, never a mixture
        assert state["model"]["w"].numel() == 32 * 1024 * 1024 and bool(state["model"]["w"].eq(1).all())


def _damage(path: Path, how: str) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if how == "truncated" else os.urandom(len(data)))
    return path


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_evaluate_names_a_damaged_checkpoint(tmp_path, tiny_config, synthetic_root, capsys, how):
    checkpoint = _damage(model_checkpoint(tmp_path / "best.pt", tiny_config), how)
    code = load_script("evaluate").main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "eval"),
                                         "--data-root", str(synthetic_root), "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"error: {checkpoint}") and "Traceback" not in error, error
    assert len(error.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One tracking store for the module's train.py runs (creating its tables takes seconds)."""
    return create_tracking_store(tmp_path_factory.mktemp("store") / "mlflow.db")


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_train_resume_names_a_damaged_checkpoint(tmp_path, tiny_config, capsys, how, store_uri,
                                                 restore_process_state):
    checkpoint = _damage(model_checkpoint(tmp_path / "last.pt", tiny_config), how)
    config = write_config(tiny_config, tmp_path / "tiny.yaml")
    code = load_script("train").main([str(config), "--resume", str(checkpoint), "--out-dir", str(tmp_path / "out"),
                                      "--tracking-uri", store_uri])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"error: {checkpoint}") and "Traceback" not in error, error
    assert "unpickl" not in error.lower() and len(error.strip().splitlines()) == 1


# --- the tracking store under load ---------------------------------------------------------------

WRITERS = textwrap.dedent("""
    import os, sys, traceback
    from seg.tuning import tracking

    uri, writers, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def in_child(body):
        pid = os.fork()
        if pid == 0:  # no MLflow store exists in the parent: each child opens its own connections
            try:
                body()
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        return pid

    def create():
        tracking.configure_mlflow(uri)
        tracking.get_or_create_experiment("load")

    def write(index):
        tracking.configure_mlflow(uri)
        experiment = tracking.get_or_create_experiment("load")
        run_id = tracking.start_run(experiment, f"writer-{index}", tags={"writer": index})
        with tracking.run_context(run_id):
            tracking.log_tags(run_id, {"phase": "logging"})
            for step in range(steps):
                tracking.log_metrics(run_id, {"a": step, "b": -step}, step=step)

    _, status = os.waitpid(in_child(create), 0)  # the schema, as the search driver creates it first
    assert status == 0
    pids = [in_child(lambda index=index: write(index)) for index in range(writers)]
    failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in pids)
    sys.exit(failed)
""")


def test_many_processes_log_to_one_sqlite_store_without_losing_metrics(tmp_path):
    writers, steps = 8, 20
    database = tmp_path / "mlflow.db"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", WRITERS, f"sqlite:///{database}", str(writers), str(steps)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "database is locked" not in done.stderr
    rows = dict(_query(database, "SELECT key, COUNT(*) FROM metrics GROUP BY key"))
    assert rows == {"a": writers * steps, "b": writers * steps}
    statuses = _query(database, "SELECT status, COUNT(*) FROM runs GROUP BY status")
    assert statuses == [("FINISHED", writers)]
    latest = _query(database, "SELECT key, value, step FROM latest_metrics WHERE key = 'a'")
    assert len(latest) == writers and all(step == steps - 1 and value == steps - 1 for _, value, step in latest)
