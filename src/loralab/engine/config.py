"""loralab's run configuration: the schema (typed sections), presets, loading and saving.

A run is resolved in layers, each later one winning:
``defaults (or base) -> preset -> YAML file -> dotted overrides`` (``train.lr=4e-4``).
The generic machinery (coercion, unknown-key hints, docs) is :mod:`loralab.engine.typed_config`.
The ``data`` section is the experiment's own dataclass (``Experiment.data_config``), and a section an
experiment does not read (``generate`` for GLUE) is an error to set: every key a config accepts is read.
Presets live with their experiments (``Experiment.presets``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from loralab.engine.experiment import experiments, get_experiment
from loralab.engine.schema import DataConfig, GenerateConfig, LoraSection, ModelConfig, TrainConfig
from loralab.engine.typed_config import (ConfigError, apply_layer, coerce, field_types, help_text, is_text_field,
                                         keys_of, parse_override, read_yaml, section_from_dict, set_key,
                                         yaml_with_docs)

__all__ = ["ConfigError", "ModelConfig", "LoraSection", "TrainConfig", "DataConfig", "GenerateConfig",
           "RunConfig", "load_config", "save_config", "config_to_dict", "list_presets", "get_preset",
           "config_help", "config_to_yaml_with_docs", "all_keys", "sections_for"]


OPTIONAL_SECTIONS: dict[str, type] = {"generate": GenerateConfig}
"""Sections only some experiments read (``Experiment.sections`` names them)."""


def sections_for(experiment: str) -> dict[str, type]:
    """The sections of a run of ``experiment``: model, lora, train, its data class, and the optional ones it reads."""
    exp = get_experiment(experiment)
    unknown = [s for s in exp.sections if s not in OPTIONAL_SECTIONS]
    if unknown:
        raise TypeError(f"experiment {exp.name!r} names unknown sections {unknown} (known: {list(OPTIONAL_SECTIONS)})")
    return {"model": ModelConfig, "lora": LoraSection, "train": TrainConfig, "data": exp.data_config,
            **{s: OPTIONAL_SECTIONS[s] for s in exp.sections}}


@dataclass
class RunConfig:
    """One run: the experiment, its name and output root, and one section per concern."""

    SCALARS: ClassVar[tuple[str, ...]] = ("experiment", "preset", "name", "out_dir")
    experiment: str = ""
    """The experiment (a registered plugin: ``loralab config --presets`` lists them) that builds and reports the run."""
    preset: str | None = None
    """The preset the run was resolved from (recorded, so reports can show what differs from it)."""
    name: str | None = None
    """Run name used in the run dir (None: <experiment>-<data.task>)."""
    out_dir: str = "runs"
    """Root of run dirs and of the runs.sqlite registry."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    lora: LoraSection = field(default_factory=LoraSection)
    """What trains."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    data: Any = None
    """The data: the experiment's own section (None: its defaults)."""
    generate: GenerateConfig | None = None
    """Decoding, for experiments that generate (None for the others)."""

    def __post_init__(self) -> None:
        errors = []  # every section's problems at once, not just the first section's
        for key in self.SCALARS:
            try:
                setattr(self, key, coerce(getattr(self, key), field_types(RunConfig)[key], key))
            except ConfigError as err:
                errors.append(str(err))
        if not self.experiment:
            names = ", ".join(sorted(experiments()))
            raise ConfigError(f"experiment: not set; choose one ({names}) or a preset (loralab config --presets)")
        sections = sections_for(self.experiment)
        for key in ("model", "lora", "train", "data", *OPTIONAL_SECTIONS):
            value, cls = getattr(self, key), sections.get(key)
            try:
                if cls is None:
                    if value not in (None, {}):
                        raise ConfigError(f"{key}: experiment {self.experiment!r} does not read the {key} section; "
                                          f"remove it")
                    setattr(self, key, None)
                elif value is None:
                    setattr(self, key, cls())
                elif isinstance(value, dict):
                    setattr(self, key, section_from_dict(cls, value, key))
                elif not isinstance(value, cls):
                    raise ConfigError(f"{key}: expected a {cls.__name__} or a mapping, got {value!r}")
            except ConfigError as err:
                errors.append(str(err))
        if errors:
            raise ConfigError("\n".join(errors))
        if self.model.quantize != "none" and self.lora.method != "lora":
            raise ConfigError(f"lora.method: {self.lora.method!r} cannot train a {self.model.quantize}-quantized base "
                              "(4-bit weights are frozen); use lora.method=lora or model.quantize=none")

    @property
    def run_name(self) -> str:
        task = getattr(self.data, "task", None)
        return self.name or (f"{self.experiment}-{task}" if task else self.experiment)

    @property
    def task_label(self) -> str:
        """What the run registry shows as the task: data.task where the experiment has one."""
        return str(getattr(self.data, "task", None) or self.experiment)


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (YAML-ready) of a config; ``load_config`` of it gives the config back.
    Sections the experiment does not read (None) are left out."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None or k == "name"}


def all_keys(experiment: str | None = None) -> list[str]:
    """Every dotted key a config of ``experiment`` accepts (None: the union over all experiments)."""
    names = [experiment] if experiment else sorted(experiments())
    keys: list[str] = []
    for name in names:
        keys += [k for k in keys_of(RunConfig, sections_for(name)) if k not in keys]
    return keys


# ---------------------------------------------------------------- presets (they live with their experiments)


PRESET_DOC = "_doc"
"""A preset's one-line description (not a config key)."""


def list_presets() -> dict[str, dict]:
    """{preset: overrides} of every registered experiment (each with its ``experiment`` key)."""
    found: dict[str, dict] = {}
    for exp in experiments().values():
        for name, overrides in exp.presets.items():
            if name in found and found[name].get("experiment") != exp.name:
                raise TypeError(f"preset {name!r} is registered by experiments {found[name]['experiment']!r} "
                                f"and {exp.name!r}; preset names must be unique")
            found[name] = {"experiment": exp.name, **copy.deepcopy(overrides)}
    return found


def get_preset(name: str) -> dict:
    """The overrides registered under ``name`` (unknown names fail with the closest known one)."""
    known = list_presets()
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known presets: {', '.join(sorted(known)) or 'none'}"
        raise ConfigError(f"unknown preset {name!r}{hint}")
    return {k: v for k, v in known[name].items() if k != PRESET_DOC}


# ---------------------------------------------------------------- loading and saving


def _flat_keys(layer: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in layer.items():
        key = f"{prefix}{key}"
        if isinstance(value, dict) and key.split(".")[0] in ("model", "lora", "train", "data", *OPTIONAL_SECTIONS) \
                and "." not in key:
            out += _flat_keys(value, f"{key}.")
        else:
            out.append(key)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: RunConfig | None = None, preset: str | None = None) -> RunConfig:
    """Resolve a run config: ``base`` (default: the defaults) -> preset -> YAML file -> overrides.

    The preset comes from ``preset=``, an override ``preset=NAME``, or a top-level ``preset:`` key of
    the YAML file (two different presets are an error). YAML files may be partial.
    """
    overrides = list(overrides or [])
    # only `preset` and `experiment` are read before the schema is known; every item is parsed (typed) below
    raw = [(k.strip().lstrip("-"), v.strip()) for k, _, v in (item.partition("=") for item in overrides)]
    presets = {preset} - {None} | {v for k, v in raw if k == "preset" and v not in ("", "null", "None", "~")}
    file_layer: dict = read_yaml(path) if path is not None else {}
    if file_layer.get("preset") is not None:
        presets.add(str(file_layer["preset"]))
    file_layer.pop("preset", None)
    if len(presets) > 1:
        raise ConfigError(f"several presets given ({', '.join(sorted(presets))}); choose one")
    preset_layer = get_preset(next(iter(presets))) if presets else {}
    experiment = base.experiment if base is not None else ""
    for layer in (preset_layer, file_layer, dict(raw)):
        experiment = str(layer.get("experiment") or experiment)
    if not experiment:
        names = ", ".join(sorted(experiments()))
        raise ConfigError(f"no experiment: pass --preset NAME or experiment=NAME ({names}); see loralab config --presets")
    get_experiment(experiment)  # an unknown name fails here, with the closest known one
    sections = sections_for(experiment)
    tree: dict = config_to_dict(base) if base is not None else {}
    if base is not None and base.experiment != experiment:
        raise ConfigError(f"experiment: cannot change {base.experiment!r} to {experiment!r} on top of a saved config")
    if presets:
        apply_layer(tree, preset_layer, f"preset {next(iter(presets))!r}", RunConfig, sections)
        tree["preset"] = next(iter(presets))
    inherited = copy.deepcopy(tree.get("lora") or {})  # what lora.* is before the file and the overrides
    if path is not None:
        apply_layer(tree, file_layer, str(path), RunConfig, sections)
    explicit = _flat_keys(file_layer)
    for item in overrides:
        key, value = parse_override(item, lambda k: is_text_field(k, RunConfig, sections))
        if key != "preset":
            try:
                set_key(tree, key, value, f"override {item!r}", RunConfig, sections)
            except ConfigError as err:
                raise _elsewhere(key, experiment, err) from None
            explicit.append(key)
    cfg = RunConfig(**tree)
    _refuse_unread_lora_keys(cfg.lora, explicit, inherited)
    return cfg


def _refuse_unread_lora_keys(lora: LoraSection, explicit: list[str], inherited: dict) -> None:
    """A ``lora.*`` key set in the file or an override that ``lora.method`` does not read
    (``LoraSection.METHOD_KEYS``, ``READ_IF``) is an error, unless its value is the one it has anyway
    (the default, or the preset's / base config's): a saved config.yaml lists every key, and presets may
    set keys of other methods."""
    try:
        below = section_from_dict(LoraSection, {**inherited, "method": lora.method}, "lora")
    except ConfigError:  # the inherited LoRA values do not validate on their own: compare with the defaults
        below = LoraSection(method=lora.method)
    names = sorted({k.split(".")[1] for k in explicit if k.startswith("lora.") and k.count(".") == 1})
    unread = [n for n in names if n in lora.__dict__ and not lora.method_reads(n)
              and lora.__dict__[n] != below.__dict__[n]]
    if not unread:
        return
    parts = []
    for name in unread:
        readers = [m for m, keys in LoraSection.METHOD_KEYS.items() if name in keys]
        cond = LoraSection.READ_IF.get(name)
        if cond and lora.method in readers:
            parts.append(f"lora.{name}: read only with lora.{cond[0]}={str(cond[1]).lower()}; set that or remove "
                         f"lora.{name}")
        else:
            parts.append(f"lora.{name}: not read with lora.method={lora.method} (read by {', '.join(readers)}); "
                         "remove it or choose a method that reads it")
    keys = ", ".join(f"lora.{k}" for k in LoraSection.METHOD_KEYS[lora.method])
    raise ConfigError("\n".join(parts) + f"\n(lora.method={lora.method} reads {keys})")


def _elsewhere(key: str, experiment: str, err: ConfigError) -> ConfigError:
    """An unknown key that another experiment reads: say which, instead of guessing a near name."""
    if not str(err).startswith("unknown key"):
        return err
    readers = [name for name in sorted(experiments()) if name != experiment and key in all_keys(name)]
    if not readers:
        return err
    return ConfigError(f"{key}: experiment {experiment!r} does not read this key (it is read by "
                       f"{', '.join(readers)}); remove it")


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); ``load_config(path)`` gives ``cfg`` back."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None))
    tmp.replace(path)
    return path


def config_help(experiment: str | None = None) -> str:
    """Documentation of every key: the run's own fields, then each section (data per experiment)."""
    lines = [help_text(RunConfig, only=RunConfig.SCALARS)]
    shared = {"model": ModelConfig, "lora": LoraSection, "train": TrainConfig, **OPTIONAL_SECTIONS}
    for section, cls in shared.items():
        lines += ["", f"{section}: {inspect.getdoc(cls)}", help_text(cls, f"{section}.")]
    for name in ([experiment] if experiment else sorted(experiments())):
        data = get_experiment(name).data_config
        lines += ["", f"data (experiment {name}): {inspect.getdoc(data)}", help_text(data, "data.")]
    return "\n".join(lines)


def config_to_yaml_with_docs(cfg: RunConfig) -> str:
    """Resolved config as YAML with each field's doc as a comment above it (still loadable)."""
    data = config_to_dict(cfg)
    out = yaml_with_docs({k: data.get(k) for k in RunConfig.SCALARS}, RunConfig)
    for section, cls in sections_for(cfg.experiment).items():
        out += ["", f"# {inspect.getdoc(cls).splitlines()[0]}", f"{section}:"]
        out += yaml_with_docs(data[section], cls, "  ")
    return "\n".join(out) + "\n"
