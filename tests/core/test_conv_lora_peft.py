"""Conv2d LoRA on a ResNet: merged == unmerged (float64), PEFT's Conv2d file layout, and the PEFT round trip
both ways (PEFT is the oracle: same outputs from the same file)."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from loralab.core.adapter_io import load_adapter, save_adapter
from loralab.core.config import LoraConfig
from loralab.core.inject import inject_adapter, merge_adapters, unmerge_adapters
from loralab.models.resnet import resnet18

peft = pytest.importorskip("peft")
D = torch.float64
TARGETS = ["conv1", "conv2", "downsample.0"]  # every conv of a ResNet-18 (whole-component suffixes)
R = 4


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    m = resnet18(num_classes=10, small_input=True).to(D).eval()
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bn1.bias", "bn2.bias")):
                t.normal_(0, 0.1)
    return m


def _x() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=D)


def _loralab_model(base) -> torch.nn.Module:
    model = copy.deepcopy(base)
    inject_adapter(model, LoraConfig(r=R, lora_alpha=8, target_modules=TARGETS, modules_to_save=["fc"]))
    torch.manual_seed(2)
    with torch.no_grad():  # B = 0 at init: randomise so the adapter is not a no-op
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_merged_equals_unmerged_float64():
    base = _base()
    model = _loralab_model(base)
    x = _x()
    with torch.no_grad():
        y0, y = base(x), model(x)
        assert (y - y0).abs().max() > 1e-3  # the adapter changes the function
        merge_adapters(model)
        assert model.layer1[0].conv1.merged_adapters == ["default"] and model.layer1[0].conv1._branch == ()
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-10)
        conv = model.layer2[0].conv1
        A, B = conv.lora_A["default"].weight, conv.lora_B["default"].weight
        W0 = base.layer2[0].conv1.weight
        # merged kernel by hand: W0[o,i,h,w] + (alpha / r) * sum_k B[o,k] A[k,i,h,w]
        torch.testing.assert_close(conv.base_layer.weight, W0 + 2.0 * torch.einsum("ok,kihw->oihw", B[:, :, 0, 0], A),
                                   rtol=0, atol=1e-12)
        unmerge_adapters(model)
        torch.testing.assert_close(model.layer2[0].conv1.base_layer.weight, W0, rtol=0, atol=1e-12)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-10)


def test_saved_adapter_has_peft_conv_layout(tmp_path):
    model = _loralab_model(_base())
    save_adapter(model, tmp_path)
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    p = "base_model.model."
    assert sd[p + "conv1.lora_A.weight"].shape == (R, 3, 3, 3)
    assert sd[p + "conv1.lora_B.weight"].shape == (64, R, 1, 1)
    assert sd[p + "layer2.0.conv1.lora_A.weight"].shape == (R, 64, 3, 3)
    assert sd[p + "layer2.0.conv1.lora_B.weight"].shape == (128, R, 1, 1)
    assert sd[p + "layer3.0.downsample.0.lora_A.weight"].shape == (R, 128, 1, 1)
    assert sd[p + "layer3.0.downsample.0.lora_B.weight"].shape == (256, R, 1, 1)
    assert sd[p + "fc.weight"].shape == (10, 512) and sd[p + "fc.bias"].shape == (10,)
    n_convs = 1 + 8 * 2 + 3
    assert len(sd) == 2 * n_convs + 2
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == R


def test_loralab_adapter_loads_in_peft_with_same_outputs(tmp_path):
    base = _base()
    model = _loralab_model(base)
    save_adapter(model, tmp_path)
    x = _x()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    assert isinstance(theirs.base_model.model.layer1[0].conv1, peft.tuners.lora.Conv2d)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=0, atol=1e-10)


def test_peft_adapter_loads_in_loralab_with_same_outputs(tmp_path):
    base = _base()
    cfg = peft.LoraConfig(r=R, lora_alpha=8, target_modules=TARGETS, modules_to_save=["fc"], init_lora_weights=False)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(str(tmp_path))
    ours = load_adapter(copy.deepcopy(base), tmp_path, trainable=False).eval()
    assert sum(1 for m in ours.modules() if type(m).__name__ == "LoraConv2d") == 20
    x = _x()
    with torch.no_grad():
        y = theirs(x)
        assert (y - base(x)).abs().max() > 1e-3
        torch.testing.assert_close(ours(x), y, rtol=0, atol=1e-10)
        theirs.merge_adapter()
        merge_adapters(ours)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-10)
