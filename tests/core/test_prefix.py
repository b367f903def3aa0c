"""Prefix-layer and prefix-embedding tuning against manual computations, counts, caches, refusals."""
import math

import pytest
import torch

from loralab.core.prefix import (PrefixMPNetAttention, add_prefixes, init_prefixes_from_tokens, merge_prefixes,
                                 merge_reparametrization, prefix_count, prefix_modules)
from loralab.core.prefix_embed import add_prefix_embedding, merge_prefix_embedding
from loralab.models.tiny import ARCHS, tiny_model

L, D, LP = 2, 32, 3
ATTN = {"bert": "encoder.layer.0.attention.self", "roberta": "encoder.layer.0.attention.self",
        "gpt2": "h.0.attn", "llama": "layers.0.self_attn"}


def _batch(t=7, padded=True):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, t - 2:] = 0 if padded else 1
    return {"input_ids": torch.randint(5, 100, (2, t), generator=g), "attention_mask": mask}


def _model(arch, impl="sdpa", kind="base", **kw):
    model = tiny_model(arch, kind, **kw)
    model.set_attn_implementation(impl)
    return model


def _capture(module):
    seen = {}
    module.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    module.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    return seen


def _manual(q, k, v, pk, pv, key_mask, causal):
    """softmax(q [pk; k]^T / sqrt(hd) + mask) [pv; v]: q (B,H,T,hd), k/v (B,Hkv,T,hd), pk/pv (Hkv,l_p,hd)."""
    b, h, t, hd = q.shape
    k = torch.cat([pk.expand(b, -1, -1, -1), k], 2).repeat_interleave(h // k.shape[1], 1)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], 2).repeat_interleave(h // v.shape[1], 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    ok = torch.cat([torch.ones(b, pk.shape[1], dtype=torch.bool), key_mask.bool()], 1)[:, None, None, :]
    if causal:
        ok = ok & torch.cat([torch.ones(t, pk.shape[1], dtype=torch.bool),
                             torch.ones(t, t, dtype=torch.bool).tril()], 1)
    scores = scores.masked_fill(~ok, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


def _reference(arch, attn, seen, mask):
    kv = attn.loralab_prefix
    pk, pv = kv.kv()
    h = seen["kwargs"].get("hidden_states", seen["args"][0] if seen["args"] else None)
    b, t, _ = h.shape
    split = lambda x, hd: x.view(b, t, -1, hd).transpose(1, 2)  # noqa: E731
    if arch in ("bert", "roberta"):
        hd = D // 4
        q, k, v = (split(getattr(attn, n)(h), hd) for n in ("query", "key", "value"))
        return _manual(q, k, v, pk, pv, mask, causal=False)
    if arch == "gpt2":
        q, k, v = (split(x, D // 4) for x in attn.c_attn(h).split(D, dim=2))
        return attn.c_proj(_manual(q, k, v, pk, pv, mask, causal=True))
    cos, sin = seen["kwargs"]["position_embeddings"]
    q, k, v = (split(getattr(attn, n)(h), 8) for n in ("q_proj", "k_proj", "v_proj"))
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    return attn.o_proj(_manual(q, k, v, pk, pv, mask, causal=True))


@pytest.mark.parametrize("padded", [True, False])  # unpadded: sdpa gets no mask (is_causal), we build one
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prefixed_attention_equals_manual_computation(arch, impl, padded):
    model = _model(arch, impl)
    add_prefixes(model, l_p=LP, init_std=0.5)
    attn = model.get_submodule(ATTN[arch])
    seen = _capture(attn)
    batch = _batch(padded=padded)
    model(**batch)
    torch.testing.assert_close(seen["out"], _reference(arch, attn, seen, batch["attention_mask"]),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_eager_and_sdpa_agree_and_prefixes_change_the_output(arch):
    outs = []
    for impl in ("eager", "sdpa"):
        model = _model(arch, impl)
        base = model(**_batch()).last_hidden_state
        torch.manual_seed(3)
        add_prefixes(model, l_p=LP, init_std=0.5)
        outs.append(model(**_batch()).last_hidden_state)
    mask = _batch()["attention_mask"].bool()
    torch.testing.assert_close(outs[0][mask], outs[1][mask], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(outs[0], base)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoding_with_a_cache_matches_full_forwards(arch):
    model = _model(arch, kind="causal_lm")
    add_prefixes(model, l_p=LP, init_std=0.5)
    ids = _batch(6)["input_ids"][:1]
    full = model(input_ids=ids).logits[:, -1]
    past = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
    step = model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_and_grads_only_to_prefixes(arch):
    model = _model(arch)
    info = add_prefixes(model, l_p=LP)
    d_kv = 16 if arch == "llama" else D  # Llama tiny: 2 key/value heads of 8 (grouped-query attention)
    counts = prefix_count(L, D, LP, 0, d_kv)
    assert counts["paper"] == L * D * LP == 192  # Hu et al.: L·d·(l_p + l_i), l_i = 0
    assert counts["kv"] == 2 * L * d_kv * LP == info["count"] == sum(p.numel() for p in model.parameters()
                                                                     if p.requires_grad)
    model(**_batch()).last_hidden_state.square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad == ("loralab_prefix" in name), name


def test_reparametrisation_count_grads_and_merge():
    model = _model("gpt2")
    e, hid = 8, 16
    info = add_prefixes(model, l_p=LP, reparam=True, reparam_dim=e, reparam_hidden=hid)
    two_l_d = 2 * L * D
    assert info["count"] == LP * e + e * hid + hid + hid * two_l_d + two_l_d == 2344
    out = model(**_batch()).last_hidden_state
    out.square().mean().backward()
    assert all(("loralab_prefix_reparam" in n) == (p.grad is not None) for n, p in model.named_parameters())
    merge_reparametrization(model)
    assert not hasattr(model, "loralab_prefix_reparam")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * L * D * LP
    torch.testing.assert_close(model(**_batch()).last_hidden_state, out.detach())
    assert len(prefix_modules(model)) == L


def test_mpnet_wrapper_equals_manual_computation():
    import transformers
    cfg = transformers.MPNetConfig(vocab_size=128, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                                   intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   max_position_embeddings=130)
    torch.manual_seed(0)
    model = transformers.MPNetModel(cfg).eval()
    info = add_prefixes(model, l_p=LP, init_std=0.5)
    assert info["path"] == "mpnet-wrapper" and info["count"] == 2 * L * D * LP
    wrapper = model.get_submodule("encoder.layer.0.attention.attn")
    assert isinstance(wrapper, PrefixMPNetAttention)
    seen = _capture(wrapper)
    batch = _batch()
    model(**batch)
    h, bias = seen["args"][0], seen["args"][2]
    base, (pk, pv) = wrapper.base_layer, wrapper.loralab_prefix.kv()
    b, t = h.shape[:2]
    q, k, v = (getattr(base, n)(h).view(b, t, -1, 8).transpose(1, 2) for n in "qkv")
    k, v = torch.cat([pk.expand(b, -1, -1, -1), k], 2), torch.cat([pv.expand(b, -1, -1, -1), v], 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + torch.cat([torch.zeros(*bias.shape[:-1], LP), bias], -1)
    ok = torch.cat([torch.ones(b, LP, dtype=torch.bool), batch["attention_mask"].bool()], 1)[:, None, None]
    manual = base.o((scores.masked_fill(~ok, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))
    torch.testing.assert_close(seen["out"], manual, atol=1e-5, rtol=1e-4)


def test_prefix_refusals():
    model = _model("bert")
    add_prefixes(model, l_p=2)
    with pytest.raises(ValueError, match="already has prefixes"):
        add_prefixes(model, l_p=2)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        merge_prefixes(model)
    flash = tiny_model("bert")
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="'eager' or 'sdpa'"):
        add_prefixes(flash, l_p=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_embedding_equals_manual_inputs_embeds(arch):
    model = _model(arch)
    batch = _batch()
    info = add_prefix_embedding(model, l_p=2, l_i=3, causal=arch in ("gpt2", "llama"))
    assert info["count"] == D * (2 + 3) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    pe = model.loralab_prefix_embed
    a = info["prefix_after"]
    assert a == (0 if arch in ("gpt2", "llama") else 1)
    infix_at = torch.tensor([4, 3])
    out = model(**batch, infix_at=infix_at).last_hidden_state
    emb = model.get_input_embeddings()(batch["input_ids"])
    rows, masks = [], []
    for k, s in enumerate([4, 3]):
        e, m = emb[k], batch["attention_mask"][k]
        rows.append(torch.cat([e[:a], pe.prefix, e[a:s], pe.infix, e[s:]]))
        masks.append(torch.cat([m[:a], torch.ones(2, dtype=m.dtype), m[a:s], torch.ones(3, dtype=m.dtype), m[s:]]))
    model._forward_pre_hooks.clear()
    ref = model(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks)).last_hidden_state
    assert out.shape == (2, 7 + 5, D)
    torch.testing.assert_close(out, ref)


def test_prefix_embedding_labels_defaults_and_refusals():
    model = _model("gpt2", kind="causal_lm")
    add_prefix_embedding(model, l_p=2, l_i=1, causal=True)
    batch = _batch(5)
    labels = batch["input_ids"].clone()
    seen = {}
    model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss) and out.logits.shape[1] == 8
    # infix by default after the last attended token: example 1 has 3 real tokens
    assert seen["labels"][1].tolist() == [-100, -100] + labels[1, :3].tolist() + [-100] + labels[1, 3:].tolist()
    assert seen["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    out.loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        "loralab_prefix_embed.prefix", "loralab_prefix_embed.infix"}
    with pytest.raises(NotImplementedError, match="incremental decoding"):
        model.generate(batch["input_ids"][:1], max_new_tokens=2, do_sample=False)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        merge_prefix_embedding(model)
    with pytest.raises(ValueError, match="infix_at"):
        model(**batch, infix_at=torch.tensor([9, 1]))


def test_prefixed_model_survives_deepcopy_and_pickle():
    import copy
    import io
    model = _model("llama", kind="causal_lm")
    add_prefixes(model, l_p=2, reparam=True, reparam_dim=4, reparam_hidden=4)
    ids = _batch()["input_ids"]
    ref = model(input_ids=ids).logits
    twin = copy.deepcopy(model)
    assert twin.model.layers[0].self_attn.loralab_prefix._reparam is twin.loralab_prefix_reparam
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (twin, torch.load(buf, weights_only=False)):
        torch.testing.assert_close(other(input_ids=ids).logits, ref, rtol=0, atol=0)


def _tiny_mpnet():
    import transformers
    cfg = transformers.MPNetConfig(vocab_size=128, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                                   intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   max_position_embeddings=130)
    torch.manual_seed(0)
    return transformers.MPNetModel(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "mpnet"])
def test_prefixes_initialised_from_tokens_are_the_models_own_keys_and_values(arch):
    """Li & Liang's init: each layer's prefixes equal the keys/values the un-prefixed model computes for
    the tokens (decoders: its KV cache, RoPE applied; encoders: W_k h + b, W_v h + b of the layer's input)."""
    ids = torch.tensor([7, 30, 11, 52])
    model = _tiny_mpnet() if arch == "mpnet" else _model(arch, kind="causal_lm" if arch in ("llama", "gpt2") else "base")
    if arch in ("llama", "gpt2"):
        cache = model(input_ids=ids[None], use_cache=True).past_key_values
        want = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    else:
        hidden = model(input_ids=ids[None], output_hidden_states=True).hidden_states
        self_attn = [layer.attention.attn if arch == "mpnet" else layer.attention.self for layer in model.encoder.layer]
        names = ("k", "v") if arch == "mpnet" else ("key", "value")
        want = [tuple(getattr(a, n)(h)[0].view(len(ids), -1, 8).transpose(0, 1) for n in names)
                for a, h in zip(self_attn, hidden)]
    model.train()
    add_prefixes(model, l_p=len(ids))
    init_prefixes_from_tokens(model, ids)
    assert model.training  # the mode is restored
    got = [m.kv() for _, m in prefix_modules(model)]
    assert len(got) == len(want) == L
    for (gk, gv), (wk, wv) in zip(got, want):
        torch.testing.assert_close(gk, wk, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gv, wv, atol=1e-6, rtol=1e-5)
        assert gk.requires_grad and gk.abs().max() > 0.1  # trainable, and not the small random init
    # the model now attends to those prefixes (the capture left no trace on the forward)
    out = model.eval()(**_batch())
    assert torch.isfinite(out[0]).all()
    with pytest.raises(ValueError, match="exactly l_p = 4"):
        init_prefixes_from_tokens(model, ids[:3])
    reparam = _model("llama", kind="causal_lm")
    add_prefixes(reparam, l_p=2, reparam=True, reparam_dim=8, reparam_hidden=8)
    with pytest.raises(ValueError, match="reparametrisation"):
        init_prefixes_from_tokens(reparam, ids[:2])
    with pytest.raises(ValueError, match="no prefixes"):
        init_prefixes_from_tokens(_model("gpt2"), ids)
