"""Promotion gate: the challenger replaces the champion only if it wins on the same test set.

The registry (a folder or s3:// prefix) holds every evaluated release under
`releases/<run>/` and one pointer, `champion.json`, replaced atomically: readers see the
old champion or the new one, never a mix.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline import storage
from pipeline.config import Config
from pipeline.models.files import CLASSIFIER_FILE
from pipeline.model_card import CARD_MARKDOWN, with_run_report, write_markdown
from pipeline.runinfo import read_usage

CHAMPION = "champion.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
LAST_EVALUATED = "last_evaluated.json"  # the data the newest challenger saw, promoted or not


def champion_pointer(registry: str, name: str = CHAMPION) -> dict | None:
    uri = storage.join(registry, name)
    return storage.read_json(uri) if storage.exists(uri) else None


def decide(cfg: Config, outputs: dict[str, str], registry: str, run_name: str,
           stages: dict[str, str] | None = None) -> dict:
    """`outputs`: URIs of this run's `reports`, `prepared` and `release` outputs; `stages`: how each
    stage was obtained (ran, restored, ran after N restarts: causes), recorded in the archived card."""
    metrics = storage.read_json(storage.join(outputs["reports"], "metrics.json"))
    challenger = metrics["test"]["accuracy"]
    champion = champion_pointer(registry)
    decision = {"run": run_name, "challenger_accuracy": challenger, "margin": cfg.evaluate.promotion_margin,
                "champion_run": None, "champion_accuracy": None}
    if champion is None:
        decision.update(promoted=True, reason="no champion yet")
    else:
        champion_model = storage.join(champion["release"], CLASSIFIER_FILE)
        decision["champion_run"] = champion["run"]
        # A release from before safetensors bundles has only a pickle, which is never loaded.
        if not storage.exists(champion_model):
            decision.update(promoted=True, reason=f"champion has no {CLASSIFIER_FILE} (an older pickle bundle, "
                                                  "never loaded); champion not comparable")
        else:
            # Re-score the champion on *this* test set: the data may have changed since it was promoted.
            scored = rescore(champion_model, outputs["prepared"], cfg.evaluate.batch_size)
            if scored["accuracy"] is None:
                decision.update(promoted=True, reason=f"classes changed ({scored['classes']} -> "
                                                      f"{scored['data_classes']}); champion not comparable")
            else:
                current = scored["accuracy"]
                decision["champion_accuracy"] = current
                won = challenger > current + cfg.evaluate.promotion_margin
                decision.update(promoted=won, reason=f"challenger {challenger:.4f} vs champion {current:.4f} "
                                                      f"+ margin {cfg.evaluate.promotion_margin}")
    release = storage.join(registry, "releases", run_name)
    decision["release"] = release
    _archive(outputs["release"], release, decision, stages or {}, read_usage(cfg, "evaluate"))
    storage.write_json(storage.join(registry, LAST_EVALUATED), {
        "run": run_name, "data_version": metrics["data_version"], "corpus_version": metrics.get("corpus_version"),
        "promoted": decision["promoted"]})
    if decision["promoted"]:
        storage.write_json(storage.join(registry, CHAMPION), {
            "run": run_name, "release": release, "test_accuracy": challenger,
            "data_version": metrics["data_version"], "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
    return decision


def rescore(model_uri: str, prepared_uri: str, batch_size: int) -> dict:
    """`pipeline score` in a process of its own (the flow process stays free of torch) -> its JSON line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pipeline", "score", "--model", model_uri, "--prepared", prepared_uri,
                           "--batch-size", str(batch_size)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"re-scoring the champion {model_uri} failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _archive(bundle: str, target: str, decision: dict, stages: dict[str, str], report: dict | None) -> None:
    """Every challenger is kept with its card, now carrying the decision, how each stage was obtained
    (restarts and their causes included) and the run's facts (timings, hardware: the evaluate run report,
    which the release bundle leaves out so that it stays a pure function of its inputs); only winners
    get the pointer."""
    card = with_run_report(storage.read_json(storage.join(bundle, "model_card.json")), report)
    card["promotion"] = decision
    card["stages"] = stages
    with storage.staged_output(target) as out:
        (out / CLASSIFIER_FILE).write_bytes(storage.read_bytes(storage.join(bundle, CLASSIFIER_FILE)))
        storage.write_json(str(out / "model_card.json"), card)
        image = card.get("curves")  # the card embeds it: keep it beside the card
        if isinstance(image, str) and image == Path(image).name and storage.exists(storage.join(bundle, image)):
            (out / image).write_bytes(storage.read_bytes(storage.join(bundle, image)))
        write_markdown(card, out / CARD_MARKDOWN)  # now with the decision and the stage outcomes
