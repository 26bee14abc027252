"""Long-writing instructions for AgentWrite: a built-in generator and a loader for user files.

The paper drew its 6,000 instructions from real user logs (GLM-4's, WildChat), which are not
available here. :func:`generate_instructions` composes varied long-writing requests instead, in
English and Chinese, over the seven LongBench-Write types, each with a required length between
``min_words`` and ``max_words`` (log-uniform, rounded to 500), deterministic under ``seed``.
Nothing is taken from LongBench-Write (that would leak the test set); :func:`check_no_benchmark_leak`
verifies it for generated and user-supplied instructions alike.

Usage::

    insts = generate_instructions(400, seed=0)                 # built-in
    insts = load_instructions("my_instructions.jsonl")         # {"prompt": ...} per line, or plain text
    check_no_benchmark_leak(insts, [it.prompt for it in load_longbench_write()])
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .text import count_words

TYPES = (
    "Literature and Creative Writing",
    "Academic and Monograph",
    "Popular Science",
    "Functional Writing",
    "News Report",
    "Community Forum",
    "Education and Training",
)


@dataclass(frozen=True)
class Instruction:
    """One writing request.

    Fields:
        id: stable identifier (generated: ``gen-<seed>-<k>``; loaded: the file's ``id`` or a content hash).
        prompt: the instruction text given to the model.
        type: one of the seven LongBench-Write types (``TYPES``), or ``unknown`` for user files without one.
        lang: ``en`` or ``zh``.
        length: required output length in words (CJK: characters), or None when the prompt states none.
    """

    id: str
    prompt: str
    type: str
    lang: str
    length: int | None

    def as_dict(self) -> dict:
        return asdict(self)


# --- built-in generator ------------------------------------------------------------------------------
# Per type: task templates ({n} = required length, {t} = topic) and topics, per language.
_EN: dict[str, tuple[list[str], list[str]]] = {
    "Literature and Creative Writing": (
        ["Write a {n}-word short story about {t}.",
         "Write a {n}-word novella chapter about {t}. Use vivid scenes and dialogue.",
         "Compose a {n}-word piece of literary fiction about {t}, told from two alternating points of view.",
         "I am writing a novel. Please write a {n}-word opening chapter about {t}.",
         "Write a {n}-word personal essay reflecting on {t}."],
        ["a lighthouse keeper who receives letters from a ship that sank a century ago",
         "an elderly violin maker teaching her last apprentice",
         "two rival chefs forced to share a kitchen during a snowstorm",
         "a city where it has not rained for ten years",
         "a translator who discovers a hidden message in a famous poem",
         "a family reunion on a dying coral island",
         "a robot gardener on an abandoned space station",
         "growing up between two languages",
         "a night-shift nurse and the patients she never forgets",
         "a cartographer mapping a country that keeps changing its borders"],
    ),
    "Academic and Monograph": (
        ["Write a {n}-word literature review on {t}, discussing the main schools of thought and open questions.",
         "Write a {n}-word academic paper on {t}, with an introduction, methods discussion, analysis and conclusion.",
         "Draft a {n}-word monograph chapter examining {t}.",
         "Write a {n}-word research proposal on {t}, including background, research questions and methodology."],
        ["the economic effects of remote work on mid-sized cities",
         "the history of standardized time zones",
         "soil carbon sequestration in smallholder agriculture",
         "the role of trade guilds in medieval European cities",
         "algorithmic bias in credit scoring",
         "the preservation of endangered languages through digital archives",
         "urban heat islands and public health",
         "the philosophy of personal identity in the age of digital memories"],
    ),
    "Popular Science": (
        ["Write a {n}-word popular science article explaining {t} to curious readers with no scientific background.",
         "Write a {n}-word feature for a science magazine about {t}.",
         "Explain {t} in a {n}-word article for high-school students, with everyday analogies."],
        ["how vaccines train the immune system", "why the sky changes colour at sunset",
         "how bees navigate and communicate", "what dark matter is and how we look for it",
         "how the human gut microbiome affects mood", "how batteries store energy",
         "the science of sleep and dreaming", "how earthquakes are measured and predicted",
         "how deep-sea creatures survive extreme pressure"],
    ),
    "Functional Writing": (
        ["Write a {n}-word business plan for {t}.",
         "Prepare a {n}-word project proposal for {t}, covering goals, budget, timeline and risks.",
         "Write a {n}-word annual report for {t}.",
         "Draft a {n}-word operations manual for {t}."],
        ["a community bicycle repair cooperative", "a small family-run bakery expanding to online orders",
         "a rural library introducing a makerspace", "a non-profit that refurbishes old laptops for schools",
         "a neighbourhood composting programme", "a boutique hotel switching to renewable energy",
         "a regional farmers' market", "a start-up offering translation services for clinics"],
    ),
    "News Report": (
        ["Write a {n}-word in-depth news report on {t}, including interviews with residents and experts.",
         "Write a {n}-word investigative news feature about {t}.",
         "Write a {n}-word news analysis of {t}, covering background, current developments and outlook."],
        ["a coastal town rebuilding after a major flood", "a city replacing its bus fleet with electric buses",
         "a surge of young people returning to farming villages", "a local factory closing and its effect on the town",
         "the opening of a new high-speed rail line", "a record heatwave straining the power grid",
         "a public library that stopped charging late fees"],
    ),
    "Community Forum": (
        ["Write a {n}-word forum post sharing your detailed experience of {t}, with practical tips for others.",
         "Write a {n}-word long-form blog post on {t} for an online community.",
         "Write a {n}-word answer to the forum question: 'What should I know about {t}?'"],
        ["switching careers to software development at forty", "raising chickens in a suburban garden",
         "travelling through Central Asia by train", "learning the piano as an adult",
         "renovating an old apartment on a tight budget", "training for a first marathon",
         "living with a rescue dog that has anxiety", "building a home weather station"],
    ),
    "Education and Training": (
        ["Write a {n}-word training handbook for {t}.",
         "Design a {n}-word lesson plan series for {t}, with objectives, activities and assessments.",
         "Write a {n}-word tutorial for {t}, step by step with examples.",
         "Write a {n}-word onboarding guide for {t}."],
        ["new volunteers at a food bank", "teaching fractions to ten-year-olds",
         "first-time managers learning to give feedback", "beginners learning to use spreadsheets",
         "warehouse staff on safe lifting and forklift operation", "teaching introductory statistics with sports data",
         "new customer-support agents at a software company", "primary-school teachers introducing coding"],
    ),
}

_ZH: dict[str, tuple[list[str], list[str]]] = {
    "Literature and Creative Writing": (
        ["请写一篇{n}字的短篇小说，讲述{t}的故事。", "以{t}为主题，创作一篇{n}字的散文。",
         "请写一篇{n}字的小说章节，描写{t}，要有生动的场景和对话。"],
        ["一位守灯塔的老人收到百年前沉船寄来的信", "一个小镇裁缝和她的最后一位学徒", "在暴雪中被迫共用厨房的两位厨师",
         "十年没有下雨的城市", "在两种语言之间长大的孩子", "废弃空间站上的机器人园丁"],
    ),
    "Academic and Monograph": (
        ["请写一篇{n}字的学术论文，研究{t}，包括引言、文献综述、分析与结论。", "请围绕{t}写一篇{n}字的文献综述。",
         "请写一份{n}字的研究计划书，主题为{t}，包括研究背景、研究问题与方法。"],
        ["远程办公对中等城市经济的影响", "小农户农业中的土壤固碳", "数字档案对濒危语言保护的作用",
         "城市热岛效应与公共健康", "宋代市镇商业的发展"],
    ),
    "Popular Science": (
        ["请写一篇{n}字的科普文章，向没有科学背景的读者解释{t}。", "请为中学生写一篇{n}字的科普读物，用生活中的比喻讲解{t}。"],
        ["疫苗如何训练免疫系统", "蜜蜂如何导航和交流", "暗物质是什么以及科学家如何寻找它", "睡眠和做梦的科学",
         "地震是如何测量和预警的", "电池如何储存能量"],
    ),
    "Functional Writing": (
        ["请为{t}写一份{n}字的商业计划书。", "请为{t}撰写一份{n}字的项目方案，包括目标、预算、时间表和风险。",
         "请为{t}写一份{n}字的年度工作总结。"],
        ["一家社区自行车维修合作社", "一家准备开展线上业务的家庭面包店", "一个社区垃圾分类与堆肥项目",
         "一个乡村图书馆的创客空间", "一个地区性的农贸市场"],
    ),
    "News Report": (
        ["请写一篇{n}字的深度新闻报道，介绍{t}，包括对居民和专家的采访。", "请写一篇{n}字的新闻评论，分析{t}的背景、现状和前景。"],
        ["一座城市如何建设海绵城市以应对暴雨", "年轻人返乡务农的新现象", "一条新高铁线路开通对沿线小城的影响",
         "一座沿海小镇的灾后重建", "创纪录的高温天气对电网的考验"],
    ),
    "Community Forum": (
        ["请以论坛帖子的形式写一篇{n}字的经验分享，主题是{t}，并给出实用建议。", "请写一篇{n}字的长篇博客，分享{t}的经历。"],
        ["四十岁转行做程序员", "在城市阳台上种菜", "坐火车穿越中亚旅行", "成年后学习钢琴", "低预算翻新老房子"],
    ),
    "Education and Training": (
        ["请写一份{n}字的培训手册，对象是{t}。", "请设计一份{n}字的系列教案，主题是{t}，包括教学目标、活动和评估。",
         "请写一篇{n}字的入门教程，面向{t}，要有步骤和示例。"],
        ["食物银行的新志愿者", "给十岁孩子讲分数", "第一次当经理、需要学习如何给出反馈的人", "学习电子表格的初学者",
         "小学老师开展编程教学"],
    ),
}

_EXTRAS_EN = ["", "", " Use clear section headings.", " Write for a general audience.",
              " Keep a warm, engaging tone.", " Include concrete examples throughout."]
_EXTRAS_ZH = ["", "", "请使用清晰的小标题。", "面向普通读者。", "语言要生动有趣。", "请多举具体例子。"]


def _sample_length(rng: random.Random, lo: int, hi: int) -> int:
    """Log-uniform in [lo, hi], rounded to a multiple of 500 and kept inside the range."""
    n = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    n = int(round(n / 500.0) * 500)
    return min(max(n, lo), hi)


def generate_instructions(
    n: int,
    seed: int = 0,
    languages: tuple[str, ...] | list[str] = ("en", "zh"),
    min_words: int = 2000,
    max_words: int = 20000,
) -> list[Instruction]:
    """``n`` varied long-writing instructions, cycling through the seven types; deterministic under ``seed``.

    Languages alternate in the given order; within a type, (template, topic, extra) combinations are
    drawn without repetition until exhausted. Lengths are log-uniform in ``[min_words, max_words]``.
    """
    langs = list(languages)
    if not langs or any(l not in ("en", "zh") for l in langs):
        raise ValueError(f"languages must be a non-empty subset of ('en', 'zh'), got {languages!r}")
    if not (0 < min_words <= max_words):
        raise ValueError(f"need 0 < min_words <= max_words, got {min_words}, {max_words}")
    rng = random.Random(seed)
    pools: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    out: list[Instruction] = []
    for k in range(n):
        typ = TYPES[k % len(TYPES)]
        lang = langs[(k // len(TYPES)) % len(langs)] if len(langs) > 1 else langs[0]
        table, extras = (_EN, _EXTRAS_EN) if lang == "en" else (_ZH, _EXTRAS_ZH)
        key = (typ, lang)
        if not pools.get(key):
            templates, topics = table[typ]
            combos = [(a, b, c) for a in templates for b in topics for c in extras]
            rng.shuffle(combos)
            pools[key] = combos
        tpl, topic, extra = pools[key].pop()
        length = _sample_length(rng, min_words, max_words)
        prompt = tpl.format(n=length, t=topic) + extra
        out.append(Instruction(f"gen-{seed}-{k}", prompt, typ, lang, length))
    return out


# --- loading user files -------------------------------------------------------------------------------
_LEN_RE = re.compile(r"(\d[\d,]*)\s*(?:-\s*)?(?:words?\b|字)", re.IGNORECASE)
_CJK = re.compile(r"[\u4e00-\u9fff]")


def required_length(prompt: str) -> int | None:
    """The length a prompt asks for ("a 5,000-word essay", "写一篇3000字"), or None."""
    m = _LEN_RE.search(prompt)
    return int(m.group(1).replace(",", "")) if m else None


def detect_lang(text: str) -> str:
    """``zh`` when CJK ideographs make up at least a fifth of the counted words, else ``en``."""
    return "zh" if len(_CJK.findall(text)) >= 0.2 * max(count_words(text), 1) else "en"


def load_instructions(path: str | Path) -> list[Instruction]:
    """Read instructions from JSONL (``prompt`` or ``instruction`` field; optional ``id``, ``type``,
    ``lang``, ``length``) or from a text file (one instruction per non-empty line, for ``.txt``).

    Missing ``length``/``lang`` are inferred from the prompt; missing ``id`` is a content hash.
    Bad lines and duplicate ids raise ``ValueError`` naming file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no instruction file at {path}")
    out: list[Instruction] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if path.suffix == ".txt":
                rec: dict = {"prompt": line.strip()}
            else:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
                if not isinstance(rec, dict):
                    raise ValueError(f"{where}: expected a JSON object")
            prompt = rec.get("prompt", rec.get("instruction"))
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: needs a non-empty string field 'prompt' (or 'instruction')")
            prompt = prompt.strip()
            iid = str(rec.get("id") or "u-" + hashlib.sha1(prompt.encode()).hexdigest()[:12])
            if iid in seen:
                raise ValueError(f"{where}: duplicate id {iid!r} (first on line {seen[iid]})")
            seen[iid] = lineno
            lang = rec.get("lang") or detect_lang(prompt)
            if lang not in ("en", "zh"):
                raise ValueError(f"{where}: lang must be 'en' or 'zh', got {lang!r}")
            length = rec.get("length", required_length(prompt))
            if length is not None and (not isinstance(length, int) or length <= 0):
                raise ValueError(f"{where}: length must be a positive integer, got {length!r}")
            out.append(Instruction(iid, prompt, str(rec.get("type") or "unknown"), lang, length))
    if not out:
        raise ValueError(f"{path}: no instructions")
    return out


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower())


def _grams(s: str, n: int = 8) -> set[tuple[str, ...]]:
    toks = re.findall(r"[\u4e00-\u9fff]|[a-z0-9]+", s.lower())
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def check_no_benchmark_leak(instructions: list[Instruction], benchmark_prompts: list[str],
                            max_overlap: float = 0.5) -> None:
    """Raise ``ValueError`` if an instruction equals a benchmark prompt or shares more than
    ``max_overlap`` of its 8-grams (words / CJK characters) with one."""
    bench_norm = {_norm(p) for p in benchmark_prompts}
    bench_grams: set[tuple[str, ...]] = set()
    for p in benchmark_prompts:
        bench_grams |= _grams(p)
    for ins in instructions:
        if _norm(ins.prompt) in bench_norm:
            raise ValueError(f"instruction {ins.id!r} is a LongBench-Write prompt (test-set leak)")
        g = _grams(ins.prompt)
        if g and len(g & bench_grams) / len(g) > max_overlap:
            raise ValueError(f"instruction {ins.id!r} overlaps LongBench-Write prompts "
                             f"({len(g & bench_grams)}/{len(g)} 8-grams; test-set leak)")
