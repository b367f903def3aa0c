"""The SQuAD v1.1 experiment: LoRA on a causal LM (generative) or on an encoder with a span head.

    build(cfg)               questions, features, model (method applied), TaskSpec, a predictor
    baseline(built)          the un-adapted model's EM / F1 on the same evaluation questions
    report(built, fit, dir)  predictions of every evaluation question, scored as the official v1.1 script;
                             predictions.json ({id: answer}), eval_gold.json and the adapter in the run dir

``data.mode`` picks the formulation:

generative  any causal LM of the zoo, the seed's format ``"<Q> {question} <C> {context} <A> {answer}<eos>"``
            (markers ``data.question_marker`` / ``context_marker`` / ``answer_marker``), loss on the answer
            tokens and eos only (:mod:`.generative`), greedy decoding of at most ``generate.max_new_tokens``
            tokens, ``generate.batch_size`` prompts at a time. The context is cut to the window
            (``data.max_length``, ``data.keep``); a question whose gold answers all fall outside the kept
            context is still asked and counted (``details.truncation.eval.share_answer_cut``).
span        an encoder loaded as ``AutoModelForQuestionAnswering`` (zoo kind ``qa``): the start/end head
            ``qa_outputs`` is created fresh, trains fully and is saved with the adapter (``modules_to_save``);
            sliding windows of ``data.max_length`` tokens sharing ``data.doc_stride`` context tokens, loss
            ``(CE(start) + CE(end)) / 2``, best span over all windows (``data.n_best``,
            ``data.max_answer_length``) (:mod:`.span`). A question is *cut* when no window holds a whole gold
            answer (training: ``answers[0]``); its ``context_truncated`` count is of questions spread over
            more than one window.

Metric: ``f1`` (token F1, percent, higher is better) and ``exact_match``, averaged over every evaluation
question (:func:`loralab.metrics.squad.score_predictions`). Baseline: the same predictor with the adapters
disabled (for span mode the head is then the fresh random one: an honest "un-adapted" model), beside the
trivial empty answer's score. ``learned`` needs F1 above the baseline by
``max(2, 100 * margin_for_rate(baseline_f1 / 100, n))`` points: two standard errors of a per-question
score in [0, 1] with the baseline's mean (its variance is at most b (1 - b)), at least 2 points.

Nothing is evaluated during training (``TaskSpec.evaluate=None``) and no checkpoint is selected on the
evaluation questions: the model after the last step is the one reported (decoding is the expensive part,
and selecting on the evaluation questions would be selecting on the test set).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from loralab.engine.experiment import Baseline, Built, Result, margin_for_rate
from loralab.engine.schema import DataConfig
from loralab.engine.task import TaskSpec
from loralab.engine.typed_config import ConfigError, require
from loralab.metrics.squad import score_predictions
from loralab.tasks.common.batches import make_collate
from loralab.tasks.common.causal_lm import mean_token_loss
from loralab.tasks.common.results import make_result, save_trained
from loralab.tasks.common.sampling import subsample
from loralab.tasks.common.setup import apply_method
from loralab.tasks.squad.data import (DEFAULT_DATA_DIR, DEFAULT_EVAL_FILE, DEFAULT_TRAIN_FILE, SquadDataError,
                                      SquadExample, gold_answers, load_squad)
from loralab.tasks.squad.generative import GenFormat, build_eval_prompts, build_train_features, decode_answer
from loralab.tasks.squad.span_mode import build_span

MAIN_METRIC = "f1"
MIN_MARGIN = 2.0
"""F1 points: a run within this of the un-adapted model has not learned the task."""
PREDICTIONS_FILE = "predictions.json"
BASELINE_PREDICTIONS_FILE = "predictions-baseline.json"
GOLD_FILE = "eval_gold.json"


def _log(msg: str) -> None:
    print(f"[squad] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the data section


@dataclass
class SquadData(DataConfig):
    """SQuAD v1.1 data: official JSON files (default: the shared halves of the v1.1 dev set, part-a to train,
    part-b to evaluate), the formulation and its windowing."""

    mode: Literal["generative", "span"] = "generative"
    """generative: a causal LM answers in the seed's format; span: an encoder's start/end head picks the span."""
    max_length: int = 384
    """Tokens per sequence (generative: prompt + answer; span: one window of question + context)."""
    eval_samples: int = 0
    """Evaluate on N questions of the evaluation file, a seeded random subset (data.seed), in file order (0: all)."""
    train_samples: int = 0
    """Train on N questions of the training file, a seeded random subset (data.seed), in file order (0: all)."""
    doc_stride: int = 128
    """span: context tokens shared by consecutive windows of a long context."""
    max_query_length: int = 64
    """span: questions are cut to this many tokens."""
    max_answer_length: int = 30
    """span: the longest answer (in tokens) the best-span search considers."""
    n_best: int = 20
    """span: start and end candidates per window (the top-n logits of each)."""
    question_marker: str = "<Q>"
    """generative: the marker before the question."""
    context_marker: str = "<C>"
    """generative: the marker before the context."""
    answer_marker: str = "<A>"
    """generative: the marker after which the answer is generated."""
    keep: Literal["start", "center"] = "start"
    """generative: which part of a context longer than the window is kept (training slides it to the answer)."""

    SPAN_ONLY: ClassVar[tuple[str, ...]] = ("doc_stride", "max_query_length", "max_answer_length", "n_best")
    GENERATIVE_ONLY: ClassVar[tuple[str, ...]] = ("question_marker", "context_marker", "answer_marker", "keep")

    def check(self) -> list[tuple[str, str]]:
        e = super().check()
        require(e, self.doc_stride >= 0, "doc_stride", f"must be >= 0, got {self.doc_stride}")
        for name in ("max_query_length", "max_answer_length", "n_best"):
            require(e, getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        markers = (self.question_marker, self.context_marker, self.answer_marker)
        for name, value in zip(self.GENERATIVE_ONLY, markers):
            require(e, bool(value.strip()), name, "must be a non-empty marker string")
        require(e, len(set(markers)) == 3, "answer_marker",
                f"the three markers must differ, got {markers}: the answer is cut at the first marker")
        # every key is read: a field of the other mode set to a non-default value would be silently unused
        other = self.GENERATIVE_ONLY if self.mode == "span" else self.SPAN_ONLY
        defaults = {f.name: f.default for f in fields(self)}
        for name in other:
            require(e, getattr(self, name) == defaults[name], name,
                    f"is not read with data.mode={self.mode} (it is a "
                    f"{'generative' if self.mode == 'span' else 'span'}-mode setting); remove it or change data.mode")
        return e


def data_paths(data: SquadData) -> tuple[Path, Path]:
    """(train, eval) files: data.train_file / data.eval_file, else part-a / part-b of data.data_dir (default
    ``../shared/data/squad``). Both are checked before either is read."""
    root = Path(data.data_dir) if data.data_dir else DEFAULT_DATA_DIR
    train = Path(data.train_file) if data.train_file else root / DEFAULT_TRAIN_FILE.name
    evaluation = Path(data.eval_file) if data.eval_file else root / DEFAULT_EVAL_FILE.name
    missing = [f"{key} {str(p.resolve())!r}" for key, p in (("data.train_file", train), ("data.eval_file", evaluation))
               if not p.is_file()]
    if missing:
        raise SquadDataError(f"SQuAD file(s) not found: {', '.join(missing)}; give official SQuAD v1.1 JSON files "
                             "with data.train_file=PATH data.eval_file=PATH (or data.data_dir=DIR holding "
                             f"{DEFAULT_TRAIN_FILE.name} and {DEFAULT_EVAL_FILE.name})")
    return train, evaluation


def load_questions(data: SquadData) -> tuple[list[SquadExample], list[SquadExample], dict[str, str]]:
    """(training questions, evaluation questions, their files), each a seeded subset when asked.
    Questions shared by both files are an error (the evaluation would score memorised answers)."""
    train_path, eval_path = data_paths(data)
    train = subsample(load_squad(train_path), data.train_samples, data.seed)
    evaluation = subsample(load_squad(eval_path), data.eval_samples, data.seed)
    shared = {ex.id for ex in train} & {ex.id for ex in evaluation}
    if shared:
        raise SquadDataError(f"{len(shared)} question(s) are in both the training and the evaluation set (e.g. "
                             f"{sorted(shared)[0]!r}; {train_path} / {eval_path}): an evaluation on trained "
                             "questions measures memory; give disjoint files (default: part-a / part-b)")
    return train, evaluation, {"train_file": str(train_path.resolve()), "eval_file": str(eval_path.resolve())}


def official_dataset(examples: list[SquadExample]) -> dict[str, Any]:
    """``examples`` in the official v1.1 layout (articles by title, paragraphs by context, file order)."""
    articles: dict[str, dict[str, list]] = {}
    for ex in examples:
        paragraphs = articles.setdefault(ex.title, {})
        paragraphs.setdefault(ex.context, []).append(
            {"id": ex.id, "question": ex.question,
             "answers": [{"text": a.text, "answer_start": a.answer_start} for a in ex.answers]})
    return {"version": "1.1", "data": [
        {"title": title, "paragraphs": [{"context": c, "qas": qas} for c, qas in paras.items()]}
        for title, paras in articles.items()]}


def _write_json(path: Path, obj: Any) -> str:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return str(path)


# ---------------------------------------------------------------- generative mode


def require_greedy(gen: Any) -> None:
    """SQuAD answers are decoded greedily: beams, sampling and n-gram blocking are refused (n-gram blocking
    counts the prompt, so it would forbid copying a phrase of the context)."""
    bad = [f"generate.{k}={v}" for k, v, ok in (
        ("num_beams", gen.num_beams, gen.num_beams == 1), ("do_sample", gen.do_sample, not gen.do_sample),
        ("no_repeat_ngram_size", gen.no_repeat_ngram_size, gen.no_repeat_ngram_size == 0)) if not ok]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: generative SQuAD decodes greedily (a short answer copied from the "
                          "context; n-gram blocking would count the prompt's n-grams); set generate.num_beams=1 "
                          "generate.do_sample=false generate.no_repeat_ngram_size=0 (the squad-* presets do)")


def _stop_ids(tokenizer: Any) -> list[int]:
    """eos, and the newline tokens (the answer ends at a newline anyway: it stops a batch earlier)."""
    ids = [tokenizer.eos_token_id]
    for text in ("\n", "\n\n"):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(piece) == 1:
            ids.append(piece[0])
    return list(dict.fromkeys(ids))


def _generation_config(gen: Any, stops: list[int], pad: int) -> Any:
    from transformers import GenerationConfig

    # everything a model's own generation_config.json could fill in is pinned: plain greedy decoding
    return GenerationConfig(max_new_tokens=gen.max_new_tokens, num_beams=1, do_sample=False,
                            no_repeat_ngram_size=0, repetition_penalty=1.0, min_new_tokens=0,
                            num_return_sequences=1, eos_token_id=stops, pad_token_id=pad, use_cache=True)


def build_generative(cfg: Any, train: list[SquadExample], evaluation: list[SquadExample]) -> Built:
    from loralab.models.zoo import load_from_config, load_tokenizer
    from loralab.tasks.common.generation import decode_options, generate_batched

    gen, data = cfg.generate, cfg.data
    require_greedy(gen)
    fmt = GenFormat(data.question_marker, data.context_marker, data.answer_marker)
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    train_feats, train_cut = build_train_features(tokenizer, train, data.max_length, fmt, data.keep)
    prompts, eval_cut = build_eval_prompts(tokenizer, evaluation, data.max_length, gen.max_new_tokens, fmt, data.keep)
    torch.manual_seed(cfg.train.seed)  # the LoRA A init depends on it
    model, tokenizer = load_from_config(cfg.model, kind="causal_lm")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss and the attention
    pad = tokenizer.pad_token_id
    info = apply_method(model, cfg.lora, "CAUSAL_LM", list(cfg.lora.modules_to_save or []), cfg.model.name)
    collate = make_collate(pad)

    def loss(m: nn.Module, batch: dict) -> torch.Tensor:
        return mean_token_loss(m, batch, label_smoothing=spec.label_smoothing)

    spec = TaskSpec(train_dataset=[{"input_ids": f.input_ids, "labels": f.labels} for f in train_feats],
                    collate=collate, loss=loss, evaluate=None, metric=None)
    stops = _stop_ids(tokenizer)
    config = _generation_config(gen, stops, pad)

    def predict(m: nn.Module) -> dict[str, str]:
        rows = generate_batched(m, [p.input_ids for p in prompts], config, pad, stops, gen.batch_size,
                               **decode_options(gen))
        return {p.id: decode_answer(tokenizer, row, fmt) for p, row in zip(prompts, rows)}

    details = {"truncation": {"train": train_cut.as_dict(), "eval": eval_cut.as_dict()},
               "train_sequences": len(train_feats), "max_new_tokens": gen.max_new_tokens}
    _log(f"generative: {len(train)} training questions ({train_cut.answer_cut} with the answer cut by the "
         f"{data.max_length}-token window), {len(evaluation)} evaluation questions ({eval_cut.answer_cut} cut)")
    return Built(model, spec, {"predict": predict, "details": details, "method": info, "tokenizer": tokenizer})


# ---------------------------------------------------------------- span mode


def f1_margin(baseline_f1: float, n: int) -> float:
    """``max(2, 100 * margin_for_rate(baseline_f1 / 100, n))`` F1 points (module doc)."""
    return max(MIN_MARGIN, 100.0 * margin_for_rate(baseline_f1 / 100.0, n))


class SquadExperiment:
    name: ClassVar[str] = "squad"
    data_config: ClassVar[type] = SquadData
    sections: ClassVar[tuple[str, ...]] = ("generate",)

    @property
    def presets(self) -> dict[str, dict]:
        from loralab.tasks.squad.presets import all_presets

        return all_presets()

    def build(self, cfg: Any) -> Built:
        """Questions (data errors first), features, the model with its method, the TaskSpec and a predictor."""
        if cfg.data.mode == "generative":
            require_greedy(cfg.generate)  # before anything is read or loaded
        elif cfg.generate != type(cfg.generate)():
            raise ConfigError("generate.*: data.mode=span does not generate (it picks a span); remove the "
                              "generate settings or use data.mode=generative")
        train, evaluation, files = load_questions(cfg.data)
        build = build_generative if cfg.data.mode == "generative" else build_span
        built = build(cfg, train, evaluation)
        built.state.update(cfg=cfg, train=train, evaluation=evaluation, gold=gold_answers(evaluation))
        built.state["details"].update(mode=cfg.data.mode, **files, train_questions=len(train),
                                      eval_questions=len(evaluation))
        return built

    def _score(self, built: Built, model: nn.Module) -> tuple[dict[str, str], dict[str, float], float]:
        started = time.perf_counter()
        predictions = built.state["predict"](model)
        scores = score_predictions(built.state["gold"], predictions)
        return predictions, {"exact_match": scores["exact_match"], "f1": scores["f1"]}, time.perf_counter() - started

    def baseline(self, built: Built) -> Baseline:
        """The un-adapted model on the same questions (adapters and trained head copies off), and the
        empty answer's score beside it."""
        from loralab.core.inject import disable_adapters

        model = built.model
        off = disable_adapters(model)  # a model without adapters is itself
        with off:
            predictions, scores, seconds = self._score(built, model)
        empty = score_predictions(built.state["gold"], {qid: "" for qid in built.state["gold"]})
        built.state.update(baseline_predictions=predictions, baseline_seconds=seconds)
        kind = "un-adapted model" + (" (fresh random qa_outputs head)" if built.state["cfg"].data.mode == "span" else "")
        _log(f"baseline ({kind}): EM {scores['exact_match']:.2f} F1 {scores['f1']:.2f} in {seconds:.0f} s "
             f"(empty answer: EM {empty['exact_match']:.2f} F1 {empty['f1']:.2f})")
        return Baseline(score=scores[MAIN_METRIC], kind=kind,
                        metrics={**scores, "empty_answer_exact_match": empty["exact_match"],
                                 "empty_answer_f1": empty["f1"], "eval_seconds": seconds})

    def report(self, built: Built, fit: Any, run_dir: str | Path | None) -> Result:
        """Predict every evaluation question with the model as it is now, score, write the official files."""
        cfg = built.state["cfg"]
        predictions, scores, seconds = self._score(built, built.model)
        details: dict[str, Any] = {**built.state["details"], "model": cfg.model.name, "method": cfg.lora.method,
                                   "seed": cfg.train.seed, "method_info": built.state["method"],
                                   "answer_cut_share": built.state["details"]["truncation"]["eval"]["share_answer_cut"],
                                   "eval_seconds": seconds, "baseline_seconds": built.state.get("baseline_seconds")}
        if run_dir is not None:
            run_dir = Path(run_dir)
            details["predictions_file"] = _write_json(run_dir / PREDICTIONS_FILE, predictions)
            details["gold_file"] = _write_json(run_dir / GOLD_FILE, official_dataset(built.state["evaluation"]))
            if "baseline_predictions" in built.state:
                details["baseline_predictions_file"] = _write_json(run_dir / BASELINE_PREDICTIONS_FILE,
                                                                   built.state["baseline_predictions"])
            details["adapter_dir"] = save_trained(built.model, run_dir)
            details["score_command"] = (f"python -m loralab.metrics.squad {run_dir / GOLD_FILE} "
                                        f"{run_dir / PREDICTIONS_FILE}")
        n = len(built.state["evaluation"])
        base = built.baseline.score if built.baseline else 0.0
        result = make_result("squad", built, fit, MAIN_METRIC, scores, True, f1_margin(base, n), details)
        before = (f" (baseline EM {built.baseline.metrics.get('exact_match', float('nan')):.2f} F1 {base:.2f})"
                  if built.baseline else "")
        print(f"[squad] {cfg.data.mode} {cfg.model.name} {cfg.lora.method}: EM {scores['exact_match']:.2f} "
              f"F1 {scores['f1']:.2f}{before} on {n} questions; answer cut by the window for "
              f"{100 * details['answer_cut_share']:.1f}%; eval {seconds:.0f} s", flush=True)
        return result


EXPERIMENT = SquadExperiment()
