"""SFT training throughput: packed vs padded batches on a LongWriter-like length mix, and MFU.

Each setting runs ``--steps`` timed optimizer steps (after ``--warmup`` untimed ones, which also pay for
compilation) of the real training step of :mod:`lwlib.sft`: the trainer's forward and token-mean loss
(:func:`lwlib.losses.forward_loss`), backward, AdamW. Weights are fp32 with bf16 autocast on CUDA, as the
``Trainer`` runs with ``bf16=True``. Tokens/s counts real tokens only (padding is waste).

Settings (``--settings``):
  padded          one example per row, rows padded to the longest of the batch, attention mask (the
                  classic baseline), examples in random order, ``--rows`` rows per step
  padded-grouped  the same with examples sorted by length first (less padding)
  packed          best-fit packs of ``--pack`` tokens, position ids restarting per example, ``--rows``
                  packs per step (block-diagonal attention; the varlen kernels, ``flash_attention_2`` and
                  ``torch_varlen``, get the packs flattened into one row with their boundaries)
  dense           random unpacked ``--rows`` x ``--pack`` token rows (the ceiling: no masking at all)

``--loss-chunk N``: the loss of ``sft.loss_chunk_size: N`` (:func:`lwlib.losses.chunked_sft_loss`: output head and
cross-entropy over N positions at a time, logits recomputed in the backward pass); 0 = whole-batch logits.

``--kernels``: ``none`` (transformers' modules) or ``liger`` (``sft.liger_kernel``: Liger-Kernel's fused RMSNorm
and SwiGLU/GeGLU Triton kernels patched in by :func:`lwlib.training.use_liger`, and the loss by its fused linear
cross-entropy, :func:`lwlib.losses.liger_sft_loss`; needs ``pip install -e .[gpu]``), ``liger-loss`` (the fused loss
alone, the model unpatched: runs under ``--compile 1``) or ``auto`` (what ``train_sft`` picks for
``sft.liger_kernel: auto`` here: :func:`lwlib.training.pick_liger` and :func:`lwlib.training.pick_loss`, which never
builds the full logits of a large vocabulary x pack; the row's ``kernels`` says what it resolved to).

``--model``: a model name or folder (``gemma3-270m``: the bundled Gemma-3-270M base); ``--random-init`` builds it
from its config with random weights instead (the step's speed does not depend on the weights; ``gemma3-270m``'s
shape is built in, so no weights or tokenizer are needed), ``--config KEY=VALUE ...`` overriding config fields
(JSON values: ``--config num_hidden_layers=2 'layer_types=["sliding_attention","full_attention"]'``).
``--weights bf16`` keeps the parameters and AdamW state in bf16 (no fp32 master weights; the paper's DeepSpeed
bf16 keeps fp32 masters, so this is a speed reference, not the recipe).
``--compile 1`` wraps the model in ``torch.compile`` (shapes are fixed for ``dense`` and one-row-per-pack
``packed``; flattened packs compile with dynamic shapes), in ``--compile-mode`` (``reduce-overhead``: CUDA graphs);
the loss of the full logits is then compiled too (:func:`lwlib.losses.compiled_sft_loss`, as the trainer does with
``sft.torch_compile``) unless ``--compile-loss 0``.
``--attn torch_varlen``: PyTorch's FlashAttention varlen kernel (:func:`lwlib.attention.varlen_attention_forward`);
``--attn fa4_varlen``: FlashAttention-4's varlen kernels (``flash-attn-4``, Hopper/Blackwell;
:func:`lwlib.attention.fa4_attention_forward`).
``--flex-mask`` (packed + flex_attention): ``prebuilt`` passes the ``BlockMask`` of :func:`document_block_mask`,
``transformers`` lets transformers build it from ``position_ids`` on every forward.
``--profile``: one more step, profiled, adds its wall and GPU-busy time, top CUDA kernels and top CPU operators
to the row (``profile``); ``--sync-debug`` adds where the step makes the CPU wait for the GPU (``syncs``).

Length mix: ``--long-frac`` of the examples are AgentWrite-like long outputs (uniform 2,500 to
``--pack`` - 500 tokens), the rest general chat answers (log-normal, median 350 tokens, 32-2,048).

MFU = model FLOPs / (time x peak), peak ``--peak-tflops`` (H100/H200 SXM dense bf16: 989). ``mfu`` counts the model
FLOPs of a sequence of n tokens (:func:`model_flops`) as

    6 n P + 12 H d_h sum over layers of S(n, layer)

- P: the weights of every matrix multiply: each layer's attention projections and MLP, and the output layer
  d x V (counted, also when tied to the embedding: Gemma-3-270M's 640 x 262,144 is 168M of its P = 268M); the
  embedding lookup, norms and biases-free element-wise work are not counted. 6 = 2 FLOPs per multiply-add x 3
  (forward, and the backward's two products).
- H d_h: query heads x head dimension (the width of QK^T and of PV; 1,024 for Gemma-3-270M, not d = 640);
  12 = 2 products (QK^T, PV) x 2 x 3.
- S(n, layer): the keys attended, summed over the positions p = 1..n: p for a full-attention layer (n(n+1)/2),
  min(p, W) for a sliding-window layer of window W (W(W+1)/2 + (n - W) W once n > W): each layer's real span.
- Activation recomputation (``--grad-ckpt``, the chunked loss's second head matmul) is not counted.

``mfu_palm`` uses the PaLM convention instead, 6 N_all n + 12 L d n^2 per sequence (all parameters, embeddings
included, the full n^2 score matrix of every layer, windows ignored): the convention of "120k tokens/s ~ 30% MFU"
for unpacked 8k rows of SmolLM2-135M, about 1.5x the causal count at 8k.

Usage (GPU)::

    python benchmarks/sft_throughput.py --pack 8192 --rows 4 --settings padded packed dense \\
        --attn sdpa flex_attention --compile 0 1 --loss-chunk 0 4096 --kernels none liger \\
        --out benchmarks/results/sft_h100.json
    python benchmarks/sft_throughput.py --model gemma3-270m --random-init --pack 32768 --rows 2 \\
        --settings packed --attn fa4_varlen --compile 1 --kernels liger-loss auto --out sft_gemma3.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch

from lwlib.attention import check_packed_attention, flash_attn2_available, flat_packs, layer_attention
from lwlib.losses import forward_loss
from lwlib.models import load_model
from lwlib.packing import IGNORE, PackCollator, PackedDataset, TokenizedExample, pack_examples, split_batch
from lwlib.training import pick_liger, pick_loss, use_liger

# --random-init shapes of models whose weights are not needed to time a step (the config.json of the original)
RANDOM_INIT_CONFIGS: dict[str, dict] = {
    # google/gemma-3-270m: 18 layers, 5 of every 6 sliding over 512 tokens (the config's default layer_types)
    "gemma3-270m": dict(model_type="gemma3_text", vocab_size=262_144, hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32_768,
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
                        attn_logit_softcapping=None, final_logit_softcapping=None, pad_token_id=0, eos_token_id=1,
                        bos_token_id=2),
}


def document_block_mask(position_ids: torch.Tensor, block_size: int = 128):
    """Flex-attention ``BlockMask`` of causal attention inside each packed sequence of a batch of packs.

    A sequence starts wherever ``position_ids`` restart at 0 (as :class:`PackCollator` writes them). The
    block structure comes straight from the sequence boundaries: a (query block, key block) pair is
    skipped when no sequence spans both, *full* (no per-token mask) when one sequence covers both blocks
    and the key block lies wholly before the query block, and *partial* otherwise, where the mask
    function ``doc[q] == doc[kv] and q >= kv`` decides per token. Pass the result as ``attention_mask``
    together with ``position_ids`` (transformers uses a ``BlockMask`` as given) instead of the mask that
    transformers builds from ``position_ids`` on every forward (``--flex-mask``: on the H100 it made no
    difference, so the SFT trainer keeps transformers' mask).
    ``position_ids``: ``(batch, length)`` with ``length`` a multiple of ``block_size``.

    Usage: ``model(input_ids, position_ids=pos, attention_mask=document_block_mask(pos))``
    """
    from torch.nn.attention.flex_attention import BlockMask

    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (batch, length), got shape {tuple(position_ids.shape)}")
    b, n = position_ids.shape
    if n % block_size:
        raise ValueError(f"pack length {n} is not a multiple of the block size {block_size}: "
                         f"pad packs with PackCollator(pad_to_multiple_of={block_size})")
    doc = (position_ids == 0).cumsum(-1)  # non-decreasing sequence id of every token
    blocks = doc.view(b, n // block_size, block_size)
    first, last = blocks[..., 0], blocks[..., -1]
    nb = n // block_size
    i = torch.arange(nb, device=doc.device)
    below = i[None, :, None] > i[None, None, :]  # key block strictly before the query block
    shared = last[:, None, :] >= first[:, :, None]  # a sequence reaches from the key block into the query block
    live = (below | (i[:, None] == i[None, :])) & shared
    single = first == last
    full = below & single[:, :, None] & single[:, None, :] & (first[:, :, None] == first[:, None, :])
    partial = live & ~full

    def ordered(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = m.sum(-1, dtype=torch.int32)[:, None]
        index = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)[:, None]
        return count, index

    def mask_mod(bi, h, q, kv):
        return (doc[bi, q] == doc[bi, kv]) & (q >= kv)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(n, n))


def length_mix(n: int, pack: int, long_frac: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < long_frac:
            out.append(min(pack, rng.randint(2500, max(2501, pack - 500))))
        else:
            out.append(int(min(2048, pack, max(32, rng.lognormvariate(math.log(350), 0.8)))))
    return out


def make_examples(lengths: list[int], vocab: int, seed: int) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    exs = []
    for n in lengths:
        ids = torch.randint(100, vocab - 100, (n,), generator=g).tolist()
        prompt = min(64, n // 4)  # a short prompt without targets, the answer as targets
        labels = [IGNORE] * prompt + ids[prompt + 1:] + [IGNORE]
        exs.append(TokenizedExample(ids, labels))
    return exs


def model_config(name: str, overrides: list[str] | None = None):
    """The config of ``name`` for ``--random-init``: :data:`RANDOM_INIT_CONFIGS` or the model's own config.json,
    with ``overrides`` (``KEY=VALUE``, JSON values, else strings) applied."""
    from transformers import AutoConfig

    from lwlib.models import resolve_model

    if name in RANDOM_INIT_CONFIGS:
        kw = dict(RANDOM_INIT_CONFIGS[name])
        cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    else:
        cfg = AutoConfig.from_pretrained(resolve_model(name))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--config {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        setattr(cfg, key, value)
    return cfg


def build_model(args, device: str, dtype: torch.dtype):
    """The benchmark's model: ``args.model`` loaded (:func:`lwlib.models.load_model`), or with ``--random-init``
    built from :func:`model_config` with random weights (seeded)."""
    if not args.random_init:
        return load_model(args.model, device=device, dtype=dtype)[0]
    from transformers import AutoModelForCausalLM

    from lwlib.attention import register_varlen_attention

    register_varlen_attention()
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(args.model, args.config), dtype=dtype,
                                                 attn_implementation="sdpa")
    return model


def batches_for(setting: str, exs: list[TokenizedExample], pack: int, rows: int, pad_id: int, flatten: bool, seed: int,
                vocab: int = 40_000):
    if setting == "dense":
        g = torch.Generator().manual_seed(seed)
        while True:
            ids = torch.randint(min(100, vocab // 4), min(40_000, vocab), (rows, pack), generator=g)
            yield {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "num_targets": ids.numel()}, [pack] * rows
    if setting == "packed":
        packs = pack_examples(exs, pack, seed=seed)
        ds = PackedDataset(exs, packs)
        coll = PackCollator(pad_id=pad_id, flatten=flatten, pad_to_multiple_of=None if flatten else pack)
        groups = [list(range(i, min(i + rows, len(packs)))) for i in range(0, len(packs), rows)]
    else:
        order = list(range(len(exs)))
        random.Random(seed).shuffle(order)
        if setting == "padded-grouped":
            order.sort(key=lambda i: len(exs[i]))
            chunks = [order[i:i + rows] for i in range(0, len(order), rows)]
            random.Random(seed).shuffle(chunks)
            order = [i for c in chunks for i in c]
        ds = PackedDataset(exs, [[i] for i in order])
        coll = PackCollator(pad_id=pad_id, padded=True, pad_to_multiple_of=256)
        groups = [list(range(i, min(i + rows, len(order)))) for i in range(0, len(order), rows)]
    while True:
        for grp in groups:
            items = [ds[k] for k in grp]
            yield coll(items), [n for it in items for n in it["seq_lens"]]


def attention_span(n: int, window: int | None = None) -> int:
    """Keys attended by the queries of a sequence of ``n`` tokens, summed over positions p = 1..n: p each in a
    full-attention layer, min(p, ``window``) in a sliding-window layer."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def matmul_params(model) -> int:
    """The weights of every matrix multiply of ``model`` (its ``nn.Linear`` modules: attention projections, MLPs and
    the output layer, tied or not; the embedding lookup is not one)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def model_flops(seq_lens: list[int], params: int, attn_width: int, windows: list[int | None]) -> float:
    """Training FLOPs of sequences of ``seq_lens`` tokens (the module docstring's formula): ``6 n params`` for the
    matrix multiplies (:func:`matmul_params`) and ``12 attn_width S`` per layer for attention, ``attn_width`` =
    query heads x head dimension, ``S`` = :func:`attention_span` of the layer's window (``windows``: one per layer,
    None for full attention)."""
    return sum(6 * n * params + 12 * attn_width * sum(attention_span(n, w) for w in windows) for n in seq_lens)


def flop_shape(model) -> tuple[int, int, list[int | None]]:
    """``(params, attn_width, windows)`` of :func:`model_flops` for ``model``."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return matmul_params(model), cfg.num_attention_heads * head_dim, [w for _, w in layer_attention(cfg)]


def model_flops_palm(seq_lens: list[int], n_all: int, d: int, layers: int) -> float:
    """PaLM's count (Chowdhery et al. 2022, App. B): 6 N + 12 L d T per token, T the sequence's length."""
    return sum(6 * n * n_all + 12 * layers * d * n * n for n in seq_lens)


def recompute_mfu(path: str, model: str) -> None:
    """Add ``mfu_palm`` to the rows of a results file: its timed steps' sequence lengths are replayed from
    the file's own arguments (the workload is deterministic) and divided by the measured step time."""
    with open(path) as f:
        info = json.load(f)
    a = argparse.Namespace(**info["args"])
    m, tok = load_model(model, device="cpu", dtype="float32")
    cfg, n_all = m.config, sum(p.numel() for p in m.parameters())
    del m
    exs = make_examples(length_mix(a.examples, a.pack, a.long_frac, a.seed), len(tok), a.seed)
    for r in info["rows"]:
        if "error" in r:
            continue
        flatten = flat_packs(r["attn"]) and r["setting"] == "packed"
        it = batches_for(r["setting"], exs, a.pack, a.rows, tok.pad_token_id, flatten, a.seed, len(tok))
        for _ in range(a.warmup):
            next(it)
        lens = [n for _ in range(r["steps"]) for n in next(it)[1]]
        assert round(sum(lens) / r["steps"]) == r["real_tokens_per_step"], "replayed workload differs"
        dt = r["step_ms"] / 1000 * r["steps"]
        r["mfu_palm"] = round(model_flops_palm(lens, n_all, cfg.hidden_size, cfg.num_hidden_layers) / dt
                              / (a.peak_tflops * 1e12), 3)
        print(json.dumps({k: r.get(k) for k in ("setting", "attn", "tokens_per_s", "mfu", "mfu_palm")}))
    with open(path, "w") as f:
        json.dump(info, f, indent=1)


def kernel_group(name: str) -> str:
    """A CUDA kernel's share of the step by kind: attention, matrix multiply, cross-entropy/softmax, optimizer,
    fused element-wise (Triton, from torch.compile or Liger) or other element-wise/copy kernels."""
    n = name.lower()
    if any(t in n for t in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(t in n for t in ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "splitk")):
        return "matmul"
    if "softmax" in n or "cross_entropy" in n or "nll_loss" in n or "log_softmax" in n:
        return "cross-entropy"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    if n.startswith("triton") or "_kernel" in n and not n.startswith("void"):
        return "fused element-wise"
    return "other element-wise / copies"


def profile_step(step, k: int = 12) -> dict:
    """One profiled call of ``step``: its wall time, the ``k`` CUDA kernels with the most GPU time (their sum
    against the wall time shows how long the GPU idled) and the ``k`` CPU operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    wall = (time.perf_counter() - t0) * 1000
    gpu = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))  # noqa: E731
    ev = prof.key_averages()
    on = lambda e, kind: str(getattr(e, "device_type", "")).endswith(kind)  # noqa: E731
    kern = sorted((e for e in ev if gpu(e) > 0 and on(e, "CUDA")), key=gpu, reverse=True)
    total = sum(gpu(e) for e in kern)
    cpu = sorted((e for e in ev if on(e, "CPU")), key=lambda e: e.self_cpu_time_total, reverse=True)
    groups: dict[str, float] = {}
    for e in kern:
        g = kernel_group(e.key)
        groups[g] = groups.get(g, 0.0) + gpu(e) / 1000
    return {"wall_ms": round(wall, 1), "gpu_kernels_ms": round(total / 1000, 1),
            "by_group_ms": {g: round(v, 1) for g, v in sorted(groups.items(), key=lambda x: -x[1])},
            "top_kernels": [{"kernel": e.key[:90], "ms": round(gpu(e) / 1000, 2), "share": round(gpu(e) / total, 3),
                             "calls": e.count} for e in kern[:k]],
            "top_cpu_ops": [{"op": e.key[:90], "self_ms": round(e.self_cpu_time_total / 1000, 2), "calls": e.count}
                            for e in cpu[:k]]}


def sync_points(step) -> list[str]:
    """Where one call of ``step`` makes the CPU wait for the GPU (``torch.cuda.set_sync_debug_mode``):
    ``file:line`` of each synchronizing call, with counts. A wait in the training step keeps the CPU from
    queueing the next kernels while the GPU works, so CPU overhead adds to GPU time instead of hiding
    behind it."""
    import collections
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return [f"{k} x{n}" for k, n in where.most_common()]


def run_setting(args, setting: str, attn: str, compile_: bool, exs, pad_id: int, chunk: int = 0,
                kernels: str = "none", weights: str = "fp32", flex_mask: str = "transformers",
                compile_loss: str = "auto") -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args, device, {"fp32": torch.float32, "bf16": torch.bfloat16}[weights])
    check_packed_attention(model.config, attn)  # what train_sft refuses is not timed either
    cfg = model.config.get_text_config()
    if kernels == "auto":  # what train_sft picks for sft.liger_kernel: auto
        patch = pick_liger("auto", device == "cuda", None, compile_)
        fused, chunk = pick_loss("auto", patch, 0, cfg.vocab_size, args.pack, args.rows, device == "cuda")
        kernels = "auto:" + ("liger" if patch else "liger-loss" if fused else f"chunk {chunk}" if chunk else "none")
    else:
        patch, fused = kernels == "liger", kernels in ("liger", "liger-loss")
    if patch:
        use_liger(model)  # what sft.liger_kernel does
    model.config._attn_implementation = attn  # noqa: SLF001 - switch kernels without reloading
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    model.config.use_cache = False
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    shape = flop_shape(model)
    n_all = sum(p.numel() for p in model.parameters())
    flatten = flat_packs(attn) and setting == "packed"
    # flattened packs vary in length from step to step: dynamic shapes instead of one graph per length
    fwd = torch.compile(model, dynamic=None if flatten else False,
                        mode=None if args.compile_mode == "default" else args.compile_mode) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")
    prebuilt = attn == "flex_attention" and setting == "packed" and flex_mask == "prebuilt"
    loss_compiled = compile_ if compile_loss == "auto" else compile_loss == "1"
    pin = device == "cuda"  # as the Trainer's DataLoader (pin_memory): host-to-device copies do not wait
    it = batches_for(setting, exs, args.pack, args.rows, pad_id, flatten, args.seed, cfg.vocab_size)

    def step():
        batch, lens = next(it)
        inputs, loss_inputs = split_batch(batch)
        move = lambda v: (v.pin_memory() if pin else v).to(device, non_blocking=True)  # noqa: E731
        batch = {k: move(v) if torch.is_tensor(v) else v for k, v in inputs.items()}
        labels = move(loss_inputs["labels"])
        if prebuilt:
            batch["attention_mask"] = document_block_mask(batch["position_ids"])
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, _ = forward_loss(fwd, batch, labels, loss_inputs["num_targets"], chunk_size=chunk,
                                   liger=fused, compiled=loss_compiled)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return lens, batch["input_ids"].numel()

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    real, slots, flops, flops_palm = 0, 0, 0.0, 0.0
    for _ in range(args.steps):
        lens, n_slots = step()
        real += sum(lens)
        slots += n_slots
        flops += model_flops(lens, *shape)
        flops_palm += model_flops_palm(lens, n_all, cfg.hidden_size, cfg.num_hidden_layers)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    row = {"setting": setting, "attn": attn, "compile": compile_,
           "compile_mode": args.compile_mode if compile_ else None, "compile_loss": loss_compiled,
           "loss_chunk": chunk, "kernels": kernels,
           "weights": weights, "flex_mask": flex_mask if attn == "flex_attention" and setting == "packed" else None,
           "grad_ckpt": args.grad_ckpt, "steps": args.steps,
           "real_tokens_per_step": round(real / args.steps), "padding_share": round(1 - real / slots, 3),
           "step_ms": round(1000 * dt / args.steps, 1), "tokens_per_s": round(real / dt),
           "model_gflop_per_step": round(flops / args.steps / 1e9, 3),
           "mfu": round(flops / dt / (args.peak_tflops * 1e12), 3),
           "mfu_palm": round(flops_palm / dt / (args.peak_tflops * 1e12), 3),
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None}
    if args.profile and device == "cuda":
        row["profile"] = profile_step(step)
    if args.sync_debug and device == "cuda":
        row["syncs"] = sync_points(step)
    model = fwd = opt = None  # free the GPU memory before empty_cache (step's closure holds these names)
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="a model name (smollm2-135m-instruct, gemma3-270m) or folder")
    ap.add_argument("--random-init", action="store_true",
                    help="build the model from its config with random weights (no weights or tokenizer needed)")
    ap.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                    help="with --random-init: config fields to override (JSON values)")
    ap.add_argument("--pack", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--long-frac", type=float, default=0.1)
    ap.add_argument("--settings", nargs="+", default=["padded", "padded-grouped", "packed", "dense"])
    ap.add_argument("--attn", nargs="+", default=["sdpa"])
    ap.add_argument("--compile", nargs="+", type=int, default=[0])
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode for --compile 1 (reduce-overhead: CUDA graphs, fixed shapes only)")
    ap.add_argument("--compile-loss", nargs="+", default=["auto"], choices=["auto", "0", "1"],
                    help="compile the full-logits loss (auto: when the model is compiled, as the trainer)")
    ap.add_argument("--loss-chunk", nargs="+", type=int, default=[0])
    ap.add_argument("--kernels", nargs="+", default=["none"], choices=["none", "liger", "liger-loss", "auto"],
                    help="liger: Liger-Kernel RMSNorm/SwiGLU(GeGLU) + fused linear cross-entropy (sft.liger_kernel); "
                         "liger-loss: the fused loss alone; auto: what sft.liger_kernel: auto picks")
    ap.add_argument("--weights", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--flex-mask", nargs="+", default=["transformers"], choices=["transformers", "prebuilt"],
                    help="packed + flex_attention: the BlockMask of document_block_mask, or the one "
                         "transformers builds from position_ids on every forward")
    ap.add_argument("--profile", action="store_true", help="add one profiled step's top CUDA kernels and CPU ops")
    ap.add_argument("--sync-debug", action="store_true", help="add the step's CPU-GPU synchronization points")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--recompute-mfu", metavar="RESULTS_JSON", help="add mfu_palm to a results file and exit")
    args = ap.parse_args(argv)
    if args.recompute_mfu:
        return recompute_mfu(args.recompute_mfu, args.model)
    if args.config and not args.random_init:
        ap.error("--config needs --random-init")

    if args.random_init:
        cfg = model_config(args.model, args.config).get_text_config()
        vocab, pad_id = cfg.vocab_size, cfg.pad_token_id or 0
    else:
        _, tok = load_model(args.model, device="cpu", dtype="float32")
        vocab, pad_id = len(tok), tok.pad_token_id
    exs = make_examples(length_mix(args.examples, args.pack, args.long_frac, args.seed), vocab, args.seed)
    rows = []
    grid = [(kern, attn, c, s, ch, w, fm, cl) for kern in args.kernels
            for attn in args.attn for c in args.compile for s in args.settings
            for ch in (args.loss_chunk if kern == "none" else [0]) for w in args.weights
            for fm in (args.flex_mask if attn == "flex_attention" and s == "packed" else ["transformers"])
            for cl in (args.compile_loss if kern == "none" and not ch else ["auto"])]
    for kern, attn, c, s, ch, w, fm, cl in grid:
        if attn.startswith("flash_attention") and not flash_attn2_available():
            print(f"skip {attn}: flash_attn not installed", flush=True)
            continue
        try:
            rows.append(run_setting(args, s, attn, bool(c), exs, pad_id, ch, kern, w, fm, cl))
        except Exception as e:  # noqa: BLE001 - report and go on with the other settings
            rows.append({"setting": s, "attn": attn, "compile": bool(c), "loss_chunk": ch, "kernels": kern,
                         "weights": w, "flex_mask": fm, "compile_loss": cl,
                         "error": f"{type(e).__name__}: {e}"[:300]})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    key = lambda r: (r["attn"], r["compile"], r.get("loss_chunk", 0), r.get("kernels", "none"),  # noqa: E731
                     r.get("weights", "fp32"), r.get("flex_mask"), r.get("compile_loss"))
    base = {key(r): r["tokens_per_s"] for r in rows if r.get("setting") == "padded" and "error" not in r}
    for r in rows:
        if "error" not in r and key(r) in base:
            r["speedup_vs_padded"] = round(r["tokens_per_s"] / base[key(r)], 2)
    cols = ["setting", "attn", "flex_mask", "compile", "compile_loss", "loss_chunk", "kernels", "weights",
            "real_tokens_per_step",
            "padding_share", "step_ms", "tokens_per_s", "speedup_vs_padded", "mfu", "mfu_palm", "peak_mem_gb"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        if "error" in r:  # the error once, after the columns that name the setting
            print("| " + " | ".join(str(r.get(c, "")) for c in cols[:8]) + f" | {r['error']} |")
        else:
            print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    for r in rows:
        if r.get("profile"):
            pr = r["profile"]
            print(f"\none profiled step: {r['setting']} {r['attn']} compile={r['compile']} kernels={r['kernels']} "
                  f"weights={r['weights']} flex_mask={r['flex_mask']} loss_chunk={r['loss_chunk']}: "
                  f"wall {pr['wall_ms']} ms, GPU kernels {pr['gpu_kernels_ms']} ms")
            print("  by kind: " + ", ".join(f"{g} {v} ms" for g, v in pr.get("by_group_ms", {}).items()))
            for k in pr["top_kernels"]:
                print(f"  {k['ms']:9.2f} ms {100 * k['share']:5.1f}%  {k['kernel']}")
            print("  CPU self time:")
            for k in pr["top_cpu_ops"][:8]:
                print(f"  {k['self_ms']:9.2f} ms  x{k['calls']:<5} {k['op']}")
    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "args": vars(args), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
    return info


if __name__ == "__main__":
    main()
