"""The group restarts as one, and stuck pods fail fast (KubernetesLauncher on the API stand-in).

Losing any rank (eviction = DisruptionTarget, a crash) fails the attempt's Job at once
(backoffLimit 0, podFailurePolicy FailJob), its controller stops the surviving ranks, and the
launcher starts a new Job with all ranks that resumes from the last checkpoint, up to
max_restarts; then it gives up with one line and leaves nothing running. A pod Pending past
pending_timeout_seconds deletes the Job and raises StagePendingTimeout with the scheduler's reason.
"""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from pipeline.launch import StageCommand
from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from pipeline.launch.k8s_api import KubernetesLaunchError
from pipeline.launch.kubernetes import KubernetesLauncher, StagePendingTimeout, StageRestartsExhausted
from pipeline.models.bundle import load_backbone
from tests.k8s_standin import k8s_standin  # noqa: F401  (pytest fixture)
from tests.k8s_standin.fixture import FAKE, FAKE_IMAGE, wait_for

INDEX = "batch.kubernetes.io/job-completion-index"
pytest_plugins = ["tests.s3_fixtures"]
JOB = "pipeline.example/job"


class TimedLines:
    """Thread-safe log collector that remembers when each line arrived."""

    def __init__(self):
        self.lock, self.lines = threading.Lock(), []

    def __call__(self, line: str) -> None:
        with self.lock:
            self.lines.append((time.monotonic(), line))

    def text(self) -> str:
        with self.lock:
            return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str, after: float = 0.0) -> tuple[float, re.Match] | None:
        with self.lock:
            for at, line in self.lines:
                match = re.search(pattern, line)
                if at >= after and match:
                    return at, match
        return None



def _fake_cfg(tmp_path: Path, **overrides) -> KubernetesLaunchConfig:
    base = dict(namespace="ml", image=FAKE_IMAGE, command=FAKE, poll_seconds=0.2,
                log_dir=str(tmp_path / "logs"), termination_grace_seconds=3)
    return KubernetesLaunchConfig(**{**base, **overrides})


def _fake_cmd(mode: str) -> StageCommand:
    return StageCommand(stage="pretrain", args=["--set", "pretrain.max_steps=8"], env={"FAKE_MODE": mode},
                        run_id="restart-run")


def _rank_pod(pods: list[dict], rank: int) -> dict:
    return next(p for p in pods if p["metadata"]["annotations"][INDEX] == str(rank))


def _start(launcher, cmd, log) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["code"] = launcher.run(cmd, log)
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


# ---- fast: tests/k8s_standin/fake_stage.py ----------------------------------------------------

def test_evicting_one_rank_stops_the_group_and_restarts_all_ranks_as_a_new_job(k8s_standin, tmp_path):  # noqa: F811
    launcher = KubernetesLauncher(_fake_cfg(tmp_path, nodes=2, max_restarts=2), k8s_standin.api_client())
    log = TimedLines()
    thread, outcome = _start(launcher, _fake_cmd("sleep:600"), log)
    first = wait_for(lambda: len(pods := k8s_standin.running()) == 2 and pods, "2 running ranks")
    first_job = first[0]["metadata"]["labels"][JOB]
    k8s_standin.evict(_rank_pod(first, 1)["metadata"]["name"])
    # The surviving rank 0 is stopped by the Job controller (FailJob), not left in its collective.
    survivor = [p for p in k8s_standin.processes()[:2]]
    wait_for(lambda: all(p.poll() is not None for p in survivor), "both ranks of attempt 1 stopped", 15)
    second = wait_for(lambda: len(pods := k8s_standin.running(exclude=first_job, label=JOB)) == 2 and pods,
                      "attempt 2 running both ranks", 30)
    second_job = second[0]["metadata"]["labels"][JOB]
    assert second_job != first_job and launcher.jobs == [first_job, second_job]
    assert not [p for p in k8s_standin.pods() if p["metadata"]["labels"][JOB] == first_job]
    assert {j["metadata"]["name"] for j in k8s_standin.jobs()} == {second_job}
    (job2,) = k8s_standin.jobs()
    assert job2["metadata"]["labels"]["pipeline.example/attempt"] == "2"
    assert launcher.restarts[0].startswith("rank 1 lost (DisruptionTarget")
    assert re.search(r"restart 1/2 of pretrain: rank 1 lost \(DisruptionTarget[^)]*\) on attempt 1 of 3", log.text())
    launcher.cancel()
    thread.join(30)
    wait_for(lambda: not k8s_standin.jobs() and not k8s_standin.pods(), "Job and pods gone")


def test_restarts_exhausted_fail_with_one_line_and_leave_nothing_running(k8s_standin, tmp_path):  # noqa: F811
    launcher = KubernetesLauncher(_fake_cfg(tmp_path, nodes=2, max_restarts=1), k8s_standin.api_client())
    log = TimedLines()
    thread, outcome = _start(launcher, _fake_cmd("sleep:600"), log)
    seen_jobs = set()
    for _ in range(2):  # attempt 1 and attempt 2 each lose rank 1
        pods = wait_for(lambda: len(p := k8s_standin.running()) == 2
                        and p[0]["metadata"]["labels"][JOB] not in seen_jobs and p, "2 running ranks", 30)
        seen_jobs.add(pods[0]["metadata"]["labels"][JOB])
        k8s_standin.evict(_rank_pod(pods, 1)["metadata"]["name"])
    thread.join(60)
    error = outcome.get("error")
    assert isinstance(error, StageRestartsExhausted) and isinstance(error, KubernetesLaunchError), outcome
    message = str(error)
    assert "\n" not in message
    assert re.fullmatch(r"pretrain: rank 1 lost \(DisruptionTarget(: EvictionByEvictionAPI)?\) "
                        r"on attempt 2 of 2; giving up", message), message
    assert len(error.restarts) == 1 and error.restarts == launcher.restarts
    assert message in log.text()
    assert re.search(r"pretrain: exit code \d+ after 2 attempt\(s\), 1 restart\(s\) \(restart 1: rank 1 lost", log.text())
    assert k8s_standin.jobs() == [] and k8s_standin.pods() == [] and k8s_standin.services() == []
    assert all(p.poll() is not None for p in k8s_standin.processes())
    assert len(k8s_standin.processes()) == 4


def test_exit_2_of_one_rank_fails_at_once_without_restart(k8s_standin, tmp_path):  # noqa: F811
    launcher = KubernetesLauncher(_fake_cfg(tmp_path, nodes=2, max_restarts=3), k8s_standin.api_client())
    log = TimedLines()
    assert launcher.run(_fake_cmd("exit:2"), log) == 2
    assert launcher.restarts == [] and len(launcher.jobs) == 1
    assert len(k8s_standin.processes()) <= 2  # one Job's ranks, never a second attempt
    assert "restart 1/" not in log.text() and "0 restart(s)" in log.text()


def test_unschedulable_pod_fails_fast_with_the_schedulers_reason(k8s_standin, tmp_path):  # noqa: F811
    # The stand-in's node has no GPU: a pod asking for one stays Pending, Unschedulable.
    launcher = KubernetesLauncher(_fake_cfg(tmp_path, nodes=2, gpus_per_node=1, pending_timeout_seconds=2),
                                  k8s_standin.api_client())
    with pytest.raises(StagePendingTimeout) as caught:
        launcher.run(_fake_cmd("ok"), TimedLines())
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, KubernetesLaunchError)
    assert re.match(r"pretrain: rank [01] \(pod \S+\) still Pending after 2 s: 0/1 nodes are available: "
                    r"1 Insufficient nvidia\.com/gpu", message), message
    wait_for(lambda: not k8s_standin.jobs() and not k8s_standin.pods(), "Job and pods gone")
    assert k8s_standin.processes() == []


def test_container_config_error_fails_fast_with_the_kubelets_reason(k8s_standin, tmp_path):  # noqa: F811
    launcher = KubernetesLauncher(_fake_cfg(tmp_path, env_from_secret="no-such-secret", pending_timeout_seconds=2),
                                  k8s_standin.api_client())
    with pytest.raises(StagePendingTimeout,
                       match=r"still Pending after 2 s: CreateContainerConfigError: secret \"no-such-secret\" not found"):
        launcher.run(_fake_cmd("ok"), TimedLines())
    wait_for(lambda: not k8s_standin.jobs() and not k8s_standin.pods(), "Job and pods gone")


# ---- slow: a real 2-node DDP pretrain ----------------------------------------------------------

# ~58 steps at world size 2: long enough to evict mid-training, checkpoints every 5 steps.
LONG_TINY = ["pretrain.epochs=2", "pretrain.glyphs_per_class=100", "pretrain.batch_size=32",
             "pretrain.model.width=8", "pretrain.model.depth=1", "pretrain.checkpoint_every_n_steps=5",
             "trainer.log_every_n_steps=1"]
CHECKPOINT_EVERY = 5
STEP = r"\[rank 0\] \[pretrain\] step (\d+)/(\d+)"


def _pretrain(standin, tmp_path: Path, s3, name: str, evict_rank: int | None) -> dict:
    """Prepare locally, then a 2-node pretrain through the launcher; optionally evict a rank at step >= 10."""
    from pipeline.params import load_config
    from pipeline.stages import stage_runner
    from tests.conftest import PARAMS

    root = s3.uri(name)  # every pod and attempt shares S3, as on a cluster
    sets = [*LONG_TINY, f"paths.root={root}"]
    pod_env = standin.lend_s3(s3.endpoint)
    stage_runner("corpus")(load_config(PARAMS, sets))  # pretrain reads the corpus only
    cfg = KubernetesLaunchConfig(namespace="ml", image="registry.example/pipeline:test", nodes=2,
                                 poll_seconds=0.3, log_dir=str(tmp_path / f"logs-{name}"),
                                 termination_grace_seconds=20, max_restarts=2)
    launcher = KubernetesLauncher(cfg, standin.api_client())
    log = TimedLines()
    command = StageCommand("pretrain", args=[part for s in sets for part in ("--set", s)], env=pod_env, run_id=name)
    thread, outcome = _start(launcher, command, log)
    if evict_rank is not None:
        wait_for(lambda: log.first(r"\[pretrain\] step (1[0-9]|[2-9][0-9])/"), "10 training steps", 240)
        pods = standin.running()
        first_job = pods[0]["metadata"]["labels"][JOB]
        standin.evict(_rank_pod(pods, evict_rank)["metadata"]["name"])
        wait_for(lambda: len(standin.running(exclude=first_job, label=JOB)) == 2, "attempt 2 running both ranks", 120)
    thread.join(600)
    assert "code" in outcome, outcome
    # The stage's output summary, and its run report (resumes, timings: never part of a DVC output).
    summary = {**json.loads(s3.fs.cat_file(f"{root}/models/pretrain/summary.json")),
               **json.loads(s3.fs.cat_file(f"{root}/reports/usage/pretrain.json"))}
    weights = load_backbone(f"{root}/models/pretrain/backbone.safetensors")
    return dict(code=outcome["code"], text=log.text(), log=log, summary=summary, weights=weights["backbone"],
                launcher=launcher)


@pytest.mark.slow
def test_real_two_node_pretrain_evicted_rank_restarts_the_group_from_the_checkpoint(k8s_standin, tmp_path, s3):  # noqa: F811
    run = _pretrain(k8s_standin, tmp_path, s3, "evicted", evict_rank=1)
    text, log = run["text"], run["log"]
    assert run["code"] == 0, text[-4000:]
    launcher = run["launcher"]
    # The eviction restarts the group once. On a loaded 2-core machine a restarted rank has also been seen to
    # abort (exit 134) while the evicted attempt's processes were still going away; that is a second restart
    # within max_restarts, and the run must still end exactly where an uninterrupted one does.
    assert 1 <= len(launcher.restarts) <= 2 and len(launcher.jobs) == len(launcher.restarts) + 1, launcher.restarts
    assert launcher.restarts[0].startswith("rank 1 lost (DisruptionTarget"), launcher.restarts
    total = int(re.search(r"total_steps=(\d+)", text).group(1))
    summary = run["summary"]
    assert summary["world_size"] == 2 and summary["steps"] == total
    resumes = [int(step) for step in re.findall(r"resuming from \S+ at step (\d+)", text)]
    resumed = resumes[0]
    assert summary["resumed_from_step"] == resumes[-1] and len(resumes) == len(launcher.restarts)
    # Steps lost: the furthest attempt 1 got minus where attempt 2 resumed, at most one checkpoint interval.
    restart_line = log.first(r"restart 1/2 of pretrain")[0]
    with log.lock:
        attempt1 = [int(m.group(1)) for at, line in log.lines if at < restart_line and (m := re.search(STEP, line))]
    lost = max(attempt1) - resumed
    # A SIGTERM on rank 1 alone stops both ranks at one step (pipeline/stop_together.py), where every rank
    # joins the checkpoint: the next attempt resumes where the evicted one stopped, not at an interval.
    assert re.search(r"SIGTERM at step \d+: saved", text), "no SIGTERM checkpoint"
    assert resumed > 0 and lost <= 1 and resumed <= max(attempt1) + 1, (max(attempt1), resumed)
    first_step = log.first(rf"\[rank 0\] \[pretrain\] step {resumed + 1}/", after=restart_line)
    assert first_step, text[-3000:]

    reference = _pretrain(k8s_standin, tmp_path, s3, "uninterrupted", evict_rank=None)
    assert reference["code"] == 0 and reference["launcher"].restarts == []
    assert reference["summary"]["steps"] == summary["steps"] == total
    # Two uninterrupted 2-node runs are bit-identical, and the resume is exact: the loader restarts at the
    # batch the checkpoint had reached (pipeline/data/stream.py) and the checkpoint carries the RNG state,
    # so the evicted-and-restarted run ends with the uninterrupted run's weights.
    diff = {k: run["weights"][k].float() - v.float() for k, v in reference["weights"].items()}
    worst = max(d.abs().max().item() for d in diff.values())
    rel = (sum((d ** 2).sum().item() for d in diff.values())
           / sum((v.float() ** 2).sum().item() for v in reference["weights"].values())) ** 0.5
    assert set(diff) == set(run["weights"])
    assert worst == 0.0, (rel, worst)
