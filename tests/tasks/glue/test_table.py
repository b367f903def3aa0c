"""The GLUE table: median over seeds, spread, the baseline row and the failed-run mark, the paper's row
averaged over the same columns; rows collected from results.json (the common schema) + config.yaml."""
import json
import statistics
from pathlib import Path

import pytest

from loralab.engine.experiment import Baseline, Result
from loralab.metrics.glue import MAIN_METRIC
from loralab.tasks.glue import table as R

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data" / "glue"


def _res(task, seed, value, method="lora", model="minilm-l6", key=None):
    key = key or {"stsb": "pearson", "cola": "matthews_corr"}.get(task, "accuracy")
    return {"task": task, "seed": seed, "model": model, "method": method, "metrics": {key: value, "eval_loss": 0.5},
            "trainable_params": 1234, "fit": {"global_step": 10}}


def test_median_spread_and_markdown():
    rte = [0.70, 0.66, 0.72, 0.61, 0.69]
    results = [_res("rte", s, v) for s, v in enumerate(rte)] + [_res("stsb", 0, 0.855)]
    results += [_res("rte", 0, 0.60, method="bitfit")]
    markdown, data = R.glue_table(results)
    assert data["tasks"] == ["rte", "stsb"]  # paper order, only the tasks that ran
    lora = next(r for r in data["rows"] if r["method"] == "lora")
    cell = lora["tasks"]["rte"]
    assert cell["median"] == pytest.approx(100 * statistics.median(rte))
    assert (cell["min"], cell["max"], cell["n"]) == (pytest.approx(61.0), pytest.approx(72.0), 5)
    assert cell["std"] == pytest.approx(100 * statistics.stdev(rte))
    assert lora["avg"] == pytest.approx((100 * statistics.median(rte) + 85.5) / 2)
    bitfit = next(r for r in data["rows"] if r["method"] == "bitfit")
    assert bitfit["avg"] is None  # no STS-B run: no average over a different set of columns
    assert data["paper"]["scores"] == {"rte": 86.6, "stsb": 91.5}
    assert data["paper"]["avg"] == pytest.approx((86.6 + 91.5) / 2)
    lines = markdown.splitlines()
    assert lines[0] == "| model / method | trainable | RTE | STS-B | Avg |"
    assert "| minilm-l6 / lora | 1,234 | 69.0 (61.0–72.0, n=5) | 85.5 | 77.2 |" in lines
    assert "| minilm-l6 / bitfit | 1,234 | 60.0 | — | — |" in lines
    assert any(line.startswith(f"| {R.PAPER_LABEL} | 0.3M | 86.6 | 91.5 | 89.0 |") for line in lines)
    json.dumps(data)  # JSON-ready


def test_paper_numbers_and_metric_choice():
    assert R.PAPER_ROBERTA_BASE_LORA == {"mnli": 87.5, "sst2": 95.1, "mrpc": 89.7, "cola": 63.4, "qnli": 93.3,
                                         "qqp": 90.8, "rte": 86.6, "stsb": 91.5}
    all_tasks = [_res(t, 0, 0.5) for t in R.TASK_ORDER]
    markdown, data = R.glue_table(all_tasks)
    assert data["metrics"]["cola"] == "matthews_corr" and data["metrics"]["stsb"] == "pearson"
    assert data["paper"]["avg"] == pytest.approx(sum(R.PAPER_ROBERTA_BASE_LORA.values()) / 8)  # 87.2375
    assert "MNLI | SST-2 | MRPC | CoLA | QNLI | QQP | RTE | STS-B | Avg" in markdown
    with pytest.raises(KeyError, match="no metric 'matthews_corr'"):
        R.glue_table([_res("cola", 0, 0.5, key="accuracy")])
    with pytest.raises(ValueError, match="at least one"):
        R.glue_table([])


def _result(task, value, baseline=0.5, fit=None):
    """A run's results.json in the common schema (as the runner writes it)."""
    key = MAIN_METRIC[task]
    res = Result("glue", key, value, {key: value, "eval_loss": 0.5}, baseline=Baseline(baseline, "majority class (1)"),
                 margin=0.05, trainable_params=1234, total_params=99_999,
                 details={"task": task, "fit": {"global_step": 10} if fit is None else fit})
    return {**res.to_dict(), "run": {"task": task}}


def _config(task, seed, experiment="glue", **overrides):
    from loralab.engine.config import load_config

    extra = [f"data.task={task}"] if experiment == "glue" else []
    return load_config(overrides=[f"experiment={experiment}", *extra, f"train.seed={seed}",
                                  *(f"{k}={v}" for k, v in overrides.items())])


def _write_run(run_dir, task, seed, value, **kw):
    from loralab.engine.config import save_config

    run_dir.mkdir(parents=True)
    save_config(_config(task, seed), run_dir / "config.yaml")
    (run_dir / R.RESULT_FILE).write_text(json.dumps(_result(task, value, **kw)))


def test_flatten_reads_results_json_and_config_yaml(tmp_path):
    _write_run(tmp_path / "r", "stsb", 3, 0.81, baseline=0.0)
    row = R.flatten(json.loads((tmp_path / "r" / R.RESULT_FILE).read_text()), tmp_path / "r")
    assert (row["task"], row["seed"], row["model"], row["method"], row["main_metric"]) == (
        "stsb", 3, "minilm-l6", "lora", "pearson")
    assert (row["baseline"], row["learned"], row["trainable_params"]) == (0.0, True, 1234)  # 0.81 - 0 > 0.05
    assert row["settings"] == {"lr": 5e-4, "epochs": 1.0, "max_steps": 0, "batch_size": 16, "r": 8, "alpha": 8.0,
                               "train_samples": 0, "max_length": 128, "init_from": None}
    assert R.result_score(row) == pytest.approx(81.0)


def test_write_and_collect(tmp_path, capsys):
    for seed, v in enumerate([0.8, 0.9, 0.85]):
        _write_run(tmp_path / f"run{seed}", "sst2", seed, v)
    # `loralab eval` of an adapter: no fit, not another seed
    (tmp_path / "eval-run").mkdir()
    (tmp_path / "eval-run" / R.RESULT_FILE).write_text(json.dumps({**_result("sst2", 0.8), "details": {"task": "sst2",
                                                                                                      "fit": None}}))
    (tmp_path / "e2e-run").mkdir()  # another experiment's results.json is not a GLUE row
    (tmp_path / "e2e-run" / R.RESULT_FILE).write_text(json.dumps({**_result("sst2", 0.8), "experiment": "e2e"}))
    results = R.collect_results(tmp_path)
    assert sorted(r["seed"] for r in results) == [0, 1, 2]
    assert all(r["baseline"] == 0.5 and r["learned"] is True for r in results)
    md, js = R.write_glue_table(results, tmp_path / "out")
    text = md.read_text()
    assert "85.0 (80.0–90.0, n=3)" in text and "85.0" in capsys.readouterr().out
    assert "| baseline: majority class (STS-B: constant) | 0 | 50.0 | — |" in text
    data = json.loads(js.read_text())
    assert data["rows"][0]["tasks"]["sst2"]["n"] == 3 and data["baseline"] == {"sst2": 50.0}


def test_collect_from_the_run_registry(tmp_path):
    from loralab.engine.runs import create_run

    for seed, status in [(0, "completed"), (1, "completed"), (2, "failed")]:
        run = create_run(_config("rte", seed, out_dir=tmp_path))
        res = _result("rte", 0.6 + seed / 10)
        run.finish(res) if status == "completed" else run.fail("boom")
    other = create_run(_config("rte", 0, experiment="e2e", out_dir=tmp_path))  # completed, not GLUE
    other.finish({**_result("rte", 0.9), "experiment": "e2e"})
    results = R.collect_results(tmp_path)
    assert sorted(r["seed"] for r in results) == [0, 1]  # the failed run and the E2E run are left out
    assert sorted(r["metrics"]["accuracy"] for r in results) == [0.6, 0.7]


def test_seeds_end_to_end_through_the_registry(tmp_path):
    """Two seeds of a tiny RTE run (what `loralab sweep --seeds 0,1` runs, here in-process), then the
    table from the registry: one cell, n=2, the runs' own scores and baselines."""
    from loralab.engine.config import load_config
    from loralab.engine.runner import run_training
    from loralab.models.tiny import tiny_model, tiny_tokenizer

    if not (SHARED / "RTE").is_dir():
        pytest.skip("../shared/data/glue not present")
    model_dir = tmp_path / "tiny-bert"
    tiny_model("bert", "base", seed=0).save_pretrained(model_dir, safe_serialization=True)
    tiny_tokenizer("bert").save_pretrained(model_dir)
    overrides = ["experiment=glue", f"model.name={model_dir}", f"out_dir={tmp_path / 'runs'}", "data.task=rte",
                 "data.train_samples=16", "data.eval_samples=8", "data.max_length=32", "train.batch_size=8",
                 "train.max_steps=1", "train.quiet=true", "lora.r=2"]
    results = [run_training(load_config(overrides=overrides + [f"train.seed={s}"]))[1] for s in (0, 1)]
    assert [r["run"]["seed"] for r in results] == [0, 1]
    assert R.main([str(tmp_path / "runs"), "--out", str(tmp_path / "table")]) == 0
    data = json.loads((tmp_path / "table" / "glue_table.json").read_text())
    cell = data["rows"][0]["tasks"]["rte"]
    assert cell["n"] == 2 and cell["seeds"] == [0, 1]
    assert cell["values"] == [100 * r["score"] for r in results]
    assert cell["learned"] == sum(bool(r["learned"]) for r in results)
    assert cell["baseline"] == sorted(100 * r["baseline"]["score"] for r in results)[1]
    assert cell["settings"]["r"] == 2 and cell["settings"]["train_samples"] == 16


def test_cells_at_the_baseline_are_marked_failed():
    rows = [{**_res("rte", s, v), "baseline": 0.5, "learned": ok} for s, v, ok in [(0, 0.70, True), (1, 0.52, False)]]
    rows += [{**_res("stsb", 0, 0.85), "baseline": 0.0, "learned": True}]
    markdown, data = R.glue_table(rows)
    assert "| minilm-l6 / lora | 1,234 | 61.0 (52.0–70.0, n=2) ✗ at baseline (1/2) | 85.0 | 73.0 |" in markdown
    assert "| baseline: majority class (STS-B: constant) | 0 | 50.0 | 0.0 | — |" in markdown
    assert data["baseline"] == {"rte": 50.0, "stsb": 0.0}
    assert "| RTE | lora | 1 | 52.0 | 50.0 | NO | 1,234 |" in markdown
    assert "| RTE | lora | 0 | 70.0 | 50.0 | yes |" in markdown


def test_runs_with_different_settings_are_not_pooled():
    a = [{**_res("stsb", s, v), "settings": {"lr": 5e-4}} for s, v in enumerate([0.40, 0.42, 0.41])]
    b = [{**_res("stsb", s, v), "settings": {"lr": 2e-3}} for s, v in enumerate([0.76, 0.75])]
    c = [{**_res("rte", 0, 0.6), "settings": {"lr": 2e-3}}]
    markdown, data = R.glue_table(a + b + c)
    by_variant = {r["variant"]: r for r in data["rows"]}
    assert set(by_variant) == {"lr=0.0005", "lr=0.002", ""}
    assert by_variant["lr=0.0005"]["tasks"]["stsb"]["median"] == pytest.approx(41.0)
    assert by_variant["lr=0.002"]["tasks"]["stsb"]["median"] == pytest.approx(75.5)
    assert by_variant[""]["tasks"]["rte"]["n"] == 1
    assert "| minilm-l6 / lora (lr=0.002) | 1,234 | — | 75.5 (75.0–76.0, n=2) | — |" in markdown


def test_per_run_lines_state_time_and_throughput(tmp_path, capsys):
    a = _res("rte", 0, 0.61)
    a["fit"] = {"train_seconds": 123.4, "tokens_per_second": 4567.8}
    a["run_dir"] = str(tmp_path / "20261128-rte-abc")
    b = _res("sst2", 0, 0.8, method="full")
    markdown, _ = R.glue_table([a, b])
    assert "| SST-2 | full | 0 | 80.0 | — | — | 1,234 | ? | ? | ? |" in markdown  # sorted in paper order
    assert "| RTE | lora | 0 | 61.0 | — | — | 1,234 | 123 | 4,568 | 20261128-rte-abc |" in markdown
    assert markdown.index("| SST-2 | full |") < markdown.index("| RTE | lora |")  # given RTE first
    # and through the CLI: `loralab glue-table RUNS_DIR` finds results.json files and writes both files
    from loralab.cli import main

    _write_run(tmp_path / "runs" / "one", "rte", 0, 0.61, fit={"train_seconds": 123.4, "tokens_per_second": 4567.8})
    assert main(["glue-table", str(tmp_path / "runs")]) == 0
    assert "| RTE | lora | 0 | 61.0 | 50.0 | yes | 1,234 | 123 | 4,568 | one |" in capsys.readouterr().out
    assert (tmp_path / "runs" / "glue_table.md").exists() and (tmp_path / "runs" / "glue_table.json").exists()
    assert main(["glue-table", str(tmp_path / "nothing")]) == 2


def test_every_method_gets_the_papers_rows_whose_averages_match_table_2():
    """Each transcribed row's mean over the 8 tasks equals the Avg column Hu et al. print beside it (an
    independent check of the transcription), and a method's rows appear when it ran."""
    printed_avg = {"paper: RoBERTa-base LoRA (Hu et al. 2021)": 87.2, "paper: RoBERTa-large LoRA† (Hu et al. 2021)": 88.6,
                   "paper: RoBERTa-base FT*": 86.4, "paper: RoBERTa-base BitFit*": 85.2,
                   "paper: RoBERTa-large Adapter^H† (r=8)": 86.4, "paper: RoBERTa-large Adapter^H† (r=64)": 87.8,
                   "paper: RoBERTa-large Adapter^P† (r=16)": 87.9, "paper: RoBERTa-large Adapter^P† (r=64)": 88.4,
                   "paper: RoBERTa-base Adapter^D* (0.3M)": 84.4, "paper: RoBERTa-base Adapter^D* (0.9M)": 85.4}
    rows = [row for rows in R.PAPER_ROWS.values() for row in rows]
    assert {label for label, _, _ in rows} == set(printed_avg)
    for label, _, scores in rows:
        assert list(scores) == R.TASK_ORDER
        assert abs(sum(scores.values()) / 8 - printed_avg[label]) < 0.05 + 1e-9, label
    results = [_res("rte", 0, 0.6, method=m) for m in ("lora", "adapter_h", "ft_top2", "prefix_layer")]
    markdown, data = R.glue_table(results)
    labels = [r["label"] for r in data["paper_rows"]]
    assert labels == ["paper: RoBERTa-base LoRA (Hu et al. 2021)", "paper: RoBERTa-large LoRA† (Hu et al. 2021)",
                      "paper: RoBERTa-large Adapter^H† (r=8)", "paper: RoBERTa-large Adapter^H† (r=64)",
                      "paper: RoBERTa-base Adapter^D* (0.3M)", "paper: RoBERTa-base Adapter^D* (0.9M)"]
    assert "| paper: RoBERTa-large Adapter^H† (r=8) | 0.8M | 72.9 | 72.9 |" in markdown
    assert "no GLUE row for ft_top2, prefix_layer" in markdown
    bitfit_only = R.glue_table([_res("sst2", 0, 0.9, method="bitfit")])[1]
    assert [r["label"] for r in bitfit_only["paper_rows"]][-1] == "paper: RoBERTa-base BitFit*"
    assert bitfit_only["paper_rows"][-1]["scores"] == {"sst2": 93.7}
