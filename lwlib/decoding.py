"""Decoding for the local backend: the generated-text repetition penalty (one logits processor for both
engines), sampling, shape buckets, and the ``slots`` engine (continuous batching over a static KV cache).

The slots engine keeps up to ``max_batch`` rows in fixed slots of one preallocated KV cache
(``[slots, kv_heads, cache_len, head_dim]`` per layer). A new prompt is prefilled (eager, grouped,
right-padded) straight into a free slot; every decoding step then feeds each row's last token at its own
position and writes its key/value into its own slot column, attending over the first ``L`` columns of the
cache under a per-row length mask. Every ``segment_tokens`` steps the host looks at the rows: finished ones
(an end token or their own token limit) are yielded at once and free their slot, pending prompts are
prefilled into free slots, and the batch bucket ``B`` and cache bucket ``L`` for the next segment are picked
from fixed lists (rows are moved down to the first slots when no prompt is pending, so the batch shrinks).
Survivors are never re-prefilled: their keys and values stay where they are. On CUDA each ``(B, L)``
decoding step is one captured CUDA graph (no compilation, the shapes never change); on CPU, or if capture
fails (a warning, once), the same step runs eagerly.

The model's own attention layers compute queries, keys and values (rotary embeddings included); the cache
writes and the attention are done by :func:`slots_attention`, registered with transformers as the attention
implementation ``lwlib_slots`` and switched on only inside the engine's forward calls. A decoding step attends with
the length-exact Triton kernel of :mod:`lwlib.decode_attention` on CUDA (``attention``; sdpa under a length mask
elsewhere) and, with ``fused_kernels``, through Liger-Kernel's fused RMSNorm, SwiGLU and RoPE: a small model's
captured step is bound by its kernel count, not by memory (benchmarks/README.md, "the slots engine's decoding
attention and fused kernels").

Usage::

    pen = GenerationPenalty(1.3, window=64, end_ids=[2])
    scores = pen.apply(scores, generated, counts)        # [B, V] float logits, [B, T] ids, [B] valid counts
    eng = SlotEngine(model, end_ids=[2], pad_id=2, cfg=SlotConfig(max_batch=64))
    for i, (tokens, ended, seconds) in eng.run([[1, 2, 3], [4, 5]], [64, 32], params): ...
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION_NAME = "lwlib_slots"
DEFAULT_MAX_SLOTS = 256
ATTENTION_KERNELS = ("auto", "triton", "sdpa")
FUSED_KERNELS = ("auto", "liger", "none")
# model types whose attention applies the standard (rotate-half, full-width) RoPE through their module's
# ``apply_rotary_pos_emb``, which Liger's fused kernel computes exactly (not GLM's partial rotary, for one)
LIGER_ROPE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
H200_COPY_BANDWIDTH = 4.3e12  # bytes/s, a device-to-device copy measured on the H200 (counting read + write)


# ----------------------------------------------------------------------------------------------------------
# Shape buckets (pure functions)


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``."""
    return -(-n // m) * m


def pow2_buckets(smallest: int, largest: int) -> list[int]:
    """``smallest, 2*smallest, 4*smallest, ...`` below ``largest``, then ``largest`` itself.

    Usage: ``pow2_buckets(8, 192) == [8, 16, 32, 64, 128, 192]``
    """
    if smallest < 1 or largest < 1:
        raise ValueError(f"bucket sizes must be >= 1, got smallest={smallest}, largest={largest}")
    out, b = [], smallest
    while b < largest:
        out.append(b)
        b *= 2
    return out + [largest]


def _buckets(limit: int, buckets: Sequence[int] | None, smallest: int, limit_name: str, field: str) -> list[int]:
    """``buckets`` (default: powers of two from ``smallest``) below ``limit``, then ``limit``; errors name the
    field."""
    if limit < 1:
        raise ValueError(f"{limit_name} must be >= 1, got {limit}")
    if not buckets:
        return pow2_buckets(min(smallest, limit), limit)
    if any(int(b) < 1 for b in buckets):
        raise ValueError(f"{field} must be >= 1, got {list(buckets)}")
    return sorted({int(b) for b in buckets if int(b) < limit}) + [limit]


def batch_buckets(max_batch: int, buckets: Sequence[int] | None = None) -> list[int]:
    """The batch sizes the slots engine decodes at: ``buckets`` (default ``8, 16, 32, ...``) below
    ``max_batch``, then ``max_batch``."""
    return _buckets(max_batch, buckets, 8, "max_batch", "batch_buckets")


def cache_buckets(max_len: int, buckets: Sequence[int] | None = None) -> list[int]:
    """The KV-cache lengths the slots engine decodes at: ``buckets`` (default ``512, 1024, 2048, ...``)
    below ``max_len`` (the model's context), then ``max_len``."""
    return _buckets(max_len, buckets, 512, "max_len", "cache_buckets")


def pick_bucket(buckets: Sequence[int], n: int) -> int:
    """The smallest bucket ``>= n``; a ``ValueError`` if ``n`` exceeds the largest."""
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {max(buckets)}")


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of KV cache per token: ``2 x layers x kv_heads x head_dim x dtype bytes``
    (SmolLM2-135M in bf16: 2 x 30 x 3 x 64 x 2 = 23,040)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return 2 * c.num_hidden_layers * kv * head_dim * torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------------------
# The repetition penalty on generated text, and sampling


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
              penalty: torch.Tensor | None = None, window: torch.Tensor | None = None) -> torch.Tensor:
        """The processed ``scores`` (a new tensor; ``scores`` itself is left alone). ``penalty`` and ``window``
        (``[B]`` tensors) give each row its own penalty and window (rows of several decodings in one batch;
        a row with penalty 1.0 is left exactly as it is); by default every row uses this object's."""
        rows = penalty is not None
        if not (self.active or rows) or tokens.shape[1] == 0:
            return scores
        b, t = tokens.shape
        vocab = scores.shape[-1]
        pos = torch.arange(t, device=tokens.device)
        n = counts if counts is not None else torch.full((b,), t, dtype=torch.long, device=tokens.device)
        valid = pos[None, :] < n[:, None]
        keep = ~self.end_mask(vocab, scores.device)
        if rows:
            w = window if window is not None else torch.full((b,), self.window, dtype=torch.long, device=tokens.device)
            in_window = valid & ((w <= 0)[:, None] | (pos[None, :] >= (n - w)[:, None]))
            seen = _mark(tokens, in_window, vocab) & keep
            p = penalty.to(scores.dtype)[:, None]
            scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
        elif self.penalty != 1.0:
            in_window = valid if self.window <= 0 else valid & (pos[None, :] >= (n - self.window)[:, None])
            seen = _mark(tokens, in_window, vocab) & keep
            penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(seen, penalized, scores)
        if self.ngram > 0 and t >= self.ngram:
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


# ----------------------------------------------------------------------------------------------------------
# The slots engine


@dataclass
class _Ctx:
    """What :func:`slots_attention` needs in one forward: the cache and where to write/read."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    rows: torch.Tensor  # slot index of each batch row
    decode: bool
    width: int = 0  # prefill: columns written
    length: int = 0  # decode: columns attended (the cache bucket L)
    lens: torch.Tensor | None = None  # decode: each row's write column (= tokens already cached)
    mask: torch.Tensor | None = None  # decode: [B, 1, 1, L] additive (sdpa)
    triton: bool = False  # decode: lwlib.decode_attention's length-exact kernel instead of masked sdpa


def slots_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function for the slots engine (``attn_implementation="lwlib_slots"``).

    Prefill (``query`` ``[G, H, W, d]``, right-padded prompts): writes keys/values into slot columns
    ``0..W-1`` and runs causal sdpa on the prompt itself. Decode (``[B, H, 1, d]``): writes each row's
    key/value at its column ``lens[b]``, then attends over columns ``0..lens[b]``: with the Triton kernel of
    :mod:`lwlib.decode_attention` (reads only those columns), or sdpa over the first ``L`` cache columns under
    the length mask, the query heads grouped on their key/value head (no copy of the cache for GQA). Without
    the engine's context it is plain sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ctx: _Ctx | None = kwargs.pop("lwlib_slots", None)
    if ctx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    i = module.layer_idx
    kc, vc = ctx.k[i], ctx.v[i]
    if not ctx.decode:
        kc[ctx.rows, :, : ctx.width] = key
        vc[ctx.rows, :, : ctx.width] = value
        return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling, is_causal=True)
    b, heads, _, d = query.shape
    kvh = key.shape[1]
    kc[ctx.rows, :, ctx.lens] = key[:, :, 0]
    vc[ctx.rows, :, ctx.lens] = value[:, :, 0]
    if ctx.triton:
        from .decode_attention import decode_attention

        out = decode_attention(query[:, :, 0], kc, vc, ctx.lens, scaling or d ** -0.5, ctx.length)
        return out.unsqueeze(1), None
    q = query.reshape(b, kvh, heads // kvh, d)  # head h = kv_head * groups + j, as transformers' repeat_kv
    out = F.scaled_dot_product_attention(q, kc[:b, :, : ctx.length], vc[:b, :, : ctx.length],
                                         attn_mask=ctx.mask, scale=scaling)
    return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None


_registered = False


def register_slots_attention() -> None:
    """Register :func:`slots_attention` with transformers as ``lwlib_slots`` (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, slots_attention)
        _registered = True


@contextmanager
def _attention(model: torch.nn.Module, name: str):
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = old


@dataclass
class SlotConfig:
    """Settings of :class:`SlotEngine` (from :class:`lwlib.backends.BackendConfig`).

    Fields:
        max_batch: slots (largest batch bucket); null = ``DEFAULT_MAX_SLOTS`` on CUDA, 8 on CPU; always
            capped by what ``kv_cache_gb`` holds at the call's cache length.
        batch_buckets: smaller batch sizes decoded at (default 8, 16, 32, ...).
        cache_buckets: KV lengths decoded at (default 512, 1024, ..., the model's context).
        segment_tokens: decoding steps between two looks at the rows (finished rows leave, prompts enter,
            buckets re-chosen); a finished row idles at most this many steps.
        prefill_tokens: padded prompt tokens per prefill forward (rows are grouped up to it).
        kv_cache_gb: memory for the KV cache; null = 60% of the free GPU memory (CPU: 4 GB).
        cuda_graphs: capture one CUDA graph per (batch, cache) bucket on CUDA (else eager steps).
        attention: decoding attention: ``triton`` (:mod:`lwlib.decode_attention`: a split-K kernel that reads
            each row's own context only), ``sdpa`` (PyTorch's, over the whole cache bucket under a length
            mask), or ``auto`` (default): ``triton`` on CUDA where its self-check passes (a warning if not),
            else ``sdpa``.
        fused_kernels: ``liger``: Liger-Kernel's fused RMSNorm and SwiGLU patched into the model instance for
            good (:func:`lwlib.training.use_liger`; the same math) and its fused RoPE swapped in during the
            engine's own forward passes only (about 17 kernels per layer instead of 40: a small model's step is
            bound by its kernel count); ``none``; or ``auto`` (default): ``liger`` on CUDA where liger-kernel is
            installed and the model type is one of :data:`LIGER_ROPE_TYPES` (if patching fails: a warning, and
            ``none``).
    """

    max_batch: int | None = None
    batch_buckets: list[int] | None = None
    cache_buckets: list[int] | None = None
    segment_tokens: int = 32
    prefill_tokens: int = 32768
    kv_cache_gb: float | None = None
    cuda_graphs: bool = True
    attention: str = "auto"
    fused_kernels: str = "auto"

    def __post_init__(self):
        if self.fused_kernels not in FUSED_KERNELS:
            raise ValueError(f"fused_kernels must be one of {FUSED_KERNELS}, got {self.fused_kernels!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.segment_tokens < 1:
            raise ValueError(f"segment_tokens must be >= 1, got {self.segment_tokens}")
        if self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {self.prefill_tokens}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")


@dataclass
class SlotStats:
    """What the engine did, summed over calls (``SlotEngine.stats``; the benchmark reads it)."""

    prefill_calls: int = 0
    prefill_rows: int = 0
    prefill_tokens: int = 0  # padded
    prefill_s: float = 0.0
    steps: int = 0
    decode_s: float = 0.0  # wall time of the decoding segments, their host check included, capture_s excluded
    slot_steps: int = 0  # sum of the batch bucket over steps
    read_tokens: int = 0  # sum of B x L over steps: KV entries the attention reads
    captures: int = 0
    capture_s: float = 0.0
    compactions: int = 0
    shapes: set = field(default_factory=set)
    _ctx_tokens: Any = None  # device tensor: sum over steps of the active rows' context lengths
    _active: Any = None  # device tensor: sum over steps of the active rows

    @property
    def context_tokens(self) -> int:
        """Sum over steps of the active rows' cached tokens (the KV a length-exact kernel would read)."""
        return int(self._ctx_tokens.item()) if self._ctx_tokens is not None else 0

    @property
    def active_steps(self) -> int:
        """Sum over steps of the rows still generating (``active_steps / slot_steps``: how full the batch was)."""
        return int(self._active.item()) if self._active is not None else 0

    def as_dict(self) -> dict[str, Any]:
        out = {k: (sorted(v) if isinstance(v, set) else round(v, 4) if isinstance(v, float) else v)
               for k, v in self.__dict__.items() if not k.startswith("_")}
        return out | {"context_tokens": self.context_tokens, "active_steps": self.active_steps}


class SlotEngine:
    """Continuous batching over a static slot KV cache with bucketed CUDA-graph decoding steps.

    ``run(prompts, limits, params)`` takes token-id prompts and per-row token limits and yields
    ``(index, tokens, ended, seconds)`` as rows finish, in any order: ``tokens`` are the generated ids
    (ending with the end token if ``ended``), ``seconds`` the row's time from prefill to finish. Sampling
    (``temperature``, ``top_p``, :class:`GenerationPenalty`, ``ignore_eos``) runs in torch outside the graph,
    seeded once per call (``params.seed``, a ``torch.Generator`` on the model's device). ``params`` may be
    one setting per prompt: rows of several decodings then share the batch, each with its own temperature,
    repetition penalty and window (the settings of :data:`SHARED_PARAMS` must agree).

    Usage: ``for i, toks, ended, s in SlotEngine(model, [2], 2).run([[1, 5, 7]], [32], params): ...``
    """

    def __init__(self, model: torch.nn.Module, end_ids: Sequence[int], pad_id: int, cfg: SlotConfig | None = None):
        self.model = model
        self.end_ids = [int(i) for i in end_ids]
        self.pad_id = int(pad_id)
        self.cfg = cfg or SlotConfig()
        c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
            raise ValueError(f"slots engine: sliding-window attention ({type(model).__name__}) is not supported; "
                             "use engine 'generate'")
        if getattr(c, "final_logit_softcapping", None) or getattr(c, "logit_scale", None):
            raise ValueError(f"slots engine: {type(model).__name__} scales its logits; use engine 'generate'")
        self.max_len = int(c.max_position_embeddings)
        self.cache_buckets = cache_buckets(self.max_len, self.cfg.cache_buckets)
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        heads = self.heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        self.layers = c.num_hidden_layers
        self.stats = SlotStats()
        self._pool: tuple[int, int] | None = None  # (slots, cache length) of the allocated cache
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self._graphs_off = False
        self._warned: set[str] = set()
        register_slots_attention()
        from .runs import compile_caches

        compile_caches()  # Triton's kernels (attention, Liger) compile once and persist in the lwlib cache
        self.attention = self._pick_attention()
        self.fused = self._pick_fused(c)

    def _pick_fused(self, text_config: Any) -> str:
        """``liger`` or ``none`` (cfg.fused_kernels); patches the model's RMSNorm and SwiGLU for ``liger``."""
        import importlib
        import importlib.util

        want, mtype = self.cfg.fused_kernels, getattr(text_config, "model_type", "")
        if want == "none" or (want == "auto" and (
                self.device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None
                or mtype not in LIGER_ROPE_TYPES)):
            return "none"
        if mtype not in LIGER_ROPE_TYPES:
            raise ValueError(f"slots engine: fused_kernels 'liger' supports model types {LIGER_ROPE_TYPES}, "
                             f"not {mtype!r}; use 'none'")
        from .training import use_liger

        try:
            use_liger(self.model)  # raises without CUDA or the package
        except Exception as e:  # noqa: BLE001 - auto: any failure leaves the model as it was
            if want == "auto":
                self._warn_once("fused", f"slots engine: Liger's kernels are off ({type(e).__name__}: {e})")
                return "none"
            raise ValueError(f"slots engine: fused_kernels 'liger': {e}") from e
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        self._rope = (importlib.import_module(type(self.model).__module__), liger_rotary_pos_emb)
        return "liger"

    @contextmanager
    def _forward_ctx(self):
        """The engine's forward passes: its attention function, and Liger's RoPE where ``fused == "liger"``."""
        with _attention(self.model, ATTENTION_NAME):
            if self.fused != "liger":
                yield
                return
            module, rope = self._rope
            old = module.apply_rotary_pos_emb
            module.apply_rotary_pos_emb = rope
            try:
                yield
            finally:
                module.apply_rotary_pos_emb = old

    def _pick_attention(self) -> str:
        """``sdpa`` or ``triton`` (cfg.attention; ``auto``: ``triton`` on CUDA if its self-check passes)."""
        from . import decode_attention

        want, dev = self.cfg.attention, self.device
        if want == "sdpa" or (want == "auto" and dev.type != "cuda"):
            return "sdpa"
        why = decode_attention.self_check(dev, self.dtype, self.heads, self.kv_heads, self.head_dim)
        if why is None:
            return "triton"
        if want == "triton":
            raise ValueError(f"slots engine: attention 'triton' cannot run here: {why} (on CPU it needs Triton "
                             "and TRITON_INTERPRET=1; attention 'sdpa' always runs)")
        self._warn_once("attention", f"slots engine: the Triton decoding attention is off ({why}); using sdpa")
        return "sdpa"

    # -- setup ---------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def kv_budget_bytes(self) -> float:
        if self.cfg.kv_cache_gb is not None:
            return self.cfg.kv_cache_gb * 1e9
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            held = self._pool_bytes()  # our own cache counts as available to us
            return 0.6 * (free + held)
        return 4e9

    def _pool_bytes(self) -> int:
        if self._pool is None:
            return 0
        return self._pool[0] * self._pool[1] * kv_bytes_per_token(self.model.config, self.dtype)

    def plan(self, n_rows: int, longest: int) -> tuple[int, int]:
        """``(slots, cache length)`` for a call of ``n_rows`` rows whose longest prompt + output is
        ``longest`` tokens: the cache bucket of ``longest``; slots = the batch bucket of ``n_rows`` up to
        ``max_batch``, lowered to what the KV budget holds."""
        length = pick_bucket(self.cache_buckets, longest)
        cap = self.cfg.max_batch or (DEFAULT_MAX_SLOTS if self.device.type == "cuda" else 8)
        per_row = length * kv_bytes_per_token(self.model.config, self.dtype)
        fit = int(self.kv_budget_bytes() // per_row)
        if fit < 1:
            raise ValueError(f"slots engine: one row of {length} cached tokens needs {per_row / 1e9:.2f} GB, more than "
                             f"the KV budget {self.kv_budget_bytes() / 1e9:.2f} GB (kv_cache_gb)")
        if fit < cap and self.cfg.max_batch:
            self._warn_once("budget", f"slots engine: max_batch {cap} lowered to {fit} rows: the KV budget "
                                      f"{self.kv_budget_bytes() / 1e9:.1f} GB holds {fit} rows of {length} tokens")
        cap = min(cap, fit)
        slots = pick_bucket(batch_buckets(cap, self.cfg.batch_buckets), min(n_rows, cap))
        return slots, length

    def _allocate(self, slots: int, length: int) -> None:
        """Make the cache hold ``slots`` x ``length``: kept if it does, else grown to cover both the old and
        the new shape where the KV budget allows (so captured graphs of earlier calls stay usable)."""
        if self._pool is not None:
            if self._pool[0] >= slots and self._pool[1] >= length:
                return
            both = (max(self._pool[0], slots), max(self._pool[1], length))
            if both[0] * both[1] * kv_bytes_per_token(self.model.config, self.dtype) <= self.kv_budget_bytes():
                slots, length = both
        self._graphs.clear()
        self.k = self.v = None  # free the old cache first
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        shape = (slots, self.kv_heads, length, self.head_dim)
        dev, dt = self.device, self.dtype
        self.k = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(self.layers)]
        self.v = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(self.layers)]
        # static per-slot state read by the captured graphs (updated in place only)
        self._last = torch.zeros(slots, dtype=torch.long, device=dev)
        self._lens = torch.zeros(slots, dtype=torch.long, device=dev)
        self._rows = torch.arange(slots, device=dev)
        self._cols = torch.arange(length, device=dev)
        self._pool = (slots, length)
        self._mempool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg, stacklevel=3)

    # -- forward passes ------------------------------------------------------------------------------

    def _decode_eager(self, b: int, length: int) -> torch.Tensor:
        lens = self._lens[:b]
        if self.attention == "triton":
            ctx = _Ctx(self.k, self.v, self._rows[:b], decode=True, length=length, lens=lens, triton=True)
        else:
            mask = torch.zeros(b, length, dtype=self.dtype, device=self.device)
            mask.masked_fill_(self._cols[None, :length] > lens[:, None], torch.finfo(self.dtype).min)
            ctx = _Ctx(self.k, self.v, self._rows[:b], decode=True, length=length, lens=lens,
                       mask=mask.view(b, 1, 1, length))
        with self._forward_ctx():
            h = self.base(input_ids=self._last[:b].view(b, 1), position_ids=lens.view(b, 1), use_cache=False,
                          lwlib_slots=ctx).last_hidden_state
        return self.head(h[:, -1]).float()

    def _capture(self, b: int, length: int):
        t0 = time.perf_counter()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: idempotent (rewrites the same cache column)
                for _ in range(2):
                    self._decode_eager(b, length)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                out = self._decode_eager(b, length)
        except Exception as e:  # noqa: BLE001 - any capture failure: decode eagerly instead
            self._graphs_off = True
            with suppress(Exception):  # the warning below names the first error
                torch.cuda.synchronize(self.device)
            self._warn_once("capture", f"slots engine: CUDA graph capture failed at batch {b}, cache {length} "
                                       f"({type(e).__name__}: {e}); decoding eagerly")
            return None
        self.stats.captures += 1
        self.stats.capture_s += time.perf_counter() - t0
        self._graphs[(b, length)] = (graph, out)
        return graph, out

    def _decode(self, b: int, length: int) -> torch.Tensor:
        if self.device.type == "cuda" and self.cfg.cuda_graphs and not self._graphs_off:
            g = self._graphs.get((b, length)) or self._capture(b, length)
            if g is not None:
                g[0].replay()
                return g[1]
        return self._decode_eager(b, length)

    def _prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Prefill ``prompts`` into slots ``rows``; the logits ``[G, V]`` after each prompt's last token."""
        g = len(rows)
        width = min(round_up(max(len(p) for p in prompts), 64), self._pool[1])
        ids = torch.full((g, width), self.pad_id, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p)
        dev = self.device
        ids = ids.to(dev)
        ctx = _Ctx(self.k, self.v, torch.tensor(rows, device=dev), decode=False, width=width)
        pos = torch.arange(width, device=dev).expand(g, width)
        with self._forward_ctx():
            h = self.base(input_ids=ids, position_ids=pos, use_cache=False, lwlib_slots=ctx).last_hidden_state
        last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
        self.stats.prefill_calls += 1
        self.stats.prefill_rows += g
        self.stats.prefill_tokens += g * width
        return self.head(h[torch.arange(g, device=dev), last]).float()

    # -- the loop ------------------------------------------------------------------------------------

    def run(self, prompts: Sequence[Sequence[int]], limits: Sequence[int], params: Any, stop: Any = None
            ) -> Iterator[tuple[int, list[int], bool, float]]:
        """Generate for every prompt; yields ``(index, tokens, ended, seconds)`` as rows finish. ``stop``: a
        ``threading.Event``; once it is set the call returns at the next segment, the unfinished rows not yielded."""
        n = len(prompts)
        if len(limits) != n:
            raise ValueError(f"{len(limits)} token limits for {n} prompts")
        if n == 0:
            return
        limits = list(limits)
        for i, (p, m) in enumerate(zip(prompts, limits)):
            if m < 1:
                raise ValueError(f"max_new_tokens of prompt {i} is {m}: must be >= 1")
            if len(p) < 1 or len(p) >= self.max_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens: the model's context is {self.max_len}")
            if len(p) + m > self.max_len:
                self._warn_once("cap", f"slots engine: prompt + max_new_tokens exceeds the model's context "
                                       f"{self.max_len} (prompt {i}: {len(p)} + {m}); outputs stop at the context")
                limits[i] = self.max_len - len(p)
        slots, length = self.plan(n, max(len(p) + m for p, m in zip(prompts, limits)))
        with torch.no_grad():
            self._allocate(slots, length)
        yield from self._loop([list(p) for p in prompts], limits, params, slots, length, stop)

    def _loop(self, prompts, limits, params, slots, length, stop_event=None):
        cfg, dev, st = self.cfg, self.device, self.stats
        if st._ctx_tokens is None or st._ctx_tokens.device != dev:
            st._ctx_tokens = torch.zeros((), dtype=torch.long, device=dev)
            st._active = torch.zeros((), dtype=torch.long, device=dev)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling settings for {len(prompts)} prompts")
        params = plist[0]
        if any(shared_key(p) != shared_key(params) for p in plist):
            raise ValueError(f"slots engine: the rows of one call must share {SHARED_PARAMS}; run groups separately")
        row_set = [(float(p.temperature or 0.0), float(p.repetition_penalty), int(getattr(p, "repetition_window", 0)))
                   for p in plist]
        uniform = len(set(row_set)) == 1  # one decoding: the plain path; else each row its own
        pen = GenerationPenalty.from_params(params, self.end_ids)
        greedy = all(t <= 0 for t, _, _ in row_set)
        gen = None
        if not greedy and params.seed is not None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(int(params.seed))
        p_temp, p_pen, p_win = (torch.tensor(c, device=dev) for c in zip(*row_set))
        r_temp = torch.zeros(slots, dtype=p_temp.dtype, device=dev)
        r_pen = torch.ones(slots, dtype=p_pen.dtype, device=dev)
        r_win = torch.zeros(slots, dtype=torch.long, device=dev)
        vocab = self.head.weight.shape[0]
        end_mask = pen.end_mask(vocab, dev)
        ignore_eos = bool(getattr(params, "ignore_eos", False))
        bb = batch_buckets(slots, cfg.batch_buckets)
        lb = [b for b in self.cache_buckets if b < length] + [length]
        tmax = max(limits)
        # per-call device state (not read by the graphs)
        ngen = torch.zeros(slots, dtype=torch.long, device=dev)
        limit = torch.ones(slots, dtype=torch.long, device=dev)
        active = torch.zeros(slots, dtype=torch.bool, device=dev)
        toks = torch.zeros(slots, tmax, dtype=torch.long, device=dev)
        self._lens.zero_()
        self._last.zero_()
        # host state
        item = [-1] * slots  # prompt index in each slot
        cached = [0] * slots  # tokens in the cache (prompt + generated - 1) as of the last look
        made = [0] * slots  # generated tokens as of the last look
        t_in = [0.0] * slots
        pending = deque(sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), -limits[i])))

        def choose(scores: torch.Tensor, hist: torch.Tensor | None, counts: torch.Tensor | None,
                   sel: torch.Tensor | slice) -> torch.Tensor:
            """Next tokens of the slots ``sel`` (an index tensor at prefill, ``[:B]`` when decoding)."""
            if ignore_eos:
                scores = scores.masked_fill(end_mask, float("-inf"))
            if uniform:
                if hist is not None:  # (nothing generated yet at prefill)
                    scores = pen.apply(scores, hist, counts)
                return sample_next(scores, params.temperature, params.top_p, gen)
            if hist is not None:
                scores = pen.apply(scores, hist, counts, r_pen[sel], r_win[sel])
            return sample_rows(scores, r_temp[sel], params.top_p, gen)

        def admit() -> None:
            free = [b for b in range(slots) if item[b] < 0]
            take = [pending.popleft() for _ in range(min(len(free), len(pending)))]
            free = free[: len(take)]
            t0 = time.perf_counter()
            s = 0
            while s < len(take):  # groups of similar length (pending is sorted longest first)
                w = round_up(len(prompts[take[s]]), 64)
                g = max(1, min(len(take) - s, cfg.prefill_tokens // w))
                rows, idx = free[s : s + g], take[s : s + g]
                logits = self._prefill(rows, [prompts[i] for i in idx])
                r = torch.tensor(rows, device=dev)
                pi = torch.tensor(idx, device=dev)
                r_temp[r], r_pen[r], r_win[r] = p_temp[pi], p_pen[pi], p_win[pi]
                first = choose(logits, None, None, r)
                lim = torch.tensor([limits[i] for i in idx], device=dev)
                self._last[r] = first
                self._lens[r] = torch.tensor([len(prompts[i]) for i in idx], device=dev)
                ngen[r] = 1
                limit[r] = lim
                toks[r, 0] = first
                stop = (lim <= 1) if ignore_eos else (lim <= 1) | end_mask[first]
                active[r] = ~stop
                now = time.perf_counter()
                for b, i in zip(rows, idx):
                    item[b], cached[b], made[b], t_in[b] = i, len(prompts[i]), 1, now
                s += g
            if take:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                st.prefill_s += time.perf_counter() - t0

        def look() -> list[tuple[int, list[int], bool, float]]:
            """Sync with the device: note every row's progress, free the finished rows' slots."""
            occ = [b for b in range(slots) if item[b] >= 0]
            if not occ:
                return []
            a = active.tolist()
            g = ngen.tolist()
            done = [b for b in occ if not a[b]]
            for b in occ:
                made[b] = g[b]
                cached[b] = len(prompts[item[b]]) + g[b] - 1
            if not done:
                return []
            d = torch.tensor(done, device=dev)
            rows = toks[d, : max(g[b] for b in done)].tolist()
            self._lens[d] = 0  # an empty slot decodes (and is ignored) at column 0
            now, out = time.perf_counter(), []
            for b, row in zip(done, rows):
                row = row[: g[b]]
                out.append((item[b], row, not ignore_eos and row[-1] in self.end_ids, now - t_in[b]))
                item[b] = -1
            return out

        def compact() -> None:
            occ = [b for b in range(slots) if item[b] >= 0]
            target = pick_bucket(bb, len(occ))
            if pick_bucket(bb, occ[-1] + 1) <= target:
                return
            src = [b for b in occ if b >= target]
            dst = [b for b in range(target) if item[b] < 0][: len(src)]
            s, d = torch.tensor(src, device=dev), torch.tensor(dst, device=dev)
            cols = max(cached[b] for b in src)
            for kc, vc in zip(self.k, self.v):
                kc[d, :, :cols] = kc[s, :, :cols]
                vc[d, :, :cols] = vc[s, :, :cols]
            for t in (self._last, self._lens, ngen, limit, active, toks, r_temp, r_pen, r_win):
                t[d] = t[s]
            for a, z in zip(src, dst):
                item[z], cached[z], made[z], t_in[z] = item[a], cached[a], made[a], t_in[a]
                item[a] = -1
            st.compactions += 1

        while pending or any(i >= 0 for i in item):
            if stop_event is not None and stop_event.is_set():
                return
            with torch.no_grad():
                if pending:
                    admit()
                finished = look()
            yield from finished
            occ = [b for b in range(slots) if item[b] >= 0]
            if not occ:
                continue
            with torch.no_grad():
                if not pending:
                    compact()
                    occ = [b for b in range(slots) if item[b] >= 0]
                steps = min(cfg.segment_tokens, max(limits[item[b]] - made[b] for b in occ))
                b_ = pick_bucket(bb, occ[-1] + 1)
                need = max(cached[b] + min(steps, limits[item[b]] - made[b]) for b in occ)
                l_ = pick_bucket(lb, need)
                st.shapes.add((b_, l_))
                t0, cap0 = time.perf_counter(), st.capture_s  # (a graph captured in this segment is not decoding)
                lens, act_all = self._lens[:b_], active[:b_]
                for _ in range(steps):
                    logits = self._decode(b_, l_)
                    act = act_all.clone()
                    st._ctx_tokens += ((lens + 1) * act).sum()  # the step reads its new token too
                    st._active += act.sum()
                    lens.add_(act)
                    nxt = choose(logits, toks[:b_], ngen[:b_], slice(0, b_))
                    col = ngen[:b_].clamp(max=tmax - 1).unsqueeze(1)
                    toks[:b_].scatter_(1, col, torch.where(act, nxt, toks[:b_].gather(1, col)[:, 0]).unsqueeze(1))
                    self._last[:b_].copy_(torch.where(act, nxt, self._last[:b_]))
                    ngen[:b_].add_(act)
                    stop = ngen[:b_] >= limit[:b_]
                    if not ignore_eos:
                        stop |= end_mask[nxt]
                    act_all &= ~stop
                st.steps += steps
                st.slot_steps += steps * b_
                st.read_tokens += steps * b_ * l_
                finished = look()  # syncs: the segment's time includes the device's work
            st.decode_s += time.perf_counter() - t0 - (st.capture_s - cap0)
            yield from finished
