"""Model families: what the slots engine (and packed training) must know about an architecture, in one place.

* which layers attend over a sliding window, and its size (:func:`layer_windows`): from the config's
  ``layer_types`` (``"sliding_attention"`` / ``"full_attention"``, transformers 5) and ``sliding_window``, else
  ``sliding_window`` for every layer where ``use_sliding_window`` is not false (Mistral's older configs);
* whether Liger-Kernel's fused kernels are exact for the family (:class:`Family`): the llama family's RMSNorm,
  SwiGLU and rotate-half RoPE are; Gemma 3's RMSNorm (weight offset 1, fp32 compute), GeGLU and QK-norm are
  patched by Liger's own Gemma 3 entry point, not checked against this engine here, so it stays off;
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
    """

    name: str
    model_types: tuple[str, ...]
    liger: bool = False


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), liger=True),
    Family("gemma3", ("gemma3_text", "gemma3")),
)
GENERIC = Family("generic", ())


def text_config(config: Any) -> Any:
    """The text model's config (a multimodal config's ``text_config``; else the config itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family(config: Any) -> Family:
    """The :class:`Family` of a model config (:data:`GENERIC` for a type no family names)."""
    mtype = getattr(text_config(config), "model_type", "")
    return next((f for f in FAMILIES if mtype in f.model_types), GENERIC)


def layer_windows(config: Any) -> list[int | None]:
    """Per layer, the sliding window it attends over (a token sees itself and the ``window - 1`` tokens before
    it, transformers' rule) or None for a layer that attends over everything.

    Usage: ``layer_windows(AutoConfig.from_pretrained("google/gemma-3-270m"))[:6] == [512] * 5 + [None]``
    """
    c = text_config(config)
    n = c.num_hidden_layers
    window = getattr(c, "sliding_window", None)
    types = getattr(c, "layer_types", None)
    if types is not None:
        if len(types) != n:
            raise ValueError(f"{getattr(c, 'model_type', 'model')}: {len(types)} layer_types for {n} layers")
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ValueError(f"{getattr(c, 'model_type', 'model')}: layer types {unknown} are not supported "
                             "(sliding_attention and full_attention are)")
        if window is None and "sliding_attention" in types:
            raise ValueError(f"{getattr(c, 'model_type', 'model')}: sliding_attention layers without a sliding_window")
        return [int(window) if t == "sliding_attention" else None for t in types]
    if window and getattr(c, "use_sliding_window", True):
        return [int(window)] * n
    return [None] * n


def unsupported(config: Any) -> str | None:
    """Why the slots engine cannot decode this model exactly (None if it can)."""
    c = text_config(config)
    for name in ("final_logit_softcapping", "attn_logit_softcapping", "logit_scale"):
        if getattr(c, name, None):
            return f"sets {name}={getattr(c, name)}, which the slots engine does not apply"
    return None
