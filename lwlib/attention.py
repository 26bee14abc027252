"""Attention for packed training: the flattened-pack kernels, their detection and fallback, and the ``auto`` choice.

A batch of packs flattened into one row (:class:`lwlib.packing.PackCollator` with ``flatten=True``) carries its
sequence boundaries as transformers' flash-attention keywords, ``cu_seq_lens_q``/``max_length_q``. Two attention
functions registered with transformers (:func:`register_varlen_attention`) run causal attention inside each
sequence of such a row, with no mask built and nothing waiting for the GPU:

- ``attn_implementation="torch_varlen"`` (:data:`VARLEN_ATTENTION`, :func:`varlen_attention_forward`): PyTorch's
  own FlashAttention varlen kernel (``torch.nn.attention.varlen``, FlashAttention-2; PyTorch 2.10+), for CUDA
  machines without the flash-attn package;
- ``attn_implementation="fa4_varlen"`` (:data:`FA4_ATTENTION`, :func:`fa4_attention_forward`): FlashAttention-4's
  kernels (the ``flash-attn-4`` package, CuTe DSL, Hopper and Blackwell GPUs: FlashAttention-3's Hopper algorithm
  on an H100), wrapped as PyTorch custom operators (``lwlib::fa4_varlen_fwd``/``_bwd``, registered when this
  module is imported) that ``torch.compile`` keeps as opaque calls.

Sliding-window layers (Gemma 3: 5 of every 6 layers attend over the last ``sliding_window`` tokens): transformers
passes each layer's window to the attention function (``sliding_window=``, None for full layers; a query sees itself
and the ``sliding_window - 1`` tokens before it, as transformers' own masks), and both kernels apply it inside each
packed sequence: PyTorch's varlen kernel as ``window_size=(sliding_window - 1, 0)`` (PyTorch 2.11+), FlashAttention-4
as ``window_size_left=sliding_window - 1, window_size_right=0``. What a kernel cannot apply (a window on PyTorch 2.10's
varlen kernel, attention logit softcapping, bidirectional or other layer types) is refused, never run as plain causal
attention: :func:`check_packed_attention` before training, and the attention functions again on every call. The
unflattened packs of sdpa, eager and flex_attention get the window from transformers' masks (built from the config,
with positions remapped per packed sequence), flash_attention_2 from transformers itself (``tests/test_sft.py``).

Off CUDA both run a per-sequence sdpa loop with the same result, window included (:func:`_varlen_reference`, also
the GPU kernels' reference in ``tests/test_sft_gpu.py``). What is installed: :func:`varlen_available`,
:func:`flash_attn2_available`, :func:`fa4_available`. What the stages use for ``attn_implementation: auto``:
:func:`pick_attn` (SFT's packs, measured in benchmarks/README.md) and :func:`pick_padded_attn` (DPO's padded
batches); :func:`flat_packs` says whether an implementation takes flattened packs.

Usage::

    register_varlen_attention()
    attn = pick_attn("auto", "cuda", compiled=True)                     # e.g. "fa4_varlen"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)
    check_packed_attention(model.config, attn)                          # raises if a layer needs what attn lacks
    collator = PackCollator(pad_id=tok.pad_token_id, flatten=flat_packs(attn))
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import warnings
from typing import Any

import torch

VARLEN_ATTENTION = "torch_varlen"
FA4_ATTENTION = "fa4_varlen"


def flat_packs(attn_implementation: str) -> bool:
    """Whether an attention implementation takes packs flattened into one row (``PackCollator(flatten=True)``):
    the varlen kernels do; sdpa, eager and flex_attention take one row per pack."""
    return attn_implementation.startswith("flash_attention") or attn_implementation in (VARLEN_ATTENTION,
                                                                                          FA4_ATTENTION)


def pick_attn(name: str, device: str, compiled: bool = False) -> str:
    """``sft.attn_implementation`` for packed training (see :class:`lwlib.sft.SFTConfig`): a name is kept; ``auto``
    is, on CUDA, ``fa4_varlen`` when flash-attn-4 is installed on a Hopper or Blackwell GPU, else flash_attention_2
    when that package is installed, else ``torch_varlen`` when compiled (PyTorch 2.10+) and flex_attention otherwise
    (packed training measured 1.6x faster than sdpa on an H100: ``benchmarks/results/sft_h100.json``); sdpa on CPU
    (or when ``device`` is ``cpu``)."""
    if name != "auto":
        return name
    if not (torch.cuda.is_available() and device != "cpu"):
        return "sdpa"
    if fa4_available():
        return FA4_ATTENTION
    if flash_attn2_available():
        return "flash_attention_2"
    return VARLEN_ATTENTION if compiled and varlen_available() else "flex_attention"


def pick_padded_attn(device: str) -> str:
    """Attention for padded (unpacked) batches, DPO's: flash_attention_2 where :func:`pick_attn` picks it (it handles
    padding), else sdpa. flex_attention only pays off for packs, and the flattened-pack kernels (``torch_varlen``,
    ``fa4_varlen``) need :class:`lwlib.packing.PackCollator`'s flattened packs, which TRL's DPO collator does not
    make."""
    attn = pick_attn("auto", device)
    return attn if attn == "flash_attention_2" else "sdpa"


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
    :class:`lwlib.packing.PackCollator` ``(flatten=True)``. A layer's ``sliding_window`` keyword (transformers passes
    it; None = full causal) limits each query to itself and the ``sliding_window - 1`` tokens before it. On CUDA
    PyTorch's FlashAttention varlen kernel (in bf16/fp16: the autocast dtype, bf16 for fp32 inputs); elsewhere a
    per-sequence sdpa loop with the same result. Raises ``ValueError`` for what the kernel cannot apply
    (:func:`check_packed_attention`)."""
    return _flat_attention(VARLEN_ATTENTION, module, query, key, value, dropout, scaling, kwargs)


def fa4_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """:func:`varlen_attention_forward` with FlashAttention-4's varlen kernels on CUDA (``flash-attn-4``; GQA
    without copying key/value heads); elsewhere the same per-sequence sdpa loop."""
    return _flat_attention(FA4_ATTENTION, module, query, key, value, dropout, scaling, kwargs)


def _flat_attention(name: str, module, query, key, value, dropout, scaling, kwargs) -> tuple[torch.Tensor, None]:
    cu_q, max_q = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_q is None or max_q is None:
        raise ValueError(f"attn_implementation={name!r} needs cu_seq_lens_q and max_length_q in the "
                         "model's inputs: batches from PackCollator(flatten=True)")
    cu_k, max_k = kwargs.get("cu_seq_lens_k", cu_q), kwargs.get("max_length_k", max_q)
    if query.shape[0] != 1:
        raise ValueError(f"{name}: packs must be flattened into one row, got batch {query.shape[0]}")
    if dropout:
        raise ValueError(f"{name}: attention dropout is not supported (got {dropout})")
    window = kwargs.get("sliding_window")
    layer_type = getattr(module, "layer_type", None) or ("sliding_attention" if window else "full_attention")
    problem = _kernel_limit(name, layer_type, window, kwargs.get("softcap"), getattr(module, "is_causal", True))
    if problem:
        config = getattr(module, "config", None)
        raise ValueError(_refusal(name, _model_name(config) if config is not None else "this model",
                                  getattr(module, "layer_idx", "?"), layer_type, problem))
    left = window - 1 if window else -1  # keys visible to query i: i - left .. i (-1: all before it)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, heads, head_dim)
    groups = q.shape[1] // k.shape[1]
    if not q.is_cuda:
        out = _varlen_reference(q, k, v, cu_q, scaling, groups, window)
    else:
        cu_q, cu_k = cu_q.to(q.device, torch.int32), cu_k.to(q.device, torch.int32)
        dtype = q.dtype
        q, k, v = (t.to(_kernel_dtype(dtype)) for t in (q, k, v))  # RoPE leaves q, k in fp32 under autocast
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        if name == FA4_ATTENTION:
            out = torch.ops.lwlib.fa4_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left)[0]
        else:
            out = _varlen_cuda(q, k, v, cu_q, cu_k, max_q, max_k, scale, groups, left)
        out = out.to(dtype)
    return out.unsqueeze(0), None


def check_packed_attention(config, attn_implementation: str) -> None:
    """Refuse a model whose layers need what a flattened-pack kernel cannot apply, before any training step: raises
    ``ValueError`` naming the model, the layer and its type, and the kernel. ``torch_varlen`` and ``fa4_varlen``
    run causal attention inside each packed sequence, over the whole sequence (``full_attention``) or over a
    sliding window (``sliding_attention``; ``torch_varlen`` needs PyTorch 2.11+'s ``window_size`` for it); refused:
    any other layer type (chunked, bidirectional), attention logit softcapping (Gemma 2) and non-causal attention.
    Other implementations are left to transformers (its masks and flash-attention path apply windows themselves;
    sdpa refuses softcapping). The attention functions apply the same rules on every call.

    Usage: ``check_packed_attention(model.config, "torch_varlen")``
    """
    if attn_implementation not in (VARLEN_ATTENTION, FA4_ATTENTION):
        return
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    causal = not getattr(cfg, "use_bidirectional_attention", False) and getattr(cfg, "is_causal", True) is not False
    for i, (layer_type, window) in enumerate(layer_attention(cfg)):
        problem = _kernel_limit(attn_implementation, layer_type, window, softcap, causal)
        if problem:
            raise ValueError(_refusal(attn_implementation, _model_name(cfg), i, layer_type, problem))


def layer_attention(config) -> list[tuple[str, int | None]]:
    """``(layer type, sliding window or None)`` of every layer: :func:`lwlib.families.layer_types`."""
    from .families import layer_types

    return layer_types(config)


def _kernel_limit(kernel: str, layer_type: str, window: int | None, softcap: float | None, causal: bool) -> str | None:
    """Why ``kernel`` cannot run a layer as the model defines it, or None when it can."""
    if layer_type not in ("full_attention", "sliding_attention"):
        return f"layer type {layer_type!r} (only full and sliding-window causal attention run on flattened packs)"
    if not causal:
        return "bidirectional attention (the kernels here run causal attention only)"
    if softcap:
        return f"attention logit softcapping ({softcap}), which is not wired into {kernel}"
    if window is not None and window < 1:
        return f"a sliding window of {window} tokens"
    if window and kernel == VARLEN_ATTENTION and "window_size" not in _VARLEN_PARAMS:
        return (f"a sliding window of {window} tokens, which PyTorch {torch.__version__}'s varlen_attn cannot apply "
                "(its window_size argument came with PyTorch 2.11)")
    return None


def _refusal(kernel: str, model: str, layer, layer_type: str, problem: str) -> str:
    return (f"attn_implementation={kernel!r} cannot train {model}: layer {layer} ({layer_type}) needs {problem}. "
            "Training on it would attend differently from the model that generates: pick another "
            "sft.attn_implementation (fa4_varlen, flash_attention_2, flex_attention or sdpa apply sliding windows)")


def _model_name(config) -> str:
    name = getattr(config, "_name_or_path", "") or ""
    kind = getattr(config, "model_type", None) or type(config).__name__
    return f"{kind} model {name!r}" if name else f"the {kind} model"


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


def _varlen_cuda(q, k, v, cu_q, cu_k, max_q, max_k, scaling, groups, left: int = -1):
    extra: dict[str, Any] = {"scale": scaling}
    if "window_size" in _VARLEN_PARAMS:
        extra["window_size"] = (left, 0)  # (-1, 0): causal; (W - 1, 0): causal over the last W tokens
    elif left >= 0:  # refused before (check_packed_attention / _kernel_limit); never run it as plain causal
        raise ValueError(f"PyTorch {torch.__version__}'s varlen_attn has no window_size: cannot apply a sliding window")
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
# Causal attention, over the whole sequence (window_left -1) or over the last window_left + 1 tokens (a sliding
# window; flash-attn's local attention, window_size_right 0); lse is (heads, total) in fp32 as the kernels write it.

def _fa4_window(window_left: int) -> dict[str, int | None]:
    return {"window_size_left": None if window_left < 0 else window_left,
            "window_size_right": None if window_left < 0 else 0}


@torch.library.custom_op("lwlib::fa4_varlen_fwd", mutates_args=(), device_types="cuda")
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
             max_q: int, max_k: int, scale: float, window_left: int) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                               max_seqlen_k=max_k, softmax_scale=scale, causal=True, return_lse=True,
                               **_fa4_window(window_left))[:2]
    return out, lse


@_fa4_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("lwlib::fa4_varlen_bwd", mutates_args=(), device_types="cuda")
def _fa4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
             scale: float, window_left: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=True, cu_seqlens_q=cu_q,
                                 cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
                                 **_fa4_window(window_left))[:3]
    return dq, dk, dv


@_fa4_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window_left):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa4_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k)
    ctx.max_q, ctx.max_k, ctx.scale, ctx.window_left = max_q, max_k, scale, window_left


def _fa4_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.lwlib.fa4_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.max_q,
                                                ctx.max_k, ctx.scale, ctx.window_left)
    return dq, dk, dv, None, None, None, None, None, None


_fa4_fwd.register_autograd(_fa4_backward, setup_context=_fa4_setup_context)


def _varlen_reference(q, k, v, cu, scaling, groups, window: int | None = None):
    """Per-sequence causal sdpa over the same boundaries, each query over itself and the ``window - 1`` tokens
    before it when ``window`` is given (transformers' sliding-window mask): the CPU path and the GPU kernels'
    reference. ``q``, ``k``, ``v``: ``(total, heads, head_dim)``."""
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seq_lens_q {bounds[:3]}...{bounds[-1]} does not cover the row of {q.shape[0]} tokens")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        mask = None
        if window and e - s > window:
            i = torch.arange(e - s, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # (query, key)
        out.append(sdpa(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), attn_mask=mask,
                        is_causal=mask is None, scale=scaling).transpose(0, 1))
    return torch.cat(out)
