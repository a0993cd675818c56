"""One rank of a real 2-node pretrain evicted, with a cluster's timings: image pulls and grace periods.

    python -m bench.k8s_eviction                       # pull 30 s per pod, grace 30 s (run as root, `make image` first)
    python -m bench.k8s_eviction --pull 0 --grace 5

Method. The stand-in (tests/k8s_standin) runs pods in the built image, each in its own network
namespace; artifacts and checkpoints live on moto S3 on 127.0.0.1 (pods reach it at the node address).
Every pod pays `--pull` seconds of image pull (it lands on a node without the image, as the evicted
rank's replacement does after a node loss); every pod gets `--grace` seconds of termination grace.
KubernetesLauncher runs pretrain (2 nodes x 1 CPU device, gloo, checkpoint every 5 steps); at step >= 10
rank 1 is evicted (DisruptionTarget + graceful delete). Printed: eviction -> every rank of the next
attempt Running; eviction -> first resumed training step; steps lost (furthest step seen - resume step);
whether any rank wrote its SIGTERM checkpoint; the total steps against the configured total.
"""
from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time
import uuid
from pathlib import Path

from pipeline.launch import StageCommand
from pipeline.launch.k8s_settings import KubernetesLaunchConfig
from pipeline.launch.kubernetes import KubernetesLauncher
from pipeline.localserver import free_port
from tests.k8s_standin.fixture import StandIn, node_settings, wait_for

JOB = "pipeline.example/job"
INDEX = "batch.kubernetes.io/job-completion-index"
STEP = re.compile(r"\[rank 0\] \[pretrain\] step (\d+)/")
LONG_TINY = ["pretrain.epochs=2", "pretrain.glyphs_per_class=50", "pretrain.batch_size=32", "pretrain.model.width=8",
             "pretrain.model.depth=1", "pretrain.checkpoint_every_n_steps=5", "trainer.log_every_n_steps=1"]


class Lines:
    def __init__(self):
        self.lock, self.lines = threading.Lock(), []

    def __call__(self, line: str) -> None:
        with self.lock:
            self.lines.append((time.monotonic(), line))

    def after(self, t: float) -> list[tuple[float, str]]:
        with self.lock:
            return [(at, line) for at, line in self.lines if at >= t]


def _running(standin, exclude: str | None = None) -> list[dict]:
    return [p for p in standin.pods() if p["status"]["phase"] == "Running" and not p["metadata"].get("deletionTimestamp")
            and p["metadata"]["labels"].get(JOB) != exclude]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pull", type=float, default=30.0, help="image pull seconds per pod")
    parser.add_argument("--grace", type=int, default=30, help="terminationGracePeriodSeconds")
    args = parser.parse_args()
    import os

    from moto.server import ThreadedMotoServer

    from pipeline import s3 as s3_settings
    from pipeline import storage
    from pipeline.params import load_config
    from pipeline.stages import stage_runner
    from tests.s3_fixtures import AWS_ENV

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    s3_settings.reset()
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fs = storage.filesystem(f"s3://{bucket}")[0]
    fs.mkdir(bucket)
    root = f"s3://{bucket}/run"
    sets = [*LONG_TINY, f"paths.root={root}"]
    stage_runner("corpus")(load_config(Path("params.yaml"), sets))
    with tempfile.TemporaryDirectory() as scratch:
        standin = StandIn(Path(scratch) / "pods", node=node_settings(pull_seconds=args.pull, pull_per_pod=True))
        try:
            env = standin.lend_s3(f"http://127.0.0.1:{port}")
            cfg = KubernetesLaunchConfig(namespace="ml", image="registry.example/pipeline:bench", nodes=2,
                                         poll_seconds=0.5, log_dir=str(Path(scratch) / "logs"),
                                         termination_grace_seconds=args.grace, max_restarts=2)
            launcher, log, outcome = KubernetesLauncher(cfg, standin.api_client()), Lines(), {}
            command = StageCommand("pretrain", [p for s in sets for p in ("--set", s)], env, "bench-evict")
            thread = threading.Thread(target=lambda: outcome.update(code=launcher.run(command, log)))
            thread.start()
            wait_for(lambda: any((m := STEP.search(line)) and int(m.group(1)) >= 10 for _, line in log.after(0)),
                     "10 training steps", 900)
            first = _running(standin)[0]["metadata"]["labels"][JOB]
            victim = next(p for p in _running(standin) if p["metadata"]["annotations"][INDEX] == "1")
            evicted = time.monotonic()
            standin.evict(victim["metadata"]["name"])
            wait_for(lambda: len(_running(standin, exclude=first)) == 2, "the next attempt's ranks running", 900)
            running_again = time.monotonic() - evicted
            thread.join(1800)
            lines = log.after(0)
            text = "\n".join(line for _, line in lines)
            seen = [int(m.group(1)) for at, line in lines if at < evicted + 1 and (m := STEP.search(line))]
            resumed = [int(s) for s in re.findall(r"resuming from \S+ at step (\d+)", text)]
            first_step = next((at for at, line in log.after(evicted) if resumed
                               and re.search(rf"\[rank 0\] \[pretrain\] step {resumed[0] + 1}/", line)), None)
            total = re.search(r"total_steps=(\d+)", text)
            saved = "yes" if re.search(r"SIGTERM at step \d+: saved", text) else "no"
            print(f"pull {args.pull:g} s/pod, grace {args.grace} s: exit {outcome.get('code')}, "
                  f"restarts {launcher.restarts}")
            print(f"eviction -> next attempt's ranks Running: {running_again:.1f} s")
            print(f"eviction -> first resumed training step: "
                  f"{(first_step - evicted) if first_step else float('nan'):.1f} s")
            print(f"furthest step seen {max(seen)}, resumed at {resumed[0] if resumed else 'none'}: steps lost "
                  f"{max(seen) - resumed[0] if resumed else 'all'}; SIGTERM checkpoint written: "
                  f"{saved}")
            print(f"total steps {total.group(1) if total else '?'}")
        finally:
            standin.close()
            moto.stop()


if __name__ == "__main__":
    main()
