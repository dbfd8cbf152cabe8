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
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

from seg.config import Config
from seg.errors import CheckpointError, ConfigError
from seg.paths import check_name, safe_child

pytest_plugins = ["search_fixture"]

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, to call its ``main()`` in this process."""
    spec = importlib.util.spec_from_file_location(f"security_{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_process_state():
    """Scripts' ``main()`` set signal handlers and MLflow's URI process-wide: put them back."""
    import mlflow

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)


# --- malicious pickles ---------------------------------------------------------------------

class Payload:
    """Unpickles to ``open(marker, "w")``: creates the marker file if it is ever run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


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
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config.to_dict()))
    evil = malicious_checkpoint(tmp_path / "last.pt", marker, tiny_config)
    code = load_script("train").main([str(config), "--resume", str(evil), "--out-dir", str(tmp_path / "out"),
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert error.startswith("error: ") and str(evil) in error and "Traceback" not in error
    assert not (tmp_path / "out" / "best.pt").exists()


# --- servers on loopback ---------------------------------------------------------------------

def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def listening_sockets(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket held by ``pids``, from /proc/net."""
    inodes = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes[target[8:-1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                found.append((inodes[inode], _decode_address(address), int(port, 16)))
    return found


def _decode_address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word in host order
    if len(words) == 4:
        return ".".join(map(str, words))
    if words[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped IPv6
        return ".".join(map(str, words[12:]))
    import ipaddress

    return str(ipaddress.IPv6Address(words))


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


def test_proc_net_decoding():
    assert _decode_address("0100007F") == "127.0.0.1"
    assert _decode_address("00000000") == "0.0.0.0"
    assert _decode_address("0000000000000000FFFF00000100007F") == "127.0.0.1"
    assert _decode_address("00000000000000000000000001000000") == "::1"
    assert _decode_address("00000000000000000000000000000000") == "::"


def test_mlflow_ui_listens_on_loopback_only(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the store: ui.py refuses a missing one
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
    from test_security import descendants, listening_sockets
    import ray
    from seg.tuning.search import start_ray
    start_ray(num_cpus=1)
    ray.get(ray.remote(lambda: 0).remote())  # a worker process too
    sockets = listening_sockets(descendants(os.getpid()) | {os.getpid()})
    node_ip = ray.util.get_node_ip_address()
    ray.shutdown()
    print("RESULT " + json.dumps({"sockets": sockets, "node_ip": node_ip}))
""")


def test_local_ray_of_a_search_listens_on_loopback_only(tmp_path):
    # without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray on Linux swaps 127.0.0.1 for the
    # machine's outward address and its gRPC servers listen on every interface
    # a private Ray temp dir: this Ray is ours alone (short path: Ray's socket names have a length limit)
    ray_tmp = Path(tempfile.mkdtemp(prefix="segsec", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-c", RAY_PROBE, str(Path(__file__).parent)], capture_output=True,
                              text=True, timeout=240, env=env, cwd=tmp_path)
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
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


TINY_SPACE = """\
name: tiny
fixed:
  data.root: {root}
  data.crop_size: [64, 128]
  data.scale_range: [1.0, 1.0]
  data.batch_size: 2
  model.arch: fcn32s
  model.backbone: resnet18
  train.max_steps_per_epoch: 1
space:
  optim.lr: {{loguniform: [1.0e-3, 1.0e-1]}}
budget: {{trials: 1, max_epochs: 1, concurrency: 1}}
"""


@pytest.mark.parametrize("name", ["../escaped", "ABSOLUTE"])
def test_tune_name_cannot_leave_the_storage_directory(tmp_path, synthetic_root, monkeypatch, capsys, name,
                                                      restore_process_state):
    from seg.tuning import search

    name = str(tmp_path / "escaped") if name == "ABSOLUTE" else name
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was about to start for a search that should have been refused")

    monkeypatch.setattr(search, "start_ray", no_ray)
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE.format(root=synthetic_root))
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
