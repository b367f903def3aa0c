"""Every key of the schema is live: a real run of each built-in experiment (tiny models, two steps) reads
every field of its sections. A key no code reads would be a setting that silently does nothing."""

import json

import pytest

from loralab.engine.config import all_keys, load_config, sections_for
from loralab.engine.runner import run_training
from loralab.engine.typed_config import Section


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from loralab.models.tiny import tiny_model, tiny_tokenizer

    dirs = {}
    for arch, kind in (("bert", "base"), ("llama", "causal_lm")):
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        tiny_model(arch, kind, seed=0).save_pretrained(path, safe_serialization=True)
        tiny_tokenizer(arch).save_pretrained(path)
        dirs[arch] = path
    return dirs


ON_EVENT = {"train.nan_policy": "read when a loss is not finite; tests/engine/test_trainer.py runs both policies"}
"""Keys read only when something happens in training (and tested where it does)."""


def _reads(overrides, out_dir, monkeypatch):
    cfg = load_config(None, [f"out_dir={out_dir}", "train.max_steps=2", "train.batch_size=4",
                             "train.quiet=true", "train.tensorboard=false", *overrides])
    monkeypatch.setattr(Section, "reads", set())
    _, results = run_training(cfg)
    reads = set(Section.reads)
    monkeypatch.setattr(Section, "reads", None)
    assert results["score"] == results["score"], "the run produced no score"
    return cfg.experiment, reads


def test_every_key_is_read_by_some_run(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr("loralab.metrics.e2e.score",  # the official scorer needs Java and seconds; not a config read
                        lambda hyps, refs: {"BLEU": 0.1, "NIST": 1.0, "METEOR": 0.1, "ROUGE_L": 0.1, "CIDEr": 0.1})
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": f"It is {i + 1}.\n#### {i + 1}"}) + "\n"
                            for i in range(2)))
    runs = [
        ["experiment=glue", f"model.name={tiny_dirs['bert']}", "data.task=rte", "data.train_samples=16",
         "data.eval_samples=8", "lora.rank_pattern={query: 4}", "lora.alpha_pattern={value: 4}",
         "train.max_steps=0", "train.epochs=0.5"],
        ["experiment=e2e", f"model.name={tiny_dirs['llama']}", "data.train_samples=8", "data.eval_samples=2",
         "data.max_length=512",
         "generate.num_beams=2", "generate.max_new_tokens=4"],
        # the paper's other methods: each reads its own lora.* fields (LoraSection.METHOD_KEYS)
        ["experiment=glue", f"model.name={tiny_dirs['bert']}", "data.task=rte", "data.train_samples=8",
         "data.eval_samples=4", "lora.method=adapter_h", "lora.r=4", "lora.adapter_layernorm=true",
         "lora.adapter_activation=gelu"],
        ["experiment=glue", f"model.name={tiny_dirs['bert']}", "data.task=rte", "data.train_samples=8",
         "data.eval_samples=4", "lora.method=prefix_layer", "lora.prefix_length=2", "lora.prefix_reparam=true",
         "lora.prefix_reparam_dim=4", "lora.prefix_reparam_hidden=4"],
        ["experiment=glue", f"model.name={tiny_dirs['bert']}", "data.task=rte", "data.train_samples=8",
         "data.eval_samples=4", "lora.method=prefix_layer", "lora.prefix_length=2", "lora.prefix_init_text=ab"],
        ["experiment=glue", f"model.name={tiny_dirs['bert']}", "data.task=rte", "data.train_samples=8",
         "data.eval_samples=4", "data.max_length=64", "lora.method=prefix_embed", "lora.prefix_length=1",
         "lora.infix_length=2"],
        ["experiment=e2e", f"model.name={tiny_dirs['llama']}", "data.train_samples=4", "data.eval_samples=1",
         "data.max_length=512", "generate.num_beams=1", "generate.max_new_tokens=2", "lora.method=ft_top2",
         "lora.top_layers=1"],
        ["experiment=instruct", f"model.name={tiny_dirs['llama']}", "model.quantize=nf4", "model.quant_block_size=32",
         "model.gradient_checkpointing=true", "data.train_samples=8", f"data.eval_file={held}", "data.packing=true", "data.loss_on=all",
         "lora.target_modules=all-linear", "lora.exclude_modules=[lm_head]", "generate.num_beams=1",
         "generate.do_sample=true", "generate.max_new_tokens=4", "generate.batch_size=2"],
    ]
    read_by: dict[str, set[str]] = {}
    for overrides in runs:
        experiment, reads = _reads(overrides, tmp_path / "runs", monkeypatch)
        read_by[experiment] = read_by.get(experiment, set()) | reads
        data_keys = {k for k in all_keys(experiment) if k.startswith("data.")}
        assert data_keys - reads == set(), f"{experiment} never reads {sorted(data_keys - reads)}"
    everything = set().union(*read_by.values()) | set(ON_EVENT)
    shared = {k for k in all_keys() if k.split(".")[0] in ("model", "lora", "train", "generate")}
    assert shared - everything == set(), f"keys no experiment reads: {sorted(shared - everything)}"
    for experiment in ("e2e", "instruct"):  # both generate: each must honour the whole section
        generate = {k for k in all_keys(experiment) if k.startswith("generate.")}
        assert generate - read_by[experiment] == set(), f"{experiment} ignores {sorted(generate - read_by[experiment])}"
    assert set(sections_for("glue")) == {"model", "lora", "train", "data"}  # glue reads no generate section


def test_quant_block_size_reaches_every_4bit_layer(tiny_dirs):
    from loralab.core.linear4bit import Linear4bit
    from loralab.models.zoo import load_from_config

    for block in (32, 128):
        cfg = load_config(None, ["experiment=instruct", f"model.name={tiny_dirs['llama']}", "model.quantize=nf4",
                                 f"model.quant_block_size={block}"])
        model, _ = load_from_config(cfg.model, kind="causal_lm")
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert layers and {m.block_size for m in layers} == {block}
        n = layers[0].in_features * layers[0].out_features  # one (8-bit, double-quantized) absmax per block
        assert -(-n // block) in {t.numel() for t in layers[0].buffers()}


@pytest.mark.parametrize("method,extra", [
    ("lora", []), ("full", []), ("bitfit", []), ("linear_probe", []), ("adapter_h", []), ("adapter_l", []),
    ("adapter_p", []), ("prefix_layer", []), ("prefix_layer", ["lora.prefix_reparam=true"]), ("prefix_embed", []),
    ("ft_top2", []),
])
def test_each_method_reads_exactly_the_keys_its_table_lists(tiny_dirs, tmp_path, monkeypatch, method, extra):
    """Building a GLUE model with ``method`` reads exactly ``LoraSection.METHOD_KEYS[method]`` of the lora
    section (the fields ``READ_IF`` makes conditional only when their condition holds): the table that
    ``load_config`` refuses unread keys by is the code's own reading."""
    from loralab.engine.experiment import get_experiment

    cfg = load_config(None, ["experiment=glue", f"model.name={tiny_dirs['bert']}", "data.task=rte",
                             "data.train_samples=8", "data.eval_samples=4", "data.max_length=64",
                             f"lora.method={method}", *extra])
    monkeypatch.setattr(Section, "reads", set())
    get_experiment("glue").build(cfg)
    reads = {k for k in Section.reads if k.startswith("lora.")}
    monkeypatch.setattr(Section, "reads", None)
    listed = {f"lora.{k}" for k in cfg.lora.METHOD_KEYS[method] if cfg.lora.method_reads(k)}
    assert reads == listed, f"read, not listed: {sorted(reads - listed)}; listed, not read: {sorted(listed - reads)}"
