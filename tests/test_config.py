"""Config loading: every bad input names the file and the key."""

from pathlib import Path

import pytest

from seg.config import Config, ConfigError, load_config, parse_overrides


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip():
    config = Config()
    assert Config().with_overrides(config.flat_dict()) == config
    assert config.flat_dict()["optim.lr"] == config.optim.lr


def test_file_values_and_overrides(tmp_path):
    path = write(tmp_path, "optim: {lr: 0.05, momentum: 0.95}\ndata: {crop_size: [64, 96]}\n")
    config = load_config(path, ["optim.lr=0.001", "model.arch=fcn16s"])
    assert config.optim.lr == 0.001
    assert config.optim.momentum == 0.95
    assert config.data.crop_size == (64, 96)
    assert config.model.arch == "fcn16s"


def test_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads 1e-5 (no dot) as the string "1e-5"; it must still be the number.
    config = load_config(write(tmp_path, "optim: {lr: 1e-5, weight_decay: 5e-4}\n"))
    assert config.optim.lr == pytest.approx(1e-5)
    assert isinstance(config.optim.weight_decay, float)


@pytest.mark.parametrize("text, key", [
    ("optim: {lrr: 0.1}\n", "optim.lrr"),
    ("optimizer: {lr: 0.1}\n", "optimizer"),
    ("optim: {lr: fast}\n", "optim.lr"),
    ("optim: {lr: -1}\n", "optim.lr"),
    ("optim: {momentum: 1.5}\n", "optim.momentum"),
    ("data: {batch_size: 2.5}\n", "data.batch_size"),
    ("data: {batch_size: true}\n", "data.batch_size"),
    ("data: {crop_size: [64]}\n", "data.crop_size"),
    ("data: {scale_range: [2.0, 1.0]}\n", "data.scale_range"),
    ("train: {epochs: 0}\n", "train.epochs"),
    ("optim: {name: rmsprop}\n", "optim.name"),
    ("optim: {schedule: step}\n", "optim.schedule"),
    ("model: {arch: fcn9s}\n", "model.arch"),
    ("model: {backbone: resnet17}\n", "model.backbone"),
    ("optim: {lr: 0.1, lr: 0.2}\n", "lr"),
])
def test_bad_values_name_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert key in str(error.value)


def test_unregistered_model_names_are_refused_with_the_registered_ones():
    # checked when the config is built, so that a command fails before it creates an MLflow run
    from seg.models import BACKBONES, MODELS

    with pytest.raises(ConfigError) as error:
        load_config(overrides=["model.arch=fcn9s"])
    message = str(error.value)
    assert "model.arch" in message and "'fcn9s'" in message and "Did you mean fcn8s?" in message
    assert all(name in message for name in MODELS)
    with pytest.raises(ConfigError) as error:
        load_config(overrides=["model.backbone=resnet17"])
    message = str(error.value)
    assert "model.backbone" in message and "'resnet17'" in message
    assert all(name in message for name in BACKBONES)


def test_registered_names_are_the_registries_keys(monkeypatch):
    # one list of names: an entry added to a registry is a valid config value, with nothing else to edit
    import seg.models
    import seg.optim

    monkeypatch.setitem(seg.models.MODELS, "fcn4s", seg.models.fcn8s)
    monkeypatch.setitem(seg.models.BACKBONES, "resnet34", seg.models.BACKBONES["resnet18"])
    monkeypatch.setitem(seg.optim.OPTIMIZERS, "lion", seg.optim.OPTIMIZERS["sgd"])
    monkeypatch.setitem(seg.optim.SCHEDULES, "step", seg.optim.SCHEDULES["constant"])
    cfg = load_config(overrides=["model.arch=fcn4s", "model.backbone=resnet34", "optim.name=lion",
                                 "optim.schedule=step"])
    assert (cfg.model.arch, cfg.model.backbone, cfg.optim.name, cfg.optim.schedule) == (
        "fcn4s", "resnet34", "lion", "step")
    with pytest.raises(ConfigError, match="optim.name.*sgd, adam, adamw, lion"):
        load_config(overrides=["optim.name=lamb"])


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean optim.momentum"):
        load_config(write(tmp_path, "optim: {momentun: 0.9}\n"))


def test_python_object_tags_are_refused(tmp_path):
    path = write(tmp_path, "optim: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="refused") as error:
        load_config(path)
    assert str(path) in str(error.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, "\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr"], "key=value"),
    (["optim.lrr=0.1"], "optim.lrr"),
    (["nosection=1"], "nosection"),
    (["train.epochs=many"], "train.epochs"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_parse_overrides_reads_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=0.5", "a.d=true", "a.e=null", "a.f=[1, 2]", "a.g=x"]) == {
        "a.b": 1, "a.c": 0.5, "a.d": True, "a.e": None, "a.f": [1, 2], "a.g": "x"}


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().optim.lr = 1.0  # type: ignore[misc]
