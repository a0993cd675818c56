"""A stand-in for `python -m pipeline <stage>` in launcher tests: fast, and scriptable by env.

FAKE_MODE: ok | exit:<code> | crash-once:<marker URL> | steps:<total>:<checkpoint URL> | sleep:<s> |
rendezvous (torch.distributed gloo over MASTER_ADDR/MASTER_PORT, the real thing DDP does first).
Every mode prints its argv and rank env first, so tests can see what the pod was given. State that
must outlive a pod (marker, checkpoint) lives at an fsspec URL: s3://... on the tests' moto, as a
real stage keeps it on S3 (a pod's own filesystem goes with it).
"""
from __future__ import annotations

import os
import signal
import sys
import time


def _steps(total: int, checkpoint: str) -> int:
    import fsspec

    # Resumable, like the real stage: every step is already saved (one PUT each), so exit at once; os._exit
    # because an interpreter shutdown would wait for s3fs's event-loop thread.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    fs, path = fsspec.core.url_to_fs(checkpoint)
    step = int(fs.cat_file(path)) if fs.exists(path) else 0
    print(f"resumed from step {step}" if step else "starting from step 0", flush=True)
    while step < total:
        time.sleep(0.2)
        step += 1
        fs.pipe_file(path, str(step).encode())  # one PUT: an eviction never leaves a half-written object
        print(f"step {step}/{total}", flush=True)
    print(f"finished total_steps={step}", flush=True)
    return 0


def _rendezvous() -> int:
    import torch.distributed as dist
    nodes = int(next(a.split("=")[1] for a in sys.argv if a.startswith("trainer.num_nodes=")))
    dist.init_process_group("gloo", init_method="env://", world_size=nodes, rank=int(os.environ["NODE_RANK"]))
    print(f"world_size={dist.get_world_size()} global_rank={dist.get_rank()}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main() -> int:
    rank_env = {k: os.environ.get(k) for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTNAME")}
    print(f"argv={sys.argv[1:]} env={rank_env}", flush=True)
    mode, _, rest = os.environ.get("FAKE_MODE", "ok").partition(":")
    if mode == "exit":
        return int(rest)
    if mode == "crash-once":
        import fsspec

        fs, path = fsspec.core.url_to_fs(rest)
        if not fs.exists(path):
            fs.pipe_file(path, b"crashed")
            return 1
        return 0
    if mode == "sleep":
        time.sleep(float(rest or 600))
        return 0
    if mode == "steps":
        total, _, checkpoint = rest.partition(":")
        return _steps(int(total), checkpoint)
    if mode == "rendezvous":
        return _rendezvous()
    return 0


if __name__ == "__main__":
    sys.exit(main())
