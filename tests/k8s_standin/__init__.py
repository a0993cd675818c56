"""A wire-level Kubernetes API stand-in for tests: the REST API as far as the launcher, Prefect's
worker and kubectl use it, plus a Job controller, a garbage collector and a one-node kubelet
that runs pods as local processes with the image's semantics (see docs/kubernetes.md)."""
from tests.k8s_standin.fixture import StandIn, k8s_standin

__all__ = ["StandIn", "k8s_standin"]
