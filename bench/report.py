"""Writing a benchmark's results: ``report.json`` (everything), ``report.md`` (the table), a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def table(headers: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines: the header, its separator and one line per row of already formatted cells."""
    return ["| " + " | ".join(map(str, cells)) + " |" for cells in (headers, ["---"] * len(headers), *rows)]


def ms_chart(report: dict, xlabel: str, *, log: bool = False):
    """One horizontal bar per batch and engine of ``report["results"]`` (``{batch: {engine: {"ms": ...}}}``) that
    ran: its median time."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels, values = [], []
    for batch, result in report["results"].items():
        for name, r in result.items():
            if "ms" in r:
                labels.append(f"b{batch} {name}")
                values.append(r["ms"])
    ax.barh(labels[::-1], values[::-1])
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    return fig


def save_report(out: Path, report: dict, markdown: str, chart: Callable[[dict], Any] | None = None,
                png: str | None = None) -> None:
    """Write ``report.json``, ``report.md`` and, given ``chart`` (``chart(report)`` returns the matplotlib figure),
    the figure as ``png``; print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown, encoding="utf-8")
    if chart is not None:
        fig = chart(report)
        fig.tight_layout()
        fig.savefig(out / png, dpi=110)
        pyplot().close(fig)
    print(markdown)
