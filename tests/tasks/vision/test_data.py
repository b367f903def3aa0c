"""Readers against hand-built files: IDX (gzip/raw), CIFAR-10 binary and python (a Python 2 style pickle),
the refused pickle, class subsets, the validation split."""
import gzip
import io
import pickle
import struct

import numpy as np
import pytest
import torch

from loralab.tasks.vision import data as vd
from loralab.tasks.vision.data import (ImageSet, iterate_batches, read_cifar10, read_cifar10_bin, read_cifar10_py,
                                       read_idx, read_mnist, select_classes, split_validation)


def _idx(magic_dims: list[int], payload: bytes, ndim_code: int) -> bytes:
    return struct.pack(">I", 0x800 | ndim_code) + struct.pack(f">{len(magic_dims)}I", *magic_dims) + payload


def test_idx_raw_and_gzip(tmp_path):
    pixels = bytes(range(12))  # 3 images of 2x2
    raw = _idx([3, 2, 2], pixels, 3)
    assert raw[:4] == b"\x00\x00\x08\x03"
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    for name in ("a", "a.gz"):
        t = read_idx(tmp_path / name)
        assert t.dtype == torch.uint8 and t.shape == (3, 2, 2)
        assert t[1].tolist() == [[4, 5], [6, 7]] and t[2, 1, 0] == 10
    (tmp_path / "l").write_bytes(_idx([4], bytes([9, 0, 3, 1]), 1))
    assert read_idx(tmp_path / "l").tolist() == [9, 0, 3, 1]


@pytest.mark.parametrize("blob, match", [
    (_idx([3, 2, 2], bytes(11), 3), "truncated"),
    (_idx([3, 2, 2], bytes(13), 3), "trailing bytes"),
    (b"\x1f\x8b\x08\x00junk", "broken gzip"),
    (b"PK\x03\x04" + bytes(20), "not an IDX file"),
    (b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + bytes(4), "only uint8"),
])
def test_idx_bad_files_are_named(tmp_path, blob, match):
    (tmp_path / "bad").write_bytes(blob)
    with pytest.raises(ValueError, match=f"bad.*{match}|{match}"):
        read_idx(tmp_path / "bad")


def _write_mnist(folder, split, images: np.ndarray, labels: np.ndarray, gz: bool):
    stem = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    blobs = (_idx(list(images.shape), images.tobytes(), 3), _idx([len(labels)], labels.tobytes(), 1))
    for name, blob in zip(stem, blobs):
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(blob) if gz else blob)


def test_read_mnist_layout_and_checks(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labs = np.array([3, 1, 4, 1, 5], np.uint8)
    _write_mnist(tmp_path, "train", imgs, labs, gz=True)
    _write_mnist(tmp_path, "test", imgs[:2], labs[:3], gz=False)  # 2 images, 3 labels
    ds = read_mnist(tmp_path, "train")
    assert ds.images.shape == (5, 1, 28, 28) and ds.labels.dtype == torch.int64
    assert torch.equal(ds.images[2, 0], torch.from_numpy(imgs[2])) and ds.labels.tolist() == [3, 1, 4, 1, 5]
    assert ds.classes[4] == "Coat" and len(read_mnist(tmp_path, "train", limit=2)) == 2
    with pytest.raises(ValueError, match="2 images but .* 3 labels"):
        read_mnist(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        read_mnist(tmp_path / "nowhere", "test")


@pytest.mark.skipif(not any(d.is_dir() for d in vd.FASHION_MNIST_DIRS), reason="no Fashion-MNIST on this machine")
def test_real_fashion_mnist_test_split():
    ds = read_mnist(split="test")  # default location
    assert ds.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [1000] * 10  # the published test set is balanced


def _cifar_records(n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return b"".join(bytes([labels[i]]) + pixels[i].tobytes() for i in range(n)), labels, pixels


def _write_cifar_bin(root, counts=(2, 1, 3, 1, 2, 4)):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    out = {}
    for seed, (name, n) in enumerate(zip(names, counts)):
        blob, labels, pixels = _cifar_records(n, seed)
        (folder / name).write_bytes(blob)
        out[name] = (blob, labels, pixels)
    return out


def test_cifar_binary_byte_layout(tmp_path):
    files = _write_cifar_bin(tmp_path)
    train = read_cifar10_bin(tmp_path, "train")
    assert train.images.shape == (9, 3, 32, 32) and train.classes[0] == "airplane"
    blob = files["data_batch_3.bin"][0]
    # image 1 of batch 3 is image 2 + 1 + 1 = 4 overall; pixel (c, y, x) is byte 1 + 1024 c + 32 y + x of its record
    for c, y, x in [(0, 0, 0), (1, 5, 7), (2, 31, 31), (2, 0, 31)]:
        assert int(train.images[4, c, y, x]) == blob[3073 + 1 + 1024 * c + 32 * y + x]
    assert int(train.labels[4]) == blob[3073]
    test = read_cifar10(tmp_path, "test")  # dispatches to the binary version
    assert len(test) == 4 and test.labels.tolist() == files["test_batch.bin"][1].tolist()
    (tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin").write_bytes(blob[:-1])
    with pytest.raises(ValueError, match="data_batch_2.bin.*not a whole number of 3073-byte records"):
        read_cifar10_bin(tmp_path, "train")


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings (BINSTRING), as the original CIFAR-10 pickles do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj, save_persistent_id=True):
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy 1.x names


def test_cifar_python_version_with_py2_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expect = []
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        _, labels, pixels = _cifar_records(2, seed)
        blob = _py2_pickle({"batch_label": "training batch", "labels": [int(v) for v in labels], "data": pixels,
                            "filenames": ["a.png", "b.png"]})
        assert b"numpy.core.multiarray\n_reconstruct" in blob and b"_codecs" not in blob
        (folder / name).write_bytes(blob)
        expect.append((labels, pixels))
    train = read_cifar10_py(tmp_path, "train")
    assert train.images.shape == (10, 3, 32, 32)
    labels, pixels = expect[2]
    assert train.labels[4:6].tolist() == labels.tolist()
    assert int(train.images[5, 1, 2, 3]) == pixels[1, 1024 + 64 + 3]
    # a Python 3 protocol-2 pickle (bytes via latin-1 _codecs.encode) and protocol 5 (_frombuffer) load too
    for proto in (2, 5):
        (folder / "test_batch").write_bytes(pickle.dumps({b"data": pixels, b"labels": labels.tolist()}, protocol=proto))
        assert torch.equal(read_cifar10(tmp_path, "test").images.flatten(1), torch.from_numpy(pixels))


class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("which", ["os.system", "builtins.eval", "codec"])
def test_malicious_pickle_is_refused_before_running(tmp_path, which):
    import codecs
    import os
    marker = tmp_path / "ran"
    payload = {"os.system": _Evil(os.system, f"touch {marker}"),
               "builtins.eval": _Evil(eval, f"open({str(marker)!r}, 'w')"),
               "codec": _Evil(codecs.encode, "x", "rot13")}[which]  # admitted global, refused argument
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": payload, b"labels": []}, protocol=2))
    expected = {"os.system": r"test_batch: refusing to unpickle global (posix|os)\.system",
                "builtins.eval": r"test_batch: refusing to unpickle global (__builtin__|builtins)\.eval",
                "codec": r"refusing _codecs\.encode with codec 'rot13'"}[which]
    with pytest.raises(pickle.UnpicklingError, match=expected):
        read_cifar10_py(tmp_path, "test")
    assert not marker.exists()


def test_non_uint8_data_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}))
    with pytest.raises(ValueError, match="expected uint8"):
        read_cifar10_py(tmp_path, "test")


def _toy(labels: list[int], n_classes: int = 10) -> ImageSet:
    n = len(labels)
    imgs = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()  # image i holds i
    return ImageSet(imgs, torch.tensor(labels), tuple(f"c{i}" for i in range(n_classes)))


def test_select_classes_relabels_in_given_order():
    ds = _toy([0, 5, 7, 5, 9, 2, 6])
    sub = select_classes(ds, [5, 6, 7, 8, 9])
    assert sub.labels.tolist() == [0, 2, 0, 4, 1]  # 5->0, 7->2, 5->0, 9->4, 6->1
    assert sub.images[:, 0, 0, 0].tolist() == [1, 2, 3, 4, 6] and sub.classes == ("c5", "c6", "c7", "c8", "c9")
    assert select_classes(ds, [7, 0]).labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="distinct class ids"):
        select_classes(ds, [1, 1])
    with pytest.raises(ValueError, match="labels span"):
        ImageSet(ds.images, torch.tensor([0, 1, 2, 3, 4, 5, 10]), ds.classes)


def test_split_validation_stratified_seeded():
    ds = _toy([0] * 10 + [1] * 20 + [2] * 5, n_classes=3)
    train, val = split_validation(ds, 0.2, seed=3)
    assert torch.bincount(val.labels, minlength=3).tolist() == [2, 4, 1]  # round(0.2 * 10, 20, 5)
    ids_t, ids_v = set(train.images[:, 0, 0, 0].tolist()), set(val.images[:, 0, 0, 0].tolist())
    assert not ids_t & ids_v and ids_t | ids_v == set(range(35))
    again = split_validation(ds, 0.2, seed=3)[1]
    assert torch.equal(again.images, val.images)
    others = {tuple(split_validation(ds, 0.2, seed=s)[1].images[:, 0, 0, 0].tolist()) for s in range(5)}
    assert len(others) > 1
    with pytest.raises(ValueError, match="fraction"):
        split_validation(ds, 1.0, seed=0)


def test_iterate_batches_covers_everything_once():
    ds = _toy(list(range(10)))
    batches = list(iterate_batches(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    seen = torch.cat([b[0][:, 0, 0, 0] for b in batches]).tolist()
    assert sorted(seen) == list(range(10)) and seen != list(range(10))
    assert torch.cat([b[1] for b in batches]).tolist() == seen  # labels travel with their images
    assert [len(b[1]) for b in iterate_batches(ds, 4, drop_last=True)] == [4, 4]
