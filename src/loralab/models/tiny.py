"""Tiny random models and a matching in-memory tokenizer, for fast deterministic tests.

    config = tiny_config("llama", num_hidden_layers=1)       # transformers config, overrides applied
    model = tiny_model("bert", "seq_cls", seed=0, num_labels=3)   # eval mode, float32, seeded init
    tok = tiny_tokenizer("bert")                              # char-level, ids fit the config

Every architecture is 2 layers, hidden 32, 4 heads, intermediate 64, vocab 128, dropout 0 (so train-mode
forwards are deterministic too; pass e.g. ``hidden_dropout_prob=0.1`` to change that). The tokenizer
splits text into single characters (printable ASCII and newline; anything else is the unknown token)
and adds each family's special tokens with the real models' conventions, and the token ids in the
config (pad/bos/eos) match it:

* ``bert``: ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``; ``[CLS] a [SEP] b [SEP]`` with token_type_ids;
* ``roberta``: ``<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4``; ``<s> a </s></s> b </s>``;
* ``gpt2``: ``<|endoftext|>=0`` is bos, eos, unk and (as commonly set for fine-tuning) pad; adds nothing;
* ``llama`` (SmolLM2-like): ``<|endoftext|>=0`` unk, ``<|im_start|>=1`` bos, ``<|im_end|>=2`` eos and pad;
  adds nothing; has a ChatML chat template, so ``apply_chat_template`` works.

transformers and tokenizers are imported inside the functions.
"""

from __future__ import annotations

import string
from typing import Any, Literal

import torch

Arch = Literal["bert", "gpt2", "llama", "roberta"]
ARCHS = ("bert", "gpt2", "llama", "roberta")
TINY_VOCAB = 128
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 94 visible + space + newline

SPECIALS: dict[str, list[str]] = {
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "gpt2": ["<|endoftext|>"],
    "llama": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"tiny arch must be one of {ARCHS}, got {arch!r}")


def tiny_config(arch: Arch, **overrides: Any) -> Any:
    """A 2-layer, 32-wide transformers config of ``arch``; keyword overrides win."""
    import transformers

    _check_arch(arch)
    if arch == "gpt2":
        base = dict(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=128,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                    bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return transformers.GPT2Config(**{**base, **overrides})
    if arch == "llama":
        base = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        return transformers.LlamaConfig(**{**base, **overrides})
    common = dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  type_vocab_size=2)
    if arch == "bert":
        return transformers.BertConfig(**{**common, "max_position_embeddings": 128, "pad_token_id": 0,
                                          **overrides})
    # RoBERTa positions start after the padding index, so it needs pad_token_id + 1 extra positions.
    return transformers.RobertaConfig(**{**common, "max_position_embeddings": 130, "pad_token_id": 1,
                                         "bos_token_id": 0, "eos_token_id": 2, **overrides})


def tiny_model(arch: Arch, kind: str = "base", seed: int = 0, num_labels: int = 2,
               **overrides: Any) -> torch.nn.Module:
    """A randomly initialized tiny model, identical for identical ``seed`` (global RNG untouched).

    ``kind``: "base" (AutoModel), "seq_cls" (with ``num_labels``) or "causal_lm" (gpt2/llama only).
    Returned in eval mode, float32.
    """
    import transformers

    autos = {"base": transformers.AutoModel, "seq_cls": transformers.AutoModelForSequenceClassification,
             "causal_lm": transformers.AutoModelForCausalLM}
    if kind not in autos:
        raise ValueError(f"kind must be one of {tuple(autos)}, got {kind!r}")
    if kind == "causal_lm" and arch not in ("gpt2", "llama"):
        raise ValueError(f"kind='causal_lm' needs a decoder arch (gpt2, llama), got {arch!r}")
    config = tiny_config(arch, **overrides)
    if kind == "seq_cls":
        config.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = autos[kind].from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_tokenizer(arch: Arch, model_max_length: int = 128) -> Any:
    """A character-level fast tokenizer whose ids fit ``tiny_config(arch)`` (see the module doc)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    _check_arch(arch)
    specials = SPECIALS[arch]
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    unk = {"bert": "[UNK]", "roberta": "<unk>"}.get(arch, "<|endoftext|>")
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    names: dict[str, str] = {"unk_token": unk}
    if arch == "bert":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        names.update(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    elif arch == "roberta":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
        names.update(pad_token="<pad>", bos_token="<s>", eos_token="</s>", cls_token="<s>",
                      sep_token="</s>", mask_token="<mask>")
    elif arch == "gpt2":
        names.update(pad_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    else:
        names.update(pad_token="<|im_end|>", bos_token="<|im_start|>", eos_token="<|im_end|>")
    # Registered as special in the backend, they are matched whole in text (chat templates write them).
    backend.add_special_tokens(specials)
    input_names = ["input_ids", "token_type_ids", "attention_mask"] if arch == "bert" else None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                        **({"model_input_names": input_names} if input_names else {}),
                                        **names)
    if arch == "llama":
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
