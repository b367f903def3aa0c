"""E2E NLG data for a causal LM: CSV rows -> prompt/completion token ids with a completion-only loss.

One training example per (MR, reference) row:

    input_ids = tok(MR + SEPARATOR) ++ tok(" " + reference) ++ [EOS]
    labels    = [-100] * len(prompt)  ++ tok(" " + reference) ++ [EOS]

so the loss covers the completion (reference and EOS) only; padding is -100 too. Prompt and
completion are tokenised separately, so the prompt the model sees at generation is token for token
the one it was trained on. No special tokens are added (no BOS), identically at train and test time.

Evaluation groups the references of each unique MR, MRs in first-seen order, and decodes one output
per MR (``loralab.metrics.e2e.group_references``).

The loss is :mod:`loralab.tasks.common.causal_lm`'s label-smoothed, token-weighted mean over the
completion tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from loralab.metrics.e2e import group_references, read_e2e_csv
from loralab.tasks.common.batches import IGNORE
SEPARATOR = " ||"
"""Written after the MR: ``name[The Eagle], food[French] ||`` then the completion `` The Eagle ...``."""
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[4].parent / "shared" / "data" / "e2e"
"""``../shared/data/e2e`` next to the repository."""
TRAIN_FILE = "devset.csv"  # the official trainset.csv (42k rows) is not shipped here: --train-file
EVAL_FILE = "testset_w_refs.csv"


class E2EDataError(ValueError):
    """Missing or malformed E2E data; the message names the file and the fix."""


def data_files(cfg: Any) -> tuple[Path, Path]:
    """(train CSV, eval CSV) from ``data.train_file`` / ``data.eval_file`` / ``data.data_dir``."""
    data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else DEFAULT_DATA_DIR
    train = Path(cfg.data.train_file) if cfg.data.train_file else data_dir / TRAIN_FILE
    evaluation = Path(cfg.data.eval_file) if cfg.data.eval_file else data_dir / EVAL_FILE
    missing = [str(p.resolve()) for p in (train, evaluation) if not p.is_file()]
    if missing:
        raise E2EDataError(f"E2E file(s) not found: {missing}; set data.data_dir (a dir with {TRAIN_FILE} and "
                           f"{EVAL_FILE}) or data.train_file / data.eval_file")
    return train, evaluation


def load_rows(path: str | Path) -> list[tuple[str, str]]:
    """(mr, ref) rows of an E2E CSV; rows without a reference cannot train and are an error."""
    try:
        rows = read_e2e_csv(str(path))
    except ValueError as err:
        raise E2EDataError(str(err)) from None
    empty = [i + 2 for i, (_, ref) in enumerate(rows) if not ref]
    if empty:
        raise E2EDataError(f"{path}: rows {empty[:5]} have an empty 'ref'; every training row needs a reference")
    return rows


def eval_groups(rows: Sequence[tuple[str, str]], max_mrs: int = 0) -> tuple[list[str], list[list[str]]]:
    """Unique MRs (first-seen order) and all references of each; the first ``max_mrs`` MRs if > 0."""
    mrs, refs = group_references(rows)
    if max_mrs > 0:
        mrs, refs = mrs[:max_mrs], refs[:max_mrs]
    return mrs, refs


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token: E2E completions end with EOS so that "
                         "generation can stop; set tokenizer.eos_token")
    return int(tokenizer.eos_token_id)


def prompt_ids(tokenizer: Any, mr: str) -> list[int]:
    return _ids(tokenizer, mr + SEPARATOR)


def encode_example(tokenizer: Any, mr: str, ref: str, max_length: int) -> dict[str, list[int]]:
    """Prompt + completion + EOS; labels -100 on the prompt. Truncation cuts the completion's end."""
    prompt = prompt_ids(tokenizer, mr)
    completion = _ids(tokenizer, " " + ref) + [eos_id(tokenizer)]
    if len(prompt) >= max_length:
        raise E2EDataError(f"the prompt of MR {mr[:60]!r}... is {len(prompt)} tokens, not below data.max_length="
                           f"{max_length}; raise data.max_length")
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE] * len(prompt) + completion)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_rows(tokenizer: Any, rows: Sequence[tuple[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    return [encode_example(tokenizer, mr, ref, max_length) for mr, ref in rows]
