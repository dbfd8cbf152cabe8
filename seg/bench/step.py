"""Part ``step``: training-step efficiency against the machine's matmul peak.

For each model, FLOPs of one forward+backward are counted by ``FlopCounterMode`` and
divided by the measured time of a full training step (forward, loss, backward, SGD
step) on random data of the configured batch and crop; the ratio to the matmul peak of
the same device, precision and threads, measured in the same run, is the efficiency.
Each model is probed in a fresh process (``seg.probe.probe(isolated=True)``), which
also gives its peak memory.

The engine's overhead: ``seg.engine.train_one_epoch`` over in-memory batches (no data
loading) against bare training steps of the same model, interleaved in one process.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from seg.bench.machine import cpu_bf16_units, matmul_peak
from seg.bench.report import Figure, Section, Table
from seg.config import IGNORE_INDEX, NUM_CLASSES, Config
from seg.probe import format_bytes, probe, train_step

__all__ = ["DEFAULT_MODELS", "MODEL_NAMES", "default_variants", "bench_config", "run_step_part",
           "measure_engine_overhead"]

DEFAULT_MODELS = (("fcn8s", "vgg16"), ("fcn32s", "resnet18"), ("fcn8s", "resnet50"))
MODEL_NAMES = {"fcn8s": "FCN-8s", "fcn16s": "FCN-16s", "fcn32s": "FCN-32s", "vgg16": "VGG16",
               "resnet18": "ResNet-18", "resnet50": "ResNet-50", "mobilenet_v3_large": "MobileNetV3-L"}
# (arch, backbone, precision) held to a goal on the efficiency: the target
GOALS = {("fcn8s", "vgg16", "cpu", "fp32"): 0.85}
# variant -> (precision, channels_last)
VARIANTS = {"fp32": ("fp32", False), "fp32-cl": ("fp32", True), "tf32": ("tf32", False),
            "tf32-cl": ("tf32", True), "bf16": ("bf16", False), "bf16-cl": ("bf16", True),
            "fp16-cl": ("fp16", True)}


def default_variants(device: torch.device) -> tuple[str, ...]:
    """CPU: fp32, what training uses by default, and bf16 with channels_last
    (``train.cpu_amp``) where the CPU has bf16 units; without them bf16 is emulated and
    several times slower (opt in with ``--variants fp32,bf16-cl``).
    CUDA: fp32, TF32 and bf16 AMP with channels_last."""
    if device.type == "cuda":
        return ("fp32", "tf32", "bf16-cl")
    return ("fp32", "bf16-cl") if cpu_bf16_units() else ("fp32",)


def model_name(arch: str, backbone: str) -> str:
    return f"{MODEL_NAMES.get(arch, arch)}/{MODEL_NAMES.get(backbone, backbone)}"


def bench_config(arch: str, backbone: str, batch: int, crop: tuple[int, int], threads: int,
                 device: torch.device, **overrides: Any) -> Config:
    """The default config with the model, batch, crop, threads and device of a benchmark."""
    return Config().with_overrides({"model.arch": arch, "model.backbone": backbone, "data.batch_size": batch,
                                    "data.crop_size": list(crop), "train.num_threads": threads,
                                    "train.device": str(device), **overrides})


def run_step_part(device: torch.device, threads: int, *, models=DEFAULT_MODELS, crop=(256, 512), batch: int = 2,
                  timed_steps: int = 3, variants: tuple[str, ...] | None = None,
                  engine_steps: int = 6, peak_sizes: tuple[int, ...] | None = None, log=print) -> Section:
    started = time.perf_counter()
    variants = variants or default_variants(device)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown step variants {unknown}; valid: {', '.join(VARIANTS)}")
    section = Section("step", "1. Training step efficiency")
    precisions = tuple(dict.fromkeys(VARIANTS[v][0] for v in variants))
    peaks = {precision: matmul_peak(device, precision, threads, sizes=peak_sizes) for precision in precisions}
    for precision, peak in peaks.items():
        log(f"[step] matmul peak {precision}, {threads} threads: {peak['gflops']:.1f} GFLOP/s (n={peak['size']})")

    measured = []  # (name, variant, precision, probe result, flops)
    for arch, backbone in models:
        cfg = bench_config(arch, backbone, batch, crop, threads, device)
        flops = None
        for variant in variants:
            precision, channels_last = VARIANTS[variant]
            result = probe(cfg, timed_steps=timed_steps, warmup_steps=1, count_flops=flops is None, isolated=True,
                           device=device, precision=precision, channels_last=channels_last)
            flops = result.flops if flops is None else flops
            measured.append((model_name(arch, backbone), variant, precision, result, flops))
            if result.fits:
                log(f"[step] {model_name(arch, backbone)} {variant}: {flops / 1e9:.0f} GFLOP/step, "
                    f"{result.best_step_seconds:.3f} s/step (median {result.step_seconds:.3f}), "
                    f"{flops / result.best_step_seconds / 1e9:.1f} GFLOP/s, peak memory {format_bytes(result.peak_bytes)}")
            else:
                log(f"[step] {model_name(arch, backbone)} {variant}: does not fit ({result.error})")

    # the peak again after the models: under a varying load, the better of the two is the peak
    for precision, peak in peaks.items():
        after = matmul_peak(device, precision, threads, sizes=peak_sizes)
        peak["after_models"] = after["gflops"]
        if after["gflops"] > peak["gflops"]:
            peak.update(gflops=after["gflops"], size=after["size"])

    rows = []
    for name, variant, precision, result, flops in measured:
        if not result.fits:
            rows.append([name, variant, "-", "-", "-", "-", "-", "-", "-", "does not fit", "-"])
            continue
        # the fastest timed step against the best matmul: both what the machine gives at best
        achieved = flops / result.best_step_seconds / 1e9
        peak = peaks[precision]["gflops"]
        arch, backbone = result.arch, result.backbone
        goal = GOALS.get((arch, backbone, device.type, precision))
        section.figures.append(Figure(
            f"{name} {variant}: training FLOP/s / matmul peak", achieved, "GFLOP/s", peak,
            f"{precision} matmul peak ({peaks[precision]['size']}), {threads} threads" if device.type == "cpu"
            else f"{precision} matmul peak ({peaks[precision]['size']})",
            goal=(">=", goal) if goal else None))
        rows.append([name, variant, f"{result.parameters / 1e6:.1f}M", round(flops / 1e9, 1),
                     round(result.best_step_seconds, 3), round(result.step_seconds, 3),
                     round(result.first_step_seconds, 2), round(achieved, 1), f"{100 * achieved / peak:.1f}%",
                     format_bytes(result.peak_bytes), round(batch / result.step_seconds, 2)])
    # what each faster variant buys over fp32, model by model (step times of one run)
    fp32_steps = {name: result for name, variant, _, result, _ in measured if variant == "fp32" and result.fits}
    for name, variant, _, result, _ in measured:
        if variant != "fp32" and result.fits and name in fp32_steps:
            section.figures.append(Figure(
                f"{name}: fp32 step time / {variant} step time (speed-up)", fp32_steps[name].step_seconds, "s",
                result.step_seconds, f"{variant} median step", percent=False))
    section.tables.append(Table(
        f"Training steps: batch {batch}, crop {crop[0]}x{crop[1]}, {threads} threads, {device}; {timed_steps} timed "
        f"step(s) after 1 warm-up; GFLOP/s from the fastest step",
        ["model", "variant", "params", "GFLOP/step", "best s/step", "median s/step", "first step s", "GFLOP/s",
         "of peak", "peak memory", "samples/s (median)"], rows))
    section.tables.append(Table(
        "Matmul peak: best of 5 per size of torch.mm (BLAS) and of the same product as a 1x1 convolution "
        "(oneDNN / cuDNN); measured before and after the models, the better one is used",
        ["precision", "GFLOP/s", "before the models, by size", "after the models"],
        [[p, round(v["gflops"], 1), ", ".join(f"{n}: {g:.0f}" for n, g in v["by_size"].items()),
          round(v["after_models"], 1)] for p, v in peaks.items()]))
    results = [entry[3] for entry in measured]
    section.notes.append("FLOPs are FlopCounterMode's: convolutions and matmuls of forward+backward, 2 per "
                         "multiply-add; the loss, element-wise layers and the optimiser step are not counted "
                         "but are timed, so the efficiency is a lower bound on the convolutions' own.")
    section.notes.append(f"Peak memory: {results[0].memory_method if results else '-'}; each model probed in a "
                         f"fresh process (seg.probe.probe(isolated=True)).")

    # the engine's own per-step cost, on the cheapest model measured
    fits = [r for r in results if r.fits and r.flops]
    if fits and engine_steps > 0:
        cheapest = min(fits, key=lambda r: r.flops)
        name = model_name(cheapest.arch, cheapest.backbone)
        engine = measure_engine_overhead(
            bench_config(cheapest.arch, cheapest.backbone, batch, crop, threads, device), device,
            steps=engine_steps, precision=cheapest.precision, channels_last=cheapest.channels_last)
        log(f"[step] engine: {engine['engine_seconds']:.3f} s/step in train_one_epoch vs "
            f"{engine['bare_seconds']:.3f} s/step bare ({name})")
        section.figures.append(Figure(
            f"engine train_one_epoch step time / bare step ({name})", engine["engine_seconds"], "s",
            engine["bare_seconds"], "bare training step, same process", goal=("<=", 1.02), percent=False))
        section.data["engine"] = engine
    section.data.update({"peaks": peaks, "probes": [r.to_dict() for r in results]})
    section.seconds = time.perf_counter() - started
    return section


def measure_engine_overhead(cfg: Config, device: torch.device, steps: int = 6, rounds: int = 3,
                            precision: str = "fp32", channels_last: bool = False) -> dict[str, Any]:
    """Seconds per step of ``train_one_epoch`` over in-memory batches vs bare ``train_step``s.

    Both run the same model, optimiser and batches, in alternating blocks of ``steps``
    (``rounds`` of each), so that drifting machine load hits both alike; the medians of
    the blocks' means are compared.
    """
    from seg.engine import train_one_epoch
    from seg.losses import build_loss
    from seg.models import build_model_from_config
    from seg.optim import build_optimizer, build_scheduler

    previous = torch.get_num_threads()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        model = build_model_from_config(cfg.model).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss_fn = build_loss(cfg, None).to(device)
        optimizer = build_optimizer(cfg.optim, model)
        scheduler = build_scheduler(cfg.optim, optimizer, total_iters=10 * rounds * steps)
        height, width = cfg.data.crop_size
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(cfg.data.batch_size, 3, height, width, generator=generator)
        targets = torch.randint(0, NUM_CLASSES, (cfg.data.batch_size, height, width), generator=generator)
        targets[:, :, :4] = IGNORE_INDEX
        # the engine moves batches to the device itself; bare steps get them there already
        batches = [(images, targets)] * steps
        on_device = images.to(device), targets.to(device)
        if channels_last:
            on_device = on_device[0].contiguous(memory_format=torch.channels_last), on_device[1]
        train_step(model, *on_device, loss_fn, optimizer, amp_dtype).item()  # warm-up
        bare, engine = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(steps):
                loss = train_step(model, *on_device, loss_fn, optimizer, amp_dtype)
                scheduler.step()
            loss.item()
            bare.append((time.perf_counter() - started) / steps)
            result = train_one_epoch(model, batches, optimizer, scheduler, loss_fn, device, max_steps=steps,
                                     amp_dtype=amp_dtype, channels_last=channels_last)
            engine.append(result["seconds"] / result["steps"])
        return {"bare_seconds": statistics.median(bare), "engine_seconds": statistics.median(engine),
                "bare_blocks": bare, "engine_blocks": engine, "steps": steps, "model": f"{cfg.model.arch}/{cfg.model.backbone}"}
    finally:
        torch.set_num_threads(previous)
