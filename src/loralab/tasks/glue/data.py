"""The eight GLUE tasks as data: files, columns, text fields, labels; readers for the release TSVs
and (for users online) the Hub's GLUE dataset.

Every example is a dict ``{<text field>: str, ..., "label": int | float}`` whose text-field names are
the release TSV's column names, whichever source it came from. Tokenization reads exactly
``task.text_fields`` (one field: a single sentence; two: a pair), so a field cannot be dropped quietly.

Release layout (``<data_dir>/<task.dir_name>/<file>``), tab-separated, quotes are literal characters:
  CoLA   train.tsv dev.tsv           NO header; columns: source, label, original_label, sentence
  SST-2  train.tsv dev.tsv           sentence, label (0/1)
  MRPC   train.tsv dev.tsv           Quality, #1 ID, #2 ID, #1 String, #2 String (files start with a BOM)
  QQP    train.tsv dev.tsv           id, qid1, qid2, question1, question2, is_duplicate
  STS-B  train.tsv dev.tsv           index, genre, ..., sentence1, sentence2, score (0-5, regression)
  MNLI   train.tsv dev_matched.tsv dev_mismatched.tsv   ..., sentence1, sentence2, ..., gold_label
  QNLI   train.tsv dev.tsv           index, question, sentence, label
  RTE    train.tsv dev.tsv           index, sentence1, sentence2, label
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.metrics.glue import normalize_task_name


@dataclass(frozen=True)
class GlueTask:
    key: str
    """Lower-case id used in configs: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte."""
    dir_name: str
    """Folder of the GLUE release (CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE)."""
    text_fields: tuple[str, ...]
    """Column(s) fed to the tokenizer, in order (first segment, second segment)."""
    label_field: str
    label_values: tuple[str, ...] | None
    """Raw label strings in class-id order; None for regression (STS-B)."""
    label_names: tuple[str, ...] | None
    """Human-readable class names in class-id order (same order as the Hub's ClassLabel)."""
    files: dict[str, str]
    """Split -> file name; "train" plus the evaluation splits."""
    eval_splits: tuple[str, ...]
    """Evaluation splits in reporting order; the first one selects checkpoints."""
    columns: tuple[str, ...] | None = None
    """Column names by position for files without a header row (CoLA); None: the file has a header."""
    hub_config: str = ""
    hub_fields: dict[str, str] = field(default_factory=dict)
    """Hub column -> our column (the Hub renames e.g. MRPC's '#1 String' to 'sentence1')."""
    hub_splits: dict[str, str] = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return self.label_values is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_values is None else len(self.label_values)

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2


_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(
        "cola", "CoLA", ("sentence",), "label", ("0", "1"), ("unacceptable", "acceptable"),
        {"train": "train.tsv", "dev": "dev.tsv"}, ("dev",),
        columns=("source", "label", "original_label", "sentence"),
        hub_config="cola", hub_fields={"sentence": "sentence"}),
    "sst2": GlueTask(
        "sst2", "SST-2", ("sentence",), "label", ("0", "1"), ("negative", "positive"),
        {"train": "train.tsv", "dev": "dev.tsv"}, ("dev",),
        hub_config="sst2", hub_fields={"sentence": "sentence"}),
    "mrpc": GlueTask(
        "mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("not_equivalent", "equivalent"),
        {"train": "train.tsv", "dev": "dev.tsv"}, ("dev",),
        hub_config="mrpc", hub_fields={"sentence1": "#1 String", "sentence2": "#2 String"}),
    "qqp": GlueTask(
        "qqp", "QQP", ("question1", "question2"), "is_duplicate", ("0", "1"), ("not_duplicate", "duplicate"),
        {"train": "train.tsv", "dev": "dev.tsv"}, ("dev",),
        hub_config="qqp", hub_fields={"question1": "question1", "question2": "question2"}),
    "stsb": GlueTask(
        "stsb", "STS-B", ("sentence1", "sentence2"), "score", None, None,
        {"train": "train.tsv", "dev": "dev.tsv"}, ("dev",),
        hub_config="stsb", hub_fields={"sentence1": "sentence1", "sentence2": "sentence2"}),
    "mnli": GlueTask(
        "mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
        ("entailment", "neutral", "contradiction"),
        {"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv"},
        ("dev_matched", "dev_mismatched"),
        hub_config="mnli", hub_fields={"premise": "sentence1", "hypothesis": "sentence2"},
        hub_splits={"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}),
    "qnli": GlueTask(
        "qnli", "QNLI", ("question", "sentence"), "label", _NLI2, _NLI2,
        {"train": "train.tsv", "dev": "dev.tsv"}, ("dev",),
        hub_config="qnli", hub_fields={"question": "question", "sentence": "sentence"}),
    "rte": GlueTask(
        "rte", "RTE", ("sentence1", "sentence2"), "label", _NLI2, _NLI2,
        {"train": "train.tsv", "dev": "dev.tsv"}, ("dev",),
        hub_config="rte", hub_fields={"sentence1": "sentence1", "sentence2": "sentence2"}),
}


def get_task(name: str) -> GlueTask:
    return TASKS[normalize_task_name(name)]


class GlueDataError(ValueError):
    """A GLUE file is missing or does not look like the release layout."""


def read_tsv(path: str | Path, columns: tuple[str, ...] | None = None,
             skip_malformed: bool = False) -> list[dict[str, str]]:
    """Rows of a tab-separated file as dicts. Quoting is disabled (GLUE text holds unbalanced quotes
    that a quote-aware reader would swallow across lines); a UTF-8 BOM before the first field is
    dropped. ``columns`` names the fields of a header-less file. A row with fewer fields than the
    header is an error naming file and line (or skipped, counted on stderr, with ``skip_malformed``)."""
    path = Path(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return _read_rows(path, csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), columns,
                              skip_malformed)
    except UnicodeDecodeError as err:
        raise GlueDataError(f"{path} is not UTF-8 (byte {err.object[err.start:err.start + 1]!r} at offset "
                            f"{err.start}): GLUE files are UTF-8; re-encode it (e.g. iconv -f latin1 -t utf-8)") from None


def _read_rows(path: Path, reader: Any, columns: tuple[str, ...] | None, skip_malformed: bool) -> list[dict[str, str]]:
    header = list(columns) if columns is not None else next(reader, None)
    if not header:
        raise GlueDataError(f"{path} is empty: expected a tab-separated header row")
    header = [h.strip() for h in header]
    rows, skipped = [], []
    for values in reader:
        if not values or values == [""]:
            continue
        if len(values) < len(header):
            if skip_malformed:
                skipped.append(reader.line_num)
                continue
            raise GlueDataError(
                f"{path}, line {reader.line_num}: {len(values)} tab-separated fields, the header has "
                f"{len(header)} ({header}). Is this the GLUE release file? To drop such rows set "
                "read_tsv(..., skip_malformed=True).")
        rows.append(dict(zip(header, values)))
    if skipped:
        print(f"[glue] {path}: skipped {len(skipped)} malformed rows (lines {skipped[:10]}...)", file=sys.stderr)
    return rows


def parse_rows(task: GlueTask, rows: list[dict[str, str]], source: str) -> list[dict[str, Any]]:
    """Release rows -> examples {text fields..., "label"}; no rows, unknown labels and missing columns are
    errors."""
    if not rows:
        raise GlueDataError(f"{source}: no data rows (a header at most); a GLUE {task.dir_name} file needs examples")
    missing = [c for c in (*task.text_fields, task.label_field) if c not in rows[0]]
    if missing:
        raise GlueDataError(f"{source}: columns {missing} missing; found {list(rows[0])}. "
                            f"{task.dir_name} files need columns {[*task.text_fields, task.label_field]}.")
    label_ids = {v: i for i, v in enumerate(task.label_values or ())}
    examples = []
    for n, row in enumerate(rows):
        raw = row[task.label_field].strip()
        if task.is_regression:
            try:
                label: int | float = float(raw)
            except ValueError:
                raise GlueDataError(f"{source}, row {n}: {task.label_field}={raw!r} is not a number") from None
        elif raw in label_ids:
            label = label_ids[raw]
        else:
            raise GlueDataError(f"{source}, row {n}: label {raw!r} not in {list(label_ids)} (the {task.dir_name} "
                                "labels); fix or drop that row")
        examples.append({**{f: row[f] for f in task.text_fields}, "label": label})
    return examples


def task_files(task: GlueTask, data_dir: str | Path, splits: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """Absolute paths of the requested splits; an error naming every missing file if any is absent."""
    root = Path(data_dir).expanduser().resolve()
    unknown = [s for s in splits if s not in task.files]
    if unknown:
        raise GlueDataError(f"{task.dir_name} has no split(s) {unknown}; it has {list(task.files)}")
    paths = {s: root / task.dir_name / task.files[s] for s in splits}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise GlueDataError(
            f"GLUE task {task.dir_name}: expected file(s) not found: {', '.join(missing)}. "
            f"Set data.data_dir to a folder with the GLUE release layout <dir>/{task.dir_name}/"
            f"{{{','.join(task.files[s] for s in splits)}}}, or data.data_dir=hub (the Hub's GLUE: needs `datasets` "
            "and internet).")
    return paths


def load_split_tsv(task: GlueTask, data_dir: str | Path, split: str, skip_malformed: bool = False) -> list[dict]:
    path = task_files(task, data_dir, [split])[split]
    return parse_rows(task, read_tsv(path, task.columns, skip_malformed), str(path))


def load_split_hub(task: GlueTask, split: str, cache_dir: str | None = None) -> list[dict]:
    """The same examples from the Hub's ``nyu-mll/glue`` dataset (needs `datasets` and internet)."""
    try:
        import datasets  # noqa: PLC0415 — optional, only for users online
    except ImportError:
        raise ImportError(
            "data.data_dir=hub needs the `datasets` package (pip install datasets) and internet access; "
            f"offline, set data.data_dir to a folder holding {task.dir_name}/{task.files.get(split, '?')}"
        ) from None
    hub_split = task.hub_splits.get(split, "validation" if split == "dev" else split)
    ds = datasets.load_dataset("nyu-mll/glue", task.hub_config, split=hub_split, cache_dir=cache_dir)
    out = []
    for row in ds:
        label = float(row["label"]) if task.is_regression else int(row["label"])
        if not task.is_regression and not 0 <= label < task.num_labels:
            raise GlueDataError(f"hub {task.hub_config}/{hub_split}: label {label} outside 0..{task.num_labels - 1} "
                                "(test splits carry no labels)")
        out.append({**{ours: row[theirs] for theirs, ours in task.hub_fields.items()}, "label": label})
    return out


def load_split(task: GlueTask, split: str, source: str = "tsv", data_dir: str | Path | None = None,
               skip_malformed: bool = False) -> list[dict]:
    if source == "tsv":
        if data_dir is None:
            raise GlueDataError("reading GLUE TSVs needs data.data_dir (the folder holding CoLA/, SST-2/, ...)")
        return load_split_tsv(task, data_dir, split, skip_malformed)
    if source == "hub":
        return load_split_hub(task, split)
    raise GlueDataError(f"GLUE source must be 'tsv' or 'hub', got {source!r}")
