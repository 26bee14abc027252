"""Generation throughput of the local backend's two engines (and, optionally, transformers' continuous batching)
on the shapes of the stages that generate.

Workloads (``lwlib.backends.LocalBackend``, the bundled model unless ``--model``):

- ``decode-B``: ``B`` prompts of ~``--decode-context`` tokens, ``--decode-tokens`` new tokens each
  (``ignore_eos``): the bare decoding step at batch ``B`` against the KV-read floor.
- ``probe``: the 48 LongWrite-Ruler prompts (``lwlib.data.load_ruler``), up to ``--probe-tokens`` each,
  temperature 0.5 (notebook 01).
- ``agentwrite``: ``--aw-prompts`` prompts of 1k-6k tokens (the written-so-far text of an AgentWrite step),
  up to ``--aw-tokens`` new tokens each (notebook 02's write rounds).
- ``dpo``: ``--dpo-prompts`` LongBench-Write prompts x 4 samples at temperature 0.8; three samples of each
  prompt have limits of 256-1,536 tokens, one ``--dpo-long`` tokens (the looping sample that keeps a
  ``generate`` batch busy; notebook 04's sampling).

Each workload runs with the ``slots`` engine at its real limits, and both engines with every limit capped
at ``--generate-tokens`` (plain ``generate`` at a batch of the same size as the slots engine's; its time
grows with the step count, ~25-40 ms a step, so the full limits would take minutes): ``x gen`` is the
ratio of tokens/s at the cap. With ``--transformers-cb`` (off by default: minutes per workload on the H200),
transformers' own continuous batching (``model.continuous_batching_context_manager``: a paged KV cache, finished
requests free their pages; the issue's alternative to the slots engine) then runs the workload at its real
limits, each row with its own limit, in a fresh manager whose start-up and warm-up (``capture s``) count in its
wall time; ``x slots`` is its tokens/s over the slots engine's. It has no generated-text repetition penalty, so
it runs the paper's decoding only, which every workload here uses. ``ms/step`` is the slots engine's decoding
time per step (its host looks included); ``floor`` the read floor of those steps: what a step must read, over
``--bandwidth`` (default the card's copy rate, :func:`copy_bandwidth`: 4.3e12 B/s measured on the H200, 3.0e12 on
the H100): the KV bytes of the rows' cached tokens in every
global layer, at most a window of them in every sliding-window layer (Gemma 3), ``2 x kv_heads x head_dim x dtype
bytes`` per token and layer (``SlotStats.kv_layer_tokens``), plus the weights once (the output layer included; an
untied input embedding is only gathered); ``kv floor`` the KV part alone. ``capture s`` is CUDA-graph capture time (no compilation). Greedy identity:
8 ruler prompts, slots (and transformers' continuous batching) vs plain ``generate`` in fp32 (and bf16 on CUDA,
with CUDA graphs vs eager steps). The results file is rewritten after every row, so a run cut short keeps its rows.

Diagnostics of the decode-B workloads (after their rows): ``--breakdown`` times the parts of one step alone (the
captured forward, the same step eagerly, the draw over the ``[B, vocab]`` logits, the loop-free penalty) and, on
CUDA, profiles the kernels of graph steps by group (:func:`step_breakdown`); ``--attention-sweep`` runs the Triton
decoding attention of one global layer at that shape over split, block, warps and stages against a plain copy's
rate (:func:`attention_sweep`); ``--rerun-best`` then decodes the workload again with the fastest setting.

Usage::

    python benchmarks/generation.py                 # GPU: all rows (~3 minutes), table last
    python benchmarks/generation.py --transformers-cb   # ... and transformers' continuous batching (H200: > 20 min)
    python benchmarks/generation.py --tiny          # CPU smoke test (< 1 minute), tiny sizes
    python benchmarks/generation.py --model gemma3-270m --random-init --tokenizer TOKENIZER_FOLDER --workloads decode \
        --decode-batches 192 --decode-context 16384 --generate-tokens 0 --check-prompts 0 \
        --breakdown --attention-sweep --rerun-best      # where a step's time goes, and the attention kernel tuned
    python benchmarks/generation.py --model gemma3-270m --random-init --workloads decode --decode-batches 192 \
        --decode-context 16384 --generate-batch 16      # Gemma 3's hybrid attention at 16k (weights not needed)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lwlib.backends import Generation, GenParams, LocalBackend
from lwlib.data import load_longbench_write, load_ruler
from lwlib.decoding import H200_COPY_BANDWIDTH, layer_kv_bytes
from lwlib.families import text_config
from lwlib.models import load_model, load_tokenizer, resolve_model
from lwlib.progress import tqdm
from lwlib.runs import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Workload:
    name: str
    prompts: list  # chat prompts (str = one user message)
    limits: list[int]
    params: GenParams


def _material(tok, n_tokens: int) -> list[int]:
    """Token ids of real prose to cut long prompts from (the ruler and LongBench-Write prompts, repeated)."""
    text = "\n\n".join(it.prompt for it in load_ruler() + load_longbench_write())
    ids = tok.encode(text, add_special_tokens=False)
    while len(ids) < n_tokens:
        ids = ids + ids
    return ids


def _long_prompt(tok, material: list[int], n: int, start: int, ask: str) -> str:
    return f"Here is the text written so far:\n\n{tok.decode(material[start:start + n])}\n\n{ask}"


def workloads(args, tok) -> list[Workload]:
    rng = random.Random(0)
    lo, hi = args.aw_context
    material = _material(tok, max(hi, args.decode_context) * 2)
    out = []
    for b in args.decode_batches:
        prompts = [_long_prompt(tok, material, args.decode_context - 60, rng.randrange(0, len(material) // 2),
                                "Continue.") for _ in range(b)]
        out.append(Workload(f"decode-{b}", prompts, [args.decode_tokens] * b,
                            GenParams(temperature=0.5, ignore_eos=True, seed=0)))
    ruler = [it.prompt for it in load_ruler()][: args.probe_prompts] * args.probe_samples
    out.append(Workload("probe", ruler, [args.probe_tokens] * len(ruler), GenParams(temperature=0.5, seed=0)))
    aw = [_long_prompt(tok, material, rng.randint(lo, hi), rng.randrange(0, len(material) // 2),
                       "Write the next paragraph of about 700 words.") for _ in range(args.aw_prompts)]
    out.append(Workload("agentwrite", aw, [args.aw_tokens] * len(aw), GenParams(temperature=0.5, seed=0)))
    lbw = [it.prompt for it in load_longbench_write()][: args.dpo_prompts]
    prompts, limits = [], []
    for p in lbw:
        for k in range(4):
            prompts.append(p)
            limits.append(args.dpo_long if k == 3 else rng.randint(*args.dpo_short))
    out.append(Workload("dpo", prompts, limits, GenParams(temperature=0.8, seed=0)))
    return [w for w in out if w.name in args.workloads or w.name.split("-")[0] in args.workloads]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(be: LocalBackend, wl: Workload, limits: list[int]) -> tuple[list, float, float]:
    _sync()
    t0 = time.perf_counter()
    first, gens = None, [None] * len(wl.prompts)
    for i, g in be.generate_iter(wl.prompts, wl.params, max_new_tokens=limits, desc=wl.name):
        first = first if first is not None else time.perf_counter() - t0
        gens[i] = g
    _sync()
    return gens, time.perf_counter() - t0, first or 0.0


def _generate_steps(be: LocalBackend, wl: Workload, limits: list[int], gens: list) -> int:
    """Decoding steps the generate engine ran: each batch (sorted as it sorts) decodes to its longest row."""
    lens = [len(be.encode(p)) for p in wl.prompts]
    order = sorted(range(len(lens)), key=lambda i: (-lens[i], -limits[i]))
    return sum(max(gens[i].completion_tokens for i in order[s:s + be.batch_size])
               for s in range(0, len(order), be.batch_size))


def weight_bytes(model) -> int:
    """Bytes of the weights a decoding step reads: every parameter once (a tied output layer is the embedding), an
    untied input embedding excepted (a step gathers only its rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and emb.weight.data_ptr() != head.weight.data_ptr():
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def random_model(name: str, device: str, dtype: str, tokenizer: str | None = None):
    """``(model, tokenizer)`` of ``name``'s architecture with random weights (speed does not depend on them), where
    the weights are not at hand; the tokenizer from ``tokenizer`` (a folder) or the model's own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lwlib.models import pick_device, pick_dtype

    path = resolve_model(name) if name not in ("gemma3-270m",) else None
    if path is None:
        from transformers import Gemma3TextConfig

        cfg = Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                               max_position_embeddings=32768, query_pre_attn_scalar=256,
                               layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
                               bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    else:
        cfg = AutoConfig.from_pretrained(path)
    dev = pick_device(device)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=pick_dtype(dtype, dev), attn_implementation="sdpa").to(dev)
    return model.eval(), load_tokenizer(tokenizer or name)


def ms_per_call(fn, n: int, device: torch.device) -> float:
    """Mean milliseconds of ``fn()`` over ``n`` calls after two untimed ones (CUDA events on CUDA)."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1000 / n
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


# kernel name fragments -> the part of a decoding step they do (the first group that matches)
KERNEL_GROUPS = (("attention (lwlib Triton)", ("_split_kernel", "_merge_kernel")),
                 ("attention (other)", ("flash", "fmha", "attention", "sdpa")),
                 ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "gemv", "sgemm")),
                 ("Liger (RMSNorm, GeGLU/SwiGLU, RoPE)", ("rms_norm", "geglu", "swiglu", "rope")),
                 ("softmax, draw, argmax", ("softmax", "multinomial", "exponential", "argmax", "distribution",
                                            "philox", "curand")),
                 ("copies", ("memcpy", "memset", "copy")))


def kernel_group(name: str) -> str:
    """Which part of a decoding step the CUDA kernel ``name`` does (:data:`KERNEL_GROUPS`; else "other")."""
    low = name.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")


def kernel_profile(fn, n: int, top: int = 15) -> dict:
    """The CUDA kernels of ``n`` calls of ``fn()`` (torch.profiler; kernels inside CUDA-graph replays included), as
    :func:`lwlib.training.profile_summary` gives them per call, with the time of every kernel by group
    (:func:`kernel_group`)."""
    from torch.profiler import ProfilerActivity, profile

    from lwlib.training import profile_summary

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return profile_summary(prof, time.perf_counter() - t0, n, top, group=kernel_group)


def step_breakdown(be: LocalBackend, b: int, context: int, n: int = 20) -> dict:
    """Where one slots-engine decoding step goes at ``b`` rows of ``context`` cached tokens: milliseconds of the
    forward (a CUDA-graph replay, and the same step eagerly), of the draw at temperature 0.5 over the ``[b, vocab]``
    fp32 logits, and of the loop-free decoding's penalty (1.15 over each row's last 512 tokens), each timed alone;
    on CUDA the kernels of ``n`` graph steps with their draws (:func:`kernel_profile`). Uses the engine's cache as
    its last call left it (the values do not change the speed); call it after a row at ``b`` and ``context``.

    Usage: ``step_breakdown(be, 192, 16384)``
    """
    from lwlib.decoding import pick_bucket
    from lwlib.sampling import GenerationPenalty, sample_next

    eng = be.slot_engine
    slots, length = eng._pool
    if b > slots or context >= length:
        raise ValueError(f"step_breakdown: {b} rows of {context} tokens do not fit the cache ({slots} x {length})")
    dev = eng.device
    bucket = pick_bucket([c for c in eng.cache_buckets if c < length] + [length], context + 1)
    out: dict = {"rows": b, "context": context, "cache_bucket": bucket, "attention": eng.attention,
                 "fused": eng.fused_label}
    with torch.no_grad():
        eng._lens[:b].fill_(context)
        eng._last[:b].fill_(eng.pad_id)
        logits = eng._decode(b, bucket)
        vocab = logits.shape[-1]
        gen = torch.Generator(device=dev)
        gen.manual_seed(0)
        hist = torch.randint(0, vocab, (b, 1024), generator=gen, device=dev)
        counts = torch.full((b,), 1024, device=dev)
        pen = GenerationPenalty(1.15, window=512, end_ids=eng.end_ids)
        parts = {"forward": lambda: eng._decode(b, bucket), "forward_eager": lambda: eng._decode_eager(b, bucket),
                 "draw": lambda: sample_next(logits, 0.5, 1.0, gen), "penalty": lambda: pen.apply(logits, hist, counts)}
        out["ms"] = {k: round(ms_per_call(f, n, dev), 3) for k, f in parts.items()}
        out["logits"] = [b, vocab, str(logits.dtype)]
        if dev.type == "cuda":
            out["kernels"] = kernel_profile(lambda: sample_next(eng._decode(b, bucket), 0.5, 1.0, gen), n)
        eng._lens[:b].zero_()
    return out


SWEEP = [(split, block, warps, stages) for split in (256, 512, 1024) for block in (32, 64)
         for warps in (4, 8) for stages in (2, 3)]


def attention_sweep(b: int, context: int, config, dtype: torch.dtype, device: torch.device, bandwidth: float,
                    grid=SWEEP, n: int = 20) -> list[dict]:
    """lwlib's Triton decoding attention at ``b`` rows of ``context`` cached tokens in one global layer of the
    model (``config``'s heads), at its defaults and at each ``(split, block, num_warps, num_stages)`` of ``grid``:
    milliseconds, the K and V bytes read per call over the time (GB/s), and ``x floor`` at ``bandwidth``; first a
    plain copy of the cache's K as the machine's own read-and-write rate. A setting that fails is a row with its error."""
    from lwlib.decode_attention import decode_attention

    heads = config.num_attention_heads
    kvh = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or config.hidden_size // heads
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    q = torch.randn(b, heads, d, generator=gen, device=device).to(dtype)
    k, v = (torch.randn(b, kvh, context + 1, d, generator=gen, device=device).to(dtype) for _ in range(2))
    lens = torch.full((b,), context, device=device)
    read = 2 * k.numel() * k.element_size()
    copy_ms = ms_per_call(functools.partial(torch.Tensor.copy_, torch.empty_like(k), k), n, device)
    rows = [{"setting": "copy of K (read + write)", "ms": round(copy_ms, 4),
             "GB_per_s": round(2 * k.numel() * k.element_size() / copy_ms / 1e6, 1)}]
    for split, block, warps, stages in [(256, None, None, None)] + list(grid):
        row = {"split": split, "block": block, "num_warps": warps, "num_stages": stages}
        try:
            ms = ms_per_call(lambda: decode_attention(q, k, v, lens, d ** -0.5, split=split, block=block,
                                                      num_warps=warps, num_stages=stages), n, device)
            row.update(ms=round(ms, 4), GB_per_s=round(read / ms / 1e6, 1), x_floor=round(ms / (read / bandwidth * 1e3), 2))
        except Exception as e:  # noqa: BLE001 - a setting the GPU cannot run (shared memory): its row says why
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


@contextlib.contextmanager
def tuned_attention(tuning: dict):
    """lwlib's decoding attention with ``tuning`` (``split``, ``block``, ``num_warps``, ``num_stages``) for every
    call inside (the slots engine looks the function up at each call; graphs captured before keep their kernels)."""
    import lwlib.decode_attention as da

    orig = da.decode_attention
    da.decode_attention = functools.partial(orig, **{k: tuning[k] for k in ("split", "block", "num_warps", "num_stages")})
    try:
        yield
    finally:
        da.decode_attention = orig


def rerun_tuned(be: LocalBackend, wl: Workload, settings: list[dict], kvb: int, bandwidth: float, wbytes: int) -> dict:
    """The slots row of ``wl`` again with the fastest setting of an :func:`attention_sweep` (its graphs captured
    anew), as a row whose ``tuning`` names the setting."""
    best = min((r for r in settings if "split" in r and "ms" in r), key=lambda r: r["ms"])
    tuning = {k: best[k] for k in ("split", "block", "num_warps", "num_stages")}
    be.slot_engine._graphs.clear()
    with tuned_attention(tuning):
        row = run_row(be, wl, wl.limits, kvb, bandwidth, be.slot_engine._pool[0], wbytes)
    be.slot_engine._graphs.clear()
    row.update(capped=False, tuning=tuning)
    return row


def run_row(be: LocalBackend, wl: Workload, limits: list[int], kvb: int, bandwidth: float, batch: int,
            wbytes: int = 0) -> dict:
    eng = be.slot_engine
    before = eng.stats.as_dict() if eng else None
    gens, wall, first = _timed(be, wl, limits)
    toks = sum(g.completion_tokens for g in gens)
    row = {"workload": wl.name, "engine": be.engine, "attention": eng.attention if eng else None,
           "fused": eng.fused_label if eng else None, "rows": len(gens), "batch": batch, "max_new": max(limits),
           "tokens": toks, "stopped": sum(g.finish_reason == "stop" for g in gens), "wall_s": round(wall, 3),
           "first_s": round(first, 3), "tokens_per_s": round(toks / wall, 1)}
    if eng is None:
        steps = _generate_steps(be, wl, limits, gens)
        row.update(steps=steps, ms_per_step=round(1000 * wall / steps, 3), capture_s=0.0)
        return row
    after = eng.stats.as_dict()
    d = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))}
    steps = max(d["steps"], 1)
    kv_floor = d["kv_layer_tokens"] * kvb / bandwidth / steps * 1000
    floor = kv_floor + wbytes / bandwidth * 1000
    ms = 1000 * d["decode_s"] / steps
    row.update(steps=d["steps"], ms_per_step=round(ms, 3), floor_ms=round(floor, 3), kv_floor_ms=round(kv_floor, 3),
               x_floor=round(ms / floor, 2) if floor else None,
               bucket_floor_ms=round(d["read_tokens"] * kvb * len(be.slot_engine.windows) / bandwidth / steps * 1000, 3),
               occupancy=round(d["active_steps"] / max(d["slot_steps"], 1), 3),
               capture_s=round(d["capture_s"], 3), captures=d["captures"], prefill_s=round(d["prefill_s"], 3),
               prefill_calls=d["prefill_calls"], decode_s=round(d["decode_s"], 3),
               context_tokens=d["context_tokens"], kv_layer_tokens=d["kv_layer_tokens"], read_tokens=d["read_tokens"],
               shapes=sorted(set(map(tuple, after["shapes"])) - set(map(tuple, before["shapes"]))))
    return row


def greedy_check(args, tok, model, dtypes: list[str]) -> list[dict]:
    """Greedy outputs of the slots engine (CUDA graphs where on CUDA, and eager) vs plain generate."""
    prompts = [it.prompt for it in load_ruler()][: args.check_prompts]
    p = GenParams(max_new_tokens=args.check_tokens, temperature=0)
    out = []
    for dt in dtypes:
        m = model if str(model.dtype) == f"torch.{dt}" else load_model(args.model, args.device, dt)[0]
        ref = LocalBackend(m, tok, batch_size=len(prompts), name=args.model).generate(prompts, p)
        res = {"dtype": dt, "prompts": len(prompts), "tokens": args.check_tokens}
        variants = {"slots": {}}
        if m.device.type == "cuda":
            variants["slots_eager"] = {"cuda_graphs": False}
        texts = {}
        for name, kw in variants.items():
            be = LocalBackend(m, tok, name=args.model, engine="slots", max_batch=len(prompts), **kw)
            g = be.generate(prompts, p)
            texts[name] = g
            res[f"{name}_vs_generate"] = sum(fields(a) == fields(b) for a, b in zip(g, ref))
            st = be.slot_engine.stats
            res[f"{name}_captures"] = st.captures
            del be
        if args.transformers_cb:
            cb, _ = transformers_cb(LocalBackend(m, tok, name=args.model), prompts, [p.max_new_tokens] * len(prompts), p,
                                    args.cb_kv_tokens, args.cb_compile_level)
            res["transformers_cb_vs_generate"] = sum(fields(a) == fields(b) for a, b in zip(cb, ref))
        if "slots_eager" in texts:
            res["graphs_vs_eager"] = sum(fields(a) == fields(b) for a, b in zip(texts["slots"], texts["slots_eager"]))
        res["first_difference_chars"] = [next((k for k, (x, y) in enumerate(zip(a.text, b.text)) if x != y),
                                              None if a.text == b.text else min(len(a.text), len(b.text)))
                                         for a, b in zip(texts["slots"], ref)]
        out.append(res)
        print(json.dumps(res), flush=True)
        if m is not model:
            del m
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out


def fields(g):
    return (g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason)


def transformers_cb(be: LocalBackend, prompts: list, limits: list[int], params: GenParams,
                    kv_tokens: int | None = None, compile_level: int = 0) -> tuple[list, dict]:
    """``prompts`` through transformers' continuous batching on ``be``'s model (a fresh manager: start-up and
    warm-up included), each row with its own token limit; the outputs as :class:`lwlib.backends.Generation`
    (cut at the first end token as the local backend does, uncut under ``ignore_eos``) and the timings
    ``{"wall_s", "first_s", "capture_s", "attention"}``. ``kv_tokens``: the paged cache's size (None: transformers
    sizes it from free memory); ``compile_level``: its ``default_compile_level`` (0: CUDA graphs, no compilation).

    Usage: ``gens, t = transformers_cb(LocalBackend(model, tok), ["Hi"], [32], GenParams(temperature=0))``
    """
    from contextlib import ExitStack

    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:  # older layouts: no hints
        WorkloadHints = None
    model, ids = be.model, [be.encode(p) for p in prompts]
    sample = bool(params.temperature and params.temperature > 0)
    gc = GenerationConfig(do_sample=sample, temperature=params.temperature if sample else None,
                          top_p=params.top_p if sample else None, max_new_tokens=max(limits),
                          eos_token_id=-1 if params.ignore_eos else list(be.end_ids), pad_token_id=be.tok.pad_token_id)
    block = 256 if kv_tokens is None else 32  # transformers' default page; small pages for a small cache (CPU tests)
    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    cbc = ContinuousBatchingConfig(**{"page_size" if "page_size" in names else "block_size": block}, seed=params.seed,
                                   num_blocks=None if kv_tokens is None else -(-kv_tokens // block),
                                   default_compile_level=compile_level)
    hints = WorkloadHints(max(map(len, ids)), max(limits), len(ids)) if WorkloadHints else None
    if params.seed is not None:
        torch.manual_seed(params.seed)
    out, got = [None] * len(ids), 0
    _sync()
    t0 = time.perf_counter()
    with ExitStack() as stack:
        mgr = stack.enter_context(model.continuous_batching_context_manager(
            generation_config=gc, continuous_batching_config=cbc, block=True, timeout=30, workload_hints=hints))
        attention = model.config._attn_implementation
        capture = time.perf_counter() - t0
        rid = {mgr.add_request(x, max_new_tokens=m): i for i, (x, m) in enumerate(zip(ids, limits))}
        first = None
        bar = stack.enter_context(tqdm(total=len(ids), desc="transformers CB", unit="out", leave=False))
        while got < len(ids):
            r = mgr.get_result(timeout=1)
            if r is None:
                if not mgr.is_running():
                    raise RuntimeError(f"transformers continuous batching stopped with {len(ids) - got} requests left")
                continue
            if not r.is_finished():
                continue
            if r.error is not None:
                raise RuntimeError(f"transformers continuous batching: request {r.request_id} failed: {r.error}")
            i = rid[r.request_id]
            seconds = time.perf_counter() - t0
            first = first if first is not None else seconds
            toks = list(r.generated_tokens)
            if params.ignore_eos:
                out[i] = Generation(be.tok.decode(toks), len(ids[i]), len(toks), "length", seconds)
            else:
                out[i] = be._finish(ids[i], toks, limits[i], seconds)
            got += 1
            bar.update(1)
    _sync()
    return out, {"wall_s": time.perf_counter() - t0, "first_s": first or 0.0, "capture_s": capture,
                 "attention": attention}


def run_cb_row(be: LocalBackend, wl: Workload, limits: list[int], kv_tokens: int | None, compile_level: int) -> dict:
    gens, t = transformers_cb(be, wl.prompts, limits, wl.params, kv_tokens, compile_level)
    toks = sum(g.completion_tokens for g in gens)
    return {"workload": wl.name, "engine": "transformers_cb", "attention": t["attention"], "fused": "none",
            "rows": len(gens), "batch": None, "max_new": max(limits), "tokens": toks,  # (its batch varies)
            "stopped": sum(g.finish_reason == "stop" for g in gens), "wall_s": round(t["wall_s"], 3),
            "first_s": round(t["first_s"], 3), "capture_s": round(t["capture_s"], 3),
            "tokens_per_s": round(toks / t["wall_s"], 1), "compile_level": compile_level}


TINY = {"decode_batches": [4], "decode_context": 160, "decode_tokens": 8, "probe_prompts": 4, "probe_tokens": 12,
        "aw_prompts": 4, "aw_context": (80, 240), "aw_tokens": 12, "dpo_prompts": 2, "dpo_short": (4, 10),
        "dpo_long": 16, "generate_tokens": 8, "check_prompts": 2, "check_tokens": 12, "max_batch": 4,
        "segment_tokens": 4, "cb_kv_tokens": 2048}


COPY_BANDWIDTH = {"H100": 3.0e12, "H200": H200_COPY_BANDWIDTH}  # B/s, a device-to-device copy (read + write)


def copy_bandwidth(device_name: str) -> float:
    """The read floor's bandwidth for a card (:data:`COPY_BANDWIDTH`: the H100's 3.0 TB/s from the lent machines'
    KINDS.md, which the attention sweep's copy matched at 2.98 TB/s on 2026-12-07; the H200's 4.3 TB/s measured
    here); other cards: the H200's, so pass ``--bandwidth`` there.
    ``copy_bandwidth("NVIDIA H100 80GB HBM3") == 3.0e12``"""
    return next((bw for key, bw in COPY_BANDWIDTH.items() if key in device_name), H200_COPY_BANDWIDTH)


def run(args, out: Path | None = None) -> dict:
    """Every row, then the greedy check; the results so far are written to ``out`` after every row (default:
    ``benchmarks/results/generation_engines_<gpu>.json``)."""
    t_start = time.perf_counter()
    if args.random_init:
        model, tok = random_model(args.model, args.device, args.dtype, args.tokenizer)
    else:
        model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    cuda = model.device.type == "cuda"
    if args.bandwidth is None:
        args.bandwidth = copy_bandwidth(torch.cuda.get_device_name(0) if cuda else "")
    kvb = layer_kv_bytes(model.config, model.dtype)  # one layer's key and value per token
    wbytes = weight_bytes(model)
    kinds = [(a, f) for f in args.fused_kernels for a in args.attention]
    engines, fused_models = {}, {}

    def engine(kind):
        if kind not in engines:  # a Liger engine patches its model's RMSNorm and SwiGLU for good: its own copy
            m = model if kind[1] in ("none", "exact") else fused_models.setdefault(kind[1], copy.deepcopy(model))
            engines[kind] = LocalBackend(m, tok, name=args.model, engine="slots", max_batch=args.max_batch,
                                         segment_tokens=args.segment_tokens, attention=kind[0], fused_kernels=kind[1])
        return engines[kind]

    first = engine(kinds[0])
    rows, breakdowns, sweeps = [], [], []
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    out = out or RESULTS / ("generation_engines_" + ("tiny" if args.tiny else device.split()[-1].lower()) + ".json")

    def result(check: list) -> dict:
        return {"device": device, "model": args.model, "random_init": args.random_init, "dtype": str(model.dtype),
                "layer_kv_bytes_per_token": kvb, "weight_bytes": wbytes,
                "bandwidth_B_per_s": args.bandwidth, "generate_mode": args.generate_mode,
                "segment_tokens": args.segment_tokens, "max_batch": args.max_batch, "tiny": args.tiny,
                "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                "greedy_check": check, "rows": rows, "breakdowns": breakdowns, "attention_sweeps": sweeps,
                "total_s": round(time.perf_counter() - t_start, 1),
                "out": str(out)}
    for wl in workloads(args, tok):
        longest = max(len(first.encode(p)) + m for p, m in zip(wl.prompts, wl.limits))
        batch = first.slot_engine.plan(len(wl.prompts), min(longest, first.slot_engine.max_len))[0]  # its slot count
        capped = [min(m, args.generate_tokens) for m in wl.limits] if args.generate_tokens else None
        todo = [(k, wl.limits) for k in kinds]
        if args.generate_tokens:
            todo += ([(kinds[0], capped)] if capped != wl.limits else []) + [("generate", capped)]
        for kind, limits in todo:
            if kind == "generate":
                be = LocalBackend(model, tok, name=args.model, batch_size=args.generate_batch or batch,
                                  **({"cache_implementation": "static", "compile": True} if args.generate_mode == "static" else {}))
            else:
                be = engine(kind)
            row = run_row(be, wl, limits, kvb, args.bandwidth, args.generate_batch or batch if kind == "generate"
                          else batch, wbytes)
            row["capped"] = limits is capped
            rows.append(row)
            print(json.dumps(row), flush=True)
            atomic_write_json(out, result([]))
        if wl.name.startswith("decode-") and (args.breakdown or args.attention_sweep):
            context = round(sum(len(first.encode(p)) for p in wl.prompts) / len(wl.prompts))
            if args.breakdown:  # the engine of the first kind, as its row left it
                breakdowns.append({"workload": wl.name, **step_breakdown(first, len(wl.prompts), context,
                                                                         args.breakdown_steps)})
                print(json.dumps(breakdowns[-1]), flush=True)
            if args.attention_sweep:
                from lwlib.decode_attention import available

                if available(model.device):
                    grid = [(256, 16, None, None)] if args.tiny else SWEEP
                    sweeps.append({"workload": wl.name, "rows": len(wl.prompts), "context": context,
                                   "settings": attention_sweep(len(wl.prompts), context, text_config(model.config),
                                                               model.dtype, model.device, args.bandwidth, grid,
                                                               args.breakdown_steps)})
                    if args.rerun_best:
                        rows.append(rerun_tuned(first, wl, sweeps[-1]["settings"], kvb, args.bandwidth, wbytes))
                        print(json.dumps(rows[-1]), flush=True)
                        if args.breakdown:
                            with tuned_attention(rows[-1]["tuning"]):
                                breakdowns.append({"workload": wl.name, "tuning": rows[-1]["tuning"],
                                                   **step_breakdown(first, len(wl.prompts), context,
                                                                    args.breakdown_steps)})
                            first.slot_engine._graphs.clear()
                            print(json.dumps(breakdowns[-1]), flush=True)
            atomic_write_json(out, result([]))
        if args.transformers_cb:  # on the unpatched model, at the workload's real limits
            row = run_cb_row(LocalBackend(model, tok, name=args.model), wl, wl.limits, args.cb_kv_tokens,
                             args.cb_compile_level)
            row["capped"] = False
            rows.append(row)
            print(json.dumps(row), flush=True)
        mine = [r for r in rows if r["workload"] == wl.name]
        gen = next((r for r in mine[::-1] if r["engine"] == "generate"), None)
        same = gen and next(r for r in mine if r["engine"] == "slots" and r["max_new"] == gen["max_new"])
        slots_real = next(r for r in mine if r["engine"] == "slots" and not r["capped"])
        for r in mine:
            r["x_generate"] = round(same["tokens_per_s"] / gen["tokens_per_s"], 2) if gen and r is same else None
            r["x_slots"] = (round(r["tokens_per_s"] / slots_real["tokens_per_s"], 2)
                            if r["engine"] == "transformers_cb" else None)
        atomic_write_json(out, result([]))
    # last: its slots engines (default settings) may patch the model (fused_kernels auto)
    check = (greedy_check(args, tok, model, ["float32", "bfloat16"] if cuda else ["float32"])
             if args.check_prompts and not args.random_init else [])  # (random weights: no reference to load)
    res = result(check)
    atomic_write_json(out, res)
    return res


COLUMNS = [("workload", "workload", "{}"), ("engine", "engine", "{}"), ("attention", "attention", "{}"),
           ("fused", "fused", "{}"), ("rows", "rows", "{}"), ("batch", "batch", "{}"),
           ("max_new", "max new", "{}"), ("tokens", "tokens", "{:,}"), ("wall_s", "wall s", "{:.1f}"),
           ("first_s", "first s", "{:.1f}"), ("capture_s", "capture s", "{:.1f}"), ("ms_per_step", "ms/step", "{:.2f}"),
           ("floor_ms", "floor ms", "{:.2f}"), ("kv_floor_ms", "kv floor ms", "{:.2f}"), ("x_floor", "x floor", "{:.1f}"),
           ("tokens_per_s", "tokens/s", "{:,.0f}"),
           ("x_generate", "x gen", "{:.1f}"), ("x_slots", "x slots", "{:.2f}")]


def table(res: dict) -> str:
    """The rows as a Markdown table (the one in benchmarks/README.md)."""
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in res["rows"]:
        cells = []
        for k, _, f in COLUMNS:
            v = r.get(k)
            cells.append("" if v is None else f.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    for c in res["greedy_check"]:
        lines.append(f"\ngreedy identity ({c['dtype']}, {c['prompts']} ruler prompts x {c['tokens']} tokens): slots vs "
                     f"generate {c['slots_vs_generate']}/{c['prompts']}"
                     + (f", CUDA graphs vs eager steps {c['graphs_vs_eager']}/{c['prompts']}" if "graphs_vs_eager" in c else "")
                     + (f", transformers CB vs generate {c['transformers_cb_vs_generate']}/{c['prompts']}"
                        if "transformers_cb_vs_generate" in c else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke test")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--decode-context", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--probe-prompts", type=int, default=48)
    ap.add_argument("--probe-tokens", type=int, default=2048)
    ap.add_argument("--probe-samples", type=int, default=1, help="outputs per ruler prompt (the gpu probe: 4)")
    ap.add_argument("--aw-prompts", type=int, default=192)
    ap.add_argument("--aw-context", type=int, nargs=2, default=(1000, 6000))
    ap.add_argument("--aw-tokens", type=int, default=1000)
    ap.add_argument("--dpo-prompts", type=int, default=48)
    ap.add_argument("--dpo-short", type=int, nargs=2, default=(256, 1536))
    ap.add_argument("--dpo-long", type=int, default=4096)
    ap.add_argument("--generate-tokens", type=int, default=256,
                    help="token cap of the rows that compare the engines (0: no plain generate rows)")
    ap.add_argument("--generate-batch", type=int, default=None,
                    help="plain generate's batch (default: the slots engine's; Gemma 3 at 16k: 16, since transformers "
                         "builds a [batch, 1, context, context] sliding-window mask for the prefill)")
    ap.add_argument("--tokenizer", default=None, help="with --random-init: a tokenizer folder (default: the model's)")
    ap.add_argument("--random-init", action="store_true",
                    help="the model's architecture with random weights (speed does not depend on them)")
    ap.add_argument("--generate-mode", choices=["plain", "static"], default="plain",
                    help="plain generate, or static cache + torch.compile (recompiles per shape: slow)")
    ap.add_argument("--check-prompts", type=int, default=8, help="greedy identity check (0 = skip)")
    ap.add_argument("--check-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--attention", nargs="+", default=["auto"], choices=["auto", "triton", "sdpa"],
                    help="slots engine decoding attention(s): one slots row per kernel (lwlib.decode_attention)")
    ap.add_argument("--fused-kernels", nargs="+", default=["auto"], choices=["auto", "liger", "exact", "none"],
                    help="slots engine: Liger's fused RMSNorm/SwiGLU/RoPE, the engine's exact kernels (Gemma 3), or none; "
                         "one row per value (x --attention)")
    ap.add_argument("--workloads", nargs="+", default=["decode", "probe", "agentwrite", "dpo"],
                    help="which workloads (decode = every decode-B)")
    ap.add_argument("--transformers-cb", action=argparse.BooleanOptionalAction, default=False,
                    help="also run transformers' continuous batching on every workload (its real limits) and in the "
                         "check (on the H200 without flash-attn: minutes per workload)")
    ap.add_argument("--cb-kv-tokens", type=int, default=None,
                    help="transformers CB: paged KV cache size in tokens (default: transformers sizes it from free memory)")
    ap.add_argument("--cb-compile-level", type=int, default=0,
                    help="transformers CB: default_compile_level (0: CUDA graphs only; 1-3: torch.compile, minutes)")
    ap.add_argument("--breakdown", action="store_true",
                    help="after each decode-B row: where a step's time goes (step_breakdown: forward, draw, penalty, "
                         "and on CUDA the kernels by group)")
    ap.add_argument("--attention-sweep", action="store_true",
                    help="after each decode-B row: the Triton decoding attention of one global layer at that shape, at "
                         "its defaults and over SWEEP's (split, block, num_warps, num_stages)")
    ap.add_argument("--rerun-best", action="store_true",
                    help="with --attention-sweep: the decode-B row again with the sweep's fastest setting (and its "
                         "breakdown with --breakdown)")
    ap.add_argument("--breakdown-steps", type=int, default=20, help="timed calls per part (--breakdown, --attention-sweep)")
    ap.add_argument("--segment-tokens", type=int, default=32)
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="B/s of the read floor (default: the card's copy rate, copy_bandwidth)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generation_engines_<device>.json)")
    args = ap.parse_args(argv)
    if args.tiny:
        defaults = {a.dest: a.default for a in ap._actions}
        for k, v in TINY.items():
            if getattr(args, k) == defaults[k] or (isinstance(v, tuple) and tuple(getattr(args, k)) == tuple(defaults[k])):
                setattr(args, k, v)
    res = run(args, Path(args.out) if args.out else None)
    print(f"\n{table(res)}\n\n[{res['device']}, {res['dtype']}, {res['total_s']} s; written to {res['out']}]")
    return res


if __name__ == "__main__":
    main()
