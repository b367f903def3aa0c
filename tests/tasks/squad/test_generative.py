"""Generative SQuAD: the seed's format, answer-only labels, truncation around the answer and its counts,
and the answer post-processor.

The tiny llama tokenizer is character-level (one token per character, eos <|im_end|>), so every length
below is a character count: head "<Q> q? <C>" = 10 tokens, tail " <A>" = 4 tokens.
"""

from __future__ import annotations

import pytest

from loralab.models.tiny import tiny_tokenizer
from loralab.tasks.squad.data import Answer, SquadExample
from loralab.tasks.squad.generative import (IGNORE_INDEX, GenFormat, build_eval_prompts,
                                            build_train_features, collate, decode_answer, extract_answer)

HEAD, TAIL = len("<Q> q? <C>"), len(" <A>")  # 10, 4


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("llama", model_max_length=512)


def _ex(context: str, answer: str, qid: str = "q", extra: tuple[str, ...] = ()) -> SquadExample:
    answers = tuple(Answer(a, context.index(a)) for a in (answer, *extra))
    return SquadExample(qid, "t", context, "q?", answers)


def test_format_and_answer_only_labels(tok):
    ex = _ex("Denver Broncos won.", "Denver Broncos")
    (f,), report = build_train_features(tok, [ex], max_length=128)
    assert tok.decode(f.input_ids) == "<Q> q? <C> Denver Broncos won. <A> Denver Broncos<|im_end|>"
    labelled = [t for t in f.labels if t != IGNORE_INDEX]
    assert tok.decode(labelled) == " Denver Broncos<|im_end|>"  # the answer and eos, nothing else
    assert f.labels[:f.prompt_length] == [IGNORE_INDEX] * f.prompt_length
    assert f.labels[f.prompt_length:] == f.input_ids[f.prompt_length:]
    assert (f.context_truncated, f.answer_in_context) == (False, True)
    assert (report.total, report.context_truncated, report.answer_cut) == (1, 0, 0)
    # the evaluation prompt is the training sequence up to the answer, token for token
    (p,), _ = build_eval_prompts(tok, [ex], max_length=128, max_new_tokens=16)
    assert p.input_ids == f.input_ids[:f.prompt_length] and p.labels is None
    fmt = GenFormat("Question:", "Context:", "Answer:")
    (g,), _ = build_train_features(tok, [ex], max_length=128, fmt=fmt)
    assert tok.decode(g.input_ids).startswith("Question: q? Context: Denver Broncos won. Answer: Denver")


def test_train_truncation_keeps_the_answer_and_counts_cuts(tok):
    # answer " xy" + eos = 4 tokens; max_length 28 -> budget B = 28 - 10 - 4 - 4 = 10 context tokens
    # ctx piece " " + context = 23 tokens (space, 20 dots / x y, ...)
    at_start = _ex("xy" + "." * 20, "xy", "a")    # xy = ctx tokens 1, 2: inside [0, 10) -> kept as is
    at_end = _ex("." * 20 + "xy", "xy", "b")      # xy = ctx tokens 21, 22: [0, 10) slides to [13, 23)
    feats, report = build_train_features(tok, [at_start, at_end], max_length=28)
    assert [len(f.input_ids) for f in feats] == [28, 28]
    assert tok.decode(feats[0].input_ids) == "<Q> q? <C> xy" + "." * 7 + " <A> xy<|im_end|>"
    assert tok.decode(feats[1].input_ids) == "<Q> q? <C>" + "." * 8 + "xy <A> xy<|im_end|>"
    assert all(f.context_truncated and f.answer_in_context for f in feats)
    assert (report.total, report.context_truncated, report.answer_cut) == (2, 2, 0)
    # an answer of 12 tokens (13 with its space, + eos = 14) and max_length 38: B = 38 - 10 - 4 - 14 = 10
    # < 12: cannot fit; the window starts at the answer and the question is counted, not dropped
    long = _ex("." * 30 + "x" * 12, "x" * 12, "c")
    feats, report = build_train_features(tok, [long], max_length=38)
    assert (report.total, report.answer_cut, report.share_answer_cut) == (1, 1, 1.0)
    assert not feats[0].answer_in_context
    assert tok.decode(feats[0].input_ids) == "<Q> q? <C>" + "x" * 10 + " <A> " + "x" * 12 + "<|im_end|>"
    with pytest.raises(ValueError, match="raise max_length"):
        build_train_features(tok, [long], max_length=20)


def test_eval_truncation_start_and_center(tok):
    # max_new_tokens 4, max_length 28 -> B = 28 - 10 - 4 - 4 = 10 of the 23 ctx tokens
    at_end = _ex("." * 20 + "xy", "xy", "b")
    middle = _ex("." * 10 + "xy" + "." * 10, "xy", "m", extra=("." * 10,))
    feats, report = build_eval_prompts(tok, [at_end, middle], max_length=28, max_new_tokens=4, keep="start")
    # start keeps ctx tokens [0, 10) = " " + 9 dots: "b" loses xy (tokens 21, 22); "m"'s golds are xy
    # (tokens 11, 12) and context[0:10] (tokens 1..10, one past the window): both cut -> 2 cut
    assert tok.decode(feats[0].input_ids) == "<Q> q? <C>" + " " + "." * 9 + " <A>"
    assert (report.total, report.context_truncated, report.answer_cut) == (2, 2, 2)
    # center: lo = (23 - 10) // 2 = 6 -> ctx tokens [6, 16); "m"'s xy = ctx tokens 11, 12 is inside
    feats, report = build_eval_prompts(tok, [at_end, middle], max_length=28, max_new_tokens=4, keep="center")
    assert [f.answer_in_context for f in feats] == [False, True]
    assert (report.answer_cut, report.as_dict()["share_answer_cut"]) == (1, 0.5)
    assert tok.decode(feats[1].input_ids) == "<Q> q? <C>" + "." * 5 + "xy" + "." * 3 + " <A>"


def test_collate_pads_labels_with_ignore(tok):
    feats, _ = build_train_features(tok, [_ex("ab", "a"), _ex("abcd", "abcd")], max_length=64)
    n0, n1 = len(feats[0].input_ids), len(feats[1].input_ids)  # 10+3+4+2+1 = 20, 10+5+4+5+1 = 25
    assert (n0, n1) == (20, 25)
    b = collate(feats, pad_token_id=tok.pad_token_id)
    assert b["input_ids"].shape == (2, 25)
    assert b["labels"][0, 20:].tolist() == [IGNORE_INDEX] * 5 and b["attention_mask"][0].sum() == 20
    left = collate(build_eval_prompts(tok, [_ex("ab", "a"), _ex("abcd", "abcd")], 64)[0], 0, side="left")
    # prompts of 10+3+4 = 17 and 10+5+4 = 19 tokens: the first gets 2 pads on the left
    assert "labels" not in left and left["attention_mask"][0].tolist()[:3] == [0, 0, 1]


def test_extract_and_decode_answer(tok):
    assert extract_answer(" Denver Broncos<|im_end|> junk", eos_token="<|im_end|>") == "Denver Broncos"
    assert extract_answer(" Denver\nBroncos") == "Denver"
    assert extract_answer(" Denver <Q> next question") == "Denver"
    assert extract_answer("  Denver Broncos  ") == "Denver Broncos"
    assert extract_answer(" x Answer: y", GenFormat(answer_marker="Answer:")) == "x"
    ids = tok(" Broncos", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + [5, 6]
    assert decode_answer(tok, ids) == "Broncos"
