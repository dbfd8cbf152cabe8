"""Part ``parallel``: several trials at once against one trial with all the threads.

CPU: the aggregate training throughput (samples/s) of ``cores`` concurrent processes
with 1 thread each, against 1 process with ``cores`` threads; the same model, batch and
crop, on in-memory batches. CUDA: ``k`` processes sharing one GPU (k = 1, 2, 4 by
default), against 1.

Processes are spawned, build their model, take a warm-up step, then wait at a barrier
so that they all run their timed steps at the same time; the aggregate throughput is
all samples over the span from the first start to the last end.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import torch

from seg.bench.report import Figure, Section, Table
from seg.bench.step import bench_config, model_name
from seg.config import IGNORE_INDEX, NUM_CLASSES, Config

__all__ = ["run_parallel_part", "concurrent_throughput"]


def run_parallel_part(device: torch.device, threads: int, *, crop=(256, 512), batch: int = 2, steps: int = 4,
                      model: tuple[str, str] = ("fcn32s", "resnet18"), gpu_shares: tuple[int, ...] = (1, 2, 4),
                      log=print) -> Section:
    started = time.perf_counter()
    section = Section("parallel", "4. Parallel trials")
    arch, backbone = model
    name = model_name(arch, backbone)
    rows = []
    if device.type == "cpu":
        cfg = bench_config(arch, backbone, batch, crop, threads, device)
        one = concurrent_throughput(cfg, device, processes=1, threads=threads, steps=steps)
        log(f"[parallel] 1 trial x {threads} threads: {one['samples_per_second']:.2f} samples/s")
        many = concurrent_throughput(cfg, device, processes=threads, threads=1, steps=steps)
        log(f"[parallel] {threads} trials x 1 thread: {many['samples_per_second']:.2f} samples/s")
        section.figures.append(Figure(
            f"{threads} concurrent 1-thread trials / 1 trial with {threads} threads (throughput)",
            many["samples_per_second"], "samples/s", one["samples_per_second"], f"1 trial, {threads} threads",
            percent=False))
        for label, result in ((f"1 x {threads} threads", one), (f"{threads} x 1 thread", many)):
            rows.append([label, round(result["samples_per_second"], 2),
                         ", ".join(f"{s:.3f}" for s in result["step_seconds"]), round(result["span_seconds"], 1)])
        ratio = many["samples_per_second"] / one["samples_per_second"]
        if ratio >= 1.05:
            section.notes.append(f"{ratio:.2f}x: concurrent 1-thread trials use the cores better than one trial's "
                                 f"intra-op threads, so a CPU search should run one trial per core (budget "
                                 f"cpus_per_trial: 1), as search_spaces/quick.yaml does.")
        elif ratio <= 0.95:
            section.notes.append(f"{ratio:.2f}x: one trial with all the threads trains faster than as many 1-thread "
                                 f"trials; with 1-thread trials a search still finishes more trials at once, which "
                                 f"ASHA needs to compare them.")
        else:
            section.notes.append(f"{ratio:.2f}x: throughput is the same either way; run one trial per core "
                                 f"(cpus_per_trial: 1) so that ASHA has trials to compare.")
        section.notes.append("On a loaded machine (load average above the core count) multi-threaded steps slow "
                             "down far more than 1-thread ones (each operator waits for its slowest thread), which "
                             "inflates this ratio: compare only quiet runs.")
    else:
        cfg = bench_config(arch, backbone, batch, crop, threads, device)
        base = None
        for count in gpu_shares:
            result = concurrent_throughput(cfg, device, processes=count, threads=max(1, threads // count), steps=steps)
            log(f"[parallel] {count} trial(s) sharing {device}: {result['samples_per_second']:.2f} samples/s")
            base = base or result
            if count > 1:
                section.figures.append(Figure(
                    f"{count} trials sharing one GPU / 1 trial (throughput)", result["samples_per_second"],
                    "samples/s", base["samples_per_second"], "1 trial on the GPU", percent=False))
            rows.append([f"{count} on one GPU", round(result["samples_per_second"], 2),
                         ", ".join(f"{s:.3f}" for s in result["step_seconds"]), round(result["span_seconds"], 1)])
    section.tables.append(Table(
        f"Throughput ({name}, batch {batch}, crop {crop[0]}x{crop[1]}, {steps} timed steps per process)",
        ["setup", "aggregate samples/s", "s/step per process", "span s"], rows))
    section.seconds = time.perf_counter() - started
    return section


def concurrent_throughput(cfg: Config, device: torch.device, processes: int, threads: int,
                          steps: int) -> dict[str, Any]:
    """Aggregate samples/s of ``processes`` spawned processes training ``cfg``'s model at once."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    queue = context.Queue()
    workers = [context.Process(target=_worker, args=(cfg, str(device), threads, steps, barrier, queue), daemon=True)
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    results = []
    try:
        for _ in workers:
            status, payload = queue.get(timeout=1800)
            if status == "error":
                raise RuntimeError(f"a benchmark process failed: {payload}")
            results.append(payload)
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    samples = sum(r["samples"] for r in results)
    return {"samples_per_second": samples / (end - start), "span_seconds": end - start,
            "step_seconds": [(r["end"] - r["start"]) / r["steps"] for r in results], "processes": processes,
            "threads": threads}


def _worker(cfg: Config, device_name: str, threads: int, steps: int, barrier: Any, queue: Any) -> None:
    try:
        torch.set_num_threads(threads)
        from seg.losses import build_loss
        from seg.models import build_model_from_config
        from seg.optim import build_optimizer
        from seg.engine import precision_settings
        from seg.probe import train_step

        device = torch.device(device_name)
        on_cuda = device.type == "cuda"
        amp_dtype, channels_last = precision_settings(cfg.train, device)
        if on_cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model = build_model_from_config(cfg.model).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss_fn = build_loss(cfg, None).to(device)
        optimizer = build_optimizer(cfg.optim, model)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        height, width = cfg.data.crop_size
        images = torch.randn(cfg.data.batch_size, 3, height, width, device=device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = torch.randint(0, NUM_CLASSES, (cfg.data.batch_size, height, width), device=device)
        targets[:, :, :4] = IGNORE_INDEX
        train_step(model, images, targets, loss_fn, optimizer, amp_dtype, scaler).item()  # warm-up
        barrier.wait(timeout=1800)
        start = time.perf_counter()
        for _ in range(steps):
            loss = train_step(model, images, targets, loss_fn, optimizer, amp_dtype, scaler)
        loss.item()
        end = time.perf_counter()
        # perf_counter is system-wide (CLOCK_MONOTONIC) on Linux: comparable across processes
        queue.put(("ok", {"start": start, "end": end, "steps": steps, "samples": steps * cfg.data.batch_size}))
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(error).__name__}: {error}"))
