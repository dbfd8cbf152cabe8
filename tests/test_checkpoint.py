"""Checkpoints: round trip, atomic writes, refusal of truncated, corrupt and malicious files."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import seg.checkpoint as checkpoint_module
from helpers import Payload
from seg.checkpoint import (capture_rng_state, copy_checkpoint, load_checkpoint, restore_rng_state,
                            save_checkpoint)
from seg.config import Config
from seg.errors import CheckpointError


def make_state(value: float = 1.0) -> dict:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": 3},
            "scaler": None, "epoch": 2, "config": Config().to_dict(), "metrics": {"val_miou": 0.5},
            "best_miou": value / 2, "rng": capture_rng_state(torch.Generator().manual_seed(1))}


def test_round_trip_keeps_every_entry(tmp_path: Path) -> None:
    state = make_state()
    path = save_checkpoint(tmp_path / "sub" / "last.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["version"] == checkpoint_module.CHECKPOINT_VERSION
    assert loaded["epoch"] == 2 and loaded["best_miou"] == 0.5 and loaded["scaler"] is None
    assert loaded["config"] == Config().to_dict()
    for key, tensor in state["model"].items():
        assert torch.equal(loaded["model"][key], tensor)
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"],
                       state["optimizer"]["state"][0]["momentum_buffer"])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_rng_state_survives_a_weights_only_round_trip(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(7)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()
    state = make_state()
    state["rng"] = capture_rng_state(generator)
    expected = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1),
                torch.rand(3, generator=generator))
    loaded = load_checkpoint(save_checkpoint(tmp_path / "c.pt", state))
    restore_rng_state(loaded["rng"], generator)
    again = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1),
             torch.rand(3, generator=generator))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:4] == again[2:4] and torch.equal(expected[4], again[4])


@pytest.mark.parametrize("failing", ["os.replace", "torch.save"])
def test_failed_save_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     failing: str) -> None:
    path = save_checkpoint(tmp_path / "last.pt", make_state(1.0))
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    if failing == "os.replace":
        monkeypatch.setattr(checkpoint_module.os, "replace", fail)
    else:
        monkeypatch.setattr(checkpoint_module.torch, "save", fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, make_state(2.0))
    assert path.read_bytes() == before
    assert load_checkpoint(path)["best_miou"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_copy_is_unaffected_by_later_saves(tmp_path: Path) -> None:
    last = save_checkpoint(tmp_path / "last.pt", make_state(1.0))
    best = copy_checkpoint(last, tmp_path / "best.pt")
    save_checkpoint(last, make_state(2.0))
    assert load_checkpoint(best)["best_miou"] == 0.5
    assert load_checkpoint(last)["best_miou"] == 1.0


def test_truncated_file_is_a_checkpoint_error_naming_it(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last.pt", make_state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n" * 10, os.urandom(4096)])
def test_corrupt_file_is_a_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = {**make_state(), "metrics": Payload(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as file:
            pickle.dump(state, file, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pt") as error:
        load_checkpoint(path)
    assert not marker.exists()
    assert "could run code" in str(error.value)


def test_missing_file_and_foreign_dict_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")  # a bare state dict
    with pytest.raises(CheckpointError, match="expected keys"):
        load_checkpoint(tmp_path / "weights.pt")


def test_newer_version_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", {**make_state(), "version": 99})
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)
