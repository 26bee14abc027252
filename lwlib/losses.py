"""The SFT losses: the loss averaged over all target tokens of the batch, as the paper (Section 4.1), and the
per-sequence mean (the ablation, ``sft.loss: sequence``); the same loss by three kernels; and the trainer that
normalises it over a whole optimizer step.

Why the token mean: with packing, the mean of each sequence's mean token loss would let a 20-token answer weigh
as much as a 10,000-word one and so under-train exactly the long outputs the LongWriter data is for (the paper's
"loss weighting"). The loss is the mean over *all target tokens* in the global batch: every gradient-accumulation
micro-batch, every data-parallel rank.

How: :class:`LongWriterTrainer` (:func:`trainer_class`, a small ``transformers.Trainer`` subclass) counts the
target tokens (or sequences, for the ablation) of all micro-batches of one optimizer step in
``get_batch_samples`` (the collator's host-side counts, summed over data-parallel ranks), and ``compute_loss``
divides each micro-batch's summed token loss by that count (times the number of ranks, because DDP/DeepSpeed
average gradients). The gradients of one optimizer step are then exactly those of
``sum(token losses) / total targets`` (``tests/test_sft.py`` checks it against the direct token mean).

The loss of one micro-batch (:func:`forward_loss`, also what ``benchmarks/sft_throughput.py`` times):

- :func:`sft_loss`: cross-entropy of the full logits (pre-shifted labels, :data:`lwlib.packing.IGNORE` = no
  target), :func:`compiled_sft_loss` under ``sft.torch_compile``;
- :func:`chunked_sft_loss` (``sft.loss_chunk_size``): the output head and cross-entropy a chunk of positions at a
  time, each chunk's logits recomputed in the backward pass;
- :func:`liger_sft_loss` (``sft.liger_kernel``): Liger-Kernel's fused linear cross-entropy, no logits in memory
  (the model's other Liger kernels: :func:`lwlib.training.use_liger`).

The last two read the output head's weight (with tied embeddings, as SmolLM2 and Gemma 3, the embedding matrix)
and apply the model's final logit softcapping (``final_logit_softcapping``, Gemma 2) as its forward does. Which
one a run uses, so that a 32k pack over a 262k vocabulary never holds its logits: :func:`lwlib.training.pick_loss`.

Usage::

    loss, outputs = forward_loss(model, inputs, labels, n_targets_of_the_step)
    trainer = trainer_class()(model=model, args=args, train_dataset=ds, data_collator=collator, loss_mode="token")
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.nn.functional as F

from .packing import IGNORE, split_batch


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, denominator: torch.Tensor | float,
             loss_weights: torch.Tensor | None = None, mode: str = "token") -> torch.Tensor:
    """Summed cross-entropy of one micro-batch divided by the global ``denominator``.

    ``labels`` are pre-shifted targets (``IGNORE`` = none). ``token``: sum of token losses /
    denominator (= target tokens of the global batch). ``sequence``: sum of token losses weighted by
    ``loss_weights`` (1 / targets of the token's sequence) / denominator (= sequences in the batch)."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         ignore_index=IGNORE, reduction="none")
    if mode == "sequence":
        if loss_weights is None:
            raise ValueError("sequence mode needs loss_weights")
        ce = ce * loss_weights.reshape(-1).to(ce.dtype)
    elif mode != "token":
        raise ValueError(f"unknown loss mode {mode!r}")
    return ce.sum() / denominator


def chunked_sft_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                     denominator: torch.Tensor | float, loss_weights: torch.Tensor | None = None,
                     mode: str = "token", chunk_size: int = 4096, softcap: float | None = None) -> torch.Tensor:
    """:func:`sft_loss` of ``head(hidden)`` without the logits of the whole pack in memory.

    The output head and the cross-entropy run over ``chunk_size`` positions at a time under activation
    checkpointing: the forward keeps no logits, the backward recomputes one chunk's logits at a time.
    Peak memory holds one chunk's fp32 logits and their gradient instead of the pack's; the cost is one
    more head matmul per position. ``hidden``: the final (normed) hidden states, ``(..., d)``; ``softcap``: the
    model's final logit softcapping (``softcap * tanh(logits / softcap)``), None for none. Every chunk is computed,
    those without targets too (they add 0): no wait for the GPU to look at the labels.

    Usage: ``chunked_sft_loss(out.hidden_states[-1], model.get_output_embeddings(), labels, n_targets)``
    """
    from torch.utils.checkpoint import checkpoint

    if mode == "sequence" and loss_weights is None:
        raise ValueError("sequence mode needs loss_weights")
    if mode not in ("token", "sequence"):
        raise ValueError(f"unknown loss mode {mode!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    w = loss_weights.reshape(-1) if mode == "sequence" else None
    total = h.sum() * 0.0  # keeps the graph (and every rank's backward) for an empty row
    for s in range(0, h.shape[0], chunk_size):
        ws = None if w is None else w[s:s + chunk_size]
        total = total + checkpoint(_chunk_ce, h[s:s + chunk_size], y[s:s + chunk_size], ws, head, softcap,
                                   use_reentrant=False)
    return total.float() / denominator


def autocast_operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(hidden, weight, accum_dtype)`` for a fused kernel that autocast does not reach: under autocast on their
    device both are cast to its dtype (as autocast casts an ``nn.Linear``'s operands; the cast is differentiable,
    so the fp32 master weight gets its gradient) and the kernel should accumulate the weight's gradient in fp32
    (``accum_dtype``); otherwise they are returned as they are (``accum_dtype`` None).

    Liger's fused linear cross-entropy multiplies with ``torch.mm(..., out=...)``, which autocast leaves alone.
    (``train_sft``'s output head ran as fp32 FFMA GEMMs, 1.4 of a 1.9 s step on an H200, Gemma-3-270M, 2 x 32k-token
    packs, ``train_profile.json`` 2026-12-06: its loss ran outside autocast, which the Trainer applies to the
    model's forward only; the trainer now runs the loss under it too.)

    Usage: ``h, w, accum = autocast_operands(h, head.weight)``"""
    kind = hidden.device.type
    if not torch.is_autocast_enabled(kind):
        return hidden, weight, None
    dtype = torch.get_autocast_dtype(kind)
    return hidden.to(dtype), weight.to(dtype), torch.float32


def liger_sft_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                   denominator: torch.Tensor | float, loss_weights: torch.Tensor | None = None,
                   mode: str = "token", softcap: float | None = None) -> torch.Tensor:
    """:func:`sft_loss` of ``hidden @ head_weight.T`` by Liger-Kernel's fused linear cross-entropy (CUDA):
    the logits are formed and consumed block by block inside the kernel, never stored. ``softcap``: the model's
    final logit softcapping (None for none), applied inside the kernel. Under autocast the products run in its
    dtype, the weight's gradient accumulated in fp32 (:func:`autocast_operands`).

    Usage: ``liger_sft_loss(out.hidden_states[-1], model.get_output_embeddings().weight, labels, n_targets)``
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if mode not in ("token", "sequence"):
        raise ValueError(f"unknown loss mode {mode!r}")
    if mode == "sequence" and loss_weights is None:
        raise ValueError("sequence mode needs loss_weights")
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    h, head_weight, accum = autocast_operands(h, head_weight)  # (bf16 tensor-core GEMMs under autocast)
    if mode == "token":
        fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", softcap=softcap,
                                                 accum_dtype=accum)
        return fused(head_weight, h, y) / denominator
    ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none", softcap=softcap,
                                          accum_dtype=accum)(head_weight, h, y)
    return (ce.float() * loss_weights.reshape(-1).to(torch.float32)).sum() / denominator


def _chunk_ce(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, head: torch.nn.Module,
              softcap: float | None = None) -> torch.Tensor:
    logits = head(h).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="none")
    return (ce if w is None else ce * w.to(ce.dtype)).sum()


@functools.cache
def compiled_sft_loss():
    """:func:`sft_loss` under ``torch.compile`` (dynamic shapes, compiled once per process): the fp32 upcast,
    log-softmax and target gather become fused reductions over the half-precision logits, with no fp32 copy
    of the logits and no separate softmax kernels (on an H100 these took ~10% of a compiled SFT step)."""
    return torch.compile(sft_loss, dynamic=True)


def forward_loss(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor, denominator: torch.Tensor | float,
                 loss_weights: torch.Tensor | None = None, mode: str = "token", chunk_size: int = 0,
                 liger: bool = False, compiled: bool = False) -> tuple[torch.Tensor, Any]:
    """The training step's forward and loss, ``(loss, model outputs)``: with ``liger`` the fused linear
    cross-entropy (:func:`liger_sft_loss`), with ``chunk_size`` the chunked head (:func:`chunked_sft_loss`),
    both from the final hidden states (the model computes logits for the last position only: ``logits_to_keep=1``)
    and the model's final logit softcapping; otherwise
    :func:`sft_loss` of the full logits, compiled (:func:`compiled_sft_loss`) when ``compiled`` (the model is
    compiled too: ``sft.torch_compile``). The SFT trainer and ``benchmarks/sft_throughput.py`` call it.

    Usage: ``loss, _ = forward_loss(model, {"input_ids": ids, "position_ids": pos}, labels, n_targets)``
    """
    if liger or chunk_size:
        outputs = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        base = _unwrap(model)
        hidden, head = outputs.hidden_states[-1], base.get_output_embeddings()
        softcap = getattr(base.config, "final_logit_softcapping", None)
        if liger:
            return liger_sft_loss(hidden, head.weight, labels, denominator, loss_weights, mode, softcap), outputs
        return chunked_sft_loss(hidden, head, labels, denominator, loss_weights, mode, chunk_size, softcap), outputs
    outputs = model(**inputs, use_cache=False)
    loss_fn = compiled_sft_loss() if compiled else sft_loss
    return loss_fn(outputs.logits, labels, denominator, loss_weights, mode), outputs


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / DeepSpeed engine
        model = model.module
    return model


def trainer_class():
    """The ``transformers.Trainer`` subclass ``LongWriterTrainer`` (made on first use: importing this module does not
    import transformers' Trainer). Keywords beyond the Trainer's: ``loss_mode`` (``token`` / ``sequence``),
    ``loss_chunk_size`` and ``liger`` (see :func:`forward_loss`), and ``loss_autocast`` (the loss under the
    training's autocast, the default; false: its output layer in fp32, as runs before 2026-12-07 trained)."""
    from transformers import Trainer

    class LongWriterTrainer(Trainer):
        """``Trainer`` whose loss is normalised over the whole optimizer step (all accumulation
        micro-batches and data-parallel ranks): see :mod:`lwlib.losses`."""

        loss_is_scaled_for_ga = True

        def __init__(self, *args, loss_mode: str = "token", loss_chunk_size: int = 0, liger: bool = False,
                     loss_autocast: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_mode = loss_mode
            self.loss_chunk_size = loss_chunk_size
            self.liger = liger
            self.compile_loss = bool(self.args.torch_compile)
            self.loss_autocast = loss_autocast

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            # a warmup ratio becomes whole steps rounded down (lwlib.training.warmup_steps), not up: with one warmup
            # step a 2-step run's first step had learning rate 0
            if 0 < self.args.warmup_steps < 1:
                from .training import warmup_steps

                self.args.warmup_steps = warmup_steps(self.args.warmup_steps, num_training_steps)
            return super().create_scheduler(num_training_steps, optimizer)

        def _denominator(self, batches: list[dict], device) -> torch.Tensor:
            # the collator's host-side counts: no wait for the GPU before the step's first forward pass
            if self.loss_mode == "token":
                n = sum(b["num_targets"] if "num_targets" in b else int((b["labels"] != IGNORE).sum())
                        for b in batches)
            else:
                n = sum(int(b["num_sequences"]) for b in batches)
            n = torch.tensor(float(n), device=device)
            if self.args.world_size > 1:
                n = self.accelerator.gather(n.reshape(1)).sum()
            return n

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches = []
            for _ in range(num_batches):
                try:
                    batches.append(next(epoch_iterator))
                except StopIteration:
                    break
            return batches, (self._denominator(batches, device) if batches else None)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs, loss_inputs = split_batch(inputs)
            labels, weights = loss_inputs["labels"], loss_inputs.get("loss_weights")
            if num_items_in_batch is None:  # evaluation: this batch alone
                num_items_in_batch = self._denominator([{"labels": labels, "num_sequences": 0}], labels.device) \
                    if self.loss_mode == "token" else torch.tensor(1.0)
            # the Trainer autocasts only the model's forward (accelerate wraps it): the loss's own products (the
            # output head of the fused or chunked loss) run under the training's autocast too, else they ran in
            # fp32 (1.4 of a 1.9 s step on an H200, train_profile.json 2026-12-06). Under DeepSpeed: no autocast
            with self.accelerator.autocast() if self.loss_autocast else contextlib.nullcontext():
                loss, outputs = forward_loss(model, inputs, labels, num_items_in_batch, weights, self.loss_mode,
                                             self.loss_chunk_size, self.liger, self.compile_loss)
            if self.args.world_size > 1:  # DDP / DeepSpeed average gradients over ranks
                loss = loss * self.args.world_size
            return (loss, outputs) if return_outputs else loss

    return LongWriterTrainer
