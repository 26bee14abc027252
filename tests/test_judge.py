"""The LLM judge (lwlib.judge): the official prompt, answer parsing, the quality score, retries over HTTP, the
cache, the judge config (a BackendConfig) and the one judging loop the benchmark and DPO share."""

from __future__ import annotations

import json

import numpy as np
import pytest

from judgeutil import ScriptedBackend
from judgeutil import answer as _answer
from lwlib import judge
from lwlib.backends import BackendConfig, OpenAIBackend
from lwlib.config import ConfigError, from_dict, load_profile
from lwlib.runs import JsonlStore
from lwlib.serve import serve

DIMS = judge.JUDGE_DIMENSIONS


# ------------------------------------------------------------------------------ judge prompt and parsing


def test_judge_prompt_is_the_official_template():
    t = judge.judge_template()
    assert len(t) == 1884 and t.startswith("You are an expert in evaluating text quality.")
    assert "You do not need to consider whether the response meets the user's length requirements" in t
    for d in DIMS:
        assert f"{d}:" in t
    p = judge.judge_prompt("Write a poem about tea.", "Tea is warm.")
    assert "<User Request>\n\nWrite a poem about tea.\n\n</User Request>" in p
    assert "<Response>\n\nTea is warm.\n\n</Response>" in p and "$INST$" not in p and "$RESPONSE$" not in p


def test_parse_fenced_bare_and_trailing():
    want = dict(zip(DIMS, [5, 4, 3, 2, 1, 4]))
    assert judge.parse_judgement(_answer([5, 4, 3, 2, 1, 4], fenced=True)) == want
    assert judge.parse_judgement("Here is my evaluation:\n" + _answer([5, 4, 3, 2, 1, 4])) == want
    assert judge.parse_judgement(_answer([5, 4, 3, 2, 1, 4], trailing="\nHope this helps! {not json}")) == want
    # a raw newline inside the analysis string (the official code strips newlines before json.loads)
    raw = '{"Analysis": "line one\nline two", ' + ", ".join(f'"{d}": 3' for d in DIMS) + "}"
    assert judge.parse_judgement(raw) == dict.fromkeys(DIMS, 3)
    # scores given as digit strings, and a first object that is not a judgement
    s = '{"note": 1} then {' + ", ".join(f'"{d}": "2"' for d in DIMS) + "}"
    assert judge.parse_judgement(s) == dict.fromkeys(DIMS, 2)


@pytest.mark.parametrize("text", [
    "",
    None,
    "The response is good. Relevance: 5, Accuracy: 4.",                      # not JSON
    "```json\n{\"Analysis\": \"ok\", \"Relevance\": 5\n```",                  # broken JSON
    json.dumps({"Analysis": "x", **dict(zip(DIMS[:-1], [4] * 5))}),          # missing Reading Experience
    json.dumps({"Analysis": "x", **dict(zip(DIMS, [4, 4, 4, 4, 4, 6]))}),    # out of range
    json.dumps({"Analysis": "x", **dict(zip(DIMS, [4, 4, 4, 4, 4, 0]))}),    # out of range
    json.dumps({"Analysis": "x", **dict(zip(DIMS, [4, 4, 4, 4, 4, 3.5]))}),  # not an integer
    json.dumps({"Analysis": "x", **dict(zip(DIMS, [4, 4, 4, 4, 4, True]))}),
])
def test_parse_rejects_unusable_answers(text):
    assert judge.parse_judgement(text) is None


def test_quality_score_formula():
    assert judge.quality_score(dict.fromkeys(DIMS, 5)) == 100.0
    assert judge.quality_score(dict.fromkeys(DIMS, 1)) == 0.0
    s = dict(zip(DIMS, [5, 4, 3, 2, 1, 4]))
    assert judge.quality_score(s) == pytest.approx(np.mean([100, 75, 50, 25, 0, 75]))
    with pytest.raises(ValueError, match="Clarity"):
        judge.quality_score({d: 3 for d in DIMS if d != "Clarity"})


# ------------------------------------------------------------------------------ calls and cache


def test_judge_one_retries_over_http_and_caches(tmp_path):
    answers = ["I think it is fine.", _answer([4, 4, 4, 4, 2, 2], fenced=True)]
    with serve(ScriptedBackend(answers), model_name="scripted") as server:
        be = OpenAIBackend(server.model, base_url=server.url, concurrency=2, max_retries=0)
        cache = judge.JudgeCache(tmp_path / "cache.jsonl")
        s = judge.judge_one(be, "Write about tea.", "Tea.", max_tries=5, cache=cache)
        assert s == dict(zip(DIMS, [4, 4, 4, 4, 2, 2])) and server.requests == 2
        assert judge.judge_one(be, "Write about tea.", "Tea.", cache=cache) == s
        assert server.requests == 2  # cached: no new request
        rec = judge.JudgeCache(tmp_path / "cache.jsonl").store.records()  # reopened from disk
        assert len(rec) == 1 and rec[0]["tries"] == 2 and rec[0]["judge_model"] == "scripted"


def test_judge_one_gives_up_after_max_tries():
    with serve(ScriptedBackend(["no json here"]), model_name="bad") as server:
        be = OpenAIBackend(server.model, base_url=server.url, max_retries=0)
        assert judge.judge_one(be, "p", "r") is None
        assert server.requests == 5  # the official retry policy


def test_transport_errors_are_not_cached(tmp_path):
    with serve(ScriptedBackend(["x"]), model_name="down", fail_first=100) as server:
        be = OpenAIBackend(server.model, base_url=server.url, max_retries=0)
        cache = judge.JudgeCache(tmp_path / "c.jsonl")
        res = list(judge.judge_many(be, [("p", "r")], max_tries=2))[0][1]
        assert res.status == "error" and res.tries == 2
        cache.put("down", "p", "r", res)
        assert len(cache.store) == 0


# ------------------------------------------------------------------------------ config and backends


def test_judge_config_is_a_backend_config_and_every_profile_loads(tmp_path):
    """JudgeConfig is lwlib.backends.BackendConfig plus the judging fields: the profiles' judge sections load as
    before, a backend field (the local engine) is accepted under judge, and kind may be none."""
    for name in ("smoke", "gpu_short", "gpu", "paper", "paper_rehearsal"):
        prof = load_profile(name, run_root=tmp_path)
        for section in ("bench", "dpo"):
            j = prof.section(section).judge
            assert isinstance(j, judge.JudgeConfig) and isinstance(j, BackendConfig)
            assert j.kind in ("local", "openai", "none")
    paper = load_profile("paper", run_root=tmp_path).section("bench").judge
    assert (paper.kind, paper.model, paper.temperature, paper.max_tokens, paper.max_tries, paper.concurrency) == (
        "openai", "gpt-4o-2024-05-13", 0.5, 1024, 5, 8)
    j = judge.JudgeConfig()
    assert (j.kind, j.timeout_s, j.serve, j.batch_size, j.max_retries, j.api_key_env) == (
        "local", 600.0, True, 8, 5, "OPENAI_API_KEY")
    j = from_dict(judge.JudgeConfig, {"kind": "local", "engine": "slots", "max_batch": 16, "serve": False},
                  where="bench.judge")
    assert (j.engine, j.max_batch, j.serve) == ("slots", 16, False)
    with pytest.raises(ConfigError, match=r"bench\.judge\.kind: expected one of 'local', 'openai', 'none'"):
        from_dict(judge.JudgeConfig, {"kind": "gpt"}, where="bench.judge")
    with pytest.raises(ConfigError, match=r"bench\.judge: backend\.engine must be one of"):
        from_dict(judge.JudgeConfig, {"engine": "fast"}, where="bench.judge")


def test_make_judge_kinds(tmp_path):
    prof = load_profile("smoke", run_root=tmp_path)
    assert judge.make_judge(prof, judge.JudgeConfig(kind="none")) is None
    with pytest.raises(ValueError, match=r"dpo\.judge\.model must name the API judge model"):
        judge.make_judge(prof, judge.JudgeConfig(kind="openai"), where="dpo.judge")
    be = judge.make_judge(prof, judge.JudgeConfig(kind="openai", model="judge-x", base_url="http://127.0.0.1:9",
                                                  concurrency=3, max_retries=1, timeout_s=7.0))
    assert isinstance(be, OpenAIBackend) and judge.judge_model_id(be) == judge.judge_label(be) == "judge-x"
    assert (be.concurrency, be.max_retries, be.request_timeout(1024)) == (3, 1, 7.0)


# ------------------------------------------------------------------------------ the judging loop


def _records(n=2, words=5):
    return [{"id": f"r{i}", "prompt": f"Write {i}.", "response": " ".join(["word"] * words) + "."} for i in range(n)]


def _make_record(j: judge.Judged) -> dict:
    return {"id": j.record["id"], "judge_model": j.judge_model, "judge": j.label, "scores": j.result.scores,
            "tries": j.result.tries, "truncated": j.truncated, "cached": j.cached}


def test_judge_records_stores_caches_resumes_and_checks_the_judge_model(tmp_path):
    cfg = judge.JudgeConfig(max_tries=2, max_response_words=3)
    cache = judge.judge_cache(tmp_path / "cache.jsonl", cfg, seed=0)
    store = JsonlStore(tmp_path / "a.jsonl")
    good = ScriptedBackend(["nope", _answer([5] * 6), _answer([3] * 6)], name="judge-a")
    errors = judge.judge_records(_records(), good, cfg, store, _make_record, cache, seed=0)
    assert errors == {} and good.calls == 3  # try 1: r0 unusable, r1 judged; try 2: r0 judged
    recs = {r["id"]: r for r in store.records()}
    assert set(recs) == {"r0", "r1"} and all(r["judge_model"] == "judge-a" and r["truncated"] for r in recs.values())
    assert all(r["scores"] is not None and not r["cached"] for r in recs.values())
    assert len(cache.store) == 2
    # resumed: nothing is sent again
    judge.judge_records(_records(), good, cfg, store, _make_record, cache, seed=0)
    assert good.calls == 3 and len(store) == 2
    # another store, the same judge model: the cache answers
    other = JsonlStore(tmp_path / "b.jsonl")
    judge.judge_records(_records(), ScriptedBackend(["unused"], name="judge-a"), cfg, other, _make_record, cache)
    assert all(r["cached"] for r in other.records()) and [r["scores"] for r in other.records()] == [
        recs["r0"]["scores"], recs["r1"]["scores"]]
    # a record judged by another judge model is an error, not mixed in
    with pytest.raises(ValueError, match=r"r0 was judged by 'judge-a', not 'judge-b'"):
        judge.judge_records(_records(), ScriptedBackend(["x"], name="judge-b"), cfg, store, _make_record, cache)


def test_judge_records_returns_transport_errors_unstored(tmp_path):
    cfg = judge.JudgeConfig(max_tries=2)
    cache = judge.judge_cache(tmp_path / "cache.jsonl", cfg, seed=0)
    store = JsonlStore(tmp_path / "a.jsonl")
    down = ScriptedBackend([ConnectionError("refused")], name="down")
    errors = judge.judge_records(_records(1), down, cfg, store, _make_record, cache)
    assert list(errors) == ["r0"] and errors["r0"].status == "error" and errors["r0"].tries == 2
    assert len(store) == 0 and len(cache.store) == 0  # a rerun retries it
    failed = ScriptedBackend(["no json"], name="down")  # unusable answers are a result (failed), stored
    assert judge.judge_records(_records(1), failed, cfg, store, _make_record, cache) == {}
    assert store.get("r0")["scores"] is None and store.get("r0")["tries"] == 2
