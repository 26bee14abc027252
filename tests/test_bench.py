"""LongBench-Write, the stage: item selection, predictions, judging them (with a known judge and the real model),
tables, figures, notebook 06. The length score is tested in test_scoring.py, the judge in test_judge.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from judgeutil import ScriptedBackend
from judgeutil import answer as _answer
from lwlib import bench
from lwlib.backends import OpenAIBackend
from lwlib.config import load_profile
from lwlib.judge import JudgeConfig
from lwlib.plots import check_figures
from lwlib.scoring import BUCKET_NAMES, bucket_of, length_score
from lwlib.text import count_words


# ------------------------------------------------------------------------------ items


def test_select_items_languages_and_spread():
    from lwlib.data import load_longbench_write

    items = load_longbench_write()
    cfg = bench.BenchConfig(languages=["en"])
    en = bench.select_items(items, cfg)
    assert len(en) == 60 and {it.lang for it in en} == {"en"}
    cfg.max_items = 4
    four = bench.select_items(items, cfg)
    assert len(four) == 4 and sorted({bucket_of(it.length) for it in four}) == sorted(BUCKET_NAMES)
    with pytest.raises(ValueError, match="languages"):
        bench.select_items(items, bench.BenchConfig(languages=["fr"]))


# ------------------------------------------------------------------------------ whole evaluation


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, local_backend):
    """Real predictions of the bundled model for 2 English items (8 tokens each)."""
    root = tmp_path_factory.mktemp("bench")
    prof = load_profile("smoke", run_root=root)
    cfg = bench.BenchConfig(languages=["en"], max_items=2, max_new_tokens=8, n_boot=200)
    df = bench.run_predictions(prof, "base", cfg, backend=local_backend)
    return prof, cfg, df


def test_predictions_records_and_resume(predicted, local_backend):
    prof, cfg, df = predicted
    assert len(df) == 2
    for r in df.to_dict("records"):
        assert r["response_length"] == count_words(r["response"])
        assert r["tokens"] <= 8 and r["hit_limit"] == (r["finish_reason"] == "length")
        assert r["bucket"] == bucket_of(r["length"]) and r["lang"] == "en"
        assert r["S_l"] == pytest.approx(length_score(r["length"], r["response_length"]))
    again = bench.run_predictions(prof, "base", cfg, backend=None)  # nothing left: no model is loaded
    assert again["response"].tolist() == df["response"].tolist()
    assert len((prof.run_dir / "bench" / "base" / "paper" / "predictions.jsonl").read_text().splitlines()) == 2


def test_predictions_with_two_samples_per_item(tmp_path, local_backend):
    """``bench.samples: 2``: every item twice (sample 0 under the item's own id, as one-sample runs stored it,
    sample 1 as ``<id>-s1``); the table counts outputs and items; a one-sample rerun reads sample 0 back."""
    prof = load_profile("smoke", run_root=tmp_path)
    cfg = bench.BenchConfig(languages=["en"], max_items=2, max_new_tokens=6, samples=2, n_boot=100)
    df = bench.run_predictions(prof, "base", cfg, backend=local_backend)
    items = sorted(set(df["item_id"]))
    assert len(items) == 2 and sorted(df["id"]) == sorted(items + [f"{i}-s1" for i in items])
    assert sorted(df["sample"]) == [0, 0, 1, 1] and (df.groupby("item_id")["length"].nunique() == 1).all()
    t = bench.score_table(df, by=None, n_boot=100)
    assert (t.loc["overall", "n"], t.loc["overall", "items"]) == (4, 2)
    one = bench.run_predictions(prof, "base", dataclasses.replace(cfg, samples=1), backend=None)  # nothing to make
    assert sorted(one["id"]) == items and sorted(one["response"]) == sorted(df[df["sample"] == 0]["response"])
    with pytest.raises(ValueError, match="samples"):
        bench.BenchConfig(samples=0)


def test_predictions_of_a_gone_checkpoint_are_read_back(tmp_path, local_backend, capsys):
    """A model whose checkpoint an earlier sitting trained and lost (``dpo-s1`` here: its predictions made through a
    backend, no checkpoint in the run) is scored from its predictions when every selected item of every decoding is
    there, without the store's fingerprint check (which needs the checkpoint); one item short, it is skipped."""
    from lwlib.decodings import profile_decodings

    prof = load_profile("smoke", run_root=tmp_path)
    cfg = bench.BenchConfig(languages=["en"], max_items=2, max_new_tokens=6, n_boot=50,
                            judge=dataclasses.replace(bench.BenchConfig().judge, kind="none"))
    decs = profile_decodings(prof)
    assert len(decs) == 2
    made = bench.predict_decodings(prof, "dpo-s1", decs, cfg, backend=local_backend)
    back = bench.predicted_before(prof, "dpo-s1", cfg)
    assert set(back) == {d.name for d in decs}
    for d in decs:
        assert sorted(back[d.name]["response"]) == sorted(made[d.name]["response"]) and "S_l" in back[d.name]
    again = bench.predict_decodings(prof, "dpo-s1", decs, cfg)  # no checkpoint, no backend: read back
    assert {d: sorted(df["id"]) for d, df in again.items()} == {d: sorted(df["id"]) for d, df in made.items()}
    assert bench.bench_tags(prof, ["base", "dpo", "dpo-s1"], cfg) == ["base", "dpo-s1"]
    assert "skipping 'dpo'" in capsys.readouterr().out
    results = bench.evaluate_models(prof, dataclasses.replace(cfg, models=["dpo-s1"]))
    assert set(results) == {"dpo-s1 (paper)", "dpo-s1 (loopfree)"}
    more = dataclasses.replace(cfg, max_items=3)  # an item never predicted: not read back, and the error stays
    assert bench.predicted_before(prof, "dpo-s1", more) is None and bench.bench_tags(prof, ["dpo-s1"], more) == []
    with pytest.raises(FileNotFoundError, match="no dpo-s1 checkpoint"):
        bench.predict_decodings(prof, "dpo-s1", decs, more)


def test_score_table_resamples_items_not_samples():
    """Two identical samples per item: the same intervals as one sample (the bootstrap draws items)."""
    one = pd.DataFrame({"id": ["a", "b", "c", "d"], "item_id": ["a", "b", "c", "d"], "S_l": [10.0, 40.0, 70.0, 90.0],
                        "S_l_eff": 0.0, "collapsed": False, "hit_limit": False, "bucket": "[0,500)"})
    two = pd.concat([one, one.assign(id=one["id"] + "-s1")], ignore_index=True)
    t1, t2 = (bench.score_table(x, by=None, n_boot=300, seed=4).loc["overall"] for x in (one, two))
    assert (t1["items"], t2["items"], t2["n"]) == (4, 4, 8)
    assert (t2["S_l"], t2["S_l_lo"], t2["S_l_hi"]) == (t1["S_l"], t1["S_l_lo"], t1["S_l_hi"])


def test_length_score_difference_over_seeds_and_samples():
    """Seeds x items x samples: a sample pairs with the same sample of the same item; an item's difference is the
    mean over its samples; seeds are resampled first."""
    def preds(values):  # {item: [sample 0, sample 1]} -> records
        rows = [{"id": i if k == 0 else f"{i}-s{k}", "item_id": i, "S_l": v, "bucket": "[0,500)", "type": "x",
                 "lang": "en"} for i, vs in values.items() for k, v in enumerate(vs)]
        return pd.DataFrame(rows)

    before = {0: preds({"a": [50, 52], "b": [60, 60]}), 1: preds({"a": [40, 40], "b": [80, 70]})}
    after = {0: preds({"a": [60, 62], "b": [70, 70]}), 1: preds({"a": [30, 30], "b": [70, 60]})}
    t = bench.length_score_difference(before, after, by=None, n_boot=400, seed=2)
    o = t.loc["overall"]
    assert (o["n"], o["seeds"], o["d_s0"], o["d_s1"], o["difference"]) == (2, 2, 10.0, -10.0, 0.0)
    assert o["before"] == pytest.approx((51 + 60 + 40 + 75) / 4) and o["lo"] == -10.0 and o["hi"] == 10.0
    same = bench.length_score_difference({0: before[0], 1: before[0]}, {0: after[0], 1: after[0]}, by=None,
                                         n_boot=400)
    assert same.loc["overall", "lo"] == same.loc["overall", "hi"] == 10.0  # every resample: +10
    with pytest.raises(ValueError, match="share no item"):
        bench.length_score_difference({0: before[0]}, {1: after[1]})  # no seed on both sides


def test_evaluation_with_local_model_as_judge(predicted, chat_server):
    """The real bundled model judges through the OpenAI-compatible test server; its answers are
    whatever it writes: judged + failed must account for every item, and a rerun sends nothing."""
    prof, cfg, _ = predicted
    cfg.judge = JudgeConfig(max_tokens=16, max_tries=2)
    judge = OpenAIBackend(chat_server.model, base_url=chat_server.url, max_retries=1)
    before = chat_server.requests
    df = bench.run_judge(prof, "base", judge, cfg)
    sent = chat_server.requests - before
    assert set(df["judge_status"]) <= {"ok", "failed"}
    assert df["judged"].sum() + (df["judge_status"] == "failed").sum() == len(df) == 2
    failed = df[df["judge_status"] == "failed"]
    assert (failed["judge_tries"] == 2).all() and failed["S_q"].isna().all()
    assert sent == df["judge_tries"].sum()
    recs = [json.loads(x) for x in (prof.run_dir / "bench" / "base" / "paper" / "judgements.jsonl").read_text().splitlines()]
    assert all(len(r["outputs"]) == r["tries"] for r in recs)
    t = bench.score_table(df)
    assert t.loc["overall", "judged"] == df["judged"].sum()
    if t.loc["overall", "judged"] == 0:
        assert np.isnan(t.loc["overall", "S_q"]) and np.isnan(t.loc["overall", "S"])
    bench.run_judge(prof, "base", judge, cfg)
    assert chat_server.requests - before == sent  # resumed: nothing re-sent


def test_scores_with_a_known_judge(predicted, tmp_path):
    """A judge with known answers: first item unparseable twice then 5s; second always unusable."""
    prof, cfg, preds = predicted
    prof = load_profile("smoke", run_root=tmp_path)  # fresh run folder, same predictions
    out = prof.stage_dir("bench") / "base" / "paper"
    out.mkdir(parents=True)
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds.drop(columns=["S_l", "S_l_eff"]).to_dict("records")))
    cfg.judge = JudgeConfig(max_tries=3)
    # rounds: try 1 -> both get garbage; try 2 -> first gets garbage, second a missing dimension;
    # try 3 -> first a valid answer, second a missing dimension again
    answers = ["nope", "nope", "nope", json.dumps({"Relevance": 5}), _answer([5, 5, 5, 5, 3, 3]), json.dumps({"Relevance": 5})]
    scripted = ScriptedBackend(answers, name="scripted-judge")
    df = bench.run_judge(prof, "base", scripted, cfg)
    assert scripted.calls == 6
    assert sorted(df["judge_status"]) == ["failed", "ok"]
    ok = df[df["judged"]].iloc[0]
    assert ok["judge_tries"] == 3 and ok["S_q"] == pytest.approx(np.mean([100] * 4 + [50] * 2))
    t = bench.score_table(df, "bucket", n_boot=300)
    assert t.loc["overall", "judged"] == 1 and t.loc["overall", "judge_failed"] == 1
    assert t.loc["overall", "S_q"] == pytest.approx(ok["S_q"])  # over judged items only
    assert t.loc["overall", "S_l"] == pytest.approx(preds["S_l"].mean())
    assert t.loc["overall", "S"] == pytest.approx((preds["S_l"].mean() + ok["S_q"]) / 2)
    assert t.loc["overall", "S_l_lo"] <= t.loc["overall", "S_l"] <= t.loc["overall", "S_l_hi"]
    # tables and figures from the same results
    res = {"base": df}
    pt = bench.paper_table(res)
    assert pt.loc["base", ("Items", "judged")] == 1
    rep = bench.repetition_table(res)
    assert rep.loc[("base", "overall"), "n"] == 2
    cmp = bench.paper_comparison(res, prof.name)
    assert any(s.startswith("this run (profile smoke") for s in cmp.index.get_level_values(0))
    assert cmp.loc[("paper, as quoted (lwlib/paper_scores.json)", "LongWriter-9B"), "S"] == 80.5
    for fn in (bench.plot_length_scatter, bench.plot_bucket_bars):
        p = fn(res, tmp_path / f"{fn.__name__}.png", "test")
        assert p.stat().st_size > 5000


def test_paper_scores_file_is_well_formed():
    data = bench.load_paper_scores()
    assert "2408.07055" in data["source"]
    assert data["scores"], "no published rows"
    for row in data["scores"]:
        assert (row["S"] is None or 0 <= row["S"] <= 100) and row["quoted_in"]
        if row["S"] is not None and row["S_l"] is not None and row["S_q"] is not None:
            assert 0 <= row["S_l"] <= 100 and 0 <= row["S_q"] <= 100
            assert row["S"] == pytest.approx((row["S_l"] + row["S_q"]) / 2, abs=0.06)
    assert {r["model"] for r in data["scores"]} >= {"LongWriter-9B", "LongWriter-9B-DPO", "Llama-3.1-8B-Instruct"}
    sq = {r["model"]: r["S_q"] for r in data["scores"]}  # as LongDPO's Table 9 quotes the paper
    assert (sq["GPT-4o"], sq["LongWriter-8B"], sq["GLM-4-9B-chat"], sq["LongWriter-9B"]) == (91.8, 82.2, 85.5, 82.3)
    assert all("2502.02095" in r["quoted_in"] for r in data["scores"] if r["model"] in ("GPT-4o", "LongWriter-8B"))


def test_unknown_bench_field_is_named(tmp_path):
    prof = load_profile("smoke", {"bench.judge.temprature": 0.1}, run_root=tmp_path)
    with pytest.raises(Exception, match="temprature"):
        prof.section("bench", bench.BenchConfig)


# ------------------------------------------------------------------------------ notebook


def test_notebook_06_smoke(tmp_path, local_backend):
    from nbutil import execute_notebook

    from lwlib.probe import ProbeConfig, run_probe

    # a tiny real ruler probe of the base model, as notebook 01 leaves it, for the ruler figure
    prof = load_profile("smoke", run_root=tmp_path / "runs")
    run_probe(prof, prof.model, "base", ProbeConfig(languages=["en"], lengths=[1000, 5000], templates=1,
                                                    max_new_tokens=8), backend=local_backend)
    overrides = {"bench.max_items": 2, "bench.max_new_tokens": 8, "bench.judge.max_tokens": 8,
                 "bench.judge.max_tries": 1, "bench.n_boot": 50}
    out = execute_notebook("06_longbench_write.ipynb", tmp_path, overrides=overrides)
    figs = tmp_path / "figures" / "smoke"
    for name in ("longbench_write_scatter.png", "longbench_write_buckets.png", "ruler_all_models.png"):
        assert (figs / name).stat().st_size > 5000
    assert check_figures(figs) == {}  # readable at notebook width
    summary = json.loads((tmp_path / "runs" / "smoke" / "bench" / "summary.json").read_text())
    assert set(summary) == {"base (paper)", "base (loopfree)"}  # sft/dpo not trained in this fresh run: skipped
    claims = json.loads((tmp_path / "runs" / "smoke" / "claims.json").read_text())  # nothing measured here: every
    assert [c["id"] for c in claims] == [  # claim listed as incomplete, naming the file it waits for
        "a_length_follows_sft_cap", "b_long_data_lifts_limit", "h_10000_words", "d_length_follows_instruction",
        "c_dpo_improves_length_score", "nll_long_context_helps"]
    assert all(c["measured"] is None and c["reproduced"] is None and "is missing" in c["why"] for c in claims)
    j = summary["base (paper)"]["judge"]
    assert j["items"] == 2 and j["judged"] + j["failed (unparseable after all tries)"] == 2
    text = out.read_text()
    assert "skipping 'sft'" in text
    assert "Profile smoke is far too small for these verdicts" in text  # the claims' banner (lwlib.claims_view)


def test_length_score_difference_paired_on_known_values():
    before = pd.DataFrame({"id": ["a", "b", "c", "d"], "S_l": [50.0, 60.0, 70.0, 80.0],
                           "bucket": ["[0,500)", "[0,500)", "[2k,4k)", "[2k,4k)"], "type": "x", "lang": "en"})
    after = pd.DataFrame({"id": ["d", "c", "b", "a"], "S_l": [90.0, 75.0, 62.0, 51.0]})  # other order: merged by id
    t = bench.length_score_difference(before, after, n_boot=500, seed=1)
    assert t.loc["overall", "difference"] == pytest.approx((1 + 2 + 5 + 10) / 4)
    assert t.loc["overall", "before"] == 65.0 and t.loc["overall", "after"] == pytest.approx(69.5)
    assert t.loc["[0,500)", "difference"] == pytest.approx(1.5) and t.loc["[2k,4k)", "n"] == 2
    # every item improved: every paired resample is above 0, so is the interval
    assert t.loc["overall", "lo"] > 0 and t.loc["overall", "share_above_0"] == 1.0
    worse = bench.length_score_difference(before, after.assign(S_l=[70.0, 75.0, 50.0, 40.0]), n_boot=500)
    assert worse.loc["overall", "difference"] < 0 and worse.loc["overall", "lo"] < 0
    with pytest.raises(ValueError, match="share no item"):
        bench.length_score_difference(before, after.assign(id=["x", "y", "z", "w"]))
