"""Tokenize chat examples with assistant-only targets, and pack them padding-free into fixed-length packs.

Data code only; the attention that runs on packs flattened into one row is :mod:`lwlib.attention`.

The paper trains on packs of up to 32,768 tokens, several conversations per pack, with attention kept
inside each conversation. Here a pack is the concatenation of whole tokenized examples, with
``position_ids`` restarting at 0 for every example. transformers derives the per-sequence attention
from those position ids when no ``attention_mask`` is given (``masking_utils.find_packed_sequence_indices``
turns every position reset into a new block of a block-diagonal causal mask for sdpa/eager; the
flash-attention path turns them into ``cu_seqlens`` for the varlen kernel). The model must be called
with ``use_cache=False`` (a cache disables the packed-sequence detection). ``PackCollator(flatten=True)``
flattens a batch into one row and adds the sequence boundaries (``cu_seq_lens_q``/``max_length_q``,
transformers' flash-attention keywords) that the varlen kernels of :mod:`lwlib.attention` read.

Targets are stored already shifted (``labels[i]`` is the token to predict at position ``i``), one
sequence at a time, so no target ever crosses from one packed example into the next; the last position
of each example has no target. Only tokens inside the template's ``{% generation %}`` markers
(assistant content and its end-of-turn token) are targets.

Packing is best-fit decreasing over token lengths: every example goes into exactly one pack, the
last, partial pack included (the official code dropped it). An example longer than the pack length is
cut to the pack length (its start kept) and counted in :class:`PackStats`.

Usage::

    ex = tokenize_chat(tok, messages, template)           # TokenizedExample
    packs = pack_examples([ex, ...], max_tokens=8192)     # list[list[int]] of example indices
    ds = PackedDataset(examples, packs)
    batch = PackCollator(pad_id=tok.pad_token_id)([ds[0], ds[1]])
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IGNORE = -100
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


@dataclass
class TokenizedExample:
    """One tokenized conversation: ``input_ids`` and pre-shifted ``labels`` (``IGNORE`` = no target)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class PackStats:
    """What packing did: counts of examples, packs, tokens, truncated examples, and the fill rate."""

    examples: int = 0
    packs: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    max_tokens: int = 0
    fill: float = 0.0
    pack_lengths: list[int] = field(default_factory=list)


def load_template(name_or_path: str) -> str:
    """A training chat template: a file name in ``lwlib/templates`` (``smollm2_chatml``) or a path."""
    p = Path(name_or_path)
    if not p.exists():
        p = TEMPLATE_DIR / (name_or_path if name_or_path.endswith(".jinja") else name_or_path + ".jinja")
    if not p.exists():
        avail = sorted(x.stem for x in TEMPLATE_DIR.glob("*.jinja"))
        raise FileNotFoundError(f"no chat template {name_or_path!r}; built-in templates: {avail}")
    return p.read_text(encoding="utf-8")


def training_template(tok, name: str = "auto") -> str:
    """The template with generation markers for ``tok``: ``auto`` picks the tokenizer's own template if it already
    has ``{% generation %}`` markers, else the built-in training template (``lwlib/templates``: SmolLM2's ChatML,
    Gemma 3's turns, ...) that renders a conversation exactly as the tokenizer's own template does, else raises
    asking for an explicit ``sft.chat_template``."""
    if name != "auto":
        return load_template(name)
    own = getattr(tok, "chat_template", None) or ""
    if re.search(r"{%-?\s*generation\s*-?%}", own) and "endgeneration" in own:
        return own
    if own:
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        for path in sorted(TEMPLATE_DIR.glob("*.jinja")):
            cand = path.read_text(encoding="utf-8")
            if not re.search(r"{%-?\s*generation\s*-?%}", cand):  # (a prompting template: no markers)
                continue
            try:
                same = tok.apply_chat_template(probe, tokenize=False) == tok.apply_chat_template(
                    probe, chat_template=cand, tokenize=False)
            except Exception:  # noqa: BLE001 - a foreign template may need other variables
                same = False
            if same:
                return cand
    raise ValueError("the tokenizer's chat template has no {% generation %} markers and renders like no built-in "
                     f"training template; set sft.chat_template to a template in {TEMPLATE_DIR} or a file path")


def tokenize_chat(tok, messages: list[dict[str, str]], template: str, max_tokens: int | None = None) -> TokenizedExample:
    """Render ``messages`` with ``template`` and tokenize; targets are the assistant tokens (generation
    markers), shifted so that ``labels[i]`` is the target at position ``i``. Cut to ``max_tokens``."""
    enc = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids = list(enc["input_ids"])
    mask = list(enc["assistant_masks"])
    if not any(mask):
        raise ValueError("no assistant tokens in the rendered conversation (template lacks generation markers?)")
    truncated = max_tokens is not None and len(ids) > max_tokens
    if truncated:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    labels = [ids[i + 1] if mask[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    return TokenizedExample(ids, labels, truncated)


def pack_examples(lengths: list[int] | list[TokenizedExample], max_tokens: int, seed: int | None = 0) -> list[list[int]]:
    """Best-fit-decreasing packing of example indices into packs of at most ``max_tokens`` tokens.

    Every index appears in exactly one pack (lengths above ``max_tokens`` must have been cut first).
    Packs are shuffled with ``seed`` (``None``: kept in packing order, longest first)."""
    lens = [len(x) if not isinstance(x, int) else x for x in lengths]
    for i, n in enumerate(lens):
        if n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens > pack length {max_tokens}; cut it first")
        if n <= 0:
            raise ValueError(f"example {i} is empty")
    order = sorted(range(len(lens)), key=lambda i: (-lens[i], i))
    packs: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lens[i]
        best, best_free = -1, max_tokens + 1
        for j, f in enumerate(free):  # fine for thousands of packs; the data sets here are small
            if n <= f < best_free:
                best, best_free = j, f
                if f == n:
                    break
        if best < 0:
            packs.append([i])
            free.append(max_tokens - n)
        else:
            packs[best].append(i)
            free[best] -= n
    if seed is not None:
        random.Random(seed).shuffle(packs)
    return packs


def pack_stats(examples: list[TokenizedExample], packs: list[list[int]], max_tokens: int) -> PackStats:
    lengths = [sum(len(examples[i]) for i in p) for p in packs]
    return PackStats(
        examples=sum(len(p) for p in packs), packs=len(packs), tokens=sum(lengths),
        target_tokens=sum(examples[i].n_targets for p in packs for i in p),
        truncated=sum(1 for e in examples if e.truncated), max_tokens=max_tokens,
        fill=sum(lengths) / (max_tokens * len(packs)) if packs else 0.0, pack_lengths=lengths,
    )


class PackedDataset(torch.utils.data.Dataset):
    """Packs as dataset items: ``input_ids``, ``labels``, ``position_ids`` (restarting per example),
    ``seq_lens`` and ``n_targets`` (per example)."""

    def __init__(self, examples: list[TokenizedExample], packs: list[list[int]]):
        self.examples = examples
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> dict[str, Any]:
        ids, labels, pos, lens, nt = [], [], [], [], []
        for i in self.packs[k]:
            e = self.examples[i]
            ids += e.input_ids
            labels += e.labels
            pos += list(range(len(e)))
            lens.append(len(e))
            nt.append(e.n_targets)
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "seq_lens": lens, "n_targets": nt}


@dataclass
class PackCollator:
    """Batch packs (or single examples) for training.

    ``flatten=True`` concatenates the whole batch into one row ``[1, total]`` (what the flash-attention
    varlen kernels need) and adds the sequence boundaries as transformers' flash-attention keywords:
    ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 cumulative lengths, ``[0, n1, n1 + n2, ...]``) and
    ``max_length_q``/``max_length_k`` (the longest sequence, an int), which the model passes down to its
    attention (``flash_attention_2`` then skips deriving them from ``position_ids``; ``torch_varlen`` needs them).
    ``flatten=False`` keeps one row per item, right-padded to the longest with a pad block that is a
    sequence of its own (position ids restart, no targets), so no ``attention_mask`` is needed and
    sdpa gets a block-diagonal mask per row. ``padded=True`` is the classic baseline instead: rows
    padded with an ``attention_mask`` and no position ids (use with one example per item).
    ``pad_to_multiple_of`` rounds the row length up.

    Extra keys for the loss: ``loss_weights`` (1 / number of targets of the token's example, for the
    per-sequence-mean ablation), ``num_targets`` (target tokens) and ``num_sequences`` (examples with at least
    one target), the counts as Python ints so that the trainer's loss denominator never waits for the GPU;
    :func:`split_batch` separates them (and ``labels``) from the model's inputs.
    """

    pad_id: int
    flatten: bool = False
    padded: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        weights = []
        for it in items:
            w = []
            for n, nt in zip(it["seq_lens"], it["n_targets"]):
                w += [1.0 / nt if nt else 0.0] * n
            weights.append(w)
        nseq = sum(1 for it in items for nt in it["n_targets"] if nt)
        if self.flatten:
            cat = lambda key: [x for it in items for x in it[key]]  # noqa: E731
            lens = cat("seq_lens")
            cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            out = {"input_ids": torch.tensor([cat("input_ids")]), "labels": torch.tensor([cat("labels")]),
                   "position_ids": torch.tensor([cat("position_ids")]),
                   "loss_weights": torch.tensor([[x for w in weights for x in w]], dtype=torch.float32),
                   "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lens), "max_length_k": max(lens)}
        else:
            width = max(len(it["input_ids"]) for it in items)
            if self.pad_to_multiple_of:
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            ids, labels, pos, wts, att = [], [], [], [], []
            for it, w in zip(items, weights):
                k = width - len(it["input_ids"])
                ids.append(it["input_ids"] + [self.pad_id] * k)
                labels.append(it["labels"] + [IGNORE] * k)
                pos.append(it["position_ids"] + list(range(k)))
                wts.append(w + [0.0] * k)
                att.append([1] * len(it["input_ids"]) + [0] * k)
            out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                   "loss_weights": torch.tensor(wts, dtype=torch.float32)}
            if self.padded:
                out["attention_mask"] = torch.tensor(att)
            else:
                out["position_ids"] = torch.tensor(pos)
        out["num_targets"] = sum(nt for it in items for nt in it["n_targets"])
        out["num_sequences"] = nseq
        return out


LOSS_KEYS = ("labels", "loss_weights", "num_targets", "num_sequences")


def split_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A :class:`PackCollator` batch as ``(model inputs, loss inputs)``: ``labels``, ``loss_weights``,
    ``num_targets`` and ``num_sequences`` (:data:`LOSS_KEYS`) go to the loss; everything else (ids, position ids,
    attention mask, the varlen boundaries) is passed to the model.

    Usage: ``inputs, loss = split_batch(batch); model(**inputs, use_cache=False)``
    """
    return ({k: v for k, v in batch.items() if k not in LOSS_KEYS},
            {k: v for k, v in batch.items() if k in LOSS_KEYS})
