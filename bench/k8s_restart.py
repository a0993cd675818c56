"""Group restart on the Kubernetes API stand-in: from one rank's eviction to all ranks running again.

    python -m bench.k8s_restart                  # 2 nodes, 5 evictions, fake stage (seconds)
    python -m bench.k8s_restart --nodes 4 --repeats 10 --poll 2.0

Method. The stand-in (tests/k8s_standin) runs an N-node stage of tests/k8s_standin/fake_stage.py
(its image: the built one plus that file) in `steps` mode (one step every 0.2 s, a checkpoint object on
a local moto S3 after every step, SIGTERM -> exit 143), each pod a container in its own network namespace,
launched by KubernetesLauncher with `poll_seconds`. Once all ranks run, rank N-1 is evicted
(DisruptionTarget, graceful delete) and the clock measures:
- stopped: eviction -> every process of the attempt has exited (the Job controller's FailJob);
- running again: eviction -> every rank of the next attempt (a new Job) is Running;
Steps lost are measured on the real 2-node pretrain (tests/integration/test_k8s_group_restart.py,
run with -s): the fake stage checkpoints every step, so it would always show 0.
Medians over --repeats evictions of one launch (max_restarts = repeats). What the stand-in cannot
show: real scheduling, NCCL start-up. With pull delays and real grace periods: python -m bench.k8s_eviction.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from moto.server import ThreadedMotoServer

from pipeline.launch import StageCommand
from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from pipeline.launch.kubernetes import KubernetesLauncher
from pipeline.localserver import free_port
from tests.k8s_standin.fixture import FAKE, FAKE_IMAGE, StandIn, wait_for

INDEX = "batch.kubernetes.io/job-completion-index"
JOB = "pipeline.example/job"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--poll", type=float, default=0.5, help="launcher poll_seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        standin = StandIn(tmp / "pods")
        port = free_port()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        moto.start()
        env = standin.lend_s3(f"http://127.0.0.1:{port}")
        os.environ.update({**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
        import s3fs
        s3fs.S3FileSystem().mkdir("bench-restart")
        checkpoint = "s3://bench-restart/step.ckpt"
        cfg = KubernetesLaunchConfig(namespace="ml", image=FAKE_IMAGE, nodes=args.nodes, command=FAKE,
                                     poll_seconds=args.poll, log_dir=str(tmp / "logs"), termination_grace_seconds=3,
                                     max_restarts=args.repeats)
        launcher = KubernetesLauncher(cfg, standin.api_client())
        cmd = StageCommand("pretrain", [], {"FAKE_MODE": f"steps:100000:{checkpoint}", **env}, "bench-restart")
        thread = threading.Thread(target=lambda: _swallow(launcher, cmd), daemon=True)
        thread.start()
        stopped, running = [], []
        try:
            for _ in range(args.repeats):
                pods = wait_for(lambda: _all_running(standin, args.nodes), "all ranks running", 60, 0.02)
                job = pods[0]["metadata"]["labels"][JOB]
                procs = [p for p in standin.processes() if p.poll() is None]
                time.sleep(1.0)  # a few steps into the attempt
                victim = next(p for p in pods if p["metadata"]["annotations"][INDEX] == str(args.nodes - 1))
                t0 = time.monotonic()
                standin.evict(victim["metadata"]["name"])
                wait_for(lambda: all(p.poll() is not None for p in procs), "all ranks stopped", 60, 0.02)
                stopped.append(time.monotonic() - t0)
                wait_for(lambda: _all_running(standin, args.nodes, exclude=job), "the new attempt running", 60, 0.02)
                running.append(time.monotonic() - t0)
        finally:
            launcher.cancel()
            thread.join(30)
            standin.close()
            moto.stop()
    print(f"nodes={args.nodes} poll_seconds={args.poll} evictions={args.repeats}")
    print(f"eviction -> attempt's ranks all stopped: median {statistics.median(stopped):.2f} s "
          f"(max {max(stopped):.2f})")
    print(f"eviction -> next attempt's ranks all Running: median {statistics.median(running):.2f} s "
          f"(max {max(running):.2f})")


def _all_running(standin: StandIn, nodes: int, exclude: str | None = None) -> list[dict] | None:
    pods = [p for p in standin.pods() if p["status"]["phase"] == "Running"
            and not p["metadata"].get("deletionTimestamp") and p["metadata"]["labels"][JOB] != exclude]
    return pods if len(pods) == nodes and len({p["metadata"]["labels"][JOB] for p in pods}) == 1 else None


def _swallow(launcher: KubernetesLauncher, cmd: StageCommand) -> None:
    try:
        launcher.run(cmd, log=lambda _: None)
    except BaseException:  # noqa: BLE001 - cancelled at the end of the bench
        pass


if __name__ == "__main__":
    main()
