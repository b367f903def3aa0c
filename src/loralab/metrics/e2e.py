"""E2E NLG Challenge metrics: BLEU, NIST, METEOR, ROUGE-L, CIDEr as the official scorer reports them.

One output per unique meaning representation (MR), scored against ALL references of that MR.
BLEU and NIST follow mteval-v13a (see ``e2e_mteval``), METEOR / ROUGE-L / CIDEr(-D) follow the
MS-COCO caption code (see ``e2e_coco``). Results are raw, as the official scorer prints them:
BLEU, METEOR and ROUGE_L are fractions in [0, 1] (the LoRA paper's tables show them x100).

File formats (the official scorer's):
    hypotheses: one output per line, in MR order (an empty line is an empty output);
    references: the references of one MR on consecutive lines, MR groups separated by one blank line
                (a file without blank lines holds one reference per MR), or an E2E CSV ``mr,ref``
                whose rows are grouped by MR in first-seen order.

CLI: ``loralab score-e2e HYP_FILE REF_FILE`` prints one JSON object (``main``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Sequence

from loralab.metrics.e2e_coco import coco_scores
from loralab.metrics.e2e_mteval import corpus_bleu, corpus_nist, mteval_tokenize

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
_LINE_BREAKS = ("\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def _check_inputs(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    if isinstance(hyps, str) or not all(isinstance(h, str) for h in hyps):
        raise TypeError("hyps must be a list of strings, one output per MR")
    if len(hyps) != len(refs):
        raise ValueError(
            f"{len(hyps)} outputs but {len(refs)} reference groups: give exactly one output per unique MR, "
            "in the same order as the reference groups"
        )
    if not hyps:
        raise ValueError("nothing to score: hyps is empty")
    clean_hyps = []
    for i, h in enumerate(hyps):
        if any(c in h for c in _LINE_BREAKS):
            raise ValueError(f"output {i} contains a line break; E2E outputs are one line each (join the lines)")
        clean_hyps.append(h.strip())
    clean_refs = []
    for i, group in enumerate(refs):
        if isinstance(group, str):
            raise TypeError(f"refs[{i}] is a string; each MR needs a list of reference strings")
        if not group:
            raise ValueError(f"MR {i} has no references")
        clean = []
        for j, r in enumerate(group):
            if any(c in r for c in _LINE_BREAKS):
                raise ValueError(f"reference {j} of MR {i} contains a line break; references are one line each")
            if not r.strip():
                raise ValueError(f"reference {j} of MR {i} is empty")
            clean.append(r.strip())
        clean_refs.append(clean)
    return clean_hyps, clean_refs


def score(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """Official E2E scores of ``hyps[i]`` (the output for MR i) against ``refs[i]`` (all its references).

    Returns {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} as raw numbers (BLEU as a fraction).
    Lines are stripped as the official file reader strips them.
    """
    hyps, refs = _check_inputs(hyps, refs)
    hyps_tok = [mteval_tokenize(h) for h in hyps]
    refs_tok = [[mteval_tokenize(r) for r in group] for group in refs]
    out = {"BLEU": corpus_bleu(hyps_tok, refs_tok), "NIST": corpus_nist(hyps_tok, refs_tok)}
    out.update(coco_scores(hyps, refs))
    return {k: out[k] for k in METRICS}


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return fh.read()


def read_hypotheses(path: str) -> list[str]:
    """One output per line (stripped); a final newline does not add an empty output."""
    lines = _read_text(path).split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()
    return [line.strip() for line in lines]


def read_references(path: str, n_outputs: int | None = None) -> list[list[str]]:
    """References grouped per MR: blank-line-separated groups, or an E2E CSV (``.csv``) file."""
    if path.lower().endswith(".csv"):
        return group_references(read_e2e_csv(path))[1]
    groups: list[list[str]] = []
    current: list[str] = []
    stray_blank: int | None = None  # a blank line that does not close a group
    for line_no, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.strip()
        if line:
            if stray_blank is not None:
                raise ValueError(
                    f"{path}, line {stray_blank}: empty reference group (a leading blank line or two blank "
                    "lines in a row); separate the groups of consecutive MRs by exactly one blank line"
                )
            current.append(line)
        elif current:
            groups.append(current)
            current = []
        elif stray_blank is None:
            stray_blank = line_no
    if current:
        groups.append(current)
    if not groups:
        raise ValueError(f"{path}: no references")
    if len(groups) == 1 and n_outputs != 1:
        # No blank line at all: the official scorer reads this as one reference per MR.
        groups = [[r] for r in groups[0]]
    return groups


def read_e2e_csv(path: str) -> list[tuple[str, str]]:
    """Rows (mr, ref) of an E2E CSV with header ``mr,ref`` (extra columns are ignored)."""
    try:
        return _read_e2e_rows(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 (byte {err.object[err.start:err.start + 1]!r} at offset {err.start}): "
                         "E2E CSVs are UTF-8; re-encode it (e.g. iconv -f latin1 -t utf-8)") from None
    except csv.Error as err:
        raise ValueError(f"{path}: not a readable CSV ({err}); is a quote left open?") from None


def _read_e2e_rows(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; expected an E2E CSV with header 'mr,ref'")
        cols = [h.strip().lower() for h in header]
        if "mr" not in cols or "ref" not in cols:
            raise ValueError(f"{path}: header {header!r} lacks the columns 'mr' and 'ref' of an E2E CSV")
        i_mr, i_ref = cols.index("mr"), cols.index("ref")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}, record {line_no}: {len(row)} fields, the header has {len(header)} "
                                 f"({','.join(header)}); is the line cut short or a quote left open?")
            mr, ref = row[i_mr].strip(), row[i_ref].strip()
            if not mr:
                raise ValueError(f"{path}, record {line_no}: empty MR")
            rows.append((mr, ref))
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows


def group_references(rows: Sequence[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Unique MRs in first-seen order and, for each, all its (non-empty) references in file order."""
    refs_by_mr: dict[str, list[str]] = {}
    for mr, ref in rows:
        group = refs_by_mr.setdefault(mr, [])
        if ref.strip():
            group.append(ref.strip())
    empty = [mr for mr, group in refs_by_mr.items() if not group]
    if empty:
        raise ValueError(f"{len(empty)} MR(s) have no non-empty reference, e.g. {empty[0]!r}")
    return list(refs_by_mr), list(refs_by_mr.values())


def score_files(hyp_file: str, ref_file: str) -> dict[str, float]:
    """Score an output file against a reference file in the official formats (see module docstring)."""
    hyps = read_hypotheses(hyp_file)
    refs = read_references(ref_file, n_outputs=len(hyps))
    if len(hyps) != len(refs):
        raise ValueError(
            f"{hyp_file} has {len(hyps)} outputs but {ref_file} has {len(refs)} reference groups; "
            "write one output per unique MR, and separate the reference groups by one blank line"
        )
    return score(hyps, refs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loralab score-e2e", description="E2E NLG scores (official scorer's BLEU, NIST, METEOR, ROUGE_L, CIDEr)"
    )
    parser.add_argument("hyp_file", help="one output per line, one line per unique MR")
    parser.add_argument("ref_file", help="references, one per line, MR groups separated by a blank line (or E2E CSV)")
    args = parser.parse_args(argv)
    try:
        scores = score_files(args.hyp_file, args.ref_file)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"score-e2e: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
