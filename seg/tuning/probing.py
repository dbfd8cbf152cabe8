"""Probing a search space before its trials launch: do its largest trials fit, and how many share a GPU.

:func:`check_memory` runs :func:`seg.probe.probe` (one warm-up and one timed training
step, each in a fresh process, so the driver creates no CUDA context) on the space's
worst cases (:func:`worst_cases`): every (``model.arch``, ``model.backbone``) the space
can sample, at the largest ``data.batch_size`` and the largest ``data.crop_size`` it
allows, with the hungriest optimiser and precision it can sample (Adam's two state
buffers over SGD's one, fp32 over mixed precision). Then:

* on CUDA, a combination that does not fit on the GPU even alone is refused; with
  ``gpus_per_trial: auto`` the trials get ``1 / n`` of a GPU, ``n`` being how many of the
  largest trials fit on it together (at most ``budget.concurrency``); a fraction set by
  hand is checked (``0.25`` puts up to four trials on one GPU: four must fit);
* on CPU (``probe: true``), ``budget.concurrency`` trials at their peak, each a process
  with torch loaded, must fit in the memory the machine (or its cgroup) has available.

A trial's GPU memory is :func:`seg.probe.trials_per_gpu`'s: what the allocator reserved
at peak plus a CUDA context, with :data:`HEADROOM` of the device left for what one
training step does not show (validation at another size, fragmentation). What the GPU
offers is what was free when the probe started, plus the probe's own context: other
processes' memory is not counted as ours.

``budget.probe`` turns this on and off: ``auto`` (default) probes when trials run on
CUDA, ``true`` on CPU too, ``false`` never (``gpus_per_trial: auto`` then gives each
trial a whole GPU).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg.config import Config
from seg.errors import ConfigError
from seg.probe import CUDA_CONTEXT_BYTES, ProbeResult, format_bytes, probe, trials_per_gpu
from seg.tuning.space import SearchSpace, resolve_gpus_per_trial

__all__ = ["HEADROOM", "PROBE_TIMEOUT_S", "ProbeReport", "check_memory", "worst_cases", "run_probe",
           "cuda_available", "gpu_memory_bytes", "available_host_memory"]

log = logging.getLogger(__name__)

HEADROOM = 0.1  # of the GPU (or of the available RAM) kept free
PROBE_TIMEOUT_S = 600
# for sampled choices that change a step's memory: the hungriest value first
_HUNGRIEST = {
    "optim.name": ("adam", "adamw", "sgd"),  # Adam keeps two buffers per parameter, SGD (momentum) one
    "train.amp": (False, True),  # fp32 activations take twice the memory of bf16/fp16 ones
}


@dataclass
class ProbeReport:
    """What the probe measured and what the search made of it (logged with the parent run)."""

    device: str  # "cuda" or "cpu"
    gpus_per_trial_setting: float | str  # as written: a number or "auto"
    gpus_per_trial: float  # what the trials get
    trials_at_once: int  # how many of the largest trials fit together (GPU: per GPU; CPU: in RAM)
    available_bytes: int | None  # GPU: what the smallest probe saw usable; CPU: available RAM
    results: list[ProbeResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**{key: value for key, value in dataclasses.asdict(self).items() if key != "results"},
                "headroom": HEADROOM, "context_bytes": CUDA_CONTEXT_BYTES if self.device == "cuda" else 0,
                "results": [result.to_dict() for result in self.results]}


def run_probe(cfg: Config, device: str) -> ProbeResult:
    """One warm-up and one timed step of ``cfg`` on ``device``, in a fresh process."""
    return probe(cfg, isolated=True, warmup_steps=1, timed_steps=1, device=device, timeout=PROBE_TIMEOUT_S)


def cuda_available() -> bool:
    """Whether this machine has a CUDA device (no context is created)."""
    import torch

    return torch.cuda.is_available()


def gpu_memory_bytes() -> tuple[int, int]:
    """``(free, total)`` bytes of the first visible GPU, asked in a fresh process so that
    the driver keeps no CUDA context. Used where a probe result does not say."""
    code = "import torch; print(*torch.cuda.mem_get_info())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise ConfigError(f"cannot read the GPU's memory ({lines[-1] if lines else 'no output'}): "
                          f"set budget.probe: false to launch without the memory check")
    free, total = map(int, done.stdout.split())
    return free, total


def available_host_memory() -> int | None:
    """Bytes this machine can still give: ``MemAvailable``, capped by a cgroup v2 limit
    (a container) less what the cgroup uses beyond its reclaimable page cache; None where
    neither is readable."""
    values = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                values.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            values.append(int(limit) - used + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        pass
    return max(0, min(values)) if values else None


# --- the worst cases ---------------------------------------------------------------------------

def worst_cases(space: SearchSpace) -> list[Config]:
    """One Config per (arch, backbone) the space can sample, at its largest batch and crop.

    Categorical choices and fixed values both count; an ``int`` batch size gives its high
    bound; the largest crop is the one with the most pixels. Other memory-relevant choices
    (:data:`_HUNGRIEST`) take their hungriest value, everything else the base config's.
    """
    base = space.base_config
    by_key = {param.key: param for param in space.params}

    def values(key: str, default: Any) -> tuple:
        param = by_key.get(key)
        return param.choices if param is not None and param.kind == "choice" else (default,)

    settings: dict[str, Any] = {}
    batch = by_key.get("data.batch_size")
    if batch is not None:
        settings["data.batch_size"] = max(batch.choices) if batch.kind == "choice" else int(batch.high)
    crop = by_key.get("data.crop_size")
    if crop is not None:
        settings["data.crop_size"] = max(crop.choices, key=lambda size: (size[0] * size[1], tuple(size)))
    for key, order in _HUNGRIEST.items():
        param = by_key.get(key)
        if param is not None and param.kind == "choice":
            settings[key] = min(param.choices, key=lambda value: order.index(value) if value in order else len(order))
    cases: dict[tuple[str, str], Config] = {}
    for arch in values("model.arch", base.model.arch):
        for backbone in values("model.backbone", base.model.backbone):
            if (arch, backbone) not in cases:
                overrides = {**settings, "model.arch": arch, "model.backbone": backbone}
                cases[arch, backbone] = base.with_overrides(overrides, source=f"{space.source} (probed worst case)")
    return list(cases.values())


# --- the check -----------------------------------------------------------------------------------

def check_memory(space: SearchSpace, address: str | None = None) -> tuple[SearchSpace, ProbeReport | None]:
    """Probe the space's worst cases where ``budget.probe`` asks for it; refuse what cannot
    fit (ConfigError naming the file, the combination, batch and crop, needed vs usable
    memory, and a fix); resolve ``gpus_per_trial: auto`` into a number.

    Returns the space (with ``gpus_per_trial`` a number) and the report (None: no probe).
    ``address`` (a Ray cluster): the local GPU is taken as the cluster's kind; on CPU
    only a single trial is compared with this machine's memory.
    """
    budget = space.budget
    auto = budget.gpus_per_trial == "auto"
    device_setting = space.base_config.train.device  # "auto" until gpus_per_trial: auto is resolved
    if auto:
        on_cuda = device_setting != "cpu" and cuda_available()
        if not on_cuda and device_setting != "cpu" and (address or device_setting.startswith("cuda")):
            why = ("joining a cluster (--address), set budget.gpus_per_trial to the share of a GPU its trials get"
                   if address else f"train.device is {device_setting}: set it to auto or cpu")
            raise ConfigError(f"{space.source}: key 'budget.gpus_per_trial' is auto, which the memory probe decides "
                              f"on this machine, but it has no GPU; {why}")
    else:
        on_cuda = budget.gpus_per_trial > 0 and device_setting != "cpu"
    enabled = budget.probe is True or (budget.probe == "auto" and on_cuda)
    if enabled and on_cuda and not cuda_available():  # a cluster's GPUs, seen from a driver without one
        log.warning("budget.probe: this machine has no GPU to probe the trials on; they launch unchecked")
        enabled = False
    if auto and not on_cuda:
        space = resolve_gpus_per_trial(space, 0.0)
        log.info("budget.gpus_per_trial auto -> 0: CPU trials (%s)", "train.device is cpu" if device_setting == "cpu"
                 else "this machine has no GPU")
    if not enabled:
        if space.budget.gpus_per_trial == "auto":
            space = resolve_gpus_per_trial(space, 1.0)
            log.info("budget.gpus_per_trial auto -> 1: budget.probe is false, so a GPU per trial")
        return space, None

    device = "cuda" if on_cuda else "cpu"
    cases = worst_cases(space)
    log.info("probing %d configuration(s) of %s on %s: one training step each at the largest batch and crop",
             len(cases), space.source, device)
    results = [_probe_case(space, cfg, device) for cfg in cases]
    if on_cuda:
        return _check_gpu(space, results)
    return space, _check_cpu(space, results, address, setting=budget.gpus_per_trial)


def _probe_case(space: SearchSpace, cfg: Config, device: str) -> ProbeResult:
    try:
        return run_probe(cfg, device)
    except (TimeoutError, RuntimeError) as error:
        raise ConfigError(f"{space.source}: the memory probe of {_case(cfg)} did not finish ({error}); "
                          f"set budget.probe: false to launch without this check") from None


def _check_gpu(space: SearchSpace, results: list[ProbeResult]) -> tuple[SearchSpace, ProbeReport]:
    budget = space.budget
    counts, usable = [], []
    for result in results:
        free = _usable_gpu_bytes(result)
        count = trials_per_gpu(result, free, headroom=HEADROOM)
        counts.append(count)
        usable.append(free)
        _log_result(result, f"{count} fit on the GPU ({format_bytes(free)} usable)")
    failures = [(result, free) for result, free, count in zip(results, usable, counts) if count == 0]
    if failures:
        raise ConfigError(_no_fit_message(space, failures, "on the GPU"))
    fit = min(counts)
    worst = results[counts.index(fit)]
    if budget.gpus_per_trial == "auto":
        share = min(fit, budget.concurrency)
        space = resolve_gpus_per_trial(space, 1 / share)
        log.info("budget.gpus_per_trial auto -> %.4g: %d trial(s) per GPU (%d of %s fit, concurrency %d)",
                 space.budget.gpus_per_trial, share, fit, _case_short(worst), budget.concurrency)
    else:
        gpus = budget.gpus_per_trial
        per_gpu = 1 if gpus >= 1 else math.floor(1 / gpus + 1e-9)
        sharing = min(per_gpu, budget.concurrency)
        if fit < sharing:
            raise ConfigError(
                f"{space.source}: key 'budget.gpus_per_trial' is {gpus:g}, which puts up to {sharing} trials on one "
                f"GPU (concurrency {budget.concurrency}), but only {fit} of {_case(worst)} fit together: each needs "
                f"{format_bytes(_need(worst))} of {format_bytes(usable[counts.index(fit)])} usable "
                f"({HEADROOM:.0%} kept free). Set gpus_per_trial: {1 / fit:.4g} (or auto), lower budget.concurrency, "
                f"or lower the largest data.batch_size or data.crop_size in space:")
    report = ProbeReport(device="cuda", gpus_per_trial_setting=budget.gpus_per_trial,
                         gpus_per_trial=space.budget.gpus_per_trial, trials_at_once=fit,
                         available_bytes=min(usable), results=results)
    return space, report


def _check_cpu(space: SearchSpace, results: list[ProbeResult], address: str | None,
               setting: float | str) -> ProbeReport:
    budget = space.budget
    available = available_host_memory()
    for result in results:
        _log_result(result, f"{format_bytes(_need(result))} per trial with torch loaded")
    failures = [(result, available) for result in results if not result.fits or result.peak_bytes is None]
    if failures:
        raise ConfigError(_no_fit_message(space, failures, "in this machine's memory"))
    # a cluster spreads the trials over its nodes: this machine can only vouch for one
    at_once = 1 if address else budget.concurrency
    worst = max(results, key=_need)
    if available is None:
        log.warning("budget.probe: this machine's available memory cannot be read; the trials launch unchecked")
        fit = at_once
    else:
        usable = available * (1 - HEADROOM)
        fit = int(usable // _need(worst))
        if fit == 0:
            raise ConfigError(_no_fit_message(space, [(worst, available)], "in this machine's memory"))
        if fit < at_once:
            raise ConfigError(
                f"{space.source}: {at_once} trials at once (budget.concurrency) of {_case(worst)} need "
                f"{format_bytes(at_once * _need(worst))} ({format_bytes(_need(worst))} each: peak "
                f"{format_bytes(worst.peak_bytes)} + {format_bytes(worst.process_bytes or 0)} for the process), but "
                f"this machine has {format_bytes(available)} available ({HEADROOM:.0%} kept free): only {fit} fit. "
                f"Set budget.concurrency: {fit}, or lower the largest data.batch_size or data.crop_size in space:")
    return ProbeReport(device="cpu", gpus_per_trial_setting=setting, gpus_per_trial=budget.gpus_per_trial,
                       trials_at_once=fit, available_bytes=available, results=results)


# --- numbers and messages ------------------------------------------------------------------------

def _usable_gpu_bytes(result: ProbeResult) -> int:
    """What the GPU offered the probe: free memory plus the probe's own context (already
    created when it measured; :func:`trials_per_gpu` counts one per trial)."""
    free, total = result.device_free_bytes, result.device_total_bytes
    if free is None or total is None:
        free, total = gpu_memory_bytes()
    return min(total, free + CUDA_CONTEXT_BYTES)


def _need(result: ProbeResult) -> int:
    """Bytes one trial like ``result`` needs: on CUDA as :func:`trials_per_gpu` counts it,
    on CPU its peak plus the process it runs in (Python, torch)."""
    if result.device.startswith("cuda"):
        return max(result.reserved_bytes or 0, result.peak_bytes or 0) + CUDA_CONTEXT_BYTES
    return (result.peak_bytes or 0) + (result.process_bytes or 0)


def _case(cfg: Config | ProbeResult) -> str:
    if isinstance(cfg, Config):
        arch, backbone, batch, crop = cfg.model.arch, cfg.model.backbone, cfg.data.batch_size, cfg.data.crop_size
    else:
        arch, backbone, batch, crop = cfg.arch, cfg.backbone, cfg.batch_size, cfg.crop_size
    return f"{arch}/{backbone} at data.batch_size {batch} and data.crop_size [{crop[0]}, {crop[1]}]"


def _case_short(result: ProbeResult) -> str:
    height, width = result.crop_size
    return f"{result.arch}/{result.backbone} (batch {result.batch_size}, crop {height}x{width})"


def _log_result(result: ProbeResult, verdict: str) -> None:
    if result.fits and result.peak_bytes is not None:
        log.info("probe %s on %s (%s): peak %s, reserved %s, %.3f s/step; %s", _case_short(result), result.device,
                 result.precision, format_bytes(result.peak_bytes), format_bytes(result.reserved_bytes),
                 result.step_seconds or 0.0, verdict)
    else:
        log.info("probe %s on %s (%s): does not fit (%s)", _case_short(result), result.device, result.precision,
                 result.error or "out of memory")


def _no_fit_message(space: SearchSpace, failures: list[tuple[ProbeResult, int | None]], where: str) -> str:
    lines = []
    for result, usable in failures:
        if result.fits and result.peak_bytes is not None:
            measured = f"needs {format_bytes(_need(result))}"
        else:
            measured = f"ran out of memory in the probe ({result.error or 'out of memory'})"
        offered = "unknown" if usable is None else format_bytes(usable)
        lines.append(f"{_case(result)}: {measured}; {offered} available ({HEADROOM:.0%} kept free)")
    backbones = ", ".join(sorted({result.backbone for result, _ in failures}))
    sampled = "model.backbone" in space.keys
    backbone_fix = f"drop {backbones} from model.backbone" if sampled else f"use a smaller backbone than {backbones}"
    return (f"{space.source}: the largest trials of the space do not fit {where} (one training step probed at the "
            f"largest batch and crop the space allows):\n  " + "\n  ".join(lines) +
            f"\nLower the largest data.batch_size or data.crop_size in space:, or {backbone_fix} "
            f"(budget.probe: false launches without this check)")
