"""The paper's claims, measured: one record per claim with what the paper reports, the stated test, the numbers
this run measured and whether the test passed, computed from those numbers by the rule (never typed in).

Claims (ids as in ``claims.json``):

* ``a_length_follows_sft_cap`` (Section 2, the controlled experiment): a model's maximum output length follows the
  longest outputs of its SFT data. Test: under the rule's decoding, the p95 effective output length on
  LongWrite-Ruler rises with the longest output in the SFT data (Spearman rank correlation >= 0.9 over the caps,
  uncapped included) and the longest-data model's p95 is at least twice the shortest-data model's.
* ``b_long_data_lifts_limit`` (Section 4): long-output SFT data lifts the limit several-fold. Test: the p95 effective
  output length of general + long-output data is at least 3x that of general data alone.
* ``c_dpo_improves_length_score`` (Section 4.3): DPO on best-vs-random pairs improves length following. Test:
  LongBench-Write S_l after DPO above before, the paired bootstrap 95% interval of the difference above 0.
* ``nll_falls_with_position`` (Figure 7): on held-out long outputs the cumulative average NLL keeps falling with
  position. Test: the SFT model's cumulative average at the last well-supported position (reached by at least a
  quarter of the samples) is below its value at position 100.

Each rule is evaluated under every decoding measured; ``reproduced`` is the verdict under the rule's decoding (the
loop-free one in the small-model profiles: under the paper's decoding a 135M model loops to the token limit, which
says nothing about what its SFT data taught; the paper decoding's verdict is reported beside it).

Usage::

    records = collect_claims(prof)             # reads the run's files, writes <run>/claims.json
    claims_table(records)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .runs import atomic_write_json

PAPER = {
    "a_length_follows_sft_cap": (
        "Section 2: the same model fine-tuned on SFT data whose outputs are capped at increasing lengths writes "
        "correspondingly longer maximum outputs; a model's maximum output length is bounded by the longest outputs "
        "in its SFT data (GLM-4-9B)."),
    "b_long_data_lifts_limit": (
        "Section 4: fine-tuned on general data plus LongWriter-6k, LongWriter-8B/9B write 10,000+ words on "
        "LongWrite-Ruler, several times the ~2,000 words of the same models without it; the ablation without "
        "LongWriter-6k scores S_l 48.1 against 78.6 (LongBench-Write, lwlib/paper_scores.json)."),
    "c_dpo_improves_length_score": (
        "Section 4.3: DPO on 4 samples per instruction (chosen the best, rejected a random other) raises "
        "LongWriter-9B's LongBench-Write score S from 80.5 to 84.0, in length and quality "
        "(lwlib/paper_scores.json)."),
    "nll_falls_with_position": (
        "Figure 7: on held-out long outputs the cumulative average NLL of the LongWriter models keeps falling with "
        "position out to ~10,000 tokens."),
}
RULES = {
    "a_length_follows_sft_cap": ("p95 effective output length rises with the SFT data's longest output under the "
                                 "{dec} decoding: Spearman rank correlation >= 0.9 over the caps, and the "
                                 "longest-data model's p95 >= 2x the shortest-data model's"),
    "b_long_data_lifts_limit": ("p95 effective output length of general + long-output data >= 3x that of general "
                                "data alone, under the {dec} decoding"),
    "c_dpo_improves_length_score": ("LongBench-Write S_l after DPO above before, the paired bootstrap 95% interval "
                                    "of the difference above 0, under the {dec} decoding"),
    "nll_falls_with_position": ("the SFT model's cumulative average NLL at the last position reached by >= 25% of "
                                "the held-out samples is below its value at position 100"),
}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points or a constant list."""
    if len(x) != len(y):
        raise ValueError("spearman: lists of different lengths")
    if len(x) < 3:
        return float("nan")
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def rule_a(data_max_words: list[float], p95_words: list[float]) -> bool:
    """Claim (a)'s test on one decoding's numbers (see the module docstring)."""
    if len(data_max_words) < 3:
        return False
    order = np.argsort(data_max_words)
    lo, hi = float(p95_words[order[0]]), float(p95_words[order[-1]])
    rho = spearman(data_max_words, p95_words)
    return bool(rho >= 0.9 - 1e-9 and hi >= 2 * max(lo, 1.0))


def rule_b(p95_with_long: float, p95_general_only: float) -> bool:
    """Claim (b)'s test: at least 3x."""
    return bool(p95_with_long >= 3 * max(p95_general_only, 1.0))


def rule_c(difference: float, lo: float) -> bool:
    """Claim (c)'s test: a positive difference whose 95% interval lies above 0."""
    return bool(difference > 0 and lo > 0)


def rule_nll(at_100: float, at_end: float) -> bool:
    """The NLL test: the cumulative average falls from position 100 to the end."""
    return bool(at_end < at_100)


def _record(cid: str, dec: str | None, measured: dict[str, Any], verdicts: dict[str, bool]) -> dict[str, Any]:
    rec = {"id": cid, "paper": PAPER[cid], "rule": RULES[cid].format(dec=dec), "measured": measured}
    rec["reproduced_by_decoding"] = verdicts
    rec["reproduced"] = verdicts.get(dec, False) if dec is not None else verdicts.get("all", False)
    return rec


def claim_a(measured: dict[str, dict[str, list]], rule_decoding: str) -> dict[str, Any]:
    """Claim (a) from ``{decoding: {caps, data_max_words, p95_words, p95_effective_words, share_stopped}}``."""
    verdicts = {d: rule_a(m["data_max_words"], m["p95_effective_words"]) for d, m in measured.items()}
    for d, m in measured.items():
        m["spearman"] = spearman(m["data_max_words"], m["p95_effective_words"])
    return _record("a_length_follows_sft_cap", rule_decoding, measured, verdicts)


def claim_b(measured: dict[str, dict[str, float]], rule_decoding: str, long_arm: str = "sft",
            general_arm: str = "sft_general") -> dict[str, Any]:
    """Claim (b) from ``{decoding: {arm: p95 effective words}}`` (plus any other arms, reported only)."""
    verdicts = {d: rule_b(m[long_arm], m[general_arm]) for d, m in measured.items()}
    return _record("b_long_data_lifts_limit", rule_decoding, {"arms": {"with_long_data": long_arm, "general_only":
                                                                        general_arm}, "p95_effective_words": measured},
                   verdicts)


def claim_c(measured: dict[str, dict[str, Any]], rule_decoding: str) -> dict[str, Any]:
    """Claim (c) from ``{decoding: {before, after, difference, lo, hi, by_bucket}}`` (S_l, LongBench-Write)."""
    verdicts = {d: rule_c(m["difference"], m["lo"]) for d, m in measured.items()}
    return _record("c_dpo_improves_length_score", rule_decoding, measured, verdicts)


def claim_nll(measured: dict[str, dict[str, float]], model: str = "sft") -> dict[str, Any]:
    """The NLL claim from ``{model: {at_100, at_end, end_position, samples}}``."""
    m = measured[model]
    return _record("nll_falls_with_position", None, measured, {"all": rule_nll(m["at_100"], m["at_end"])})


# ------------------------------------------------------------------------------------- from a run folder

def _read(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return json.loads(path.read_text(encoding="utf-8"))


def nll_points(curve: pd.DataFrame, samples: int, position: int = 100, support: float = 0.25) -> dict[str, float]:
    """The cumulative average at ``position`` and at the last position reached by >= ``support`` of the samples
    (``curve``: :func:`lwlib.nll.cumulative_curve`); NaN values where no position past ``position`` is supported."""
    need = max(2, int(np.ceil(support * samples)))
    ok = curve[curve["samples"] >= need]
    if ok.empty or ok["position"].max() <= position:
        return {"at_100": float("nan"), "at_end": float("nan"), "end_position": float("nan"), "samples": samples}
    at = curve.loc[curve["position"] == position, "cum_avg_nll"]
    end = ok.iloc[-1]
    return {"at_100": float(at.iloc[0]), "at_end": float(end["cum_avg_nll"]), "end_position": int(end["position"]),
            "samples": samples}


def collect_claims(prof, rule_decoding: str | None = None) -> list[dict[str, Any]]:
    """The claims whose measurements exist in the run folder (notebooks 03-06 write them), computed by their
    rules; writes ``<run>/claims.json``. ``rule_decoding``: the decoding whose verdict is ``reproduced`` (default:
    ``loopfree`` when the profile has it, else its first)."""
    from .decodings import profile_decodings

    decs = [d.name for d in profile_decodings(prof)]
    dec = rule_decoding or ("loopfree" if "loopfree" in decs else decs[0])
    run = prof.run_dir
    out: list[dict[str, Any]] = []
    missing = []
    try:
        out.append(claim_a(_read(run / "sft" / "cap_experiment.json"), dec))
    except FileNotFoundError as e:
        missing.append(str(e))
    try:
        out.append(claim_b(_read(run / "sft" / "arms.json"), dec))
    except FileNotFoundError as e:
        missing.append(str(e))
    try:
        out.append(claim_c(_read(run / "dpo" / "length_score_difference.json"), dec))
    except FileNotFoundError as e:
        missing.append(str(e))
    try:
        out.append(claim_nll(_read(run / "nll" / "claim.json")))
    except (FileNotFoundError, KeyError) as e:
        missing.append(str(e))
    for m in missing:
        print(f"[claims] not measured in this run: {m}")
    atomic_write_json(run / "claims.json", out)
    return out


def claims_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per claim: the paper's statement, the rule, the verdict per decoding and overall."""
    rows = []
    for r in records:
        by = ", ".join(f"{d}: {'yes' if v else 'no'}" for d, v in r["reproduced_by_decoding"].items())
        rows.append({"claim": r["id"], "paper": r["paper"], "rule": r["rule"], "by decoding": by,
                     "reproduced": "yes" if r["reproduced"] else "no"})
    return pd.DataFrame(rows).set_index("claim")
