"""LoRA parameter accounting: the formula against counting the injected model (loralab and PEFT)."""
import pytest
import torch

from loralab.core.config import LoraConfig
from loralab.core.inject import count_parameters, inject_adapter
from loralab.models.resnet import resnet18
from loralab.tasks.vision.accounting import (SEED_TRAINABLE, TARGET_SETS, conv_specs, format_comparison,
                                             lora_accounting, seed_comparison, target_modules)


def test_formula_by_hand():
    specs = {c.name: c for c in conv_specs(resnet18())}
    assert len(specs) == 20
    assert specs["conv1"].lora_params(14) == 14 * (3 * 7 * 7 + 64) == 2954
    assert specs["layer1.0.conv1"].lora_params(14) == 14 * (64 * 9 + 64) == 8960
    assert specs["layer4.0.downsample.0"].lora_params(14) == 14 * (256 + 512) == 10752
    # per stage: stem 2954; layer1 4 x 8960; layer2 9856 + 3 x 17920 + 2688; layer3 19712 + 3 x 35840 + 5376;
    # layer4 39424 + 3 x 71680 + 10752
    by_hand = 2954 + 4 * 8960 + (9856 + 3 * 17920 + 2688) + (19712 + 3 * 35840 + 5376) + (39424 + 3 * 71680 + 10752)
    a = lora_accounting(resnet18(), 14)
    assert a.lora == a.trainable == by_hand == 502_922
    assert a.base == 11_689_512 and a.total == 11_689_512 + 502_922
    assert a.reduction == pytest.approx(1 - 502_922 / 11_689_512)
    assert len(target_modules(resnet18(), "no_downsample")) == 17
    bn_affine = sum(m.weight.numel() + m.bias.numel() for m in resnet18().modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn_affine == 9_600  # the docstring's "training all BN affine parameters adds 9,600"
    assert len(target_modules(resnet18(), "only_3x3")) == 16
    with pytest.raises(ValueError, match="unknown target set"):
        target_modules(resnet18(), "everything")


@pytest.mark.parametrize("target_set", sorted(TARGET_SETS))
@pytest.mark.parametrize("head", [None, "fc"])
def test_formula_equals_injected_model(target_set, head):
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    expect = lora_accounting(model, 14, target_set, head)
    cfg = LoraConfig(r=14, lora_alpha=16, lora_dropout=0.1, target_modules=target_modules(model, target_set),
                     modules_to_save=[head] if head else None)
    inject_adapter(model, cfg)
    assert count_parameters(model) == (expect.trainable, expect.total)
    assert expect.base == 11_181_642  # 11,689,512 - 512 x 990 - 990


def test_formula_equals_peft_count():
    peft = pytest.importorskip("peft")
    model = resnet18(num_classes=10)
    expect = lora_accounting(model, 14, "all_convs", "fc")
    names = target_modules(model, "all_convs")
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=14, lora_alpha=16, target_modules=names, modules_to_save=["fc"]))
    assert theirs.get_nb_trainable_parameters() == (expect.trainable, expect.total) == (508_052, 11_181_642 + 508_052)


def test_no_natural_target_set_reproduces_the_seed():
    rows = seed_comparison(14)
    assert len(rows) == 2 * len(TARGET_SETS) * 2
    assert all(abs(a.trainable - SEED_TRAINABLE) > 40_000 for _, a in rows)
    nearest = min((a for _, a in rows), key=lambda a: abs(a.trainable - SEED_TRAINABLE))
    assert (nearest.target_set, nearest.trainable) in {("only_3x3", 481_152), ("no_stem_no_downsample", 481_152)}
    assert "reduction=95.70%" in format_comparison(rows)  # all convs, no head, 1000 classes
    # the nearest simple reading: r = 12 on every conv with the 10-class head (436K, 96.3% of 11.69M)
    r12 = lora_accounting(resnet18(num_classes=10), 12, "all_convs", "fc")
    assert r12.trainable == 436_206 and round(100 * (1 - r12.trainable / 11_689_512), 1) == 96.3
