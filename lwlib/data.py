"""The paper's benchmark files: LongBench-Write and LongWrite-Ruler (THUDM/LongWriter, Apache-2.0).

A file given explicitly (a profile's ``data_path``) is used as it is, or is an error naming it when it does not
exist: there is no fallback. Otherwise the official file is found, in order, in ``$LWLIB_DATA_DIR``,
``../shared/data`` beside the repository (this project's CI) and the cache (``$LWLIB_CACHE/data``), else
downloaded once from the paper's repository into the cache; a file found or downloaded that way must be the
official one (its sha256), else it is an error naming it. A given file of your own (a subset, a translation)
only gets a warning.

It also holds the one grammar of Hugging Face data sets in profiles (``sft.data_path``, ``sft.general_data``,
``dpo.general_data``): ``hf:<id>[:<config>][@<split>]``, read by :func:`parse_hf_spec` into an :class:`HFSpec`.

Usage::

    items = load_ruler()                    # 48 LongWrite-Ruler prompts
    bench = load_longbench_write()          # 120 LongBench-Write prompts, each tagged en/zh
    parse_hf_spec("hf:HuggingFaceH4/ultrachat_200k@train_sft", "sft.general_data")
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from .models import cache_dir
from .runs import REPO_ROOT, iter_jsonl, sha256_file

BASE_URL = "https://raw.githubusercontent.com/THUDM/LongWriter/main/evaluation/"
DOWNLOAD_TIMEOUT_S = 60.0  # per connect / read: a network that accepts and never answers fails, not hangs
FILES = {  # name: expected number of items
    "longbench_write.jsonl": 120,
    "longbench_write_en.jsonl": 60,
    "longwrite_ruler.jsonl": 48,
}
# sha256 of the official files (THUDM/LongWriter evaluation/, as this project was checked against them): a file found
# in the search order with another hash is an error (damaged, or changed where it lies); a file given explicitly
# (data_path) with another hash is a user's own (a subset, a translation, a new version) and only gets a warning.
OFFICIAL_SHA256 = {
    "longbench_write.jsonl": "1f6e99497cc24d65894d65e014062f398ba946ebdd254b7f8b339e48d3ab5779",
    "longbench_write_en.jsonl": "87800927761f340e48899e4df5d47fb7211ad4936a63420dbfa979660414259f",
    "longwrite_ruler.jsonl": "a1d4ebf0df0fa1600567691d11c9a52de3037c4a372970ed2e8f52f2889e0a62",
}
# LongBench-Write's Chinese type names (used in the ruler file) mapped to the English ones.
TYPE_EN = {
    "文学与创作": "Literature and Creative Writing",
    "学术与专著": "Academic and Monograph",
    "科普介绍": "Popular Science",
    "实用写作": "Functional Writing",
    "新闻报道": "News Report",
    "社区论坛": "Community Forum",
    "教育与培训": "Education and Training",
}


@dataclass(frozen=True)
class HFSpec:
    """A Hugging Face data set as a profile names it (``hf:<id>[:<config>][@<split>]``): the arguments of
    ``datasets.load_dataset(id, config, split=split)``."""

    id: str
    config: str | None
    split: str

    def load(self):
        """``datasets.load_dataset(id, config, split=split)`` (needs the ``datasets`` package and the hub or its cache)."""
        from datasets import load_dataset

        return load_dataset(self.id, self.config, split=self.split)


HF_GRAMMAR = "hf:<id>[:<config>][@<split>]"


def is_hf_spec(spec: object) -> bool:
    """Whether ``spec`` names a Hugging Face data set (starts with ``hf:``) rather than a file."""
    return isinstance(spec, str) and spec.startswith("hf:")


def parse_hf_spec(spec: str, field: str, default_split: str = "train") -> HFSpec:
    """Read ``hf:<id>[:<config>][@<split>]`` (e.g. ``hf:HuggingFaceH4/ultrachat_200k@train_sft``); the split
    defaults to ``default_split``. The split may hold ``:`` (``@train[:100]``, a slice in datasets' syntax); the id
    and config may not hold ``@``. A malformed spec is a ``ValueError`` naming ``field`` (the profile field it came
    from, e.g. ``sft.general_data``), the spec and the grammar.

    >>> parse_hf_spec("hf:THUDM/LongWriter-6k", "sft.data_path")
    HFSpec(id='THUDM/LongWriter-6k', config=None, split='train')
    """
    def bad(why: str) -> ValueError:
        return ValueError(f"{field}: {spec!r} is not a Hugging Face data set spec ({why}); expected {HF_GRAMMAR}, "
                          f"e.g. hf:THUDM/LongWriter-6k or hf:HuggingFaceH4/ultrachat_200k@train_sft")

    if not is_hf_spec(spec):
        raise bad("it does not start with 'hf:'")
    if any(c.isspace() for c in spec):
        raise bad("it holds whitespace")
    body, at, split = spec[3:].partition("@")
    name, colon, config = body.partition(":")
    if not name:
        raise bad("no data set id after 'hf:'")
    if colon and not config:
        raise bad("empty config after ':'")
    if ":" in config:
        raise bad("more than one ':' before the split")
    if at and not split:
        raise bad("empty split after '@'")
    if "@" in split:
        raise bad("more than one '@'")
    return HFSpec(name, config or None, split or default_split)


def data_file(name: str, path: str | Path | None = None, download: bool = True,
              timeout_s: float | None = None, field: str | None = None) -> Path:
    """Locate (or download) one of :data:`FILES`; ``path`` may be the file or its folder.

    A given ``path`` is the file used, or a ``FileNotFoundError`` naming it (and ``field``, the profile field it
    came from, e.g. ``probe.data_path``) when it does not exist; with another item count or sha256 than the
    official file it is used with a warning (a user's subset or version). A file found in the search order
    (``$LWLIB_DATA_DIR``, ``../shared/data``, the cache) or downloaded must be the official one: another sha256
    is an error naming it. The download gives up after ``timeout_s`` (default :data:`DOWNLOAD_TIMEOUT_S`)
    without an answer.

    Usage: ``data_file("longwrite_ruler.jsonl", cfg.data_path, field="probe.data_path")``
    """
    if name not in FILES:
        raise ValueError(f"unknown data file {name!r}; known: {sorted(FILES)}")
    if path is not None:
        p = Path(path)
        given = p / name if p.is_dir() else p
        if not given.exists():
            raise FileNotFoundError(
                f"{field + ': ' if field else ''}{given} does not exist"
                + (f" (the folder {p} has no {name})" if p.is_dir() else "")
                + "; a data path that is given is used as it is (no fallback): give an existing file or folder, "
                  "or null for the official file")
        check_data_file(given, name, official=False)
        return given
    candidates = []
    if os.environ.get("LWLIB_DATA_DIR"):
        candidates.append(Path(os.environ["LWLIB_DATA_DIR"]) / name)
    cached = cache_dir() / "data" / name
    candidates += [REPO_ROOT.parent / "shared" / "data" / name, cached]
    for c in candidates:
        if c.exists():
            check_data_file(c, name, official=True)
            return c
    if not download:
        raise FileNotFoundError(f"{name} not found in {[str(c.parent) for c in candidates]}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".part")
    url = BASE_URL + name
    timeout = DOWNLOAD_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts (socket.timeout is an OSError)
        tmp.unlink(missing_ok=True)
        why = f"no answer within {timeout:g} s" if isinstance(getattr(e, "reason", e), TimeoutError) else str(e)
        raise FileNotFoundError(
            f"{name} is not in {[str(c.parent) for c in candidates]} and could not be downloaded from "
            f"{url} ({why}); on an offline machine set LWLIB_DATA_DIR to a folder holding it"
        ) from e
    try:
        check_data_file(tmp, name, official=True, shown=url)
    except ValueError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, cached)
    return cached


def check_data_file(path: Path, name: str, official: bool, shown: str | None = None) -> None:
    """Compare a benchmark file with the official one: the same sha256 passes. Otherwise, for an ``official``
    copy (found in the search order, downloaded, or cached) it is an error naming the file, its item count and
    both hashes; for a user's file a warning (another item count: a subset; the same: another version)."""
    got = sha256_file(path)
    if got == OFFICIAL_SHA256[name]:
        return
    n = sum(1 for line in Path(path).read_bytes().splitlines() if line.strip())
    where = shown or str(path)
    if official:
        then = ("it was not kept; retry, or give your own file with the profile's data_path" if shown else
                f"replace it with the official file (delete {path} to download it again), or give it as your own "
                "file with the profile's data_path")
        raise ValueError(f"{where}: not the official file: {'downloaded ' if shown else ''}{name} has {n} items, "
                         f"the official file has {FILES[name]}; its sha256 is {got[:16]}..., the official "
                         f"{OFFICIAL_SHA256[name][:16]}... (damaged, or changed where it lies): {then}")
    if n != FILES[name]:
        warnings.warn(f"{where}: {n} items where the official {name} has {FILES[name]}: using it as your own "
                      f"subset (scores are not comparable with the paper's)", stacklevel=3)
    else:
        warnings.warn(f"{where}: not the official {name} (other sha256), same item count {n}: using it as it is",
                      stacklevel=3)


@dataclass(frozen=True)
class WritingItem:
    """One benchmark prompt. ``lang`` is the required output language (``en``/``zh``)."""

    id: str
    prompt: str
    type: str
    length: int
    lang: str


def _read(path: Path, fields: tuple[str, ...]) -> list[dict]:
    out = []
    for lineno, rec in iter_jsonl(path):
        missing = [k for k in fields if k not in rec]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
        if not isinstance(rec["length"], int) or rec["length"] <= 0:
            raise ValueError(f"{path}:{lineno}: field 'length' must be a positive integer, got {rec['length']!r}")
        out.append(rec)
    return out


_HAN = re.compile(r"[\u4e00-\u9fff]")


def load_ruler(path: str | Path | None = None, field: str | None = None) -> list[WritingItem]:
    """The 48 LongWrite-Ruler prompts; ``lang`` from the prompt's script (each template is
    written in the language it asks for), type names in English. ``field``: the profile field ``path`` came
    from, for errors (:func:`data_file`)."""
    p = data_file("longwrite_ruler.jsonl", path, field=field)
    items = []
    for i, r in enumerate(_read(p, ("prompt", "type", "length"))):
        lang = "zh" if _HAN.search(r["prompt"]) else "en"
        items.append(WritingItem(f"ruler-{i:03d}", r["prompt"], TYPE_EN.get(r["type"], r["type"]), r["length"], lang))
    return items


def load_longbench_write(path: str | Path | None = None, en_path: str | Path | None = None,
                         field: str | None = None, en_field: str | None = None) -> list[WritingItem]:
    """The 120 LongBench-Write prompts, ``lang`` = ``en`` for members of the English file (the
    required output language), else ``zh`` (not guessed from the prompt's script). ``field``, ``en_field``: the
    profile fields the paths came from, for errors (:func:`data_file`)."""
    p = data_file("longbench_write.jsonl", path, field=field)
    en = {r["prompt"] for r in _read(data_file("longbench_write_en.jsonl", en_path, field=en_field),
                                     ("prompt", "type", "length"))}
    items = []
    for i, r in enumerate(_read(p, ("prompt", "type", "length"))):
        items.append(WritingItem(f"lbw-{i:03d}", r["prompt"], TYPE_EN.get(r["type"], r["type"]), r["length"], "en" if r["prompt"] in en else "zh"))
    return items
