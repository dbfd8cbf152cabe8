"""Search spaces: YAML files that map one-to-one onto config fields, validated up front.

A search space file (see ``search_spaces/``)::

    name: quick                       # the search's name (Ray experiment, MLflow experiment)
    base: ../experiments/quick.yaml   # optional config file: relative to this file, then the repo
    fixed: {optim.grad_clip: null}    # optional dotted keys applied to every trial
    space:                            # what the searcher samples, one entry per config field
      optim.lr: {loguniform: [1.0e-3, 1.0e-1]}
      optim.momentum: {uniform: [0.8, 0.99]}
      data.batch_size: {int: [2, 8], step: 2}
      model.arch: {choice: [fcn32s, fcn16s, fcn8s]}
      data.crop_size: {choice: [[128, 256], [256, 512]]}
      optim.nesterov: false           # a plain value is a fixed value
    initial:                          # optional: trials run first (unlisted keys are sampled)
      - {optim.lr: 0.01, model.arch: fcn8s}
    budget: {trials: 8, max_epochs: 4, concurrency: 2, cpus_per_trial: 1, ...}

Everything is checked before anything launches, and every error names the file and
the key: unknown fields (with suggestions), bounds of the wrong type for the field,
low >= high, non-positive log bounds, empty or repeated choices, choices the field
cannot hold, values the config refuses (each bound and choice is put into a Config),
and duplicate keys (refused by ``seg.config.read_yaml``).

Some fields are set for every trial from the budget rather than sampled: ``train.epochs``
(= ``budget.max_epochs``), ``train.eval_every`` (1: the scheduler needs a val mIoU every
epoch), and, unless ``fixed`` names them, ``train.num_threads`` (the trial's CPU share),
``data.num_workers`` (what the share leaves for loader workers) and ``train.device``.

``budget.gpus_per_trial: auto`` is decided by the search (``seg.tuning.probing``): the
memory probe says how many of the space's largest trials fit on the GPU, and a machine
without one runs CPU trials. Until then ``train.device`` is ``auto`` and the loader
workers are counted as for a GPU trial; :func:`resolve_gpus_per_trial` settles both.
``budget.probe`` (``auto``, ``true``, ``false``) says whether the search probes at all.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import optuna

from seg.config import Config, coerce, config_from_dict, read_yaml
from seg.errors import ConfigError
from seg.tuning.records import field_hints, param_value

__all__ = ["DISTRIBUTIONS", "METRICS", "Budget", "Param", "SearchSpace", "field_hints", "param_value", "short_names",
           "load_space", "resolve_gpus_per_trial", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
# what a trial reports each epoch that a search can optimise (EpochResult.metrics keys)
METRICS = {"val_miou": "max", "val_pixel_accuracy": "max", "val_mean_class_accuracy": "max",
           "val_loss": "min", "train_loss": "min"}
_TOP_LEVEL = ("name", "description", "base", "fixed", "space", "initial", "budget")
_MODIFIERS = {"int": ("step", "log")}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# set by the search for every trial; a space may not sample them
_NOT_SEARCHABLE = {
    "train.epochs": "set budget.max_epochs instead",
    "train.eval_every": "every epoch is validated so that the scheduler can compare trials",
    "data.root": "set it under fixed: (or in the base config)",
    "train.device": "set it under fixed:",
}


@dataclass(frozen=True)
class Budget:
    """How much search to run. Every field can be overridden on the command line."""

    trials: int = 8
    max_epochs: int | None = None  # None: the base config's train.epochs
    concurrency: int = 1
    cpus_per_trial: float = 1.0
    # a fraction shares a GPU between trials; "auto": as many trials share one as fit (the probe)
    gpus_per_trial: float | Literal["auto"] = 0.0
    metric: str = "val_miou"
    mode: Literal["max", "min"] = "max"
    seed: int = 0  # seeds the sampler (trials' training seed is train.seed)
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: float = 2.0  # ASHA: keep 1/reduction_factor at each rung
    max_failures: int = 1  # retries of a crashed trial (divergence is never retried)
    startup_trials: int | None = None  # random trials before TPE models; None: trials // 3, 2..10
    # probe the largest configurations before launching: "auto" when trials run on CUDA, true also on CPU
    probe: bool | Literal["auto"] = "auto"

    @property
    def threads_per_trial(self) -> int:
        return max(1, int(self.cpus_per_trial))

    @property
    def tpe_startup_trials(self) -> int:
        if self.startup_trials is not None:
            return self.startup_trials
        return min(10, max(2, self.trials // 3))


@dataclass(frozen=True)
class Param:
    """One sampled config field: its distribution and how values map to the config."""

    key: str
    kind: str  # one of DISTRIBUTIONS
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()  # config values (lists as tuples)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "loguniform":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=True)
        if self.kind == "uniform":
            return optuna.distributions.FloatDistribution(self.low, self.high)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return optuna.distributions.CategoricalDistribution([self.encode(c) for c in self.choices])

    def encode(self, value: Any) -> Any:
        """Config value -> what Optuna stores (Optuna's categories must be scalars)."""
        if self.kind == "choice" and isinstance(value, (list, tuple)):
            return json.dumps(list(value))
        return value

    def decode(self, value: Any) -> Any:
        """What Optuna (or Ray) hands back -> config value."""
        if self.kind == "choice" and isinstance(value, str) and value.startswith("["):
            return tuple(json.loads(value))
        return value

    def describe(self) -> str:
        """``loguniform(0.001, 0.1)``, ``choice(fcn32s, fcn8s)``: for logs and MLflow params."""
        if self.kind == "choice":
            return f"choice({', '.join(_show(c) for c in self.choices)})"
        extra = "".join(f", {name}={value}" for name, value in (("step", self.step), ("log", self.log)) if value)
        return f"{self.kind}({self.low}, {self.high}{extra})"


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space: the base config every trial starts from, and what to sample."""

    name: str
    base_config: Config  # base file + fixed + the per-trial settings from the budget
    params: tuple[Param, ...]
    budget: Budget
    fixed: Mapping[str, Any] = field(default_factory=dict)
    initial: tuple[Mapping[str, Any], ...] = ()  # Optuna-encoded values, dotted keys
    description: str = ""
    path: Path | None = None  # the YAML file (absolute)
    base_path: Path | None = None  # the base config file (absolute)
    text: str = ""  # the YAML as written, logged as an artifact
    runtime_keys: tuple[str, ...] = ()  # config keys set for every trial from outside the file (--set)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(param.key for param in self.params)

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {param.key: param.distribution() for param in self.params}

    def decode(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """Sampled values (as Optuna/Ray hold them) -> config overrides, in space order."""
        by_key = {param.key: param for param in self.params}
        unknown = set(sampled) - set(by_key)
        if unknown:
            raise ConfigError(f"{self.source}: sampled keys {sorted(unknown)} are not in the space")
        return {key: by_key[key].decode(sampled[key]) for key in self.keys if key in sampled}

    def config_for(self, sampled: Mapping[str, Any]) -> Config:
        """The trial's Config: the base config with the sampled values."""
        return self.base_config.with_overrides(self.decode(sampled), source=f"{self.source} (sampled trial)")

    @property
    def source(self) -> str:
        return str(self.path) if self.path else f"search space '{self.name}'"


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key's last part (``optim.lr`` -> ``lr``) where no other key shares it, for tables."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def load_space(path: str | Path, overrides: Mapping[str, Any] | None = None,
               runtime: Mapping[str, Any] | None = None) -> SearchSpace:
    """Read and validate a search space file.

    ``overrides`` replace budget fields (from command-line flags; ``name`` too);
    ``runtime`` are extra dotted config keys applied to every trial without being
    part of the file (e.g. ``train.max_steps_per_epoch`` for a smoke test).
    Raises ConfigError naming the file and the key.
    """
    path = Path(path).absolute()
    tree = read_yaml(path)
    return space_from_dict(tree, source=path, text=path.read_text(), overrides=overrides, runtime=runtime)


def space_from_dict(tree: Any, source: str | Path = "search space", text: str = "",
                    overrides: Mapping[str, Any] | None = None,
                    runtime: Mapping[str, Any] | None = None) -> SearchSpace:
    """Validate a parsed search space (see :func:`load_space`)."""
    where = str(source)
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(_TOP_LEVEL)}, "
                          f"got {type(tree).__name__}")
    for key in tree:
        if key not in _TOP_LEVEL:
            raise ConfigError(f"{where}: unknown top-level key '{key}'. {_suggest(str(key), _TOP_LEVEL)}")
    overrides = dict(overrides or {})
    path = Path(source) if isinstance(source, Path) else None

    name = overrides.pop("name", None) or tree.get("name") or (path.stem if path else None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: key 'name' must be a name of letters, digits, '.', '_' or '-' "
                          f"(it names the Ray and MLflow experiments), got {name!r}")
    description = tree.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{where}: key 'description' must be a string, got {description!r}")

    hints = field_hints()
    budget = _read_budget(tree.get("budget"), overrides, where)
    base_path, base = _read_base(tree.get("base"), path, where)
    fixed = _read_fixed(tree.get("fixed"), hints, where)
    params = _read_params(tree.get("space"), hints, where)
    for param in params:  # plain values under space: are fixed values
        if param.kind == "fixed":
            if param.key in fixed:
                raise ConfigError(f"{where}: key '{param.key}' is set both under fixed: and space:; keep one")
            fixed[param.key] = param.choices[0]
    params = tuple(param for param in params if param.kind != "fixed")
    if not params:
        raise ConfigError(f"{where}: key 'space' samples nothing: give at least one field a distribution, "
                          f"e.g. optim.lr: {{loguniform: [1.0e-3, 1.0e-1]}}")
    for key in fixed:
        if key in {param.key for param in params}:
            raise ConfigError(f"{where}: key '{key}' is both fixed and sampled: keep one")

    # budget <-> config: one number of epochs, validation every epoch
    if budget.max_epochs is None:
        epochs = fixed.get("train.epochs", base.train.epochs)
        budget = dataclasses.replace(budget, max_epochs=coerce(epochs, int, "train.epochs", where))
    elif "train.epochs" in fixed and fixed["train.epochs"] != budget.max_epochs:
        raise ConfigError(f"{where}: key 'fixed.train.epochs' ({fixed['train.epochs']}) disagrees with "
                          f"budget.max_epochs ({budget.max_epochs}): keep only budget.max_epochs")
    if fixed.get("train.eval_every", 1) != 1:
        raise ConfigError(f"{where}: key 'fixed.train.eval_every' must be 1 in a search: "
                          f"{_NOT_SEARCHABLE['train.eval_every']}")
    _check_budget(budget, where)

    sampled = {param.key for param in params}
    for key in runtime or {}:
        _check_field(key, hints, where, "settings")
        if key in sampled:
            raise ConfigError(f"{where}: key '{key}' is sampled in space:, so it cannot also be set for every trial")
    trial_settings = _trial_settings(budget, base, fixed)
    settings = {**fixed, **trial_settings, **dict(runtime or {})}
    try:
        base_config = base.with_overrides(settings, source=f"{where} (fixed)")
    except ConfigError as error:
        raise ConfigError(f"{error}") from None

    for param in params:
        _check_values_in_config(param, base_config, where)
    space = SearchSpace(name=name, base_config=base_config, params=params, budget=budget, fixed=fixed,
                        description=description, path=path, base_path=base_path, text=text,
                        runtime_keys=tuple(runtime or {}))
    initial = _read_initial(tree.get("initial"), space, where)
    space = dataclasses.replace(space, initial=initial)
    _check_samples(space, where)
    return space


# --- sections -------------------------------------------------------------------------------

def _read_budget(tree: Any, overrides: Mapping[str, Any], where: str) -> Budget:
    tree = {} if tree is None else tree
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where}: key 'budget' must be a mapping, e.g. {{trials: 8, max_epochs: 4}}")
    hints = typing.get_type_hints(Budget)
    values = {}
    for origin, items in (("", tree), (" (command line)", overrides)):
        for key, value in items.items():
            if key not in hints:
                raise ConfigError(f"{where}{origin}: unknown key 'budget.{key}'. "
                                  f"{_suggest(str(key), list(hints), prefix='budget.')}")
            if value is None and key not in ("max_epochs", "startup_trials"):
                continue
            read = _BUDGET_READERS.get(key)
            values[key] = read(value, where + origin) if read else \
                coerce(value, hints[key], f"budget.{key}", where + origin)
    return Budget(**values)


def _read_gpus_per_trial(value: Any, where: str) -> float | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return coerce(value, float, "budget.gpus_per_trial", where)
    except ConfigError:
        raise ConfigError(f"{where}: key 'budget.gpus_per_trial' must be a number of GPUs (0, a fraction such "
                          f"as 0.5, a whole number) or auto (the memory probe decides), got {value!r}") from None


def _read_probe(value: Any, where: str) -> bool | str:
    # YAML reads true/false (and yes/no) as booleans; the command line passes strings
    text = value.strip().lower() if isinstance(value, str) else value
    choices = {"auto": "auto", "true": True, "false": False, True: True, False: False}
    if isinstance(text, (str, bool)) and text in choices:
        return choices[text]
    raise ConfigError(f"{where}: key 'budget.probe' must be auto (probe when trials run on a GPU), true "
                      f"(also on CPU) or false (never), got {value!r}")


_BUDGET_READERS = {"gpus_per_trial": _read_gpus_per_trial, "probe": _read_probe}


def _check_budget(budget: Budget, where: str) -> None:
    checks = [
        (budget.trials >= 1, "trials", ">= 1"),
        (budget.max_epochs >= 1, "max_epochs", ">= 1"),
        (budget.concurrency >= 1, "concurrency", ">= 1"),
        (budget.cpus_per_trial > 0, "cpus_per_trial", "> 0"),
        (budget.gpus_per_trial == "auto" or (budget.gpus_per_trial >= 0 and (
            budget.gpus_per_trial <= 1 or float(budget.gpus_per_trial).is_integer())),
         "gpus_per_trial", "0, a fraction of one GPU, a whole number of GPUs, or auto"),
        (budget.metric in METRICS, "metric", f"one of {', '.join(METRICS)}"),
        (1 <= budget.grace_period <= budget.max_epochs, "grace_period", f"in [1, max_epochs={budget.max_epochs}]"),
        (budget.reduction_factor > 1, "reduction_factor", "> 1"),
        (budget.max_failures >= 0, "max_failures", ">= 0"),
        (budget.startup_trials is None or budget.startup_trials >= 1, "startup_trials", ">= 1 or null"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{where}: key 'budget.{key}' must be {expected}, got {getattr(budget, key)!r}")
    if METRICS[budget.metric] != budget.mode:
        raise ConfigError(f"{where}: key 'budget.mode' is '{budget.mode}' but {budget.metric} is better when "
                          f"{'higher' if METRICS[budget.metric] == 'max' else 'lower'}: "
                          f"use mode: {METRICS[budget.metric]}")


def _read_base(value: Any, path: Path | None, where: str) -> tuple[Path | None, Config]:
    if value is None:
        return None, Config()
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: key 'base' must be the path of a config file, got {value!r}")
    candidates = [Path(value)] if Path(value).is_absolute() else [
        *([path.parent / value] if path else []), REPO_ROOT / value]
    for candidate in candidates:
        if candidate.is_file():
            base_path = candidate.resolve()
            tree = read_yaml(base_path)
            return base_path, config_from_dict(tree, source=f"{base_path} (base of {where})")
    raise ConfigError(f"{where}: key 'base' names {value!r}, which is not a file (looked in "
                      f"{', '.join(str(c) for c in candidates)})")


def _read_fixed(tree: Any, hints: Mapping[str, Any], where: str) -> dict[str, Any]:
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where}: key 'fixed' must be a mapping of dotted config keys, "
                          f"e.g. {{train.seed: 0}}")
    fixed = {}
    for key, value in tree.items():
        _check_field(key, hints, where, "fixed")
        fixed[key] = _plain(coerce(value, hints[key], f"fixed.{key}", where))
    return fixed


def _read_params(tree: Any, hints: Mapping[str, Any], where: str) -> tuple[Param, ...]:
    if not isinstance(tree, Mapping) or not tree:
        raise ConfigError(f"{where}: key 'space' must be a non-empty mapping of dotted config keys to "
                          f"distributions, e.g. optim.lr: {{loguniform: [1.0e-3, 1.0e-1]}}")
    return tuple(_read_param(key, spec, hints, where) for key, spec in tree.items())


def _read_param(key: Any, spec: Any, hints: Mapping[str, Any], where: str) -> Param:
    _check_field(key, hints, where, "space")
    if key in _NOT_SEARCHABLE and isinstance(spec, Mapping):
        raise ConfigError(f"{where}: key 'space.{key}' cannot be searched: {_NOT_SEARCHABLE[key]}")
    hint = hints[key]
    at = f"space.{key}"
    if not isinstance(spec, Mapping):  # a fixed value
        return Param(key, "fixed", choices=(_plain(coerce(spec, hint, f"space.{key}", where)),))
    kinds = [name for name in spec if name in DISTRIBUTIONS]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: key '{at}' must name exactly one distribution out of "
                          f"{', '.join(DISTRIBUTIONS)} (e.g. {{uniform: [0.8, 0.99]}}), got {dict(spec)!r}")
    kind = kinds[0]
    for name in spec:
        if name != kind and name not in _MODIFIERS.get(kind, ()):
            allowed = _MODIFIERS.get(kind, ())
            raise ConfigError(f"{where}: key '{at}' has unknown option '{name}' for {kind}"
                              f"{'; allowed: ' + ', '.join(allowed) if allowed else ' (it takes none)'}")
    args = spec[kind]
    base_hint = _without_none(hint)

    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: key '{at}' needs a non-empty list of choices, e.g. "
                              f"{{choice: [a, b]}}, got {args!r}")
        choices = tuple(_plain(coerce(value, hint, f"space.{key} (choice {i + 1})", where))
                        for i, value in enumerate(args))
        repeated = [c for i, c in enumerate(choices) if c in choices[:i]]
        if repeated:
            raise ConfigError(f"{where}: key '{at}' lists {repeated[0]!r} more than once")
        if len(choices) == 1:
            raise ConfigError(f"{where}: key '{at}' has a single choice {choices[0]!r}: write it as a fixed "
                              f"value ({key}: {_show(choices[0])})")
        return Param(key, "choice", choices=choices)

    expected = {"loguniform": float, "uniform": float, "int": int}[kind]
    if base_hint is not expected:
        suggestion = "int: [low, high]" if base_hint is int else (
            "loguniform: [low, high] or uniform: [low, high]" if base_hint is float else "choice: [...]")
        raise ConfigError(f"{where}: key '{at}' uses {kind}, but {key} holds {_type_name(hint)}: "
                          f"use {suggestion}")
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: key '{at}' needs [low, high], e.g. {{{kind}: "
                          f"{'[1.0e-4, 1.0e-1]' if expected is float else '[1, 8]'}}}, got {args!r}")
    low, high = (coerce(value, base_hint, f"space.{key} ({bound})", where)
                 for value, bound in zip(args, ("low", "high")))
    if low > high:
        raise ConfigError(f"{where}: key '{at}' has low > high ({low} > {high}): swap them")
    if low == high:
        raise ConfigError(f"{where}: key '{at}' has low == high ({low}): write it as a fixed value "
                          f"({key}: {low})")
    log = kind == "loguniform" or bool(spec.get("log", False))
    if not isinstance(spec.get("log", False), bool):
        raise ConfigError(f"{where}: key '{at}.log' must be true or false, got {spec['log']!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: key '{at}' samples on a log scale, so its bounds must be > 0; "
                          f"got low={low}: use a small positive low (e.g. 1.0e-6) or uniform")
    step = None
    if "step" in spec:
        step = coerce(spec["step"], int, f"space.{key}.step", where)
        if step < 1 or (high - low) % step:
            raise ConfigError(f"{where}: key '{at}.step' must be >= 1 and divide high - low = {high - low}, "
                              f"got {step}")
        if log and step != 1:
            raise ConfigError(f"{where}: key '{at}' cannot combine log: true with step: {step}")
    return Param(key, "loguniform" if kind == "loguniform" else kind, low=low, high=high, step=step,
                 log=log and kind == "int")


def _read_initial(tree: Any, space: SearchSpace, where: str) -> tuple[dict[str, Any], ...]:
    if tree is None:
        return ()
    if not isinstance(tree, list):
        raise ConfigError(f"{where}: key 'initial' must be a list of mappings of sampled keys to values")
    by_key = {param.key: param for param in space.params}
    points = []
    for i, point in enumerate(tree):
        at = f"initial[{i}]"
        if not isinstance(point, Mapping) or not point:
            raise ConfigError(f"{where}: key '{at}' must be a non-empty mapping of sampled keys to values")
        encoded = {}
        for key, value in point.items():
            if key not in by_key:
                raise ConfigError(f"{where}: key '{at}.{key}' is not sampled in space: "
                                  f"{_suggest(str(key), list(by_key))}")
            param = by_key[key]
            value = _plain(coerce(value, field_hints()[key], f"{at}.{key}", where))
            if param.kind == "choice" and value not in param.choices:
                raise ConfigError(f"{where}: key '{at}.{key}' is {_show(value)}, not one of the choices "
                                  f"{', '.join(_show(c) for c in param.choices)}")
            if param.kind != "choice" and not param.low <= value <= param.high:
                raise ConfigError(f"{where}: key '{at}.{key}' is {value}, outside [{param.low}, {param.high}]")
            encoded[key] = param.encode(value)
        try:
            space.config_for(encoded)
        except ConfigError as error:
            raise ConfigError(f"{where}: key '{at}' makes an impossible config: {error}") from None
        points.append(encoded)
    return tuple(points)


# --- checks ---------------------------------------------------------------------------------

def _check_field(key: Any, hints: Mapping[str, Any], where: str, section: str) -> None:
    if isinstance(key, str) and key in hints:
        return
    close = difflib.get_close_matches(str(key), list(hints), n=3)
    hint = f"Did you mean {' or '.join(close)}? " if close else ""
    config_section = str(key).partition(".")[0]
    same_section = [k for k in hints if k.startswith(f"{config_section}.")]
    valid = (f"Fields of {config_section}: {', '.join(same_section)}" if same_section else
             f"Fields are section.name, sections {', '.join(dict.fromkeys(k.partition('.')[0] for k in hints))}")
    raise ConfigError(f"{where}: key '{section}.{key}' is not a config field. {hint}{valid}")


def _check_values_in_config(param: Param, base: Config, where: str) -> None:
    """Each bound and each choice must make a valid Config on its own."""
    values = param.choices if param.kind == "choice" else (param.low, param.high)
    for value in values:
        try:
            base.with_overrides({param.key: value}, source=where)
        except ConfigError as error:
            message = str(error).removeprefix(f"{where}: ")
            raise ConfigError(f"{where}: key 'space.{param.key}' allows {_show(value)}, which the config "
                              f"refuses: {message}") from None


def _check_samples(space: SearchSpace, where: str) -> None:
    """Build Configs from a few samples so impossible combinations fail now, not in a trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.RandomSampler(seed=space.budget.seed)
    study = optuna.create_study(sampler=sampler)
    distributions = space.distributions()
    for _ in range(4):
        trial = study.ask(distributions)
        try:
            space.config_for(trial.params)
        except ConfigError as error:
            raise ConfigError(f"{where}: a sample of the space makes an impossible config "
                              f"({space.decode(trial.params)}): {error}") from None
        study.tell(trial, 0.0)


def _trial_settings(budget: Budget, base: Config, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """Per-trial settings that follow from the budget (resources) unless ``fixed`` sets them.

    With ``gpus_per_trial: auto`` the device is ``auto`` and the workers are counted as for
    a GPU trial (the larger count) until :func:`resolve_gpus_per_trial` settles them.
    """
    settings: dict[str, Any] = {"train.epochs": budget.max_epochs, "train.eval_every": 1}
    gpus = budget.gpus_per_trial
    if "train.num_threads" not in fixed:
        settings["train.num_threads"] = budget.threads_per_trial
    if "data.num_workers" not in fixed:
        # one core per loader worker beyond the training thread(s); on a 1-2 core share, none
        spare = int(budget.cpus_per_trial) - budget.threads_per_trial if gpus == 0 else \
            int(budget.cpus_per_trial) - 1
        settings["data.num_workers"] = max(0, min(base.data.num_workers, spare))
    if "train.device" not in fixed:
        settings["train.device"] = "auto" if gpus == "auto" else "cuda" if gpus > 0 else "cpu"
    return settings


def resolve_gpus_per_trial(space: SearchSpace, gpus_per_trial: float) -> SearchSpace:
    """The space of a ``gpus_per_trial: auto`` budget with the number decided for it, and
    ``train.device`` and ``data.num_workers`` derived from that number, as if it had been
    written in the file (keys that ``fixed`` or ``runtime`` set are left alone)."""
    if space.budget.gpus_per_trial != "auto":
        raise ValueError(f"budget.gpus_per_trial is {space.budget.gpus_per_trial!r}, not auto: nothing to resolve")
    budget = dataclasses.replace(space.budget, gpus_per_trial=float(gpus_per_trial))
    _check_budget(budget, space.source)
    # the workers were counted for a GPU trial, the larger count: deriving them again only lowers them
    settings = {key: value for key, value in _trial_settings(budget, space.base_config, space.fixed).items()
                if key not in space.runtime_keys}
    base_config = space.base_config.with_overrides(settings, source=f"{space.source} (fixed)")
    return dataclasses.replace(space, budget=budget, base_config=base_config)


# --- helpers --------------------------------------------------------------------------------

def _suggest(key: str, known: list[str] | tuple[str, ...], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"Did you mean {' or '.join(prefix + c for c in close)}? " if close else ""
    shown = ", ".join(prefix + k for k in known)
    return f"{hint}Valid keys: {shown}"


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0] if len(inner) == 1 else hint
    return hint


def _type_name(hint: Any) -> str:
    hint = _without_none(hint)
    if typing.get_origin(hint) is Literal:
        return f"one of {', '.join(map(str, typing.get_args(hint)))}"
    if typing.get_origin(hint) is tuple:
        return "a list of values"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _plain(value: Any) -> Any:
    """Lists and tuples as tuples (hashable, comparable), scalars unchanged."""
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return json.dumps(list(value))
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return str(value)
