"""Rotary position embedding of queries and keys in one kernel each instead of five, bit for bit transformers'
``apply_rotary_pos_emb``, for the slots engine's passes.

transformers computes ``q * cos + rotate_half(q) * sin`` (``rotate_half``: the halves swapped, the second negated)
as five elementwise kernels for ``q`` and five for ``k``: 180 small kernels in a step of Gemma-3-270M's 18 layers.
:func:`apply_rotary` does each tensor in one Triton kernel with the eager module's roundings: in half precision each
product is rounded to the tensor's dtype before the sum (as the two separate eager kernels store them), in fp32
the kernel is compiled without fused multiply-adds (``enable_fp_fusion=False``), so both products are rounded
before their sum as the eager kernels do. Bit-exactness on a device is checked, not assumed (:func:`self_check`),
like :mod:`lwlib.decode_norm`'s.

Usage::

    q, k = apply_rotary(q, k, cos, sin)      # == transformers' apply_rotary_pos_emb(q, k, cos, sin), unsqueeze_dim 1
    with rope_swapped(model): model(...)     # the model's modeling module calls it instead
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .decode_attention import available

try:  # Triton ships with CUDA builds of torch; on CPU it is optional (the interpreter, for tests)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (5.x, ``unsqueeze_dim=1``), op for op."""
    def rot(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rot(q) * sin), (k * cos) + (rot(k) * sin)


def _rope_kernel(X, C, S, Y, H, T, sx_b, sx_h, sx_t, sc_b, sc_t, ss_b, ss_t, sy_b, sy_h, sy_t,
                 D: tl.constexpr, ROUND: tl.constexpr):
    row = tl.program_id(0)  # one (b, h, t) row of D elements
    t = row % T
    h = (row // T) % H
    b = row // (T * H)
    d = tl.arange(0, D)
    half = D // 2
    x = tl.load(X + b * sx_b + h * sx_h + t * sx_t + d).to(tl.float32)  # (exact: every product is in fp32)
    other = tl.load(X + b * sx_b + h * sx_h + t * sx_t + (d + half) % D).to(tl.float32)
    rot = tl.where(d < half, -other, other)  # rotate_half: (-x2, x1); a sign flip is exact in any dtype
    c = tl.load(C + b * sc_b + t * sc_t + d).to(tl.float32)
    s = tl.load(S + b * ss_b + t * ss_t + d).to(tl.float32)
    a = x * c
    r = rot * s
    if ROUND:  # half precision: each eager product is stored in the tensor's dtype before the sum
        a = a.to(Y.dtype.element_ty).to(tl.float32)
        r = r.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + b * sy_b + h * sy_h + t * sy_t + d, (a + r).to(Y.dtype.element_ty))


_KERNELS: list[Any] = []


def _kernel() -> Any:
    if not _KERNELS:  # (under TRITON_INTERPRET, triton.jit gives the interpreter's functions)
        _KERNELS.append(triton.jit(_rope_kernel))
    return _KERNELS[0]


def _fits(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether :func:`apply_rotary` takes these inputs (q, k ``[B, H, T, D]``, D a power of two, the last dimension
    contiguous; cos, sin ``[B, T, D]`` of their dtype)."""
    def one(x):
        d = x.shape[-1]
        return (x.dim() == 4 and cos.dim() == 3 and cos.shape == (x.shape[0], x.shape[2], d) and d >= 2
                and d & (d - 1) == 0 and x.stride(-1) == 1 and x.dtype == cos.dtype)

    return (one(q) and one(k) and sin.shape == cos.shape and cos.stride(-1) == 1 and sin.stride(-1) == 1
            and sin.dtype == cos.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    y = torch.empty_like(x)  # the eager result's layout (a transposed view stays one)
    if y.stride(-1) != 1:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    opts = {} if x.dtype != torch.float32 else {"enable_fp_fusion": False}
    _kernel()[(b * h * t,)](x, cos, sin, y, h, t, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
                            sin.stride(0), sin.stride(1), y.stride(0), y.stride(1), y.stride(2), D=d,
                            ROUND=x.dtype != torch.float32, **opts)
    return y


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``[B, H, T, D]`` and ``k`` ``[B, KV, T, D]`` (any strides, the last dimension contiguous; D a power of
    two), ``cos``/``sin`` ``[B, T, D]`` of their dtype: :func:`apply_rotary_reference`'s result, one kernel each
    (CUDA, or CPU under Triton's interpreter)."""
    if not available(q.device):
        raise RuntimeError(f"apply_rotary: needs Triton and a CUDA device (got {q.device})")
    if not _fits(q, k, cos, sin):
        raise ValueError(f"apply_rotary: q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin "
                         f"{tuple(sin.shape)} do not fit (q, k [B, H, T, D] with D a power of two and the last "
                         "dimension contiguous; cos, sin [B, T, D] of their dtype)")
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def self_check(device: torch.device | str, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int
               ) -> str | None:
    """``None`` if :func:`apply_rotary` equals :func:`apply_rotary_reference` bit for bit on ``device`` for random
    queries and keys of the model's shape (a decoding step's and a prefill's, the queries transposed as the
    attention layers pass them); else why not. Under Triton's interpreter (CPU) its casts to half precision
    truncate: there half precision is ``None`` within rounding."""
    from .decode_attention import interpreting

    if not available(device):
        return f"Triton {'not installed' if triton is None else 'needs a CUDA device'} ({device})"
    g = torch.Generator().manual_seed(0)
    for b, t in ((64, 1), (2, 40)):
        q = (torch.randn(b, t, heads, head_dim, generator=g) * 4).to(device, dtype).transpose(1, 2)
        k = (torch.randn(b, t, kv_heads, head_dim, generator=g) * 4).to(device, dtype).transpose(1, 2)
        ang = torch.rand(b, t, head_dim // 2, generator=g) * 3e4
        cos = torch.cat((ang, ang), -1).cos().to(device, dtype)
        sin = torch.cat((ang, ang), -1).sin().to(device, dtype)
        try:
            got, want = apply_rotary(q, k, cos, sin), apply_rotary_reference(q, k, cos, sin)
        except Exception as e:  # noqa: BLE001 - any failure (compiler, driver) means: do not use it
            return f"{type(e).__name__}: {e}"
        for x, y in zip(got, want):
            if interpreting() and torch.device(device).type == "cpu" and dtype != torch.float32:
                # the interpreter truncates each product and the sum: a few units of the operands' last place
                ok = bool(((x.float() - y.float()).abs() <= 0.05 * y.float().abs().max()).all())
            else:
                ok = torch.equal(x, y)
            if not ok:
                diff = (x.float() - y.float()).abs().max().item()
                return f"shape {tuple(x.shape)}: differs from the eager RoPE by up to {diff:.3g} (it must be bit-exact)"
    return None


@contextmanager
def rope_swapped(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the model's modeling module calls :func:`apply_rotary` for ``apply_rotary_pos_emb``
    (inputs it does not fit, or another ``unsqueeze_dim``, go to the module's own function)."""
    module = importlib.import_module(type(model).__module__)
    own = module.apply_rotary_pos_emb

    def swapped(q, k, cos, sin, unsqueeze_dim=1, *args, **kwargs):
        if unsqueeze_dim == 1 and not args and not kwargs and available(q.device) and _fits(q, k, cos, sin):
            return apply_rotary(q, k, cos, sin)
        return own(q, k, cos, sin, unsqueeze_dim, *args, **kwargs)

    module.apply_rotary_pos_emb = swapped
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = own
