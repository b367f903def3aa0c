"""The image-classification experiment: LoRA on a ResNet's convolutions, full fine-tuning, linear probing.

    build(cfg)               the data (class subset, train subsample, seeded stratified validation split,
                             test set), loralab's own ResNet (``model.name``: resnet18 | resnet34 | resnet50,
                             ``-small`` for the 3x3 stride-1 stem without max-pool), optionally pretrained
                             weights (``data.pretrained``), the method applied, the TaskSpec
    baseline(built)          the majority class of the training labels, predicted for every test image;
                             the un-adapted model's test accuracy goes into the baseline's metrics
    report(built, fit, dir)  test accuracy (top-1 and per class) of the kept-best model; what trained is
                             saved in the run dir (see below)

Selection and early stopping use the validation split only (``task.evaluate``: ``accuracy`` and
``eval_loss`` on it, with ``train.early_stopping_patience`` and ``train.keep_best``); the test set is
evaluated only in baseline() (the un-adapted model) and report().

Methods (``lora.method``) and what trains; the head is ``fc`` (or ``lora.modules_to_save``, which must
contain it):
    lora          A, B on the targeted convs (r (C_in kH kW + C_out) each) + fc as a modules_to_save.
                  ``lora.target_modules``: a name of ``accounting.TARGET_SETS`` ("all_convs",
                  "no_downsample", "only_3x3", "no_stem", "no_stem_no_downsample"), module-name suffixes
                  (["conv1", "conv2", "downsample.0"]) or one regex; the schema's default ["query",
                  "value"] (a transformer's W_q, W_v) means "all_convs" here.
                  Saved: ``<run_dir>/adapter`` (PEFT format, fc included).
    full          every parameter. Saved: ``<run_dir>/model.safetensors`` (torchvision names: usable as
                  another run's ``data.pretrained``).
    linear_probe  fc alone (the backbone, BN statistics included, is frozen). Saved:
                  ``<run_dir>/head.safetensors`` (fc.weight, fc.bias). Needs "linear_probe" in
                  ``LoraSection.method``'s Literal (engine/schema.py).
    bitfit        refused: ResNet convs have no bias, so BitFit would train only BN shifts and fc.

BatchNorm running statistics (``data.bn_stats``): "auto" updates them with full fine-tuning only; with
lora and linear_probe they stay the pretrained ones, so base weights + the saved adapter/head reproduce
the evaluated model exactly. With bn_stats=update and lora they are saved to
``<run_dir>/bn_stats.safetensors``. The engine checkpoints running statistics and keeps them with the
kept-best weights, so a resumed run and its best evaluation use the statistics they were computed with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from loralab.engine.checkpoint import running_statistics
from loralab.engine.experiment import Baseline, Built, Result, margin_for_rate
from loralab.engine.schema import DataConfig
from loralab.engine.task import Batch, TaskSpec
from loralab.engine.typed_config import require
from loralab.tasks.common.results import make_result, save_trained
from loralab.tasks.common.sampling import subsample
from loralab.tasks.vision.setup import (HEAD, VisionConfigError, _log, apply_vision_method, check_method,
                                        check_model_config, load_pretrained, parse_model_name, pretrained_channels)
from loralab.tasks.vision.data import (FASHION_MNIST_CLASSES, MNIST_CLASSES, ImageSet, default_fashion_mnist_dir,
                                       read_cifar10, read_mnist, select_classes, split_validation)
from loralab.tasks.vision.transforms import (CIFAR10_MEAN, CIFAR10_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                                             IMAGENET_MEAN, IMAGENET_STD, ImageTransform)

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # MNIST training set
DATASET_STATS = {"fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD), "mnist": (MNIST_MEAN, MNIST_STD),
                 "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}
DEFAULT_MAX_LENGTH = DataConfig.__dataclass_fields__["max_length"].default


@dataclass
class VisionData(DataConfig):
    """Image classification data: which data set, which classes, the validation split, the pixels.

    Of the shared fields, ``data_dir`` (the data set's folder), ``train_samples`` (a seeded random
    subset of the class-filtered training file, before the validation split), ``eval_samples`` (the
    first N test images of the chosen classes) and ``seed`` (subsample and validation split) apply;
    ``train_file``/``eval_file`` and ``max_length`` (a token count) are refused when set."""

    dataset: Literal["fashion-mnist", "mnist", "cifar10"] = "fashion-mnist"
    """fashion-mnist / mnist: IDX files (gzip or raw) in data_dir (Fashion-MNIST's default: ../shared/data/
    fashion-mnist or /usr/share/datasets/fashion-mnist); cifar10: cifar-10-batches-bin or -py in data_dir."""
    classes: list[int] | None = None
    """Class ids to keep, relabelled 0..k-1 in the order given ([5, 6, 7, 8, 9]: 5 -> 0, ...); None: all."""
    val_fraction: float = 0.1
    """Fraction of each class of the training images held out (seeded by data.seed, stratified) for
    early stopping and checkpoint selection, in (0, 0.5]."""
    image_size: int | None = None
    """Resize images to this square size (bilinear, antialiased); None: the native size (28 or 32)."""
    augment: bool = False
    """Training-time random crop (zero padding of image_size / 8, then back to size) and horizontal flip
    (no flip for mnist: a mirrored digit is another symbol)."""
    normalization: Literal["dataset", "imagenet"] = "dataset"
    """Per-channel mean/std: the data set's own training statistics, or ImageNet's (for ImageNet weights)."""
    pretrained: str | None = None
    """ResNet weights with torchvision's names (.safetensors, or a .pth state dict read with
    torch.load(weights_only=True)); fc is skipped when its class count differs from len(classes).
    A full-fine-tuning run's <run_dir>/model.safetensors is such a file. None: random init."""
    bn_stats: Literal["auto", "update", "frozen"] = "auto"
    """BatchNorm running statistics during training: update them, keep them frozen, or auto (update with
    lora.method=full only; frozen with lora and linear_probe, so base + adapter reproduce the model)."""

    def check(self) -> list[tuple[str, str]]:
        e = super().check()
        require(e, 0.0 < self.val_fraction <= 0.5, "val_fraction",
                f"must be in (0, 0.5] (the validation split selects checkpoints), got {self.val_fraction}")
        require(e, self.image_size is None or 8 <= self.image_size <= 1024, "image_size",
                f"must be in [8, 1024] or null (native size), got {self.image_size}")
        if self.classes is not None:
            limit = 10
            require(e, len(self.classes) >= 2 and len(set(self.classes)) == len(self.classes)
                    and all(0 <= c < limit for c in self.classes), "classes",
                    f"must be at least 2 distinct class ids in [0, {limit}) (or null: all), got {self.classes}")
        require(e, self.max_length == DEFAULT_MAX_LENGTH, "max_length",
                f"is a token count; images have no tokens (set data.image_size for the resolution), got "
                f"{self.max_length}")
        for name in ("train_file", "eval_file"):
            require(e, getattr(self, name) is None, name,
                    "is not read by the vision experiment: put the data set's files in one folder and set "
                    "data.data_dir")
        return e


# ---------------------------------------------------------------- data


@dataclass
class VisionSplits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    class_ids: list[int]
    """The original class id of each new label."""
    source: str


def _dataset_dir(d: VisionData) -> Path:
    if d.data_dir:
        root = Path(d.data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"data.data_dir={d.data_dir!r}: no such folder ({root.resolve()})")
        return root
    if d.dataset == "fashion-mnist":
        return default_fashion_mnist_dir()
    what = {"mnist": "the MNIST IDX files (train-images-idx3-ubyte[.gz], ...)",
            "cifar10": "cifar-10-batches-bin/ (or cifar-10-batches-py/) from "
                       "https://www.cs.toronto.edu/~kriz/cifar.html"}
    raise FileNotFoundError(f"data.dataset={d.dataset}: no default location on this machine; set data.data_dir to "
                            f"the folder holding {what[d.dataset]}")


def load_splits(d: VisionData) -> VisionSplits:
    """Train / validation / test per the data section (see ``VisionData``)."""
    root = _dataset_dir(d)
    if d.dataset == "cifar10":
        train, test = read_cifar10(root, "train"), read_cifar10(root, "test")
    else:
        names = FASHION_MNIST_CLASSES if d.dataset == "fashion-mnist" else MNIST_CLASSES
        train, test = read_mnist(root, "train", names), read_mnist(root, "test", names)
    class_ids = list(d.classes) if d.classes is not None else list(range(len(train.classes)))
    if d.classes is not None:
        train, test = select_classes(train, class_ids), select_classes(test, class_ids)
    if d.train_samples:
        keep = subsample(range(len(train)), d.train_samples, d.seed)
        train = train.subset(torch.tensor(keep, dtype=torch.long))
    train, val = split_validation(train, d.val_fraction, d.seed)
    if d.eval_samples:
        test = test.subset(torch.arange(min(d.eval_samples, len(test))))
    for name, part in (("training", train), ("validation", val), ("test", test)):
        if len(part) == 0:
            raise ValueError(f"the {name} split is empty ({d.dataset} in {root}, classes {class_ids}, "
                             f"train_samples={d.train_samples}, val_fraction={d.val_fraction}); use more images")
    missing = sorted(set(range(len(class_ids))) - set(train.labels.tolist()))
    if missing:
        raise ValueError(f"classes {[class_ids[m] for m in missing]} have no training image after data.train_samples="
                         f"{d.train_samples} and the validation split; raise data.train_samples")
    return VisionSplits(train, val, test, class_ids, str(root))


def make_transform(d: VisionData, channels: int, native: int) -> ImageTransform:
    if d.normalization == "imagenet":
        if channels != 3:
            raise VisionConfigError(f"data.normalization=imagenet needs 3 channels; {d.dataset} has {channels} (use "
                                    "data.normalization=dataset, or 3-channel pretrained weights, which replicate "
                                    "gray)")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = DATASET_STATS[d.dataset]
        if len(mean) != channels:  # gray data replicated to 3 channels for 3-channel weights
            mean, std = mean * channels, std * channels
    size = d.image_size or native
    return ImageTransform(mean=tuple(mean), std=tuple(std), size=d.image_size,
                          crop_padding=max(1, round(size / 8)) if d.augment else None,
                          hflip=d.augment and d.dataset != "mnist")


class ImageExamples:
    """The training images as the trainer's indexable dataset: {"image": uint8 (C, H, W), "label": int}."""

    def __init__(self, data: ImageSet) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.data.images[i], "label": int(self.data.labels[i])}


def make_collate(transform: ImageTransform):
    """Training batches: uint8 images -> transformed (augmented) floats; the crop/flip draws use the global
    torch RNG, whose state the trainer checkpoints (a resumed run sees the same augmentations)."""

    def collate(examples: list[dict[str, Any]]) -> Batch:
        images = torch.stack([ex["image"] for ex in examples])
        return {"pixel_values": transform(images, train=True),
                "labels": torch.tensor([ex["label"] for ex in examples], dtype=torch.long)}

    return collate


@torch.no_grad()
def predict(model: nn.Module, data: ImageSet, transform: ImageTransform, batch_size: int = 128,
            label_smoothing: float = 0.0) -> tuple[torch.Tensor, float, float]:
    """(predicted labels, mean cross-entropy, seconds) of ``model`` in eval mode on ``data``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, loss = [], 0.0
    start = time.perf_counter()
    try:
        for s in range(0, len(data), batch_size):
            x = transform(data.images[s:s + batch_size].to(device), train=False)
            y = data.labels[s:s + batch_size].to(device)
            logits = model(x).float()
            loss += float(F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="sum"))
            preds.append(logits.argmax(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds), loss / max(1, len(data)), time.perf_counter() - start


def accuracy_metrics(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``accuracy`` (top-1) and ``class_<k>_accuracy`` for every new label k present in ``labels``."""
    correct = preds == labels
    out = {"accuracy": float(correct.float().mean())}
    for k in range(num_classes):
        mask = labels == k
        if mask.any():
            out[f"class_{k}_accuracy"] = float(correct[mask].float().mean())
    return out


# ---------------------------------------------------------------- model and method


def make_task_spec(splits: VisionSplits, transform: ImageTransform, eval_batch_size: int) -> TaskSpec:
    """Training batches of the training split; ``evaluate`` = accuracy and loss on the validation split."""

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(model(batch["pixel_values"]).float(), batch["labels"],
                               label_smoothing=spec.label_smoothing)

    def evaluate(model: nn.Module) -> dict[str, float]:
        preds, val_loss, _ = predict(model, splits.val, transform, eval_batch_size, spec.label_smoothing)
        acc = float((preds == splits.val.labels).float().mean())
        return {"accuracy": acc, "eval_loss": val_loss}

    spec = TaskSpec(train_dataset=ImageExamples(splits.train), collate=make_collate(transform), loss=loss,
                    evaluate=evaluate, metric="accuracy", greater_is_better=True, length=lambda ex: 1,
                    tokens=lambda batch: int(batch["labels"].numel()))
    return spec


class VisionExperiment:
    name: ClassVar[str] = "vision"
    data_config: ClassVar[type] = VisionData
    sections: ClassVar[tuple[str, ...]] = ()

    @property
    def presets(self) -> dict[str, dict]:
        from loralab.tasks.vision.presets import all_presets

        return all_presets()

    def build(self, cfg: Any) -> Built:
        from loralab.models.resnet import RESNETS

        d: VisionData = cfg.data
        family, small = parse_model_name(cfg.model.name)  # config errors before the data is read
        check_model_config(cfg.model)
        check_method(cfg.lora.method)
        if d.pretrained and not Path(d.pretrained).is_file():
            raise FileNotFoundError(
                f"data.pretrained={d.pretrained!r}: no such file ({Path(d.pretrained).resolve()}). Pass "
                "data.pretrained=PATH: a ResNet state dict with torchvision's names (vision-cifar10-seed: torchvision's "
                "ImageNet resnet18-f37072fd.pth); for the vision-fmnist-adapt-* presets run `loralab train --preset "
                "vision-fmnist-pretrain --run-dir runs/vision-fmnist-pretrain` first (it writes model.safetensors)")
        splits = load_splits(d)
        k = len(splits.class_ids)
        channels = splits.train.images.shape[1]
        want = pretrained_channels(d.pretrained) if d.pretrained else None
        if want is not None and want != channels:
            if channels == 1 and want == 3:  # gray images into RGB weights: replicate the channel
                for part in (splits.train, splits.val, splits.test):
                    part.images = part.images.expand(-1, 3, -1, -1).contiguous()
                channels = 3
                _log("gray images replicated to 3 channels for the 3-channel pretrained stem")
            else:
                raise VisionConfigError(f"data.pretrained={d.pretrained!r} expects {want}-channel images; "
                                        f"{d.dataset} has {channels}")
        transform = make_transform(d, channels, splits.train.images.shape[-1])
        torch.manual_seed(cfg.train.seed)  # the model's init, the fresh fc and LoRA's A depend on it
        model = RESNETS[family](num_classes=k, in_channels=channels, small_input=small)
        pretrained = load_pretrained(model, d.pretrained, k) if d.pretrained else None
        method = cfg.lora.method
        bn_mode = d.bn_stats if d.bn_stats != "auto" else ("update" if method == "full" else "frozen")
        if method == "linear_probe" and bn_mode == "update":
            raise VisionConfigError("data.bn_stats=update with lora.method=linear_probe would change the backbone's "
                                    "features; a linear probe keeps them frozen: use data.bn_stats=auto")
        model.freeze_bn_stats = bn_mode == "frozen"
        info = apply_vision_method(model, cfg.lora, cfg.model.name)
        eval_bs = max(64, cfg.train.batch_size)
        spec = make_task_spec(splits, transform, eval_bs)
        names = [splits.train.classes[i] for i in range(k)]
        _log(f"{d.dataset} classes {splits.class_ids} {names}: train {len(splits.train)}, validation "
             f"{len(splits.val)}, test {len(splits.test)} images of {tuple(splits.train.images.shape[1:])}"
             f"{f' resized to {d.image_size}' if d.image_size else ''}; {cfg.model.name}, {method}, BN statistics "
             f"{bn_mode}")
        return Built(model, spec, {"cfg": cfg, "splits": splits, "transform": transform, "method": info,
                                   "pretrained": pretrained, "bn_stats": bn_mode, "eval_batch_size": eval_bs})

    def baseline(self, built: Built) -> Baseline:
        """The majority training label for every test image (ties: the lowest label); the un-adapted model's
        test accuracy (pretrained or random weights, fresh fc where skipped) in ``metrics``."""
        splits = built.state["splits"]
        k = len(splits.class_ids)
        majority = int(torch.bincount(splits.train.labels, minlength=k).argmax())
        score = float((splits.test.labels == majority).float().mean())
        preds, _, secs = predict(built.model, splits.test, built.state["transform"], built.state["eval_batch_size"])
        unadapted = float((preds == splits.test.labels).float().mean())
        _log(f"baseline: majority class {splits.class_ids[majority]} ({splits.train.classes[majority]}) test accuracy "
             f"{score:.4f}; un-adapted model {unadapted:.4f}")
        return Baseline(score=score, kind=f"majority class ({splits.class_ids[majority]}: "
                        f"{splits.train.classes[majority]})",
                        metrics={"accuracy": score, "unadapted_accuracy": unadapted,
                                 "unadapted_eval_images_per_second": len(splits.test) / secs if secs > 0 else 0.0})

    def report(self, built: Built, fit: Any, run_dir: str | Path | None) -> Result:
        """Test accuracy (top-1, per class) of the model as it is now (the kept-best weights after fit)."""
        cfg, splits, model = built.state["cfg"], built.state["splits"], built.model
        buffers_note = "frozen (the pretrained or initial statistics)"
        if built.state["bn_stats"] == "update":
            if fit is not None and cfg.train.keep_best and getattr(fit, "best_step", None) is not None:
                buffers_note = f"updated; those of the best validation accuracy (step {fit.best_step}), kept with its weights"
            else:
                buffers_note = "updated; the last ones"
        k = len(splits.class_ids)
        preds, test_loss, secs = predict(model, splits.test, built.state["transform"], built.state["eval_batch_size"])
        metrics = {**accuracy_metrics(preds, splits.test.labels, k), "test_loss": test_loss}
        n = len(splits.test)
        base = built.baseline.score if built.baseline else 0.0
        fit_d = fit.to_dict() if hasattr(fit, "to_dict") else (fit or {})
        epochs, train_s = float(fit_d.get("epochs") or 0.0), float(fit_d.get("train_seconds") or 0.0)
        info = built.state["method"]
        details = {
            "dataset": cfg.data.dataset, "classes": splits.class_ids, "class_names": list(splits.train.classes),
            "model": cfg.model.name, "method": cfg.lora.method, "seed": cfg.train.seed, "data_dir": splits.source,
            "image_size": cfg.data.image_size or int(splits.train.images.shape[-1]),
            "images": {"train": len(splits.train), "validation": len(splits.val), "test": n},
            "per_class_accuracy": {f"{splits.class_ids[c]} {splits.train.classes[c]}": metrics[f"class_{c}_accuracy"]
                                   for c in range(k) if f"class_{c}_accuracy" in metrics},
            "unadapted_accuracy": (built.baseline.metrics.get("unadapted_accuracy") if built.baseline else None),
            "images_per_second_train": float(fit_d.get("tokens_per_second") or 0.0),
            "images_per_second_eval": n / secs if secs > 0 else 0.0,
            "seconds_per_epoch": train_s / epochs if epochs > 0 else None,
            "best_validation_accuracy": fit_d.get("best_metric"), "bn_stats": buffers_note,
            "pretrained": built.state["pretrained"], "method_info": info,
            "saved": self._save(model, cfg.lora.method, built.state["bn_stats"], run_dir),
        }
        margin = margin_for_rate(base, n)
        result = make_result("vision", built, fit, "accuracy", metrics, True, margin, details)
        print(f"[vision] {cfg.data.dataset} {splits.class_ids} {cfg.model.name} {cfg.lora.method}: test accuracy "
              f"{metrics['accuracy']:.4f} (majority {base:.4f}, un-adapted {details['unadapted_accuracy']}), "
              f"trainable {result.trainable_params:,}", flush=True)
        return result

    @staticmethod
    def _save(model: nn.Module, method: str, bn_mode: str, run_dir: str | Path | None) -> dict[str, str] | None:
        """What trained, in the run dir (module docstring)."""
        if run_dir is None:
            return None
        from safetensors.torch import save_file

        run_dir = Path(run_dir)
        if method == "lora":
            saved = {"adapter": save_trained(model, run_dir)}
            if bn_mode == "update":
                path = run_dir / "bn_stats.safetensors"
                save_file({k: v.detach().contiguous().cpu() for k, v in running_statistics(model).items()}, str(path))
                saved["bn_stats"] = str(path)
            return saved
        if method == "full":
            path = run_dir / "model.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))
            return {"model": str(path)}
        path = run_dir / "head.safetensors"
        head = model.get_submodule(HEAD).state_dict()
        save_file({f"{HEAD}.{k}": v.detach().contiguous().cpu() for k, v in head.items()}, str(path))
        return {"head": str(path)}


EXPERIMENT = VisionExperiment()
