"""The claims' rules on small hand-made numbers (both outcomes), the named decodings, and the experiment files the
claims read, built from hand-made probe records."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lwlib import claims
from lwlib.config import load_profile
from lwlib.decodings import PAPER, Decoding, get_decoding, parse_decodings, profile_decodings, rule_decoding


def test_spearman_on_known_values():
    assert claims.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert claims.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # one swap among 5: 1 - 6 * 2 / (5 * 24) = 0.9
    assert claims.spearman([1, 2, 3, 4, 5], [1, 2, 4, 3, 5]) == pytest.approx(0.9)
    assert np.isnan(claims.spearman([1, 2], [1, 2])) and np.isnan(claims.spearman([1, 2, 3], [5, 5, 5]))


def _cap_measured(p95_by_seed, ratio=(10.0, 7.0, 14.0), lower=None, seeds=3, denominator_lb=False):
    """A cap_experiment.json entry of hand-made numbers: caps 500 / 2000 / uncapped."""
    lower = lower or {}
    by = {str(k): {"p95": p, "lower_bound": lower.get(k, [False] * len(p)), "share_censored": [0.0] * len(p),
                   "share_stopped": [1.0] * len(p),
                   "spearman": claims.spearman([500, 2000, 16000], p)} for k, p in p95_by_seed.items()}
    return {"runs": ["cap500", "cap2000", "uncapped"], "caps": [500, 2000, None], "data_max_words": [500, 2000, 16000],
            "seeds": list(p95_by_seed), "expected_seeds": seeds, "prompts": 48, "samples": 2, "by_seed": by,
            "pooled": {}, "ratio_top_over_smallest": {"top": "uncapped", "smallest": "cap500", "value": ratio[0],
                                                      "lo": ratio[1], "hi": ratio[2], "numerator_lower_bound": False,
                                                      "denominator_lower_bound": denominator_lb}}


def test_rule_a_both_outcomes_and_censoring():
    rising = {0: [300, 1500, 4000], 1: [280, 1700, 3900], 2: [310, 1400, 4200]}
    assert claims.rule_a(_cap_measured(rising)) == (True, None)
    flat = {**rising, 2: [310, 4200, 1400]}  # one seed out of order: rho 0.5
    ok, why = claims.rule_a(_cap_measured(flat))
    assert ok is False and "seed(s) 2 (0.50)" in why
    ok, why = claims.rule_a(_cap_measured(rising, ratio=(6.0, 4.2, 9.0)))  # the interval reaches below 5
    assert ok is False and "not above 5" in why
    # two seeds of three: incomplete, whatever the numbers
    assert claims.rule_a(_cap_measured({0: rising[0], 1: rising[1]})) == (None, "incomplete: 2 of 3 seeds measured")
    # a censored denominator, or a censored middle point: inconclusive (a lower bound is not conservative there)
    assert claims.rule_a(_cap_measured(rising, denominator_lb=True))[0] is None
    ok, why = claims.rule_a(_cap_measured(rising, lower={1: [False, True, False]}))
    assert ok is None and "seed 1" in why
    # the uncapped (top) point censored: its lower bound is conservative, the rule stands
    assert claims.rule_a(_cap_measured(rising, lower={0: [False, False, True]})) == (True, None)


def test_best_spearman_of_runs_not_measured_yet():
    from lwlib.intervals import best_spearman

    # the gpu profile's seed 0 after four of six runs: both missing runs on top at best, 1 - 6 * 6 / (6 * 35)
    assert best_spearman([833, 6987, 6430, 6754, None, None]) == pytest.approx(1 - 36 / 210)
    assert best_spearman([300, 1500, None]) == pytest.approx(1.0)  # still reachable
    assert best_spearman([300, None, 200]) == pytest.approx(-0.5)  # the middle anywhere: never above -0.5
    assert best_spearman([300, 1500, 4000]) == pytest.approx(1.0) and best_spearman([1, 3, 2]) == pytest.approx(0.5)
    assert best_spearman([None, None, 5.0, None]) == pytest.approx(1.0)


def test_rule_a_says_when_a_seed_cannot_reach_the_rule():
    """Incomplete stays incomplete (the design's seeds), and says so when a seed's Spearman cannot reach 0.9 whatever
    its runs left give."""
    m = _cap_measured({0: [833, 6987, 6430]})
    m["by_seed"]["0"]["spearman_best"] = 0.83
    assert claims.rule_a(m) == (None, "incomplete: 1 of 3 seeds measured; cannot pass: Spearman at most 0.83 in seed "
                                      "0 whatever the runs left give")
    m["by_seed"]["0"]["spearman_best"] = 1.0
    assert claims.rule_a(m) == (None, "incomplete: 1 of 3 seeds measured")
    m["by_seed"]["0"]["spearman_best"] = None  # (a censored middle point: not known)
    assert claims.rule_a(m) == (None, "incomplete: 1 of 3 seeds measured")


def _arms_measured(long_p95=(12000, 11000, 13000), general_p95=(900, 950, 1000), ratio=(12.0, 8.0, 15.0),
                   follow=(0.6, 0.3, 0.8), seeds=3, lb=False):
    by = {str(k): {"sft": {"p95": lp, "lower_bound": lb}, "sft_general": {"p95": gp, "lower_bound": False}}
          for k, (lp, gp) in enumerate(zip(long_p95, general_p95))}
    return {"arms": ["sft", "sft_general"], "long_arm": "sft", "general_arm": "sft_general",
            "seeds": list(range(len(long_p95))), "expected_seeds": seeds, "by_seed": by,
            "pooled": {a: {"p95": 1.0, "lower_bound": False, "share_stopped": 1.0} for a in ("sft", "sft_general")},
            "ratio_long_over_general": {"value": ratio[0], "lo": ratio[1], "hi": ratio[2],
                                        "numerator_lower_bound": lb, "denominator_lower_bound": False},
            "length_following": {"spearman": follow[0], "lo": follow[1], "hi": follow[2],
                                 "spearman_by_seed": {"0": follow[0]}}}


def test_rules_b_h_d_both_outcomes():
    assert claims.rule_b(_arms_measured()) == (True, None)
    assert claims.rule_b(_arms_measured(ratio=(3.5, 1.9, 5.0)))[0] is False   # interval reaches below 2
    assert claims.rule_b(_arms_measured(ratio=(2.8, 2.2, 3.3)))[0] is False   # below 3x
    m = _arms_measured()
    m["ratio_long_over_general"]["denominator_lower_bound"] = True
    assert claims.rule_b(m)[0] is None
    assert claims.rule_h(_arms_measured()) == (True, None)
    ok, why = claims.rule_h(_arms_measured(long_p95=(12000, 9000, 13000)))
    assert ok is False and "seed(s) 1 (9,000)" in why
    assert claims.rule_h(_arms_measured(long_p95=(12000, 11000))) == (None, "incomplete: 2 of 3 seeds measured")
    assert claims.rule_h(_arms_measured(lb=True))[0] is True  # >= 11,000: a lower bound above 10,000 counts
    assert claims.rule_d(_arms_measured()) == (True, None)
    assert claims.rule_d(_arms_measured(follow=(0.45, 0.2, 0.6)))[0] is False
    assert claims.rule_d(_arms_measured(follow=(0.55, -0.1, 0.9)))[0] is False


def test_rules_c_and_nll_both_outcomes():
    c = {"before": 30.0, "after": 34.1, "difference": 4.1, "lo": 0.5, "hi": 7.0, "items": 120}
    assert claims.rule_c(c) == (True, None) and claims.rule_c({**c, "lo": -0.2})[0] is False
    assert claims.rule_c({**c, "seeds": [0], "expected_seeds": 3})[0] is None
    three = {**c, "seeds": [0, 1, 2], "expected_seeds": 3, "samples_per_item": 2,
             "by_seed": {"0": 5.0, "1": 2.5, "2": 4.8}}
    assert claims.rule_c(three) == (True, None)
    assert claims.summary_c(three) == ("S_l 30.0 -> 34.1: +4.1 [+0.5, +7.0] (120 items x 2 samples, seeds [0, 1, 2]; "
                                       "per seed 0: +5.0, 1: +2.5, 2: +4.8)")
    n = {"change": -0.12, "lo": -0.2, "hi": -0.05}
    assert claims.rule_nll(n) == (True, None) and claims.rule_nll({**n, "hi": 0.01})[0] is False
    assert claims.rule_nll(None)[0] is None


def test_claim_records_compute_reproduced_from_measured():
    rising = {0: [300, 1500, 4000], 1: [280, 1700, 3900], 2: [310, 1400, 4200]}
    a = claims.claim_a({"loopfree": _cap_measured(rising), "paper": _cap_measured(rising, ratio=(1.1, 0.9, 1.3))},
                       "loopfree")
    assert a["reproduced"] is True and a["reproduced_by_decoding"] == {"loopfree": True, "paper": False}
    assert "loopfree" in a["rule"] and "10.0x [7.0, 14.0]" in a["summary"] and a["why"] is None
    h = claims.claim_arms("h_10000_words", {"loopfree": _arms_measured(long_p95=(12000, 9000, 13000))}, "loopfree")
    assert h["reproduced"] is False and "9,000" in h["why"] and "sft:" in h["summary"]
    missing = claims.claim_arms("b_long_data_lifts_limit", {"paper": _arms_measured()}, "loopfree")
    assert missing["reproduced"] is None and "loopfree" in missing["why"]
    table = claims.claims_table([a, h, missing])
    assert list(table["reproduced"]) == ["yes", "no", "incomplete"]


def test_decodings_from_profiles():
    smoke = profile_decodings(load_profile("smoke"))
    assert [d.name for d in smoke] == ["paper", "loopfree"]
    assert smoke[0] == Decoding("paper", 0.5, note=smoke[0].note) and smoke[1].repetition_penalty > 1
    assert [d.name for d in profile_decodings(load_profile("paper"))] == ["paper"]
    assert [d.name for d in profile_decodings(load_profile("gpu"))] == ["loopfree", "paper"]
    assert rule_decoding(load_profile("gpu")) == "loopfree" and rule_decoding(load_profile("paper")) == "paper"
    capped = get_decoding(load_profile("gpu"), "paper")  # the paper decoding's own budget, below the stage's
    assert capped.params(24576).max_new_tokens == 4096 and capped.params(1000).max_new_tokens == 1000
    assert "max_new_tokens" not in smoke[0].as_dict()  # (unset: earlier stores keep their fingerprint)
    p = smoke[1].params(128, seed=3)
    assert (p.max_new_tokens, p.temperature, p.repetition_penalty, p.repetition_window, p.seed) == \
        (128, 0.5, smoke[1].repetition_penalty, smoke[1].repetition_window, 3)
    assert parse_decodings(None) == [PAPER]
    assert get_decoding(load_profile("smoke"), "loopfree") is not None
    with pytest.raises(ValueError, match="no decoding 'greedy'"):
        get_decoding(load_profile("smoke"), "greedy")
    with pytest.raises(ValueError, match="unique"):
        parse_decodings([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match=r"decodings\[0\].*unknown field"):
        parse_decodings([{"name": "a", "temprature": 0.5}])
    with pytest.raises(ValueError, match="letters, digits"):
        Decoding("a b")




def _probe(tag: str, dec: str, words: list[float], required: list[int], hit=None, collapsed=None) -> pd.DataFrame:
    """Probe records of one model: prompt i answered twice (samples 0, 1) with ``words[2i]``, ``words[2i + 1]``."""
    n = len(words)
    hit = hit if hit is not None else [False] * n
    return pd.DataFrame({"id": [f"p{i // 2}-s{i % 2}" for i in range(n)], "sample": [i % 2 for i in range(n)],
                         "tag": tag, "decoding": dec, "required_length": [required[i // 2] for i in range(n)],
                         "words": words, "effective_words": words, "hit_limit": hit,
                         "finish_reason": ["length" if h else "stop" for h in hit],
                         "collapsed": collapsed if collapsed is not None else [False] * n})


def test_experiment_files_feed_the_claims(tmp_path):
    """Seeds x caps x arms of hand-made probe records -> cap_experiment.json / arms.json -> the claims, figures."""
    from lwlib.experiments import arms_experiment, cap_experiment, plot_arms, plot_cap_experiment
    from lwlib.models import seed_tag, sft_folder

    prof = load_profile("smoke", run_root=tmp_path, overrides={"sft.seeds": 2})
    rng = np.random.default_rng(0)
    required = [1000, 2000, 5000, 10000, 20000, 30000] * 4  # 24 prompts
    sizes = {"cap50": 60, "cap150": 170, "uncapped": 900, "sft": 12000, "sft_general": 700}
    frames = {}
    for base, top in sizes.items():
        (lambda d: (d.mkdir(parents=True, exist_ok=True),
                    (d / "data_stats.json").write_text(json.dumps({"data_max_output_words": top})))
         )(sft_folder(prof.run_dir, base).parent)
        for k in range(2):
            tag = seed_tag(base, k)
            for dec in ("loopfree", "paper"):
                w = rng.uniform(0.3, 1.0, 48) * top * (1 if dec == "loopfree" else 0.05) + 5
                if base == "sft" and dec == "loopfree":  # follows the required length
                    w = np.repeat(np.array(required, float), 2) * rng.uniform(0.4, 0.6, 48)
                frames[f"{tag} ({dec})"] = _probe(tag, dec, list(w), required)
    table = cap_experiment(prof, frames, n_boot=200)
    m = json.loads((prof.run_dir / "sft" / "cap_experiment.json").read_text())["loopfree"]
    assert m["runs"] == ["cap50", "cap150", "uncapped"] and m["seeds"] == [0, 1]
    assert m["data_max_words"] == [60, 170, 900] and m["by_seed"]["0"]["spearman"] == pytest.approx(1.0)
    r = m["ratio_top_over_smallest"]
    assert r["lo"] < r["value"] < r["hi"] and r["value"] > 5 and set(table["seed"]) == {0, 1}
    # smoke designs an uncapped run (sft.cap_uncapped): before it is measured, (a)'s top point is the largest cap,
    # never the main run, which holds general data that (a)'s arms do not
    early = {k: v for k, v in frames.items() if not k.startswith("uncapped")}
    cap_experiment(prof, early, n_boot=50)
    assert json.loads((prof.run_dir / "sft" / "cap_experiment.json").read_text())["loopfree"]["runs"] == [
        "cap50", "cap150"]
    cap_experiment(prof, frames, n_boot=200)
    arms = arms_experiment(prof, frames, n_boot=200)
    b = json.loads((prof.run_dir / "sft" / "arms.json").read_text())["loopfree"]
    assert b["arms"] == ["sft", "sft_general"] and b["ratio_long_over_general"]["value"] > 3
    assert b["length_following"]["spearman"] > 0.9 and b["length_following"]["lo"] > 0.5
    assert set(arms["arm"]) == {"sft", "sft_general"}
    for plot, name in ((plot_cap_experiment, "cap.png"), (plot_arms, "arms.png")):
        args = (prof, frames, "loopfree") + (({"sft": "general + long"},) if plot is plot_arms else ())
        assert plot(*args, tmp_path / name, "t").stat().st_size > 5000
    recs = {r["id"]: r for r in claims.collect_claims(prof)}
    assert recs["a_length_follows_sft_cap"]["reproduced_by_decoding"]["loopfree"] is True
    assert recs["b_long_data_lifts_limit"]["reproduced"] is True
    assert recs["h_10000_words"]["reproduced"] is True  # p95 about 0.5 x 30,000 (the longest prompts)
    assert recs["d_length_follows_instruction"]["reproduced"] is True
    assert recs["c_dpo_improves_length_score"]["reproduced"] is None  # not measured: says which notebook
    assert "04_dpo.ipynb" in recs["c_dpo_improves_length_score"]["why"]
    assert json.loads((prof.run_dir / "claims.json").read_text())[0]["id"] == "a_length_follows_sft_cap"


def test_claims_h_and_d_need_only_the_long_arms_seeds(tmp_path):
    """With every seed of sft but one of sft_general, (h) and (d) have verdicts over sft's 3 seeds; (b), which pairs
    the two arms, stays incomplete at the 1 seed they share."""
    from lwlib.experiments import arms_experiment
    from lwlib.models import seed_tag

    prof = load_profile("smoke", run_root=tmp_path, overrides={"sft.seeds": 3})
    rng = np.random.default_rng(1)
    required = [1000, 2000, 5000, 10000, 20000, 30000] * 4
    frames = {}
    for tag, seeds in (("sft", 3), ("sft_general", 1)):
        for k in range(seeds):
            w = (np.repeat(np.array(required, float), 2) * rng.uniform(0.4, 0.6, 48) if tag == "sft"
                 else rng.uniform(300, 700, 48))
            frames[f"{seed_tag(tag, k)} (loopfree)"] = _probe(seed_tag(tag, k), "loopfree", list(w), required)
    arms_experiment(prof, frames, n_boot=100)
    m = json.loads((prof.run_dir / "sft" / "arms.json").read_text())["loopfree"]
    assert m["seeds"] == [0] and m["long_arm_seeds"] == [0, 1, 2]
    assert set(m["by_seed"]) == {"0", "1", "2"} and "sft_general" not in m["by_seed"]["2"]
    assert len(m["length_following"]["spearman_by_seed"]) == 3
    assert claims.rule_b(m) == (None, "incomplete: 1 of 3 seeds measured")
    assert claims.rule_h(m) == (True, None) and claims.rule_d(m) == (True, None)
    # the figure marks each arm's own seeds (notebook 03 of the gpu run's 4th sitting stopped here: KeyError)
    from lwlib.experiments import plot_arms

    assert plot_arms(prof, frames, "loopfree", {}, tmp_path / "arms.png", "t").stat().st_size > 5000
    assert "sft_general: p95 by seed " in claims.summary_arms(m) and "seeds 0 pooled" in claims.summary_arms(m)


def test_censored_outputs_make_the_p95_a_lower_bound(tmp_path):
    from lwlib.intervals import censored_quantile, is_censored

    df = _probe("sft", "loopfree", [100.0] * 36 + [5000.0] * 4, [1000] * 20,
                hit=[False] * 36 + [True] * 4, collapsed=[False] * 36 + [True, False, False, False])
    assert list(is_censored(df)) == [False] * 37 + [True] * 3  # a loop at the limit is not censored
    p, lb, share = censored_quantile(df["effective_words"], is_censored(df))
    assert lb and share == pytest.approx(0.075)  # 3 of 40 >= 5%
    assert censored_quantile(df["effective_words"][:38], is_censored(df)[:38])[1] is False  # 1 of 38


def test_two_level_bootstrap_pairs_arms_and_resamples_seeds():
    from lwlib.intervals import bootstrap, cells

    req = [1000, 5000, 10000]
    a = {k: _probe("a", "x", [100.0 + k] * 6, req) for k in range(3)}
    b = {k: _probe("b", "x", [200.0 + 2 * k] * 6, req) for k in range(3)}
    c = cells({"a": a, "b": b})
    assert c.words["a"].shape == (3, 3, 2) and list(c.required) == [1000, 5000, 10000]
    # b = 2 a in every cell: the ratio is 2 in every resample (seeds and prompts are drawn for both arms alike)
    lo, hi = bootstrap(c, lambda v, r: v["b"][0].mean() / v["a"][0].mean(), n_boot=300)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    lo, hi = bootstrap(c, lambda v, r: v["a"][0].mean(), n_boot=300)  # seeds differ: the interval spans them
    assert 100 <= lo < hi <= 102
    with pytest.raises(ValueError, match="no seed is shared"):
        cells({"a": {0: a[0]}, "b": {1: b[1]}})


def test_nll_points_and_long_context_change():
    from lwlib.experiments import long_context_change, nll_points
    from lwlib.nll import cumulative_curve

    samples = [list(np.linspace(4, 2, n)) for n in (400, 400, 150, 150)]
    pts = nll_points(cumulative_curve(samples), 4)
    assert pts["end_position"] == 400 and pts["at_end"] < pts["at_100"]
    short = nll_points(cumulative_curve([[1.0] * 50] * 3), 3)  # nothing past position 100
    assert np.isnan(short["at_100"])
    # the long model gains with position (its NLL falls after 500), the short one stays flat: the change is < 0
    ids = [f"d{i}" for i in range(20)]
    flat = pd.DataFrame({"id": ids, "nll": [[3.0] * 2000 for _ in ids]})
    falling = pd.DataFrame({"id": ids, "nll": [[3.0] * 500 + list(np.linspace(3.0, 2.0 + 0.01 * i, 1500))
                                               for i in range(20)]})
    lc = long_context_change([falling], [flat])
    assert lc["end_position"] == 2000 and lc["difference_at_500"] == pytest.approx(0.0)
    assert lc["change"] < 0 and lc["hi"] < 0 and claims.rule_nll(lc)[0] is True
    assert long_context_change([flat], [flat])["change"] == pytest.approx(0.0)
    assert long_context_change([falling.iloc[:0]], [flat]) is None
