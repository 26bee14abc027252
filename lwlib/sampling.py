"""Sampling for the local backend: the repetition penalty on generated text (one logits processor for both
engines), top-p filtering, and drawing the next token with one temperature or one per row.

Usage::

    pen = GenerationPenalty(1.3, window=64, end_ids=[2])
    scores = pen.apply(scores, generated, counts)        # [B, V] float logits, [B, T] ids, [B] valid counts
    nxt = sample_next(scores, temperature=0.5)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch



def _mark(tokens: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, vocab]`` bool: which token ids occur among the ``valid`` entries of ``tokens`` ``[B, T]``."""
    idx = torch.where(valid, tokens, vocab)  # invalid entries go to a spare column
    seen = torch.zeros(tokens.shape[0], vocab + 1, dtype=torch.bool, device=tokens.device)
    seen.scatter_(1, idx, True)
    return seen[:, :vocab]


class GenerationPenalty:
    """A repetition penalty on the generated text only, and an optional no-repeat-n-gram ban.

    Rule (the CTRL rule that transformers uses, on the tokens of the generated text, not the prompt): a token
    id that occurs among the last ``window`` generated tokens of a row (all generated tokens when
    ``window`` is 0) has its logit divided by ``penalty`` if positive, multiplied if negative. End tokens are
    never penalized or banned: every chat prompt holds the end-of-turn token, and transformers' own
    processor, which also penalizes the prompt, makes it harder to stop. ``no_repeat_ngram_size`` n > 0
    bans (logit -inf) each token that would repeat an n-gram of the generated text.

    ``apply(scores, tokens, counts)`` works on ``scores`` ``[B, V]``, generated ids ``tokens`` ``[B, T]`` of
    which the first ``counts[b]`` of row ``b`` are valid (``None``: all); the slots engine calls it on its
    token buffer, and :meth:`for_generate` wraps it as a transformers logits processor for ``generate``
    (generated tokens = ``input_ids[:, prompt_width:]``), so both engines decode the same way.

    Usage: ``GenerationPenalty(1.3, window=64, end_ids=[2]).apply(scores, generated, counts)``
    """

    def __init__(self, penalty: float = 1.0, window: int = 0, no_repeat_ngram_size: int = 0,
                 end_ids: Sequence[int] = ()):
        if not penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
        if window < 0:
            raise ValueError(f"repetition_window must be >= 0, got {window}")
        if no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
        self.penalty = float(penalty)
        self.window = int(window)
        self.ngram = int(no_repeat_ngram_size)
        self.end_ids = [int(i) for i in end_ids]
        self._end_masks: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_params(cls, params: Any, end_ids: Sequence[int]) -> GenerationPenalty:
        """From a :class:`lwlib.backends.GenParams` (``repetition_penalty``, ``repetition_window``,
        ``no_repeat_ngram_size``)."""
        return cls(params.repetition_penalty, getattr(params, "repetition_window", 0),
                   getattr(params, "no_repeat_ngram_size", 0), end_ids)

    @property
    def active(self) -> bool:
        return self.penalty != 1.0 or self.ngram > 0

    def end_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """``[vocab]`` bool, True at the end tokens (cached per device, so no host copy per step)."""
        key = (vocab, str(device))
        if key not in self._end_masks:
            m = torch.zeros(vocab, dtype=torch.bool)
            m[[i for i in self.end_ids if 0 <= i < vocab]] = True
            self._end_masks[key] = m.to(device)
        return self._end_masks[key]

    def apply(self, scores: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor | None = None,
              penalty: torch.Tensor | None = None, window: torch.Tensor | None = None,
              span: int | None = None) -> torch.Tensor:
        """The processed ``scores`` (a new tensor; ``scores`` itself is left alone). ``penalty`` and ``window``
        (``[B]`` tensors) give each row its own penalty and window (rows of several decodings in one batch;
        a row with penalty 1.0 is left exactly as it is); by default every row uses this object's. ``span``: the
        most generated tokens any row looks back over (the largest window; None when a row's window is 0, i.e.
        all of its text), which bounds the work.

        The penalty reads the logits only at the ids in each row's window (a gather of ``[B, span]``) and writes
        them back with a min-reduction (a max one for penalties below 1), so a step costs ``B x span``, not
        ``B x vocab``: with a 262,144-token vocabulary the ``[B, vocab]`` occurrence mask was most of a decoding
        step. An id seen several times in the window is penalized once, as before (each occurrence writes the
        same value)."""
        rows = penalty is not None
        if not (self.active or rows) or tokens.shape[1] == 0:
            return scores
        b, t = tokens.shape
        vocab = scores.shape[-1]
        n = counts if counts is not None else torch.full((b,), t, dtype=torch.long, device=tokens.device)
        if rows or self.penalty != 1.0:
            if not rows:
                span = self.window if self.window > 0 else None
            width = t if span is None or span <= 0 else min(int(span), t)
            pos = n[:, None] - width + torch.arange(width, device=tokens.device)  # the row's last `width` tokens
            valid = pos >= 0
            if rows:
                w = window if window is not None else torch.full((b,), self.window, dtype=torch.long,
                                                                 device=tokens.device)
                valid &= (w <= 0)[:, None] | (pos >= (n - w)[:, None])
                p = penalty.to(scores.dtype)[:, None]
            else:
                p = torch.tensor(self.penalty, dtype=scores.dtype, device=scores.device)
            ids = tokens.gather(1, pos.clamp(min=0))
            valid &= ~self.end_mask(vocab, scores.device)[ids]
            s = scores.gather(1, ids)
            penalized = torch.where(s < 0, s * p, s / p)
            out = scores.clone()
            up = p >= 1  # a penalty: the new value is the smaller one; below 1 (a bonus): the larger one
            out.scatter_reduce_(1, ids, torch.where(valid & up, penalized, float("inf")), "amin")
            if rows or self.penalty < 1:  # (a host fact for one setting: no second pass for a penalty)
                out.scatter_reduce_(1, ids, torch.where(valid & ~up, penalized, float("-inf")), "amax")
            scores = out
        if self.ngram > 0 and t >= self.ngram:
            keep = ~self.end_mask(vocab, scores.device)
            k = self.ngram
            grams = tokens.unfold(1, k, 1)  # [B, T-k+1, k]
            start = torch.arange(grams.shape[1], device=tokens.device)
            match = start[None, :] + k <= n[:, None]  # the whole n-gram lies in the valid tokens
            if k > 1:
                pidx = (n[:, None] - (k - 1) + torch.arange(k - 1, device=tokens.device)).clamp(min=0)
                prefix = tokens.gather(1, pidx)  # the last k-1 generated tokens
                match = match & (grams[:, :, : k - 1] == prefix[:, None, :]).all(-1)
            banned = _mark(grams[:, :, k - 1], match, vocab) & keep
            scores = scores.masked_fill(banned, float("-inf"))
        return scores

    def for_generate(self, prompt_width: int):
        """This penalty as a transformers ``LogitsProcessor`` for ``generate`` on left-padded prompts of
        ``prompt_width`` tokens."""
        from transformers import LogitsProcessor

        pen = self

        class _Processor(LogitsProcessor):
            def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
                return pen.apply(scores, input_ids[:, prompt_width:])

        return _Processor()


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering exactly as transformers' ``TopPLogitsWarper`` (at least one token kept)."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))


def sample_next(scores: torch.Tensor, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[B]`` from processed logits ``[B, V]``: argmax when ``temperature`` is 0, else
    temperature, then top-p, then a draw (the order transformers' ``generate`` applies them)."""
    if not temperature or temperature <= 0:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if top_p is not None and top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def sample_rows(scores: torch.Tensor, temperature: torch.Tensor, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`sample_next` with a temperature per row (``[B]``; 0 = greedy for that row): rows of several
    decodings in one batch. A row's draw equals :func:`sample_next`'s at its temperature in distribution."""
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).to(scores.dtype)[:, None]
    scaled = scores / t
    if top_p is not None and top_p < 1.0:
        scaled = top_p_filter(scaled, top_p)
    drawn = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(1)
    return torch.where(greedy, scores.argmax(dim=-1), drawn)


# Sampling settings that one slots-engine call shares across its rows (the rest may differ per row).
SHARED_PARAMS = ("top_p", "seed", "ignore_eos", "no_repeat_ngram_size")


def shared_key(params: Any) -> tuple:
    """What rows must agree on to share one slots-engine call (:data:`SHARED_PARAMS`)."""
    return tuple(getattr(params, k, None) for k in SHARED_PARAMS)
