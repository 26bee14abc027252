"""Model families: what the slots engine (and packed training) must know about an architecture, in one place.

* which layers attend over a sliding window, and its size (:func:`layer_windows`): from the config's
  ``layer_types`` (``"sliding_attention"`` / ``"full_attention"``, transformers 5) and ``sliding_window``, else
  ``sliding_window`` for every layer where ``use_sliding_window`` is not false (Mistral's older configs);
* which of Liger-Kernel's fused kernels a model gets (:func:`liger_kernels`: training and the engine) and whether
  the engine also swaps in Liger's RoPE for its passes (:class:`Family` ``liger``: the llama family; Gemma 3's
  kernels are checked against the plain path in training (``tests/test_sft_gpu.py``), but Liger's RMSNorm is not
  bit-exact, so the engine runs Gemma 3's norms and RoPE as its own bit-exact kernels instead: ``exact``);
* what the engine cannot decode (:func:`unsupported`): logit soft-capping (Gemma 2), scaled logits (Cohere), or an
  attention soft-cap, which the decoding kernels do not apply.

Gemma 3 (``gemma3_text``: 5 sliding-window layers of 512 tokens per global layer, one key/value head of 256, QK-norm,
separate RoPE bases for local and global layers, embeddings scaled by sqrt(hidden)) needs nothing else from the
engine: the model's own modules compute the norms, RoPE and scaling, and the engine keeps each local layer's cache
as a ring buffer of its window.

Usage::

    fam = family(model.config)                  # Family(name="gemma3", ...)
    windows = layer_windows(model.config)       # [512, 512, 512, 512, 512, None, ...]
    if (why := unsupported(model.config)): raise ValueError(why)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """An architecture family.

    Fields:
        name: the family's name (recorded by the engine's stats and the benchmarks).
        model_types: the transformers ``model_type`` values it covers.
        liger: Liger-Kernel's fused RMSNorm and MLP (:func:`lwlib.training.use_liger`) and its fused RoPE
            (``liger_kernel.transformers.rope.liger_rotary_pos_emb``, swapped for the module's
            ``apply_rotary_pos_emb`` during the engine's forward passes) compute exactly this family's layers.
        exact: the engine's own bit-exact kernels that fit this family's modules (``fused_kernels: exact``; each
            checked on the device first): ``gemma_norm`` (transformers' ``Gemma3RMSNorm`` as
            :func:`lwlib.decode_norm.gemma_rms_norm`: three kernels, the same bits) and ``rope`` (the modeling
            module's ``apply_rotary_pos_emb`` as :func:`lwlib.decode_rope.apply_rotary`: one kernel per tensor).
    """

    name: str
    model_types: tuple[str, ...]
    liger: bool = False
    exact: tuple[str, ...] = ()


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), liger=True),
    Family("gemma3", ("gemma3_text", "gemma3"), exact=("gemma_norm", "rope")),
)
GENERIC = Family("generic", ())


def text_config(config: Any) -> Any:
    """The text model's config (a multimodal config's ``text_config``; else the config itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family(config: Any) -> Family:
    """The :class:`Family` of a model config (:data:`GENERIC` for a type no family names)."""
    mtype = getattr(text_config(config), "model_type", "")
    return next((f for f in FAMILIES if mtype in f.model_types), GENERIC)


def layer_types(config: Any) -> list[tuple[str, int | None]]:
    """``(layer type, sliding window or None)`` of every layer, as transformers' attention modules pass them to the
    attention function: the config's ``layer_types`` where it has them (Gemma 3, Qwen 2/3: a ``sliding_attention``
    layer gets ``sliding_window``), else every layer sliding when the config sets ``sliding_window`` (and
    ``use_sliding_window`` is not false: Mistral), else every layer full. Types are not checked here (packed training
    refuses the ones its kernels cannot run, :func:`lwlib.attention.check_packed_attention`; the slots engine
    through :func:`layer_windows`).

    Usage: ``layer_types(model.config)[:6]`` (Gemma-3-270M: 5 x ``("sliding_attention", 512)``, then
    ``("full_attention", None)``)
    """
    c = text_config(config)
    window, n = getattr(c, "sliding_window", None), c.num_hidden_layers
    types = getattr(c, "layer_types", None)
    if types is None:
        sliding = bool(window) and getattr(c, "use_sliding_window", True)
        types = ["sliding_attention" if sliding else "full_attention"] * n
    return [(t, window if t == "sliding_attention" else None) for t in types[:n]]


def layer_windows(config: Any) -> list[int | None]:
    """Per layer, the sliding window it attends over (a token sees itself and the ``window - 1`` tokens before
    it, transformers' rule) or None for a layer that attends over everything.

    Usage: ``layer_windows(AutoConfig.from_pretrained("google/gemma-3-270m"))[:6] == [512] * 5 + [None]``
    """
    c = text_config(config)
    pairs = layer_types(c)
    if len(pairs) != c.num_hidden_layers:
        raise ValueError(f"{getattr(c, 'model_type', 'model')}: {len(pairs)} layer_types for {c.num_hidden_layers} layers")
    unknown = sorted({t for t, _ in pairs} - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"{getattr(c, 'model_type', 'model')}: layer types {unknown} are not supported "
                         "(sliding_attention and full_attention are)")
    if any(t == "sliding_attention" and not w for t, w in pairs):
        raise ValueError(f"{getattr(c, 'model_type', 'model')}: sliding_attention layers without a sliding_window")
    return [int(w) if w else None for _, w in pairs]


def liger_kernels(config: Any) -> dict[str, bool]:
    """Which of Liger-Kernel's kernels :func:`lwlib.training.use_liger` patches into a model of this config: the
    keywords of Liger's ``_apply_liger_kernel_to_instance`` (liger-kernel 0.8.5).

    - Always off: RoPE (Liger patches it module-wide, for every model of the family in the process; the slots engine
      swaps it in for its own passes where :class:`Family` ``liger`` says it is exact) and both losses (the fused loss
      is :func:`lwlib.losses.liger_sft_loss`, outside the model).
    - Llama, Mistral, Qwen 2/3 and the other SwiGLU families: Liger's defaults, fused RMSNorm and SwiGLU.
    - ``gemma3_text`` (Gemma-3-270M): fused RMSNorm with Gemma's ``(1 + weight)`` (offset 1.0) and casting mode
      "gemma" (all in fp32), not in place, on every norm (the query/key norms too); and GeGLU for the MLP, whose kernel
      computes GELU's tanh approximation only, so a config whose ``hidden_activation`` is another function is refused.

    Usage: ``_apply_liger_kernel_to_instance(model=model, **liger_kernels(model.config))``
    """
    kinds = {"rope": False, "fused_linear_cross_entropy": False, "cross_entropy": False}
    c = text_config(config)
    if getattr(c, "model_type", None) == "gemma3_text":
        act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"sft.liger_kernel: Liger's GeGLU kernel computes gelu_pytorch_tanh, but this "
                             f"{c.model_type} model's MLP uses {act!r}; set sft.liger_kernel: false")
        kinds.update(rms_norm=True, geglu=True)
    return kinds


def unsupported(config: Any) -> str | None:
    """Why the slots engine cannot decode this model exactly (None if it can)."""
    c = text_config(config)
    for name in ("final_logit_softcapping", "attn_logit_softcapping", "logit_scale"):
        if getattr(c, name, None):
            return f"sets {name}={getattr(c, name)}, which the slots engine does not apply"
    return None
