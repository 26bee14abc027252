"""The paper's experiments at small scale, from the stages' outputs: the tables, figures and measurement files that
:mod:`lwlib.claims` turns into verdicts.

* (a) the controlled experiment (Section 2): SFT data capped at several output lengths, one model per cap, each
  probed on LongWrite-Ruler under every decoding (:func:`cap_experiment`, ``<run>/sft/cap_experiment.json``);
* (b) long-output data lifts the limit (Section 4): the SFT arms (general data alone, general + AgentWrite data of
  the 135M writer) beside the main run (:func:`arms_comparison`, ``<run>/sft/arms.json``);
* (c) DPO and length following (Section 4.3): LongBench-Write S_l before and after DPO, per bucket, paired
  bootstrap intervals, per decoding (:func:`dpo_length_comparison`, ``<run>/dpo/length_score_difference.json``);
* NLL by position (Figure 7): the curve's value at position 100 and at its last well-supported position
  (:func:`nll_claim_points`, ``<run>/nll/claim.json``).

Usage::

    table = cap_experiment(prof, frames_by_cap)          # frames_by_cap: {(cap or None, decoding): probe records}
    plot_cap_experiment(table, figs / "sft_length_cap_experiment.png", title)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .plots import pyplot, save_figure
from .runs import atomic_write_json


def sft_tags(cfg) -> dict[str, str]:
    """Model tags of notebook 03's runs (``sft``, one ``sft_<arm>`` per arm, one ``cap<N>`` per cap) with a
    description each."""
    tags = {"sft": f"general + {cfg.data_path or 'agentwrite'} data (uncapped)"}
    tags.update({f"sft_{name}": f"general + {data} data" if data != "none" else "general data alone"
                 for name, data in cfg.arms.items()})
    tags.update({f"cap{c}": f"general + {cfg.data_path or 'agentwrite'} data, outputs <= {c} words" for c in cfg.caps})
    return tags


# ----------------------------------------------------------------------------------- (a) the length cap

def cap_experiment(prof, probe_frames: dict[tuple[int | None, str], pd.DataFrame], quantile: float = 0.95) -> pd.DataFrame:
    """One row per (decoding, cap): the longest output in the SFT data (``data_stats.json``), the model's maximum
    output length on LongWrite-Ruler (raw and effective words at ``quantile``), the shares of outputs that stopped
    before the token limit and that collapsed. ``probe_frames`` maps ``(cap, decoding)`` to probe records; cap
    None is the uncapped main run. Writes ``<run>/sft/cap_experiment.json`` ({decoding: lists})."""
    from .probe import summarize_probe
    from .sft import cap_dir, data_stats

    rows = []
    for (cap, dec), df in probe_frames.items():
        st = data_stats(cap_dir(prof, cap) if cap is not None else prof.run_dir / "sft" / "model")
        s = summarize_probe(df, quantile)
        rows.append({"decoding": dec, "cap": "none" if cap is None else int(cap),
                     "data_max_output_words": st["data_max_output_words"], "examples": st["examples"],
                     "model_max_output_words_raw": s["max_output_words_raw"],
                     "model_max_output_words_effective": s["max_output_words_effective"],
                     "share_stopped": s["share_stopped"], "share_collapsed": s["share_collapsed"]})
    table = pd.DataFrame(rows)
    table["_order"] = table["cap"].map(lambda c: float("inf") if c == "none" else c)
    table = table.sort_values(["decoding", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)
    measured = {}
    for dec, t in table.groupby("decoding", sort=False):
        measured[dec] = {"caps": [None if c == "none" else c for c in t["cap"]],
                         "data_max_words": [float(x) for x in t["data_max_output_words"]],
                         "p95_words": [float(x) for x in t["model_max_output_words_raw"]],
                         "p95_effective_words": [float(x) for x in t["model_max_output_words_effective"]],
                         "share_stopped": [float(x) for x in t["share_stopped"]],
                         "share_collapsed": [float(x) for x in t["share_collapsed"]]}
    atomic_write_json(prof.stage_dir("sft") / "cap_experiment.json", measured)
    return table


def plot_cap_experiment(table: pd.DataFrame, path: str | Path, title: str) -> Path:
    """The controlled-experiment figure: the model's max output length (p95) against the longest output in its
    SFT data, one colour per decoding (solid: raw words, dashed: effective), each point labelled with its cap and
    the share of outputs that stopped before the token limit."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    top = 0.0
    for k, (dec, t) in enumerate(table.groupby("decoding", sort=False)):
        t = t.sort_values("data_max_output_words")
        x = t["data_max_output_words"]
        ax.plot(x, t["model_max_output_words_raw"], "o-", color=f"C{k}", label=f"{dec}: p95 raw words")
        ax.plot(x, t["model_max_output_words_effective"], "s--", color=f"C{k}", alpha=0.7,
                label=f"{dec}: p95 effective words")
        for j, (_, r) in enumerate(t.iterrows()):  # alternate above/below: neighbouring caps sit close together
            ax.annotate(f"cap {r['cap']}, stop {r['share_stopped']:.0%}",
                        (r["data_max_output_words"], r["model_max_output_words_raw"]),
                        textcoords="offset points", xytext=(4, 6 if j % 2 == 0 else -12), fontsize=7,
                        color=f"C{k}")
        top = max(top, float(x.max()), float(t["model_max_output_words_raw"].max()))
    ax.plot([0, top * 1.1], [0, top * 1.1], ":", color="gray", label="y = x")
    ax.set_xlabel("max output length in SFT data (words)")
    ax.set_ylabel("max output length of the model (words, p95 on LongWrite-Ruler)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------- (b) the arms of SFT

def arms_comparison(prof, frames: dict[str, pd.DataFrame], descriptions: dict[str, str],
                    quantile: float = 0.95) -> pd.DataFrame:
    """One row per (decoding, model) of the probe ``frames`` (labels ``"<tag> (<decoding>)"``): p95 raw and
    effective words, stop and collapse shares. Writes ``<run>/sft/arms.json`` ({decoding: {tag: p95 effective}})."""
    from .probe import summarize_probe

    rows = []
    for name, df in frames.items():
        tag, dec = str(df["tag"].iloc[0]), str(df["decoding"].iloc[0])
        s = summarize_probe(df, quantile)
        rows.append({"decoding": dec, "model": tag, "SFT data": descriptions.get(tag, tag),
                     "p95 raw words": s["max_output_words_raw"], "p95 effective words": s["max_output_words_effective"],
                     "stopped": s["share_stopped"], "collapsed": s["share_collapsed"]})
    table = pd.DataFrame(rows).set_index(["decoding", "model"])
    measured: dict[str, dict[str, float]] = {}
    for (dec, tag), r in table.iterrows():
        measured.setdefault(dec, {})[tag] = float(r["p95 effective words"])
    atomic_write_json(prof.stage_dir("sft") / "arms.json", measured)
    return table


def plot_arms(table: pd.DataFrame, path: str | Path, title: str) -> Path:
    """p95 effective output length per SFT arm, bars grouped by decoding (labels: stop share)."""
    plt = pyplot()
    decs = list(dict.fromkeys(table.index.get_level_values("decoding")))
    models = list(dict.fromkeys(table.index.get_level_values("model")))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(models) * len(decs)), 4.4))
    x = np.arange(len(models))
    w = 0.8 / len(decs)
    for k, dec in enumerate(decs):
        vals = [table.loc[(dec, m), "p95 effective words"] if (dec, m) in table.index else np.nan for m in models]
        stops = [table.loc[(dec, m), "stopped"] if (dec, m) in table.index else np.nan for m in models]
        xs = x + (k - (len(decs) - 1) / 2) * w
        ax.bar(xs, np.nan_to_num(vals), w, color=f"C{k}", label=f"decoding: {dec}")
        for xi, v, st in zip(xs, vals, stops):
            if not np.isnan(v):
                ax.text(xi, v, f"{v:.0f}\nstop {st:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, models)
    ax.set_ylabel("max output length (p95 effective words, LongWrite-Ruler)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------ (c) DPO and S_l

def dpo_length_comparison(prof, results: dict[str, pd.DataFrame], before: str, after: str, n_boot: int = 1000,
                          seed: int = 0) -> pd.DataFrame:
    """S_l of ``after`` minus ``before`` (model tags) on the same LongBench-Write items, overall and per bucket,
    for every decoding in ``results`` (labels ``"<tag> (<decoding>)"``), with paired bootstrap 95% intervals.
    Writes ``<run>/dpo/length_score_difference.json``."""
    from .bench import length_score_difference
    from .decodings import model_label, profile_decodings

    tables, measured = {}, {}
    for dec in profile_decodings(prof):
        b, a = results.get(model_label(before, dec)), results.get(model_label(after, dec))
        if b is None or a is None:
            continue
        t = length_score_difference(b, a, "bucket", n_boot, seed)
        tables[dec.name] = t
        o = t.loc["overall"]
        measured[dec.name] = {"before_model": before, "after_model": after, "items": int(o["n"]),
                              "before": float(o["before"]), "after": float(o["after"]),
                              "difference": float(o["difference"]), "lo": float(o.get("lo", np.nan)),
                              "hi": float(o.get("hi", np.nan)),
                              "by_bucket": {g: {k: float(v) for k, v in r.items()} for g, r in t.iterrows()
                                            if g != "overall"}}
    if not tables:
        raise ValueError(f"dpo_length_comparison: no decoding has both {before!r} and {after!r} results")
    atomic_write_json(prof.stage_dir("dpo") / "length_score_difference.json", measured)
    return pd.concat(tables, names=["decoding"]).round(2)


def plot_length_difference(table: pd.DataFrame, path: str | Path, title: str) -> Path:
    """S_l before and after DPO per bucket (bars) with the difference's 95% interval written above, one panel per
    decoding (``table``: :func:`dpo_length_comparison`)."""
    plt = pyplot()
    decs = list(dict.fromkeys(table.index.get_level_values("decoding")))
    fig, axes = plt.subplots(1, len(decs), figsize=(5.6 * len(decs), 4.3), squeeze=False, sharey=True)
    for ax, dec in zip(axes[0], decs):
        t = table.loc[dec]
        x = np.arange(len(t))
        ax.bar(x - 0.2, t["before"], 0.4, label="before DPO (SFT)")
        ax.bar(x + 0.2, t["after"], 0.4, label="after DPO")
        for xi, (_, r) in zip(x, t.iterrows()):
            ci = f"[{r['lo']:+.1f}, {r['hi']:+.1f}]" if "lo" in r and not np.isnan(r["lo"]) else ""
            ax.text(xi, max(r["before"], r["after"]) + 2, f"{r['difference']:+.1f}\n{ci}", ha="center", fontsize=7)
        ax.set_xticks(x, [f"{g}\n(n={int(n)})" for g, n in zip(t.index, t["n"])], fontsize=8)
        ax.set_ylim(0, 110)
        ax.set_title(f"decoding: {dec}", fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("S_l (LongBench-Write length score)")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------ NLL by position

def nll_claim_points(prof, frames: dict[str, pd.DataFrame], position: int = 100) -> dict[str, Any]:
    """Per model, the Figure 7 curve at ``position`` and at its last well-supported position
    (:func:`lwlib.claims.nll_points`); writes ``<run>/nll/claim.json``."""
    from .claims import nll_points
    from .nll import cumulative_curve

    out = {tag: nll_points(cumulative_curve(df["nll"].tolist()), len(df), position) for tag, df in frames.items()}
    atomic_write_json(prof.stage_dir("nll") / "claim.json", out)
    return out
