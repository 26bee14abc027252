"""Length-exact decoding attention for the slots engine: a split-K ("flash-decoding") Triton kernel over the
slot KV cache, grouped-query heads read once per key/value head.

One decoding step has one query token per row. Row ``b`` attends to columns ``0..lens[b]`` of its slot of the
cache ``[slots, kv_heads, L, d]`` (``lens[b]`` is the column its new key was just written to). PyTorch's
``scaled_dot_product_attention`` under a length mask reads all ``L`` columns of every row, so a step costs the
cache bucket, not the rows' contexts. Here each program reads one row's ``split`` keys of one key/value head
(programs past the row's length stop at once), keeps an online softmax for the ``G`` query heads of that
key/value head, and writes an unnormalized partial; a second kernel merges a row's partials. What a step reads is
the rows' real contexts (to a block of columns), whatever the bucket.

On CUDA the kernels are compiled by Triton on first use (seconds, once per dtype; Triton keeps them on disk, in
``$TRITON_CACHE_DIR``: :func:`lwlib.runs.compile_caches`); on CPU they run in Triton's interpreter (slow: tests only). :func:`decode_attention_reference` is the
same computation in plain torch.

Usage::

    out = decode_attention(q, k_cache, v_cache, lens, scale)   # q [B, H, d] -> [B, H, d]
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

try:  # Triton ships with CUDA builds of torch; on CPU it is optional (the interpreter, for tests)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

SPLIT = 256  # keys per program
BLOCK = 64  # keys per inner iteration (fewer where a row of keys is wider than 512 bytes: :func:`block_keys`)


def block_keys(head_dim: int, element_size: int) -> int:
    """Keys per inner iteration: :data:`BLOCK`, halved for every doubling of a key's bytes past 512 (head_dim x
    element size), at least 16. A block of keys and values must fit the GPU's shared memory with Triton's
    pipelining: Gemma 3's head_dim 256 in fp32 at 64 keys asked for 282,688 bytes on an H200 (232,448 there).
    ``block_keys(256, 2) == 64``, ``block_keys(256, 4) == 32``."""
    row = head_dim * element_size
    return BLOCK if row <= 512 else max(16, BLOCK * 512 // row)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, which must be set before triton is
    imported: the tests set it on machines without CUDA)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false")


def available(device: torch.device | str) -> bool:
    """Whether :func:`decode_attention` can run on ``device``: Triton importable, and a CUDA device (or CPU
    under Triton's interpreter)."""
    kind = torch.device(device).type
    return triton is not None and (kind == "cuda" or (kind == "cpu" and interpreting()))


def self_check(device: torch.device | str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> str | None:
    """Run the kernel once on small random inputs of the model's shape and compare it with
    :func:`decode_attention_reference`: ``None`` if it agrees, else why not (the engine then keeps sdpa)."""
    if not available(device):
        return f"Triton {'not installed' if triton is None else 'needs a CUDA device'} ({device})"
    if head_dim & (head_dim - 1) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(3, kv_heads, 2 * SPLIT, head_dim, generator=g).to(device, dtype) for _ in range(2))
    q = torch.randn(3, heads, head_dim, generator=g).to(device, dtype)
    lens = torch.tensor([0, SPLIT, 2 * SPLIT - 1], device=device)
    try:
        err = (decode_attention(q, k, v, lens, head_dim ** -0.5).float()
               - decode_attention_reference(q, k, v, lens, head_dim ** -0.5).float()).abs().max().item()
    except Exception as e:  # noqa: BLE001 - any failure (compiler, driver) means: do not use it
        return f"{type(e).__name__}: {e}"
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return None if err <= tol else f"max difference {err:.3g} from the reference (tolerance {tol})"


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Plain torch: row ``b``'s ``H`` query heads ``q[b]`` over columns ``0..lens[b]`` of slot ``b`` of ``k``/``v``
    (``[slots, kv_heads, L, d]``); head ``h`` reads key/value head ``h // (H // kv_heads)``."""
    b, heads, d = q.shape
    kvh, length = k.shape[1], k.shape[2]
    g = heads // kvh
    qg = q.float().view(b, kvh, g, d)
    s = torch.einsum("bhgd,bhnd->bhgn", qg, k[:b].float()) * scale
    cols = torch.arange(length, device=q.device)
    s = s.masked_fill((cols[None, :] > lens[:, None])[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgn,bhnd->bhgd", s.softmax(-1), v[:b].float())
    return out.reshape(b, heads, d).to(q.dtype)


def _split_kernel(Q, K, V, Lens, Op, Mp, Lp, sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, scale, split,
                  n_splits, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    n = tl.load(Lens + b).to(tl.int32) + 1  # columns 0..lens[b]
    start = s * split
    if start < n:
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        q = tl.load(Q + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :], mask=(g < G)[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        end = tl.minimum(start + split, n)
        for j in range(start, end, BN):
            cols = j + tl.arange(0, BN)
            ok = cols < end
            k = tl.load(K + b * sk_b + h * sk_h + cols[:, None] * sk_n + d[None, :], mask=ok[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            sc = tl.where(ok[None, :], sc * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * sv_b + h * sv_h + cols[:, None] * sv_n + d[None, :], mask=ok[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        row = ((b * tl.num_programs(1) + h) * n_splits + s) * G
        keep = g < G
        tl.store(Op + (row + g)[:, None] * D + d[None, :], acc, mask=keep[:, None])
        tl.store(Mp + row + g, m_i, mask=keep)
        tl.store(Lp + row + g, l_i, mask=keep)


def _merge_kernel(Op, Mp, Lp, Lens, O, so_b, so_h, split, n_splits, G: tl.constexpr, GP: tl.constexpr,
                  D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(Lens + b).to(tl.int32) + 1
    used = (n + split - 1) // split
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    keep = g < G
    m = tl.full([GP], float("-inf"), tl.float32)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for s in range(0, used):
        row = ((b * tl.num_programs(1) + h) * n_splits + s) * G
        ms = tl.load(Mp + row + g, mask=keep, other=0.0)
        ls = tl.load(Lp + row + g, mask=keep, other=0.0)
        os_ = tl.load(Op + (row + g)[:, None] * D + d[None, :], mask=keep[:, None], other=0.0)
        m_new = tl.maximum(m, ms)
        a = tl.exp(m - m_new)
        c = tl.exp(ms - m_new)
        l_sum = l_sum * a + ls * c
        acc = acc * a[:, None] + os_ * c[:, None]
        m = m_new
    out = acc / tl.where(keep, l_sum, 1.0)[:, None]
    tl.store(O + b * so_b + (h * G + g)[:, None] * so_h + d[None, :], out.to(O.dtype.element_ty), mask=keep[:, None])


_KERNELS: list[Any] = []


def _kernels() -> tuple[Any, Any]:
    if not _KERNELS:  # (under TRITON_INTERPRET, triton.jit gives the interpreter's functions)
        _KERNELS.extend([triton.jit(_split_kernel), triton.jit(_merge_kernel)])
    return _KERNELS[0], _KERNELS[1]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float,
                     length: int | None = None, split: int = SPLIT, block: int | None = None,
                     num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """Attention of one query token per row over its slot's first ``lens[b] + 1`` cached columns.

    ``q`` ``[B, H, d]``; ``k``, ``v`` ``[slots, kv_heads, L, d]`` (``slots >= B``, row ``b`` = slot ``b``, the
    last dimension contiguous); ``lens`` ``[B]`` integer, every ``lens[b] < length`` (``length``: the columns
    any row may reach, default ``L``; it sizes the grid, so a CUDA graph captured at one ``length`` serves every
    shorter context). Returns ``[B, H, d]`` in ``q``'s dtype. fp32 inputs use exact fp32 products (no TF32).
    ``split`` (keys per program), ``block`` (keys per inner iteration, default :func:`block_keys`), ``num_warps``
    and ``num_stages`` (Triton's, default its own) tune the split kernel (``benchmarks/generation.py --attention-sweep``).
    """
    if not available(q.device):
        raise RuntimeError(f"decode_attention: needs Triton and a CUDA device (got {q.device}, Triton "
                           f"{'missing' if triton is None else 'without TRITON_INTERPRET=1'}); it ships with CUDA "
                           "builds of torch")
    b, heads, d = q.shape
    kvh = k.shape[1]
    if heads % kvh or k.shape[-1] != d or v.shape != k.shape or k.shape[0] < b:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} does not fit the cache {tuple(k.shape)}")
    if d & (d - 1) or d < 16:
        raise ValueError(f"decode_attention: head_dim must be a power of two >= 16, got {d}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode_attention: the last dimension of q, k and v must be contiguous")
    g = heads // kvh
    n_splits = math.ceil((length or k.shape[2]) / split)
    part = torch.empty(b * kvh * n_splits * g, d, dtype=torch.float32, device=q.device)
    m = torch.empty(b * kvh * n_splits * g, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    out = torch.empty(b, heads, d, dtype=q.dtype, device=q.device)
    split_k, merge_k = _kernels()
    gp = max(16, 1 << (g - 1).bit_length())
    ieee = q.dtype == torch.float32
    upcast = q.dtype == torch.bfloat16 and interpreting()  # the interpreter's dot has no bf16 (numpy)
    bn = block or block_keys(d, q.element_size())
    if bn < 16 or bn & (bn - 1) or split % bn:
        raise ValueError(f"decode_attention: block {bn} must be a power of two >= 16 dividing split {split}")
    tune = {k_: v_ for k_, v_ in (("num_warps", num_warps), ("num_stages", num_stages)) if v_ is not None}
    split_k[(b, kvh, n_splits)](q, k, v, lens, part, m, l_, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                k.stride(2), v.stride(0), v.stride(1), v.stride(2), float(scale), split, n_splits,
                                G=g, GP=gp, D=d, BN=bn, IEEE=ieee,
                                UPCAST=upcast, **tune)
    merge_k[(b, kvh)](part, m, l_, lens, out, out.stride(0), out.stride(1), split, n_splits, G=g, GP=gp, D=d)
    return out
