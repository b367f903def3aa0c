"""Find a transformer's layers and the sublayers the non-LoRA methods attach to, by module names (duck typing).

No transformers import: the roles are looked up by the attribute paths the Hugging Face families use,
relative to one transformer layer (``BertLayer``, ``GPT2Block``, ``LlamaDecoderLayer``, ...):

=========  ======================  ================  ==============  ====================
role       BERT / RoBERTa          MPNet             GPT-2           Llama (and kin)
=========  ======================  ================  ==============  ====================
attn_out   attention.output.dense  attention.attn.o  attn.c_proj     self_attn.o_proj
ffn_out    output.dense            output.dense      mlp.c_proj      mlp.down_proj
attention  attention.self          attention.attn    attn            self_attn
=========  ======================  ================  ==============  ====================

``attn_out`` / ``ffn_out`` are the output projections of the attention and feed-forward sublayers (their
outputs go into the residual add, and in post-LN BERT/RoBERTa/MPNet into the LayerNorm after it);
``attention`` is the module that holds the query/key/value projections.
"""

from __future__ import annotations

from torch import nn

QV_NAMES: dict[str, list[str]] = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"], "electra": ["query", "value"], "albert": ["query", "value"],
    "mpnet": ["q", "v"], "distilbert": ["q_lin", "v_lin"], "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
}
"""The paper's W_q and W_v in each architecture's own module names, by ``config.model_type`` (GPT-2 has a
fused ``c_attn`` instead: its q and v slices). The one table: the experiments' default LoRA targets and the
engine's check that an adapter's targets are "W_q, W_v" both read it."""
QV_PAIRS = tuple(dict.fromkeys(frozenset(names) for names in QV_NAMES.values()))
"""The distinct {W_q, W_v} name pairs of ``QV_NAMES``."""

ROLES: dict[str, tuple[str, ...]] = {
    "attn_out": ("attention.output.dense", "attention.attn.o", "attn.c_proj", "self_attn.o_proj"),
    "ffn_out": ("output.dense", "mlp.c_proj", "mlp.down_proj"),
    "attention": ("attention.self", "attention.attn", "attn", "self_attn"),
}


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer layers: the longest ``nn.ModuleList`` whose items share one class
    and contain an attention sublayer (``encoder.layer``, ``transformer.h``, ``model.layers``, ...)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or _lookup(module[0], "attention") is None:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of transformer layers that loralab recognises "
                         f"(a ModuleList of identical layers with one of {ROLES['attention']}); "
                         "only BERT/RoBERTa/MPNet/GPT-2/Llama-style models are supported")
    return best


def _lookup(layer: nn.Module, role: str) -> tuple[str, nn.Module] | None:
    """Looks inside a wrapped layer too (``base_layer.<path>``, after adapter_l wrapped the layer)."""
    for where in ("", "base_layer."):
        for path in ROLES[role]:
            try:
                return where + path, layer.get_submodule(where + path)
            except AttributeError:
                continue
    return None


def sublayer(layer: nn.Module, role: str) -> tuple[str, nn.Module]:
    """(relative path, module) of ``role`` in one transformer layer, or a ValueError naming its children."""
    found = _lookup(layer, role)
    if found is None:
        children = [n for n, _ in layer.named_modules() if n]
        raise ValueError(f"{type(layer).__name__} has no {role} sublayer (looked for {ROLES[role]}; it has "
                         f"{children}); add its path to loralab.core.blocks.ROLES[{role!r}]")
    return found


def out_features(module: nn.Module) -> int:
    """Output width of a Linear, a GPT-2 Conv1D (weight in x out) or a wrapper exposing ``base_layer``."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return int(module.nf)
    if hasattr(module, "out_features"):
        return int(module.out_features)
    raise TypeError(f"cannot tell the output width of a {type(module).__name__}")


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"{type(model).__name__} has no config.hidden_size; cannot size the method's modules")


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def is_causal(model: nn.Module) -> bool:
    """True for decoder-only LMs (GPT-2, Llama): their attention modules say ``is_causal``."""
    _, layers = find_layers(model)
    _, attn = sublayer(layers[0], "attention")
    return bool(getattr(attn, "is_causal", False) or getattr(getattr(model, "config", None), "is_decoder", False))
