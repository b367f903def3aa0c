"""Optimizers for (Q)LoRA: blockwise 8-bit AdamW, host-offloaded ("paged") state, and a factory.

AdamW (Loshchilov & Hutter), per parameter p with gradient g at step t::

    m_t = b1 m_{t-1} + (1 - b1) g            v_t = b2 v_{t-1} + (1 - b2) g^2
    p  <- p (1 - lr wd)                                           (decoupled weight decay)
    p  <- p - lr / (1 - b1^t) * m_t / (sqrt(v_t) / sqrt(1 - b2^t) + eps)   (bias correction)

8-bit state (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): m and v are
stored as uint8 codes into a 256-entry "dynamic" map, one fp32 absmax per block of ``block_size``
elements: ``x ~= map[code] * absmax[block]``. m uses the signed map, v (>= 0) the unsigned one, which
spends the sign bit on extra precision. Each step dequantizes, updates in fp32, and requantizes
(round to the nearest map entry). Tensors with fewer than ``min_8bit_size`` elements keep fp32 state,
as bitsandbytes does: quantization saves nothing there and costs accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import nn

__all__ = ["dynamic_map", "quantize_blockwise", "dequantize_blockwise", "AdamW8bit",
           "OffloadedOptimizer", "param_groups_for_weight_decay", "build_optimizer"]


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256-entry dynamic quantization map (sorted ascending, fp32).

    Seven decades, decade k = 0..6 covering magnitudes 10^(k-6) * [0.1, 1]. Decade k splits [0.1, 1]
    into 2^k equal cells (2^(k+1) unsigned: the unused sign bit doubles the resolution) and keeps each
    cell's midpoint scaled by 10^(k-6); the signed map mirrors them to negatives. Adding 0 and 1 gives
    2 * 127 + 2 = 256 (signed) and 254 + 2 = 256 (unsigned) codes. Small magnitudes thus get
    relative, not absolute, precision -- what Adam's second moment needs.
    """
    values: list[float] = [0.0, 1.0]
    for decade in range(7):
        cells = 2 ** decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1.0, cells + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (decade - 6)).tolist()
        values += mids + ([-x for x in mids] if signed else [])
    if len(values) != 256:
        raise AssertionError(f"dynamic map has {len(values)} entries, expected 256")
    return torch.tensor(sorted(values), dtype=torch.float32)


_MAPS: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _map_and_midpoints(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(map, midpoints between neighbours) cached per device; bucketize on midpoints = nearest code."""
    key = (signed, torch.device(device))
    if key not in _MAPS:
        code = dynamic_map(signed).to(device)
        _MAPS[key] = (code, (code[:-1] + code[1:]) / 2)
    return _MAPS[key]


def quantize_blockwise(x: torch.Tensor, signed: bool, block_size: int = 256,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) -> (uint8 codes, flat, numel of x; fp32 absmax per block).

    Block b holds flat elements [b*block_size, (b+1)*block_size); the last block may be short
    (zero padding does not change its absmax). An all-zero block gets absmax 0 and codes of 0.0.
    """
    flat = x.detach().reshape(-1).float()
    numel = flat.numel()
    pad = (-numel) % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    _, midpoints = _map_and_midpoints(signed, x.device)
    codes = torch.bucketize(normalized, midpoints).to(torch.uint8).view(-1)[:numel]
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
                         block_size: int = 256) -> torch.Tensor:
    """Inverse of quantize_blockwise: flat fp32 ``map[codes] * absmax[block]`` of length codes.numel()."""
    code_map, _ = _map_and_midpoints(signed, codes.device)
    scales = absmax.repeat_interleave(block_size)[: codes.numel()]
    return code_map[codes.long()] * scales


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit m and v (see module docstring); same update rule as torch AdamW.

    State per parameter: ``step`` (int) and either ``exp_avg`` / ``exp_avg_sq`` (fp32, small tensors)
    or ``exp_avg_codes`` / ``exp_avg_absmax`` / ``exp_avg_sq_codes`` / ``exp_avg_sq_absmax``.
    ``state_dict()`` / ``load_state_dict()`` round-trip bit-exactly (uint8 codes are not cast to
    the parameter dtype as torch's default loader would do).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, block_size: int = 256, min_8bit_size: int = 4096):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamW8bit: lr={lr}, eps={eps}, weight_decay={weight_decay} must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW8bit: betas={betas} must lie in [0, 1)")
        if block_size < 1:
            raise ValueError(f"AdamW8bit: block_size={block_size} must be >= 1")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        block_size=block_size, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, block = group["lr"], group["eps"], group["weight_decay"], group["block_size"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                grad = p.grad.float()
                quantized = p.numel() >= group["min_8bit_size"]
                if not state:
                    state["step"] = 0
                    if quantized:
                        zeros = torch.zeros_like(p, dtype=torch.float32)
                        state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(zeros, True, block)
                        state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(zeros, False, block)
                    else:
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                if quantized:
                    exp_avg = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], True, block).view_as(grad)
                    exp_avg_sq = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], False, block).view_as(grad)
                else:
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                p32 = p.float() if p.dtype != torch.float32 else p
                p32.mul_(1 - lr * wd).addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))
                if p32 is not p:
                    p.copy_(p32)
                if quantized:
                    state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(exp_avg, True, block)
                    state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(exp_avg_sq, False, block)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        _restore_exact_state(self, state_dict)


def _restore_exact_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Undo torch's cast of every floating state tensor to its parameter's dtype (it would turn
    uint8 codes into floats and fp32 state of a bf16 parameter into bf16): copy each saved tensor as
    saved, only moved to its parameter's device."""
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    for saved_id, p in zip(saved_ids, params):
        for key, value in state_dict["state"].get(saved_id, {}).items():
            if torch.is_tensor(value) and key != "step":
                optimizer.state[p][key] = value.to(device=p.device, copy=True)


class OffloadedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer_cls(params, **kwargs)`` so its state lives in host memory between steps.

    Inside ``step()``, one param group at a time: the group's state tensors are copied to their
    parameter's device, the wrapped optimizer steps that group only, and the state is copied back
    into (pinned, when CUDA exists) host buffers. Peak accelerator memory for state is thus one
    group's, not all. Scalar (0-d) tensors such as torch's ``step`` stay where they are. Parameters
    already on the CPU take a no-op path: results are identical to the wrapped optimizer.

    ``param_groups`` and ``state`` are the wrapped optimizer's own objects, so LR schedulers and
    ``zero_grad`` act on both. Moving data does not change it, so results equal the plain optimizer's
    on any device.
    """

    def __init__(self, optimizer_cls: type[torch.optim.Optimizer], params: Iterable[Any], **kwargs: Any):
        self.inner = optimizer_cls(params, **kwargs)
        super().__init__(self.inner.param_groups, self.inner.defaults)
        self._share_inner()
        self._pin = torch.cuda.is_available()

    def _share_inner(self) -> None:
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def _move_group_state(self, group: dict[str, Any], to_host: bool) -> None:
        for p in group["params"]:
            if p.device.type == "cpu":
                continue  # state already lives on the host
            state = self.inner.state.get(p)
            for key, value in (state or {}).items():
                if not torch.is_tensor(value) or value.dim() == 0:
                    continue
                if to_host:
                    host = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=self._pin)
                    host.copy_(value, non_blocking=self._pin)
                    state[key] = host
                elif value.device != p.device:
                    state[key] = value.to(p.device, non_blocking=self._pin)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        all_groups = self.inner.param_groups
        try:
            for group in all_groups:
                self._move_group_state(group, to_host=False)
                self.inner.param_groups = [group]
                self.inner.step()
                self._move_group_state(group, to_host=True)
        finally:
            self.inner.param_groups = all_groups
        if self._pin:
            torch.cuda.synchronize()  # host buffers must be complete before anyone reads them
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self._share_inner()
        for group in self.inner.param_groups:
            self._move_group_state(group, to_host=True)
        if self._pin:
            torch.cuda.synchronize()


def param_groups_for_weight_decay(params_or_model: nn.Module | Iterable[Any], weight_decay: float,
                                  ) -> list[dict[str, Any]]:
    """Trainable parameters split into [decayed, not decayed] groups (empty groups dropped).

    Not decayed: every parameter with fewer than 2 dims -- biases, LayerNorm / RMSNorm weights,
    scalars -- and any parameter named ``*.bias``. Accepts a module, (name, param) pairs or params.
    """
    if isinstance(params_or_model, nn.Module):
        named = list(params_or_model.named_parameters())
    else:
        items = list(params_or_model)
        if items and isinstance(items[0], dict):
            raise TypeError("param_groups_for_weight_decay: pass a model or parameters, not param groups")
        named = [it if isinstance(it, tuple) else (f"param{i}", it) for i, it in enumerate(items)]
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or name.endswith(".bias") or name == "bias" else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: no trainable parameters (requires_grad=True); "
                         "did you forget to inject an adapter or mark parameters trainable?")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


OPTIMIZER_NAMES = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")


def build_optimizer(params_or_model: nn.Module | Iterable[Any], name: str = "adamw", lr: float = 1e-3,
                    weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """The trainer's optimizer: ``name`` in adamw | adamw8bit | paged_adamw | paged_adamw8bit, with
    biases and norm weights (1-D parameters) in a weight-decay-free group."""
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"build_optimizer: unknown optimizer {name!r}; choose one of {OPTIMIZER_NAMES}")
    groups = param_groups_for_weight_decay(params_or_model, weight_decay)
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    cls: type[torch.optim.Optimizer] = AdamW8bit if name.endswith("8bit") else torch.optim.AdamW
    if name.startswith("paged_"):
        return OffloadedOptimizer(cls, groups, **kwargs)
    return cls(groups, **kwargs)
