"""Per-process setup: seeding, CPU kernel settings, and the stop signals a run turns into a checkpoint.

SIGTERM, SIGUSR1 (what SLURM and cloud schedulers send before preemption) and SIGINT (Ctrl-C) request a
stop: the loop finishes its step, all ranks agree, rank 0 saves, and the run exits 0. A second SIGINT
stops at once (KeyboardInterrupt). The handlers are installed for the fit only and restored after it.

A worker never outlives its launcher: torchrun starts each worker in a session of its own, so when the
launcher is SIGKILLed (the OOM killer, `kill -9`, a node agent outside SLURM's cgroups) nothing tells the
workers, which trained on unsupervised and held the run folder. While the handlers are installed, the
kernel sends this process SIGTERM when its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`): every worker of
the dead launcher requests a stop, the ranks agree at their next check, checkpoint together and exit,
releasing the run folder's lock. A rank cut off from the others (its peers gone) stops on the failed
collective instead, with one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import signal
import sys

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


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _parent_death_signal(sig: int) -> bool:
    """Ask the kernel for `sig` when the parent process dies (0: no longer); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_launcher(parent: int) -> None:
    """SIGTERM (a stop request) when the launcher dies; at once if it died before the request was made.
    Only under a launcher (torchrun, srun): a process started by a shell or a test stays as it was."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "SLURM_STEP_ID" not in os.environ:
        return
    if _parent_death_signal(signal.SIGTERM) and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


PARENT = os.getppid()  # at import: a launcher that dies before the handlers are installed is still noticed


@contextlib.contextmanager
def stop_signals():
    """The stop handlers, installed for the duration of the block (the previous ones restored after), and
    the launcher's death turned into a stop request."""
    stop = StopRequest()
    previous = {sig: signal.signal(sig, stop._handle) for sig in STOP_SIGNALS}
    watch_launcher(PARENT)
    try:
        yield stop
    finally:
        _parent_death_signal(0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
