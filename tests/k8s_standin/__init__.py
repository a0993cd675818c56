"""A wire-level Kubernetes API stand-in for tests: no scheduler, kubelet or DNS, just the
REST paths the launcher uses, with pods run as local processes (see docs/kubernetes.md)."""
from tests.k8s_standin.fixture import StandIn, k8s_standin

__all__ = ["StandIn", "k8s_standin"]
