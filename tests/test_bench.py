"""scripts/bench.py at tiny sizes writes the Markdown and JSON with every figure and its ratio (not timed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from seg.bench.report import Figure, Report, Section, Table, report_paths, write_report

REPO = Path(__file__).resolve().parent.parent


def run_bench(out: Path, *args: str, timeout: int = 600) -> tuple[str, Path, dict]:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    markdown = sorted(out.glob("*.md"))
    assert len(markdown) == 1, list(out.iterdir())
    twin = markdown[0].with_suffix(".json")
    assert twin.is_file()
    return markdown[0].read_text(), markdown[0], json.loads(twin.read_text())


def check_figures(text: str, data: dict, sections: set[str]) -> None:
    assert {s["key"] for s in data["sections"]} == sections
    figures = [f for s in data["sections"] for f in s["figures"]]
    assert figures, "every part reports at least one figure"
    for figure in figures:
        assert figure["name"] in text
        assert figure["value"] is not None and figure["reference"] is not None, figure
        assert figure["ratio"] == pytest.approx(figure["value"] / figure["reference"])
        assert math.isfinite(figure["ratio"])
        shown = Figure(figure["name"], figure["value"], figure["unit"], figure["reference"],
                       figure["reference_name"], percent=figure["percent"])
        summary_row = text.split(f"| {figure['name']} |")[1].split("\n")[0]
        assert f"| {shown.show_ratio()} |" in summary_row
    machine = data["machine"]
    for key in ("cpu", "torch threads", "torch", "torchvision", "ray", "optuna", "mlflow", "load average before"):
        assert key in machine and f"| {key} |" in text


@pytest.mark.slow
def test_bench_core_parts_write_every_figure(tmp_path: Path) -> None:
    text, path, data = run_bench(
        tmp_path, "--parts", "step,loader,parallel", "--crop", "32x64", "--batch", "2", "--threads", "1",
        "--models", "fcn32s/resnet18", "--steps", "1", "--variants", "fp32,bf16-cl", "--workers", "0",
        "--full-size-images", "0", "--loader-batches", "2",
        # small matmuls: the bf16 peak must not depend on the CPU having bf16 units (emulated: minutes at 3072)
        "--peak-sizes", "256")
    assert path.name.startswith("cpu-") and path.name.endswith(".md")
    check_figures(text, data, {"step", "loader", "parallel"})
    names = [f["name"] for s in data["sections"] for f in s["figures"]]
    assert any("matmul peak" in n for n in names) and any("engine" in n for n in names)
    assert any("waiting for data" in n for n in names) and any("concurrent" in n for n in names)
    assert "FCN-32s/ResNet-18: fp32 step time / bf16-cl step time (speed-up)" in names
    assert "bf16 units" in data["machine"]
    step = next(s for s in data["sections"] if s["key"] == "step")
    assert step["data"]["probes"][0]["flops"] > 0
    assert {p: sorted(peak["by_size"]) for p, peak in step["data"]["peaks"].items()} == \
        {p: ["conv1x1 256", "mm 256"] for p in ("fp32", "bf16")}
    assert "## Summary" in text and "## 1. Training step efficiency" in text


@pytest.mark.slow
def test_bench_harness_and_search_parts(tmp_path: Path) -> None:
    text, _, data = run_bench(tmp_path, "--parts", "harness,search", "--quick", "--threads", "2",
                              "--harness-trials", "2", "--search-budget", "4", timeout=900)
    check_figures(text, data, {"harness", "search"})
    harness = next(s for s in data["sections"] if s["key"] == "harness")
    assert harness["data"]["search_wall"] > 0 and len(harness["data"]["direct"]) == 2


def test_cpu_default_variants_add_bf16_only_with_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from seg.bench import step

    monkeypatch.setattr(step, "cpu_bf16_units", lambda: None)
    assert step.default_variants(torch.device("cpu")) == ("fp32",)
    monkeypatch.setattr(step, "cpu_bf16_units", lambda: "AMX")
    assert step.default_variants(torch.device("cpu")) == ("fp32", "bf16-cl")
    assert "bf16-cl" in step.default_variants(torch.device("cuda"))


def test_figure_ratio_goal_and_display() -> None:
    efficiency = Figure("vgg", 160.0, "GFLOP/s", 200.0, "peak", goal=(">=", 0.85))
    assert efficiency.ratio == pytest.approx(0.8) and efficiency.met is False
    assert efficiency.show_ratio() == "80.0%" and efficiency.show_goal() == "≥ 85.0%"
    speed = Figure("loader", 10.0, "samples/s", 4.0, "training", goal=(">=", 2.0), percent=False)
    assert speed.met is True and speed.show_ratio() == "2.50x"
    assert Figure("x", 1.0, "s", 0.0, "zero").met is None
    assert Figure("x", 1.0, "s", 0.0, "zero").to_dict()["ratio"] is None


def test_report_is_written_as_markdown_and_json_without_clobbering(tmp_path: Path) -> None:
    section = Section("step", "1. Step", figures=[Figure("f", 1.0, "s", 2.0, "ref", goal=("<=", 0.6))],
                      tables=[Table("t", ["a", "b"], [[1, float("nan")]])], notes=["a note"])
    report = Report(machine={"device_slug": "cpu-test-1t", "device_name": "test", "cpu": "test"},
                    settings={"command": "python scripts/bench.py"}, sections=[section])
    first = write_report(report, tmp_path)
    second = write_report(report, tmp_path)
    assert first[0].name == f"cpu-test-1t-{report.started[:10]}.md" and second[0].name.endswith("-2.md")
    text = first[0].read_text()
    assert "| step | f |" in text and "50.0%" in text and "a note" in text
    data = json.loads(first[1].read_text())
    assert data["sections"][0]["figures"][0]["met"] is True
    assert data["sections"][0]["tables"][0]["rows"] == [[1, None]]
    assert report_paths(tmp_path, "cpu-test-1t", "2000-01-01")[0].name == "cpu-test-1t-2000-01-01.md"


def test_search_curve_helpers() -> None:
    from seg.tuning.bench import budget_to_reach, search_curve

    curve = [(1, 0.1), (2, 0.1), (3, 0.3), (4, 0.35)]
    assert math.isnan(search_curve(curve, 0))
    assert search_curve(curve, 2) == 0.1 and search_curve(curve, 10) == 0.35
    assert budget_to_reach(curve, 0.3) == 3 and budget_to_reach(curve, 0.5) is None
