"""The claims' rules on small hand-made numbers (both outcomes), the named decodings, and the experiment files the
claims read, built from hand-made probe records."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lwlib import claims
from lwlib.config import load_profile
from lwlib.decodings import PAPER, Decoding, get_decoding, parse_decodings, profile_decodings


def test_spearman_on_known_values():
    assert claims.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert claims.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # one adjacent swap among 5: 1 - 6 * 2 / (5 * 24) = 0.9
    assert claims.spearman([1, 2, 3, 4, 5], [1, 2, 4, 3, 5]) == pytest.approx(0.9)
    assert np.isnan(claims.spearman([1, 2], [1, 2])) and np.isnan(claims.spearman([1, 2, 3], [5, 5, 5]))


def test_rule_a_both_outcomes():
    data = [500, 1000, 2000, 4000, 6000]
    assert claims.rule_a(data, [300, 600, 1100, 2500, 3000])            # rises, 10x
    assert not claims.rule_a(data, [300, 310, 305, 320, 315])           # flat: rho 0.7, ratio ~1
    assert not claims.rule_a(data, [300, 400, 500, 550, 590])           # monotone but less than 2x
    assert not claims.rule_a(data, [3000, 2500, 1100, 600, 300])        # falls
    assert claims.rule_a(data, [300, 600, 1300, 1100, 3000])            # one swap: rho 0.9, still rises


def test_rule_b_c_nll_both_outcomes():
    assert claims.rule_b(1500, 400) and not claims.rule_b(1100, 400)
    assert claims.rule_b(10, 0)  # a general-only p95 of 0 counts as 1 word
    assert claims.rule_c(4.1, 0.5) and not claims.rule_c(4.1, -0.2) and not claims.rule_c(-1.0, -2.0)
    assert claims.rule_nll(3.2, 2.9) and not claims.rule_nll(3.2, 3.4)
    assert not claims.rule_nll(float("nan"), 2.0)


def test_claim_records_compute_reproduced_from_measured():
    a = claims.claim_a({"paper": {"caps": [500, 1000, None], "data_max_words": [500, 1000, 6000],
                                  "p95_words": [5000, 5000, 5000], "p95_effective_words": [300, 280, 310],
                                  "share_stopped": [0, 0, 0]},
                        "loopfree": {"caps": [500, 1000, None], "data_max_words": [500, 1000, 6000],
                                     "p95_words": [480, 950, 4100], "p95_effective_words": [470, 940, 4000],
                                     "share_stopped": [1, 1, 0.9]}}, "loopfree")
    assert a["id"] == "a_length_follows_sft_cap" and a["reproduced"] is True
    assert a["reproduced_by_decoding"] == {"paper": False, "loopfree": True}
    assert "loopfree" in a["rule"] and a["measured"]["loopfree"]["spearman"] == pytest.approx(1.0)
    b = claims.claim_b({"loopfree": {"sft": 900, "sft_general": 400, "sft_agentwrite": 350}}, "loopfree")
    assert b["reproduced"] is False and b["measured"]["p95_effective_words"]["loopfree"]["sft_agentwrite"] == 350
    c = claims.claim_c({"loopfree": {"difference": 3.0, "lo": 0.4, "hi": 5.5},
                        "paper": {"difference": 1.0, "lo": -1.0, "hi": 3.0}}, "loopfree")
    assert c["reproduced"] is True and c["reproduced_by_decoding"]["paper"] is False
    n = claims.claim_nll({"sft": {"at_100": 3.0, "at_end": 3.3}, "base": {"at_100": 3.5, "at_end": 3.4}})
    assert n["reproduced"] is False and n["rule"].startswith("the SFT model")
    table = claims.claims_table([a, b, c, n])
    assert list(table["reproduced"]) == ["yes", "no", "yes", "no"]


def test_nll_points_uses_the_last_well_supported_position():
    from lwlib.nll import cumulative_curve

    # 4 samples: two of 400 tokens, two of 150; the cumulative average of each falls from 4 to ~2
    samples = [list(np.linspace(4, 2, n)) for n in (400, 400, 150, 150)]
    pts = claims.nll_points(cumulative_curve(samples), 4)
    assert pts["end_position"] == 400 and pts["at_end"] < pts["at_100"]
    short = claims.nll_points(cumulative_curve([[1.0] * 50] * 3), 3)  # nothing past position 100
    assert np.isnan(short["at_100"]) and not claims.rule_nll(short["at_100"], short["at_end"])


def test_decodings_from_profiles():
    smoke = profile_decodings(load_profile("smoke"))
    assert [d.name for d in smoke] == ["paper", "loopfree"]
    assert smoke[0] == Decoding("paper", 0.5, note=smoke[0].note) and smoke[1].repetition_penalty > 1
    assert [d.name for d in profile_decodings(load_profile("paper"))] == ["paper"]
    assert [d.name for d in profile_decodings(load_profile("gpu"))] == ["paper", "loopfree"]
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


def _probe_records(tag: str, dec: str, words: list[int], stop: bool) -> pd.DataFrame:
    return pd.DataFrame({"tag": tag, "decoding": dec, "required_length": 1000, "words": words,
                         "effective_words": words, "hit_limit": not stop,
                         "finish_reason": "stop" if stop else "length", "collapsed": False})


def test_experiment_files_feed_the_claims(tmp_path):
    """cap_experiment / arms_comparison write the measurement files that collect_claims reads."""
    from lwlib.experiments import arms_comparison, cap_experiment, plot_arms, plot_cap_experiment

    prof = load_profile("smoke", run_root=tmp_path)
    for folder, top in (("model", 380), ("cap50", 50), ("cap150", 150)):
        d = prof.stage_dir("sft") / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / "data_stats.json").write_text(json.dumps({"data_max_output_words": top, "examples": 10}))
    frames = {}
    for cap, top in ((50, 50), (150, 150), (None, 380)):
        for dec in ("paper", "loopfree"):
            w = [96] * 4 if dec == "paper" else [top // 2, top, top // 3, top]
            frames[(cap, dec)] = _probe_records(f"cap{cap}" if cap else "sft", dec, w, dec == "loopfree")
    table = cap_experiment(prof, frames)
    assert list(table["cap"][:3]) == [50, 150, "none"] and set(table["decoding"]) == {"paper", "loopfree"}
    assert plot_cap_experiment(table, tmp_path / "cap.png", "t").stat().st_size > 5000
    arm_frames = {f"{t} ({d})": _probe_records(t, d, w, True) for t, w in (("sft", [380] * 3), ("sft_general", [90] * 3))
                  for d in ("paper", "loopfree")}
    arms = arms_comparison(prof, arm_frames, {"sft": "general + corpus"})
    assert arms.loc[("loopfree", "sft_general"), "p95 effective words"] == 90
    assert plot_arms(arms, tmp_path / "arms.png", "t").stat().st_size > 5000
    recs = {r["id"]: r for r in claims.collect_claims(prof)}
    assert set(recs) == {"a_length_follows_sft_cap", "b_long_data_lifts_limit"}  # (c), NLL: not measured here
    assert recs["a_length_follows_sft_cap"]["reproduced_by_decoding"] == {"paper": False, "loopfree": True}
    assert recs["b_long_data_lifts_limit"]["reproduced"] is True  # 380 >= 3 x 90
    assert json.loads((prof.run_dir / "claims.json").read_text())[0]["id"] == "a_length_follows_sft_cap"
