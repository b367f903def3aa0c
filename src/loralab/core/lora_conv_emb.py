"""LoRA for nn.Conv2d and nn.Embedding (same bookkeeping as ``LoraLinear``: see ``loralab.core.lora``).

Conv2d (groups = 1):   y = conv(x; W0) + b + scaling * B(A(dropout(x)))
    A: conv in -> r channels with the base kernel, stride, padding, dilation (weight r x in x kh x kw),
    B: 1x1 conv r -> out (weight out x r x 1 x 1). Merged kernel: W0 + scaling * (B A) reshaped.

Embedding (as PEFT): y = E0[x] + scaling * (A^T)[x] B^T
    lora_embedding_A: r x num_embeddings (init 0), lora_embedding_B: embedding_dim x r (init N(0, 1)),
    so again a fresh adapter is a no-op. The lookup into A^T uses the base's padding_idx / max_norm
    settings. Merged table: E0 + scaling * (B A)^T. Dropout is not applied to token indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loralab.core.lora import LoraLayer, lora_dtype


class LoraConv2d(LoraLayer):
    def __init__(self, base_layer: nn.Conv2d) -> None:
        if not isinstance(base_layer, nn.Conv2d):
            raise TypeError(f"LoraConv2d wraps nn.Conv2d, got {type(base_layer).__name__}")
        if base_layer.groups != 1:
            raise ValueError(
                f"LoraConv2d supports groups=1 only, got groups={base_layer.groups} (grouped/depthwise convs have "
                "no single low-rank update); exclude this layer from target_modules"
            )
        super().__init__(base_layer)
        self._known_addmm_base = type(base_layer) is nn.Conv2d
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()

    def _new_adapter(self, name: str, r: int, enable: list[bool] | None) -> None:
        if enable is not None:
            raise ValueError("fused per-slice adapters (fused_qkv) apply to linear layers only, not Conv2d")
        base = self.base_layer
        kw = dict(device=base.weight.device, dtype=lora_dtype(base.weight), bias=False)
        self.lora_A[name] = nn.Conv2d(
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
            padding_mode=base.padding_mode, **kw,
        )
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, 1, **kw)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        compute = torch.float64 if A.dtype == torch.float64 else torch.float32
        delta = B.to(compute).flatten(1) @ A.to(compute).flatten(1)  # (out, r) @ (r, in*kh*kw)
        return self.scaling[name] * delta.view(self.base_layer.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self._branch:
            return y
        if not self._known_addmm_base:
            y = y.clone()
        for name in self._branch:
            A, B = self.lora_A[name], self.lora_B[name]
            update = B(A(self.lora_dropout[name](x).to(A.weight.dtype)))
            y.add_(update.to(y.dtype), alpha=self.scaling[name])
        return y


class LoraEmbedding(LoraLayer):
    adapter_attrs = ("lora_embedding_A", "lora_embedding_B", "lora_dropout")

    def __init__(self, base_layer: nn.Embedding) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoraEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self._known_addmm_base = type(base_layer) is nn.Embedding
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()

    def _new_adapter(self, name: str, r: int, enable: list[bool] | None) -> None:
        if enable is not None:
            raise ValueError("fused per-slice adapters (fused_qkv) apply to linear layers only, not Embedding")
        w = self.base_layer.weight
        kw = dict(device=w.device, dtype=lora_dtype(w))
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, self.base_layer.num_embeddings, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.base_layer.embedding_dim, r, **kw))

    def reset_lora_parameters(self, name: str, init_lora_weights: bool | str = True) -> None:
        """A = 0, B ~ N(0, 1) (PEFT's embedding init); ``False`` makes A random too (not a no-op)."""
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        nn.init.normal_(B)
        if init_lora_weights is False:
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        compute = torch.float64 if A.dtype == torch.float64 else torch.float32
        return self.scaling[name] * (B.to(compute) @ A.to(compute)).T  # (num_embeddings, embedding_dim)

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            x, table, padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self._branch:
            return y
        if not self._known_addmm_base:
            y = y.clone()
        for name in self._branch:
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            update = self._lookup(x, A.T) @ B.T  # (..., r) @ (r, dim)
            y.add_(update.to(y.dtype), alpha=self.scaling[name])
        return y
