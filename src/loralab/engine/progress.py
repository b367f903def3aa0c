"""Progress that behaves in logs: a tqdm bar on a terminal, sparse plain lines everywhere else.

``progress_bar`` gives a tqdm bar only when the stream is a terminal (``isatty()``). Written to a file or
a pipe (a job log, ``nohup``, CI), a bar prints one plain line at most every ``interval`` seconds or at
every 10% of the total, whichever comes first, plus a final line — never carriage returns, so a
5,000-step run logs about a dozen lines instead of megabytes of ``\\r`` updates.

``ProgressLogger`` is the training loop's logger: the bar (loss, lr, tokens/s), ``metrics.jsonl`` and,
optionally, TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, TextIO


class Bar(Protocol):
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def write(self, msg: str) -> None: ...
    def close(self) -> None: ...


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class LineBar:
    """A bar for non-terminals: one line per 10% of ``total`` or per ``interval`` seconds."""

    def __init__(self, desc: str, total: int | None, unit: str = "step", file: TextIO | None = None,
                 initial: int = 0, interval: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.desc, self.total, self.unit, self.file = desc, total, unit, file or sys.stderr
        self.n = self._start = initial
        self.interval, self.clock = interval, clock
        self._t0 = self._last_time = clock()
        self._last_n: int | None = None
        self._postfix = ""
        self._next_mark = self._mark_after(initial)

    def _mark_after(self, n: int) -> float:
        """The next multiple of 10% of the total strictly above ``n`` (inf without a total)."""
        if not self.total:
            return math.inf
        return (math.floor(n * 10 / self.total) + 1) * self.total / 10

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next_mark or self.clock() - self._last_time >= self.interval:
            self._emit()

    def set_postfix(self, **kw: Any) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in kw.items() if k != "refresh")

    def write(self, msg: str) -> None:
        self.file.write(msg.rstrip("\n") + "\n")
        self.file.flush()

    def close(self) -> None:
        if self._last_n != self.n:
            self._emit()

    def _emit(self) -> None:
        now = self.clock()
        elapsed, done = now - self._t0, self.n - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%)" if self.total \
            else f"{self.n} {self.unit}s"
        timing = f"{_duration(elapsed)} elapsed"
        if self.total and rate > 0:
            timing += f", {_duration((self.total - self.n) / rate)} left"
        line = f"{self.desc}: {count} [{timing}, {rate:.2f} {self.unit}/s]"
        self.write(f"{line} {self._postfix}".rstrip())
        self._last_time, self._last_n = now, self.n
        self._next_mark = self._mark_after(self.n)


class NullBar:
    """``enabled=False``: no progress output; ``write`` still prints (a message is not progress)."""

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file or sys.stderr

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def write(self, msg: str) -> None:
        self.file.write(msg.rstrip("\n") + "\n")
        self.file.flush()

    def close(self) -> None:
        pass


class TtyBar:
    """tqdm behind the same four methods (its ``write`` goes to the bar's stream, not stdout)."""

    def __init__(self, desc: str, total: int | None, unit: str, file: TextIO, initial: int) -> None:
        from tqdm.auto import tqdm

        self._tqdm, self.file = tqdm, file
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=file)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **kw: Any) -> None:
        kw.pop("refresh", None)
        self.bar.set_postfix(refresh=False, **kw)  # redrawn by the next update, at tqdm's own rate

    def write(self, msg: str) -> None:
        self._tqdm.write(msg, file=self.file)

    def close(self) -> None:
        self.bar.close()


def progress_bar(desc: str, total: int | None, enabled: bool = True, unit: str = "step",
                 file: TextIO | None = None, initial: int = 0, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> Bar:
    """A progress bar on ``file`` (default: ``sys.stderr`` at call time): tqdm on a terminal, sparse
    plain lines otherwise (see the module docstring), nothing when ``enabled`` is false.
    ``interval`` and ``clock`` (seconds) only affect the plain-line bar; tests inject a fake clock."""
    file = file or sys.stderr
    if not enabled:
        return NullBar(file)
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return TtyBar(desc, total, unit, file, initial)
    return LineBar(desc, total, unit, file, initial, interval, clock)


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of ``metrics.jsonl`` after ``step`` (and a torn last line), so a resumed run
    does not log its steps twice. Returns how many lines were dropped. Rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # torn by a kill mid-write
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class ProgressLogger:
    """The training loop's logger: a progress bar (loss, lr, tokens/s) or, in quiet mode, a log line
    every ``log_every`` steps; every step is appended to ``metrics.jsonl``; optionally TensorBoard."""

    def __init__(self, total: int, run_dir: Path | None, quiet: bool = False, tensorboard: bool = False,
                 log: Callable[[str], Any] = print, initial: int = 0, log_every: int = 10,
                 file: TextIO | None = None) -> None:
        self.total, self.quiet, self.log, self.log_every = total, quiet, log, log_every
        self.metrics_file = open(Path(run_dir) / "metrics.jsonl", "a") if run_dir else None
        self.bar = None if quiet else progress_bar("train", total, initial=initial, file=file)
        self.tb = None
        if tensorboard and run_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("train.tensorboard=true needs TensorBoard: pip install tensorboard") from e
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _write(self, record: dict[str, Any]) -> None:
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
        if self.tb:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def step(self, step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        tps = tokens / seconds if seconds > 0 else 0.0
        self._write({"step": step, "time": time.time(), "train/loss": loss, "train/lr": lr,
                     "train/tokens_per_s": tps})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            self.bar.update(1)
        elif self.log_every and step % self.log_every == 0:
            self.log(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} tok/s {tps:,.0f}")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"step": step, "time": time.time(), **metrics})
        text = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.write(f"step {step}: {text}")
        else:
            self.log(f"step {step}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file:
            self.metrics_file.close()
            self.metrics_file = None
        if self.tb:
            self.tb.close()
            self.tb = None
