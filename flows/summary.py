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


MAX_EMBEDDED_PNG = 2_000_000  # bytes: a larger curves.png is linked by its path, not embedded


def format_value(series: str, value: float) -> str:
    """A curve value as people read it: learning rates in scientific notation (3.00e-03, never 0.0030 or
    0.0000 near the end of a cosine schedule), throughput to one decimal, loss and accuracy to 4 decimals."""
    name = series.rsplit("/", 1)[-1]
    if name == "lr":
        return f"{value:.2e}"
    if name == "images_per_s":
        return f"{value:.1f}"
    return f"{value:.4f}"


def curves_markdown(curves: dict, points_per_series: int = 6, release: str | None = None) -> str:
    """{series: [[step, value], ...]} -> markdown for the run's `curves` artifact: the release's
    `curves.png` (the same three panels as the model card), embedded as a data: URI so the Prefect UI
    shows it with no file server, and linked by its path; then a small table per series with a few evenly
    spaced points (first and last always). `release`: the release folder (path or URI) holding
    `curves.png`; without it, or without the file, the tables alone."""
    lines = []
    if release is not None:
        lines += _picture(release)
    lines.append("Training curves (from the release's `curves.json`; a few points per series).")
    for name, points in curves.items():
        points = list(points or [])
        if not points:
            continue
        count = min(points_per_series, len(points))
        picks = sorted({round(i * (len(points) - 1) / max(count - 1, 1)) for i in range(count)})
        lines += ["", f"**{name}** ({len(points)} points)", "", "| step | value |", "|---:|---:|"]
        lines += [f"| {int(points[i][0])} | {format_value(name, float(points[i][1]))} |" for i in picks]
    return "\n".join(lines)


def _picture(release: str) -> list[str]:
    import base64

    from pipeline import storage
    from pipeline.curves import CURVES_PNG

    uri = storage.join(release, CURVES_PNG)
    if not storage.exists(uri):
        return []
    data = storage.read_bytes(uri)
    lines = []
    if len(data) <= MAX_EMBEDDED_PNG:
        lines += [f"![training curves](data:image/png;base64,{base64.b64encode(data).decode('ascii')})", ""]
    lines += [f"The picture: `{uri}` (also in the model card and the archived release).", ""]
    return lines
