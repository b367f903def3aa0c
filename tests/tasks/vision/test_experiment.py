"""The vision experiment end to end on a tiny synthetic IDX data set (8x8 images, 3 classes): the run's
results.json, the baselines against hand counts, the saved model/adapter/head re-evaluated independently,
early stopping, pretrained weights with fc skipped, linear probing, the config's fields."""
import dataclasses
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from loralab.engine.config import ConfigError, get_preset, load_config
from loralab.engine.runner import run_training
from loralab.models.resnet import resnet18, resnet50
from loralab.tasks.vision import accounting
from loralab.tasks.vision import setup as vx
from loralab.tasks.vision.experiment import EXPERIMENT, VisionData

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's, the default normalisation


def _idx(dims, payload: bytes, code: int) -> bytes:
    return struct.pack(">I", 0x800 | code) + struct.pack(f">{len(dims)}I", *dims) + payload


def _images(labels: np.ndarray, rng) -> np.ndarray:
    """Noise plus one bright 2-row band per class (row 2c): learnable in a few steps."""
    imgs = rng.integers(0, 60, (len(labels), 8, 8)).astype(np.uint8)
    for i, c in enumerate(labels):
        imgs[i, (2 * c) % 8:(2 * c) % 8 + 2, :] = 250
    return imgs


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """A Fashion-MNIST-layout folder: 90 training images of classes 0-5 (15 each) and 36 test images
    (6 each; test labels listed class by class), train gzip, test raw."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    train_labels = rng.permutation(np.repeat(np.arange(6), 15)).astype(np.uint8)
    test_labels = np.repeat(np.arange(6), 6).astype(np.uint8)
    for (img_name, lab_name), labels, gz in ((("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), train_labels, True),
                                             (("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), test_labels, False)):
        imgs = _images(labels, rng)
        for name, blob in ((img_name, _idx(list(imgs.shape), imgs.tobytes(), 3)),
                           (lab_name, _idx([len(labels)], labels.tobytes(), 1))):
            (root / (name + ".gz" if gz else name)).write_bytes(gzip.compress(blob) if gz else blob)
    return root


def _cfg(idx_dir, tmp_path, *extra, method="lora"):
    base = ["experiment=vision", "model.name=resnet18-small", f"data.data_dir={idx_dir}", "data.classes=[1,2,3]",
            "data.val_fraction=0.2", f"lora.method={method}", "train.epochs=3", "train.batch_size=8",
            "train.quiet=true", f"out_dir={tmp_path / 'runs'}"]
    base += {"lora": ["train.lr=3e-3", "lora.r=4", "lora.lora_alpha=8", "lora.target_modules=all_convs"],
             "full": ["train.lr=2e-3"], "linear_probe": ["train.lr=3e-2"]}.get(method, [])
    return load_config(overrides=base + list(extra))


def _reference_accuracy(model, idx_dir, classes):
    """Accuracy on the test file computed here: x = (u8 / 255 - mean) / std, argmax, compared with the
    relabelled class ids (independent of the experiment's reader, transform and predict)."""
    raw = (Path(idx_dir) / "t10k-images-idx3-ubyte").read_bytes()[16:]
    labels = np.frombuffer((Path(idx_dir) / "t10k-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    imgs = np.frombuffer(raw, np.uint8).reshape(-1, 1, 8, 8)
    keep = np.isin(labels, classes)
    x = (torch.from_numpy(imgs[keep].astype(np.float32)) / 255 - MEAN) / STD
    y = torch.tensor([classes.index(int(v)) for v in labels[keep]])
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).float().mean())


def test_lora_run_results_schema_and_independent_checks(idx_dir, tmp_path):
    run, res = run_training(_cfg(idx_dir, tmp_path))
    saved = json.loads((run.dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert {"experiment", "main_metric", "greater_is_better", "score", "baseline", "margin", "learned", "metrics",
            "params", "wall_seconds", "tokens_per_second", "details"} <= set(saved)
    assert saved["experiment"] == "vision" and saved["main_metric"] == "accuracy" and saved["greater_is_better"]
    # the test set of classes [1, 2, 3]: 6 images each; the training labels are balanced (12 each after the
    # 20% split: 3 per class to validation), so the majority is the lowest label (class 1): 6 / 18 right
    d = saved["details"]
    assert d["images"] == {"train": 36, "validation": 9, "test": 18}
    assert saved["baseline"]["score"] == pytest.approx(6 / 18) and saved["baseline"]["kind"].startswith("majority class (1")
    assert saved["margin"] == pytest.approx(2 * np.sqrt((1 / 3) * (2 / 3) / 18))
    assert set(d["per_class_accuracy"]) == {"1 Trouser", "2 Pullover", "3 Dress"}
    per = [saved["metrics"][f"class_{k}_accuracy"] for k in range(3)]
    assert saved["score"] == pytest.approx(sum(per) / 3)  # balanced test set: accuracy = mean per-class accuracy
    assert saved["learned"] is True and saved["score"] > 0.9
    # trainable = the accounting's formula for LoRA r=4 on every conv + the 3-class fc
    expect = accounting.lora_accounting(resnet18(num_classes=3, in_channels=1, small_input=True), 4, "all_convs", "fc")
    assert saved["params"]["trainable"] == expect.trainable
    assert d["images_per_second_train"] > 0 and d["images_per_second_eval"] > 0 and d["seconds_per_epoch"] > 0
    assert d["unadapted_accuracy"] == saved["baseline"]["metrics"]["unadapted_accuracy"]
    # the adapter (PEFT format) on a fresh base reproduces the reported accuracy
    from loralab.core.adapter_io import load_adapter

    torch.manual_seed(0)  # the run's train.seed: the same random base the run started from
    fresh = resnet18(num_classes=3, in_channels=1, small_input=True)
    load_adapter(fresh, d["saved"]["adapter"])
    assert _reference_accuracy(fresh, idx_dir, [1, 2, 3]) == pytest.approx(saved["score"])


def test_full_saves_model_and_pretrained_loads_with_fc_skipped(idx_dir, tmp_path):
    run, res = run_training(_cfg(idx_dir, tmp_path, method="full"))
    path = Path(res["details"]["saved"]["model"])
    assert path == run.dir / "model.safetensors" and res["learned"]
    model = resnet18(num_classes=3, in_channels=1, small_input=True)
    model.load_state_dict(load_file(str(path)))  # torchvision names, every tensor
    assert _reference_accuracy(model, idx_dir, [1, 2, 3]) == pytest.approx(res["score"])
    assert res["params"]["trainable"] == res["params"]["total"] == sum(p.numel() for p in model.parameters())

    # two classes: the file's 3-class fc is skipped; everything else is the file's
    cfg = _cfg(idx_dir, tmp_path, "data.classes=[4,5]", f"data.pretrained={path}")
    built = EXPERIMENT.build(cfg)
    file = load_file(str(path))
    state = built.model.state_dict()
    assert torch.equal(state["layer3.1.conv2.base_layer.weight"], file["layer3.1.conv2.weight"])
    assert torch.equal(state["bn1.running_var"], file["bn1.running_var"])
    info = built.state["pretrained"]
    assert info["fc"].startswith("skipped: the file's fc has 3 classes, this run 2")
    assert info["skipped"] == ["fc.bias", "fc.weight"] and built.model.fc.original_module.weight.shape == (2, 512)
    # the same class count: fc is loaded too
    built = EXPERIMENT.build(_cfg(idx_dir, tmp_path, "data.classes=[3,4,5]", f"data.pretrained={path}", method="full"))
    assert built.state["pretrained"]["fc"] == "loaded" and torch.equal(built.model.fc.weight, file["fc.weight"])


def test_early_stopping_stops(idx_dir, tmp_path):
    """lr 1e-12: the validation accuracy never improves after the first evaluation; patience 2 with an
    evaluation every step stops after step 3 of 15."""
    run, res = run_training(_cfg(idx_dir, tmp_path, "train.lr=1e-12", "train.eval_every=1",
                                 "train.early_stopping_patience=2", "train.epochs=3"))
    fit = res["details"]["fit"]
    assert fit["status"] == "early_stopped" and fit["global_step"] == 3 and fit["best_step"] == 1
    lines = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert len([ln for ln in lines if "eval/accuracy" in ln]) == 3


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_linear_probe_trains_only_fc_with_frozen_statistics(idx_dir, tmp_path):
    cfg = _cfg(idx_dir, tmp_path, "train.lr=3e-2", method="linear_probe")
    built = EXPERIMENT.build(cfg)
    assert _trainable(built.model) == ["fc.bias", "fc.weight"] and built.model.freeze_bn_stats
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    from loralab.engine.trainer import fit

    fit(built.model, built.task, cfg.train, run_dir=None, log=lambda *a: None)
    after = built.model.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["fc.bias", "fc.weight"]  # no BN statistic, no conv moved
    run, res = run_training(_cfg(idx_dir, tmp_path, "train.lr=3e-2", method="linear_probe"))
    assert res["params"]["trainable"] == 512 * 3 + 3 and res["learned"]
    head = load_file(res["details"]["saved"]["head"])
    assert sorted(head) == ["fc.bias", "fc.weight"] and head["fc.weight"].shape == (3, 512)


def test_linear_probe_through_the_config(idx_dir, tmp_path):
    cfg = _cfg(idx_dir, tmp_path, method="linear_probe")
    assert cfg.lora.method == "linear_probe"
    _, res = run_training(cfg)
    assert res["params"]["trainable"] == 512 * 3 + 3
    assert get_preset("vision-fmnist-adapt-probe")["lora.method"] == "linear_probe"
    load_config(preset="vision-fmnist-adapt-probe")


def test_bn_statistics_frozen_and_updated(idx_dir, tmp_path):
    m = resnet18(num_classes=3, in_channels=1, small_input=True)
    m.freeze_bn_stats = True
    m.train()
    before = m.bn1.running_mean.clone()
    m(torch.randn(4, 1, 8, 8))
    assert torch.equal(m.bn1.running_mean, before) and not m.bn1.training and m.training
    m.freeze_bn_stats = False
    m.train()(torch.randn(4, 1, 8, 8))
    assert not torch.equal(m.bn1.running_mean, before)
    built = EXPERIMENT.build(_cfg(idx_dir, tmp_path, "data.bn_stats=update"))
    assert built.state["bn_stats"] == "update" and not built.model.freeze_bn_stats
    _, res = run_training(_cfg(idx_dir, tmp_path, "data.bn_stats=update"))
    stats = load_file(res["details"]["saved"]["bn_stats"])
    assert "bn1.running_mean" in stats and "layer4.1.bn2.running_var" in stats
    assert res["details"]["bn_stats"].startswith("updated; those of the best validation accuracy")


def test_targets_are_exact_conv_names():
    m = resnet50(num_classes=3, small_input=True)
    regex, described = vx.resolve_targets(m, "only_3x3")
    import re

    hits = [n for n, _ in m.named_modules() if re.fullmatch(regex, n)]
    assert hits == accounting.target_modules(m, "only_3x3") and "layer1.0.conv1" not in hits and "conv1" in hits
    assert vx.resolve_targets(m, ["query", "value"])[1] == "all_convs"  # the schema's transformer default
    assert vx.resolve_targets(m, ["conv2"]) == (["conv2"], "as written")


@pytest.mark.parametrize("override, match", [
    ("model.name=microsoft/resnet-50", "not models of the Hugging Face hub"),
    ("lora.modules_to_save=[layer4]", "leaves the classifier 'fc' frozen"),
    ("model.dtype=bfloat16", "float32"),
    ("data.dataset=mnist", None),  # no data_dir default for MNIST: the tmp folder is given, so it reads
])
def test_clear_errors(idx_dir, tmp_path, override, match):
    with pytest.raises(ValueError, match="no bias"):
        EXPERIMENT.build(_cfg(idx_dir, tmp_path, method="bitfit"))
    cfg = _cfg(idx_dir, tmp_path, override)
    if match is None:
        assert EXPERIMENT.build(cfg).state["splits"].train.classes == ("1", "2", "3")
        return
    with pytest.raises(ValueError, match=match):
        EXPERIMENT.build(cfg)


def test_stem_mismatch_and_missing_file(idx_dir, tmp_path):
    path = tmp_path / "imagenet-like.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18(in_channels=1).state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"stem conv1 is \(7, 7\).*use model.name=resnet18"):
        EXPERIMENT.build(_cfg(idx_dir, tmp_path, f"data.pretrained={path}"))
    with pytest.raises(FileNotFoundError, match="vision-fmnist-pretrain"):
        EXPERIMENT.build(_cfg(idx_dir, tmp_path, "data.pretrained=nowhere/model.safetensors"))


def test_unknown_keys_and_refused_fields(idx_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        _cfg(idx_dir, tmp_path, "data.val_fractoin=0.2")
    with pytest.raises(ConfigError, match="data.max_length: is a token count"):
        _cfg(idx_dir, tmp_path, "data.max_length=64")
    with pytest.raises(ConfigError, match="data.train_file: is not read"):
        _cfg(idx_dir, tmp_path, "data.train_file=x")
    with pytest.raises(ConfigError, match="data.val_fraction"):
        _cfg(idx_dir, tmp_path, "data.val_fraction=0")
    with pytest.raises(ConfigError, match="data.classes"):
        _cfg(idx_dir, tmp_path, "data.classes=[3,3]")
    with pytest.raises(ConfigError, match="data.dataset"):
        _cfg(idx_dir, tmp_path, "data.dataset=cifar100")


def _observe(idx_dir, tmp_path, *override):
    b = EXPERIMENT.build(_cfg(idx_dir, tmp_path, *override))
    s, t = b.state["splits"], b.state["transform"]
    return {"classes": s.class_ids, "n": (len(s.train), len(s.val), len(s.test)), "val": s.val.labels.tolist()
            + s.val.images.sum((1, 2, 3)).tolist(), "transform": dataclasses.astuple(t),
            "frozen": b.model.freeze_bn_stats, "pretrained": b.state["pretrained"], "source": s.source}


def test_every_data_field_is_read(idx_dir, tmp_path):
    """Each VisionData field changes what build() does (or is refused when set: see the test above)."""
    other = tmp_path / "copy"
    other.mkdir()
    for f in Path(idx_dir).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in resnet18(num_classes=3, in_channels=1, small_input=True).state_dict().items()},
              str(weights))
    changes = {"dataset": "data.dataset=mnist", "classes": "data.classes=[1,2]", "val_fraction": "data.val_fraction=0.4",
               "image_size": "data.image_size=12", "augment": "data.augment=true", "normalization": None,
               "pretrained": f"data.pretrained={weights}", "bn_stats": "data.bn_stats=update",
               "data_dir": f"data.data_dir={other}", "train_samples": "data.train_samples=30",
               "eval_samples": "data.eval_samples=5", "seed": "data.seed=1",
               "train_file": None, "eval_file": None, "max_length": None}  # None: refused when set (other tests)
    assert set(changes) == {f.name for f in dataclasses.fields(VisionData)}
    base = _observe(idx_dir, tmp_path)
    for name, override in changes.items():
        if override is None:
            continue
        if name == "dataset":  # mnist's class names
            assert EXPERIMENT.build(_cfg(idx_dir, tmp_path, override)).state["splits"].train.classes == ("1", "2", "3")
            continue
        assert _observe(idx_dir, tmp_path, override) != base, name
    with pytest.raises(ValueError, match="normalization=imagenet needs 3 channels"):
        EXPERIMENT.build(_cfg(idx_dir, tmp_path, "data.normalization=imagenet"))


def test_presets_have_docs_and_load(tmp_path):
    presets = EXPERIMENT.presets
    assert set(presets) == {"vision-fmnist-pretrain", "vision-fmnist-adapt-lora", "vision-fmnist-adapt-full",
                            "vision-fmnist-adapt-probe", "vision-cifar10-seed"}
    for name, p in presets.items():
        assert p["_doc"] and "\n" not in p["_doc"], name
        cfg = load_config(preset=name)
        assert cfg.experiment == "vision"
    seed = load_config(preset="vision-cifar10-seed")
    assert (seed.lora.r, seed.lora.lora_alpha, seed.lora.lora_dropout, seed.train.lr, seed.train.batch_size,
            seed.train.early_stopping_patience, seed.data.image_size, seed.model.name) == \
        (14, 16.0, 0.1, 1e-4, 32, 7, 224, "resnet18")
    lora = load_config(preset="vision-fmnist-adapt-lora")
    assert lora.data.classes == [5, 6, 7, 8, 9] and lora.lora.target_modules == "all_convs"
    assert lora.data.pretrained == "runs/vision-fmnist-pretrain/model.safetensors"
    assert load_config(preset="vision-fmnist-pretrain").data.classes == [0, 1, 2, 3, 4]
