"""GLUE experiment: every text field reaches the tokenizer, dynamic padding, losses, evaluation order,
the majority-class baseline, and build() -> baseline() -> fit -> report() end to end (directly and
through the runner's results.json) on a tiny BERT and a slice of the shared data."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loralab.engine.experiment import Built, get_experiment
from loralab.tasks.common.batches import make_collate
from loralab.tasks.glue import data as D
from loralab.tasks.glue import experiment as G

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data" / "glue"
EXP = G.EXPERIMENT
needs_shared = pytest.mark.skipif(not (SHARED / "RTE").is_dir(), reason="../shared/data/glue not present")


class RecordingTokenizer:
    """Records every string it is given, as first segment or as pair; one id per word + 3 specials."""

    pad_token_id = 0

    def __init__(self, drop_pair: bool = False):
        self.firsts: list[str] = []
        self.pairs: list[str] = []
        self.drop_pair = drop_pair

    def __call__(self, text, text_pair=None, truncation=False, max_length=None):
        batch = isinstance(text, list)
        texts = text if batch else [text]
        pairs = (text_pair if batch else [text_pair]) if text_pair is not None else [None] * len(texts)
        self.firsts += texts
        self.pairs += [p for p in pairs if p is not None]
        ids = []
        for a, b in zip(texts, pairs):
            n = len(a.split()) + (len(b.split()) + 1 if b is not None and not self.drop_pair else 0) + 2
            ids.append(list(range(5, 5 + min(n, max_length or n))))
        enc = {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        return enc if batch else {k: v[0] for k, v in enc.items()}


@pytest.mark.parametrize("key", sorted(D.TASKS))
def test_every_text_field_reaches_the_tokenizer(key):
    task = D.TASKS[key]
    examples = [{**{f: f"{key} example {i} field {f}" for f in task.text_fields}, "label": 0} for i in range(3)]
    tok = RecordingTokenizer()
    encoded = G.encode_examples(tok, task, examples, max_length=64)
    assert len(encoded) == 3
    for ex in examples:
        assert ex[task.text_fields[0]] in tok.firsts  # first field: first segment
        if task.is_pair:
            assert ex[task.text_fields[1]] in tok.pairs  # second field: a real pair, not concatenated
            assert ex[task.text_fields[1]] not in tok.firsts
        else:
            assert tok.pairs == []
    assert all(e["labels"] == 0 for e in encoded)


def test_a_tokenizer_that_drops_the_second_segment_is_caught():
    task = D.TASKS["qnli"]
    ex = [{"question": "what is it ?", "sentence": "it is a test .", "label": 0}]
    with pytest.raises(RuntimeError, match="'sentence' did not reach the model"):
        G.encode_examples(RecordingTokenizer(drop_pair=True), task, ex, max_length=64)


def test_missing_field_is_a_clear_error():
    with pytest.raises(KeyError, match=r"lacks text field 'question'"):
        G.encode_examples(RecordingTokenizer(), D.TASKS["qnli"], [{"sentence": "s", "label": 0}], 32)


@needs_shared
def test_real_qnli_pair_keeps_question_and_sentence():
    from loralab.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer("bert")  # character level: decoding gives the text back
    qnli = D.load_split(D.TASKS["qnli"], "dev", data_dir=SHARED)[:2]
    enc = G.encode_examples(tok, D.TASKS["qnli"], qnli, max_length=512)
    text = tok.decode(enc[0]["input_ids"]).replace(" ", "")
    assert qnli[0]["question"].replace(" ", "") in text and qnli[0]["sentence"].replace(" ", "") in text
    segments = enc[0]["token_type_ids"]
    assert segments.count(1) == len(qnli[0]["sentence"]) + 1  # the sentence (+ [SEP]) is segment B


def test_task_collate_pads_to_the_longest_and_types_labels_per_task():
    """GLUE's collate (from make_task_spec): padded with the tokenizer's pad id, long class ids, float
    STS-B scores."""
    tok = RecordingTokenizer()
    tok.pad_token_id = 7
    rows = [{"sentence": "a b c", "label": 1}, {"sentence": "a b c d e f", "label": 0}]
    spec, _ = G.make_task_spec(D.TASKS["sst2"], tok, rows, {"dev": rows}, max_length=32)
    batch = spec.collate([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1},
                          {"input_ids": [4, 5, 6, 8, 9], "attention_mask": [1] * 5, "labels": 0}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 7], [4, 5, 6, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"].dtype == torch.long and "token_type_ids" not in batch
    pairs = [{"sentence1": "x", "sentence2": "y z", "label": 3.8}] * 2
    reg_spec, _ = G.make_task_spec(D.TASKS["stsb"], RecordingTokenizer(), pairs, {"dev": pairs}, max_length=32)
    reg = reg_spec.collate([{"input_ids": [1], "attention_mask": [1], "labels": 3.8}])
    assert reg["labels"].dtype == torch.float32 and reg["labels"].item() == pytest.approx(3.8)
    assert reg_spec.metric == "pearson" and spec.metric == "accuracy" and spec.greater_is_better


def test_losses_match_their_formulas():
    torch.manual_seed(0)
    logits, labels, eps = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0]), 0.1
    logp = torch.log_softmax(logits, -1)
    smoothed = ((1 - eps) * -logp[torch.arange(5), labels] + eps * -logp.mean(-1)).mean()
    assert G._loss(logits, labels, False, eps).item() == pytest.approx(smoothed.item(), rel=1e-6)
    scores, gold = torch.tensor([[1.0], [2.5], [4.0]]), torch.tensor([1.5, 2.5, 3.0])
    assert G._loss(scores, gold, True, 0.3).item() == pytest.approx(((0.5**2) + 0 + 1) / 3)


class ParityModel(nn.Module):
    """Predicts class (number of real tokens) % 2; a stand-in whose predictions we know."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, **_):
        n = attention_mask.sum(-1)
        return type("Out", (), {"logits": F.one_hot(n % 2, 2).float() + 0 * self.w})()


def test_evaluation_scatters_predictions_back_in_order():
    task = D.TASKS["mrpc"]
    lengths, labels = [5, 2, 7, 4, 3, 6, 9], [1, 0, 1, 1, 0, 1, 0]
    data = [{"input_ids": [1] * n, "attention_mask": [1] * n, "labels": y} for n, y in zip(lengths, labels)]
    collate = make_collate(0)
    preds, _ = G.predict(ParityModel(), data, collate, regression=False, batch_size=2)
    assert preds == [n % 2 for n in lengths]
    metrics = G.evaluate_splits(ParityModel(), task, {"dev": data}, collate, batch_size=3)
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    assert metrics["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / 7)
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mnli = G.evaluate_splits(ParityModel(), D.TASKS["mnli"], {"dev_matched": data, "dev_mismatched": data[:3]},
                             collate)
    assert mnli["accuracy"] == mnli["accuracy_m"] == metrics["accuracy"]
    assert mnli["accuracy_mm"] == pytest.approx(sum(n % 2 == y for n, y in zip(lengths[:3], labels[:3])) / 3)


# ---------------------------------------------------------------- the baseline


def _built_for_baseline(key, train_labels, dev_labels):
    """A Built with just what baseline() reads: the task, the training labels, the dev sets."""
    task = D.TASKS[key]
    first = task.eval_splits[0]
    eval_sets = {first: [{"input_ids": [1], "labels": y} for y in dev_labels]}
    return Built(model=None, task=None, state={"task": task, "train_labels": list(train_labels), "eval_sets": eval_sets})


def test_baseline_is_the_majority_class_of_the_training_labels():
    # train: 1 is the majority (4 of 6); dev: mostly 0, so a dev-majority baseline would score 5/7
    base = EXP.baseline(_built_for_baseline("rte", [1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 1, 0]))
    assert base.score == pytest.approx(2 / 7) and base.metrics == {"accuracy": pytest.approx(2 / 7)}
    assert base.kind == "majority class (1)"
    # MRPC: all-1 predictions; F1 of the positive class = 2 TP / (2 TP + FP + FN) = 2*3 / (2*3 + 2 + 0)
    mrpc = EXP.baseline(_built_for_baseline("mrpc", [1, 1, 0], [1, 0, 1, 1, 0]))
    assert mrpc.score == pytest.approx(3 / 5) and mrpc.metrics["f1"] == pytest.approx(6 / 8)
    # MNLI: 3 classes, scored on the matched dev set; CoLA: a constant predictor has MCC 0
    mnli = EXP.baseline(_built_for_baseline("mnli", [2, 0, 2, 1, 2], [0, 1, 2, 2]))
    assert mnli.score == pytest.approx(2 / 4) and mnli.kind == "majority class (2)"
    cola = EXP.baseline(_built_for_baseline("cola", [0, 1, 1], [1, 0, 1, 1]))
    assert cola.metrics["accuracy"] == pytest.approx(3 / 4) and cola.score == 0.0


def test_stsb_baseline_is_a_constant_predictor_with_pearson_zero():
    train = [0.0, 2.5, 5.0, 4.5]
    base = EXP.baseline(_built_for_baseline("stsb", train, [1.0, 3.2, 4.8, 0.4]))
    assert base.kind == "constant predictor (train mean)"
    assert base.score == 0.0 and base.metrics == {"pearson": 0.0, "spearman": 0.0}


# ---------------------------------------------------------------- build -> fit -> report


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from loralab.models.tiny import tiny_model, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_model("bert", "base", seed=0).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer("bert").save_pretrained(path)
    return path


def _cfg(model_dir, *overrides):
    from loralab.engine.config import load_config

    return load_config(overrides=["experiment=glue", f"model.name={model_dir}", "data.train_samples=24",
                                  "data.eval_samples=16", "data.max_length=48", "train.batch_size=8",
                                  "train.max_steps=3", "train.lr=1e-3", "train.quiet=true", *overrides])


def test_glue_is_a_registered_experiment():
    assert get_experiment("glue") is EXP
    assert EXP.data_config is G.GlueData and EXP.sections == ()  # GLUE reads no generate section


@needs_shared
@pytest.mark.parametrize("task,method", [("rte", "lora"), ("stsb", "bitfit"), ("mrpc", "full")])
def test_build_fit_report(tiny_bert_dir, tmp_path, task, method):
    from loralab.engine.trainer import fit

    cfg = _cfg(tiny_bert_dir, f"data.task={task}", f"lora.method={method}")
    built = EXP.build(cfg)
    model, spec = built.model, built.task
    assert len(spec.train_dataset) == 24 and spec.metric == ("pearson" if task == "stsb" else "accuracy")
    assert model.num_labels == D.TASKS[task].num_labels  # the head has the task's label count
    built.baseline = EXP.baseline(built)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fitted = fit(model, spec, cfg.train, run_dir=tmp_path, log=lambda *a: None)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())]
    assert changed, "no trainable parameter moved"
    result = EXP.report(built, fitted, tmp_path)
    assert result.experiment == "glue" and result.details["task"] == task and result.details["method"] == method
    assert result.score == result.metrics[result.main_metric] and result.greater_is_better
    assert result.baseline is built.baseline
    assert result.learned is (result.score - built.baseline.score > result.margin)
    assert result.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result.details["method_info"]["trainable"] == result.trainable_params
    saves = method in ("lora", "bitfit")  # full fine-tuning saves no adapter: every weight is trained
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() == saves
    assert (result.details["adapter_dir"] is not None) == saves
    assert all(math.isfinite(v) for v in result.metrics.values())


@needs_shared
def test_run_training_writes_results_json_with_baseline_and_learned(tiny_bert_dir, tmp_path):
    """The runner's results.json (the common schema): the majority-class baseline computed here by hand
    from the same train subset and dev slice, ``learned`` against the stated margin, the run's settings."""
    from loralab.engine.runner import run_training
    from loralab.tasks.common.sampling import subsample
    from loralab.tasks.glue.table import flatten

    cfg = _cfg(tiny_bert_dir, "data.task=rte", f"out_dir={tmp_path}")
    run, results = run_training(cfg)
    assert json.loads((run.dir / "results.json").read_text()) == json.loads(json.dumps(results))
    train = subsample(D.load_split(D.TASKS["rte"], "train", data_dir=SHARED), 24, seed=0)
    dev = D.load_split(D.TASKS["rte"], "dev", data_dir=SHARED)[:16]
    ones = sum(ex["label"] for ex in train)
    assert ones != 12, "tied training labels: pick another data.seed"
    majority = int(ones > 12)
    b = sum(ex["label"] == majority for ex in dev) / 16
    assert results["baseline"]["score"] == pytest.approx(b)
    assert results["baseline"]["kind"] == f"majority class ({majority})"
    assert json.loads((run.dir / "baseline.json").read_text())["score"] == pytest.approx(b)
    margin = 2 * math.sqrt(max(b * (1 - b), 1 / 16) / 16)
    assert results["margin"] == pytest.approx(margin)
    assert results["learned"] is (results["score"] - b > margin)
    assert (results["experiment"], results["main_metric"], results["greater_is_better"]) == ("glue", "accuracy", True)
    assert results["score"] == results["metrics"]["accuracy"]
    H, L, r, C = 32, 2, 8, 2  # tiny BERT, default r, RTE's two labels: LoRA A, B on query and value + classifier
    assert results["params"]["trainable"] == L * 2 * (r * H + H * r) + (H * C + C)
    assert results["run"] == {"name": "glue-rte", "model": str(tiny_bert_dir), "task": "rte", "method": "lora",
                              "seed": 0}
    assert results["details"]["task"] == "rte" and results["details"]["fit"]["global_step"] == 3
    assert Path(results["details"]["adapter_dir"], "adapter_model.safetensors").is_file()
    assert results["wall_seconds"] > 0 and results["tokens_per_second"] > 0
    row = flatten(results, run.dir)  # the GLUE table reads the run's settings from its config.yaml
    assert (row["settings"]["lr"], row["settings"]["train_samples"], row["settings"]["r"]) == (1e-3, 24, 8)
    assert (row["task"], row["method"]) == ("rte", "lora")
    assert (row["baseline"], row["learned"]) == (results["baseline"]["score"], results["learned"])


@needs_shared
def test_build_names_missing_files(tiny_bert_dir):
    cfg = _cfg(tiny_bert_dir, "data.task=qnli")  # only QNLI's dev set is shared
    with pytest.raises(D.GlueDataError, match=str(SHARED.resolve() / "QNLI" / "train.tsv")):
        EXP.build(cfg)


def test_presets_are_registered_and_method_aware():
    from loralab.engine.config import load_config

    paper = load_config(preset="glue-paper-cola")
    assert paper.experiment == "glue" and isinstance(paper.data, G.GlueData)
    assert (paper.train.batch_size, paper.train.epochs, paper.train.lr) == (32, 80.0, 4e-4)
    assert (paper.lora.r, paper.lora.lora_alpha, paper.data.max_length, paper.train.warmup_ratio) == (8, 8.0, 512, 0.06)
    assert paper.train.schedule == "linear" and paper.train.optimizer == "adamw"
    recipe = {"mnli": (16, 30, 5e-4), "sst2": (16, 60, 5e-4), "mrpc": (16, 30, 4e-4), "cola": (32, 80, 4e-4),
              "qnli": (32, 25, 4e-4), "qqp": (16, 25, 5e-4), "rte": (32, 80, 5e-4), "stsb": (16, 40, 4e-4)}
    for task, (bs, ep, lr) in recipe.items():
        c = load_config(preset=f"glue-paper-{task}")
        assert (c.data.task, c.train.batch_size, c.train.epochs, c.train.lr) == (task, bs, ep, lr)
    lrs = {m: load_config(preset=f"glue-cpu-rte{s}").train.lr for m, s in
           [("lora", ""), ("full", "-full"), ("bitfit", "-bitfit")]}
    assert lrs["full"] <= 1e-4 < min(lrs["lora"], lrs["bitfit"])  # full FT moves every weight: far lower lr
    cpu = load_config(preset="glue-cpu-sst2-full")
    assert cpu.lora.method == "full" and cpu.model.name == "minilm-l6" and cpu.data.max_length == 128
    methods = ("", "-full", "-bitfit", "-adapter_h", "-adapter_l", "-adapter_p", "-prefix_layer", "-prefix_embed",
               "-ft_top2")
    assert set(EXP.presets) == {f"glue-paper-{t}" for t in recipe} | {
        f"glue-{size}-{t}{s}" for size in ("cpu", "mpnet") for t in recipe for s in methods}
    for s in methods:  # every preset builds a valid config whose method is its suffix
        c = load_config(preset=f"glue-mpnet-mrpc{s}")
        assert c.lora.method == (s[1:] or "lora") and c.model.name == "mpnet-base" and c.model.compute_dtype == "auto"
    assert load_config(preset="glue-cpu-sst2-adapter_h").lora.r == 8
    assert load_config(preset="glue-cpu-sst2-ft_top2").lora.top_layers == 2


@needs_shared
def test_warm_start_through_build_rte_to_stsb(tiny_bert_dir, tmp_path, capfd):
    """RTE adapter (2 labels) -> STS-B (1 output): LoRA loads trainable and equal, the head is re-created
    (and the log says so), and training moves the warm-started weights."""
    from safetensors.torch import load_file

    from loralab.engine.trainer import fit

    cfg = _cfg(tiny_bert_dir, "data.task=rte", "lora.r=4")
    built = EXP.build(cfg)
    EXP.report(built, fit(built.model, built.task, cfg.train, log=lambda *a: None), tmp_path / "rte")
    saved = load_file(str(tmp_path / "rte" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())

    cfg2 = _cfg(tiny_bert_dir, "data.task=stsb", f"lora.init_from={tmp_path / 'rte' / 'adapter'}")
    built2 = EXP.build(cfg2)
    model2 = built2.model
    assert "the head is re-created" in capfd.readouterr().err
    assert built2.state["method"]["warm_start"]["head_loaded"] is False
    lora = {n: p for n, p in model2.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    for name, p in lora.items():
        key = "base_model.model." + name.replace(".default.", ".")
        assert torch.equal(p.detach(), saved[key]), name
    assert model2.classifier.modules_to_save["default"].weight.shape == (1, 32)
    before = {n: p.detach().clone() for n, p in lora.items()}
    fit(model2, built2.task, cfg2.train, log=lambda *a: None)
    unchanged = [n for n, p in lora.items() if torch.equal(before[n], p.detach())]
    assert not unchanged, f"warm-started weights did not train: {unchanged}"
