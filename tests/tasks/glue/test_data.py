"""GLUE data definitions and readers: layouts, label maps, BOM / quote tolerance, missing files."""
import sys
from pathlib import Path

import pytest

from loralab.tasks.common.sampling import subsample
from loralab.tasks.glue import data as D

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data" / "glue"
needs_shared = pytest.mark.skipif(not (SHARED / "MRPC").is_dir(), reason="../shared/data/glue not present")

ALL = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]


def test_every_task_is_defined_with_its_release_layout():
    assert sorted(D.TASKS) == sorted(ALL)
    single = {"cola": ("sentence",), "sst2": ("sentence",)}
    pairs = {"mrpc": ("#1 String", "#2 String"), "qqp": ("question1", "question2"),
             "stsb": ("sentence1", "sentence2"), "mnli": ("sentence1", "sentence2"),
             "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2")}
    for key, fields in {**single, **pairs}.items():
        assert D.TASKS[key].text_fields == fields, key
        # the Hub's columns map onto exactly these fields (a renamed column cannot be lost)
        assert sorted(D.TASKS[key].hub_fields.values()) == sorted(fields), key
    assert D.TASKS["mnli"].files == {"train": "train.tsv", "dev_matched": "dev_matched.tsv",
                                     "dev_mismatched": "dev_mismatched.tsv"}
    assert D.TASKS["mnli"].eval_splits == ("dev_matched", "dev_mismatched")
    assert D.TASKS["cola"].columns == ("source", "label", "original_label", "sentence")  # no header row
    assert all(D.TASKS[k].columns is None for k in ALL if k != "cola")
    assert [D.TASKS[k].dir_name for k in ALL] == ["CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE"]


def test_label_maps():
    nli2 = ("entailment", "not_entailment")
    assert D.TASKS["mnli"].label_values == ("entailment", "neutral", "contradiction")
    assert D.TASKS["qnli"].label_values == nli2 and D.TASKS["rte"].label_values == nli2
    for key in ("cola", "sst2", "mrpc", "qqp"):
        assert D.TASKS[key].label_values == ("0", "1"), key
    assert D.TASKS["mrpc"].label_names == ("not_equivalent", "equivalent")
    assert D.TASKS["stsb"].is_regression and D.TASKS["stsb"].num_labels == 1
    assert [D.TASKS[k].num_labels for k in ALL] == [2, 2, 2, 2, 1, 3, 2, 2]
    rows = [{"sentence1": "a", "sentence2": "b", "gold_label": g} for g in ("contradiction", "entailment", "neutral")]
    assert [e["label"] for e in D.parse_rows(D.TASKS["mnli"], rows, "x")] == [2, 0, 1]
    with pytest.raises(D.GlueDataError, match="label 'maybe' not in"):
        D.parse_rows(D.TASKS["mnli"], [{**rows[0], "gold_label": "maybe"}], "x")
    stsb = D.parse_rows(D.TASKS["stsb"], [{"sentence1": "a", "sentence2": "b", "score": "3.800"}], "x")
    assert stsb[0]["label"] == pytest.approx(3.8) and isinstance(stsb[0]["label"], float)


def test_aliases():
    assert D.get_task("SST-2") is D.TASKS["sst2"] and D.get_task("STS-B") is D.TASKS["stsb"]
    with pytest.raises(ValueError, match="unknown GLUE task"):
        D.get_task("wnli")


def test_bom_and_unbalanced_quotes(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n".encode("utf-8")
                     + b'1\t1\t2\tHe said " hello .\t" The other one .\n'
                     + b'0\t3\t4\tA "quoted\ttext\n'
                     + b"1\t5\t6\tlast\trow\n")
    rows = D.read_tsv(path)
    assert list(rows[0]) == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]  # BOM gone
    assert len(rows) == 3  # a quote-aware reader would merge lines after the unbalanced quote
    assert rows[0]["#2 String"] == '" The other one .'
    assert rows[1]["#1 String"] == 'A "quoted'
    examples = D.parse_rows(D.TASKS["mrpc"], rows, str(path))
    assert [e["label"] for e in examples] == [1, 0, 1]


def test_headerless_cola(tmp_path):
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "train.tsv").write_text("gj04\t1\t\tOur friends won't buy this analysis.\n"
                                                  "gj04\t0\t*\tThey drank the pub.\n")
    ex = D.load_split(D.TASKS["cola"], "train", data_dir=tmp_path)
    assert ex == [{"sentence": "Our friends won't buy this analysis.", "label": 1},
                  {"sentence": "They drank the pub.", "label": 0}]


def test_mnli_layout(tmp_path):
    head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1"]
    (tmp_path / "MNLI").mkdir()
    train = ["\t".join(head + ["gold_label"]),
             "\t".join(["0", "1", "1e", "gov", "(", "(", "(", "(", "P one", "H one", "neutral", "neutral"])]
    dev = ["\t".join(head + ["label2", "label3", "label4", "label5", "gold_label"]),
           "\t".join(["0", "1", "1e", "fic", "(", "(", "(", "(", "P two", "H two"] + ["contradiction"] * 6)]
    (tmp_path / "MNLI" / "train.tsv").write_text("\n".join(train) + "\n")
    (tmp_path / "MNLI" / "dev_matched.tsv").write_text("\n".join(dev) + "\n")
    (tmp_path / "MNLI" / "dev_mismatched.tsv").write_text("\n".join(dev) + "\n")
    task = D.TASKS["mnli"]
    assert D.load_split(task, "train", data_dir=tmp_path) == [{"sentence1": "P one", "sentence2": "H one", "label": 1}]
    assert D.load_split(task, "dev_mismatched", data_dir=tmp_path) == [
        {"sentence1": "P two", "sentence2": "H two", "label": 2}]


def test_short_row_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tquestion\tsentence\tlabel\n0\tq?\ts.\tentailment\n1\tonly a question\n")
    with pytest.raises(D.GlueDataError, match=r"dev.tsv, line 3: 2 tab-separated fields"):
        D.read_tsv(path)
    assert len(D.read_tsv(path, skip_malformed=True)) == 1


def test_missing_files_are_listed_with_full_paths(tmp_path):
    with pytest.raises(D.GlueDataError) as err:
        D.task_files(D.TASKS["mnli"], tmp_path, ["train", "dev_matched", "dev_mismatched"])
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        assert str(tmp_path.resolve() / "MNLI" / name) in str(err.value)
    with pytest.raises(D.GlueDataError, match="no split"):
        D.task_files(D.TASKS["sst2"], tmp_path, ["test"])


def test_hub_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        D.load_split(D.TASKS["rte"], "dev", source="hub")


def test_glue_subsamples_train_with_the_shared_rng(tmp_path):
    """data.train_samples: GLUE's train subset is common.sampling.subsample(train, n, data.seed), dev sets
    are cut to their first data.eval_samples (subsample itself is tested in tests/tasks/common)."""
    from loralab.engine.config import load_config
    from loralab.tasks.glue.experiment import load_task_data

    (tmp_path / "SST-2").mkdir()
    rows = [f"sentence {i}\t{i % 2}" for i in range(40)]
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:9]) + "\n")
    cfg = load_config(overrides=["experiment=glue", "data.task=sst2", f"data.data_dir={tmp_path}",
                                 "data.train_samples=7", "data.eval_samples=4", "data.seed=3"])
    train, evals = load_task_data(cfg, D.TASKS["sst2"])
    everything = D.load_split(D.TASKS["sst2"], "train", data_dir=tmp_path)
    assert train == subsample(everything, 7, seed=3) and len(train) == 7
    assert train != subsample(everything, 7, seed=4)
    assert evals == {"dev": D.load_split(D.TASKS["sst2"], "dev", data_dir=tmp_path)[:4]}


@needs_shared
def test_shared_release_files():
    counts = {("sst2", "dev"): 872, ("mrpc", "train"): 3667, ("mrpc", "dev"): 408, ("stsb", "dev"): 1500,
              ("rte", "dev"): 277, ("qnli", "dev"): 5463}
    for (key, split), n in counts.items():
        assert len(D.load_split(D.TASKS[key], split, data_dir=SHARED)) == n, (key, split)
    mrpc = D.load_split(D.TASKS["mrpc"], "train", data_dir=SHARED)  # starts with a BOM
    assert mrpc[0]["#1 String"].startswith("Amrozi accused his brother") and mrpc[0]["label"] == 1
    qnli = D.load_split(D.TASKS["qnli"], "dev", data_dir=SHARED)
    assert qnli[0] == {"question": "What came into force after the new constitution was herald?",
                       "sentence": "As of that day, the new constitution heralding the Second Republic came into force.",
                       "label": 0}
    with pytest.raises(D.GlueDataError, match=str(SHARED.resolve() / "QNLI" / "train.tsv")):
        D.load_split(D.TASKS["qnli"], "train", data_dir=SHARED)


def test_hub_rows_map_onto_release_fields(monkeypatch):
    """A stand-in `datasets` module: the Hub's column names and split names become ours."""
    import types

    calls = []
    rows = {"mrpc": [{"sentence1": "A b .", "sentence2": "C d .", "label": 1, "idx": 0}],
            "mnli": [{"premise": "P .", "hypothesis": "H .", "label": 2, "idx": 0}],
            "stsb": [{"sentence1": "x", "sentence2": "y", "label": 3.8, "idx": 0}],
            "qnli": [{"question": "q ?", "sentence": "s .", "label": -1, "idx": 0}]}

    def load_dataset(path, name, split, cache_dir=None):
        calls.append((path, name, split))
        return rows[name]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert D.load_split(D.TASKS["mrpc"], "dev", source="hub") == [{"#1 String": "A b .", "#2 String": "C d .", "label": 1}]
    assert D.load_split(D.TASKS["mnli"], "dev_mismatched", source="hub") == [
        {"sentence1": "P .", "sentence2": "H .", "label": 2}]
    assert D.load_split(D.TASKS["stsb"], "train", source="hub")[0]["label"] == pytest.approx(3.8)
    assert calls == [("nyu-mll/glue", "mrpc", "validation"), ("nyu-mll/glue", "mnli", "validation_mismatched"),
                     ("nyu-mll/glue", "stsb", "train")]
    with pytest.raises(D.GlueDataError, match="no labels"):  # e.g. a test split (label -1)
        D.load_split(D.TASKS["qnli"], "dev", source="hub")
