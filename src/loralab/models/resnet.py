"""ResNet-18/34/50 (He et al. 2016) in plain PyTorch, with torchvision's state-dict names and shapes.

    model = resnet18(num_classes=10, small_input=True)       # 3x3 stride-1 stem, no max-pool (28-32 px)
    report = load_resnet_weights(resnet18(), "resnet18.safetensors")
    report = load_resnet_weights(resnet18(num_classes=10), "resnet18.pth", skip=("fc",))

Layout (what torchvision calls ResNet v1.5: the stride of a bottleneck sits on its 3x3 conv):

    conv1 (7x7/2, pad 3) - bn1 - relu - maxpool (3x3/2, pad 1)      [small_input: conv1 3x3/1, pad 1, no pool]
    layer1..layer4: blocks of width 64, 128, 256, 512; the first block of layer2..4 has stride 2
    avgpool (global) - fc (512 * expansion -> num_classes)

    BasicBlock (expansion 1):  conv1 3x3/s - bn1 - relu - conv2 3x3 - bn2, + shortcut, relu
    Bottleneck (expansion 4):  conv1 1x1 - bn1 - relu - conv2 3x3/s - bn2 - relu - conv3 1x1 (4 w) - bn3, + shortcut, relu
    shortcut: identity, or ``downsample`` = Sequential(conv 1x1/s, BN) when the stride is not 1 or the
    channel count changes (parameter names ``downsample.0.weight``, ``downsample.1.*``).

All convs are bias-free; every BN has weight, bias, running_mean, running_var, num_batches_tracked.
Parameter counts at 1000 classes: ResNet-18 11,689,512, ResNet-34 21,797,672, ResNet-50 25,557,032.
Init: convs kaiming-normal (fan_out, relu), BN weight 1 / bias 0, fc PyTorch's Linear default.

Weights load from safetensors, or from a ``.pth`` through ``torch.load(weights_only=True)`` only (a
full unpickle can run arbitrary code). Missing / unexpected keys and shape mismatches raise a
ValueError naming the file and the keys; ``skip`` names module prefixes (e.g. ``("fc",)`` for another
number of classes) whose tensors are ignored on both sides. Missing ``num_batches_tracked`` counters
(old torchvision checkpoints predate them) are allowed and set to 0: they only matter when BN momentum
is None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, width, 3, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, width * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, width * 4, 1), nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, width * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """A ResNet of ``block`` with ``layers[i]`` blocks in stage i; see the module docstring."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], num_classes: int = 1000,
                 in_channels: int = 3, small_input: bool = False) -> None:
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"ResNet needs 4 stages of >= 1 block each, got layers={list(layers)}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        self.small_input = small_input
        self.conv1 = _conv(in_channels, 64, 3) if small_input else nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    freeze_bn_stats: bool = False
    """When true, ``train()`` leaves every BatchNorm in eval mode: it normalises with its running statistics
    and does not update them (a frozen backbone, as in linear probing or LoRA on a frozen base)."""

    def train(self, mode: bool = True) -> "ResNet":
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector (N x 512·expansion) before ``fc``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, small_input)


def resnet34(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, small_input)


def resnet50(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, small_input)


RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


@dataclass
class LoadReport:
    """What ``load_resnet_weights`` did: keys copied, keys skipped (by prefix), counters defaulted to 0."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    defaulted: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` via ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors or a .pth/.pt state dict")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any global outside torch's tensor allow-list
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln] or (str(e).splitlines() or [type(e).__name__])
        raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) ({lines[0]}); loralab never does "
                         "a full unpickle. Save the state dict with torch.save(model.state_dict()) or as safetensors") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        keys = list(sd)[:5] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{path}: expected a flat state dict of tensors, got {keys}; if it is a training checkpoint, "
                         "save its model state dict alone (e.g. ckpt['state_dict'])")
    return sd


def _skipped(key: str, skip: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in skip)


def load_resnet_weights(model: nn.Module, path: str | Path, skip: Sequence[str] = ()) -> LoadReport:
    """Copy the tensors of ``path`` into ``model`` (names and shapes must match exactly, see module doc).

    ``skip`` = module prefixes left at the model's own init and ignored in the file, e.g. ``("fc",)``
    when the file's head has another number of classes, ``("fc", "conv1")`` for the small-image stem.
    """
    sd = read_state_dict(path)
    report = LoadReport()
    own = model.state_dict()
    report.skipped = sorted(k for k in set(own) | set(sd) if _skipped(k, skip))
    own = {k: v for k, v in own.items() if not _skipped(k, skip)}
    sd = {k: v for k, v in sd.items() if not _skipped(k, skip)}
    report.defaulted = sorted(k for k in own.keys() - sd.keys() if k.endswith(".num_batches_tracked"))
    missing = sorted(own.keys() - sd.keys() - set(report.defaulted))
    unexpected = sorted(sd.keys() - own.keys())
    if missing or unexpected:
        hint = ""
        if any(k.startswith("module.") for k in unexpected):
            hint = " (the file's keys start with 'module.': saved from DataParallel/DDP; strip that prefix)"
        elif any(".lora_" in k or k.startswith("base_model.") for k in unexpected):
            hint = " (this looks like a LoRA adapter: load it with loralab.core.adapter_io.load_adapter)"
        raise ValueError(f"{path} does not fit this {type(model).__name__}: missing keys {missing[:8]}"
                         f"{' …' if len(missing) > 8 else ''} ({len(missing)}), unexpected keys {unexpected[:8]}"
                         f"{' …' if len(unexpected) > 8 else ''} ({len(unexpected)}){hint}")
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
           if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {len(bad)} tensors: {bad[:6]}. A different num_classes: pass "
                         "skip=('fc',); small_input=True changes conv1 (3x3): pass skip=('conv1',) as well")
    with torch.no_grad():
        for k, v in own.items():
            if k in sd:
                v.copy_(sd[k].to(v.dtype))
                report.loaded.append(k)
            else:  # a num_batches_tracked counter absent from an old checkpoint
                v.zero_()
    return report
