"""Preemption of a real pretrain stage on the Kubernetes API stand-in.

The evicted pod gets SIGTERM (as the kubelet sends it) and exits 143; the Job's podFailurePolicy
fails the Job on the disruption (its controller stops the other ranks), and the launcher starts a
new attempt, a new Job with all ranks, that resumes from the checkpoint on shared storage. The
stage ends with exactly the configured number of steps.
"""
from __future__ import annotations

import json
import re
import threading

import pytest

from pipeline.launch import StageCommand
from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from pipeline.launch.kubernetes import KubernetesLauncher
from tests.integration.test_k8s_launcher import Lines
from tests.k8s_standin.fixture import wait_for as _wait_for
from tests.k8s_standin import k8s_standin  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.s3_fixtures"]

# ~58 steps: long enough to evict mid-training, checkpoints every 5 steps.
LONG_TINY = ["pretrain.epochs=2", "pretrain.glyphs_per_class=100", "pretrain.batch_size=32",
             "pretrain.model.width=8", "pretrain.model.depth=1", "pretrain.checkpoint_every_n_steps=5",
             "trainer.log_every_n_steps=1"]


def _run_and_evict(standin, tmp_path, s3, nodes: int, evict_index: int) -> tuple[int, str, dict, KubernetesLauncher]:
    # Shared storage for every pod and attempt is S3, as on a cluster: each pod's own filesystem goes with it.
    root = s3.uri("artifacts")
    sets = [*LONG_TINY, f"paths.root={root}"]
    pod_env = standin.lend_s3(s3.endpoint)
    from pipeline.params import load_config
    from pipeline.stages import stage_runner
    from tests.conftest import PARAMS

    stage_runner("corpus")(load_config(PARAMS, sets))  # pretrain reads the corpus only
    cfg = KubernetesLaunchConfig(namespace="ml", image="registry.example/pipeline:test", nodes=nodes,
                                 poll_seconds=0.3, log_dir=str(tmp_path / "logs"), termination_grace_seconds=20,
                                 max_restarts=3)
    launcher = KubernetesLauncher(cfg, standin.api_client())
    log, outcome = Lines(), {}
    command = StageCommand("pretrain", args=[part for s in sets for part in ("--set", s)], env=pod_env,
                           run_id="preempt")
    thread = threading.Thread(target=lambda: outcome.update(code=launcher.run(command, log)))
    thread.start()
    _wait_for(lambda: re.search(r"\[pretrain\] step (1[0-9]|[2-9][0-9])/", log.text()), "10 training steps", 180)
    victim = next(p for p in standin.pods()
                  if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == str(evict_index))
    standin.evict(victim["metadata"]["name"])
    thread.join(300)
    # The stage's output summary, and its run report (resumes, timings: never part of a DVC output).
    summary = {**json.loads(s3.fs.cat_file(f"{root}/models/pretrain/summary.json")),
               **json.loads(s3.fs.cat_file(f"{root}/reports/usage/pretrain.json"))}
    return outcome.get("code"), log.text(), summary, launcher


def test_single_node_eviction_resumes_to_the_configured_steps(k8s_standin, tmp_path, s3):  # noqa: F811
    code, text, summary, launcher = _run_and_evict(k8s_standin, tmp_path, s3, nodes=1, evict_index=0)
    assert code == 0, text[-3000:]
    assert len(launcher.jobs) == 2 and launcher.restarts[0].startswith("rank 0 lost (DisruptionTarget")
    assert re.search(r"SIGTERM at step \d+: saved", text), "the evicted pod did not checkpoint"
    resumed = re.search(r"resuming from \S+ at step (\d+)", text)
    assert resumed and int(resumed.group(1)) >= 10
    total = int(re.search(r"total_steps=(\d+)", text).group(1))
    assert summary["steps"] == total and summary["resumed_from_step"] == int(resumed.group(1))


def test_two_node_eviction_of_one_rank_resumes_both(k8s_standin, tmp_path, s3):  # noqa: F811
    """Rank 1 is preempted; the Job fails at once, its controller stops rank 0, and a new Job runs both ranks."""
    code, text, summary, launcher = _run_and_evict(k8s_standin, tmp_path, s3, nodes=2, evict_index=1)
    assert code == 0, text[-3000:]
    assert len(launcher.jobs) == 2 and launcher.restarts[0].startswith("rank 1 lost (DisruptionTarget")
    resumed = re.search(r"resuming from \S+ at step (\d+)", text)
    assert resumed and int(resumed.group(1)) >= 5
    total = int(re.search(r"total_steps=(\d+)", text).group(1))
    assert summary["world_size"] == 2 and summary["steps"] == total
