"""Rank 0's work on the run folder before training: check it can be written, lock it, clean what a killed
save left, find the state to resume, put the starting weights (checkpoint or pretrained) into the model,
and write the resolved config. Rank 0 alone does this work; `agreement.rank0_acts` hands its outcome (the
resume summary, or any error) to every rank."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from torch import nn

from resnest_train.checkpoint import files as ckpt
from resnest_train.checkpoint.format import Checkpoint
from resnest_train.config import Config
from resnest_train.config_yaml import to_yaml
from resnest_train.errors import UserError
from resnest_train.models.pretrained import WeightsMismatchError, check_fit
from resnest_train.run.reporting import truncate_metrics
from resnest_train.run.wrapping import load_starting_weights

log = logging.getLogger("resnest_train")


def check_writable(folder: Path) -> None:
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"output_dir {folder}: {parent} is a file, not a folder")
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output_dir {folder} cannot be created: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output_dir {folder} is not writable")


def _replace_old_run(folder: Path) -> None:
    """checkpoint.overwrite=true on a fresh run: the old run's checkpoints and metrics go, so that no
    later resume can mix the two runs."""
    for path in [*ckpt.checkpoint_dir(folder).glob("*.pt"), folder / "metrics.jsonl"]:
        log.warning("checkpoint.overwrite=true: removing %s of the previous run", path)
        path.unlink(missing_ok=True)


def _load_start(config: Config, model: nn.Module, state: Checkpoint | None) -> None:
    if state is None:
        if config.model.pretrained:
            load_starting_weights(model, config.model)
        return
    try:
        check_fit(model, state.model)
    except WeightsMismatchError as exc:
        raise ckpt.CheckpointError(
            f"checkpoint in {config.output_dir} does not fit model {config.model.name}: {exc}; continue that "
            "run with its own config, or use another output_dir") from None
    trained = state.model_name
    if trained != config.model.name and not config.checkpoint.allow_changes:
        # Same keys and shapes (7 groups of the zoo share them) but another network: refused before loading.
        raise ckpt.CheckpointError(
            f"checkpoint in {config.output_dir} was trained as model {trained} (model.name {trained} -> "
            f"{config.model.name}); continue it with model.name={trained}, use another output_dir, or set "
            "checkpoint.allow_changes=true to continue it as the other model")
    model.load_state_dict(state.model)


def prepare_run_folder(config: Config, model: nn.Module, stack: contextlib.ExitStack) -> Checkpoint | None:
    """The resume state (None: a fresh run); the lock stays held until `stack` closes. Rank 0 alone calls it,
    through `agreement.rank0_acts`, which hands any error to every rank."""
    folder = Path(config.output_dir)
    check_writable(folder)
    stack.enter_context(ckpt.RunLock(folder))
    ckpt.remove_stale_temporaries(folder)
    state = ckpt.find_resume_state(config.checkpoint.resume, folder, overwrite=config.checkpoint.overwrite)
    if state is None and config.checkpoint.overwrite:
        _replace_old_run(folder)
    _load_start(config, model, state)
    return state


def write_resolved_config(config: Config, derived: dict, epoch: int, changes: list[str] = (), *,
                          evaluated: int | None = None) -> None:
    """`config.yaml`, with what the run derives from it (global batch, accumulation, lr, steps) and the
    changes it was resumed with (checkpoint.allow_changes) in its header; `metrics.jsonl` cut back to the
    epoch the run continues from, or to `evaluated` (the last epoch whose row the checkpoint knows of: a
    resumed run that owes the evaluation of `epoch` writes its row again)."""
    header = "resolved config of this run: a valid --config for train.py (continues it) and evaluate.py\n"
    header += "derived: " + ", ".join(f"{k} {v}" for k, v in derived.items())
    if changes:
        header += f"\nresumed at epoch {epoch} with changes: " + "; ".join(changes)
    (Path(config.output_dir) / "config.yaml").write_text(to_yaml(config, header))
    truncate_metrics(config.output_dir, epoch if evaluated is None else evaluated)
