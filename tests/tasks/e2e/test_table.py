"""The E2E table over runs: medians over seeds of the five metrics, the un-adapted baseline row, the failed
-run mark, the paper's Table 3 rows for each method that ran, and collection from run dirs."""
import json

import pytest
import yaml

from loralab import cli
from loralab.tasks.e2e import table as T


def _metrics(bleu):
    return {"BLEU": bleu, "NIST": 8.0 * bleu, "METEOR": bleu / 2, "ROUGE_L": bleu + 0.05, "CIDEr": 3 * bleu}


def _write_run(path, method, seed, bleu, learned=True, fit=True):
    path.mkdir(parents=True)
    result = {"experiment": "e2e", "main_metric": "BLEU", "score": bleu, "metrics": _metrics(bleu),
              "baseline": {"score": 0.1, "kind": "un-adapted model", "metrics": _metrics(0.1)}, "learned": learned,
              "params": {"trainable": 1000 + len(method), "total": 10 ** 6},
              "details": {"eval_mrs": 100, "fit": {"train_seconds": 60.0 + seed} if fit else None}}
    (path / "results.json").write_text(json.dumps(result))
    (path / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name": "smollm2-135m"}, "lora": {"method": method, "r": 4}, "train": {"seed": seed, "lr": 1e-3},
        "data": {"train_samples": 200}, "generate": {"num_beams": 5}}))


def test_table_medians_baseline_marks_and_paper_rows(tmp_path, capsys):
    for seed, bleu in enumerate([0.50, 0.60, 0.40]):
        _write_run(tmp_path / f"lora{seed}", "lora", seed, bleu)
    _write_run(tmp_path / "h0", "adapter_h", 0, 0.11, learned=False)
    _write_run(tmp_path / "p0", "adapter_p", 0, 0.30)
    _write_run(tmp_path / "eval", "lora", 9, 0.99, fit=False)  # an evaluation-only run is not a seed
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "results.json").write_text(json.dumps({"experiment": "glue", "details": {"fit": {}}}))
    results = T.collect(tmp_path)
    assert sorted((r["method"], r["seed"]) for r in results) == [("adapter_h", 0), ("adapter_p", 0), ("lora", 0),
                                                                   ("lora", 1), ("lora", 2)]
    md, js = T.write_e2e_table(results, tmp_path / "out")
    text, data = md.read_text(), json.loads(js.read_text())
    lora = next(r for r in data["rows"] if r["method"] == "lora")
    assert lora["n"] == 3 and lora["metrics"]["BLEU"] == pytest.approx(0.5) and lora["bleu_spread"] == [0.4, 0.6]
    assert lora["metrics"]["NIST"] == pytest.approx(4.0) and lora["train_seconds"] == 61.0
    assert "| smollm2-135m / lora | 1,004 | 3 | 50.0 (40.0–60.0) | 4.00 | 25.0 | 55.0 | 1.50 | 61 |" in text
    assert "| smollm2-135m / adapter_h | 1,009 | 1 | 11.0 ✗ at baseline (1/1) |" in text
    assert "| baseline: smollm2-135m un-adapted | 0 | — | 10.0 | 0.80 | 5.0 | 15.0 | 0.30 | — |" in text
    labels = [r["label"] for r in data["paper_rows"]]
    assert labels == ["paper: GPT-2 M LoRA", "paper: GPT-2 M Adapter^H"]  # adapter_p has no E2E row
    assert "| paper: GPT-2 M LoRA | 0.35M | — | 70.4 | 8.85 | 46.8 | 71.8 | 2.53 | — |" in text
    assert "no E2E row for adapter_p" in text and "100 test MRs" in text
    assert "50.0 (40.0–60.0)" in capsys.readouterr().out


def test_the_papers_rows_are_table_3():
    rows = {label + " " + t: s for rows in T.PAPER_ROWS.values() for label, t, s in rows}
    assert rows["paper: GPT-2 M PreLayer* 0.35M"] == (69.7, 8.81, 46.1, 71.4, 2.49)
    assert rows["paper: GPT-2 M FT^Top2* 25.19M"][0] == 68.1 and rows["paper: GPT-2 M FT* 354.92M"][0] == 68.2
    assert [rows[f"paper: GPT-2 M Adapter^L* {t}"][0] for t in ("0.37M", "11.09M")] == [66.3, 68.9]
    assert rows["paper: GPT-2 M Adapter^H 11.09M"][0] == 67.3


def test_cli_e2e_table(tmp_path, capsys):
    assert cli.main(["e2e-table", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["e2e-table", str(tmp_path)]) == 2
    assert "no finished E2E runs" in capsys.readouterr().err
    _write_run(tmp_path / "r", "prefix_layer", 0, 0.3)
    assert cli.main(["e2e-table", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert "paper: GPT-2 M PreLayer*" in (tmp_path / "o" / "e2e_table.md").read_text()
