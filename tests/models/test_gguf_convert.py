"""GGUF -> HF conversion on tiny GGUF files written here with the gguf package's writer.

The reference for the Q/K row order is llama.cpp's converter permutation, written out below from its
definition (rows of each head reordered from [first half | second half] to interleaved pairs).
"""
import json
import threading

import gguf
import numpy as np
import pytest
import torch

from loralab.models import gguf_convert
from loralab.models.gguf_convert import (MARKER_FILE, convert_gguf, hf_tensor_name, is_converted,
                                         llama_config_dict, llama_state_dict, unpermute_rope_rows)
from loralab.models.tiny import tiny_model

_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row j*D/2 + i of a head goes to GGUF row 2i + j (llama.cpp's convert_hf_to_gguf permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, *rest = hf.split(".")
    module, suffix = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"


def write_tiny_gguf(path, model, q4_1=()) -> dict[str, np.ndarray]:
    """Write ``model`` (tiny llama) as a GGUF; tensors named in ``q4_1`` are Q4_1-quantized.
    Returns the GGUF-order arrays actually stored (dequantized where quantized)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(500.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    stored = {}
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        arr = tensor.numpy().astype(np.float32)
        if ".q_proj." in hf:
            arr = llama_cpp_permute(arr, cfg.num_attention_heads)
        elif ".k_proj." in hf:
            arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        if gguf_name(hf) in q4_1:
            packed = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_1)
            writer.add_tensor(gguf_name(hf), packed, raw_shape=packed.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            stored[hf] = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_1)
        else:
            writer.add_tensor(gguf_name(hf), arr)
            stored[hf] = arr
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_unpermute_by_hand_one_head_of_four_rows():
    # HF rotates pairs (r0, r2) and (r1, r3); llama.cpp stores them adjacent: r0, r2, r1, r3.
    gguf_rows = np.array([[0.0], [2.0], [1.0], [3.0]])
    assert unpermute_rope_rows(gguf_rows, n_head=1)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_unpermute_inverts_llama_cpp_permute_for_several_heads():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    with pytest.raises(ValueError, match="heads"):
        unpermute_rope_rows(np.zeros((6, 2)), 4)


def test_tensor_names():
    assert hf_tensor_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="rope_freqs"):
        hf_tensor_name("rope_freqs.weight")


def test_f32_gguf_round_trips_exactly_and_gives_the_same_logits(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_model("llama", "causal_lm", seed=3, rope_parameters={"rope_type": "default",
                                                                      "rope_theta": 500.0})
    write_tiny_gguf(tmp_path / "t.gguf", model)
    reader = gguf.GGUFReader(str(tmp_path / "t.gguf"))
    cfg = llama_config_dict(reader)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "num_hidden_layers", "vocab_size", "max_position_embeddings"):
        assert cfg[key] == getattr(model.config, key), key
    assert cfg["tie_word_embeddings"] is True and cfg["rope_parameters"]["rope_theta"] == 500.0
    state = llama_state_dict(reader, cfg)
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert state.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(state[k], expected[k], rtol=0, atol=0, msg=k)
    converted = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    converted.load_state_dict(state, strict=False)
    ids = torch.randint(0, cfg["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_q4_1_tensor_dequantizes_within_the_block_error_bound(tmp_path):
    model = tiny_model("llama", "causal_lm", seed=1)
    stored = write_tiny_gguf(tmp_path / "q.gguf", model, q4_1={"blk.0.attn_q.weight", "blk.1.ffn_down.weight"})
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    state = llama_state_dict(reader, llama_config_dict(reader))
    for hf, n_head in (("model.layers.0.self_attn.q_proj.weight", 4), ("model.layers.1.mlp.down_proj.weight", 0)):
        original = model.state_dict()[hf].numpy()
        gguf_order = llama_cpp_permute(original, n_head) if n_head else original
        # Q4_1, blocks of 32 along a row: w = d*q + m with d = (max - min)/15, so |error| <= d/2
        # (plus fp16 rounding of d and m).
        blocks = gguf_order.reshape(-1, 32)
        half_step = ((blocks.max(1) - blocks.min(1)) / 15 / 2)[:, None]
        assert np.all(np.abs(stored[hf].reshape(-1, 32) - blocks) <= half_step * 1.01 + 1e-3)
        expected = unpermute_rope_rows(stored[hf], n_head) if n_head else stored[hf]
        np.testing.assert_array_equal(state[hf].numpy(), expected)


def _fake_writer(calls, delay=0.2, fail=False):
    def write(gguf_path, target):
        calls.append(target)
        threading.Event().wait(delay)
        if fail:
            raise RuntimeError("disk full")
        (target / "config.json").write_text("{}")
    return write


def test_concurrent_conversions_write_once_and_publish_atomically(tmp_path, monkeypatch):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF fake")
    calls = []
    monkeypatch.setattr(gguf_convert, "_write_hf_dir", _fake_writer(calls))
    out = tmp_path / "cache" / "m"
    messages = []
    threads = [threading.Thread(target=convert_gguf, args=(src, out, messages.append)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and calls[0] != out  # written elsewhere, then renamed
    assert is_converted(out, src) and (out / "config.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [".m.lock", "m"]  # no temp dirs left
    assert any("converting m.gguf" in m for m in messages)
    convert_gguf(src, out, messages.append)
    assert len(calls) == 1  # cached


def test_failed_conversion_leaves_nothing_and_stale_one_is_replaced(tmp_path, monkeypatch):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF fake")
    out = tmp_path / "m"
    monkeypatch.setattr(gguf_convert, "_write_hf_dir", _fake_writer([], 0, fail=True))
    with pytest.raises(RuntimeError, match="disk full"):
        convert_gguf(src, out, lambda m: None)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []
    out.mkdir()
    (out / MARKER_FILE).write_text(json.dumps({"converter_version": -1, "gguf_name": "m.gguf",
                                               "gguf_size": src.stat().st_size}))
    (out / "old_file").write_text("stale")
    assert not is_converted(out, src)
    calls = []
    monkeypatch.setattr(gguf_convert, "_write_hf_dir", _fake_writer(calls, 0))
    convert_gguf(src, out, lambda m: None)
    assert len(calls) == 1 and is_converted(out, src) and not (out / "old_file").exists()


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
