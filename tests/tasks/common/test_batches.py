"""common.batches.make_collate: right padding to the batch's longest row, the pad value per key, the
defaults of absent keys, and scalar fields as one tensor of the label dtype."""
import pytest
import torch

from loralab.tasks.common.batches import IGNORE, make_collate


def test_pad_value_per_key_and_width_of_the_longest_row():
    collate = make_collate(pad_id=7)
    batch = collate([
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "segment_ids": [0, 0, 1], "position_ids": [0, 1, 0],
         "token_type_ids": [0, 1, 1], "attention_mask": [1, 1, 1]},
        {"input_ids": [4, 5, 6, 8, 9], "labels": [4, 5, 6, 8, 9], "segment_ids": [0, 0, 0, 1, 1],
         "position_ids": [0, 1, 2, 0, 1], "token_type_ids": [0, 0, 1, 1, 1], "attention_mask": [1] * 5},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 7], [4, 5, 6, 8, 9]]  # the tokenizer's pad id
    assert batch["labels"].tolist() == [[-100, 2, 3, IGNORE, IGNORE], [4, 5, 6, 8, 9]]  # ignored by the loss
    assert batch["segment_ids"].tolist() == [[0, 0, 1, -1, -1], [0, 0, 0, 1, 1]]  # padding: no example
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0, 0], [0, 1, 2, 0, 1]]  # anything else: 0
    assert batch["token_type_ids"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert IGNORE == -100
    assert all(t.dtype == torch.long for t in batch.values())
    assert set(batch) == {"input_ids", "labels", "segment_ids", "position_ids", "token_type_ids", "attention_mask"}


def test_absent_keys_get_their_defaults():
    collate = make_collate(pad_id=0)
    batch = collate([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]  # created: ones, then padding 0
    assert set(batch) == {"input_ids", "attention_mask"}
    # one packed row beside an unpacked one: the latter is one segment at positions 0..n-1
    mixed = collate([{"input_ids": [1, 2, 3, 4], "segment_ids": [0, 0, 1, 1], "position_ids": [0, 1, 0, 1]},
                     {"input_ids": [5, 6]}])
    assert mixed["segment_ids"].tolist() == [[0, 0, 1, 1], [0, 0, -1, -1]]
    assert mixed["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0]]
    assert mixed["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # without "always", nothing is invented; a field without a default is not invented either
    assert set(make_collate(0, always=())([{"input_ids": [1]}])) == {"input_ids"}
    with pytest.raises(KeyError):
        collate([{"input_ids": [1], "token_type_ids": [0]}, {"input_ids": [2]}])


def test_scalar_labels_become_one_tensor_of_the_label_dtype():
    rows = [{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}]
    classes = make_collate(0)(rows)
    assert classes["labels"].dtype == torch.long and classes["labels"].tolist() == [1, 0]
    assert classes["input_ids"].tolist() == [[1, 2], [3, 0]]
    scores = make_collate(0, label_dtype=torch.float32)([{"input_ids": [1], "labels": 3.8},
                                                         {"input_ids": [2], "labels": 0.25}])
    assert scores["labels"].dtype == torch.float32 and scores["labels"].shape == (2,)
    assert scores["labels"].tolist() == [pytest.approx(3.8), 0.25]
    assert scores["input_ids"].dtype == torch.long  # the label dtype is for scalar fields only
