"""What the benchmark ran on, and the machine's measured matmul peak.

The peak is what a large ``torch.mm`` reaches on this device with these threads in this
run (the best of a few repetitions over a few sizes), not a datasheet number: a model's
efficiency is its FLOP/s over this peak, both measured minutes apart.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from seg.bench.report import slug
from seg.probe import torch_threads

__all__ = ["describe_machine", "matmul_peak", "cpu_model", "available_cores", "load_average"]

# per device type: sizes of the square matmuls tried (the best of them is the peak)
CPU_SIZES = (2048, 3072)
CUDA_SIZES = (4096, 8192)
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cores() -> int:
    """Cores this process may run on (the affinity mask where there is one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 hardware that oneDNN uses (``"AMX"``, ``"AVX-512 BF16"``), or None:
    bf16 is then emulated in fp32 and slower than fp32 itself."""
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
    for name, check in checks:
        with contextlib.suppress(Exception):  # private torch.cpu helpers: absent means unknown
            if getattr(torch.cpu, check)():
                return name
    return None


def describe_machine(device: torch.device, threads: int) -> dict[str, Any]:
    """CPU/GPU model, cores and threads, memory, library versions, load (no Ray/MLflow import)."""
    cpu = cpu_model()
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu,
        "cores available": available_cores(),
        "torch threads": threads,
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages * page_size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu memory"] = f"{props.total_memory / 2**30:.1f} GiB"
        info["gpu count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        name = props.name
    else:
        name = cpu
    info.update({
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "ray": _version("ray"),
        "optuna": _version("optuna"),
        "mlflow": _version("mlflow"),
        "numpy": _version("numpy"),
        "mkldnn (oneDNN)": torch.backends.mkldnn.is_available(),
        "cpu capability": torch.backends.cpu.get_cpu_capability(),
        "bf16 units": cpu_bf16_units() or "none (bf16 emulated)",
        "load average before": load_average(),
    })
    short = slug(name.replace("(R)", "").replace("(TM)", ""))
    if device.type == "cuda":
        info["device_slug"] = f"cuda-{short}"
        info["device_name"] = f"{name} (CUDA)"
    else:
        info["device_slug"] = f"cpu-{short}-{threads}t"
        info["device_name"] = f"{name}, {threads} threads"
    return info


def matmul_peak(device: torch.device, precision: str = "fp32", threads: int | None = None,
                sizes: tuple[int, ...] | None = None, repeats: int = 5) -> dict[str, Any]:
    """The best GFLOP/s of a large matrix product in ``precision`` (fp32, tf32, bf16, fp16).

    Two libraries do matrix products for a training step, so both are measured and the
    better is the peak: square ``torch.mm`` (the BLAS: MKL on CPU, cuBLAS on CUDA) and
    the same product as a 1x1 convolution of ``n`` channels over ``n`` pixels (oneDNN on
    CPU, cuDNN on CUDA), which is how convolutions run. On an AMD CPU, MKL's fp32 GEMM
    may not use the AVX-512 path that oneDNN uses, hence both.

    CPU: ``threads`` intra-op threads (restored afterwards). CUDA: timed with events after
    a warm-up; ``tf32`` turns TF32 on, ``fp32`` off. Returns ``{"gflops": best, "size":
    the best's label, "by_size": {"mm 2048": gflops, "conv1x1 2048": gflops, ...}}``.
    """
    dtype = DTYPES[precision]
    sizes = sizes or (CUDA_SIZES if device.type == "cuda" else CPU_SIZES)
    by_size: dict[str, float] = {}
    with torch_threads(threads), _tf32(device, precision == "tf32"):
        for n in sizes:
            generator = torch.Generator(device="cpu").manual_seed(n)
            a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
            b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
            out = torch.empty(n, n, device=device, dtype=dtype)
            by_size[f"mm {n}"] = 2 * n**3 / _best_time(functools.partial(torch.mm, a, b, out=out), device, repeats) / 1e9
            # the same product as a convolution: n input channels, n output channels, n pixels
            side = int(n**0.5)
            pixels = torch.randn(1, n, side, n // side, generator=generator).to(device=device, dtype=dtype)
            pixels = pixels.contiguous(memory_format=torch.channels_last)
            weight = (b.reshape(n, n, 1, 1) / n**0.5).contiguous(memory_format=torch.channels_last)
            flops = 2 * n * n * side * (n // side)
            by_size[f"conv1x1 {n}"] = flops / _best_time(functools.partial(torch.nn.functional.conv2d, pixels, weight),
                                                         device, repeats) / 1e9
            del a, b, out, pixels, weight
    size = max(by_size, key=by_size.get)
    return {"gflops": by_size[size], "size": size, "by_size": by_size, "precision": precision}


def _best_time(function, device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` runs after a warm-up (library initialisation, allocation)."""
    function()
    if device.type == "cuda":
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):  # kernels of a few ms: time several back to back
                function()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000 / 10)
        return best
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


@contextlib.contextmanager
def _tf32(device: torch.device, allow: bool):
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
