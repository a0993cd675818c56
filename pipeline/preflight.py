"""Checks every rank runs before training, so a mis-shaped job fails in seconds with a reason.

A Kubernetes Job whose pods disagree with the config (wrong GPU count on the node, wrong
number of pods, unreachable rank 0) would otherwise hang in NCCL/gloo rendezvous for up to
the collective timeout, holding every GPU it got.
"""
from __future__ import annotations

import os
import socket
import time

import torch

from pipeline.config import TrainerConfig
from pipeline.errors import PreflightError

RENDEZVOUS_TIMEOUT_S = 120.0
"""Default wait for rank 0. On Kubernetes the launcher sets PIPELINE_RENDEZVOUS_TIMEOUT_S from its
startup_timeout_seconds (rank 0's pod may still be pulling its image or waiting for a new GPU node)."""


def rendezvous_timeout() -> float:
    return float(os.environ.get("PIPELINE_RENDEZVOUS_TIMEOUT_S") or RENDEZVOUS_TIMEOUT_S)


def check_distributed(cfg: TrainerConfig, timeout_s: float | None = None) -> None:
    problems = []
    expected_world = cfg.world_size
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and int(env_world) != expected_world:
        problems.append(f"WORLD_SIZE={env_world} but trainer.num_nodes x trainer.devices = {expected_world}")
    if cfg.accelerator in ("gpu", "cuda"):
        visible = torch.cuda.device_count()
        if visible != cfg.devices:
            problems.append(f"{visible} GPU(s) visible on this node but trainer.devices = {cfg.devices}")
    node_rank = int(os.environ.get("NODE_RANK", "0"))
    if node_rank >= cfg.num_nodes:
        problems.append(f"NODE_RANK={node_rank} but trainer.num_nodes = {cfg.num_nodes}")
    if cfg.num_nodes > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if v not in os.environ]
        if missing:
            problems.append(f"multi-node training needs {', '.join(missing)} in the environment")
    if problems:
        raise PreflightError("preflight failed: " + "; ".join(problems))
    if cfg.num_nodes > 1 and node_rank > 0:
        wait_for_rendezvous(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                            rendezvous_timeout() if timeout_s is None else timeout_s)


def wait_for_rendezvous(host: str, port: int, timeout_s: float) -> None:
    """Non-zero ranks wait until rank 0's store accepts connections, or fail naming the address."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as exc:  # not up yet, or DNS not yet published for the headless Service
            last_error = exc
            time.sleep(0.5)
    raise PreflightError(f"preflight failed: rendezvous {host}:{port} unreachable after {timeout_s:.0f}s ({last_error})")
