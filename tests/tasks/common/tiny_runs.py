"""Shared by the method-wiring tests: a tiny BERT dir, a tiny GLUE release (SST-2, STS-B) and E2E CSV,
and the trainable counts of every method written out from the tiny models' sizes (Hu et al. 2021,
Sec. 5.1 for adapters and prefixes), independent of the code that builds the methods."""

from __future__ import annotations

from pathlib import Path

H, L, I, C = 32, 2, 64, 2
"""Tiny BERT: hidden, layers, FFN width; SST-2's two labels."""
HEAD = H * C + C
"""The GLUE classifier head of the tiny BERT (the pooler stays frozen)."""
BERT_LAYER = 4 * (H * H + H) + 2 * 2 * H + (H * I + I) + (I * H + H)
"""One BERT layer: q, k, v, attention output; two LayerNorms; FFN in and out."""
BERT_LAYER_BIAS = 4 * H + 2 * H + I + H
"""Of which biases (count_by_kind puts them in kind "bias")."""
LLAMA = {"H": 32, "L": 2, "d_kv": 2 * 8, "layer": 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32,
         "layer_bias": 0}
"""Tiny Llama: hidden, layers, K/V width (2 KV heads of 8), one layer (q, k, v, o, gate, up, down, 2 RMSNorms)."""


def adapter(d: int, r: int) -> int:
    """One bottleneck adapter: W_down (r x d) + b_down + W_up (d x r) + b_up."""
    return 2 * d * r + r + d


def expected_kinds(method: str, H: int = H, L: int = L, d_kv: int = H, layer: int = BERT_LAYER,
                   layer_bias: int = BERT_LAYER_BIAS, r: int = 8,
                   l_p: int = 10, l_i: int = 0, e: int = 0, h: int = 0, k: int = 2, layernorm: bool = False,
                   norms_per_layer: int = 2) -> dict[str, int]:
    """Trainable parameters by kind (core.methods.KINDS) of ``method``, the head excluded."""
    if method == "adapter_h":
        out = {"adapter": 2 * L * adapter(H, r)}
        if not layernorm:
            return out
        # the layers' own LayerNorms: weights count as "layers", their biases as "bias" (count_by_kind's kinds)
        return {**out, "layers": L * norms_per_layer * H, "bias": L * norms_per_layer * H}
    if method == "adapter_l":
        return {"adapter": L * adapter(H, r) + L * 2 * H}  # + its own LayerNorm per layer
    if method == "adapter_p":
        return {"adapter": L * adapter(H, r)}
    if method == "prefix_layer" and e:  # Li & Liang's MLP: P' (l_p x e) -> Linear(e, h) -> tanh -> Linear(h, 2 L d_kv)
        return {"prefix": l_p * e + e * h + h + h * 2 * L * d_kv + 2 * L * d_kv}
    if method == "prefix_layer":
        return {"prefix": 2 * L * d_kv * l_p}  # K and V; Hu et al. count L d l_p activations
    if method == "prefix_embed":
        return {"prefix": H * (l_p + l_i)}
    if method == "ft_top2":
        return {"layers": k * (layer - layer_bias), **({"bias": k * layer_bias} if layer_bias else {})}
    raise ValueError(method)


def tiny_bert_dir(root: Path) -> Path:
    from loralab.models.tiny import tiny_model, tiny_tokenizer

    path = root / "tiny-bert"
    if not path.exists():
        tiny_model("bert", "base", seed=0).save_pretrained(path, safe_serialization=True)
        tiny_tokenizer("bert").save_pretrained(path)
    return path


WORDS = ("good", "bad", "fine", "awful", "great", "poor")


def glue_data_dir(root: Path) -> Path:
    """SST-2 (24 train, 16 dev) and STS-B (16, 8) in the GLUE release's TSV layout."""
    path = root / "glue"
    sst = path / "SST-2"
    sst.mkdir(parents=True, exist_ok=True)
    rows = [f"a {WORDS[i % 6]} movie , number {i} .\t{int(i % 2 == 0)}\n" for i in range(24)]
    (sst / "train.tsv").write_text("sentence\tlabel\n" + "".join(rows))
    (sst / "dev.tsv").write_text("sentence\tlabel\n" + "".join(rows[:16]))
    sts = path / "STS-B"
    sts.mkdir(exist_ok=True)
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\ta {WORDS[i % 6]} dog .\ta {WORDS[(i + 1) % 6]} cat .\t{i % 5}.0\n"
            for i in range(16)]
    (sts / "train.tsv").write_text(head + "".join(rows))
    (sts / "dev.tsv").write_text(head + "".join(rows[:8]))
    return path


E2E_CSV = "mr,ref\nname[A],A is nice.\nname[B],B is a pub.\nname[A],A is good.\n"
