"""METEOR 1.5, ROUGE-L and CIDEr-D as the official E2E scorer computes them (MS-COCO caption code).

The official scorer feeds its data to its bundled fork of ``pycocoevalcap``; the fork's scorers are
the same code as the ``pycocoevalcap`` package installed here (only Python-2 compatibility shims
differ), so we call that package's ``Meteor``, ``Rouge`` and ``Cider`` classes directly, on text
tokenised by its bundled Stanford PTB tokenizer jar with the same flags. We do not use its
``COCOEvalCap`` class, which would also run SPICE (a model download).

Pipeline, as in the official scorer:
    every hypothesis and reference -> PTBTokenizer ``-preserveLines -lowerCase`` (one sentence per
    line) -> drop the punctuation tokens pycocoevalcap drops ('' ' `` ` -LRB- -RRB- -LCB- -RCB- .
    ? ! , : - -- ... ;) -> join with single spaces.
    METEOR 1.5 (``-l en -norm``): corpus score from the summed sufficient statistics.
    ROUGE-L: per MR, F_beta of max precision and max recall over the references,
             F = (1 + b^2) P R / (R + b^2 P), b = 1.2; the corpus score is the mean over MRs.
    CIDEr (pycocoevalcap's ``Cider`` is CIDEr-D): 1-4-gram tf-idf with document frequencies over
             the reference groups of the corpus, clipped hypothesis counts, Gaussian length penalty
             (sigma 6), times 10, averaged over n and MRs.

Java 17 runs the jars. The tokenizer runs on a file in our own temporary directory (pycocoevalcap's
wrapper writes into its package directory).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

# Characters the Java tokenizer treats as line breaks: the official wrapper only replaces "\n", so
# these would shift every later sentence by a line. We turn them into spaces (they are whitespace).
_JAVA_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x85\u2028\u2029"})


def _require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError(
            "METEOR, ROUGE-L and CIDEr need a Java runtime (the official scorer's jars): install Java "
            "(e.g. apt-get install openjdk-17-jre-headless) and make `java` available on PATH"
        )
    return java


def _tokenizer_module():
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise RuntimeError("E2E metrics need pycocoevalcap: pip install 'loralab[tasks]'") from err
    return ptbtokenizer


def ptb_tokenize(sentences: list[str]) -> list[str]:
    """PTB-tokenise, lowercase and strip punctuation, exactly as pycocoevalcap's PTBTokenizer does."""
    ptb = _tokenizer_module()
    java = _require_java()
    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)), ptb.STANFORD_CORENLP_3_4_1_JAR)
    text = "\n".join(s.translate(_JAVA_LINE_BREAKS) for s in sentences)
    with tempfile.TemporaryDirectory(prefix="loralab-ptb-") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        with open(path, "wb") as fh:
            fh.write(text.encode("utf-8"))
        proc = subprocess.run(
            [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    # The tokenizer may drop trailing empty lines: pad only those, any other mismatch is an error.
    trailing_empty = len(sentences) - len(text.rstrip().split("\n")) if text.strip() else len(sentences)
    extra = lines[len(sentences):]
    if len(lines) < len(sentences) - trailing_empty or any(line.strip() for line in extra):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences; "
                           "the sentence alignment would be lost")
    lines += [""] * (len(sentences) - len(lines))
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in lines[: len(sentences)]]


COCO_METRICS = ("METEOR", "ROUGE_L", "CIDEr")


def coco_scores(hyps: list[str], refs: list[list[str]], metrics: tuple[str, ...] = COCO_METRICS) -> dict[str, float]:
    """METEOR, ROUGE_L and CIDEr (or the subset ``metrics``) of one hypothesis per MR against its references."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    unknown = set(metrics) - set(COCO_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {COCO_METRICS}")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference groups")
    # Two tokenizer runs, references then outputs, as the official scorer does (PTB's quote state
    # can carry across lines, so one shared run is not guaranteed to be identical).
    ref_tokens = ptb_tokenize([r for group in refs for r in group])
    hyp_tokens = ptb_tokenize(list(hyps))
    ids = [f"inst-{i}" for i in range(len(hyps))]  # the official scorer's image ids, in order
    res = {k: [hyp_tokens[i]] for i, k in enumerate(ids)}
    gts: dict[str, list[str]] = {}
    pos = 0
    for k, group in zip(ids, refs):
        gts[k] = ref_tokens[pos : pos + len(group)]
        pos += len(group)

    out: dict[str, float] = {}
    if "METEOR" in metrics:
        meteor = Meteor()
        try:
            out["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:  # do not leave a 2 GB JVM behind until garbage collection
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
            meteor.meteor_p.stdout.close()
            meteor.meteor_p.stderr.close()
    if "ROUGE_L" in metrics:
        out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out
