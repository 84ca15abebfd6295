"""The training loop behind ``aigc-ext train`` and :func:`aigc_ext.training.train`.

``train`` reads the configuration (:mod:`~aigc_ext.training.config`), resolves its components
once (:func:`aigc_ext.training.build.resolve`) and runs: resolve the device and join the
process group (:mod:`~aigc_ext.training.distributed`), stop at once when a resumed run had
already finished (:mod:`~aigc_ext.training.resume`), build the data, the model, the strategies
and the optimiser (:mod:`~aigc_ext.training.build`), restore the checkpoint it resumes from,
then loop: each step accumulates gradients over micro-batches (augmentations and
``objective.prepare`` draw from the step's generator, see :mod:`~aigc_ext.training.seeding`),
clips, steps the optimiser and the schedule; evaluation, logging to ``metrics.jsonl``,
checkpoints (:mod:`~aigc_ext.training.checkpoint`) and lifecycle hooks in between; the final
weights at the end (:mod:`~aigc_ext.training.outputs`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from aigc_ext import lifecycle
from aigc_ext.training import build, distributed, fsdp, outputs
from aigc_ext.training import checkpoint as ckpt
from aigc_ext.training.config import ConfigError, TrainConfig, read_config
from aigc_ext.training.distributed import check_backend_override, resolve_device
from aigc_ext.training.outputs import RunResult
from aigc_ext.training.resume import finished_result, resume_or_start
from aigc_ext.training.seeding import (
    DataOrder,
    seed_everything,
    seeded_generator,
)

__all__ = ["logger", "train"]

logger = logging.getLogger("aigc_ext.training")
metrics_logger = logging.getLogger("aigc_ext.training.metrics")

# --- helpers ----------------------------------------------------------------------------------


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "pixel_values"):
        if torch.is_tensor(batch.get(key)):
            return int(batch[key].shape[0])
    for value in batch.values():
        if torch.is_tensor(value) and value.ndim > 0:
            return int(value.shape[0])
    return 0


def _token_count(batch: Mapping[str, Any]) -> int:
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask):
        return int(mask.sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if torch.is_tensor(ids) else 0


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()
    }


# --- the run -----------------------------------------------------------------------------------


def train(
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike,
    *,
    resume: bool = False,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> RunResult:
    """Trains as ``config`` (a TOML file, a dict or a :class:`TrainConfig`) says.

    ``overrides`` (``["run.lr=1e-3"]`` or ``{"run.lr": 1e-3}``) update the configuration.
    ``resume`` continues from the newest usable checkpoint in ``<output_dir>/checkpoints``
    (a corrupt newest one is skipped with a warning); with no checkpoint at all it starts from
    scratch with a warning. Resuming a run that already finished does nothing and changes no
    file (see ``RunResult.already_finished``). Without ``resume``, an output directory that
    already holds checkpoints is refused. Raises :class:`~aigc_ext.training.ConfigError` for
    configuration mistakes (before any training; an ``AIGC_EXT_BACKEND`` that names no usable
    backend among them) and :class:`~aigc_ext.training.CheckpointError` when no checkpoint can
    be resumed from.
    """
    cfg = read_config(config, overrides=overrides)
    return _Run(build.resolve(cfg), resume).execute()


class _Run:
    """One call of :func:`train`: the resolved configuration, the objects built from it and the
    state of the loop (step, last evaluation and checkpoint, metrics, open files)."""

    def __init__(self, resolved: build.Resolved, resume: bool):
        cfg = resolved.config
        self.resolved = resolved
        self.cfg = cfg
        self.rc = cfg.run
        self.resume = resume
        self.precision = self.rc.precision  # what autocast uses; see execute()
        self.output_dir = Path(self.rc.output_dir)
        self.ckpt_root = self.output_dir / ckpt.CHECKPOINTS
        self.metrics_writer: outputs.MetricsWriter | None = None
        self.log_handler: logging.Handler | None = None
        self.progress = None
        self.last_eval: int | None = None
        self.last_save: int | None = None
        self.last_checkpoint: Path | None = None
        self.eval_metrics: dict[str, float] = {}
        self.train_metrics: dict[str, float] = {}
        self.elapsed_before = 0.0
        self.warned_nonfinite = False
        self.saved_level: int | None = None
        self.finetuner: object | None = None
        self.sharded = False  # FSDP under torchrun, set once the model is built
        self.transfer: object | None = None

    # -- setup --

    def execute(self) -> RunResult:
        self.t_start = time.perf_counter()
        world, _, local = distributed.env_world()
        self.device = resolve_device(self.rc.device, self.rc.precision, local, world)
        self.precision = distributed.effective_precision(
            self.rc.precision, self.device, self.rc.force_precision
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dist = distributed.setup(self.device)
        try:
            return self._execute()
        finally:
            if self.progress is not None:
                self.progress.close()
            if self.metrics_writer is not None:
                self.metrics_writer.close()
            if self.log_handler is not None:
                logger.removeHandler(self.log_handler)
                self.log_handler.close()
            if self.saved_level is not None:
                logger.setLevel(self.saved_level)
            self.dist.close()

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _trainable_signature(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in self.model.parameters())

    def _wrap(self) -> None:
        """The module the loss is computed with: the model (sharded in place under FSDP), or
        its DDP wrapper."""
        self.train_model: torch.nn.Module = self.model
        if self.dist.enabled and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=True
            )
        self.trainable = self._trainable_signature()

    def _epoch_start(self, epoch: int) -> None:
        if self.transfer is None:
            return
        self.transfer.on_epoch_start(self.model, epoch)
        if self.dist.enabled and self._trainable_signature() != self.trainable:
            self._wrap()  # DDP only synchronises parameters that were trainable when wrapped

    def _execute(self) -> RunResult:
        from aigc_ext import dispatch

        cfg, rc, dist = self.cfg, self.rc, self.dist
        check_backend_override(self.device)
        if self.resume:
            done = finished_result(self.output_dir, cfg, dist, self.t_start)
            if done is not None:
                return done
        if dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.log_handler = logging.FileHandler(
                self.output_dir / outputs.LOG_FILE, encoding="utf-8"
            )
            self.log_handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(message)s")
            )
            logger.addHandler(self.log_handler)
            if logger.getEffectiveLevel() > logging.INFO:  # train.log gets the INFO lines
                self.saved_level = logger.level
                logger.setLevel(logging.INFO)
        existing = ckpt.list_checkpoints(self.ckpt_root)
        if existing and not self.resume:
            raise ConfigError(
                f"{self.output_dir} already holds checkpoints ({existing[-1][1].name}); pass "
                "--resume (resume=True) to continue that run, or choose another output directory"
            )

        seed_everything(rc.seed)
        resolved = self.resolved
        self.bundle = build.build_data(resolved.data, rc.seed)
        info = self.bundle.info
        built = build.build_model(resolved, info)
        self.model, self.finetuner, self.transfer = built.model, built.finetuner, built.transfer
        self.objective = build.build_strategy(resolved.objective, info)
        self.augmentations = [build.build_strategy(a, info) for a in resolved.augmentations]
        self.prepare: Callable | None = getattr(self.objective, "prepare", None)
        self.sharded = dist.enabled and rc.distributed == "fsdp"
        if self.sharded:  # before the optimiser is built: it holds the shards
            fsdp.shard(
                self.model,
                self.device,
                param_dtype=rc.fsdp_param_dtype,
                reduce_dtype=rc.fsdp_reduce_dtype,
                reshard_after_forward=rc.fsdp_reshard_after_forward,
            )
        else:
            self.model.to(self.device)

        n_train = len(self.bundle.train)
        self.order = DataOrder(
            n_train, rc.batch_size, rc.grad_accum, dist.world_size, dist.rank, rc.seed
        )
        spe = self.order.steps_per_epoch
        if spe == 0:
            raise ConfigError(
                f"the training set has {n_train} examples, fewer than one optimizer step takes "
                f"(batch_size {rc.batch_size} x grad_accum {rc.grad_accum} x "
                f"{dist.world_size} process(es))"
            )
        self.total_steps = rc.max_steps or rc.epochs * spe
        optimisation = build.build_optimizer(built, rc, self.total_steps, self.device)
        self.optimizer = optimisation.optimizer
        self.scheduler = optimisation.scheduler
        self.scaler = optimisation.scaler

        start = resume_or_start(
            resume=self.resume,
            config=cfg,
            dist=dist,
            device=self.device,
            built=built,
            optimisation=optimisation,
            steps_per_epoch=spe,
        )
        start_step, resumed_from = start.step, start.checkpoint
        if resumed_from is not None:
            self.elapsed_before = start.elapsed
            self.train_metrics, self.eval_metrics = start.train_metrics, start.eval_metrics
            self.last_save = self.last_eval = start_step
            self.last_checkpoint = resumed_from
        self._wrap()

        if dist.is_main:
            outputs.write_config(self.output_dir, cfg.to_json())
            metrics_path = self.output_dir / outputs.METRICS_FILE
            if resumed_from is not None:
                outputs.truncate_metrics(metrics_path, start_step)
            self.metrics_writer = outputs.MetricsWriter(
                metrics_path, append=resumed_from is not None
            )
        logger.info(
            "training %s on %s with %s: %d steps (%d per epoch, %d examples), batch %d x %d "
            "accumulation x %d process(es), device %s, precision %s, output %s",
            cfg.model.name,
            cfg.data.name,
            cfg.objective.name,
            self.total_steps,
            spe,
            n_train,
            rc.batch_size,
            rc.grad_accum,
            dist.world_size,
            self.device,
            self.precision,
            self.output_dir,
        )
        if resumed_from is not None:
            logger.info("resumed from %s at step %d", resumed_from, start_step)

        dispatch.backend_usage(reset=True)
        state = lifecycle.RunState(step=start_step, epoch=min(start_step, self.total_steps) // spe)
        lifecycle.notify("train_begin", state)
        self._make_progress(start_step)
        step = start_step
        stopped = dist.any(state.should_stop)[0] and step < self.total_steps
        first_record = True
        while step < self.total_steps and not stopped:
            epoch, position = divmod(step, spe)
            if position == 0:
                self._epoch_start(epoch)
            record = self._train_step(step, epoch, position)
            step += 1
            state.step, state.epoch = step, epoch
            self.train_metrics = {k: record[k] for k in ("loss", "lr", "grad_norm")}
            state.metrics.update(self.train_metrics)
            if step % rc.log_every == 0 or step in (1, self.total_steps):
                if first_record:  # which backends served the model (first record of this run)
                    record["attention"] = dispatch.backend_usage()
                    first_record = False
                self._log(record)
            lifecycle.notify("step_end", state)
            if rc.eval_every and step % rc.eval_every == 0 and step < self.total_steps:
                self._evaluate_and_notify(state)
            save, stop = dist.any(state.should_save, state.should_stop)
            periodic = bool(rc.save_every) and step % rc.save_every == 0
            if (periodic or save) and step < self.total_steps and not stop:
                self._save(state)
            stopped = dist.any(state.should_stop)[0]

        if step > start_step or resumed_from is None:
            if self.last_eval != step:
                self._evaluate_and_notify(state)
            if self.last_save != step:
                self._save(state)
        if self.sharded:  # the outputs are written from a plain copy on rank 0
            self.model = fsdp.full_model(self.model, self._plain_model)
        if dist.is_main:
            self._write_final_model(step)
        dist.barrier()
        usage = dispatch.backend_usage(reset=True)
        lifecycle.notify("train_end", state)
        wall = time.perf_counter() - self.t_start
        if stopped and step < self.total_steps:
            logger.info("stopped at step %d by a lifecycle hook", step)
        logger.info("attention: %s", outputs.describe_attention(usage))
        logger.info("finished at step %d in %.1f s; output in %s", step, wall, self.output_dir)
        return RunResult(
            output_dir=self.output_dir,
            step=step,
            epoch=state.epoch,
            metrics={**self.train_metrics, **self.eval_metrics},
            wall_time=wall,
            attention=usage,
            checkpoint=self.last_checkpoint,
            resumed_from=resumed_from,
            stopped_early=stopped and step < self.total_steps,
            model=self.model,
        )

    def _make_progress(self, start_step: int) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover
            return
        self.progress = tqdm(
            total=self.total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=True if not self.dist.is_main else None,  # None: only on a terminal
        )

    # -- steps --

    def _micro_batch(self, indices: list[int], dataset) -> dict[str, Any]:
        return self.bundle.collate([dataset[i] for i in indices])

    def _train_step(self, step: int, epoch: int, position: int) -> dict[str, Any]:
        rc, dist = self.rc, self.dist
        self.model.train()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        samples = tokens = 0
        for micro in range(rc.grad_accum):
            indices = self.order.micro_batch(epoch, position * rc.grad_accum + micro)
            batch = self._micro_batch(indices, self.bundle.train)
            generator = seeded_generator(rc.seed, "step", step, micro, dist.rank)
            for augmentation in self.augmentations:
                batch = augmentation(batch, generator=generator)
            if self.prepare is not None:
                batch = self.prepare(batch, generator=generator)
            samples += _batch_size(batch)
            tokens += _token_count(batch)
            batch = _to_device(batch, self.device)
            last = micro == rc.grad_accum - 1
            with distributed.gradient_sync(self.train_model, enabled=last or not dist.enabled):
                with self._autocast():
                    loss = self.objective(self.train_model, batch)
                if not torch.is_tensor(loss) or loss.ndim != 0:
                    raise TypeError(
                        f"objective {self.cfg.objective.name!r} must return a scalar tensor, "
                        f"got {type(loss).__name__} {getattr(loss, 'shape', '')}"
                    )
                scaled = loss / rc.grad_accum
                if self.scaler.is_enabled():
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            total = total + loss.detach().float()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        params = [
            p
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not params:
            raise RuntimeError(
                f"no trainable parameter received a gradient from objective "
                f"{self.cfg.objective.name!r}"
            )
        if rc.clip_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, rc.clip_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        # loss sum, samples, tokens: summed over processes (exact in float64)
        counts = torch.tensor([float(samples), float(tokens)], dtype=torch.float64)
        stats = dist.all_reduce_sum(torch.cat([total.detach().cpu().double().reshape(1), counts]))
        dt = time.perf_counter() - t0
        loss_value = float(stats[0]) / (rc.grad_accum * dist.world_size)
        if not math.isfinite(loss_value) and not self.warned_nonfinite:
            logger.warning("non-finite loss %s at step %d", loss_value, step + 1)
            self.warned_nonfinite = True
        record: dict[str, Any] = {
            "step": step + 1,
            "epoch": epoch,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "samples_per_s": float(stats[1]) / dt if dt > 0 else 0.0,
        }
        if stats[2] > 0:
            record["tokens_per_s"] = float(stats[2]) / dt if dt > 0 else 0.0
        record["time"] = self._elapsed()
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            self.progress.update(1)
        return record

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.t_start)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        assert self.metrics_writer is not None
        self.metrics_writer.write(record)
        metrics_logger.info(
            "step %d/%d  epoch %d  loss %.4f  lr %.3g  grad_norm %.3g",
            record["step"],
            self.total_steps,
            record["epoch"],
            record["loss"],
            record["lr"],
            record["grad_norm"],
        )

    # -- evaluation --

    def _evaluate(self) -> dict[str, float]:
        dataset = self.bundle.eval
        if dataset is None or len(dataset) == 0:
            return {}
        rc, dist = self.rc, self.dist
        n = len(dataset)
        shard = (
            list(range(dist.rank, n, dist.world_size)) if n >= dist.world_size else list(range(n))
        )
        size = rc.eval_batch_size or rc.batch_size
        starts: list[int | None] = list(range(0, len(shard), size))
        if self.sharded and n >= dist.world_size:  # FSDP: as many forward passes everywhere
            starts += [None] * (math.ceil(math.ceil(n / dist.world_size) / size) - len(starts))
        sums: dict[str, list[float]] = {}
        eval_fn = getattr(self.objective, "eval_metrics", None)
        cuda = [self.device.index] if self.device.type == "cuda" else []
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                for b, start in enumerate(starts):
                    padding = start is None  # a pass whose result is not counted
                    start = 0 if start is None else start
                    batch = self._micro_batch(shard[start : start + size], dataset)
                    if self.prepare is not None:
                        batch = self.prepare(
                            batch, generator=seeded_generator(rc.seed, "eval", b, dist.rank)
                        )
                    count = _batch_size(batch)
                    batch = _to_device(batch, self.device)
                    with self._autocast():
                        if eval_fn is not None:
                            result = eval_fn(self.model, batch)
                        else:
                            result = {
                                "loss": (float(self.objective(self.model, batch)) * count, count)
                            }
                    if padding:
                        continue
                    for name, (total, number) in result.items():
                        acc = sums.setdefault(name, [0.0, 0.0])
                        acc[0] += float(total)
                        acc[1] += float(number)
        finally:
            self.model.train()
        names = sorted(sums)
        flat = torch.tensor([v for name in names for v in sums[name]], dtype=torch.float64)
        flat = dist.all_reduce_sum(flat).tolist()
        return {
            f"eval/{name}": flat[2 * i] / flat[2 * i + 1]
            for i, name in enumerate(names)
            if flat[2 * i + 1] > 0
        }

    def _evaluate_and_notify(self, state: lifecycle.RunState) -> None:
        metrics = self._evaluate()
        self.last_eval = state.step
        if not metrics:
            return
        self.eval_metrics = metrics
        if self.dist.is_main:
            assert self.metrics_writer is not None
            self.metrics_writer.write(
                {"step": state.step, "epoch": state.epoch, **metrics, "time": self._elapsed()}
            )
            logger.info(
                "eval at step %d: %s",
                state.step,
                "  ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in metrics.items()),
            )
        lifecycle.notify("evaluate", state, metrics=dict(metrics))

    # -- saving --

    def _save(self, state: lifecycle.RunState) -> None:
        self.dist.barrier()
        rng = ckpt.rng_tensors(self.dist, self.device)
        path = self.ckpt_root / ckpt.checkpoint_name(state.step)
        weights, optimiser = self.model, self.optimizer
        if self.sharded:  # every process takes part in gathering the full state to rank 0
            weights, optimiser = fsdp.full_states(self.model, self.optimizer)
        if self.dist.is_main:
            path = ckpt.save_checkpoint(
                self.ckpt_root,
                state.step,
                model=weights,
                optimizer=optimiser,
                trainer_state=ckpt.trainer_state(
                    step=state.step,
                    steps_per_epoch=self.order.steps_per_epoch,
                    world_size=self.dist.world_size,
                    scheduler=self.scheduler,
                    scaler=self.scaler,
                    config=self.cfg,
                    elapsed=self._elapsed(),
                    metrics={**self.train_metrics, **self.eval_metrics},
                ),
                rng=rng,
                keep=self.rc.keep_checkpoints,
            )
            logger.info("saved checkpoint %s", path)
            if self.rc.save_hf == "checkpoints":
                exported = (
                    fsdp.plain_model(weights, self._plain_model) if self.sharded else self.model
                )
                outputs.write_checkpoint_hf(path, exported, self.bundle.info, self.rc.merge_lora)
        self.dist.barrier()
        self.last_save = state.step
        self.last_checkpoint = path
        state.should_save = False
        lifecycle.notify("save", state, path=path)

    def _plain_model(self) -> torch.nn.Module:
        """A new model of this run's architecture (for a sharded run's outputs)."""
        return build.build_plain_model(self.resolved, self.bundle.info)

    def _write_final_model(self, step: int) -> None:
        outputs.write_final_model(
            self.output_dir,
            self.model,
            step,
            config=self.cfg.to_dict(),
            data_info=self.bundle.info,
            metrics={**self.train_metrics, **self.eval_metrics},
            finetuner=self.finetuner,
            save_hf=self.rc.save_hf != "off",
            merge_lora=self.rc.merge_lora,
        )
