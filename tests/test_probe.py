"""The memory and speed probe: what it measures, in-process and isolated, and trials_per_gpu."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from seg.config import Config
from seg.probe import CUDA_CONTEXT_BYTES, ProbeResult, count_step_flops, probe, trials_per_gpu

GiB = 2**30


def tiny(batch: int = 1, crop: tuple[int, int] = (32, 64), device: str = "cpu") -> Config:
    return Config().with_overrides({"model.arch": "fcn32s", "model.backbone": "resnet18", "data.batch_size": batch,
                                    "data.crop_size": list(crop), "train.num_threads": 1, "train.device": device})


def result(peak: int | None, reserved: int | None = None, fits: bool = True) -> ProbeResult:
    return ProbeResult(arch="fcn8s", backbone="vgg16", batch_size=8, crop_size=(512, 1024), device="cuda:0",
                       precision="bf16", channels_last=True, threads=1, fits=fits, peak_bytes=peak,
                       reserved_bytes=reserved, step_seconds=0.5, best_step_seconds=0.5, first_step_seconds=2.0, parameters=134_000_000)


def test_probe_measures_a_training_step_on_cpu() -> None:
    threads = torch.get_num_threads()
    measured = probe(tiny(), count_flops=True)
    assert measured.fits and measured.error is None
    assert measured.device == "cpu" and measured.precision == "fp32" and not measured.channels_last
    assert measured.threads == 1
    assert measured.step_seconds > 0 and measured.first_step_seconds > 0
    assert measured.parameters == sum(p.numel() for p in
                                      __import__("seg.models", fromlist=["build_model"]).build_model("fcn32s").parameters())
    assert measured.flops > 0 and measured.flops_per_second > 0
    assert measured.samples_per_second == pytest.approx(1 / measured.step_seconds)
    assert torch.get_num_threads() == threads, "the probe must restore the caller's thread count"
    assert measured.to_dict()["crop_size"] == [32, 64]


def test_isolated_probe_sees_memory_grow_with_the_batch() -> None:
    small = probe(tiny(batch=1, crop=(64, 128)), isolated=True)
    large = probe(tiny(batch=8, crop=(64, 128)), isolated=True)
    assert small.fits and large.fits
    # In a fresh process the peak holds at least weights and gradients (fp32); in a
    # long-lived one freed heap is reused, so only the isolated probe can be held to this.
    assert small.peak_bytes >= 2 * 4 * small.parameters
    assert large.peak_bytes > small.peak_bytes
    assert small.process_bytes and small.process_bytes > 0


def test_flop_count_of_a_convolution_by_hand() -> None:
    # forward 2*N*H*W*Cin*Cout; backward: the weight gradient only (the input needs none)
    n, c_in, c_out, h, w = 2, 3, 19, 8, 16
    model = nn.Conv2d(c_in, c_out, 1, bias=False)
    images = torch.randn(n, c_in, h, w)
    targets = torch.randint(0, c_out, (n, h, w))
    flops = count_step_flops(model, images, targets, nn.CrossEntropyLoss())
    assert flops == 2 * (2 * n * h * w * c_in * c_out)
    assert all(p.grad is None for p in model.parameters()), "gradients are cleared afterwards"


def test_trials_per_gpu() -> None:
    # per trial: the larger of peak and reserved, plus a CUDA context; 10% headroom
    assert trials_per_gpu(result(4 * GiB, 5 * GiB), 80 * GiB) == int(72 * GiB // (5 * GiB + CUDA_CONTEXT_BYTES))
    assert trials_per_gpu(result(4 * GiB, 5 * GiB), 80 * GiB, max_trials=4) == 4
    assert trials_per_gpu(result(6 * GiB, None), 80 * GiB, headroom=0.0, context_bytes=0) == 13
    assert trials_per_gpu(result(70 * GiB, 79 * GiB), 80 * GiB) == 0, "does not fit even alone"
    assert trials_per_gpu(result(None, None, fits=False), 80 * GiB) == 0
    with pytest.raises(ValueError):
        trials_per_gpu(result(GiB), 80 * GiB, headroom=1.0)


def test_probe_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        probe(tiny(), timed_steps=0)
    with pytest.raises(ValueError):
        probe(tiny(), precision="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_on_cuda_with_amp_and_channels_last() -> None:
    cfg = tiny(batch=2, crop=(128, 256), device="cuda")
    measured = probe(cfg, count_flops=True)
    assert measured.fits and measured.device.startswith("cuda")
    assert measured.precision in ("bf16", "fp16") and measured.channels_last
    assert measured.peak_bytes > 0 and measured.reserved_bytes >= measured.peak_bytes
    fp32 = probe(cfg, precision="fp32", channels_last=False)
    assert fp32.precision == "fp32" and fp32.peak_bytes > 0
    isolated = probe(dataclasses.replace(cfg), isolated=True)
    assert trials_per_gpu(isolated, torch.cuda.get_device_properties(0).total_memory) >= 1
