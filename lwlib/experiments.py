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

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .intervals import N_BOOT, Cells, best_spearman, bootstrap, cells, censored_quantile, spearman, unit_ids
from .plots import pyplot, save_figure
from .runs import atomic_write_json


def sft_tags(cfg) -> dict[str, str]:
    """Model tags of notebook 03's runs of seed 0 (``sft``, one ``sft_<arm>`` per arm, one ``cap<N>`` per cap,
    ``uncapped``) with a description each (:func:`lwlib.sft.sft_runs`)."""
    from .sft import sft_runs

    return {r.tag: r.description for r in sft_runs(cfg) if r.seed == 0}


def by_seed(frames: dict[str, pd.DataFrame], decoding: str) -> dict[str, dict[int, pd.DataFrame]]:
    """Probe records ``{"<tag> (<decoding>)": records}`` of one decoding as ``{tag without seed: {seed: records}}``."""
    from .models import split_seed

    out: dict[str, dict[int, pd.DataFrame]] = {}
    for df in frames.values():
        if df.empty or str(df["decoding"].iloc[0]) != decoding:
            continue
        base, k = split_seed(str(df["tag"].iloc[0]))
        out.setdefault(base, {})[k] = df
    return out


def _decodings(frames: dict[str, pd.DataFrame]) -> list[str]:
    return list(dict.fromkeys(str(df["decoding"].iloc[0]) for df in frames.values() if not df.empty))


def _arm_numbers(words: np.ndarray, cens: np.ndarray, stopped: np.ndarray, collapsed: np.ndarray,
                 quantile: float) -> dict[str, Any]:
    p, lb, share = censored_quantile(words, cens, quantile)
    return {"p95": p, "lower_bound": lb, "share_censored": share, "share_stopped": float(stopped.mean()),
            "share_collapsed": float(collapsed.mean()), "outputs": int(words.size)}


def _flags(by: dict[int, pd.DataFrame], seeds: list[int], column: str) -> np.ndarray:
    return np.concatenate([by[k][column].to_numpy(bool) for k in seeds])


def _per_seed(c: Cells, arm: str, frames: dict[int, pd.DataFrame], quantile: float) -> dict[int, dict[str, Any]]:
    out = {}
    for i, k in enumerate(c.seeds):
        df = frames[k]
        out[k] = _arm_numbers(c.words[arm][i], c.censored[arm][i], ~df["hit_limit"].to_numpy(bool),
                              df["collapsed"].to_numpy(bool), quantile)
    return out


def _ratio_stat(top: str, bottom: str, quantile: float):
    def stat(v, _req):
        lo = censored_quantile(*v[bottom], quantile)[0]
        return censored_quantile(*v[top], quantile)[0] / max(lo, 1.0)
    return stat


# ----------------------------------------------------------------------------------- (a) the length cap

def cap_experiment(prof, frames: dict[str, pd.DataFrame], quantile: float = 0.95, n_boot: int = N_BOOT
                   ) -> pd.DataFrame:
    """The controlled experiment (Section 2) from the probes of its runs (``frames``: labels ``"<tag> (<decoding>)"``
    of ``cap<N>[-s<k>]`` and the uncapped point, ``uncapped[-s<k>]``, or ``sft[-s<k>]`` in profiles without one:
    ``sft.cap_uncapped: false``).
    Per decoding and seed: each run's longest output in its data (``data_stats.json``) and its p95 effective output
    length on LongWrite-Ruler (a lower bound when censored, :func:`lwlib.intervals.censored_quantile`), the Spearman
    correlation of the two over the caps; over all seeds: the uncapped run's p95 over the smallest cap's, with a
    seeds-and-prompts bootstrap interval. Writes ``<run>/sft/cap_experiment.json``; returns one row per (decoding,
    seed, run)."""
    from .models import sft_folder
    from .sft import SFTConfig, data_stats

    cfg = prof.section("sft", SFTConfig)
    rows, measured = [], {}
    for dec in _decodings(frames):
        runs = by_seed(frames, dec)
        # the design's top point: the uncapped run where the profile has one (until it is measured, the largest
        # cap measured), else the main run; never the main run where an uncapped one is designed (it holds general
        # data, which (a)'s arms do not)
        top = "uncapped" if cfg.cap_uncapped or "uncapped" in runs else "sft"
        arms = sorted((t for t in runs if t.startswith("cap") and t[3:].isdigit()), key=lambda t: int(t[3:]))
        if top in runs:
            arms.append(top)
        if len(arms) < 2:
            continue
        top = arms[-1]  # the uncapped point, or the largest cap where it is not measured (yet)
        designed = [f"cap{c}" for c in sorted(cfg.caps)] + (["uncapped"] if cfg.cap_uncapped else ["sft"])
        c = cells({a: runs[a] for a in arms})
        data_max = [float(data_stats(sft_folder(prof.run_dir, a).parent)["data_max_output_words"]) for a in arms]
        caps = [int(a[3:]) if a.startswith("cap") else None for a in arms]
        seeds = {}
        for a in arms:
            for k, num in _per_seed(c, a, runs[a], quantile).items():
                seeds.setdefault(k, {})[a] = num
                rows.append({"decoding": dec, "seed": k, "run": a, "cap": caps[arms.index(a)] or "none",
                             "data_max_output_words": data_max[arms.index(a)], **num})
        by_k = {k: {"p95": [v[a]["p95"] for a in arms], "lower_bound": [v[a]["lower_bound"] for a in arms],
                    "share_censored": [v[a]["share_censored"] for a in arms],
                    "share_stopped": [v[a]["share_stopped"] for a in arms],
                    "spearman": spearman(data_max, [v[a]["p95"] for a in arms]),
                    "spearman_best": _best_spearman(designed, v)} for k, v in seeds.items()}
        pooled = {a: _arm_numbers(c.words[a], c.censored[a], ~_flags(runs[a], c.seeds, "hit_limit"),
                                  _flags(runs[a], c.seeds, "collapsed"), quantile) for a in arms}
        ratio = pooled[top]["p95"] / max(pooled[arms[0]]["p95"], 1.0)
        lo, hi = bootstrap(c, _ratio_stat(top, arms[0], quantile), n_boot, prof.seed)
        measured[dec] = {"runs": arms, "caps": caps, "data_max_words": data_max, "seeds": c.seeds,
                         "expected_seeds": cfg.seeds, "prompts": len(c.prompts), "samples": c.words[arms[0]].shape[2],
                         "by_seed": by_k, "pooled": {a: pooled[a] for a in arms},
                         "ratio_top_over_smallest": {"top": top, "smallest": arms[0], "value": ratio, "lo": lo,
                                                     "hi": hi, "numerator_lower_bound": pooled[top]["lower_bound"],
                                                     "denominator_lower_bound": pooled[arms[0]]["lower_bound"]}}
    atomic_write_json(prof.stage_dir("sft") / "cap_experiment.json", measured)
    return pd.DataFrame(rows)


def _best_spearman(designed: list[str], seed: dict[str, dict]) -> float | None:
    """The largest Spearman over the designed runs (in cap order) that one seed can still reach whatever its runs not
    measured yet give (:func:`lwlib.intervals.best_spearman`); None where a measured p95 below the top is censored
    (a lower bound: its place is not known) or a measured run is not among the designed ones."""
    if not designed or set(seed) - set(designed) or any(seed[a]["lower_bound"] for a in seed if a != designed[-1]):
        return None
    return best_spearman([seed[a]["p95"] if a in seed else None for a in designed])


def _ruler_lines(ax, runs: dict[str, dict[int, pd.DataFrame]], arms: list[str], labels: dict[str, str]) -> None:
    """Mean effective output words against required length, one line per run (seeds pooled), the seeds' spread as
    a band, on log-log axes with y = x."""
    for j, a in enumerate(arms):
        per = pd.concat([df.assign(_seed=k) for k, df in runs[a].items()])
        g = per.groupby(["required_length", "_seed"])["effective_words"].mean().unstack()
        x = g.index.to_numpy(float)
        style = ["-", "--", "-.", ":"][j % 4]
        ax.plot(x, g.mean(axis=1), style, marker="os^vD<>p"[j % 8], ms=4, color=f"C{j}", label=labels.get(a, a))
        if g.shape[1] > 1:
            ax.fill_between(x, g.min(axis=1), g.max(axis=1), color=f"C{j}", alpha=0.12)
    lim = [500, 40000]
    ax.plot(lim, lim, ":", color="gray", lw=1, label="output = required")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("required length (words)")
    ax.set_ylabel("output length (effective words, mean)")
    ax.grid(alpha=0.3, which="both")


def plot_cap_experiment(prof, frames: dict[str, pd.DataFrame], decoding: str, path: str | Path, title: str) -> Path:
    """The controlled experiment in the paper's Figure 2 form: left, each capped model's output length against the
    required length on LongWrite-Ruler (mean over outputs and seeds; band: the seeds' range); right, each model's
    p95 against the longest output of its SFT data, one marker per seed (hollow: a censored lower bound) and the
    pooled p95 (``cap_experiment.json``)."""
    m = json.loads((prof.stage_dir("sft") / "cap_experiment.json").read_text())[decoding]
    runs = by_seed(frames, decoding)
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6))
    labels = {a: f"{a} (data <= {w:,.0f} words)" for a, w in zip(m["runs"], m["data_max_words"])}
    _ruler_lines(ax, runs, m["runs"], labels)
    ax.set_title(f"LongWrite-Ruler by SFT data cap ({decoding} decoding)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    x = np.array(m["data_max_words"])
    for i, k in enumerate(m["seeds"]):
        v = m["by_seed"][str(k)] if str(k) in m["by_seed"] else m["by_seed"][k]
        for xi, p, lb in zip(x, v["p95"], v["lower_bound"]):
            bx.plot(xi * (1 + 0.04 * (i - 1)), p, "o", color=f"C{i}", mfc="none" if lb else f"C{i}", ms=6,
                    label=f"seed {k}" if xi == x[0] else None)
    pooled = [m["pooled"][a]["p95"] for a in m["runs"]]
    bx.plot(x, pooled, "k-", lw=1.5, label="all seeds (p95 of pooled outputs)")
    top = max(x.max(), max(pooled)) * 1.3
    bx.plot([50, top], [50, top], "--", color="0.6", lw=1, label="p95 = the data's longest output")
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("longest output in the SFT data (words)")
    bx.set_ylabel("model's max output length (p95 effective words)")
    r = m["ratio_top_over_smallest"]
    bx.set_title(f"p95: {r['top']} / {r['smallest']} = {r['value']:.1f}x [{r['lo']:.1f}, {r['hi']:.1f}]; "
                 "hollow = censored (lower bound)", fontsize=8)
    bx.legend(fontsize=8, loc="upper left")
    bx.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------- (b) the arms of SFT

def arms_experiment(prof, frames: dict[str, pd.DataFrame], long_arm: str = "sft", general_arm: str = "sft_general",
                    quantile: float = 0.95, n_boot: int = N_BOOT) -> pd.DataFrame:
    """Section 4's comparison from the probes of the SFT arms (``frames``: ``"<tag> (<decoding>)"``, seeds as
    ``-s<k>``): per decoding, seed and arm the p95 effective output length (censoring flagged); over the seeds the
    ratio of general + long-output data (``long_arm``) to general data alone (``general_arm``) with a
    seeds-and-prompts bootstrap interval over the seeds both arms have (claim b), the long arm's p95 per seed
    (claim h, 10,000+ words) and the Spearman correlation of its outputs' lengths with the required lengths (claim d,
    Figure 1 after training), with its interval, both over every seed of the long arm (``long_arm_seeds``: they need
    no other arm). Other arms are reported only. Writes ``<run>/sft/arms.json``; returns one row per (decoding,
    seed, arm)."""
    from .sft import SFTConfig

    cfg = prof.section("sft", SFTConfig)
    rows, measured = [], {}
    for dec in _decodings(frames):
        runs = by_seed(frames, dec)
        arms = [a for a in runs if a == "sft" or a.startswith("sft_")]
        if long_arm not in arms:
            continue
        c = cells({a: runs[a] for a in arms})  # the seeds and prompts every arm has: the paired comparison (b)
        own = {a: cells({a: runs[a]}) for a in arms}  # each arm's own seeds: its p95 per seed, claims h and d
        seeds: dict[int, dict[str, Any]] = {}
        for a in arms:
            for k, num in _per_seed(own[a], a, runs[a], quantile).items():
                seeds.setdefault(k, {})[a] = num
                rows.append({"decoding": dec, "seed": k, "arm": a, **num})
        pooled = {a: _arm_numbers(c.words[a], c.censored[a], ~_flags(runs[a], c.seeds, "hit_limit"),
                                  _flags(runs[a], c.seeds, "collapsed"), quantile) for a in arms}
        lc = own[long_arm]
        req = np.broadcast_to(lc.required[None, :, None], lc.words[long_arm].shape)
        rho = {k: spearman(req[i], lc.words[long_arm][i]) for i, k in enumerate(lc.seeds)}
        d_lo, d_hi = bootstrap(lc, lambda v, r: spearman(np.broadcast_to(r[:, :, None], v[long_arm][0].shape),
                                                          v[long_arm][0]), n_boot, prof.seed)
        out: dict[str, Any] = {"arms": arms, "long_arm": long_arm, "general_arm": general_arm, "seeds": c.seeds,
                               "long_arm_seeds": lc.seeds, "expected_seeds": cfg.seeds, "prompts": len(c.prompts),
                               "samples": c.words[long_arm].shape[2],
                               "by_seed": seeds, "pooled": pooled,
                               "length_following": {"spearman_by_seed": rho,
                                                    "spearman": spearman(req, lc.words[long_arm]),
                                                    "lo": d_lo, "hi": d_hi}}
        if general_arm in arms:
            ratio = pooled[long_arm]["p95"] / max(pooled[general_arm]["p95"], 1.0)
            lo, hi = bootstrap(c, _ratio_stat(long_arm, general_arm, quantile), n_boot, prof.seed)
            out["ratio_long_over_general"] = {"value": ratio, "lo": lo, "hi": hi,
                                              "numerator_lower_bound": pooled[long_arm]["lower_bound"],
                                              "denominator_lower_bound": pooled[general_arm]["lower_bound"]}
        measured[dec] = out
    atomic_write_json(prof.stage_dir("sft") / "arms.json", measured)
    return pd.DataFrame(rows)


def plot_arms(prof, frames: dict[str, pd.DataFrame], decoding: str, descriptions: dict[str, str], path: str | Path,
              title: str) -> Path:
    """Left: each SFT arm's output length against the required length (LongWrite-Ruler, Figure 1's axes; band: the
    seeds' range). Right: each arm's p95 effective output length over all seeds with its bootstrap interval for the
    two compared arms, one marker per seed (hollow: censored lower bound), and the 10,000-word line of the paper's
    title (``arms.json``)."""
    m = json.loads((prof.stage_dir("sft") / "arms.json").read_text())[decoding]
    runs = by_seed(frames, decoding)
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6))
    labels = {a: f"{a}: {descriptions.get(a, a)}" for a in m["arms"]}
    _ruler_lines(ax, runs, m["arms"], labels)
    ax.set_title(f"LongWrite-Ruler by SFT data ({decoding} decoding)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    xs = np.arange(len(m["arms"]))
    pooled = [m["pooled"][a]["p95"] for a in m["arms"]]
    bx.bar(xs, pooled, 0.6, color=[f"C{j}" for j in range(len(xs))], alpha=0.5,
           label="pooled p95 (the seeds every arm has)")
    for j, a in enumerate(m["arms"]):
        for i, (k, v) in enumerate(m["by_seed"].items()):
            if a not in v:  # a seed this arm has not run yet (sft's three seeds before sft_general's)
                continue
            n = v[a]
            bx.plot(j + 0.12 * (i - 1), n["p95"], "o", color="k", mfc="none" if n["lower_bound"] else "k", ms=5,
                    label="seeds (hollow = censored)" if (j, i) == (0, 0) else None)
    r = m.get("ratio_long_over_general")
    if r:
        bx.set_title(f"p95 {m['long_arm']} / {m['general_arm']} = {r['value']:.1f}x [{r['lo']:.1f}, {r['hi']:.1f}]",
                     fontsize=8)
    bx.axhline(10000, color="gray", ls="--", lw=1, label="10,000 words")
    top = max([10000, *pooled, *(n["p95"] for v in m["by_seed"].values() for n in v.values())])
    bx.set_ylim(0, top * 1.4)  # room above every marker for the legend
    bx.set_xticks(xs, m["arms"], fontsize=8)
    bx.set_ylabel("max output length (p95 effective words)")
    bx.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------ (c) DPO and S_l

def dpo_length_comparison(prof, results: dict[str, pd.DataFrame], before: str | list[str], after: str | list[str],
                          n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """S_l of ``after`` minus ``before`` (model tags) on the same LongBench-Write items, overall and per bucket,
    for every decoding in ``results`` (labels ``"<tag> (<decoding>)"``), with paired bootstrap 95% intervals over
    seeds, then items (:func:`lwlib.bench.length_score_difference`). Lists of tags give seed k's pair at index k
    (``["sft", "sft-s1"]``, ``["dpo", "dpo-s1"]``: the design's seeds); the seeds present in ``results`` are used and
    the record says which were expected. Writes ``<run>/dpo/length_score_difference.json``."""
    from .bench import length_score_difference
    from .decodings import model_label, profile_decodings

    befores, afters = ([x] if isinstance(x, str) else list(x) for x in (before, after))
    if len(befores) != len(afters):
        raise ValueError(f"dpo_length_comparison: {len(befores)} models before and {len(afters)} after")
    before, after = befores[0], afters[0]
    tables, measured = {}, {}
    for dec in profile_decodings(prof):
        pairs = {k: (results.get(model_label(b, dec)), results.get(model_label(a, dec)))
                 for k, (b, a) in enumerate(zip(befores, afters))}
        pairs = {k: p for k, p in pairs.items() if p[0] is not None and p[1] is not None}
        if not pairs:
            continue
        t = length_score_difference({k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()},
                                    "bucket", n_boot, seed)
        tables[dec.name] = t
        o = t.loc["overall"]
        samples = max(int(unit_ids(p[0]["id"]).value_counts().max()) for p in pairs.values())
        measured[dec.name] = {"before_model": before, "after_model": after, "items": int(o["n"]),
                              "seeds": sorted(pairs), "expected_seeds": len(befores), "samples_per_item": samples,
                              "by_seed": {str(k): float(o.get(f"d_s{k}", o["difference"])) for k in sorted(pairs)},
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


def long_context_change(long: list[pd.DataFrame], short: list[pd.DataFrame], position: int = 500,
                        n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any] | None:
    """Figure 7's long-context effect against a short-data model: per held-out passage ``i`` the long model's
    cumulative average NLL minus the short model's (each averaged over its seeds' models), at the end position
    ``E`` (the shortest passage: every passage reaches it) and at ``position``; ``change`` = mean over passages of
    ``d_i(E) - d_i(position)``, with a bootstrap interval over passages. None when the models share no passages or
    ``E <= position``."""
    from .nll import cumulative_average

    def curves(frames: list[pd.DataFrame]) -> dict[str, np.ndarray]:
        by: dict[str, list[np.ndarray]] = {}
        for df in frames:
            for rid, nll in zip(df["id"], df["nll"]):
                by.setdefault(str(rid), []).append(cumulative_average(nll))
        return {k: np.mean([c[: min(len(x) for x in v)] for c in v], axis=0) for k, v in by.items()
                if len(v) == len(frames)}

    cl, cs = curves(long), curves(short)
    ids = sorted(set(cl) & set(cs))
    if not ids:
        return None
    end = min(min(len(cl[i]), len(cs[i])) for i in ids)
    if end <= position:
        return None
    d_end = np.array([cl[i][end - 1] - cs[i][end - 1] for i in ids])
    d_pos = np.array([cl[i][position - 1] - cs[i][position - 1] for i in ids])
    ch = d_end - d_pos
    rng = np.random.default_rng(seed)
    boot = ch[rng.integers(0, len(ch), (n_boot, len(ch)))].mean(axis=1)
    return {"difference_at_500": float(d_pos.mean()), "difference_at_end": float(d_end.mean()),
            "end_position": int(end), "position": position, "change": float(ch.mean()),
            "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5)), "samples": len(ids)}


def nll_claim_points(prof, frames: dict[str, pd.DataFrame], position: int = 100, long: str = "sft",
                     short: str = "cap500") -> dict[str, Any]:
    """Per model, the Figure 7 curve at ``position`` and at its last well-supported position (:func:`nll_points`),
    and the long-context effect of ``long`` against ``short`` (:func:`long_context_change`; their seeds' models,
    ``-s<k>``, averaged); writes ``<run>/nll/claim.json``."""
    from .models import split_seed
    from .nll import cumulative_curve

    curves = {tag: nll_points(cumulative_curve(df["nll"].tolist()), len(df), position) for tag, df in frames.items()}
    pick = lambda base: [df for t, df in frames.items() if split_seed(t)[0] == base]  # noqa: E731
    lc = long_context_change(pick(long), pick(short), seed=prof.seed) if pick(long) and pick(short) else None
    if lc is not None:
        lc.update(long=long, short=short, seeds=sorted(split_seed(t)[1] for t in frames if split_seed(t)[0] == long))
    out = {"curves": curves, "long_context": lc}
    atomic_write_json(prof.stage_dir("nll") / "claim.json", out)
    return out
