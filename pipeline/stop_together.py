"""SIGTERM on any rank stops every rank at the same optimizer step, with no collective in a signal handler.

On Kubernetes one rank is often evicted alone (a node drained, a spot node reclaimed): only its pod gets
SIGTERM. Lightning 2.6's own handler broadcasts from inside the signal handler and, at each batch, only
rank 0's flag: a lone SIGTERM on rank 1 enters a broadcast the other ranks never join, and the group hangs
until SIGKILL at the end of the grace period, without a checkpoint. Here the handler only sets a flag (and
forwards the signal to the ranks this process launched, as Lightning's does); after every training batch
all ranks agree with one MAX all-reduce of that flag, then every rank raises Lightning's SIGTERMException
at the same step, where ResumeCheckpoint saves the state the next attempt resumes from exactly.
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


class StopTogether(Callback):
    def __init__(self):
        self.requested = False

    def on_train_start(self, trainer, pl_module):
        # Lightning registered its handler when fit started; ours replaces it for the training loop
        # (Lightning puts the original handlers back at teardown).
        launcher = trainer.strategy.launcher

        def request_stop(signum, _frame):
            if not self.requested and launcher is not None:
                launcher.kill(signum)  # per-device processes this one started hear it too
            self.requested = True

        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            signal.signal(signal.SIGTERM, request_stop)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stop = self.requested
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([1 if stop else 0], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            # Lightning raises SIGTERMException at the end of this batch on every rank alike.
            trainer._signal_connector.received_sigterm = True
