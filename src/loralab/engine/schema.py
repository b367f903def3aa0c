"""loralab's config schema: the typed sections every run has (model, lora, train, data, generate).

Each field's docstring is its documentation (``loralab train --help`` prints them); coercion and the
range checks run when a section is built (see :mod:`loralab.engine.typed_config`). The ``data`` section
of a run is its experiment's own subclass of ``DataConfig``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from loralab.core.config import LoraConfig, LoraConfigError
from loralab.engine.typed_config import MOVED_KEYS, ConfigError, Section, require

MOVED_KEYS.update({"train.bf16": "model.compute_dtype=bfloat16 (or auto): frozen weights in bf16, trainable ones "
                   "in float32, bf16 autocast"})


@dataclass
class ModelConfig(Section):
    """The base model and how it is loaded."""

    KEY: ClassVar[str] = "model"
    name: str = "minilm-l6"
    """Zoo name ("minilm-l6", "mpnet-base", "smollm2-135m"), a local Hugging Face model dir, or a hub id already cached."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Storage dtype of the (non-quantized) base weights."""
    quantize: Literal["none", "nf4", "fp4", "int4"] = "none"
    """4-bit quantization of the frozen base linear layers (QLoRA uses "nf4")."""
    double_quant: bool = True
    """Quantize the per-block absmax constants too (QLoRA's double quantization); 4-bit only."""
    quant_block_size: int = 64
    """Weights per quantization block (one absmax constant per block): a power of two in [32, 4096]."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """Dtype of the frozen weights and the matmuls (4-bit weights are dequantized to it): bfloat16 keeps the
    trainable weights, their gradients and optimizer state in float32 and runs the forward under bf16
    autocast (loss in float32); auto picks bfloat16 where the CPU has AVX512-BF16/AMX or the GPU supports
    bf16, float32 elsewhere (env.json records the choice and why)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    trust_remote_code: bool = False
    """Allow a hub model's own Python code to run. Off: loading code from a model dir is code execution."""

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        b = self.quant_block_size
        require(e, 32 <= b <= 4096 and b & (b - 1) == 0, "quant_block_size",
                f"must be a power of two in [32, 4096] (e.g. 64), got {b}")
        require(e, bool(self.name), "name", "must name a model")
        return e


@dataclass
class LoraSection(Section):
    """What trains: LoRA adapters (the paper), or one of the methods it is compared with (full fine-tuning,
    BitFit, a linear probe, bottleneck adapters, prefix tuning, the top layers).

    The LoRA fields are the core ``LoraConfig``'s, by the same names, validated by it. ``METHOD_KEYS``
    lists the fields each method reads; setting another one is an error (``load_config``)."""

    KEY: ClassVar[str] = "lora"
    method: Literal["lora", "full", "bitfit", "linear_probe", "adapter_h", "adapter_l", "adapter_p", "prefix_layer",
                    "prefix_embed", "ft_top2"] = "lora"
    """lora: low-rank adapters on a frozen base; full: every weight trains; bitfit: only biases (and the
    head) train; linear_probe: only the head trains; adapter_h (Houlsby: a bottleneck adapter after the
    attention and after the FFN of every layer), adapter_l (Lin: one after each layer, with a LayerNorm),
    adapter_p (Pfeiffer: one after each FFN), each of width lora.r; prefix_layer: lora.prefix_length
    trainable keys/values in every attention layer; prefix_embed: lora.prefix_length prefix and
    lora.infix_length infix token embeddings; ft_top2: the last lora.top_layers layers (and the head) train."""
    r: int = 8
    """LoRA: rank of each update B A; adapter_h/l/p: the bottleneck width of each adapter (Hu et al.'s r) (>= 1)."""
    lora_alpha: float = 8.0
    """Scaling numerator: the update is multiplied by lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch input, 0 <= p < 1."""
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    """Module-name suffixes to adapt (["q_proj", "v_proj"]), one regex over full names, or "all-linear".
    The default ["query", "value"] means the architecture's W_q and W_v (q_proj/v_proj, GPT-2's c_attn slices)."""
    exclude_modules: list[str] | str | None = None
    """Suffixes or a regex of modules never adapted (e.g. ["lm_head"])."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Biases that train as well: none, all, or lora_only (those of adapted layers)."""
    init_lora_weights: bool | Literal["gaussian"] = True
    """Init of A (B starts at zero, so training starts at the base model): true = kaiming-uniform, "gaussian" = N(0, 1/r)."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    modules_to_save: list[str] | None = None
    """The head: modules trained fully with any method (and saved with the adapter), e.g. ["classifier"]
    (None: the experiment decides)."""
    fused_qkv: dict[str, list[bool]] = field(default_factory=dict)
    """Per-slice adaptation of fused projections: {"c_attn": [true, false, true]} adapts q and v only."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overriding r: {name suffix or regex: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overriding lora_alpha: {name suffix or regex: alpha}."""
    init_from: str | None = None
    """Saved dir to warm start from instead of the fresh init: a LoRA adapter (PEFT format) with
    method=lora, or the ``adapter/`` dir of an adapter_*/prefix_*/ft_top2 run with that same method."""
    adapter_activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    """adapter_h/l/p: the nonlinearity f between the down- and up-projection, W_up f(W_down h)."""
    adapter_layernorm: bool = False
    """adapter_h: also train the layers' own LayerNorms (Houlsby's recipe; the count then adds 2·d per
    LayerNorm). Off: Hu et al.'s Adapter^H count, adapters only."""
    prefix_length: int = 10
    """prefix_layer, prefix_embed: the number l_p of trainable prefix positions (prefix_layer: >= 1)."""
    infix_length: int = 0
    """prefix_embed: the number l_i of trainable infix tokens, inserted after the input (>= 0;
    l_p + l_i >= 1)."""
    prefix_reparam: bool = False
    """prefix_layer: compute the prefixes with Li & Liang's MLP, P = MLP(P') (merged into plain prefixes
    when saved); off: the prefixes are trained directly."""
    prefix_init_text: str | None = None
    """prefix_layer: initialise the prefixes from the keys and values the frozen model computes for this
    text's first l_p tokens (repeated when shorter), Li & Liang's init from real words' activations, e.g.
    "table-to-text:"; None: random N(0, 0.02^2). Not with prefix_reparam (the MLP computes them)."""
    prefix_reparam_dim: int = 512
    """prefix_layer with prefix_reparam: the width e of the reparametrisation's embedding P' (l_p x e)."""
    prefix_reparam_hidden: int = 512
    """prefix_layer with prefix_reparam: the hidden width of the reparametrisation MLP."""
    top_layers: int = 2
    """ft_top2: the number k of last transformer layers that train (Hu et al.'s FT^Top2: k = 2)."""

    METHOD_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "lora": ("method", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias",
                 "init_lora_weights", "use_rslora", "modules_to_save", "fused_qkv", "rank_pattern", "alpha_pattern",
                 "init_from"),
        "full": ("method", "modules_to_save"),
        "bitfit": ("method", "modules_to_save", "init_from"),
        "linear_probe": ("method", "modules_to_save"),
        "adapter_h": ("method", "r", "adapter_activation", "adapter_layernorm", "modules_to_save", "init_from"),
        "adapter_l": ("method", "r", "adapter_activation", "modules_to_save", "init_from"),
        "adapter_p": ("method", "r", "adapter_activation", "modules_to_save", "init_from"),
        "prefix_layer": ("method", "prefix_length", "prefix_reparam", "prefix_reparam_dim", "prefix_reparam_hidden",
                         "prefix_init_text", "modules_to_save", "init_from"),
        "prefix_embed": ("method", "prefix_length", "infix_length", "modules_to_save", "init_from"),
        "ft_top2": ("method", "top_layers", "modules_to_save", "init_from"),
    }
    """The fields each method reads (the experiments read ``modules_to_save`` as the head with every method)."""
    READ_IF: ClassVar[dict[str, tuple[str, Any]]] = {"prefix_reparam_dim": ("prefix_reparam", True),
                                                     "prefix_reparam_hidden": ("prefix_reparam", True),
                                                     "prefix_init_text": ("prefix_reparam", False)}
    """Fields read only when another field has a value: {field: (other field, value)}."""

    def method_reads(self, name: str) -> bool:
        """Whether this section's method reads field ``name`` (given the other fields' values)."""
        values = self.__dict__  # not attribute reads: Section.reads records only the experiments' uses
        if name not in self.METHOD_KEYS[values["method"]]:
            return False
        other, value = self.READ_IF.get(name, (None, None))
        return other is None or values[other] == value

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        v = self.__dict__
        for name in ("prefix_reparam_dim", "prefix_reparam_hidden", "top_layers"):
            require(e, v[name] >= 1, name, f"must be >= 1, got {v[name]}")
        require(e, v["prefix_length"] >= (1 if v["method"] == "prefix_layer" else 0), "prefix_length",
                f"must be >= {1 if v['method'] == 'prefix_layer' else 0}, got {v['prefix_length']}")
        require(e, v["infix_length"] >= 0, "infix_length", f"must be >= 0, got {v['infix_length']}")
        require(e, v["prefix_init_text"] is None or not v["init_from"] or v["method"] != "prefix_layer",
                "prefix_init_text", "is set beside lora.init_from: a warm start loads its prefixes; remove one of them")
        require(e, v["method"] != "prefix_embed" or v["prefix_length"] + v["infix_length"] >= 1, "infix_length",
                "prefix_embed needs lora.prefix_length + lora.infix_length >= 1")
        if e:
            return e
        try:  # one validation of the LoRA fields: the core LoraConfig's
            self.to_lora_config(validate_only=True)
        except LoraConfigError as err:
            return [(err.field, err.reason)]
        return []

    def to_lora_config(self, validate_only: bool = False, **extra: Any) -> LoraConfig:
        """The core ``LoraConfig`` for this section; ``extra`` sets task_type / base_model_name_or_path."""
        if self.method != "lora" and not validate_only:
            raise ConfigError(f"lora.method is {self.method!r}: there is no LoRA adapter to configure")
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(LoraConfig) if hasattr(self, f.name)}
        return LoraConfig(**{**values, **extra})


@dataclass
class TrainConfig(Section):
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

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        require(e, self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(e, self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(e, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                 f"must be two numbers in [0, 1), got {self.betas}")
        require(e, self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        require(e, self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "early_stopping_patience"):
            require(e, getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "log_every"):
            require(e, getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(e, 0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(e, not (self.max_steps > 0 and self.warmup_steps > self.max_steps), "warmup_steps",
                 f"{self.warmup_steps} exceeds train.max_steps={self.max_steps}: the lr would never reach its peak")
        require(e, self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0 (0: off), got {self.max_grad_norm}")
        require(e, 0 <= self.label_smoothing < 1, "label_smoothing",
                 f"must be in [0, 1), got {self.label_smoothing}")
        return e


@dataclass
class DataConfig(Section):
    """Which data, how much of it, and how it becomes tokens (the fields every experiment shares;
    an experiment's ``data_config`` subclasses this and adds its own)."""

    KEY: ClassVar[str] = "data"
    data_dir: str | None = None
    """Directory with the data files (None: the experiment's default under ../shared/data/)."""
    train_file: str | None = None
    """Training file overriding the default one in data_dir."""
    eval_file: str | None = None
    """Evaluation file overriding the default one in data_dir."""
    max_length: int = 128
    """Truncate tokenized examples to this many tokens (>= 1)."""
    train_samples: int = 0
    """Use only N training examples, a seeded random subset (0: all)."""
    eval_samples: int = 0
    """Use only the first N evaluation examples (0: all)."""
    seed: int = 0
    """Seed of the subsampling (separate from train.seed)."""

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        require(e, self.max_length >= 1, "max_length", f"must be >= 1, got {self.max_length}")
        for name in ("train_samples", "eval_samples"):
            require(e, getattr(self, name) >= 0, name, f"must be >= 0 (0: all), got {getattr(self, name)}")
        return e


@dataclass
class GenerateConfig(Section):
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
    backend: Literal["loralab", "transformers"] = "loralab"
    """loralab: decode a copy with the adapter merged, beam search with transformers' semantics at a
    fraction of its cost; transformers: model.generate on the unmerged model (the reference)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The merged copy's precision (loralab backend): auto = bfloat16 where the device computes it fast,
    else float32; float32 gives transformers' tokens exactly."""

    def check(self) -> list[tuple[str, str]]:
        e: list = []
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            require(e, getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(e, self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
                 f"must be >= 0 (0: off), got {self.no_repeat_ngram_size}")
        require(e, self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(e, not (self.do_sample and self.num_beams > 1), "do_sample",
                 f"sampling with num_beams={self.num_beams} is not supported; set generate.num_beams=1")
        return e


