"""The loralab CLI surface: help from the config docs, exit codes, run orchestration (with a fake
experiment and, once, the real trainer), runs list/show/compare, eval and resume plumbing."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import loralab.engine.trainer
import loralab.metrics
import loralab.models
from loralab import cli
from loralab.engine import config as C
from loralab.engine import experiment as E
from loralab.engine.config import all_keys, load_config
from loralab.engine.experiment import Baseline, Built, Result
from loralab.engine.runs import list_runs
from loralab.engine.task import TaskSpec
from tests.engine.toy_experiment import ToyData


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- help and usage errors


def test_help_lists_every_documented_field_grouped_by_section(capsys):
    code, out, _ = _run(capsys, "train", "--help")
    assert code == 0
    for key in all_keys():
        assert f"  {key} (" in out, key
    assert "train.lr (float, default 0.0005)\n      Peak learning rate (> 0)." in out
    sections = [out.index(f"\n{s}: ") for s in ("model", "lora", "train", "generate")]
    assert sections == sorted(sections) and "\ndata (experiment glue): " in out
    assert _run(capsys, "--help")[0] == 0


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "glue-cpu-sst2", "train.lrr=1"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    (["train", "experiment=glue", "train.lr=abc"], "expected float, got 'abc'"),
    (["train", "experiment=glue", "lora.r=0"], "lora.r: must be an integer >= 1, got 0"),
    (["train", "train.lr=1e-4"], "no experiment: pass --preset NAME or experiment=NAME"),
    (["train", "experiment=glu"], "unknown experiment 'glu'; did you mean 'glue'?"),
    (["train", "--preset", "glue-cpu-sst2", "data.packing=true"], "experiment 'glue' does not read this key"),
    (["train", "a.yaml", "b.yaml"], "unexpected argument 'b.yaml'"),
    (["train", "missing.yaml"], "config file 'missing.yaml' not found"),
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["runs", "--root", "R", "compare", "abc"], "at least two run ids"),
    (["score-e2e", "no-hyp.txt", "no-ref.txt"], "no-hyp.txt: no such file"),
])
def test_config_and_usage_errors_exit_2_without_traceback(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_argparse_errors_exit_2(capsys):
    assert _run(capsys, "bogus")[0] == 2
    assert _run(capsys)[0] == 2
    assert _run(capsys, "merge", "x")[0] == 2  # --out is required


def test_config_command_prints_loadable_documented_yaml(capsys, tmp_path):
    code, out, _ = _run(capsys, "config", "experiment=e2e", "train.lr=1e-4", "lora.target_modules=[q_proj,v_proj]",
                        "--out", str(tmp_path / "saved.yaml"))
    assert code == 0 and "# Peak learning rate" in out
    (tmp_path / "printed.yaml").write_text(out)
    expected = load_config(None, ["experiment=e2e", "train.lr=1e-4", "lora.target_modules=[q_proj,v_proj]"])
    assert load_config(tmp_path / "printed.yaml") == expected == load_config(tmp_path / "saved.yaml")
    code, out, _ = _run(capsys, "config", "--schema")
    assert code == 0 and "generate.num_beams (int, default 10)" in out


def test_config_presets_is_a_readable_table(capsys):
    code, out, _ = _run(capsys, "config", "--presets")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["preset", "experiment", "model", "method", "description"]
    row = next(line for line in lines if line.startswith("glue-cpu-sst2-full "))
    assert row.split()[1:4] == ["glue", "minilm-l6", "full"] and "{" not in out  # no JSON wall
    assert len(lines) == 2 + len(C.list_presets())


def test_overrides_after_an_option_are_overrides(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("train: {lr: 2e-4}\n")
    code, out, err = _run(capsys, "train", str(tmp_path / "c.yaml"), "--preset", "glue-cpu-sst2", "train.seed=3",
                          "--dry-run")
    assert code == 0, err
    assert "seed: 3" in out and "lr: 0.0002" in out


# ---------------------------------------------------------------- orchestration with a fake experiment


class FakeExperiment:
    """An Experiment whose build/baseline/report record their calls; ``fail_in`` raises in that phase."""

    name = "fake"
    data_config = ToyData
    sections = ()
    presets = {"fake-preset": {"_doc": "a fake", "train.lr": 7e-4}}

    def __init__(self):
        self.fail_in, self.fit_status, self.interrupt = None, "completed", False
        self.built_with, self.fit_kwargs, self.reported, self.baselines = None, None, None, 0

    def build(self, cfg):
        self.built_with = cfg
        if self.fail_in == "build":
            raise RuntimeError("boom in build")
        return Built(nn.Linear(1, 1), "TASK", {"tokenizer": "TOKENIZER"})

    def baseline(self, built):
        self.baselines += 1
        return Baseline(score=0.5, kind="majority class")

    def fit(self, model, task, train_cfg, run_dir=None, resume=False, log=print, compute_dtype=None):
        self.fit_kwargs = {"task": task, "train_cfg": train_cfg, "run_dir": run_dir, "resume": resume,
                           "compute_dtype": compute_dtype}
        if self.interrupt:
            raise KeyboardInterrupt
        return types.SimpleNamespace(status=self.fit_status, global_step=7, tokens_per_second=10.0)

    def report(self, built, fit, run_dir):
        self.reported = (built.state["tokenizer"], Path(run_dir), fit)
        return Result(experiment="fake", main_metric="accuracy", score=0.875, metrics={"accuracy": 0.875},
                      baseline=built.baseline, margin=0.01, trainable_params=2, total_params=2,
                      details={"steps": getattr(fit, "global_step", None)})


@pytest.fixture
def fake(monkeypatch):
    exp = FakeExperiment()
    monkeypatch.setitem(E._REGISTRY, "fake", exp)
    monkeypatch.setattr(loralab.engine.trainer, "fit", exp.fit)
    return exp


F = ["experiment=fake"]


def test_train_creates_run_fits_reports_and_records(capsys, tmp_path, fake):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("experiment: fake\ntrain: {lr: 2e-4, seed: 1}\n")
    code, out, err = _run(capsys, "train", str(cfg_file), f"out_dir={tmp_path / 'runs'}", "train.seed=5", "--quiet")
    assert code == 0, err
    (record,) = list_runs(tmp_path / "runs")
    assert record.status == "completed" and record.metrics["score"] == 0.875
    assert record.metrics["baseline.score"] == 0.5 and record.metrics["learned"] is True
    assert fake.built_with.train.lr == 2e-4 and fake.built_with.train.seed == 5 and fake.built_with.train.quiet
    assert fake.fit_kwargs["train_cfg"] is fake.built_with.train and fake.fit_kwargs["task"] == "TASK"
    assert Path(fake.fit_kwargs["run_dir"]) == record.dir and fake.fit_kwargs["resume"] is False
    assert fake.fit_kwargs["compute_dtype"] == torch.float32  # the schema default, resolved by the runner
    assert fake.reported[:2] == ("TOKENIZER", record.dir)
    results = json.loads((record.dir / "results.json").read_text())
    assert results["score"] == 0.875 and results["baseline"]["kind"] == "majority class"
    assert results["learned"] is True and results["details"]["steps"] == 7
    assert results["run"] == {"name": "fake", "model": "minilm-l6", "task": "fake", "method": "lora", "seed": 5}
    assert results["tokens_per_second"] == 0.0 and results["wall_seconds"] > 0
    assert json.loads((record.dir / "baseline.json").read_text())["score"] == 0.5
    assert f"run {record.id[:8]} completed" in out and "baseline 0.5 (majority class)  -> learned" in out


def test_runtime_failure_exits_1_and_marks_the_run_failed(capsys, tmp_path, fake):
    fake.fail_in = "build"
    code, _, err = _run(capsys, "train", *F, f"out_dir={tmp_path}")
    assert code == 1 and "RuntimeError: boom in build" in err and "bug in loralab" in err
    (record,) = list_runs(tmp_path)
    assert record.status == "failed" and "boom in build" in (record.dir / "error.txt").read_text()


@pytest.mark.parametrize("how", ["keyboard_interrupt", "fit_returns_interrupted"])
def test_ctrl_c_exits_130_and_marks_interrupted(capsys, tmp_path, fake, how):
    fake.interrupt = how == "keyboard_interrupt"
    fake.fit_status = "interrupted"
    code, _, err = _run(capsys, "train", *F, f"out_dir={tmp_path}")
    assert code == 130 and "interrupted" in err
    (record,) = list_runs(tmp_path)
    assert record.status == "interrupted" and fake.reported is None
    assert f"--resume {record.dir}" in (record.dir / "error.txt").read_text()


def test_resume_reuses_the_run_and_refuses_math_changes(capsys, tmp_path, fake):
    fake.fit_status = "interrupted"
    _run(capsys, "train", *F, f"out_dir={tmp_path}", "train.max_steps=10")
    (record,) = list_runs(tmp_path)
    code, _, err = _run(capsys, "train", "--resume", str(record.dir), "train.lr=1e-3")
    assert code == 2 and "cannot change train.lr when resuming" in err
    assert _run(capsys, "train", "--resume", str(record.dir), "--preset", "quickstart")[0] == 2
    fake.fit_status = "completed"
    code, _, err = _run(capsys, "train", "--resume", str(record.dir), "train.max_steps=20")
    assert code == 0, err
    (again,) = list_runs(tmp_path)  # the same run, not a new one
    assert again.id == record.id and again.status == "completed" and fake.fit_kwargs["resume"] is True
    assert load_config(record.dir / "config.yaml").train.max_steps == 20
    assert fake.baselines == 1  # measured once per run: the resumed process read baseline.json


def test_dry_run_and_presets(capsys, tmp_path, fake):
    code, out, _ = _run(capsys, "config", "--preset", "quickstart", "train.lr=1e-4")
    assert code == 0 and fake.built_with is None
    (tmp_path / "p.yaml").write_text(out)
    printed = load_config(tmp_path / "p.yaml")
    assert printed == load_config(None, ["train.lr=1e-4"], preset="quickstart")
    assert printed.train.lr == 1e-4 and printed.experiment == "instruct" and printed.model.quantize == "nf4"
    code, out, _ = _run(capsys, "train", *F, "--dry-run", "train.lr=2e-4")  # builds, trains nothing
    assert code == 0 and fake.built_with.train.lr == 2e-4 and fake.fit_kwargs is None
    counts = json.loads(out.splitlines()[-1])  # nn.Linear(1, 1): weight + bias, both trainable
    assert counts["trainable"] == counts["total"] == 2 and counts["experiment"] == "fake"
    assert "lr: 0.0002" in out and not list_runs(tmp_path / "runs")
    code, _, err = _run(capsys, "train", "--preset", "fake-preset", f"out_dir={tmp_path / 'q'}")
    assert code == 0, err
    assert fake.built_with == load_config(None, [f"out_dir={tmp_path / 'q'}"], preset="fake-preset")
    assert fake.built_with.train.lr == 7e-4 and list_runs(tmp_path / "q")[0].status == "completed"


def test_eval_loads_the_runs_adapter(capsys, tmp_path, fake):
    _run(capsys, "train", *F, f"out_dir={tmp_path}", "train.lr=3e-4")
    (trained,) = list_runs(tmp_path)
    code, _, err = _run(capsys, "eval", str(trained.dir))
    assert code == 2 and "no adapter" in err
    (trained.dir / "adapter").mkdir()
    (trained.dir / "adapter" / "adapter_config.json").write_text("{}")
    code, _, err = _run(capsys, "eval", str(trained.dir))
    assert code == 2 and "no adapter_model.safetensors" in err  # checked before anything is built
    from safetensors.torch import save_file

    save_file({"base_model.model.x.lora_A.weight": torch.zeros(1, 1)},
              str(trained.dir / "adapter" / "adapter_model.safetensors"))
    code, _, err = _run(capsys, "eval", str(trained.dir), "data.eval_samples=5")
    assert code == 0, err
    assert fake.built_with.lora.init_from == str(trained.dir / "adapter")
    assert fake.built_with.train.lr == 3e-4 and fake.built_with.data.eval_samples == 5
    assert fake.reported[2] is None  # no fit result
    runs = list_runs(tmp_path)
    assert len(runs) == 2 and runs[1].name.startswith("eval-") and runs[1].status == "completed"
    code, _, err = _run(capsys, "eval", str(trained.dir), "--base-only")
    assert code == 0 and "BASE model" in err and fake.built_with.lora.init_from is None


def test_runs_list_show_compare(capsys, tmp_path, fake):
    for lr in ("1e-3", "2e-4"):
        assert _run(capsys, "train", *F, f"out_dir={tmp_path}", f"train.lr={lr}")[0] == 0
    a, b = list_runs(tmp_path)
    code, out, _ = _run(capsys, "runs", "--root", str(tmp_path), "list")
    header = out.splitlines()[0].split()
    assert code == 0 and a.id[:8] in out and b.id[:8] in out
    assert header[-3:] == ["score", "baseline", "learned"]
    row = next(line for line in out.splitlines() if line.startswith(a.id[:8])).split()
    assert row[-3:] == ["0.875", "0.5", "yes"]
    code, out, _ = _run(capsys, "runs", "--root", str(tmp_path), "show", a.id[:6])
    assert code == 0 and str(a.dir) in out and '"score": 0.875' in out
    code, out, _ = _run(capsys, "runs", "--root", str(tmp_path), "compare", a.id[:8], b.id[:8])
    assert code == 0 and "train.lr" in out and "0.001" in out and "0.0002" in out
    code, _, err = _run(capsys, "runs", "--root", str(tmp_path), "show", "zzzz")
    assert code == 2 and "no run 'zzzz'" in err


def test_models_and_score_e2e_dispatch_lazily(capsys, tmp_path, monkeypatch):
    zoo = types.ModuleType("loralab.models.zoo")
    zoo.list_models = lambda: [{"name": "minilm-l6", "params": 22_700_000}, {"name": "smollm2-135m", "params": 1}]
    monkeypatch.setitem(sys.modules, "loralab.models.zoo", zoo)
    monkeypatch.setattr(loralab.models, "zoo", zoo, raising=False)
    code, out, _ = _run(capsys, "models")
    assert code == 0 and "minilm-l6" in out and "22700000" in out

    e2e = types.ModuleType("loralab.metrics.e2e")
    e2e.score_files = lambda hyp, ref: {"BLEU": 0.5, "n": Path(hyp).read_text().count("\n")}
    monkeypatch.setitem(sys.modules, "loralab.metrics.e2e", e2e)
    monkeypatch.setattr(loralab.metrics, "e2e", e2e, raising=False)
    (tmp_path / "h.txt").write_text("a\nb\n")
    (tmp_path / "r.txt").write_text("a\n")
    code, out, _ = _run(capsys, "score-e2e", str(tmp_path / "h.txt"), str(tmp_path / "r.txt"), "--json")
    assert code == 0 and json.loads(out) == {"BLEU": 0.5, "n": 2}
    code, out, _ = _run(capsys, "score-e2e", str(tmp_path / "h.txt"), str(tmp_path / "r.txt"))
    assert code == 0 and json.loads(out) == {"BLEU": 0.5, "n": 2}  # one JSON object by default

    def mismatch(hyp, ref):
        raise ValueError("h.txt has 2 outputs but r.txt has 1 reference groups")

    e2e.score_files = mismatch
    code, _, err = _run(capsys, "score-e2e", str(tmp_path / "h.txt"), str(tmp_path / "r.txt"))
    assert code == 2 and "2 outputs but" in err and "Traceback" not in err



# ---------------------------------------------------------------- the real trainer, once


def test_train_with_the_real_trainer(capsys, tmp_path, monkeypatch):
    """Orchestration end to end with loralab.engine.trainer.fit on a 2-feature linear regression;
    the reported MSE is checked against a float64 recomputation from the trained weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, generator=g)
    y = x @ torch.tensor([1.0, -2.0]) + 0.5
    data = [{"x": x[i], "y": y[i], "input_ids": [0]} for i in range(512)]
    holder = {}

    class Regression(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, x):
            return self.linear(x).squeeze(-1)

    def collate(examples):
        return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples])}

    def mse(model):
        with torch.no_grad():
            return {"mse": float(((model(x) - y) ** 2).mean())}

    class Experiment(FakeExperiment):
        def build(self, cfg):
            torch.manual_seed(cfg.train.seed)
            model = holder["model"] = Regression()
            task = TaskSpec(train_dataset=data, collate=collate,
                            loss=lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean(), evaluate=mse, metric="mse",
                            greater_is_better=False)
            return Built(model, task, {})

        def report(self, built, fit_result, run_dir):
            return Result("fake", "mse", mse(built.model)["mse"], mse(built.model), greater_is_better=False,
                          details={"steps": fit_result.global_step, "status": fit_result.status})

    monkeypatch.setitem(E._REGISTRY, "fake", Experiment())
    code, _, err = _run(capsys, "train", *F, f"out_dir={tmp_path}", "train.max_steps=64", "train.lr=0.1",
                        "train.batch_size=16", "train.quiet=true", "train.schedule=constant")
    assert code == 0, err
    (record,) = list_runs(tmp_path)
    results = json.loads((record.dir / "results.json").read_text())
    results = {**results["metrics"], **results["details"]}
    w = holder["model"].linear.weight.detach().double()
    b = holder["model"].linear.bias.detach().double()
    expected = float(((x.double() @ w.T).squeeze(-1) + b - y.double()).pow(2).mean())
    assert results["mse"] == pytest.approx(expected, rel=1e-5)
    assert results["steps"] == 64 and results["status"] == "completed"
    assert results["mse"] < 0.1 * float(y.var())  # it learned
    assert record.status == "completed" and (record.dir / "metrics.jsonl").stat().st_size > 0


def test_merge_exports_a_model_that_matches_the_adapter_model(capsys, tmp_path, monkeypatch):
    """Adapter files -> build -> merge -> save -> reload with transformers: the reloaded plain model
    gives the logits of the (unmerged) adapter model, trained head included."""
    transformers = pytest.importorskip("transformers")
    from loralab.core.adapter_io import load_adapter, save_adapter
    from loralab.core.inject import inject_adapter
    from loralab.models.tiny import tiny_model

    monkeypatch.setitem(E._REGISTRY, "fake", FakeExperiment())
    cfg = load_config(None, [*F, f"out_dir={tmp_path}", "lora.r=4", "lora.lora_alpha=8",
                             "lora.modules_to_save=[classifier]"])
    trained = inject_adapter(tiny_model("bert", "seq_cls", seed=0), cfg.lora.to_lora_config())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: every trainable tensor (B included) moves away from init
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    (tmp_path / "run").mkdir()
    save_adapter(trained, tmp_path / "run" / "adapter")
    C.save_config(cfg, tmp_path / "run" / "config.yaml")

    class Experiment(FakeExperiment):
        def build(self, run_cfg):
            model = tiny_model("bert", "seq_cls", seed=0)
            load_adapter(model, run_cfg.lora.init_from)  # injects the adapter's LoRA layers and loads the weights
            example = {"input_ids": [2, 40, 41, 42, 3], "attention_mask": [1] * 5}
            collate = lambda exs: {k: torch.tensor([e[k] for e in exs]) for k in exs[0]}  # noqa: E731
            return Built(model, TaskSpec(train_dataset=[example], collate=collate, loss=lambda m, b: None), {})

    monkeypatch.setitem(E._REGISTRY, "fake", Experiment())
    code, out, err = _run(capsys, "merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    merged = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    ids = torch.randint(5, 128, (3, 11), generator=g)
    trained.eval()
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, merged(input_ids=ids).logits
    base = tiny_model("bert", "seq_cls", seed=0)
    with torch.no_grad():
        assert (base(input_ids=ids).logits - expected).abs().max() > 1e-2  # the adapter matters here
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert info["max_abs_logit_diff_reloaded"] < 1e-5


DRIVER = '''
import sys, time, types
import torch
from torch import nn
from loralab import cli
from loralab.engine.experiment import Built, Result, register_experiment
from loralab.engine.task import TaskSpec
from tests.engine.toy_experiment import ToyData

g = torch.Generator().manual_seed(0)
x = torch.randn(256, 2, generator=g)
y = x @ torch.tensor([1.0, -2.0]) + 0.5
data = [{"x": x[i], "y": y[i], "input_ids": [0]} for i in range(256)]

def collate(examples):
    return {"x": torch.stack([e["x"] for e in examples]), "y": torch.stack([e["y"] for e in examples])}

def loss(model, batch):
    time.sleep(0.03)  # slow enough to be interrupted mid-run
    return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()

class Driver:
    name, data_config, sections, presets = "driver", ToyData, (), {}

    def build(self, cfg):
        torch.manual_seed(cfg.train.seed)
        return Built(nn.Linear(2, 1), TaskSpec(train_dataset=data, collate=collate, loss=loss), {})

    def baseline(self, built):
        return None

    def report(self, built, fit_result, run_dir):
        m = built.model
        return Result("driver", "steps", fit_result.global_step, {"steps": fit_result.global_step},
                      details={"weight": m.weight.tolist(), "bias": m.bias.tolist()})

register_experiment(Driver())

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
'''


@pytest.mark.slow
def test_ctrl_c_then_resume_through_the_cli_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """A real SIGINT to `loralab train` (real trainer): exit 130, run marked interrupted; `--resume`
    finishes the same run, and its final weights equal those of a run that was never interrupted."""
    import os
    import runpy
    import signal
    import subprocess
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = ["experiment=driver", "train.max_steps=32", "train.batch_size=16", "train.save_every=4", "train.lr=0.05",
            "train.quiet=true"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}

    monkeypatch.syspath_prepend(root)
    runpy.run_path(str(driver))  # registers "driver" here too: the uninterrupted reference run, in this process
    code, _, err = _run(capsys, "train", f"out_dir={tmp_path / 'straight'}", *args)
    assert code == 0, err
    (straight,) = list_runs(tmp_path / "straight")

    proc = subprocess.Popen([sys.executable, str(driver), "train", f"out_dir={tmp_path / 'cut'}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = list((tmp_path / "cut").glob("*/metrics.jsonl"))
        if metrics and len(metrics[0].read_text().splitlines()) >= 9:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (cut,) = list_runs(tmp_path / "cut")
    assert cut.status == "interrupted"

    resumed = subprocess.run([sys.executable, str(driver), "train", "--resume", str(cut.dir)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    (after,) = list_runs(tmp_path / "cut")
    assert after.id == cut.id and after.status == "completed"
    a, b = (json.loads((r.dir / "results.json").read_text()) for r in (straight, after))
    a, b = ({**r["details"], "steps": r["score"]} for r in (a, b))
    assert a["steps"] == b["steps"] == 32
    assert (a["weight"], a["bias"]) == (b["weight"], b["bias"])  # exact resume: bit-identical weights
    steps = [json.loads(line).get("step") for line in (after.dir / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1 and max(steps) == 32  # continued from the checkpoint, did not start over


@pytest.mark.parametrize("method,kind,count", [
    ("adapter_h", "adapter", 2 * 2 * (2 * 32 * 8 + 8 + 32)),  # 2L adapters of (2 d r + r + d), r = the preset's 8
    ("prefix_layer", "prefix", 2 * 2 * 32 * 10),  # K and V prefixes: 2 L d l_p, l_p = 10 (Hu et al.: L d l_p)
    ("lora", "lora", 2 * 2 * 8 * (32 + 32)),  # W_q, W_v in 2 layers, r = 8: r (d + d); the head's copy is "head"
])
def test_dry_run_prints_the_counts_by_kind_of_the_method(capsys, tmp_path, monkeypatch, method, kind, count):
    """`loralab train --preset glue-cpu-sst2 lora.method=... --dry-run` on a tiny BERT: the last stdout line
    is one JSON object whose trainable/total/by_kind are the paper's formula on that config; nothing trains."""
    from loralab.models.tiny import tiny_model
    from tests.tasks.common.tiny_runs import HEAD, glue_data_dir, tiny_bert_dir

    model_dir, data_dir = tiny_bert_dir(tmp_path), glue_data_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "train", "--preset", "glue-cpu-sst2", f"lora.method={method}",
                          f"model.name={model_dir}", f"data.data_dir={data_dir}", "--dry-run")
    assert code == 0, err
    counts = json.loads(out.strip().splitlines()[-1])
    assert (counts["experiment"], counts["method"]) == ("glue", method)
    base = sum(p.numel() for p in tiny_model("bert", "seq_cls", num_labels=2).parameters())
    copy = HEAD if method == "lora" else 0  # modules_to_save: a trained copy beside the frozen original head
    assert counts["trainable"] == count + HEAD and counts["total"] == base + count + copy
    assert {k: v["trainable"] for k, v in counts["by_kind"].items() if v["trainable"]} == {kind: count, "head": HEAD}
    assert counts["by_kind"][kind]["total"] == count and counts["by_kind"]["head"]["total"] == HEAD + copy
    assert not (tmp_path / "runs").exists()  # no run was created, nothing trained


def test_a_run_ends_with_its_summary_and_report(capsys, tmp_path, fake):
    code, out, err = _run(capsys, "train", *F, f"out_dir={tmp_path}")
    assert code == 0, err
    (record,) = list_runs(tmp_path)
    lines = out.splitlines()
    assert "accuracy 0.875 (higher is better)  baseline 0.5 (majority class)  -> learned" in out
    assert lines[-1] == f"  report {record.dir / 'report' / 'index.html'}"
    page = (record.dir / "report" / "index.html").read_text()
    assert "0.875" in page and "0.5" in page
    code, out, _ = _run(capsys, "train", *F, f"out_dir={tmp_path / 'q'}", "--quiet")  # quiet: no report
    assert code == 0 and "report" not in out
