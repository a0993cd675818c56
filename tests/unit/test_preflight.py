"""Preflight: a mis-shaped distributed job fails at once, saying what is wrong."""
from __future__ import annotations

import socket

import pytest

from pipeline.config import TrainerConfig
from pipeline.preflight import PreflightError, check_distributed


def test_single_process_needs_nothing(monkeypatch):
    for var in ("WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    check_distributed(TrainerConfig())


def test_world_size_mismatch_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(PreflightError, match=r"WORLD_SIZE=3 but trainer.num_nodes x trainer.devices = 4"):
        check_distributed(TrainerConfig(num_nodes=2, devices=2, strategy="ddp"))


def test_gpu_count_mismatch_is_named(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    with pytest.raises(PreflightError, match=r"4 GPU\(s\) visible on this node but trainer.devices = 8"):
        check_distributed(TrainerConfig(accelerator="gpu", devices=8))


def test_node_rank_beyond_nodes_and_missing_rendezvous_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("NODE_RANK", "2")
    with pytest.raises(PreflightError) as info:
        check_distributed(TrainerConfig(num_nodes=2, strategy="ddp"))
    assert "NODE_RANK=2 but trainer.num_nodes = 2" in str(info.value)
    assert "MASTER_ADDR, MASTER_PORT" in str(info.value)  # every problem in one message


def test_unreachable_rendezvous_times_out_naming_the_address(monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with pytest.raises(PreflightError, match=rf"rendezvous 127.0.0.1:{port} unreachable after 1s"):
        check_distributed(TrainerConfig(num_nodes=2, strategy="ddp"), timeout_s=1.0)


def test_reachable_rendezvous_passes(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.setenv("NODE_RANK", "1")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(server.getsockname()[1]))
        check_distributed(TrainerConfig(num_nodes=2, strategy="ddp"), timeout_s=5.0)
