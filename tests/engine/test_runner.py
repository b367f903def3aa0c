"""The runner end to end through the CLI, with real processes and real signals (issue 21).

A driver script (written to tmp) runs ``loralab.cli.main`` with fault hooks set by environment
variables, so a process can be SIGKILLed at an exact global step or inside a checkpoint write:

    FAULT_KILL_STEP=N        SIGKILL just before optimizer step N (the global step: also after a resume)
    FAULT_KILL_IN=WHERE:N    SIGKILL inside the checkpoint of step N: "weights" (half of
                             trainable.safetensors written), "state" (half of state.pt), "manifest"
                             (every file written, no manifest yet), "latest" (the dir renamed into place,
                             the ``latest`` pointer not yet replaced)
    FAULT_BEST_STEP=N        the evaluation at step N is the best one (the metric is pushed far off the
                             best at every other step), so keep-best has a known, early best
    FAULT_SLEEP=S            sleep S seconds per step (a run slow enough for another process to meet it)
    FAULT_FILL=PATH:N        after step N, fill the file system of PATH (disk full from then on)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DRIVER = r'''
import os, signal, sys, time
import loralab.engine.trainer as T
import loralab.engine.checkpoint as C
from loralab import cli

STEP = [0]
kill_step = int(os.environ.get("FAULT_KILL_STEP", "0"))
kill_in, _, kill_in_step = os.environ.get("FAULT_KILL_IN", ":0").partition(":")
kill_in_step = int(kill_in_step or 0)
best = int(os.environ.get("FAULT_BEST_STEP", "0"))
sleep = float(os.environ.get("FAULT_SLEEP", "0"))
fill_path, _, fill_step = os.environ.get("FAULT_FILL", ":0").partition(":")
fill_step = int(fill_step or 0)


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


step_orig = T._optimizer_step
def optimizer_step(loop, state, batch):
    if kill_step and state.step + 1 == kill_step:
        die()
    if sleep:
        time.sleep(sleep)
    step_orig(loop, state, batch)
    STEP[0] = state.step
    if fill_step and state.step == fill_step:
        with open(os.path.join(fill_path, "filler"), "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError:
                pass
T._optimizer_step = optimizer_step

eval_orig = T.evaluate_model
def evaluate_model(model, task):
    metrics = eval_orig(model, task)
    if best and metrics and task.metric in metrics and STEP[0] != best:
        metrics = {**metrics, task.metric: metrics[task.metric] + (-100.0 if task.greater_is_better else 100.0)}
    return metrics
T.evaluate_model = evaluate_model

def in_checkpoint(where, path=None):
    if kill_in == where and STEP[0] == kill_in_step:
        if path is not None:
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
        die()

save_file_orig, torch_save_orig, sha_orig, write_atomic_orig = C.save_file, C.torch.save, C._sha256, C._write_atomic
def save_file(tensors, filename, *a, **k):
    save_file_orig(tensors, filename, *a, **k)
    if filename.endswith("trainable.safetensors"):
        in_checkpoint("weights", filename)
C.save_file = save_file

class TorchProxy:
    def __getattr__(self, name):
        return getattr(torch, name)
    def save(self, obj, f, *a, **k):
        torch_save_orig(obj, f, *a, **k)
        in_checkpoint("state", f)
import torch
C.torch = TorchProxy()

def sha256(path):
    in_checkpoint("manifest")
    return sha_orig(path)
C._sha256 = sha256

def write_atomic(path, data):
    if path.name == C.LATEST:
        in_checkpoint("latest")
    return write_atomic_orig(path, data)
C._write_atomic = write_atomic

sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.fixture
def driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


def _env(**faults):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    env.update({"OMP_NUM_THREADS": "1", "LORALAB_EXPERIMENTS": "tests.engine.toy_experiment",
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
    env.update({f"FAULT_{k.upper()}": str(v) for k, v in faults.items()})
    return env


def loralab(driver, *argv, wait=True, **faults):
    """Run the driver (``loralab`` with fault hooks) in a fresh process."""
    cmd = [sys.executable, str(driver), *map(str, argv)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**faults),
                                cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**faults), cwd=ROOT, timeout=300)


def only_run(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


def status(run_dir: Path) -> str:
    from loralab.engine.runs import get_run

    return get_run(run_dir.parent, run_dir.name).status


TOY = ["train", "experiment=toy", "data.n=128", "train.batch_size=16", "train.lr=0.05",
       "train.schedule=constant", "train.max_steps=24", "train.save_every=4", "train.eval_every=2", "train.quiet=true"]


def toy_weights(run_dir: Path) -> list[float]:
    return json.loads((run_dir / "results.json").read_text())["details"]["weights"]


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory):
    """One uninterrupted toy run (best evaluation at step 6) in a process of its own."""
    tmp = tmp_path_factory.mktemp("ref")
    (tmp / "driver.py").write_text(DRIVER)
    p = loralab(tmp / "driver.py", *TOY, f"out_dir={tmp / 'runs'}", best_step=6)
    assert p.returncode == 0, p.stderr
    run = only_run(tmp / "runs")
    fit = json.loads((run / "fit.json").read_text())
    assert fit["best_step"] == 6 and fit["global_step"] == 24
    return run


# ---------------------------------------------------------------- SIGKILL at several points, then --resume


@pytest.mark.parametrize("faults", [
    {"kill_step": 3},                # before the first checkpoint: resume starts again at step 0
    {"kill_step": 11},               # mid-run, after the best evaluation (step 6), checkpoint 8 on disk
    {"kill_in": "weights:12"},       # half of checkpoint-12's trainable.safetensors written
    {"kill_in": "state:16"},         # half of checkpoint-16's state.pt written
    {"kill_in": "manifest:20"},      # every file of checkpoint-20 written, its manifest not
    {"kill_in": "latest:20"},        # checkpoint-20 in place, the latest pointer still names 16
], ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_sigkill_then_resume_is_bit_identical(faults, driver, tmp_path, toy_reference):
    p = loralab(driver, *TOY, f"out_dir={tmp_path / 'runs'}", best_step=6, **faults)
    assert p.returncode == -signal.SIGKILL, p.stderr
    run = only_run(tmp_path / "runs")
    assert status(run) == "interrupted (process gone)"
    config = (run / "config.yaml").read_bytes()
    p = loralab(driver, "train", "--resume", run, best_step=6)
    assert p.returncode == 0, p.stderr
    assert status(run) == "completed"
    assert toy_weights(run) == toy_weights(toy_reference)  # bit-identical: the same float32 values
    assert json.loads((run / "fit.json").read_text())["best_step"] == 6
    assert (run / "config.yaml").read_bytes() == config
    assert not list((run / "checkpoints").glob(".tmp-*"))  # a dead writer's leftovers are cleaned
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert len(steps) == len(set(steps))  # no step logged twice after the resume


def test_a_full_fine_tuning_run_can_be_resumed(driver, tmp_path):
    p = loralab(driver, *TOY, "lora.method=full", f"out_dir={tmp_path / 'runs'}", kill_step=10)
    assert p.returncode == -signal.SIGKILL
    p = loralab(driver, "train", "--resume", only_run(tmp_path / "runs"))
    assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------- keep_best through the CLI, a real adapter


@pytest.fixture(scope="module")
def tiny_glue(tmp_path_factory):
    from loralab.models.tiny import tiny_model, tiny_tokenizer

    base = tmp_path_factory.mktemp("glue-world")
    bert = base / "tiny-bert"
    tiny_model("bert", "base", seed=0).save_pretrained(bert, safe_serialization=True)
    tiny_tokenizer("bert").save_pretrained(bert)
    d = base / "glue" / "RTE"
    d.mkdir(parents=True)
    rows = "".join(f"{i}\tthe cat sat {i}\ta cat is {i % 3}\t{('entailment', 'not_entailment')[i % 2]}\n"
                   for i in range(32))
    for name in ("train.tsv", "dev.tsv"):
        (d / name).write_text("index\tsentence1\tsentence2\tlabel\n" + rows)
    args = ["train", "experiment=glue", f"model.name={bert}", "data.task=rte", f"data.data_dir={base / 'glue'}",
            "data.train_samples=32", "data.eval_samples=16", "train.batch_size=4", "train.lr=1e-3",
            "train.schedule=constant", "train.save_every=2", "train.eval_every=2", "train.quiet=true",
            "lora.r=4", "lora.lora_alpha=8"]
    return {"base": base, "bert": bert, "args": args}


@pytest.mark.slow
def test_keep_best_killed_after_its_best_resumes_completes_bit_identical(driver, tmp_path, tiny_glue):
    """Issue 21 item 1 through the CLI: the best evaluation (step 4) in the first process, SIGKILL at
    step 7, `loralab train --resume`: completed, adapter files byte-identical to an uninterrupted run;
    `--resume` of the completed run leaves it completed; extending it with train.max_steps works and
    equals a run that went that far at once (constant schedule)."""
    args = tiny_glue["args"]
    p = loralab(driver, *args, "train.max_steps=8", f"out_dir={tmp_path / 'straight'}", best_step=4)
    assert p.returncode == 0, p.stderr
    straight = only_run(tmp_path / "straight")
    p = loralab(driver, *args, "train.max_steps=8", f"out_dir={tmp_path / 'cut'}", best_step=4, kill_step=7)
    assert p.returncode == -signal.SIGKILL, p.stderr
    cut = only_run(tmp_path / "cut")
    assert not (cut / "adapter").exists()
    p = loralab(driver, "train", "--resume", cut, best_step=4)
    assert p.returncode == 0, p.stderr
    assert status(cut) == "completed"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (cut / "adapter" / name).read_bytes() == (straight / "adapter" / name).read_bytes(), name
    assert json.loads((cut / "fit.json").read_text())["best_step"] == 4
    results = json.loads((cut / "results.json").read_text())

    # --resume of a completed run: nothing to do, it stays completed with the same results
    p = loralab(driver, "train", "--resume", cut, best_step=4)
    assert p.returncode == 0, p.stderr
    assert status(cut) == "completed"
    assert json.loads((cut / "results.json").read_text())["score"] == results["score"]
    assert (cut / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (straight / "adapter" / "adapter_model.safetensors").read_bytes()

    # extending: 8 -> 12 steps
    p = loralab(driver, "train", "--resume", cut, "train.max_steps=12", best_step=4)
    assert p.returncode == 0, p.stderr
    assert status(cut) == "completed"
    assert json.loads((cut / "fit.json").read_text())["global_step"] == 12
    p = loralab(driver, *args, "train.max_steps=12", f"out_dir={tmp_path / 'long'}", best_step=4)
    assert p.returncode == 0, p.stderr
    long = only_run(tmp_path / "long")
    assert (cut / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (long / "adapter" / "adapter_model.safetensors").read_bytes()


# ---------------------------------------------------------------- a refused --resume touches nothing


def test_resume_of_a_run_a_live_process_owns_is_refused_and_changes_nothing(driver, tmp_path):
    p = loralab(driver, *TOY, f"out_dir={tmp_path / 'runs'}", kill_step=10)
    assert p.returncode == -signal.SIGKILL
    run = only_run(tmp_path / "runs")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "running.json").write_text(json.dumps({"pid": owner.pid, "host": os.uname().nodename,
                                                      "boot_id": Path("/proc/sys/kernel/random/boot_id")
                                                      .read_text().strip()}))
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        p = loralab(driver, "train", "--resume", run, "train.max_steps=48")
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("loralab train: error: ") and f"process {owner.pid}" in last
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # config.yaml included
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.slow
def test_two_processes_resuming_one_run(driver, tmp_path, toy_reference):
    """Real concurrency: the second resumer meets the first one alive, is refused (exit 2) and changes
    nothing; the first one finishes the run, bit-identical to the uninterrupted run."""
    loralab(driver, *TOY, f"out_dir={tmp_path / 'runs'}", kill_step=10, best_step=6)
    run = only_run(tmp_path / "runs")
    first = loralab(driver, "train", "--resume", run, wait=False, best_step=6, sleep=0.15)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if json.loads((run / "running.json").read_text())["pid"] == first.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        config = (run / "config.yaml").read_bytes()
        second = loralab(driver, "train", "--resume", run, "train.max_steps=40", best_step=6)
        assert second.returncode == 2, second.stderr
        assert "still being run by process" in second.stderr and "Traceback" not in second.stderr
        assert (run / "config.yaml").read_bytes() == config
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert status(run) == "completed" and toy_weights(run) == toy_weights(toy_reference)


# ---------------------------------------------------------------- a damaged latest checkpoint


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "latest dir deleted": lambda ck: shutil.rmtree(ck / "checkpoint-20"),
    "state.pt truncated": lambda ck: _truncate(ck / "checkpoint-20" / "state.pt"),
    "trainable.safetensors truncated": lambda ck: _truncate(ck / "checkpoint-20" / "trainable.safetensors"),
    "best.safetensors truncated": lambda ck: _truncate(ck / "checkpoint-20" / "best.safetensors"),
    "latest pointer garbage": lambda ck: (ck / "latest").write_bytes(b"\x00garbage"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_checkpoint_falls_back_and_finishes_bit_identical(damage, driver, tmp_path, toy_reference):
    p = loralab(driver, *TOY, f"out_dir={tmp_path / 'runs'}", best_step=6, kill_step=22)
    assert p.returncode == -signal.SIGKILL
    run = only_run(tmp_path / "runs")
    DAMAGE[damage](run / "checkpoints")
    p = loralab(driver, "train", "--resume", run, best_step=6)
    assert p.returncode == 0, p.stderr
    said = p.stdout + p.stderr
    expected = "checkpoint-20" if damage == "latest pointer garbage" else "checkpoint-16"
    assert f"resumed from {run / 'checkpoints' / expected}" in said, said
    if damage != "latest pointer garbage":
        assert "checkpoint-20" in said  # and why it was passed over
    assert status(run) == "completed" and toy_weights(run) == toy_weights(toy_reference)


# ---------------------------------------------------------------- silent wrong results are errors


def _last_error(stderr: str, command: str = "train") -> str:
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"loralab {command}: error: "), stderr
    return last


def test_nan_loss_is_a_run_failure_with_a_message(driver, tmp_path):
    p = loralab(driver, *TOY, "train.lr=1e30", "train.max_grad_norm=0", f"out_dir={tmp_path / 'runs'}")
    assert p.returncode == 2, p.stderr
    assert "train.lr" in _last_error(p.stderr)
    run = only_run(tmp_path / "runs")
    assert status(run) == "failed" and "loss is" in (run / "error.txt").read_text()


def test_nan_evaluation_through_eval_is_an_error_not_a_score(capsys, tmp_path, tiny_glue):
    """A model whose outputs are NaN scores the majority class (eval_loss NaN) (issue 21 item 4). Now
    `loralab eval`: exit 2, a message, the eval run marked failed, no results.json."""
    import torch
    from transformers import AutoModel

    from loralab import cli
    from loralab.engine.runs import list_runs

    broken = tmp_path / "nan-bert"
    model = AutoModel.from_pretrained(tiny_glue["bert"])
    with torch.no_grad():
        model.embeddings.LayerNorm.weight[0] = float("nan")
    model.save_pretrained(broken)
    for f in tiny_glue["bert"].glob("*token*"):
        shutil.copy(f, broken / f.name)
    (tmp_path / "c.yaml").write_text("")
    args = [a for a in tiny_glue["args"][1:] if not a.startswith("model.name=")]
    code = cli.main(["eval", str(tmp_path / "c.yaml"), "--base-only", *args, f"model.name={broken}",
                     f"out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "non-finite" in _last_error(err, "eval")
    (run,) = list_runs(tmp_path / "runs")
    assert run.status == "failed" and not (run.dir / "results.json").exists()


def test_an_adapter_holding_nan_is_refused(capsys, tmp_path, tiny_glue):
    import torch
    from safetensors.torch import load_file, save_file

    from loralab import cli

    args = [a for a in tiny_glue["args"][1:]] + ["train.max_steps=2", f"out_dir={tmp_path / 'runs'}"]
    assert cli.main(["train", *args]) == 0
    run = only_run(tmp_path / "runs")
    weights = run / "adapter" / "adapter_model.safetensors"
    state = load_file(str(weights))
    save_file({k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in state.items()}, str(weights))
    capsys.readouterr()
    code = cli.main(["eval", str(run)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "NaN/Inf" in _last_error(err, "eval")


def test_nan_policy_skip_with_nan_evaluation_is_an_error(driver, tmp_path):
    """nan_policy=skip skips non-finite steps; an evaluation that is NaN is still no score."""
    p = loralab(driver, *TOY, "train.lr=1e30", "train.max_grad_norm=0", "train.nan_policy=skip",
                f"out_dir={tmp_path / 'runs'}")
    assert p.returncode == 2, p.stderr
    assert "non-finite" in _last_error(p.stderr)
    assert status(only_run(tmp_path / "runs")) == "failed"


def test_divergence_is_loud_and_never_learned(driver, tmp_path):
    p = loralab(driver, *TOY, "train.lr=1e6", "train.eval_every=0", f"out_dir={tmp_path / 'runs'}")
    assert p.returncode == 0, p.stderr
    assert "training diverged" in p.stdout + p.stderr and "NOT LEARNED" in p.stdout
    results = json.loads((only_run(tmp_path / "runs") / "results.json").read_text())
    assert results["details"]["diverged"] is True and results["learned"] is False


def test_warm_start_with_other_lora_settings_is_refused(capsys, tmp_path, tiny_glue):
    from loralab import cli
    from loralab.engine.config import load_config

    args = [a for a in tiny_glue["args"][1:]] + ["train.max_steps=2", f"out_dir={tmp_path / 'runs'}"]
    assert cli.main(["train", *args]) == 0  # r=4, alpha=8 on [query, value]
    adapter = only_run(tmp_path / "runs") / "adapter"
    capsys.readouterr()
    code = cli.main(["train", *args, "lora.r=16", "lora.target_modules=[query,key,value]",
                     f"lora.init_from={adapter}", f"out_dir={tmp_path / 'warm'}"])
    msg = _last_error(capsys.readouterr().err)
    assert code == 2
    assert "lora.r=16" in msg and "lora.r=4" in msg and "lora.target_modules=[query,value]" in msg
    assert not (tmp_path / "warm").exists()  # refused before a run dir exists
    code = cli.main(["train", *args, f"lora.init_from={adapter}", f"out_dir={tmp_path / 'warm'}"])
    assert code == 0, capsys.readouterr().err
    warm = only_run(tmp_path / "warm")
    saved = load_config(warm / "config.yaml")
    assert saved.lora.r == 4 and saved.lora.init_from == str(adapter)  # config.yaml says what trained


def test_qv_pairs_are_the_core_tables_pairs():
    from loralab.core.blocks import QV_NAMES, QV_PAIRS
    from loralab.tasks.common import setup

    assert setup.QV_NAMES is QV_NAMES  # one table, read by the experiments and the engine
    assert set(QV_PAIRS) == {frozenset({"query", "value"}), frozenset({"q", "v"}), frozenset({"q_lin", "v_lin"}),
                             frozenset({"query_proj", "value_proj"}), frozenset({"q_proj", "v_proj"})}


# ---------------------------------------------------------------- disk full


def test_failure_record_reaches_the_registry_when_error_txt_cannot_be_written(tmp_path, monkeypatch):
    """Issue 21 item 5: on a full disk error.txt cannot be written; the registry row (written first)
    still says failed, and the error propagates."""
    import errno

    from loralab.engine.config import load_config
    from loralab.engine.runs import create_run, get_run

    run = create_run(load_config(None, ["experiment=glue", f"out_dir={tmp_path}"]))
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == "error.txt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    run.fail("RuntimeError: boom")
    record = get_run(tmp_path, run.id)
    assert record.status == "failed" and "boom" in record.error


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}): the disk-full case needs one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_fails_loudly_and_keeps_the_previous_checkpoint(driver, tmp_path, small_tmpfs, toy_reference):
    runs = small_tmpfs / "runs"
    p = loralab(driver, *TOY, f"out_dir={runs}", best_step=6, fill=f"{small_tmpfs}:10")
    assert p.returncode == 2, p.stderr
    msg = _last_error(p.stderr)
    assert "could not write checkpoint checkpoint-12" in msg and "checkpoint-8" in msg and "free disk space" in msg
    run = only_run(runs)
    assert status(run) == "failed"
    from loralab.engine.checkpoint import find_checkpoint

    assert find_checkpoint(run / "checkpoints")[0].name == "checkpoint-8"
    (small_tmpfs / "filler").unlink()
    p = loralab(driver, "train", "--resume", run, best_step=6)
    assert p.returncode == 0, p.stderr
    assert status(run) == "completed" and toy_weights(run) == toy_weights(toy_reference)


def test_a_sweep_shares_a_baseline_only_between_runs_it_cannot_differ_in(tmp_path):
    """measure_baseline's cache: runs that differ in method or recipe reuse it; another seed, data or compute
    dtype, or an experiment that does not declare shared_baseline, measures its own."""
    import torch

    from loralab.engine.config import load_config
    from loralab.engine.experiment import Baseline
    from loralab.engine.runner import baseline_key, measure_baseline

    class Counting:
        shared_baseline = True

        def __init__(self):
            self.calls = 0

        def baseline(self, built):
            self.calls += 1
            return Baseline(score=float(self.calls), kind="un-adapted model", metrics={"BLEU": float(self.calls)})

    def key(*overrides, dtype=torch.float32):
        return baseline_key(load_config(None, ["experiment=e2e", *overrides]), dtype)

    cache, exp = tmp_path / "baselines", Counting()
    for run in "abc":
        (tmp_path / run).mkdir()
    first = measure_baseline(exp, None, tmp_path / "a", cache, key("lora.r=1"))
    assert (exp.calls, first.score) == (1, 1.0) and (tmp_path / "a" / "baseline.json").is_file()
    for run, overrides in (("b", ["lora.r=64", "train.lr=0.1"]), ("c", ["lora.method=adapter_h", "train.epochs=3"])):
        assert measure_baseline(exp, None, tmp_path / run, cache, key(*overrides)).score == 1.0  # reused
        assert json.loads((tmp_path / run / "baseline.json").read_text())["score"] == 1.0
    assert exp.calls == 1
    for overrides, dtype in ((["train.seed=1"], torch.float32), (["data.eval_samples=7"], torch.float32),
                             (["generate.num_beams=3"], torch.float32), ([], torch.bfloat16)):
        assert key(*overrides, dtype=dtype) != key()
    measure_baseline(exp, None, None, cache, key("train.seed=1"))
    assert exp.calls == 2 and len(list(cache.iterdir())) == 2
    exp.shared_baseline = False  # a baseline with a random head (SQuAD span) is never shared
    assert measure_baseline(exp, None, None, cache, key("lora.r=1")).score == 3.0
