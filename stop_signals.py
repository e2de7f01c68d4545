"""How a training run is asked to stop: SIGTERM, SIGINT or SIGHUP (or, under torchrun, its launcher's death) ask
it to finish the current step, write a checkpoint and stop; every rank stops at the same step."""
from __future__ import annotations

import contextlib
import os
import signal

import torch
import torch.distributed as dist

from utils import logger


class StopSignals:
    """The stop requests of one training loop: `install` when it starts, `agreed` after each step, `restore` when
    it ends (however it ends)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.signum: int | None = None  # the signal that asked for the stop, once one did
        self._launcher: int | None = None  # torchrun's pid (see `launcher_gone`)
        self._previous: dict = {}

    def install(self) -> None:
        def handler(signum, frame):
            if self.signum is None:
                logger.warning("received %s: finishing the current step, then writing a checkpoint",
                               signal.Signals(signum).name)
            self.signum = signum

        for sig in self.SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # nohup: a hang-up is to be ignored
            with contextlib.suppress(ValueError):  # not in the main thread
                self._previous[sig] = signal.signal(sig, handler)
        # torchrun's agent is this rank's parent; a plain run's parent (a shell) may end without meaning a stop
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None

    def restore(self) -> None:
        """Put back the handlers `install` replaced. The handler refers to this object, and through the training
        loop that owns it to the models, DDP's reducer and the process group: left installed, it kept them alive
        until the interpreter's exit, where a rank now and then aborted in their destructors ("terminate called
        without an active exception") after a run that had finished and saved its student."""
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):  # not in the main thread; a handler set from C
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def launcher_gone(self) -> bool:
        """Under torchrun: True once the launcher that started this rank has died (`kill -9` of torchrun). The
        rank is then an orphan that nobody will stop: it stops by itself, as on SIGHUP, with a checkpoint."""
        if self._launcher is None or os.getppid() == self._launcher:
            return False
        if self.signum is None:
            logger.warning("the launcher that started this rank (torchrun, pid %d) is gone: finishing the current "
                           "step, then writing a checkpoint and stopping", self._launcher)
            self.signum = signal.SIGHUP
        return True

    def agreed(self, multi_gpu: bool, device) -> bool:
        """Whether to stop after this step; every rank stops at the same step, with the same signal. The ranks
        agree on the largest signal number any of them received: a rank that received none itself stops with the
        others' (a killed torchrun reaches its orphaned ranks at different moments, so one rank may see its
        launcher gone a step before the other). One small tensor and one host sync per optimiser step."""
        self.launcher_gone()
        agreed = torch.tensor([float(self.signum or 0)])
        if multi_gpu:
            agreed = agreed.to(device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        signum = int(agreed.item())
        if signum and self.signum is None:
            self.signum = signal.Signals(signum)
        return signum > 0
