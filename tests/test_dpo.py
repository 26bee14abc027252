"""DPO: score combination and its fallback, pair construction (best vs seeded random other, ties),
the length plan, general pairs, judging the samples (the judge's loop: cache, judge model), the data stage
(resume), real DPO steps on CPU, and notebook 04."""

import dataclasses
import json

import pandas as pd
import pytest
import torch

from judgeutil import ScriptedBackend, answer
from lwlib.config import load_profile
from lwlib.dpo import (DPOStageConfig, build_dpo_data, combine_scores, judge_samples, length_plan, load_dpo_log,
                       load_general_pairs, make_pairs, reward_margins, train_dpo)
from lwlib.runs import read_jsonl
from nbutil import execute_notebook
from test_sft import assert_every_parameter_changed


def _scored(rows):
    return pd.DataFrame(rows, columns=["id", "instruction_id", "score"])


def test_combine_scores_rules_and_length_only_fallback():
    df = pd.DataFrame([
        {"id": "a-s0", "instruction_id": "a", "length_score": 80.0, "quality": 40.0},
        {"id": "a-s1", "instruction_id": "a", "length_score": 20.0, "quality": 100.0},
        {"id": "b-s0", "instruction_id": "b", "length_score": 90.0, "quality": 10.0},
        {"id": "b-s1", "instruction_id": "b", "length_score": 30.0, "quality": None},  # judge failed
    ])
    m = combine_scores(df, "mean").set_index("id")
    assert m.at["a-s0", "score"] == 60.0 and m.at["a-s1", "score"] == 60.0 and m.at["a-s0", "rule"] == "mean"
    # one missing quality in b -> every b sample scored by length alone, recorded
    assert m.at["b-s0", "score"] == 90.0 and m.at["b-s1", "score"] == 30.0
    assert m.at["b-s0", "rule"] == "length only (quality missing)"
    w = combine_scores(df, "weighted", 0.75).set_index("id")
    assert w.at["a-s0", "score"] == pytest.approx(0.75 * 40 + 0.25 * 80)
    q = combine_scores(df, "quality").set_index("id")
    assert q.at["a-s1", "score"] == 100.0 and q["score"].isna().sum() == 2
    with pytest.raises(ValueError, match="score rule"):
        combine_scores(df, "max")
    with pytest.raises(ValueError, match="dpo.score_rule"):
        DPOStageConfig(score_rule="max")


def test_pairs_best_vs_seeded_random_other():
    rows = [("x-s0", "x", 10.0), ("x-s1", "x", 50.0), ("x-s2", "x", 20.0), ("x-s3", "x", 30.0)]
    seen = set()
    for seed in range(30):
        pairs, skipped = make_pairs(_scored(rows), seed=seed)
        assert not skipped and len(pairs) == 1
        p = pairs[0]
        assert p["chosen_id"] == "x-s1" and p["chosen_score"] == 50.0 and not p["tie_break"]
        assert p["rejected_id"] in {"x-s0", "x-s2", "x-s3"}
        seen.add(p["rejected_id"])
        assert make_pairs(_scored(rows[::-1]), seed=seed)[0] == pairs  # same under seed, whatever the order
    assert seen == {"x-s0", "x-s2", "x-s3"}  # every other sample can be the rejected one


def test_pairs_ties_and_unscorable_instructions():
    tied = [("t-s0", "t", 70.0), ("t-s1", "t", 70.0), ("t-s2", "t", 10.0), ("t-s3", "t", 5.0)]
    chosen, dropped = set(), 0
    for seed in range(40):
        pairs, skipped = make_pairs(_scored(tied), seed=seed)
        if pairs:
            assert pairs[0]["tie_break"] and pairs[0]["rejected_score"] < 70.0
            chosen.add(pairs[0]["chosen_id"])
        else:  # the random other was the other best: equal scores, no preference
            assert "tie" in skipped[0]["reason"]
            dropped += 1
        assert make_pairs(_scored(tied), seed=seed) == (pairs, skipped)
    assert chosen == {"t-s0", "t-s1"} and 0 < dropped < 40
    kept, _ = make_pairs(_scored([("u-s0", "u", 1.0), ("u-s1", "u", 1.0)]), seed=0, drop_ties=False)
    assert kept[0]["chosen_score"] == kept[0]["rejected_score"]
    one = _scored([("v-s0", "v", 1.0), ("v-s1", "v", float("nan"))])
    assert make_pairs(one)[1] == [{"instruction_id": "v", "reason": "1 scored samples"}]


def test_length_plan_reports_truncation():
    assert length_plan([100, 300, 200], None) == {"longest_pair_tokens": 300, "max_length": 300, "cap": None,
                                                  "truncated_pairs": 0}
    assert length_plan([100, 300, 200], 150)["truncated_pairs"] == 2
    assert length_plan([100], 8192)["max_length"] == 100  # set from the data, not the cap
    with pytest.raises(ValueError):
        length_plan([], 10)


def test_general_pairs_from_jsonl(tmp_path):
    path = tmp_path / "general.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    rows[4] = {"prompt": [{"role": "user", "content": "q4"}], "chosen": [{"role": "assistant", "content": "g"}],
               "rejected": "b"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_general_pairs(str(path), 3, seed=1)
    assert len(got) == 3 and got == load_general_pairs(str(path), 3, seed=1)
    assert all(g["prompt"][0]["role"] == "user" and g["chosen"][0]["role"] == "assistant" for g in got)
    path.write_text(json.dumps({"prompt": "q", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match="missing field 'rejected'"):
        load_general_pairs(str(path), 1)


def test_general_pairs_from_a_hugging_face_spec(monkeypatch):
    """dpo.general_data "hf:<id>[:<config>][@<split>]" (lwlib.data.parse_hf_spec) goes to datasets.load_dataset
    (stubbed: no hub access); a malformed spec is an error naming the field."""
    import datasets

    calls = []
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]

    def fake_load(name, conf=None, split=None):
        calls.append((name, conf, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = load_general_pairs("hf:org/prefs:default@test_prefs", 2, seed=0)
    assert calls == [("org/prefs", "default", "test_prefs")] and len(got) == 2
    assert all(g["source"] == "general" and g["chosen"][0]["role"] == "assistant" for g in got)
    load_general_pairs("hf:org/prefs", 1)
    assert calls[-1] == ("org/prefs", None, "train")
    with pytest.raises(ValueError, match=r"dpo\.general_data: 'hf:org/prefs@' .*empty split"):
        load_general_pairs("hf:org/prefs@", 1)


def _samples():
    rows = []
    for i in range(2):
        for k in range(2):
            words = 20 + 10 * k
            rows.append({"id": f"gen-{i}-s{k}", "instruction_id": f"gen-{i}", "sample": k,
                         "prompt": f"Write {100 * (i + 1)} words.", "required_length": 100 * (i + 1),
                         "response": " ".join(["word"] * words) + ".", "words": words, "effective_words": words})
    return pd.DataFrame(rows)


def test_judge_samples_caches_and_checks_the_judge_model(tmp_path):
    """DPO's samples are judged by the judge's one loop (lwlib.judge.judge_records), as the benchmark's
    predictions: resumed without calls, cached in dpo/judge_cache.jsonl, and never mixed with another judge's."""
    prof = load_profile("smoke", run_root=tmp_path)
    cfg = DPOStageConfig(start_model="base")
    cfg.judge.max_tries = 1
    samples = _samples()
    j = ScriptedBackend([answer([4] * 6)], name="judge-a")
    scores = judge_samples(prof, cfg, samples, judge=j)
    assert j.calls == 4 and (scores["quality"] == 75.0).all() and (scores["judge_model"] == "judge-a").all()
    assert (scores["judge"] == "judge-a").all() and not scores["judge_cached"].any()
    assert len(read_jsonl(tmp_path / "smoke" / "dpo" / "judge_cache.jsonl")) == 4
    assert judge_samples(prof, cfg, samples, judge=j).equals(scores) and j.calls == 4  # resumed: nothing sent
    with pytest.raises(ValueError, match=r"gen-0-s0 was judged by 'judge-a', not 'judge-b'"):
        judge_samples(prof, cfg, samples, judge=ScriptedBackend(["x"], name="judge-b"))
    # other scoring settings (raw length) start the scores anew (overwrite): the judge's answers come from the cache
    with pytest.warns(UserWarning, match="moved aside"):
        again = judge_samples(prof, dataclasses.replace(cfg, length_basis="raw", overwrite=True), samples, judge=j)
    assert j.calls == 4 and again["judge_cached"].all() and (again["quality"] == 75.0).all()
    # no judge: length scores alone, recorded as such
    none = dataclasses.replace(cfg, judge=dataclasses.replace(cfg.judge, kind="none"), overwrite=True)
    with pytest.warns(UserWarning, match="moved aside"):
        alone = judge_samples(prof, none, samples)
    assert alone["quality"].isna().all() and (alone["judge"] == "none").all() and (alone["judge_tries"] == 0).all()


class NoCalls:
    def __init__(self, name="no-calls"):
        self.name = name  # a judge's model id (the stored scores name the judge model that made them)

    def generate_iter(self, *a, **k):
        raise AssertionError("a resumed stage must not generate again")


def test_build_dpo_data_with_the_real_model_resumes(tmp_path, local_backend):
    prof = load_profile("smoke", run_root=tmp_path)
    cfg = DPOStageConfig(start_model="base", instructions=2, languages=["en"], min_words=10, max_words=30,
                         samples=2, max_new_tokens=8, temperature=1.0)
    cfg.judge.max_tokens, cfg.judge.max_tries, cfg.judge.max_response_words = 4, 1, 20
    pairs, stats = build_dpo_data(prof, cfg, backend=local_backend, judge=local_backend)
    samples = read_jsonl(tmp_path / "smoke" / "dpo" / "samples.jsonl")
    scores = read_jsonl(tmp_path / "smoke" / "dpo" / "scores.jsonl")
    assert len(samples) == len(scores) == 4 and stats["samples"] == 4
    assert all(0 <= s["length_score"] <= 100 and len(s["judge_outputs"]) == 1 for s in scores)
    assert stats["long_pairs"] + len(stats["skipped_instructions"]) == 2
    for p in pairs:
        assert p["chosen_score"] > p["rejected_score"]
        assert p["prompt"][0]["role"] == "user" and p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant"
        assert p["chosen_id"] != p["rejected_id"] and p["chosen_id"].startswith(p["instruction_id"])
    again, stats2 = build_dpo_data(prof, cfg, backend=NoCalls(), judge=NoCalls(local_backend.name))
    assert again == pairs and stats2 == stats
    assert read_jsonl(tmp_path / "smoke" / "dpo" / "pairs.jsonl") == pairs


def test_dpo_seeds_start_from_their_sft_seed_in_their_own_folder(tmp_path):
    """Seed k of DPO: start model ``sft-s<k>`` (a base or a path stays itself), its samples, scores and pairs in
    dpo/s<k>/ (the model tag dpo-s<k> points there), the instructions shared with seed 0."""
    from lwlib.dpo import dpo_dir, start_tag
    from lwlib.judge import JudgeConfig
    from lwlib.models import run_model

    assert [start_tag(DPOStageConfig(start_model=t), 2) for t in ("sft", "cap500", "sft_general", "sft-s1", "base",
                                                                   "runs/x/model")] == [
        "sft-s2", "cap500-s2", "sft_general-s2", "sft-s1", "base", "runs/x/model"]
    assert start_tag(DPOStageConfig(start_model="sft"), 0) == "sft"
    prof = load_profile("smoke", run_root=tmp_path)
    assert dpo_dir(prof, 0) == tmp_path / "smoke" / "dpo" and dpo_dir(prof, 2) == tmp_path / "smoke" / "dpo" / "s2"
    with pytest.raises(FileNotFoundError, match=r"dpo/s2/model"):
        run_model(prof, "dpo-s2")
    cfg = DPOStageConfig(start_model="base", instructions=2, languages=["en"], min_words=10, max_words=30,
                         samples=2, max_new_tokens=8, judge=JudgeConfig(kind="none"), seeds=2)
    texts = {0: ["one two three", "one two three four five six seven eight nine ten"],
             1: ["alpha", "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"]}
    built = {k: build_dpo_data(prof, cfg, backend=ScriptedBackend(texts[k], name="base"), seed=k) for k in (0, 1)}
    for k, folder in ((0, tmp_path / "smoke" / "dpo"), (1, tmp_path / "smoke" / "dpo" / "s1")):
        samples = read_jsonl(folder / "samples.jsonl")
        assert {s["response"] for s in samples} <= set(texts[k]) and len(samples) == 4
        assert read_jsonl(folder / "pairs.jsonl") == built[k][0] and built[k][1]["seed_index"] == k
        assert json.loads((folder / "data_stats.json").read_text())["start_model"] == "base"
    assert not (tmp_path / "smoke" / "dpo" / "s1" / "instructions.jsonl").exists()
    assert [p["instruction_id"] for p in built[0][0]] == [p["instruction_id"] for p in built[1][0]]
    again = build_dpo_data(prof, cfg, backend=NoCalls(), seed=1)  # resumed from dpo/s1
    assert again == built[1]


def test_dpo_steps_on_cpu_change_weights_and_move_the_margin(tmp_path, model_and_tok):
    """Two real DPO steps (TRL's DPOTrainer) on the bundled model: the reward margin starts at 0 and grows, every
    trainable parameter changes, and the margin computed without TRL agrees."""
    base, tok = model_and_tok
    prof = load_profile("smoke", run_root=tmp_path)
    cfg = DPOStageConfig(start_model="base", steps=2, batch_size=1, learning_rate=5e-5, warmup_ratio=0.0,
                         beta=0.1, max_length=4096, gradient_checkpointing=False)
    pairs = [{"prompt": [{"role": "user", "content": "Write about the sea."}],
              "chosen": [{"role": "assistant", "content": "The sea is wide, deep and full of life."}],
              "rejected": [{"role": "assistant", "content": "Sea sea sea sea."}]}]
    folder = train_dpo(prof, cfg, pairs)
    log = load_dpo_log(folder)
    assert log["step"].tolist() == [1, 2]
    assert log["reward_margin"].iloc[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert log["reward_margin"].iloc[1] > 0
    plan = json.loads((folder.parent / "length_plan.json").read_text())
    assert plan["truncated_pairs"] == 0 and plan["max_length"] < 100

    from lwlib.models import load_model

    policy, _ = load_model(folder, device="cpu", dtype="float32")
    changed = [n for (n, p), (_, q) in zip(policy.named_parameters(), base.named_parameters()) if not torch.equal(p, q)]
    assert changed, "DPO steps left the weights unchanged"
    assert_every_parameter_changed(base, policy, "DPO")
    m = reward_margins(policy, base, tok, pairs, beta=0.1)
    assert m["margin"].iloc[0] > 0  # independent of TRL: the chosen answer gained over the rejected one


@pytest.mark.parametrize("seeds", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_notebook_04_smoke(tmp_path, seeds, monkeypatch):
    """Notebook 04 end to end from the base model: pairs, DPO, the probe, SFT vs DPO on LongBench-Write with 2 samples
    per item; with 2 seeds (slow) a second DPO run in dpo/s1 and the interval over both, then a later sitting that
    reads seed 0 back without its checkpoint and has no time for seed 1."""
    overrides = {
        "dpo.start_model": "base", "dpo.samples": 2, "dpo.max_new_tokens": 12, "dpo.judge.max_tokens": 4,
        "dpo.judge.max_response_words": 20, "dpo.steps": 1, "dpo.batch_size": 1, "dpo.bench_items": 1,
        "probe.lengths": [1000], "probe.max_new_tokens": 8, "bench.max_new_tokens": 8,
        "bench.judge.max_tokens": 4, "bench.judge.max_tries": 1, "bench.judge.serve": False, "bench.n_boot": 20,
        "dpo.seeds": seeds, "bench.samples": 2}
    out = execute_notebook("04_dpo.ipynb", tmp_path, overrides=overrides)
    run = tmp_path / "runs" / "smoke" / "dpo"
    assert (run / "model" / "config.json").exists() and (run / "train_log.json").exists()
    assert (run / "s1" / "model" / "config.json").exists() == (run / "s1" / "pairs.jsonl").exists() == (seeds == 2)
    assert (tmp_path / "figures" / "smoke" / "dpo_training.png").exists()
    for dec in ("paper", "loopfree"):
        assert (tmp_path / "runs" / "smoke" / "probe" / "dpo" / dec / "generations.jsonl").exists()
    diff = json.loads((run / "length_score_difference.json").read_text())
    assert set(diff) == {"paper", "loopfree"} and diff["loopfree"]["before_model"] == "base"
    lf = diff["loopfree"]
    assert (lf["seeds"], lf["expected_seeds"], lf["samples_per_item"], lf["items"]) == (list(range(seeds)), seeds, 2, 1)
    assert lf["lo"] <= lf["difference"] <= lf["hi"] and set(lf["by_seed"]) == {str(k) for k in range(seeds)}
    last = "dpo-s1" if seeds == 2 else "dpo"
    preds = read_jsonl(tmp_path / "runs" / "smoke" / "bench" / last / "loopfree" / "predictions.jsonl")
    assert sorted(p["sample"] for p in preds) == [0, 1]
    assert (tmp_path / "figures" / "smoke" / "dpo_length_score_by_bucket.png").exists()
    assert "chosen" in out.read_text()
    if seeds == 2:  # a later sitting: the checkpoints are gone, seed 1 is to be done again, no time for a seed
        import shutil
        import time

        trained = (run / "train_log.json").stat().st_mtime_ns
        shutil.rmtree(run / "model")
        shutil.rmtree(run / "s1")
        shutil.rmtree(tmp_path / "runs" / "smoke" / "bench" / "dpo-s1")
        monkeypatch.setenv("LWLIB_SITTING_END", str(time.time()))
        monkeypatch.setenv("LWLIB_SITTING_RUN_S", "1e6")
        out = execute_notebook("04_dpo.ipynb", tmp_path, overrides=overrides)
        assert (run / "train_log.json").stat().st_mtime_ns == trained and not (run / "model").exists()  # read back
        assert json.loads((tmp_path / "runs" / "smoke" / "sitting.json").read_text())["waiting"] == {
            "04_dpo.ipynb": ["seed 1"]}
        again = json.loads((run / "length_score_difference.json").read_text())["loopfree"]
        assert (again["seeds"], again["expected_seeds"], again["by_seed"]) == ([0], 2, {"0": lf["by_seed"]["0"]})
        assert "its checkpoint is gone; an earlier sitting's records are read back" in out.read_text()
