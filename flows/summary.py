"""The readable table printed at the end of `make run`."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_summary(result: dict) -> None:
    metrics, decision = result["metrics"], result["promotion"]
    table = Table(title=f"pipeline run {result['run']}", show_header=True)
    table.add_column("item")
    table.add_column("value", overflow="fold")
    for stage, outcome in result["stages"].items():
        table.add_row(f"stage {stage}", outcome)
    table.add_row("data version", result["data"]["data_version"])
    table.add_row("fine-tuned test accuracy", f"{metrics['test']['accuracy']:.4f}")
    if "scratch" in metrics:
        table.add_row("scratch test accuracy (same budget)", f"{metrics['scratch']['test']['accuracy']:.4f}")
        table.add_row("transfer gain", f"{metrics['transfer_gain']:+.4f}")
    table.add_row("promotion", ("PROMOTED" if decision["promoted"] else "not promoted") + f": {decision['reason']}")
    table.add_row("model + card", decision["release"])
    table.add_row("workspace", result["workspace"])
    Console().print(table)


def curves_markdown(curves: dict, points_per_series: int = 6) -> str:
    """{series: [[step, value], ...]} -> a markdown table per series with a few evenly spaced points
    (first and last always): readable on the Prefect run page without an image."""
    lines = ["Training curves (from the release's `curves.json`; a few points per series)."]
    for name, points in curves.items():
        points = list(points or [])
        if not points:
            continue
        count = min(points_per_series, len(points))
        picks = sorted({round(i * (len(points) - 1) / max(count - 1, 1)) for i in range(count)})
        lines += ["", f"**{name}**", "", "| step | value |", "|---:|---:|"]
        lines += [f"| {int(points[i][0])} | {float(points[i][1]):.4f} |" for i in picks]
    return "\n".join(lines)
