"""The SQuAD experiment plugin: config, both modes through the runner, the answer-only loss on a real
batch, the baseline, the zoo's ``qa`` kind and the CLI in a subprocess.

Tiny models (``loralab.models.tiny``) are character-level: one token per character, so window budgets
and cut counts below are character counts, worked out by hand in ``EVAL`` 's comments.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import loralab.tasks.squad  # noqa: F401  (registers the experiment)
from loralab.engine.config import ConfigError, list_presets, load_config
from loralab.engine.runner import run_training
from loralab.metrics.squad import score_files
from loralab.models.tiny import tiny_model, tiny_tokenizer
from loralab.tasks.squad import experiment as X
from loralab.tasks.squad.data import SquadDataError

SRC = Path(__file__).resolve().parents[3] / "src"


def _article(title, paragraphs):
    return {"title": title, "paragraphs": [
        {"context": c, "qas": [{"id": i, "question": q, "answers": [{"text": a, "answer_start": c.index(a)}]}
                               for i, q, a in qas]} for c, qas in paragraphs]}


CTX1 = "Denver Broncos won the game in 2016 at Levi's Stadium in Santa Clara."
CTX2 = "The river flows north through the old city and into the sea near the port of Ram."
TRAIN = {"version": "1.1", "data": [_article("A", [
    (CTX1, [("a1", "Who won?", "Denver Broncos"), ("a2", "Where?", "Levi's Stadium")]),
    (CTX2, [("a3", "Which way?", "north"), ("a4", "Which port?", "Ram")])])]}
FILLER = "Filler text. " * 5  # 65 characters
CTX3 = "The port is Ram. " + FILLER + "The sea is Blue."  # 17 + 65 + 16 = 98 characters
# Generative, max_length 96, max_new_tokens 8, tail " <A>" = 4, context piece " " + CTX3 = 99 tokens:
#   e1 "<Q> Which port? <C>"   = 19 -> budget 96-19-4-8 = 65 -> kept [0, 65); "Ram" is tokens 13..15: inside
#   e2 "<Q> Which sea? <C>"    = 18 -> budget 66 -> "Blue" (tokens 94..97) cut
#   e3 "<Q> Which filler? <C>" = 21 -> budget 63 < the 65-token answer: cut           => 2 of 3 cut
#   keep=center: lo = (99 - 65) // 2 = 17 > 13, so "Ram" is cut too                    => 3 of 3 cut
# Span, max_length 64 ([CLS] q [SEP] ctx [SEP]): "Which filler?" leaves 64-13-3 = 48 context tokens per
#   window < 65 answer tokens: cut; "Ram" and "Blue" each lie in a window                 => 1 of 3 cut
EVAL = {"version": "1.1", "data": [_article("B", [(CTX3, [
    ("e1", "Which port?", "Ram"), ("e2", "Which sea?", "Blue"), ("e3", "Which filler?", FILLER.strip())])])]}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("squad")
    (root / "train.json").write_text(json.dumps(TRAIN))
    (root / "eval.json").write_text(json.dumps(EVAL))
    for arch, kind in (("bert", "base"), ("llama", "causal_lm")):
        tiny_model(arch, kind, seed=0).save_pretrained(root / arch, safe_serialization=True)
        tiny_tokenizer(arch).save_pretrained(root / arch)
    return root


def _common(root: Path, out: Path) -> list[str]:
    return [f"data.train_file={root / 'train.json'}", f"data.eval_file={root / 'eval.json'}", f"out_dir={out}",
            "train.max_steps=2", "train.batch_size=2", "lora.r=2", "train.quiet=true"]


def gen_cfg(root: Path, out: Path, *extra: str):
    return load_config(None, [*_common(root, out), f"model.name={root / 'llama'}", "data.max_length=96",
                              "generate.max_new_tokens=8", "generate.batch_size=2", *extra], preset="squad-cpu-gen")


def span_cfg(root: Path, out: Path, *extra: str):
    return load_config(None, [*_common(root, out), f"model.name={root / 'bert'}", "data.max_length=64",
                              "data.doc_stride=16", "data.max_query_length=16", *extra], preset="squad-cpu-span")


# ---------------------------------------------------------------- config


def test_every_data_field_is_documented_and_read():
    from loralab.engine.typed_config import field_docs

    from loralab.tasks.squad import span_mode

    docs = field_docs(X.SquadData)
    source = inspect.getsource(X) + inspect.getsource(span_mode)
    for f in fields(X.SquadData):
        assert docs.get(f.name), f"data.{f.name} has no docstring"
        assert f"data.{f.name}" in source, f"data.{f.name} is never read by the squad experiment"


def test_unknown_and_other_mode_keys_are_errors(files, tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*data.stride.*doc_stride"):
        span_cfg(files, tmp_path, "data.stride=8")
    with pytest.raises(ConfigError, match=r"data.doc_stride: is not read with data.mode=generative"):
        gen_cfg(files, tmp_path, "data.doc_stride=8")
    with pytest.raises(ConfigError, match=r"data.answer_marker: is not read with data.mode=span"):
        span_cfg(files, tmp_path, "data.answer_marker=A:")
    with pytest.raises(ConfigError, match="markers must differ"):
        gen_cfg(files, tmp_path, "data.answer_marker=<Q>")
    with pytest.raises(ConfigError, match="data.n_best: must be >= 1"):
        span_cfg(files, tmp_path, "data.n_best=0")


@pytest.mark.parametrize("override", ["generate.num_beams=4", "generate.do_sample=true",
                                      "generate.no_repeat_ngram_size=3"])
def test_generative_mode_requires_greedy_decoding(files, tmp_path, override):
    cfg = gen_cfg(files, tmp_path, override, *(["generate.num_beams=1"] if "sample" in override else []))
    with pytest.raises(ConfigError, match=override.split("=")[0] + ".*decodes greedily"):
        X.EXPERIMENT.build(cfg)


def test_span_mode_refuses_what_it_does_not_read(files, tmp_path):
    with pytest.raises(ConfigError, match="data.mode=span does not generate"):
        X.EXPERIMENT.build(span_cfg(files, tmp_path, "generate.max_new_tokens=5"))
    with pytest.raises(ConfigError, match="train.label_smoothing"):
        X.EXPERIMENT.build(span_cfg(files, tmp_path, "train.label_smoothing=0.1"))


def test_data_files_missing_or_overlapping_are_errors(files, tmp_path):
    with pytest.raises(SquadDataError, match="data.train_file .*nope.json"):
        X.EXPERIMENT.build(span_cfg(files, tmp_path, f"data.train_file={tmp_path / 'nope.json'}"))
    with pytest.raises(SquadDataError, match="4 question.*both the training and the evaluation"):
        X.EXPERIMENT.build(span_cfg(files, tmp_path, f"data.eval_file={files / 'train.json'}"))


def test_default_files_are_the_shared_halves():
    root = X.DEFAULT_DATA_DIR
    if not root.is_dir():
        pytest.skip("../shared/data/squad not present")
    data = load_config(None, [], preset="squad-cpu-span").data
    assert X.data_paths(data) == (root / "dev-v1.1-part-a.json", root / "dev-v1.1-part-b.json")


def test_subsamples_are_seeded_and_in_file_order(files, tmp_path):
    cfg = span_cfg(files, tmp_path, "data.train_samples=2", "data.eval_samples=2", "data.seed=3")
    a_train, a_eval, _ = X.load_questions(cfg.data)
    b_train, b_eval, _ = X.load_questions(cfg.data)
    assert [e.id for e in a_train] == [e.id for e in b_train] and len(a_train) == 2
    assert [e.id for e in a_eval] == sorted(e.id for e in a_eval) and len(a_eval) == 2


def test_presets_load_and_are_described():
    presets = {k: v for k, v in list_presets().items() if v["experiment"] == "squad"}
    assert set(presets) == {"squad-cpu-gen", "squad-cpu-span", "squad-paper-gen", "squad-paper-span"}
    models = {"squad-cpu-gen": "smollm2-135m", "squad-cpu-span": "minilm-l6", "squad-paper-gen": "gpt2-medium",
              "squad-paper-span": "roberta-base"}
    for name, preset in presets.items():
        assert preset["_doc"] and preset["model.name"] == models[name]
        cfg = load_config(None, [], preset=name)
        assert cfg.experiment == "squad" and cfg.data.mode == ("span" if "span" in name else "generative")
        if cfg.data.mode == "generative":
            X.require_greedy(cfg.generate)
        else:
            assert cfg.lora.modules_to_save == ["qa_outputs"]


# ---------------------------------------------------------------- the answer-only loss and span labels


def test_answer_only_loss_on_a_real_batch(files, tmp_path):
    built = X.EXPERIMENT.build(gen_cfg(files, tmp_path))
    tok, spec = built.state["tokenizer"], built.task
    batch = spec.collate(spec.train_dataset[:2])
    answers = [" Denver Broncos<|im_end|>", " Levi's Stadium<|im_end|>"]
    for row, answer in zip(batch["labels"], answers):
        assert tok.decode([t for t in row.tolist() if t != -100]) == answer
    # the loss: mean over labelled tokens of -log p(y_t | y_<t), computed here independently in float64
    with torch.no_grad():
        logits = built.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        terms = [-torch.log_softmax(logits[b, t - 1], -1)[int(batch["labels"][b, t])]
                 for b in range(2) for t in range(1, batch["labels"].shape[1]) if batch["labels"][b, t] != -100]
        assert len(terms) == sum(len(a) - len("<|im_end|>") + 1 for a in answers)
        assert float(spec.loss(built.model, batch)) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)


def test_span_training_windows_point_at_the_answer(files, tmp_path):
    built = X.EXPERIMENT.build(span_cfg(files, tmp_path))
    tok = built.state["tokenizer"]
    texts = []
    for row in built.task.train_dataset:
        s, e = row["start_positions"], row["end_positions"]
        assert len(row["input_ids"]) == len(row["attention_mask"]) == len(row["token_type_ids"]) <= 64
        texts.append(tok.decode(row["input_ids"][s:e + 1]) if s > 0 else None)
    assert {"Denver Broncos", "Levi's Stadium", "north", "Ram"} <= set(texts)


# ---------------------------------------------------------------- both modes through the runner


def _check_run(run, res, n_cut, share):
    d = Path(run.dir)
    for key in ("experiment", "main_metric", "greater_is_better", "score", "baseline", "margin", "learned",
                "metrics", "params", "wall_seconds", "tokens_per_second", "details"):
        assert key in res
    assert (res["experiment"], res["main_metric"], res["greater_is_better"]) == ("squad", "f1", True)
    assert res["baseline"]["kind"].startswith("un-adapted model")
    assert res["baseline"]["metrics"]["empty_answer_f1"] == 0.0
    assert json.loads((d / "results.json").read_text())["score"] == res["score"]
    predictions = json.loads((d / "predictions.json").read_text())
    assert set(predictions) == {"e1", "e2", "e3"} and all(isinstance(v, str) for v in predictions.values())
    # predictions.json is the official format: scored against the written gold file it gives the run's numbers
    official = score_files(d / "eval_gold.json", d / "predictions.json")
    assert official["f1"] == pytest.approx(res["metrics"]["f1"])
    assert official["exact_match"] == pytest.approx(res["metrics"]["exact_match"])
    baseline = score_files(d / "eval_gold.json", d / "predictions-baseline.json")
    assert baseline["f1"] == pytest.approx(res["baseline"]["score"])
    cut = res["details"]["truncation"]["eval"]
    assert (cut["total"], cut["answer_cut"]) == (3, n_cut)
    assert res["details"]["answer_cut_share"] == pytest.approx(share)
    assert (d / "adapter" / "adapter_model.safetensors").is_file()
    return d


def test_generative_run_through_the_runner(files, tmp_path):
    run, res = run_training(gen_cfg(files, tmp_path / "runs"))
    _check_run(run, res, 2, 2 / 3)
    assert res["details"]["mode"] == "generative" and res["details"]["train_questions"] == 4
    _, centred = run_training(gen_cfg(files, tmp_path / "runs", "data.keep=center"))
    assert centred["details"]["truncation"]["eval"]["answer_cut"] == 3  # data.keep is read


def test_span_run_through_the_runner_saves_the_head(files, tmp_path):
    from safetensors import safe_open

    run, res = run_training(span_cfg(files, tmp_path / "runs"))
    d = _check_run(run, res, 1, 1 / 3)
    with safe_open(str(d / "adapter" / "adapter_model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert any("qa_outputs" in k for k in keys) and any("lora_A" in k for k in keys)
    assert res["details"]["eval_windows"] > 3  # long contexts spread over windows


def test_baseline_is_the_unadapted_model_and_training_can_learn(files, tmp_path):
    """Trained on copies (new ids) of four evaluation questions, the span model learns them: F1 past the
    baseline by more than the margin (n = 4, baseline 0: 2 sqrt(1/4 / 4) = 50 points); the baseline measured
    again afterwards, with the adapters and the trained head off, is unchanged."""
    from loralab.engine.trainer import fit

    doc = json.loads(json.dumps(TRAIN))
    for para in doc["data"][0]["paragraphs"]:
        for qa in para["qas"]:
            qa["id"] = "copy-" + qa["id"]
    (tmp_path / "copies.json").write_text(json.dumps(doc))
    cfg = span_cfg(files, tmp_path, f"data.train_file={tmp_path / 'copies.json'}",
                   f"data.eval_file={files / 'train.json'}", "train.max_steps=80", "train.lr=0.02",
                   "train.warmup_ratio=0", "lora.r=8", "train.batch_size=16")
    built = X.EXPERIMENT.build(cfg)
    built.baseline = X.EXPERIMENT.baseline(built)
    before = dict(built.state["baseline_predictions"])
    fit(built.model, built.task, cfg.train)
    result = X.EXPERIMENT.report(built, None, None)
    again = X.EXPERIMENT.baseline(built)
    assert built.state["baseline_predictions"] == before and again.score == built.baseline.score
    assert result.margin == pytest.approx(100 * 2 * (0.25 / 4) ** 0.5)
    assert result.score > built.baseline.score + result.margin and result.learned
    assert built.state["predict"](built.model) != before


def test_margin_is_two_standard_errors_at_least_two_points():
    assert X.f1_margin(50.0, 10_000) == 2.0
    assert X.f1_margin(50.0, 100) == pytest.approx(10.0)  # 100 * 2 * sqrt(0.25 / 100)


# ---------------------------------------------------------------- the zoo's qa kind


def test_zoo_qa_kind_creates_only_the_span_head(files):
    from loralab.models.zoo import check_loading_info, load_model

    model = load_model(str(files / "bert"), kind="qa")
    assert type(model).__name__ == "BertForQuestionAnswering"
    assert model.loralab_load_info["new_head"] == ["qa_outputs.bias", "qa_outputs.weight"]
    with pytest.raises(RuntimeError, match="uninitialized"):
        check_loading_info({"missing_keys": ["qa_outputs.weight", "bert.encoder.layer.0.x"]}, "qa", "m")
    with pytest.raises(RuntimeError, match="uninitialized"):  # a qa head is not fresh for a seq-cls load
        check_loading_info({"missing_keys": ["qa_outputs.weight"]}, "seq_cls", "m")
    with pytest.raises(NotImplementedError, match="model.quantize=none"):
        load_model(str(files / "bert"), kind="qa", quantize="nf4")


# ---------------------------------------------------------------- the CLI, in a subprocess


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORALAB_EXPERIMENTS": "loralab.tasks.squad", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "loralab", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_cli_end_to_end(files, tmp_path):
    common = [f"model.name={files / 'bert'}", f"data.train_file={files / 'train.json'}",
              f"data.eval_file={files / 'eval.json'}", "data.max_length=64", "data.doc_stride=16",
              "data.max_query_length=16", "train.max_steps=1", "train.batch_size=4", "lora.r=2",
              f"out_dir={tmp_path / 'runs'}"]
    proc = _cli("train", "--preset", "squad-cpu-span", "--quiet", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (results,) = list((tmp_path / "runs").glob("*/results.json"))
    res = json.loads(results.read_text())
    assert res["experiment"] == "squad" and "answer_cut_share" in res["details"]
    assert set(json.loads((results.parent / "predictions.json").read_text())) == {"e1", "e2", "e3"}
    assert "f1" in proc.stdout and "baseline" in proc.stdout
    bad = _cli("train", "--preset", "squad-cpu-gen", "--quiet", f"model.name={files / 'llama'}",
               "generate.num_beams=4", f"out_dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2 and "generate.num_beams=4" in bad.stderr and "Traceback" not in bad.stderr
