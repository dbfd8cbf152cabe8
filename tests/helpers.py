"""Plain helpers shared by several test modules (``from helpers import ...``); the shared
fixtures are in conftest.py, the shared searches in search_fixture.py.

- the commands: import ``scripts/<name>.py`` to call its ``main()``; the environment to
  run one in a subprocess with a Ray of its own;
- inputs: tiny search spaces, config files, checkpoints, a malicious pickle, a loss that
  diverges;
- MLflow: a store, a run's artifacts, the tracking URI the commands set process-wide;
- a module's or session's temporary directory, deleted when it is done with;
- what runs below a process and which sockets it listens on (from /proc).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
import yaml
from torch import nn

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


# --- the commands ------------------------------------------------------------------------------

def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a new module, to call its ``main()`` in this process."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def ray_tmp_dir(prefix: str = "segray") -> Iterator[Path]:
    """A ``RAY_TMPDIR`` of its own for a subprocess, removed afterwards: a Ray started there
    is no other test's. Short and under /tmp: Ray's socket paths have a length limit."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def script_env(ray_tmp: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a command in a subprocess, without its MLflow store or
    Ray address: the command gets the store from its arguments and starts a Ray of its own."""
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {**env, "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0", **extra}


# --- inputs ------------------------------------------------------------------------------------

TINY_FIXED = {  # FCN-32s/ResNet-18 on the synthetic_root images: a few seconds a trial
    "data.crop_size": "[64, 128]",
    "data.scale_range": "[1.0, 1.0]",
    "data.batch_size": 2,
    "data.eval_batch_size": 3,
    "model.arch": "fcn32s",
    "model.backbone": "resnet18",
    "train.max_steps_per_epoch": 2,
}
LR = {"optim.lr": "{loguniform: [1.0e-3, 1.0e-1]}"}
LR_AND_MOMENTUM = {**LR, "optim.momentum": "{uniform: [0.5, 0.95]}"}


def tiny_space(root: Path | str | None, *, budget: dict, name: str = "tiny", space: dict[str, str] = LR_AND_MOMENTUM,
               fixed: dict | None = None, initial: tuple[str, ...] = (), description: str | None = None) -> str:
    """The YAML text of a search space over :data:`TINY_FIXED` plus ``data.root: root``
    (none when None); ``fixed`` adds or replaces entries (None drops one). ``space`` and
    ``initial`` hold YAML flow text, one line an entry, as the file shows it."""
    entries = {"data.root": root, **TINY_FIXED, **(fixed or {})}
    lines = [f"name: {name}", *([f"description: {description}"] if description else []), "fixed:"]
    lines += [f"  {key}: {value}" for key, value in entries.items() if value is not None]
    lines += ["space:", *(f"  {key}: {value}" for key, value in space.items())]
    if initial:
        lines += ["initial:", *(f"  - {point}" for point in initial)]
    lines += ["budget:", *(f"  {key}: {value}" for key, value in budget.items())]
    return "\n".join(lines) + "\n"


def small_search_space(root: Path | str, *, max_failures: int, description: str | None = None) -> str:
    """4 trials, 2 at a time, at most 2 epochs of 2 steps, ASHA stopping some after epoch 1;
    the first trial is an ``initial`` point with a learning rate of 10, which diverges."""
    return tiny_space(root, description=description,
                      space={"optim.lr": "{loguniform: [1.0e-3, 10.0]}",
                             "optim.momentum": LR_AND_MOMENTUM["optim.momentum"]},
                      initial=("{optim.lr: 10.0, optim.momentum: 0.95}",),
                      budget={"trials": 4, "max_epochs": 2, "concurrency": 2, "cpus_per_trial": 1, "seed": 0,
                              "startup_trials": 4, "grace_period": 1, "reduction_factor": 2,
                              "max_failures": max_failures})


def write_config(cfg, path: Path) -> Path:
    """``cfg`` (a :class:`seg.config.Config`) as the YAML file ``train.py`` reads."""
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def model_checkpoint(path: Path, cfg) -> Path:
    """A valid checkpoint of ``cfg``'s untrained model, as training saves it after epoch 1."""
    from seg.checkpoint import save_checkpoint
    from seg.models import build_model_from_config

    return save_checkpoint(path, {"model": build_model_from_config(cfg.model).state_dict(), "optimizer": {},
                                  "scheduler": {}, "epoch": 1, "config": cfg.to_dict()})


class Payload:
    """Unpickles to ``open(marker, "w")``: creates the marker file if it is ever run, as an
    attacker's checkpoint would run its code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class NanLoss(nn.Module):
    """The real loss times NaN: a loss that has diverged on its first step."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target) * math.nan


def first_image_and_label(root: Path, split: str = "train") -> tuple[Path, Path]:
    """The first image of ``split`` in a data set in the official layout, and its labelIds file."""
    image = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))[0]
    label = root / "gtFine" / split / image.parent.name / image.name.replace("_leftImg8bit", "_gtFine_labelIds")
    return image, label


# --- MLflow ------------------------------------------------------------------------------------

def create_tracking_store(database: Path) -> str:
    """A SQLite MLflow store with its tables (creating them takes seconds); returns its URI."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{database}"
    MlflowClient(uri).search_experiments()
    return uri


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of an MLflow run (``client``: an MlflowClient), subdirectories included."""
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


@contextlib.contextmanager
def restored_tracking_uri() -> Iterator[None]:
    """Puts back ``MLFLOW_TRACKING_URI`` and MLflow's URI, which the commands and
    ``run_search`` set process-wide, so that every test keeps its own store."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        mlflow.set_tracking_uri(before)


# --- temporary directories ---------------------------------------------------------------------

@contextlib.contextmanager
def shared_tmp_path(request, tmp_path_factory, name: str) -> Iterator[Path]:
    """For a module- or session-scoped fixture: ``tmp_path_factory.mktemp(name)``, deleted
    when the fixture is torn down as ``tmp_path_retention_policy`` deletes a test's
    ``tmp_path`` ("failed": unless a test failed meanwhile). A search leaves about 1 GB of
    checkpoints: kept, as mktemp directories are, to the end of the session, they add up."""
    failed = request.session.testsfailed
    path = tmp_path_factory.mktemp(name)
    yield path
    policy = request.config.getini("tmp_path_retention_policy")
    if policy == "none" or (policy == "failed" and request.session.testsfailed == failed):
        shutil.rmtree(path, ignore_errors=True)


# --- processes and sockets, from /proc -----------------------------------------------------------

def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent pid, ...), or None."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]).split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> set[int]:
    """Every live process below ``root`` (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))):
            children.setdefault(int(stat[1]), []).append(int(entry.name))
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
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address, port = local.split(":")
                assert len(address) == width, line
                found.append((inodes[inode], decode_address(address), int(port, 16)))
    return found


def decode_address(hex_address: str) -> str:
    """An address as /proc/net prints it (hex, each 32-bit word in host order), as text;
    an IPv4-mapped IPv6 address keeps its ``::ffff:`` prefix."""
    import ipaddress

    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host (little-endian) order
    if len(words) == 4:
        return ".".join(map(str, words))
    if words[:12] == b"\0" * 10 + b"\xff\xff":
        return "::ffff:" + ".".join(map(str, words[12:]))
    return str(ipaddress.IPv6Address(words))
