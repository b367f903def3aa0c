"""LoRA layers (Hu et al. 2021): a frozen base layer plus a trainable low-rank update, by composition.

For a base map ``y = W0 x + b`` (W0 is out x in) an adapter ``name`` adds

    y = W0 x + b + scaling * B A dropout(x),   A: r x in,  B: out x r,
    scaling = lora_alpha / r            (lora_alpha / sqrt(r) with rsLoRA).

A is initialised kaiming-uniform(a=sqrt(5)) (or N(0, 1/r) with ``"gaussian"``) and B = 0, so a fresh
adapter is an exact no-op. Dropout touches only the LoRA input; the frozen path sees ``x`` unchanged.
Merging folds the update into the base weight, ``W0 <- W0 + scaling * B A``, after which the forward
is the base forward and nothing else; unmerging subtracts it again.

Fused projections (GPT-2's ``c_attn``: out = 3 d, q|k|v) can be adapted per slice with
``enable=[True, False, True]``: each enabled slice i gets its own A_i (r x in) and B_i (d x r), stored
concatenated like loralib's MergedLinear (k = number of enabled slices)::

    lora_A.<name>.weight : (r*k) x in   = [A_1; ...; A_k]
    lora_B.<name>.weight : (d*k) x r    = [B_1; ...; B_k]

The forward works on activations: h = A_cat x (one matmul), then slice i of the output gets
``scaling * B_i h_i``; the dense (3d x in) update is only built by ``merge``.

Speed: with one active adapter over a frozen nn.Linear / Conv1D (the training case) the base matmul and
the LoRA branch run as one autograd node (``BasePlusLora`` in lora_fused.py): the update is accumulated
in place into the base output and the two gradients w.r.t. x into one buffer, and the dropout mask (16
bits per element from a seeded counter stream, ``keep_mask``: p honoured to 2^-16) is rebuilt in
backward, never saved. Without gradients (inference) and with more rows than in*out/(in+out), the
forward instead builds ``W0 + s B A`` for the call (one fused addmm) and runs one matmul: the two skinny
LoRA products cost more than building the dense update then (W0 itself is never changed).
A bf16 (or fp16) input over a base of the same dtype takes the node too, with the float32 adapter
rounded to the input's dtype for the call (bf16 compute: see lora_fused.py).
Every other case (several adapters, 4-bit or unknown bases, other dtype mixes, autocast to another
dtype, hooks) uses plain autograd; both give the same numbers (tested).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.core.lora_fused import BasePlusLora, keep_mask  # noqa: F401  (keep_mask: public)


def base_kind(module: nn.Module) -> str:
    """'linear' (nn.Linear), 'conv1d' (HF GPT-2 Conv1D, weight stored in x out) or 'quantized' (any
    module with in_features, out_features and ``dequantize()``, e.g. a 4-bit Linear4bit)."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight"):
        return "conv1d"  # detected by name so that core never imports transformers
    if hasattr(module, "dequantize") and hasattr(module, "in_features") and hasattr(module, "out_features"):
        return "quantized"
    if isinstance(module, nn.Linear):
        return "linear"
    raise TypeError(
        f"LoraLinear cannot wrap {type(module).__name__}: expected nn.Linear, a GPT-2 Conv1D, or a module "
        "with in_features, out_features and dequantize() (a 4-bit Linear4bit)"
    )


def lora_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters train in float32 over half/quantized bases (stable updates), in float64 over float64."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class LoraLayer(nn.Module):
    """Bookkeeping shared by every LoRA wrapper: named adapters, which are active, which are merged.

    Subclasses own the adapter parameters and implement ``_new_adapter``, ``delta_weight`` (the dense
    update in the base weight's own layout) and ``forward``.
    """

    adapter_attrs: tuple[str, ...] = ("lora_A", "lora_B", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self.active_adapters: list[str] = []
        self._disabled = False
        self._branch: tuple[str, ...] = ()  # adapters the forward must compute: active, unmerged, enabled

    # -- state ------------------------------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapters_disabled(self) -> bool:
        return self._disabled

    @adapters_disabled.setter
    def adapters_disabled(self, value: bool) -> None:
        self._disabled = bool(value)
        self._refresh()

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def weight(self) -> torch.Tensor:  # HF code reads e.g. `c_attn.weight.dtype`
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def _refresh(self) -> None:
        self._branch = () if self._disabled else tuple(
            n for n in self.active_adapters if n in self.r and n not in self.merged_adapters
        )

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        enable: list[bool] | None = None,
    ) -> None:
        """Add adapter ``name`` (it becomes active alongside the already active ones)."""
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists in this layer; delete it first or pick another name")
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self._new_adapter(name, r, enable)
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name] = r, float(lora_alpha)
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.reset_lora_parameters(name, init_lora_weights)
        self.active_adapters.append(name)
        self._refresh()

    def set_adapter(self, names: str | list[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self.active_adapters = [n for n in names if n in self.r]
        self._refresh()

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting")
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]
        self._refresh()

    def reset_lora_parameters(self, name: str, init_lora_weights: bool | str = True) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) or N(0, 1/r); B = 0. ``False`` leaves both random (not a no-op).

        The init of Linear and Conv2d adapters; LoraEmbedding overrides it (A = 0, B ~ N(0, 1))."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, std=1.0 / self.r[name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    # -- merge ------------------------------------------------------------------------------------------
    def merge(self, names: list[str] | None = None) -> None:
        """W0 <- W0 + scaling * delta for each adapter (default: the active ones), in place."""
        for name in self.active_adapters if names is None else names:
            if name not in self.r:
                raise KeyError(f"no adapter {name!r} in this layer (has {self.adapter_names})")
            if name in self.merged_adapters:
                raise ValueError(f"adapter {name!r} is already merged; merging twice would add its update twice")
            self._add_to_base_weight(self.delta_weight(name), +1.0)
            self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self, names: list[str] | None = None) -> None:
        """Subtract merged updates again (default: all merged adapters, last merged first)."""
        for name in list(reversed(self.merged_adapters)) if names is None else names:
            if name not in self.merged_adapters:
                raise ValueError(f"adapter {name!r} is not merged, nothing to unmerge")
            self._add_to_base_weight(self.delta_weight(name), -1.0)
            self.merged_adapters.remove(name)
        self._refresh()

    def _add_to_base_weight(self, delta: torch.Tensor, sign: float) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype), alpha=sign)


class LoraLinear(LoraLayer):
    """LoRA over nn.Linear, GPT-2 Conv1D (weight in x out) or a quantized linear (4-bit base)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.kind = base_kind(base_layer)
        if self.kind == "conv1d":
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        # The fused base+LoRA autograd function recomputes the base itself: only for bases whose forward is
        # one known addmm -- nn.Linear, Conv1D, and a 4-bit linear that can rebuild its weight on demand
        # (``rebuilt_weight()``: never saved for backward, rebuilt again there); every other base goes
        # through its own forward (generic path, ~10% more activation memory: see _forward_generic).
        self._rebuilds = self.kind == "quantized" and hasattr(base_layer, "rebuilt_weight")
        self._known_addmm_base = type(base_layer) is nn.Linear or self.kind == "conv1d" or self._rebuilds
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.enable: dict[str, list[bool] | None] = {}

    def _new_adapter(self, name: str, r: int, enable: list[bool] | None) -> None:
        k, d = 1, self.out_features
        if enable is not None:
            if not any(enable) or self.out_features % len(enable):
                raise ValueError(
                    f"fused enable={enable} needs >= 1 True and out_features ({self.out_features}) divisible by {len(enable)}"
                )
            k, d = sum(enable), self.out_features // len(enable)
        weight = self.base_layer.weight
        device = weight.device
        dtype = lora_dtype(weight) if self.kind != "quantized" else torch.float32
        self.lora_A[name] = nn.Linear(self.in_features, r * k, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, d * k, bias=False, device=device, dtype=dtype)
        self.enable[name] = list(enable) if enable is not None else None

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.enable.pop(name, None)

    def _slices(self, name: str) -> list[tuple[int, int]]:
        """(position among enabled slices, output slot) for each enabled slice of a fused adapter."""
        return [(i, slot) for i, slot in enumerate(j for j, on in enumerate(self.enable[name]) if on)]

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A in the base weight's layout (transposed for Conv1D), computed in >= float32."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        compute = torch.float64 if A.dtype == torch.float64 else torch.float32
        A, B, s = A.to(compute), B.to(compute), self.scaling[name]
        if self.enable[name] is None:
            delta = s * (B @ A)
        else:  # dense (out x in) with zeros in the disabled slices
            r, d = self.r[name], self.out_features // len(self.enable[name])
            delta = A.new_zeros(self.out_features, self.in_features)
            for i, slot in self._slices(name):
                delta[slot * d:(slot + 1) * d] = s * (B[i * d:(i + 1) * d] @ A[i * r:(i + 1) * r])
        return delta.T if self.kind == "conv1d" else delta

    def _add_to_base_weight(self, delta: torch.Tensor, sign: float) -> None:
        if self.kind == "quantized":
            raise NotImplementedError(
                f"cannot merge a LoRA update into a quantized base ({type(self.base_layer).__name__}) in place: adding "
                "to 4-bit codes would requantize and lose most of the update. Keep the adapter unmerged, or export "
                "with loralab.core.linear4bit.merge_to_full_precision(layer) (dequantize + merge in fp32; "
                "merge_and_requantize if the result must stay 4-bit)."
            )
        super()._add_to_base_weight(delta, sign)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._branch:  # merged or disabled: exactly the base forward
            return self.base_layer(x, *args, **kwargs)
        if self._fast_path_ok(x, args, kwargs):
            name = self._branch[0]
            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
            if p == 0.0 and self._dense_update_pays(x, name):
                return self._forward_dense_update(x, name)
            base = self.base_layer
            y = BasePlusLora.apply(
                x.reshape(-1, self.in_features), None if self._rebuilds else base.weight, base.bias,
                self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], p, self.kind == "conv1d",
                self._slice_plan(name), base.rebuilt_weight if self._rebuilds else None,
            )
            return y.view(*x.shape[:-1], self.out_features)
        return self._forward_generic(x, *args, **kwargs)

    def _fast_path_ok(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """One adapter over a frozen Linear/Conv1D/4-bit base, no hooks, one dtype: use BasePlusLora."""
        base = self.base_layer
        weight_dtype = base.compute_dtype if self._rebuilds else base.weight.dtype
        lora_dtype_ = self.lora_A[self._branch[0]].weight.dtype
        half = x.dtype in (torch.bfloat16, torch.float16)
        autocast = torch.is_autocast_enabled(x.device.type)
        return (
            self._known_addmm_base and len(self._branch) == 1 and not args and not kwargs
            and not base._forward_hooks and not base._forward_pre_hooks and not base.weight.requires_grad
            and x.dtype == weight_dtype and (lora_dtype_ == x.dtype or (half and lora_dtype_ == torch.float32))
            and (base.bias is None or base.bias.dtype == x.dtype)
            # the node casts A, B to x's dtype itself; autocast to another dtype would mix the in-place adds
            and (not autocast or (half and torch.get_autocast_dtype(x.device.type) == x.dtype))
        )

    def _dense_update_pays(self, x: torch.Tensor, name: str) -> bool:
        """No gradient wanted, an fp32/fp64 weight, and more rows than in*out/(in+out): one matmul with
        W0 + s B A (r*in*out flops to build) is then cheaper than the two skinny products x A^T, h B^T
        (2*rows*r*(in+out) flops, and a pass over x and y each)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
            return False
        if x.dtype not in (torch.float32, torch.float64):  # W0 + s B A rounded to 16 bits would lose the update
            return False
        rows = x.numel() // self.in_features
        return rows * (self.in_features + self.out_features) > self.in_features * self.out_features

    def _forward_dense_update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """y = x (W0 + s B A)^T + b with the effective weight built for this call only (the base is unchanged)."""
        base = self.base_layer
        w = base.rebuilt_weight() if self._rebuilds else base.weight
        A, B, s = self.lora_A[name].weight.to(w.dtype), self.lora_B[name].weight.to(w.dtype), self.scaling[name]
        conv1d, plan = self.kind == "conv1d", self._slice_plan(name)
        if plan is None:  # one fused GEMM W + s B A into a fresh tensor: never in place, W0 stays unmerged
            w = torch.addmm(w, A.t(), B.t(), alpha=s) if conv1d else torch.addmm(w, B, A, alpha=s)
        else:
            r, d, slices = plan
            w = w.clone()
            for i, slot in slices:
                A_i, B_i = A[i * r:(i + 1) * r], B[i * d:(i + 1) * d]
                if conv1d:
                    w[:, slot * d:(slot + 1) * d].addmm_(A_i.t(), B_i.t(), alpha=s)
                else:
                    w[slot * d:(slot + 1) * d].addmm_(B_i, A_i, alpha=s)
        x2 = x.reshape(-1, self.in_features)
        w_t = w if self.kind == "conv1d" else w.t()
        y = torch.addmm(base.bias, x2, w_t) if base.bias is not None else x2 @ w_t
        return y.view(*x.shape[:-1], self.out_features)

    def _slice_plan(self, name: str) -> tuple | None:
        """None for a plain adapter; (r, d, ((position, slot), ...)) for a fused one."""
        if self.enable[name] is None:
            return None
        return self.r[name], self.out_features // len(self.enable[name]), tuple(self._slices(name))

    def _forward_generic(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Any base, dtype mix or number of adapters, through plain autograd (no in-place on views)."""
        y = self.base_layer(x, *args, **kwargs)
        y2 = y.reshape(-1, self.out_features)
        for name in self._branch:
            A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
            h = self.lora_dropout[name](x).reshape(-1, self.in_features).to(A.dtype) @ A.T
            plan = self._slice_plan(name)
            if plan is None:
                y2 = y2 + (s * (h @ B.T)).to(y2.dtype)
            else:
                r, d, slices = plan
                pieces = list(y2.split(d, dim=1))
                for i, slot in slices:
                    pieces[slot] = pieces[slot] + (s * (h[:, i * r:(i + 1) * r] @ B[i * d:(i + 1) * d].T)).to(y2.dtype)
                y2 = torch.cat(pieces, dim=1)
        return y2.view(*y.shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling}, merged={self.merged_adapters}"
