"""The memory probe in the search: which configurations are probed, what is refused before
Ray or MLflow start, how ``gpus_per_trial: auto`` is decided, and the budget keys.

There is no GPU here: the CUDA paths run on fake probe results (``probing.run_probe``) and
a fake ``probing.cuda_available``; one test runs the real probe on CPU (a few seconds).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import restored_tracking_uri, tiny_space
from seg.config import Config
from seg.errors import ConfigError
from seg.probe import CUDA_CONTEXT_BYTES, ProbeResult, trials_per_gpu
from seg.tuning import probing, search
from seg.tuning.space import load_space, resolve_gpus_per_trial

GiB = 2**30
MODELS = {"model.arch": "{choice: [fcn32s, fcn8s]}", "model.backbone": "{choice: [resnet18, mobilenet_v3_large]}"}


def space_file(tmp_path: Path, root: Path | None = None, *, space: dict | None = None, fixed: dict | None = None,
               **budget) -> Path:
    path = tmp_path / "probe.yaml"
    budget = {"trials": 2, "max_epochs": 1, "concurrency": 2, "cpus_per_trial": 1, "seed": 0, **budget}
    path.write_text(tiny_space(root, budget=budget, space={"optim.lr": "{loguniform: [1.0e-3, 1.0e-1]}",
                                                           **(space or {})}, fixed=fixed))
    return path


def fake_result(cfg: Config, device: str, *, reserved: int | None = None, fits: bool = True,
                free: int = 80 * GiB, total: int = 80 * GiB) -> ProbeResult:
    cuda = device.startswith("cuda")
    return ProbeResult(arch=cfg.model.arch, backbone=cfg.model.backbone, batch_size=cfg.data.batch_size,
                       crop_size=tuple(cfg.data.crop_size), device="cuda:0" if cuda else "cpu",
                       precision="bf16" if cuda else "fp32", channels_last=cuda, threads=1, fits=fits,
                       peak_bytes=reserved if fits else None, reserved_bytes=reserved if fits else None,
                       step_seconds=0.2 if fits else None, best_step_seconds=0.2 if fits else None,
                       first_step_seconds=1.0 if fits else None, parameters=1000,
                       process_bytes=None if cuda else 300 * 2**20,
                       error=None if fits else "out of memory: CUDA out of memory",
                       device_total_bytes=total if cuda else None, device_free_bytes=free if cuda else None)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """A machine with an 80 GiB GPU whose probe needs ``needs[backbone]`` bytes (None: out of
    memory); returns the list of probed (Config, device) pairs."""
    probed: list[tuple[Config, str]] = []
    needs = {"resnet18": 10 * GiB, "mobilenet_v3_large": 20 * GiB}

    def run_probe(cfg: Config, device: str) -> ProbeResult:
        probed.append((cfg, device))
        need = needs[cfg.model.backbone]
        return fake_result(cfg, device, reserved=need, fits=need is not None)

    monkeypatch.setattr(probing, "cuda_available", lambda: True)
    monkeypatch.setattr(probing, "run_probe", run_probe)
    return probed, needs


def expected_fit(reserved: int, usable: int = 80 * GiB) -> int:
    return math.floor(usable * (1 - probing.HEADROOM) / (reserved + CUDA_CONTEXT_BYTES))


# --- the worst cases -----------------------------------------------------------------------------

def test_worst_cases_are_every_arch_and_backbone_at_the_largest_batch_and_crop(tmp_path):
    space = load_space(space_file(tmp_path, space={
        **MODELS, "data.batch_size": "{int: [2, 6], step: 2}",
        "data.crop_size": "{choice: [[64, 128], [96, 96], [32, 64]]}",  # 8192, 9216, 2048 pixels
        "optim.name": "{choice: [sgd, adam]}", "train.amp": "{choice: [true, false]}"}, fixed={
        "data.crop_size": None, "data.batch_size": None, "model.arch": None, "model.backbone": None}))
    cases = probing.worst_cases(space)
    assert sorted((c.model.arch, c.model.backbone) for c in cases) == sorted(
        (arch, backbone) for arch in ("fcn32s", "fcn8s") for backbone in ("resnet18", "mobilenet_v3_large"))
    for cfg in cases:
        assert cfg.data.batch_size == 6 and cfg.data.crop_size == (96, 96)
        assert cfg.optim.name == "adam" and cfg.train.amp is False  # the hungriest choices
        assert cfg.train.num_threads == space.budget.threads_per_trial  # what a trial runs with


def test_worst_cases_of_fixed_values_and_choices(tmp_path):
    # backbone and batch fixed, arch sampled: one case per arch, no duplicates
    space = load_space(space_file(tmp_path, space={"model.arch": "{choice: [fcn32s, fcn16s, fcn8s]}",
                                                   "data.batch_size": "{choice: [3, 1, 2]}"},
                                  fixed={"model.arch": None, "data.batch_size": None}))
    cases = probing.worst_cases(space)
    assert [c.model.arch for c in cases] == ["fcn32s", "fcn16s", "fcn8s"]
    assert {c.model.backbone for c in cases} == {"resnet18"} and {c.data.batch_size for c in cases} == {3}
    assert {c.data.crop_size for c in cases} == {(64, 128)}  # the fixed crop
    # nothing about the model sampled: one case
    assert len(probing.worst_cases(load_space(space_file(tmp_path)))) == 1


# --- refusals before Ray and MLflow --------------------------------------------------------------

def test_a_combination_that_cannot_fit_is_refused_before_ray_and_mlflow(tmp_path, synthetic_root, fake_gpu,
                                                                          monkeypatch):
    probed, needs = fake_gpu
    needs["mobilenet_v3_large"] = None  # out of memory even alone
    monkeypatch.setattr(search, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    path = space_file(tmp_path, synthetic_root, space=MODELS, fixed={"model.arch": None, "model.backbone": None},
                      gpus_per_trial="auto")
    with restored_tracking_uri(), pytest.raises(ConfigError) as error:
        search.run_search(load_space(path), storage=tmp_path / "ray", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    message = str(error.value)
    assert str(path) in message
    assert "fcn32s/mobilenet_v3_large" in message and "fcn8s/mobilenet_v3_large" in message
    assert "resnet18" not in message, "only the combinations that do not fit are named"
    assert "data.batch_size 2" in message and "data.crop_size [64, 128]" in message
    assert "ran out of memory" in message and "80.00 GiB available" in message
    assert "drop mobilenet_v3_large from model.backbone" in message and "lower" in message.lower()
    assert len(probed) == 4 and {device for _, device in probed} == {"cuda"}
    assert not (tmp_path / "m.db").exists(), "no MLflow run (nor store) before the check"
    assert not (tmp_path / "ray").exists()


def test_too_little_ram_for_the_concurrent_trials_is_refused_on_cpu(tmp_path, synthetic_root, monkeypatch):
    monkeypatch.setattr(probing, "run_probe", lambda cfg, device: fake_result(cfg, device, reserved=GiB))
    monkeypatch.setattr(probing, "available_host_memory", lambda: 2 * GiB)  # one trial fits, two do not
    monkeypatch.setattr(search, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    path = space_file(tmp_path, synthetic_root, probe="true", concurrency=2)
    with restored_tracking_uri(), pytest.raises(ConfigError) as error:
        search.run_search(load_space(path), storage=tmp_path / "ray", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    message = str(error.value)
    assert str(path) in message and "budget.concurrency" in message and "only 1 fit" in message
    assert "fcn32s/resnet18 at data.batch_size 2 and data.crop_size [64, 128]" in message
    assert not (tmp_path / "m.db").exists()
    # alone it fits: concurrency 1 passes, and the probe was on CPU
    space, report = probing.check_memory(load_space(path, overrides={"concurrency": 1}))
    assert report.device == "cpu" and report.trials_at_once == 1 and space.budget.gpus_per_trial == 0


def test_results_are_logged_with_the_parent_run(tmp_path, synthetic_root, fake_gpu, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(search, "start_ray", stop)  # the parent run exists by then; no trial is needed
    path = space_file(tmp_path, synthetic_root, space=MODELS, fixed={"model.arch": None, "model.backbone": None},
                      gpus_per_trial="auto", concurrency=8)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with restored_tracking_uri(), pytest.raises(Stop):
        search.run_search(load_space(path), storage=tmp_path / "ray", tracking_uri=uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    (parent,) = client.search_runs([experiment.experiment_id])
    fit = expected_fit(20 * GiB)
    assert float(parent.data.params["budget.gpus_per_trial"]) == pytest.approx(1 / fit)
    report = json.loads(Path(client.download_artifacts(parent.info.run_id, search.PROBE_FILE,
                                                       str(tmp_path))).read_text())
    assert report["gpus_per_trial_setting"] == "auto" and report["trials_at_once"] == fit
    assert len(report["results"]) == 4 and {r["batch_size"] for r in report["results"]} == {2}
    record = json.loads((tmp_path / "ray" / "tiny" / search.SEARCH_RECORD).read_text())
    assert record["budget"]["gpus_per_trial"] == pytest.approx(1 / fit), "--resume gets the decided number"


# --- gpus_per_trial: auto ------------------------------------------------------------------------

def test_auto_shares_the_gpu_as_far_as_the_largest_trial_fits(tmp_path, fake_gpu, monkeypatch):
    probed, needs = fake_gpu
    path = space_file(tmp_path, space=MODELS, fixed={"model.arch": None, "model.backbone": None},
                      gpus_per_trial="auto", cpus_per_trial=3, concurrency=8)
    loaded = load_space(path)
    assert loaded.budget.gpus_per_trial == "auto" and loaded.base_config.train.device == "auto"
    space, report = probing.check_memory(loaded)
    fit = expected_fit(needs["mobilenet_v3_large"])  # the larger trial decides
    assert fit == min(trials_per_gpu(fake_result(cfg, "cuda", reserved=needs[cfg.model.backbone]), 80 * GiB)
                      for cfg, _ in probed)
    assert 1 < fit < 8
    assert space.budget.gpus_per_trial == pytest.approx(1 / fit)
    assert report.trials_at_once == fit and report.device == "cuda" and len(report.results) == 4
    # the per-trial settings follow the number: a GPU trial, loader workers beside its thread
    assert space.base_config.train.device == "cuda" and space.base_config.data.num_workers == 2

    # capped by the concurrency: sharing beyond the trials that run at once buys nothing
    space, report = probing.check_memory(load_space(path, overrides={"concurrency": 2}))
    assert space.budget.gpus_per_trial == 0.5 and report.trials_at_once == fit

    # what was free, not the device's size, is what the trials get (another process holds the rest)
    monkeypatch.setattr(probing, "run_probe", lambda cfg, device: fake_result(
        cfg, device, reserved=needs[cfg.model.backbone], free=40 * GiB, total=80 * GiB))
    space, _ = probing.check_memory(loaded)
    usable = 40 * GiB + CUDA_CONTEXT_BYTES
    assert space.budget.gpus_per_trial == pytest.approx(1 / expected_fit(needs["mobilenet_v3_large"], usable))


def test_a_fraction_set_by_hand_is_checked(tmp_path, fake_gpu):
    _, needs = fake_gpu
    fit = expected_fit(needs["mobilenet_v3_large"])
    too_small = 1 / (fit + 1)
    path = space_file(tmp_path, space=MODELS, fixed={"model.arch": None, "model.backbone": None},
                      gpus_per_trial=too_small, concurrency=fit + 1)
    with pytest.raises(ConfigError) as error:
        probing.check_memory(load_space(path))
    message = str(error.value)
    assert "budget.gpus_per_trial" in message and f"only {fit} of" in message and str(path) in message
    assert f"gpus_per_trial: {1 / fit:.4g}" in message
    # the same fraction with fewer trials at once than it allows per GPU: fits
    space, report = probing.check_memory(load_space(path, overrides={"concurrency": fit}))
    assert space.budget.gpus_per_trial == pytest.approx(too_small) and report.trials_at_once == fit
    space, _ = probing.check_memory(load_space(path, overrides={"gpus_per_trial": 1 / fit}))
    assert space.budget.gpus_per_trial == pytest.approx(1 / fit)


def test_auto_without_a_gpu_runs_cpu_trials_and_probe_false_probes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(probing, "run_probe", lambda cfg, device: pytest.fail("probed"))
    monkeypatch.setattr(probing, "cuda_available", lambda: False)
    path = space_file(tmp_path, gpus_per_trial="auto", cpus_per_trial=3)
    space, report = probing.check_memory(load_space(path))  # probe: auto is off on CPU
    assert report is None and space.budget.gpus_per_trial == 0.0
    assert space.base_config.train.device == "cpu" and space.base_config.data.num_workers == 0
    # --set keys are the user's: resolving leaves them alone
    space, _ = probing.check_memory(load_space(path, runtime={"data.num_workers": 1}))
    assert space.base_config.data.num_workers == 1
    with pytest.raises(ConfigError, match="--address"):
        probing.check_memory(load_space(path), address="auto")
    # on a GPU machine, probe: false gives a whole GPU to each trial, unprobed
    monkeypatch.setattr(probing, "cuda_available", lambda: True)
    space, report = probing.check_memory(load_space(path, overrides={"probe": False}))
    assert report is None and space.budget.gpus_per_trial == 1.0 and space.base_config.train.device == "cuda"
    with pytest.raises(ValueError):
        resolve_gpus_per_trial(space, 0.5)  # already a number


def test_a_probe_that_fails_names_the_file_and_the_way_out(tmp_path, monkeypatch):
    def crash(cfg, device):
        raise RuntimeError(f"probe of {cfg.model.arch}/{cfg.model.backbone} failed: CUDA error: unknown error")

    monkeypatch.setattr(probing, "run_probe", crash)
    path = space_file(tmp_path, probe="true")
    with pytest.raises(ConfigError) as error:
        probing.check_memory(load_space(path))
    assert str(path) in str(error.value) and "CUDA error" in str(error.value)
    assert "budget.probe: false" in str(error.value)


def test_probe_true_on_cpu_with_a_real_probe(tmp_path):
    # FCN-32s/ResNet-18, batch 2 at 64x128: one step in a fresh process
    space, report = probing.check_memory(load_space(space_file(tmp_path, probe="true", gpus_per_trial="auto",
                                                               concurrency=1)))
    assert space.budget.gpus_per_trial == 0.0 and space.base_config.train.device == "cpu"
    (result,) = report.results
    assert result.fits and result.device == "cpu" and (result.arch, result.backbone) == ("fcn32s", "resnet18")
    assert result.batch_size == 2 and result.crop_size == (64, 128)
    assert result.peak_bytes >= 2 * 4 * result.parameters  # fp32 weights and gradients at least
    assert result.step_seconds > 0 and result.process_bytes > 0
    assert report.available_bytes is None or report.available_bytes > result.peak_bytes
    assert json.loads(json.dumps(report.to_dict()))["results"][0]["arch"] == "fcn32s"


# --- the budget keys -----------------------------------------------------------------------------

@pytest.mark.parametrize(("budget", "key"), [
    ({"probe": "maybe"}, "budget.probe"),
    ({"probe": 1}, "budget.probe"),
    ({"gpus_per_trial": -1}, "budget.gpus_per_trial"),
    ({"gpus_per_trial": "autox"}, "budget.gpus_per_trial"),
    ({"gpus_per_trial": 1.5}, "budget.gpus_per_trial"),
])
def test_bad_budget_values_name_the_key(tmp_path, budget, key):
    path = space_file(tmp_path, **budget)
    with pytest.raises(ConfigError) as error:
        load_space(path)
    assert key in str(error.value) and str(path) in str(error.value)
    name = key.removeprefix("budget.")
    with pytest.raises(ConfigError, match=key):  # the same from a command-line flag
        load_space(space_file(tmp_path), overrides={name: budget[name]})


@pytest.mark.parametrize(("written", "read"), [("auto", "auto"), ("true", True), ("false", False), ("null", "auto")])
def test_probe_values(tmp_path, written, read):
    assert load_space(space_file(tmp_path, probe=written)).budget.probe == read


def test_gpus_per_trial_values(tmp_path):
    assert load_space(space_file(tmp_path, gpus_per_trial="auto")).budget.gpus_per_trial == "auto"
    assert load_space(space_file(tmp_path), overrides={"gpus_per_trial": "AUTO"}).budget.gpus_per_trial == "auto"
    assert load_space(space_file(tmp_path), overrides={"gpus_per_trial": "0.5"}).budget.gpus_per_trial == 0.5
    assert load_space(space_file(tmp_path)).budget.probe == "auto"  # the default
