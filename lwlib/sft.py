"""Supervised fine-tuning as in the paper (Section 4.1): long-output data mixed with general SFT data,
packed training, and the loss averaged over all target tokens of the whole batch.

Recipe (paper, Section 4.1 and the official code): mix LongWriter-6k with general chat data; loss on
assistant tokens only (content and end-of-turn token); pack conversations to 32,768 tokens with
attention kept inside each conversation; the loss is the mean over *all target tokens* in the global
batch (every gradient-accumulation step, every data-parallel rank) rather than the mean of per-sequence
means, which would let a 20-token answer weigh as much as a 10,000-word one and so under-train exactly
the long outputs this data is for (the paper's "loss weighting"); lr 1e-5, batch 8 packs, 4 epochs,
cosine schedule, warmup ratio 0.03, weight decay 0.1, Adam betas (0.9, 0.95), bf16, ZeRO-3 + CPU offload
on 8 GPUs.

This module is the stage: the data (mix, length cap, arms, general data) and :func:`train_sft`. Its parts live
beside it: packing and assistant-only targets in :mod:`lwlib.packing`, the attention on packs and the ``auto``
choice in :mod:`lwlib.attention`, the token-mean loss and the trainer that normalises it over an optimizer step
in :mod:`lwlib.losses`, and what SFT shares with DPO (batch plan, DeepSpeed and checkpointing arguments, Liger
choice, saving the result) in :mod:`lwlib.training`.

Why not TRL's ``SFTTrainer`` (TRL 1.16 here). It could express most of the recipe: packing (``packing=True``,
``packing_strategy="bfd"``: best-fit decreasing, an overlong example truncated, as here), padding-free batches
(one flattened row with ``cu_seq_lens_q``/``max_length_q``, as ``PackCollator(flatten=True)``; the varlen
kernels of :mod:`lwlib.attention` would read its rows too), the assistant-only loss (``assistant_only_loss``:
the template's ``{% generation %}`` markers, as here) and the loss averaged over all target tokens of the batch
(transformers counts ``num_items_in_batch`` over the accumulation micro-batches and, with
``average_tokens_across_devices``, over the ranks). It is not used because:

- the ablation ``sft.loss: sequence`` (mean of per-sequence means) needs a per-token weight from the collator;
  SFTTrainer's losses are ``nll`` and ``dft``, and with padding-free batches it refuses a custom data collator;
- SFTTrainer replaces the model's forward with its own fused LM head and rejects Liger's fused linear
  cross-entropy, whereas here the loss kernel is a setting (``sft.loss_chunk_size``, ``sft.liger_kernel``, the
  compiled loss: :func:`lwlib.losses.forward_loss`), tested against the plain loss, and the very step that
  ``benchmarks/sft_throughput.py`` measures;
- SFTTrainer logs entropy and token accuracy with an ``.item()`` after every micro-batch, a wait for the GPU;
  this trainer takes the step's denominator from the collator's host-side counts and adds no wait of its own.

Length cap (the paper's controlled experiment, Section 2): ``max_output_words`` limits the output length
of training examples; ``cap_mode: drop`` removes examples whose assistant output is longer (the data
set then only *contains* outputs up to the cap, which is what the experiment varies), ``truncate``
cuts them with :func:`lwlib.text.truncate_words` (keeps the data size fixed, but teaches outputs that
stop mid-text). Default ``drop``.

General data: a JSONL file (LongWriter-6k format), ``hf:<dataset id>`` (a ``messages`` column), or
``self-distill``: the base model answering built-in short instructions, cached in
``<run>/sft/general_self_distill.jsonl`` and labelled ``source: self-distillation`` (no general chat
corpus can be downloaded in the smoke/gpu settings).

Usage::

    folder = train_sft(prof)                                     # runs/<profile>/sft/model
    folder = train_sft(prof, dataclasses.replace(cfg, max_output_words=500),
                       out_dir=prof.stage_dir("sft") / "cap500" / "model")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backends import BackendConfig
from .attention import check_packed_attention, flat_packs, pick_attn, register_varlen_attention
from .config import Profile
from .typed import check_sizes
from .losses import trainer_class
from .packing import PackCollator, PackedDataset, TokenizedExample, pack_examples, pack_stats, tokenize_chat, training_template
from .plots import pyplot, save_figure
from .progress import console_callback
from .runs import (REPO_ROOT, JsonlStore, atomic_write_json, iter_jsonl, model_fingerprint, read_log_history,
                   training_finished, write_manifest)
from .models import seed_tag, sft_folder
from .training import (accelerate_setup, batch_plan, checkpointing_args, compare_losses, deepspeed_config,
                       finish_from_checkpoint, holds_last_step, pick_liger, pick_loss, prepare_run, save_trained,
                       step_timer, use_liger)
from .text import count_words, truncate_words

Messages = list[dict[str, str]]


@dataclass
class SFTConfig:
    """Section ``sft`` of a profile.

    Fields:
        data_path: long-output data: ``agentwrite`` (notebook 02's AgentWrite output,
            ``<run>/agentwrite/longwriter.jsonl``; also null), ``corpus`` (notebook 02's human-written public-domain
            passages, ``<run>/corpus/longwriter.jsonl``: the stand-in for LongWriter-6k where no writer API or hub
            is reachable, :mod:`lwlib.corpus`), ``none`` (general data alone), a LongWriter-6k format JSONL path,
            or ``hf:THUDM/LongWriter-6k`` (the paper's data, GPT-4o AgentWrite outputs; needs network).
        arms: further SFT runs beside the main one, the paper's Section 4 comparison (does long-output data lift
            the limit?): ``{name: long-output data}`` with values as ``data_path`` (``none`` = general data alone,
            ``agentwrite`` = the 135M writer's own AgentWrite data), same general data and steps as the main run;
            checkpoints ``<run>/sft/<name>/model``, model tags ``sft_<name>``.
        general_data: general SFT data: a JSONL path (relative: from the current directory, else from the
            repository: :func:`data_file`), ``hf:<dataset id>[:<config>][@<split>]`` (column
            ``messages``; e.g. ``hf:HuggingFaceH4/ultrachat_200k@train_sft``),
            ``self-distill`` (the base model answers built-in short instructions) or ``none``.
        general_per_long: general examples per long-output example (paper: ~180k general + 6k
            LongWriter-6k, i.e. about 30).
        general_max: upper bound on the number of general examples (null = no bound).
        self_distill_max_new_tokens: answer length limit when self-distilling general data.
        self_distill_batch_size: generation batch size when self-distilling (the default backend's).
        self_distill_backend: the backend that self-distills (``{kind: local, engine: slots}``: continuous
            batching); null = local ``generate`` at ``self_distill_batch_size``. Greedy outputs are the same
            in fp32; in bf16 another engine may flip a token, so the engine is part of the stored answers'
            fingerprint.
        max_output_words: cap on the assistant output length (words, :func:`lwlib.text.count_words`) of
            training examples; null = no cap (the controlled experiment sets it).
        cap_mode: ``drop`` (remove longer examples; default, the data set then contains outputs up to
            the cap), ``truncate`` (cut them to the cap with :func:`lwlib.text.truncate_words`) or ``cut`` (the
            data by construction of the controlled experiment: every long-output passage cut into consecutive,
            paragraph-aligned pieces of at most the cap, each with its own instruction,
            :func:`lwlib.corpus.cut_records`: every cap holds the same text and about the same tokens, only the
            lengths differ; needs ``data_path: corpus``; the capped runs take the whole long-output data, not the
            main mix's sample of ``long_per_general``).
        caps: the caps of the controlled experiment (notebook 03 trains one model per cap).
        cap_general: the capped runs include the main mix's general data (the paper capped its whole SFT mix);
            false: the long-output data alone.
        cap_uncapped: also train the controlled experiment's uncapped point on the same data (tag ``uncapped``:
            the long-output data uncut, general data as ``cap_general``); false: the main run is that point.
        cap_max_steps: optimizer steps of each capped run (-1 = as ``max_steps``/``epochs``).
        runs: which kinds of run notebook 03 trains and probes (``main``, ``arm``, ``cap``, ``uncapped``; default
            all): a profile run in several sittings trains a part at a time.
        seeds: every run of notebook 03 (main, arms, caps) is trained this many times: run ``k`` uses the
            profile's seed + k for its data order and trainer, on the same data; tags of ``k >= 1`` end in
            ``-s<k>`` (:func:`seed_tag`).
        rebuild: tags of runs trained and probed in an earlier sitting whose checkpoints a later notebook of this
            sitting loads (DPO's start models, NLL's models; a session does not keep its checkpoints): notebook 03
            trains them again (same data, seed and steps; their probes are not redone) and compares the new loss
            curve with the recorded one (:func:`rebuild_run`). Default none.
        fp32_loss_head: tags of runs whose loss (the output layer inside the fused or chunked cross-entropy) ran in
            fp32 outside the training's bf16 autocast, as every run before 2026-12-07 did (the ``gpu`` profile's
            ``sft`` seeds and ``cap500``-``cap2000`` seed 0): a rebuild (``rebuild``) of one of them trains it with
            its own numerics again, so that its loss curve can match the recorded one. Default none: the loss
            runs under the autocast (:class:`lwlib.losses.LongWriterTrainer`'s ``loss_autocast``).
        general_passages_cut: the corpus passages (notebook 02) cut at this many words join the general data, as
            the short writing answers of a general SFT mix (null = none).
        long_min_words: only long-output examples of at least this many output words enter the main mix (null =
            all).
        long_per_general: long-output examples per general example in the main mix, drawn from the long-output
            data spread over its lengths (the paper's 6,000 LongWriter-6k to 180,000 general: 1/30; null = every
            long-output example, with ``general_per_long`` general ones).
        chat_template: training template with generation markers: ``auto``, a name in
            ``lwlib/templates`` or a path.
        packing_length: tokens per pack (paper: 32768); longer examples are cut to it.
        batch_size: packs per optimizer step over all devices (paper: 8).
        per_device_batch_size: packs per device per micro-step; gradient accumulation makes up the rest.
        learning_rate: peak learning rate (paper: 1e-5).
        epochs: passes over the data (paper: 4).
        max_steps: optimizer steps; > 0 overrides ``epochs``.
        warmup_ratio: linear warmup fraction of all steps (paper: 0.03).
        weight_decay: AdamW weight decay (paper: 0.1).
        adam_beta1, adam_beta2: Adam betas (paper: 0.9, 0.95).
        max_grad_norm: gradient clipping.
        loss: ``token`` (mean over all target tokens of the global batch, the paper's) or ``sequence``
            (mean of per-sequence means; the ablation).
        loss_chunk_size: positions per output-head + cross-entropy chunk; each chunk's logits are recomputed
            in the backward pass, so at most one chunk's logits exist at a time (0 = the whole pack at once, or
            what ``liger_kernel: auto`` picks for a large vocabulary; a 32k pack x 128k vocabulary is 16.8 GB of
            fp32 logits). Results do not depend on it (up to fp32 summation order). Needs a model whose forward
            takes ``logits_to_keep`` (transformers' causal LMs).
        liger_kernel: Liger-Kernel's Triton kernels (``pip install -e .[gpu]``; env/setup.sh installs it on a
            CUDA machine): fused RMSNorm and SwiGLU patched into the model, and the loss as a fused linear
            cross-entropy (output head and loss in one kernel, no logits in memory; replaces
            ``loss_chunk_size``). Same loss and gradients as the plain path (``tests/test_sft_gpu.py``); faster, in
            less memory (measured: benchmarks/README.md, "Fused kernels and where the step's time goes").
            ``auto``: on with CUDA, the package installed, no ZeRO-3 (the fused loss reads the output
            head's weight, which ZeRO-3 partitions) and no ``torch_compile`` (Liger's kernels fail under
            compilation with dynamic shapes); ``true``: required (error otherwise); ``false``: off. ``auto`` also
            never builds the full logits of a micro-batch whose fp32 logits (4 x vocabulary x packing_length x
            per_device_batch_size bytes) exceed 16 GiB (Gemma 3's 262k vocabulary at 32k packs: 34 GB per pack)
            when ``loss_chunk_size`` is 0: the fused loss alone (the model unpatched, e.g. under ``torch_compile``)
            where it can run, else the chunked loss with 1 GiB chunks (:func:`lwlib.training.pick_loss`).
        gradient_checkpointing: recompute activations in the backward pass.
        torch_compile: compile the model with ``torch.compile`` (the Trainer's ``torch_compile``; dynamic shapes,
            since flattened packs vary in length), and the full-logits loss with it
            (:func:`lwlib.losses.compiled_sft_loss`). The first steps pay for compilation (a minute or two); with flattened packs (``torch_varlen``,
            ``fa4_varlen``) the step is then GPU-bound and faster than any eager one (measured: benchmarks/README.md,
            "Packed steps compiled" and "FlashAttention-4 and a compiled loss").
        attn_implementation: ``auto`` (:func:`lwlib.attention.pick_attn`): on CUDA ``fa4_varlen``
            (FlashAttention-4's kernels on flattened packs, :mod:`lwlib.attention`) where flash-attn-4 is installed
            on a Hopper/Blackwell GPU, else flash_attention_2 when the flash-attn 2 package is installed, else
            ``torch_varlen`` (PyTorch's own FlashAttention-2 varlen kernel) when compiling and flex_attention when
            not (the fastest available in each case: see benchmarks/README.md, "FlashAttention-4 and a compiled
            loss"); sdpa on CPU. Or a name. Sliding-window layers (Gemma 3) train with their window on every
            implementation; a model whose layers need what the flattened-pack kernel cannot apply is refused
            before training (:func:`lwlib.attention.check_packed_attention`).
        deepspeed: DeepSpeed config (``env/ds_zero3_offload.json``); null = none. Relative to the repo.
        bf16: train in bf16 (the Trainer's autocast over fp32 weights; under DeepSpeed its bf16 mode: bf16 weights
            and gradients, fp32 master weights in the optimizer); null: on a GPU, fp32 on the CPU. ``true`` on the
            CPU compares the two modes where no GPU is at hand (``tests/test_zero3.py``).
        save_steps: write a resumable checkpoint every N steps (0 = only the final model).
        logging_steps: log the loss every N steps.
        overwrite: retrain even if the final model exists; and when the stored self-distillation answers
            were made with other settings (model, token budget, seed; lwlib.runs.StaleRunError), move them
            aside and start anew instead of refusing.
    """

    data_path: str | None = None
    arms: dict[str, str] = field(default_factory=dict)
    general_data: str = "self-distill"
    general_per_long: float = 1.0
    general_max: int | None = None
    self_distill_max_new_tokens: int = 256
    self_distill_batch_size: int = 8
    self_distill_backend: BackendConfig | None = None
    max_output_words: int | None = None
    cap_mode: str = "drop"
    caps: list[int] = field(default_factory=list)
    cap_general: bool = True
    cap_uncapped: bool = False
    cap_max_steps: int = -1
    runs: list[str] = field(default_factory=lambda: ["main", "arm", "cap", "uncapped"])
    seeds: int = 1
    rebuild: list[str] = field(default_factory=list)
    fp32_loss_head: list[str] = field(default_factory=list)
    general_passages_cut: int | None = None
    long_min_words: int | None = None
    long_per_general: float | None = None
    chat_template: str = "auto"
    packing_length: int = 32768
    batch_size: int = 8
    per_device_batch_size: int = 1
    learning_rate: float = 1e-5
    epochs: float = 4.0
    max_steps: int = -1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    loss: str = "token"
    loss_chunk_size: int = 0
    liger_kernel: bool | str = "auto"
    gradient_checkpointing: bool = True
    torch_compile: bool = False
    attn_implementation: str = "auto"
    deepspeed: str | None = None
    bf16: bool | None = None
    save_steps: int = 0
    logging_steps: int = 1
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_sizes(self, "sft", 1, "self_distill_max_new_tokens", "self_distill_batch_size", "max_output_words",
                    "caps", "batch_size", "per_device_batch_size", "logging_steps")
        check_sizes(self, "sft", 0, "general_per_long", "general_max", "save_steps")
        check_sizes(self, "sft", -1, "cap_max_steps", "max_steps")  # -1: as epochs says
        if self.loss not in ("token", "sequence"):
            raise ValueError(f"sft.loss must be 'token' or 'sequence', got {self.loss!r}")
        if self.cap_mode not in ("drop", "truncate", "cut"):
            raise ValueError(f"sft.cap_mode must be 'drop', 'truncate' or 'cut', got {self.cap_mode!r}")
        if not self.runs or set(self.runs) - {"main", "arm", "cap", "uncapped"}:
            raise ValueError(f"sft.runs must be a non-empty subset of [main, arm, cap, uncapped], got {self.runs!r}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"sft.seeds must be an integer >= 1, got {self.seeds!r}")
        for name in ("rebuild", "fp32_loss_head"):
            tags = getattr(self, name)
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise ValueError(f"sft.{name} must be a list of run tags, got {tags!r}")
        for name in ("general_passages_cut", "long_min_words"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"sft.{name} must be a positive integer or null, got {v!r}")
        if self.long_per_general is not None and not self.long_per_general > 0:
            raise ValueError(f"sft.long_per_general must be > 0 or null, got {self.long_per_general!r}")
        if any(not isinstance(c, int) or c < 1 for c in self.caps):
            raise ValueError(f"sft.caps must be positive integers, got {self.caps!r}")
        if self.loss_chunk_size < 0:
            raise ValueError(f"sft.loss_chunk_size must be >= 0, got {self.loss_chunk_size}")
        if self.liger_kernel not in (True, False, "auto"):
            raise ValueError(f"sft.liger_kernel must be true, false or auto, got {self.liger_kernel!r}")
        if self.packing_length < 16:
            raise ValueError(f"sft.packing_length too small: {self.packing_length}")
        if self.batch_size % self.per_device_batch_size:
            raise ValueError("sft.batch_size must be a multiple of sft.per_device_batch_size")


# ----------------------------------------------------------------------------------------------- data

def _check_messages(msgs: Any, where: str) -> Messages:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {k} needs role system/user/assistant and string content")
    if msgs[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def load_sft_data(path: str | Path) -> list[Messages]:
    """Read LongWriter-6k format JSONL (``{"messages": [{"role", "content"}, ...]}`` per line). A record marked
    ``"finish_reason": "length"`` (an answer cut at a token limit, as generated answers are stored here) is skipped,
    with a warning counting them, as :func:`self_distill` skips them.

    Bad lines raise ``ValueError`` naming file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SFT data at {path}")
    out, cut = [], 0
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or "messages" not in rec:
            raise ValueError(f"{path}:{lineno}: record has no 'messages'")
        if rec.get("finish_reason") == "length":
            cut += 1
            continue
        out.append(_check_messages(rec["messages"], f"{path}:{lineno}"))
    if cut:
        warnings.warn(f"{path}: {cut} record(s) with finish_reason 'length' (cut at a token limit) skipped")
    return out


def output_words(msgs: Messages) -> int:
    """Words of the assistant output(s) of a conversation."""
    return sum(count_words(m["content"]) for m in msgs if m["role"] == "assistant")


def apply_length_cap(data: list[Messages], max_words: int | None, mode: str = "drop") -> list[Messages]:
    """Limit assistant outputs to ``max_words``: ``drop`` longer examples or ``truncate`` them."""
    if max_words is None:
        return list(data)
    if mode == "drop":
        return [m for m in data if output_words(m) <= max_words]
    if mode == "truncate":
        out = []
        for msgs in data:
            left, new = max_words, []
            for m in msgs:
                if m["role"] == "assistant":
                    c = truncate_words(m["content"], left)
                    left -= count_words(c)
                    m = {**m, "content": c}
                new.append(m)
            out.append(new)
        return out
    raise ValueError(f"unknown cap mode {mode!r}")


_TASKS = [
    "Explain {t} to a curious ten-year-old in a few sentences.",
    "Give three practical tips about {t}.",
    "What is the most common misconception about {t}?",
    "Write a short, friendly email inviting a colleague to a talk on {t}.",
    "Summarize the history of {t} in one paragraph.",
    "List the pros and cons of {t}.",
    "Write a haiku about {t}.",
    "How would you explain {t} to someone who has never heard of it?",
    "Give a one-sentence definition of {t}, then an example.",
    "Suggest a title and a one-line description for a blog post about {t}.",
    "What questions should a beginner ask about {t}?",
    "Compare {t} with something from everyday life.",
]
_TOPICS = [
    "photosynthesis", "compound interest", "the water cycle", "machine learning", "volcanoes", "sleep hygiene",
    "the Roman Empire", "recycling plastics", "black holes", "public speaking", "bread baking", "vaccines",
    "time management", "the stock market", "bees and pollination", "renewable energy", "chess openings",
    "the human heart", "climate change", "learning a new language", "gardening on a balcony", "electric cars",
    "the printing press", "meditation", "ocean tides", "prime numbers", "coffee brewing", "earthquakes",
    "budgeting for students", "the immune system",
]


def general_instructions(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` varied short instructions (task template x topic), deterministic for ``seed``."""
    combos = [(i, j) for i in range(len(_TASKS)) for j in range(len(_TOPICS))]
    random.Random(seed).shuffle(combos)
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} built-in instructions, asked for {n}")
    return [{"id": f"gen-{i:02d}-{j:02d}", "prompt": _TASKS[i].format(t=_TOPICS[j])} for i, j in combos[:n]]


def self_distill(prof: Profile, n: int, cfg: SFTConfig, backend=None) -> list[Messages]:
    """General SFT data by distillation: a model answers ``n`` built-in short instructions (greedy): the
    profile's own (self-distillation) or ``sft.self_distill_backend.model`` (another model's answers, e.g. the
    bundled SmolLM2-135M-Instruct's for a base model that cannot answer yet). Resumable cache
    ``<run>/sft/general_self_distill.jsonl``; every record says its ``source`` (``self-distillation`` or
    ``distillation``) and the model. Answers cut by the token limit are skipped."""
    from .backends import GenParams, make_backend
    from .generation import Job, generate_into

    bcfg = cfg.self_distill_backend or BackendConfig(batch_size=cfg.self_distill_batch_size)
    writer = bcfg.model or prof.model
    fingerprint = {  # greedy; the instructions are prefix-stable in n
        "model": model_fingerprint(writer, prof.run_dir), "temperature": 0.0,
        "max_new_tokens": cfg.self_distill_max_new_tokens, "seed": prof.seed}
    if bcfg.kind != "local" or bcfg.engine != "generate":  # (absent for the default: earlier runs stay valid)
        fingerprint["backend"] = f"{bcfg.kind}/{bcfg.engine if bcfg.kind == 'local' else bcfg.model}"
    if bcfg.kind == "local":  # where the answers were made (greedy in fp32 on a CPU differs from bf16 on a GPU)
        from .models import pick_device, pick_dtype

        dev = pick_device(bcfg.device or prof.device)
        fingerprint.update(device=dev.type, dtype=str(pick_dtype(bcfg.dtype or prof.dtype, dev)).removeprefix("torch."))
    store = JsonlStore(prof.stage_dir("sft") / "general_self_distill.jsonl", key="id", stage="sft",
                       overwrite=cfg.overwrite, fingerprint=fingerprint)
    items = general_instructions(n, prof.seed)
    params = GenParams(cfg.self_distill_max_new_tokens, temperature=0.0, seed=prof.seed)

    def record(g, it: dict[str, str]) -> dict[str, Any]:
        return {"id": it["id"], "source": "self-distillation" if writer == prof.model else "distillation",
                "model": writer, "finish_reason": g.finish_reason,
                "messages": [{"role": "user", "content": it["prompt"]},
                             {"role": "assistant", "content": g.text.strip()}]}

    generate_into([Job(it["id"], [{"role": "user", "content": it["prompt"]}], params, store,
                       functools.partial(record, it=it)) for it in items], backend,
                  make=lambda: make_backend(bcfg, prof.model, prof.device, prof.dtype),
                  desc="self-distillation (general SFT data)", what="self-distillation")
    want = {it["id"] for it in items}
    return [r["messages"] for r in store.records() if r["id"] in want and r["finish_reason"] == "stop"
            and r["messages"][1]["content"]]


def load_hf_messages(src: str, n: int | None = None, seed: int = 0, field: str = "sft.data_path") -> list[Messages]:
    """Conversations from a Hugging Face data set named ``hf:<id>[:<config>][@<split>]`` (split default
    ``train``; :func:`lwlib.data.parse_hf_spec`; a ``messages`` column), shuffled with ``seed`` and cut to ``n`` when
    ``n`` is given. ``field`` names the profile field in errors.

    Usage: ``load_hf_messages("hf:THUDM/LongWriter-6k")`` (the paper's long-output SFT data)
    """
    from .data import parse_hf_spec

    ds = parse_hf_spec(src, field).load()
    if "messages" not in ds.column_names:
        raise ValueError(f"{field} {src!r}: the data set has no 'messages' column ({ds.column_names})")
    if n is not None:
        ds = ds.shuffle(seed=seed).select(range(min(n, len(ds))))
    return [_check_messages(r["messages"], f"{src}[{k}]") for k, r in enumerate(ds)]


def load_general(prof: Profile, cfg: SFTConfig, n: int) -> list[Messages]:
    """``n`` general examples from ``cfg.general_data`` (see :class:`SFTConfig`)."""
    src = cfg.general_data
    if n <= 0 or src == "none":
        return []
    if src == "self-distill":
        return self_distill(prof, n, cfg)
    if src.startswith("hf:"):
        return load_hf_messages(src, n, prof.seed, field="sft.general_data")
    data = load_sft_data(data_file(src))
    random.Random(prof.seed).shuffle(data)
    return data[:n]


def data_file(path: str | Path) -> Path:
    """A profile's JSONL path: as given when it exists (absolute, or from the current directory), else taken from
    the repository, as ``sft.deepspeed`` is (papermill runs the notebooks in ``notebooks/``).

    Usage: ``data_file("results/gpu/sft/general_self_distill.jsonl")  # found from notebooks/ too``"""
    p = Path(path)
    return p if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists() else REPO_ROOT / p


def long_data_path(prof: Profile, spec: str | None) -> str | None:
    """Where ``sft.data_path`` (or an arm's data) points: a file path, an ``hf:`` id, or None for ``none``."""
    if spec is None or spec == "agentwrite":
        return str(prof.run_dir / "agentwrite" / "longwriter.jsonl")
    if spec == "corpus":
        return str(prof.run_dir / "corpus" / "longwriter.jsonl")
    if spec == "none":
        return None
    return spec


def load_long_data(prof: Profile, spec: str | None) -> list[Messages]:
    """The long-output SFT conversations ``spec`` names (see ``SFTConfig.data_path``)."""
    path = long_data_path(prof, spec)
    if path is None:
        return []
    if path.startswith("hf:"):
        return load_hf_messages(path)
    if not Path(path).exists():
        which = {"corpus": "the corpus section", None: "AgentWrite", "agentwrite": "AgentWrite"}.get(spec)
        hint = f"run notebooks/02_agentwrite.ipynb ({which}) for profile {prof.name!r} first" if which else "check the path"
        raise FileNotFoundError(f"no long-output SFT data at {path}: {hint} (or set sft.data_path)")
    return load_sft_data(path)


def load_long_records(prof: Profile, spec: str | None) -> list[dict[str, Any]]:
    """The long-output SFT examples ``spec`` names as records (``{"messages": [...]}`` plus, for the corpus, its
    metadata: book, language, words; :func:`lwlib.corpus.build_corpus`)."""
    path = long_data_path(prof, spec)
    if path is not None and not path.startswith("hf:") and Path(path).exists():
        from .runs import read_jsonl

        recs = read_jsonl(path)
        data = load_sft_data(path)  # (validates every line)
        return [{**r, "messages": m} for r, m in zip(recs, data)]
    return [{"messages": m} for m in load_long_data(prof, spec)]


def build_mix(prof: Profile, cfg: SFTConfig) -> tuple[list[Messages], dict[str, Any]]:
    """The SFT mix: long-output data (``cfg.data_path``; with ``long_min_words`` / ``long_per_general`` a sample of
    it) first, then general data (answers, plus the corpus cut at ``general_passages_cut`` words), the length cap
    applied (``cap_mode``). The same data for every seed. Returns (conversations, statistics)."""
    from .corpus import cut_records, spread_sample

    long = load_long_records(prof, cfg.data_path)
    cut = cfg.cap_mode == "cut" and cfg.max_output_words is not None
    if cfg.long_min_words and not cut:
        long = [r for r in long if output_words(r["messages"]) >= cfg.long_min_words]
    if not long and cfg.general_max is None:
        raise ValueError("sft: without long-output data (data_path: none) the general data alone is trained on: "
                         "set sft.general_max to say how many general examples")
    if cfg.long_per_general is None:
        n_gen = math.ceil(cfg.general_per_long * len(long)) if long else cfg.general_max
        if cfg.general_max is not None:
            n_gen = min(n_gen, cfg.general_max)
    else:
        n_gen = cfg.general_max if cfg.general_max is not None else 0
    general = load_general(prof, cfg, n_gen)
    n_answers = len(general)
    if cfg.general_passages_cut:
        corpus = load_long_records(prof, "corpus")
        general += [r["messages"] for r in cut_records(corpus, cfg.general_passages_cut, prof.seed)]
    if cfg.long_per_general is not None and not cut and long:
        n_long = max(1, round(len(general) * cfg.long_per_general))
        long = spread_sample(long, min(n_long, len(long)), random.Random(f"long:{prof.seed}"),
                             key=lambda r: output_words(r["messages"]))
    if cut:
        long = cut_records(long, cfg.max_output_words, prof.seed)
        capped_long = [r["messages"] for r in long]
        capped_gen = apply_length_cap(general, cfg.max_output_words, "drop")
    else:
        capped_long = apply_length_cap([r["messages"] for r in long], cfg.max_output_words, cfg.cap_mode)
        capped_gen = apply_length_cap(general, cfg.max_output_words, cfg.cap_mode)
    data = capped_long + capped_gen
    if not data:
        raise ValueError(f"no SFT examples left (cap {cfg.max_output_words} words, mode {cfg.cap_mode})")
    words = [output_words(m) for m in data]
    long_words = sum(words[: len(capped_long)])
    stats = {"long_data": cfg.data_path or "agentwrite", "long_path": long_data_path(prof, cfg.data_path),
             "long_examples": len(long), "long_after_cap": len(capped_long),
             "general_source": cfg.general_data, "general_examples": len(general), "general_answers": n_answers,
             "general_passages": len(general) - n_answers, "general_after_cap": len(capped_gen),
             "max_output_words": cfg.max_output_words, "cap_mode": cfg.cap_mode,
             "data_max_output_words": max(words), "data_mean_output_words": sum(words) / len(words),
             "output_words": sum(words), "long_output_words": long_words,
             "long_word_share": long_words / max(1, sum(words))}
    return data, stats


# ------------------------------------------------------------------------------------------- training

def tokenize_all(tok, data: list[Messages], template: str, max_tokens: int) -> list[TokenizedExample]:
    from .progress import tqdm

    return [tokenize_chat(tok, m, template, max_tokens) for m in tqdm(data, desc="tokenize", leave=False)]


def train_sft(prof: Profile, cfg: SFTConfig | None = None, data: list[Messages] | None = None,
              out_dir: str | Path | None = None, seed: int = 0, loss_autocast: bool = True) -> Path:
    """Fine-tune the profile's model; returns the checkpoint folder (HF model + tokenizer).

    ``data`` replaces the mix of :func:`build_mix` (the length cap still applies). ``out_dir`` defaults
    to ``<run>/sft/model``; the folder beside it holds ``train_log.json``, ``data_stats.json``,
    ``manifest.json``. ``seed``: the run's index ``k`` (data order and trainer seeded with the profile's seed +
    k; the data are the same). ``loss_autocast``: the loss's output layer under the training's autocast (false: in
    fp32, ``sft.fp32_loss_head``). An existing finished model is reused unless ``cfg.overwrite``.
    """
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from .models import load_tokenizer, resolve_model

    cfg = cfg or prof.section("sft", SFTConfig)
    out_dir = Path(out_dir) if out_dir else prof.stage_dir("sft") / "model"
    run = out_dir.parent
    run.mkdir(parents=True, exist_ok=True)
    if training_finished(out_dir) and not cfg.overwrite:
        return out_dir

    if data is None:
        data, stats = build_mix(prof, cfg)
    else:
        data = apply_length_cap([_check_messages(m, f"data[{k}]") for k, m in enumerate(data)],
                                cfg.max_output_words, cfg.cap_mode)
        words = [output_words(m) for m in data]
        stats = {"given_examples": len(data), "max_output_words": cfg.max_output_words, "cap_mode": cfg.cap_mode,
                 "data_max_output_words": max(words), "data_mean_output_words": sum(words) / len(words)}
    tok = load_tokenizer(prof.model)
    tok.padding_side = "right"
    template = training_template(tok, cfg.chat_template)
    examples = tokenize_all(tok, data, template, cfg.packing_length)
    packs = pack_examples(examples, cfg.packing_length, seed=prof.seed + seed)
    pstats = pack_stats(examples, packs, cfg.packing_length)
    stats.update({k: v for k, v in dataclasses.asdict(pstats).items() if k != "pack_lengths"})
    n_long = stats.get("long_after_cap", 0)  # (build_mix puts the long-output examples first)
    tokens = sum(len(e) for e in examples)
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * len(packs) / cfg.batch_size)
    stats.update({"seed_index": seed, "tokens": tokens, "long_token_share": sum(len(e) for e in examples[:n_long])
                  / max(1, tokens), "optimizer_steps": steps, "tokens_per_step": cfg.batch_size * cfg.packing_length,
                  "epochs": round(steps * cfg.batch_size / max(1, len(packs)), 3)})
    atomic_write_json(run / "data_stats.json", stats)

    device = prof.device
    cuda = uses_cuda(prof)
    attn = pick_attn(cfg.attn_implementation, device, cfg.torch_compile)
    world, accumulation = batch_plan(cfg.batch_size, cfg.per_device_batch_size, "sft")
    ds_cfg = deepspeed_config(cfg.deepspeed)
    prepare_run(ds_cfg)  # this run's own DeepSpeed and world, not an earlier run's in this process
    args = TrainingArguments(
        output_dir=str(run / "checkpoints"), per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of all steps (transformers 5)
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, max_grad_norm=cfg.max_grad_norm, bf16=uses_bf16(prof, cfg),
        **checkpointing_args(cfg.gradient_checkpointing),
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, save_total_limit=2, report_to=[], seed=prof.seed + seed,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=not cuda, deepspeed=ds_cfg,
        torch_compile=cfg.torch_compile,
        disable_tqdm=False,
    )
    last = get_last_checkpoint(args.output_dir) if cfg.save_steps and Path(args.output_dir).exists() else None
    if last is not None and holds_last_step(last):  # stopped before the model was written: no step more
        print(f"sft: {Path(last).name} holds the run's last step: the model is written from it, not trained on")
        return finish_from_checkpoint(last, tok, out_dir, chat_template=template)
    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(resolve_model(prof.model), dtype=torch.float32,
                                                 attn_implementation=attn)
    model.config.use_cache = False
    check_packed_attention(model.config, attn)
    liger = pick_liger(cfg.liger_kernel, cuda, ds_cfg, cfg.torch_compile)
    if liger:
        use_liger(model)
    vocab = model.config.get_text_config().vocab_size
    fused_loss, chunk = pick_loss(cfg.liger_kernel, liger, cfg.loss_chunk_size, vocab, cfg.packing_length,
                                  cfg.per_device_batch_size, cuda, ds_cfg)
    collator = PackCollator(pad_id=tok.pad_token_id, flatten=flat_packs(attn))
    trainer = trainer_class()(model=model, args=args, train_dataset=PackedDataset(examples, packs),
                              data_collator=collator, loss_mode=cfg.loss, loss_chunk_size=chunk,
                              liger=fused_loss, loss_autocast=loss_autocast)
    trainer.add_callback(console_callback(f"sft train ({out_dir.parent.name}/{out_dir.name})"))
    timer = step_timer(run)
    trainer.add_callback(timer)
    optim = {k: getattr(args, k) for k in ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
                                           "adam_beta1", "adam_beta2", "max_grad_norm")}
    write_manifest(run, {"profile": prof.resolved(), "sft": dataclasses.asdict(cfg), "seed_index": seed,
                         "attn_implementation": attn,
                         "liger_kernel": liger, "loss_kernel": "liger" if fused_loss else f"chunked {chunk}" if chunk
                         else "logits", "loss_autocast": loss_autocast,
                         "optimizer": {k: getattr(v, "value", v) for k, v in optim.items()},
                         "world_size": world, "gradient_accumulation_steps": accumulation,
                         "out_dir": str(out_dir), "data": stats})
    result = trainer.train(resume_from_checkpoint=last)
    # a base model without a chat template (Llama-3.1-8B) keeps the training one: it generates in that format
    return save_trained(trainer, result, model, tok, out_dir, chat_template=template, step_seconds=timer.seconds,
                        peak_memory=timer.peak_memory, accelerate=accelerate_setup(trainer),
                        loss_autocast=loss_autocast)


def load_train_log(folder: str | Path):
    """The loss curve of a training run (folder holding ``train_log.json``, or the model folder) as a
    DataFrame with columns step, loss, learning_rate, grad_norm."""
    import pandas as pd

    hist = read_log_history(folder, "lwlib.sft.train_sft")
    rows = [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate"),
             "grad_norm": h.get("grad_norm")} for h in hist if "loss" in h]
    return pd.DataFrame(rows)


def cap_dir(prof: Profile, cap: int, seed: int = 0) -> Path:
    """Checkpoint folder of the run capped at ``cap`` words: ``<run>/sft/cap<N>/model`` (seed ``k``:
    ``cap<N>-s<k>``)."""
    return sft_folder(prof.run_dir, seed_tag(f"cap{cap}", seed))


def train_capped(prof: Profile, cap: int, cfg: SFTConfig | None = None, seed: int = 0) -> Path:
    """Train the controlled-experiment model whose SFT data is capped at ``cap`` output words."""
    cfg = cfg or prof.section("sft", SFTConfig)
    return train_run(prof, SFTRun(seed_tag(f"cap{cap}", seed), "cap", seed, _cap_cfg(cfg, cap), f"<= {cap} words"))


def arm_dir(prof: Profile, name: str, seed: int = 0) -> Path:
    """Checkpoint folder of the SFT arm ``name``: ``<run>/sft/<name>/model`` (model tag ``sft_<name>``)."""
    if not name.isidentifier() or name.startswith("cap") or re.fullmatch(r"s\d+", name) \
            or name in ("model", "checkpoints", "uncapped"):
        raise ValueError(f"sft.arms: {name!r} must be an identifier, not starting with 'cap', not "
                         "model/checkpoints/uncapped")
    return sft_folder(prof.run_dir, seed_tag(f"sft_{name}", seed))


def train_arm(prof: Profile, name: str, cfg: SFTConfig | None = None, seed: int = 0) -> Path:
    """Train the SFT arm ``name`` (``cfg.arms[name]`` names its long-output data; all else as the main run)."""
    cfg = cfg or prof.section("sft", SFTConfig)
    if name not in cfg.arms:
        raise ValueError(f"sft.arms has no arm {name!r} (arms: {sorted(cfg.arms)})")
    arm_dir(prof, name)  # (checks the name)
    run_cfg = dataclasses.replace(cfg, data_path=cfg.arms[name])
    return train_run(prof, SFTRun(seed_tag(f"sft_{name}", seed), "arm", seed, run_cfg, cfg.arms[name]))


@dataclass(frozen=True)
class SFTRun:
    """One training run of notebook 03.

    Fields:
        tag: its model tag (``sft``, ``sft_<arm>``, ``cap<N>``, ``uncapped``; ``-s<k>`` for seed ``k >= 1``).
        kind: ``main``, ``arm``, ``cap`` or ``uncapped``.
        seed: the seed index ``k``.
        cfg: the run's settings (the profile's ``sft`` with its data and cap).
        description: what its data is, for tables.
    """

    tag: str
    kind: str
    seed: int
    cfg: SFTConfig
    description: str


def _cap_cfg(cfg: SFTConfig, cap: int | None) -> SFTConfig:
    steps = cfg.cap_max_steps if cfg.cap_max_steps > 0 else cfg.max_steps
    extra: dict[str, Any] = {}
    if not cfg.cap_general:
        extra = {"general_data": "none", "general_passages_cut": None, "general_max": None}
    if cfg.cap_mode == "cut" or not cfg.cap_general:  # the whole long-output data, not the main mix's sample
        extra |= {"long_min_words": None, "long_per_general": None}
    return dataclasses.replace(cfg, max_output_words=cap, max_steps=steps, **extra)


def sft_runs(cfg: SFTConfig, every: bool = False) -> list[SFTRun]:
    """Every run notebook 03 trains, seed by seed (all of seed 0 first, so a run cut short has whole seeds): the
    main run, the arms (``sft.arms``), the capped runs (``sft.caps``) and, with ``cap_uncapped``, the uncapped one;
    only the kinds of ``sft.runs`` unless ``every`` (the runs an earlier sitting may have done, read back for the
    tables whatever this sitting trains).

    Usage: ``for run in sft_runs(cfg): train_run(prof, run)``
    """
    data = cfg.data_path or "agentwrite"
    out = []
    for k in range(cfg.seeds):
        out.append(SFTRun(seed_tag("sft", k), "main", k, cfg, f"general + {data} data"))
        for name, spec in cfg.arms.items():
            out.append(SFTRun(seed_tag(f"sft_{name}", k), "arm", k, dataclasses.replace(cfg, data_path=spec),
                              "general data alone" if spec == "none" else f"general + {spec} data"))
        base = f"{data} data" + ("" if cfg.cap_general else " alone")
        how = "cut into pieces of" if cfg.cap_mode == "cut" else "outputs"
        for cap in cfg.caps:
            out.append(SFTRun(seed_tag(f"cap{cap}", k), "cap", k, _cap_cfg(cfg, cap), f"{base}, {how} <= {cap} words"))
        if cfg.cap_uncapped:
            out.append(SFTRun(seed_tag("uncapped", k), "uncapped", k, _cap_cfg(cfg, None), f"{base}, uncut"))
    return [r for r in out if every or r.kind in cfg.runs]


def train_run(prof: Profile, run: SFTRun) -> Path:
    """Train one :class:`SFTRun` into its folder (:func:`lwlib.models.sft_folder`); a finished one is reused."""
    return train_sft(prof, run.cfg, out_dir=sft_folder(prof.run_dir, run.tag), seed=run.seed,
                     loss_autocast=run.tag not in run.cfg.fp32_loss_head)


def uses_cuda(prof: Profile) -> bool:
    """Whether SFT trains on CUDA: a GPU is there and the profile's device is not the CPU."""
    return torch.cuda.is_available() and prof.device != "cpu"


def uses_bf16(prof: Profile, cfg: SFTConfig) -> bool:
    """Whether SFT trains in bf16: ``cfg.bf16``, by default on CUDA (:func:`uses_cuda`)."""
    return uses_cuda(prof) if cfg.bf16 is None else bool(cfg.bf16)


def rebuild_tags(cfg: SFTConfig) -> set[str]:
    """``sft.rebuild`` (and ``sft.fp32_loss_head``) checked against the profile's runs (:func:`sft_runs`): a tag no
    run has is an error naming it."""
    known = [r.tag for r in sft_runs(cfg, every=True)]
    for name in ("rebuild", "fp32_loss_head"):
        unknown = [t for t in getattr(cfg, name) if t not in known]
        if unknown:
            raise ValueError(f"sft.{name} names {unknown}, which are not runs of this profile (its runs: {known})")
    return set(cfg.rebuild)


def rebuild_run(prof: Profile, run: SFTRun, rel_tol: float = 0.01) -> Path:
    """Train ``run`` again where an earlier sitting trained and probed it but its checkpoint is gone (its
    ``train_log.json`` came back, its weights did not): the same data, seed and steps. The recorded log is kept as
    ``train_log.recorded.json``; ``rebuild.json`` beside it compares the two loss curves step by step
    (:func:`lwlib.training.compare_losses`: the largest relative difference, and whether it is within ``rel_tol``:
    GPU kernels need not be bitwise deterministic, and a later sitting may run on another card). A run of
    ``sft.fp32_loss_head`` trains with its loss's output layer in fp32 again, as it was first trained. The probes
    stay those of the first training. Returns the checkpoint folder; a run whose checkpoint exists is returned as
    it is.

    Usage: ``folder = rebuild_run(prof, run)  # e.g. DPO's start model sft-s1 in a later sitting``
    """
    folder = sft_folder(prof.run_dir, run.tag)
    if training_finished(folder):
        return folder
    log, kept = folder.parent / "train_log.json", folder.parent / "train_log.recorded.json"
    if not kept.exists():
        if not log.exists():
            raise FileNotFoundError(f"{log} does not exist: {run.tag} was never trained here; notebook 03 trains it "
                                    "(sft.runs), rebuild only trains again what an earlier sitting trained")
        kept.write_bytes(log.read_bytes())
    train_run(prof, run)
    recorded = json.loads(kept.read_text())["log_history"]
    cmp = compare_losses(folder.parent, recorded, "bf16" if uses_bf16(prof, run.cfg) else "fp32")
    rel, per = cmp["max_rel_diff"], cmp["per_step"]  # (per step: step, new loss, recorded loss)
    atomic_write_json(folder.parent / "rebuild.json", {
        "tag": run.tag, "steps": cmp["steps"], "max_rel_loss_difference": rel, "at_step": cmp["at_step"],
        "rel_tol": rel_tol, "within_tol": rel <= rel_tol, "first_loss": [per[0][2], per[0][1]],
        "last_loss": [per[-1][2], per[-1][1]]})
    if rel > rel_tol:
        warnings.warn(f"rebuild of {run.tag}: the loss curve differs from the recorded one by up to {rel:.2%} "
                      f"(tolerance {rel_tol:.0%}; {folder.parent / 'rebuild.json'})", stacklevel=2)
    return folder


def data_stats(folder: str | Path) -> dict[str, Any]:
    """``data_stats.json`` of a training run (its folder, or the model folder inside it)."""
    folder = Path(folder)
    path = folder / "data_stats.json" if (folder / "data_stats.json").exists() else folder.parent / "data_stats.json"
    if not path.exists():
        raise FileNotFoundError(f"no data_stats.json in {folder} or its parent: train with lwlib.sft.train_sft")
    return json.loads(path.read_text())


def plot_loss(logs: dict[str, Any], path: str | Path, title: str) -> Path:
    """Training loss against optimizer step, one line per run (``{label: load_train_log(...)}``)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, log in logs.items():
        ax.plot(log["step"], log["loss"], marker="o" if len(log) < 30 else None, ms=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over target tokens of the step)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
