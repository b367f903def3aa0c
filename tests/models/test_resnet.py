"""ResNet: torchvision's state-dict layout (hand-written reference list), parameter counts, loading."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from loralab.models.resnet import load_resnet_weights, read_state_dict, resnet18, resnet34, resnet50

# torchvision ResNet-18, written out by hand from the architecture: one line per module.
# "conv NAME out in k" -> NAME.weight (out, in, k, k); "bn NAME c" -> weight, bias, running_mean,
# running_var (c,) and num_batches_tracked (); "fc" -> fc.weight (1000, 512), fc.bias (1000,).
TORCHVISION_RESNET18 = """
conv conv1 64 3 7
bn bn1 64
conv layer1.0.conv1 64 64 3
bn layer1.0.bn1 64
conv layer1.0.conv2 64 64 3
bn layer1.0.bn2 64
conv layer1.1.conv1 64 64 3
bn layer1.1.bn1 64
conv layer1.1.conv2 64 64 3
bn layer1.1.bn2 64
conv layer2.0.conv1 128 64 3
bn layer2.0.bn1 128
conv layer2.0.conv2 128 128 3
bn layer2.0.bn2 128
conv layer2.0.downsample.0 128 64 1
bn layer2.0.downsample.1 128
conv layer2.1.conv1 128 128 3
bn layer2.1.bn1 128
conv layer2.1.conv2 128 128 3
bn layer2.1.bn2 128
conv layer3.0.conv1 256 128 3
bn layer3.0.bn1 256
conv layer3.0.conv2 256 256 3
bn layer3.0.bn2 256
conv layer3.0.downsample.0 256 128 1
bn layer3.0.downsample.1 256
conv layer3.1.conv1 256 256 3
bn layer3.1.bn1 256
conv layer3.1.conv2 256 256 3
bn layer3.1.bn2 256
conv layer4.0.conv1 512 256 3
bn layer4.0.bn1 512
conv layer4.0.conv2 512 512 3
bn layer4.0.bn2 512
conv layer4.0.downsample.0 512 256 1
bn layer4.0.downsample.1 512
conv layer4.1.conv1 512 512 3
bn layer4.1.bn1 512
conv layer4.1.conv2 512 512 3
bn layer4.1.bn2 512
fc
"""


def _reference() -> tuple[dict[str, tuple[int, ...]], int]:
    shapes, n_params = {}, 0
    for line in TORCHVISION_RESNET18.strip().splitlines():
        kind, *rest = line.split()
        if kind == "conv":
            name, o, i, k = rest[0], *map(int, rest[1:])
            shapes[f"{name}.weight"] = (o, i, k, k)
            n_params += 1
        elif kind == "bn":
            name, c = rest[0], int(rest[1])
            for s in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{name}.{s}"] = (c,)
            shapes[f"{name}.num_batches_tracked"] = ()
            n_params += 2
        else:
            shapes["fc.weight"], shapes["fc.bias"] = (1000, 512), (1000,)
            n_params += 2
    return shapes, n_params


def test_resnet18_state_dict_equals_torchvision_layout():
    ref, n_params = _reference()
    assert n_params == 62 and len(ref) == 62 + 3 * 20  # 20 BNs: running_mean, running_var, counter
    got = {k: tuple(v.shape) for k, v in resnet18().state_dict().items()}
    assert got == ref
    assert len(list(resnet18().parameters())) == 62
    assert list(resnet18().state_dict()) == list(ref)  # same order too (torchvision's)


def test_parameter_counts_and_options():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(resnet18()) == 11_689_512
    assert count(resnet34()) == 21_797_672
    assert count(resnet50()) == 25_557_032
    # 10 classes: fc 512*10 + 10 instead of 512*1000 + 1000; grey input: conv1 64*1*49 instead of 64*3*49
    assert count(resnet18(num_classes=10)) == 11_689_512 - 513_000 + 5_130
    assert count(resnet18(in_channels=1)) == 11_689_512 - 64 * 2 * 49
    small = resnet18(num_classes=10, in_channels=1, small_input=True)
    assert small.conv1.weight.shape == (64, 1, 3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    sd50 = resnet50().state_dict()
    assert sd50["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
    assert sd50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3
    assert resnet50().layer2[0].conv2.stride == (2, 2) and resnet50().layer2[0].conv1.stride == (1, 1)
    assert sd50["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1) and sd50["fc.weight"].shape == (1000, 2048)
    with pytest.raises(ValueError, match="4 stages"):
        from loralab.models.resnet import BasicBlock, ResNet
        ResNet(BasicBlock, (2, 2, 2))


def test_small_stem_keeps_resolution_until_layer2():
    m = resnet18(num_classes=5, in_channels=1, small_input=True).eval()
    x = torch.randn(2, 1, 28, 28)
    feats = m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))
    assert feats.shape == (2, 64, 28, 28)
    assert m(x).shape == (2, 5)
    big = resnet18().eval()
    assert big.layer1(big.maxpool(big.relu(big.bn1(big.conv1(torch.randn(1, 3, 224, 224)))))).shape == (1, 64, 56, 56)


def test_basic_block_forward_by_hand():
    """One BasicBlock with a downsample, eval-mode BN, against F.conv2d/F.batch_norm in float64."""
    torch.manual_seed(0)
    m = resnet18().double().eval()
    blk = m.layer2[0]
    for bn in (blk.bn1, blk.bn2, blk.downsample[1]):
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    x = torch.randn(2, 64, 8, 8, dtype=torch.float64)

    def bn(t, b):
        return F.batch_norm(t, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)

    h = F.relu(bn(F.conv2d(x, blk.conv1.weight, stride=2, padding=1), blk.bn1))
    h = bn(F.conv2d(h, blk.conv2.weight, padding=1), blk.bn2)
    short = bn(F.conv2d(x, blk.downsample[0].weight, stride=2), blk.downsample[1])
    torch.testing.assert_close(blk(x), F.relu(h + short), rtol=0, atol=1e-12)


def _randomised(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_()
    return model


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_load_round_trip(tmp_path, fmt):
    src = _randomised(resnet18(num_classes=10))
    path = tmp_path / f"w.{fmt}"
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
    dst = resnet18(num_classes=10)
    report = load_resnet_weights(dst, path)
    assert len(report.loaded) == 122 and not report.skipped and not report.defaulted
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_skip_fc_and_missing_counters(tmp_path):
    src = _randomised(resnet18())  # 1000 classes
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(sd, str(tmp_path / "w.safetensors"))
    dst = resnet18(num_classes=10)
    fc_before = dst.fc.weight.detach().clone()
    with pytest.raises(ValueError, match=r"shape mismatch.*fc\.weight.*skip=\('fc',\)"):
        load_resnet_weights(dst, tmp_path / "w.safetensors")
    report = load_resnet_weights(dst, tmp_path / "w.safetensors", skip=("fc",))
    assert report.skipped == ["fc.bias", "fc.weight"] and len(report.defaulted) == 20
    assert torch.equal(dst.fc.weight, fc_before)
    assert torch.equal(dst.layer3[1].conv2.weight, src.layer3[1].conv2.weight)
    assert int(dst.bn1.num_batches_tracked) == 0


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = resnet18().state_dict()
    bad = {k: v for k, v in sd.items() if not k.startswith("layer4.1.conv2")}
    bad["layer5.0.conv1.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"a\.safetensors.*missing keys \['layer4\.1\.conv2\.weight'\].*"
                                         r"unexpected keys \['layer5\.0\.conv1\.weight'\]"):
        load_resnet_weights(resnet18(), tmp_path / "a.safetensors")
    save_file({"module." + k: v for k, v in sd.items()}, str(tmp_path / "ddp.safetensors"))
    with pytest.raises(ValueError, match="DataParallel"):
        load_resnet_weights(resnet18(), tmp_path / "ddp.safetensors")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_pth_is_never_fully_unpickled(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "ran"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Evil(marker)}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*never does a full unpickle"):
        read_state_dict(path)
    assert not marker.exists()
    torch.save({"state_dict": resnet18().state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(ValueError, match="flat state dict"):
        read_state_dict(tmp_path / "ckpt.pth")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope.safetensors")
