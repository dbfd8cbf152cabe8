"""Memory and speed probe: one training step of a configuration at its batch and crop.

``probe(cfg)`` builds the model, loss and optimiser of ``cfg``, runs a warm-up step and
a timed step (forward, loss, backward, optimiser step: what a trial does each step) on
random data of ``cfg.data.batch_size x 3 x cfg.data.crop_size``, and returns the peak
memory of the step and its time. The search can call it before launching trials, to
refuse a configuration that cannot fit and to decide how many trials share a GPU
(:func:`trials_per_gpu`).

Peak memory, and what it counts:

* CUDA: ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``, what the
  caching allocator held) over the steps, minus what was allocated before the model was
  built: parameters, gradients, optimiser state, activations and workspaces. The CUDA
  context itself (a few hundred MiB per process) is not in it; :func:`trials_per_gpu`
  adds it per trial.
* CPU: the process's peak resident set (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the model is built) minus its resident set at
  that moment. Where the reset is not possible the peak is ``ru_maxrss``, a high-water
  mark of the whole process: exact only in a fresh process, hence ``isolated=True``.

On CUDA the result also holds the device's memory and what was free before the model
(``torch.cuda.mem_get_info``), so that an isolated probe tells its caller what it
measured against without the caller touching CUDA.

``isolated=True`` probes in a fresh process (spawned): the figures are not skewed by
memory the caller's allocator keeps, a probe that is killed for memory cannot take the
caller down (it comes back as ``fits=False``), and a search driver never creates a CUDA
context of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seg.config import IGNORE_INDEX, NUM_CLASSES, Config

__all__ = ["ProbeResult", "probe", "trials_per_gpu", "count_step_flops", "train_step", "CUDA_CONTEXT_BYTES"]

# What a process's CUDA context and the kernels of torch, cuDNN and cuBLAS take on the
# device before the first tensor: ~300-600 MiB depending on the GPU and library versions.
CUDA_CONTEXT_BYTES = 600 * 2**20


@dataclass(frozen=True)
class ProbeResult:
    """What one probed training step of a configuration needs and how long it takes."""

    arch: str
    backbone: str
    batch_size: int
    crop_size: tuple[int, int]
    device: str  # "cpu", "cuda:0"
    precision: str  # "fp32", "bf16" or "fp16" (autocast), "tf32" (fp32 with TF32 matmuls)
    channels_last: bool
    threads: int  # torch intra-op threads (CPU)
    fits: bool  # False: the step ran out of memory (or the probe process was killed)
    peak_bytes: int | None  # see the module docstring
    reserved_bytes: int | None  # CUDA: the caching allocator's peak; CPU: = peak_bytes
    step_seconds: float | None  # median of the timed steps
    best_step_seconds: float | None  # fastest of the timed steps
    first_step_seconds: float | None  # the warm-up step (allocations, autotuning)
    parameters: int
    flops: int | None = None  # per step, forward + backward (count_flops=True)
    memory_method: str = ""
    process_bytes: int | None = None  # CPU: resident set before the model (torch, Python)
    error: str | None = None
    # CUDA: the device's memory, and what was free before the model (the probe's own context taken)
    device_total_bytes: int | None = None
    device_free_bytes: int | None = None

    @property
    def samples_per_second(self) -> float | None:
        return self.batch_size / self.step_seconds if self.step_seconds else None

    @property
    def flops_per_second(self) -> float | None:
        return self.flops / self.step_seconds if self.flops and self.step_seconds else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "crop_size": list(self.crop_size)}


def trials_per_gpu(probe_result: ProbeResult, gpu_memory_bytes: int, *, headroom: float = 0.1,
                   context_bytes: int = CUDA_CONTEXT_BYTES, max_trials: int | None = None) -> int:
    """How many trials like the probed one fit on a GPU of ``gpu_memory_bytes`` at once.

    Each trial is its own process: it needs what its allocator reserved at peak plus a
    CUDA context; ``headroom`` (a fraction of the GPU) is left for fragmentation and for
    what the probe did not see (evaluation at a larger size, cuDNN workspaces that vary).
    0 means the configuration does not fit even alone: refuse it before launching it.
    ``max_trials`` caps the answer (sharing beyond the point where one trial saturates the
    GPU buys nothing: see the parallel benchmark). Ray's ``gpus_per_trial`` is then
    ``1 / trials_per_gpu(...)``.
    """
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if not probe_result.fits or probe_result.peak_bytes is None:
        return 0
    need = max(probe_result.reserved_bytes or 0, probe_result.peak_bytes) + context_bytes
    count = int(gpu_memory_bytes * (1 - headroom) // need)
    return count if max_trials is None else min(count, max_trials)


def probe(cfg: Config, *, timed_steps: int = 1, warmup_steps: int = 1, count_flops: bool = False,
          isolated: bool = False, device: str | torch.device | None = None,
          precision: str | None = None, channels_last: bool | None = None, timeout: float = 1800) -> ProbeResult:
    """Run ``warmup_steps`` + ``timed_steps`` training steps of ``cfg`` on random data.

    ``device`` defaults to ``cfg.train.device`` (``auto``: CUDA if present). ``precision``
    defaults to what training would use (``bf16``/``fp16`` autocast with ``cfg.train.amp``
    on CUDA, else ``fp32``; ``tf32`` on CUDA means fp32 with TF32 matmuls, as ``fit``
    sets); ``channels_last`` to ``cfg.train.channels_last`` on CUDA. ``count_flops``
    counts the FLOPs of one forward+backward (one extra, slower, untimed step).
    ``cfg.train.num_threads`` is honoured (and restored afterwards when not isolated).
    An out-of-memory step gives ``fits=False`` rather than an exception.
    """
    if timed_steps < 1 or warmup_steps < 0:
        raise ValueError(f"timed_steps must be >= 1 and warmup_steps >= 0, got {timed_steps}, {warmup_steps}")
    options = dict(timed_steps=timed_steps, warmup_steps=warmup_steps, count_flops=count_flops,
                   device=None if device is None else str(device), precision=precision, channels_last=channels_last)
    if isolated:
        return _probe_in_subprocess(cfg, options, timeout)
    return _probe(cfg, **options)


def train_step(model: nn.Module, images: Tensor, targets: Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, amp_dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None) -> Tensor:
    """One optimisation step as ``seg.engine.train_one_epoch`` takes it; returns the (detached) loss."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = loss_fn(model(images), targets)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return loss.detach()


def count_step_flops(model: nn.Module, images: Tensor, targets: Tensor, loss_fn: nn.Module,
                     amp_dtype: torch.dtype | None = None) -> int:
    """FLOPs of one forward + backward, by ``torch.utils.flop_counter.FlopCounterMode``.

    It counts matrix multiplications and convolutions (2 FLOPs per multiply-add), the
    work that matters for a convolutional network; element-wise operations, the loss and
    the optimiser step are not counted. Gradients are cleared afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = loss_fn(model(images), targets)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


# --- the probe itself ------------------------------------------------------------------------

def _probe(cfg: Config, *, timed_steps: int, warmup_steps: int, count_flops: bool, device: str | None,
           precision: str | None, channels_last: bool | None) -> ProbeResult:
    from seg.engine import select_device
    from seg.losses import build_loss
    from seg.models import build_model_from_config
    from seg.optim import build_optimizer

    device = select_device(device or cfg.train.device)
    on_cuda = device.type == "cuda"
    precision = precision or _default_precision(cfg, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if precision not in ("fp32", "tf32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, tf32, bf16 or fp16, got {precision!r}")
    channels_last = (cfg.train.channels_last and on_cuda) if channels_last is None else channels_last
    height, width = cfg.data.crop_size
    batch = cfg.data.batch_size
    base = dict(arch=cfg.model.arch, backbone=cfg.model.backbone, batch_size=batch, crop_size=(height, width),
                device=str(device), precision=precision, channels_last=channels_last)

    with torch_threads(cfg.train.num_threads), _matmul_precision(device, precision):
        threads = torch.get_num_threads()
        memory = _MemoryMeter(device)
        model = optimizer = loss_fn = images = targets = None
        flops = None
        try:
            memory.start()
            # random weights: a pretrained backbone changes no size or time
            model = build_model_from_config(dataclasses.replace(cfg.model, pretrained=False, weights=None))
            model = model.to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            parameters = sum(p.numel() for p in model.parameters())
            loss_fn = build_loss(cfg, None).to(device)
            optimizer = build_optimizer(cfg.optim, model)
            scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
            generator = torch.Generator(device="cpu").manual_seed(0)
            images = torch.randn(batch, 3, height, width, generator=generator).to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = torch.randint(0, NUM_CLASSES, (batch, height, width), generator=generator)
            targets[:, :, : max(1, width // 16)] = IGNORE_INDEX  # some ignored pixels, as in real labels
            targets = targets.to(device)
            times = []
            for _ in range(warmup_steps + timed_steps):
                started = time.perf_counter()
                loss = train_step(model, images, targets, loss_fn, optimizer, amp_dtype, scaler, cfg.optim.grad_clip)
                loss.item()  # the step is done (CUDA: synchronised)
                times.append(time.perf_counter() - started)
            peak, reserved, method = memory.peak()
            if count_flops:
                flops = count_step_flops(model, images, targets, loss_fn, amp_dtype)
        except torch.OutOfMemoryError as error:
            model = optimizer = images = targets = None
            return ProbeResult(**base, threads=threads, fits=False, peak_bytes=None, reserved_bytes=None,
                               step_seconds=None, best_step_seconds=None, first_step_seconds=None, parameters=0,
                               memory_method=memory.method, error=f"out of memory: {str(error)[:300]}",
                               device_total_bytes=memory.device_total, device_free_bytes=memory.device_free)
        finally:
            del model, optimizer, loss_fn, images, targets
            if on_cuda:
                torch.cuda.empty_cache()
    timed = times[warmup_steps:]
    return ProbeResult(**base, threads=threads, fits=True, peak_bytes=peak, reserved_bytes=reserved,
                       step_seconds=statistics.median(timed), best_step_seconds=min(timed),
                       first_step_seconds=times[0], parameters=parameters,
                       flops=flops, memory_method=method, process_bytes=memory.baseline_rss,
                       device_total_bytes=memory.device_total, device_free_bytes=memory.device_free)


def _default_precision(cfg: Config, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    if not cfg.train.amp:
        return "tf32"  # fit enables TF32 matmuls on CUDA
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@contextlib.contextmanager
def torch_threads(count: int | None):
    """Run the block with ``count`` torch intra-op threads (None: unchanged), then restore."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _matmul_precision(device: torch.device, precision: str):
    """TF32 on for ``tf32`` and the autocast precisions (as ``fit`` sets it), off for ``fp32``."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    allow = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    torch.backends.cudnn.benchmark = True  # as fit sets it: fixed crop sizes
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


class _MemoryMeter:
    """Peak memory from ``start()`` on: CUDA allocator statistics, or the CPU resident set."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.baseline_rss: int | None = None
        self.device_total: int | None = None
        self.device_free: int | None = None
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.device_free, self.device_total = torch.cuda.mem_get_info(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        self.baseline_rss = current_rss_bytes()
        if reset_peak_rss():
            self.baseline = current_rss_bytes() or 0
            self.method = "peak RSS (VmHWM reset via /proc/self/clear_refs) - RSS before"
        else:
            self.baseline = self.baseline_rss or 0
            self.method = "ru_maxrss - RSS before (process high-water mark: exact only in a fresh process)"

    def peak(self) -> tuple[int, int, str]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.baseline
            reserved = torch.cuda.max_memory_reserved(self.device)
            return peak, reserved, self.method
        peak = max(0, peak_rss_bytes() - self.baseline)
        return peak, peak, self.method


def current_rss_bytes() -> int | None:
    """The process's resident set now (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
    except OSError:
        return None
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak resident set: ``VmHWM`` where readable, else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


# --- isolated probes -------------------------------------------------------------------------

def _probe_child(cfg: Config, options: dict[str, Any], connection: Any) -> None:
    try:
        connection.send(("ok", _probe(cfg, **options)))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises it
        connection.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


def _probe_in_subprocess(cfg: Config, options: dict[str, Any], timeout: float) -> ProbeResult:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_probe_child, args=(cfg, options, send), daemon=True)
    process.start()
    send.close()
    try:
        if not receive.poll(timeout):
            process.kill()
            raise TimeoutError(f"the probe of {cfg.model.arch}/{cfg.model.backbone} took longer than {timeout} s")
        status, payload = receive.recv()
    except EOFError:  # the child died without answering: killed, most likely for memory
        process.join()
        device = options.get("device") or cfg.train.device
        return ProbeResult(arch=cfg.model.arch, backbone=cfg.model.backbone, batch_size=cfg.data.batch_size,
                           crop_size=tuple(cfg.data.crop_size), device=str(device),
                           precision=options.get("precision") or "?", channels_last=bool(options.get("channels_last")),
                           threads=cfg.train.num_threads or 0, fits=False, peak_bytes=None, reserved_bytes=None,
                           step_seconds=None, best_step_seconds=None, first_step_seconds=None, parameters=0,
                           error=f"the probe process died (exit code {process.exitcode}): out of memory?")
    finally:
        receive.close()
        process.join(timeout=30)
    if status == "error":
        raise RuntimeError(f"probe of {cfg.model.arch}/{cfg.model.backbone} failed: {payload}")
    return payload


def format_bytes(count: int | float | None) -> str:
    """``1.5 GiB``, ``640 MiB``; ``-`` for None."""
    if count is None or (isinstance(count, float) and math.isnan(count)):
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}" if unit == "GiB" else f"{count / size:.0f} {unit}"
    return f"{int(count)} B"
