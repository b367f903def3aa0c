"""The E2E NLG experiment (Hu et al. 2021, Table 3): LoRA on a causal LM, scored by the official metrics.

    build(cfg)               model (method applied), TaskSpec (label-smoothed completion loss), the eval MRs
    baseline(built)          the un-adapted model decoded with the same settings on the same MRs, scored
    report(built, fit, dir)  decode, write hyp.txt / refs.txt / mrs.txt (official formats), score (BLEU main)

Data: ``data.train_file`` (default ``<data_dir>/devset.csv``: the full training set is not shipped
here) and ``data.eval_file`` (default ``testset_w_refs.csv``); see ``e2e.data`` for the encoding.
LoRA targets: the default ``["query", "value"]`` becomes the architecture's W_q, W_v (``common.setup``).
Methods: every ``lora.method`` but ``prefix_embed`` (refused: the core's prefix embeddings have no
incremental decoding for ``generate`` and make the logits l_p + l_i longer than the labels; PreLayer,
``prefix_layer``, is the paper's E2E prefix row). The baseline is the un-adapted model: LoRA's adapters
switched off; for prefix_layer, whose fresh random prefixes already change the model, a freshly loaded base.
Training evaluation (``TaskSpec.evaluate``) is the completion loss on the evaluation MRs' references,
for monitoring only: no checkpoint is selected on the test set (``metric=None``), as in the paper,
which reports the model after the last epoch.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from loralab.engine.experiment import Baseline, Built, Result
from loralab.engine.schema import DataConfig
from loralab.engine.task import TaskSpec
from loralab.tasks.common.batches import make_collate
from loralab.tasks.common.causal_lm import heldout_loss, mean_token_loss
from loralab.tasks.common.results import make_result, save_trained
from loralab.tasks.common.sampling import subsample
from loralab.tasks.common.setup import apply_method
from loralab.tasks.e2e.data import TRAIN_FILE, data_files, encode_rows, eos_id, eval_groups, load_rows
from loralab.tasks.e2e.generate import generate_outputs, results_table, write_official, write_references

GENERATIVE_REFUSED = {
    "prefix_embed": "the core's prefix embeddings support no incremental decoding (generate's KV cache) and make "
                    "the outputs l_p + l_i positions longer than the labels; use lora.method=prefix_layer (PreLayer, "
                    "the paper's prefix row for E2E)",
}
"""Methods a generative experiment cannot run, and why."""
CHANGED_AT_INIT = ("prefix_layer",)
"""Methods whose fresh model already differs from the base (random prefixes): the baseline loads the base."""
BLEU_MARGIN = 0.01
"""One BLEU point: a run within it of the un-adapted model's BLEU has not learned the task."""


def _log(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


@dataclass
class E2EData(DataConfig):
    """E2E NLG data: training and test CSVs (``mr,ref`` rows); eval_samples counts unique test MRs."""

    def check(self) -> list[tuple[str, str]]:
        return super().check()


def load_data(cfg: Any) -> tuple[list, list[str], list[list[str]], list]:
    """(train rows, eval MRs, their reference groups, the eval rows of those MRs)."""
    train_path, eval_path = data_files(cfg)
    if train_path.name == TRAIN_FILE:
        _log(f"training on {train_path.name} (the official 42k-row trainset.csv is not here; the paper trains "
             "on it: pass data.train_file=PATH to use it)")
    train = subsample(load_rows(train_path), cfg.data.train_samples, cfg.data.seed)
    eval_rows_all = load_rows(eval_path)
    mrs, refs = eval_groups(eval_rows_all, cfg.data.eval_samples)
    keep = set(mrs)
    return train, mrs, refs, [r for r in eval_rows_all if r[0] in keep]


def make_task_spec(tokenizer: Any, train_rows: list, eval_rows: list, max_length: int,
                   eval_batch_size: int = 16) -> TaskSpec:
    """Tokenized training rows, right-padding collate, label-smoothed completion loss, eval loss."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    collate = make_collate(pad)
    train = encode_rows(tokenizer, train_rows, max_length)
    held_out = encode_rows(tokenizer, eval_rows, max_length)

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return mean_token_loss(model, batch, label_smoothing=spec.label_smoothing)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"eval_loss": heldout_loss(model, held_out, collate, eval_batch_size)["eval_loss"]}

    spec = TaskSpec(train_dataset=train, collate=collate, loss=loss, evaluate=evaluate if held_out else None,
                    metric=None, greater_is_better=False)
    return spec


def _scores(outputs: list[str], refs: list[list[str]], run_dir: Path | None) -> dict[str, float]:
    from loralab.metrics.e2e import score

    try:
        return score(outputs, refs)
    except RuntimeError as err:  # e.g. no Java: the outputs are saved, say how to score them later
        where = f"; outputs saved: loralab score-e2e {run_dir}/hyp.txt {run_dir}/refs.txt" if run_dir else ""
        raise RuntimeError(f"E2E scoring failed: {err}{where}") from err


class E2EExperiment:
    name: ClassVar[str] = "e2e"
    data_config: ClassVar[type] = E2EData
    sections: ClassVar[tuple[str, ...]] = ("generate",)
    shared_baseline: ClassVar[bool] = True
    """The baseline is the un-adapted model on the evaluation set: runs of one sweep that differ only in
    method or recipe measure it once (``engine.runner.measure_baseline``)."""

    @property
    def presets(self) -> dict[str, dict]:
        from loralab.tasks.e2e.presets import all_presets

        return all_presets()

    @property
    def sweeps(self) -> dict[str, dict]:
        from loralab.tasks.e2e.presets import all_sweeps

        return all_sweeps()

    def build(self, cfg: Any) -> Built:
        from loralab.models.zoo import load_from_config

        if cfg.lora.method in GENERATIVE_REFUSED:
            why = GENERATIVE_REFUSED[cfg.lora.method]
            raise ValueError(f"lora.method={cfg.lora.method}: not available for E2E: {why}")
        train, mrs, refs, eval_rows = load_data(cfg)  # data errors before minutes of model loading
        torch.manual_seed(cfg.train.seed)  # LoRA A init depends on it
        model, tokenizer = load_from_config(cfg.model, kind="causal_lm")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2: padding is masked out of loss and attention
        info = apply_method(model, cfg.lora, "CAUSAL_LM", list(cfg.lora.modules_to_save or []), cfg.model.name,
                            tokenizer)
        spec = make_task_spec(tokenizer, train, eval_rows, cfg.data.max_length, max(16, cfg.train.batch_size))
        _log(f"{len(train)} training rows; evaluation: {len(mrs)} MRs with {sum(map(len, refs))} references")
        return Built(model, spec, {"cfg": cfg, "tokenizer": tokenizer, "mrs": mrs, "refs": refs, "method": info})

    def baseline(self, built: Built) -> Baseline:
        """The un-adapted model (LoRA adapters off; the untouched model before training; for prefix_layer a
        freshly loaded base) on the same MRs."""
        from loralab.core.inject import disable_adapters

        cfg, model = built.state["cfg"], built.model
        if cfg.lora.method in CHANGED_AT_INIT:
            from loralab.models.zoo import load_from_config

            model = load_from_config(cfg.model, kind="causal_lm")[0].to(next(built.model.parameters()).device)
        off = disable_adapters(model)  # a model without adapters is itself
        with off:
            outputs = generate_outputs(model, built.state["tokenizer"], built.state["mrs"], cfg.generate)
        scores = _scores(outputs, built.state["refs"], None)
        return Baseline(score=scores["BLEU"], kind="un-adapted model", metrics=scores)

    def report(self, built: Built, fit: Any, run_dir: str | Path | None) -> Result:
        """Decode one output per evaluation MR, save the official files and the adapter, score."""
        cfg, mrs, refs = built.state["cfg"], built.state["mrs"], built.state["refs"]
        outputs = generate_outputs(built.model, built.state["tokenizer"], mrs, cfg.generate)
        details: dict[str, Any] = {"eval_mrs": len(mrs), "method_info": built.state["method"]}
        if run_dir is not None:
            run_dir = Path(run_dir)
            write_official(run_dir / "hyp.txt", outputs)
            write_references(run_dir / "refs.txt", refs)
            write_official(run_dir / "mrs.txt", mrs)
            details.update(hyp_file=str(run_dir / "hyp.txt"), ref_file=str(run_dir / "refs.txt"),
                           adapter_dir=save_trained(built.model, run_dir))
        scores = _scores(outputs, refs, run_dir)
        final_loss = (getattr(fit, "final_metrics", None) or {}).get("eval_loss")
        if final_loss is not None:  # the completion loss on the evaluated MRs' references (the rank sweep's val loss)
            scores["eval_loss"] = float(final_loss)
        base = built.baseline.metrics if built.baseline else {}
        details["table"] = results_table(scores, f"this run: {cfg.model.name} {cfg.lora.method}", base)
        print(details["table"], flush=True)
        return make_result("e2e", built, fit, "BLEU", scores, True, BLEU_MARGIN, details)


EXPERIMENT = E2EExperiment()
