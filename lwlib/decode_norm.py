"""Gemma's RMSNorm in three kernels instead of about ten, bit for bit the eager module's result, for the slots
engine's decoding steps.

transformers' ``Gemma3RMSNorm`` computes, in fp32, ``x * rsqrt(mean(x**2) + eps) * (1 + w)`` and casts back: in
a bf16 step that is about ten small kernels (two casts of ``x``, the square, the mean, ``+ eps``, the rsqrt, the
weight's cast, ``1 +``, two products). Gemma-3-270M runs 109 of them per step (six per layer, the query and key
norms included, and the final one), most of a captured step's small kernels at batch 192 (benchmarks/README.md,
"where Gemma-3-270M's decoding step goes"). Liger-Kernel's fused Gemma RMSNorm does it in one, but sums the
squares in another order, so its outputs differ in the last bits and greedy decoding leaves ``generate``'s tokens.

:func:`gemma_rms_norm` keeps the one operation whose result depends on an order, the mean: (1) a Triton kernel
writes ``x.float() ** 2``; (2) PyTorch's own ``mean(-1, keepdim=True)`` reduces it (the eager module's reduction
kernel on the same tensor: the same sum, bit for bit); (3) a Triton kernel computes the rest element by element in
the eager order, ``(x.float() * rsqrt(ms + eps)) * (1.0 + w.float())``, and casts to ``x``'s dtype (round to
nearest even). Every other step is one IEEE operation on the same operands (no product feeds an addition, so
nothing contracts to a fused multiply-add); the rsqrt is the GPU's approximate instruction in both. Whether the
result is bit-exact on a device is checked, not assumed: :func:`self_check` compares it with the eager module on
random rows of the model's sizes, and the engine keeps the eager norms where it differs.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``: tests only): bit-exact in fp32 there too
(numpy's ``1 / sqrt`` is PyTorch's CPU rsqrt), but its casts to bf16 truncate instead of rounding.

Usage::

    y = gemma_rms_norm(x, norm.weight, norm.eps)        # == Gemma3RMSNorm.forward(norm, x), on CUDA bit for bit
    with gemma_norms(model): model(...)                  # every Gemma3RMSNorm of the process runs it
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .decode_attention import available, interpreting

try:  # Triton ships with CUDA builds of torch; on CPU it is optional (the interpreter, for tests)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

BLOCK = 1024  # elements per program


def gemma_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``Gemma3RMSNorm.forward`` (5.x), op for op."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).type_as(x)


def _square_kernel(X, S, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(S + offs, x * x, mask=ok)


def _scale_kernel(X, MS, W, Y, numel, eps, N: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    ms = tl.load(MS + offs // N, mask=ok, other=1.0)
    w = tl.load(W + offs % N, mask=ok, other=0.0).to(tl.float32)
    r = tl.math.rsqrt(ms + eps)
    y = (x * r) * (1.0 + w)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


_KERNELS: list[Any] = []


def _kernels() -> tuple[Any, Any]:
    if not _KERNELS:  # (under TRITON_INTERPRET, triton.jit gives the interpreter's functions)
        _KERNELS.extend([triton.jit(_square_kernel), triton.jit(_scale_kernel)])
    return _KERNELS[0], _KERNELS[1]


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm over the last dimension of a contiguous ``x`` (any float dtype; ``weight`` of that size):
    the result of :func:`gemma_rms_norm_reference` in three kernels (CUDA, or CPU under Triton's interpreter)."""
    if not available(x.device):
        raise RuntimeError(f"gemma_rms_norm: needs Triton and a CUDA device (got {x.device})")
    n = x.shape[-1]
    if not x.is_contiguous() or weight.shape != (n,) or not weight.is_contiguous():
        raise ValueError(f"gemma_rms_norm: x {tuple(x.shape)} must be contiguous and weight {tuple(weight.shape)} "
                         f"of its last dimension {n}")
    square, scale = _kernels()
    numel = x.numel()
    grid = (triton.cdiv(numel, BLOCK),)
    sq = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    square[grid](x, sq, numel, BLOCK=BLOCK)
    ms = sq.mean(-1, keepdim=True)  # the eager module's own reduction, on the same values in the same layout
    y = torch.empty_like(x)
    scale[grid](x, ms, weight, y, numel, float(eps), N=n, BLOCK=BLOCK)
    return y


def self_check(device: torch.device | str, dtype: torch.dtype, sizes: list[int], rows: int = 192) -> str | None:
    """``None`` if :func:`gemma_rms_norm` equals :func:`gemma_rms_norm_reference` bit for bit on ``device`` for
    random rows (several scales) of every size in ``sizes``; else why not (the engine then keeps the eager norms).
    Under Triton's interpreter (CPU) fp32 is bit-exact too, but its casts to half precision truncate: there
    ``None`` within rounding."""
    if not available(device):
        return f"Triton {'not installed' if triton is None else 'needs a CUDA device'} ({device})"
    g = torch.Generator().manual_seed(0)
    for n in sorted(set(sizes)):
        x = (torch.randn(rows, n, generator=g) * torch.logspace(-3, 3, rows)[:, None]).to(device, dtype)
        w = (torch.randn(n, generator=g) * 0.5).to(device, dtype)
        try:
            got, want = gemma_rms_norm(x, w, 1e-6), gemma_rms_norm_reference(x, w, 1e-6)
        except Exception as e:  # noqa: BLE001 - any failure (compiler, driver) means: do not use it
            return f"{type(e).__name__}: {e}"
        if interpreting() and torch.device(device).type == "cpu" and dtype != torch.float32:
            ok = torch.allclose(got.float(), want.float(), rtol=1e-2, atol=0)  # the interpreter truncates to bf16
        else:
            ok = torch.equal(got, want)
        if not ok:
            diff = (got.float() - want.float()).abs().max().item()
            return f"size {n}: differs from the eager norm by up to {diff:.3g} (it must be bit-exact)"
    return None


def norm_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's modules whose forward is transformers' own ``Gemma3RMSNorm.forward`` (Liger's or another
    patched norm is left alone)."""
    return [m for m in model.modules() if type(m).__name__ == "Gemma3RMSNorm"
            and type(m).__module__.startswith("transformers.") and "forward" not in m.__dict__]


@contextmanager
def gemma_norms(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, every ``Gemma3RMSNorm`` module of ``model``'s class runs :func:`gemma_rms_norm` (on a
    contiguous input on a device where it can run; else its own forward). Yields how many of ``model``'s modules
    it covers. The class's ``forward`` is swapped (restored after), so other models of that class in the process
    run it too inside the block; their results are the same bits."""
    mods = norm_modules(model)
    if not mods:
        yield 0
        return
    cls = type(mods[0])
    own = cls.forward

    def forward(self, x):
        if x.is_contiguous() and available(x.device):
            return gemma_rms_norm(x, self.weight, self.eps)
        return own(self, x)

    cls.forward = forward
    try:
        yield len(mods)
    finally:
        cls.forward = own
