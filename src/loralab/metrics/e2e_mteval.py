"""Corpus BLEU and NIST exactly as the E2E challenge's official scorer computes them.

The official scorer (tuetschek/e2e-metrics, ``measure_scores.py``) writes the data to SGML files and
runs a lightly edited ``mteval-v13a.pl`` on them, all segments in one document. This module is an
independent re-implementation of that Perl's arithmetic (no code copied), so no Perl is needed.

Tokenisation (mteval 13a "basic", case-folded):
    unescape &quot; &amp; &lt; &gt;; lowercase A-Z only (Perl ``tr/[A-Z]/[a-z]/``);
    put spaces around the ASCII punctuation  { | } ~ [ \\ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
    split "." and "," from a non-digit on either side; split "-" after a digit; collapse whitespace.

BLEU (4-grams, corpus level, one score for the whole set):
    m_n = sum over segments of clipped n-gram matches (clip = max count of the n-gram in any ONE ref)
    t_n = sum over segments of (hyp length - n + 1)^+
    r   = sum over segments of the reference length closest to the hyp length (ties: the shorter)
    p_n = m_n / t_n; if m_n == 0 (and t_n > 0) mteval smooths: p_n = 1 / (2^k t_n), k = 1, 2, ...
          counting the n's with no match so far; a zero t_n contributes log p_n = 0
    BLEU = exp(min(0, 1 - r / t_1)) * exp(1/4 sum_{n=1..4} log p_n)        (0 if t_1 == 0)

NIST (5-grams):
    info(w_1..w_n) = log2( count(w_1..w_{n-1}) / count(w_1..w_n) ), counts over ALL references of the
                     corpus (the (n-1)-gram count of the empty prefix is the total number of ref words)
    NIST = LP * sum_{n=1..5} [ sum over segments, matched n-grams g of info(g) * clipped count(g) ]
                             / max(t_n, 1)
    LP   = exp(-beta * ln(t_1 / L_ref)^2) if 0 < t_1 / L_ref < 1; 1 if >= 1; 0 if <= 0,
           beta = -ln(0.5) / ln(1.5)^2  (LP = 0.5 at ratio 2/3),
           L_ref = (total ref words) / (number of refs / number of segments)   [the edited mteval's
           average: segments with more references weigh more than in a per-segment mean].

One quirk of the Perl is kept on purpose: it tests the (n-1)-gram prefix for truth, and the string
"0" is false in Perl, so a bigram starting with the token "0" takes the unigram denominator (total
ref words) instead of count("0").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

BLEU_MAX_N = 4
NIST_MAX_N = 5
NIST_BETA = -math.log(0.5) / (math.log(1.5) ** 2)

# Perl's \s on a Unicode string (the SGML files are read with the :utf8 layer).
_WS = r"[\t\n\x0b\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_PUNCT = re.compile(r"([{-~\[-` -&(-+:-@/])")
_PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([.,])")
_PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_SPACES = re.compile(_WS + "+")
_ASCII_UPPER_TO_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

Ngram = tuple[str, ...]


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a basic tokenisation, lowercased (see the module docstring); returns the tokens."""
    text = _SPACES.sub(" ", text)  # the SGML reader collapses whitespace before tokenising
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = " " + text.translate(_ASCII_UPPER_TO_LOWER) + " "
    text = _PUNCT.sub(r" \1 ", text)
    text = _PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", text)
    text = _PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", text)
    text = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    text = _SPACES.sub(" ", text).strip(" ")
    return text.split(" ") if text else []


def ngram_counts(tokens: Sequence[str], max_n: int) -> Counter[Ngram]:
    """Counts of every n-gram, 1 <= n <= max_n."""
    counts: Counter[Ngram] = Counter()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i : i + n])] += 1
    return counts


def _clipped_matches(hyp: Counter[Ngram], refs: list[Counter[Ngram]]) -> dict[Ngram, int]:
    """Per hyp n-gram: min(count in hyp, max count in any one reference), where that is > 0."""
    out: dict[Ngram, int] = {}
    for gram, count in hyp.items():
        ref_max = max(ref.get(gram, 0) for ref in refs)
        if ref_max:
            out[gram] = min(count, ref_max)
    return out


def closest_ref_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """The reference length closest to the hypothesis length; ties go to the shorter reference.
    Empty references are skipped (mteval pads missing references with empty segments)."""
    best = ref_lens[0]
    for r in ref_lens[1:]:
        if r == 0:
            continue
        if abs(hyp_len - r) < abs(hyp_len - best) or (abs(hyp_len - r) == abs(hyp_len - best) and r < best):
            best = r
    return best


def _check(hyps_tok: list[list[str]], refs_tok: list[list[list[str]]]) -> None:
    if len(hyps_tok) != len(refs_tok):
        raise ValueError(f"{len(hyps_tok)} hypotheses but {len(refs_tok)} reference groups; need one group per hypothesis")
    if not hyps_tok:
        raise ValueError("no hypotheses to score")
    for i, group in enumerate(refs_tok):
        if not any(group):
            raise ValueError(f"MR {i} has no non-empty reference")


def corpus_bleu(hyps_tok: list[list[str]], refs_tok: list[list[list[str]]]) -> float:
    """Corpus BLEU-4 of tokenised hypotheses against tokenised reference groups (a fraction)."""
    _check(hyps_tok, refs_tok)
    matches = [0] * (BLEU_MAX_N + 1)
    totals = [0] * (BLEU_MAX_N + 1)
    ref_len = 0
    for hyp, refs in zip(hyps_tok, refs_tok):
        hyp_counts = ngram_counts(hyp, BLEU_MAX_N)
        ref_counts = [ngram_counts(r, BLEU_MAX_N) for r in refs]
        for gram, count in _clipped_matches(hyp_counts, ref_counts).items():
            matches[len(gram)] += count
        for n in range(1, BLEU_MAX_N + 1):
            totals[n] += max(len(hyp) - n + 1, 0)
        ref_len += closest_ref_length(len(hyp), [len(r) for r in refs])
    if totals[1] == 0:
        return 0.0
    log_precision_sum = 0.0
    smooth = 1
    for n in range(1, BLEU_MAX_N + 1):
        if totals[n] == 0:
            continue  # contributes log p_n = 0 in mteval
        if matches[n] == 0:
            smooth *= 2
            log_precision_sum += math.log(1 / (smooth * totals[n]))
        else:
            log_precision_sum += math.log(matches[n] / totals[n])
    brevity = math.exp(min(0.0, 1 - ref_len / totals[1]))
    return math.exp(log_precision_sum / BLEU_MAX_N) * brevity


def nist_information(refs_tok: list[list[list[str]]], max_n: int = NIST_MAX_N) -> dict[Ngram, float]:
    """info(g) = log2(count(prefix of g) / count(g)) over all references of the corpus."""
    counts: Counter[Ngram] = Counter()
    total_words = 0
    for group in refs_tok:
        for ref in group:
            total_words += len(ref)
            counts.update(ngram_counts(ref, max_n))
    info: dict[Ngram, float] = {}
    for gram, count in counts.items():
        prefix = gram[:-1]
        # Perl tests the joined prefix for truth: "" and "0" are false -> total word count.
        denominator = counts[prefix] if prefix and " ".join(prefix) != "0" else total_words
        info[gram] = -math.log(count / denominator) / math.log(2)
    return info


def nist_length_penalty(ratio: float) -> float:
    """exp(-beta ln(ratio)^2), 1 for ratio >= 1, 0 for ratio <= 0; equals 0.5 at ratio 2/3."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


def corpus_nist(hyps_tok: list[list[str]], refs_tok: list[list[list[str]]]) -> float:
    """Corpus NIST-5 of tokenised hypotheses against tokenised reference groups."""
    _check(hyps_tok, refs_tok)
    info = nist_information(refs_tok)
    matched_info = [0.0] * (NIST_MAX_N + 1)
    totals = [0] * (NIST_MAX_N + 1)
    ref_words = 0
    n_refs = 0
    for hyp, refs in zip(hyps_tok, refs_tok):
        hyp_counts = ngram_counts(hyp, NIST_MAX_N)
        ref_counts = [ngram_counts(r, NIST_MAX_N) for r in refs]
        for gram, count in _clipped_matches(hyp_counts, ref_counts).items():
            matched_info[len(gram)] += info[gram] * count
        for n in range(1, NIST_MAX_N + 1):
            totals[n] += max(len(hyp) - n + 1, 0)
        ref_words += sum(len(r) for r in refs)
        n_refs += sum(1 for r in refs if r)
    score = sum(matched_info[n] / max(totals[n], 1) for n in range(1, NIST_MAX_N + 1))
    avg_ref_len = ref_words / (n_refs / len(hyps_tok))
    return score * nist_length_penalty(totals[1] / avg_ref_len)
