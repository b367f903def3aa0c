"""Image classification data for loralab: CIFAR-10 (binary and python versions) and (Fashion-)MNIST IDX
readers (``data``), torch-only augmentation and normalisation (``transforms``), and parameter accounting
of LoRA on ResNet convolutions (``accounting``). No torchvision anywhere."""
