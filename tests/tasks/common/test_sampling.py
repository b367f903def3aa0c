"""common.sampling.subsample: one RNG (random.Random(seed) drawing indices without replacement), the
original order kept, n = 0 / None / >= len meaning all; and every experiment's data.train_samples uses it."""
import json
import random

import pytest

from loralab.tasks.common.sampling import subsample


def _reference(n_items, n, seed):
    return sorted(random.Random(seed).sample(range(n_items), n))


def test_same_seed_same_subset_in_the_original_order():
    data = [{"i": i} for i in range(100)]
    a, b = subsample(data, 10, seed=3), subsample(data, 10, seed=3)
    assert a == b and len(a) == 10
    assert [x["i"] for x in a] == _reference(100, 10, 3)  # one RNG: random.Random(seed).sample of the indices
    assert [x["i"] for x in a] == sorted(x["i"] for x in a)  # order kept
    assert len({x["i"] for x in a}) == 10  # without replacement
    assert subsample(data, 10, seed=4) != a
    assert subsample(data, 11, seed=3) != a


@pytest.mark.parametrize("n", [0, None, 100, 500])
def test_zero_none_or_at_least_all_is_everything_in_order(n):
    data = list("abcdefghij") * 10
    out = subsample(data, n, seed=0)
    assert out == data and out is not data  # a new list: the caller's data is never aliased


def test_every_experiment_picks_the_same_training_subset(tmp_path):
    """GLUE, E2E and instruct with data.train_samples=7, data.seed=3 on 40 rows keep the same 7 rows."""
    from loralab.engine.config import load_config
    from loralab.tasks.e2e.experiment import load_data
    from loralab.tasks.glue.data import TASKS
    from loralab.tasks.glue.experiment import load_task_data
    from loralab.tasks.instruct.experiment import load_split_records

    n, common = 40, ["data.train_samples=7", "data.seed=3", "train.seed=9"]  # train.seed plays no part
    (tmp_path / "SST-2").mkdir()
    tsv = "sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(n))
    (tmp_path / "SST-2" / "train.tsv").write_text(tsv)
    (tmp_path / "SST-2" / "dev.tsv").write_text(tsv)
    glue = load_config(overrides=["experiment=glue", "data.task=sst2", f"data.data_dir={tmp_path}", *common])
    glue_rows, _ = load_task_data(glue, TASKS["sst2"])

    (tmp_path / "e2e.csv").write_text("mr,ref\n" + "".join(f"name[R{i}],row {i}\n" for i in range(n)))
    e2e = load_config(overrides=["experiment=e2e", f"data.train_file={tmp_path / 'e2e.csv'}",
                                 f"data.eval_file={tmp_path / 'e2e.csv'}", *common])
    e2e_rows = load_data(e2e)[0]

    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": f"row {i}", "input": "", "output": "x"}
                                                      for i in range(n)]))
    instruct = load_config(overrides=["experiment=instruct", "data.task=alpaca",
                                      f"data.train_file={tmp_path / 'alpaca.json'}",
                                      f"data.eval_file={tmp_path / 'alpaca.json'}", *common])
    instruct_rows = load_split_records(instruct)[0]

    expected = [f"row {i}" for i in _reference(n, 7, 3)]
    assert [r["sentence"] for r in glue_rows] == expected
    assert [ref for _, ref in e2e_rows] == expected
    assert [r["instruction"] for r in instruct_rows] == expected
