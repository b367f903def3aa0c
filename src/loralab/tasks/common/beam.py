"""Beam search with transformers' semantics, over any Hugging Face causal LM's forward and KV cache.

Per example, with K beams, V tokens, g tokens generated so far and running scores s_k (log-probs):

    candidates   c(k, v) = s_k + log_softmax(logits_k)(v)      (an n-gram repeat: -inf)
    keep the top (1 + #eos) K of the K V candidates; a kept candidate that ends in EOS (or reaches
    max_new_tokens) and ranks among the first K is a finished hypothesis scored c / (g + 1) ** length_penalty;
    the best K of the others run on.
    Done (early_stopping=False, transformers' heuristic): K hypotheses are finished and the best running
    beam's s / g ** length_penalty is no better than the worst of them. The answer: the best hypothesis.

The arithmetic (the -1e9 masks, the order of every topk) is transformers' own, so in float32 both give the
same tokens (tested). What differs is the cost: the prompt runs once per example, not once per beam; a
done example leaves the batch and its rows leave the cache at once; the model steps through
``steppers`` (a preallocated cache; for Llama models a static per-row buffer whose prompt part is never
reordered); the n-gram check is one vectorised comparison.

``greedy_search`` is transformers' greedy decoding on the same steppers (argmax of the float32 logits
after the n-gram ban); a row that has produced an EOS leaves the batch, where transformers keeps
computing it and pads.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from loralab.tasks.common.llama_step import LlamaStepper
from loralab.tasks.common.steppers import HFStepper


def stepper(model: nn.Module) -> LlamaStepper | HFStepper:
    """The fastest stepper that computes ``model`` exactly: ``LlamaStepper`` where it applies. Make one
    per decoding model and pass it to every ``beam_search`` call (the Llama one stacks weights once)."""
    if LlamaStepper.supports(model):
        return LlamaStepper(model)
    return HFStepper(model)


NEG = -1.0e9
"""transformers' mask value for beams that must not be chosen."""


def ban_repeated_ngrams(rows: torch.Tensor, log_probs: torch.Tensor, n: int) -> torch.Tensor:
    """Set -inf (in place) where the next token would complete an n-gram already in the row.

    ``rows``: (R, L) tokens so far (prompt included, as transformers does); ``log_probs``: (R, V). The
    last n-1 tokens are compared with every window of the row at once; a window that matches them bans
    the token that followed it."""
    length = rows.shape[1]
    if n <= 0 or length < n:
        return log_probs
    windows = rows.unfold(1, n, 1)  # (R, L - n + 1, n)
    matches = (windows[:, :, :-1] == rows[:, None, length - n + 1:]).all(-1)
    row, start = matches.nonzero(as_tuple=True)
    log_probs[row, windows[row, start, -1]] = float("-inf")
    return log_probs


@torch.no_grad()
def beam_search(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int,
                max_new_tokens: int, eos_ids: Sequence[int], length_penalty: float = 1.0,
                no_repeat_ngram_size: int = 0, pad_id: int = 0,
                on_step: Callable[[int], None] | None = None,
                steps: LlamaStepper | HFStepper | None = None) -> list[list[int]]:
    """The best hypothesis of each left-padded prompt row: its new tokens, EOS included if it ended so.
    ``on_step(k)``: told after each decoding step how many steps are now done (for a progress bar);
    ``steps``: ``stepper(model)``, made here when not given."""
    device = input_ids.device
    n_ex, width = input_ids.shape
    K, T = num_beams, max_new_tokens
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    keep = max(2, 1 + len(eos)) * K
    top_mask = torch.arange(keep, device=device) < K
    alive = torch.arange(n_ex, device=device)  # original index of each example still searching
    seqs = torch.full((n_ex, K, width + T), pad_id, dtype=torch.long, device=device)
    seqs[:, :, :width] = input_ids[:, None]
    prompt_mask = attention_mask.to(torch.long)
    run_scores = torch.full((n_ex, K), NEG, device=device)
    run_scores[:, 0] = 0.0
    fin_seqs = torch.full((n_ex, K, T), pad_id, dtype=torch.long, device=device)
    fin_scores = torch.full((n_ex, K), NEG, device=device)
    fin_lens = torch.zeros((n_ex, K), dtype=torch.long, device=device)
    is_fin = torch.zeros((n_ex, K), dtype=torch.bool, device=device)
    unsat = torch.ones((n_ex, 1), dtype=torch.bool, device=device)
    best: list[list[int]] = [[] for _ in range(n_ex)]

    steps = stepper(model) if steps is None else steps
    # the prompt runs once per example: its log-probs stand for all K (identical) beams
    log_probs = steps.prefill(input_ids, attention_mask, width + T).float().log_softmax(-1)
    log_probs = ban_repeated_ngrams(input_ids, log_probs, no_repeat_ngram_size)
    log_probs = log_probs[:, None].expand(-1, K, -1)
    vocab = log_probs.shape[-1]
    # every step's float32 log-probs go into the same memory (a fresh 16 MB per step costs page faults:
    # cast + log_softmax at 80 rows took 11 ms fresh, 1.7 ms into warm buffers)
    cast_buf, lp_buf = torch.empty(2, n_ex * K, vocab, device=device)

    def finish(which: torch.Tensor) -> None:
        for i, b in enumerate(alive[which].tolist()):
            n = int(fin_lens[which][i, 0])
            best[b] = fin_seqs[which][i, 0, :n].tolist()

    for t in range(T):
        b_alive = len(alive)
        # (in place after the first step; the first step's log_probs is one row viewed K times)
        scores = (log_probs.add_(run_scores[:, :, None]) if t else log_probs + run_scores[:, :, None])
        scores = scores.reshape(b_alive, K * vocab)
        top_scores, top_index = torch.topk(scores, keep)
        parent, token = top_index // vocab, top_index % vocab
        cand = torch.take_along_dim(seqs, parent[:, :, None], dim=1)
        cand[:, :, width + t] = token
        hits = torch.isin(token, eos) | (t + 1 >= T)
        # the K best candidates that did not just finish run on
        run_lp = top_scores + hits.to(torch.float32) * NEG
        nxt = torch.topk(run_lp, K)[1]
        seqs = torch.take_along_dim(cand, nxt[:, :, None], dim=1)
        run_scores = torch.take_along_dim(run_lp, nxt, dim=1)
        parents = torch.take_along_dim(parent, nxt, dim=1)
        # finished hypotheses: the best K of the old ones and those that just ended among the top K
        just = hits & top_mask[None, :]
        final = top_scores / ((t + 1) ** length_penalty)
        final += (~unsat).to(torch.float32) * NEG
        final += (~just) * NEG
        merged_scores = torch.cat((fin_scores, final), 1)
        pick = torch.topk(merged_scores, K)[1]
        fin_scores = torch.take_along_dim(merged_scores, pick, dim=1)
        merged_seqs = torch.cat((fin_seqs, cand[:, :, width:]), 1)
        fin_seqs = torch.take_along_dim(merged_seqs, pick[:, :, None], dim=1)
        fin_lens = torch.take_along_dim(torch.cat((fin_lens, torch.full_like(token, t + 1)), 1), pick, dim=1)
        is_fin = torch.take_along_dim(torch.cat((is_fin, just), 1), pick, dim=1)
        # transformers' early-stop heuristic, at the new length g = t + 1
        best_running = run_scores[:, :1] / ((t + 1) ** length_penalty)
        worst = torch.where(is_fin, fin_scores.min(1, keepdim=True)[0], NEG)
        unsat = unsat & (best_running > worst).any(-1, keepdim=True)
        if on_step is not None:
            on_step(t + 1)
        if bool(hits.all()):  # every candidate ended (at t + 1 == T they all do)
            finish(torch.ones(b_alive, dtype=torch.bool, device=device))
            break
        done = ~unsat[:, 0]
        if bool(done.any()):
            finish(done)
            if bool(done.all()):
                break
        stay = ~done
        # cache rows for the next step: each surviving beam's parent row, done examples dropped
        # (until the first reorder the cache holds one row per example: every beam's parent is that row)
        rows = torch.arange(b_alive, device=device)[:, None]
        source = (rows * K + parents if t else rows.expand(b_alive, K))[stay].reshape(-1)
        steps.select(source, stay.nonzero()[:, 0])
        alive, seqs, run_scores, unsat = alive[stay], seqs[stay], run_scores[stay], unsat[stay]
        fin_seqs, fin_scores, fin_lens, is_fin = fin_seqs[stay], fin_scores[stay], fin_lens[stay], is_fin[stay]
        prompt_mask = prompt_mask[stay]
        flat = seqs.reshape(-1, width + T)[:, :width + t + 1]
        mask = torch.cat((prompt_mask.repeat_interleave(K, 0),
                          prompt_mask.new_ones(len(alive) * K, t + 1)), 1)
        log_probs = _log_softmax(steps.step(flat[:, -1], mask), cast_buf, lp_buf)
        log_probs = ban_repeated_ngrams(flat, log_probs, no_repeat_ngram_size).view(len(alive), K, vocab)
    return best


def _log_softmax(logits: torch.Tensor, cast_buf: torch.Tensor, out_buf: torch.Tensor) -> torch.Tensor:
    """float32 ``logits.log_softmax(-1)`` into the first rows of ``out_buf`` (the cast first, into
    ``cast_buf``: log_softmax(dtype=float32) on bf16 logits is ~2x slower than cast + log_softmax)."""
    rows = len(logits)
    if logits.dtype != torch.float32:
        logits = cast_buf[:rows].copy_(logits)
    return torch.log_softmax(logits, -1, out=out_buf[:rows])


@torch.no_grad()
def greedy_search(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  eos_ids: Sequence[int], no_repeat_ngram_size: int = 0,
                  on_step: Callable[[int], None] | None = None,
                  steps: LlamaStepper | HFStepper | None = None) -> list[list[int]]:
    """Each left-padded prompt row's new tokens, up to and including its first EOS: at every step the
    argmax of the float32 logits once repeated n-grams are banned (``transformers``' greedy search).
    ``on_step`` and ``steps`` as for ``beam_search``."""
    device = input_ids.device
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    steps = stepper(model) if steps is None else steps
    logits = steps.prefill(input_ids, attention_mask, input_ids.shape[1] + max_new_tokens)
    alive = torch.arange(len(input_ids), device=device)  # original index of each row still decoding
    seqs, mask = input_ids, attention_mask.to(torch.long)
    replies: list[list[int]] = [[] for _ in range(len(input_ids))]
    for t in range(max_new_tokens):
        token = ban_repeated_ngrams(seqs, logits.float(), no_repeat_ngram_size).argmax(-1)
        for row, tok in zip(alive.tolist(), token.tolist()):
            replies[row].append(tok)
        if on_step is not None:
            on_step(t + 1)
        stay = ~torch.isin(token, eos)
        if t + 1 == max_new_tokens or not bool(stay.any()):
            break
        if not bool(stay.all()):  # rows that ended leave the batch and the cache
            keep = stay.nonzero()[:, 0]
            steps.select(keep, keep)
            alive, seqs, mask, token = alive[keep], seqs[keep], mask[keep], token[keep]
        seqs = torch.cat((seqs, token[:, None]), 1)
        mask = torch.cat((mask, mask.new_ones(len(alive), 1)), 1)
        logits = steps.step(token, mask)
    return replies
