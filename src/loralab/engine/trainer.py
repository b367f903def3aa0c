"""The training loop: plain, explicit, and ignorant of the task.

    state = TrainState() or, resuming, the one in the newest complete checkpoint
    while state.step < total_steps:
        on Ctrl-C / SIGTERM: checkpoint, stop ("interrupted")
        one optimizer step on the next global batch of epoch_order(seed, epoch):
            for each of grad_accum micro-batches: loss = task.loss(model, batch) * share; loss.backward()
            clip(grad, max_grad_norm); optimizer.step(); scheduler.step(); zero_grad()
            (non-finite loss: stop, or skip the step; a diverging loss is warned about and flagged)
        every eval_every steps, each epoch end and the last step: metrics = task.evaluate(model)
            (non-finite: an error) -> history, keep-best, early stopping
        every save_every steps, each epoch end, the last step, an early stop: atomic checkpoint
            (weights + optimizer + scheduler + RNG + TrainState)
    load the kept-best weights; final_metrics = the history entry of the best (else the last) evaluation

Data order is a pure function of (seed, epoch), and the checkpoint holds everything else the loop
changes, so a run resumed from a checkpoint sees exactly the batches, dropout masks and learning rates
the uninterrupted run would have seen, and ends exactly as it would have (keep-best included).
With torch.distributed initialised (torchrun), each global batch of ``batch_size`` examples is split
across ranks, gradients are averaged, and only rank 0 writes or prints.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from loralab.core.precision import compute_context
from loralab.engine import distributed as ddp
from loralab.engine.checkpoint import (clean_stale, find_checkpoint, latest_checkpoint, load_checkpoint,
                                       remove_checkpoints_after, rng_state, save_checkpoint, set_rng_state)
from loralab.engine.loop_utils import (StopFlag, build_optimizer_for, epoch_order, evaluate_model,
                                       load_trainable, micro_batches, set_seed, snapshot_trainable)
from loralab.engine.progress import ProgressLogger, truncate_metrics
from loralab.engine.schedule import build_scheduler, warmup_steps_for
from loralab.engine.state import DIVERGENCE_FACTOR, DIVERGENCE_STEPS, FitResult, TrainState
from loralab.engine.task import TaskSpec

__all__ = ["FitResult", "NonFiniteLossError", "NonFiniteMetricError", "TrainState", "epoch_order", "fit"]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss is NaN/Inf and ``nan_policy`` is "stop"."""


class NonFiniteMetricError(RuntimeError):
    """Raised when an evaluation returns NaN/Inf: a broken model's output is not a score."""


@dataclass
class _Loop:
    """The fixed pieces of one ``fit`` call, shared by its helpers."""

    model: nn.Module
    train_model: nn.Module  # DDP-wrapped under torchrun
    task: TaskSpec
    cfg: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    run_dir: Path | None
    log: Callable[[str], Any]
    n: int
    total_steps: int
    device: torch.device
    autocast: Callable[[], Any]
    """A fresh compute context (bf16 autocast or nothing) per use."""
    progress: ProgressLogger | None = None
    saved: tuple[tuple[int, int, int, int], Path] | None = None  # position on disk, and where

    @property
    def ckpt_root(self) -> Path | None:
        return self.run_dir / "checkpoints" if self.run_dir is not None else None


def fit(model: nn.Module, task: TaskSpec, cfg: Any, run_dir: str | Path | None = None,
        resume: bool | str | Path = False, optimizer: torch.optim.Optimizer | None = None,
        log: Any = print, compute_dtype: torch.dtype = torch.float32) -> FitResult:
    """Train ``model`` on ``task`` with the settings of ``cfg`` (a ``TrainConfig``).

    ``run_dir`` receives metrics.jsonl, checkpoints/ and fit.json; ``resume`` (True, or a checkpoint
    dir) continues exactly from the newest complete checkpoint there (see ``checkpoint.find_checkpoint``).
    ``compute_dtype``: bfloat16 runs the forward passes under bf16 autocast (``core.precision``; the
    caller has already cast the frozen weights with ``cast_frozen``).
    """
    log = log if ddp.is_main() else (lambda *_: None)
    with StopFlag() as stop:  # from the start: a signal during setup still ends in a checkpoint
        loop = _setup(model, task, cfg, Path(run_dir) if run_dir is not None else None, optimizer, log,
                      compute_dtype)
        state = _resume(loop, resume) if resume else TrainState()
        is_main = ddp.is_main()
        loop.progress = ProgressLogger(loop.total_steps, loop.run_dir if is_main else None,
                                       quiet=cfg.quiet or not is_main, tensorboard=cfg.tensorboard and is_main,
                                       log=log, initial=state.step, log_every=getattr(cfg, "log_every", 10))
        try:
            status = _train(loop, state, stop)
        finally:
            loop.progress.close()
    return _finish(loop, state, status)


def _setup(model: nn.Module, task: TaskSpec, cfg: Any, run_dir: Path | None,
           optimizer: torch.optim.Optimizer | None, log: Callable[[str], Any],
           compute_dtype: torch.dtype = torch.float32) -> _Loop:
    n = len(task.train_dataset)
    if n == 0:
        raise ValueError("the training set is empty: check data.train_samples and the data files")
    if cfg.batch_size % ddp.world_size():
        raise ValueError(f"train.batch_size={cfg.batch_size} must be divisible by the number of processes "
                         f"({ddp.world_size()}): it is the global batch, split across ranks")
    if run_dir is not None and ddp.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    task.label_smoothing = cfg.label_smoothing
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(math.ceil(n / cfg.batch_size) * cfg.epochs)
    optimizer = optimizer or build_optimizer_for(model, cfg)
    if ddp.is_main() and not getattr(cfg, "quiet", False):
        from loralab.core.memory import memory_report

        log(f"memory at start (bytes by role):\n{memory_report(model, optimizer)}")
    scheduler = build_scheduler(optimizer, cfg.schedule, warmup_steps_for(cfg, total), total)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return _Loop(model, ddp.wrap(model), task, cfg, optimizer, scheduler, run_dir, log, n, total, device,
                 lambda: compute_context(compute_dtype, device))


def _resume(loop: _Loop, resume: bool | str | Path) -> TrainState:
    """Load the checkpoint to continue from: ``resume`` names one, or True takes the newest complete one
    under run_dir (saying why newer ones were rejected). No checkpoint at all means the run stopped
    before its first one: it starts again from step 0."""
    root = loop.ckpt_root
    if not isinstance(resume, bool):
        ckpt: Path | None = Path(resume)
    elif root is None:
        raise ValueError("resume=True needs a run_dir to find checkpoints in")
    else:
        ckpt, notes = find_checkpoint(root)
        for note in notes:
            loop.log(f"resume: {note}")
        if ckpt is None and notes:
            raise FileNotFoundError(f"nothing to resume: no complete checkpoint under {root} ({'; '.join(notes)})")
    if ckpt is None:
        loop.log(f"resume: no checkpoint under {root} (the run stopped before its first one): starting at step 0")
        state = TrainState()
    else:
        saved = load_checkpoint(ckpt, loop.model, verify=not isinstance(resume, bool))
        loop.optimizer.load_state_dict(saved["optimizer"])
        loop.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        state = TrainState.from_checkpoint(saved)
        loop.saved = (state.position(), ckpt)
        loop.log(f"resumed from {ckpt} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
        if saved.get("running_stats_missing"):
            loop.log(f"WARNING: {ckpt} predates checkpointed running statistics: the model's BatchNorm statistics "
                     "are those it was built with, not the interrupted run's")
    ddp.barrier()  # every rank has chosen before rank 0 removes anything
    if ddp.is_main() and root is not None:
        if isinstance(resume, bool):  # newer ones were all rejected; they are rewritten as training goes
            for p in remove_checkpoints_after(root, state.step):
                loop.log(f"resume: removed the damaged {p.name}")
        clean_stale(root)
        truncate_metrics(loop.run_dir / "metrics.jsonl", state.step)
    return state


def _train(loop: _Loop, state: TrainState, stop: StopFlag) -> str:
    """Run optimizer steps until the end, an early stop or a stop signal; returns the status."""
    cfg = loop.cfg
    if cfg.early_stopping_patience > 0 and state.bad_evals >= cfg.early_stopping_patience:
        return "early_stopped"  # resumed after it had already stopped early
    lengths = [loop.task.example_length(ex) for ex in loop.task.train_dataset] if cfg.length_grouped else None
    batches, batches_epoch = [], None
    loop.train_model.train()  # dropout on (a model from from_pretrained arrives in eval mode)
    while state.step < loop.total_steps:
        if ddp.sum_scalar(float(bool(stop.requested))) > 0:  # any rank: all stop at the same step
            path = _checkpoint(loop, state)
            loop.log(f"interrupted ({stop.requested or 'another rank'}) at step {state.step}: "
                     + (f"checkpoint {path}; resume with --resume" if path else
                        "no run_dir, so no checkpoint was written and the run cannot be resumed"))
            return "interrupted"
        if batches_epoch != state.epoch:
            batches, batches_epoch = epoch_order(loop.n, cfg.seed, state.epoch, cfg.batch_size, lengths), state.epoch
        _optimizer_step(loop, state, batches[state.batch_in_epoch])
        epoch_end = state.batch_in_epoch == len(batches)
        if epoch_end:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        boundary = epoch_end or state.step == loop.total_steps
        stop_early = (boundary or _every(cfg.eval_every, state.step)) and _evaluate_and_select(loop, state)
        if boundary or stop_early or _every(cfg.save_every, state.step):
            _checkpoint(loop, state)
        if stop_early:
            return "early_stopped"
    return "completed"


def _every(k: int, step: int) -> bool:
    return k > 0 and step % k == 0


def _optimizer_step(loop: _Loop, state: TrainState, global_batch: list[int]) -> None:
    """One optimizer step: this rank's share of the global batch in grad_accum micro-batches."""
    cfg, task, t0 = loop.cfg, loop.task, time.perf_counter()
    shard = ddp.shard(global_batch)
    micro = micro_batches(shard, cfg.grad_accum)
    loss_sum, tokens = 0.0, 0
    for i, idx in enumerate(micro):
        batch = {k: v.to(loop.device) if torch.is_tensor(v) else v
                 for k, v in task.collate([task.train_dataset[j] for j in idx]).items()}
        with ddp.no_sync_unless(loop.train_model, i == len(micro) - 1), loop.autocast():
            loss = task.loss(loop.train_model, batch)
            # weight by micro-batch size so uneven last micro-batches average correctly
            (loss * (len(idx) / len(shard))).backward()
        loss_sum += float(loss.detach()) * len(idx) / len(shard)
        tokens += task.batch_tokens(batch)
    loss_sum = ddp.mean_scalar(loss_sum)
    if math.isfinite(loss_sum):
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in loop.model.parameters() if p.requires_grad],
                                           cfg.max_grad_norm)
        loop.optimizer.step()
    elif cfg.nan_policy == "skip":
        state.skipped_steps += 1
        loop.log(f"step {state.step + 1}: loss is {loss_sum}; step skipped (train.nan_policy=skip)")
    else:
        last = latest_checkpoint(loop.ckpt_root) if loop.ckpt_root else None
        raise NonFiniteLossError(
            f"loss is {loss_sum} at step {state.step + 1} (epoch {state.epoch}); training stopped. "
            f"Last good checkpoint: {last or 'none written yet'}. Lower train.lr, set "
            "train.max_grad_norm, or set train.nan_policy=skip to skip such steps.")
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    state.step += 1
    state.batch_in_epoch += 1
    state.train_tokens += int(ddp.sum_scalar(tokens))
    state.train_seconds += time.perf_counter() - t0
    if state.observe_loss(loss_sum):
        loop.log(f"WARNING: training diverged: the loss has been non-finite or above {DIVERGENCE_FACTOR:g}x "
                 f"its first value ({state.first_loss}) for {DIVERGENCE_STEPS} steps (step {state.step}: "
                 f"{loss_sum:.6g}). Lower train.lr, set train.max_grad_norm or add warmup; fit.json says diverged.")
    loop.progress.step(state.step, loss_sum, loop.scheduler.get_last_lr()[0], state.train_tokens,
                       state.train_seconds)


def _evaluate_and_select(loop: _Loop, state: TrainState) -> bool:
    """Evaluate, log, record, keep the best weights; True when early stopping says stop."""
    task, cfg = loop.task, loop.cfg
    with loop.autocast():
        metrics = evaluate_model(loop.train_model, task)
    if not metrics:
        return False
    loop.progress.log_metrics(state.step, {f"eval/{k}": v for k, v in metrics.items()})
    broken = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if broken:
        raise NonFiniteMetricError(
            f"evaluation at step {state.step} returned non-finite {broken}: the model's outputs are broken "
            f"(NaN/Inf), so this is no score. Check train/loss in metrics.jsonl; lower train.lr or set "
            f"train.max_grad_norm. Last checkpoint: {latest_checkpoint(loop.ckpt_root) if loop.ckpt_root else None}")
    if state.record_evaluation(metrics, task.metric, task.greater_is_better) and cfg.keep_best:
        state.best_weights = snapshot_trainable(loop.model)
    return cfg.early_stopping_patience > 0 and state.bad_evals >= cfg.early_stopping_patience


def _checkpoint(loop: _Loop, state: TrainState) -> Path | None:
    """Save the position (rank 0, with a run dir); a position already on disk is not written again."""
    if loop.ckpt_root is None or not ddp.is_main():
        return None
    if loop.saved is not None and loop.saved[0] == state.position():
        return loop.saved[1]
    extra = {"optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
             "rng": rng_state(), **state.to_checkpoint()}
    path = save_checkpoint(loop.ckpt_root, state.step, loop.model, extra, best=state.best_weights)
    loop.saved = (state.position(), path)
    return path


def _finish(loop: _Loop, state: TrainState, status: str) -> FitResult:
    """The result; unless interrupted, the model ends with the kept-best weights."""
    result = FitResult(status=status, global_step=state.step, best_metric=state.best_metric,
                       best_step=state.best_step, history=list(state.history), train_seconds=state.train_seconds,
                       train_tokens=state.train_tokens, skipped_steps=state.skipped_steps, diverged=state.diverged,
                       epochs=state.epoch + state.batch_in_epoch / math.ceil(loop.n / loop.cfg.batch_size))
    if status != "interrupted":
        final = state.history[-1] if state.history else {}
        if state.best_weights is not None:
            load_trainable(loop.model, state.best_weights)
            loop.log(f"kept the best weights: {loop.task.metric}={state.best_metric:.4f} at step {state.best_step}")
            final = {h["step"]: h for h in state.history}[state.best_step]
        result.final_metrics = {k: v for k, v in final.items() if k != "step"}
    if state.diverged:
        loop.log("WARNING: this run diverged (see above); its results are not to be trusted")
    if ddp.is_main() and loop.run_dir is not None:
        with open(loop.run_dir / "fit.json", "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return result
