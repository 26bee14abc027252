"""AgentWrite: plan parsing on messy real-style plans, label stripping, instructions, the serial engine
(real bundled model), resume after a crash, request caching, the OpenAI path, and notebook 02."""

import json

import pytest

from lwlib.agentwrite import (
    AgentWriteConfig, build_dataset, dry_run, parse_plan, parse_word_count, plan_failure, plan_template,
    strip_labels, write_template,
)
from lwlib.backends import BackendConfig
from lwlib.config import load_profile
from lwlib.instructions import (
    TYPES, Instruction, check_no_benchmark_leak, generate_instructions, load_instructions, required_length,
)
from lwlib.runs import read_jsonl
from nbutil import execute_notebook

# (plan text, expected [(number, main point prefix, words)])
PLANS = [
    # 1 the paper's own format
    ("Paragraph 1 - Main Point: Introduce the lighthouse and its keeper - Word Count: 400 words\n\n"
     "Paragraph 2 - Main Point: The bottle arrives in a storm - Word Count: 1000 words",
     [(1, "Introduce the lighthouse", 400), (2, "The bottle arrives", 1000)]),
    # 2 en dashes and a trailing period
    ("Paragraph 1 – Main Point: Background on vaccines – Word Count: 300 words.\n"
     "Paragraph 2 – Main Point: How antibodies form – Word Count: 500 words.",
     [(1, "Background on vaccines", 300), (2, "How antibodies form", 500)]),
    # 3 em dashes, no spaces
    ("Paragraph 1—Main Point: Why cities flood—Word Count: 600 words",
     [(1, "Why cities flood", 600)]),
    # 4 colon separators
    ("Paragraph 1: Main Point: The history of time zones: Word Count: 450 words",
     [(1, "The history of time zones", 450)]),
    # 5 markdown bold and bullets, preamble and closing remark
    ("Here is the breakdown of the writing task:\n\n"
     "- **Paragraph 1** - **Main Point:** Set the scene in the kitchen - **Word Count:** 500 words\n"
     "- **Paragraph 2** - **Main Point:** The rivalry escalates - **Word Count:** 700 words\n\n"
     "Let me know if you need changes!",
     [(1, "Set the scene in the kitchen", 500), (2, "The rivalry escalates", 700)]),
    # 6 approx. and about
    ("Paragraph 1 - Main Point: Overview - Word Count: approx. 400 words\n"
     "Paragraph 2 - Main Point: Details - Word Count: about 800 words",
     [(1, "Overview", 400), (2, "Details", 800)]),
    # 7 ranges -> midpoint
    ("Paragraph 1 - Main Point: Methods - Word Count: 400-500 words\n"
     "Paragraph 2 - Main Point: Results - Word Count: 600 to 800 words",
     [(1, "Methods", 450), (2, "Results", 700)]),
    # 8 Chinese plan, full-width colons
    ("第1段 - 主要内容：介绍海绵城市的概念 - 字数要求：400字\n第2段 - 主要内容：暴雨带来的挑战 - 字数要求：600字",
     [(1, "介绍海绵城市的概念", 400), (2, "暴雨带来的挑战", 600)]),
    # 9 Chinese numerals and 约
    ("第一段：主要内容：故事背景 - 字数要求：约500字\n第十二段：主要内容：结局 - 字数要求：800字",
     [(1, "故事背景", 500), (12, "结局", 800)]),
    # 10 numbered list without "Paragraph", word count in parentheses
    ("1. Introduction to bee navigation (300 words)\n2) The waggle dance explained (500 words)\n"
     "3、Experiments with hives (400 words)",
     [(1, "Introduction to bee navigation", 300), (2, "The waggle dance", 500), (3, "Experiments with hives", 400)]),
    # 11 numbered list without any word count
    ("1. Introduction\n2. Main argument\n3. Counterpoints",
     [(1, "Introduction", None), (2, "Main argument", None), (3, "Counterpoints", None)]),
    # 12 multi-line steps (header, then bullet lines), as chat models often write
    ("**Paragraph 1**\n- Main Point: Why food banks need volunteers\n- Word Count: 350 words\n\n"
     "**Paragraph 2**\n- Main Point: Safety rules\n- Word Count: 500 words",
     [(1, "Why food banks need volunteers", 350), (2, "Safety rules", 500)]),
    # 13 markdown headings
    ("### Paragraph 1 - Main Point: Early life - Word Count: 1,000 words\n"
     "### Paragraph 2 - Main Point: Career - Word Count: 900 words",
     [(1, "Early life", 1000), (2, "Career", 900)]),
    # 14 repeated numbering from a looping model: first occurrence wins; a truncated last header is dropped
    ("Paragraph 1: Introduction\nParagraph 2: Context and Purpose\nParagraph 1: Introduction again\nParagraph 3",
     [(1, "Introduction", None), (2, "Context and Purpose", None)]),
    # 15 numbers in the main point must not be taken as the word count, decimals are not list items
    ("Paragraph 1 - Main Point: Compare 3 vaccines from 2020 - Word Count: 700 words\n"
     "3.5 million doses were given.",
     [(1, "Compare 3 vaccines from 2020", 700)]),
    # 16 lowercase, "words" abbreviated as a trailing number with dash
    ("paragraph 1 - main point: the storm - 250 words\nparagraph 2 - main point: the rescue - 300 words",
     [(1, "the storm", 250), (2, "the rescue", 300)]),
    # 17 Chinese numbered list with 字 in parentheses
    ("1. 开场：回到故乡（300字）\n2. 冲突：家族的秘密（500字）",
     [(1, "开场：回到故乡", 300), (2, "冲突：家族的秘密", 500)]),
    # 18 nothing usable
    ("I cannot break this down, sorry. Please give me more details.", []),
    # 19 header alone on its line, the step's text below it (SmolLM2-135M on the H100 run); a word-count line
    # is not a main point
    ("Paragraph 1:\n\nThe first train ride across the steppe (300 words)\nParagraph 2:\nWord Count: 500 words\n"
     "Arriving in Samarkand\nParagraph 3:",
     [(1, "The first train ride across the steppe", 300), (2, "Arriving in Samarkand", 500)]),
    # 20-27 Chinese plans with other labels than the prompt's own (段落N, 第N部分, 要点 / 主要观点 / 内容,
    # 字数 / 约 / 左右), full-width digits and colons
    ("段落1：要点：城市的起源；字数：300字\n段落2：要点：工业革命；字数：500字",
     [(1, "城市的起源", 300), (2, "工业革命", 500)]),
    ("第１部分 - 主要观点：气候变化的证据 - 字数：约６００字\n第２部分 - 主要观点：应对措施 - 字数：４００字",
     [(1, "气候变化的证据", 600), (2, "应对措施", 400)]),
    ("第一部分：内容：童年回忆（约400字）\n第二部分：内容：离家求学（约600字）",
     [(1, "童年回忆", 400), (2, "离家求学", 600)]),
    ("段落一 - 主要内容：开头 - 字数要求：500字左右\n段落二 - 主要内容：结尾 - 字数要求：300～400字",
     [(1, "开头", 500), (2, "结尾", 350)]),
    ("**第1段**\n- 要点：介绍人物\n- 字数：400字\n\n**第2段**\n- 要点：冲突爆发\n- 字数：约600字",
     [(1, "介绍人物", 400), (2, "冲突爆发", 600)]),
    ("第1段（约300字）：描写清晨的市场\n第2段（500字）：市场里的人们",
     [(1, "描写清晨的市场", 300), (2, "市场里的人们", 500)]),
    ("第１段：主要内容：序幕 字数约200字\n第２段：主要内容：相遇，约800字。",
     [(1, "序幕", 200), (2, "相遇", 800)]),
    ("以下是写作计划：\n段落１：主要观点：为什么要保护湿地 字数要求：８００\n段落２：主要观点：湿地的现状 字数要求：1,200字\n希望对你有帮助。",
     [(1, "为什么要保护湿地", 800), (2, "湿地的现状", 1200)]),
]


@pytest.mark.parametrize("text,expected", PLANS, ids=[f"plan{i + 1}" for i in range(len(PLANS))])
def test_parse_plan_messy_real_style(text, expected):
    steps = parse_plan(text)
    got = [(s.number, s.main_point, s.words) for s in steps]
    assert len(got) == len(expected), got
    for (n, mp, w), (en, emp, ew) in zip(got, expected):
        assert n == en and mp.startswith(emp) and w == ew, (n, mp, w)
        assert "Word Count" not in mp and "字数" not in mp


def test_plan_failures_are_recorded_not_raised():
    assert plan_failure(parse_plan("no plan here")) == "no_steps"
    many = "\n".join(f"Paragraph {i} - Main Point: point {i} - Word Count: 200 words" for i in range(1, 52))
    assert plan_failure(parse_plan(many)).startswith("too_many_steps (51")
    assert plan_failure(parse_plan(many)[:50]) is None


def test_parse_word_count_rules():
    assert parse_word_count("approx. 400 words") == 400
    assert parse_word_count("400-500 words") == 450
    assert parse_word_count("1,200 words") == 1200
    assert parse_word_count("约800字") == 800
    assert parse_word_count("约６００字") == 600 and parse_word_count("３００～４００字") == 350
    assert parse_word_count("many words") is None


def test_strip_labels_removes_copied_scaffolding_keeps_text():
    text = ("Paragraph 2 - Main Point: The storm - Word Count: 400 words\n"
            "**Paragraph 2:** The Storm Arrives\nThe wind rose at dusk.\nWord Count: 400 words\n"
            "第3段：雨停了。")
    out = strip_labels(text)
    assert "Paragraph" not in out and "Word Count" not in out and "第3段" not in out
    assert "The Storm Arrives" in out and "The wind rose at dusk." in out and "雨停了。" in out


def test_strip_labels_chinese_variants():
    text = ("段落2 - 要点：暴雨 - 字数：400字\n第２部分：雨停了。\n字数要求：300字\n**段落三**：天亮了。\n"
            "第三段落 - 主要观点：结局 - 字数：200字\n第二天，他们出发了。")
    out = strip_labels(text)
    assert "段落" not in out and "部分" not in out and "字数" not in out and "要点" not in out
    assert [l for l in out.splitlines() if l.strip()] == ["雨停了。", "天亮了。", "第二天，他们出发了。"], out


def test_prompts_are_the_papers():
    assert plan_template().count("$INST$") == 1 and "no less than 200 words and no more than 1000 words" in plan_template()
    v1, v2 = write_template("v1"), write_template("v2")
    hook = "As this is an ongoing work, omit open-ended conclusions or other rhetorical hooks."
    assert hook in v2 and hook not in v1 and v2.startswith(v1)
    for p in ("$INST$", "$PLAN$", "$TEXT$", "$STEP$"):
        assert v1.count(p) == 1 and v2.count(p) == 1
    with pytest.raises(ValueError, match="v3"):
        write_template("v3")


def test_generated_instructions_are_varied_deterministic_and_not_from_the_benchmark():
    a, b = generate_instructions(70, seed=3), generate_instructions(70, seed=3)
    assert a == b and a != generate_instructions(70, seed=4)
    assert {i.type for i in a} == set(TYPES) and {i.lang for i in a} == {"en", "zh"}
    assert len({i.prompt for i in a}) == 70
    assert all(2000 <= i.length <= 20000 and required_length(i.prompt) == i.length for i in a)
    from lwlib.data import load_longbench_write

    bench = [it.prompt for it in load_longbench_write()]
    check_no_benchmark_leak(generate_instructions(500, seed=0), bench)
    with pytest.raises(ValueError, match="leak"):
        check_no_benchmark_leak([Instruction("x", bench[5], "t", "en", None)], bench)


def test_load_instructions_jsonl_and_text(tmp_path):
    p = tmp_path / "i.jsonl"
    p.write_text('{"prompt": "Write a 3,000-word essay on tides."}\n\n{"instruction": "写一篇5000字的故事", "id": "z"}\n',
                 encoding="utf-8")
    got = load_instructions(p)
    assert [(i.lang, i.length) for i in got] == [("en", 3000), ("zh", 5000)] and got[1].id == "z"
    t = tmp_path / "i.txt"
    t.write_text("Write a long story about owls.\n", encoding="utf-8")
    assert load_instructions(t)[0].length is None
    p.write_text('{"prompt": "a"}\n{"text": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"i.jsonl:2: needs"):
        load_instructions(p)


def test_dry_run_estimates_without_calling(tmp_path):
    cfg = AgentWriteConfig(prices={"gpt-4o-2024-05-13": [5.0, 15.0]}, backend=BackendConfig(kind="openai",
                           model="gpt-4o-2024-05-13"))
    insts = [Instruction("a", "Write a 2000-word essay.", "t", "en", 2000)]
    est = dry_run(cfg, insts, paragraph_words=500)
    assert est["calls"] == 1 + 4
    assert est["tokens_out"] == 4 * 40 + 4 * round(500 * 1.35)
    assert est["cost_usd"] == pytest.approx((est["tokens_in"] * 5 + est["tokens_out"] * 15) / 1e6)


# --- the engine, with the real bundled model ------------------------------------------------------------
INSTS = [Instruction("a", "Write a 2000-word story about a lighthouse keeper.", "Literature and Creative Writing",
                     "en", 2000),
         Instruction("b", "Write a 2000-word guide for new food bank volunteers.", "Education and Training",
                     "en", 2000)]
FIXED_PLAN = ("Paragraph 1 - Main Point: The keeper's daily routine - Word Count: 300 words\n"
              "Paragraph 2 - Main Point: A strange light at sea - Word Count: 300 words\n"
              "Paragraph 3 - Main Point: The rescue - Word Count: 300 words")


class Scripted:
    """Wraps a real backend: plan calls get a fixed plan (so the test does not depend on what the tiny
    model plans), write calls go to the model; records every prompt; can die after ``crash_after`` outputs."""

    def __init__(self, backend, crash_after=None, batched=True):
        self.backend, self.name, self.crash_after, self.batched = backend, backend.name, crash_after, batched
        self.prompts, self.outputs = [], 0
        self.encode = backend.encode  # token counting for the context cap, as with the real backend

    def generate_iter(self, prompts, params, max_new_tokens=None, desc=None):
        from lwlib.backends import Generation

        self.prompts.extend(prompts)
        writes = [i for i, p in enumerate(prompts) if not p.startswith("I need you to help me break down")]
        for i, p in enumerate(prompts):
            if i not in writes:
                self._tick()
                yield i, Generation(FIXED_PLAN, 10, 50, "stop")
        if writes:
            lim = [max_new_tokens[i] for i in writes] if max_new_tokens else None
            for j, g in self.backend.generate_iter([prompts[i] for i in writes], params, lim, desc):
                self._tick()
                yield writes[j], g

    def generate(self, prompts, params, max_new_tokens=None, desc=None):
        out = [None] * len(prompts)
        for i, g in self.generate_iter(prompts, params, max_new_tokens, desc):
            out[i] = g
        return out

    def _tick(self):
        if self.crash_after is not None and self.outputs >= self.crash_after:
            raise KeyboardInterrupt("killed")
        self.outputs += 1


def _cfg(**kw):
    base = dict(n_instructions=2, heldout=1, plan_max_new_tokens=16, write_max_new_tokens=8, temperature=0.0,
                max_paragraphs=None, min_length_ratio=0.0, check_leak=False)
    base.update(kw)
    return AgentWriteConfig(**base)


def test_serial_writing_passes_all_earlier_text_and_formats_output(tmp_path, local_backend):
    prof = load_profile("smoke", run_root=tmp_path)
    be = Scripted(local_backend)
    res = build_dataset(prof, _cfg(), backend=be, instructions=INSTS)
    paras = read_jsonl(tmp_path / "smoke" / "agentwrite" / "paragraphs.jsonl")
    assert len(paras) == 6 and all(p["completion_tokens"] <= 8 for p in paras)
    writes = [p for p in be.prompts if p.startswith("You are an excellent writing assistant")]
    assert len(writes) == 6
    for ins in INSTS:
        mine = sorted((p for p in paras if p["id"] == ins.id), key=lambda p: p["step"])
        prompts = [w for w in writes if ins.prompt in w]
        assert len(prompts) == 3
        for k, prompt in enumerate(prompts):  # step k sees the plan, its own line and every earlier paragraph
            assert "Paragraph 3 - Main Point: The rescue - Word Count: 300 words" in prompt
            assert f"continue writing Paragraph {k + 1} - Main Point" in prompt
            for earlier in mine[:k]:
                assert earlier["response"].strip() in prompt
            assert "omit open-ended conclusions" in prompt  # v2 by default
    train = [json.loads(l) for l in open(tmp_path / "smoke" / "agentwrite" / "longwriter.jsonl")]
    held = [json.loads(l) for l in open(tmp_path / "smoke" / "agentwrite" / "heldout.jsonl")]
    assert len(train) == 1 and len(held) == 1 and res.summary["kept"] == 2
    assert [m["role"] for m in train[0]["messages"]] == ["user", "assistant"]
    from lwlib.sft import load_sft_data

    assert len(load_sft_data(tmp_path / "smoke" / "agentwrite" / "longwriter.jsonl")) == 1
    it = res.items[0]
    assert [s["target_words"] for s in it["steps"]] == [300, 300, 300] and it["planned_words"] == 900
    assert it["tokens_out"] == 50 + sum(s["completion_tokens"] for s in it["steps"])
    assert it["provenance"]["write_prompt"] == "write_v2.txt"
    # post-filter on the same (cached) calls: a strict ratio drops both and records why, at no cost
    res2 = build_dataset(prof, _cfg(min_length_ratio=0.9, heldout=0), backend=be, instructions=INSTS)
    assert res2.summary["calls_this_run"] == 0 and res2.summary["kept"] == 0
    assert res2.summary["drop_reasons"] == {"too_short": 2}
    assert all(it["dropped_reason"].startswith("too_short: ") for it in res2.items)
    assert (tmp_path / "smoke" / "agentwrite" / "longwriter.jsonl").read_text() == ""


def test_resume_after_crash_mid_instruction_loses_and_duplicates_nothing(tmp_path, local_backend):
    prof = load_profile("smoke", run_root=tmp_path)
    folder = tmp_path / "smoke" / "agentwrite"
    # outputs: 2 plans, then step 0 of both, then step 1 of both ... crash after 3 outputs = mid-instruction
    with pytest.raises(KeyboardInterrupt):
        build_dataset(prof, _cfg(), backend=Scripted(local_backend, crash_after=3), instructions=INSTS)
    first = read_jsonl(folder / "plans.jsonl") + read_jsonl(folder / "paragraphs.jsonl")
    assert len(first) == 3
    be = Scripted(local_backend)
    res = build_dataset(prof, _cfg(), backend=be, instructions=INSTS)
    plans, paras = read_jsonl(folder / "plans.jsonl"), read_jsonl(folder / "paragraphs.jsonl")
    assert len(plans) == 2 and len(paras) == 6 and len({p["key"] for p in paras}) == 6
    assert (plans + paras)[:0] == [] and all(r in plans + paras for r in first)  # nothing lost
    assert be.outputs == 5  # only the missing calls were made
    assert res.summary["cache_hits_this_run"] == 3 and res.summary["kept"] == 2
    # a third run, or the same prompt under another id, pays for nothing
    class Refuse:
        name, batched = local_backend.name, True

        def generate_iter(self, *a, **k):
            raise AssertionError("no call should be made")
    dup = INSTS + [Instruction("a-copy", INSTS[0].prompt, "t", "en", 2000)]
    res3 = build_dataset(prof, _cfg(), backend=Refuse(), instructions=dup)
    assert res3.summary["calls_this_run"] == 0 and res3.summary["kept"] == 3


def test_context_cap_drops_oldest_text_and_records_it(tmp_path, local_backend):
    prof = load_profile("smoke", run_root=tmp_path)
    plan = "\n".join(s.render() for s in parse_plan(FIXED_PLAN))
    bare = (write_template("v2").replace("$INST$", INSTS[0].prompt).replace("$PLAN$", plan)
            .replace("$TEXT$", "[...]").replace("$STEP$", plan.splitlines()[-1]))
    full = len(local_backend.encode(bare)) + 16  # room for about one 12-token paragraph, not two
    cfg = _cfg(max_prompt_tokens=full, write_max_new_tokens=12)
    be = Scripted(local_backend)
    res = build_dataset(prof, cfg, backend=be, instructions=INSTS[:1])
    writes = [p for p in be.prompts if p.startswith("You are an excellent")]
    assert all(len(local_backend.encode(w)) <= full for w in writes)
    dropped = [s["context_dropped_paragraphs"] for s in res.items[0]["steps"]]
    assert dropped[0] == 0 and dropped[-1] >= 1 and "[...]" in writes[-1]
    assert INSTS[0].prompt in writes[-1] and "The rescue" in writes[-1]  # instruction and plan always kept


def test_openai_path_against_local_server(tmp_path, chat_server, local_backend):
    prof = load_profile("smoke", run_root=tmp_path)
    cfg = _cfg(plan_max_new_tokens=48, write_max_new_tokens=8, max_paragraphs=2, concurrent_instructions=2,
               prices={chat_server.model: [1.0, 2.0]},
               backend=BackendConfig(kind="openai", model=chat_server.model, base_url=chat_server.url))
    # plans first (fixed, through the local engine; same model name -> same request keys), then the API writes
    with pytest.raises(KeyboardInterrupt):
        build_dataset(prof, cfg, backend=Scripted(local_backend, crash_after=2), instructions=INSTS)
    res = build_dataset(prof, cfg, instructions=INSTS)
    assert res.summary["provenance"]["backend"] == "openai"
    assert res.summary["calls_this_run"] == 4 and res.summary["cache_hits_this_run"] == 2
    paras = read_jsonl(tmp_path / "smoke" / "agentwrite" / "paragraphs.jsonl")
    assert len(paras) == 4 and {p["backend"] for p in paras} == {"openai"}
    assert all(0 < p["completion_tokens"] <= 8 and p["prompt_tokens"] > 200 for p in paras)
    for it in res.items:
        assert it["split"] != "dropped" and len(it["steps"]) == 2
        assert it["cost_usd"] == pytest.approx((it["tokens_in"] * 1 + it["tokens_out"] * 2) / 1e6)
    assert build_dataset(prof, cfg, instructions=INSTS).summary["calls_this_run"] == 0  # all cached


def test_notebook_02_builds_a_dataset_on_smoke(tmp_path):
    execute_notebook("02_agentwrite.ipynb", tmp_path, overrides={"agentwrite.max_paragraphs": 2,
                                                                 "agentwrite.write_max_new_tokens": 32})
    folder = tmp_path / "runs" / "smoke" / "agentwrite"
    from lwlib.sft import load_sft_data

    assert len(load_sft_data(folder / "longwriter.jsonl")) >= 1
    s = json.loads((folder / "summary.json").read_text())
    # one held out when at least two items survive (the training set is never emptied for it)
    assert len(read_jsonl(folder / "heldout.jsonl")) == s["heldout"] == min(1, s["kept"] - 1)
    assert s["instructions"] == 2 and s["provenance"]["model"]
    corpus = read_jsonl(tmp_path / "runs" / "smoke" / "corpus" / "longwriter.jsonl")  # the stand-in data, smoke-sized
    assert len(corpus) == 12 and all(60 <= r["words"] <= 400 for r in corpus)
    for name in ("agentwrite_length_hist.png", "agentwrite_planned_vs_actual.png", "corpus_length_hist.png"):
        assert (tmp_path / "figures" / "smoke" / name).stat().st_size > 10_000
