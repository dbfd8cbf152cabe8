#!/usr/bin/env python
"""Benchmarks against the machine's limit; every figure a ratio of two measurements of one run.

    python scripts/bench.py                                  # everything (~15-20 min on 2 CPU cores)
    python scripts/bench.py --quick                          # every part, small (~3-5 min on 2 cores)
    python scripts/bench.py --parts step,loader --crop 256x512 --batch 2

Parts: step (training FLOP/s vs matmul peak; engine overhead), loader (data pipeline vs
training consumption, waiting for data, stage costs, alternatives), harness (run_search
vs direct fit of the same trials), parallel (concurrent trials vs one trial with all
threads), search (TPE+ASHA vs random search at equal trial-epoch budgets).

Prints the figures and writes them to experiments/benchmarks/<device>-<date>.md with a
JSON twin (-2, -3... when taken). Run it on a quiet machine: other processes on the same
cores change every figure (the load average is recorded before and after each part).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PARTS = ("step", "loader", "harness", "parallel", "search")


def size(text: str) -> tuple[int, int]:
    """``256x512`` or ``256,512`` -> (256, 512)."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 256x512, got {text!r}")
    return int(parts[0]), int(parts[1])


def models(text: str) -> tuple[tuple[str, str], ...]:
    """``fcn8s/vgg16,fcn32s/resnet18`` -> (("fcn8s", "vgg16"), ("fcn32s", "resnet18"))."""
    pairs = []
    for item in text.split(","):
        arch, sep, backbone = item.strip().partition("/")
        if not sep or not arch or not backbone:
            raise argparse.ArgumentTypeError(f"expected ARCH/BACKBONE[,ARCH/BACKBONE...], got {text!r}")
        pairs.append((arch, backbone))
    return tuple(pairs)


def csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in csv(text))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=csv, default=PARTS, help=f"comma-separated, of {','.join(PARTS)} (default all)")
    parser.add_argument("--crop", type=size, help="training crop HEIGHTxWIDTH (default 256x512; --quick 128x256)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--quick", action="store_true", help="every part at small sizes, in a few minutes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, help="torch threads (default: every available core)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "experiments" / "benchmarks",
                        help="where the Markdown and JSON go (default experiments/benchmarks)")
    step = parser.add_argument_group("step")
    step.add_argument("--models", type=models, help="ARCH/BACKBONE,... (default fcn8s/vgg16,fcn32s/resnet18,"
                                                     "fcn8s/resnet50)")
    step.add_argument("--steps", type=int, help="timed training steps per model (default 3; --quick 1)")
    step.add_argument("--peak-sizes", type=ints, help="sizes n of the n x n matmuls the peak is measured on "
                                                      "(default CPU 2048,3072; CUDA 4096,8192). Small sizes "
                                                      "(e.g. 256) only check that the figures are written")
    step.add_argument("--variants", type=csv, help="fp32, fp32-cl, tf32, bf16, bf16-cl, ... (default CPU: fp32, "
                                                    "+bf16-cl with bf16 units; CUDA: fp32,tf32,bf16-cl)")
    loader = parser.add_argument_group("loader")
    loader.add_argument("--workers", type=ints, help="loader worker counts to measure (default 0,1,2; --quick 0,1)")
    loader.add_argument("--full-size-images", type=int, help="full-size 2048x1024 train images to write "
                                                            "(default 4; --quick 2; 0 skips them)")
    loader.add_argument("--loader-batches", type=int, help="batches timed per loader (default 16; --quick 4)")
    harness = parser.add_argument_group("harness")
    harness.add_argument("--harness-trials", type=int, help="trials of the small search (default 4; --quick 2)")
    harness.add_argument("--harness-epochs", type=int, help="epochs per trial (default 2; --quick 1)")
    harness.add_argument("--concurrency", type=int, help="trials at once (default: one per core, at most 2)")
    search = parser.add_argument_group("search")
    search.add_argument("--seeds", type=ints, help="search seeds (default 0,1,2; --quick 0)")
    search.add_argument("--search-budget", type=int, help="trial-epochs per search (default 48; --quick 6)")
    search.add_argument("--search-epochs", type=int, help="max epochs per trial (default 4; --quick 2)")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; valid: {', '.join(PARTS)}")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.peak_sizes is not None and (not args.peak_sizes or min(args.peak_sizes) < 16):
        parser.error(f"--peak-sizes must be sizes >= 16, got {args.peak_sizes}")
    return args


def settings_for(args: argparse.Namespace) -> dict:
    """Every size, from the flags, --quick or the defaults."""
    quick = args.quick

    def pick(value, full, small):
        return value if value is not None else (small if quick else full)

    return {
        "quick": quick,
        "crop": pick(args.crop, (256, 512), (128, 256)),
        "batch": args.batch,
        "models": pick(args.models, (("fcn8s", "vgg16"), ("fcn32s", "resnet18"), ("fcn8s", "resnet50")),
                       (("fcn8s", "vgg16"), ("fcn32s", "resnet18"), ("fcn8s", "resnet50"))),
        "steps": pick(args.steps, 3, 1),
        "variants": args.variants,
        "peak_sizes": args.peak_sizes,
        "workers": pick(args.workers, (0, 1, 2), (0, 1)),
        "full_size_images": pick(args.full_size_images, 4, 2),
        "loader_batches": pick(args.loader_batches, 16, 4),
        "train_steps": 8 if not quick else 3,
        "stage_samples": 3 if not quick else 1,
        "harness_trials": pick(args.harness_trials, 4, 2),
        "harness_epochs": pick(args.harness_epochs, 2, 1),
        "harness_max_steps": None if not quick else 2,
        "parallel_steps": 4 if not quick else 2,
        "seeds": pick(args.seeds, (0, 1, 2), (0,)),
        "search_budget": pick(args.search_budget, 48, 6),
        "search_epochs": pick(args.search_epochs, 4, 2),
        "search_crop": (64, 128) if not quick else (32, 64),
        "search_max_steps": None if not quick else 2,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import torch

    from seg.bench.machine import available_cores, describe_machine, load_average
    from seg.bench.report import Report, write_report
    from seg.engine import select_device
    from seg.errors import SegError

    started = time.perf_counter()
    device = select_device(args.device)
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    settings = settings_for(args)
    concurrency = args.concurrency or max(1, min(2, threads))
    command = shlex.join(["python", "scripts/bench.py", *(sys.argv[1:] if argv is None else argv)])
    report = Report(machine=describe_machine(device, threads),
                    settings={"command": command, "parts": list(args.parts), **settings})
    print(f"benchmark on {report.machine['device_name']} (load average {report.machine['load average before']}); "
          f"parts: {', '.join(args.parts)}", flush=True)

    def log(message: str) -> None:
        print(message, flush=True)

    try:
        for part in args.parts:
            load_before = load_average()
            section = run_part(part, device, threads, concurrency, settings, log)
            section.notes.append(f"Load average (1, 5, 15 min) before this part: {load_before}; after: "
                                 f"{load_average()}.")
            report.sections.append(section)
    except SegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report.seconds = time.perf_counter() - started
    report.load_after = load_average()
    markdown, twin = write_report(report, args.out, suffix="-quick" if args.quick else "")
    print()
    for section in report.sections:
        for figure in section.figures:
            met = "" if figure.met is None else ("  [goal met]" if figure.met else "  [GOAL MISSED]")
            print(f"{section.key:8s} {figure.name}: {figure.show_ratio()} (goal {figure.show_goal()}){met}")
    print(f"\nwrote {markdown} and {twin.name} ({report.seconds:.0f} s)")
    return 0


def run_part(part: str, device, threads: int, concurrency: int, settings: dict, log):
    crop, batch = settings["crop"], settings["batch"]
    fastest = ("fcn32s", "resnet18")  # the cheapest step: the most demanding consumer of data
    if part == "step":
        from seg.bench.step import run_step_part

        return run_step_part(device, threads, models=settings["models"], crop=crop, batch=batch,
                             timed_steps=settings["steps"], variants=settings["variants"],
                             peak_sizes=settings["peak_sizes"], log=log)
    if part == "loader":
        from seg.bench.loader import run_loader_part

        return run_loader_part(device, threads, crop=crop, batch=batch, workers=settings["workers"],
                               loader_batches=settings["loader_batches"], train_steps=settings["train_steps"],
                               model=fastest, full_size=settings["full_size_images"] > 0,
                               full_size_images=settings["full_size_images"], stage_samples=settings["stage_samples"],
                               log=log)
    if part == "parallel":
        from seg.bench.parallel import run_parallel_part

        return run_parallel_part(device, threads, crop=crop, batch=batch, steps=settings["parallel_steps"],
                                 model=fastest, log=log)
    if part == "harness":
        from seg.tuning.bench import run_harness_part

        return run_harness_part(cores=threads, trials=settings["harness_trials"], epochs=settings["harness_epochs"],
                                concurrency=concurrency, max_steps=settings["harness_max_steps"], log=log)
    if part == "search":
        from seg.tuning.bench import run_search_part

        from seg.tuning.bench import SEARCH_DATA, SEARCH_DATA_QUICK

        return run_search_part(cores=threads, budget=settings["search_budget"], max_epochs=settings["search_epochs"],
                               seeds=settings["seeds"], crop=settings["search_crop"],
                               max_steps=settings["search_max_steps"],
                               data=SEARCH_DATA_QUICK if settings["quick"] else SEARCH_DATA, log=log)
    raise ValueError(part)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
