"""Encoder span features (windows, offsets, labels), the start/end loss and the best-span search.

Window tests use the real minilm-l6 (uncased WordPiece) tokenizer with one-token words, so that every
window can be counted by hand: question "who won?" = 3 tokens, [CLS] q [SEP] c [SEP] = 3 specials, so
max_length 16 leaves capacity 16 - 3 - 3 = 10 context tokens; doc_stride 4 shares 4 tokens, so windows
start at context tokens 0, 6, 12, ... (step 10 - 4 = 6) and context token c of window w sits at input
index 1 + 3 + 1 + (c - 6 w) = 5 + c - 6 w.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loralab.tasks.squad.data import Answer, SquadExample
from loralab.tasks.squad.span import (SpanFeatures, answer_token_span, best_spans, best_window_span,
                                      make_span_features, span_loss)

FILLER = ["red", "blue", "green", "cat"]


@pytest.fixture(scope="module")
def tok():
    try:
        from loralab.models.zoo import load_tokenizer
        return load_tokenizer("minilm-l6")
    except Exception as e:  # the zoo package is not installed
        pytest.skip(f"minilm-l6 tokenizer unavailable: {e}")


def _example(words: list[str], answer_words: list[str], at: int, qid: str = "q") -> SquadExample:
    """Context of ``words`` with ``answer_words`` placed at word index ``at``."""
    words = words[:at] + answer_words + words[at + len(answer_words):]
    context = " ".join(words)
    start = len(" ".join(words[:at])) + (1 if at else 0)
    text = " ".join(answer_words)
    assert context[start:start + len(text)] == text
    return SquadExample(qid, "t", context, "who won?", (Answer(text, start),))


def _words(n: int) -> list[str]:
    return [FILLER[i % 4] for i in range(n)]


def test_words_are_one_token_each(tok):  # the precondition of the hand counts
    for w in FILLER + ["denver", "broncos", "bowl", "who", "won", "?"]:
        assert len(tok.tokenize(w)) == 1, w


def test_answer_in_the_second_window_only(tok):
    # 16 context tokens: windows [0, 10) and [6, 16); the answer is context tokens 14, 15
    ex = _example(_words(16), ["denver", "broncos"], at=14)
    f = make_span_features(tok, [ex], max_length=16, doc_stride=4, max_query_length=8)
    assert len(f) == 2 and f.example_index == [0, 0] and f.example_ids == ["q", "q"]
    assert (f.start_positions, f.end_positions) == ([0, 13], [0, 14])  # 5 + 14 - 6 = 13, 5 + 15 - 6 = 14
    assert tok.decode(f.input_ids[1][13:15]) == "denver broncos"
    assert f.answers_outside == 0 and f.questions_truncated == 0
    # offsets: None outside the context ([CLS] who won ? [SEP] ... [SEP]); context tokens map into it
    offs = f.offsets[1]
    assert offs[:5] == [None] * 5 and offs[15] is None
    assert ex.context[offs[13][0]:offs[14][1]] == "denver broncos"
    t = f.tensors()
    assert t["input_ids"].shape == (2, 16) and t["start_positions"].tolist() == [0, 13]


def test_answer_straddling_a_window_boundary(tok):
    # answer = context tokens 8, 9, 10: window 0 ends at token 9 (cut -> CLS), window 1 holds it at
    # input indices 5 + 8 - 6 = 7 .. 5 + 10 - 6 = 9
    ex = _example(_words(16), ["denver", "broncos", "bowl"], at=8)
    f = make_span_features(tok, [ex], max_length=16, doc_stride=4, max_query_length=8)
    assert (f.start_positions, f.end_positions) == ([0, 7], [0, 9])
    assert tok.decode(f.input_ids[1][7:10]) == "denver broncos bowl"


def test_answer_longer_than_a_window_is_counted(tok):
    # 11 answer tokens > capacity 10: no window holds it; every window points at CLS
    ex = _example(_words(20), ["denver"] * 11, at=2)
    f = make_span_features(tok, [ex], max_length=16, doc_stride=4, max_query_length=8)
    assert f.start_positions == [0] * len(f) and f.answers_outside == 1


def test_question_truncation_and_stride_check(tok):
    # max_query_length 2 cuts "who won?" to "who won" (2 tokens): capacity 16 - 2 - 3 = 11
    ex = _example(_words(11), ["denver"], at=10)
    f = make_span_features(tok, [ex], max_length=16, doc_stride=4, max_query_length=2)
    assert f.questions_truncated == 1 and len(f) == 1
    assert tok.decode(f.input_ids[0][1:3]) == "who won"
    assert f.start_positions == [1 + 2 + 1 + 10]  # [CLS] who won [SEP] then context token 10
    with pytest.raises(ValueError, match="doc_stride"):
        make_span_features(tok, [ex], max_length=16, doc_stride=11, max_query_length=2)


def test_answer_token_span_rules():
    offs = [None, (0, 3), (4, 7), (8, 11), None]  # "abc def ghi"
    assert answer_token_span(offs, 3, 7) == (2, 2)   # starts in the gap: first token ending after 3
    assert answer_token_span(offs, 5, 6) == (2, 2)   # inside one token: that token
    assert answer_token_span(offs, 0, 11) == (1, 3)
    assert answer_token_span(offs, 9, 14) == (0, 0)  # runs past the window's last character
    assert answer_token_span([None, None], 0, 1) == (0, 0)


# window: [CLS] question  abc  def  ghi  jkl  [SEP]  over context "abc def ghi jkl"
OFFS = [None, None, (0, 3), (4, 7), (8, 11), (12, 15), None]
START = np.array([10.0, 9.0, 1.0, 0.0, 5.0, 0.0, 8.0])
END = np.array([10.0, 9.0, 0.0, 2.0, 1.0, 3.0, 8.0])


def test_best_window_span_constraints():
    # CLS/question/SEP excluded; pairs i <= j: (2,3) 1+2=3, (2,5) 1+3=4, (4,4) 5+1=6, (4,5) 5+3=8 best
    assert best_window_span(START, END, OFFS) == (8.0, 4, 5)
    # length 1 only: (2,2) 1, (3,3) 2, (4,4) 6, (5,5) 3 -> (4,4)
    assert best_window_span(START, END, OFFS, max_answer_length=1) == (6.0, 4, 4)
    # n_best 1: start {4}, end {5}: (4,5) still valid
    assert best_window_span(START, END, OFFS, n_best=1) == (8.0, 4, 5)
    # best start on "jkl" (5), best end on "abc" (2): with n_best 1 the only pair (5, 2) has j < i
    late_start, early_end = np.array([0, 0, 0, 0, 0, 9, 0.0]), np.array([0, 0, 9, 0, 0, 0, 0.0])
    assert best_window_span(late_start, early_end, OFFS, n_best=1) is None
    # n_best 2 adds start 2 (first of the tied zeros) -> (2, 2) scores 0 + 9 = 9
    assert best_window_span(late_start, early_end, OFFS, n_best=2) == (9.0, 2, 2)
    assert best_window_span(START, END, [None] * 7) is None


def test_best_spans_over_windows_and_round_trip(tok):
    ctx = "abc def ghi jkl"
    ex = SquadExample("e", "t", ctx, "q", (Answer("ghi jkl", 8),))
    other = SquadExample("o", "t", ctx, "q", (Answer("abc", 0),))
    low = np.array([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])   # window 0 of "e": best (2,2) score 1+1 = 2
    feats = SpanFeatures([[0] * 7] * 3, [[1] * 7] * 3, None, [OFFS, OFFS, OFFS], [0, 0, 1], ["e", "e", "o"])
    starts = np.stack([low, START, low])
    ends = np.stack([low, END, low])
    # "e": window 1 scores 8 on tokens (4,5) = "ghi jkl" > window 0's 2; "o": (2,2) = "abc"
    assert best_spans(feats, torch.tensor(starts), torch.tensor(ends), [ex, other]) == {"e": "ghi jkl", "o": "abc"}
    with pytest.raises(ValueError, match="no window"):
        best_spans(feats, starts, ends, [ex, other, SquadExample("x", "t", ctx, "q", ())])
    # real features: logits peaked at the labelled positions give back the answer text
    exs = [_example(_words(16), ["denver", "broncos"], at=14, qid="a"),
           _example(_words(16), ["denver", "broncos", "bowl"], at=8, qid="b")]
    f = make_span_features(tok, exs, max_length=16, doc_stride=4, max_query_length=8)
    s, e = np.zeros((len(f), 16)), np.zeros((len(f), 16))
    for w in range(len(f)):
        if f.start_positions[w]:
            s[w, f.start_positions[w]] = e[w, f.end_positions[w]] = 10.0
    assert best_spans(f, s, e, exs) == {"a": "denver broncos", "b": "denver broncos bowl"}


def test_span_loss_hand_worked():
    # start: softmax(0, 0)[0] = 1/2 -> ln 2; end: softmax(ln 3, 0) = (3/4, 1/4), position 1 -> ln 4
    loss = span_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]]),
                     torch.tensor([0]), torch.tensor([1]))
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    # batch mean: a second row with uniform logits over 2 adds ln 2 to both means
    loss2 = span_loss(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]),
                      torch.tensor([0, 1]), torch.tensor([1, 0]))
    assert loss2.item() == pytest.approx(((math.log(2) + math.log(2)) / 2 + (math.log(4) + math.log(2)) / 2) / 2)
    with pytest.raises(ValueError, match="end_positions"):
        span_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), torch.tensor([2]))
