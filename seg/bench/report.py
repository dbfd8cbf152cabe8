"""Benchmark figures, sections and the report, written as Markdown with a JSON twin.

A :class:`Figure` is a ratio of two measurements taken in the same run (e.g. a model's
training FLOP/s over the matmul peak measured minutes before, same threads), with the
goal it is held to. A :class:`Section` is one part of the benchmark: its figures, tables
of the measurements behind them, and notes (findings, fixes, caveats).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Figure", "Table", "Section", "Report", "report_paths", "write_report"]


@dataclass
class Figure:
    """``value`` / ``reference``, both measured in this run, against a goal on the ratio.

    ``goal`` is ``(">=", 0.85)`` or ``("<=", 0.05)`` or None. ``percent``: show the ratio
    as a percentage (efficiencies, fractions) rather than as ``2.3x``.
    """

    name: str
    value: float
    unit: str
    reference: float
    reference_name: str
    goal: tuple[Literal[">=", "<="], float] | None = None
    percent: bool = True
    note: str = ""

    @property
    def ratio(self) -> float:
        if not self.reference or not math.isfinite(self.reference) or not math.isfinite(self.value):
            return math.nan
        return self.value / self.reference

    @property
    def met(self) -> bool | None:
        if self.goal is None or not math.isfinite(self.ratio):
            return None
        op, threshold = self.goal
        return self.ratio >= threshold if op == ">=" else self.ratio <= threshold

    def show_ratio(self, ratio: float | None = None) -> str:
        ratio = self.ratio if ratio is None else ratio
        if not math.isfinite(ratio):
            return "n/a"
        return f"{100 * ratio:.1f}%" if self.percent else f"{ratio:.2f}x"

    def show_goal(self) -> str:
        if self.goal is None:
            return "-"
        op, threshold = self.goal
        return f"{op.replace('>=', '≥').replace('<=', '≤')} {self.show_ratio(threshold)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": _finite(self.value), "unit": self.unit,
                "reference": _finite(self.reference), "reference_name": self.reference_name,
                "ratio": _finite(self.ratio), "percent": self.percent, "goal": list(self.goal) if self.goal else None,
                "met": self.met, "note": self.note}


@dataclass
class Table:
    caption: str
    headers: list[str]
    rows: list[list[Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"caption": self.caption, "headers": self.headers, "rows": [[_finite(c) for c in r] for r in self.rows]}


@dataclass
class Section:
    key: str  # step, loader, harness, parallel, search
    title: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # how long the part took
    data: dict[str, Any] = field(default_factory=dict)  # raw measurements, JSON only

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "seconds": round(self.seconds, 1),
                "figures": [f.to_dict() for f in self.figures], "tables": [t.to_dict() for t in self.tables],
                "notes": self.notes, "data": _jsonable(self.data)}


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    sections: list[Section] = field(default_factory=list)
    started: str = field(default_factory=lambda: dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    seconds: float = 0.0
    load_after: tuple[float, float, float] | None = None

    def figures(self) -> list[Figure]:
        return [figure for section in self.sections for figure in section.figures]

    def to_dict(self) -> dict[str, Any]:
        return {"started": self.started, "seconds": round(self.seconds, 1), "machine": _jsonable(self.machine),
                "settings": _jsonable(self.settings), "load_after": self.load_after,
                "sections": [s.to_dict() for s in self.sections]}

    def to_markdown(self) -> str:
        m = self.machine
        lines = [f"# Benchmark: {m.get('device_name', m.get('device'))}, {self.started[:10]}", "",
                 f"`{self.settings.get('command', 'python scripts/bench.py')}` — started {self.started}, "
                 f"took {self.seconds:.0f} s. Every figure is a ratio of two measurements taken in this run.", ""]
        lines += ["## Machine", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in self.machine.items()
                  if key not in ("device_slug", "device_name")]
        lines += [f"| load average after | {_cell(self.load_after)} |"] if self.load_after else []
        lines += ["", "## Summary", "", "| part | figure | measured | reference | ratio | goal | met |",
                  "|---|---|---|---|---|---|---|"]
        for section in self.sections:
            for figure in section.figures:
                lines.append(f"| {section.key} | {figure.name} | {_number(figure.value)} {figure.unit} | "
                             f"{_number(figure.reference)} {figure.unit} ({figure.reference_name}) | "
                             f"{figure.show_ratio()} | {figure.show_goal()} | {_met(figure.met)} |")
        for section in self.sections:
            lines += ["", f"## {section.title}", "", f"_{section.seconds:.0f} s_", ""]
            for table in section.tables:
                lines += [f"**{table.caption}**", "", "| " + " | ".join(table.headers) + " |",
                          "|" + "---|" * len(table.headers)]
                lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
                lines.append("")
            for note in section.notes:
                lines.append(f"- {note}")
        return "\n".join(lines).rstrip() + "\n"


def report_paths(directory: str | Path, device_slug: str, date: str, suffix: str = "") -> tuple[Path, Path]:
    """``<dir>/<device>-<date><suffix>.md`` and its ``.json``; ``-2``, ``-3``... when taken."""
    directory = Path(directory)
    stem = f"{device_slug}-{date}{suffix}"
    candidate, number = stem, 1
    while (directory / f"{candidate}.md").exists() or (directory / f"{candidate}.json").exists():
        number += 1
        candidate = f"{stem}-{number}"
    return directory / f"{candidate}.md", directory / f"{candidate}.json"


def write_report(report: Report, directory: str | Path, suffix: str = "") -> tuple[Path, Path]:
    """Write the Markdown and the JSON twin; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    markdown, twin = report_paths(directory, report.machine.get("device_slug", "device"), report.started[:10], suffix)
    markdown.write_text(report.to_markdown())
    twin.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return markdown, twin


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return _finite(value)


def _number(value: float) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _met(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "**no**")
