"""loralab's beam search against transformers' own (the reference): the same tokens in float32 on tiny
random Llama and GPT-2 models, over left-padded batches, several EOS ids, every length-penalty sign and
n-gram size; the vectorised n-gram ban against transformers' processor; the static cache."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from loralab.models.tiny import tiny_model
from loralab.tasks.common.beam import ban_repeated_ngrams, beam_search, greedy_search
from loralab.tasks.common.llama_step import LlamaStepper
from loralab.tasks.common.steppers import HFStepper, static_cache

EOS = {"llama": 2, "gpt2": 0}
EOS_BOOST = 2.0


def _peaky(arch: str, seed: int, eos: tuple[int, ...] = ()) -> torch.nn.Module:
    """A tiny random model with sharper next-token distributions and the ``eos`` logits raised by about
    EOS_BOOST, so that hypotheses end at different lengths: each EOS row of the head gains the mean
    final hidden state's direction (u / |u|^2, so that h.u / |u|^2 ~ 1 for typical h)."""
    model = tiny_model(arch, "causal_lm", seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
        ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(seed))
        inner = model.model if arch == "llama" else model.transformer
        u = inner(input_ids=ids).last_hidden_state.mean((0, 1))
        for e in eos or (EOS[arch],):
            model.lm_head.weight[e] += EOS_BOOST * u / u.dot(u)
    return model


def _batch(rng: random.Random, n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompts = [[rng.randrange(3, 128) for _ in range(rng.randrange(2, 12))] for _ in range(n)]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _hf(model, ids, mask, beams, new, eos, penalty, ngram, pad):
    config = GenerationConfig(max_new_tokens=new, num_beams=beams, do_sample=False, no_repeat_ngram_size=ngram,
                              eos_token_id=eos, pad_token_id=pad, length_penalty=penalty, early_stopping=False,
                              repetition_penalty=1.0, min_new_tokens=0, num_return_sequences=1, use_cache=True)
    rows = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:].tolist()
    ends = set(eos)
    return [row[:next((j + 1 for j, t in enumerate(row) if t in ends), len(row))] for row in rows]


@pytest.mark.parametrize("arch,llama_stepper", [("llama", True), ("llama", False), ("gpt2", False)])
def test_same_tokens_as_transformers_beam_search(arch, llama_stepper, monkeypatch):
    """Both steppers: loralab's Llama step and the model's own forward (forced for llama by refusing it)."""
    if not llama_stepper:
        monkeypatch.setattr(LlamaStepper, "supports", staticmethod(lambda model: False))
    model, rng = _peaky(arch, seed=1), random.Random(0)
    assert LlamaStepper.supports(model) == llama_stepper
    pad, eos = EOS[arch], [EOS[arch]]
    lengths = []
    for beams, penalty, ngram, new in ((4, 0.9, 3, 12), (3, 1.0, 0, 8), (5, -0.5, 2, 16), (2, 2.0, 4, 10)):
        for _ in range(2):
            ids, mask = _batch(rng, 4, pad)
            ours = beam_search(model, ids, mask, beams, new, eos, penalty, ngram, pad)
            assert ours == _hf(model, ids, mask, beams, new, eos, penalty, ngram, pad)
            lengths += [len(r) for r in ours]
    # the comparison covered hypotheses that ended with EOS early and ones cut at max_new_tokens
    assert min(lengths) < 6 and max(lengths) >= 12, sorted(lengths)


@pytest.mark.parametrize("cls", [LlamaStepper, HFStepper])
def test_several_eos_ids_and_done_examples_leave_the_batch(cls, monkeypatch):
    """Three EOS ids (transformers keeps (1 + 3) K candidates); examples finish at different steps and
    leave the batch (the stepper is asked for fewer rows); the result still equals transformers' (which
    keeps computing them)."""
    eos = [2, 7, 11]
    model, rng = _peaky("llama", seed=2, eos=tuple(eos)), random.Random(1)
    if cls is HFStepper:
        monkeypatch.setattr(LlamaStepper, "supports", staticmethod(lambda model: False))
    rows_seen: list[int] = []
    for name in ("prefill", "step"):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, ids, mask, *rest, real=real:
                            rows_seen.append(len(ids)) or real(self, ids, mask, *rest))
    shrank = 0
    for _ in range(3):
        ids, mask = _batch(rng, 5, 2)
        rows_seen.clear()
        steps: list[int] = []
        ours = beam_search(model, ids, mask, 3, 14, eos, 0.9, 2, 2, on_step=steps.append)
        assert rows_seen[0] == 5 and rows_seen[1] <= 15  # the prompt once per example, then K rows each
        assert steps == list(range(1, len(steps) + 1))
        shrank += rows_seen[-1] < rows_seen[1]
        assert ours == _hf(model, ids, mask, 3, 14, eos, 0.9, 2, 2)
    assert shrank, "no example finished before the others: the test did not exercise dropping"


def test_one_llama_stepper_serves_batches_of_every_shape():
    """A stepper keeps its key/value memory for the next batch (more or fewer rows, wider or narrower
    prompts, other beam counts): each batch still equals transformers', even with the memory left by the
    last batch overwritten by large finite values (nothing outside the mask may read it)."""
    model, rng = _peaky("llama", seed=3, eos=(2, 7)), random.Random(4)
    steps = LlamaStepper(model)
    for n, beams, new in ((3, 2, 10), (6, 4, 14), (2, 3, 6), (5, 4, 12)):
        ids, mask = _batch(rng, n, 2)
        ours = beam_search(model, ids, mask, beams, new, [2, 7], 0.9, 2, 2, steps=steps)
        assert ours == _hf(model, ids, mask, beams, new, [2, 7], 0.9, 2, 2)
        assert steps.storage.numel() > 0
        steps.storage.fill_(1e4)
        greedy = greedy_search(model, ids, mask, new, [2, 7], 2, steps=steps)
        assert greedy == greedy_search(model, ids, mask, new, [2, 7], 2, steps=LlamaStepper(model))
        steps.storage.fill_(-1e4)


@pytest.mark.parametrize("arch,llama_stepper", [("llama", True), ("llama", False), ("gpt2", False)])
def test_greedy_gives_transformers_greedy_tokens(arch, llama_stepper, monkeypatch):
    """Greedy decoding (num_beams=1) on both steppers equals transformers' ``generate``; rows that
    produced an EOS leave the batch (the stepper is asked for fewer rows), transformers keeps them."""
    if not llama_stepper:
        monkeypatch.setattr(LlamaStepper, "supports", staticmethod(lambda model: False))
    eos = [EOS[arch], 7]
    model, rng = _peaky(arch, seed=1, eos=tuple(eos)), random.Random(2)
    cls = LlamaStepper if llama_stepper else HFStepper
    rows_seen: list[int] = []
    real = cls.step
    monkeypatch.setattr(cls, "step", lambda self, ids, mask: rows_seen.append(len(ids)) or real(self, ids, mask))
    lengths = []
    for ngram, new in ((0, 12), (2, 16), (3, 10)):
        for _ in range(2):
            ids, mask = _batch(rng, 5, EOS[arch])
            config = GenerationConfig(max_new_tokens=new, num_beams=1, do_sample=False, no_repeat_ngram_size=ngram,
                                      eos_token_id=eos, pad_token_id=EOS[arch], repetition_penalty=1.0,
                                      min_new_tokens=0, use_cache=True)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
            expected = [row[:next((j + 1 for j, t in enumerate(row) if t in eos), len(row))] for row in out.tolist()]
            ours = greedy_search(model, ids, mask, new, eos, ngram)
            assert ours == expected
            lengths += [len(r) for r in ours]
    assert min(lengths) < 6 and max(lengths) >= 12, sorted(lengths)  # some ended early, some ran to the limit
    assert min(rows_seen) < 5, "no row left the batch: the test did not exercise dropping"


def test_ngram_ban_equals_transformers_processor():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        for length in (n - 1, n, 9, 30):
            rows = torch.randint(0, 5, (6, max(length, 1)), generator=gen)  # few symbols: many repeats
            scores = torch.randn(6, 5, generator=gen)
            expected = NoRepeatNGramLogitsProcessor(n)(rows, scores.clone())
            assert torch.equal(ban_repeated_ngrams(rows, scores.clone(), n), expected)
    rows = torch.tensor([[1, 2, 3, 1, 2]])
    banned = ban_repeated_ngrams(rows, torch.zeros(1, 5), 3)
    assert banned[0].tolist() == [0, 0, 0, float("-inf"), 0]  # "1 2" was followed by 3 once: 3 is banned


def test_static_cache_gives_the_uncached_logits():
    """The preallocated cache, with rows reordered mid-way, equals a full forward over each row's tokens."""
    model = tiny_model("llama", "causal_lm", seed=0)
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    cache = static_cache(model, 10)
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    order = torch.tensor([2, 0, 0])
    for layer in cache.layers:
        layer.select_rows(order)
    nxt = torch.tensor([[5], [6], [7]])
    got = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    full = model(input_ids=torch.cat((ids[order], nxt), 1)).logits[:, -1]
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="overflowed"):
        model(input_ids=torch.ones(3, 4, dtype=torch.long), past_key_values=cache, use_cache=True)
