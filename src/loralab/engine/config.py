"""Typed run configuration: dataclasses whose attribute docstrings are the documentation.

A run is resolved in layers, each later one winning:
``defaults (or base) -> preset -> YAML file -> dotted overrides`` (``train.lr=4e-4``).
Every value is coerced to its annotated type as it arrives (``eps: 1e-8`` is a *string* to PyYAML;
here it becomes the float 1e-08), every key is checked (``train.lrr`` fails with "did you mean
'train.lr'?"), and ranges are validated when a section is built. The help text of the CLI is
generated from the docstrings below, so a field without a docstring is a bug (a test checks).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import importlib
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from loralab.core.config import LoraConfig


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type, value out of range. The CLI exits 2 on it."""


# ---------------------------------------------------------------- type coercion

_NONE_WORDS = ("None", "none", "null", "~")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _finite_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _is_nonfinite(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _has_type(value: Any, tp: Any) -> bool:
    base = typing.get_origin(tp) or tp
    if base is Literal:
        return value in typing.get_args(tp)
    return isinstance(base, type) and isinstance(value, base) and not (isinstance(value, bool) and base is not bool)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``, the value and the type.

    Strings from YAML or the command line are parsed where the type asks for it ("1e-8" -> float,
    "3" -> int, "true" -> bool); a comma-separated string fills a pure list field ("a,b").
    Lossy conversions are refused: 1.5 is not an int, 1 is not a bool.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{extra}")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or value in _NONE_WORDS):
            return None
        members = [a for a in args if a is not type(None)]
        # A value that already has one of the member types keeps it ("q_proj" stays a str for list | str).
        members.sort(key=lambda a: not _has_type(value, a))
        for member in members:
            try:
                return coerce(value, member, key)
            except ConfigError:
                continue
        raise fail()
    if value is None:
        raise fail()
    if origin is Literal:
        if value in args:
            return value
        by_lower = {str(a).lower(): a for a in args}
        close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)
        raise fail(f"; did you mean {by_lower[close[0]]!r}?" if close else "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise fail()
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        number = _finite_float(value)
        if number is not None and number == int(number):
            return int(number)  # 1e3 (a string to PyYAML) or 16.0
        raise fail()
    if tp is float:
        number = _finite_float(value)
        if number is None:
            raise fail(" (not finite)" if _is_nonfinite(value) else "")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if origin is list:
        (item_tp,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = args
        if not isinstance(value, dict):
            raise fail()
        return {coerce(k, key_tp, key): coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in this module, not user input


# ---------------------------------------------------------------- field docs and sections


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` parsed from the string literal right under each annotated attribute."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Section:
    """Shared behaviour of config sections: coerce every field on construction, then check ranges."""

    KEY: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = field_types(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], self._key(f.name)))
        errors = [f"{self._key(name)}: {msg}" for name, msg in self.check()]
        if errors:
            raise ConfigError("\n".join(errors))

    def _key(self, name: str) -> str:
        return f"{self.KEY}.{name}" if self.KEY else name

    def check(self) -> list[tuple[str, str]]:
        """Range checks: (field, message) for each violation."""
        return []


def _require(errors: list, ok: bool, name: str, msg: str) -> None:
    if not ok:
        errors.append((name, msg))


@dataclass
class ModelConfig(_Section):
    """The base model and how it is loaded."""

    KEY: ClassVar[str] = "model"
    name: str = "minilm-l6"
    """Zoo name ("minilm-l6", "smollm2-135m"), a local Hugging Face model dir, or a hub id already cached."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the (non-quantized) base weights."""
    quantize: Literal["none", "nf4", "fp4", "int4"] = "none"
    """4-bit quantization of the frozen base linear layers (QLoRA uses "nf4")."""
    double_quant: bool = True
    """Quantize the per-block absmax constants too (QLoRA's double quantization); 4-bit only."""
    quant_block_size: int = 64
    """Weights per quantization block (one absmax constant per block)."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype 4-bit weights are dequantized to for the matmul."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run. Off: loading code from a model dir is code execution."""
    num_labels: int | None = None
    """Classifier outputs for sequence classification (None: the task decides, e.g. 1 for STS-B)."""

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        _require(e, self.quant_block_size >= 1, "quant_block_size", f"must be >= 1, got {self.quant_block_size}")
        _require(e, self.num_labels is None or self.num_labels >= 1, "num_labels",
                 f"must be >= 1 or None, got {self.num_labels}")
        _require(e, bool(self.name), "name", "must name a model")
        return e


@dataclass
class LoraSection(_Section):
    """What is trained: LoRA adapters (the paper), full fine-tuning or BitFit (baselines)."""

    KEY: ClassVar[str] = "lora"
    method: Literal["lora", "full", "bitfit"] = "lora"
    """lora: low-rank adapters on a frozen base; full: every weight trains; bitfit: only biases train."""
    r: int = 8
    """Rank of each update B A (>= 1)."""
    alpha: float = 8.0
    """Scaling numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input, 0 <= p < 1."""
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    """Module-name suffixes to adapt (["q_proj", "v_proj"]), one regex over full names, or "all-linear"."""
    exclude_modules: list[str] | str | None = None
    """Suffixes or a regex of modules never adapted (e.g. ["lm_head"])."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Biases that train as well: none, all, or lora_only (those of adapted layers)."""
    init: Literal["kaiming", "gaussian"] = "kaiming"
    """Init of A (B starts at zero, so training starts at the base model): kaiming-uniform or N(0, 1/r)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    modules_to_save: list[str] | None = None
    """Modules trained fully and saved with the adapter, e.g. ["classifier"] (None: the task decides)."""
    fused_qkv: dict[str, list[bool]] = field(default_factory=dict)
    """Per-slice adaptation of fused projections: {"c_attn": [true, false, true]} adapts q and v only."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overriding r: {name suffix or regex: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overriding alpha: {name suffix or regex: alpha}."""
    init_from: str | None = None
    """Adapter dir (PEFT format) to warm start from instead of the fresh init."""

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        _require(e, self.r >= 1, "r", f"must be >= 1, got {self.r}")
        _require(e, self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _require(e, 0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(e, self.target_modules != [], "target_modules", "is empty: nothing would be adapted")
        if isinstance(self.target_modules, str) and "," in self.target_modules and "{" not in self.target_modules:
            parts = ",".join(p.strip() for p in self.target_modules.split(","))
            e.append(("target_modules", f"{self.target_modules!r} is one regex, not a list; "
                      f"write a list: lora.target_modules=[{parts}]"))
        for name, r in self.rank_pattern.items():
            _require(e, r >= 1, f"rank_pattern.{name}", f"must be >= 1, got {r}")
        for name, alpha in self.alpha_pattern.items():
            _require(e, alpha > 0, f"alpha_pattern.{name}", f"must be > 0, got {alpha}")
        for name, enable in self.fused_qkv.items():
            _require(e, any(enable), f"fused_qkv.{name}", f"must enable at least one slice, got {enable}")
        return e

    def to_lora_config(self, **extra: Any) -> LoraConfig:
        """The core ``LoraConfig`` for this section; ``extra`` sets task_type / base_model_name_or_path."""
        if self.method != "lora":
            raise ConfigError(f"lora.method is {self.method!r}: there is no LoRA adapter to configure")
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules,
            exclude_modules=self.exclude_modules, bias=self.bias,
            init_lora_weights=True if self.init == "kaiming" else "gaussian",
            use_rslora=self.use_rslora, rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
            modules_to_save=list(self.modules_to_save) if self.modules_to_save is not None else None,
            fused_qkv={k: list(v) for k, v in self.fused_qkv.items()}, **extra,
        )


@dataclass
class TrainConfig(_Section):
    """Optimisation and the training loop."""

    KEY: ClassVar[str] = "train"
    lr: float = 5e-4
    """Peak learning rate (> 0)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay (>= 0)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas [beta1, beta2], each in [0, 1)."""
    eps: float = 1e-8
    """Adam epsilon (> 0)."""
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = "adamw"
    """adamw; adamw8bit (block-wise 8-bit states); paged_* (states that can spill off the device)."""
    epochs: float = 1.0
    """Passes over the training set (> 0; fractions allowed). Ignored when max_steps > 0."""
    max_steps: int = 0
    """Optimizer steps to run (0: derive from epochs)."""
    batch_size: int = 16
    """Examples per micro-batch (>= 1); the effective batch is batch_size * grad_accum."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (>= 1)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps with linear warmup from 0, in [0, 1)."""
    warmup_steps: int = 0
    """Warmup steps; wins over warmup_ratio when > 0."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup: linear to 0, cosine to 0, or constant."""
    max_grad_norm: float = 0.0
    """Clip the global gradient norm to this (0: no clipping)."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy, in [0, 1)."""
    bf16: bool = False
    """bfloat16 autocast where the hardware supports it (master weights stay float32)."""
    seed: int = 0
    """Seed of init, dropout and data order."""
    eval_every: int = 0
    """Evaluate every this many optimizer steps (0: at the end of each epoch only)."""
    save_every: int = 0
    """Checkpoint every this many optimizer steps (0: at the end of each epoch only)."""
    keep_best: bool = True
    """Keep the checkpoint with the best selection metric and report it (else the last)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement (0: never stop early)."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a non-finite loss or gradient: stop the run with an error, or skip that step (counted, logged)."""
    length_grouped: bool = False
    """Batch examples of similar length together (less padding; the order stays seeded)."""
    log_every: int = 10
    """Log train loss, lr and tokens/s every this many optimizer steps (>= 1)."""
    quiet: bool = False
    """No progress bar or console logs (metrics are still written to metrics.jsonl)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to the run dir."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the main process)."""

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        _require(e, self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(e, self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(e, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                 f"must be two numbers in [0, 1), got {self.betas}")
        _require(e, self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _require(e, self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "early_stopping_patience",
                     "num_workers"):
            _require(e, getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "log_every"):
            _require(e, getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(e, 0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _require(e, not (self.max_steps > 0 and self.warmup_steps > self.max_steps), "warmup_steps",
                 f"{self.warmup_steps} exceeds train.max_steps={self.max_steps}: the lr would never reach its peak")
        _require(e, self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0 (0: off), got {self.max_grad_norm}")
        _require(e, 0 <= self.label_smoothing < 1, "label_smoothing",
                 f"must be in [0, 1), got {self.label_smoothing}")
        return e


@dataclass
class DataConfig(_Section):
    """Which data, how much of it, and how it becomes tokens."""

    KEY: ClassVar[str] = "data"
    task: str = "sst2"
    """Task within the experiment: a GLUE task (sst2, mrpc, stsb, rte, qnli), "e2e", or an instruct set."""
    data_dir: str | None = None
    """Directory with the data files (None: the experiment's default, ../shared/data/<experiment>)."""
    train_file: str | None = None
    """Training file overriding the default one in data_dir."""
    eval_file: str | None = None
    """Evaluation file overriding the default one in data_dir."""
    max_length: int = 128
    """Truncate tokenized examples to this many tokens (>= 1)."""
    train_samples: int = 0
    """Use only the first N training examples after a seeded shuffle (0: all)."""
    eval_samples: int = 0
    """Use only the first N evaluation examples (0: all)."""
    system_prompt: str | None = None
    """System prompt for chat-formatted examples (None: none)."""
    packing: bool = False
    """Concatenate short examples into full max_length rows (attention kept within each example)."""
    loss_on: Literal["assistant", "all"] = "assistant"
    """Tokens that carry the loss: the assistant response only, or every token."""
    seed: int = 0
    """Seed of the subsampling shuffle (separate from train.seed)."""

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        _require(e, self.max_length >= 1, "max_length", f"must be >= 1, got {self.max_length}")
        for name in ("train_samples", "eval_samples"):
            _require(e, getattr(self, name) >= 0, name, f"must be >= 0 (0: all), got {getattr(self, name)}")
        _require(e, bool(self.task), "task", "must name a task")
        return e


@dataclass
class GenerateConfig(_Section):
    """Decoding for generation tasks (E2E, instruction following)."""

    KEY: ClassVar[str] = "generate"
    num_beams: int = 10
    """Beam width (1: greedy or sampling)."""
    length_penalty: float = 0.9
    """Beam score = log-prob / length ** length_penalty."""
    no_repeat_ngram_size: int = 4
    """Forbid repeating any n-gram of this size (0: off)."""
    max_new_tokens: int = 64
    """Maximum generated tokens per example (>= 1)."""
    batch_size: int = 8
    """Prompts decoded together (>= 1)."""
    do_sample: bool = False
    """Sample instead of searching (num_beams must then be 1)."""
    temperature: float = 1.0
    """Sampling temperature (> 0); used only with do_sample."""

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            _require(e, getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(e, self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
                 f"must be >= 0 (0: off), got {self.no_repeat_ngram_size}")
        _require(e, self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _require(e, not (self.do_sample and self.num_beams > 1), "do_sample",
                 f"sampling with num_beams={self.num_beams} is not supported; set generate.num_beams=1")
        return e


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraSection, "train": TrainConfig,
                             "data": DataConfig, "generate": GenerateConfig}


@dataclass
class RunConfig(_Section):
    """One run: the experiment, its name and output root, and one section per concern."""

    experiment: Literal["glue", "e2e", "instruct"] = "glue"
    """Experiment module in loralab.tasks that builds the model and data and reports the results."""
    name: str | None = None
    """Run name used in the run dir (None: <experiment>-<data.task>)."""
    out_dir: str = "runs"
    """Root of run dirs and of the runs.sqlite registry."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    lora: LoraSection = field(default_factory=LoraSection)
    """What trains."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Decoding."""

    def __post_init__(self) -> None:
        errors = []  # every section's problems at once, not just the first section's
        hints = field_types(RunConfig)
        for key in ("experiment", "name", "out_dir"):
            try:
                setattr(self, key, coerce(getattr(self, key), hints[key], key))
            except ConfigError as err:
                errors.append(str(err))
        for key, cls in SECTIONS.items():
            value = getattr(self, key)
            try:
                if isinstance(value, dict):
                    setattr(self, key, _from_dict(cls, value, key))
                elif not isinstance(value, cls):
                    raise ConfigError(f"{key}: expected a {cls.__name__} or a mapping, got {value!r}")
            except ConfigError as err:
                errors.append(str(err))
        if errors:
            raise ConfigError("\n".join(errors))
        errors = [f"{k}: {m}" for k, m in self.check()]
        if errors:
            raise ConfigError("\n".join(errors))

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        if self.model.quantize != "none" and self.lora.method != "lora":
            e.append(("lora.method", f"{self.lora.method!r} cannot train a {self.model.quantize}-quantized base "
                      "(4-bit weights are frozen); use lora.method=lora or model.quantize=none"))
        return e

    @property
    def run_name(self) -> str:
        return self.name or f"{self.experiment}-{self.data.task}"


# ---------------------------------------------------------------- building and overriding


def _closest(key: str, valid: list[str]) -> str | None:
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [v for v in valid if v.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown(key: str) -> ConfigError:
    guess = _closest(key, all_keys() + list(SECTIONS))
    hint = f"; did you mean {guess!r}?" if guess else "; valid keys: see `loralab config --schema`"
    return ConfigError(f"unknown key {key!r}{hint}")


def all_keys() -> list[str]:
    """Every dotted key a config accepts: experiment, name, out_dir, model.name, ..., generate.temperature."""
    keys = [f.name for f in fields(RunConfig) if f.name not in SECTIONS]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in fields(cls)]
    return keys


def _from_dict(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of {cls.__name__} fields, got {data!r}")
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown(f"{prefix}.{key}")
    return cls(**data)


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (YAML-ready) of a config; ``load_config`` of it gives the config back."""
    return dataclasses.asdict(cfg)


def _set(tree: dict, key: str, value: Any, source: str) -> None:
    """Set dotted ``key`` in the nested ``tree``, checking the key and coercing ``value`` to its type."""
    parts = key.split(".")
    if parts[0] in SECTIONS and len(parts) >= 2:
        cls, name, rest = SECTIONS[parts[0]], parts[1], parts[2:]
        hints = field_types(cls)
        if name not in hints or name == "KEY":
            raise _unknown(key)
        if rest:  # e.g. lora.rank_pattern.encoder.layer.0.query=4: a key inside a dict field
            if typing.get_origin(hints[name]) is not dict:
                raise _unknown(key)
            item_tp = typing.get_args(hints[name])[1]
            tree[parts[0]][name] = dict(tree[parts[0]][name])
            tree[parts[0]][name][".".join(rest)] = coerce(value, item_tp, f"{key} (from {source})")
            return
        tree[parts[0]][name] = coerce(value, hints[name], f"{parts[0]}.{name} (from {source})")
        return
    hints = field_types(RunConfig)
    if len(parts) != 1 or key not in {f.name for f in fields(RunConfig)}:
        raise _unknown(key)
    if key in SECTIONS:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} (from {source}): expected a mapping of fields, got {value!r}")
        for sub, sub_value in value.items():
            _set(tree, f"{key}.{sub}", sub_value, source)
        return
    tree[key] = coerce(value, hints[key], f"{key} (from {source})")


def _apply(tree: dict, layer: dict, source: str) -> None:
    """Apply a nested or dotted mapping (``{"train": {"lr": 1e-4}}`` or ``{"train.lr": 1e-4}``)."""
    if not isinstance(layer, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(layer).__name__}")
    for key, value in layer.items():
        try:
            _set(tree, str(key), value, source)
        except ConfigError as err:
            if str(err).startswith("unknown key"):  # say where the key was written
                raise ConfigError(f"{source}: {err}") from None
            raise


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=4e-4"`` -> ("train.lr", "4e-4" parsed by YAML). Values are typed later by the field.

    Text fields (``str`` / ``str | None``) take the text as typed (``data.system_prompt=You are: terse``),
    except that ``null``, ``~`` and an empty value mean None where None is allowed.
    """
    key, sep, raw = item.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=4e-4)")
    if _is_text_field(key):
        return key, None if raw.strip() in ("", "null", "~") else raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({err.__class__.__name__})") from None
    return key, value


def _is_text_field(key: str) -> bool:
    parts = key.split(".")
    cls = SECTIONS.get(parts[0]) if len(parts) == 2 else RunConfig if len(parts) == 1 else None
    tp = field_types(cls).get(parts[-1]) if cls is not None else None
    return tp is str or (tp is not None and set(typing.get_args(tp)) == {str, type(None)})


# ---------------------------------------------------------------- presets

PRESETS: dict[str, dict] = {}
"""Named override sets: ``loralab train --preset NAME``. Experiments register theirs on import."""

PRESET_MODULES: list[str] = ["loralab.tasks.glue", "loralab.tasks.e2e", "loralab.tasks.instruct"]
"""Modules imported (lazily, only when a preset is not yet known) so that they can register presets."""


def register_preset(name: str, overrides: dict) -> None:
    """Register ``name`` -> overrides (nested or dotted keys). Keys and types are checked now."""
    _apply(config_to_dict(RunConfig()), overrides, f"preset {name!r}")
    PRESETS[name] = copy.deepcopy(overrides)


_preset_modules_loaded = False


def _load_preset_modules() -> None:
    """Import the experiments once (lazily), so their presets, which may replace built-ins, are known."""
    global _preset_modules_loaded
    if _preset_modules_loaded:
        return
    for module in PRESET_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # the module exists but something it needs is missing: say so
                raise
    _preset_modules_loaded = True


def get_preset(name: str) -> dict:
    """The overrides registered under ``name`` (unknown names fail with the closest known one)."""
    _load_preset_modules()
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known presets: {', '.join(sorted(PRESETS)) or 'none'}"
        raise ConfigError(f"unknown preset {name!r}{hint}")
    return PRESETS[name]


def list_presets() -> dict[str, dict]:
    _load_preset_modules()
    return dict(PRESETS)


register_preset("quickstart", {
    "experiment": "glue", "name": "quickstart-sst2", "model.name": "minilm-l6", "data.task": "sst2",
    "data.train_samples": 512, "data.eval_samples": 256, "data.max_length": 64, "lora.r": 8, "lora.alpha": 16.0,
    "lora.target_modules": ["query", "value"], "lora.modules_to_save": ["classifier"], "train.lr": 5e-4,
    "train.max_steps": 60, "train.batch_size": 16, "train.warmup_ratio": 0.06, "train.eval_every": 30,
})


# ---------------------------------------------------------------- loading and saving


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[arg-type]
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1} and "
                                  f"line {seen[key] + 1}); the second would silently replace the first")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)



def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: RunConfig | None = None, preset: str | None = None) -> RunConfig:
    """Resolve a run config: ``base`` (default: the defaults) -> preset -> YAML file -> overrides.

    The preset comes from ``preset=``, an override ``preset=NAME``, or a top-level ``preset:`` key of
    the YAML file (two different presets are an error). YAML files may be partial.
    """
    overrides = list(overrides or [])
    parsed = [parse_override(item) for item in overrides]
    presets = {preset} - {None}
    presets |= {str(v) for k, v in parsed if k == "preset"}
    file_layer: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            file_layer = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(file_layer, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(file_layer).__name__}")
        file_layer = dict(file_layer)
        if "preset" in file_layer:
            presets.add(str(file_layer.pop("preset")))
    if len(presets) > 1:
        raise ConfigError(f"several presets given ({', '.join(sorted(presets))}); choose one")
    tree = config_to_dict(base if base is not None else RunConfig())
    for name in presets:
        _apply(tree, get_preset(name), f"preset {name!r}")
    if path is not None:
        _apply(tree, file_layer, str(path))
    for item, (key, value) in zip(overrides, parsed):
        if key != "preset":
            _set(tree, key, value, f"override {item!r}")
    return RunConfig(**tree)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); ``load_config(path)`` gives ``cfg`` back."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None))
    tmp.replace(path)
    return path


def config_help(cls: type = RunConfig, prefix: str = "") -> str:
    """Documentation of every field of ``cls`` (recursively for RunConfig): key, type, default, doc."""
    lines: list[str] = []
    defaults = cls()
    docs, hints = field_docs(cls), field_types(cls)
    for f in fields(cls):
        if f.name in SECTIONS and cls is RunConfig:
            continue
        key = f"{prefix}{f.name}"
        lines.append(f"  {key} ({_type_name(hints[f.name])}, default {getattr(defaults, f.name)!r})")
        lines += [f"      {line}" for line in docs.get(f.name, "(undocumented)").splitlines()]
    if cls is RunConfig:
        for section, sub in SECTIONS.items():
            lines += ["", f"{section}: {inspect.getdoc(sub)}", config_help(sub, f"{section}.")]
    return "\n".join(lines)


def config_to_yaml_with_docs(cfg: RunConfig) -> str:
    """Resolved config as YAML with each field's doc as a comment above it (still loadable)."""
    data = config_to_dict(cfg)
    out: list[str] = []

    def emit(cls: type, values: dict, indent: str) -> None:
        docs = field_docs(cls)
        for name, value in values.items():
            if cls is RunConfig and name in SECTIONS:
                continue
            out.extend(f"{indent}# {line}" for line in docs.get(name, "").splitlines())
            dumped = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
            dumped = dumped.removesuffix("...").strip()  # the document-end marker after a plain scalar
            out.append(f"{indent}{name}: {dumped}")

    emit(RunConfig, data, "")
    for section, cls in SECTIONS.items():
        out += ["", f"# {inspect.getdoc(cls)}", f"{section}:"]
        emit(cls, data[section], "  ")
    return "\n".join(out) + "\n"
