"""The training loop: plain, explicit, and ignorant of the task.

    for each optimizer step:
        for each of grad_accum micro-batches:  loss = task.loss(model, batch) / grad_accum; loss.backward()
        clip(grad, max_grad_norm); optimizer.step(); scheduler.step(); zero_grad()
        every eval_every steps / epoch end: metrics = task.evaluate(model) -> keep-best, early stopping
        every save_every steps / epoch end: atomic checkpoint (weights + optimizer + scheduler + RNG + position)

Data order is a pure function of (seed, epoch), so a run resumed from a checkpoint sees exactly the
batches, dropout masks and learning rates the uninterrupted run would have seen.
With torch.distributed initialised (torchrun), each global batch of ``batch_size`` examples is split
across ranks, gradients are averaged, and only rank 0 writes or prints.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from loralab.engine import distributed as ddp
from loralab.engine.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from loralab.engine.schedule import build_scheduler, warmup_steps_for
from loralab.engine.task import TaskSpec


class NonFiniteLossError(RuntimeError):
    """Raised when the loss is NaN/Inf and ``nan_policy`` is "stop"."""


@dataclass
class FitResult:
    status: str = "completed"  # completed | early_stopped | interrupted
    global_step: int = 0
    epochs: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    train_tokens: int = 0
    skipped_steps: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "history"}
        d["tokens_per_second"] = self.tokens_per_second
        return d


def epoch_order(n: int, seed: int, epoch: int, batch_size: int, lengths: list[int] | None) -> list[list[int]]:
    """Global batches of example indices for one epoch, a pure function of its arguments.

    With ``lengths``, examples are sorted by length inside mega-batches of 50 batches and the batches
    are shuffled, so each batch holds similar lengths (little padding) while the order stays random.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if lengths is not None:
        mega = batch_size * 50
        perm = [i for s in range(0, n, mega) for i in sorted(perm[s:s + mega], key=lambda i: -lengths[i])]
    batches = [perm[s:s + batch_size] for s in range(0, n, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def _micro_batches(global_batch: list[int], grad_accum: int) -> list[list[int]]:
    k = math.ceil(len(global_batch) / grad_accum)
    return [global_batch[s:s + k] for s in range(0, len(global_batch), k)]


def _evaluate(model: nn.Module, task: TaskSpec) -> dict[str, float]:
    if task.evaluate is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in task.evaluate(ddp.unwrap(model)).items()}
    finally:
        model.train(was_training)


class _StopFlag:
    """First Ctrl-C asks the loop to checkpoint and stop at the next step boundary; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopFlag":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def fit(model: nn.Module, task: TaskSpec, cfg: Any, run_dir: str | Path | None = None,
        resume: bool | str | Path = False, optimizer: torch.optim.Optimizer | None = None,
        log: Any = print) -> FitResult:
    """Train ``model`` on ``task`` with the settings of ``cfg`` (a ``TrainConfig``).

    ``run_dir`` receives metrics.jsonl, checkpoints/ and best/; ``resume`` (True or a checkpoint dir)
    continues from the latest checkpoint there exactly.
    """
    from loralab.engine.loop_utils import ProgressLogger, build_optimizer_for, set_seed

    run_dir = Path(run_dir) if run_dir is not None else None
    is_main = ddp.is_main()
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    task.label_smoothing = cfg.label_smoothing
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = len(task.train_dataset)
    if n == 0:
        raise ValueError("the training set is empty: check data.train_samples and the data files")
    if cfg.batch_size % ddp.world_size():
        raise ValueError(f"train.batch_size={cfg.batch_size} must be divisible by the number of processes "
                         f"({ddp.world_size()}): it is the global batch, split across ranks")
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    optimizer = optimizer or build_optimizer_for(model, cfg)
    if is_main and not getattr(cfg, "quiet", False):
        from loralab.core.memory import memory_report

        log(f"memory at start (bytes by role):\n{memory_report(model, optimizer)}")
    scheduler = build_scheduler(optimizer, cfg.schedule, warmup_steps_for(cfg, total_steps), total_steps)
    lengths = [task.example_length(ex) for ex in task.train_dataset] if cfg.length_grouped else None
    train_model = ddp.wrap(model)

    result = FitResult()
    step, epoch, batch_in_epoch, bad_evals = 0, 0, 0, 0
    best_state: dict[str, torch.Tensor] | None = None
    ckpt_root = run_dir / "checkpoints" if run_dir else None
    if resume:
        ckpt = Path(resume) if not isinstance(resume, bool) else (latest_checkpoint(ckpt_root) if ckpt_root else None)
        if ckpt is None:
            raise FileNotFoundError(f"nothing to resume: no checkpoint under {ckpt_root}")
        state = load_checkpoint(ckpt, model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        bad_evals, result.best_metric, result.best_step = state["bad_evals"], state["best_metric"], state["best_step"]
        result.train_tokens, result.train_seconds = state["train_tokens"], state["train_seconds"]
        result.skipped_steps = state.get("skipped_steps", 0)
        best_state = state.get("best_weights")
        log(f"resumed from {ckpt} at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    def checkpoint() -> Path | None:
        if not (is_main and ckpt_root):
            return None
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                 "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "bad_evals": bad_evals,
                 "best_metric": result.best_metric, "best_step": result.best_step,
                 "train_tokens": result.train_tokens, "train_seconds": result.train_seconds,
                 "skipped_steps": result.skipped_steps}
        return save_checkpoint(ckpt_root, step, model, state, best=best_state)

    def evaluate_and_select() -> bool:
        """Evaluate, log, keep the best weights; True when early stopping says stop."""
        nonlocal best_state, bad_evals
        metrics = _evaluate(train_model, task)
        if not metrics:
            return False
        progress.log_metrics(step, {f"eval/{k}": v for k, v in metrics.items()})
        result.history.append({"step": step, **metrics})
        if task.metric is None:
            return False
        if task.metric not in metrics:
            raise KeyError(f"task metric {task.metric!r} not in evaluate() result {sorted(metrics)}")
        value = metrics[task.metric]
        better = result.best_metric is None or (value > result.best_metric if task.greater_is_better
                                                else value < result.best_metric)
        if better:
            result.best_metric, result.best_step, bad_evals = value, step, 0
            if cfg.keep_best:
                best_state = {k: v.clone() for k, v in trainable_params(model).items()}
        else:
            bad_evals += 1
        return cfg.early_stopping_patience > 0 and bad_evals >= cfg.early_stopping_patience

    progress = ProgressLogger(total_steps, run_dir if is_main else None, quiet=cfg.quiet or not is_main,
                              tensorboard=cfg.tensorboard and is_main, log=log, initial=step,
                              log_every=getattr(cfg, "log_every", 10))
    autocast = _autocast(cfg, device)
    train_model.train()
    t0 = time.perf_counter()
    with _StopFlag() as stop:
        while step < total_steps and result.status == "completed":
            batches = epoch_order(n, cfg.seed, epoch, cfg.batch_size, lengths)
            while batch_in_epoch < len(batches) and step < total_steps:
                global_batch = ddp.shard(batches[batch_in_epoch])
                micro = _micro_batches(global_batch, cfg.grad_accum)
                loss_sum, tokens = 0.0, 0
                for i, idx in enumerate(micro):
                    batch = {k: v.to(device) if torch.is_tensor(v) else v
                             for k, v in task.collate([task.train_dataset[j] for j in idx]).items()}
                    with ddp.no_sync_unless(train_model, i == len(micro) - 1), autocast:
                        loss = task.loss(train_model, batch)
                        # weight by micro-batch size so uneven last micro-batches average correctly
                        (loss * (len(idx) / len(global_batch))).backward()
                    loss_sum += float(loss.detach()) * len(idx) / len(global_batch)
                    tokens += task.batch_tokens(batch)
                loss_sum = ddp.mean_scalar(loss_sum)
                if not math.isfinite(loss_sum):
                    optimizer.zero_grad(set_to_none=True)
                    if cfg.nan_policy == "skip":
                        result.skipped_steps += 1
                        log(f"step {step + 1}: loss is {loss_sum}; step skipped (train.nan_policy=skip)")
                    else:
                        last = latest_checkpoint(ckpt_root) if ckpt_root else None
                        raise NonFiniteLossError(
                            f"loss is {loss_sum} at step {step + 1} (epoch {epoch}); training stopped. "
                            f"Last good checkpoint: {last or 'none written yet'}. Lower train.lr, set "
                            "train.max_grad_norm, or set train.nan_policy=skip to skip such steps.")
                else:
                    if cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                batch_in_epoch += 1
                result.train_tokens += int(ddp.sum_scalar(tokens))
                result.train_seconds = result.train_seconds + (time.perf_counter() - t0)
                t0 = time.perf_counter()
                progress.step(step, loss_sum, scheduler.get_last_lr()[0], result.train_tokens, result.train_seconds)
                stop_early = False
                if cfg.eval_every > 0 and step % cfg.eval_every == 0:
                    stop_early = evaluate_and_select()
                if cfg.save_every > 0 and step % cfg.save_every == 0:
                    checkpoint()
                if stop.requested:
                    path = checkpoint()
                    log(f"interrupted: checkpoint saved at step {step} ({path}); resume with --resume")
                    result.status = "interrupted"
                    break
                if stop_early:
                    result.status = "early_stopped"
                    break
                t0 = time.perf_counter()
            else:
                if batch_in_epoch >= len(batches):  # epoch finished
                    epoch, batch_in_epoch = epoch + 1, 0
                    stop_early = False
                    if cfg.eval_every <= 0 or step % cfg.eval_every != 0:
                        stop_early = evaluate_and_select()
                    checkpoint()
                    if stop_early:
                        result.status = "early_stopped"
                t0 = time.perf_counter()
                continue
    if result.status == "completed" and batch_in_epoch > 0:  # max_steps ended mid-epoch
        if cfg.eval_every <= 0 or step % cfg.eval_every != 0:
            evaluate_and_select()
        checkpoint()
    progress.close()
    result.global_step, result.epochs = step, epoch + batch_in_epoch / max(1, math.ceil(n / cfg.batch_size))
    if result.status != "interrupted":
        if best_state is not None:
            load_trainable(model, best_state)
            log(f"kept the best weights: {task.metric}={result.best_metric:.4f} at step {result.best_step}")
            final = next(h for h in result.history if h["step"] == result.best_step)
        else:
            final = result.history[-1] if result.history else {}
        result.final_metrics = {k: v for k, v in final.items() if k != "step"}
    if is_main and run_dir:
        with open(run_dir / "fit.json", "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return result


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def _autocast(cfg: Any, device: torch.device):
    if not getattr(cfg, "bf16", False):
        return torch.autocast(device.type, enabled=False)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.bf16=true but this GPU has no bf16 support; set train.bf16=false")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def iterate_batches(task: TaskSpec, batch_size: int) -> Iterator[dict]:
    """Sequential, unshuffled batches of the training set (for analysis and tests)."""
    for s in range(0, len(task.train_dataset), batch_size):
        yield task.collate([task.train_dataset[i] for i in range(s, min(s + batch_size, len(task.train_dataset)))])
