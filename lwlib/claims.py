"""The paper's claims, measured: one record per claim with what the paper reports, the rule fixed before the run,
the numbers this run measured (per decoding, arm and seed, with intervals and censoring) and the verdict, computed
from those numbers by the rule (never typed in).

Claims (ids as in ``claims.json``); thresholds are the module's constants, the rules' numbers come from
:mod:`lwlib.experiments` (seeds-and-prompts bootstrap intervals, censored quantiles: :mod:`lwlib.intervals`):

* ``a_length_follows_sft_cap`` (Section 2, the controlled experiment): the p95 effective output length on
  LongWrite-Ruler rises with the longest output of the SFT data (Spearman >= 0.9 over the caps in every seed), and
  the uncapped run's p95 is at least 5x the smallest cap's (the bootstrap interval's lower bound above 5).
* ``b_long_data_lifts_limit`` (Section 4): general + long-output data over general data alone >= 3x at p95, the
  interval's lower bound above 2.
* ``h_10000_words`` (the title): the general + long model's p95 effective length >= 10,000 words in every seed
  (an output still writing at the token limit counts as the lower bound it is; loops never count), the general-only
  model's beside it.
* ``d_length_follows_instruction`` (Figure 1's shape after training): the general + long model's output lengths
  rise with the required lengths: Spearman over outputs >= 0.5, its interval above 0.
* ``c_dpo_improves_length_score`` (Section 4.3): LongBench-Write S_l after DPO above before, the paired bootstrap
  interval of the difference above 0.
* ``nll_long_context_helps`` (Figure 7): the long model's cumulative average NLL minus the cap-500 model's is
  lower at the end position than at position 500 (the interval of that change below 0).

A censored p95 (>= 5% of outputs still writing at the token limit) is only a lower bound, used where that is
conservative (a claimed minimum, a ratio's numerator); where it is not (a denominator, a middle point of a rank
correlation) the claim is inconclusive. ``reproduced`` is True or False under the rule's decoding, or None when
the run lacks what the rule needs (seeds, arms, an uncensored number): ``why`` then says what. Every record has a
``summary``: its numbers as a reader sees them.

Usage::

    records = collect_claims(prof)             # reads the run's files, writes <run>/claims.json
    claims_table(records)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from .intervals import fmt_words
from .intervals import spearman as spearman
from .runs import atomic_write_json

SPEARMAN_MIN = 0.9       # (a) per seed
CAP_RATIO_LO = 5.0       # (a) uncapped / smallest cap: point and interval's lower bound
ARMS_RATIO = 3.0         # (b) general + long / general alone: the point
ARMS_RATIO_LO = 2.0      # (b) the interval's lower bound
TITLE_WORDS = 10000      # (h)
FOLLOW_SPEARMAN = 0.5    # (d)

PAPER = {
    "a_length_follows_sft_cap": (
        "Section 2: the same model fine-tuned on SFT data whose outputs are capped at increasing lengths writes "
        "correspondingly longer maximum outputs; a model's maximum output length is bounded by the longest outputs "
        "in its SFT data (GLM-4-9B)."),
    "b_long_data_lifts_limit": (
        "Section 4: fine-tuned on general data plus LongWriter-6k, LongWriter-8B/9B write 10,000+ words on "
        "LongWrite-Ruler, several times the ~2,000 words of the same models without it; the ablation without "
        "LongWriter-6k scores S_l 48.1 against 78.6 (LongBench-Write, lwlib/paper_scores.json)."),
    "h_10000_words": (
        "Title and abstract: the LongWriter models generate coherent outputs of over 10,000 words."),
    "d_length_follows_instruction": (
        "Figure 1 and Section 4: after training on LongWriter-6k the output length follows the required length on "
        "LongWrite-Ruler up to ~10,000 words, where the base models flatten near 2,000."),
    "c_dpo_improves_length_score": (
        "Section 4.3: DPO on 4 samples per instruction (chosen the best, rejected a random other) raises "
        "LongWriter-9B's LongBench-Write score S from 80.5 to 84.0, in length and quality "
        "(lwlib/paper_scores.json)."),
    "nll_long_context_helps": (
        "Figure 7: on held-out long outputs the cumulative average NLL of the LongWriter models keeps falling with "
        "position out to ~10,000 tokens: the long context they have written helps them predict what follows."),
}
RULES = {
    "a_length_follows_sft_cap": (f"under the {{dec}} decoding: the p95 effective output length rises with the SFT "
                                 f"data's longest output, Spearman >= {SPEARMAN_MIN} over the caps in every seed; "
                                 f"the uncapped run's p95 >= {CAP_RATIO_LO:g}x the smallest cap's, the 95% interval's "
                                 f"lower bound above {CAP_RATIO_LO:g}"),
    "b_long_data_lifts_limit": (f"under the {{dec}} decoding: p95 effective output length of general + long-output "
                                f"data >= {ARMS_RATIO:g}x that of general data alone, the 95% interval's lower bound "
                                f"above {ARMS_RATIO_LO:g}"),
    "h_10000_words": (f"under the {{dec}} decoding: the general + long-output model's p95 effective output length "
                      f">= {TITLE_WORDS:,} words in every seed (censored outputs count as lower bounds, loops never "
                      "count)"),
    "d_length_follows_instruction": (f"under the {{dec}} decoding: Spearman correlation of the general + long-output "
                                     f"model's effective output length with the required length over its outputs "
                                     f">= {FOLLOW_SPEARMAN}, the 95% interval above 0"),
    "c_dpo_improves_length_score": ("under the {dec} decoding: LongBench-Write S_l after DPO above before, the paired "
                                    "bootstrap 95% interval of the difference above 0"),
    "nll_long_context_helps": ("the long-output model's cumulative average NLL minus the cap-500 model's is lower at "
                               "the end position than at position 500 on held-out passages that all reach the end "
                               "(the 95% interval of the change below 0)"),
}


# ---------------------------------------------------------------------------------------------- the rules

def _seeds_missing(m: dict[str, Any], key: str = "seeds") -> str | None:
    have, want = len(m.get(key, m.get("seeds", []))), int(m.get("expected_seeds", 1))
    return f"incomplete: {have} of {want} seeds measured" if have < want else None


def rule_a(m: dict[str, Any]) -> tuple[bool | None, str | None]:
    """Claim (a) on one decoding's ``cap_experiment.json`` entry: ``(verdict, why)``. Incomplete until every seed is
    measured; a seed whose Spearman cannot reach the rule whatever its runs left give (``spearman_best``) is said."""
    short = {k: v["spearman_best"] for k, v in m["by_seed"].items()
             if v.get("spearman_best") is not None and not v["spearman_best"] >= SPEARMAN_MIN}
    cannot = ("; cannot pass: Spearman at most " + ", ".join(f"{b:.2f} in seed {k}" for k, b in short.items())
              + " whatever the runs left give") if short else ""
    if (why := _seeds_missing(m)):
        return None, why + cannot
    r = m["ratio_top_over_smallest"]
    if r["denominator_lower_bound"]:
        return None, f"inconclusive: the smallest cap's p95 ({r['smallest']}) is censored"
    for k, v in m["by_seed"].items():
        if any(v["lower_bound"][:-1]):
            return None, f"inconclusive: a capped run's p95 is censored in seed {k}"
    low = {k: v["spearman"] for k, v in m["by_seed"].items() if not v["spearman"] >= SPEARMAN_MIN}
    fails = []
    if low:
        fails.append("Spearman below " + f"{SPEARMAN_MIN} in seed(s) "
                     + ", ".join(f"{k} ({v:.2f})" for k, v in low.items()))
    if not (r["value"] >= CAP_RATIO_LO and r["lo"] > CAP_RATIO_LO):
        fails.append(f"ratio {r['value']:.1f}x [{r['lo']:.1f}, {r['hi']:.1f}] not above {CAP_RATIO_LO:g}")
    return (not fails), ("; ".join(fails) or None)


def rule_b(m: dict[str, Any]) -> tuple[bool | None, str | None]:
    """Claim (b) on one decoding's ``arms.json`` entry."""
    if (why := _seeds_missing(m)):
        return None, why
    r = m.get("ratio_long_over_general")
    if r is None:
        return None, f"not measured: no {m.get('general_arm')} arm"
    if r["denominator_lower_bound"]:
        return None, "inconclusive: the general-only model's p95 is censored"
    ok = r["value"] >= ARMS_RATIO and r["lo"] > ARMS_RATIO_LO
    return ok, None if ok else (f"ratio {r['value']:.2f}x [{r['lo']:.2f}, {r['hi']:.2f}]: needs >= {ARMS_RATIO:g}x "
                                f"with the lower bound above {ARMS_RATIO_LO:g}")


def rule_h(m: dict[str, Any]) -> tuple[bool | None, str | None]:
    """Claim (h) on one decoding's ``arms.json`` entry."""
    if (why := _seeds_missing(m, "long_arm_seeds")):  # (the long arm alone: no other arm needed)
        return None, why
    long = {k: v[m["long_arm"]]["p95"] for k, v in m["by_seed"].items() if m["long_arm"] in v}
    short = {k: p for k, p in long.items() if not p >= TITLE_WORDS}
    if not short:
        return True, None
    return False, "p95 below 10,000 words in seed(s) " + ", ".join(f"{k} ({fmt_words(p)})" for k, p in short.items())


def rule_d(m: dict[str, Any]) -> tuple[bool | None, str | None]:
    """Claim (d) on one decoding's ``arms.json`` entry."""
    if (why := _seeds_missing(m, "long_arm_seeds")):  # (the long arm alone: no other arm needed)
        return None, why
    f = m["length_following"]
    ok = f["spearman"] >= FOLLOW_SPEARMAN and f["lo"] > 0
    return ok, None if ok else (f"Spearman {f['spearman']:.2f} [{f['lo']:.2f}, {f['hi']:.2f}]: needs >= "
                                f"{FOLLOW_SPEARMAN} with the interval above 0")


def rule_c(m: dict[str, Any]) -> tuple[bool | None, str | None]:
    """Claim (c) on one decoding's ``length_score_difference.json`` entry."""
    if (why := _seeds_missing(m)) and "seeds" in m:
        return None, why
    ok = m["difference"] > 0 and m["lo"] > 0
    return ok, None if ok else (f"S_l {m['before']:.1f} -> {m['after']:.1f}, difference {m['difference']:+.1f} "
                                f"[{m['lo']:+.1f}, {m['hi']:+.1f}]: the interval is not above 0")


def rule_nll(m: dict[str, Any]) -> tuple[bool | None, str | None]:
    """The NLL claim on ``nll/claim.json``'s ``long_context`` entry."""
    if m is None:
        return None, "not measured: the run has no long-output and cap-500 models' NLL on the same passages"
    ok = m["change"] < 0 and m["hi"] < 0
    return ok, None if ok else (f"change {m['change']:+.3f} [{m['lo']:+.3f}, {m['hi']:+.3f}] nats: the interval "
                                "is not below 0")


# ---------------------------------------------------------------------------------------------- summaries

def _ci(v: float, lo: float, hi: float, digits: int = 1, unit: str = "") -> str:
    return f"{v:.{digits}f}{unit} [{lo:.{digits}f}, {hi:.{digits}f}]"


def summary_a(m: dict[str, Any]) -> str:
    lines = []
    runs = m["runs"]
    for k, v in m["by_seed"].items():
        vals = ", ".join(f"{fmt_words(p, lb)}" for p, lb in zip(v["p95"], v["lower_bound"]))
        lines.append(f"seed {k}: p95 {vals} (Spearman {v['spearman']:.2f})")
    r = m["ratio_top_over_smallest"]
    lines.insert(0, "runs " + " / ".join(runs) + " (data max " + " / ".join(f"{w:,.0f}" for w in m["data_max_words"])
                 + " words)")
    lines.append(f"{r['top']} / {r['smallest']}: {'>= ' if r['numerator_lower_bound'] else ''}"
                 + _ci(r["value"], r["lo"], r["hi"], 1, "x"))
    return "\n".join(lines)


def summary_arms(m: dict[str, Any]) -> str:
    lines = []
    for a in m["arms"]:
        per = ", ".join(fmt_words(v[a]["p95"], v[a]["lower_bound"]) for v in m["by_seed"].values() if a in v)
        lines.append(f"{a}: p95 by seed {per}; seeds {', '.join(map(str, m['seeds']))} pooled "
                     f"{fmt_words(m['pooled'][a]['p95'], m['pooled'][a]['lower_bound'])}"
                     f" ({m['pooled'][a]['share_stopped']:.0%} stopped)")
    r = m.get("ratio_long_over_general")
    if r:
        lines.append(f"{m['long_arm']} / {m['general_arm']}: {'>= ' if r['numerator_lower_bound'] else ''}"
                     + _ci(r["value"], r["lo"], r["hi"], 2, "x"))
    f = m["length_following"]
    lines.append(f"{m['long_arm']}: Spearman(required, output) " + _ci(f["spearman"], f["lo"], f["hi"], 2)
                 + " (by seed " + ", ".join(f"{x:.2f}" for x in f["spearman_by_seed"].values()) + ")")
    return "\n".join(lines)


def summary_c(m: dict[str, Any]) -> str:
    per_seed = ""
    if len(m.get("by_seed", {})) > 1:
        per_seed = "; per seed " + ", ".join(f"{k}: {v:+.1f}" for k, v in m["by_seed"].items())
    samples = f" x {m['samples_per_item']} samples" if m.get("samples_per_item", 1) > 1 else ""
    return (f"S_l {m['before']:.1f} -> {m['after']:.1f}: {m['difference']:+.1f} [{m['lo']:+.1f}, {m['hi']:+.1f}] "
            f"({m['items']} items{samples}{', seeds ' + str(m['seeds']) if 'seeds' in m else ''}{per_seed})")


def summary_nll(m: dict[str, Any] | None, curves: dict[str, Any]) -> str:
    lines = [f"{t}: {v['at_100']:.3f} at 100 -> {v['at_end']:.3f} at {v['end_position']}" for t, v in curves.items()
             if isinstance(v, dict) and "at_100" in v and v["at_100"] == v["at_100"]]
    if m:
        lines.append(f"{m['long']} - {m['short']}: {m['difference_at_500']:+.3f} at 500, {m['difference_at_end']:+.3f}"
                     f" at {m['end_position']}; change " + _ci(m["change"], m["lo"], m["hi"], 3)
                     + f" ({m['samples']} passages)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ records

def _record(cid: str, dec: str | None, measured: dict[str, Any], verdicts: dict[str, tuple[bool | None, str | None]],
            summary: str) -> dict[str, Any]:
    key = dec if dec is not None else "all"
    verdict, why = verdicts.get(key, (None, f"not measured under the {dec} decoding"))
    return {"id": cid, "paper": PAPER[cid], "rule": RULES[cid].format(dec=dec), "measured": measured,
            "summary": summary, "reproduced_by_decoding": {d: v for d, (v, _) in verdicts.items()},
            "reproduced": verdict, "why": why}


def claim_a(measured: dict[str, dict[str, Any]], rule_decoding: str) -> dict[str, Any]:
    """Claim (a) from ``cap_experiment.json`` (:func:`lwlib.experiments.cap_experiment`)."""
    verdicts = {d: rule_a(m) for d, m in measured.items()}
    summary = "\n".join(f"[{d}] " + summary_a(m) for d, m in measured.items())
    return _record("a_length_follows_sft_cap", rule_decoding, measured, verdicts, summary)


def claim_arms(cid: str, measured: dict[str, dict[str, Any]], rule_decoding: str) -> dict[str, Any]:
    """Claims (b), (h) or (d) from ``arms.json`` (:func:`lwlib.experiments.arms_experiment`)."""
    rule = {"b_long_data_lifts_limit": rule_b, "h_10000_words": rule_h, "d_length_follows_instruction": rule_d}[cid]
    verdicts = {d: rule(m) for d, m in measured.items()}
    summary = "\n".join(f"[{d}] " + summary_arms(m) for d, m in measured.items())
    return _record(cid, rule_decoding, measured, verdicts, summary)


def claim_c(measured: dict[str, dict[str, Any]], rule_decoding: str) -> dict[str, Any]:
    """Claim (c) from ``length_score_difference.json`` (``{decoding: {before, after, difference, lo, hi, ...}}``)."""
    verdicts = {d: rule_c(m) for d, m in measured.items()}
    summary = "\n".join(f"[{d}] " + summary_c(m) for d, m in measured.items())
    return _record("c_dpo_improves_length_score", rule_decoding, measured, verdicts, summary)


def claim_nll(measured: dict[str, Any]) -> dict[str, Any]:
    """The NLL claim from ``nll/claim.json`` (``{"curves": {tag: points}, "long_context": {...} | None}``)."""
    lc = measured.get("long_context")
    return _record("nll_long_context_helps", None, measured, {"all": rule_nll(lc)},
                   summary_nll(lc, measured.get("curves", {})))


# ------------------------------------------------------------------------------------- from a run folder

def _read(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return json.loads(path.read_text(encoding="utf-8"))


def collect_claims(prof, rule_decoding: str | None = None) -> list[dict[str, Any]]:
    """The claims whose measurements exist in the run folder (notebooks 03-06 write them), computed by their
    rules; writes ``<run>/claims.json``. ``rule_decoding``: the decoding whose verdict is ``reproduced`` (default:
    ``loopfree`` when the profile has it, else its first). A claim whose files are missing is a record with
    ``reproduced: null`` saying which notebook makes them."""
    from .decodings import rule_decoding as rule_dec

    dec = rule_decoding or rule_dec(prof)
    run = prof.run_dir
    out: list[dict[str, Any]] = []

    def missing(cid: str, what: str, notebook: str) -> dict[str, Any]:
        return {"id": cid, "paper": PAPER[cid], "rule": RULES[cid].format(dec=dec), "measured": None,
                "summary": "not measured in this run", "reproduced_by_decoding": {}, "reproduced": None,
                "why": f"not measured: {what} is missing (notebooks/{notebook})"}

    sft = run / "sft"
    out.append(claim_a(_read(sft / "cap_experiment.json"), dec) if (sft / "cap_experiment.json").exists()
               else missing("a_length_follows_sft_cap", "sft/cap_experiment.json", "03_sft.ipynb"))
    for cid in ("b_long_data_lifts_limit", "h_10000_words", "d_length_follows_instruction"):
        out.append(claim_arms(cid, _read(sft / "arms.json"), dec) if (sft / "arms.json").exists()
                   else missing(cid, "sft/arms.json", "03_sft.ipynb"))
    p = run / "dpo" / "length_score_difference.json"
    out.append(claim_c(_read(p), dec) if p.exists()
               else missing("c_dpo_improves_length_score", "dpo/length_score_difference.json", "04_dpo.ipynb"))
    p = run / "nll" / "claim.json"
    out.append(claim_nll(_read(p)) if p.exists()
               else missing("nll_long_context_helps", "nll/claim.json", "05_nll_by_position.ipynb"))
    atomic_write_json(run / "claims.json", out)
    return out


def verdict_text(v: bool | None) -> str:
    """``yes``, ``no`` or ``incomplete`` for a verdict."""
    return "incomplete" if v is None else ("yes" if v else "no")


def claims_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per claim: the paper's statement, the rule, the measured numbers (``summary``), the verdict per
    decoding and overall, and why not."""
    rows = []
    for r in records:
        by = ", ".join(f"{d}: {verdict_text(v)}" for d, v in r["reproduced_by_decoding"].items())
        rows.append({"claim": r["id"], "paper": r["paper"], "rule": r["rule"], "measured": r.get("summary", ""),
                     "by decoding": by, "reproduced": verdict_text(r["reproduced"]), "why": r.get("why") or ""})
    return pd.DataFrame(rows).set_index("claim")
