"""The claims table a reader sees (lwlib.claims_view): numbers formatted, nothing cut short, the summary preferred,
three verdicts, the banner of a profile too small for verdicts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lwlib.claims_view import ClaimsTable, banner_text, fmt_number, format_measured, summary_line
from lwlib.config import load_profile

ROOT = Path(__file__).resolve().parents[1]
LONG = "Section 2: " + "a statement the paper makes at some length, " * 8 + "the end."


@pytest.mark.parametrize("x, text", [(77.64999999999999, "77.6"), (1768.3, "1,768"), (12345, "12,345"), (0.8996, "0.9"),
                                     (-2.47, "-2.47"), (0.006, "0.006"), (3.0, "3"), (3.996, "4.00"), (float("nan"), "n/a"),
                                     (None, "none"), (True, "yes"), ("sft", "sft")])
def test_numbers_read_without_float_noise(x, text):
    assert fmt_number(x) == text


def test_measured_nested_is_written_out_in_full():
    measured = {"loopfree": {"caps": [500, 1000, None], "p95_effective_words": [351.2, 401.0, 894.4],
                             "spearman": 0.8999999999999999},
                "by_bucket": {"[0,500)": {"n": 13, "difference": -3.6149999, "lo": -14.1}},
                "seeds": [{"seed": 0, "p95": 880.5}, {"seed": 1, "p95": 901.25}]}
    assert format_measured(measured).splitlines() == [
        "loopfree:", "  caps: 500 / 1,000 / none", "  p95_effective_words: 351 / 401 / 894", "  spearman: 0.9",
        "by_bucket:", "  [0,500): n=13, difference=-3.61, lo=-14.1",
        "seeds:", "  - seed: 0", "    p95: 880", "  - seed: 1", "    p95: 901"]


def test_table_prefers_the_summary_and_has_three_verdicts():
    recs = [{"id": "a_caps", "paper": LONG, "rule": "rho >= 0.9", "measured": {"x": 1.23456},
             "summary": "p95 351 / 401 / 894 words [95% CI 300-420]\nSpearman 0.90", "reproduced": True,
             "reproduced_by_decoding": {"loopfree": True, "paper": False}},
            {"id": "b_arms", "paper": "b", "rule": "3x", "measured": {"ratio": 1.8399999}, "reproduced": False,
             "why": "1.8x, not 3x"},
            {"id": "c_dpo", "paper": "c", "rule": "CI > 0", "measured": None, "reproduced": None,
             "why": "one seed only: not measured enough to decide"}]
    table = ClaimsTable(recs)
    rows = table.rows()
    assert rows[0]["measured"] == "p95 351 / 401 / 894 words [95% CI 300-420]\nSpearman 0.90"  # as given
    assert rows[1]["measured"] == "ratio: 1.84" and rows[2]["measured"] == "none"
    assert [r["verdict"] for r in rows] == ["reproduced", "not reproduced", "incomplete"]
    assert rows[0]["details"] == "loopfree: reproduced, paper: not reproduced" and rows[1]["details"] == "1.8x, not 3x"
    assert summary_line(recs) == "1 of 3 claims reproduced, 1 not reproduced, 1 incomplete"
    page, text = table._repr_html_(), str(table)
    for out in (page, text):
        assert "the end." in out and "..." not in out and "1.2345" not in out  # nothing cut, no raw measured
        assert "one seed only" in out and "incomplete" in out.lower()
    assert page.count("<tr>") == 4 and "Spearman 0.90" in page
    assert "A_CAPS: REPRODUCED" in text.upper() and banner_text(None) is None


def test_smoke_profile_shows_the_banner_and_gpu_does_not():
    smoke, gpu = load_profile("smoke"), load_profile("gpu")
    assert smoke.too_small_for_verdicts and not gpu.too_small_for_verdicts
    for shown in (ClaimsTable([], profile=smoke), ClaimsTable([], profile=smoke.resolved())):
        assert "Profile smoke is far too small for these verdicts" in shown.to_html()
        assert "Profile smoke is far too small" in str(shown) and "No claim measured" in str(shown)
    assert ClaimsTable([], profile=gpu).banner is None


def test_the_committed_gpu_claims_render():
    recs = json.loads((ROOT / "results" / "gpu" / "claims.json").read_text())
    text = str(ClaimsTable(recs))
    assert sum(text.count(f": {v}") for v in ("REPRODUCED", "NOT REPRODUCED", "INCOMPLETE")) == len(recs)
    assert re.search(r"\d\.\d{5,}", text) is None and "..." not in text  # no float noise, nothing cut
