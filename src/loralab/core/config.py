"""LoraConfig: what to adapt and how. Shared by injection (inject.py) and adapter files (adapter_io.py).

The update of an adapted layer is ``y = W0 x + scaling * B A dropout(x)`` with
``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

BiasMode = Literal["none", "all", "lora_only"]


class LoraConfigError(ValueError):
    """An invalid LoraConfig field; ``field`` names it, ``reason`` says what is wrong."""

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"LoraConfig.{field_name}: {reason}")
        self.field, self.reason = field_name, reason


@dataclass
class LoraConfig:
    """One adapter's settings. Field names follow PEFT's ``LoraConfig`` where PEFT has the concept."""

    r: int = 8
    """Rank of the update B A (r >= 1)."""
    lora_alpha: float = 8.0
    """Scale numerator: scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input only (0 <= p < 1); the frozen path never sees it."""
    target_modules: list[str] | str | None = None
    """Module-name suffixes (["query", "value"]), a regex matched against the full name, or "all-linear"."""
    exclude_modules: list[str] | str | None = None
    """Suffixes or a regex of modules never adapted (e.g. ["lm_head"])."""
    bias: BiasMode = "none"
    """Which biases train: none, all (every bias in the model), lora_only (biases of adapted layers)."""
    init_lora_weights: bool | Literal["gaussian"] = True
    """A ~ kaiming-uniform(a=sqrt(5)) when True, A ~ N(0, 1/r) with "gaussian"; B = 0 either way."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: {name suffix or regex: r}, overriding ``r``."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha: {name suffix or regex: alpha}, overriding ``lora_alpha``."""
    modules_to_save: list[str] | None = None
    """Modules trained fully and saved with the adapter (e.g. ["classifier"])."""
    fused_qkv: dict[str, list[bool]] = field(default_factory=dict)
    """Fused projections adapted per slice: {name suffix: enable}, e.g. {"c_attn": [True, False, True]}
    adapts q and v of GPT-2's fused QKV with a separate A, B per enabled slice."""
    task_type: str | None = None
    """PEFT task type recorded in adapter_config.json (SEQ_CLS, CAUSAL_LM, ...)."""
    base_model_name_or_path: str | None = None
    """The base model the adapter was trained on (recorded, checked by nobody but humans)."""

    def __post_init__(self) -> None:
        """The one validation of LoRA settings (the run config's lora section uses it too)."""
        def fail(name: str, reason: str) -> None:
            raise LoraConfigError(name, reason)

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            fail("r", f"must be an integer >= 1, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not self.lora_alpha > 0:
            fail("lora_alpha", f"must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            fail("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        if self.target_modules == []:
            fail("target_modules", "is empty: nothing would be adapted")
        if isinstance(self.target_modules, str) and "," in self.target_modules and "{" not in self.target_modules:
            parts = ",".join(p.strip() for p in self.target_modules.split(","))
            fail("target_modules", f"{self.target_modules!r} is one regex, not a list; write a list: [{parts}]")
        if self.bias not in ("none", "all", "lora_only"):
            fail("bias", f"must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            fail("init_lora_weights", f"must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        for name, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                fail("rank_pattern", f"[{name!r}] must be an integer >= 1, got {r!r}")
        for name, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
                fail("alpha_pattern", f"[{name!r}] must be > 0, got {alpha!r}")
        for name, enable in self.fused_qkv.items():
            if not enable or not any(enable):
                fail("fused_qkv", f"[{name!r}] must enable at least one slice, got {enable!r}")

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
