"""Tokenize chat examples with assistant-only targets, and pack them padding-free into fixed-length packs.

The paper trains on packs of up to 32,768 tokens, several conversations per pack, with attention kept
inside each conversation. Here a pack is the concatenation of whole tokenized examples, with
``position_ids`` restarting at 0 for every example. transformers derives the per-sequence attention
from those position ids when no ``attention_mask`` is given (``masking_utils.find_packed_sequence_indices``
turns every position reset into a new block of a block-diagonal causal mask for sdpa/eager; the
flash-attention path turns them into ``cu_seqlens`` for the varlen kernel). The model must be called
with ``use_cache=False`` (a cache disables the packed-sequence detection).

On CUDA without the flash-attn package, ``attn_implementation="torch_varlen"`` (:data:`VARLEN_ATTENTION`,
registered with transformers by :func:`register_varlen_attention`) runs PyTorch's own FlashAttention varlen
kernel (``torch.nn.attention.varlen``, FlashAttention-2) on the packs flattened into one row: the sequence
boundaries come from the collator as ``cu_seq_lens_q``/``max_length_q`` (transformers' flash-attention
keywords), so no mask is built and nothing waits for the GPU. ``attn_implementation="fa4_varlen"``
(:data:`FA4_ATTENTION`) does the same with FlashAttention-4's kernels (the ``flash-attn-4`` package, CuTe DSL,
Hopper and Blackwell GPUs: FlashAttention-3's Hopper algorithm on an H100), wrapped as PyTorch custom
operators that ``torch.compile`` keeps as opaque calls.

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

import functools
import importlib
import importlib.util
import inspect
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IGNORE = -100
VARLEN_ATTENTION = "torch_varlen"
FA4_ATTENTION = "fa4_varlen"
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
    """The template with generation markers for ``tok``: ``auto`` picks the tokenizer's own template if
    it already has ``{% generation %}`` markers, the SmolLM2 ChatML one if the tokenizer's template
    renders like it, else raises asking for an explicit ``sft.chat_template``."""
    if name != "auto":
        return load_template(name)
    own = getattr(tok, "chat_template", None) or ""
    if "generation" in own and "endgeneration" in own:
        return own
    cand = load_template("smollm2_chatml")
    if own:
        probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        try:
            same = tok.apply_chat_template(probe, tokenize=False) == tok.apply_chat_template(
                probe, chat_template=cand, tokenize=False)
        except Exception:  # noqa: BLE001 - a foreign template may need other variables
            same = False
        if same:
            return cand
    raise ValueError("the tokenizer's chat template has no {% generation %} markers and is not SmolLM2's ChatML; "
                     f"set sft.chat_template to a template in {TEMPLATE_DIR} or a file path")


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


class SingleDataset(torch.utils.data.Dataset):
    """Unpacked examples (one per row), for the padded baseline."""

    def __init__(self, examples: list[TokenizedExample]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, k: int) -> dict[str, Any]:
        e = self.examples[k]
        return {"input_ids": e.input_ids, "labels": e.labels, "position_ids": list(range(len(e))),
                "seq_lens": [len(e)], "n_targets": [e.n_targets]}


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


# ------------------------------------------------------------------------------- packed attention

def flat_packs(attn_implementation: str) -> bool:
    """Whether an attention implementation takes packs flattened into one row (``PackCollator(flatten=True)``):
    the varlen kernels do; sdpa, eager and flex_attention take one row per pack."""
    return attn_implementation.startswith("flash_attention") or attn_implementation in (VARLEN_ATTENTION,
                                                                                          FA4_ATTENTION)


def varlen_available() -> bool:
    """PyTorch ships ``torch.nn.attention.varlen.varlen_attn`` (2.10+) and this machine has CUDA."""
    return _torch_varlen_attn is not None and torch.cuda.is_available()


def flash_attn2_available() -> bool:
    """The flash-attn 2 package (its CUDA extension ``flash_attn_2_cuda``) is installed. ``flash_attn`` alone does
    not tell: flash-attn-4 installs ``flash_attn.cute`` into the same (namespace) package."""
    return importlib.util.find_spec("flash_attn_2_cuda") is not None


@functools.cache
def fa4_available() -> bool:
    """GPU 0 is a Hopper (sm90) or Blackwell (sm100) GPU, the architectures FlashAttention-4's kernels are written
    for, and the ``flash-attn-4`` package imports (``pip install -e .[fa4]``; env/setup.sh installs it on such a
    GPU). An installed package that fails to import says why in a warning."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability(0)[0] not in (9, 10):
        return False
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        importlib.import_module("flash_attn.cute.interface")  # the CuTe DSL and its CUDA libraries load here
    except Exception as e:  # noqa: BLE001 - any failure means: use another kernel
        warnings.warn(f"flash-attn-4 is installed but does not import ({type(e).__name__}: {e}); "
                      "attn_implementation auto falls back to PyTorch's kernels")
        return False
    return True


def register_varlen_attention() -> None:
    """Register the flattened-pack attention functions with transformers: :func:`varlen_attention_forward` as
    ``attn_implementation="torch_varlen"`` and :func:`fa4_attention_forward` as ``"fa4_varlen"``. No mask
    function is registered for them, so transformers builds no attention mask. Idempotent.

    Usage: ``register_varlen_attention(); AutoModelForCausalLM.from_pretrained(p, attn_implementation="torch_varlen")``
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionInterface.register(FA4_ATTENTION, fa4_attention_forward)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed sequence of one flattened row (transformers' attention-function
    signature: ``query`` ``(1, heads, total, head_dim)``, keys/values with fewer heads under GQA; returns
    ``(1, total, heads, head_dim)``). Sequence boundaries: ``cu_seq_lens_q``/``max_length_q`` from
    :class:`PackCollator` ``(flatten=True)``. On CUDA PyTorch's FlashAttention varlen kernel (in bf16/fp16:
    the autocast dtype, bf16 for fp32 inputs); elsewhere a per-sequence sdpa loop with the same result."""
    return _flat_attention(VARLEN_ATTENTION, query, key, value, dropout, scaling, kwargs)


def fa4_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """:func:`varlen_attention_forward` with FlashAttention-4's varlen kernels on CUDA (``flash-attn-4``; GQA
    without copying key/value heads); elsewhere the same per-sequence sdpa loop."""
    return _flat_attention(FA4_ATTENTION, query, key, value, dropout, scaling, kwargs)


def _flat_attention(name: str, query, key, value, dropout, scaling, kwargs) -> tuple[torch.Tensor, None]:
    cu_q, max_q = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_q is None or max_q is None:
        raise ValueError(f"attn_implementation={name!r} needs cu_seq_lens_q and max_length_q in the "
                         "model's inputs: batches from PackCollator(flatten=True)")
    cu_k, max_k = kwargs.get("cu_seq_lens_k", cu_q), kwargs.get("max_length_k", max_q)
    if query.shape[0] != 1:
        raise ValueError(f"{name}: packs must be flattened into one row, got batch {query.shape[0]}")
    if dropout:
        raise ValueError(f"{name}: attention dropout is not supported (got {dropout})")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, heads, head_dim)
    groups = q.shape[1] // k.shape[1]
    if not q.is_cuda:
        out = _varlen_reference(q, k, v, cu_q, scaling, groups)
    else:
        cu_q, cu_k = cu_q.to(q.device, torch.int32), cu_k.to(q.device, torch.int32)
        dtype = q.dtype
        q, k, v = (t.to(_kernel_dtype(dtype)) for t in (q, k, v))  # RoPE leaves q, k in fp32 under autocast
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        if name == FA4_ATTENTION:
            out = torch.ops.lwlib.fa4_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale)[0]
        else:
            out = _varlen_cuda(q, k, v, cu_q, cu_k, max_q, max_k, scale, groups)
        out = out.to(dtype)
    return out.unsqueeze(0), None


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The half-precision dtype the flash kernels run in: autocast's, else bf16 for fp32 inputs."""
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return torch.bfloat16 if dtype == torch.float32 else dtype


try:  # resolved once here, not inside the attention function, which torch.compile traces
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
    _VARLEN_PARAMS = frozenset(inspect.signature(_torch_varlen_attn).parameters)
except ImportError:
    _torch_varlen_attn, _VARLEN_PARAMS = None, frozenset()


def _varlen_cuda(q, k, v, cu_q, cu_k, max_q, max_k, scaling, groups):
    extra: dict[str, Any] = {"scale": scaling}
    if "window_size" in _VARLEN_PARAMS:
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True  # torch 2.10
    if groups > 1:
        if "enable_gqa" in _VARLEN_PARAMS:
            extra["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return _torch_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **extra)


# FlashAttention-4 (flash-attn-4, CuTe DSL) as two custom operators with autograd: torch.compile keeps them as
# opaque calls (the fake functions give it the output shapes) instead of tracing into the CuTe DSL launcher.
# Causal attention only; lse is (heads, total) in fp32 as the kernels write it.

@torch.library.custom_op("lwlib::fa4_varlen_fwd", mutates_args=(), device_types="cuda")
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
             max_q: int, max_k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                               max_seqlen_k=max_k, softmax_scale=scale, causal=True, return_lse=True)[:2]
    return out, lse


@_fa4_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lwlib::fa4_varlen_bwd", mutates_args=(), device_types="cuda")
def _fa4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=True, cu_seqlens_q=cu_q,
                                 cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)[:3]
    return dq, dk, dv


@_fa4_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa4_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale


def _fa4_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.lwlib.fa4_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.max_q,
                                                ctx.max_k, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_fa4_fwd.register_autograd(_fa4_backward, setup_context=_fa4_setup_context)


def _varlen_reference(q, k, v, cu, scaling, groups):
    """Per-sequence causal sdpa over the same boundaries: the CPU path and the GPU kernel's reference."""
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seq_lens_q {bounds[:3]}...{bounds[-1]} does not cover the row of {q.shape[0]} tokens")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return torch.cat([sdpa(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True,
                           scale=scaling).transpose(0, 1) for s, e in zip(bounds[:-1], bounds[1:]) if e > s])
