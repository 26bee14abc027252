"""Human-written long-output SFT data from public-domain books (a stand-in for LongWriter-6k).

The paper's long-output SFT data (LongWriter-6k) was written by GPT-4o through AgentWrite. Without an API,
and with a bundled model too small to write, this module builds the stand-in the project trains on:
passages cut from 70 Project Gutenberg books (65 English, 5 Chinese; ``lwlib/long_texts_manifest.jsonl``),
each paired with an instruction written for it by *backtranslation* (Humpback, Suri: the passage is the
answer; write the request that would have asked for it).

Pipeline, one function per step:
  1. :func:`long_texts_dir` finds the books (search order below) or downloads them from the GITenberg /
     gutenbergbooks GitHub mirrors at the pinned commits, checking each file's sha256.
  2. :func:`strip_gutenberg` keeps the book between the ``*** START OF ...`` / ``*** END OF ...`` lines
     (both header generations, CRLF, case variants, a marker split over two lines, missing markers), and
     drops the old "Small Print" license block.
  3. :func:`paragraphs` unwraps hard-wrapped lines into :class:`Paragraph` s, drops front matter (title
     page, tables of contents, lists of illustrations, Project Gutenberg and transcriber's notes, "Produced
     by" lines), illustration/footnote/sidenote markers and bodies, page markers, tables and index, and
     marks chapter headings (``heading=True``). Chinese: see :func:`paragraphs`.
  4. :func:`cut_passages` cuts paragraph-aligned, non-overlapping passages whose lengths follow a
     log-uniform target between ``min_words`` and ``max_words`` (words by :func:`lwlib.text.count_words`).
  5. :func:`instruction_for` writes the instruction from templates (7 LongBench-Write types x several
     phrasings x 2 languages), naming the kind of text, its subject (chapter heading, book, salient names)
     and the required length (the passage's word count rounded by :func:`round_length`). With a ``writer``
     backend configured, the writer backtranslates instead (:func:`writer_prompt`), cached per passage.
  6. :func:`split_books` holds out whole books for the NLL study (notebook 05) and for evaluation.
  7. :func:`build_corpus` (the stage) writes ``<run>/corpus/``: ``longwriter.jsonl`` (train),
     ``heldout_nll.jsonl``, ``heldout_eval.jsonl`` (LongWriter-6k format plus metadata), ``stats.json``
     and ``manifest.json``; :func:`load_corpus` reads a split back.

Books are found, in order: an explicit ``path``; ``$LWLIB_LONG_TEXTS``; ``$LWLIB_DATA_DIR/long_texts``;
``<repo>/../shared/data/long_texts``; ``$LWLIB_CACHE/data/long_texts`` (``~/.cache/lwlib/...``), where
they are downloaded when no folder has them. A folder's own ``manifest.jsonl`` (same fields) says which
books it holds; without one the bundled manifest does.

Usage::

    cfg = prof.section("corpus", CorpusConfig)
    stats = build_corpus(prof, cfg)                  # reused when run again with the same config
    train = load_corpus(prof, "train")               # [{"messages": [...], "id", "book_id", "words", ...}]

    book = load_manifest()[0]
    paras = paragraphs(strip_gutenberg(read_book(book)), book.language)
    passages = cut_passages(paras, random.Random(0), 100, 6000, book_id=book.id, lang=book.language)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from .backends import BackendConfig, GenParams, make_backend
from .config import Profile, from_dict
from .instructions import TYPES, required_length
from .models import cache_dir
from .runs import (REPO_ROOT, JsonlStore, atomic_write_bytes, atomic_write_json, atomic_write_text, iter_jsonl, read_jsonl,
                   write_manifest)
from .text import count_words, truncate_words

BUNDLED_MANIFEST = Path(__file__).resolve().parent / "long_texts_manifest.jsonl"
BASE_URL = "https://raw.githubusercontent.com/"  # + {source_repo}/{source_commit}/{source_path}
DOWNLOAD_TIMEOUT_S = 60.0
SOURCE = "human-written public-domain passages (stand-in for LongWriter-6k)"
SPLITS = {"train": "longwriter.jsonl", "nll": "heldout_nll.jsonl", "eval": "heldout_eval.jsonl"}
FORMAT_VERSION = 1  # bump when the cleaning/cutting/instruction rules change the output
_FIELDS = ("id", "title", "author", "language", "genre", "form", "source_repo", "source_path",
           "source_commit", "sha256", "bytes", "words", "source_encoding", "license")


# ============================================================================================ books
@dataclass(frozen=True)
class Book:
    """One manifest record (see the data folder's README for the fields); the file is ``<id>.txt``."""

    id: int
    title: str
    author: str
    language: str
    genre: str
    form: str
    source_repo: str
    source_path: str
    source_commit: str
    sha256: str
    bytes: int
    words: int
    source_encoding: str
    license: str

    @property
    def filename(self) -> str:
        return f"{self.id}.txt"

    @property
    def url(self) -> str:
        """Where :func:`download_books` fetches it (``BASE_URL`` read at call time)."""
        return f"{BASE_URL.rstrip('/')}/{self.source_repo}/{self.source_commit}/{self.source_path}"


def load_manifest(path: str | Path | None = None) -> list[Book]:
    """The books of a manifest (default: the bundled copy); a bad line raises naming file, line and field."""
    path = Path(path) if path is not None else BUNDLED_MANIFEST
    books, seen = [], set()
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object")
        missing = [k for k in _FIELDS if k not in rec]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        if not isinstance(rec["id"], int) or rec["id"] in seen:
            raise ValueError(f"{where}: field 'id' must be a unique integer, got {rec['id']!r}")
        if rec["language"] not in ("en", "zh"):
            raise ValueError(f"{where}: field 'language' must be 'en' or 'zh', got {rec['language']!r}")
        if rec["genre"] not in TYPES:
            raise ValueError(f"{where}: field 'genre' must be one of the LongBench-Write types {TYPES}, "
                             f"got {rec['genre']!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", str(rec["sha256"])):
            raise ValueError(f"{where}: field 'sha256' must be 64 hex digits")
        seen.add(rec["id"])
        books.append(Book(**{k: rec[k] for k in _FIELDS}))
    if not books:
        raise ValueError(f"{path}: no books")
    return books


def _folder_books(folder: Path) -> list[Book]:
    own = folder / "manifest.jsonl"
    return load_manifest(own if own.exists() else None)


def _complete(folder: Path) -> bool:
    try:
        return folder.is_dir() and all((folder / b.filename).exists() for b in _folder_books(folder))
    except (OSError, ValueError):
        return False


def long_texts_dir(path: str | Path | None = None, download: bool = True,
                   manifest: str | Path | None = None) -> Path:
    """The folder holding the books (search order in the module docstring); downloads them into the
    cache when no folder has them all. An explicit ``path`` that lacks books is an error naming them.
    ``manifest`` (default: bundled) lists the books to download."""
    if path is not None:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"corpus: books folder {p} does not exist")
        missing = [b.filename for b in _folder_books(p) if not (p / b.filename).exists()]
        if missing:
            raise FileNotFoundError(f"corpus: {p} lacks {len(missing)} book file(s) of its manifest: {missing[:5]}")
        return p
    candidates = []
    if os.environ.get("LWLIB_LONG_TEXTS"):
        candidates.append(Path(os.environ["LWLIB_LONG_TEXTS"]))
    if os.environ.get("LWLIB_DATA_DIR"):
        candidates.append(Path(os.environ["LWLIB_DATA_DIR"]) / "long_texts")
    cache = cache_dir() / "data" / "long_texts"
    candidates += [REPO_ROOT.parent / "shared" / "data" / "long_texts", cache]
    want = load_manifest(manifest)
    for c in candidates:
        if _complete(c) and (manifest is None or all((c / b.filename).exists() for b in want)):
            return c
    if not download:
        raise FileNotFoundError(f"corpus: the books are in none of {[str(c) for c in candidates]}; "
                                "set LWLIB_LONG_TEXTS to a folder holding them")
    download_books(want, cache)
    return cache


def download_books(books: Sequence[Book], dest: str | Path, base_url: str | None = None,
                   timeout_s: float | None = None) -> Path:
    """Fetch each missing book from ``{base_url}{source_repo}/{source_commit}/{source_path}``, decode it
    with its ``source_encoding``, store it as UTF-8 and check its sha256 against the manifest (a mismatch
    raises naming the book, the URL and both hashes, and keeps no file). Writes ``manifest.jsonl`` too."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = (base_url if base_url is not None else BASE_URL).rstrip("/")
    timeout = DOWNLOAD_TIMEOUT_S if timeout_s is None else timeout_s
    todo = [b for b in books if not (dest / b.filename).exists()]
    for b in tqdm(todo, desc="download books", unit="book", disable=not todo):
        url = f"{base}/{b.source_repo}/{b.source_commit}/{b.source_path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                raw = r.read()
        except (OSError, urllib.error.URLError) as e:
            raise FileNotFoundError(
                f"corpus: could not download book {b.id} ({b.title}) from {url} ({e}); on an offline "
                "machine set LWLIB_LONG_TEXTS to a folder holding the books") from e
        try:
            data = raw.decode(b.source_encoding).encode("utf-8")
        except (UnicodeDecodeError, LookupError) as e:
            raise ValueError(f"corpus: book {b.id} ({b.title}) from {url} is not {b.source_encoding}: {e}") from e
        got = hashlib.sha256(data).hexdigest()
        if got != b.sha256:
            raise ValueError(f"corpus: book {b.id} ({b.title}) downloaded from {url} has sha256 {got}, "
                             f"the manifest says {b.sha256}; the file was not kept")
        atomic_write_bytes(dest / b.filename, data)
    atomic_write_text(dest / "manifest.jsonl", "".join(
        json.dumps(dataclasses.asdict(b), ensure_ascii=False) + "\n" for b in books))
    return dest


def read_book(book: Book, folder: str | Path | None = None, verify: bool = True) -> str:
    """The raw text of ``book`` (UTF-8) from ``folder`` (default: :func:`long_texts_dir`); with ``verify``
    its sha256 must match the manifest (an error names the file)."""
    path = Path(folder if folder is not None else long_texts_dir()) / book.filename
    if not path.exists():
        raise FileNotFoundError(f"corpus: no file {path} for book {book.id} ({book.title})")
    data = path.read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != book.sha256:
        raise ValueError(f"corpus: {path} has sha256 {hashlib.sha256(data).hexdigest()}, the manifest says "
                         f"{book.sha256} (book {book.id}, {book.title})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus: {path} is not UTF-8 ({e})") from e


# ======================================================================== Gutenberg header/footer
_START = re.compile(r"^[ \t]*\*{3}[ \t]*START[ \t]+OF[ \t]+(?:THIS|THE)[ \t]+PROJECT[ \t]+GUTENBERG[^\n]*"
                    r"(?:\n[^\n*]{0,120}\*{3})?[^\n]*$", re.I | re.M)
_END = re.compile(r"^[ \t]*(?:\*{3}[ \t]*END[ \t]+OF[ \t]+(?:THIS|THE)[ \t]+PROJECT[ \t]+GUTENBERG"
                  r"|End[ \t]+of[ \t]+(?:the[ \t]+)?Project[ \t]+Gutenberg)", re.I | re.M)
_SMALL_PRINT = re.compile(r"^[ \t]*\*{3}[ \t]*START\*{0,2}[ \t]*THE[ \t]+SMALL[ \t]+PRINT.*?"
                          r"^[ \t]*\*END\*?[ \t]*THE[ \t]+SMALL[ \t]+PRINT[^\n]*$", re.I | re.M | re.S)


def strip_gutenberg(text: str, source: str = "<text>") -> str:
    """The book between the Project Gutenberg START and END lines, newlines normalized to ``\\n``.

    Copes with both header generations ("*** START OF THIS PROJECT GUTENBERG EBOOK X ***" and "*** START
    OF THE PROJECT GUTENBERG EBOOK, X ***", a title running onto a second line), any case, CRLF, a BOM;
    the footer starts at "*** END OF ..." or at the "End of (the) Project Gutenberg..." line before it. An
    old-format "Small Print" license block (1293) is removed and, where there is no START line, the book
    starts after it (after the header's own lines). Missing markers keep the whole text (the Chinese
    files have none; 24264 has no end line). Only an empty result is an error (naming ``source``)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    start = 0
    m = _START.search(text)
    sp = _SMALL_PRINT.search(text)
    if m:
        start = m.end()
    elif sp:
        start = sp.end()
    body_end = len(text)
    e = _END.search(text, start)
    if e:
        body_end = e.start()
    body = text[start:body_end]
    body = _SMALL_PRINT.sub("", body)
    if not body.strip():
        raise ValueError(f"corpus: {source}: nothing is left between the Project Gutenberg header and footer")
    return body.strip("\n") + "\n"


# =============================================================================== paragraphs
@dataclass(frozen=True)
class Paragraph:
    """One unit of a book: a paragraph, or a (possibly multi-line) heading when ``heading``."""

    text: str
    heading: bool = False
    words: int = field(default=-1, compare=False)  # count_words(text), filled in when not given

    def __post_init__(self) -> None:
        if self.words < 0:
            object.__setattr__(self, "words", count_words(self.text))


_BRACKETED = re.compile(r"\[(?:Illustration|Footnote|Sidenote|Picture|Image|Transcriber|Project Gutenberg|"
                        r"Redactor|Updater|Editor['’]s note|Last updated|Signature|Frontispiece|Plate|"
                        r"_?All rights reserved)", re.I)
_PAGE_MARK = re.compile(r"^[ \t]*=+[ \t]*Page[ \t]+\d+[ \t]*=*[ \t]*$", re.I | re.M)
_INLINE_PAGE = re.compile(r"\{pg\s*\d*\}|\[(?:Pg|Page|p\.)\s*\d+\]", re.I)
_FN_MARK = re.compile(r"\[(?:\d{1,3}|[*†‡])\]|(?<=[a-z.,;:!?”’\"'])\[[A-Z]\](?=[\s.,;:!?)]|$)")
_FN_MARK_BRACE = re.compile(r"\{\d{1,3}\}")
_SEPARATOR = re.compile(r"^[\s*=_~\-.·•+]+$")
_TABLE_LINE = re.compile(r"\|.*\||^\s*\+[-=+]{3,}|^\s*[-=]{3,}\s*\+")
_JUNK_LINE = re.compile(r"file\s+\S+\.(?:gif|jpe?g|png)\b|^\s*Page\s*$", re.I)
_EDITION_NOTE = re.compile(r"project\s+gutenberg|produced\s+by|proofreading\s+team|\bpgdp\b|transcriber|"
                           r"html\s+version|this\s+file\s+was\s+produced|internet\s+archive|e-?text\b|"
                           r"\bebook\b|redactor['’]s\s+note|typographical\s+errors\s+corrected", re.I)
_EDITION_KEYS = ("gutenberg", "produced by", "proofreading", "pgdp", "transcriber", "html", "this file",
                 "internet archive", "etext", "e-text", "ebook", "redactor", "typographical")


def _edition_note(t: str) -> bool:
    tl = t.lower()
    return any(k in tl for k in _EDITION_KEYS) and bool(_EDITION_NOTE.search(t))


_EDITION_STRONG = re.compile(r"project\s+gutenberg|transcriber|produced\s+by|e-?text|ebook", re.I)
_NUMWORD = (r"one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
            r"sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|first|second|third|fourth|fifth|"
            r"sixth|seventh|eighth|ninth|tenth|last|final")
_STRUCT = re.compile(
    r"^(?:chapter|chap\.|book|part|volume|vol\.|lecture|letter|essay|section|sect\.|stave|canto|act|scene|"
    r"adventure|article|number|no\.|federalist\s+no\.|lesson|talk|paper|appendix)"
    r"(?:\s+(?:the\s+)?(?:[IVXLCDM]+\b|\d+|(?:" + _NUMWORD + r")\b)|\s*[.:—–]|\s+-|\s*$)", re.I)
_STRUCT_WORD = re.compile(r"^(?:preface|introduction|introductory|conclusion|epilogue|prologue|postscript|"
                          r"afterword|foreword|envoi|dedication|summary|etymology|extracts)\b", re.I)
_NUMERAL_ONLY = re.compile(r"^(?:[IVXLC]+|\d{1,3})\.?$")
_TOC_HEAD = re.compile(r"^(?:(?:table\s+of\s+)?contents?|full\s+contents|list\s+of\s+(?:the\s+)?(?:illustrations|"
                       r"plates|maps|figures|engravings|tables|portraits)|illustrations|herein\s+is\s+written)"
                       r"\s*[.:]?$", re.I)
_INDEX_HEAD = re.compile(r"^(?:general\s+)?index(?:\s+of\s+\w+)?\s*[.:]?$", re.I)
_FOOTNOTES_HEAD = re.compile(r"^foot-?notes?\s*[.:]?$", re.I)
_END_LINE = re.compile(r"^(?:the\s+end|finis|end\s+of\s+(?:the\s+)?(?:volume|vol\.|book|part)(?:\W[^\n]{0,40})?)\s*\.?$", re.I)
_FN_BLOCK = re.compile(r"^(?:\[\d+\]|\[[A-Z]\]\s|\{\d+\}|foot-?note\s*\d*\s*[:.])", re.I)
_SMALL_WORDS = {"a", "an", "and", "as", "at", "but", "by", "for", "from", "in", "into", "nor", "of", "on",
                "or", "the", "to", "with", "upon", "de", "la", "le", "du", "von", "van", "over", "under"}


def _strip_bracketed(text: str) -> str:
    """Remove ``[Illustration ...]``, ``[Footnote ...]`` and the like with nested brackets, also when they
    span blank lines (at most 20,000 characters; unclosed: up to the next blank line)."""
    out, pos = [], 0
    while True:
        m = _BRACKETED.search(text, pos)
        if not m:
            out.append(text[pos:])
            break
        out.append(text[pos:m.start()])
        depth, k, limit = 0, m.start(), min(len(text), m.start() + 20000)
        end = None
        while k < limit:
            c = text[k]
            if c == "[":
                depth += 1
            elif c == "]":
                depth -= 1
                if depth == 0:
                    end = k + 1
                    break
            k += 1
        if end is None:
            nb = text.find("\n\n", m.start())
            end = nb if nb >= 0 else len(text)
        pos = end
    return "".join(out)


def _collapse(s: str) -> str:
    return " ".join(s.replace("\u200b", " ").split())


_ITALIC = re.compile(r"(?<![\w*])_(?=\S)([^_\n]+?)(?<=\S)_(?!\w)")
_BOLD = re.compile(r"(?<![\w=])=(?=\S)([^=\n]+?)(?<=\S)=(?![\w=])")
_STAR = re.compile(r"(?<![\w*])\*(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*(?![\w*])")
_STRAY_UNDERSCORE = re.compile(r"(?<=\w)_(?=\w)|(?<=\s)_(?=\w)|(?<=\w)_(?=[\s.,;:!?])")


def _clean_inline(s: str) -> str:
    """Drop footnote and page markers and emphasis marks from collapsed text (each regex pass costs, so
    only the passes a paragraph needs run)."""
    s0 = s
    if "[" in s or "{" in s:
        s = _INLINE_PAGE.sub("", s)
        if "[" in s:
            s = _FN_MARK.sub("", s)
        if "{" in s:
            s = _FN_MARK_BRACE.sub("", s)
    if "_" in s:
        s = _ITALIC.sub(r"\1", s)
        s = _STRAY_UNDERSCORE.sub("", s)
    if "=" in s:
        s = _BOLD.sub(r"\1", s)
    if "*" in s:
        s = _STAR.sub(r"\1", s)
    if s is s0:
        return s
    s = re.sub(r" +(?=[.,;:!?])", "", s)
    return "\n".join(_collapse(l) for l in s.split("\n")).strip()


def _letters_ratio_upper(s: str) -> float:
    letters = [c for c in s if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0


def _lower_ratio(s: str) -> float:
    """Share of the words (by their first character) that start with a lowercase letter."""
    firsts = [t.lstrip("\"“‘'(_[")[:1] for t in s.split()]
    alpha = [c for c in firsts if c.isalpha()]
    return sum(c.islower() for c in alpha) / len(alpha) if alpha else 0.0


@dataclass
class _Block:
    lines: list[str]       # raw lines (indentation kept)
    text: str = ""         # unwrapped
    words: int = 0
    heading: bool = False
    struct: bool = False   # a structural heading (CHAPTER ..., PREFACE, a lone numeral)
    page_join: bool = False  # a page marker stood right before this block
    _prose: bool | None = None

    @property
    def prose(self) -> bool:
        """40+ words of running text (not kept line by line), mostly lowercase words (computed on demand)."""
        if self._prose is None:
            self._prose = self.words >= 40 and "\n" not in self.text and _lower_ratio(self.text) >= 0.5
        return self._prose

    def first(self) -> str:
        return _collapse(self.lines[0]) if self.lines else ""


def _unwrap(lines: list[str], width: int) -> str:
    stripped = [l.strip() for l in lines]
    if len(lines) >= 2:
        # keep the lines of verse, addresses and lists (indented, in columns or all short), not of
        # indented block quotes of full-width lines
        indented_rest = sum(1 for l in lines[1:] if l.startswith(("  ", "\t"))) / (len(lines) - 1)
        columns = sum(1 for l in stripped if "   " in l) / len(lines)
        short = max(len(l) for l in stripped) <= min(50, 0.75 * width)
        full = sum(len(l) for l in stripped) / len(stripped) >= 0.8 * width
        if (indented_rest >= 0.5 and not full) or columns >= 0.5 or short:
            return "\n".join(_collapse(l) for l in stripped)
    out = ""
    for l in stripped:
        if not out:
            out = l
        elif out[-1] == "-" and out[-2:-1].isalpha():
            out += l  # a compound word split at the line end ("double-\nbelled")
        else:
            out += " " + l
    return _collapse(out)


def _classify(b: _Block) -> None:
    t = b.text
    one = " ".join(t.split("\n"))
    b.words = count_words(t)
    n_words = len(one.split())
    b._prose = None
    if len(b.lines) > 4 or n_words > 25 or not one:
        return
    first = b.first()
    if _STRUCT.match(first) or _NUMERAL_ONLY.match(one) or (_STRUCT_WORD.match(first) and n_words <= 8):
        b.heading = b.struct = True
    elif _TOC_HEAD.match(one) or _INDEX_HEAD.match(one) or _FOOTNOTES_HEAD.match(one):
        b.heading = True
    elif n_words <= 20 and _letters_ratio_upper(one) >= 0.85 and sum(c.isalpha() for c in one) >= 2:
        b.heading = True
    elif len(b.lines) == 1 and n_words <= 10 and one[0].isupper() and not re.search(r"[.,;:!?’”\"')\]]$", one):
        content = [w for w in re.findall(r"[A-Za-z][A-Za-z’'\-]*", one) if w.lower() not in _SMALL_WORDS]
        if content and all(w[0].isupper() for w in content):
            b.heading = True


def _tokens(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def _prefix_match(a: list[str], b: list[str]) -> bool:
    if not a or not b or sum(len(x) for x in (a if len(a) <= len(b) else b)) < 3:
        return False
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _en_blocks(text: str) -> list[_Block]:
    text = _strip_bracketed(text)
    text = _PAGE_MARK.sub("\x00PAGE\x00", text)
    raw_blocks = re.split(r"\n[ \t\u00a0]*\n", text)
    blocks: list[_Block] = []
    pending_page = False
    lengths = [len(l.strip()) for l in text.split("\n") if len(l.strip()) > 20]
    width = sorted(lengths)[int(0.9 * len(lengths))] if lengths else 70
    for rb in raw_blocks:
        lines = []
        for l in rb.split("\n"):
            if "\x00PAGE\x00" in l:
                pending_page = True
                continue
            if not l.strip() or _SEPARATOR.match(l) or (("." in l or "Page" in l) and _JUNK_LINE.search(l)):
                continue
            lines.append(l.rstrip())
        if not lines:
            continue
        if sum(1 for l in lines if ("|" in l or "+" in l) and _TABLE_LINE.search(l)) >= max(1, len(lines) / 2):
            continue  # a table drawn with | and +---+
        b = _Block(lines, page_join=pending_page)
        pending_page = False
        b.text = _clean_inline(_unwrap(lines, width))
        if not b.text or not re.search(r"[A-Za-z]", b.text):
            continue
        _classify(b)
        blocks.append(b)
    # a paragraph broken by a page marker: join the halves
    joined: list[_Block] = []
    for b in blocks:
        if b.page_join and joined and not joined[-1].heading and re.match(r"^[a-z]", b.text) \
                and not re.search(r"[.!?:;”\"’)]$", joined[-1].text):
            prev = joined[-1]
            prev.lines += b.lines
            prev.text = prev.text + " " + b.text
            _classify(prev)
            continue
        joined.append(b)
    return joined


def _skip_section(blocks: list[_Block], i: int) -> int:
    """Index after a dropped section that starts at heading ``i``: up to the next heading."""
    j = i + 1
    while j < len(blocks) and not blocks[j].heading:
        j += 1
    return j


def _skip_toc(blocks: list[_Block], i: int) -> tuple[int, list[int]]:
    """A table of contents (or list of illustrations) starting at heading ``i``: returns the index where
    the body resumes and the indices of headings to keep just before it (see :func:`paragraphs`)."""
    n = len(blocks)
    first: list[str] = []
    k0 = i + 1
    while k0 < n and not first:
        for line in blocks[k0].lines:
            toks = _tokens(line)
            if toks and toks not in (["page"], ["pages"], ["chap"], ["chapter"], ["chapters"]):
                first = toks
                break
        else:
            k0 += 1
    bare = first[1:] if first and re.fullmatch(r"[ivxlc]+|\d+", first[0]) else first  # "I. THE FRONTIER"
    for k in range(k0 + 1, n):
        b = blocks[k]
        if b.heading and any(_prefix_match(_tokens(t), f) for t in (b.first(), b.text) for f in (first, bare) if f):
            if k - 1 > k0 and blocks[k - 1].struct and not _prefix_match(_tokens(blocks[k - 1].text), first):
                return k - 1, []  # the label over the repeated title ("CHAPTER I" over "THE FRONTIER")
            return k, []
        if b.prose:
            keep = []
            j = k - 1
            while j > k0 and blocks[j].heading and len(keep) < 2:
                if keep and (blocks[keep[-1]].struct or not blocks[j].struct):
                    break  # a second heading only as the label of a title ("CHAPTER I" over "THE FRONTIER")
                keep.append(j)
                j -= 1
            return k, sorted(keep)
    for k in range(k0 + 1, n):  # no repeated entry, no long prose: up to the first shorter running text
        b = blocks[k]
        if b.words >= 20 and "\n" not in b.text and _lower_ratio(b.text) >= 0.5:
            return k, []
    return i + 1, []  # nothing looks like the body: drop only the title


def _en_paragraphs(text: str) -> list[Paragraph]:
    blocks = _en_blocks(text)
    n = len(blocks)
    keep = [True] * n
    cum = [0]
    for b in blocks:
        cum.append(cum[-1] + b.words)
    # 1. title page: everything before the first structural heading, table of contents or prose block
    i = 0
    while i < n and not (blocks[i].struct or blocks[i].prose or _TOC_HEAD.match(blocks[i].text)):
        keep[i] = False
        i += 1
    # 2. the rest: tables of contents, edition/transcriber notes, footnotes, index, end lines
    while i < n:
        b = blocks[i]
        t = b.text
        if b.heading and _TOC_HEAD.match(t):
            j, restore = _skip_toc(blocks, i)
            for k in range(i, j):
                keep[k] = k in restore
            i = j
            continue
        if b.heading and _INDEX_HEAD.match(t) and cum[i] > 0.6 * cum[-1]:
            for k in range(i, n):
                keep[k] = False
            break
        if _edition_note(t) and (not b.prose or (b.words < 150 and _EDITION_STRONG.search(t))):
            if b.heading or (b.words <= 12 and re.search(r"transcriber|notes?\s*:?\s*$", t, re.I)):
                j = _skip_section(blocks, i)
            else:
                j = i + 1
            for k in range(i, j):
                keep[k] = False
            i = j
            continue
        if b.heading and _FOOTNOTES_HEAD.match(t):
            j = _skip_section(blocks, i)
            for k in range(i, j):
                keep[k] = False
            i = j
            continue
        if _FN_BLOCK.match(t):
            keep[i] = False
        i += 1
    kept = [b for b, k in zip(blocks, keep) if k]
    # back matter after the last "THE END" (publishers' advertisements, appended notes) when it is short
    ends = [k for k, b in enumerate(kept) if _END_LINE.match(b.text)]
    if ends:
        after = sum(b.words for b in kept[ends[-1] + 1:])
        if after < 0.08 * max(1, sum(b.words for b in kept)):
            kept = kept[:ends[-1]]
    kept = [b for b in kept if not _END_LINE.match(b.text)]
    return _merge_headings(kept)


def _merge_headings(blocks: list[_Block], max_run: int = 4) -> list[Paragraph]:
    """Runs of heading blocks become one heading (lines joined by newlines); a run longer than
    ``max_run`` is list debris (a contents list without a title) and only its last ``max_run`` are kept."""
    out: list[Paragraph] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            out.append(Paragraph("\n".join(run[-max_run:]), heading=True))
            run.clear()

    for b in blocks:
        if b.heading:
            run.append(b.text)
        else:
            flush()
            out.append(Paragraph(b.text, words=b.words))
    flush()
    return out


# ----------------------------------------------------------------------------------------- Chinese
_ZH_HEAD = re.compile(r"^[ \t\u3000]*(第[一二三四五六七八九十百千零〇两\d]+回|楔子|引子|引首)")
_ZH_CLOSE = "。，、；：」』）！？．”’》〉…─—"
_ZH_SENT_END = "。！？!?．"


def _zh_heading(line: str) -> tuple[str, str]:
    """``(heading, rest)``: a chapter title line, with text glued after the couplet split off as ``rest``
    (the two halves of a 回目 have equal length; 24032 glues the chapter's first words to some)."""
    line = line.strip()
    m = re.match(r"^(第[^回\s]{1,6}回|楔子|引子|引首)[\s\u3000：:]*(.*)$", line)
    if not m:
        return line, ""
    label, rest = m.group(1), m.group(2)
    segs = [s for s in re.split(r"[\s\u3000，,]+", rest) if s]
    tail = ""
    if len(segs) >= 2 and len(segs[1]) > len(segs[0]) + 1:
        tail = segs[1][len(segs[0]):] + "".join(segs[2:])
        segs = [segs[0], segs[1][:len(segs[0])]]
    elif len(segs) > 2:  # a 回目 has two halves: what follows them is text
        tail = "".join(segs[2:])
        segs = segs[:2]
    return "\u3000".join([label] + segs), tail


def _zh_join(a: str, b: str) -> str:
    if a and b and re.match(r"[A-Za-z0-9]", a[-1]) and re.match(r"[A-Za-z0-9]", b[0]):
        return a + " " + b
    return a + b


def _zh_paragraphs(text: str) -> list[Paragraph]:
    out: list[Paragraph] = []
    cur: list[str] = []  # the paragraph being built: pieces joined without spaces

    def flush() -> None:
        if cur:
            s = ""
            for piece in cur:
                s = _zh_join(s, piece)
            # a space inside the text after a sentence end marks a paragraph break (24032); others go
            for part in re.split(r"(?<=[" + _ZH_SENT_END + r"」』”])[ \u3000]+(?=\S)", s):
                part = re.sub(r"(?<=[^\x00-\x7f])[ \u3000]+|[ \u3000]+(?=[^\x00-\x7f])", "", part).strip()
                if count_words(part):
                    out.append(Paragraph(part))
            cur.clear()

    for raw in text.split("\n"):
        line = raw.rstrip()
        if not line.strip():
            flush()
            continue
        if re.fullmatch(r"[\s\-—─=_*·]{5,}", line):
            flush()
            continue
        if _ZH_HEAD.match(line) and (len(line.strip()) <= 40 or re.search(r"[\s\u3000：:]", line.strip()[:12])):
            flush()
            head, tail = _zh_heading(line)
            out.append(Paragraph(head, heading=True))
            if tail:
                cur.append(tail)
            continue
        stripped = line.strip()
        if stripped[0] in _ZH_CLOSE:  # punctuation wrapped onto the next line belongs to the last paragraph
            if cur:
                cur.append(stripped)
            elif out and not out[-1].heading:
                out[-1] = Paragraph(out[-1].text + stripped)
            continue
        if re.match(r"^(?:\u3000| {2,}|\t)", line):
            flush()
        cur.append(stripped)
    flush()
    return out


def paragraphs(text: str, lang: str = "en") -> list[Paragraph]:
    """Unwrap a book's text (after :func:`strip_gutenberg`) into paragraphs and headings.

    English: paragraphs are separated by blank lines; their hard-wrapped lines are joined with spaces (a
    line ending in ``letter-`` joins without one), whitespace collapsed. Blocks whose lines are indented,
    drawn in columns or all short (verse, addresses, lists) keep their line breaks. Dropped: the title
    page (everything before the first structural heading, contents list or prose paragraph of 40+ words),
    tables of contents and lists of illustrations (up to the first heading that repeats the list's first
    entry, else up to the next prose paragraph, keeping the one or two headings just before it),
    Project Gutenberg/transcriber/edition notes (with the section they head), "Produced by" lines,
    ``[Illustration ...]``/``[Footnote ...]``/``[Sidenote ...]`` spans, footnote markers (``[12]``,
    ``{3}``), footnote blocks and "FOOTNOTES" sections, page markers (a paragraph they break is joined),
    ``_italics_`` and ``=bold=`` marks, separator lines, tables drawn with ``|``/``+---+``, an index in
    the last 40% of the book and "THE END"/"FINIS" lines. Headings (CHAPTER/BOOK/LECTURE/... lines, lone
    numerals, short ALL-CAPS or Title-Case lines) are marked ``heading=True``; consecutive heading lines
    merge into one heading.

    Chinese (no blank-line convention: lines are hard-wrapped at 35-40 characters, a paragraph starts
    with an indented line (ideographic or ASCII spaces) or after a blank line, and some files hold one
    paragraph per long line): lines are joined without spaces; a line starting with closing punctuation
    (``。」``, wrapped onto the next line) joins the previous paragraph; a space after a sentence end
    inside a line starts a new paragraph; ``-----`` rules are dropped; chapter titles (第N回 ..., 楔子) are
    headings, with text glued after the couplet (24032) split off into the next paragraph.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    if lang == "zh":
        return _zh_paragraphs(text)
    if lang != "en":
        raise ValueError(f"paragraphs: lang must be 'en' or 'zh', got {lang!r}")
    return _en_paragraphs(text)


# ================================================================================= passages
@dataclass
class Passage:
    """A paragraph-aligned piece of a book: ``units[start:end]`` of :func:`split_long_paragraphs`, their
    texts joined by blank lines. ``heading``: the last heading before it (its chapter), or None."""

    id: str
    book_id: int
    lang: str
    start: int
    end: int
    text: str
    words: int
    target: int
    heading: str | None


_EN_SENT = re.compile(r"(?<=[.!?])[\"”’)\]]*\s+(?=[\"“‘(\[]?[A-Z0-9])")
_ZH_SENT = re.compile(r"(?<=[。！？!?．])[」』”’）)]*")


def split_sentences(text: str, lang: str) -> list[str]:
    """Sentences of a paragraph (English: at ``.!?`` before a capital; Chinese: after ``。！？``)."""
    if lang == "zh":
        out, pos = [], 0
        for m in _ZH_SENT.finditer(text):
            if m.end() > pos:
                out.append(text[pos:m.end()])
                pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return [s for s in out if s.strip()]
    out, pos = [], 0
    for m in _EN_SENT.finditer(text):
        out.append(text[pos:m.start()] + m.group(0).rstrip())
        pos = m.end()
    out.append(text[pos:])
    return [s.strip() for s in out if s.strip()]


def split_long_paragraphs(paras: Sequence[Paragraph], max_words: int, lang: str) -> list[Paragraph]:
    """Paragraphs longer than ``max_words`` split at sentence ends into the fewest near-equal pieces of at
    most ``max_words`` each (a single sentence longer than that is dropped); others unchanged."""
    out: list[Paragraph] = []
    joiner = "" if lang == "zh" else " "
    for p in paras:
        if p.heading or p.words <= max_words:
            out.append(p)
            continue
        sents = [(s, count_words(s)) for s in split_sentences(p.text, lang)]
        total = sum(w for _, w in sents)
        pieces = math.ceil(total / max_words)
        goal = total / pieces
        cur, cw = [], 0
        for s, w in sents:
            if w > max_words:
                if cur:
                    out.append(Paragraph(joiner.join(cur)))
                cur, cw = [], 0
                continue
            if cur and (cw + w > max_words or cw >= goal):
                out.append(Paragraph(joiner.join(cur)))
                cur, cw = [], 0
            cur.append(s)
            cw += w
        if cur:
            out.append(Paragraph(joiner.join(cur)))
    return out


def cut_passages(paras: Sequence[Paragraph], rng: random.Random | int, min_words: int = 100,
                 max_words: int = 6000, book_id: int = 0, lang: str = "en") -> list[Passage]:
    """Cut a book into non-overlapping, paragraph-aligned passages with log-uniform target lengths.

    Walking through the book: skip headings (the last one seen becomes the passage's ``heading``), draw a
    target ``exp(U(log min_words, log max_words))``, take whole paragraphs until the target is reached,
    then end at whichever of the two boundaries around the target (with or without the paragraph that
    crossed it) is nearer in log-length, among those inside ``[min_words, max_words]``; a passage never
    ends on a heading. Paragraphs over ``max_words`` are first split at sentence ends
    (:func:`split_long_paragraphs`). Edge cases: the book's tail shorter than ``min_words`` is dropped;
    where neither boundary fits the range (a short run before a very long paragraph) that run is skipped.
    ``passage.start/end`` index ``split_long_paragraphs(paras, max_words, lang)``. Deterministic for ``rng``.
    """
    if not (0 < min_words < max_words):
        raise ValueError(f"cut_passages: need 0 < min_words < max_words, got {min_words}, {max_words}")
    rng = random.Random(rng) if isinstance(rng, int) else rng
    units = split_long_paragraphs(paras, max_words, lang)
    words = [u.words for u in units]
    n = len(units)
    lo, hi = math.log(min_words), math.log(max_words)
    out: list[Passage] = []
    heading: str | None = None
    i = 0
    while i < n:
        while i < n and units[i].heading:
            heading = units[i].text
            i += 1
        if i >= n:
            break
        target = math.exp(rng.uniform(lo, hi))
        total, j = 0, i
        while j < n and total < target:
            total += words[j]
            j += 1
        best = None
        for e in {j, j - 1}:
            while e > i and units[e - 1].heading:
                e -= 1
            if e <= i:
                continue
            w = sum(words[i:e])
            if min_words <= w <= max_words:
                score = abs(math.log(w / target))
                if best is None or score < best[0]:
                    best = (score, e, w)
        if best is None:
            if total < min_words:  # the end of the book
                break
            i = max(j - 1, i + 1)  # skip the short run before a very long paragraph
            continue
        _, e, w = best
        text = "\n\n".join(u.text for u in units[i:e])
        out.append(Passage(f"{book_id}-{len(out):04d}", book_id, lang, i, e, text, w, int(round(target)), heading))
        for k in range(i, e):
            if units[k].heading:
                heading = units[k].text
        i = e
    return out


# ============================================================================== instructions
def round_length(words: int) -> int:
    """The required length stated for a passage of ``words`` words: to 10 below 300, to 50 below 2,000,
    else to 100 (at least 10)."""
    step = 10 if words < 300 else 50 if words < 2000 else 100
    return max(step, int(round(words / step)) * step)


_ABBREV = {"Mr", "Mrs", "Ms", "Dr", "St", "Mt", "Messrs", "Mme", "Mlle", "Capt", "Col", "Gen", "Lieut", "Rev",
           "Prof", "Sr", "Jr", "Gov", "Hon", "Sgt", "Lt", "Maj", "Gen", "Fr", "Bros", "Co", "No", "Vol", "Esq"}
_CAP_STOP = set("""I I'm I've I'll I'd The A An And But Or If It Its He She We They You His Her My Our Their Your
This That These Those There Then When What Which Who Whom Whose Why Where How O Oh Ah Alas Yes No Not Nay Sir
Madam Lord Lady God Mr Mrs Miss Ms Dr Chapter Book Part Section Volume Letter Well Now So Yet For Nor As At By
In On Of To With From Upon All Some Any Every Each One Two Three First Second Third Here Thus Hence Let Do Did
Is Was Were Be Been Have Had Has May Might Must Shall Should Will Would Can Could Such Very Perhaps However
Indeed Still Even Only Also Again Never Ever Once Mother Father Uncle Aunt Dear Monday Tuesday Wednesday
Thursday Friday Saturday Sunday January February March April June July August September October November
December Christmas English French Thou Thee Thy Ye Mister Master Madame Monsieur Heaven Don Upon After Before
Although Though While Since Because Until Unless Whether Whatever Whoever Him Me Us Them Mine Ours Yours Hers
Theirs Myself Himself Herself Themselves Yourself Ourselves Whom Sir Sirs Gentlemen Ladies Madam King Queen Prince
Princess Emperor Duke Earl Count Captain General Colonel Doctor Professor President Governor Judge Mayor Esq""".split())


def salient_terms(text: str, lang: str, k: int = 3) -> list[str]:
    """The ``k`` most frequent names/terms that occur in ``text``.

    English: capitalized words and runs of them ("Sherlock Holmes") not at a sentence start (a title like
    "Mr." does not end a sentence) and not common capitalized words, seen at least twice.
    Chinese: speakers before 道/說/曰 ("王冕道：") and other frequent 2-3 character names, seen at least
    three times, without common function characters. Only the first 16,000 (Chinese: 4,000) characters
    are read."""
    if lang == "zh":
        return _zh_terms(text[:4000], k)
    text = text[:16000]  # the names of a passage show in its first few thousand words
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for m in re.finditer(r"(?<![\w’'\-])[A-Z][a-z]+(?:[’'][a-z]+)?(?:\s+(?:(?:of|de|van|von|la|le)\s+)?[A-Z][a-z]+)*", text):
        phrase = re.sub(r"[’']s$", "", m.group(0))
        parts = phrase.split()
        while parts and parts[0] in _CAP_STOP:
            parts = parts[1:]
        while parts and parts[-1] in _CAP_STOP | _SMALL_WORDS:
            parts = parts[:-1]
        if not parts or (len(parts) == 1 and len(parts[0]) < 3):
            continue
        name = " ".join(parts)
        before = text[max(0, m.start() - 16):m.start()].rstrip()
        at_start = not before or before[-1] in ".!?“\"‘(\n:—" and not (
            before.endswith(".") and re.search(r"(?:^|\W)(" + "|".join(_ABBREV) + r")\.$", before))
        if parts[0] != phrase.split()[0]:
            at_start = False  # "The Martians": the stop word took the sentence start
        if not at_start:
            counts[name] += 1
            first.setdefault(name, m.start())
    lower_words = set(re.findall(r"(?<![\w’'])[a-z]+", text))  # "Through", "War": also used lowercase
    ranked = sorted((c for c in counts.items() if c[1] >= 2 and not (" " not in c[0] and c[0].lower() in lower_words)),
                    key=lambda x: (-x[1], first[x[0]]))
    out: list[str] = []
    for name, _ in ranked:
        if any(name in o.split() or name in o for o in out):
            continue
        out = [o for o in out if o not in name]
        out.append(name)
        if len(out) >= k:
            break
    return out


_ZH_STOP = set("的了是不在我你他她它們们之也而這这那一道說说有人來来去個个着著裏里見见得又將将便與与么麼呢吧嗎吗啊把被"
               "就都只和及以為为所其此些甚上下中出入到對对向從从自於于已今時时日年兩两三二十百千萬万回家心生子曰云聽听看"
               "叫問问答笑聲声事話话如何還还要可沒没無无再卻却纔才乃遂即因若雖虽然則则方正好多少這裡那裡不是什麼怎樣"
               "也只有當当等後后前裡里頭头面邊边手眼口身地天")


_ZH_STOP_TABLE = {ord(c): "|" for c in _ZH_STOP}


def _zh_terms(text: str, k: int) -> list[str]:
    speakers: Counter[str] = Counter()
    for m in re.finditer(r"([\u4e00-\u9fff]{2,3})(?:笑道|問道|问道|說道|说道|歎道|叹道|答道|喝道|罵道|骂道|道|曰)[：:，,]", text):
        name = m.group(1)
        while name and name[0] in _ZH_STOP:
            name = name[1:]
        if len(name) >= 2 and not any(c in _ZH_STOP for c in name):
            speakers[name] += 1
    runs = re.findall(r"[\u4e00-\u9fff]{2,}", text.translate(_ZH_STOP_TABLE))
    grams = Counter([r[s:s + n] for r in runs for n in (2, 3) for s in range(len(r) - n + 1)])
    score: Counter[str] = Counter()
    for g, c in grams.items():
        if c >= 3:
            score[g] = c * (1.5 if len(g) == 3 else 1.0) + 3 * speakers.get(g, 0)
    for s, c in speakers.items():
        if c >= 2:
            score[s] += 3 * c
    out: list[str] = []
    for g, _ in score.most_common():
        if len(g) == 2 and text.count(g + "人") >= 0.7 * text.count(g):
            g += "人"  # 王夫人, 夫人: 人 is a stop character
        if any(g in o or o in g for o in out):
            continue
        out.append(g)
        if len(out) >= k:
            break
    return out


def _clean_title(s: str) -> str:
    return re.sub(r"\s*\([^)]*\)", "", s).strip()


_LABEL = re.compile(r"^(?:(?:federalist\s+)?(?:chapter|chap|book|part|volume|vol|lecture|letter|essay|section|stave|"
                    r"canto|adventure|article|number|no|lesson|paper|day)\b\.?\s*"
                    r"(?:the\s+)?(?:[IVXLCDM]+\b|\d+|(?:" + _NUMWORD + r")\b)?|[IVXLC]+\b|\d+)\s*[.:—–-]*\s*", re.I)


def _title_case(s: str) -> str:
    words = s.lower().split(" ")
    return " ".join(w if (k and w in _SMALL_WORDS and not re.search(r"[.:;!?—-]$", words[k - 1]))
                    else (w[:1].upper() + w[1:]) for k, w in enumerate(words))


_DATELINE = re.compile(r"\b(?:January|February|March|April|May|June|July|August|September|October|November|"
                       r"December|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec)\.?\s+\d{1,2}\b.*\d{4}", re.I)


def heading_subject(heading: str | None, lang: str) -> str | None:
    """What a heading says a passage is about, without its label ("CHAPTER I / THE FRONTIER" -> "The
    Frontier"; "第一回　宴桃園豪傑三結義　斬黃巾英雄首立功" -> "宴桃園豪傑三結義，斬黃巾英雄首立功"); None when it
    is only a label ("Chapter 12")."""
    if not heading:
        return None
    if lang == "zh":
        lines = [l for l in heading.split("\n") if l.strip()]
        m = re.match(r"^(?:第[^回\s]{1,6}回|楔子|引子|引首)[\s\u3000：:]*(.*)$", lines[-1].strip())
        rest = m.group(1) if m else lines[-1]
        segs = [s for s in re.split(r"[\s\u3000，,]+", rest) if s]
        return "，".join(segs) or None
    after_label, last = None, None
    saw_label = False
    for line in heading.split("\n"):
        line = line.strip()
        rest = _LABEL.sub("", line, count=1) if _LABEL.match(line) else line
        rest = rest.strip(" .:;,—–-\"“”‘’*_")
        if rest != line.strip(" .:;,—–-\"“”‘’*_"):
            saw_label = True
            after_label = rest or None
            continue
        if not rest or _DATELINE.search(rest):  # "For the Independent Journal. Saturday, October 27, 1787"
            continue
        if saw_label and after_label is None:
            after_label = rest
        last = rest
    subj = after_label or last
    if not subj or not re.search(r"[A-Za-z]{3}", subj):
        return None
    if _letters_ratio_upper(subj) >= 0.85:
        subj = _title_case(subj)
    if len(subj) > 90:
        subj = subj[:90].rsplit(" ", 1)[0] + "…"
    return subj


_KIND_EN = {
    "novel": "a passage of a novel", "novella": "a passage of a novella", "stories": "a passage of a short story",
    "autobiography": "a passage of an autobiography", "essays": "a section of an essay",
    "treatise": "a section of a treatise", "pamphlet": "a section of a political pamphlet",
    "lectures": "a section of a lecture", "letters": "a letter", "speeches": "a speech",
    "speeches and letters": "a speech or letter", "history": "a section of a history book",
    "travel": "a passage of travel writing", "science": "a section of a scientific book",
    "journalism": "a piece of reportage", "manual": "a section of a practical manual",
    "textbook": "a section of a textbook", "school reader": "a reading lesson for a school reader",
    "periodical essays": "a periodical essay", "periodical (readers' queries and replies)":
        "a set of readers' notes, queries and replies for a periodical",
}
_KIND_ZH = {
    "novel": "一段章回小说的正文", "novella": "一段中篇小说的正文", "stories": "一段短篇小说", "autobiography": "一段自传",
    "essays": "一篇随笔的一部分", "treatise": "一篇论著的一节", "pamphlet": "一篇政论小册子的一节", "lectures": "一段讲演稿",
    "letters": "一封书信", "speeches": "一篇演讲稿", "speeches and letters": "一篇演讲稿或书信", "history": "一段史书",
    "travel": "一段游记", "science": "一段科学著作", "journalism": "一篇纪实报道", "manual": "一节实用手册",
    "textbook": "一节教科书", "school reader": "一篇课文", "periodical essays": "一篇报刊随笔",
    "periodical (readers' queries and replies)": "一组读者问答",
}

# {kind} {work} {topic} {about} {names} {length}; {about}/{names} may be empty, the others are not.
_TEMPLATES_EN = {
    "Literature and Creative Writing": [
        "Write {kind} in the style of {work}{about}.{names} It should be {length} long.",
        "Compose {kind} of {length}{about}, keeping the voice and period manner of {work}.{names}",
        "I'd like a piece of writing modelled on {work}: {kind}{about}.{names} Please make it {length}.",
        "Please write {kind}{about}.{names} Follow the style of {work} and aim for {length}.",
    ],
    "Academic and Monograph": [
        "Write {kind} on {topic}, in the scholarly manner of {work}.{names} Length: {length}.",
        "Compose a reasoned, well-argued discussion of {topic} ({kind}) of {length}, in the style of {work}.{names}",
        "Please write an academic text, {kind}, examining {topic}.{names} Aim for {length} and follow the manner of {work}.",
    ],
    "Popular Science": [
        "Explain {topic} to the general reader in {kind} of {length}, as {work} does.{names}",
        "Write {kind} popularizing {topic}, clear and vivid, in the style of {work}.{names} It should run to {length}.",
        "Please write an accessible piece of popular science ({kind}) about {topic}.{names} Length: {length}; style: {work}.",
    ],
    "Education and Training": [
        "Write {kind} that teaches {topic}, in the manner of {work}.{names} Make it {length}.",
        "Prepare instructional material, {kind}, on {topic}, of {length}, modelled on {work}.{names}",
        "Please write {kind} for learners about {topic}.{names} Aim for {length}, in the style of {work}.",
    ],
    "Functional Writing": [
        "Write {kind} on {topic}, in the style of {work}.{names} It should be {length} long.",
        "Draft {kind} dealing with {topic}: practical and to the point, like {work}.{names} Length: {length}.",
        "Please write a practical text, {kind}, covering {topic}.{names} Aim for {length}, following {work}.",
    ],
    "News Report": [
        "Write {kind} reporting on {topic}, in the manner of {work}.{names} It should be {length} long.",
        "As a correspondent, write {kind} about {topic}, with concrete facts and scenes, in the style of {work}.{names} Length: {length}.",
        "Please write a piece of journalism, {kind}, on {topic}.{names} Aim for {length}, like {work}.",
    ],
    "Community Forum": [
        "Write {kind}, a first-person piece for readers, about {topic}, in the style of {work}.{names} Make it {length}.",
        "Write {kind} sharing personal observations on {topic} with a general readership, like {work}.{names} Length: {length}.",
        "Please write {kind} in a conversational, reader-facing voice about {topic}.{names} Aim for {length}, modelled on {work}.",
    ],
}
_TEMPLATES_ZH = {
    "Literature and Creative Writing": [
        "请仿照{work}的笔法，写{kind}{about}。{names}篇幅{length}。",
        "以{work}的语言风格创作{kind}{about}，{length}。{names}",
        "写{kind}{about}，风格贴近{work}。{names}字数要求：{n}字。",
        "请创作{kind}，{length}{about}。{names}要求文白相间，有古典白话小说{work}的韵味。",
    ],
    "Academic and Monograph": [
        "请以{work}的学术笔法，写{kind}，论述{topic}。{names}篇幅{length}。",
        "围绕{topic}写{kind}，论证严谨，风格参照{work}。{names}字数要求：{n}字。",
        "写一篇学术性文字（{kind}），探讨{topic}，{length}。{names}",
    ],
    "Popular Science": [
        "请用通俗生动的语言，写{kind}，向普通读者介绍{topic}，风格参照{work}。{names}篇幅{length}。",
        "写一篇科普文字（{kind}），讲解{topic}，{length}。{names}",
        "参照{work}，为大众写{kind}，介绍{topic}。{names}字数要求：{n}字。",
    ],
    "Education and Training": [
        "请写{kind}，讲授{topic}，风格参照{work}。{names}篇幅{length}。",
        "为学习者编写{kind}，主题是{topic}，{length}。{names}",
        "参照{work}，写一段教学材料（{kind}），讲解{topic}。{names}字数要求：{n}字。",
    ],
    "Functional Writing": [
        "请写{kind}，内容是{topic}，风格参照{work}。{names}篇幅{length}。",
        "起草{kind}，讲{topic}，务求实用，{length}。{names}",
        "参照{work}，写一篇实用文字（{kind}），涉及{topic}。{names}字数要求：{n}字。",
    ],
    "News Report": [
        "请写{kind}，报道{topic}，风格参照{work}。{names}篇幅{length}。",
        "以记者的身份写{kind}，记述{topic}，要有具体的事实和场景，{length}。{names}",
        "参照{work}，写一篇纪实文字（{kind}），关于{topic}。{names}字数要求：{n}字。",
    ],
    "Community Forum": [
        "请以第一人称写{kind}，和读者分享关于{topic}的见闻与看法，风格参照{work}。{names}篇幅{length}。",
        "写{kind}，用亲切的口吻谈{topic}，{length}。{names}",
        "参照{work}，写一篇面向读者的随笔（{kind}），话题是{topic}。{names}字数要求：{n}字。",
    ],
}
_NAMES_EN = {"fiction": [" Feature {names}.", " The characters {names} should appear.", " Include {names}."],
             "other": [" Refer to {names}.", " Mention {names}.", " Bring in {names}."]}
_NAMES_ZH = {"fiction": ["出场人物包括{names}。", "要写到{names}。", "情节涉及{names}。"],
             "other": ["要提到{names}。", "须涉及{names}。", "行文中要谈到{names}。"]}
_LENGTH_EN = ["about {c} words", "{n} words", "approximately {c} words", "around {c} words", "{c} words"]
_LENGTH_ZH = ["约{n}字", "{n}字左右", "大约{n}字"]


def _join_names(names: list[str], lang: str) -> str:
    if lang == "zh":
        return "、".join(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def instruction_for(passage: Passage | str, book: Book, words: int, rng: random.Random, lang: str,
                    heading: str | None = None) -> str:
    """A templated instruction asking for ``passage`` (a :class:`Passage`, or its text with ``heading``).

    It states the required length ``round_length(words)`` ("about 1,200 words" / "约1200字", "字数要求：
    1200字"), the kind of text (from the book's ``form``; a "speeches and letters" passage that opens like a
    letter asks for a letter), the work it imitates (title and author) and its subject: the chapter
    heading (:func:`heading_subject`) and the salient names of the passage (:func:`salient_terms`), in
    ``lang``, with a phrasing drawn by ``rng`` from the templates of the book's LongBench-Write type."""
    text = passage.text if isinstance(passage, Passage) else passage
    heading = passage.heading if isinstance(passage, Passage) else heading
    n = round_length(words)
    typ = book.genre if book.genre in _TEMPLATES_EN else "Literature and Creative Writing"
    fiction = book.form in ("novel", "novella", "stories")
    subject = heading_subject(heading, lang)
    names = salient_terms(text, lang, k=3)
    if subject:
        names = [x for x in names if x not in subject][:3]
    title, author = _clean_title(book.title), _clean_title(book.author)
    anonymous = re.match(r"^(?:anonymous|various)\b", author, re.I)
    if lang == "zh":
        kind = _KIND_ZH.get(book.form, "一段文字")
        work = f"《{title}》" if anonymous else f"{author}的《{title}》"
        about = (f"，情节出自“{subject}”一回" if fiction else f"，题为“{subject}”") if subject else ""
        topic = subject or (_join_names(names, lang) if names else "书中讨论的一个题目")
        names_s = rng.choice(_NAMES_ZH["fiction" if fiction else "other"]).format(names=_join_names(names, lang)) \
            if names and (subject or typ == "Literature and Creative Writing") else ""
        length = rng.choice(_LENGTH_ZH).format(n=n)
        tpl = rng.choice(_TEMPLATES_ZH[typ])
        out = tpl.format(kind=kind, work=work, about=about, topic=topic, names=names_s, length=length, n=n)
        return re.sub(r"。。", "。", out).strip()
    kind = _KIND_EN.get(book.form, "a piece of prose")
    if "letter" in book.form and re.match(r"^\W*(?:my\s+)?dear\b", text[:200], re.I):
        kind = "a letter"
    elif book.form == "speeches and letters":
        kind = "a speech"
    work = title if anonymous else f"{title} by {author}"
    about = (f" for the chapter “{subject}”" if fiction else f" titled “{subject}”") if subject else ""
    topic = f"“{subject}”" if subject else (_join_names(names, lang) if names else "one of the subjects of the book")
    names_s = rng.choice(_NAMES_EN["fiction" if fiction else "other"]).format(names=_join_names(names, lang)) \
        if names and (subject or typ == "Literature and Creative Writing") else ""  # (without a subject the names are the topic)
    length = rng.choice(_LENGTH_EN).format(n=n, c=f"{n:,}")
    tpl = rng.choice(_TEMPLATES_EN[typ])
    out = tpl.format(kind=kind, work=work, about=about, topic=topic, names=names_s, length=length, n=n)
    return re.sub(r"\s+", " ", out).replace(" .", ".").strip()


def writer_prompt(text: str, n: int, lang: str, max_words: int = 1500) -> str:
    """The backtranslation request sent to a writer model: the passage (when longer than ``max_words``: its
    first ``0.85 * max_words`` words, "[...]" and its last paragraph if that is short) and the length ``n``
    the instruction must state."""
    shown = text
    if count_words(text) > max_words:
        head = truncate_words(text, int(max_words * 0.85))
        last = text.rsplit("\n\n", 1)[-1]
        tail = "\n\n" + last if count_words(last) <= 0.15 * max_words and last not in head else ""
        shown = head + "\n\n[...]" + tail
    if lang == "zh":
        return (f"下面是一段文字，是对某个用户请求的回答。请写出提出这个请求的用户指令：一小段中文，说明要写什么样的文字、"
                f"写什么内容，并写明字数要求为{n}字。只输出指令本身。\n\n文字（共{n}字）：\n{shown}")
    return (f"Here is a text written in answer to a user's request. Write the user instruction that asked for it: "
            f"one short paragraph in English that says what kind of text to write and what it is about, and states "
            f"its length of {n} words. Reply with the instruction only.\n\nText ({n} words):\n{shown}")


def _clean_writer_output(s: str, n: int, lang: str) -> str:
    s = s.strip().strip("\"“”'")
    s = re.sub(r"^(?:\*\*)?(?:user\s+)?instruction(?:\*\*)?\s*[:：]\s*", "", s, flags=re.I).strip()
    s = re.sub(r"^指令\s*[:：]\s*", "", s).strip()
    if required_length(s) != n:
        s = s.rstrip() + (f"（字数要求：{n}字）" if lang == "zh" else f" (Length: {n:,} words.)")
    return s


# ===================================================================================== splits
def split_books(books: Sequence[Book], nll_books: int, eval_books: int, seed: int) -> dict[str, list[Book]]:
    """Whole books for the ``nll`` and ``eval`` splits, the rest ``train``; deterministic for ``seed``.

    Each held-out split takes its books language by language in proportion to the languages' book counts,
    with at least one book of every language while the split has room (so with Chinese enabled both
    languages appear in the NLL set); within a language, books are drawn in a seeded order that cycles
    through the LongBench-Write types (varied held-out genres). No book is in two splits."""
    if nll_books < 0 or eval_books < 0:
        raise ValueError("corpus: nll_books and eval_books must be >= 0")
    if nll_books + eval_books >= len(books):
        raise ValueError(f"corpus: nll_books + eval_books = {nll_books + eval_books} leaves no training book "
                         f"out of {len(books)}")
    rng = random.Random(f"split:{seed}")
    by_lang: dict[str, list[Book]] = {}
    for b in sorted(books, key=lambda b: b.id):
        by_lang.setdefault(b.language, []).append(b)
    queues: dict[str, list[Book]] = {}
    for lang, bs in by_lang.items():
        by_type: dict[str, list[Book]] = {}
        for b in bs:
            by_type.setdefault(b.genre, []).append(b)
        for v in by_type.values():
            rng.shuffle(v)
        types = sorted(by_type)
        rng.shuffle(types)
        q = []
        while any(by_type.values()):
            for t in types:
                if by_type[t]:
                    q.append(by_type[t].pop())
        queues[lang] = q
    langs = sorted(by_lang, key=lambda l: (-len(by_lang[l]), l))
    total = len(books)

    def take(count: int) -> list[Book]:
        alloc = {l: 0 for l in langs}
        for l in sorted(langs, key=lambda l: len(by_lang[l])):  # at least one of each, rarest first
            if sum(alloc.values()) < count and queues[l]:
                alloc[l] = 1
        while sum(alloc.values()) < count:
            l = max(langs, key=lambda l: (len(by_lang[l]) / total * count - alloc[l] if len(queues[l]) > alloc[l]
                                          else -1e9))
            if len(queues[l]) <= alloc[l]:
                raise ValueError("corpus: not enough books for the held-out splits")
            alloc[l] += 1
        out = []
        for l in langs:
            out += [queues[l].pop(0) for _ in range(alloc[l])]
        return sorted(out, key=lambda b: b.id)

    nll = take(nll_books)
    ev = take(eval_books)
    held = {b.id for b in nll + ev}
    return {"train": [b for b in sorted(books, key=lambda b: b.id) if b.id not in held], "nll": nll, "eval": ev}


def spread_sample(items: Sequence[Any], k: int | None, rng: random.Random, key=lambda x: x) -> list[Any]:
    """``k`` items keeping the spread of ``key``: sort by ``key``, cut into ``k`` equal strata, draw one
    per stratum (all items when ``k`` is None or not smaller); returned in the input order."""
    if k is None or k >= len(items):
        return list(items)
    order = sorted(range(len(items)), key=lambda i: key(items[i]))
    picked = []
    for s in range(k):
        lo, hi = s * len(items) // k, (s + 1) * len(items) // k
        picked.append(order[rng.randrange(lo, hi)])
    return [items[i] for i in sorted(picked)]


def _balanced_sample(items: list[tuple[Passage, Book]], k: int | None, rng: random.Random) -> list[tuple[Passage, Book]]:
    """``k`` passages shared as evenly as possible among their books (round robin over the books that
    still have passages), each book's share chosen by :func:`spread_sample`; in the input order."""
    if k is None or k >= len(items):
        return list(items)
    by_book: dict[int, list[tuple[Passage, Book]]] = {}
    for it in items:
        by_book.setdefault(it[1].id, []).append(it)
    quota = {b: 0 for b in by_book}
    left = k
    while left:
        for b in sorted(by_book):
            if left and quota[b] < len(by_book[b]):
                quota[b] += 1
                left -= 1
    keep = set()
    for b in sorted(by_book):
        keep |= {id(x) for x in spread_sample(by_book[b], quota[b], rng, key=lambda x: x[0].words)}
    return [it for it in items if id(it) in keep]


# ====================================================================================== stage
@dataclass
class CorpusConfig:
    """Section ``corpus`` of a profile: human-written long-output SFT data (:func:`build_corpus`).

    Fields:
        path: folder with the books (``<id>.txt``, optionally its own ``manifest.jsonl``); null = the
            search order of :func:`long_texts_dir` (downloading into the cache when no folder has them).
        languages: which books to use, ``en`` and/or ``zh``.
        min_words: shortest passage target (words by the paper's rule).
        max_words: longest passage target; targets are log-uniform between the two.
        max_passages: cap on TRAIN passages after cutting (null = all), chosen by seed keeping the length
            spread (:func:`spread_sample`).
        max_passages_per_book: cap per book before the splits (null = all), chosen the same way.
        nll_books: whole books held out for the NLL study (notebook 05; ``heldout_nll.jsonl``).
        eval_books: whole books held out for evaluation (``heldout_eval.jsonl``).
        nll_max_passages: cap on the NLL split's passages (null = all), shared evenly among the NLL books,
            each book's share chosen keeping the length spread.
        nll_min_words, nll_max_words: the NLL books' own passage length range (null = ``min_words`` /
            ``max_words``): Figure 7's curve needs passages that all reach its end position.
        seed_offset: added to the profile's seed for cutting, splitting and phrasing (another draw of the
            same books).
        writer: a backend (``lwlib.backends.BackendConfig``, ``kind: openai`` for an API) that backtranslates
            the instructions (cached in ``writer_instructions.jsonl``); ``extra`` may set ``max_new_tokens``
            (256), ``temperature`` (0.7) and ``max_passage_words`` (1500, words of a passage shown to it).
            null = templates (:func:`instruction_for`).
        overwrite: rebuild even if outputs made with another config exist (else that is an error).
    """

    path: str | None = None
    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    min_words: int = 100
    max_words: int = 6000
    max_passages: int | None = None
    max_passages_per_book: int | None = None
    nll_books: int = 4
    eval_books: int = 4
    nll_max_passages: int | None = 64
    nll_min_words: int | None = None
    nll_max_words: int | None = None
    seed_offset: int = 0
    writer: BackendConfig | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.writer, dict):
            self.writer = from_dict(BackendConfig, self.writer, where="corpus.writer")
        if not self.languages or any(l not in ("en", "zh") for l in self.languages):
            raise ValueError(f"corpus.languages must be a non-empty subset of ['en', 'zh'], got {self.languages!r}")
        if not (0 < self.min_words < self.max_words):
            raise ValueError(f"corpus: need 0 < min_words < max_words, got {self.min_words}, {self.max_words}")
        for name in ("max_passages", "max_passages_per_book", "nll_max_passages"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"corpus.{name} must be a positive integer or null, got {v!r}")
        lo, hi = self.nll_min_words or self.min_words, self.nll_max_words or self.max_words
        if not (0 < lo < hi):
            raise ValueError(f"corpus: need 0 < nll_min_words < nll_max_words, got {lo}, {hi}")
        for name in ("nll_books", "eval_books"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"corpus.{name} must be an integer >= 0, got {getattr(self, name)!r}")


def _record(p: Passage, book: Book, instruction: str, source: str, split: str) -> dict:
    return {
        "messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": p.text}],
        "id": p.id, "source": SOURCE, "book_id": book.id, "title": book.title, "author": book.author,
        "lang": book.language, "type": book.genre, "form": book.form, "words": p.words,
        "required_length": round_length(p.words), "heading": heading_subject(p.heading, book.language),
        "paragraphs": [p.start, p.end], "target_words": p.target, "instruction_source": source, "split": split,
    }


def _quantiles(xs: list[int]) -> dict[str, float]:
    if not xs:
        return {}
    s = sorted(xs)
    q = {}
    for name, f in (("min", 0), ("p10", .1), ("p25", .25), ("p50", .5), ("p75", .75), ("p90", .9), ("max", 1)):
        q[name] = s[min(len(s) - 1, int(round(f * (len(s) - 1))))]
    q["mean"] = round(sum(s) / len(s), 1)
    return q


def _compared_config(prof: Profile, cfg: CorpusConfig, books: list[Book]) -> dict:
    c = dataclasses.asdict(cfg)
    c.pop("overwrite")
    for name in ("nll_min_words", "nll_max_words"):  # (absent when unset: corpora built before them stay valid)
        if c[name] is None:
            c.pop(name)
    c.pop("path")  # where the books lie does not change the output (their sha256 is checked)
    return json.loads(json.dumps({"corpus": c, "seed": prof.seed, "format_version": FORMAT_VERSION,
                                  "books_sha256": hashlib.sha256("".join(b.sha256 for b in books).encode()).hexdigest()},
                                 default=str))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def build_corpus(prof: Profile, cfg: CorpusConfig | None = None) -> dict:
    """Cut, instruct, split and save the corpus in ``prof.stage_dir("corpus")``; returns the stats.

    Writes ``longwriter.jsonl`` (train), ``heldout_nll.jsonl``, ``heldout_eval.jsonl`` (one
    ``{"messages": [user, assistant], "id", "source", "book_id", "title", "author", "lang", "type", "form",
    "words", "required_length", ...}`` per line), ``stats.json`` and ``manifest.json`` (last, so a folder
    with a manifest is complete). Outputs made with the same config are reused; with another config the
    call fails saying what changed, unless ``overwrite``."""
    cfg = cfg or prof.section("corpus", CorpusConfig)
    t0 = time.perf_counter()
    out = prof.stage_dir("corpus")
    files = [out / f for f in SPLITS.values()] + [out / "stats.json"]
    man = out / "manifest.json"
    done = man.exists() and all(f.exists() for f in files) and not cfg.overwrite
    # a finished corpus is checked against the manifest's books, so a machine without the books (a GPU machine
    # given the built corpus) reuses it; a rebuild needs the books (found or downloaded)
    folder = Path(cfg.path) if done and cfg.path else (None if done else long_texts_dir(cfg.path))
    all_books = _folder_books(folder) if folder is not None else load_manifest()
    books = [b for b in all_books if b.language in cfg.languages]
    if not books:
        raise ValueError(f"corpus: no books in {folder or BUNDLED_MANIFEST} for languages {cfg.languages}")
    compared = _compared_config(prof, cfg, books)
    if done:
        old = json.loads(man.read_text(encoding="utf-8")).get("config")
        if old == compared:
            stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
            return {**stats, "reused": True}
        changes = _diff(old, compared)
        raise ValueError(f"corpus: {out} holds a corpus built with another config ({'; '.join(changes)}); set "
                         "corpus.overwrite: true to rebuild it, or use another run folder")
    seed = prof.seed + cfg.seed_offset
    splits = split_books(books, cfg.nll_books, cfg.eval_books, seed)
    split_of = {b.id: s for s, bs in splits.items() for b in bs}
    cut: dict[str, list[tuple[Passage, Book]]] = {s: [] for s in SPLITS}
    n_cut = 0
    for b in tqdm(books, desc="corpus: cut books", unit="book"):
        paras = paragraphs(strip_gutenberg(read_book(b, folder), source=str(folder / b.filename)), b.language)
        lo, hi = ((cfg.nll_min_words or cfg.min_words, cfg.nll_max_words or cfg.max_words)
                  if split_of[b.id] == "nll" else (cfg.min_words, cfg.max_words))
        ps = cut_passages(paras, random.Random(f"cut:{seed}:{b.id}"), lo, hi, b.id, b.language)
        n_cut += len(ps)
        ps = spread_sample(ps, cfg.max_passages_per_book, random.Random(f"book-cap:{seed}:{b.id}"), key=lambda p: p.words)
        cut[split_of[b.id]] += [(p, b) for p in ps]
    cut["train"] = spread_sample(cut["train"], cfg.max_passages, random.Random(f"cap:{seed}"), key=lambda x: x[0].words)
    cut["nll"] = _balanced_sample(cut["nll"], cfg.nll_max_passages, random.Random(f"nll-cap:{seed}"))
    chosen = [(s, p, b) for s in SPLITS for p, b in cut[s]]
    if cfg.writer is not None:
        instr = _writer_instructions(prof, cfg, out, [(p, b) for _, p, b in chosen], seed)
        source = "writer"
    else:
        instr = {p.id: instruction_for(p, b, p.words, random.Random(f"instr:{seed}:{p.id}"), b.language)
                 for _, p, b in chosen}
        source = "template"
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for s, p, b in chosen:
        records[s].append(_record(p, b, instr[p.id], source, s))
    for s, name in SPLITS.items():
        atomic_write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[s]))
    stats: dict[str, Any] = {"passages_cut": n_cut, "passages_used": len(chosen), "instruction_source": source,
                             "folder": str(folder), "splits": {}}
    for s, rs in records.items():
        stats["splits"][s] = {
            "file": SPLITS[s], "passages": len(rs), "words": sum(r["words"] for r in rs),
            "by_lang": dict(sorted(Counter(r["lang"] for r in rs).items())),
            "by_type": dict(sorted(Counter(r["type"] for r in rs).items())),
            "word_quantiles": _quantiles([r["words"] for r in rs]),
            "word_quantiles_by_lang": {l: _quantiles([r["words"] for r in rs if r["lang"] == l])
                                       for l in sorted({r["lang"] for r in rs})},
            "books": [{"id": b.id, "title": b.title, "lang": b.language, "type": b.genre} for b in splits[s]],
        }
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / "stats.json", stats)
    write_manifest(out, compared)
    return {**stats, "reused": False}


def _writer_instructions(prof: Profile, cfg: CorpusConfig, out: Path, items: list[tuple[Passage, Book]],
                         seed: int) -> dict[str, str]:
    """Backtranslated instructions from ``cfg.writer``, cached in ``writer_instructions.jsonl`` under a key
    of passage id, text hash and writer model; failed requests are not stored (an error after the batch:
    rerun to retry them)."""
    w = cfg.writer
    model = w.model or prof.model
    store = JsonlStore(out / "writer_instructions.jsonl", key="key")
    extra = w.extra or {}
    params = GenParams(max_new_tokens=int(extra.get("max_new_tokens", 256)),
                       temperature=float(extra.get("temperature", 0.7)), seed=seed)
    show = int(extra.get("max_passage_words", 1500))

    def key(p: Passage) -> str:
        return f"{p.id}:{hashlib.sha256(p.text.encode()).hexdigest()[:16]}:{model}"

    todo = [(p, b) for p, b in items if key(p) not in store]
    if todo:
        backend = make_backend(w, prof.model, prof.device, prof.dtype)
        prompts = [writer_prompt(p.text, round_length(p.words), b.language, show) for p, b in todo]
        failed = []
        for i, g in backend.generate_iter(prompts, params, desc="corpus: backtranslate"):
            p, b = todo[i]
            if g.error or not g.text.strip():
                failed.append(f"{p.id}: {g.error or 'empty answer'}")
                continue
            store.append({"key": key(p), "id": p.id, "model": model, "raw": g.text,
                          "instruction": _clean_writer_output(g.text, round_length(p.words), b.language)})
        if failed:
            raise RuntimeError(f"corpus: the writer failed on {len(failed)} of {len(todo)} passages (first: "
                               f"{failed[0]}); the others are cached in {store.path}: rerun to retry")
    return {p.id: store.get(key(p))["instruction"] for p, _ in items}


def _fit(para: str, max_words: int, lang: str) -> list[str]:
    """``para`` as consecutive fragments of at most ``max_words`` words, all its text kept: whole sentences packed
    together, a longer sentence cut between words (Chinese: between characters)."""
    if count_words(para) <= max_words:
        return [para]
    joiner = "" if lang == "zh" else " "
    units: list[str] = []
    for sent in split_sentences(para, lang):
        if count_words(sent) <= max_words:
            units.append(sent)
            continue
        toks = list(sent) if lang == "zh" else sent.split()
        cur: list[str] = []
        for t in toks:
            if cur and count_words(joiner.join(cur + [t])) > max_words:
                units.append(joiner.join(cur))
                cur = []
            cur.append(t)
        if cur:
            units.append(joiner.join(cur))
    out, cur, cw = [], [], 0
    for u in units:
        w = count_words(u)
        if cur and cw + w > max_words:
            out.append(joiner.join(cur))
            cur, cw = [], 0
        cur.append(u)
        cw += w
    if cur:
        out.append(joiner.join(cur))
    return out


def cut_text(text: str, max_words: int, lang: str) -> list[str]:
    """``text`` (paragraphs joined by blank lines) cut into consecutive, paragraph-aligned pieces of at most
    ``max_words`` words (:func:`lwlib.text.count_words`), as equal as the paragraphs allow: each piece closes where
    the running total passes its share of the fewest pieces that fit. A paragraph longer than ``max_words`` is split
    at sentence ends (a longer sentence between words); no text is lost. Text of at most ``max_words`` words comes
    back whole.

    Usage: ``cut_text(record["messages"][1]["content"], 1000, "en")``
    """
    if max_words < 1:
        raise ValueError(f"cut_text: max_words must be >= 1, got {max_words}")
    if count_words(text) <= max_words:
        return [text]
    paras = [Paragraph(f) for t in text.split("\n\n") if t.strip() for f in _fit(t, max_words, lang)]
    total = sum(p.words for p in paras)
    share = total / math.ceil(total / max_words)
    pieces: list[list[Paragraph]] = [[]]
    done, cur = 0, 0  # words in finished pieces, in the current one
    for p in paras:
        if pieces[-1] and (cur + p.words > max_words
                           or abs(done + cur - share * len(pieces)) < abs(done + cur + p.words - share * len(pieces))):
            pieces.append([])
            done, cur = done + cur, 0
        pieces[-1].append(p)
        cur += p.words
    return ["\n\n".join(p.text for p in piece) for piece in pieces if piece]


def cut_records(records: list[dict], max_words: int, seed: int = 0) -> list[dict]:
    """The controlled experiment's data by construction: every corpus record's passage (:func:`build_corpus`'s
    records) cut by :func:`cut_text` into pieces of at most ``max_words`` words, each with its own templated
    instruction for its own length (:func:`instruction_for`: the book, the chapter, the piece's names), so every cap
    holds the same text and only the lengths differ. Piece ``k`` of record ``id`` is ``<id>.<max_words>.<k>``; a
    record that fits is kept (its instruction too). Records of other sources (no ``book_id``) are an error.

    Usage: ``cut_records(load_corpus(prof, "train"), 500)``
    """
    books = {b.id: b for b in load_manifest()}
    out = []
    for r in records:
        if "book_id" not in r or r.get("book_id") not in books:
            raise ValueError(f"cut_records: record {r.get('id')!r} is not a corpus passage of a manifest book "
                             "(sft.cap_mode: cut needs sft.data_path: corpus)")
        text = r["messages"][-1]["content"]
        pieces = cut_text(text, max_words, r["lang"])
        if len(pieces) == 1:
            out.append(r)
            continue
        book = books[r["book_id"]]
        for k, piece in enumerate(pieces):
            words = count_words(piece)
            instr = instruction_for(piece, book, words, random.Random(f"cut:{seed}:{r['id']}:{max_words}:{k}"),
                                    r["lang"], r.get("heading"))
            out.append({**r, "id": f"{r['id']}.{max_words}.{k}", "words": words,
                        "required_length": round_length(words), "cut_from": r["id"], "cut_at": max_words,
                        "messages": [{"role": "user", "content": instr}, {"role": "assistant", "content": piece}]})
    return out


def load_corpus(prof: Profile, split: str = "train") -> list[dict]:
    """The records of one split (``train``, ``nll`` or ``eval``) written by :func:`build_corpus`."""
    if split not in SPLITS:
        raise ValueError(f"load_corpus: split must be one of {sorted(SPLITS)}, got {split!r}")
    path = prof.run_dir / "corpus" / SPLITS[split]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: build the corpus first (lwlib.corpus.build_corpus)")
    return read_jsonl(path)
