"""The paper's benchmark files: LongBench-Write and LongWrite-Ruler (THUDM/LongWriter, Apache-2.0).

Files are found, in order: an explicit ``path``; ``$LWLIB_DATA_DIR``; ``../shared/data`` beside the
repository (this project's CI); the cache (``$LWLIB_CACHE/data``); else downloaded once from the
paper's repository into the cache and checked (line count, fields).

Usage::

    items = load_ruler()                    # 48 LongWrite-Ruler prompts
    bench = load_longbench_write()          # 120 LongBench-Write prompts, each tagged en/zh
"""

from __future__ import annotations

import os
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .models import cache_dir
from .runs import REPO_ROOT, iter_jsonl

BASE_URL = "https://raw.githubusercontent.com/THUDM/LongWriter/main/evaluation/"
FILES = {  # name: expected number of items
    "longbench_write.jsonl": 120,
    "longbench_write_en.jsonl": 60,
    "longwrite_ruler.jsonl": 48,
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


def data_file(name: str, path: str | Path | None = None, download: bool = True) -> Path:
    """Locate (or download) one of :data:`FILES`; ``path`` may be the file or its folder."""
    if name not in FILES:
        raise ValueError(f"unknown data file {name!r}; known: {sorted(FILES)}")
    candidates = []
    if path is not None:
        p = Path(path)
        candidates.append(p / name if p.is_dir() else p)
    if os.environ.get("LWLIB_DATA_DIR"):
        candidates.append(Path(os.environ["LWLIB_DATA_DIR"]) / name)
    candidates += [REPO_ROOT.parent / "shared" / "data" / name, cache_dir() / "data" / name]
    for c in candidates:
        if c.exists():
            return c
    if path is not None:
        raise FileNotFoundError(f"{candidates[0]} does not exist")
    if not download:
        raise FileNotFoundError(f"{name} not found in {[str(c.parent) for c in candidates]}")
    dest = cache_dir() / "data" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    try:
        urllib.request.urlretrieve(BASE_URL + name, tmp)
    except OSError as e:
        raise FileNotFoundError(
            f"{name} is not in {[str(c.parent) for c in candidates]} and could not be downloaded from "
            f"{BASE_URL} ({e}); on an offline machine set LWLIB_DATA_DIR to a folder holding it"
        ) from e
    n = sum(1 for line in tmp.read_text(encoding="utf-8").splitlines() if line.strip())
    if n != FILES[name]:
        raise ValueError(f"downloaded {name} has {n} lines, expected {FILES[name]}")
    os.replace(tmp, dest)
    return dest


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


def load_ruler(path: str | Path | None = None) -> list[WritingItem]:
    """The 48 LongWrite-Ruler prompts; ``lang`` from the prompt's script (each template is
    written in the language it asks for), type names in English."""
    p = data_file("longwrite_ruler.jsonl", path)
    items = []
    for i, r in enumerate(_read(p, ("prompt", "type", "length"))):
        lang = "zh" if _HAN.search(r["prompt"]) else "en"
        items.append(WritingItem(f"ruler-{i:03d}", r["prompt"], TYPE_EN.get(r["type"], r["type"]), r["length"], lang))
    return items


def load_longbench_write(path: str | Path | None = None, en_path: str | Path | None = None) -> list[WritingItem]:
    """The 120 LongBench-Write prompts, ``lang`` = ``en`` for members of the English file (the
    required output language), else ``zh`` (not guessed from the prompt's script)."""
    p = data_file("longbench_write.jsonl", path)
    en = {r["prompt"] for r in _read(data_file("longbench_write_en.jsonl", en_path), ("prompt", "type", "length"))}
    items = []
    for i, r in enumerate(_read(p, ("prompt", "type", "length"))):
        items.append(WritingItem(f"lbw-{i:03d}", r["prompt"], TYPE_EN.get(r["type"], r["type"]), r["length"], "en" if r["prompt"] in en else "zh"))
    return items
