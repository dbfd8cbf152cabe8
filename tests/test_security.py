"""Security: untrusted files cannot run code, servers stay on loopback, names cannot escape their directory.

- A checkpoint or weights file holding a pickled object whose ``__reduce__`` would
  create a marker file is refused with a clear error by every command that loads one,
  and the marker never appears (``seg.checkpoint.load_checkpoint`` itself is covered by
  test_checkpoint.py::test_malicious_pickle_is_refused_without_running_it).
- The MLflow UI of ``scripts/ui.py`` and the local Ray of ``run_search`` listen on
  127.0.0.1 only (the cluster script's services: test_cluster.py::
  test_services_are_up_on_loopback_only).
- Directory names derived from ``--run-name``, ``--name`` and search names stored in
  MLflow stay inside their output directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import (LR, REPO, SCRIPTS, Payload, create_tracking_store, decode_address, descendants,
                     listening_sockets, load_script, script_env, tiny_space, write_config)
from seg.config import Config
from seg.errors import CheckpointError, ConfigError
from seg.paths import check_name, safe_child

pytest_plugins = ["search_fixture"]


# --- malicious pickles ---------------------------------------------------------------------

def malicious_checkpoint(path: Path, marker: Path, cfg: Config) -> Path:
    """A file shaped like a real training checkpoint, with the payload hidden in its metrics."""
    from seg.models import build_model_from_config

    model = build_model_from_config(cfg.model)
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": None, "epoch": 1,
                "config": cfg.to_dict(), "metrics": {"val_miou": Payload(marker)}, "best_miou": 0.1,
                "version": 1}, path)
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "the malicious pickle ran"


def test_evaluate_checkpoint_refuses_a_malicious_pickle(tmp_path, marker, tiny_config, synthetic_root, capsys):
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker, tiny_config)
    code = load_script("evaluate").main(["--checkpoint", str(evil), "--out", str(tmp_path / "eval"),
                                         "--data-root", str(synthetic_root), "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.startswith("error: ") and str(evil) in error and "could run code" in error
    assert "Traceback" not in error and not (tmp_path / "eval" / "metrics.json").exists()


def test_model_weights_file_refuses_a_malicious_pickle(tmp_path, marker):
    from seg.models import build_model

    evil = tmp_path / "backbone.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.extra": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="backbone.pth"):
        build_model("fcn32s", backbone="resnet18", weights=evil)


def test_model_from_checkpoint_refuses_a_malicious_pickle(tmp_path, marker, tiny_config):
    # the path of overlays, the retrain registry check and every `best.pt` reader
    from seg.checkpoint import model_from_checkpoint

    evil = malicious_checkpoint(tmp_path / "best.pt", marker, tiny_config)
    with pytest.raises(CheckpointError, match="best.pt"):
        model_from_checkpoint(evil)


def test_train_resume_refuses_a_malicious_pickle(tmp_path, marker, tiny_config, capsys, restore_process_state):
    # the trainable resumes a retried or restored trial through the same fit(resume=...)
    config = write_config(tiny_config, tmp_path / "tiny.yaml")
    evil = malicious_checkpoint(tmp_path / "last.pt", marker, tiny_config)
    code = load_script("train").main([str(config), "--resume", str(evil), "--out-dir", str(tmp_path / "out"),
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.startswith("error: ") and str(evil) in error and "Traceback" not in error
    assert not (tmp_path / "out" / "best.pt").exists()


# --- servers on loopback ---------------------------------------------------------------------

def _is_loopback(address: str) -> bool:
    address = address.removeprefix("::ffff:")  # an IPv4-mapped IPv6 address
    return address.startswith("127.") or address == "::1"


def test_proc_net_decoding():
    assert decode_address("0100007F") == "127.0.0.1"
    assert decode_address("00000000") == "0.0.0.0"
    assert decode_address("0000000000000000FFFF00000100007F") == "::ffff:127.0.0.1"
    assert _is_loopback(decode_address("0000000000000000FFFF00000100007F"))
    assert decode_address("00000000000000000000000001000000") == "::1"
    assert decode_address("00000000000000000000000000000000") == "::"


@pytest.mark.slow
def test_mlflow_ui_listens_on_loopback_only(tmp_path):
    uri = create_tracking_store(tmp_path / "mlflow.db")  # ui.py refuses a missing one
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(SCRIPTS / "ui.py"), "--port", "0"], stdout=out,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while "MLflow UI: " not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        url = next(line for line in log.read_text().splitlines() if line.startswith("MLflow UI: ")).split()[2]
        port = int(url.rsplit(":", 1)[1])
        assert url.startswith("http://127.0.0.1:")
        tree = descendants(process.pid) | {process.pid}
        sockets = listening_sockets(tree)
        assert port in {p for _, _, p in sockets}, sockets
        assert all(_is_loopback(address) for _, address, _ in sockets), sockets
    finally:
        tree |= descendants(process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)  # ui.py stops its server on SIGTERM
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pid in tree:  # whatever did not stop with it (only processes this test started)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


RAY_PROBE = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from helpers import descendants, listening_sockets
    import ray
    from seg.tuning.search import start_ray
    start_ray(num_cpus=1)
    ray.get(ray.remote(lambda: 0).remote())  # a worker process too
    sockets = listening_sockets(descendants(os.getpid()) | {os.getpid()})
    node_ip = ray.util.get_node_ip_address()
    ray.shutdown()
    print("RESULT " + json.dumps({"sockets": sockets, "node_ip": node_ip}))
""")


@pytest.mark.slow
def test_local_ray_of_a_search_listens_on_loopback_only(tmp_path, private_ray_tmp):
    # without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray on Linux swaps 127.0.0.1 for the
    # machine's outward address and its gRPC servers listen on every interface
    done = subprocess.run([sys.executable, "-c", RAY_PROBE, str(Path(__file__).parent)], capture_output=True,
                          text=True, timeout=240, env=script_env(private_ray_tmp), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["sockets"], "found no listening socket of Ray's processes"
    exposed = [socket for socket in result["sockets"] if not _is_loopback(socket[1])]
    assert not exposed and result["node_ip"] == "127.0.0.1", result


def test_local_ray_of_a_search_does_not_join_another_cluster(monkeypatch):
    import ray
    from ray._private import services

    from seg.tuning import search

    calls = []

    def fake_init(*args, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # e.g. left in the shell by `cluster.py env`
    with pytest.raises(RuntimeError, match="stop here"):
        search.start_ray(num_cpus=1)
    # what Ray makes of the address it is given: None means "start a new local instance"
    assert services.canonicalize_bootstrap_address(calls[0].get("address")) is None


# --- names that would leave their directory --------------------------------------------------

BAD_NAMES = ["", " ", ".", "..", "../escape", "a/b", "/tmp/abs", "a\\b", "x\0y", "tab\tname", " pad", "n" * 256]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_safe_child_refuses_names_that_are_not_one_plain_component(tmp_path, name):
    with pytest.raises(ConfigError, match="--run-name"):
        safe_child(tmp_path, name, "--run-name")


@pytest.mark.parametrize("name", ["quick", "quick-2", "lr_1e-3", "a.b", "...", "résumé", "n" * 255])
def test_safe_child_keeps_plain_names_inside_the_base(tmp_path, name):
    child = safe_child(tmp_path, name)
    assert child.parent == tmp_path and child.name == name
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", "", "a\\b", "x\0y"])
def test_train_run_name_cannot_leave_outputs(name):
    # the subprocess path (exit 2, nothing logged) is test_train_script.py::test_bad_arguments_fail_before_anything_is_logged
    train = load_script("train")
    with pytest.raises(ConfigError, match="--run-name"):
        train.output_dir(name, None)
    assert train.output_dir("plain", None) == train.OUTPUTS.resolve() / "plain"


@pytest.mark.parametrize("name", ["../escaped", "ABSOLUTE"])
def test_tune_name_cannot_leave_the_storage_directory(tmp_path, synthetic_root, monkeypatch, capsys, name,
                                                      restore_process_state):
    from seg.tuning import search

    name = str(tmp_path / "escaped") if name == "ABSOLUTE" else name
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was about to start for a search that should have been refused")

    monkeypatch.setattr(search, "start_ray", no_ray)
    space = tmp_path / "tiny.yaml"
    space.write_text(tiny_space(synthetic_root, space=LR, budget={"trials": 1, "max_epochs": 1, "concurrency": 1}))
    storage = tmp_path / "storage"
    code = load_script("tune").main([str(space), "--name", name, "--storage", str(storage), "--tracking-uri",
                                     f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet"])
    error = capsys.readouterr().err
    assert code == 2 and "--name" in error and "Traceback" not in error, error
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def escaping_search(tmp_path, fake_search, restore_process_state) -> tuple[str, str]:
    """A search in a private store whose parent run is named ``../../escaped`` (runs can be renamed in the UI)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = fake_search(uri, "tiny", [[0.1, 0.2], [0.3, 0.4]])
    MlflowClient(uri).set_tag(parent, "mlflow.runName", "../../escaped")
    return uri, parent


def _inside(path: Path, base: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(base))


def test_report_default_directory_stays_in_experiments(escaping_search, monkeypatch, capsys):
    from seg.tuning import report

    uri, parent = escaping_search
    written = []
    monkeypatch.setattr(report, "write_report", lambda search, out, *a, **k: written.append(Path(out)) or Path(out))
    code = load_script("report").main(["--tracking-uri", uri, "--search", parent, "--no-log"])
    error = capsys.readouterr().err
    if code == 2:  # refused: the message says why
        assert "escaped" in error and "Traceback" not in error
    assert code == 2 or all(_inside(path, REPO / "experiments") for path in written), written


def test_retrain_default_directories_stay_in_the_repository(escaping_search, monkeypatch, capsys):
    from seg.tuning import retrain

    uri, parent = escaping_search
    used = []

    def no_training(client, search, trials, *, work_dir, report_dir, **kwargs):
        used.extend([Path(work_dir), Path(report_dir)])
        raise AssertionError("training was about to start in an unchecked directory")

    monkeypatch.setattr(retrain, "retrain", no_training)
    try:
        code = load_script("retrain").main(["--tracking-uri", uri, "--search", parent, "--no-register"])
    except AssertionError:
        code = None
    error = capsys.readouterr().err
    if code == 2:
        assert "escaped" in error and "Traceback" not in error
    assert code == 2 or (len(used) == 2 and _inside(used[0], REPO / "outputs" / "retrain")
                         and _inside(used[1], REPO / "experiments")), used
