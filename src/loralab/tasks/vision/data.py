"""Image data sets as uint8 tensors: CIFAR-10 (binary or python version), MNIST / Fashion-MNIST (IDX).

Every reader returns an ``ImageSet``: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), ``classes``
(names, index = label). Floats, resizing, augmentation: ``loralab.tasks.vision.transforms``.

Formats (sizes are validated; a truncated or foreign file is an error naming it):

* CIFAR-10 binary version, ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin``: records
  of 1 label byte + 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each 32x32 row-major); no pickle.
* CIFAR-10 python version, ``cifar-10-batches-py/data_batch_{1..5}``, ``test_batch``: a pickled dict
  {"data": uint8 array (N, 3072) in the same layout, "labels": [int]} (Python 2, protocol 2). Read with
  ``NumpyUnpickler``, which admits only the globals numpy array reconstruction needs (and latin-1
  ``_codecs.encode``, how Python 3 writes bytes at protocol 2) and refuses any other (``os.system``,
  ``builtins.eval`` ...) before it could run: a pickle can otherwise execute arbitrary code.
* IDX (MNIST, Fashion-MNIST), gzip or raw (told apart by the gzip magic, not the name): big-endian
  magic 0x00000801 (uint8, 1-d: labels) / 0x00000803 (uint8, 3-d: images), then one uint32 per dim,
  then exactly prod(dims) bytes.

Fashion-MNIST's default location: ``<repo>/../shared/data/fashion-mnist``, ``./../shared/data/fashion-mnist``
or ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``), the first that exists.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_DIRS = (Path(__file__).resolve().parents[4].parent / "shared/data/fashion-mnist",
                      Path("../shared/data/fashion-mnist"), Path("/usr/share/datasets/fashion-mnist"))
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR_BIN = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
_CIFAR_PY = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_RECORD = 1 + 3 * 32 * 32


@dataclass
class ImageSet:
    """``images`` uint8 (N, C, H, W), ``labels`` int64 (N,) in [0, len(classes))."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"ImageSet.images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise ValueError(f"ImageSet: {len(self.images)} images but labels of shape {tuple(self.labels.shape)}")
        self.labels = self.labels.to(torch.int64)
        if len(self.labels) and not (0 <= int(self.labels.min()) and int(self.labels.max()) < len(self.classes)):
            raise ValueError(f"ImageSet: labels span [{int(self.labels.min())}, {int(self.labels.max())}] but there "
                             f"are {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)


def select_classes(data: ImageSet, classes: Sequence[int]) -> ImageSet:
    """Keep the images of ``classes`` and relabel them 0..k-1 in the order given (``[5, 6]``: 5 -> 0, 6 -> 1)."""
    classes = list(classes)
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < len(data.classes) for c in classes):
        raise ValueError(f"select_classes: need distinct class ids in [0, {len(data.classes)}), got {classes}")
    lookup = torch.full((len(data.classes),), -1, dtype=torch.int64)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    new = lookup[data.labels]
    keep = new >= 0
    return ImageSet(data.images[keep], new[keep], tuple(data.classes[c] for c in classes))


def split_validation(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, validation), stratified: round(fraction * n_c) random images of each class c go to
    validation (a seeded ``torch.Generator``, so the split depends on ``seed`` only); order is kept."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split_validation: fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    is_val = torch.zeros(len(data), dtype=torch.bool)
    for c in range(len(data.classes)):
        idx = torch.nonzero(data.labels == c).flatten()
        pick = idx[torch.randperm(len(idx), generator=g)[: round(fraction * len(idx))]]
        is_val[pick] = True
    return data.subset(~is_val), data.subset(is_val)


def iterate_batches(data: ImageSet, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) batches; ``shuffle`` permutes with ``generator`` (one permutation per call)."""
    order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
    stop = len(data) - len(data) % batch_size if drop_last else len(data)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield data.images[idx], data.labels[idx]


# -- IDX (MNIST / Fashion-MNIST) ------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError) as e:
            raise ValueError(f"{path}: broken gzip stream ({e}); re-download the file") from e
    return raw


def read_idx(path: str | Path) -> torch.Tensor:
    """An IDX file (gzip or raw) as a uint8 tensor of its dims; only the uint8 type (code 0x08) is read."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex()}, expected 0000080N)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{raw[2]:02x}; only uint8 (0x08) is supported")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if ndim < 1 or len(raw) < head:
        raise ValueError(f"{path}: IDX header for {ndim} dims is truncated ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    want = head + math.prod(dims)
    if len(raw) != want:
        raise ValueError(f"{path}: {len(raw)} bytes, but the header (dims {list(dims)}) says {want}: "
                         f"{'truncated' if len(raw) < want else 'trailing bytes'}")
    return torch.frombuffer(bytearray(raw[head:]), dtype=torch.uint8).view(*dims)


def default_fashion_mnist_dir() -> Path:
    for d in FASHION_MNIST_DIRS:
        if d.is_dir():
            return d
    raise FileNotFoundError(f"Fashion-MNIST not found in {[str(d) for d in FASHION_MNIST_DIRS]}; pass its folder "
                            "(train-images-idx3-ubyte[.gz] ...) or install Debian's dataset-fashion-mnist")


def read_mnist(root: str | Path | None = None, split: str = "train", classes: Sequence[str] = FASHION_MNIST_CLASSES,
               limit: int | None = None) -> ImageSet:
    """MNIST-layout IDX files in ``root`` (default: Fashion-MNIST's folder) as (N, 1, 28, 28); ``limit``
    keeps the first ``limit`` images. For MNIST pass ``classes=MNIST_CLASSES``."""
    if split not in _IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = default_fashion_mnist_dir() if root is None else Path(root)
    paths = []
    for name in _IDX_FILES[split]:
        found = [p for p in (root / f"{name}.gz", root / name) if p.is_file()]
        if not found:
            raise FileNotFoundError(f"no {name}[.gz] in {root}")
        paths.append(found[0])
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.dim() != 3 or labels.dim() != 1:
        raise ValueError(f"{paths[0]} must be 3-d images (magic 0x803) and {paths[1]} 1-d labels (0x801); "
                         f"got {images.dim()}-d and {labels.dim()}-d")
    if len(images) != len(labels):
        raise ValueError(f"{paths[0]} has {len(images)} images but {paths[1]} {len(labels)} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return ImageSet(images.unsqueeze(1).clone(), labels.to(torch.int64), tuple(classes))


# -- CIFAR-10 -------------------------------------------------------------------------------------------
def _cifar_dir(root: Path, sub: str) -> Path:
    return root / sub if (root / sub).is_dir() else root


def read_cifar10_bin(root: str | Path, split: str = "train") -> ImageSet:
    """CIFAR-10's binary version from ``root`` (``cifar-10-batches-bin`` or the folder above it)."""
    folder = _cifar_dir(Path(root), "cifar-10-batches-bin")
    images, labels = [], []
    for name in _CIFAR_BIN[_check_split(split)]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"no {name} in {folder} (CIFAR-10 binary version: cifar-10-batches-bin/)")
        raw = path.read_bytes()
        if not raw or len(raw) % _RECORD:
            raise ValueError(f"{path}: {len(raw)} bytes is not a whole number of {_RECORD}-byte records")
        rec = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, _RECORD)
        labels.append(rec[:, 0].to(torch.int64))
        images.append(rec[:, 1:].reshape(-1, 3, 32, 32))
        if int(labels[-1].max()) > 9:
            raise ValueError(f"{path}: label byte {int(labels[-1].max())} > 9; not a CIFAR-10 file (CIFAR-100?)")
    return ImageSet(torch.cat(images), torch.cat(labels), CIFAR10_CLASSES)


# numpy's own rebuild functions (taken from numpy itself, whatever their module is called today), under the
# names pickles carry: numpy 1.x ``numpy.core``, 2.x ``numpy._core``; protocol 5 uses _frombuffer.
_REBUILD = {("multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
            ("numeric", "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0],
            ("multiarray", "scalar"): np.int64(0).__reduce__()[0]}
_ALLOWED = {(f"numpy.{core}.{mod}", name): fn for (mod, name), fn in _REBUILD.items() for core in ("core", "_core")}


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 writes bytes into protocol-2 pickles, for the latin-1 codec only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r} (only latin1 is admitted)")
    return text.encode("latin1")


_ALLOWED |= {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_bytes}


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and numpy arrays only; any other global is refused."""

    def __init__(self, file, source: str = "<pickle>") -> None:
        super().__init__(file, encoding="latin1")  # Python 2 str -> str; numpy reads latin1 array data
        self.source = source

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"{self.source}: refusing to unpickle global {module}.{name}: only numpy array reconstruction is "
                f"admitted ({', '.join(f'{m}.{n}' for m, n in _ALLOWED)}). A CIFAR-10 batch never needs it; "
                "this file is not what it claims (use the binary version, cifar-10-batches-bin, to avoid pickles)")
        return allowed


def _get(d: dict, key: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def read_cifar10_py(root: str | Path, split: str = "train") -> ImageSet:
    """CIFAR-10's python version from ``root`` (``cifar-10-batches-py`` or the folder above it)."""
    folder = _cifar_dir(Path(root), "cifar-10-batches-py")
    images, labels = [], []
    for name in _CIFAR_PY[_check_split(split)]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"no {name} in {folder} (CIFAR-10 python version: cifar-10-batches-py/)")
        with path.open("rb") as f:
            batch = NumpyUnpickler(f, str(path)).load()
        try:
            data, lab = np.asarray(_get(batch, "data")), np.asarray(_get(batch, "labels"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 batch (need a dict with 'data' and 'labels'): {e}") from e
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or lab.shape != (len(data),):
            raise ValueError(f"{path}: data {data.dtype} {data.shape}, labels {lab.shape}; expected uint8 (N, 3072), (N,)")
        if lab.dtype.kind not in "iu" or (len(lab) and (lab.min() < 0 or lab.max() > 9)):
            raise ValueError(f"{path}: labels must be integers 0..9 (CIFAR-10), got {lab.dtype} "
                             f"[{lab.min() if len(lab) else ''}, {lab.max() if len(lab) else ''}]")
        images.append(torch.from_numpy(data.copy()).view(-1, 3, 32, 32))
        labels.append(torch.from_numpy(lab.astype(np.int64)))
    return ImageSet(torch.cat(images), torch.cat(labels), CIFAR10_CLASSES)


def read_cifar10(root: str | Path, split: str = "train") -> ImageSet:
    """The binary version if ``root`` has it (no pickle at all), else the python version."""
    root = Path(root)
    if (_cifar_dir(root, "cifar-10-batches-bin") / _CIFAR_BIN["test"][0]).is_file():
        return read_cifar10_bin(root, split)
    if (_cifar_dir(root, "cifar-10-batches-py") / _CIFAR_PY["test"][0]).is_file():
        return read_cifar10_py(root, split)
    raise FileNotFoundError(f"no CIFAR-10 in {root}: expected cifar-10-batches-bin/*.bin or cifar-10-batches-py/")


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split
