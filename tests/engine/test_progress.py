"""Progress output: sparse plain lines (no carriage returns) when the stream is not a terminal, tqdm when
it is; metrics.jsonl truncation for resumed runs."""

from __future__ import annotations

import io
import json

from loralab.engine.progress import LineBar, NullBar, ProgressLogger, TtyBar, progress_bar, truncate_metrics


class FakeClock:
    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_5000_step_run_to_a_file_writes_a_dozen_lines_and_no_carriage_returns():
    out = io.StringIO()
    logger = ProgressLogger(5000, None, file=out)
    for step in range(1, 5001):
        logger.step(step, loss=1.0 / step, lr=1e-4, tokens=step * 100, seconds=step * 0.01)
        if step % 1000 == 0:
            logger.log_metrics(step, {"eval/accuracy": 0.9})
    logger.close()
    text = out.getvalue()
    assert "\r" not in text
    progress_lines = [l for l in text.splitlines() if l.startswith("train:")]
    assert 10 <= len(progress_lines) <= 12, text
    assert progress_lines[-1].startswith("train: 5000/5000 steps (100%)") and "loss=" in progress_lines[-1]
    assert text.count("eval/accuracy=0.9000") == 5  # write() lines go through untouched


def test_slow_run_prints_at_most_every_interval():
    out = io.StringIO()
    clock = FakeClock(tick=1.0)  # every update (and every emitted line) reads the clock once
    bar = progress_bar("eval", total=None, file=out, interval=30.0, clock=clock)
    assert isinstance(bar, LineBar)
    for _ in range(300):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert 5 <= len(lines) <= 12 and lines[-1].startswith("eval: 300 steps")
    assert "\r" not in out.getvalue()


def test_final_line_not_repeated_and_resumed_bar_counts_from_initial():
    out = io.StringIO()
    bar = progress_bar("train", total=100, file=out, initial=50, clock=FakeClock(0.0))
    for _ in range(50):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[0].startswith("train: 60/100") and lines[-1].startswith("train: 100/100")


def test_terminal_gets_tqdm_and_disabled_gets_nothing_but_messages():
    tty = Tty()
    bar = progress_bar("train", total=10, file=tty)
    assert isinstance(bar, TtyBar)
    bar.set_postfix(loss="0.1")
    bar.update(10)
    bar.write("hello")
    bar.close()
    assert "\r" in tty.getvalue() and "hello" in tty.getvalue()
    out = io.StringIO()
    off = progress_bar("train", total=10, enabled=False, file=out)
    assert isinstance(off, NullBar)
    off.update(10)
    off.write("message")
    off.close()
    assert out.getvalue() == "message\n"


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 1.0}) for s in range(1, 8)] + ['{"step": 8, "tra']
    path.write_text("\n".join(lines) + "\n")
    assert truncate_metrics(path, 5) == 3
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert truncate_metrics(path, 5) == 0 and truncate_metrics(tmp_path / "absent.jsonl", 0) == 0


def test_fit_with_progress_to_a_non_terminal_writes_plain_lines(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from toy import ToyTrainConfig, toy_model, toy_task

    from loralab.engine.trainer import fit

    fit(toy_model(), toy_task(), ToyTrainConfig(quiet=False), log=lambda *_: None)
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert "\r" not in err
    lines = [l for l in err.splitlines() if l.startswith("train:")]
    assert len(lines) == 10 and lines[-1].startswith("train: 24/24 steps (100%)"), err
