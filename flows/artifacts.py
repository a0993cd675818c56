"""What a finished run leaves for people: Prefect artifacts (metrics, the promotion decision, curves), where
each stage output lives, and the `runs/latest` link."""
from __future__ import annotations

import os
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import workspace as wsmod
from pipeline import storage
from pipeline.config import Config


def artifact_uri(ws: wsmod.Workspace, cfg: Config, name: str) -> str:
    """Where a stage output lives: under the workspace by default, else under `paths.root`."""
    if cfg.paths.root in ("", ".") and "://" not in getattr(cfg.paths, name):
        return str(ws.root / getattr(cfg.paths, name))
    return cfg.paths.uri(name)


def publish_artifacts(metrics: dict, decision: dict, ws: wsmod.Workspace, cfg: Config, data: dict) -> None:
    scratch = metrics.get("scratch", {}).get("test", {}).get("accuracy")
    create_table_artifact(key="metrics", description="Test-set metrics", table=[
        {"model": "fine-tuned", "test accuracy": metrics["test"]["accuracy"], "test loss": metrics["test"]["loss"]},
        {"model": "scratch (same budget)", "test accuracy": scratch, "test loss": None},
    ])
    champion = decision["champion_accuracy"]
    create_markdown_artifact(key="promotion", description="Promotion decision", markdown="\n".join([
        "| | |", "|---|---|",
        f"| data version | `{data['data_version']}` ({data['source']}) |",
        f"| pretraining corpus | `{data['corpus']['version']}` ({data['corpus']['source']}) |",
        f"| labels per class | {cfg.finetune.labels_per_class} |",
        f"| fine-tuned test accuracy | {metrics['test']['accuracy']:.4f} |",
        f"| scratch test accuracy | {scratch if scratch is None else f'{scratch:.4f}'} |",
        f"| **transfer gain** | **{metrics.get('transfer_gain', float('nan')):+.4f}** |",
        f"| champion accuracy (same test set) | {'n/a' if champion is None else f'{champion:.4f}'} |",
        f"| decision | **{'promoted' if decision['promoted'] else 'not promoted'}**: {decision['reason']} |",
        f"| model + card | `{decision['release']}` |",
        f"| workspace | `{ws.root}` |",
    ]))


def publish_curves(release: str, points_per_series: int = 6) -> None:
    """The release's `curves.json` ({series: [[step, value], ...]}) as a "curves" markdown artifact: a few
    evenly spaced points per series, first and last included. No file (yet): nothing."""
    from flows.summary import curves_markdown

    uri = storage.join(release, "curves.json")
    try:
        if not storage.exists(uri):
            return
        markdown = curves_markdown(storage.read_json(uri), points_per_series, release=release)
    except Exception as exc:  # noqa: BLE001 - a view of the curves never fails a finished run
        get_run_logger().warning("curves artifact skipped: %s: %s", type(exc).__name__, exc)
        return
    create_markdown_artifact(key="curves", description="Training curves (the release's curves.png, and curves.json thinned)",
                             markdown=markdown)


def link_latest(run_root: Path) -> None:
    latest = run_root.parent / "latest"
    tmp = run_root.parent / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_root.name)
    os.replace(tmp, latest)
