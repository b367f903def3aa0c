"""Vision presets (``loralab train --preset NAME``), the vision experiment's ``presets``.

Pretrain-then-adapt on Fashion-MNIST (there are no pretrained image weights on this machine):

    loralab train --preset vision-fmnist-pretrain --run-dir runs/vision-fmnist-pretrain
    loralab train --preset vision-fmnist-adapt-lora
    loralab train --preset vision-fmnist-adapt-full
    loralab train --preset vision-fmnist-adapt-probe

The first trains resnet18-small fully on classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat) and
writes ``runs/vision-fmnist-pretrain/model.safetensors``, the adapt presets' default
``data.pretrained`` (relative to the working directory; pass ``data.pretrained=PATH`` for another
file). They adapt it to classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot): the class count is the
same, so the pretrained fc is loaded too and retrained.

Sizing (2 shared CPU cores): resnet18-small at 28 px costs about 1.9 s per batch of 16 on one thread, so
the CPU presets use 16 px images (about 3x fewer operations) and subsets of the training and test files
(TRAIN_SAMPLES, TEST_SAMPLES below). Measured on this 2-core box while other jobs kept its load at 7-9
(so an idle box is several times faster), seed 0, 500 test images (majority class 21.0%, two standard
errors ~3.6 points):

    run                   test acc   trainable    s/epoch   train img/s   wall
    pretrain (0-4)        85.8%      11,170,245   150       7.2           513 s
    adapt-lora (5-9)      83.4%         503,555   129       3.5           641 s
    adapt-full (5-9)      86.2%      11,170,245    99       4.6           454 s
    adapt-probe (5-9)     78.0%           2,565    20      22.9           124 s

(the un-adapted pretrained model scores 8.0% on classes 5-9; validation is only 50 images, so
selection is coarse). These are not comparable with the seed's CIFAR-10 numbers (93.50 LoRA vs 93.78
full): other data (16 px gray clothing, 5 classes, 450 training images vs 32 px colour objects upsampled
to 224, 10 classes, 50,000 images), other pretraining (1,079 images of 5 classes vs ImageNet's 1.28M of
1,000), another stem, 4 epochs vs training to early stopping; both gaps are within noise of one seed.

vision-cifar10-seed is the seed study's recipe (ResNet-18, 224 px resize + ImageNet normalisation,
LoRA r = 14, alpha 16, dropout 0.1 on every conv with fc saved, Adam lr 1e-4, batch 32, early stopping
with patience 7); it needs CIFAR-10 (``data.data_dir``) and torchvision's ImageNet ResNet-18 weights
(``data.pretrained``, default ``resnet18-f37072fd.pth``, the file torchvision downloads) and a GPU.
"""

from __future__ import annotations

PRETRAIN_DIR = "runs/vision-fmnist-pretrain"
PRETRAINED = f"{PRETRAIN_DIR}/model.safetensors"
IMAGE_SIZE = 16
TRAIN_SAMPLES = {"pretrain": 1200, "adapt": 500}
"""Training-file images (before the 10% validation split) of the pretraining and adaptation runs."""
TEST_SAMPLES = 500
EPOCHS = {"pretrain": 3.0, "adapt": 4.0}
ADAPT_LR = {"lora": 2e-3, "full": 5e-4, "linear_probe": 1e-2}
LORA = {"lora.r": 14, "lora.lora_alpha": 16.0, "lora.lora_dropout": 0.1, "lora.target_modules": "all_convs",
        "lora.modules_to_save": ["fc"]}


def _fmnist(classes: list[int], samples: int) -> dict:
    return {"experiment": "vision", "model.name": "resnet18-small", "data.dataset": "fashion-mnist",
            "data.classes": classes, "data.val_fraction": 0.1, "data.image_size": IMAGE_SIZE,
            "data.train_samples": samples, "data.eval_samples": TEST_SAMPLES, "train.batch_size": 32,
            "train.schedule": "cosine", "train.warmup_ratio": 0.05, "train.keep_best": True,
            "train.early_stopping_patience": 2, "train.log_every": 5}


def fmnist_pretrain() -> dict:
    return {"_doc": "Fashion-MNIST classes 0-4: full training of resnet18-small from scratch (16 px, 1,200 images, "
                    "3 epochs); writes model.safetensors for the adapt presets (use --run-dir runs/vision-fmnist-pretrain)",
            "name": "vision-fmnist-pretrain", **_fmnist([0, 1, 2, 3, 4], TRAIN_SAMPLES["pretrain"]),
            "lora.method": "full", "train.lr": 2e-3, "train.epochs": EPOCHS["pretrain"]}


def fmnist_adapt(method: str) -> dict:
    label = {"lora": "lora", "full": "full", "linear_probe": "probe"}[method]
    what = {"lora": "LoRA r=14 alpha 16 dropout 0.1 on all convs, fc saved", "full": "full fine-tuning",
            "linear_probe": "linear probing (fc only)"}[method]
    preset = {"_doc": f"Fashion-MNIST classes 5-9 from the classes 0-4 weights (data.pretrained={PRETRAINED}): "
                      f"{what}; 500 images, 4 epochs, minutes on a CPU",
              "name": f"vision-fmnist-adapt-{label}", **_fmnist([5, 6, 7, 8, 9], TRAIN_SAMPLES["adapt"]),
              "data.pretrained": PRETRAINED, "lora.method": method, "train.lr": ADAPT_LR[method],
              "train.epochs": EPOCHS["adapt"]}
    if method == "lora":
        preset.update(LORA)
    return preset


def cifar10_seed() -> dict:
    return {"_doc": "the seed's CIFAR-10 recipe: ImageNet ResNet-18 at 224 px, LoRA r=14 alpha 16 dropout 0.1 on "
                    "all convs + fc, Adam 1e-4, batch 32, patience 7 (needs CIFAR-10 in data.data_dir, "
                    "data.pretrained, a GPU)",
            "experiment": "vision", "name": "vision-cifar10-seed", "model.name": "resnet18",
            "data.dataset": "cifar10", "data.image_size": 224, "data.normalization": "imagenet",
            "data.pretrained": "resnet18-f37072fd.pth", "data.val_fraction": 0.1, "data.augment": False,
            "data.bn_stats": "update",  # a PEFT-wrapped torchvision model in train mode updates them
            **LORA, "lora.method": "lora", "train.optimizer": "adamw", "train.weight_decay": 0.0, "train.lr": 1e-4,
            "train.batch_size": 32, "train.epochs": 50.0, "train.schedule": "constant",
            "train.early_stopping_patience": 7, "train.keep_best": True}


def all_presets() -> dict[str, dict]:
    presets = [fmnist_pretrain(), *(fmnist_adapt(m) for m in ("lora", "full", "linear_probe")), cifar10_seed()]
    return {p["name"]: p for p in presets}
