"""Where a training run starts: from scratch, from the newest usable checkpoint, or not at all
because a resumed run had already finished.

:func:`finished_result` recognises a finished run before anything is built or written, so that
resuming it changes nothing on disk. :func:`resume_or_start` finds the checkpoint to resume
from (a damaged newest one is skipped with a warning), restores the model, the optimiser, the
schedule, the GradScaler and the random states from it, and replays the transfer strategy's
epoch starts; a fresh run only seeds dropout.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aigc_ext.training import checkpoint as ckpt
from aigc_ext.training import outputs, seeding
from aigc_ext.training.build import BuiltModel, Optimisation
from aigc_ext.training.config import TrainConfig
from aigc_ext.training.distributed import DistContext
from aigc_ext.training.outputs import RunResult

__all__ = ["Start", "finished_result", "resume_or_start"]

logger = logging.getLogger("aigc_ext.training")


@dataclass
class Start:
    """Where a run starts: step 0 of a fresh run (``checkpoint`` None), or the step of the
    checkpoint it resumes from with the training time and the metrics that checkpoint
    recorded (they stand until the run measures new ones)."""

    step: int = 0
    checkpoint: Path | None = None
    elapsed: float = 0.0
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


def finished_result(
    output_dir: Path, config: TrainConfig, dist: DistContext, started: float
) -> RunResult | None:
    """The result of a run resumed after it finished, or None when there is work left.

    Finished: ``model.json`` names step ``N``, ``model.safetensors`` is there, the newest
    checkpoint is a valid ``step-N`` written by as many processes, and ``N`` reaches the
    configured number of steps (``max_steps``, else ``epochs`` times the checkpoint's steps
    per epoch). Then nothing is built and nothing on disk is written or touched. Anything
    else (a crash after the last checkpoint, more steps asked for) resumes as usual. Every
    process decides alike; ``started`` is the ``time.perf_counter()`` of the run's start.
    """
    rc = config.run
    found = ckpt.list_checkpoints(output_dir / ckpt.CHECKPOINTS)
    step = outputs.final_model_step(output_dir)
    state: dict[str, Any] | None = None
    if step is not None and found and found[-1][0] == step:
        try:
            state = ckpt.validate_checkpoint(found[-1][1])
        except ckpt.CheckpointError:
            state = None
    spe = state.get("steps_per_epoch") if state is not None else None
    spe = spe if isinstance(spe, int) and spe > 0 else None
    total = None
    if state is not None and state.get("world_size", 1) == dist.world_size:
        total = rc.max_steps or (rc.epochs * spe if spe else None)
    finished = step is not None and total is not None and step >= total
    if dist.any(not finished)[0]:  # every process decides alike
        return None
    assert state is not None and step is not None and total is not None
    path = found[-1][1]
    if dist.is_main:
        changed = ckpt.config_changes(state, config)
        if changed:
            warnings.warn(
                f"resume: the configuration changed since {path.name}: {', '.join(changed)}; "
                "the run had already finished, so nothing was trained with the new one",
                RuntimeWarning,
                stacklevel=5,
            )
        logger.info(
            "%s already finished at step %d (of %d); nothing to train, no file changed",
            output_dir,
            step,
            total,
        )
    train_metrics, eval_metrics = ckpt.saved_metrics(state.get("metrics"))
    return RunResult(
        output_dir=output_dir,
        step=step,
        epoch=max(step - 1, 0) // spe if spe else 0,  # the epoch of the last step
        metrics={**train_metrics, **eval_metrics},
        wall_time=time.perf_counter() - started,
        attention={},
        checkpoint=path,
        resumed_from=path,
        already_finished=True,
    )


def resume_or_start(
    *,
    resume: bool,
    config: TrainConfig,
    dist: DistContext,
    device: torch.device,
    built: BuiltModel,
    optimisation: Optimisation,
    steps_per_epoch: int,
) -> Start:
    """Restores the checkpoint to resume from (with ``resume``, if there is one) into the
    built model and optimisation; seeds dropout for a fresh run.

    Warns when resuming finds no checkpoint (the run starts from scratch), when the
    configuration changed since the checkpoint, and when it was written by another number of
    processes or steps per epoch (the data order then differs from an uninterrupted run).
    """
    rc = config.run
    root = Path(rc.output_dir) / ckpt.CHECKPOINTS
    found = None
    if resume:
        found = ckpt.find_resume_checkpoint(root, warn=dist.is_main)
        if found is None and dist.is_main:
            warnings.warn(
                f"resume: no checkpoint in {root}; starting from scratch",
                RuntimeWarning,
                stacklevel=4,
            )
    if found is None:
        seeding.seed_torch(rc.seed, "torch", dist.rank)
        return Start()
    path, _ = found
    newest = ckpt.list_checkpoints(root)[-1][1]
    if path != newest and dist.is_main:
        logger.warning("resuming from %s: the newer %s is unusable", path.name, newest.name)
    loaded = ckpt.restore_training_state(
        path,
        model=built.model,
        optimizer=optimisation.optimizer,
        scheduler=optimisation.scheduler,
        scaler=optimisation.scaler,
        device=device,
    )
    state = loaded.state
    step = int(state["step"])
    train_metrics, eval_metrics = ckpt.saved_metrics(state.get("metrics"))
    if dist.is_main:
        changed = ckpt.config_changes(state, config)
        if changed:
            warnings.warn(
                f"resume: the configuration changed since {path.name}: {', '.join(changed)}",
                RuntimeWarning,
                stacklevel=4,
            )
        if (
            state.get("world_size", 1) != dist.world_size
            or state.get("steps_per_epoch") != steps_per_epoch
        ):
            warnings.warn(
                f"resume: {path.name} was written by {state.get('world_size')} process(es) "
                f"with {state.get('steps_per_epoch')} steps per epoch, this run has "
                f"{dist.world_size} and {steps_per_epoch}: the data order differs "
                "from an uninterrupted run",
                RuntimeWarning,
                stacklevel=4,
            )
    if built.transfer is not None:  # replay the epoch starts that set up trainable layers
        epoch, position = divmod(step, steps_per_epoch)
        for e in range(epoch + (1 if position else 0)):
            built.transfer.on_epoch_start(built.model, e)
    ckpt.restore_random_state(loaded, rank=dist.rank, device=device, seed=rc.seed)
    return Start(
        step=step,
        checkpoint=path,
        elapsed=float(state.get("elapsed", 0.0)),
        train_metrics=train_metrics,
        eval_metrics=eval_metrics,
    )
