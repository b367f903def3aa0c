"""GLUE with every method of the paper's comparison (adapters, prefixes, the top layers): a tiny BERT is
built, trained two steps through the runner, its results.json holds the counts by kind (equal to the
formulas written out in tiny_runs), the saved ``adapter/`` dir records the method and its settings, and
building from that dir (``lora.init_from``, as ``loralab eval`` does) gives the trained model's logits
exactly. Warm start across tasks re-creates a head of another shape; a LoRA build refuses such a dir
with the core's reason why it cannot merge."""
import json

import pytest
import torch

from loralab.engine.config import load_config
from loralab.engine.runner import run_training
from loralab.models.tiny import tiny_model
from loralab.tasks.glue import experiment as G
from tests.tasks.common.tiny_runs import HEAD, expected_kinds, glue_data_dir, tiny_bert_dir

EXP = G.EXPERIMENT

CASES = {  # name: (overrides, expected_kinds kwargs)
    "adapter_h": (["lora.method=adapter_h", "lora.r=4"], {"r": 4}),
    "adapter_h_ln": (["lora.method=adapter_h", "lora.r=4", "lora.adapter_layernorm=true",
                      "lora.adapter_activation=gelu"], {"r": 4, "layernorm": True}),
    "adapter_l": (["lora.method=adapter_l", "lora.r=2"], {"r": 2}),
    "adapter_p": (["lora.method=adapter_p", "lora.r=8"], {"r": 8}),
    "prefix_layer": (["lora.method=prefix_layer", "lora.prefix_length=3"], {"l_p": 3}),
    "prefix_layer_reparam": (["lora.method=prefix_layer", "lora.prefix_length=3", "lora.prefix_reparam=true",
                              "lora.prefix_reparam_dim=6", "lora.prefix_reparam_hidden=5"], {"l_p": 3, "e": 6, "h": 5}),
    "prefix_embed": (["lora.method=prefix_embed", "lora.prefix_length=2", "lora.infix_length=3"], {"l_p": 2, "l_i": 3}),
    "ft_top2": (["lora.method=ft_top2", "lora.top_layers=1"], {"k": 1}),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue-methods")
    return tiny_bert_dir(root), glue_data_dir(root)


def _cfg(dirs, *overrides, task="sst2"):
    model, data = dirs
    return load_config(None, ["experiment=glue", f"model.name={model}", f"data.data_dir={data}", f"data.task={task}",
                              "data.max_length=32", "train.max_steps=2", "train.batch_size=8", "train.lr=1e-2",
                              "train.quiet=true", *overrides])


def _logits(model, built):
    batch = built.task.collate(next(iter(built.state["eval_sets"].values()))[:8])
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _recording(monkeypatch):
    builds = []
    original = EXP.build

    def build(cfg):
        builds.append(original(cfg))
        return builds[-1]

    monkeypatch.setattr(EXP, "build", build)
    return builds


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_trains_counts_saves_and_reloads_exactly(dirs, tmp_path, monkeypatch, case):
    overrides, formula = CASES[case]
    method = overrides[0].split("=")[1]
    builds = _recording(monkeypatch)
    cfg = _cfg(dirs, f"out_dir={tmp_path}", *overrides)
    run, results = run_training(cfg)
    assert json.loads((run.dir / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["run"]["method"] == method and results["details"]["fit"]["global_step"] == 2

    # counts: results.json against the formulas; the head trains with every method
    kinds = {"head": HEAD, **expected_kinds(method, **formula)}
    by_kind = results["details"]["method_info"]["by_kind"]
    assert {k: v["trainable"] for k, v in by_kind.items() if v["trainable"]} == kinds
    assert results["params"]["trainable"] == sum(kinds.values())
    base_total = sum(p.numel() for p in tiny_model("bert", "seq_cls", num_labels=2).parameters())
    added = sum(by_kind[k]["total"] for k in ("adapter", "prefix"))  # ft_top2 and LayerNorms add nothing
    assert results["params"]["total"] == base_total + added
    if case == "prefix_layer":  # the paper's PreLayer count, L d l_p, is half the K/V prefixes trained here
        assert results["details"]["method_info"]["formula"]["paper"] == 2 * 32 * 3

    # the saved dir: the method, its settings and the head
    adapter = run.dir / "adapter"
    assert results["details"]["adapter_dir"] == str(adapter)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["method"] == method and saved["head"] == ["classifier"]
    settings = results["details"]["method_info"]["settings"]
    assert {k: saved[k] for k in settings if k not in ("reparam", "reparam_dim", "reparam_hidden")} == \
        {k: v for k, v in settings.items() if k not in ("reparam", "reparam_dim", "reparam_hidden")}
    if "reparam" in case:  # saved as the plain prefixes the MLP computes
        assert saved["reparam"] is False and saved["merged_reparametrization"] is True

    # reload from the dir, as `loralab eval` builds it: the same logits
    trained = builds[0]
    expected = _logits(trained.model, trained)
    reloaded = EXP.build(_cfg(dirs, *overrides, f"lora.init_from={adapter}"))
    assert reloaded.state["method"]["warm_start"]["head_loaded"] is True
    torch.testing.assert_close(_logits(reloaded.model, reloaded), expected, rtol=0, atol=1e-6)
    fresh = EXP.build(_cfg(dirs, *overrides))
    assert (_logits(fresh.model, fresh) - expected).abs().max() > 1e-4  # what was reloaded had trained
    # the reloaded method trains what was saved: a reparametrised prefix comes back as plain K/V prefixes
    plain = {"head": HEAD, **expected_kinds(method, **{k: v for k, v in formula.items() if k not in ("e", "h")})}
    assert {k: v["trainable"] for k, v in reloaded.state["method"]["by_kind"].items() if v["trainable"]} == plain


def test_warm_start_to_another_label_count_recreates_the_head(dirs, tmp_path, capfd):
    from safetensors.torch import load_file

    from loralab.engine.trainer import fit

    cfg = _cfg(dirs, "lora.method=adapter_h", "lora.r=4")
    built = EXP.build(cfg)
    EXP.report(built, fit(built.model, built.task, cfg.train, log=lambda *a: None), tmp_path / "sst2")
    saved = load_file(str(tmp_path / "sst2" / "adapter" / "adapter_model.safetensors"))
    assert any(".up." in k and v.abs().sum() > 0 for k, v in saved.items())  # the adapters trained

    stsb = EXP.build(_cfg(dirs, "lora.method=adapter_h", "lora.r=4", f"lora.init_from={tmp_path / 'sst2' / 'adapter'}",
                          task="stsb"))
    assert "the head is re-created" in capfd.readouterr().err
    assert stsb.state["method"]["warm_start"]["head_loaded"] is False
    params = dict(stsb.model.named_parameters())
    for key, value in saved.items():
        if not key.startswith("classifier."):
            assert torch.equal(params[key].detach(), value) and params[key].requires_grad, key
    assert stsb.model.classifier.weight.shape == (1, 32) and stsb.model.classifier.weight.requires_grad


def test_a_method_dir_is_refused_by_lora_and_by_another_method(dirs, tmp_path):
    from loralab.engine.trainer import fit

    cfg = _cfg(dirs, "lora.method=prefix_layer", "lora.prefix_length=2")
    built = EXP.build(cfg)
    EXP.report(built, fit(built.model, built.task, cfg.train, log=lambda *a: None), tmp_path)
    adapter = tmp_path / "adapter"
    # what `loralab merge` builds today (method forced to lora): refused with the core's reason
    with pytest.raises(ValueError, match=r"holds a saved 'prefix_layer' method.*set lora.method=prefix_layer.*"
                                         r"prefix tuning cannot be merged into the base weights"):
        EXP.build(_cfg(dirs, f"lora.init_from={adapter}"))
    with pytest.raises(ValueError, match="holds a saved 'prefix_layer' method but lora.method is 'adapter_p'"):
        EXP.build(_cfg(dirs, "lora.method=adapter_p", f"lora.init_from={adapter}"))


@pytest.mark.parametrize("method", ["adapter_h", "prefix_embed", "ft_top2"])
def test_eval_of_a_method_run_through_the_runner(dirs, tmp_path, method):
    """``runner.evaluate`` (``loralab eval RUN_DIR``) on a saved method dir scores what the run reported."""
    from loralab.engine.runner import evaluate

    run, results = run_training(_cfg(dirs, f"out_dir={tmp_path}", f"lora.method={method}"))
    _, again = evaluate(load_config(run.dir / "config.yaml"), run.dir / "adapter")
    assert again["metrics"] == results["metrics"] and again["run"]["method"] == method


def test_prefix_embed_inputs_must_fit_the_models_positions(dirs):
    with pytest.raises(ValueError, match=r"inserts lora.prefix_length \+ lora.infix_length = 5 tokens.*"
                                         r"data.max_length=126 \+ 5 exceeds the model's 128 positions"):
        EXP.build(_cfg(dirs, "lora.method=prefix_embed", "lora.prefix_length=2", "lora.infix_length=3",
                       "data.max_length=126"))


@pytest.mark.parametrize("method", ["ft_top2", "bitfit"])
def test_merge_of_a_top_layers_or_bias_run_exports_the_trained_model(dirs, tmp_path, capsys, method):
    """``loralab merge RUN`` on a method whose trained tensors are the model's own: the exported plain
    model, reloaded with transformers, gives the trained model's logits (not the base's)."""
    import transformers

    from loralab import cli

    run, _ = run_training(_cfg(dirs, f"out_dir={tmp_path}", f"lora.method={method}", "train.lr=5e-2"))
    assert (run.dir / "adapter" / "adapter_config.json").is_file()
    assert cli.main(["merge", str(run.dir), "--out", str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    trained = EXP.build(_cfg(dirs, f"lora.method={method}", f"lora.init_from={run.dir / 'adapter'}"))
    base = EXP.build(_cfg(dirs))
    batch = trained.task.collate(next(iter(trained.state["eval_sets"].values()))[:8])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected, got = trained.model.eval()(**inputs).logits, merged(**inputs).logits
        assert (base.model.eval()(**inputs).logits - expected).abs().max() > 1e-3  # training moved it
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert info["method"] == method and info["max_abs_logit_diff_reloaded"] < 1e-5


def test_merge_refuses_adapters_and_prefixes_and_a_missing_head(dirs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from loralab import cli

    for method, reason in [("adapter_h", "bottleneck adapters cannot be merged"),
                           ("prefix_layer", "prefix tuning cannot be merged")]:
        run, _ = run_training(_cfg(dirs, f"out_dir={tmp_path / method}", f"lora.method={method}"))
        assert cli.main(["merge", str(run.dir), "--out", str(tmp_path / f"m-{method}")]) == 2
        err = capsys.readouterr().err
        assert f"holds a {method!r} run, which cannot be merged" in err and reason in err
        assert not (tmp_path / f"m-{method}").exists()
    run, _ = run_training(_cfg(dirs, f"out_dir={tmp_path / 'top'}", "lora.method=ft_top2"))
    weights = run.dir / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("classifier.")}, str(weights))
    assert cli.main(["merge", str(run.dir), "--out", str(tmp_path / "m-top")]) == 2
    err = capsys.readouterr().err
    assert "the head ['classifier']" in err and "--allow-fresh-head" in err and not (tmp_path / "m-top").exists()
