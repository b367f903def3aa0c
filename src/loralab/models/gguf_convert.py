"""Convert a llama-architecture GGUF file (llama.cpp's format) into a Hugging Face model directory.

Why: parsing and dequantizing a GGUF through transformers on every load is slow; converting once gives
a plain ``config.json`` + ``model.safetensors`` + tokenizer directory that loads in a second.

What the conversion does, tensor by tensor:

* dequantize with ``gguf.quants.dequantize`` (Q4_1 block of 32: ``w = d * q + m`` with fp16 ``d, m``
  and 4-bit ``q``; Q8_0: ``w = d * q``) into float32 — stored as float32, so no second rounding;
* rename llama.cpp names (``blk.3.attn_q.weight``) to transformers' (``model.layers.3.self_attn.q_proj.weight``);
* undo llama.cpp's rotary permutation of the Q and K rows (see :func:`unpermute_rope_rows`).

The tokenizer (vocab, merges, pre-tokenizer, special tokens and the chat template stored in the GGUF
metadata) is rebuilt by transformers' GGUF tokenizer converter and saved with ``save_pretrained``.
The output directory appears atomically (written under a temp name, then renamed) and concurrent
converters serialize on a file lock, so a half-written model is never visible.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loralab.models.build_once import MARKER_FILE, build_once, is_built, stderr

__all__ = ["MARKER_FILE", "convert_gguf", "hf_tensor_name", "is_converted", "unpermute_rope_rows"]

CONVERTER_VERSION = 1

# llama.cpp per-block tensor names -> transformers LlamaForCausalLM names.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; unknown names raise."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no transformers Llama counterpart; "
                     "only plain llama-architecture GGUFs are supported")


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K projection weight (out, in).

    transformers' Llama rotates pairs ``(x[i], x[i + D/2])`` of each head of size D ("rotate half");
    llama.cpp rotates adjacent pairs ``(x[2i], x[2i + 1])``. Its converter therefore reorders the rows of
    each head from ``[first half | second half]`` to interleaved: GGUF row ``2i + j`` of a head holds HF
    row ``j * D/2 + i`` (j in {0, 1}). Viewing a head's rows as (D/2, 2) and transposing to (2, D/2)
    restores the HF order. For K, ``n_head`` is the number of key/value heads.
    """
    out_features = weight.shape[0]
    if out_features % (2 * n_head):
        raise ValueError(f"{out_features} rows cannot be split into {n_head} heads of even size")
    half = out_features // n_head // 2
    return (weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def llama_config_dict(reader: Any) -> dict[str, Any]:
    """LlamaConfig keyword arguments read from the GGUF metadata (``llama.*`` and token ids)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; this converter handles 'llama' only")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF uses rope scaling, which this converter does not map; use "
                         "transformers' from_pretrained(..., gguf_file=...) instead")
    n_head = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    head_dim = hidden // n_head
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary (rope dim {rope_dim} != head dim {head_dim}) is not a Llama model")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0))},
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def llama_state_dict(reader: Any, config: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """Dequantized float32 tensors under transformers names, with Q/K rows un-permuted."""
    import torch
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if ".self_attn.q_proj." in name:
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        # F32 tensors come back as read-only views of the memory-mapped file: copy those.
        state[name] = torch.from_numpy(np.require(weight, requirements=["C", "W"]))
    return state


def _marker(gguf_path: Path) -> dict[str, Any]:
    return {"converter_version": CONVERTER_VERSION, "gguf_name": gguf_path.name,
            "gguf_size": gguf_path.stat().st_size}


def is_converted(out_dir: Path, gguf_path: Path) -> bool:
    """True when ``out_dir`` holds a finished conversion of this very GGUF by this converter version."""
    return is_built(out_dir, _marker(Path(gguf_path)))


def _write_hf_dir(gguf_path: Path, target: Path) -> None:
    import gguf
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig

    reader = gguf.GGUFReader(str(gguf_path))
    config_kwargs = llama_config_dict(reader)
    state = llama_state_dict(reader, config_kwargs)
    config = LlamaConfig(**config_kwargs)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(target)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not getattr(tokenizer, "chat_template", None):
        template = _field(reader, "tokenizer.chat_template")
        if template:
            tokenizer.chat_template = template
    tokenizer.save_pretrained(target)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path,
                 progress: Callable[[str], None] = stderr) -> Path:
    """Convert ``gguf_path`` into the HF directory ``out_dir`` once; later calls return at once.

    Safe under concurrency and crashes (:func:`loralab.models.build_once.build_once`); a stale
    conversion (other converter version or GGUF size) is replaced.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    return build_once(out_dir, _marker(gguf_path), lambda tmp: _write_hf_dir(gguf_path, tmp),
                      f"converting {gguf_path.name} to a safetensors model (about 30 s)", progress,
                      record={"gguf_path": str(gguf_path)})


def write_hf_dir_with_transformers(gguf_path: Path, target: Path) -> None:
    """Any architecture transformers' GGUF reader knows (Gemma 3, Qwen, ...): it dequantizes the tensors
    (Q4_K, Q6_K, ...) to float32 and maps the names; saved as ``model.safetensors`` + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model (it is flagged quantized, though every
    # tensor is float32 now): write the config and the tensors ourselves, a tied head once
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(target)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    if model.generation_config is not None:
        model.generation_config.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(target)
