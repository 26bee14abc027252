"""AgentWrite (the paper's Section 3): build long-output SFT data by planning, then writing paragraph by paragraph.

Step I (plan): the paper's plan prompt (``lwlib/prompts/plan.txt``, verbatim) turns an instruction into
one line per paragraph, "Paragraph N - Main Point: ... - Word Count: ... words" (200-1000 words each).
Step II (write): the paper's write prompt (``lwlib/prompts/write_v{1,2}.txt``, verbatim; v2, the
default, adds "As this is an ongoing work, omit open-ended conclusions or other rhetorical hooks.") is
called serially per paragraph with the instruction, the full plan, all text written so far and the
current plan line; the paragraphs are concatenated.

Engine:
  * Serial within an instruction, parallel across instructions: the local backend gets step k of every
    active instruction in one batched ``generate`` call; an API backend runs a bounded pool of
    ``concurrent_instructions`` instructions, each making its calls in order.
  * Cached and resumable: every call's result is appended to ``plans.jsonl`` / ``paragraphs.jsonl``
    the moment it completes, keyed by a hash of the exact request (model, prompt text, sampling
    settings, attempt). A killed run recomputes the same requests and finds them stored, so nothing is
    lost or duplicated, and identical requests (even under another instruction id) are never paid twice.
  * Context cap (``max_prompt_tokens``): the paper's writers (GPT-4o, 128k context) never needed one;
    a small-context model does. The oldest already-written paragraphs are dropped from $TEXT$ (the
    instruction and plan stay) until the write prompt fits, and the number dropped is recorded.
  * Post-filter (the paper's): drop failed plans, outputs far shorter than planned
    (``min_length_ratio``) and strip "Paragraph N"-style labels the model copied into the text; the
    reason for every drop is recorded.

Outputs in ``<run>/agentwrite/``: ``longwriter.jsonl`` (LongWriter-6k format, ``{"messages": [user,
assistant]}``), ``heldout.jsonl`` (same format, ``heldout`` items kept out of SFT for the NLL study),
``items.jsonl`` (side file: plan, per-paragraph target and actual words, tokens, cost, drop reason,
provenance), ``summary.json`` and ``manifest.json``.

Usage::

    cfg = prof.section("agentwrite", AgentWriteConfig)
    print(dry_run(cfg, load_agentwrite_instructions(prof, cfg)))     # calls, tokens, cost: nothing spent
    result = build_dataset(prof, cfg)                                  # resumable
    result.summary["kept"], result.items[0]["steps"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .backends import Backend, BackendConfig, GenParams, make_backend
from .config import Profile
from .typed import check_sizes
from .instructions import Instruction, check_no_benchmark_leak, generate_instructions, load_instructions
from .plots import pyplot, save_figure
from .runs import JsonlStore, atomic_write_json, atomic_write_text, write_manifest
from .text import count_words

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
WRITE_VERSIONS = ("v1", "v2")


def plan_template() -> str:
    """The paper's plan prompt (``$INST$`` placeholder), verbatim from THUDM/LongWriter."""
    return (PROMPT_DIR / "plan.txt").read_text(encoding="utf-8")


def write_template(version: str = "v2") -> str:
    """The paper's write prompt (``$INST$ $PLAN$ $TEXT$ $STEP$``): ``v1`` as first released, ``v2`` (default)
    with the later added sentence about omitting open-ended conclusions."""
    if version not in WRITE_VERSIONS:
        raise ValueError(f"write prompt version must be one of {WRITE_VERSIONS}, got {version!r}")
    return (PROMPT_DIR / f"write_{version}.txt").read_text(encoding="utf-8")


# --- plan parsing --------------------------------------------------------------------------------------
@dataclass
class PlanStep:
    """One parsed plan line: paragraph ``number``, ``main_point`` and ``words`` (target; None if not stated)."""

    number: int
    main_point: str
    words: int | None
    line: str = ""

    def render(self, lang: str = "en") -> str:
        """The step as one canonical plan line (the paper's format; Chinese format for ``zh``)."""
        if lang == "zh":
            wc = f" - 字数要求：{self.words}字" if self.words else ""
            return f"第{self.number}段 - 主要内容：{self.main_point}{wc}"
        wc = f" - Word Count: {self.words} words" if self.words else ""
        return f"Paragraph {self.number} - Main Point: {self.main_point}{wc}"


_CN_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}


def _cn_number(s: str) -> int | None:
    """Arabic or simple Chinese numerals up to 99 (``十二``, ``二十``, ``3``)."""
    if s.isdigit():
        return int(s)
    if "十" in s:
        a, _, b = s.partition("十")
        tens = _CN_DIGITS.get(a, None) if a else 1
        ones = _CN_DIGITS.get(b, None) if b else 0
        return None if tens is None or ones is None else tens * 10 + ones
    if len(s) == 1 and s in _CN_DIGITS:
        return _CN_DIGITS[s]
    return None


# full-width digits and the separators that come with them (０-９, －, ～, ．) read as ASCII
_FULLWIDTH = str.maketrans({**{chr(0xFF10 + i): str(i) for i in range(10)}, "－": "-", "～": "~", "．": "."})
_CN_NUM = r"[0-9一二两三四五六七八九十〇零]+"
_SEP = r"\s*(?:[-–—:：.|,，、]\s*)*"
_HEADERS = [
    re.compile(r"^(?:paragraph|para\.?|section|part|step)\s*(\d+)\b" + _SEP + r"(.*)$", re.I),
    re.compile(r"^第\s*(" + _CN_NUM + r")\s*(?:段落?|部分|节|章)" + _SEP + r"(.*)$"),
    re.compile(r"^(?:段落|部分)\s*(" + _CN_NUM + r")(?![0-9])" + _SEP + r"(.*)$"),  # 段落1 / 段落一 / 部分2
    re.compile(r"^\(?(\d{1,2})\s*[.)、:：](?!\d)" + _SEP + r"(.*)$"),
]
_WC_LABEL = re.compile(r"(?:(?:word\s*count|words?\s*(?:requirement|limit)|length)\s*[:：]"
                       r"|(?:字数要求|字数|篇幅)\s*(?:[:：]|(?=(?:约|大约|大概)?\s*\d)))\s*(.*)$", re.I)
_MP_LABEL = re.compile(r"^(?:main\s*points?|main\s*idea|content|topic|主要内容|内容要点|主要观点|核心内容|内容|要点|观点|主旨)"
                       r"\s*[:：]\s*", re.I)
_NUM = r"(\d[\d,]*)"
_RANGE = re.compile(_NUM + r"(?:\s*(?:-|–|—|~|to|至|到)\s*" + _NUM + r")?")
_APPROX = r"(?:approx\.?|approximately|about|around|~|约|大约|大概)?"
_COUNT = _NUM + r"(?:\s*(?:-|–|—|~|to|至|到)\s*" + _NUM + r")?\s*(?:words?|字)(?:左右)?"
_TRAILING_WC = re.compile(r"[\s(（\-–—,，;；]*" + _APPROX + r"\s*" + _COUNT + r"\s*[)）]?\s*[.。]?\s*$", re.I)
# a count in parentheses before the main point: "第1段（约300字）：描写清晨的市场"
_LEADING_WC = re.compile(r"^[(（]\s*" + _APPROX + r"\s*" + _COUNT + r"\s*[)）]" + _SEP, re.I)


def parse_word_count(s: str) -> int | None:
    """The first number (or range) in ``s``: "approx. 400 words" -> 400, "400-500 words" -> 450.

    A range gives its **midpoint** (rounded down), the length the planner aimed at on average.
    """
    m = _RANGE.search(s.translate(_FULLWIDTH))
    if not m:
        return None
    lo = int(m.group(1).replace(",", ""))
    if m.group(2):
        hi = int(m.group(2).replace(",", ""))
        return (lo + hi) // 2 if hi >= lo else lo
    return lo


def _clean(line: str) -> str:
    line = line.replace("**", "").replace("__", "").strip()
    line = re.sub(r"^(?:[#>]+|[-*+•·]\s+)\s*", "", line)
    return line.strip()


def _split_main_and_words(rest: str) -> tuple[str, int | None]:
    words = None
    lead = _LEADING_WC.match(rest)
    if lead:
        words = parse_word_count(lead.group(0))
        rest = rest[lead.end():]
    m = _WC_LABEL.search(rest)
    if m:
        words = parse_word_count(m.group(1))
        rest = rest[: m.start()]
    else:
        t = _TRAILING_WC.search(rest)
        if t:
            words = parse_word_count(t.group(0))
            rest = rest[: t.start()]
    rest = _MP_LABEL.sub("", rest.strip())
    rest = re.sub(r"[\s\-–—:：|,，;；(（]+$", "", rest).strip()
    return rest, words


def parse_plan(text: str) -> list[PlanStep]:
    """Parse a model-written plan into steps (see the module docstring for the format).

    Copes with hyphen/en dash/em dash/colon separators, markdown bold, headings and bullets, blank lines,
    preambles, "approx. 400 words", ranges ("400-500 words" -> midpoint 450), Chinese plans
    ("第1段 - 主要内容：... - 字数要求：400字", and the common variants: 段落N / 第N部分 headers, 要点 /
    主要观点 / 内容 labels, 字数 / 约400字 / 400字左右 / a count in parentheses before the main point, Chinese
    numerals, full-width digits and colons), numbered lists without "Paragraph", and steps whose main
    point / word count sit on the following lines (labelled bullets, or bare text under "Paragraph 1:").
    Lines that are not steps are dropped, as are steps without a main point and repeated paragraph numbers
    (the first occurrence wins).
    """
    steps: list[PlanStep] = []
    for raw in text.splitlines():
        line = _clean(raw.translate(_FULLWIDTH))
        if not line:
            continue
        for rx in _HEADERS:
            m = rx.match(line)
            if m:
                num = _cn_number(m.group(1))
                if num is None:
                    break
                main, words = _split_main_and_words(m.group(2))
                steps.append(PlanStep(num, main, words, raw.strip()))
                break
        else:  # continuation line of the previous step ("- Main Point: ...", "- Word Count: 400 words")
            if steps:
                last = steps[-1]
                wc = _WC_LABEL.match(line)
                if wc and last.words is None:
                    last.words = parse_word_count(wc.group(1))
                elif not wc and not last.main_point:  # "Main Point: ..." or the bare text under "Paragraph 1:"
                    last.main_point, w = _split_main_and_words(line)
                    last.words = last.words if last.words is not None else w
    out, seen = [], set()
    for s in steps:
        if s.main_point and s.number not in seen:
            seen.add(s.number)
            out.append(s)
    return out


def plan_failure(steps: list[PlanStep], max_steps: int = 50) -> str | None:
    """Why a parsed plan is unusable (``no_steps``, ``too_many_steps``), or None. The paper skips plans
    with more than 50 steps."""
    if not steps:
        return "no_steps"
    if len(steps) > max_steps:
        return f"too_many_steps ({len(steps)} > {max_steps})"
    return None


_CN_STEP = r"第\s*[0-9０-９一二两三四五六七八九十]+\s*(?:段落?|部分)|段落\s*[0-9０-９一二两三四五六七八九十]+"
_LABEL_LINE = re.compile(
    r"^\s*(?:#+\s*)?(?:\*\*)?\s*(?:paragraph\s*\d+|" + _CN_STEP + r")\s*(?:\*\*)?"
    r"\s*(?:[-–—:：]\s*)?(?:main\s*point|主要内容|主要观点|要点)\s*[:：].*$", re.I | re.M)
_WC_LINE = re.compile(r"^\s*[-*]?\s*(?:\*\*)?(?:word\s*count|字数要求|字数)\s*[:：].*$", re.I | re.M)
_LABEL_PREFIX = re.compile(
    r"^(\s*(?:#+\s*)?)(?:\*\*)?\s*(?:paragraph\s*\d+|" + _CN_STEP + r")\s*(?:\*\*)?\s*(?:[-–—:：.]\s*|$)",
    re.I | re.M)


def strip_labels(text: str) -> str:
    """Remove plan scaffolding the writer copied: whole plan lines ("Paragraph 2 - Main Point: ..."),
    "Word Count: ..." lines and "Paragraph N:" / "**Paragraph N**" / "第N段：" prefixes (a following subtitle
    is kept)."""
    text = _LABEL_LINE.sub("", text)
    text = _WC_LINE.sub("", text)
    text = _LABEL_PREFIX.sub(r"\1", text)
    text = re.sub(r"^\s*#+\s*$", "", text, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --- configuration ---------------------------------------------------------------------------------------
@dataclass
class AgentWriteConfig:
    """The ``agentwrite`` section of a profile.

    Fields:
        instructions: ``generated`` (built-in generator) or a path to a JSONL/.txt instruction file.
        n_instructions: how many instructions to generate (or the first N of the file; null = all).
        languages: languages of generated instructions (``en``, ``zh``).
        min_words: smallest required length of generated instructions (words).
        max_words: largest required length of generated instructions (words).
        heldout: items kept out of ``longwriter.jsonl`` into ``heldout.jsonl`` (NLL evaluation, notebook 05).
        write_prompt: write prompt version, ``v2`` (default, newest) or ``v1``.
        plan_max_new_tokens: token budget of a plan call (the paper's scripts: 4096).
        write_max_new_tokens: token budget of a paragraph call (the paper's scripts: 4096).
        temperature: sampling temperature of both steps (the paper's scripts: 1.0, the API default).
        top_p: nucleus mass (1.0 = off).
        plan_retries: extra plan attempts (new sample) when a plan does not parse; 0 = the paper's behaviour.
        max_steps: plans with more steps are failures (the paper: 50).
        max_paragraphs: write only the first N plan steps (null = all); for quick runs, recorded per item.
        max_prompt_tokens: cap on a write prompt's tokens; the oldest written paragraphs are dropped from
            $TEXT$ to fit (null = no cap; the paper's 128k-context writers needed none).
        default_paragraph_words: target assumed for a step whose plan line states no word count.
        min_length_ratio: drop an item whose words / planned words is below this (far shorter than planned).
        min_output_words: drop an item with fewer output words than this (the paper's set: >= 2,000).
        strip_labels: remove "Paragraph N" labels copied into the text.
        concurrent_instructions: instructions in flight at once with an API backend.
        prices: USD per million tokens per model, ``{model: [input, output]}``, for cost estimates.
        tokens_per_word: tokens per counted word, for dry-run estimates (English ~1.3-1.4, Chinese ~1-1.5).
        check_leak: refuse instructions that overlap LongBench-Write prompts (needs the benchmark file).
        backend: generation backend (lwlib.backends.BackendConfig).
        overwrite: when the stored calls (plans, paragraphs) were made under another seed
            (lwlib.runs.StaleRunError), move them aside and start anew instead of refusing.
    """

    instructions: str = "generated"
    n_instructions: int | None = 400
    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    min_words: int = 2000
    max_words: int = 20000
    heldout: int = 0
    write_prompt: str = "v2"
    plan_max_new_tokens: int = 4096
    write_max_new_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    plan_retries: int = 0
    max_steps: int = 50
    max_paragraphs: int | None = None
    max_prompt_tokens: int | None = None
    default_paragraph_words: int = 400
    min_length_ratio: float = 0.5
    min_output_words: int = 0
    strip_labels: bool = True
    concurrent_instructions: int = 8
    prices: dict[str, list[float]] = field(default_factory=dict)
    tokens_per_word: float = 1.35
    check_leak: bool = True
    backend: BackendConfig = field(default_factory=BackendConfig)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.write_prompt not in WRITE_VERSIONS:
            raise ValueError(f"write_prompt must be one of {WRITE_VERSIONS}, got {self.write_prompt!r}")
        check_sizes(self, "agentwrite", 0, "heldout", "plan_retries", "min_output_words")
        check_sizes(self, "agentwrite", 1, "n_instructions", "min_words", "max_words", "plan_max_new_tokens",
                    "write_max_new_tokens", "max_steps", "max_paragraphs", "max_prompt_tokens",
                    "default_paragraph_words", "concurrent_instructions")


def load_agentwrite_instructions(prof: Profile, cfg: AgentWriteConfig) -> list[Instruction]:
    """The profile's instructions: generated under the profile seed, or read from ``cfg.instructions``;
    checked against LongBench-Write when ``cfg.check_leak`` (skipped with a note if the file is absent)."""
    if cfg.instructions == "generated":
        insts = generate_instructions(cfg.n_instructions or 400, prof.seed, tuple(cfg.languages),
                                      cfg.min_words, cfg.max_words)
    else:
        insts = load_instructions(cfg.instructions)
        if cfg.n_instructions:
            insts = insts[: cfg.n_instructions]
    if cfg.check_leak:
        try:
            from .data import load_longbench_write

            bench = [it.prompt for it in load_longbench_write()]
        except FileNotFoundError as e:
            print(f"[agentwrite] leak check skipped: {e}")
        else:
            check_no_benchmark_leak(insts, bench)
    return insts


# --- accounting -----------------------------------------------------------------------------------------
def approx_tokens(text: str) -> int:
    """Rough token count without a tokenizer: CJK characters ~0.8 token each, other text ~4 characters a token."""
    cjk = len(re.findall(r"[\u4e00-\u9fff]", text))
    return max(1, math.ceil(cjk * 0.8 + (len(text) - cjk) / 4))


def cost_usd(prices: dict[str, list[float]], model: str, tokens_in: int, tokens_out: int) -> float | None:
    """Cost of ``tokens_in``/``tokens_out`` at ``prices[model]`` (USD per million), or None without a price."""
    p = prices.get(model)
    if not p:
        return None
    if len(p) != 2:
        raise ValueError(f"agentwrite.prices[{model!r}] must be [input, output] USD per million tokens")
    return (tokens_in * p[0] + tokens_out * p[1]) / 1e6


def dry_run(cfg: AgentWriteConfig, instructions: list[Instruction], model: str = "",
            paragraph_words: int = 500) -> dict[str, Any]:
    """Estimate calls, tokens and cost before spending anything (no model is loaded, nothing is called).

    Assumes each instruction's plan has ``ceil(length / paragraph_words)`` steps (capped by
    ``max_steps``/``max_paragraphs``), that paragraphs reach their targets, and ``cfg.tokens_per_word``.
    Write-prompt input grows with the text so far (capped at ``max_prompt_tokens``), so input tokens
    grow quadratically with the output length.
    """
    model = cfg.backend.model or model
    ptpl, wtpl = plan_template(), write_template(cfg.write_prompt)
    calls = t_in = t_out = 0
    for ins in instructions:
        length = ins.length or 2000
        n = max(1, math.ceil(length / paragraph_words))
        n = min(n, cfg.max_steps, cfg.max_paragraphs or n)
        plan_out = n * 40
        t_in += approx_tokens(ptpl.replace("$INST$", ins.prompt))
        t_out += plan_out
        calls += 1
        base = approx_tokens(wtpl.replace("$INST$", ins.prompt)) + plan_out
        para = round(length / n * cfg.tokens_per_word)
        for k in range(n):
            prompt = base + para * k + 40
            t_in += min(prompt, cfg.max_prompt_tokens) if cfg.max_prompt_tokens else prompt
            t_out += min(para, cfg.write_max_new_tokens)
            calls += 1
    return {"instructions": len(instructions), "calls": calls, "tokens_in": t_in, "tokens_out": t_out,
            "model": model, "cost_usd": cost_usd(cfg.prices, model, t_in, t_out)}


# --- the engine -------------------------------------------------------------------------------------------
def request_key(model: str, kind: str, prompt: str, max_new_tokens: int, cfg: AgentWriteConfig, attempt: int = 0) -> str:
    """Hash of everything that determines a call's answer: equal keys are the same request."""
    blob = json.dumps([model, kind, prompt, max_new_tokens, cfg.temperature, cfg.top_p, attempt], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


@dataclass
class _Request:
    key: str
    kind: str  # "plan" | "write"
    prompt: str
    max_new_tokens: int
    meta: dict[str, Any]


class _Job:
    """One instruction's state machine: plan (with retries), then its steps in order."""

    def __init__(self, ins: Instruction, cfg: AgentWriteConfig, model: str,
                 count_tokens: Callable[[str], int]):
        self.ins, self.cfg, self.model, self.count_tokens = ins, cfg, model, count_tokens
        self.attempt = 0
        self.plan_records: list[dict] = []
        self.steps: list[PlanStep] | None = None
        self.n_planned_steps = 0
        self.paragraphs: list[dict] = []
        self.failure: str | None = None  # permanent (plan failed / prompt too long)
        self.error: str | None = None  # transient (call failed): retried on the next run
        self.plan_text = ""

    @property
    def active(self) -> bool:
        return self.failure is None and self.error is None

    def next_request(self) -> _Request | None:
        if not self.active:
            return None
        cfg = self.cfg
        if self.steps is None:
            prompt = plan_template().replace("$INST$", self.ins.prompt)
            key = request_key(self.model, "plan", prompt, cfg.plan_max_new_tokens, cfg, self.attempt)
            return _Request(key, "plan", prompt, cfg.plan_max_new_tokens, {"attempt": self.attempt})
        k = len(self.paragraphs)
        if k >= len(self.steps):
            return None
        plan = self.plan_text
        step = self.steps[k].render(self.ins.lang)
        tpl = write_template(cfg.write_prompt).replace("$INST$", self.ins.prompt).replace("$PLAN$", plan)
        texts = [p["response"] for p in self.paragraphs]
        dropped = 0

        def build(d: int) -> str:
            body = "\n\n".join(texts[d:]).strip()
            if d:
                body = "[...]\n\n" + body
            return tpl.replace("$TEXT$", body).replace("$STEP$", step)

        prompt = build(0)
        if cfg.max_prompt_tokens and self.count_tokens(prompt) > cfg.max_prompt_tokens:
            lo, hi = 1, len(texts)  # smallest number of dropped paragraphs that fits
            while lo < hi:
                mid = (lo + hi) // 2
                if self.count_tokens(build(mid)) <= cfg.max_prompt_tokens:
                    hi = mid
                else:
                    lo = mid + 1
            dropped = lo
            prompt = build(dropped)
            if self.count_tokens(prompt) > cfg.max_prompt_tokens:
                self.failure = f"prompt_too_long (instruction + plan exceed max_prompt_tokens={cfg.max_prompt_tokens})"
                return None
        key = request_key(self.model, "write", prompt, cfg.write_max_new_tokens, cfg)
        return _Request(key, "write", prompt, cfg.write_max_new_tokens,
                        {"step": k, "plan_line": step, "target_words": self.steps[k].words,
                         "context_dropped_paragraphs": dropped})

    def accept(self, req: _Request, rec: dict) -> None:
        if req.kind == "plan":
            self.plan_records.append(rec)
            steps = parse_plan(rec["response"])
            why = plan_failure(steps, self.cfg.max_steps)
            if why is None:
                self.n_planned_steps = len(steps)
                self.steps = steps[: self.cfg.max_paragraphs] if self.cfg.max_paragraphs else steps
                self.plan_text = "\n".join(s.render(self.ins.lang) for s in self.steps)
            elif self.attempt < self.cfg.plan_retries:
                self.attempt += 1
            else:
                self.failure = f"plan_failed: {why}"
        else:
            self.paragraphs.append({**rec, **req.meta})


class _Recorder:
    """Thread-safe appends of call records to the two stores."""

    def __init__(self, folder: Path, model: str, backend_kind: str, fingerprint: dict | None = None,
                 overwrite: bool = False):
        kw = dict(key="key", fingerprint=fingerprint, overwrite=overwrite, stage="agentwrite")
        self.stores = {"plan": JsonlStore(folder / "plans.jsonl", **kw),
                       "write": JsonlStore(folder / "paragraphs.jsonl", **kw)}
        self.lock = threading.Lock()
        self.model, self.backend_kind = model, backend_kind
        self.calls = self.cache_hits = 0

    def cached(self, req: _Request) -> dict | None:
        with self.lock:
            return self.stores[req.kind].get(req.key)

    def record(self, job: _Job, req: _Request, g) -> dict:
        rec = {"key": req.key, "id": job.ins.id, **{k: v for k, v in req.meta.items() if k in ("attempt", "step")},
               "model": self.model, "backend": self.backend_kind, **g.as_record()}
        with self.lock:
            if req.key in self.stores[req.kind]:  # a concurrent identical request finished first
                return self.stores[req.kind].get(req.key)
            self.stores[req.kind].append(rec)
            self.calls += 1
        return rec


def _advance(job: _Job, rec: _Recorder) -> _Request | None:
    """Feed the job cached answers until it needs a call that is not stored (or is finished)."""
    while True:
        req = job.next_request()
        if req is None:
            return None
        hit = rec.cached(req)
        if hit is None:
            return req
        rec.cache_hits += 1
        job.accept(req, hit)


def _run_local(jobs: list[_Job], backend: Backend, rec: _Recorder, cfg: AgentWriteConfig, seed: int) -> None:
    rnd = 0
    while True:
        pending = [(j, r) for j in jobs if (r := _advance(j, rec)) is not None]
        if not pending:
            return
        uniq: dict[str, list[tuple[_Job, _Request]]] = {}
        for j, r in pending:  # identical requests in one round are generated once
            uniq.setdefault(r.key, []).append((j, r))
        groups = list(uniq.values())
        params = GenParams(cfg.write_max_new_tokens, cfg.temperature, cfg.top_p, seed=seed + rnd)
        kinds = sorted({r.kind for _, r in pending})
        desc = f"agentwrite round {rnd + 1}: {len(groups)} x {'/'.join(kinds)}"
        for i, g in backend.generate_iter([grp[0][1].prompt for grp in groups], params,
                                          [grp[0][1].max_new_tokens for grp in groups], desc=desc):
            for job, req in groups[i]:
                if g.error:
                    job.error = f"{req.kind} call failed: {g.error}"
                    continue
                job.accept(req, rec.record(job, req, g))
        rnd += 1


def _run_pool(jobs: list[_Job], backend: Backend, rec: _Recorder, cfg: AgentWriteConfig, seed: int) -> None:
    def work(job: _Job) -> None:
        while (req := _advance(job, rec)) is not None:
            params = GenParams(req.max_new_tokens, cfg.temperature, cfg.top_p, seed=seed + int(req.key[:6], 16))
            g = backend.generate([req.prompt], params, [req.max_new_tokens], desc=f"{job.ins.id} {req.kind}")[0]
            if g.error:
                job.error = f"{req.kind} call failed: {g.error}"
                return
            job.accept(req, rec.record(job, req, g))

    from .progress import tqdm

    with ThreadPoolExecutor(max_workers=max(1, cfg.concurrent_instructions)) as pool:
        for f in tqdm(pool.map(work, jobs), total=len(jobs), desc="agentwrite instructions"):
            pass


@dataclass
class AgentWriteResult:
    """What :func:`build_dataset` produced: ``items`` (one side-file record per instruction),
    ``summary`` (counts, drop reasons, tokens, cost, wall time) and the output folder."""

    items: list[dict]
    summary: dict[str, Any]
    folder: Path

    @property
    def kept(self) -> list[dict]:
        return [it for it in self.items if it["split"] in ("train", "heldout")]


def _is_local(backend: Any) -> bool:
    from .backends import LocalBackend

    return isinstance(backend, LocalBackend) or getattr(backend, "batched", False)


def build_dataset(prof: Profile, cfg: AgentWriteConfig | None = None, backend: Backend | None = None,
                  instructions: list[Instruction] | None = None) -> AgentWriteResult:
    """Plan, write, filter and save the data set in ``prof.stage_dir("agentwrite")``; resumable.

    ``backend`` overrides the one in ``cfg.backend`` (tests, a shared model). Instructions default to
    :func:`load_agentwrite_instructions`. Calls that fail are not stored: rerun to retry them.
    """
    cfg = cfg or prof.section("agentwrite", AgentWriteConfig)
    out = prof.stage_dir("agentwrite")
    insts = instructions if instructions is not None else load_agentwrite_instructions(prof, cfg)
    if len({i.id for i in insts}) != len(insts):
        raise ValueError("agentwrite: instruction ids must be unique")
    model = cfg.backend.model or prof.model
    t0 = time.perf_counter()
    backend = backend or make_backend(cfg.backend, prof.model, prof.device, prof.dtype)
    model = getattr(backend, "name", model) if backend is not None else model
    local = _is_local(backend)
    count = (lambda p: len(backend.encode(p))) if hasattr(backend, "encode") else approx_tokens
    provenance = {"model": model, "backend": "local" if local else "openai", "plan_prompt": "plan.txt",
                  "write_prompt": f"write_{cfg.write_prompt}.txt",
                  "prompt_sha256": {n: hashlib.sha256((PROMPT_DIR / n).read_bytes()).hexdigest()[:16]
                                    for n in ("plan.txt", f"write_{cfg.write_prompt}.txt")},
                  "settings": {k: getattr(cfg, k) for k in (
                      "plan_max_new_tokens", "write_max_new_tokens", "temperature", "top_p", "plan_retries",
                      "max_steps", "max_paragraphs", "max_prompt_tokens", "min_length_ratio", "min_output_words",
                      "strip_labels")}, "seed": prof.seed, "profile": prof.name}
    # request keys hash model, prompt, budget, temperature, top_p and attempt; the seed is the one other input
    rec = _Recorder(out, model, provenance["backend"], overwrite=cfg.overwrite,
                    fingerprint={"seed": prof.seed, **(prof.numerics() if local else {})})  # + a local model's numerics
    write_manifest(out, {"profile": prof.resolved(), "agentwrite": dataclasses.asdict(cfg), "provenance": provenance,
                         "n_instructions": len(insts)})
    jobs = [_Job(i, cfg, model, count) for i in insts]
    (_run_local if local else _run_pool)(jobs, backend, rec, cfg, prof.seed)
    wall = time.perf_counter() - t0
    return _finalize(out, jobs, cfg, provenance, rec, wall, prof.seed)


def _finalize(out: Path, jobs: list[_Job], cfg: AgentWriteConfig, provenance: dict, rec: _Recorder,
              wall: float, seed: int) -> AgentWriteResult:
    items = []
    for j in jobs:
        calls = j.plan_records + j.paragraphs
        t_in = sum(c.get("prompt_tokens", 0) for c in calls)
        t_out = sum(c.get("completion_tokens", 0) for c in calls)
        paras = [strip_labels(p["response"]) if cfg.strip_labels else p["response"].strip() for p in j.paragraphs]
        text = "\n\n".join(p for p in paras if p)
        steps = []
        for s_idx, p in enumerate(j.paragraphs):
            steps.append({"step": s_idx, "plan_line": p["plan_line"], "target_words": p["target_words"],
                          "actual_words": count_words(paras[s_idx]), "prompt_tokens": p["prompt_tokens"],
                          "completion_tokens": p["completion_tokens"], "hit_limit": p["hit_limit"],
                          "context_dropped_paragraphs": p["context_dropped_paragraphs"]})
        planned = sum(s["target_words"] or cfg.default_paragraph_words for s in steps)
        words = count_words(text)
        if j.failure:
            reason = j.failure
        elif j.error or j.steps is None or len(j.paragraphs) < len(j.steps):
            reason = f"incomplete: {j.error or 'not finished'} (rerun to resume)"
        elif not text:
            reason = "empty_output"
        elif planned and words / planned < cfg.min_length_ratio:
            reason = f"too_short: {words}/{planned} planned words < ratio {cfg.min_length_ratio}"
        elif words < cfg.min_output_words:
            reason = f"too_short: {words} words < min_output_words {cfg.min_output_words}"
        else:
            reason = None
        items.append({
            "id": j.ins.id, "instruction": j.ins.prompt, "type": j.ins.type, "lang": j.ins.lang,
            "required_length": j.ins.length, "plan": j.plan_records[-1]["response"] if j.plan_records else None,
            "plan_attempts": len(j.plan_records), "planned_steps": j.n_planned_steps, "steps": steps,
            "planned_words": planned, "words": words, "tokens_in": t_in, "tokens_out": t_out,
            "latency_s": round(sum(c.get("latency_s", 0.0) for c in calls), 3),
            "cost_usd": cost_usd(cfg.prices, provenance["model"], t_in, t_out),
            "context_dropped_steps": sum(1 for s in steps if s["context_dropped_paragraphs"]),
            "dropped_reason": reason, "split": "dropped" if reason else "train",
            "output": text, "provenance": provenance,
        })
    kept = sorted((it for it in items if it["split"] == "train"), key=lambda it: it["id"])
    n_held = min(cfg.heldout, max(len(kept) - 1, 0))
    held_ids = {it["id"] for it in random.Random(seed).sample(kept, n_held)} if n_held else set()
    for it in items:
        if it["id"] in held_ids:
            it["split"] = "heldout"

    def fmt(it: dict) -> str:
        return json.dumps({"messages": [{"role": "user", "content": it["instruction"]},
                                        {"role": "assistant", "content": it["output"]}]}, ensure_ascii=False)

    atomic_write_text(out / "longwriter.jsonl", "".join(fmt(it) + "\n" for it in items if it["split"] == "train"))
    atomic_write_text(out / "heldout.jsonl", "".join(fmt(it) + "\n" for it in items if it["split"] == "heldout"))
    atomic_write_text(out / "items.jsonl", "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    reasons: dict[str, int] = {}
    for it in items:
        if it["dropped_reason"]:
            r = it["dropped_reason"].split(":")[0]
            reasons[r] = reasons.get(r, 0) + 1
    t_in, t_out = sum(i["tokens_in"] for i in items), sum(i["tokens_out"] for i in items)
    summary = {
        "instructions": len(items), "kept": len(kept), "train": len(kept) - n_held, "heldout": n_held,
        "heldout_requested": cfg.heldout, "dropped": len(items) - len(kept), "drop_reasons": reasons,
        "calls_this_run": rec.calls, "cache_hits_this_run": rec.cache_hits,
        "tokens_in": t_in, "tokens_out": t_out, "cost_usd": cost_usd(cfg.prices, provenance["model"], t_in, t_out),
        "wall_s_this_run": round(wall, 2),
        "median_output_words": sorted(i["words"] for i in kept)[len(kept) // 2] if kept else 0,
        "steps_with_context_dropped": sum(i["context_dropped_steps"] for i in items),
        "provenance": provenance,
    }
    atomic_write_json(out / "summary.json", summary)
    return AgentWriteResult(items, summary, out)


# --- figures ----------------------------------------------------------------------------------------------
def plot_length_histogram(items: list[dict], path: str | Path, title: str) -> Path:
    """The paper's LongWriter-6k histogram: output words of the kept items (2k-wide bins over 0-32k words
    when outputs are that long, finer bins for short smoke outputs)."""
    plt = pyplot()
    import numpy as np

    words = [it["words"] for it in items if it["split"] != "dropped"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    top = max(words, default=0)
    bins = np.arange(0, 32001, 2000) if top >= 2000 else np.linspace(0, max(top, 10) * 1.1, 12)
    ax.hist(words, bins=bins, color="C0", edgecolor="white")
    ax.set_xlabel("Output length (words)")
    ax.set_ylabel("Number of items")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


def plot_planned_vs_actual(items: list[dict], path: str | Path, title: str, default_words: int = 400) -> Path:
    """Planned vs actual words per paragraph (all written paragraphs), with the line y = x.
    Steps without a stated target are drawn hollow at ``default_words``."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 5))
    stated = [(s["target_words"], s["actual_words"]) for it in items for s in it["steps"] if s["target_words"]]
    unstated = [(default_words, s["actual_words"]) for it in items for s in it["steps"] if not s["target_words"]]
    if stated:
        ax.scatter(*zip(*stated), s=14, alpha=0.6, label="target stated in plan")
    if unstated:
        ax.scatter(*zip(*unstated), s=18, facecolors="none", edgecolors="C1",
                   label=f"no target in plan (drawn at {default_words})")
    hi = max([x for p in stated + unstated for x in p] + [10])
    ax.plot([0, hi * 1.05], [0, hi * 1.05], "k:", lw=1, label="y = x")
    ax.set_xlabel("Planned words (paragraph)")
    ax.set_ylabel("Actual words (paragraph)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)
