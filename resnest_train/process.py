"""Per-process setup: seeding, CPU kernel settings, and the stop signals a run turns into a checkpoint.

SIGTERM, SIGUSR1 (what SLURM and cloud schedulers send before preemption) and SIGINT (Ctrl-C) request a
stop: the loop finishes its step, all ranks agree, rank 0 saves, and the run exits 0. A second SIGINT
stops at once (KeyboardInterrupt). The handlers are installed for the fit only and restored after it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal

import numpy as np
import torch

log = logging.getLogger("resnest_train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FLUSH_DENORMAL = True


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # Bit-identical CPU runs; on CUDA this also needs the cuBLAS workspace setting.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def cpu_speed_settings(device: torch.device) -> None:
    """Flush denormal floats to zero on CPU, where denormal gradients slow element-wise kernels; whether
    it pays depends on the torch release (BENCHMARKS.md, "trainer vs bare loop"). GPUs flush them in their
    fast paths anyway, and no training signal lives below 1e-38."""
    if device.type == "cpu":
        torch.set_flush_denormal(FLUSH_DENORMAL)


class StopRequest:
    """Set by a stop signal; read by the loop between steps."""

    def __init__(self):
        self.requested = False
        self.signal = None

    def _handle(self, signum, _frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested, self.signal = True, signum
        log.warning("received %s: checkpointing after this step, then exiting (Ctrl-C again: stop now)",
                    signal.Signals(signum).name)


@contextlib.contextmanager
def stop_signals():
    """The stop handlers, installed for the duration of the block (the previous ones restored after)."""
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop._handle) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
