"""Per-token log-likelihood of a chat response given its prompt: what the NLL-by-position study (lwlib.nll, the
paper's Figure 7) and DPO's reward check (lwlib.dpo.reward_margins) both need, in one place so that neither stage
imports the other.

Response tokens are those after the tokenized prompt (``apply_chat_template(add_generation_prompt=True)``) in the
tokenized whole conversation, up to (by default not including) the first end-of-turn token. The model runs once
over prompt + response (``use_cache=False``, right padding); the output head and log-softmax run ``chunk_size``
positions at a time, so the ``tokens x vocabulary`` logits of a 32k-token sequence are never held at once (the
result equals the unchunked one: the head acts on each position independently).

Usage::

    ids, start, n = encode_conversation(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    nll = token_nll(model, tok, conversations, batch_size=4, chunk_size=2048)   # one array per conversation
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

Messages = list[dict[str, str]]


# --------------------------------------------------------------------------------------------- tokens

def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def encode_conversation(tok, messages: Messages, include_end_token: bool = False,
                        max_tokens: int | None = None) -> tuple[list[int], int, int]:
    """Token ids of prompt + response, the response start and its length (in tokens).

    The prompt is everything before the last (assistant) message, rendered with the generation prompt;
    the response is what the whole conversation adds after it, up to the first end-of-turn token
    (included if ``include_end_token``). Returns ``(ids, start, n_response)``; ``ids`` is cut to
    ``max_tokens`` (the response shortened accordingly)."""
    from .models import end_token_ids

    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("encode_conversation: the last message must be the assistant's response")
    prompt = _ids(tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    full = _ids(tok.apply_chat_template(messages, tokenize=True))
    start = 0
    while start < min(len(prompt), len(full)) and prompt[start] == full[start]:
        start += 1
    resp = full[start:]
    ends = set(end_token_ids(tok))
    cut = next((k for k, t in enumerate(resp) if t in ends), len(resp))
    resp = resp[: cut + 1] if include_end_token and cut < len(resp) else resp[:cut]
    ids = full[:start] + resp
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
    return ids, start, max(len(ids) - start, 0)


# ------------------------------------------------------------------------------------------------ NLL

def _head_and_body(model):
    head = model.get_output_embeddings()
    body = getattr(model, model.base_model_prefix, None) if getattr(model, "base_model_prefix", None) else None
    if head is None or body is None or body is model:
        raise ValueError(f"{type(model).__name__}: cannot split into body and output head for chunked NLL")
    return body, head


@torch.no_grad()
def token_nll_batch(model, batch: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int,
                    chunk_size: int = 0) -> list[np.ndarray]:
    """Per-token NLL (natural log) of ``ids[start:]`` given ``ids[:t]`` for every sequence of a batch.

    One forward pass over the right-padded batch (``use_cache=False``); the output head and log-softmax
    run ``chunk_size`` positions at a time (0 = all at once). Returns one float64 array per sequence, of
    length ``len(ids) - start``."""
    device = next(model.parameters()).device
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(list(x))
        mask[i, : len(x)] = 1
    ids, mask = ids.to(device), mask.to(device)
    body, head = _head_and_body(model)
    hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    # position p predicts token p + 1: targets ids[:, 1:] from hidden[:, :-1]
    targets = ids[:, 1:]
    hid = hidden[:, :-1]
    n = hid.shape[1]
    step = chunk_size if chunk_size and chunk_size > 0 else max(n, 1)
    parts = []
    for s in range(0, n, step):
        logits = head(hid[:, s : s + step]).float()
        logp = torch.log_softmax(logits, dim=-1)
        parts.append(-logp.gather(-1, targets[:, s : s + step, None]).squeeze(-1))
    nll = torch.cat(parts, dim=1).double().cpu().numpy() if parts else np.zeros((len(batch), 0))
    out = []
    for i, (x, st) in enumerate(zip(batch, starts)):
        if st < 1:
            raise ValueError("the response must follow at least one prompt token")
        out.append(nll[i, st - 1 : len(x) - 1].copy())
    return out


def token_nll(model, tok, conversations: Sequence[Messages], batch_size: int = 4, chunk_size: int = 0,
              include_end_token: bool = False, max_tokens: int | None = None,
              desc: str = "token NLL") -> list[np.ndarray]:
    """Per-token NLL of each conversation's assistant response (see :func:`token_nll_batch`).

    Conversations are batched in order of length (results come back in input order)."""
    from .progress import tqdm

    enc = [encode_conversation(tok, m, include_end_token, max_tokens) for m in conversations]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[np.ndarray | None] = [None] * len(enc)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[s : s + batch_size]
        res = token_nll_batch(model, [enc[i][0] for i in idx], [enc[i][1] for i in idx], pad, chunk_size)
        for i, r in zip(idx, res):
            out[i] = r
    return out  # type: ignore[return-value]


