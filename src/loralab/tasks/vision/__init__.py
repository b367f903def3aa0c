"""Image classification for loralab: the ``vision`` experiment (``experiment``: LoRA on a ResNet's
convolutions, full fine-tuning, linear probing; importing this package registers it), CIFAR-10 and
(Fashion-)MNIST IDX readers (``data``), torch-only augmentation and normalisation (``transforms``),
parameter accounting of LoRA on ResNet convolutions (``accounting``), presets (``presets``). No
torchvision anywhere."""

from loralab.engine.experiment import register_experiment
from loralab.tasks.vision.experiment import EXPERIMENT

register_experiment(EXPERIMENT)
