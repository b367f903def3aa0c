"""The fault and bad-input matrix (issues 14 and 21).

Bad input: every probe below goes through the CLI (``loralab.cli.main``, in-process; a few as real
subprocesses) and must end in exactly one line ``loralab <cmd>: error: <message>`` naming the thing
and the fix, exit code 2, and no traceback. A real bug must still show its traceback (exit 1).

Process faults (real subprocesses, real signals) are in the second half: SIGKILL at several points
(a checkpoint write included) then ``--resume`` ends bit-identical to an uninterrupted run; two
processes resuming one run (one is refused and touches nothing); disk full on a small tmpfs.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from loralab import cli

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the world the probes run in


GLUE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def _glue_rows(n: int, start: int = 0) -> str:
    labels = ("entailment", "not_entailment")
    return "".join(f"{i}\tthe cat sat {i}\ta cat is {i % 3}\t{labels[i % 2]}\n" for i in range(start, start + n))


def _write_glue(root: Path, train: str | bytes | None = None, dev: str | bytes | None = None) -> Path:
    d = root / "RTE"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (("train.tsv", train), ("dev.tsv", dev)):
        text = GLUE_HEADER + _glue_rows(16) if text is None else text
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def _write_e2e(root: Path, train: str | bytes | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    good = "mr,ref\n" + "".join(f'"name[Eagle {i}], food[French]","The Eagle {i} serves French food."\n'
                                for i in range(6))
    (root / "devset.csv").write_bytes(good.encode() if train is None else
                                      train if isinstance(train, bytes) else train.encode())
    (root / "testset_w_refs.csv").write_text(good)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models on disk, GLUE/E2E data, and one trained GLUE run (adapter with its head)."""
    from loralab.engine.config import load_config
    from loralab.engine.runner import run_training
    from loralab.models.tiny import tiny_model, tiny_tokenizer

    base = tmp_path_factory.mktemp("world")
    bert, llama = base / "tiny-bert", base / "tiny-llama"
    tiny_model("bert", "base", seed=0).save_pretrained(bert, safe_serialization=True)
    tiny_tokenizer("bert").save_pretrained(bert)
    tiny_model("llama", "causal_lm", seed=0).save_pretrained(llama, safe_serialization=True)
    tiny_tokenizer("llama").save_pretrained(llama)
    glue = _write_glue(base / "glue")
    w = {"base": base, "bert": bert, "llama": llama, "glue": glue, "runs": base / "runs"}
    w["glue_args"] = ["experiment=glue", f"model.name={bert}", "data.task=rte", f"data.data_dir={glue}",
                      "data.train_samples=16", "data.eval_samples=8", "train.max_steps=2", "train.batch_size=4",
                      "train.quiet=true", "train.tensorboard=false", f"out_dir={base / 'runs'}"]
    run, _ = run_training(load_config(None, [*w["glue_args"], "lora.r=4", "lora.lora_alpha=8"]))
    w["run"] = run.dir
    w["adapter"] = run.dir / "adapter"
    assert (w["adapter"] / "adapter_model.safetensors").is_file()
    return w


def _adapter_copy(world, tmp_path, name="adapter") -> Path:
    """A copy of the trained adapter beside a copy of its run's config.yaml (eval/merge find it)."""
    import shutil

    d = tmp_path / "run"
    d.mkdir(exist_ok=True)
    shutil.copytree(world["adapter"], d / name)
    text = (world["run"] / "config.yaml").read_text().replace(str(world["base"] / "runs"), str(tmp_path / "runs"))
    (d / "config.yaml").write_text(text)
    return d / name


def _cli(capsys, argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, command, *fragments):
    """Exit 2, no traceback, the last line is the one ``loralab <cmd>: error:`` line naming the thing."""
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    prefix = f"loralab {command}: error: "
    assert lines and lines[-1].startswith(prefix), err
    assert sum(line.startswith("loralab ") for line in lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    if os.environ.get("LORALAB_FAULT_TABLE"):  # collects probe -> message -> exit code for the README table
        with open(os.environ["LORALAB_FAULT_TABLE"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "code": code,
                                "message": lines[-1]}) + "\n")
    return lines[-1][len(prefix):]


# ---------------------------------------------------------------- config errors


def _yaml(tmp_path, content: bytes | str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


CONFIG_PROBES = {
    # name: (argv builder, fragments of the message)
    "unknown key": (lambda t: ["train", "--preset", "glue-cpu-sst2", "train.lrr=1"], ["'train.lrr'", "train.lr"]),
    "unknown section": (lambda t: ["train", "experiment=glue", "trian.lr=1"], ["trian"]),
    "wrong type": (lambda t: ["train", "experiment=glue", "train.lr=abc"], ["train.lr", "expected float"]),
    "wrong type in YAML": (lambda t: ["train", _yaml(t, "experiment: glue\ntrain: {batch_size: [1, 2]}\n")],
                           ["batch_size"]),
    "out of range": (lambda t: ["train", "experiment=glue", "lora.r=0"], ["lora.r", ">= 1"]),
    "out of range lr": (lambda t: ["train", "experiment=glue", "train.lr=-1"], ["train.lr"]),
    "malformed YAML": (lambda t: ["train", _yaml(t, "train: {lr: [1,\n")], ["c.yaml"]),
    "non-mapping YAML": (lambda t: ["train", _yaml(t, "- a\n- b\n")], ["c.yaml", "mapping"]),
    "non-mapping section": (lambda t: ["train", _yaml(t, "experiment: glue\ntrain: 3\n")], ["train"]),
    "non-UTF-8 YAML": (lambda t: ["train", _yaml(t, b"experiment: glue\n# caf\xe9\xff\n")], ["c.yaml", "UTF-8"]),
    "missing config file": (lambda t: ["train", t / "missing.yaml"], ["missing.yaml", "not found"]),
    "config is a directory": (lambda t: ["train", _mkdir(t / "confdir")], ["confdir"]),
    "unknown preset": (lambda t: ["train", "--preset", "nope"], ["'nope'"]),
    "unknown experiment": (lambda t: ["train", "experiment=glu"], ["'glu'", "glue"]),
    "no experiment": (lambda t: ["train", "train.lr=1e-4"], ["experiment"]),
    "bad override syntax": (lambda t: ["train", "experiment=glue", "=3"], ["=3"]),
    "key not read by the experiment": (lambda t: ["train", "--preset", "glue-cpu-sst2", "data.packing=true"],
                                       ["data.packing"]),
    "eval of a config with unknown key": (lambda t: ["eval", _yaml(t, "experiment: glue\nlora: {rr: 3}\n"),
                                                     "--base-only"], ["lora.rr"]),
    "config with unknown key": (lambda t: ["config", "experiment=glue", "lora.rr=3"], ["lora.rr"]),
    "bad --seeds": (lambda t: ["sweep", "--preset", "glue-cpu-sst2", "--seeds", "a,b", "--out", t / "s"],
                    ["--seeds"]),
}


@pytest.mark.parametrize("name", CONFIG_PROBES)
def test_config_error(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build, fragments = CONFIG_PROBES[name]
    argv = build(tmp_path)
    code, _, err = _cli(capsys, argv)
    assert_user_error(code, err, argv[0], *fragments)


# ---------------------------------------------------------------- data errors


def _glue_train(world, tmp_path, glue_dir, *extra):
    args = [a for a in world["glue_args"] if not a.startswith(("data.data_dir=", "out_dir="))]
    return ["train", *args, f"data.data_dir={glue_dir}", f"out_dir={tmp_path / 'runs'}", *extra]


def _rows(n=16):
    return GLUE_HEADER + _glue_rows(n)


GLUE_PROBES = {
    "missing data dir": (lambda t: t / "nowhere", ["nowhere", "data.data_dir"]),
    "missing dev file": (lambda t: _without(_write_glue(t / "g"), "RTE/dev.tsv"), ["dev.tsv", "data.data_dir"]),
    "missing column": (lambda t: _write_glue(t / "g", train="index\tsentence1\tlabel\n0\ta\tentailment\n"),
                       ["sentence2", "train.tsv"]),
    "truncated line": (lambda t: _write_glue(t / "g", train=_rows() + "16\tthe cat"), ["train.tsv", "line 18"]),
    "empty file": (lambda t: _write_glue(t / "g", dev=""), ["dev.tsv", "empty"]),
    "header only": (lambda t: _write_glue(t / "g", train=GLUE_HEADER), ["train.tsv"]),
    "non-UTF-8": (lambda t: _write_glue(t / "g", train=(_rows() + "16\tcaf\xe9\tx\tentailment\n").encode("latin-1")),
                  ["train.tsv", "UTF-8"]),
    "unknown label": (lambda t: _write_glue(t / "g", dev=_rows(3) + "3\ta\tb\tmaybe\n"), ["dev.tsv", "'maybe'"]),
}


def _without(root: Path, rel: str) -> Path:
    (root / rel).unlink()
    return root


@pytest.mark.parametrize("name", GLUE_PROBES)
def test_glue_data_error(name, world, capsys, tmp_path):
    build, fragments = GLUE_PROBES[name]
    code, _, err = _cli(capsys, _glue_train(world, tmp_path, build(tmp_path)))
    assert_user_error(code, err, "train", *fragments)


def _e2e_train(world, tmp_path, data_dir):
    return ["train", "experiment=e2e", f"model.name={world['llama']}", f"data.data_dir={data_dir}",
            "train.max_steps=1", "train.batch_size=2", "train.quiet=true", f"out_dir={tmp_path / 'runs'}",
            "generate.max_new_tokens=2"]


E2E_PROBES = {
    "missing data dir": (lambda t: t / "nowhere", ["nowhere", "data.data_dir"]),
    "missing column": (lambda t: _write_e2e(t / "e", train="mr,text\na,b\n"), ["devset.csv", "'ref'"]),
    "truncated line": (lambda t: _write_e2e(t / "e", train='mr,ref\n"name[A]","A."\n"name[B]'),
                       ["devset.csv", "cut short"]),
    "empty file": (lambda t: _write_e2e(t / "e", train=""), ["devset.csv", "empty"]),
    "non-UTF-8": (lambda t: _write_e2e(t / "e", train='mr,ref\n"name[Caf\xe9]","x"\n'.encode("latin-1")),
                  ["devset.csv", "UTF-8"]),
    "empty reference": (lambda t: _write_e2e(t / "e", train='mr,ref\n"name[A]",""\n'), ["devset.csv", "ref"]),
}


@pytest.mark.parametrize("name", E2E_PROBES)
def test_e2e_data_error(name, world, capsys, tmp_path):
    build, fragments = E2E_PROBES[name]
    code, _, err = _cli(capsys, _e2e_train(world, tmp_path, build(tmp_path)))
    assert_user_error(code, err, "train", *fragments)


SQUAD_DATASET = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
    {"context": "c", "qas": [{"id": "q1", "question": "?", "answers": [{"text": "a", "answer_start": 0}]}]}]}]}

SQUAD_PROBES = {
    "missing dataset": (None, {"q1": "a"}, ["no such file"]),
    "dataset not JSON": ("{not json", {"q1": "a"}, ["dataset.json", "JSON"]),
    "dataset non-UTF-8": (b"\xff\xfe{", {"q1": "a"}, ["dataset.json"]),
    "dataset without data": ({"version": "1.1"}, {"q1": "a"}, ["'data'"]),
    "predictions a list": (SQUAD_DATASET, ["a"], ["predictions.json", "list"]),
    "prediction not a string": (SQUAD_DATASET, {"q1": 3}, ["predictions.json", "q1"]),
    "unknown question id": (SQUAD_DATASET, {"q9": "a"}, ["q9"]),
    "truncated predictions": (SQUAD_DATASET, '{"q1": "a', ["predictions.json"]),
}


@pytest.mark.parametrize("name", SQUAD_PROBES)
def test_squad_file_error(name, capsys, tmp_path):
    dataset, predictions, fragments = SQUAD_PROBES[name]
    for fname, content in (("dataset.json", dataset), ("predictions.json", predictions)):
        if content is None:
            continue
        data = content if isinstance(content, bytes) else (content if isinstance(content, str)
                                                            else json.dumps(content)).encode()
        (tmp_path / fname).write_bytes(data)
    code, _, err = _cli(capsys, ["score-squad", tmp_path / "dataset.json", tmp_path / "predictions.json"])
    assert_user_error(code, err, "score-squad", *fragments)


# ---------------------------------------------------------------- adapter errors


class _Marker:
    """Unpickling this creates a file: proof that loralab unpickled (it must not)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _damage(kind: str, adapter: Path) -> None:
    cfg = adapter / "adapter_config.json"
    weights = adapter / "adapter_model.safetensors"
    if kind == "truncated safetensors":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "garbage safetensors":
        weights.write_bytes(b"\x00" * 64)
    elif kind == "corrupt adapter_config.json":
        cfg.write_text('{"r": 4, "lora_alpha"')
    elif kind == "adapter_config.json not an object":
        cfg.write_text("[1, 2]")
    elif kind == "rank mismatch":
        c = json.loads(cfg.read_text())
        c["r"] = 8
        cfg.write_text(json.dumps(c))
    elif kind == "missing adapter_config.json":
        cfg.unlink()
    elif kind == "pickle adapter_model.bin":
        weights.unlink()
        with open(adapter / "adapter_model.bin", "wb") as f:
            pickle.dump(_Marker(str(adapter.parent / "UNPICKLED")), f)
    elif kind == "head tensors missing":
        from safetensors.torch import load_file, save_file

        state = {k: v for k, v in load_file(str(weights)).items() if "classifier" not in k}
        save_file(state, str(weights))
    else:
        raise AssertionError(kind)


ADAPTER_PROBES = {
    "truncated safetensors": ["adapter_model.safetensors"],
    "garbage safetensors": ["adapter_model.safetensors"],
    "corrupt adapter_config.json": ["adapter_config.json"],
    "adapter_config.json not an object": ["adapter_config.json"],
    "rank mismatch": ["shape"],
    "missing adapter_config.json": ["adapter_config.json"],  # merge: "give the adapter dir itself" (no --adapter)
    "pickle adapter_model.bin": ["adapter_model.bin", "safetensors"],
    "head tensors missing": ["classifier"],
}


@pytest.mark.parametrize("command", ["eval", "merge"])
@pytest.mark.parametrize("kind", ADAPTER_PROBES)
def test_adapter_error(kind, command, world, capsys, tmp_path):
    adapter = _adapter_copy(world, tmp_path)
    _damage(kind, adapter)
    argv = (["eval", adapter.parent, "--adapter", adapter] if command == "eval"
            else ["merge", adapter, "--out", tmp_path / "merged"])
    code, _, err = _cli(capsys, argv)
    message = assert_user_error(code, err, command, *ADAPTER_PROBES[kind])
    assert command == "eval" or "--adapter" not in message  # merge has no --adapter option
    assert not (adapter.parent / "UNPICKLED").exists(), "a pickle was loaded"
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


# ---------------------------------------------------------------- model and run-dir errors


def test_unknown_model_name(world, capsys, tmp_path):
    code, _, err = _cli(capsys, _glue_train(world, tmp_path, world["glue"], "model.name=no-such-model-xyz"))
    assert_user_error(code, err, "train", "'no-such-model-xyz'", "zoo name")


def test_model_dir_without_config_json(world, capsys, tmp_path):
    (tmp_path / "empty-model").mkdir()
    code, _, err = _cli(capsys, _glue_train(world, tmp_path, world["glue"], f"model.name={tmp_path / 'empty-model'}"))
    assert_user_error(code, err, "train", "config.json")


def test_unknown_glue_task(world, capsys, tmp_path):
    code, _, err = _cli(capsys, _glue_train(world, tmp_path, world["glue"], "data.task=rtee"))
    assert_user_error(code, err, "train", "'rtee'")


def test_unknown_target_modules(world, capsys, tmp_path):
    code, _, err = _cli(capsys, _glue_train(world, tmp_path, world["glue"], "lora.target_modules=[nope]"))
    assert_user_error(code, err, "train", "['nope']", "target_modules", "matched no module")


def _unregistered_run(world, tmp_path) -> Path:
    import shutil

    d = tmp_path / "elsewhere" / world["run"].name
    shutil.copytree(world["run"], d)
    return d


def test_eval_of_a_run_dir_not_in_the_registry(world, capsys, tmp_path):
    d = _unregistered_run(world, tmp_path)
    code, out, err = _cli(capsys, ["eval", d, f"out_dir={tmp_path / 'evals'}"])
    assert code == 0, err  # eval needs only the config and the adapter: it records a new run


def test_resume_of_a_run_dir_not_in_the_registry(world, capsys, tmp_path):
    d = _unregistered_run(world, tmp_path)
    code, _, err = _cli(capsys, ["train", "--resume", d])
    assert_user_error(code, err, "train", str(d.parent / "runs.sqlite"))


def test_resume_of_a_non_run_dir(capsys, tmp_path):
    code, _, err = _cli(capsys, ["train", "--resume", tmp_path])
    assert_user_error(code, err, "train", "not a run dir")


def test_runs_list_of_a_corrupt_registry(capsys, tmp_path):
    (tmp_path / "runs.sqlite").write_bytes(b"this is not a database" * 100)
    code, _, err = _cli(capsys, ["runs", "--root", tmp_path, "list"])
    assert_user_error(code, err, "runs", str(tmp_path / "runs.sqlite"), "move it away")


def test_train_into_a_corrupt_registry(world, capsys, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "runs.sqlite").write_bytes(b"this is not a database" * 100)
    code, _, err = _cli(capsys, _glue_train(world, tmp_path, world["glue"]))
    assert_user_error(code, err, "train", "runs.sqlite", "move it away")


def test_hints_name_only_keys_that_exist():
    """An error hint must never send the user to a key the schema does not have (issue 21: ``data.dir``,
    ``data.source=hub``): every ``section.key`` written in a string of loralab's source is a real key."""
    import io
    import re
    import tokenize

    from loralab.engine.config import all_keys

    keys = set(all_keys())
    for experiment in ("glue", "e2e", "instruct"):
        keys |= set(all_keys(experiment))
    key = r"((?:model|lora|train|data|generate)\.[a-z_]+)"
    # a hint: "key=value", or "set/use/pass/raise/lower/check key"
    pattern = re.compile(rf"(?<![\w.]){key}=|\b(?:set|use|pass|raise|lower|check|needs)\s+{key}\b")
    bad = []
    for path in (ROOT / "src" / "loralab").rglob("*.py"):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type != tokenize.STRING and tok.type != getattr(tokenize, "FSTRING_MIDDLE", -1):
                continue
            for found in pattern.findall(tok.string):
                key = found[0] or found[1]
                if key not in keys:
                    bad.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: {key}")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- the known-vs-bug boundary


@pytest.fixture
def buggy(monkeypatch):
    from loralab.engine import experiment as E

    class Buggy:
        name, sections, presets = "buggy", (), {}

        from tests.engine.toy_experiment import ToyData as data_config

        def build(self, cfg):
            return None.model  # an AttributeError: a bug, not the user's input

        def baseline(self, built):
            return None

        def report(self, built, fit, run_dir):
            raise AssertionError

    monkeypatch.setitem(E._REGISTRY, "buggy", Buggy())


def test_a_real_bug_shows_its_traceback_and_asks_for_a_report(buggy, capsys, tmp_path):
    code, _, err = _cli(capsys, ["train", "experiment=buggy", f"out_dir={tmp_path}"])
    assert code == 1
    assert "Traceback" in err and "AttributeError" in err and "please report it" in err


def test_a_key_error_inside_an_experiment_is_a_bug(monkeypatch, capsys, tmp_path):
    from loralab.engine import experiment as E
    from tests.engine.toy_experiment import ToyExperiment

    class KeyBug(ToyExperiment):
        name = "keybug"

        def build(self, cfg):
            return {}["missing"]

    monkeypatch.setitem(E._REGISTRY, "keybug", KeyBug())
    code, _, err = _cli(capsys, ["train", "experiment=keybug", f"out_dir={tmp_path}"])
    assert code == 1 and "Traceback" in err and "KeyError" in err and "please report it" in err


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "LORALAB_EXPERIMENTS": "tests.engine.toy_experiment",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def test_subprocess_user_error_and_bug(tmp_path):
    """The same boundary through a real ``python -m loralab`` process."""
    bad = tmp_path / "c.yaml"
    bad.write_bytes(b"experiment: toy\n\xff\xfe\n")
    p = subprocess.run([sys.executable, "-m", "loralab", "train", str(bad)], capture_output=True, text=True,
                       env=_env(), cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("loralab train: error: ")
    p = subprocess.run([sys.executable, "-m", "loralab", "train", "experiment=toy", "data.n=3"],
                       capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "data.n" in p.stderr
