"""A training run from start to end: the process group, the stop signals, the run built once
(`setup.prepare`: the run folder, the resume decision, data, plan, loaders and the parts it trains with),
the loop (`loop.fit`), and the one way every failure ends every rank (`agreement.stop_every_rank`). Rank 0
alone touches the run folder; every rank takes part in the collectives (resume state, evaluation counts,
checkpoint state, stop requests)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from resnest_train.cluster.agreement import stop_every_rank
from resnest_train.cluster.distributed import cleanup, setup_distributed
from resnest_train.cluster.process import cpu_speed_settings, seed_everything, stop_signals
from resnest_train.config import Config
from resnest_train.data.undecodable import add_to_record
from resnest_train.run.loop import StepHook, fit
from resnest_train.run.reporting import configure_logging
from resnest_train.run.setup import prepare


def train(config: Config, *, on_step: StepHook | None = None) -> Path:
    """Train `config` to completion (or until a stop signal); return the run folder. `on_step`: called after
    every optimizer step (a benchmark's clock)."""
    dist = setup_distributed(config.train.device)
    configure_logging(dist)
    try:
        with contextlib.ExitStack() as stack:
            # From the start: a stop signal during setup is kept and honoured at the first step.
            stop = stack.enter_context(stop_signals())
            seed_everything(config.train.seed + dist.rank, config.train.deterministic)
            cpu_speed_settings(dist.device)
            prepared = prepare(config, dist, stack)
            if prepared is not None:
                fit(*prepared, stop, on_step)
        return Path(config.output_dir)
    except Exception as exc:  # noqa: BLE001 - every failure ends every rank the same way
        raise stop_every_rank(exc, dist, record=lambda files: add_to_record(config.output_dir, files)) \
            from None
    finally:
        cleanup(dist)
