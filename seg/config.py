"""Typed, frozen experiment config loaded from YAML.

A config file mirrors the dataclasses below section by section::

    model: {arch: fcn8s, backbone: vgg16}
    optim: {lr: 1.0e-4, momentum: 0.99}

Every key is checked: an unknown key, a wrong type or an impossible value raises
``ConfigError`` naming the file, the dotted key and a fix. Names of registered things
(``model.arch``, ``model.backbone``, ``optim.name``, ``optim.schedule``) are checked
against their registries (``seg.models.MODELS`` and ``BACKBONES``, ``seg.optim.OPTIMIZERS``
and ``SCHEDULES``), the one list of valid names, when the config is built: a command
fails on a misspelled name before it creates anything. Overrides use dotted keys
(``optim.lr=0.01``), both on the command line and from the search spaces.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from seg.errors import ConfigError

NUM_CLASSES = 19
IGNORE_INDEX = 255


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # None: the embedded synthetic data set
    train_split: str = "train"
    val_split: str = "val"
    crop_size: tuple[int, int] = (128, 256)  # (height, width) of training crops
    scale_range: tuple[float, float] = (0.75, 1.5)  # random rescale before cropping
    hflip: bool = True
    color_jitter: float = 0.2  # brightness/contrast/saturation strength, 0 disables
    eval_scale: float = 1.0  # validation images are resized by this factor
    batch_size: int = 4
    eval_batch_size: int = 4
    num_workers: int = 2
    pin_memory: bool | None = None  # None: on when training on CUDA
    persistent_workers: bool = True
    prefetch_factor: int = 2
    # Decode each image once: false (decode on every read), true or "memory" (keep decoded
    # images in each loader process: small data sets), "disk" (decoded copies as .npy in
    # cache_dir, read memory-mapped, only the crop window: large data sets such as Cityscapes)
    cache: Literal[False, True, "memory", "disk"] = False
    cache_dir: str | None = None  # for cache: disk; None: <repo>/data/decoded/<data root name>-<hash>

    def __post_init__(self) -> None:
        _check(min(self.crop_size) >= 16, "data.crop_size", self.crop_size, "both sides >= 16")
        low, high = self.scale_range
        _check(0 < low <= high, "data.scale_range", self.scale_range, "0 < low <= high")
        _check(0 <= self.color_jitter <= 1, "data.color_jitter", self.color_jitter, "in [0, 1]")
        _check(0 < self.eval_scale <= 4, "data.eval_scale", self.eval_scale, "in (0, 4]")
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, ">= 1")
        _check(self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, ">= 1")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor", self.prefetch_factor, ">= 1")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "fcn8s"  # a name in seg.models.MODELS
    backbone: str = "resnet18"  # a name in seg.models.BACKBONES
    pretrained: bool = False  # ImageNet backbone weights (torchvision cache or `weights`)
    weights: str | None = None  # path to a backbone state dict, implies pretrained

    def __post_init__(self) -> None:
        # imported here: seg.models imports this module (and torch)
        from seg.models import BACKBONES, MODELS

        _check_registered(self.arch, "model.arch", MODELS, "architecture")
        _check_registered(self.backbone, "model.backbone", BACKBONES, "backbone")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # a name in seg.optim.OPTIMIZERS
    lr: float = 0.01
    momentum: float = 0.9  # SGD momentum; beta1 for Adam/AdamW
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "poly"  # a name in seg.optim.SCHEDULES
    power: float = 0.9  # exponent of the poly schedule
    warmup_iters: int = 0
    warmup_factor: float = 0.1  # lr multiplier at the first warmup iteration
    grad_clip: float | None = None  # max global gradient norm

    def __post_init__(self) -> None:
        # imported here: seg.optim imports this module (and torch)
        from seg.optim import OPTIMIZERS, SCHEDULES

        _check_registered(self.name, "optim.name", OPTIMIZERS, "optimizer")
        _check_registered(self.schedule, "optim.schedule", SCHEDULES, "schedule")
        _check(0 < self.lr <= 10, "optim.lr", self.lr, "in (0, 10]")
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(self.power > 0, "optim.power", self.power, "> 0")
        _check(self.warmup_iters >= 0, "optim.warmup_iters", self.warmup_iters, ">= 0")
        _check(0 < self.warmup_factor <= 1, "optim.warmup_factor", self.warmup_factor, "in (0, 1]")
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "> 0 or null")
        _check(not self.nesterov or (self.name == "sgd" and self.momentum > 0),
               "optim.nesterov", self.nesterov, "only with name: sgd and momentum > 0")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    amp: bool = True  # mixed precision on CUDA (bf16 where supported)
    cpu_amp: bool = False  # bf16 autocast on CPU (with channels_last): faster where the CPU has bf16 units
    channels_last: bool = True  # on CUDA, and on CPU with cpu_amp
    class_weights: Literal["none", "median_frequency"] = "none"
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    eval_every: int = 1  # epochs between validations
    max_steps_per_epoch: int | None = None  # cap on training steps, for smoke runs

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "train.device", self.device, "auto, cpu, cuda or cuda:N")
        _check(self.num_threads is None or self.num_threads >= 1, "train.num_threads", self.num_threads, ">= 1")
        _check(self.eval_every >= 1, "train.eval_every", self.eval_every, ">= 1")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
               "train.max_steps_per_epoch", self.max_steps_per_epoch, ">= 1 or null")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (lists for tuples), as it would be written in YAML."""
        return _plain(dataclasses.asdict(self))

    def flat_dict(self) -> dict[str, Any]:
        """``{"optim.lr": 0.01, ...}``: one entry per field, for logging as params."""
        return {f"{section}.{key}": value
                for section, values in self.to_dict().items() for key, value in values.items()}

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "overrides") -> "Config":
        """A copy with dotted keys replaced; values are checked like file values."""
        tree = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in tree or not key:
                raise ConfigError(f"{source}: unknown key '{dotted}'. {_suggest(dotted, self.flat_dict())}")
            tree[section][key] = value
        return config_from_dict(tree, source=source)


def config_from_dict(tree: Mapping[str, Any] | None, source: str = "config") -> Config:
    """Build a Config from a nested dict, checking every key, type and value."""
    tree = {} if tree is None else tree
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, optim, train), "
                          f"got {type(tree).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for name, values in tree.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section '{name}'. Valid sections: {', '.join(sections)}")
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section '{name}' must be a mapping of keys, got {values!r}")
        built[name] = _build_section(hints[name], name, values, source)
    try:
        return Config(**built)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply overrides.

    ``overrides`` is a mapping of dotted keys or a list of ``key=value`` strings, the
    values of which are parsed as YAML scalars.
    """
    config = Config()
    if path is not None:
        config = config_from_dict(read_yaml(path), source=str(path))
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    return config.with_overrides(overrides) if overrides else config


def read_yaml(path: str | Path) -> Any:
    """Safe-load a YAML file, refusing duplicate keys, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file. Check the path (relative paths are taken from "
                          f"{Path.cwd()}).")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read as text: {error}") from None
    if not text.strip():
        raise ConfigError(f"{path}: the file is empty. Write at least one section, e.g. 'train: {{epochs: 5}}'.")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as error:
        if "could not determine a constructor" in str(error):
            raise ConfigError(f"{path}: YAML tags such as !!python/object are refused (plain "
                              f"values only): {error}") from None
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["optim.lr=0.01", "model.arch=fcn16s"]`` -> ``{"optim.lr": 0.01, ...}``."""
    parsed = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value, e.g. optim.lr=0.01")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed[key.strip()] = raw
    return parsed


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (keep only one)", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _build_section(cls: type, section: str, values: Mapping[str, Any], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{source}: unknown key '{section}.{key}'. "
                              f"{_suggest(f'{section}.{key}', {f'{section}.{k}': 0 for k in hints})}")
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}", source)
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def coerce(value: Any, hint: Any, key: str, source: str = "config") -> Any:
    """Check ``value`` against a type hint, converting only where it is lossless.

    Ints are accepted for floats, and numeric strings such as ``"1e-5"`` (which
    PyYAML reads as a string) for floats. Lists become tuples of the right length.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}' must be {expected}, got {value!r} "
                           f"({type(value).__name__})")

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return coerce(value, inner[0], key, source)
        raise TypeError(f"unsupported type hint {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: key '{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise fail("an integer")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise fail("a number (e.g. 1.0e-4)") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail("a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise TypeError(f"unsupported type hint {hint}")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"key '{key}' must be {expected}, got {value!r}")


def _check_registered(name: str, key: str, registry: Mapping[str, Any], kind: str) -> None:
    if name in registry:
        return
    close = difflib.get_close_matches(str(name), list(registry), n=1)
    hint = f"Did you mean {close[0]}? " if close else ""
    raise ConfigError(f"key '{key}' is {name!r}, which is not a registered {kind}. "
                      f"{hint}Valid: {', '.join(registry)}")


def _suggest(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"Did you mean {' or '.join(close)}? " if close else ""
    return f"{hint}Valid keys: {', '.join(known)}"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
