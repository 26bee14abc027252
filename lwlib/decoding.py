"""The ``slots`` engine of the local backend (continuous batching over a static KV cache) and its shape buckets;
the penalty and sampling it applies are :mod:`lwlib.sampling`, what differs between architectures
:mod:`lwlib.families`.

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

Sliding-window layers (Gemma 3's 15 of 18, :func:`lwlib.families.layer_windows`) keep a ring buffer of their
window instead: ``[slots, kv_heads, W, head_dim]``, the key of position ``p`` in column ``p mod W``, so their
memory does not grow with the output; a step attends over all ``W`` columns once a row has ``W`` tokens (the
order of the columns does not matter: keys carry their rotary position already). A prefill longer than the
window attends under the sliding mask and keeps each row's last ``W`` keys.

The model's own attention layers compute queries, keys and values (rotary embeddings, QK-norm included); the
cache writes and the attention are done by :func:`slots_attention`, registered with transformers as the attention
implementation ``lwlib_slots`` and switched on only inside the engine's forward calls. A decoding step attends with
the length-exact Triton kernel of :mod:`lwlib.decode_attention` on CUDA (``attention``; sdpa under a length mask
elsewhere) and, with ``fused_kernels``, through Liger-Kernel's fused RMSNorm, SwiGLU and RoPE where they are exact
for the model's family (Gemma 3: the engine's own bit-exact norm and RoPE kernels, :mod:`lwlib.decode_norm`,
:mod:`lwlib.decode_rope`): a small model's captured step is bound by its kernel count, not by memory
(benchmarks/README.md, "the slots engine's decoding attention and fused kernels").

Usage::

    eng = SlotEngine(model, end_ids=[2], pad_id=2, cfg=SlotConfig(max_batch=64))
    for i, tokens, ended, seconds in eng.run([[1, 2, 3], [4, 5]], [64, 32], params): ...
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

from .families import family, layer_windows, text_config, unsupported
from .sampling import GenerationPenalty, sample_next, sample_rows, shared_key
from .sampling import SHARED_PARAMS as SHARED_PARAMS  # (re-exported: the backends read it here)

ATTENTION_NAME = "lwlib_slots"
DEFAULT_MAX_SLOTS = 256
ATTENTION_KERNELS = ("auto", "triton", "sdpa")
FUSED_KERNELS = ("auto", "liger", "exact", "none")
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
    """Bytes of KV cache per token over all layers, windows ignored: ``2 x layers x kv_heads x head_dim x dtype
    bytes`` (SmolLM2-135M in bf16: 2 x 30 x 3 x 64 x 2 = 23,040). :func:`row_cache_bytes` counts windows."""
    return text_config(config).num_hidden_layers * layer_kv_bytes(config, dtype)


def layer_kv_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of one token's key and value in one layer: ``2 x kv_heads x head_dim x dtype bytes``."""
    c = text_config(config)
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return 2 * kv * head_dim * torch.empty((), dtype=dtype).element_size()


def row_cache_bytes(config: Any, dtype: torch.dtype, length: int) -> int:
    """Bytes of one slot's KV cache at ``length`` tokens: every global layer ``length`` columns, every
    sliding-window layer ``min(window, length)`` (Gemma-3-270M in bf16 at 16,384 tokens: (3 x 16,384 + 15 x 512)
    x 1,024 = 58.2 MB, against 302 MB without the ring buffers).

    Usage: ``row_cache_bytes(model.config, torch.bfloat16, 16384)``
    """
    cols = sum(length if w is None else min(w, length) for w in layer_windows(config))
    return cols * layer_kv_bytes(config, dtype)


# ----------------------------------------------------------------------------------------------------------
# The slots engine


@dataclass
class _Ctx:
    """What :func:`slots_attention` needs in one forward: the cache and where to write/read."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    rows: torch.Tensor  # slot index of each batch row
    decode: bool
    windows: list[int | None]  # per layer: its sliding window (its cache is a ring of that many columns) or None
    width: int = 0  # prefill: columns written
    ring: dict[int, torch.Tensor] | None = None  # prefill: ring width -> [G, width] source position per column
    band: dict[int, torch.Tensor] | None = None  # prefill: window -> [W, W] bool sliding causal mask (W > window)
    length: int = 0  # decode: columns attended by global layers (the cache bucket L)
    lens: torch.Tensor | None = None  # decode: each row's write column (= tokens already cached)
    local: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # decode: window -> (write column, last col)
    mask: torch.Tensor | None = None  # decode: [B, 1, 1, L] additive (sdpa)
    local_mask: dict[int, torch.Tensor] | None = None  # decode: window -> [B, 1, 1, W] additive (sdpa)
    triton: bool = False  # decode: lwlib.decode_attention's length-exact kernel instead of masked sdpa


def slots_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function for the slots engine (``attn_implementation="lwlib_slots"``).

    Prefill (``query`` ``[G, H, W, d]``, right-padded prompts): writes keys/values into slot columns
    ``0..W-1`` (a sliding-window layer whose ring is narrower than ``W``: each row's last keys, position ``p`` in
    column ``p mod window``) and runs causal sdpa on the prompt itself (under the sliding mask for such a layer).
    Decode (``[B, H, 1, d]``): writes each row's key/value at its column ``lens[b]`` (``lens[b] mod window`` in a
    ring), then attends over columns ``0..lens[b]`` (a ring: ``0..min(lens[b], window - 1)``): with the Triton
    kernel of :mod:`lwlib.decode_attention` (reads only those columns), or sdpa over the first ``L`` cache columns
    under the length mask, the query heads grouped on their key/value head (no copy of the cache for GQA). Without
    the engine's context it is plain sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ctx: _Ctx | None = kwargs.pop("lwlib_slots", None)
    if ctx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    i = module.layer_idx
    w = ctx.windows[i]
    if kwargs.get("sliding_window") != w:
        raise RuntimeError(f"slots engine: layer {i} attends over window {kwargs.get('sliding_window')} but the "
                           f"engine planned {w} from the config (lwlib.families.layer_windows)")
    kc, vc = ctx.k[i], ctx.v[i]
    if not ctx.decode:
        wc = kc.shape[2]
        if ctx.width <= wc:
            kc[ctx.rows, :, : ctx.width] = key
            vc[ctx.rows, :, : ctx.width] = value
        else:  # a ring narrower than the prompts: each row's last wc keys (wc == w here)
            idx = ctx.ring[wc][:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
            kc[ctx.rows] = key.gather(2, idx)
            vc[ctx.rows] = value.gather(2, idx)
        if w is not None and ctx.width > w:
            band = ctx.band[w][None, None]
            return sdpa_attention_forward(module, query, key, value, band, dropout=0.0, scaling=scaling)
        return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling, is_causal=True)
    b, heads, _, d = query.shape
    kvh = key.shape[1]
    if w is None:
        col, last, length, mask = ctx.lens, ctx.lens, ctx.length, ctx.mask
    else:
        (col, last), length = ctx.local[w], kc.shape[2]
        mask = ctx.local_mask[w] if ctx.local_mask else None
    kc[ctx.rows, :, col] = key[:, :, 0]
    vc[ctx.rows, :, col] = value[:, :, 0]
    if ctx.triton:
        from .decode_attention import decode_attention

        out = decode_attention(query[:, :, 0], kc, vc, last, scaling or d ** -0.5, length)
        return out.unsqueeze(1), None
    q = query.reshape(b, kvh, heads // kvh, d)  # head h = kv_head * groups + j, as transformers' repeat_kv
    out = F.scaled_dot_product_attention(q, kc[:b, :, :length], vc[:b, :, :length], attn_mask=mask, scale=scaling)
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
            bound by its kernel count); ``exact``: the engine's own bit-exact kernels for the family
            (:attr:`lwlib.families.Family.exact`; Gemma 3: its RMSNorms in three kernels instead of about ten,
            :mod:`lwlib.decode_norm`, and the RoPE in one per tensor instead of five, :mod:`lwlib.decode_rope`),
            each used only where its self-check on the device is bit-exact; ``none``; or ``auto`` (default), on
            CUDA: ``exact`` for a family that has such kernels, else ``liger`` where liger-kernel is installed and
            the family has exact Liger kernels (:class:`lwlib.families.Family`; a kernel whose patching or
            self-check fails: a warning, and it stays off).
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
    _kv_cols: Any = None  # device tensor (windowed models): sum over steps, rows and layers of the columns read
    _layers: int = 0

    @property
    def context_tokens(self) -> int:
        """Sum over steps of the active rows' cached tokens (the KV a length-exact kernel would read)."""
        return int(self._ctx_tokens.item()) if self._ctx_tokens is not None else 0

    @property
    def kv_layer_tokens(self) -> int:
        """Sum over steps, active rows and layers of the cached tokens a length-exact step reads: a global layer
        the row's whole context, a sliding-window layer at most its window (``x`` one layer's bytes per token:
        the KV bytes a step must read)."""
        if self._kv_cols is not None:
            return int(self._kv_cols.item())
        return self._layers * self.context_tokens

    @property
    def active_steps(self) -> int:
        """Sum over steps of the rows still generating (``active_steps / slot_steps``: how full the batch was)."""
        return int(self._active.item()) if self._active is not None else 0

    def as_dict(self) -> dict[str, Any]:
        out = {k: (sorted(v) if isinstance(v, set) else round(v, 4) if isinstance(v, float) else v)
               for k, v in self.__dict__.items() if not k.startswith("_")}
        return out | {"context_tokens": self.context_tokens, "active_steps": self.active_steps,
                      "kv_layer_tokens": self.kv_layer_tokens}


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
        c = text_config(model.config)
        why = unsupported(c)
        if why:
            raise ValueError(f"slots engine: {type(model).__name__} {why}; use engine 'generate'")
        self.family = family(c)
        self.windows = layer_windows(c)  # per layer: its sliding window (a ring buffer) or None (the full length)
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
        self.fused = self._pick_fused()

    def _pick_fused(self) -> str:
        """``liger``, ``exact`` or ``none`` (cfg.fused_kernels); patches the model's RMSNorm and SwiGLU for
        ``liger``; sets ``exact_kernels`` (those of the family's :attr:`lwlib.families.Family.exact` whose
        self-check passed) for ``exact``."""
        import importlib.util

        want, fam = self.cfg.fused_kernels, self.family
        self.exact_kernels: tuple[str, ...] = ()
        if want == "auto":
            if self.device.type != "cuda":
                return "none"
            if fam.exact:
                return self._pick_exact(strict=False)
            if importlib.util.find_spec("liger_kernel") is None or not fam.liger:
                return "none"
            return self._pick_liger(strict=False)
        if want == "none":
            return "none"
        return self._pick_exact(strict=True) if want == "exact" else self._pick_liger(strict=True)

    def _refuse(self, want: str, field: str) -> None:
        from .families import FAMILIES

        raise ValueError(f"slots engine: fused_kernels {want!r} is exact for the families "
                         f"{[f.name for f in FAMILIES if getattr(f, field)]}, not {self.family.name!r}; use 'none'")

    def _pick_exact(self, strict: bool) -> str:
        """The engine's own bit-exact kernels of the family (``exact_kernels``), each checked on the device first
        (:mod:`lwlib.decode_norm`, :mod:`lwlib.decode_rope`); one that fails its check stays off (``auto``: a
        warning; ``exact``: an error)."""
        if not self.family.exact:
            self._refuse("exact", "exact")
        ok = []
        for name in self.family.exact:
            why = self._exact_check(name)
            if why is None:
                ok.append(name)
            elif strict:
                raise ValueError(f"slots engine: fused_kernels 'exact': {name} cannot run here: {why}")
            else:
                self._warn_once(f"fused-{name}", f"slots engine: the exact {name} kernel is off ({why})")
        self.exact_kernels = tuple(ok)
        return "exact" if ok else "none"

    def _exact_check(self, name: str) -> str | None:
        """Why the exact kernel ``name`` cannot run for this model here (None if it can)."""
        import importlib

        from . import decode_norm, decode_rope

        if name == "gemma_norm":
            why = decode_norm.self_check(self.device, self.dtype,
                                         [text_config(self.model.config).hidden_size, self.head_dim])
            if why is None and not decode_norm.norm_modules(self.model):
                why = "the model has no transformers Gemma3RMSNorm modules (patched already?)"
            return why
        why = decode_rope.self_check(self.device, self.dtype, self.heads, self.kv_heads, self.head_dim)
        if why is None and not hasattr(importlib.import_module(type(self.model).__module__), "apply_rotary_pos_emb"):
            why = "the model's module has no apply_rotary_pos_emb"
        return why

    def _pick_liger(self, strict: bool) -> str:
        import importlib

        if not self.family.liger:
            self._refuse("liger", "liger")
        from .training import use_liger

        try:
            use_liger(self.model)  # raises without CUDA or the package
        except Exception as e:  # noqa: BLE001 - auto: any failure leaves the model as it was
            if not strict:
                self._warn_once("fused", f"slots engine: Liger's kernels are off ({type(e).__name__}: {e})")
                return "none"
            raise ValueError(f"slots engine: fused_kernels 'liger': {e}") from e
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        self._rope = (importlib.import_module(type(self.model).__module__), liger_rotary_pos_emb)
        return "liger"

    @property
    def fused_label(self) -> str:
        """``fused`` with the exact kernels in use, e.g. ``exact:gemma_norm+rope`` (the benchmarks' rows)."""
        return f"exact:{'+'.join(self.exact_kernels)}" if self.fused == "exact" else self.fused

    @contextmanager
    def _forward_ctx(self):
        """The engine's forward passes: its attention function; Liger's RoPE where ``fused == "liger"``; the exact
        kernels (Gemma's norms, the RoPE) where ``fused == "exact"``."""
        from contextlib import ExitStack

        with _attention(self.model, ATTENTION_NAME), ExitStack() as stack:
            if self.fused == "exact":
                from .decode_norm import gemma_norms
                from .decode_rope import rope_swapped

                if "gemma_norm" in self.exact_kernels:
                    stack.enter_context(gemma_norms(self.model))
                if "rope" in self.exact_kernels:
                    stack.enter_context(rope_swapped(self.model))
            elif self.fused == "liger":
                module, rope = self._rope
                old = module.apply_rotary_pos_emb
                module.apply_rotary_pos_emb = rope
                stack.callback(setattr, module, "apply_rotary_pos_emb", old)
            yield

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
        return self._pool[0] * row_cache_bytes(self.model.config, self.dtype, self._pool[1])

    def plan(self, n_rows: int, longest: int) -> tuple[int, int]:
        """``(slots, cache length)`` for a call of ``n_rows`` rows whose longest prompt + output is
        ``longest`` tokens: the cache bucket of ``longest``; slots = the batch bucket of ``n_rows`` up to
        ``max_batch``, lowered to what the KV budget holds."""
        length = pick_bucket(self.cache_buckets, longest)
        cap = self.cfg.max_batch or (DEFAULT_MAX_SLOTS if self.device.type == "cuda" else 8)
        per_row = row_cache_bytes(self.model.config, self.dtype, length)
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
            if both[0] * row_cache_bytes(self.model.config, self.dtype, both[1]) <= self.kv_budget_bytes():
                slots, length = both
        self._graphs.clear()
        self.k = self.v = None  # free the old cache first
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        dev, dt = self.device, self.dtype
        shapes = [(slots, self.kv_heads, length if w is None else min(w, length), self.head_dim) for w in self.windows]
        self.k = [torch.zeros(shape, dtype=dt, device=dev) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dt, device=dev) for shape in shapes]
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

    def _length_mask(self, last: torch.Tensor, width: int) -> torch.Tensor:
        """``[B, 1, 1, width]`` additive mask: columns past each row's ``last`` are hidden (sdpa decoding)."""
        b = last.shape[0]
        mask = torch.zeros(b, width, dtype=self.dtype, device=self.device)
        mask.masked_fill_(self._cols[None, :width] > last[:, None], torch.finfo(self.dtype).min)
        return mask.view(b, 1, 1, width)

    def _decode_eager(self, b: int, length: int) -> torch.Tensor:
        lens = self._lens[:b]
        # a ring of window w: the new key goes to column lens mod w; columns 0..min(lens, w - 1) hold the window
        local = {w: (lens % w, lens.clamp(max=w - 1)) for w in set(self.windows) if w is not None}
        ctx = _Ctx(self.k, self.v, self._rows[:b], decode=True, windows=self.windows, length=length, lens=lens,
                   local=local, triton=self.attention == "triton")
        if not ctx.triton:
            ctx.mask = self._length_mask(lens, length)
            ctx.local_mask = {w: self._length_mask(last, min(w, self._pool[1])) for w, (_, last) in local.items()}
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
        n = torch.tensor([len(p) for p in prompts], device=dev)
        ctx = _Ctx(self.k, self.v, torch.tensor(rows, device=dev), decode=False, windows=self.windows, width=width,
                   ring={}, band={})
        for w in set(self.windows) - {None}:
            wc = min(w, self._pool[1])
            if width > wc:  # column c of a row of n tokens holds its last position p < n with p mod wc == c
                c = torch.arange(wc, device=dev)
                ctx.ring[wc] = c + wc * ((n[:, None] - 1 - c).clamp(min=0) // wc)
            if width > w:  # a token sees itself and the w - 1 tokens before it
                i = torch.arange(width, device=dev)
                ctx.band[w] = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
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
        st._layers = self.layers
        local = [(w, self.windows.count(w)) for w in sorted(set(self.windows) - {None})]
        n_global = self.windows.count(None)
        if local and (st._kv_cols is None or st._kv_cols.device != dev):
            st._kv_cols = torch.zeros((), dtype=torch.long, device=dev)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling settings for {len(prompts)} prompts")
        params = plist[0]
        if any(shared_key(p) != shared_key(params) for p in plist):
            raise ValueError(f"slots engine: the rows of one call must share {SHARED_PARAMS}; run groups separately")
        row_set = [(float(p.temperature or 0.0), float(p.repetition_penalty), int(getattr(p, "repetition_window", 0)))
                   for p in plist]
        uniform = len(set(row_set)) == 1  # one decoding: the plain path; else each row its own
        span = None if any(w <= 0 for _, _, w in row_set) else max(w for _, _, w in row_set)  # penalty look-back
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
                scores = pen.apply(scores, hist, counts, r_pen[sel], r_win[sel], span)
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
            for kc, vc in zip(self.k, self.v):  # (a ring holds at most its width)
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
                    if local:
                        c = lens + 1
                        st._kv_cols += (act * (n_global * c + sum(n * c.clamp(max=w) for w, n in local))).sum()
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
