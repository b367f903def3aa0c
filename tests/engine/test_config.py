"""Typed run config: coercion, unknown keys, ranges, layering, round-trip, generated docs, and the
experiment-specific data section (a key an experiment does not read is an error)."""

import dataclasses
import re
import textwrap
import typing

import pytest
import yaml

from loralab.core.config import LoraConfig
from loralab.engine import config as C
from loralab.engine.config import (ConfigError, LoraSection, RunConfig, TrainConfig, all_keys, config_help,
                                   config_to_yaml_with_docs, load_config, save_config)
from loralab.engine.typed_config import field_docs
from tests.engine import toy_experiment  # noqa: F401  (registers the "toy" experiment)

I = ["experiment=instruct"]  # the experiment that reads every shared section (generate included)


def _yaml(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_every_field_is_documented():
    classes = {RunConfig, *(cls for name in C.experiments() for cls in C.sections_for(name).values())}
    for cls in classes:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1e-4", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("lora.rank=4", "unknown key 'lora.rank'; did you mean 'lora.r'?"),
    ("lr=1e-4", "unknown key 'lr'; did you mean 'train.lr'?"),
    ("train.max_length=64", "unknown key 'train.max_length'; did you mean 'data.max_length'?"),
    ("trian.epochs=2", "unknown key 'trian.epochs'; did you mean 'train.epochs'?"),
])
def test_unknown_override_names_the_closest_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*I, override])
    assert str(err.value) == expected


def test_unknown_yaml_key_at_any_level(tmp_path):
    path = _yaml(tmp_path, """
        train:
          lr: 1.0e-4
          warmup_ratoi: 0.1
    """)
    with pytest.raises(ConfigError, match=r"unknown key 'train.warmup_ratoi'; did you mean 'train.warmup_ratio'\?"):
        load_config(path, I)
    with pytest.raises(ConfigError, match=r"unknown key 'modle'; did you mean 'model'\?"):
        load_config(_yaml(tmp_path, "modle: {name: x}\n"), I)
    with pytest.raises(ConfigError, match=r"unknown key 'KEY'"):
        load_config(None, [*I, "KEY=x"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.KEY'"):
        load_config(None, [*I, "train.KEY=x"])


def test_yaml_strings_are_coerced_by_annotated_type(tmp_path):
    # PyYAML reads 1e-8 and 1e3 (no dot) as strings; the annotations make them numbers.
    path = _yaml(tmp_path, """
        train: {eps: 1e-8, lr: 5e-4, max_steps: 1e3, keep_best: no, betas: [0.9, 0.95], epochs: 2}
        lora: {target_modules: q_proj, modules_to_save: "classifier, pooler", lora_alpha: 16}
        experiment: instruct
    """)
    assert yaml.safe_load("x: 1e-8")["x"] == "1e-8"  # the trap this guards against
    cfg = load_config(path)
    assert cfg.train.eps == 1e-8 and type(cfg.train.eps) is float
    assert cfg.train.lr == 0.0005
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int
    assert cfg.train.keep_best is False
    assert cfg.train.betas == [0.9, 0.95]
    assert cfg.train.epochs == 2.0 and type(cfg.train.epochs) is float
    assert cfg.lora.target_modules == "q_proj"  # list | str: a string stays one pattern
    assert cfg.lora.modules_to_save == ["classifier", "pooler"]  # pure list: comma-separated
    assert cfg.lora.lora_alpha == 16.0 and type(cfg.lora.lora_alpha) is float


def test_override_values_are_parsed_and_typed():
    cfg = load_config(None, [*I, "lora.target_modules=[q_proj,v_proj]", "train.lr=4e-4", "lora.init_from=None",
                             "data.task=yes", "model.name=1e3", "lora.fused_qkv={c_attn: [true, false, true]}",
                             "lora.rank_pattern.encoder.layer.0.query=4", "data.system_prompt=You are: terse"])
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == 4e-4
    assert cfg.lora.init_from is None
    assert cfg.data.task == "yes"  # YAML would say True; a str field keeps the text typed
    assert cfg.model.name == "1e3"
    assert cfg.lora.fused_qkv == {"c_attn": [True, False, True]}
    assert cfg.lora.rank_pattern == {"encoder.layer.0.query": 4}  # module names contain dots
    assert cfg.data.system_prompt == "You are: terse"


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=16.5", "train.batch_size (from override 'train.batch_size=16.5'): expected int, got 16.5"),
    ("train.batch_size=true", "expected int, got True"),
    ("train.lr=abc", "train.lr (from override 'train.lr=abc'): expected float, got 'abc'"),
    ("train.lr=nan", "expected float, got 'nan' (not finite)"),
    ("train.keep_best=2", "train.keep_best (from override 'train.keep_best=2'): expected bool, got 2"),
    ("train.bf16=true", "unknown key 'train.bf16': it was replaced; use model.compute_dtype=bfloat16"),
    ("model.quantize=NF4", "expected 'none' | 'nf4' | 'fp4' | 'int4', got 'NF4'; did you mean 'nf4'?"),
    ("train.betas=[0.9, x]", "train.betas (from override 'train.betas=[0.9, x]')[1]: expected float, got 'x'"),
    ("lora.fused_qkv=[1]", "expected dict[str, list[bool]], got [1]"),
    ("train.lr=[1", "override 'train.lr=[1': the value is not valid YAML"),
    ("train.lr", "override 'train.lr' is not key=value"),
])
def test_type_errors_name_key_value_and_type(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*I, override])
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("lora.r=0", "lora.r: must be an integer >= 1, got 0"),
    ("lora.lora_dropout=1.0", "lora.lora_dropout: must be in [0, 1), got 1.0"),
    ("lora.lora_dropout=-0.1", "lora.lora_dropout: must be in [0, 1), got -0.1"),
    ("lora.lora_alpha=0", "lora.lora_alpha: must be > 0"),
    ("lora.target_modules=[]", "lora.target_modules: is empty"),
    ("lora.target_modules=q_proj,v_proj", "write a list: [q_proj,v_proj]"),
    ("lora.rank_pattern={q: 0}", "lora.rank_pattern: ['q'] must be an integer >= 1, got 0"),
    ("lora.alpha_pattern={q: -1}", "lora.alpha_pattern: ['q'] must be > 0, got -1.0"),
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
    ("train.grad_accum=0", "train.grad_accum: must be >= 1, got 0"),
    ("train.warmup_ratio=1", "train.warmup_ratio: must be in [0, 1), got 1.0"),
    ("train.epochs=0", "train.epochs: must be > 0, got 0.0"),
    ("train.label_smoothing=1", "train.label_smoothing: must be in [0, 1), got 1.0"),
    ("train.betas=[0.9]", "train.betas: must be two numbers in [0, 1)"),
    ("train.betas=[0.9, 1.0]", "train.betas: must be two numbers in [0, 1)"),
    ("train.eps=0", "train.eps: must be > 0"),
    ("train.max_steps=-1", "train.max_steps: must be >= 0, got -1"),
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("train.warmup_steps=20|train.max_steps=10", "train.warmup_steps: 20 exceeds train.max_steps=10"),
    ("data.max_length=0", "data.max_length: must be >= 1, got 0"),
    ("model.quant_block_size=48", "model.quant_block_size: must be a power of two in [32, 4096]"),
    ("generate.temperature=0", "generate.temperature: must be > 0"),
    ("generate.do_sample=true", "set generate.num_beams=1"),
])
def test_range_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*I, *override.split("|")])
    assert message in str(err.value)


def test_range_boundaries_that_are_allowed():
    cfg = load_config(None, [*I, "lora.lora_dropout=0", "train.warmup_ratio=0.0", "train.label_smoothing=0.99",
                             "lora.r=1", "train.betas=[0, 0.999]", "generate.do_sample=true", "generate.num_beams=1",
                             "model.quant_block_size=4096"])
    assert (cfg.lora.lora_dropout, cfg.train.label_smoothing, cfg.lora.r) == (0.0, 0.99, 1)


def test_all_range_errors_reported_at_once_across_sections():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*I, "train.lr=-1", "lora.r=0", "data.max_length=0"])
    text = str(err.value)
    assert "train.lr" in text and "lora.r" in text and "data.max_length" in text


def test_quantized_base_needs_lora():
    with pytest.raises(ConfigError, match="'full' cannot train a nf4-quantized base"):
        load_config(None, [*I, "model.quantize=nf4", "lora.method=full"])
    assert load_config(None, [*I, "model.quantize=nf4"]).model.quantize == "nf4"


def test_direct_construction_coerces_and_validates():
    assert TrainConfig(lr="1e-4", eps="1e-8").lr == 1e-4
    with pytest.raises(ConfigError, match="train.lr: must be > 0"):
        TrainConfig(lr=-1.0)
    cfg = RunConfig(experiment="toy", train={"lr": 2e-4}, lora=LoraSection(r=4))
    assert cfg.train.lr == 2e-4 and cfg.lora.r == 4 and cfg.model == C.ModelConfig()
    assert cfg.data == toy_experiment.ToyData() and cfg.generate is None  # the toy reads no generate section
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'"):
        RunConfig(experiment="toy", train={"lrr": 1})
    with pytest.raises(ConfigError, match="experiment: not set"):
        RunConfig()
    with pytest.raises(ConfigError, match="generate: experiment 'toy' does not read the generate section"):
        RunConfig(experiment="toy", generate={"num_beams": 2})


def test_layer_precedence_defaults_preset_yaml_overrides(tmp_path, monkeypatch):
    monkeypatch.setitem(toy_experiment.ToyExperiment.presets, "t-preset",
                        {"train.lr": 1e-3, "train.epochs": 5, "lora": {"r": 4, "lora_alpha": 4}})
    path = _yaml(tmp_path, "preset: t-preset\ntrain: {epochs: 7, seed: 3}\n")
    cfg = load_config(path, ["train.seed=9"])
    assert cfg.experiment == "toy"       # the preset's experiment
    assert cfg.train.lr == 1e-3          # preset
    assert cfg.lora.r == 4               # preset (nested form)
    assert cfg.train.epochs == 7.0       # YAML beats preset
    assert cfg.train.seed == 9           # override beats YAML
    assert cfg.train.batch_size == 16    # default
    same = load_config(_yaml(tmp_path, "train: {epochs: 7, seed: 3}\n", "d.yaml"), ["train.seed=9", "preset=t-preset"])
    assert same == cfg
    assert load_config(None, [], preset="t-preset").train.lr == 1e-3


def test_preset_errors(monkeypatch):
    monkeypatch.setitem(toy_experiment.ToyExperiment.presets, "toy-sst2-test", {"data.n": 10})
    with pytest.raises(ConfigError, match=r"unknown preset 'toy-sst2-tset'; did you mean 'toy-sst2-test'\?"):
        load_config(None, [], preset="toy-sst2-tset")
    with pytest.raises(ConfigError, match="several presets"):
        load_config(None, ["preset=toy-fit"], preset="toy-sst2-test")
    monkeypatch.setitem(toy_experiment.ToyExperiment.presets, "bad", {"train.lrr": 1})
    with pytest.raises(ConfigError, match="preset 'bad'.*unknown key 'train.lrr'"):
        load_config(None, [], preset="bad")


def test_every_registered_preset_resolves():
    presets = C.list_presets()
    assert {"quickstart", "glue-cpu-sst2", "e2e-cpu", "qlora", "toy-fit"} <= set(presets)
    for name, overrides in presets.items():
        cfg = load_config(None, [], preset=name)
        assert cfg.experiment == overrides["experiment"], name
        assert overrides.get("_doc"), f"preset {name} has no one-line description (_doc)"


def test_a_key_the_experiment_does_not_read_is_an_error():
    with pytest.raises(ConfigError, match="data.packing: experiment 'glue' does not read this key .*read by instruct"):
        load_config(None, ["data.packing=true"], preset="glue-cpu-sst2")
    with pytest.raises(ConfigError, match="generate.num_beams: experiment 'glue' does not read this key .*e2e, instruct"):
        load_config(None, ["generate.num_beams=2"], preset="glue-cpu-sst2")
    with pytest.raises(ConfigError, match="lora.r: not read with lora.method=full"):
        load_config(None, ["lora.r=4"], preset="glue-cpu-sst2-full")
    assert load_config(None, ["lora.method=full"], preset="glue-cpu-sst2").lora.method == "full"  # preset's r: fine
    with pytest.raises(ConfigError, match="unknown experiment 'glu'; did you mean 'glue'"):
        load_config(None, ["experiment=glu"])
    with pytest.raises(ConfigError, match="no experiment: pass --preset NAME or experiment=NAME"):
        load_config(None, ["train.lr=1e-4"])
    assert "data.packing" not in all_keys("glue") and "data.packing" in all_keys("instruct")
    assert "train.num_workers" not in all_keys() and "model.num_labels" not in all_keys()


def test_lora_section_uses_the_core_names_and_its_validation():
    names = set(LoraSection.METHOD_KEYS["lora"]) - {"method", "init_from"}  # the keys LoRA reads
    assert names <= set(LoraConfig.field_names())  # the same spelling as the core LoraConfig (and PEFT)
    with pytest.raises(ConfigError, match=r"did you mean 'lora.lora_alpha'"):
        load_config(None, [*I, "lora.alpha=16"])
    with pytest.raises(ValueError, match="LoraConfig.lora_alpha: must be > 0"):  # the same check, in the core
        LoraConfig(lora_alpha=0)


def test_base_config_is_the_starting_layer():
    base = load_config(None, [*I, "train.lr=1e-3", "lora.r=16"])
    cfg = load_config(None, ["train.seed=4"], base=base)
    assert (cfg.train.lr, cfg.lora.r, cfg.train.seed) == (1e-3, 16, 4)
    assert base.train.seed == 0  # not mutated


def test_partial_yaml_and_file_errors(tmp_path):
    cfg = load_config(_yaml(tmp_path, "experiment: toy\ntrain:\n  lr: 3e-4\n"))
    assert cfg.train.lr == 3e-4 and cfg.lora == LoraSection() and cfg.data == toy_experiment.ToyData()
    assert load_config(_yaml(tmp_path, "", "empty.yaml"), ["experiment=toy"]) == RunConfig(experiment="toy")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(_yaml(tmp_path, "- 1\n- 2\n", "list.yaml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="train .*expected a mapping"):
        load_config(_yaml(tmp_path, "train: 3\n", "scalar.yaml"), ["experiment=toy"])
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")


def test_duplicate_yaml_keys_are_errors(tmp_path):
    path = _yaml(tmp_path, """
        train:
          lr: 1.0e-4
        lora: {r: 4}
        train:
          epochs: 3
    """)
    with pytest.raises(ConfigError, match=r"duplicate key 'train' \(line 5 and line 2\)"):
        load_config(path, I)
    with pytest.raises(ConfigError, match="duplicate key 'r'"):
        load_config(_yaml(tmp_path, "lora: {r: 4, r: 8}\n", "dup2.yaml"))


def _nondefault() -> RunConfig:
    return load_config(None, [
        "experiment=instruct", "name=my run", "model.name=smollm2-135m", "model.quantize=nf4",
        "model.quant_block_size=128", "lora.target_modules=[q_proj,v_proj]", "lora.exclude_modules=.*lm_head",
        "lora.rank_pattern={q_proj: 4}", "lora.alpha_pattern={v_proj: 2.5}",
        "lora.fused_qkv={c_attn: [true, false, true]}", "lora.init_lora_weights=gaussian",
        "train.eps=1e-7", "train.lr=3.3e-5", "train.betas=[0.9, 0.95]", "train.max_steps=100",
        "data.system_prompt=Be brief.\nReally: brief #1", "generate.length_penalty=-0.5",
    ])


def test_save_load_round_trip(tmp_path):
    cfg = _nondefault()
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert not (tmp_path / "config.yaml.tmp").exists()
    # The documented YAML (comments above each field) is loadable too, to the same config.
    (tmp_path / "doc.yaml").write_text(config_to_yaml_with_docs(cfg))
    assert load_config(tmp_path / "doc.yaml") == cfg
    assert "# Peak learning rate (> 0)." in config_to_yaml_with_docs(cfg)


def test_to_lora_config_maps_every_setting():
    section = _nondefault().lora
    lora = section.to_lora_config(task_type="CAUSAL_LM")
    assert isinstance(lora, LoraConfig)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (section.r, section.lora_alpha, section.lora_dropout)
    assert lora.target_modules == ["q_proj", "v_proj"] and lora.exclude_modules == ".*lm_head"
    assert lora.init_lora_weights == "gaussian" and lora.rank_pattern == {"q_proj": 4}
    assert lora.alpha_pattern == {"v_proj": 2.5} and lora.fused_qkv == {"c_attn": [True, False, True]}
    assert lora.task_type == "CAUSAL_LM"
    assert LoraSection().to_lora_config().init_lora_weights is True
    lora.target_modules.append("k_proj")  # a copy, not the section's list
    assert section.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="lora.method is 'bitfit'"):
        LoraSection(method="bitfit").to_lora_config()


def test_help_lists_every_key_with_doc_and_default():
    text = config_help()
    for experiment in C.experiments():
        for key in all_keys(experiment):
            section, _, name = key.rpartition(".")
            cls = C.sections_for(experiment)[section] if section else RunConfig
            first_doc_line = field_docs(cls)[name].splitlines()[0]
            assert f"  {key} (" in text, key
            assert first_doc_line in text, key
    assert "data (experiment glue):" in text and "data (experiment toy):" in text
    assert "train.lr (float, default 0.0005)" in text
    assert "train.optimizer ('adamw' | 'adamw8bit' | 'paged_adamw' | 'paged_adamw8bit', default 'adamw')" in text


CONFIGS = sorted((C.Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path)
    for line in path.read_text().splitlines():  # what the file says explicitly is what we got
        if line.startswith("name:"):
            assert cfg.name == line.split(":", 1)[1].strip()


# ---------------------------------------------------------------- the methods' keys (LoraSection.METHOD_KEYS)


def test_every_lora_field_is_read_by_some_method_and_documented():
    fields = {f.name for f in dataclasses.fields(LoraSection)}
    methods = set(typing.get_args(typing.get_type_hints(LoraSection)["method"]))
    assert set(LoraSection.METHOD_KEYS) == methods
    assert set().union(*map(set, LoraSection.METHOD_KEYS.values())) == fields
    assert all(set(keys) <= fields and "method" in keys for keys in LoraSection.METHOD_KEYS.values())
    for name, (other, _) in LoraSection.READ_IF.items():
        assert all(other in keys for keys in LoraSection.METHOD_KEYS.values() if name in keys)
    docs = field_docs(LoraSection)
    assert all(docs.get(f) for f in fields), sorted(f for f in fields if not docs.get(f))


@pytest.mark.parametrize("overrides,message", [
    (["lora.method=adapter_h", "lora.prefix_length=4"],
     r"lora.prefix_length: not read with lora.method=adapter_h \(read by prefix_layer, prefix_embed\)"),
    (["lora.method=adapter_l", "lora.adapter_layernorm=true"],
     r"lora.adapter_layernorm: not read with lora.method=adapter_l"),
    (["lora.method=ft_top2", "lora.r=4"], r"lora.r: not read with lora.method=ft_top2 \(read by lora, adapter_h"),
    (["lora.method=prefix_embed", "lora.lora_alpha=16"], r"lora.lora_alpha: not read with lora.method=prefix_embed"),
    (["lora.method=full", "lora.init_from=x"], r"lora.init_from: not read with lora.method=full"),
    (["lora.top_layers=3"], r"lora.top_layers: not read with lora.method=lora \(read by ft_top2\)"),
    (["lora.method=prefix_layer", "lora.prefix_reparam_dim=64"], r"lora.prefix_reparam_dim: read only with "
                                                                 r"lora.prefix_reparam=true"),
])
def test_a_key_the_method_does_not_read_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, preset="glue-cpu-sst2")


def test_keys_the_method_reads_and_inherited_values_are_accepted(tmp_path):
    cfg = load_config(None, ["lora.method=prefix_layer", "lora.prefix_reparam=true", "lora.prefix_reparam_dim=64",
                             "lora.prefix_length=4"], preset="glue-cpu-sst2")  # the preset's r, alpha, targets: fine
    assert (cfg.lora.prefix_reparam_dim, cfg.lora.prefix_length, cfg.lora.r) == (64, 4, 8)
    assert load_config(None, ["lora.method=adapter_h", "lora.r=16", "lora.adapter_layernorm=true"],
                       preset="glue-cpu-sst2").lora.r == 16
    # a saved config.yaml lists every key: a non-LoRA run's reloads (the preset's LoRA values are inherited)
    for preset, method in (("e2e-cpu", "ft_top2"), ("glue-cpu-sst2-full", "full"), ("glue-cpu-sst2", "adapter_p")):
        run = load_config(None, [f"lora.method={method}"], preset=preset)
        C.save_config(run, tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml") == run
        text = re.sub(r"lora_dropout: .*", "lora_dropout: 0.25", (tmp_path / "config.yaml").read_text())
        (tmp_path / "config.yaml").write_text(text)  # a LoRA key changed by hand in the file
        with pytest.raises(ConfigError, match=f"lora.lora_dropout: not read with lora.method={method}"):
            load_config(tmp_path / "config.yaml")


@pytest.mark.parametrize("overrides,message", [
    (["lora.method=prefix_layer", "lora.prefix_length=0"], "lora.prefix_length: must be >= 1"),
    (["lora.method=prefix_embed", "lora.prefix_length=0"],
     "prefix_embed needs lora.prefix_length \\+ lora.infix_length >= 1"),
    (["lora.method=ft_top2", "lora.top_layers=0"], "lora.top_layers: must be >= 1"),
    (["lora.method=prefix_embed", "lora.infix_length=-1"], "lora.infix_length: must be >= 0"),
])
def test_method_field_ranges(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["experiment=glue", *overrides])
