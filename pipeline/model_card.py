"""The model card as Markdown, for people: rendered from the same dict as `model_card.json`.

`evaluate` writes `model_card.md` beside the JSON in `models/release/`; promotion re-renders it
in the registry once the card carries its decision and how each stage was obtained. The renderer
takes whatever the card holds and leaves out sections it has no data for (older cards, cards
without curves), so it never fails on a card.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_MARKDOWN = "model_card.md"
# What a run's report (pipeline/runinfo.py, `reports/usage/evaluate.json`) adds to the card: facts about the
# computation, not its result, so never in the release's own card (a DVC output, byte-identical when recomputed).
RUN_FIELDS = ("wall_time_s", "device_hours", "step_time", "hardware", "git_commit", "created_at")
CURVES_IMAGE = "curves.png"
_MAX_CLASSES_LISTED = 30


def _cell(value: Any) -> str:
    """One Markdown table cell: pipes escaped, no line breaks, None as an em dash."""
    if value is None:
        return "—"
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _number(value: Any, digits: int = 4, signed: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _cell(value)
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines + [""]


def _code(value: Any) -> str:
    return "—" if value is None else f"`{_cell(value).replace('`', '')}`"


def _purpose(card: dict) -> list[str]:
    task = card.get("task") or {}
    classes = task.get("classes") or []
    shown = ", ".join(_code(c) for c in classes[:_MAX_CLASSES_LISTED])
    if len(classes) > _MAX_CLASSES_LISTED:
        shown += f", … (+{len(classes) - _MAX_CLASSES_LISTED} more)"
    transform = card.get("image_transform") or {}
    lines = ["## What it is for", ""]
    lines.append(f"Image classification into **{len(classes)} classes**: {shown}." if classes
                 else "Image classification.")
    if transform:
        channels = {1: "grayscale", 3: "RGB"}.get(transform.get("channels"), f"{transform.get('channels')} channels")
        lines.append(f"Input: any image, turned into {transform.get('image_size')}×{transform.get('image_size')} px "
                     f"{channels} by the training transform (EXIF-rotated, shorter side resized, centre-cropped).")
    if task.get("pretraining"):
        lines.append(f"Backbone pretrained first ({_cell(task['pretraining'])}), then fine-tuned on "
                     f"{_cell(task.get('labels_per_class'))} labelled images per class.")
    model = card.get("model")
    if model:
        lines += ["", f"Model file: {_code(model)} (safetensors weights + JSON header: loading it never runs code). "
                      "Classify images with it:", "",
                  "```sh", "pipeline predict IMAGE_OR_FOLDER --model <this release folder, or its run name>", "```"]
    return lines + [""]


def _data(card: dict) -> list[str]:
    lines = ["## Data", ""]
    lines += _table(["dataset", "version", "source"], [
        ["target (fine-tuning, validation, test)", _code(card.get("data_version")), _code(card.get("data_source"))],
        ["pretraining corpus", _code(card.get("corpus_version")), _code(card.get("corpus_source"))],
    ])
    transform = card.get("image_transform")
    if transform:
        details = ", ".join(f"{key} {_code(value)}" for key, value in transform.items())
        lines += [f"Image transform (both datasets, and `pipeline predict`): {details}.", ""]
    return lines


def _metrics(card: dict) -> list[str]:
    metrics = card.get("metrics") or {}
    test = metrics.get("test") or {}
    if not test:
        return []
    lines = ["## Metrics (test set)", ""]
    rows = [["fine-tuned (this model)", _number(test.get("accuracy")), _number(test.get("loss"))]]
    scratch = (metrics.get("scratch") or {}).get("test")
    if scratch:
        rows.append(["scratch baseline (same label budget, random init)", _number(scratch.get("accuracy")),
                     _number(scratch.get("loss"))])
    lines += _table(["model", "accuracy", "loss"], rows)
    if metrics.get("transfer_gain") is not None:
        lines += [f"**Transfer gain: {_number(metrics['transfer_gain'], signed=True)}** "
                  "(fine-tuned minus scratch accuracy).", ""]
    per_class = metrics.get("per_class") or {}
    if per_class:
        lines += ["### Per class", ""]
        lines += _table(["class", "precision", "recall", "support"],
                        [[_code(name), _number(stats.get("precision")), _number(stats.get("recall")),
                          _cell(stats.get("support"))] for name, stats in per_class.items()])
    return lines


def _curves(card: dict) -> list[str]:
    curves = card.get("curves")
    if not curves:
        return []
    image = curves if isinstance(curves, str) and "/" not in curves and curves.endswith((".png", ".svg")) \
        else CURVES_IMAGE
    return ["## Training curves", "", f"![curves]({image})", ""]


def _decision(card: dict) -> list[str]:
    lines = ["## Decision", ""]
    decision = card.get("promotion")
    if not decision:
        return lines + ["Not decided yet: this release has not been through the promotion gate.", ""]
    verdict = "**Promoted**: this model is the champion." if decision.get("promoted") else "**Not promoted.**"
    lines += [f"{verdict} {_cell(decision.get('reason'))}.", ""]
    lines += _table(["", "run", "test accuracy"], [
        ["challenger", _code(decision.get("run")), _number(decision.get("challenger_accuracy"))],
        ["champion before", _code(decision.get("champion_run")), _number(decision.get("champion_accuracy"))],
    ])
    lines += [f"Margin required: {_cell(decision.get('margin'))}.", ""]
    stages = card.get("stages")
    if stages:
        lines += ["How each stage was obtained in this run:", ""]
        lines += _table(["stage", "outcome"], [[_code(stage), _cell(how)] for stage, how in stages.items()])
    return lines


def with_run_report(card: dict, report: dict | None) -> dict:
    """The card with the run's facts (RUN_FIELDS) from its report: what the registry's copy shows."""
    return {**card, **{key: report[key] for key in RUN_FIELDS if report and key in report}}


def _hardware(card: dict) -> list[str]:
    hardware = card.get("hardware") or {}
    times = card.get("wall_time_s") or {}
    if not hardware and not times and not card.get("device_hours"):
        return ["## Hardware and time", "",
                "Not part of this card, so that recomputing the release gives the same bytes: the run's report "
                "(`reports/usage/evaluate.json`) has them, and the registry's copy of the card shows them.", ""]
    lines = ["## Hardware and time", ""]
    if hardware:
        devices = hardware.get("cuda_devices") or []
        lines += [f"- platform: {_code(hardware.get('platform'))}",
                  f"- Python {_cell(hardware.get('python'))}, torch {_cell(hardware.get('torch'))}",
                  f"- CPUs: {_cell(hardware.get('cpu_count'))}; GPUs: "
                  + (", ".join(_cell(d) for d in devices) if devices else "none"), ""]
    usage = (card.get("device_hours") or {}).get("stages") or {}
    if times or usage:
        stages = list(dict.fromkeys([*times, *usage]))
        lines += _table(["stage", "wall time (s)", "device-hours"],
                        [[_code(stage), _number(times[stage], 2) if times.get(stage) is not None else "—",
                          f"{_number((usage.get(stage) or {}).get('hours'))} {_cell((usage.get(stage) or {}).get('kind', ''))}"
                          if stage in usage else "—"] for stage in stages])
    total = (card.get("device_hours") or {}).get("total") or {}
    if total:
        lines += ["Total: " + ", ".join(f"{_number(hours)} {_cell(kind)}-hours" for kind, hours in total.items())
                  + ".", ""]
    step_time = {run: report for run, report in (card.get("step_time") or {}).items() if isinstance(report, dict)}
    if step_time:
        lines += _table(["training run", "median step (ms)", "slowest rank", "its ratio to the median"],
                        [[_code(run), _number(r.get("median_ms"), 1), _cell(r.get("slowest_rank")),
                          _number(r.get("slowest_ratio"), 2)] for run, r in step_time.items()])
    return lines


def _lineage(card: dict) -> list[str]:
    lines = ["## Lineage", ""]
    lines += [f"- git commit: {_code(card.get('git_commit'))}"] if card.get("git_commit") else []
    lines += [f"- created: {_cell(card.get('created_at'))}"] if card.get("created_at") else []
    lines += [f"- data version: {_code(card.get('data_version'))}, corpus version: {_code(card.get('corpus_version'))}",
              ""]
    if card.get("params"):
        lines += ["<details><summary>Effective parameters</summary>", "", "```json",
                  json.dumps(card["params"], indent=2, sort_keys=True), "```", "", "</details>", ""]
    return lines


def render_markdown(card: dict) -> str:
    """The card dict (what `model_card.json` holds) as a Markdown document."""
    run = (card.get("promotion") or {}).get("run")
    lines = [f"# Model card{f': {run}' if run else ''}", ""]
    for section in (_purpose, _data, _metrics, _curves, _decision, _hardware, _lineage):
        lines += section(card)
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(card: dict, path: Path) -> None:
    Path(path).write_text(render_markdown(card), encoding="utf-8")
